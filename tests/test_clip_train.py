"""CLIP end to end, as real processes: 2 ranks (torchrun, gloo, FSDP2) give the 1-process loss and
gradients on the same global batch; kill -9 and resume continue bit for bit (logit scale included); a
tiny CLIP trained on the real Tux Paint captions retrieves and zero-shot classifies held-out stamps
better than chance, evaluated by the eval jobs on its export.

Run as a script (``torchrun ... tests/test_clip_train.py OUT``) this file is the gradient worker.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "clip" / "tiny_tuxpaint.yaml"
WORKER_BATCH = 8


def _worker(out: str) -> None:
    """One micro-batch of the tiny CLIP (patch dropout on) on a fixed global batch; rank 0 saves the
    loss averaged over ranks and every parameter's full gradient."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    from pretrain.config import load_config
    from pretrain.distributed import all_reduce_mean, init_distributed
    from pretrain.engines import build_engine
    from pretrain.methods import build_method
    from pretrain.methods.context import Collectives, StepContext
    from pretrain.randomness import BatchRandom
    from pretrain.train import make_run_info
    from tests.test_clip import SMALL, _batch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = [*SMALL, "run.name=grad", "method.patch_dropout=0.5", "model.patch_size=4"]
    overrides.append("engine.name=fsdp2" if world > 1 else "engine.name=single")
    cfg = load_config(TINY, overrides, world_size=world)
    env = init_distributed(cfg.engine.timeout_s, require_group=world > 1)
    torch.manual_seed(0)
    method = build_method(cfg)
    run = make_run_info(cfg, env)
    method.configure(run)
    engine = build_engine(cfg, env)
    engine.setup(method)
    batch = _batch(WORKER_BATCH)
    b = WORKER_BATCH // world
    rows = slice(env.rank * b, (env.rank + 1) * b)
    local = {"images": [batch["images"][0][rows]], "text": batch["text"][rows]}
    rng = BatchRandom(0, 0, env.rank * b, WORKER_BATCH, env.device)
    ctx = StepContext(0, 0, 1, rng, run, Collectives(world), engine)
    with engine.autocast():
        result = engine.model(local, ctx)
    engine.backward(result["loss"])
    (loss,) = all_reduce_mean([result["loss"].detach()], env)
    grads = {}
    for name, p in engine.model.named_parameters():
        g = p.grad
        if isinstance(g, DTensor):
            g = g.full_tensor()
        if g is not None:
            grads[name] = g.detach().clone()
    if env.rank == 0:
        save_file({**grads, "__loss__": loss.reshape(1)}, out)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1])
    sys.exit(0)

from safetensors.torch import load_file  # noqa: E402

from tests.conftest import _free_port, python_env, run_cmd, train_cmd  # noqa: E402
from tests.test_train_distributed import common, kill9_after_save, losses  # noqa: E402

pytestmark = pytest.mark.multiproc


def test_two_ranks_gathered_loss_and_gradients_equal_one_process(tmp_path: Path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    run_cmd([sys.executable, __file__, str(one)], timeout=300)
    run_cmd(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(_free_port()), __file__, str(two)],
        timeout=300,
    )  # fmt: skip
    a, b = load_file(str(one)), load_file(str(two))
    assert a["__loss__"].item() == pytest.approx(b["__loss__"].item(), abs=1e-6)
    assert a.keys() == b.keys() and "clip.logit_scale" in a and "clip.text.token_embedding.weight" in a
    for name in a:  # float32 rounding of different summation orders: relative to each tensor's scale
        err = (b[name] - a[name]).abs().max().item()
        assert err <= 1e-5 * a[name].abs().max().item() + 1e-12, (name, err)


