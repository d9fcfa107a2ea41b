"""Per-step schedules (pure functions of the step, so nothing needs checkpointing)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then half-cosine to ``final``.

    The per-iteration form of the MAE/DINO recipes (Goyal et al., 2017 warmup; Loshchilov & Hutter,
    2017 cosine): the value at ``step`` is used for the update that follows it.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (DINO's weight decay, momentum)."""
    progress = min(max(step, 0) / max(total_steps, 1), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
