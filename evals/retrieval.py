"""Image-text retrieval recall@K with a CLIP export, both directions.

The protocol of Radford et al. 2021 (CLIP, Table 13) on the Karpathy & Fei-Fei 2015 splits of COCO
and Flickr30k: every test image and every caption (one or more per image: the ``.txt`` member of a
sample, one caption per line) is embedded and L2-normalised. Image -> text: an image counts as
retrieved at K when any of its captions is among the K captions most similar to it. Text -> image:
a caption counts when its image is among the K most similar images. Ranks count the candidates with
a strictly larger similarity (ties resolved in favour of the correct item). Recalls in percent;
``rsum`` is their sum over both directions and all K.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from evals.clip import load_clip
from evals.context import EvalContext, register_protocol
from evals.errors import EvalInputError
from evals.zeroshot import encode_test_images

log = logging.getLogger(__name__)


@torch.no_grad()
def retrieval_recall(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K in both directions.

    Args:
        image_embeds: ``[N, E]``.
        text_embeds: ``[M, E]``.
        text_to_image: int64 ``[M]``: the image (row of ``image_embeds``) of each caption.
        ks: the K values.

    Returns:
        ``{"i2t_r<K>", "t2i_r<K>", "rsum"}`` in percent.
    """
    images = F.normalize(image_embeds.float(), dim=1)
    texts = F.normalize(text_embeds.float(), dim=1)
    sims = images @ texts.T  # [N, M]
    n, m = sims.shape
    owner = F.one_hot(text_to_image, n).T.bool()  # [N, M]: caption j belongs to image i
    if not bool(owner.any(dim=1).all()):
        raise ValueError("every image needs at least one caption")
    best_true = sims.masked_fill(~owner, float("-inf")).max(dim=1).values  # [N]
    i2t_rank = (sims > best_true[:, None]).sum(dim=1)  # [N] captions ranked above the best true one
    true_sim = sims[text_to_image, torch.arange(m)]  # [M]
    t2i_rank = (sims > true_sim[None, :]).sum(dim=0)  # [M] images ranked above the true one
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_rank < k).float().mean())
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).float().mean())
    out["rsum"] = sum(out.values())
    return out


@register_protocol("retrieval")
def run(ctx: EvalContext) -> dict[str, Any] | None:
    """Recall@K of a CLIP export on the test split's images and captions."""
    model, tokenizer = load_clip(ctx.export)
    model = model.to(ctx.device)
    out = encode_test_images(ctx, model)
    if not ctx.env.is_main:
        return None
    captions_by_index = ctx.test_data.captions()
    texts, owners = [], []
    for row, index in enumerate(out["indices"].tolist()):
        for caption in captions_by_index[index]:
            texts.append(caption)
            owners.append(row)
    missing = len(out["indices"]) - len(set(owners))
    if not texts or missing:
        raise EvalInputError(
            f"retrieval needs a caption (.txt member, one caption per line) for every test image; "
            f"{missing} of {len(out['indices'])} images have none"
        )
    with torch.no_grad():
        text_embeds = torch.cat(
            [
                model.encode_text(tokenizer(texts[i : i + 256]).to(ctx.device))
                for i in range(0, len(texts), 256)
            ]
        )
    metrics = retrieval_recall(
        out["embed"].to(ctx.device),
        text_embeds,
        torch.tensor(owners, device=ctx.device),
        list(ctx.cfg.retrieval.ks),
    )
    log.info("retrieval (%d images, %d captions): %s", len(out["indices"]), len(texts), metrics)
    ctx.info["num_samples"] = {"test_images": len(out["indices"]), "test_captions": len(texts)}
    return {"metrics": metrics}
