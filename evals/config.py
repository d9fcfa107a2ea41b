"""Evaluation protocol configs: a typed schema, one YAML per protocol, ``key=value`` overrides.

Layers, lowest precedence first: the dataclass defaults below, ``configs/eval/<protocol>.yaml``
(every value with its source), then ``key=value`` overrides from the command line. Unknown keys
are rejected with the nearest valid key. A protocol *name* is the stem of a YAML file in
``configs/eval/`` (``knn``, ``linear``, ``linear_dino``, ``finetune``, ``zeroshot``, ``retrieval``);
its ``protocol`` key names the implementation it runs (``linear_dino.yaml`` runs ``linear`` with
DINO's settings). The launcher checks ``--eval`` names against the same files.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from evals.errors import EvalInputError
from pretrain.config import unknown_key_message  # config helper only, no trainer internals

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs" / "eval"
IMPLEMENTATIONS = ("knn", "linear", "finetune", "zeroshot", "retrieval")


@dataclass
class DataConfig:
    """Which data and how it is read (shared by every protocol)."""

    train: str | None = None  # shard dir (labelled training split); --train-data / --data DIR/train
    test: str | None = None  # shard dir (evaluation split); --test-data / --data DIR/test
    resize: str = "auto"  # auto | center_crop | resize | none  (see data_pipelines.sequential.EvalTransform)
    crop_pct: float = 0.875  # center_crop: resize to size / crop_pct, then crop (256 -> 224)
    interpolation: str = "bicubic"
    batch_size: int = 256  # per rank, feature extraction
    num_workers: int = 2  # DataLoader workers per rank
    labels_fraction: float | None = None  # few-label: fraction of training labels kept (0.01, 0.1)
    subset_seed: int = 0  # seed of the class-balanced label subset
    max_corrupt_fraction: float = 0.01  # corrupt samples are left out (and counted); above this the job stops


@dataclass
class FeaturesConfig:
    """Frozen-feature extraction."""

    cache: bool = True  # keep features in <evals>/step_N/cache/, keyed by weights + data + transform
    amp: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32


@dataclass
class KnnConfig:
    """Weighted k-NN classifier (Wu et al. 2018; Caron et al. 2021)."""

    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    report_k: int = 20  # the k whose accuracy is the headline number (DINO reports 20-NN)
    chunk_size: int = 1024  # test samples per similarity block


@dataclass
class LinearConfig:
    """Linear probe on frozen features (MAE's or DINO's recipe), with a learning-rate grid."""

    recipe: str = "mae"  # name shown in results: mae | dino
    head: str = "bn_linear"  # bn_linear (BatchNorm1d(affine=False) + Linear, MAE) | linear (DINO)
    n_last_blocks: int = 1  # concatenated CLS tokens of the last n blocks (DINO ViT-S: 4)
    avgpool: bool = False  # also concatenate the average of the last block's patch tokens (DINO ViT-B)
    optimizer: str = "lars"  # lars (MAE) | sgd (DINO)
    blr_grid: list[float] = field(
        default_factory=lambda: [0.1]
    )  # one head per base lr, chosen on held-out data
    blr: float | None = None  # one fixed base lr instead of the grid (all training samples, no held-out part)
    val_fraction: float = 0.1  # share of every class held out to choose among the grid
    batch_size: int = 16384  # capped at the training-set size; lr = blr * batch actually used / 256
    epochs: int = 90
    min_steps: int = 0  # at least this many optimizer steps (more epochs on small data)
    warmup_epochs: float = 10
    momentum: float = 0.9
    weight_decay: float = 0.0
    min_lr: float = 0.0
    trust_coefficient: float = 0.001  # LARS eta
    init_std: float = 0.01  # head weight init (MAE: trunc-normal 0.01; DINO: normal 0.01)
    seed: int = 0


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning (MAE's recipe, He et al. 2022, FINETUNE.md / main_finetune.py)."""

    epochs: int = 50
    max_steps: int | None = None  # stop earlier (tests, smoke runs); the schedule still spans `epochs`
    batch_size: int = 1024  # global
    blr: float = 1e-3  # lr = blr * batch_size / 256
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    drop_path: float = 0.2
    warmup_epochs: int = 5
    min_lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    mixup: float = 0.8  # Beta(alpha, alpha) mixing; 0 disables
    cutmix: float = 1.0  # Beta(alpha, alpha) box area; 0 disables
    mix_prob: float = 1.0
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    label_smoothing: float = 0.1
    pool: str = "avg"  # avg (MAE global_pool + fc_norm) | cls
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip_p: float = 0.5
    clip_grad: float | None = None
    seed: int = 0


