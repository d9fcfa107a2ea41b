"""DeepSpeed ZeRO engine (Rajbhandari et al., *ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models*, SC 2020): stage 1 partitions the optimizer state over the ranks, stage 2 also the
gradients, stage 3 also the parameters; ``offload_*`` moves them to host memory (ZeRO-Offload).

Same maths as the FSDP2 engine, because every DeepSpeed default that changes results is set from our
config: the optimizer is the same ``torch.optim.AdamW`` over the method's parameter groups (lr and weight
decay set every step by the trainer's schedules); gradient clipping is ``optim.clip_grad`` (DeepSpeed
0.19.8 clips at 1.0 unless told otherwise); the trainer owns gradient accumulation
(``managed_gradient_accumulation: false``: the loss is divided once, by the trainer, and DeepSpeed reduces
at the trainer's optimizer step; under ZeRO-2/3 gradients are reduce-scattered into partitions after every
micro-batch, which is how those stages save memory); the gradient norm handed back is DeepSpeed's global
norm before clipping, so the trainer's non-finite check stays on although ``p.grad`` is empty under ZeRO-2/3.
Under ZeRO-3 the parameters that a method reads outside its own module's forward (a ViT's position
embedding and class token read by MAE's ``embed_patches``, CLIP's logit scale) are registered with the
root, so they are gathered for the whole step.

Checkpoints are DeepSpeed's own files, written into the step directory that
:class:`pretrain.checkpoint.CheckpointManager` owns (it never lets DeepSpeed write ``latest``); they are
read back with ``torch.load(weights_only=True)`` and an allow-list of DeepSpeed's plain-data classes, never
an unrestricted unpickler. Exports are taken from the fp32 master weights.

Known limits (refused by :meth:`DeepSpeedEngine.validate_config` with a message, not silently different):
``optim.clip_mode=per_param`` and methods that change gradients between backward and the update
(``before_optimizer_step``, e.g. DINO's last-layer freeze) need the gradients of each parameter, which the
ZeRO optimizers keep inside their flat partitions until their own ``step``; a checkpoint resumes on the
number of ranks that wrote it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.engines import register_engine
from pretrain.engines.base import Engine
from pretrain.engines.state_io import CheckpointError
from pretrain.methods.base import Method

# The model-state files of a DeepSpeed 0.19.8 checkpoint: ``mp_rank_00_model_states.pt`` under ZeRO-1/2,
# one ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` per rank under ZeRO-3.
MODEL_STATES = "*model_states.pt"


@dataclass
class DeepSpeedOptions:
    """``engine.deepspeed``: options of the DeepSpeed ZeRO engine."""

    zero_stage: int = 2  # 1: optimizer state partitioned | 2: + gradients | 3: + parameters
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and update in host memory
    offload_param: bool = False  # ZeRO-3 only: parameters in host memory between uses
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction bucket (DeepSpeed's default)
    overlap_comm: bool = False  # overlap gradient reduction with backward (more memory for buckets)


def _deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


@register_engine("deepspeed", DeepSpeedOptions)
class DeepSpeedEngine(Engine):
    saves_in_background = False  # DeepSpeed writes its files synchronously (the manager waits)
    state_format = "deepspeed"

    @classmethod
    def needs_process_group(cls, world_size: int) -> bool:
        return True  # deepspeed.initialize needs torch.distributed, even on one rank

    @classmethod
    def validate_config(cls, cfg: Any, world_size: int, errors: list[str]) -> None:
        opts = cfg.engine.deepspeed
        if opts.zero_stage not in (1, 2, 3):
            errors.append(
                f"engine.deepspeed.zero_stage={opts.zero_stage} is not valid: 1 (optimizer state partitioned), "
                "2 (+ gradients) or 3 (+ parameters). Stage 0 is plain data parallelism: use engine.name=fsdp2."
            )
        if opts.offload_param and opts.zero_stage != 3:
            errors.append(
                f"engine.deepspeed.offload_param=true needs engine.deepspeed.zero_stage=3 (got {opts.zero_stage})"
            )
        if opts.reduce_bucket_size <= 0:
            errors.append(f"engine.deepspeed.reduce_bucket_size={opts.reduce_bucket_size} must be > 0")
        if cfg.optim.clip_mode != "global":
            errors.append(
                f"optim.clip_mode={cfg.optim.clip_mode} is not supported by engine.name=deepspeed: its ZeRO "
                "optimizer clips by the global norm inside its own step. Use optim.clip_mode=global, or "
                "engine.name=fsdp2 for per-parameter clipping."
            )
        method = _method_class(cfg)
        if method is not None and method.before_optimizer_step is not Method.before_optimizer_step:
            errors.append(
                f"method.name={cfg.method.name} changes gradients between backward and the update "
                f"({method.__name__}.before_optimizer_step), which engine.name=deepspeed cannot offer: its "
                "ZeRO optimizer keeps gradients in flat partitions until its own step. Use engine.name=fsdp2."
            )
        if not _deepspeed_installed():
            errors.append("engine.name=deepspeed: DeepSpeed is not installed (pip install deepspeed==0.19.8)")

    # ---- set-up ------------------------------------------------------------------------------
    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed config this run uses: every default that changes results is set explicitly."""
        cfg, opts = self.cfg, self.cfg.engine.deepspeed
        accum = int(cfg.train.accum_steps)
        micro = int(cfg.train.global_batch_size) // (self.env.world_size * accum)
        zero: dict[str, Any] = {
            "stage": int(opts.zero_stage),
            "contiguous_gradients": True,
            "overlap_comm": bool(opts.overlap_comm),
            "reduce_bucket_size": int(opts.reduce_bucket_size),
            "allgather_bucket_size": int(opts.reduce_bucket_size),
        }
        if opts.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        if opts.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        clip = cfg.optim.clip_grad
        return {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum,
            "managed_gradient_accumulation": False,  # the trainer divides the loss and owns the boundary
            "gradient_clipping": float(clip) if clip is not None else 0.0,  # 0.19.8's default is 1.0
            "zero_optimization": zero,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "fp16": {"enabled": False},
            "zero_allow_untested_optimizer": True,  # torch.optim.AdamW, the optimizer every engine uses
            "zero_force_ds_cpu_optimizer": False,  # keep that AdamW under offload too (same maths)
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }

    def setup(self, method: Method) -> None:
        import deepspeed

        self.method = method
        if self.cfg.train.compile:
            for unit in method.shard_units():
                unit.compile()
        method.to(self.device)
        groups = method.param_groups(self.cfg.optim.weight_decay)
        self.static_scales = [(float(g.get("lr_scale", 1.0)), float(g.get("wd_scale", 1.0))) for g in groups]
        optimizer = torch.optim.AdamW(
            groups,
            lr=0.0,  # set every step by the trainer's schedule
            betas=tuple(self.cfg.optim.betas),
            eps=self.cfg.optim.eps,
            foreach=True,
        )
        self.zero_stage = int(self.cfg.engine.deepspeed.zero_stage)
        # DeepSpeed insists on LOCAL_RANK, which a one-process run without a launcher does not set.
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))
        with _quiet_deepspeed():
            ds_engine, ds_optimizer, _, _ = deepspeed.initialize(
                model=method, optimizer=optimizer, config=self.deepspeed_config(), dist_init_required=False
            )
        self.model = ds_engine
        self.optimizer = ds_optimizer  # its param_groups are AdamW's: the trainer's schedules reach them
        self.shared_params = _params_outside_leaf_modules(method)
        if self.zero_stage == 3:
            for p in self.shared_params:
                deepspeed.zero.register_external_parameter(method, p)
        ds_engine.checkpoint_engine = _safe_checkpoint_engine()

    def wrap(self, method: Method) -> nn.Module:
        raise NotImplementedError("DeepSpeedEngine.setup wraps the method itself")

    # ---- step ------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the trainer already divided by the micro-batches

    def step(
        self, max_norm: float | None, clip_mode: str = "global", before_update: Any = None
    ) -> torch.Tensor:
        """DeepSpeed's step: reduce (stages 1), clip at ``optim.clip_grad`` (set at initialisation), update.

        ``before_update`` is the method's default no-op (:meth:`validate_config` refused the others).
        Returns DeepSpeed's global gradient norm before clipping.
        """
        if max_norm != (self.cfg.optim.clip_grad) or clip_mode != "global":
            raise ValueError(
                "DeepSpeedEngine clips at optim.clip_grad, by the global norm, set at initialisation"
            )
        self.model.step()
        norm = self.model.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed gave no gradient norm for this step")
        return torch.as_tensor(norm, dtype=torch.float32, device=self.device)

    def params_with_grad(self) -> Any:
        raise NotImplementedError("under ZeRO the gradients live in DeepSpeed's partitions")

    def visualize(self, batch: dict[str, Any], ctx: Any) -> dict[str, torch.Tensor]:
        """The method's images; under ZeRO-3 the root-level parameters are gathered (no forward hook runs)."""
        import deepspeed

        gathered = (
            deepspeed.zero.GatheredParameters(self.shared_params)
            if self.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gathered:
            return self.method.visualize(batch, ctx)

    # ---- parameter operations methods ask for ------------------------------------------------
    def ema_(self, targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
        """EMA on each rank's partition under ZeRO-3 (teacher and student are partitioned alike: the same
        shapes), on the full parameters under ZeRO-1/2 (every rank holds them after the step)."""
        from pretrain.methods.context import ema_update_

        def local(p: torch.Tensor) -> torch.Tensor:
            return p.ds_tensor if hasattr(p, "ds_tensor") else p.data

        ema_update_([local(x) for x in targets], [local(x) for x in sources], momentum)

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("DeepSpeed checkpoints are written by save_state, in DeepSpeed's format")

    def save_state(self, path: Path) -> None:
        """DeepSpeed's own files into ``path`` (the manager's step directory); ``latest`` is not touched."""
        with _quiet_deepspeed():
            self.model.save_checkpoint(str(path.parent), tag=path.name, client_state={}, save_latest=False)

    def save_state_async(self, path: Path) -> Any:
        raise NotImplementedError("DeepSpeed checkpoints are written synchronously")

    def load_state(self, path: Path, saved_world_size: int) -> None:
        if not any(path.glob(MODEL_STATES)):
            raise CheckpointError(f"{path}: not a DeepSpeed checkpoint (no {MODEL_STATES} file)")
        if saved_world_size != self.env.world_size:
            raise CheckpointError(
                f"{path}: written by DeepSpeed on {saved_world_size} rank(s), resumed on {self.env.world_size}: "
                "its ZeRO partitions are per rank. Resume on "
                f"{saved_world_size} rank(s), or start a new run from the export with "
                "init.from=<run>/exports/latest (weights only)."
            )
        try:
            with _quiet_deepspeed():
                loaded, _ = self.model.load_checkpoint(
                    str(path.parent),
                    tag=path.name,
                    load_module_strict=True,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                )
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be loaded into this model: {e}") from None
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed found no checkpoint there")

    def close_state_io(self) -> None:
        pass

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded fp32 state on CPU on rank 0 (empty elsewhere), from the fp32 master weights where
        the optimizer holds them; a collective under ZeRO-3."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        keep = set(self.method.state_dict().keys())  # parameters and persistent buffers
        out: dict[str, torch.Tensor] = {}
        for name, p in self.method.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:  # no master copy (an EMA teacher): the parameter itself, gathered
                gathered = (
                    deepspeed.zero.GatheredParameters([p])
                    if hasattr(p, "ds_id")
                    else contextlib.nullcontext()
                )
                with gathered:
                    full = p.data.detach().float().clone()
            if self.env.is_main:
                out[name] = full.detach().float().cpu().clone()
        if self.env.is_main:
            for name, b in self.method.named_buffers():
                if name in keep:
                    out[name] = b.detach().cpu().clone()
        return out


def _method_class(cfg: Any) -> type[Method] | None:
    from pretrain.methods import method_class

    try:
        return method_class(str(cfg.method.name))
    except KeyError:  # reported by the method's own validation
        return None


def _params_outside_leaf_modules(method: nn.Module) -> list[nn.Parameter]:
    """Parameters held directly by modules that have children (a ViT's ``cls_token`` and ``pos_embed``,
    MAE's ``mask_token``, CLIP's ``logit_scale``): methods read them outside that module's ``forward``
    (e.g. ``vit.embed_patches``), where ZeRO-3's per-module hooks would not gather them."""
    found: list[nn.Parameter] = []
    for module in method.modules():
        if any(True for _ in module.children()):
            found.extend(module.parameters(recurse=False))
    return found


@contextlib.contextmanager
def _quiet_deepspeed() -> Any:
    """DeepSpeed logs every checkpoint file at INFO on every rank: keep our log readable."""
    import logging

    logger = logging.getLogger("DeepSpeed")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _safe_checkpoint_engine() -> Any:
    """DeepSpeed's torch checkpoint engine, reading with ``torch.load(weights_only=True)``.

    DeepSpeed 0.19.8 loads its files with ``weights_only=False`` (any pickle runs). Here only tensors,
    containers and primitives load, plus the few plain-data classes DeepSpeed stores (allow-listed by
    name); anything else is refused with the file name and nothing in it runs.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            try:
                with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:
                raise CheckpointError(
                    f"{path}: refusing to load: not plain data ({str(e).splitlines()[0]}). This file was not "
                    "written by this project's DeepSpeed engine (or was tampered with); nothing in it ran."
                ) from None

    return SafeTorchCheckpointEngine()


def _deepspeed_safe_globals() -> list[Any]:
    """Plain-data classes DeepSpeed 0.19.8 pickles into its checkpoints (checked by the tests)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]
