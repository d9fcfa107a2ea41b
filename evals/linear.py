"""Linear probing of frozen features: MAE's recipe (BatchNorm + Linear, LARS) and DINO's (Linear, SGD).

MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", Sec. A.2, main_linprobe.py):
the class token after the final norm goes through ``BatchNorm1d(affine=False, eps=1e-6)`` (a
parameter-free whitening that makes the probe insensitive to the feature scale) and a linear layer
(weights trunc-normal std 0.01, bias 0), trained with LARS (You et al. 2017, "Large Batch Training of
Convolutional Networks"; momentum 0.9, trust coefficient 0.001, no weight decay), lr = 0.1 x batch / 256
at batch 16384, 10 warmup epochs then a half-cosine, 90 epochs.

DINO (Caron et al. 2021, eval_linear.py): the class tokens of the last ``n`` blocks (each after the
final norm) concatenated, optionally with the average patch token, into a linear layer (normal std
0.01, bias 0) trained with SGD (momentum 0.9, weight decay 0), lr = 0.001 x batch / 256, cosine to 0,
100 epochs.

Both run here on cached features (extracted once with the evaluation transform), in one process on
rank 0 (a linear layer on pre-computed features is cheap next to the extraction, which is the part
split over ranks). The papers instead augment every epoch (RandomResizedCrop + flip); results are
therefore close to, not equal to, the papers' protocol. The learning rate is updated every step
(MAE's per-iteration schedule; DINO steps its cosine per epoch).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from evals.context import EvalContext, register_protocol, subset_rows
from evals.features import FeatureSpec
from evals.subsets import holdout_split

log = logging.getLogger(__name__)


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) with heavy-ball momentum.

    For every parameter with more than one dimension (weight matrices; biases and norm parameters are
    left unscaled and undecayed, as in MAE's linear probe) the step direction ``d = g + wd * w`` is
    rescaled by the trust ratio ``eta * ||w|| / ||d||`` (1 when either norm is zero). Then
    ``m <- momentum * m + d`` and ``w <- w - lr * m``.

    Args:
        params: parameters or groups.
        lr: learning rate.
        weight_decay: decoupled into the direction of matrices only.
        momentum: heavy-ball momentum.
        trust_coefficient: ``eta``.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS: invalid lr={lr}, weight_decay={weight_decay}, momentum={momentum}, "
                f"trust_coefficient={trust_coefficient}"
            )
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                direction = p.grad
                if p.ndim > 1:
                    direction = direction.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(direction)
                    ratio = torch.where(
                        (w_norm > 0) & (d_norm > 0),
                        group["trust_coefficient"]
                        * w_norm
                        / d_norm.clamp_min(torch.finfo(d_norm.dtype).tiny),
                        torch.ones_like(w_norm),
                    )
                    direction = direction.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(direction)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_head(kind: str, dim: int, num_classes: int, init_std: float) -> nn.Module:
    """``bn_linear`` (MAE: BatchNorm1d(affine=False, eps=1e-6) + Linear) or ``linear`` (DINO)."""
    linear = _linear(kind, dim, num_classes, init_std)
    if kind == "bn_linear":
        return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)
    return linear


def _linear(kind: str, dim: int, num_classes: int, init_std: float) -> nn.Linear:
    linear = nn.Linear(dim, num_classes)
    if kind == "bn_linear":
        nn.init.trunc_normal_(linear.weight, std=init_std)
    else:
        nn.init.normal_(linear.weight, std=init_std)
    nn.init.zeros_(linear.bias)
    return linear


class LinearHeads(nn.Module):
    """Several linear classifiers on the same features, trained together (one per learning rate).

    The parameter-free ``BatchNorm1d(affine=False)`` of MAE's head is shared: every head would compute
    the same normalisation, so head ``h`` here equals ``build_head`` trained alone with its learning
    rate on the same batches. Every head starts from the same seeded initialisation, so the heads
    differ only in their learning rate.

    Args:
        kind: ``bn_linear`` or ``linear``.
        dim: feature width ``D``.
        num_classes: ``C``.
        num_heads: ``H``.
        init_std: weight init std.
    """

    def __init__(self, kind: str, dim: int, num_classes: int, num_heads: int, init_std: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if kind == "bn_linear" else nn.Identity()
        first = _linear(kind, dim, num_classes, init_std)
        self.heads = nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(num_heads - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` features -> ``[B, H, C]`` logits (one matrix product for all heads)."""
        z = self.norm(x)  # [B, D]
        weight = torch.cat([h.weight for h in self.heads])  # [H*C, D]
        bias = torch.cat([h.bias for h in self.heads])  # [H*C]
        return F.linear(z, weight, bias).view(len(x), len(self.heads), -1)


