"""Distributed environment: read it (torchrun or submitit), build the process groups, agree on flags.

The environment comes from the usual variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), which torchrun sets and which the SLURM launcher exports from
submitit's ``TorchDistributedEnvironment`` before calling the trainer. With none of them the job
is a single process and no process group is created.

Besides the main group (NCCL on GPUs, gloo on CPU) a small gloo group carries the control plane:
agreeing on "stop now" (preemption) at a step boundary costs a CPU all-reduce, never a GPU sync.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def world_size_from_env() -> int:
    """World size the job will have, read before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_s: int = 600, require_group: bool = False) -> DistEnv:
    """Initialise the default process group from the environment (idempotent).

    Args:
        timeout_s: collective timeout; a dead or stalled rank ends the job after this long instead of
            the default 30 minutes.
        require_group: create a one-rank group in-process when started without a launcher (an engine
            such as FSDP2 needs one even on a single device).
    """
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)
    launched = world > 1 or "MASTER_ADDR" in os.environ
    if not launched and not require_group:
        return env
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Without a launcher there is no rendezvous address: a one-rank group needs only a local store.
        store = {} if launched else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
            **store,
        )
    env.control_group = (
        dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        if dist.get_backend() != "gloo"
        else dist.group.WORLD
    )
    return env


def agree_each(env: DistEnv, flags: list[bool]) -> list[bool]:
    """Per position: true on every rank if that flag is true on any rank (one CPU all-reduce)."""
    if not env.distributed:
        return list(flags)
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control_group)
    return [bool(v) for v in t.tolist()]


def all_reduce_mean(tensors: list[torch.Tensor], env: DistEnv) -> list[torch.Tensor]:
    """Average scalar device tensors over ranks in one collective (used on log steps only)."""
    if not tensors:
        return []
    stacked = torch.stack([t.detach().float().reshape(()) for t in tensors])
    if env.distributed:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= env.world_size
    return list(stacked.unbind())


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier(group=env.control_group)


def shutdown() -> None:
    """Destroy every process group (all ranks, once the run is over)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a training process with ``code`` once its work is done: flush, then skip interpreter teardown.

    ``destroy_process_group`` cannot free a group that DTensor still references (FSDP2's device mesh
    stays cached after the model is gone), so its communication threads (seen for gloo) are still
    running when Python tears down modules and libtorch runs its static destructors. That teardown can abort a process
    whose run finished cleanly (``terminate called without an active exception``, SIGABRT, exit -6),
    which torchrun and SLURM report as a failed job. Everything the run owns (checkpoints, metrics,
    TensorBoard files, loader workers) is closed before this is called; only the logs and standard
    streams are left to flush.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken pipe: nothing more to write
            stream.flush()
    os._exit(code)


def exit_process_at_exit(code: int = 0) -> None:
    """Make the interpreter's exit end in :func:`exit_process` (for code that runs inside a host
    such as submitit, which still has to write its result after our function returns)."""
    atexit.register(exit_process, code)
