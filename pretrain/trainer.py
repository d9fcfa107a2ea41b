"""The training loop: the only one in the code base.

Step-based; gradient accumulation; optional clipping; per-step lr/weight-decay schedules;
non-finite losses detected on the device and agreed across ranks on log steps and before every
save; stop requests (preemption) agreed at step boundaries through a CPU all-reduce; periodic
checkpoints and exports. Apart from log steps nothing on the hot path waits for the device.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pretrain import preemption
from pretrain.checkpoint import CheckpointManager, SaveRecord
from pretrain.config import micro_batch_size, peak_lr
from pretrain.distributed import DistEnv, agree_each, all_reduce_mean
from pretrain.engines.base import Engine
from pretrain.methods.context import Collectives, RunInfo, StepContext
from pretrain.metrics import MetricsWriter, device_peak_flops, format_line, peak_memory_gib
from pretrain.randomness import BatchRandom, derive_seed
from pretrain.schedules import cosine, warmup_cosine

log = logging.getLogger("pretrain")

_NO_BAD_STEP = 2**62


class NonFiniteLossError(RuntimeError):
    """Raised on every rank at the same step when any rank saw a non-finite loss or gradient."""


@dataclass
class TrainResult:
    step: int  # last completed optimizer step
    finished: bool  # reached train.steps
    stopped: bool  # a stop request was honoured (checkpoint saved at `step`)


class Trainer:
    def __init__(
        self,
        cfg: Any,
        env: DistEnv,
        engine: Engine,
        loader: Iterator[dict[str, Any]],
        checkpoints: CheckpointManager,
        writer: MetricsWriter,
        run_info: RunInfo,
        visual_batch: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.env, self.engine, self.loader = cfg, env, engine, loader
        self.visual_batch = _to_device(visual_batch, env.device) if visual_batch is not None else None
        self.checkpoints, self.writer = checkpoints, writer
        self.method = engine.method
        self.model = engine.model
        self.device = env.device
        t = cfg.train
        self.total_steps, self.accum = int(t.steps), int(t.accum_steps)
        self.micro_bs = micro_batch_size(cfg, env.world_size)
        self.global_bs = int(t.global_batch_size)
        self.peak_lr = peak_lr(cfg)
        self.flops_per_sample = float(self.method.flops_per_sample())
        self.peak_flops = device_peak_flops(self.device, cfg.metrics.peak_tflops)
        self._first_bad = torch.full((), _NO_BAD_STEP, dtype=torch.long, device=self.device)
        self.step = 0  # optimizer steps completed (the loop's position, for error messages)
        self.run_info = run_info
        self.collectives = Collectives(env.world_size)
        checkpoints.on_complete = self._on_checkpoint

    # ---- schedules ---------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return warmup_cosine(step, self.total_steps, int(o.warmup_steps), self.peak_lr, float(o.min_lr))

    def weight_decay_at(self, step: int) -> float:
        o = self.cfg.optim
        if o.weight_decay_end is None:
            return float(o.weight_decay)
        return cosine(step, self.total_steps, float(o.weight_decay), float(o.weight_decay_end))

    def _apply_schedules(self, step: int) -> tuple[float, float]:
        lr, wd = self.lr_at(step), self.weight_decay_at(step)
        scales = self.method.group_scales(step) or self.engine.static_scales
        groups = self.engine.optimizer.param_groups
        if len(scales) != len(groups):
            raise RuntimeError(
                f"{type(self.method).__name__}.group_scales gave {len(scales)} pairs for {len(groups)} groups"
            )
        for group, (lr_scale, wd_scale) in zip(groups, scales):
            group["lr"] = lr * lr_scale
            group["weight_decay"] = wd * wd_scale
        return lr, wd

    def context(self, step: int, micro: int, rng: BatchRandom) -> StepContext:
        """What the method sees of micro-batch ``micro`` of ``step``."""
        return StepContext(step, micro, self.accum, rng, self.run_info, self.collectives, self.engine)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, start_step: int) -> TrainResult:
        cfg, env = self.cfg, self.env
        step = self.step = start_step
        interval = _Interval()
        last_grad_norm = torch.zeros((), device=self.device)
        lr = wd = 0.0
        self.model.train()
        while step < self.total_steps:
            lr, wd = self._apply_schedules(step)
            # Other stochastic layers (drop path) draw from the global generator: a function of the step.
            torch.manual_seed(derive_seed(cfg.run.seed, step, env.rank, 1))
            for micro in range(self.accum):
                t0 = time.perf_counter()
                try:
                    batch = next(self.loader)
                except Exception:
                    # The job stops on a data error: keep what this interval counted (no collective here).
                    self.writer.scalars(step, {"data/corrupt": float(interval.corrupt)})
                    raise
                interval.data_wait += time.perf_counter() - t0
                interval.corrupt += int(batch.get("num_corrupt", 0))
                batch = _to_device(batch, self.device)
                offset = (micro * env.world_size + env.rank) * self.micro_bs
                ctx = self.context(
                    step, micro, BatchRandom(cfg.run.seed, step, offset, self.global_bs, self.device)
                )
                self.engine.set_grad_sync(micro == self.accum - 1)
                with self.engine.autocast():
                    out = self.model(batch, ctx)
                loss = out["loss"]
                self.engine.backward(loss / self.accum)
                interval.add(out)
            last_grad_norm = self.engine.step(
                cfg.optim.clip_grad,
                cfg.optim.clip_mode,
                functools.partial(self.method.before_optimizer_step, ctx),
            )
            self.method.after_optimizer_step(ctx)
            bad = ~torch.isfinite(interval.loss_sum) | ~torch.isfinite(
                last_grad_norm
            )  # NaN is sticky in the sum
            self._first_bad = torch.where(bad & (self._first_bad == _NO_BAD_STEP), step, self._first_bad)
            step += 1
            self.step = step
            interval.steps += 1

            # One CPU all-reduce per step: any rank asked to stop? is any rank still writing a checkpoint?
            stop, writing = agree_each(env, [preemption.stop_requested(), self.checkpoints.writing()])
            if not writing:
                self.checkpoints.finalize()  # no-op unless a background save just finished everywhere
            if step % cfg.train.log_every == 0 or step == self.total_steps or stop:
                self._check_finite()
                self._log(step, interval, lr, wd, last_grad_norm)
                interval = _Interval()
            last = step == self.total_steps
            if stop or last or step % cfg.train.ckpt_every == 0:
                self._check_finite()
                # The process exits after a stop or the last step: those saves are written before returning.
                self.checkpoints.save(step, self.engine, self._trainer_state(step), blocking=stop or last)
            if self.visual_batch is not None and step % cfg.train.visualize_every == 0:
                self._visualize(step)
            export_every = cfg.train.export_every
            if step == self.total_steps or (export_every and step % export_every == 0):
                self._check_finite()  # an export is never written from non-finite weights
                self.checkpoints.export(step, self.engine, {"run": cfg.run.name})
            if stop:
                self.writer.event("stopped", step=step, reason=preemption.stop_reason())
                log.warning(
                    "stop requested (%s): checkpoint saved at step %d", preemption.stop_reason(), step
                )
                return TrainResult(step=step, finished=False, stopped=True)
        return TrainResult(step=step, finished=True, stopped=False)

    # ---- helpers -------------------------------------------------------------------------------
    def _visualize(self, step: int) -> None:
        """The method's images of the fixed batch (same masks every time: a fixed seed), on every rank."""
        assert self.visual_batch is not None
        n = self.visual_batch["images"][0].shape[0]
        ctx = self.context(step, 0, BatchRandom(self.cfg.run.seed, -1, 0, n, self.device))
        self.model.eval()
        with torch.no_grad(), self.engine.autocast():
            images = self.engine.visualize(self.visual_batch, ctx)
        self.model.train()
        if self.env.is_main:
            self.writer.images(step, {k: v.detach().float().cpu() for k, v in images.items()})

    def _on_checkpoint(self, record: SaveRecord) -> None:
        self.writer.event(
            "checkpoint",
            step=record.step,
            stall_s=round(record.stall_s, 4),
            total_s=round(record.total_s, 4),
            background=record.background,
        )
        self.writer.scalars(
            record.step, {"checkpoint/stall_s": record.stall_s, "checkpoint/total_s": record.total_s}
        )

    def _trainer_state(self, step: int) -> dict[str, Any]:
        return {
            "samples_seen": step * self.global_bs,
            "data": {
                "batches_consumed": step * self.accum,  # the loader position: a function of the step
                "world_size": self.env.world_size,
                "num_workers": int(self.cfg.data.num_workers),
                "mix_shards": int(self.cfg.data.mix_shards),
                "seed": int(self.cfg.run.seed),
            },
        }

    def _check_finite(self) -> None:
        first_bad = self._first_bad.clone()
        if self.env.distributed:
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
        bad_step = int(first_bad.item())
        if bad_step == _NO_BAD_STEP:
            return
        # A save still in flight was checked before it started, so it predates the bad step: complete it.
        self.checkpoints.finalize()
        latest = self.checkpoints.latest()
        where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
        raise NonFiniteLossError(
            f"non-finite loss or gradient norm at step {bad_step} (on at least one rank; all ranks stop "
            f"together). Nothing after it was saved; {where}. Restarting the same command resumes from "
            "there: consider a lower optim.lr / base_lr, optim.clip_grad, or train.precision=fp32."
        )

    def _log(self, step: int, iv: _Interval, lr: float, wd: float, grad_norm: torch.Tensor) -> None:
        loss_mean = iv.loss_sum / max(iv.micro_batches, 1)
        extra_keys = sorted(iv.extra)
        corrupt = torch.tensor(float(iv.corrupt), device=loss_mean.device)
        reduced = all_reduce_mean(
            [loss_mean, grad_norm, corrupt, *[iv.extra[k] / iv.micro_batches for k in extra_keys]], self.env
        )
        elapsed = time.perf_counter() - iv.t0
        images = iv.steps * self.global_bs
        values: dict[str, float] = {
            "train/loss": float(reduced[0]),
            "train/lr": lr,
            "train/weight_decay": wd,
            "train/grad_norm": float(reduced[1]),
            "perf/images_per_s": images / elapsed,
            "perf/step_time_s": elapsed / max(iv.steps, 1),
            "perf/data_wait_frac": iv.data_wait / elapsed,
            "perf/memory_gib": peak_memory_gib(self.device),
            "perf/flops_per_s": self.flops_per_sample * images / elapsed,
            "data/corrupt": round(float(reduced[2]) * self.env.world_size),  # summed over ranks
            "perf/eta_s": (self.total_steps - step) * elapsed / max(iv.steps, 1),
        }
        if self.peak_flops:
            values["perf/mfu"] = values["perf/flops_per_s"] / (self.peak_flops * self.env.world_size)
        for k, v in zip(extra_keys, reduced[3:]):
            values[f"train/{k}"] = float(v)
        if self.env.is_main:
            log.info(format_line(step, self.total_steps, values))
        self.writer.scalars(step, values)


class _Interval:
    """Running sums between two log steps, kept on the device (no host sync per step)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0
        self.micro_batches = 0
        self.data_wait = 0.0
        self.corrupt = 0
        self.loss_sum = torch.zeros(())
        self.extra: dict[str, torch.Tensor] = {}

    def add(self, out: dict[str, Any]) -> None:
        device = out["loss"].device
        self.loss_sum = self.loss_sum.to(device) + out["loss"].detach().float()
        self.micro_batches += 1
        for k, v in out.items():  # tensors stay on the device; floats (a schedule's value) become tensors
            if k != "loss":
                value = (
                    v.detach().float()
                    if isinstance(v, torch.Tensor)
                    else torch.tensor(float(v), device=device)
                )
                self.extra[k] = self.extra.get(k, 0.0) + value


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=non_blocking)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=non_blocking) for t in v]
        else:
            out[k] = v
    return out