def lr_at(
    step: int, steps_per_epoch: int, base_lr: float, min_lr: float, epochs: float, warmup_epochs: float
) -> float:
    """Linear warmup then half-cosine, evaluated at fractional epochs (MAE's ``adjust_learning_rate``)."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) in percent."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [M, <=5]
    out = {"top1": 100.0 * float((ranked[:, 0] == labels).float().mean())}
    if logits.shape[1] > 5:
        out["top5"] = 100.0 * float((ranked == labels[:, None]).any(dim=1).float().mean())
    return out


def schedule_length(
    steps_per_epoch: int, epochs: int, warmup_epochs: float, min_steps: int
) -> tuple[float, float, int]:
    """``(epochs, warmup epochs, steps)`` actually run: ``epochs`` passes, lengthened to at least
    ``min_steps`` optimizer steps on small data (warmup keeps its share of the schedule)."""
    steps = max(epochs * steps_per_epoch, min_steps)
    run_epochs = steps / steps_per_epoch
    return run_epochs, warmup_epochs * run_epochs / epochs, steps


def _batches(n: int, batch: int, steps: int, steps_per_epoch: int, gen: torch.Generator) -> Any:
    perm = torch.randperm(n, generator=gen)
    for step in range(steps):
        b = step % steps_per_epoch
        if step and b == 0:
            perm = torch.randperm(n, generator=gen)
        yield step, perm[b * batch : (b + 1) * batch]


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``[M, H, C]`` logits in chunks (model in eval mode)."""
    return torch.cat([model(x[i : i + 8192].float().to(device)).cpu() for i in range(0, len(x), 8192)])


