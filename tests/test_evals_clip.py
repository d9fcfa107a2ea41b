"""Zero-shot classification and image-text retrieval on a tiny CLIP-like export with a known answer.

The text tower is built by hand so that its output is known: token embeddings are zero except for
the words used as class names / caption subjects (word ``c`` -> one-hot ``e_c``), attention is uniform
(q = k = 0, v = proj = identity) and the MLP is zero. The end-of-text token then holds the average of
``LayerNorm(e_c)`` over the prompt, and after the final LayerNorm it is ``LayerNorm(e_c)`` whatever the
template: a class-specific vector ``u_c``. ``text_proj`` keeps the first ``E`` channels. The image tower
is a random ViT; ``visual_proj`` is solved (least squares, exact since there are fewer images than
feature channels) so that image ``i`` embeds exactly onto the text embedding of its word. Hence
zero-shot accuracy is 100 % (91.67 % after flipping one label), and retrieval recall@1 is 100 % in both
directions (75 % after swapping the captions of two images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.sequential import EvalTransform
from evals import run as evals_run
from evals.clip import ClipModel, TextSpec, Tokenizer, load_clip, write_clip_export
from evals.export import load_export
from pretrain.models import create_vit
from tests.conftest import skip_or_fail
from tests.test_evals_units import write_shards

WORDS = ["cat", "dog", "car", "tree", "bird", "ship", "horse", "apple"]  # single BPE tokens
VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, pos_embed="sincos")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _only(out_dir: Path, protocol: str) -> dict:
    """The one result of ``protocol`` in ``out_dir`` (``<protocol>-<recipe id>.json``)."""
    (path,) = out_dir.glob(f"{protocol}-*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    try:
        return Tokenizer("openai-bpe", 16)
    except Exception as exc:  # open_clip missing
        skip_or_fail(f"CLIP tokenizer unavailable: {exc}")
        raise


def hand_built_text_tower(model: ClipModel, tokenizer: Tokenizer, words: list[str]) -> None:
    text, width = model.text, model.text.spec.width
    with torch.no_grad():
        for p in text.parameters():
            p.zero_()
        for block in text.blocks:
            block.norm1.weight.fill_(1.0)
            block.norm2.weight.fill_(1.0)
            block.attn.qkv.weight[2 * width :].copy_(torch.eye(width))  # v = x; q = k = 0: uniform attention
            block.attn.proj.weight.copy_(torch.eye(width))
        text.ln_final.weight.fill_(1.0)
        for c, word in enumerate(words):
            (token,) = tokenizer._bpe.encode(word)
            text.token_embedding.weight[token, c] = 1.0
        model.text_proj.weight.zero_()
        model.text_proj.weight[:, : model.text_proj.out_features].copy_(
            torch.eye(model.text_proj.out_features)
        )


def build_export(
    tmp: Path, tokenizer: Tokenizer, images: list[np.ndarray], targets: list[int], words: list[str]
) -> Path:
    """A CLIP export whose image i embeds onto the text embedding of words[targets[i]]."""
    torch.manual_seed(0)
    spec = TextSpec(vocab_size=49408, context_length=16, width=16, depth=1, num_heads=1, mlp_ratio=1.0)
    model = ClipModel(create_vit("vit_tiny_patch16", **VIT), spec, embed_dim=len(words)).eval()
    hand_built_text_tower(model, tokenizer, words)
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"a photo of a {w}." for w in words]))  # [C, E]
        transform = EvalTransform(size=16, resize="none", mean=MEAN, std=STD)
        x = torch.stack([transform(Image.fromarray(im)) for im in images])
        feats = model.visual.forward_features(x)[:, 0]  # [N, D], N < D
        solution = torch.linalg.lstsq(feats.double(), text[targets].double()).solution  # [D, E]
        model.visual_proj.weight.copy_(solution.T.float())
        assert torch.allclose(model.encode_image(x), text[targets], atol=1e-4)
    meta = {
        "arch": "vit_tiny_patch16",
        **VIT,
        "feature": "cls",
        "mean": list(MEAN),
        "std": list(STD),
        "step": 5,
        "run": "clip",
    }
    return write_clip_export(tmp / "run" / "exports" / "step_00000005", model, meta)


def images_for(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(n)]


def test_text_tower_is_template_invariant(tmp_path: Path, tokenizer: Tokenizer) -> None:
    export = build_export(tmp_path, tokenizer, images_for(4, 0), [0, 1, 2, 3], WORDS[:4])
    model, tok = load_clip(load_export(export))
    with torch.no_grad():
        a = model.encode_text(tok(["a photo of a cat.", "art of the cat.", "a cat in a video game."]))
        b = model.encode_text(tok(["a photo of a dog."]))
    assert torch.allclose(a, a[:1].expand_as(a), atol=1e-5)
    assert float(a[0] @ b[0]) < 0.5
    meta = json.loads((export / "backbone.json").read_text())
    assert (
        meta["method"] == "clip"
        and meta["clip"]["text"]["pool"] == "eot"
        and (export / "clip.safetensors").is_file()
    )


def test_zeroshot_known_answer(tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture) -> None:
    labels = [c for c in range(4) for _ in range(3)]
    images = images_for(12, 1)
    export = build_export(tmp_path, tokenizer, images, labels, WORDS[:4])
    test = write_shards(
        tmp_path / "zs", [(im, y, None) for im, y in zip(images, labels)], 5, classes=WORDS[:4]
    )
    argv = [
        "--checkpoint",
        str(export),
        "--protocol",
        "zeroshot",
        "--test-data",
        str(test),
        "--device",
        "cpu",
    ]
    assert evals_run.main(argv) == 0
    result = _only(tmp_path / "run" / "evals" / "step_00000005", "zeroshot")
    assert result["metrics"]["top1"] == 100.0 and result["details"]["num_templates"] == 80
    # One wrong label: 11 of 12 right. A few explicit templates instead of the 80.
    flipped = write_shards(
        tmp_path / "zs2", [(im, (y + 1) % 4 if i == 0 else y, None) for i, (im, y) in enumerate(zip(images, labels))], 5,
        classes=WORDS[:4],
    )  # fmt: skip
    argv = ["--checkpoint", str(export), "--protocol", "zeroshot", "--test-data", str(flipped), "--output",
            str(tmp_path / "out2"), "zeroshot.template_list=['a photo of a {}.','itap of my {}.']"]  # fmt: skip
    assert evals_run.main(argv) == 0
    result = _only(tmp_path / "out2", "zeroshot")
    assert (
        result["metrics"]["top1"] == pytest.approx(100 * 11 / 12) and result["details"]["num_templates"] == 2
    )


def test_retrieval_known_answer(tmp_path: Path, tokenizer: Tokenizer) -> None:
    images = images_for(8, 2)
    export = build_export(tmp_path, tokenizer, images, list(range(8)), WORDS)
    captions = [[f"a photo of a {w}.", f"{w}"] for w in WORDS]
    test = write_shards(tmp_path / "rt", [(im, None, cap) for im, cap in zip(images, captions)], 3)
    base = ["--checkpoint", str(export), "--protocol", "retrieval", "--device", "cpu"]
    assert evals_run.main([*base, "--test-data", str(test), "--output", str(tmp_path / "o1")]) == 0
    metrics = _only(tmp_path / "o1", "retrieval")["metrics"]
    assert all(metrics[f"{d}_r{k}"] == 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    swapped = [captions[1], captions[0], *captions[2:]]
    test2 = write_shards(tmp_path / "rt2", [(im, None, cap) for im, cap in zip(images, swapped)], 3)
    assert evals_run.main([*base, "--test-data", str(test2), "--output", str(tmp_path / "o2")]) == 0
    metrics = _only(tmp_path / "o2", "retrieval")["metrics"]
    assert metrics["i2t_r1"] == 75.0 and metrics["t2i_r1"] == 75.0  # images 0 and 1 (and their captions) miss
    # Beyond rank 1 the wrong words are all equally far (ties up to rounding): only monotonicity is known.
    assert metrics["i2t_r1"] <= metrics["i2t_r5"] <= metrics["i2t_r10"] and metrics["rsum"] < 600.0


def test_zeroshot_needs_a_clip_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.test_evals_units import tiny_export

    export = tiny_export(tmp_path / "exports" / "step_00000010")
    test = write_shards(tmp_path / "d", [(im, 0, None) for im in images_for(2, 3)], 2, classes=["x"])
    code = evals_run.main(["--checkpoint", str(export), "--protocol", "zeroshot", "--test-data", str(test)])
    assert code == 2 and "is not a CLIP export" in capsys.readouterr().err