@dataclass
class ZeroShotConfig:
    """Zero-shot classification of CLIP exports (Radford et al. 2021)."""

    templates: str = (
        "imagenet_openai"  # a file in evals/templates/ (one template per line, {} = class) or a path
    )
    template_list: list[str] | None = None  # explicit templates (override `templates`)
    classnames: list[str] | None = None  # default: the test manifest's class names


@dataclass
class RetrievalConfig:
    """Image-text retrieval recall@K, both directions."""

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])


@dataclass
class EvalConfig:
    """One evaluation protocol, fully resolved."""

    protocol: str = "knn"  # implementation: knn | linear | finetune | zeroshot | retrieval
    source: str = ""  # the papers / files the defaults come from
    seed: int = 0  # random-init baseline seed
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)


def protocol_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Valid ``--protocol`` names: the stems of ``configs/eval/*.yaml``."""
    return sorted(p.stem for p in config_dir.glob("*.yaml")) if config_dir.is_dir() else []


def unknown_protocol_message(name: str, valid: list[str]) -> str:
    """``unknown protocol 'knnn'; did you mean 'knn'? Valid: ...``."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.3)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown protocol '{name}'{hint} Valid protocols: {', '.join(valid)} (files in {CONFIG_DIR})"


def _nearest_key_error(schema: DictConfig, bad_key: str, where: str) -> EvalInputError:
    return EvalInputError(unknown_key_message(schema, bad_key, where))


def _merge(base: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except ConfigKeyError as e:
        raise _nearest_key_error(base, str(getattr(e, "full_key", None) or e), where) from None
    except ValidationError as e:
        raise EvalInputError(f"{where}: invalid value for '{e.full_key}': {e.msg}") from None
    except OmegaConfBaseException as e:
        raise EvalInputError(f"{where}: {e}") from None


def load_eval_config(
    protocol: str | None, config_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[str, DictConfig]:
    """Resolve a protocol's config.

    Args:
        protocol: a protocol name (stem of ``configs/eval/*.yaml``); may be ``None`` with ``config_path``.
        config_path: explicit YAML (default ``configs/eval/<protocol>.yaml``).
        overrides: ``section.key=value`` strings.

    Returns:
        ``(name, config)``: the protocol name (for result files) and the read-only resolved config.

    Raises:
        EvalInputError: unknown protocol (with the nearest valid name), file or key; bad values.
    """
    valid = protocol_names()
    explicit = config_path is not None
    if config_path is None:
        if protocol is None:
            raise EvalInputError(f"give --protocol (one of {', '.join(valid)}) or --config FILE")
        if protocol not in valid:
            raise EvalInputError(unknown_protocol_message(protocol, valid))
        config_path = CONFIG_DIR / f"{protocol}.yaml"
    path = Path(config_path)
    if not path.is_file():
        raise EvalInputError(f"eval config {path} does not exist (protocol configs: {CONFIG_DIR}/*.yaml)")
    try:
        layer = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise EvalInputError(f"{path}: not valid YAML: {e}") from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise EvalInputError(f"override '{item}' is not of the form key=value (e.g. knn.k=[10,20])")
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise EvalInputError(f"command-line overrides: {e}") from None
    schema = OmegaConf.structured(EvalConfig)
    cfg = _merge(schema, layer, str(path))  # type: ignore[arg-type]
    cfg = _merge(cfg, cli, "command-line overrides")
    name = protocol if protocol is not None else path.stem
    if protocol is not None and explicit:
        if protocol not in valid:
            raise EvalInputError(unknown_protocol_message(protocol, valid))
        expected = OmegaConf.load(CONFIG_DIR / f"{protocol}.yaml").get("protocol", protocol)
        if cfg.protocol != expected:  # e.g. --protocol knn --config configs/eval/linear.yaml
            raise EvalInputError(
                f"--protocol {protocol} runs '{expected}' but {path} has protocol: {cfg.protocol}; drop one of them"
            )
    validate(cfg, where=str(path))
    OmegaConf.set_readonly(cfg, True)
    return name, cfg


def validate(cfg: DictConfig, where: str = "config") -> None:
    """Cross-field checks; raise :class:`EvalInputError` naming every offending key."""
    errors = []
    if cfg.protocol not in IMPLEMENTATIONS:
        errors.append(f"protocol={cfg.protocol!r}: valid implementations are {', '.join(IMPLEMENTATIONS)}")
    d = cfg.data
    if d.resize not in ("auto", "center_crop", "resize", "none"):
        errors.append(f"data.resize={d.resize!r}: valid values are auto, center_crop, resize, none")
    if d.labels_fraction is not None and not 0 < d.labels_fraction <= 1:
        errors.append(f"data.labels_fraction={d.labels_fraction}: must be in (0, 1] (e.g. 0.01 or 0.1)")
    if d.batch_size < 1 or d.num_workers < 0:
        errors.append(
            f"data.batch_size={d.batch_size} must be >= 1 and data.num_workers={d.num_workers} >= 0"
        )
    if cfg.features.amp not in ("auto", "bf16", "fp32"):
        errors.append(f"features.amp={cfg.features.amp!r}: valid values are auto, bf16, fp32")
    k = cfg.knn
    if not k.k or min(k.k) < 1 or k.temperature <= 0:
        errors.append(f"knn.k={list(k.k)} must be positive integers and knn.temperature={k.temperature} > 0")
    lin = cfg.linear
    if lin.head not in ("bn_linear", "linear"):
        errors.append(f"linear.head={lin.head!r}: valid values are bn_linear (MAE), linear (DINO)")
    if lin.optimizer not in ("lars", "sgd"):
        errors.append(f"linear.optimizer={lin.optimizer!r}: valid values are lars, sgd")
    if lin.epochs < 1 or lin.batch_size < 1 or lin.n_last_blocks < 1:
        errors.append("linear.epochs, linear.batch_size and linear.n_last_blocks must be >= 1")
    if lin.min_steps < 0 or not 0 <= lin.warmup_epochs <= lin.epochs:
        errors.append(
            f"linear.min_steps={lin.min_steps} must be >= 0 and linear.warmup_epochs={lin.warmup_epochs} "
            f"in [0, linear.epochs={lin.epochs}]"
        )
    if lin.blr is not None and lin.blr <= 0:
        errors.append(f"linear.blr={lin.blr} must be > 0 (or null to use linear.blr_grid)")
    if lin.blr is None and (not lin.blr_grid or min(lin.blr_grid) <= 0):
        errors.append(f"linear.blr_grid={list(lin.blr_grid)} must be a non-empty list of positive base lrs")
    if lin.blr is None and len(lin.blr_grid) > 1 and not 0 < lin.val_fraction < 1:
        errors.append(
            f"linear.val_fraction={lin.val_fraction} must be in (0, 1) to choose among "
            f"{len(lin.blr_grid)} learning rates (or set one with linear.blr=...)"
        )
    ft = cfg.finetune
    if ft.pool not in ("avg", "cls"):
        errors.append(f"finetune.pool={ft.pool!r}: valid values are avg (MAE global pool), cls")
    if ft.epochs < 1 or ft.batch_size < 1:
        errors.append("finetune.epochs and finetune.batch_size must be >= 1")
    if not 0 < ft.layer_decay <= 1:
        errors.append(f"finetune.layer_decay={ft.layer_decay} must be in (0, 1]")
    if not 0 <= ft.drop_path < 1:
        errors.append(f"finetune.drop_path={ft.drop_path} must be in [0, 1)")
    if not cfg.retrieval.ks or min(cfg.retrieval.ks) < 1:
        errors.append(f"retrieval.ks={list(cfg.retrieval.ks)} must be positive integers")
    if errors:
        raise EvalInputError(f"{where}: " + "; ".join(errors))


def section(cfg: DictConfig, name: str) -> dict[str, Any]:
    """A config section as a plain dict."""
    return OmegaConf.to_container(cfg[name], resolve=True)  # type: ignore[return-value]
