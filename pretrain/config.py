"""Typed configuration: dataclass schema under OmegaConf.

Layers, lowest to highest precedence: the dataclass defaults below, the recipe YAML
(``configs/<method>/<recipe>.yaml``; a recipe may start from another with ``base: other.yaml``, a path
relative to it, and change only what differs), then ``key=value`` overrides from the command line.
The ``method`` section is typed by the dataclass the method registered itself with, so every
key of every section is checked. Unknown keys are rejected naming the nearest valid key,
cross-field rules are checked in :func:`validate`, and the resolved config is written to the
run directory (``runs/<name>/config.yaml``) and compared on resume.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from data_pipelines.loader import LoaderConfig
from pretrain.fileio import atomic_write_text


class ConfigError(ValueError):
    """A configuration problem, with a message that names the file/key/value and what is valid."""


@dataclass
class RunConfig:
    name: str = ""  # run name: the run directory is <root>/<name>, stable across restarts
    root: str = "runs"
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise-reproducible CPU runs)


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16"  # a name from pretrain.models.list_vits()
    img_size: int = 224
    patch_size: int | None = None  # None: the registry's value for `name`
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    pos_embed: str = "learned"  # learned | sincos
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch_size / 256 (Goyal et al., 2017)
    lr: float | None = None  # absolute peak lr; overrides base_lr scaling when set
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine schedule of weight decay to this value (None: constant)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float | None = None  # max grad norm; None: no clipping
    clip_mode: str = (
        "global"  # global: one norm over all gradients | per_param: each gradient on its own (DINO)
    )


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in the whole run
    steps_per_epoch: int | None = (
        None  # for recipes written in epochs; None: manifest samples // global batch
    )
    global_batch_size: int = 256  # samples per optimizer step over all ranks and micro-batches
    accum_steps: int = 1  # gradient accumulation micro-batches per step
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    log_every: int = 50  # steps between log lines / TensorBoard points / non-finite checks
    ckpt_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_last: int = 2  # complete checkpoints kept (>= 2)
    async_checkpoint: bool = True  # periodic saves written in the background; training pauses to stage
    export_every: int = 0  # steps between backbone exports; 0: only at the end
    visualize_every: int = 0  # steps between the method's TensorBoard images (MAE: reconstructions); 0: off
    visualize_samples: int = 8  # images in the fixed visualisation batch
    compile: bool = False  # torch.compile each transformer block


@dataclass
class EngineConfig:
    """``engine``: the name and what every engine shares; each engine's own options are the section
    ``engine.<name>``, typed by the dataclass it registered (pretrain/engines/)."""

    name: str = "auto"  # auto (fsdp2 if several ranks else single) | single | fsdp2 | deepspeed
    timeout_s: int = 600  # collective timeout: a dead rank ends the job after this long


@dataclass
class ResumeConfig:
    allow_config_change: bool = False  # resume even if the run's saved config differs


@dataclass
class MetricsConfig:
    peak_tflops: float | None = None  # device peak for MFU; None: known GPUs only


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # typed at load time by the method's own config dataclass
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    init: Any = None  # {"from": PATH}: built in _schema_for ("from" is a Python keyword)


# The `init` section: `init.from=PATH` starts a new run from pretrained weights (pretrain/init_weights.py):
# an export of a run, a timm ViT checkpoint or the MAE authors' released format. Ignored on resume.
INIT_DEFAULTS: dict[str, Any] = {"from": ""}


# Keys that may differ between a run's saved config and a resume without changing the maths.
# Not train.steps: the lr / weight-decay schedules (and methods' own schedules) are functions of it,
# so raising it would re-plan every step not yet taken (see SCHEDULE_HORIZON_KEYS).
RESUME_SAFE_KEYS = frozenset(
    {
        "train.log_every",
        "train.ckpt_every",
        "train.keep_last",
        "train.async_checkpoint",
        "train.export_every",
        "train.visualize_every",
        "train.visualize_samples",
        "data.prefetch_factor",
        "data.shards",
        "data.dali_threads",
        "data.dali_hw_decoder_load",
        "data.worker_priority",
        "engine.timeout_s",
        "engine.fsdp2.reshard_after_forward",
        "resume.allow_config_change",
        "metrics.peak_tflops",
    }
)

# Keys whose change re-plans the schedules of the steps not yet taken; named in the refusal message.
SCHEDULE_HORIZON_KEYS = frozenset({"train.steps"})

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for k in node:
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                keys.extend(_all_keys(child, full + "."))
    return keys


def unknown_key_message(schema: DictConfig, bad_key: str, where: str) -> str:
    """``<where>: unknown key 'a.b'; did you mean 'a.c'? Valid keys here: ...`` for any OmegaConf schema."""
    valid = _all_keys(schema)
    prefix = bad_key.rsplit(".", 1)[0] + "." if "." in bad_key else ""
    siblings = [k for k in valid if k.startswith(prefix) and "." not in k[len(prefix) :]]
    close = difflib.get_close_matches(bad_key, siblings or valid, n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    listing = f" Valid keys here: {', '.join(sorted(siblings))}" if siblings else ""
    return f"{where}: unknown key '{bad_key}'{hint}{listing}"


def _nearest_key_error(schema: DictConfig, bad_key: str, where: str) -> ConfigError:
    return ConfigError(unknown_key_message(schema, bad_key, where))


def _schema_for(method_name: str | None) -> DictConfig:
    from pretrain.engines import ENGINE_OPTIONS  # late: engines import torch.distributed
    from pretrain.methods import method_config_class  # late: methods import models

    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema, False)
    schema.init = OmegaConf.create(dict(INIT_DEFAULTS))
    # engine.<name>: each registered engine's typed options, as fields of an EngineConfig subclass.
    sections = [(n, opts, field(default_factory=opts)) for n, opts in sorted(ENGINE_OPTIONS.items())]
    schema.engine = OmegaConf.structured(make_dataclass("EngineConfig", sections, bases=(EngineConfig,)))
    if method_name is not None:
        schema.method = OmegaConf.structured(method_config_class(method_name))
    OmegaConf.set_struct(schema, True)
    return schema


def _merge_layer(schema: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)  # type: ignore[return-value]
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e)
        raise _nearest_key_error(schema, str(key), where) from None
    except ValidationError as e:
        raise ConfigError(f"{where}: invalid value for '{e.full_key}': {e.msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {e}") from None


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """A recipe with its ``base:`` chain resolved: the base's keys, overridden by this file's."""
    layer = _read_yaml(path)
    base = layer.pop("base", None)
    if base is None:
        return layer
    base_path = (path.parent / str(base)).resolve()
    if base_path in (*chain, path.resolve()):
        raise ConfigError(
            f"{path}: 'base: {base}' makes a cycle ({' -> '.join(str(p) for p in (*chain, path))})"
        )
    try:
        return OmegaConf.merge(_read_recipe(base_path, (*chain, path.resolve())), layer)  # type: ignore[return-value]
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {base}: {e}") from None


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=100)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"command-line overrides: {e}") from None


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), world_size: int = 1
) -> DictConfig:
    """Build the resolved, validated config: schema defaults < YAML recipe < ``key=value`` overrides.

    Args:
        path: recipe YAML (None: defaults + overrides only).
        overrides: ``section.key=value`` strings.
        world_size: number of ranks the job will run on (for batch divisibility checks).

    Returns:
        A read-only ``DictConfig`` typed by :class:`Config` and the method's config class.

    Raises:
        ConfigError: naming the file/key/value and what would be valid.
    """
    yaml_layer = _read_recipe(Path(path)) if path is not None else OmegaConf.create({})
    cli_layer = _parse_overrides(list(overrides))
    method_name = OmegaConf.select(cli_layer, "method.name", default=None) or OmegaConf.select(
        yaml_layer, "method.name", default=None
    )
    if method_name is None:
        raise ConfigError(f"{path or 'config'}: 'method.name' is required (e.g. method.name=mae)")
    try:
        schema = _schema_for(str(method_name))
    except KeyError as e:
        raise ConfigError(f"{path or 'config'}: {e.args[0]}") from None
    cfg = _merge_layer(schema, yaml_layer, str(path) if path else "config")
    cfg = _merge_layer(cfg, cli_layer, "command-line overrides")
    validate(cfg, world_size=world_size)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _choice(errors: list[str], key: str, value: Any, valid: list[str] | tuple[str, ...]) -> bool:
    """Append an error unless ``value`` is one of ``valid``; the message names the nearest valid value."""
    if value in valid:
        return True
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1, cutoff=0.0)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    errors.append(f"{key}={value!r} is not valid{hint} Valid values: {', '.join(map(str, valid))}")
    return False


def _validate_model(model: DictConfig, errors: list[str]) -> None:
    """The ViT size after the registry's values are overridden: heads divide the width, patches the image."""
    from pretrain.models import list_vits, vit_architecture

    if not _choice(errors, "model.name", model.name, list_vits()):
        return
    _choice(errors, "model.pos_embed", model.pos_embed, ("learned", "sincos"))
    arch = vit_architecture(model.name)
    size = {
        k: (model[k] if model[k] is not None else arch.get(k))
        for k in ("patch_size", "embed_dim", "depth", "num_heads")
    }
    origin = {k: ("" if model[k] is not None else f" (the value of {model.name})") for k in size}
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if size[key] is None or size[key] < 1:
            errors.append(f"model.{key}={size[key]} must be >= 1")
            return
    if model.mlp_ratio is not None and model.mlp_ratio <= 0:
        errors.append(f"model.mlp_ratio={model.mlp_ratio} must be > 0")
    if model.img_size < 1 or model.img_size % size["patch_size"]:
        errors.append(
            f"model.img_size={model.img_size} must be a positive multiple of model.patch_size={size['patch_size']}"
            f"{origin['patch_size']}"
        )
    if size["embed_dim"] % size["num_heads"]:
        errors.append(
            f"model.num_heads={size['num_heads']}{origin['num_heads']} must divide model.embed_dim="
            f"{size['embed_dim']}{origin['embed_dim']}"
        )
    if model.pos_embed == "sincos" and size["embed_dim"] % 4:
        errors.append(f"model.pos_embed=sincos needs model.embed_dim divisible by 4, got {size['embed_dim']}")
    if not 0.0 <= model.drop_path_rate < 1.0:
        errors.append(f"model.drop_path_rate={model.drop_path_rate} must be in [0, 1)")