def train_linear(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    num_classes: int,
    head: str = "bn_linear",
    optimizer: str = "lars",
    blr: float | Sequence[float] = 0.1,
    val_fraction: float = 0.1,
    batch_size: int = 16384,
    epochs: int = 90,
    min_steps: int = 0,
    warmup_epochs: float = 10,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    min_lr: float = 0.0,
    trust_coefficient: float = 0.001,
    init_std: float = 0.01,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train linear classifiers on fixed features, choose one, and evaluate it on the test features.

    With one base learning rate the head trains on every training sample (the papers' protocol). With
    a grid, a class-stratified ``val_fraction`` of the training samples is held out, one head per
    learning rate trains on the rest in the same pass (same batches, one optimizer with a parameter
    group per head, as DINOv2's linear evaluation does), and the head with the best held-out top-1
    (then the lowest held-out loss, then the smaller learning rate) is evaluated on the test set.

    Args:
        x_train: ``[N, D]`` training features.
        y_train: int64 ``[N]``.
        x_test: ``[M, D]``.
        y_test: int64 ``[M]``.
        num_classes: ``C``.
        head: ``bn_linear`` or ``linear``.
        optimizer: ``lars`` or ``sgd``.
        blr: base lr, or a grid of them; lr = blr x batch / 256 with the batch actually used.
        val_fraction: share of every class held out to choose among a grid.
        batch_size: requested batch (capped at the number of fitting samples; the last incomplete
            batch of an epoch is dropped).
        epochs: passes over the fitting samples.
        min_steps: at least this many optimizer steps (small data: more epochs; see :func:`schedule_length`).
        warmup_epochs: linear warmup.
        momentum: optimizer momentum.
        weight_decay: weight decay.
        min_lr: end of the cosine (a head whose lr is lower ends at its own lr).
        trust_coefficient: LARS ``eta``.
        init_std: head weight init std.
        seed: head init, shuffling and held-out split seed.
        device: where to train.
        progress: progress bar over steps.

    Returns:
        ``{"metrics": {"top1", "top5"?, "val_top1"?, "train_top1", "final_loss"}, "blr", "lr",
        "blr_grid", "grid" (per blr: lr, val_top1, val_loss), "batch_size", "steps", "epochs",
        "num_train", "num_val"}``.
    """
    blrs = [float(blr)] if isinstance(blr, int | float) else [float(b) for b in blr]
    if not blrs:
        raise ValueError("linear probe: empty learning-rate grid")
    n_all, dim = x_train.shape
    fit_rows = val_rows = None
    if len(blrs) > 1:
        fit_rows, val_rows = holdout_split(y_train, val_fraction, seed)
        x_fit, y_fit = x_train[fit_rows], y_train[fit_rows]
    else:
        x_fit, y_fit = x_train, y_train
    n = len(x_fit)
    if n < 2:
        raise ValueError(f"linear probe needs at least 2 training samples, got {n}")
    batch = min(batch_size, n)
    steps_per_epoch = n // batch
    run_epochs, run_warmup, total_steps = schedule_length(steps_per_epoch, epochs, warmup_epochs, min_steps)
    lrs = [b * batch / 256 for b in blrs]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LinearHeads(head, dim, num_classes, len(blrs), init_std).to(device)
    groups = [{"params": list(h.parameters()), "lr": lr} for h, lr in zip(model.heads, lrs, strict=True)]
    if optimizer == "lars":
        opt: torch.optim.Optimizer = LARS(
            groups,
            lr=lrs[0],
            weight_decay=weight_decay,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
        )
    else:
        opt = torch.optim.SGD(groups, lr=lrs[0], momentum=momentum, weight_decay=weight_decay)
    x_dev, y_dev = x_fit.float().to(device), y_fit.to(device)
    gen = torch.Generator().manual_seed(seed)
    losses = torch.full((len(blrs),), float("nan"))
    model.train()
    bar = tqdm(total=total_steps, desc="linear probe", unit="step", disable=not progress, leave=False)
    for step, rows in _batches(n, batch, total_steps, steps_per_epoch, gen):
        rows = rows.to(device)
        for group, lr in zip(opt.param_groups, lrs, strict=True):
            group["lr"] = lr_at(step, steps_per_epoch, lr, min(min_lr, lr), run_epochs, run_warmup)
        logits = model(x_dev[rows])  # [B, H, C]
        target = y_dev[rows][:, None].expand(-1, len(blrs))  # [B, H]
        per_head = F.cross_entropy(logits.permute(0, 2, 1), target, reduction="none").mean(dim=0)  # [H]
        opt.zero_grad(set_to_none=True)
        per_head.sum().backward()  # heads share no parameter: each gets its own gradient
        opt.step()
        if step == total_steps - 1:
            losses = per_head.detach().cpu()
        bar.update()
    bar.close()
    model.eval()
    grid = [{"blr": b, "lr": lr} for b, lr in zip(blrs, lrs, strict=True)]
    chosen = 0
    val_metrics: dict[str, float] = {}
    if val_rows is not None:
        val_logits = _logits(model, x_train[val_rows], device)  # [V, H, C]
        y_val = y_train[val_rows].cpu()
        for h, entry in enumerate(grid):
            finite = all(bool(torch.isfinite(p).all()) for p in model.heads[h].parameters())
            if not (
                finite and bool(torch.isfinite(losses[h])) and bool(torch.isfinite(val_logits[:, h]).all())
            ):
                entry.update(val_top1=0.0, val_loss=None, diverged=True)  # this learning rate diverged
                continue
            entry["val_top1"] = accuracy(val_logits[:, h], y_val)["top1"]
            entry["val_loss"] = float(F.cross_entropy(val_logits[:, h], y_val))
        usable = [h for h, e in enumerate(grid) if not e.get("diverged")]
        if not usable:
            raise FloatingPointError(f"linear probe: every learning rate of the grid {blrs} diverged")
        chosen = min(usable, key=lambda h: (-grid[h]["val_top1"], grid[h]["val_loss"], grid[h]["blr"]))
        val_metrics["val_top1"] = grid[chosen]["val_top1"]
    test_logits = _logits(model, x_test, device)[:, chosen]
    train_logits = _logits(model, x_fit, device)[:, chosen]
    metrics = accuracy(test_logits, y_test.cpu())
    metrics.update(val_metrics)
    metrics["train_top1"] = accuracy(train_logits, y_fit.cpu())["top1"]
    metrics["final_loss"] = float(losses[chosen])
    return {
        "metrics": metrics,
        "blr": blrs[chosen],
        "lr": lrs[chosen],
        "blr_grid": blrs,
        "grid": grid,
        "batch_size": batch,
        "steps": total_steps,
        "epochs": run_epochs,
        "warmup_epochs": run_warmup,
        "num_train": n,
        "num_val": 0 if val_rows is None else len(val_rows),
        "num_total": n_all,
    }


@register_protocol("linear")
def run(ctx: EvalContext) -> dict[str, Any] | None:
    """Linear probe on cached features of the train/test splits (training on rank 0)."""
    ctx.require_train()
    cfg = ctx.cfg.linear
    spec = FeatureSpec(n_last_blocks=int(cfg.n_last_blocks), avgpool=bool(cfg.avgpool))
    train = ctx.features("train", spec)
    test = ctx.features("test", spec)
    if not ctx.env.is_main:
        return None
    assert train is not None and test is not None
    train = subset_rows(train, ctx.label_subset(train.labels, train.indices))
    num_classes = ctx.num_classes(train.labels, test.labels)
    blrs = [float(cfg.blr)] if cfg.blr is not None else [float(b) for b in cfg.blr_grid]
    out = train_linear(
        train.linear_input(spec.n_last_blocks, spec.avgpool),
        train.labels,
        test.linear_input(spec.n_last_blocks, spec.avgpool),
        test.labels,
        num_classes=num_classes,
        head=str(cfg.head),
        optimizer=str(cfg.optimizer),
        blr=blrs,
        val_fraction=float(cfg.val_fraction),
        batch_size=int(cfg.batch_size),
        epochs=int(cfg.epochs),
        min_steps=int(cfg.min_steps),
        warmup_epochs=float(cfg.warmup_epochs),
        momentum=float(cfg.momentum),
        weight_decay=float(cfg.weight_decay),
        min_lr=float(cfg.min_lr),
        trust_coefficient=float(cfg.trust_coefficient),
        init_std=float(cfg.init_std),
        seed=int(cfg.seed),
        device=ctx.device,
        progress=ctx.progress,
    )
    if len(blrs) > 1:
        log.info(
            "linear probe (%s): held-out top-1 by blr: %s -> blr %g",
            cfg.recipe,
            ", ".join(f"{g['blr']:g}: {g['val_top1']:.1f}" for g in out["grid"]),
            out["blr"],
        )
    log.info(
        "linear probe (%s): %s", cfg.recipe, ", ".join(f"{k} {v:.2f}" for k, v in out["metrics"].items())
    )
    actual = {k: out[k] for k in ("blr", "lr", "blr_grid", "batch_size", "steps", "epochs", "warmup_epochs")}
    actual.update(num_train=out["num_train"], num_val=out["num_val"])
    return {"metrics": out["metrics"], "num_classes": num_classes, "actual": actual, "grid": out["grid"]}
