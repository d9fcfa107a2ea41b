"""What a protocol receives: config, encoder, data, distributed environment, feature cache, and a registry.

A protocol is a function ``run(ctx) -> dict | None`` registered with ``@register_protocol("name")`` in
its own module; it returns (on rank 0) ``{"metrics": {...}, ...}`` and ``None`` on other ranks.
``evals.run`` writes the result file and TensorBoard scalars; protocols never write results themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from data_pipelines.sequential import EvalTransform, ShardSequence, data_identity
from evals.distributed import DistEnv
from evals.errors import EvalInputError
from evals.export import Export
from evals.features import (
    Features,
    FeatureSpec,
    cache_key,
    cached_features,
    effective_precision,
    extract_features,
)
from evals.subsets import LabelSubset, select_subset

log = logging.getLogger(__name__)

ProtocolFn = Callable[["EvalContext"], "dict[str, Any] | None"]
_PROTOCOLS: dict[str, ProtocolFn] = {}


def register_protocol(name: str) -> Callable[[ProtocolFn], ProtocolFn]:
    """Decorator: register a protocol implementation under ``name`` (the ``protocol`` key of configs)."""

    def wrap(fn: ProtocolFn) -> ProtocolFn:
        _PROTOCOLS[name] = fn
        return fn

    return wrap


def get_protocol(name: str) -> ProtocolFn:
    """The implementation registered as ``name`` (imports the protocol modules first)."""
    import evals.finetune
    import evals.knn
    import evals.linear
    import evals.retrieval
    import evals.zeroshot  # noqa: F401  (self-registering)

    if name not in _PROTOCOLS:
        raise EvalInputError(
            f"no implementation for protocol {name!r}; registered: {', '.join(sorted(_PROTOCOLS))}"
        )
    return _PROTOCOLS[name]


@dataclass
class EvalContext:
    """Everything a protocol needs.

    Attributes:
        name: protocol name (config stem, e.g. ``linear_dino``).
        cfg: the resolved config.
        export: the encoder to evaluate (a random-init baseline has ``random_init_seed`` set).
        env: distributed environment.
        transform: the evaluation transform (checkpoint size, resize policy, normalization).
        train_data: labelled training split (protocols that train), or ``None``.
        test_data: evaluation split.
        cache_dir: feature cache directory (``None``: no cache).
        progress: show progress bars (rank 0).
        info: extra facts for the result file (label subset, cache hits, corrupt counts, ...).
    """

    name: str
    cfg: DictConfig
    export: Export
    env: DistEnv
    transform: EvalTransform
    train_data: ShardSequence | None
    test_data: ShardSequence
    cache_dir: Path | None = None
    progress: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    _encoder: torch.nn.Module | None = None

    @property
    def device(self) -> torch.device:
        """This rank's device."""
        return self.env.device

    def encoder(self) -> torch.nn.Module:
        """The frozen encoder (built once)."""
        if self._encoder is None:
            self._encoder = self.export.build_encoder().to(self.device).eval()
        return self._encoder

    def require_train(self) -> ShardSequence:
        """The training split, or a clear error naming the options that give one."""
        if self.train_data is None:
            raise EvalInputError(
                f"protocol {self.name} trains a classifier: give the labelled training shards with "
                "--train-data DIR (or --data DIR containing train/ and test/)"
            )
        return self.train_data

    def features(self, split: str, spec: FeatureSpec | None = None) -> Features | None:
        """Frozen features of ``split`` (``train``/``test``), cached; on rank 0 (``None`` elsewhere)."""
        spec = spec or FeatureSpec()
        data = self.require_train() if split == "train" else self.test_data
        ident = data_identity(data)
        precision = effective_precision(self.device, str(self.cfg.features.amp))
        key = cache_key(self.export.encoder_id, ident["id"], self.transform, spec, precision)
        describe = {
            "encoder": self.export.describe(),
            "data": ident,
            "transform": self.transform.describe(),
            "features": spec.describe(),
            "precision": precision,
        }

        def compute() -> Features:
            return extract_features(
                self.encoder(),
                data,
                self.transform,
                self.env,
                spec=spec,
                batch_size=self.cfg.data.batch_size,
                num_workers=self.cfg.data.num_workers,
                amp=self.cfg.features.amp,
                progress=self.progress,
                desc=f"{split} features",
            )

        feats, hit = cached_features(self.cache_dir, key, self.env, compute, describe)
        self.info.setdefault("feature_cache", {})[split] = {"key": key, "hit": hit}
        if feats is not None and self.env.is_main:
            self.info.setdefault("num_samples", {})[split] = len(feats)
            self._check_corrupt(split, len(data), len(data) - len(feats))
        return feats

    def _check_corrupt(self, split: str, total: int, skipped: int) -> None:
        """Record corrupt samples that were left out; stop above ``data.max_corrupt_fraction``."""
        self.info.setdefault("corrupt_skipped", {})[split] = skipped
        limit = float(self.cfg.data.max_corrupt_fraction)
        if skipped > limit * total:
            raise EvalInputError(
                f"{skipped} of {total} {split} samples are corrupt ({skipped / max(total, 1):.2%} > "
                f"data.max_corrupt_fraction {limit:.2%}); rebuild the shards (python -m data_pipelines.build_shards) "
                "or raise data.max_corrupt_fraction"
            )

    def label_subset(self, labels: torch.Tensor, indices: torch.Tensor) -> LabelSubset | None:
        """The few-label subset of the training samples (``None`` when all labels are used)."""
        fraction = self.cfg.data.labels_fraction
        if fraction is None:
            return None
        subset = select_subset(labels, indices, float(fraction), int(self.cfg.data.subset_seed))
        self.info["labels_subset"] = subset.describe()
        log.info(
            "few-label: %d of %d training labels (%.3g %%, seed %d, sha256 %s)",
            len(subset.indices),
            subset.num_total,
            100 * fraction,
            subset.seed,
            subset.sha256[:12],
        )
        return subset

    def num_classes(self, *labels: torch.Tensor) -> int:
        """Number of classes: the manifest's, else ``max(label) + 1``."""
        for data in (self.train_data, self.test_data):
            if data is not None and data.classes:
                return len(data.classes)
        return int(max(int(lab.max()) for lab in labels if lab.numel()) + 1)


def subset_rows(feats: Features, subset: LabelSubset | None) -> Features:
    """Rows of ``feats`` whose sample index is in ``subset`` (all rows when ``None``)."""
    if subset is None:
        return feats
    wanted = torch.tensor(subset.indices, dtype=torch.int64)
    positions = torch.searchsorted(feats.indices, wanted)
    ok = (positions < len(feats)) & (feats.indices[positions.clamp(max=len(feats) - 1)] == wanted)
    if not bool(ok.all()):
        raise RuntimeError("label subset refers to samples without features (corrupt samples?)")
    return feats.rows(positions)
