"""Evaluation building blocks on hand-made inputs with known answers (fast, no training).

k-NN votes against a direct computation, linear probes (MAE/LARS and DINO/SGD recipes) on separable
clusters, LARS against its formula, few-label subsets, retrieval recall and zero-shot accuracy on
hand-made embeddings, the sequential shard reader, configs, exports and their errors, report rows.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from data_pipelines.sequential import EvalTransform, ShardSequence, data_identity, iter_dataset
from data_pipelines.tar_index import group_samples, scan_tar, write_dali_index
from evals.config import load_eval_config, protocol_names
from evals.errors import EvalInputError, ExportVanishedError
from evals.export import check_export, load_export, random_init_export
from evals.finetune import Classifier, mix_batch, param_groups
from evals.knn import knn_classify, knn_votes
from evals.linear import LARS, train_linear
from evals.retrieval import retrieval_recall
from evals.subsets import holdout_split, select_subset
from evals.zeroshot import load_templates, zeroshot_accuracy
from pretrain.models import create_vit


# ------------------------------------------------------------------------------------------ helpers
def write_shards(
    root: Path,
    samples: list[tuple[np.ndarray, int | None, list[str] | None]],
    shard_size: int,
    classes: list[str] | None = None,
) -> Path:
    """WebDataset shards (+ DALI index + manifest) from (uint8 image, label, captions) triples."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(0, len(samples), shard_size):
        name = f"shard-{s // shard_size:06d}"
        tar_path = root / f"{name}.tar"
        with tarfile.open(tar_path, "w") as tf:
            for i, (pixels, label, captions) in enumerate(samples[s : s + shard_size], start=s):
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                members = [(f"{i:08d}.png", buf.getvalue())]
                if label is not None:
                    members.append((f"{i:08d}.cls", str(label).encode()))
                if captions is not None:
                    members.append((f"{i:08d}.txt", "\n".join(captions).encode()))
                for member, data in members:
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        write_dali_index(root / f"{name}.idx", group_samples(scan_tar(tar_path)))
        entries.append(
            {
                "name": f"{name}.tar",
                "index_file": f"{name}.idx",
                "num_samples": len(samples[s : s + shard_size]),
            }
        )
    manifest = {
        "format": "webdataset",
        "version": 1,
        "num_samples": len(samples),
        "classes": classes,
        "shards": entries,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def write_export(path: Path, model: torch.nn.Module, **meta: object) -> Path:
    """An export directory in the trainer's format (COMPLETE last)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "backbone.safetensors"))
    full = {"method": "mae", "feature": "cls", "mean": [0.5] * 3, "std": [0.25] * 3, "run": "unit", **meta}
    (path / "backbone.json").write_text(json.dumps(full))
    (path / "COMPLETE").write_text(json.dumps({"step": meta.get("step")}))
    return path


TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, pos_embed="sincos")


def tiny_export(path: Path, step: int = 10, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return write_export(
        path, create_vit("vit_tiny_patch16", **TINY), arch="vit_tiny_patch16", step=step, **TINY
    )


def clusters(
    n_per: int, num_classes: int, dim: int, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


# ---------------------------------------------------------------------------------------------- k-NN
def test_knn_votes_match_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    votes = knn_votes(train, labels, test, k=5, temperature=0.07, num_classes=4)
    for q in range(7):
        sims = [
            float(torch.dot(test[q] / test[q].norm(), train[i] / train[i].norm())) for i in range(50)
        ]  # cosine, by hand
        nearest = sorted(range(50), key=lambda i: -sims[i])[:5]
        expected = [0.0] * 4
        for i in nearest:
            expected[int(labels[i])] += math.exp(sims[i] / 0.07)
        assert votes[q].tolist() == pytest.approx(expected, rel=1e-4)


def test_knn_weighting_changes_the_vote() -> None:
    # One very close neighbour of class 1 outweighs two farther ones of class 0 (exp(s/T) weights).
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([1, 0, 0])
    test = torch.tensor([[1.0, 0.0]])
    m = knn_classify(train, labels, test, torch.tensor([1]), ks=[3], temperature=0.07, num_classes=2)
    assert m["k3_top1"] == 100.0
    m = knn_classify(train, labels, test, torch.tensor([0]), ks=[3], temperature=10.0, num_classes=2)
    assert m["k3_top1"] == 100.0  # almost uniform weights: the majority wins


def test_knn_clusters_and_k_capping() -> None:
    train, ytr = clusters(20, 10, 16, 0.3, seed=1)
    test, yte = clusters(5, 10, 16, 0.3, seed=1)
    m = knn_classify(train, ytr, test, yte, ks=[10, 20, 100, 200, 1000], chunk_size=7)
    assert set(m) == {f"k{k}_{t}" for k in (10, 20, 100, 200) for t in ("top1", "top5")}  # 1000 -> 200 = N
    assert m["k10_top1"] == 100.0 and m["k20_top5"] == 100.0


# ------------------------------------------------------------------------------------- linear probe
def test_lars_step_matches_formula() -> None:
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    opt.step()
    d = torch.tensor([[0.3, 2.4]])  # g + wd * w
    expected_w = torch.tensor([[3.0, 4.0]]) - 0.5 * (0.01 * 5.0 / d.norm()) * d
    assert torch.allclose(w.detach(), expected_w)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 0.5]))  # 1-D: no trust ratio, no decay
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    before = w.detach().clone()
    opt.step()  # zero gradient: d = wd * w, momentum keeps moving
    assert not torch.equal(before, w.detach())


@pytest.mark.parametrize(
    "recipe",
    [
        dict(
            head="bn_linear", optimizer="lars", blr=10.0, warmup_epochs=2, epochs=100
        ),  # MAE (lr up: few steps)
        dict(head="linear", optimizer="sgd", blr=1.0, warmup_epochs=0, epochs=30),  # DINO
    ],
)
def test_linear_probe_on_clusters(recipe: dict) -> None:
    x, y = clusters(40, 5, 12, 0.5, seed=2)
    xt, yt = clusters(10, 5, 12, 0.5, seed=2)
    out = train_linear(x, y, xt, yt, num_classes=5, batch_size=64, **recipe)
    assert out["metrics"]["top1"] >= 95.0 and out["batch_size"] == 64
    assert out["lr"] == pytest.approx(recipe["blr"] * 64 / 256)
    again = train_linear(x, y, xt, yt, num_classes=5, batch_size=64, **recipe)
    assert again["metrics"] == out["metrics"]  # seeded


def test_linear_grid_trains_every_head_as_if_alone() -> None:
    """One pass over the features with one head per learning rate = each learning rate trained on its own."""
    x, y = clusters(30, 4, 8, 1.5, seed=3)
    xt, yt = clusters(10, 4, 8, 1.5, seed=4)
    kw = dict(num_classes=4, batch_size=32, epochs=6, warmup_epochs=1, seed=5)
    grid = train_linear(x, y, xt, yt, blr=[0.5, 5.0, 50.0], val_fraction=0.25, **kw)
    fit_rows, val_rows = holdout_split(y, 0.25, seed=5)
    assert grid["num_train"] == len(fit_rows) == 88 and grid["num_val"] == len(val_rows) == 32  # 8 per class
    for entry in grid["grid"]:  # the same head trained alone on the fitting rows
        alone = train_linear(x[fit_rows], y[fit_rows], xt, yt, blr=entry["blr"], **kw)
        assert alone["lr"] == pytest.approx(entry["lr"])
        if entry["blr"] == grid["blr"]:
            assert alone["metrics"]["top1"] == grid["metrics"]["top1"]
            assert alone["metrics"]["final_loss"] == pytest.approx(grid["metrics"]["final_loss"], rel=1e-4)


def test_linear_grid_picks_on_held_out_data_and_survives_divergence() -> None:
    x_all, y_all = clusters(30, 5, 12, 1.0, seed=6)
    x, y, xt, yt = x_all[0::3], y_all[0::3], x_all[1::3], y_all[1::3]  # same classes, other samples
    kw = dict(num_classes=5, head="linear", optimizer="sgd", batch_size=16, epochs=20, warmup_epochs=0)
    grid = [1e-6, 1.0, 1e38]  # far too small, fine, overflowing
    out = train_linear(x, y, xt, yt, blr=grid, **kw)
    by = {e["blr"]: e for e in out["grid"]}
    assert out["blr"] == 1.0 and out["blr_grid"] == grid and out["metrics"]["top1"] >= 90.0
    assert by[1e38].get("diverged") and by[1e38]["val_loss"] is None
    assert by[1e-6]["val_top1"] < by[1.0]["val_top1"] and out["metrics"]["val_top1"] == by[1.0]["val_top1"]
    json.dumps(out, allow_nan=False)  # recordable: no NaN in the result
    with pytest.raises(FloatingPointError, match="every learning rate"):
        train_linear(x, y, xt, yt, blr=[1e38, 3e38], **kw)


def test_linear_min_steps_lengthens_the_schedule_on_small_data() -> None:
    x, y = clusters(5, 4, 8, 0.5, seed=8)  # 20 samples: 1 step per epoch at the paper's batch
    out = train_linear(x, y, x, y, num_classes=4, blr=1.0, batch_size=16384, epochs=90, warmup_epochs=10,
                       min_steps=300)  # fmt: skip
    assert out["batch_size"] == 20 and out["steps"] == 300 and out["epochs"] == 300
    assert out["warmup_epochs"] == pytest.approx(10 * 300 / 90)  # warmup keeps its share
    big = train_linear(x, y, x, y, num_classes=4, blr=1.0, batch_size=4, epochs=90, min_steps=300)
    assert big["steps"] == 90 * 5  # enough steps already: the epochs as given


def test_holdout_split_is_stratified_and_seeded() -> None:
    labels = torch.tensor([0] * 50 + [1] * 10 + [2] * 2 + [3])
    fit, val = holdout_split(labels, 0.1, seed=1)
    counts = torch.bincount(labels[val], minlength=4).tolist()
    assert counts == [5, 1, 1, 0]  # 10 % per class, at least one, never a whole class (3 has one sample)
    assert sorted(fit.tolist() + val.tolist()) == list(range(len(labels)))
    assert torch.equal(holdout_split(labels, 0.1, seed=1)[1], val)
    assert not torch.equal(holdout_split(labels, 0.1, seed=2)[1], val)
    with pytest.raises(ValueError, match="nothing can be held out"):
        holdout_split(torch.tensor([0, 1, 2]), 0.1)


def test_linear_defaults_cover_the_papers_recipes() -> None:
    """The default grid includes each paper's learning rate; ``linear.blr=X`` is the paper's fixed protocol."""
    _, mae = load_eval_config("linear")
    assert (mae.linear.head, mae.linear.optimizer, mae.linear.batch_size, mae.linear.epochs) == (
        "bn_linear", "lars", 16384, 90)  # fmt: skip
    assert 0.1 in mae.linear.blr_grid and mae.linear.blr is None and 0 < mae.linear.val_fraction < 1
    _, dino = load_eval_config("linear_dino")
    assert (dino.linear.head, dino.linear.optimizer, dino.linear.n_last_blocks) == ("linear", "sgd", 4)
    assert 0.001 in dino.linear.blr_grid
    _, paper = load_eval_config("linear", None, ["linear.blr=0.1"])
    assert paper.linear.blr == 0.1
    with pytest.raises(EvalInputError, match=r"linear\.val_fraction=0\.0 must be in"):
        load_eval_config("linear", None, ["linear.val_fraction=0"])
    with pytest.raises(EvalInputError, match=r"linear\.blr_grid"):
        load_eval_config("linear", None, ["linear.blr_grid=[]"])


# ------------------------------------------------------------------------------------------ subsets
def test_label_subset_is_class_balanced_seeded_and_recorded() -> None:
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200 + [-1] * 10)
    indices = torch.arange(len(labels)) + 1000
    sub = select_subset(labels, indices, 0.01, seed=3)
    assert sub.per_class == {0: 5, 1: 3, 2: 2} and len(sub.indices) == 10
    assert all(1000 <= i < 2000 for i in sub.indices) and sub.indices == sorted(sub.indices)
    assert select_subset(labels, indices, 0.01, seed=3).indices == sub.indices
    assert select_subset(labels, indices, 0.01, seed=4).indices != sub.indices
    rec = sub.describe()
    assert rec["sha256"] == sub.sha256 and rec["indices"] == sub.indices and rec["seed"] == 3
    tiny = select_subset(torch.tensor([0, 0, 1]), torch.arange(3), 0.01)
    assert tiny.per_class == {0: 1, 1: 1}  # at least one per class


# --------------------------------------------------------------------------- retrieval and zero-shot
def test_retrieval_recall_known_answer() -> None:
    images = torch.eye(4)
    captions = torch.eye(4).repeat_interleave(2, dim=0)  # 2 captions per image, exact matches
    owner = torch.arange(4).repeat_interleave(2)
    m = retrieval_recall(images, captions, owner, ks=[1, 2])
    assert m["i2t_r1"] == m["t2i_r1"] == 100.0
    swapped = owner.clone()
    swapped[[0, 1, 2, 3]] = torch.tensor([1, 1, 0, 0])  # image 0's captions describe image 1 and v.v.
    m = retrieval_recall(images, captions, swapped, ks=[1, 2, 3])
    assert m["i2t_r1"] == 50.0 and m["i2t_r3"] == 100.0  # images 0, 1: two wrong captions rank first
    assert m["t2i_r1"] == 50.0 and m["t2i_r2"] == 100.0
    assert m["rsum"] == pytest.approx(sum(v for k, v in m.items() if k != "rsum"))


def test_zeroshot_accuracy_and_templates() -> None:
    weights = torch.eye(3)
    images = torch.tensor([[2.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.1, 0.0, 5.0], [1.0, 0.9, 0.0]])
    m = zeroshot_accuracy(images, weights, torch.tensor([0, 1, 2, 1]))
    assert m["top1"] == 75.0
    templates = load_templates("imagenet_openai")
    assert len(templates) == 80 and len(set(templates)) == 80 and all(t.count("{}") == 1 for t in templates)
    with pytest.raises(EvalInputError, match="built-in sets"):
        load_templates("no_such_set")


# ------------------------------------------------------------------------------ sequential reader
@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    samples = [
        (rng.integers(0, 256, (20, 24), dtype=np.uint8), i % 3, [f"caption {i}", f"second {i}"])
        for i in range(23)
    ]
    return write_shards(tmp_path_factory.mktemp("seq"), samples, shard_size=5, classes=["a", "b", "c"])


def test_sequential_order_ranks_workers_and_transform(small_shards: Path) -> None:
    kw = dict(img_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), batch_size=4)
    one = list(iter_dataset(small_shards, **kw))
    assert torch.cat([b.indices for b in one]).tolist() == list(range(23))
    images = torch.cat([b.images for b in one])
    assert images.shape == (23, 3, 16, 16) and torch.equal(images[:, 0], images[:, 2])  # grey -> 3 channels
    assert torch.cat([b.labels for b in one]).tolist() == [i % 3 for i in range(23)]
    parts = [list(iter_dataset(small_shards, rank=r, world_size=3, num_workers=2, **kw)) for r in range(3)]
    for r, batches in enumerate(parts):
        assert all(i % 3 == r for b in batches for i in b.indices.tolist())
    gathered = torch.cat([b.images for batches in parts for b in batches])
    order = torch.argsort(torch.cat([b.indices for batches in parts for b in batches]))
    assert torch.equal(gathered[order], images)  # the ranks together = one rank, worker count irrelevant
    texts = next(iter(iter_dataset(small_shards, with_text=True, indices=[7, 3], **kw))).texts
    assert texts == [["caption 7", "second 7"], ["caption 3", "second 3"]]
    seq = ShardSequence(small_shards)
    assert seq.labels().tolist() == [i % 3 for i in range(23)] and seq.captions()[5] == [
        "caption 5",
        "second 5",
    ]
    ident = data_identity(seq)
    assert ident["num_samples"] == 23 and len(ident["id"]) == 16 and ident["manifest_sha256"]


def test_eval_transform_modes() -> None:
    image = Image.fromarray(np.arange(40 * 30, dtype=np.uint8).reshape(30, 40))  # 40 wide, 30 high
    crop = EvalTransform(size=16, resize="center_crop", crop_pct=0.875)(image)
    assert crop.shape == (3, 16, 16)
    assert EvalTransform(size=16, resize="resize")(image).shape == (3, 16, 16)
    assert EvalTransform(size=30, resize="center_crop", crop_pct=1.0)(image).shape == (3, 30, 30)
    with pytest.raises(ValueError, match="30x30 is required"):
        EvalTransform(size=30, resize="none")(image)


# ----------------------------------------------------------------------------- configs and exports
def test_config_protocols_and_errors() -> None:
    assert {"knn", "linear", "linear_dino", "finetune", "zeroshot", "retrieval"} <= set(protocol_names())
    name, cfg = load_eval_config("linear_dino", None, ["linear.epochs=3"])
    assert (
        name == "linear_dino"
        and cfg.protocol == "linear"
        and cfg.linear.n_last_blocks == 4
        and cfg.linear.epochs == 3
    )
    with pytest.raises(
        EvalInputError, match=r"unknown protocol 'knnn'; did you mean 'knn'\?.*Valid protocols: .*linear"
    ):
        load_eval_config("knnn")
    with pytest.raises(EvalInputError, match=r"unknown key 'knn.temprature'; did you mean 'knn.temperature'"):
        load_eval_config("knn", None, ["knn.temprature=0.1"])
    with pytest.raises(EvalInputError, match="labels_fraction"):
        load_eval_config("knn", None, ["data.labels_fraction=2"])


def test_export_errors_name_the_problem(tmp_path: Path) -> None:
    export = tiny_export(tmp_path / "run" / "exports" / "step_00000010")
    assert check_export(export) == export.resolve()
    (tmp_path / "run" / "exports" / "latest").symlink_to("step_00000010")
    assert load_export(tmp_path / "run" / "exports" / "latest").step == 10
    with pytest.raises(EvalInputError, match=r"is a run directory.*exports/latest.*step_00000010"):
        check_export(tmp_path / "run")
    (export / "COMPLETE").unlink()
    with pytest.raises(EvalInputError, match=r"not a complete export \(no COMPLETE marker"):
        check_export(export)
    with pytest.raises(EvalInputError, match="does not exist"):
        check_export(tmp_path / "nope")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(b"")
    with pytest.raises(EvalInputError, match="training checkpoint"):
        check_export(ckpt)


def test_export_rewritten_while_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export = tiny_export(tmp_path / "exports" / "step_00000010")
    real_read_bytes = Path.read_bytes

    def read_then_rewrite(self: Path) -> bytes:
        data = real_read_bytes(self)
        if self.name == "backbone.safetensors":  # the trainer re-exports this step meanwhile
            (export / "COMPLETE").write_text('{"step": 10, "time": 2}')
        return data

    monkeypatch.setattr(Path, "read_bytes", read_then_rewrite)
    with pytest.raises(ExportVanishedError, match="rewritten while being read"):
        load_export(export)


def test_export_weights_must_match_json(tmp_path: Path) -> None:
    export = tiny_export(tmp_path / "e")
    meta = json.loads((export / "backbone.json").read_text())
    (export / "backbone.json").write_text(json.dumps({**meta, "depth": 3}))
    with pytest.raises(EvalInputError, match=r"does not match the architecture.*missing keys.*blocks\.2"):
        load_export(export).build_encoder()


def test_random_init_baseline_has_same_architecture(tmp_path: Path) -> None:
    exp = load_export(tiny_export(tmp_path / "e"))
    rnd = random_init_export(exp, seed=1)
    assert rnd.state.keys() == exp.state.keys() and rnd.describe()["encoder"] == "random_init"
    assert not torch.equal(rnd.state["blocks.0.attn.qkv.weight"], exp.state["blocks.0.attn.qkv.weight"])
    assert torch.equal(random_init_export(exp, seed=1).state["cls_token"], rnd.state["cls_token"])
    assert rnd.encoder_id != exp.encoder_id


# --------------------------------------------------------------------------------------- fine-tune
def test_finetune_layer_decay_and_mixing() -> None:
    model = Classifier(create_vit("vit_tiny_patch16", **TINY), num_classes=5)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {g["layer"]: g["lr_scale"] for g in groups}
    assert scale == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}  # embeddings, block 0, block 1, head
    decays = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decays[id(model.head.bias)] == 0.0 and decays[id(model.head.weight)] == 0.05
    assert decays[id(model.encoder.cls_token)] == 0.0
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    for seed in range(6):
        mixed, targets = mix_batch(
            images, labels, 5, mixup=0.8, cutmix=1.0, mix_prob=1.0, switch_prob=0.5, smoothing=0.1,
            rng=np.random.default_rng(seed),
        )  # fmt: skip
        assert mixed.shape == images.shape and torch.allclose(targets.sum(1), torch.ones(6))
        assert float(targets.min()) >= 0.1 / 5 - 1e-6


def test_paper_results_are_keyed_by_protocol() -> None:
    from evals.report import load_paper_results

    papers = load_paper_results()
    assert all(
        p["dataset_spec"]["num_classes"] == 1000 for p in papers
    )  # every key names a described data set
    linear = [
        p
        for p in papers
        if p["method"] == "mae" and p["protocol"] == "linear" and p["key"] == "in1k_linear_top1"
    ]
    assert linear and linear[0]["value"] == 75.8 and linear[0]["dataset"] == "in1k" and linear[0]["source"]
    assert {p["protocol"] for p in papers} == {"knn", "linear", "finetune", "zeroshot"}
    assert all(p["metric"] == "top1" for p in papers)
