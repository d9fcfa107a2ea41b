"""Weighted k-nearest-neighbour classification of frozen features.

Protocol of Caron et al. 2021 (DINO, "Emerging Properties in Self-Supervised Vision Transformers",
eval_knn.py), after Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination"): features are L2-normalised, the similarity is the cosine ``s = <f_test, f_train>``,
the ``k`` most similar training samples vote for their class with weight ``exp(s / T)`` (``T = 0.07``),
and the class with the largest summed weight is the prediction. Reported for ``k`` in
{10, 20, 100, 200} (capped at the number of training samples); top-5 when there are more than 5 classes.
Accuracies are percentages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from evals.context import EvalContext, register_protocol, subset_rows

log = logging.getLogger(__name__)


@torch.no_grad()
def knn_votes(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """Summed vote weights per class for each test sample (the classifier's scores).

    Args:
        train_feats: ``[N, D]`` (normalised here).
        train_labels: int64 ``[N]``.
        test_feats: ``[M, D]`` (normalised here).
        k: neighbours (``<= N``).
        temperature: ``T`` of the weights ``exp(s / T)``.
        num_classes: ``C``.

    Returns:
        float ``[M, C]``.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    sims = test @ train.T  # [M, N] cosine similarities
    top_sims, top_idx = sims.topk(k, dim=1)  # [M, k]
    weights = (top_sims / temperature).exp()  # [M, k]
    votes = torch.zeros(test.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return votes.scatter_add_(1, train_labels[top_idx], weights)  # [M, C]


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Accuracy of the weighted k-NN classifier for several ``k`` in one similarity pass.

    Args:
        train_feats: ``[N, D]``.
        train_labels: int64 ``[N]``.
        test_feats: ``[M, D]``.
        test_labels: int64 ``[M]``.
        ks: neighbour counts; values above ``N`` are capped at ``N`` (duplicates dropped).
        temperature: vote temperature ``T``.
        num_classes: ``C`` (default ``max(label) + 1``).
        chunk_size: test samples per similarity block (memory: ``chunk_size x N``).
        device: where to compute.

    Returns:
        ``{"k<k>_top1": %, "k<k>_top5": % (when C > 5)}`` for every effective ``k``.
    """
    n_train = train_feats.shape[0]
    if n_train == 0 or test_feats.shape[0] == 0:
        raise ValueError("k-NN needs at least one training and one test sample")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    eff = sorted({min(int(k), n_train) for k in ks})
    k_max = eff[-1]
    train = F.normalize(train_feats.float().to(device), dim=1)
    labels_train = train_labels.to(device)
    correct1 = dict.fromkeys(eff, 0)
    correct5 = dict.fromkeys(eff, 0)
    for start in range(0, test_feats.shape[0], chunk_size):
        test = F.normalize(test_feats[start : start + chunk_size].float().to(device), dim=1)
        target = test_labels[start : start + chunk_size].to(device)
        sims = test @ train.T  # [m, N]
        top_sims, top_idx = sims.topk(k_max, dim=1)  # [m, k_max], most similar first
        neighbour_labels = labels_train[top_idx]  # [m, k_max]
        weights = (top_sims / temperature).exp()  # [m, k_max]
        for k in eff:
            votes = torch.zeros(test.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])  # [m, C]
            ranked = votes.topk(min(5, num_classes), dim=1).indices  # [m, <=5]
            correct1[k] += int((ranked[:, 0] == target).sum())
            correct5[k] += int((ranked == target[:, None]).any(dim=1).sum())
    total = test_feats.shape[0]
    out: dict[str, float] = {}
    for k in eff:
        out[f"k{k}_top1"] = 100.0 * correct1[k] / total
        if num_classes > 5:
            out[f"k{k}_top5"] = 100.0 * correct5[k] / total
    return out


@register_protocol("knn")
def run(ctx: EvalContext) -> dict[str, Any] | None:
    """The k-NN protocol on the context's train/test splits (CLS features, cached)."""
    ctx.require_train()
    train = ctx.features("train")
    test = ctx.features("test")
    if not ctx.env.is_main:
        return None
    assert train is not None and test is not None
    train = subset_rows(train, ctx.label_subset(train.labels, train.indices))
    cfg = ctx.cfg.knn
    num_classes = ctx.num_classes(train.labels, test.labels)
    metrics = knn_classify(
        train.cls,
        train.labels,
        test.cls,
        test.labels,
        ks=list(cfg.k),
        temperature=float(cfg.temperature),
        num_classes=num_classes,
        chunk_size=int(cfg.chunk_size),
        device=ctx.device,
    )
    effective = sorted({min(int(k), len(train)) for k in cfg.k})
    wanted = min(int(cfg.report_k), len(train))
    report_k = min(effective, key=lambda k: (abs(k - wanted), k))  # the headline k, or the nearest one run
    metrics["top1"] = metrics[f"k{report_k}_top1"]
    if f"k{report_k}_top5" in metrics:
        metrics["top5"] = metrics[f"k{report_k}_top5"]
    log.info("k-NN (T=%g): %s", cfg.temperature, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return {"metrics": metrics, "num_classes": num_classes, "report_k": report_k}