def _clip_files(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    out = run_dir / "exports" / f"step_{step:08d}"
    return load_file(str(out / "backbone.safetensors")) | {
        f"clip.{k}": v for k, v in load_file(str(out / "clip.safetensors")).items()
    }


def test_kill9_and_resume_is_bitwise_identical(tmp_path: Path, tux_shards: Path):
    args = [
        f"data.shards={tux_shards / 'train'}",
        "train.steps=16",
        "train.global_batch_size=16",
        "train.ckpt_every=5",
        "run.deterministic=true",
        "data.num_workers=1",
        "model.depth=2",
        "method.text_depth=2",
        "method.patch_dropout=0.5",
        "optim.warmup_steps=2",
        "optim.lr=0.01",  # the logit scale moves visibly in 16 steps
    ]
    run_cmd(train_cmd(2, *common(tmp_path, "straight", *args), config=TINY), timeout=600)
    cmd = train_cmd(2, *common(tmp_path, "killed", *args), config=TINY)
    kill9_after_save(cmd, tmp_path / "killed", tmp_path / "killed.log", reach=11, save=10)
    run_cmd(cmd, timeout=600)
    ref, got = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(ref) == sorted(got) == list(range(1, 17))
    assert all(ref[s] == got[s] for s in ref), {s: (ref[s], got[s]) for s in ref if ref[s] != got[s]}
    wa, wb = _clip_files(tmp_path / "straight", 16), _clip_files(tmp_path / "killed", 16)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    scale = wa["clip.logit_scale"].item()
    assert abs(scale - 2.6592600) > 1e-3, "the logit scale did not train: its resume would not be tested"


def _metrics(out_dir: Path, protocol: str) -> dict[str, float]:
    (path,) = out_dir.glob(f"{protocol}-*.json")
    return json.loads(path.read_text())["metrics"]


def _evaluate(export: Path, test: Path, out: Path) -> tuple[dict[str, float], dict[str, float]]:
    """The eval jobs, unchanged, on an export: retrieval and zero-shot on the held-out shards."""
    base = [sys.executable, "-m", "evals.run", "--checkpoint", str(export), "--test-data", str(test)]
    base += ["--device", "cpu", "--resize", "resize"]
    run_cmd([*base, "--protocol", "retrieval", "--output", str(out / "rt")], timeout=300, env=python_env())
    run_cmd([*base, "--protocol", "zeroshot", "--output", str(out / "zs")], timeout=300, env=python_env())
    return _metrics(out / "rt", "retrieval"), _metrics(out / "zs", "zeroshot")


@pytest.mark.timeout(1200)  # ~2 minutes on 2 idle cores; CPU shared with other jobs can take much longer
def test_tiny_clip_on_tuxpaint_beats_chance_on_held_out_pairs(tmp_path: Path, tux_shards: Path):
    data = f"data.shards={tux_shards / 'train'}"
    run_cmd(train_cmd(1, *common(tmp_path, "tiny", data, "train.steps=200", "train.log_every=50"), config=TINY),
            timeout=900)  # fmt: skip
    # the random-initialised pair of towers: one step at learning rate 0 exports the initial weights
    run_cmd(train_cmd(1, *common(tmp_path, "init", data, "train.steps=1", "optim.lr=0.0", "optim.warmup_steps=0"),
                      config=TINY), timeout=300)  # fmt: skip
    test = tux_shards / "test"
    manifest = json.loads((test / "manifest.json").read_text())
    num_test, num_classes = manifest["num_samples"], len(manifest["classes"])
    rt, zs = _evaluate(tmp_path / "tiny" / "exports" / "latest", test, tmp_path / "tiny_eval")
    rt0, zs0 = _evaluate(tmp_path / "init" / "exports" / "latest", test, tmp_path / "init_eval")
    for direction in ("i2t", "t2i"):  # a random ranking of the held-out pairs finds k of N at rank <= k
        for k, factor in ((1, 2.0), (5, 2.5), (10, 2.0)):
            chance = 100 * k / num_test
            assert rt[f"{direction}_r{k}"] >= factor * chance, (direction, k, rt, chance)
            assert rt[f"{direction}_r{k}"] > rt0[f"{direction}_r{k}"], (direction, k, rt, rt0)
    # zero-shot into the 16 stamp categories: above a uniform guess and the random-initialised towers
    assert zs["top1"] >= 100 / num_classes + 3 and zs["top1"] >= zs0["top1"] + 5, (zs, zs0, num_classes)


# The emoji come from npm (emoji-datasource-google 16.0.0), which `make test` unpacks into this folder
# (Makefile target emoji-package); tests never download. $EMOJI_DATASOURCE points elsewhere.
EMOJI_PACKAGE = Path(os.environ.get("EMOJI_DATASOURCE", ROOT / "data" / "npm" / "emoji-datasource-google"))


@pytest.mark.timeout(1200)
def test_tiny_clip_zero_shot_classifies_held_out_emoji(tmp_path: Path):
    from data_pipelines.image_text import build_image_text, emoji_package_dir
    from data_pipelines.sources import SourceError

    try:
        emoji_package_dir(EMOJI_PACKAGE)
    except SourceError as exc:
        from tests.conftest import skip_or_fail

        skip_or_fail(f"emoji data missing ({exc}); `make emoji-package` unpacks it there")
    build_image_text("emoji", tmp_path / "emoji", EMOJI_PACKAGE, progress=False)
    data = f"data.shards={tmp_path / 'emoji' / 'train'}"
    run_cmd(train_cmd(1, *common(tmp_path, "tiny", data, "train.steps=300", "train.log_every=50"), config=TINY),
            timeout=1100)  # fmt: skip
    run_cmd(train_cmd(1, *common(tmp_path, "init", data, "train.steps=1", "optim.lr=0.0", "optim.warmup_steps=0"),
                      config=TINY), timeout=300)  # fmt: skip
    test = tmp_path / "emoji" / "test"
    manifest = json.loads((test / "manifest.json").read_text())
    rt, zs = _evaluate(tmp_path / "tiny" / "exports" / "latest", test, tmp_path / "tiny_eval")
    rt0, zs0 = _evaluate(tmp_path / "init" / "exports" / "latest", test, tmp_path / "init_eval")
    # 10 Unicode categories; the largest (people and body) holds about a fifth of the emoji
    chance = 100 / len(manifest["classes"])
    assert zs["top1"] >= 2 * chance and zs["top1"] >= zs0["top1"] + 10, (zs, zs0, chance)
    for direction in ("i2t", "t2i"):
        assert rt[f"{direction}_r5"] >= 4 * 500 / manifest["num_samples"], (rt, rt0)
