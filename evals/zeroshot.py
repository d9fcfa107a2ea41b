"""Zero-shot classification with a CLIP export (Radford et al. 2021, Sec. 3.1.4).

Every class name is inserted into every prompt template (``"a photo of a {}."``; by default the 80
ImageNet templates of the paper, ``evals/templates/imagenet_openai.txt``); the text embeddings of one
class are L2-normalised, averaged and normalised again into the class's zero-shot weight. An image is
assigned to the class whose weight has the largest cosine similarity with its normalised embedding.
Top-1 and top-5 (more than 5 classes) accuracies in percent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from evals.clip import ClipModel, Tokenizer, load_clip
from evals.context import EvalContext, register_protocol
from evals.errors import EvalInputError
from evals.features import encode_dataset
from evals.linear import accuracy

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def load_templates(name_or_path: str) -> list[str]:
    """Templates from ``evals/templates/<name>.txt`` or a file path (one per line, ``#`` comments).

    Raises:
        EvalInputError: missing file, or a template without ``{}``.
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = TEMPLATE_DIR / f"{name_or_path}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt"))
        raise EvalInputError(
            f"zeroshot.templates={name_or_path!r}: no such file; built-in sets: {', '.join(known)}"
        )
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    templates = [ln for ln in lines if ln and not ln.startswith("#")]
    check_templates(templates, str(path))
    return templates


def check_templates(templates: list[str], where: str) -> None:
    """Every template must contain exactly one ``{}``."""
    if not templates:
        raise EvalInputError(f"{where}: no prompt templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise EvalInputError(f"{where}: templates need exactly one '{{}}' for the class name: {bad[:3]}")


@torch.no_grad()
def zeroshot_weights(
    model: ClipModel,
    tokenizer: Tokenizer,
    classnames: list[str],
    templates: list[str],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Class weights ``[C, E]``: per class, the renormalised mean of normalised template embeddings."""
    weights = []
    for name in classnames:
        texts = [t.format(name) for t in templates]
        emb = torch.cat(
            [
                model.encode_text(tokenizer(texts[i : i + batch_size]).to(device))
                for i in range(0, len(texts), batch_size)
            ]
        )  # [T, E], normalised
        weights.append(F.normalize(emb.mean(dim=0), dim=0))
    return torch.stack(weights)  # [C, E]


def zeroshot_accuracy(
    image_embeds: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """Accuracy of assigning each normalised image embedding ``[N, E]`` to its most similar class ``[C, E]``."""
    logits = F.normalize(image_embeds.float(), dim=1) @ F.normalize(weights.float(), dim=1).T  # [N, C]
    return accuracy(logits, labels)


def encode_test_images(ctx: EvalContext, model: ClipModel) -> dict[str, torch.Tensor]:
    """CLIP image embeddings (``embed``) of the test split, split over ranks, gathered in sample order."""
    return encode_dataset(
        lambda images: {"embed": model.encode_image(images)},
        ctx.test_data,
        ctx.transform,
        ctx.env,
        empty={"embed": torch.zeros(0, model.visual_proj.out_features)},
        batch_size=ctx.cfg.data.batch_size,
        num_workers=ctx.cfg.data.num_workers,
        amp=ctx.cfg.features.amp,
        progress=ctx.progress,
        desc="test images",
    )


@register_protocol("zeroshot")
def run(ctx: EvalContext) -> dict[str, Any] | None:
    """Zero-shot accuracy of a CLIP export on the test split (class names from the manifest or config)."""
    cfg = ctx.cfg.zeroshot
    model, tokenizer = load_clip(ctx.export)
    model = model.to(ctx.device)
    classnames = list(cfg.classnames) if cfg.classnames else ctx.test_data.classes
    if not classnames:
        raise EvalInputError(
            "zero-shot needs class names: the test shards' manifest has none; set zeroshot.classnames=[...]"
        )
    if cfg.template_list:
        templates = list(cfg.template_list)
        check_templates(templates, "zeroshot.template_list")
    else:
        templates = load_templates(str(cfg.templates))
    out = encode_test_images(ctx, model)
    if not ctx.env.is_main:
        return None
    labels = out["labels"]
    if labels.numel() and (int(labels.max()) >= len(classnames) or int(labels.min()) < 0):
        raise EvalInputError(
            f"test labels span [{int(labels.min())}, {int(labels.max())}] but there are {len(classnames)} class names"
        )
    weights = zeroshot_weights(model, tokenizer, classnames, templates, ctx.device)
    metrics = zeroshot_accuracy(out["embed"].to(ctx.device), weights, labels.to(ctx.device))
    log.info("zero-shot (%d classes, %d templates): %s", len(classnames), len(templates), metrics)
    ctx.info["num_samples"] = {"test": int(labels.numel())}
    return {"metrics": metrics, "num_classes": len(classnames), "num_templates": len(templates)}