def _validate_data(data: DictConfig, errors: list[str]) -> None:
    from data_pipelines.loader import BACKENDS, DALI_DEVICES, WORKER_PRIORITIES

    ok = _choice(errors, "data.backend", data.backend, BACKENDS)
    ok &= _choice(errors, "data.dali_device", data.dali_device, DALI_DEVICES)
    ok &= _choice(errors, "data.worker_priority", data.worker_priority, WORKER_PRIORITIES)
    if ok:  # the loader's own rules (ranges, shard spec present, ...)
        try:
            LoaderConfig(**OmegaConf.to_container(data, resolve=True)).validate()  # type: ignore[arg-type]
        except ValueError as e:
            errors.append(str(e))


def _check_buildable(cfg: DictConfig, errors: list[str]) -> None:
    """Build the method on the meta device (no memory, ~50 ms for ViT-L): any rule the constructors
    enforce that the checks above missed is reported here, before anything is written."""
    import torch

    from pretrain.methods import build_method

    try:
        with torch.device("meta"):
            method = build_method(cfg)
            method.views()
            method.flops_per_sample()
    except (ValueError, TypeError, KeyError, AssertionError, RuntimeError) as e:
        errors.append(f"the model/method of this config cannot be built: {e}")


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Every rule a config must satisfy, checked before anything is written; raise :class:`ConfigError`.

    Keys with a finite set of values name the nearest valid value; cross-field rules name every key
    involved; finally the method is built on the meta device, so a config that passes here builds.
    """
    from pretrain.engines import validate_engine_config  # late: engines import torch.distributed

    errors: list[str] = []
    run, train, optim = cfg.run, cfg.train, cfg.optim
    if not run.name or not _RUN_NAME.match(run.name):
        errors.append(
            f"run.name={run.name!r}: give the run a name of letters, digits, '.', '_' or '-' "
            "(it names the run directory, stable across restarts)"
        )
    micro_total = world_size * train.accum_steps
    if train.accum_steps <= 0:
        errors.append(f"train.accum_steps={train.accum_steps} must be > 0")
    elif train.global_batch_size <= 0 or train.global_batch_size % micro_total:
        errors.append(
            f"train.global_batch_size={train.global_batch_size} must be a positive multiple of "
            f"world_size ({world_size}) x train.accum_steps ({train.accum_steps}) = {micro_total}"
        )
    if train.steps <= 0:
        errors.append(f"train.steps={train.steps} must be > 0")
    if optim.warmup_steps < 0:
        errors.append(f"optim.warmup_steps={optim.warmup_steps} must be >= 0")
    if train.keep_last < 2:
        errors.append(f"train.keep_last={train.keep_last} must be >= 2 (a kill mid-save must leave one)")
    for key in ("log_every", "ckpt_every"):
        if train[key] <= 0:
            errors.append(f"train.{key}={train[key]} must be > 0")
    if train.export_every < 0:
        errors.append(f"train.export_every={train.export_every} must be >= 0 (0: only at the end)")
    if train.visualize_every < 0:
        errors.append(f"train.visualize_every={train.visualize_every} must be >= 0 (0: off)")
    if train.visualize_samples < 1:
        errors.append(f"train.visualize_samples={train.visualize_samples} must be >= 1")
    _choice(errors, "train.precision", train.precision, ("auto", "bf16", "fp32"))
    validate_engine_config(cfg, world_size, errors)
    if cfg.engine.timeout_s <= 0:
        errors.append(f"engine.timeout_s={cfg.engine.timeout_s} must be > 0 (seconds)")
    if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
        errors.append(f"optim.betas={list(optim.betas)} must be two numbers in [0, 1)")
    if optim.clip_grad is not None and optim.clip_grad <= 0:
        errors.append(f"optim.clip_grad={optim.clip_grad} must be > 0 or null")
    _choice(errors, "optim.clip_mode", optim.clip_mode, ("global", "per_param"))
    if train.steps_per_epoch is not None and train.steps_per_epoch < 1:
        errors.append(f"train.steps_per_epoch={train.steps_per_epoch} must be >= 1 or null")
    _validate_model(cfg.model, errors)
    _validate_data(cfg.data, errors)
    init_from = cfg.init["from"]
    if not isinstance(init_from, str):
        errors.append(f"init.from={init_from!r} must be a path (an export directory or a weights file)")
    elif init_from:
        from pretrain.init_weights import resolve

        try:
            resolve(init_from)
        except ConfigError as e:
            errors.append(str(e))
    from pretrain.methods import method_config_class

    check = getattr(method_config_class(cfg.method.name), "validate", None)
    if check is not None:
        errors.extend(check(cfg))
    if not errors:
        _check_buildable(cfg, errors)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def micro_batch_size(cfg: DictConfig, world_size: int) -> int:
    """Samples per rank per micro-batch."""
    return cfg.train.global_batch_size // (world_size * cfg.train.accum_steps)


def peak_lr(cfg: DictConfig) -> float:
    """Absolute peak learning rate: ``optim.lr`` or ``base_lr * global_batch / 256``."""
    if cfg.optim.lr is not None:
        return float(cfg.optim.lr)
    return float(cfg.optim.base_lr) * cfg.train.global_batch_size / 256


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(node, dict | DictConfig):
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(node, list | ListConfig):
        out[prefix[:-1]] = list(node)
    else:
        out[prefix[:-1]] = node
    return out


def diff_configs(saved: DictConfig | dict, current: DictConfig | dict) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ: ``{key: (saved, current)}``."""
    a = _flatten(OmegaConf.to_container(saved, resolve=True) if isinstance(saved, DictConfig) else saved)
    b = _flatten(
        OmegaConf.to_container(current, resolve=True) if isinstance(current, DictConfig) else current
    )
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_run_config(cfg: DictConfig, run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """Compare ``cfg`` with the run's saved ``config.yaml`` (if any); write nothing.

    Returns:
        The changed keys, ``{key: (saved, now)}`` (empty for a new run or the same config).

    Raises:
        ConfigError: a change outside :data:`RESUME_SAFE_KEYS` without ``resume.allow_config_change``;
            the message lists every such key with both values.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return {}
    try:
        saved = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise ConfigError(
            f"{path}: the run's saved config is not readable YAML ({e}); it was not changed"
        ) from None
    changed = diff_configs(saved, cfg)
    conflicts = {k: v for k, v in changed.items() if k not in RESUME_SAFE_KEYS}
    if conflicts and not cfg.resume.allow_config_change:
        lines = "\n".join(f"  {k}: saved {a!r} -> now {b!r}" for k, (a, b) in conflicts.items())
        why = ""
        if SCHEDULE_HORIZON_KEYS & set(conflicts):
            why = (
                "\ntrain.steps is the horizon of the lr and weight-decay schedules (and of a method's own "
                "schedules): changing it re-plans every step not yet taken (the steps already taken keep "
                "theirs). To extend or shorten the run that way, pass resume.allow_config_change=true."
            )
        raise ConfigError(
            f"{path}: this run was started with a different config; resuming with these changes "
            f"would not continue the same run:\n{lines}{why}\n"
            "Use the saved values, pick a new run.name, or pass resume.allow_config_change=true."
        )
    return changed


def write_run_config(cfg: DictConfig, run_dir: Path, resuming_step: int | None) -> None:
    """Write ``config.yaml`` (first start) or replace it after an allowed change, keeping the old one.

    The previous config is kept as ``config.before_step_<N>.yaml``, so nothing written is lost.
    Call :func:`check_run_config` first; this writes whatever it is given.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    text = to_yaml(cfg)
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        return
    if path.read_text() == text:
        return
    step = resuming_step if resuming_step is not None else 0
    backup = run_dir / f"config.before_step_{step:08d}.yaml"
    if not backup.exists():
        atomic_write_text(backup, path.read_text())
    atomic_write_text(path, text)


def write_or_check_run_config(cfg: DictConfig, run_dir: Path, resuming_step: int | None) -> None:
    """:func:`check_run_config`, then :func:`write_run_config`."""
    if check_run_config(cfg, run_dir) or not (Path(run_dir) / "config.yaml").exists():
        write_run_config(cfg, run_dir, resuming_step)
