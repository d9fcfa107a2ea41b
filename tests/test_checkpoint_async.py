"""Asynchronous checkpoint saves in one process: training may change the weights while the background
thread writes, the checkpoint holds the state of its step, and it counts only once it is COMPLETE."""

from __future__ import annotations

import resource
import signal
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import CheckpointManager, CheckpointWriteError, SaveRecord, complete_steps
from pretrain.config import load_config
from pretrain.distributed import DistEnv
from pretrain.engines import build_engine
from pretrain.engines.base import Engine
from pretrain.methods import build_method
from tests.conftest import TINY_MAE

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _engine(seed: int, env: DistEnv = CPU) -> Engine:
    cfg = load_config(TINY_MAE, ["engine.name=single"], world_size=1)
    torch.manual_seed(seed)
    engine = build_engine(cfg, env)
    engine.setup(build_method(cfg))
    return engine


def _train_step(engine: Engine) -> None:
    """One optimizer step with arbitrary gradients: changes weights and AdamW moments in place."""
    for group in engine.optimizer.param_groups:
        group["lr"] = 1e-2  # the trainer's schedule sets it every step; the engine starts at 0
    for p in engine.model.parameters():
        p.grad = torch.randn_like(p)
    engine.step(max_norm=None)


def _snapshot(engine: Engine) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in engine.model.state_dict().items()}
    for i, st in enumerate(engine.optimizer.state.values()):
        out[f"optim.{i}.exp_avg"] = st["exp_avg"].clone()
    return out


def check_async_saves_hold_the_state_of_their_step(run_dir: Path, env: DistEnv) -> None:
    """Two background saves (the second reuses the staging buffers), training between and during them;
    each checkpoint, loaded into a fresh engine, equals the state at its step. Also used on CUDA."""
    engine = _engine(0, env)
    _train_step(engine)
    records: list[SaveRecord] = []
    manager = CheckpointManager(run_dir, env, keep_last=2, async_save=True)
    manager.on_complete = records.append
    try:
        for step in (1, 2):
            at_save = _snapshot(engine)
            path = manager.save(step, engine, {"data": {"batches_consumed": step}}, blocking=False)
            assert not (path / "COMPLETE").exists()  # not a checkpoint yet
            assert manager.latest() == (None if step == 1 else path.with_name("step_00000001"))
            for _ in range(3):  # training continues while the background thread writes
                _train_step(engine)
            now = _snapshot(engine)["model.encoder.cls_token"]
            assert not torch.equal(now, at_save["model.encoder.cls_token"])

            record = manager.finalize()
            assert record is not None and record.background and record.step == step
            assert records[-1] is record and 0 <= record.stall_s <= record.total_s
            assert manager.latest() == path and (path / "COMPLETE").is_file()

            fresh = _engine(1, env)
            _train_step(fresh)  # optimizer state must exist to be loaded into
            state = manager.load(path, fresh)
            assert state["step"] == step and state["data"] == {"batches_consumed": step}
            loaded = _snapshot(fresh)
            assert loaded.keys() == at_save.keys()
            for k in at_save:
                assert torch.equal(loaded[k], at_save[k]), (step, k)
    finally:
        manager.close()


def test_async_save_holds_the_state_of_its_step_while_training_goes_on(tmp_path: Path):
    check_async_saves_hold_the_state_of_their_step(tmp_path, CPU)


def test_next_save_completes_the_one_in_flight_and_close_completes_the_last(tmp_path: Path):
    engine = _engine(0)
    _train_step(engine)
    manager = CheckpointManager(tmp_path, CPU, keep_last=2, async_save=True)
    leftover = manager.ckpt_dir / ".deleting.step_00000000"  # a killed attempt's half-deleted prune
    (leftover / "sub").mkdir(parents=True)
    for step in (1, 2, 3):
        manager.save(step, engine, {}, blocking=False)
        assert complete_steps(manager.ckpt_dir) == list(range(max(1, step - 2), step))[-2:]
        _train_step(engine)
    manager.close()
    assert complete_steps(manager.ckpt_dir) == [2, 3]  # keep_last pruned step 1
    # pruned directories are renamed at once and deleted in the background; close() waits for that
    assert sorted(p.name for p in manager.ckpt_dir.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert manager.finalize() is None  # nothing left in flight


def test_blocking_save_is_complete_on_return(tmp_path: Path):
    engine = _engine(0)
    _train_step(engine)
    manager = CheckpointManager(tmp_path, CPU, keep_last=2, async_save=True)
    manager.save(1, engine, {}, blocking=False)
    path = manager.save(2, engine, {}, blocking=True)
    assert complete_steps(manager.ckpt_dir) == [1, 2] and manager.latest() == path
    assert not manager.writing()


@pytest.mark.parametrize("async_save", [False, True])
def test_resave_of_a_complete_step_is_a_no_op(tmp_path: Path, async_save: bool):
    engine = _engine(0)
    manager = CheckpointManager(tmp_path, CPU, keep_last=2, async_save=async_save)
    path = manager.save(5, engine, {}, blocking=not async_save)
    manager.close()
    marker = (path / "COMPLETE").read_text()
    assert manager.save(5, engine, {}, blocking=False) == path and not manager.writing()
    assert (path / "COMPLETE").read_text() == marker


def test_failed_background_write_raises_and_keeps_the_previous_checkpoint(tmp_path: Path):
    # A real I/O failure: the process may not write files over 256 KiB while the background write runs
    # (EFBIG; SIGXFSZ ignored so the write fails instead of killing the process).
    engine = _engine(0)
    _train_step(engine)
    manager = CheckpointManager(tmp_path, CPU, keep_last=2, async_save=True)
    good = manager.save(1, engine, {}, blocking=True)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, old_limit[1]))
    try:
        bad = manager.save(2, engine, {}, blocking=False)
        with pytest.raises(
            CheckpointWriteError,
            match=r"step_00000002: background checkpoint write failed on rank\(s\) \[0\]: .*GiB free there now",
        ):
            while manager.writing():
                time.sleep(0.01)
            manager.finalize()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert manager.latest() == good and not (bad / "COMPLETE").exists()
    assert not manager.writing() and manager.finalize() is None
    manager.save(3, engine, {}, blocking=True)  # the next save works and prunes the failed one
    assert complete_steps(manager.ckpt_dir) == [1, 3] and not bad.exists()
