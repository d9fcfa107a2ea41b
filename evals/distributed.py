"""Process group and collectives of evaluation jobs (torchrun-style environment).

Evaluations run single-process, or as ``torchrun --nproc_per_node N -m evals.run ...`` (also inside a
SLURM task, where the launcher exports the same ``RANK``/``WORLD_SIZE``/``MASTER_*`` variables). Each
rank extracts the features of the samples ``i % world_size == rank``; :func:`gather_by_index` puts every
rank's rows back in global sample order, so every downstream number equals the single-process one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from evals.errors import EvalInputError


@dataclass
class DistEnv:
    """Where this process sits.

    Attributes:
        rank: global rank.
        world_size: number of ranks.
        local_rank: rank on this node (selects the GPU).
        device: the device this rank computes on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes results."""
        return self.rank == 0


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` (this rank's GPU) or ``cuda:N``.

    Raises:
        EvalInputError: CUDA requested but not available, or an unknown device string.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EvalInputError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
        return torch.device(spec if ":" in spec else f"cuda:{local_rank}")
    if spec == "cpu":
        return torch.device("cpu")
    raise EvalInputError(f"--device {spec!r}: valid values are auto, cpu, cuda, cuda:N")


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group described by the environment (``WORLD_SIZE > 1``), else run alone.

    Args:
        device: device spec (see :func:`resolve_device`).
        timeout_s: collective timeout.

    Returns:
        The environment; NCCL on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown(env: DistEnv) -> None:
    """Leave the process group."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(env: DistEnv, obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device(env: DistEnv) -> torch.device:
    return env.device if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_by_index(
    env: DistEnv, local: dict[str, torch.Tensor], indices: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gather every rank's rows and sort them by global sample index.

    Args:
        env: the distributed environment.
        local: name -> tensor ``[n_local, ...]`` (same names, trailing shapes and dtypes on every rank).
        indices: int64 ``[n_local]`` global sample indices of the rows.

    Returns:
        name -> ``[N, ...]`` on CPU, rows in ascending index order (``"indices"`` included), on every rank.
    """
    if not env.distributed:
        order = torch.argsort(indices)
        out = {k: v[order].cpu() for k, v in local.items()}
        out["indices"] = indices[order].cpu()
        return out
    dev = _comm_device(env)
    n_local = torch.tensor([indices.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n_local) for _ in range(env.world_size)]
    dist.all_gather(sizes, n_local)
    counts = [int(s.item()) for s in sizes]
    width = max(counts)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in {**local, "indices": indices}.items():
        padded = torch.zeros((width, *tensor.shape[1:]), dtype=tensor.dtype, device=dev)
        padded[: tensor.shape[0]] = tensor.to(dev)
        parts = [torch.empty_like(padded) for _ in range(env.world_size)]
        dist.all_gather(parts, padded)
        out[name] = torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()
    order = torch.argsort(out["indices"])
    return {k: v[order] for k, v in out.items()}
