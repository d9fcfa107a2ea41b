"""CLIP units: the loss against the paper's pseudo-code, the local-loss decomposition, the tokenizer, the
towers against timm, config validation, weight-decay groups, FLOPs, patch dropout and the export bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pretrain.config import ConfigError, load_config
from pretrain.methods import build_method
from pretrain.methods.clip import CLIP, clip_loss, num_kept_patches
from pretrain.methods.context import StepContext
from pretrain.models.clip import ClipModel, ClipVisionTransformer, create_image_tower
from pretrain.models.text import TextSpec, TextTokenizer
from pretrain.randomness import BatchRandom
from tests.conftest import ROOT, run_cmd, train_cmd

TINY = ROOT / "configs" / "clip" / "tiny_tuxpaint.yaml"
SMALL = [
    "data.backend=synthetic",
    "model.depth=2",
    "method.text_depth=2",
    "data.context_length=16",
    "train.global_batch_size=8",
]


def _cfg(*overrides: str):
    return load_config(TINY, [*SMALL, *overrides])


def _ctx(b: int) -> StepContext:
    return StepContext.local(BatchRandom(0, 0, 0, b, torch.device("cpu")))


def _batch(b: int = 4, t: int = 16, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.zeros(b, t, dtype=torch.int64)
    for i in range(b):
        n = 2 + i % 5
        tokens[i, 0], tokens[i, n + 1] = 49406, 49407
        tokens[i, 1 : n + 1] = torch.randint(256, 49000, (n,), generator=g)
    return {"images": [torch.randn(b, 3, size, size, generator=g)], "text": tokens}


# ---- the loss ----------------------------------------------------------------------------------------
def figure3_loss(image_e: np.ndarray, text_e: np.ndarray, t: float, max_t: float = math.log(100)) -> float:
    """Radford et al. 2021, Figure 3 (numpy pseudo-code), with the §2.5 clamp of the scale at 100.

    I_e, T_e are the (already) L2-normalised embeddings; logits = I_e T_e^T * exp(t);
    loss = (CE(logits, labels, axis=0) + CE(logits, labels, axis=1)) / 2.
    """
    logits = image_e @ text_e.T * np.exp(min(max(t, 0.0), max_t))
    n = logits.shape[0]
    labels = np.arange(n)

    def cross_entropy(x: np.ndarray, axis: int) -> float:
        log_softmax = (
            x
            - np.log(np.exp(x - x.max(axis=axis, keepdims=True)).sum(axis=axis, keepdims=True))
            - x.max(axis=axis, keepdims=True)
        )
        picked = log_softmax[labels, labels]  # the diagonal: pair i's log-probability in either direction
        return float(-picked.mean())

    return (cross_entropy(logits, axis=0) + cross_entropy(logits, axis=1)) / 2


@pytest.mark.parametrize(
    "log_scale", [math.log(1 / 0.07), 1.0, 7.0, -1.0]
)  # init, below, above the clamp, < 0
def test_loss_equals_figure3_pseudocode(log_scale: float):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(12, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(12, 8, generator=g, dtype=torch.float64), dim=-1)
    loss, metrics = clip_loss(img.float(), txt.float(), torch.tensor([log_scale]))
    ref = figure3_loss(img.float().double().numpy(), txt.float().double().numpy(), log_scale)
    assert loss.item() == pytest.approx(ref, abs=1e-6)
    want_scale = math.exp(min(max(log_scale, 0.0), math.log(100)))
    assert metrics["logit_scale"].item() == pytest.approx(want_scale, rel=1e-6)


def test_local_loss_over_ranks_equals_global_loss_and_gradients():
    # Each "rank" computes its rows against all gathered columns; the mean over ranks must equal the
    # one-process loss on the whole batch, and so must the gradients (the gather sums row gradients).
    g = torch.Generator().manual_seed(3)
    world, b = 3, 4
    img = torch.randn(world * b, 16, generator=g, requires_grad=True)
    txt = torch.randn(world * b, 16, generator=g, requires_grad=True)
    scale = torch.tensor([2.0], requires_grad=True)
    full, _ = clip_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale)
    full_grads = torch.autograd.grad(full, [img, txt, scale])
    parts = []
    for r in range(world):
        i_all, t_all = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        rows = slice(r * b, (r + 1) * b)
        loss, _ = clip_loss(i_all[rows], t_all[rows], scale, i_all, t_all, rank=r)
        parts.append(loss)
    local = torch.stack(parts).mean()
    local_grads = torch.autograd.grad(local, [img, txt, scale])
    assert local.item() == pytest.approx(full.item(), abs=1e-6)
    for a, c in zip(full_grads, local_grads):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


def test_logit_scale_init_shape_clamp_and_no_weight_decay():
    method = build_method(_cfg())
    ls = method.clip.logit_scale
    assert ls.shape == (1,) and ls.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        ls.fill_(9.0)
    method.after_optimizer_step(_ctx(8))
    assert ls.item() == pytest.approx(math.log(100))
    names = {id(p): n for n, p in method.named_parameters()}
    decay, no_decay = method.param_groups(0.2)
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {
        "clip.logit_scale",
        "clip.text.token_embedding.weight",
        "clip.text.positional_embedding",
        "clip.visual.pos_embed",
        "clip.visual.cls_token",
        "clip.visual.norm_pre.weight",
        "clip.text.blocks.0.attn.qkv.bias",
    } <= no_decay_names
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {
        "clip.visual_proj.weight",
        "clip.text_proj.weight",
        "clip.text.blocks.0.mlp.fc1.weight",
    } <= decay_names
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.2


def test_forward_backward_and_metrics():
    method = build_method(_cfg())
    out = method(_batch(8), _ctx(8))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    out["loss"].backward()
    assert (
        method.clip.logit_scale.grad is not None and method.clip.text.token_embedding.weight.grad is not None
    )


# ---- tokenizer ---------------------------------------------------------------------------------------
def test_tokenizer_known_ids_and_truncation_keeps_end_token():
    tok = TextTokenizer("openai-bpe", 8)
    ids = tok(["a photo of a cat.", "Hello World!"])
    # OpenAI's BPE (CLIP's vocabulary): "a"=320, "photo"=1125, "of"=539, "cat"=2368, "."=269; "hello"=3306,
    # "world"=1002, "!"=256; <start_of_text>=49406, <end_of_text>=49407, padding 0.
    assert ids.tolist() == [
        [49406, 320, 1125, 539, 320, 2368, 269, 49407],
        [49406, 3306, 1002, 256, 49407, 0, 0, 0],
    ]
    long = tok(["one two three four five six seven eight nine ten"])[0].tolist()
    assert len(long) == 8 and long[0] == 49406 and long[-1] == 49407 and 0 not in long
    assert long[1:7] == tok.encode("one two three four five six")


# ---- towers ------------------------------------------------------------------------------------------
def test_image_tower_loads_strict_into_timm_clip_vit_with_equal_features():
    import timm

    torch.manual_seed(0)
    ours = create_image_tower("vit_base_patch16", pre_norm=True, norm_eps=1e-5, img_size=32, patch_size=16,
                              embed_dim=64, depth=2, num_heads=4).eval()  # fmt: skip
    assert isinstance(ours, ClipVisionTransformer) and ours.patch_embed.proj.bias is None
    ref = timm.create_model("vit_base_patch32_clip_224", pretrained=False, num_classes=0, img_size=32,
                            patch_size=16, embed_dim=64, depth=2, num_heads=4).eval()  # fmt: skip
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    # with the projection as timm's head (bias 0): the CLIP image embedding
    proj = torch.randn(16, 64)
    head = timm.create_model("vit_base_patch32_clip_224", pretrained=False, num_classes=16, img_size=32,
                             patch_size=16, embed_dim=64, depth=2, num_heads=4).eval()  # fmt: skip
    head.load_state_dict(
        {**ours.state_dict(), "head.weight": proj, "head.bias": torch.zeros(16)}, strict=True
    )
    with torch.no_grad():
        torch.testing.assert_close(head(x), ours(x) @ proj.T, atol=1e-5, rtol=1e-5)
    # MAE/DINO's layout is unchanged: no norm_pre, a biased patch embedding
    plain = create_image_tower("vit_tiny_patch16", img_size=32)
    assert "norm_pre.weight" not in plain.state_dict() and plain.patch_embed.proj.bias is not None


def test_text_tower_is_causal_and_pools_the_end_token():
    spec = TextSpec(context_length=12, width=32, depth=2, num_heads=4)
    model = ClipModel(create_image_tower("vit_tiny_patch16", pre_norm=True, img_size=16, embed_dim=32, depth=1,
                                         num_heads=4), spec, 8).eval()  # fmt: skip
    a = torch.tensor([[49406, 320, 2368, 49407, 0, 0, 0, 0, 0, 0, 0, 0]])
    b = a.clone()
    b[0, 5] = 1125  # after the end token: cannot change the pooled feature (causal mask)
    c = a.clone()
    c[0, 2] = 1929  # before it: changes it
    with torch.no_grad():
        ea, eb, ec = model.encode_text(a), model.encode_text(b), model.encode_text(c)
    torch.testing.assert_close(ea, eb)
    assert not torch.allclose(ea, ec)
    assert model.text.pool_positions(a).item() == 3


# ---- config ------------------------------------------------------------------------------------------
def test_config_without_text_key_is_refused_before_anything_is_written(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"data\.text_key"):
        load_config(TINY, [*SMALL, "data.text_key="])
    proc = run_cmd(
        train_cmd(1, f"run.root={tmp_path}", *SMALL, "data.text_key=", config=TINY), check=False, timeout=120
    )
    assert proc.returncode == 2 and "data.text_key" in proc.stderr
    assert not any(tmp_path.iterdir())  # no run directory, no lock, nothing


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.patch_dropout=1.0", "method.patch_dropout"),
        ("method.text_heads=5", "method.text_heads"),
        ("train.accum_steps=2", "train.accum_steps"),
        ("method.init_logit_scale=5.0", "method.init_logit_scale"),
        ("data.context_length=1", "data.context_length"),
    ],
)
def test_bad_values_are_named(override: str, message: str):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(TINY, [*SMALL, override])


# ---- FLOPs and patch dropout ----------------------------------------------------------------------
@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_flops_per_sample_matches_flop_counter(patch_dropout: float):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _cfg(f"method.patch_dropout={patch_dropout}", "model.patch_size=4")  # 64 patches
    method: CLIP = build_method(cfg)  # type: ignore[assignment]
    from pretrain.methods.context import RunInfo

    method.configure(RunInfo(10, None, 8, 1, 1, 0, 0))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # FlopCounterMode has no formula for the CPU flash kernel
        out = method(_batch(8), _ctx(8))
        out["loss"].backward()
    measured = counter.get_total_flops() / 8
    assert method.flops_per_sample() == pytest.approx(measured, rel=0.02)


def test_patch_dropout_keeps_a_fixed_count_drawn_per_sample_and_only_in_training():
    assert (
        num_kept_patches(196, 0.5) == 98 and num_kept_patches(4, 0.9) == 1 and num_kept_patches(49, 0.0) == 49
    )
    method = build_method(_cfg("method.patch_dropout=0.5", "model.patch_size=4"))
    keep = method._kept_patches(8, _ctx(8))
    assert keep.shape == (8, 32) and len({tuple(sorted(k.tolist())) for k in keep}) == 8
    # the same draw for sample 5 whether it is rank 0's or rank 1's (world-size invariant)
    other = StepContext.local(BatchRandom(0, 0, 4, 8, torch.device("cpu")))
    torch.testing.assert_close(method._kept_patches(4, other), keep[4:])
    method.eval()
    batch = _batch(8)
    with torch.no_grad():  # eval: every patch, so the embedding is the exported model's
        a = method(batch, _ctx(8))["loss"]
        b = method(batch, StepContext.local(BatchRandom(9, 3, 0, 8, torch.device("cpu"))))["loss"]
    assert a.item() == b.item()


# ---- the export bundle -------------------------------------------------------------------------------
def _old_writer(out: Path, backbone: dict, meta: dict) -> None:
    """The export writer before the bundle (pretrain/checkpoint.py at 6a8581f), for the on-disk format."""
    from pretrain.fileio import atomic_write_text

    out.mkdir(parents=True)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in backbone.items()}
    save_file(tensors, str(out / "backbone.safetensors"), metadata={"format": "pt"})
    atomic_write_text(out / "backbone.json", json.dumps(meta, indent=2))


def test_mae_export_is_byte_for_byte_the_old_format(tmp_path: Path):
    from pretrain.export import as_bundle, publish_export

    mae_cfg = load_config(ROOT / "configs" / "mae" / "tiny_fmnist.yaml", ["data.backend=synthetic"])
    mae = build_method(mae_cfg)
    tensors, meta = mae.export_backbone(mae.state_dict())
    meta = {**meta, "run": "x", "step": 7, "format": "safetensors", "tensors": len(tensors)}
    _old_writer(tmp_path / "old", tensors, meta)
    new = publish_export(tmp_path / "exports", 7, as_bundle((tensors, meta)))
    assert sorted(p.name for p in new.iterdir()) == ["COMPLETE", "backbone.json", "backbone.safetensors"]
    for name in ("backbone.safetensors", "backbone.json"):
        assert (new / name).read_bytes() == (tmp_path / "old" / name).read_bytes(), name
    marker = json.loads((new / "COMPLETE").read_text())
    assert marker["step"] == 7 and set(marker["files"]) == {"backbone.safetensors", "backbone.json"}
    assert (tmp_path / "exports" / "latest").resolve() == new


def test_clip_export_bundle_is_read_by_evals_and_checked_against_the_marker(tmp_path: Path):
    from evals.clip import load_clip
    from evals.errors import EvalInputError
    from evals.export import load_export
    from pretrain.export import as_bundle, publish_export

    method = build_method(_cfg())
    files, meta = method.export_backbone(method.state_dict())
    assert set(files) == {"backbone", "clip"} and "norm_pre.weight" in files["backbone"]
    assert files["clip"]["logit_scale"].shape == (1,)
    out = publish_export(tmp_path / "exports", 3, as_bundle((files, {**meta, "step": 3})))
    assert sorted(json.loads((out / "COMPLETE").read_text())["files"]) == [
        "backbone.json",
        "backbone.safetensors",
        "clip.safetensors",
    ]
    model, _ = load_clip(load_export(out))  # strict, both files
    batch = _batch(4)
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(batch["images"][0]), method.clip.encode_image(batch["images"][0])
        )
        torch.testing.assert_close(model.encode_text(batch["text"]), method.clip.encode_text(batch["text"]))
    # a file changed after COMPLETE was written is refused, naming it
    heads = load_file(str(out / "clip.safetensors"))
    heads["logit_scale"] = heads["logit_scale"] + 1
    save_file(heads, str(out / "clip.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EvalInputError, match=r"clip\.safetensors"):
        load_export(out)


def test_interrupted_export_write_leaves_no_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import pretrain.export as export

    method = build_method(_cfg())
    bundle = export.as_bundle(method.export_backbone(method.state_dict()))
    calls = {"n": 0}
    real = export.save_file

    def failing(*args, **kwargs):  # the second file's write fails (disk full, kill)
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "save_file", failing)
    with pytest.raises(OSError):
        export.publish_export(tmp_path / "exports", 5, bundle)
    assert list((tmp_path / "exports").iterdir()) == []  # no step dir, no temporary left, no latest


def test_one_process_gradients_are_the_full_loss_gradients():
    # The gathered features carry gradients (in one process the gather is the identity): the method's
    # gradients are those of the Figure 3 loss on the batch, both directions included.
    method = build_method(_cfg())
    batch = _batch(8)
    method(batch, _ctx(8))["loss"].backward()
    got = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad()
    img = F.normalize(method.clip.image_features(batch["images"][0]).float(), dim=-1)
    txt = F.normalize(method.clip.text_features(batch["text"]).float(), dim=-1)
    clip_loss(img, txt, method.clip.logit_scale)[0].backward()
    for n, p in method.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-7, rtol=1e-5, msg=n)
