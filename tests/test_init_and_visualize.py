"""Starting a run from weights (``init.from``) and the method's TensorBoard pictures (``train.visualize_every``)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pretrain.config import load_config
from pretrain.init_weights import InitWeightsError, load_initial_weights
from pretrain.methods import build_method
from pretrain.methods.context import StepContext
from pretrain.randomness import BatchRandom
from tests.components import require_module
from tests.conftest import TINY_MAE, run_cmd, train_cmd

FAST = ["data.backend=synthetic", "train.global_batch_size=8", "train.log_every=2", "train.ckpt_every=100"]
# tiny_fmnist.yaml: 28 px, 4 px patches, 96 wide, 4 blocks, 3 heads
TIMM_TINY = dict(img_size=28, patch_size=4, embed_dim=96, depth=4, num_heads=3)


def _mae(*overrides: str):
    torch.manual_seed(0)
    return build_method(load_config(TINY_MAE, ["run.name=x", *overrides]))


def _random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


def _tb(run_dir: Path, kind: str) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={kind: 0})
    acc.Reload()
    getter = acc.Images if kind == "images" else acc.Scalars
    return {tag: [e.step for e in getter(tag)] for tag in acc.Tags()[kind]}


# ---- init.from -----------------------------------------------------------------------------------
def test_init_from_an_export_then_the_checkpoint_wins_on_resume(tmp_path: Path):
    run_cmd(train_cmd(1, f"run.root={tmp_path}", "run.name=src", "train.steps=2", *FAST))
    export = tmp_path / "src" / "exports" / "latest"
    from safetensors.torch import load_file

    exported = load_file(str(export / "backbone.safetensors"))
    method = _mae()
    report = load_initial_weights(method, export)
    assert report["backbone_tensors"] == len(exported) and report["unused_tensors"] == []
    for k, v in method.encoder.state_dict().items():
        assert torch.equal(v, exported[k]), k

    args = [f"run.root={tmp_path}", "run.name=dst", *FAST, f"init.from={export}"]
    first = run_cmd(train_cmd(1, *args, "train.steps=2"))
    assert f"initialised from {export}/backbone.safetensors: {len(exported)} backbone tensors" in first.stdout
    assert json.loads((tmp_path / "dst" / "init.json").read_text())["backbone_tensors"] == len(exported)
    again = run_cmd(train_cmd(1, *args, "train.steps=4", "resume.allow_config_change=true"))
    assert "not used: the run resumes from its checkpoint" in again.stdout


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_init_from_a_timm_checkpoint_reports_the_head(tmp_path: Path, suffix: str):
    require_module("timm", "pip install -r requirements.txt")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(3)
    ref = TimmViT(**TIMM_TINY, num_classes=10)
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}  # as saved from a DDP model
    path = tmp_path / f"timm{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        save_file(state, str(path))
    method = _mae()
    report = load_initial_weights(method, path)
    for k, v in method.encoder.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    assert report["unused_tensors"] == ["head.bias", "head.weight"]


def test_position_embeddings_of_another_grid_are_resampled(tmp_path: Path):
    require_module("timm", "pip install -r requirements.txt")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    ref = TimmViT(**{**TIMM_TINY, "img_size": 56}, num_classes=0)  # 14 x 14 patches vs our 7 x 7
    torch.save(ref.state_dict(), tmp_path / "big.pth")
    method = _mae()
    report = load_initial_weights(method, tmp_path / "big.pth")
    assert report["resampled"] == ["pos_embed"]
    pos = method.encoder.pos_embed
    assert pos.shape == (1, 50, 96) and torch.equal(pos[:, :1], ref.pos_embed[:, :1])  # class token kept
    grid = ref.pos_embed[:, 1:].reshape(1, 14, 14, 96).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(7, 7), mode="bicubic", antialias=True)
    torch.testing.assert_close(pos[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 49, 96))


def test_init_from_the_mae_authors_format_loads_the_decoder_too(tmp_path: Path):
    donor = _mae()
    enc = _random_state(donor.encoder, 1)
    rest = {k: v for k, v in _random_state(donor, 2).items() if not k.startswith("encoder.")}
    # facebookresearch/mae main_pretrain.py saves model (encoder under timm names, decoder_* beside),
    # optimizer state, the epoch and the argparse Namespace of its arguments.
    torch.save(
        {
            "model": {**enc, **rest},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "epoch": 799,
            "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75, norm_pix_loss=True),
        },
        tmp_path / "checkpoint-799.pth",
    )
    method = _mae()
    report = load_initial_weights(method, tmp_path / "checkpoint-799.pth")
    state = method.state_dict()
    for k, v in enc.items():
        assert torch.equal(state[f"encoder.{k}"], v), k
    for k, v in rest.items():
        assert torch.equal(state[k], v), k
    assert (
        "decoder_pred.weight" in report["other_tensors_loaded"]
        and "mask_token" in report["other_tensors_loaded"]
    )


def test_size_mismatch_and_unsafe_pickles_are_refused(tmp_path: Path):
    require_module("timm", "pip install -r requirements.txt")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.save(TimmViT(**{**TIMM_TINY, "embed_dim": 48}, num_classes=0).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(
        InitWeightsError, match=r"'cls_token' has shape \[1, 1, 48\] in the file but \[1, 1, 96\]"
    ):
        load_initial_weights(_mae(), tmp_path / "narrow.pth")

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {"x": Payload()}}, tmp_path / "evil.pth")
    with pytest.raises(InitWeightsError, match="refused to load: not plain tensors"):
        load_initial_weights(_mae(), tmp_path / "evil.pth")
    assert not marker.exists(), "the pickled payload ran"
    proc = run_cmd(
        train_cmd(1, f"run.root={tmp_path}", "run.name=bad", *FAST, "init.from=/no/such/file.pth"),
        check=False,
    )
    assert proc.returncode == 2 and "init.from=/no/such/file.pth: no such file" in proc.stderr
    assert not (tmp_path / "bad").exists()


# ---- pictures ------------------------------------------------------------------------------------
def test_mae_pictures_show_the_visible_patches_unchanged():
    method = _mae().eval()
    imgs = torch.randn(4, 3, 28, 28)
    out = method.visualize(
        {"images": [imgs]}, StepContext.local(BatchRandom(0, -1, 0, 4, torch.device("cpu")))
    )
    assert sorted(out) == [
        "mae/masked",
        "mae/original",
        "mae/reconstruction",
        "mae/reconstruction_plus_visible",
    ]
    for v in out.values():
        assert v.shape == (4, 3, 28, 28) and v.min() >= 0 and v.max() <= 1
    original, masked, pasted = out["mae/original"], out["mae/masked"], out["mae/reconstruction_plus_visible"]
    visible = (masked == original).all(dim=1)  # [4, 28, 28] pixels whose patch was not masked
    frac_masked = 1 - visible.float().mean().item()
    assert frac_masked == pytest.approx(round(0.75 * 49) / 49, abs=0.02)  # the recipe's mask ratio
    assert torch.equal(pasted.permute(0, 2, 3, 1)[visible], original.permute(0, 2, 3, 1)[visible])


def test_pictures_are_written_off_the_loss_path(tmp_path: Path, fmnist_shards: Path):
    base = [
        f"run.root={tmp_path}",
        *FAST,
        "train.steps=4",
        f"data.shards={fmnist_shards}",
        "data.backend=wds",
    ]
    run_cmd(train_cmd(1, *base, "run.name=plain", "data.num_workers=1"))
    run_cmd(train_cmd(1, *base, "run.name=pics", "data.num_workers=1", "train.visualize_every=2"))
    plain, pics = _tb(tmp_path / "plain", "scalars"), _tb(tmp_path / "pics", "scalars")
    assert plain["train/loss"] == pics["train/loss"] == [2, 4]

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["train/loss"] for x in lines if "train/loss" in x]

    assert losses("plain") == losses("pics")  # bit for bit: the pictures draw no training randomness
    images = _tb(tmp_path / "pics", "images")
    assert images == {t: [2, 4] for t in images} and len(images) == 4
