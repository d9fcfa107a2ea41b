"""Frozen-feature extraction, split over ranks, cached on disk.

One pass of the frozen encoder over a shard set produces, per sample:

* ``cls``: the class token of the last block after the final LayerNorm (``forward_features(x)[:, 0]``;
  the feature of DINO's k-NN and MAE's linear probe);
* ``last_blocks`` (when ``n_last_blocks > 1``): the normalised class tokens of the last ``n`` blocks,
  concatenated (DINO's linear probe of ViT-S, Caron et al. 2021, eval_linear.py);
* ``avgpool`` (when requested): the average of the last block's normalised patch tokens (DINO's
  ``avgpool_patchtokens`` for ViT-B).

Rank ``r`` reads the samples ``i % world_size == r`` (:mod:`data_pipelines.sequential`); the rows are
gathered and sorted by sample index, so the result is the single-process one. On CUDA the forward pass
runs under bf16 autocast (features are stored in float32).

Cache: ``<results>/cache/features_<key>.safetensors`` where ``key`` hashes the encoder weights
(SHA-256 of ``backbone.safetensors``, or the random-init seed), the data identity (manifest SHA-256 and
sample count), the transform, the feature spec and the precision (fp32 / bf16 autocast). A cache file is written atomically by rank 0 and is
never trusted when its recorded key differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data_pipelines.sequential import EvalTransform, ShardSequence, iter_dataset, rank_positions
from evals.distributed import DistEnv, broadcast_object, gather_by_index
from pretrain.models import VisionTransformer

log = logging.getLogger(__name__)

FEATURE_FORMAT = 1


@dataclass(frozen=True)
class FeatureSpec:
    """Which features one pass produces.

    Attributes:
        n_last_blocks: class tokens of the last ``n`` blocks (``1``: only ``cls``).
        avgpool: also the average of the last block's patch tokens.
    """

    n_last_blocks: int = 1
    avgpool: bool = False

    def describe(self) -> dict[str, Any]:
        """JSON-able form (part of the cache key)."""
        return {"n_last_blocks": self.n_last_blocks, "avgpool": self.avgpool}


@dataclass
class Features:
    """Features of a data set in global sample order.

    Attributes:
        cls: float32 ``[N, D]``.
        labels: int64 ``[N]``.
        indices: int64 ``[N]`` global sample indices (ascending).
        last_blocks: float32 ``[N, n * D]`` or ``None``.
        avgpool: float32 ``[N, D]`` or ``None``.
    """

    cls: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    last_blocks: torch.Tensor | None = None
    avgpool: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.cls.shape[0]

    def rows(self, positions: torch.Tensor) -> Features:
        """The features of the given row positions."""
        pick = lambda t: None if t is None else t[positions]  # noqa: E731
        return Features(
            self.cls[positions],
            self.labels[positions],
            self.indices[positions],
            pick(self.last_blocks),
            pick(self.avgpool),
        )

    def linear_input(self, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
        """DINO's linear-probe input: CLS of the last ``n`` blocks, optionally + average patch token."""
        parts = [self.cls if n_last_blocks == 1 else self.last_blocks]
        if parts[0] is None:
            raise ValueError(f"features were extracted without the last {n_last_blocks} blocks")
        if avgpool:
            if self.avgpool is None:
                raise ValueError("features were extracted without avgpool")
            parts.append(self.avgpool)
        return torch.cat(parts, dim=1)  # type: ignore[arg-type]

    def tensors(self) -> dict[str, torch.Tensor]:
        """For saving."""
        out = {"cls": self.cls, "labels": self.labels, "indices": self.indices}
        if self.last_blocks is not None:
            out["last_blocks"] = self.last_blocks
        if self.avgpool is not None:
            out["avgpool"] = self.avgpool
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Features:
        """Inverse of :meth:`tensors`."""
        return cls(t["cls"], t["labels"], t["indices"], t.get("last_blocks"), t.get("avgpool"))


def effective_precision(device: torch.device, amp: str) -> str:
    """``bf16`` when the forward pass runs under bf16 autocast, else ``fp32``."""
    return "fp32" if amp == "fp32" or (amp == "auto" and device.type != "cuda") else "bf16"


