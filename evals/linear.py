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

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from evals.context import EvalContext, register_protocol, subset_rows
from evals.features import FeatureSpec

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
    linear = nn.Linear(dim, num_classes)
    if kind == "bn_linear":
        nn.init.trunc_normal_(linear.weight, std=init_std)
    else:
        nn.init.normal_(linear.weight, std=init_std)
    nn.init.zeros_(linear.bias)
    if kind == "bn_linear":
        return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)
    return linear


def lr_at(
    step: int, steps_per_epoch: int, base_lr: float, min_lr: float, epochs: int, warmup_epochs: int
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


def train_linear(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    num_classes: int,
    head: str = "bn_linear",
    optimizer: str = "lars",
    blr: float = 0.1,
    batch_size: int = 16384,
    epochs: int = 90,
    warmup_epochs: int = 10,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    min_lr: float = 0.0,
    trust_coefficient: float = 0.001,
    init_std: float = 0.01,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train a linear classifier on fixed features and evaluate it.

    Args:
        x_train: ``[N, D]`` training features.
        y_train: int64 ``[N]``.
        x_test: ``[M, D]``.
        y_test: int64 ``[M]``.
        num_classes: ``C``.
        head: ``bn_linear`` or ``linear``.
        optimizer: ``lars`` or ``sgd``.
        blr: base lr; lr = blr x batch / 256 with the batch actually used.
        batch_size: requested batch (capped at ``N``; the last incomplete batch of an epoch is dropped).
        epochs: passes over the training features.
        warmup_epochs: linear warmup.
        momentum: optimizer momentum.
        weight_decay: weight decay.
        min_lr: end of the cosine.
        trust_coefficient: LARS ``eta``.
        init_std: head weight init std.
        seed: head init and shuffling seed.
        device: where to train.
        progress: progress bar over epochs.

    Returns:
        ``{"metrics": {"top1", "top5"?, "train_top1", "final_loss"}, "lr", "batch_size", "steps"}``.
    """
    n, dim = x_train.shape
    if n < 2:
        raise ValueError(f"linear probe needs at least 2 training samples, got {n}")
    batch = min(batch_size, n)
    steps_per_epoch = n // batch
    lr = blr * batch / 256
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_head(head, dim, num_classes, init_std).to(device)
    if optimizer == "lars":
        opt: torch.optim.Optimizer = LARS(
            model.parameters(),
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
        )
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    x_train, y_train = x_train.float().to(device), y_train.to(device)
    gen = torch.Generator().manual_seed(seed)
    step, loss_value = 0, float("nan")
    model.train()
    for _ in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress, leave=False):
        perm = torch.randperm(n, generator=gen).to(device)
        for b in range(steps_per_epoch):
            rows = perm[b * batch : (b + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps_per_epoch, lr, min_lr, epochs, warmup_epochs)
            loss = F.cross_entropy(model(x_train[rows]), y_train[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        loss_value = float(loss.detach())
    model.eval()
    with torch.no_grad():
        test_logits = torch.cat(
            [model(x_test[i : i + 8192].float().to(device)) for i in range(0, len(x_test), 8192)]
        )
        train_logits = torch.cat([model(x_train[i : i + 8192]) for i in range(0, n, 8192)])
    metrics = accuracy(test_logits.cpu(), y_test.cpu())
    metrics["train_top1"] = accuracy(train_logits.cpu(), y_train.cpu())["top1"]
    metrics["final_loss"] = loss_value
    return {"metrics": metrics, "lr": lr, "batch_size": batch, "steps": step}


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
    out = train_linear(
        train.linear_input(spec.n_last_blocks, spec.avgpool),
        train.labels,
        test.linear_input(spec.n_last_blocks, spec.avgpool),
        test.labels,
        num_classes=num_classes,
        head=str(cfg.head),
        optimizer=str(cfg.optimizer),
        blr=float(cfg.blr),
        batch_size=int(cfg.batch_size),
        epochs=int(cfg.epochs),
        warmup_epochs=int(cfg.warmup_epochs),
        momentum=float(cfg.momentum),
        weight_decay=float(cfg.weight_decay),
        min_lr=float(cfg.min_lr),
        trust_coefficient=float(cfg.trust_coefficient),
        init_std=float(cfg.init_std),
        seed=int(cfg.seed),
        device=ctx.device,
        progress=ctx.progress,
    )
    log.info(
        "linear probe (%s): %s", cfg.recipe, ", ".join(f"{k} {v:.2f}" for k, v in out["metrics"].items())
    )
    return {
        "metrics": out["metrics"],
        "num_classes": num_classes,
        "actual": {"lr": out["lr"], "batch_size": out["batch_size"], "steps": out["steps"]},
    }
