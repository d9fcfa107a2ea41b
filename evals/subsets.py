"""Fixed, recorded label subsets for few-label evaluation (1 % and 10 % of the labels).

The semi-supervised ImageNet protocol (Chen et al. 2020, SimCLR; used by DINO, Caron et al. 2021,
Table 11 and MSN) trains on 1 % or 10 % of the labelled training images, class-balanced. Here the
subset is a pure function of (training labels in sample order, fraction, seed):

* for every class ``c`` with ``n_c`` samples, keep ``max(1, round(fraction * n_c))`` of them (at most
  ``n_c``), chosen by a seeded permutation of the class's samples (seed derived from ``(seed, c)``
  with the data pipeline's stable blake2b/splitmix64 permutation, so it does not depend on library
  versions);
* the kept sample indices, sorted, are the subset. Its SHA-256 (over the comma-separated indices),
  the seed and the per-class counts go into every result file; the indices themselves too when
  there are at most :data:`MAX_INLINE` of them.

Samples with an unknown label (-1) are never selected.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from data_pipelines.wds import derive_seed, permutation

MAX_INLINE = 20000
_TAG_SUBSET = 7


@dataclass
class LabelSubset:
    """A chosen subset of training samples.

    Attributes:
        fraction: requested fraction of the labels.
        seed: selection seed.
        indices: kept global sample indices, ascending.
        per_class: class index -> number kept.
        num_total: labelled samples the subset was drawn from.
    """

    fraction: float
    seed: int
    indices: list[int]
    per_class: dict[int, int]
    num_total: int

    @property
    def sha256(self) -> str:
        """SHA-256 of the comma-separated sorted indices."""
        return hashlib.sha256(",".join(map(str, self.indices)).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-able record for result files."""
        out: dict[str, Any] = {
            "fraction": self.fraction,
            "seed": self.seed,
            "num_samples": len(self.indices),
            "num_total": self.num_total,
            "per_class": {str(k): v for k, v in sorted(self.per_class.items())},
            "sha256": self.sha256,
            "method": "class-balanced: max(1, round(fraction x n_c)) per class, seeded permutation",
        }
        if len(self.indices) <= MAX_INLINE:
            out["indices"] = self.indices
        return out


def select_subset(labels: torch.Tensor, indices: torch.Tensor, fraction: float, seed: int = 0) -> LabelSubset:
    """Choose a class-balanced subset of the labelled samples.

    Args:
        labels: int64 ``[N]`` labels (``-1``: unlabelled, never chosen).
        indices: int64 ``[N]`` the global sample indices of those labels.
        fraction: fraction of each class to keep, in (0, 1].
        seed: selection seed.

    Returns:
        The subset.

    Raises:
        ValueError: fraction outside (0, 1] or no labelled sample.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"labels fraction must be in (0, 1], got {fraction}")
    by_class: dict[int, list[int]] = {}
    for label, index in zip(labels.tolist(), indices.tolist()):
        if label >= 0:
            by_class.setdefault(int(label), []).append(int(index))
    if not by_class:
        raise ValueError("no labelled sample to choose a subset from")
    chosen: list[int] = []
    per_class: dict[int, int] = {}
    for c, members in sorted(by_class.items()):
        members.sort()
        keep = min(len(members), max(1, round(fraction * len(members))))
        perm = permutation(len(members), derive_seed(_TAG_SUBSET, seed, c))
        picked = [members[p] for p in perm[:keep]]
        chosen += picked
        per_class[c] = keep
    return LabelSubset(
        fraction=fraction,
        seed=seed,
        indices=sorted(chosen),
        per_class=per_class,
        num_total=sum(len(m) for m in by_class.values()),
    )


_TAG_HOLDOUT = 8


def holdout_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split training rows into a fitting part and a class-stratified held-out part (model selection).

    For every class with ``n_c >= 2`` rows, ``min(n_c - 1, max(1, round(fraction * n_c)))`` of them are
    held out, chosen by a seeded permutation (the same stable permutation as :func:`select_subset`,
    seeded from ``(seed, class)``); a class with one row keeps it for fitting, so every class is learned.

    Args:
        labels: int64 ``[N]`` labels of the rows (row order, not sample indices).
        fraction: fraction of each class to hold out, in (0, 1).
        seed: split seed.

    Returns:
        ``(fit_rows, val_rows)``: int64 row positions, each ascending.

    Raises:
        ValueError: fraction outside (0, 1), or no class has two rows (nothing can be held out).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    by_class: dict[int, list[int]] = {}
    for row, label in enumerate(labels.tolist()):
        by_class.setdefault(int(label), []).append(row)
    val: list[int] = []
    for c, rows in sorted(by_class.items()):
        if len(rows) < 2:
            continue
        keep = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        perm = permutation(len(rows), derive_seed(_TAG_HOLDOUT, seed, c))
        val += [rows[p] for p in perm[:keep]]
    if not val:
        raise ValueError(
            "no class has two training samples: nothing can be held out to choose a learning rate"
        )
    held = torch.zeros(len(labels), dtype=torch.bool)
    held[torch.tensor(val, dtype=torch.int64)] = True
    rows = torch.arange(len(labels))
    return rows[~held], rows[held]
