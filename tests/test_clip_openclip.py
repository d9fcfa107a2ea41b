"""OpenCLIP interop: an export converted by ``python -m evals.export_openclip`` loads strict into
``open_clip`` (offline, ``pretrained=None``) and gives the same image and text embeddings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from evals.export import load_export
from evals.export_openclip import OPENCLIP_CONFIG, OPENCLIP_WEIGHTS
from pretrain.config import load_config
from pretrain.export import as_bundle, publish_export
from pretrain.methods import build_method
from tests.conftest import ROOT, run_cmd
from tests.test_clip import SMALL, TINY, _batch


@pytest.fixture
def open_clip():
    try:
        import open_clip
    except ImportError as exc:
        from tests.conftest import skip_or_fail

        skip_or_fail(f"open_clip_torch is not installed: {exc}")
    return open_clip


def _export(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = load_config(
        TINY, [*SMALL, "model.patch_size=8", "data.context_length=77", "method.patch_dropout=0.5"]
    )
    method = build_method(cfg)
    with torch.no_grad():  # move every tensor off its init value (biases and gains start at 0 / 1)
        for p in method.parameters():
            p.add_(0.02 * torch.randn_like(p))
    files, meta = method.export_backbone(method.state_dict())
    return publish_export(tmp_path / "run" / "exports", 4, as_bundle((files, {**meta, "step": 4})))


def test_openclip_strict_load_and_equal_embeddings(tmp_path: Path, open_clip):
    export = _export(tmp_path)
    out = tmp_path / "oc"
    proc = run_cmd([sys.executable, "-m", "evals.export_openclip", str(export), str(out)], timeout=300)
    assert "local-dir:" in proc.stdout
    config = json.loads((out / OPENCLIP_CONFIG).read_text())
    from safetensors.torch import load_file

    state = load_file(str(out / OPENCLIP_WEIGHTS))
    # the model OpenCLIP builds from the config, randomly initialised (nothing downloaded), then strict
    model = open_clip.create_model("ViT-B-32", pretrained=None, **_as_kwargs(config["model_cfg"]))
    assert type(model).__name__ == "CLIP"
    model.load_state_dict(state, strict=True)
    model.eval()
    # and OpenCLIP's own loader of the directory (strict as well)
    loaded = open_clip.create_model(f"local-dir:{out}").eval()

    from evals.clip import load_clip

    ours, tokenizer = load_clip(load_export(export))
    images = _batch(3, size=32)["images"][0]
    texts = ["a photo of a cat.", "the letter m (symbols)", "a big red truck"]
    tokens = tokenizer(texts)
    assert torch.equal(tokens, open_clip.get_tokenizer("ViT-B-32")(texts))  # the same BPE and layout
    with torch.no_grad():
        want_i, want_t = ours.encode_image(images), ours.encode_text(tokens)
        for m in (model, loaded):
            got_i = m.encode_image(images, normalize=True)
            got_t = m.encode_text(tokens, normalize=True)
            torch.testing.assert_close(got_i, want_i, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=1e-5)
        assert m.logit_scale.exp().item() == pytest.approx(ours.scale().item(), rel=1e-6)


def _as_kwargs(model_cfg: dict) -> dict:
    """create_model keyword arguments that replace the named config's towers with the exported ones."""
    return {
        "embed_dim": model_cfg["embed_dim"],
        "vision_cfg": model_cfg["vision_cfg"],
        "text_cfg": model_cfg["text_cfg"],
    }


def test_non_clip_export_is_refused(tmp_path: Path):
    mae = build_method(load_config(ROOT / "configs" / "mae" / "tiny_fmnist.yaml", ["data.backend=synthetic"]))
    tensors, meta = mae.export_backbone(mae.state_dict())
    export = publish_export(tmp_path / "exports", 1, as_bundle((tensors, {**meta, "step": 1})))
    proc = run_cmd(
        [sys.executable, "-m", "evals.export_openclip", str(export), str(tmp_path / "oc")],
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2 and "not a CLIP export" in proc.stderr
