"""The run's checkpoint bookkeeping around the engine's state I/O, and backbone exports.

Layout under ``runs/<name>/``::

    checkpoints/step_00001000/   the engine's files (DCP shards for single/FSDP2, DeepSpeed's own files),
                                 trainer_state.json, COMPLETE (last)
    checkpoints/latest -> step_00001000   moved only after COMPLETE is durable
    exports/step_00001000/       backbone.safetensors (+ a method's other files), backbone.json, COMPLETE
                                 (see pretrain/export.py)

This module owns what is the same for every engine: step directories, ``trainer_state.json``,
``COMPLETE`` written last, ``latest``, keep-last-k with background deletion, and the export. Reading and
writing the model and optimizer state belongs to the engine (:meth:`Engine.save_state`,
:meth:`Engine.load_state`; DCP in ``pretrain/engines/dcp_state.py``).

A checkpoint directory without ``COMPLETE`` does not exist for resume or evals. Pruned checkpoints are
renamed ``.deleting.step_N`` (atomic) and deleted by a background thread.

Saves can be asynchronous (``train.async_checkpoint``) where the engine can write in the background
(DCP): training stops only while the state is staged, and ``COMPLETE`` / ``latest`` are written when every
rank's write has finished. At most one save is in flight: the next save, a stop request and the end of the
run wait for it first.

Nothing is ever unpickled without restriction (each engine's reader says how); trainer state is JSON,
exports are safetensors.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException  # stable since torch 2.2

from pretrain.distributed import DistEnv, barrier
from pretrain.engines.base import Engine
from pretrain.engines.state_io import CheckpointError
from pretrain.export import BACKBONE_STEM, COMPLETE, STEP_DIR, as_bundle, publish_export, step_dir_name
from pretrain.fileio import atomic_symlink, atomic_write_text

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointWriteError", "SaveRecord", "complete_steps"]

log = logging.getLogger(__name__)

_RETIRED = ".deleting."  # prefix of a pruned directory being deleted in the background
# COMPLETE, STEP_DIR and step_dir_name come from pretrain.export: one pattern for checkpoints, exports
# and the evaluations that read them.


class CheckpointWriteError(RuntimeError):
    """A save that failed while writing (disk full, I/O error): the run stops, earlier checkpoints stay."""


def complete_steps(parent: Path) -> list[int]:
    """Steps of the directories under ``parent`` that carry a COMPLETE marker, ascending."""
    if not parent.is_dir():
        return []
    steps = []
    for child in parent.iterdir():
        m = STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / COMPLETE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


# ---- the manager -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SaveRecord:
    """What one finished save cost: ``stall_s`` is the time training was stopped for it."""

    step: int
    path: Path
    stall_s: float
    total_s: float
    background: bool


@dataclass
class _PendingSave:
    step: int
    path: Path
    future: Future
    trainer_state: dict[str, Any]
    t0: float
    stall_s: float


def _failure_summary(e: BaseException) -> str:
    """' on rank(s) [..]: <last line of the cause>' for DCP's multi-rank exceptions (their text holds tracebacks)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    ranks = getattr(e, "failures", None)
    where = f" on rank(s) {sorted(ranks)}" if isinstance(ranks, dict) and ranks else ""
    return f"{where}: {lines[-1] if lines else type(e).__name__}"


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path.parent).free / 2**30:.1f} GiB free there now"
    except OSError:
        return "free space unknown"


