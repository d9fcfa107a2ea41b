"""End-to-end fine-tuning with MAE's recipe.

He et al. 2022 ("Masked Autoencoders Are Scalable Vision Learners", Sec. A.1, Table 9; FINETUNE.md,
main_finetune.py): the pretrained encoder with global average pooling of the patch tokens, a new
LayerNorm (``fc_norm``) and a linear head (trunc-normal std 2e-5), trained end to end with AdamW
(betas 0.9/0.999, weight decay 0.05 except on biases, norms and tokens), lr = blr x batch / 256,
layer-wise lr decay (Clark et al. 2020, ELECTRA; Bao et al. 2021, BEiT): the lr of layer ``i`` of
``depth + 1`` is scaled by ``decay ** (depth + 1 - i)`` (embeddings are layer 0, block ``b`` is layer
``b + 1``, the head ``depth + 1``), linear warmup then cosine per step, stochastic depth (Huang et
al. 2016), Mixup (Zhang et al. 2018) alpha 0.8 / CutMix (Yun et al. 2019) alpha 1.0 switched with
probability 0.5, label smoothing 0.1 (Szegedy et al. 2016).

Data: RandomResizedCrop + flip from :mod:`data_pipelines.augment` (RandAugment and random erasing of
the paper are not implemented); every random decision is drawn from generators seeded by
``(seed, epoch, sample)`` or ``(seed, step)``, so a run is reproducible. Each epoch is a seeded
permutation of the training samples (or of the few-label subset); a global batch is split over
ranks by position (``p % world_size``), gradients are averaged with DDP.
Evaluation: the test split with the evaluation transform, logits gathered in sample order.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data_pipelines.augment import ViewSpec, apply_view
from data_pipelines.sequential import ShardSequence, iter_dataset
from data_pipelines.wds import CorruptSample, derive_seed, permutation
from evals.context import EvalContext, register_protocol
from evals.distributed import DistEnv, gather_by_index
from evals.errors import EvalInputError
from evals.features import autocast_context
from evals.linear import accuracy, lr_at
from pretrain.models import VisionTransformer

log = logging.getLogger(__name__)

_TAG_EPOCH, _TAG_SAMPLE, _TAG_MIX = 11, 12, 13


class Classifier(nn.Module):
    """Encoder + pooling + head, as MAE fine-tunes it.

    Args:
        encoder: the ViT.
        num_classes: ``C``.
        pool: ``avg`` (mean of the last block's patch tokens, then a new LayerNorm ``fc_norm``; the encoder's
            final ``norm`` is dropped, as MAE's ``global_pool``) or ``cls`` (class token after ``norm``).
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int, pool: str = "avg") -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        if pool == "avg":
            self.encoder.norm = nn.Identity()  # type: ignore[assignment]
            self.fc_norm: nn.Module = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` -> logits ``[B, C]``."""
        tokens = self.encoder.forward_features(x)  # [B, 1+L, D]
        pooled = tokens[:, 1:].mean(dim=1) if self.pool == "avg" else tokens[:, 0]  # [B, D]
        return self.head(self.fc_norm(pooled))


def layer_id(name: str, depth: int) -> int:
    """Layer number of a parameter for layer-wise lr decay (0: embeddings, b+1: block b, depth+1: head)."""
    if name.startswith(("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def param_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with ``lr_scale = layer_decay ** (depth + 1 - layer)`` and no decay on 1-D params and tokens."""
    depth = model.encoder.depth
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(("cls_token", "pos_embed"))
        lid = layer_id(name, depth)
        group = groups.setdefault(
            (lid, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - lid),
                "layer": lid,
            },
        )
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    mixup: float,
    cutmix: float,
    mix_prob: float,
    switch_prob: float,
    smoothing: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-mode Mixup / CutMix with label smoothing; the partner of sample ``i`` is sample ``B-1-i``.

    Args:
        images: ``[B, 3, H, W]``.
        labels: int64 ``[B]``.
        num_classes: ``C``.
        mixup: Beta alpha of Mixup (0: off).
        cutmix: Beta alpha of CutMix (0: off).
        mix_prob: probability of mixing this batch at all.
        switch_prob: with both on, probability of CutMix.
        smoothing: label smoothing epsilon.
        rng: randomness (seeded per step).

    Returns:
        ``(images, soft targets [B, C])``.
    """
    off = smoothing / num_classes
    one_hot = F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off  # [B, C]
    if (mixup <= 0 and cutmix <= 0) or rng.random() >= mix_prob:
        return images, one_hot
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    partner = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the area actually pasted
    else:
        images = images * lam + partner * (1.0 - lam)
    return images, one_hot * lam + one_hot.flip(0) * (1.0 - lam)


class _Augmented(Dataset):
    """Training samples with RandomResizedCrop + flip, seeded by (seed, epoch, sample index)."""

    def __init__(self, data: ShardSequence, view: ViewSpec, seed: int, epoch: int) -> None:
        self.data, self.view, self.seed, self.epoch = data, view, seed, epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            image, label, _ = self.data.read(index)
        except CorruptSample as exc:
            log.warning("skipping corrupt training sample %d: %s", index, exc)
            return None
        gen = torch.Generator().manual_seed(derive_seed(_TAG_SAMPLE, self.seed, self.epoch, index))
        return {"image": apply_view(image, self.view, gen), "label": label}


def _collate(items: list[dict[str, Any] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    good = [it for it in items if it is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.stack([it["image"] for it in good]), torch.tensor([it["label"] for it in good])


def _epoch_batches(
    pool: list[int], epoch: int, seed: int, global_batch: int, env: DistEnv
) -> list[list[int]]:
    """This rank's share of every full global batch of an epoch."""
    perm = permutation(len(pool), derive_seed(_TAG_EPOCH, seed, epoch))
    order = [pool[p] for p in perm]
    per_rank = global_batch // env.world_size
    out = []
    for b in range(len(order) // global_batch):
        chunk = order[b * global_batch : (b + 1) * global_batch]
        out.append(chunk[env.rank :: env.world_size][:per_rank])
    return out


@torch.no_grad()
def evaluate(model: nn.Module, ctx: EvalContext, num_classes: int) -> dict[str, float] | None:
    """Top-1/top-5 of ``model`` on the test split (ranks split the samples; rank 0 gets the numbers)."""
    model.eval()
    t = ctx.transform
    logits, labels, indices = [], [], []
    for batch in iter_dataset(
        ctx.test_data,
        img_size=t.size,
        mean=t.mean,
        std=t.std,
        batch_size=ctx.cfg.data.batch_size,
        rank=ctx.env.rank,
        world_size=ctx.env.world_size,
        num_workers=ctx.cfg.data.num_workers,
        resize=t.resize,
        crop_pct=t.crop_pct,
        interpolation=t.interpolation,
    ):
        if not batch.indices.numel():
            continue
        with autocast_context(ctx.device, ctx.cfg.features.amp):
            out = model(batch.images.to(ctx.device))
        logits.append(out.float().cpu())
        labels.append(batch.labels)
        indices.append(batch.indices)
    local = {
        "logits": torch.cat(logits) if logits else torch.zeros(0, num_classes),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
    }
    full = gather_by_index(
        ctx.env, local, torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)
    )
    model.train()
    return accuracy(full["logits"], full["labels"]) if ctx.env.is_main else None


@register_protocol("finetune")
def run(ctx: EvalContext) -> dict[str, Any] | None:
    """Fine-tune the encoder end to end on the training split; evaluate on the test split."""
    cfg = ctx.cfg.finetune
    env = ctx.env
    train_data = ctx.require_train()
    if cfg.batch_size % env.world_size:
        raise EvalInputError(
            f"finetune.batch_size={cfg.batch_size} must be a multiple of the number of ranks ({env.world_size})"
        )
    all_labels = train_data.labels()
    all_indices = torch.arange(len(train_data))
    subset = ctx.label_subset(all_labels, all_indices)
    pool = subset.indices if subset is not None else [i for i, y in enumerate(all_labels.tolist()) if y >= 0]
    num_classes = ctx.num_classes(all_labels)
    global_batch = min(int(cfg.batch_size), len(pool) - len(pool) % env.world_size)
    if global_batch < env.world_size:
        raise EvalInputError(
            f"finetune: {len(pool)} labelled training samples are too few for {env.world_size} ranks"
        )
    steps_per_epoch = len(pool) // global_batch
    total_steps = int(cfg.epochs) * steps_per_epoch
    stop_at = min(total_steps, int(cfg.max_steps)) if cfg.max_steps else total_steps
    lr = float(cfg.blr) * global_batch / 256

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        encoder = ctx.export.build_encoder(drop_path_rate=float(cfg.drop_path))
        model = Classifier(encoder, num_classes, pool=str(cfg.pool)).to(ctx.device)
    groups = param_groups(model, float(cfg.weight_decay), float(cfg.layer_decay))
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    net: nn.Module = model
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    t = ctx.transform
    view = ViewSpec(
        size=t.size,
        scale=tuple(cfg.crop_scale),
        hflip_p=float(cfg.hflip_p),
        interpolation=t.interpolation,
        mean=t.mean,
        std=t.std,
    )
    torch.manual_seed(derive_seed(int(cfg.seed), env.rank))  # drop path masks
    step, last_loss, started = 0, float("nan"), time.perf_counter()
    bar = tqdm(
        total=stop_at, desc="fine-tune", unit="step", disable=not (ctx.progress and env.is_main), leave=False
    )
    net.train()
    for epoch in range(int(cfg.epochs)):
        if step >= stop_at:
            break
        batches = _epoch_batches(pool, epoch, int(cfg.seed), global_batch, env)
        loader = DataLoader(
            _Augmented(train_data, view, int(cfg.seed), epoch),
            batch_sampler=batches,
            num_workers=ctx.cfg.data.num_workers,
            collate_fn=_collate,
        )
        for images, labels in loader:
            if step >= stop_at:
                break
            rng = np.random.default_rng(derive_seed(_TAG_MIX, int(cfg.seed), step, env.rank))
            images, targets = mix_batch(
                images,
                labels,
                num_classes,
                mixup=float(cfg.mixup),
                cutmix=float(cfg.cutmix),
                mix_prob=float(cfg.mix_prob),
                switch_prob=float(cfg.switch_prob),
                smoothing=float(cfg.label_smoothing),
                rng=rng,
            )
            current = lr_at(
                step, steps_per_epoch, lr, float(cfg.min_lr), int(cfg.epochs), int(cfg.warmup_epochs)
            )
            for group in opt.param_groups:
                group["lr"] = current * group["lr_scale"]
            with autocast_context(ctx.device, ctx.cfg.features.amp):
                logits = net(images.to(ctx.device))
            loss = torch.sum(-targets.to(ctx.device) * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), float(cfg.clip_grad))
            opt.step()
            step += 1
            bar.update(1)
            if step % 20 == 0 or step == stop_at:
                last_loss = float(loss.detach())
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{current:.2e}")
    bar.close()
    metrics = evaluate(model, ctx, num_classes)
    if not env.is_main:
        return None
    assert metrics is not None
    metrics["final_loss"] = last_loss
    log.info("fine-tune after %d steps: %s", step, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return {
        "metrics": metrics,
        "num_classes": num_classes,
        "actual": {
            "lr": lr,
            "global_batch_size": global_batch,
            "steps": step,
            "steps_per_epoch": steps_per_epoch,
            "scheduled_steps": total_steps,
            "epochs_completed": step / steps_per_epoch,
            "train_samples": len(pool),
            "time_s": time.perf_counter() - started,
        },
        "not_implemented": ["RandAugment (m9, mstd 0.5)", "random erasing 0.25"],
    }