def cache_key(
    encoder_id: str, data_id: str, transform: EvalTransform, spec: FeatureSpec, precision: str = "fp32"
) -> str:
    """Hash of everything the features depend on (weights, data, transform, feature spec, precision)."""
    ident = json.dumps(
        {
            "format": FEATURE_FORMAT,
            "encoder": encoder_id,
            "data": data_id,
            "transform": transform.describe(),
            "features": spec.describe(),
            "precision": precision,
        },
        sort_keys=True,
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for ``amp`` ``auto``/``bf16``; nothing on CPU unless ``bf16`` is asked for."""
    if effective_precision(device, amp) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def encode_batch(
    encoder: VisionTransformer, images: torch.Tensor, spec: FeatureSpec
) -> dict[str, torch.Tensor]:
    """Features of one batch (see the module docstring)."""
    outs = encoder.get_intermediate_layers(images, n=spec.n_last_blocks, norm=True)  # n x [B, 1+L, D]
    feats = {"cls": outs[-1][:, 0].float()}  # [B, D]
    if spec.n_last_blocks > 1:
        feats["last_blocks"] = torch.cat([o[:, 0] for o in outs], dim=-1).float()  # [B, n * D]
    if spec.avgpool:
        feats["avgpool"] = outs[-1][:, 1:].mean(dim=1).float()  # [B, D]
    return feats


def encode_dataset(
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    dataset: ShardSequence,
    transform: EvalTransform,
    env: DistEnv,
    *,
    empty: dict[str, torch.Tensor],
    batch_size: int = 256,
    num_workers: int = 0,
    amp: str = "auto",
    indices: list[int] | None = None,
    progress: bool = True,
    desc: str = "features",
) -> dict[str, torch.Tensor]:
    """Apply ``encode`` to every (requested) sample, split over ranks; gather in sample order.

    Args:
        encode: images ``[B, 3, S, S]`` on ``env.device`` -> name -> ``[B, ...]`` tensors.
        dataset: the data (its transform is set to ``transform``).
        transform: the evaluation transform.
        env: distributed environment.
        empty: name -> an empty ``[0, ...]`` tensor of each output (for ranks without samples).
        batch_size: per-rank batch size.
        num_workers: DataLoader workers.
        amp: ``auto`` | ``bf16`` | ``fp32``.
        indices: the samples to encode (default: all).
        progress: show a progress bar on rank 0.
        desc: progress bar label.

    Returns:
        name -> ``[N, ...]`` CPU tensors plus ``labels`` and ``indices``, on every rank.
    """
    order = list(range(len(dataset))) if indices is None else list(indices)
    num_mine = len(rank_positions(len(order), env.rank, env.world_size))
    chunks: dict[str, list[torch.Tensor]] = {}
    labels, idx = [], []
    bar = tqdm(
        total=num_mine,
        desc=desc,
        unit="img",
        disable=not (progress and env.is_main),
        dynamic_ncols=True,
        leave=False,
    )
    batches = iter_dataset(
        dataset,
        img_size=transform.size,
        mean=transform.mean,
        std=transform.std,
        batch_size=batch_size,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=num_workers,
        resize=transform.resize,
        crop_pct=transform.crop_pct,
        interpolation=transform.interpolation,
        indices=order,
    )
    with torch.no_grad():
        for batch in batches:
            if batch.indices.numel():
                with autocast_context(env.device, amp):
                    out = encode(batch.images.to(env.device, non_blocking=True))
                for name, value in out.items():
                    chunks.setdefault(name, []).append(value.float().cpu())
                labels.append(batch.labels)
                idx.append(batch.indices)
            bar.update(len(batch.indices))
    bar.close()
    if dataset.num_corrupt:
        log.warning("rank %d: %d corrupt samples skipped in %s", env.rank, dataset.num_corrupt, desc)
    local = {name: torch.cat(chunks[name]) if name in chunks else empty[name] for name in empty}
    local["labels"] = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    local_idx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
    return gather_by_index(env, local, local_idx)


def extract_features(
    encoder: VisionTransformer,
    dataset: ShardSequence,
    transform: EvalTransform,
    env: DistEnv,
    *,
    spec: FeatureSpec | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    amp: str = "auto",
    indices: list[int] | None = None,
    progress: bool = True,
    desc: str = "features",
) -> Features:
    """Run the frozen encoder over (a subset of) a data set on every rank and gather the result.

    Args:
        encoder: the ViT (moved to ``env.device`` and put in eval mode here).
        dataset: the data.
        transform: the evaluation transform.
        env: distributed environment.
        spec: which features (default: the final CLS token only).
        batch_size: per-rank batch size.
        num_workers: DataLoader workers.
        amp: ``auto`` | ``bf16`` | ``fp32``.
        indices: the samples to encode (default: all).
        progress: show a progress bar on rank 0.
        desc: progress bar label.

    Returns:
        Features of all requested samples, in index order, on every rank.
    """
    spec = spec or FeatureSpec()
    encoder = encoder.to(env.device).eval()
    dim = encoder.embed_dim
    empty = {"cls": torch.zeros(0, dim)}
    if spec.n_last_blocks > 1:
        empty["last_blocks"] = torch.zeros(0, dim * spec.n_last_blocks)
    if spec.avgpool:
        empty["avgpool"] = torch.zeros(0, dim)
    full = encode_dataset(
        lambda images: encode_batch(encoder, images, spec),
        dataset,
        transform,
        env,
        empty=empty,
        batch_size=batch_size,
        num_workers=num_workers,
        amp=amp,
        indices=indices,
        progress=progress,
        desc=desc,
    )
    return Features.from_tensors(full)


def cached_features(
    cache_dir: Path | None,
    key: str,
    env: DistEnv,
    compute: Any,
    describe: dict[str, Any],
) -> tuple[Features | None, bool]:
    """Load features from the cache (rank 0) or compute them on every rank and store them.

    Args:
        cache_dir: cache directory (``None``: no caching).
        key: :func:`cache_key`.
        env: distributed environment.
        compute: zero-argument callable that runs :func:`extract_features` (called on every rank).
        describe: JSON metadata stored with the cache file.

    Returns:
        ``(features, hit)``: features on rank 0 (``None`` on other ranks after a cache hit).
    """
    path = cache_dir / f"features_{key}.safetensors" if cache_dir is not None else None
    hit = False
    if env.is_main and path is not None and path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                hit = (f.metadata() or {}).get("key") == key
            if not hit:
                log.warning("feature cache %s has a different key; recomputing", path)
        except Exception as exc:  # unreadable cache: recompute
            log.warning("feature cache %s unreadable (%s); recomputing", path, exc)
    hit = bool(broadcast_object(env, hit))
    if hit:
        assert path is not None
        log.info("features from cache %s", path)
        return (Features.from_tensors(load_file(str(path))) if env.is_main else None), True
    feats = compute()
    if env.is_main and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        save_file(feats.tensors(), str(tmp), metadata={"key": key, "description": json.dumps(describe)})
        os.replace(tmp, path)
    return feats, False