class CheckpointManager:
    """Save, find, load and prune checkpoints of one run; export backbones for evals.

    Every method is called on all ranks (saves and loads are collectives); only rank 0 touches
    markers, pointers and deletions. With ``async_save`` a periodic save returns once the state is
    staged in host memory; the trainer calls :meth:`finalize` when the ranks agree that the write is
    done (:meth:`writing` is each rank's local view), and blocking saves wait for it first.
    """

    def __init__(
        self,
        run_dir: Path,
        env: DistEnv,
        keep_last: int = 2,
        async_save: bool = False,
    ) -> None:
        if keep_last < 2:
            raise ValueError(f"keep_last={keep_last} must be >= 2")
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.export_dir = self.run_dir / "exports"
        self.env, self.keep_last = env, keep_last
        self.async_save = async_save
        self.on_complete: Callable[[SaveRecord], None] | None = None
        self._pending: _PendingSave | None = None
        self._engines: list[Engine] = []  # whose state I/O to close at the end
        self._deleter: ThreadPoolExecutor | None = None  # rank 0 deletes pruned checkpoints here

    def latest(self) -> Path | None:
        """The newest COMPLETE checkpoint (scanned, so a stale ``latest`` pointer cannot mislead)."""
        steps = complete_steps(self.ckpt_dir)
        return self.ckpt_dir / step_dir_name(steps[-1]) if steps else None

    def incomplete_after(self, step: int) -> list[Path]:
        """Step directories newer than ``step`` without COMPLETE: interrupted saves, ignored on resume."""
        if not self.ckpt_dir.is_dir():
            return []
        found = []
        for child in sorted(self.ckpt_dir.iterdir()):
            m = STEP_DIR.match(child.name)
            if m and int(m.group(1)) > step and child.is_dir() and not (child / COMPLETE).is_file():
                found.append(child)
        return found

    def save(self, step: int, engine: Engine, trainer_state: dict[str, Any], blocking: bool = True) -> Path:
        """Save model, optimizer and trainer state at ``step`` (collective); return the directory.

        ``blocking=False`` (with ``async_save``) returns after staging; the checkpoint becomes COMPLETE
        at a later :meth:`finalize`. A save still in flight is finished first either way.
        """
        final = self.ckpt_dir / step_dir_name(step)
        if (final / COMPLETE).is_file():
            return final
        trainer_state = dict(trainer_state, state_format=engine.state_format)  # checked by load
        t0 = time.perf_counter()  # waiting for the previous save is part of this one's pause
        self.finalize()  # at most one save in flight
        if self.env.is_main:
            if final.exists():  # a partial save from a killed attempt
                shutil.rmtree(final)
            final.mkdir(parents=True)
        barrier(self.env)
        if engine not in self._engines:
            self._engines.append(engine)
        if blocking or not self.async_save or not engine.saves_in_background:
            engine.save_state(final)
            barrier(self.env)
            self._mark_complete(step, final, trainer_state, t0, time.perf_counter() - t0, background=False)
            barrier(self.env)
            return final
        future = engine.save_state_async(final)
        stall = time.perf_counter() - t0
        self._pending = _PendingSave(step, final, future, dict(trainer_state), t0, stall)
        return final

    def writing(self) -> bool:
        """True while this rank's background write is still running."""
        return self._pending is not None and not self._pending.future.done()

    def finalize(self, wait: bool = True) -> SaveRecord | None:
        """Mark the in-flight save COMPLETE once its write is done (call on all ranks at the same step).

        Blocks until this rank's write is done (``wait=False``: only if it is done already). A failed
        write raises :class:`CheckpointWriteError` on every rank (DCP reports a failure on any rank to
        all of them); its directory stays incomplete.
        """
        pending = self._pending
        if pending is None or (not wait and not pending.future.done()):
            return None
        self._pending = None
        try:
            pending.future.result()
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            log.debug("background checkpoint write failed", exc_info=e)
            latest = self.latest()
            kept = f"the previous checkpoint {latest} is intact" if latest else "no earlier checkpoint exists"
            raise CheckpointWriteError(
                f"{pending.path}: background checkpoint write failed{_failure_summary(e)}; it is not a "
                f"checkpoint ({COMPLETE} was not written) and {kept}. Check the disk ({_free_space(pending.path)}"
                "; quota), then run the same command again to resume."
            ) from None
        return self._mark_complete(
            pending.step, pending.path, pending.trainer_state, pending.t0, pending.stall_s, background=True
        )

    def close(self, wait: bool = True) -> None:
        """At exit: complete a save still in flight; free the staging buffers.

        ``wait=False`` (unwinding an error, when a peer may be gone): complete it only if its write has
        already finished, never block. Errors are logged, not raised: this runs during cleanup.
        """
        pending = self._pending
        try:
            self.finalize(wait=wait)
        except CheckpointWriteError as e:
            if wait or pending is None:
                log.error("%s", e)
            else:  # the run is already ending on another error: say what became of this save, briefly
                cause = (
                    "a collective of the write timed out" if "timed out" in str(e).lower() else "see the log"
                )
                log.warning(
                    "checkpoint %s was not completed (its background write failed too: %s); the restart "
                    "resumes from %s",
                    pending.path,
                    cause,
                    self.latest(),
                )
        except Exception as e:
            log.error("%s", e)
        if self._pending is not None:
            log.warning(
                "checkpoint %s was still being written when the run ended: it is not COMPLETE; the restart "
                "resumes from %s",
                self._pending.path,
                self.latest(),
            )
            self._pending = None
        for engine in self._engines:
            engine.close_state_io()
        self._engines.clear()
        if self._deleter is not None:  # let pruned directories finish disappearing
            self._deleter.shutdown(wait=True)
            self._deleter = None

    def _mark_complete(
        self,
        step: int,
        final: Path,
        trainer_state: dict[str, Any],
        t0: float,
        paused_s: float,
        background: bool,
    ) -> SaveRecord:
        """Rank 0 writes trainer state, COMPLETE and ``latest``, then prunes; returns what the save cost.

        This runs on the training thread, so its time is added to the pause ``paused_s`` so far.
        """
        t_mark = time.perf_counter()
        if self.env.is_main:
            state = dict(trainer_state, step=step, world_size=self.env.world_size)
            atomic_write_text(final / "trainer_state.json", json.dumps(state, indent=2))
            marker = {"step": step, "time": time.time(), "world_size": self.env.world_size}
            atomic_write_text(final / COMPLETE, json.dumps(marker))
            atomic_symlink(final.name, self.ckpt_dir / "latest")
            self._prune(self.ckpt_dir, self.keep_last)
        now = time.perf_counter()
        record = SaveRecord(step, final, paused_s + now - t_mark, now - t0, background)
        if background:
            log.info(
                "saved checkpoint %s: training paused %.2fs for it; written in the background, complete "
                "%.1fs after the start",
                record.path,
                record.stall_s,
                record.total_s,
            )
        else:
            log.info("saved checkpoint %s in %.1fs", record.path, record.total_s)
        if self.on_complete is not None:
            self.on_complete(record)
        return record

    def load(self, path: Path, engine: Engine) -> dict[str, Any]:
        """Load ``path`` into ``engine`` (any world size); return the trainer state saved with it."""
        path = Path(path)
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"{path}: no {COMPLETE} marker: an interrupted save, not a checkpoint")
        try:
            trainer_state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}/trainer_state.json: unreadable ({e})") from None
        saved_format = trainer_state.get("state_format", "dcp")  # checkpoints from before engines had one
        if saved_format != engine.state_format:
            raise CheckpointError(
                f"{path}: its model/optimizer state is in {saved_format!r} format, but this run's engine "
                f"({type(engine).__name__}) reads {engine.state_format!r}. Resume with the engine that wrote it "
                "(the run's config.yaml names it), or start a new run from its export with "
                "init.from=<run>/exports/latest (weights only)."
            )
        engine.load_state(path, saved_world_size=int(trainer_state.get("world_size", self.env.world_size)))
        return trainer_state

    def export(self, step: int, engine: Engine, extra_meta: dict[str, Any]) -> Path | None:
        """Write the eval export of ``step`` (collective; rank 0 writes) through the one export writer.

        The method's :meth:`~pretrain.methods.base.Method.export_backbone` gives the tensor files (the
        backbone with timm names, and e.g. CLIP's text tower) and the JSON; :func:`pretrain.export.publish_export`
        writes them atomically with ``COMPLETE`` last and moves ``exports/latest``.
        """
        full = engine.full_model_state_dict()
        out = self.export_dir / step_dir_name(step)
        if self.env.is_main:
            bundle = as_bundle(engine.method.export_backbone(full))
            meta = {
                **bundle.meta,
                **extra_meta,
                "step": step,
                "format": "safetensors",
                "tensors": len(bundle.files[BACKBONE_STEM]),
            }
            publish_export(self.export_dir, step, type(bundle)(bundle.files, meta))
        barrier(self.env)
        return out if self.env.is_main else None

    def _prune(self, parent: Path, keep: int) -> None:
        """Retire complete checkpoints beyond ``keep`` and partial saves older than the newest one."""
        steps = complete_steps(parent)
        if not steps:
            return
        newest = steps[-1]
        for s in steps[:-keep]:
            self._retire(parent / step_dir_name(s))
        for child in parent.iterdir():
            m = STEP_DIR.match(child.name)
            if m and int(m.group(1)) < newest and not (child / COMPLETE).is_file():
                self._retire(child)
            elif child.name.startswith(_RETIRED) and child.is_dir():  # left by a killed attempt
                self._delete_later(child)

    def _retire(self, path: Path) -> None:
        """Take ``path`` out of the run at once (an atomic rename), delete it off the training thread.

        Deleting gigabytes takes seconds; a rename never leaves a half-deleted directory that still
        looks like a checkpoint, even if the process is killed mid-delete.
        """
        retired = path.with_name(_RETIRED + path.name)
        if retired.exists():
            shutil.rmtree(retired, ignore_errors=True)
        try:
            path.rename(retired)
        except OSError as e:
            log.warning("could not retire %s (%s); leaving it", path, e)
            return
        self._delete_later(retired)

    def _delete_later(self, path: Path) -> None:
        if self._deleter is None:
            self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-delete")
        self._deleter.submit(shutil.rmtree, path, ignore_errors=True)
