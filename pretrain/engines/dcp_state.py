"""Model and optimizer state I/O through torch.distributed.checkpoint (DCP): the single and FSDP2 engines.

Saves write DCP shards (``*.distcp``, ``.metadata``) into a step directory that
:class:`pretrain.checkpoint.CheckpointManager` owns; a load reshards to any world size. Saves can run in
the background (``async_save``): training stops only while the state is copied to host memory (pinned on
CUDA) and a thread writes the files over a gloo group of its own.

Nothing is ever unpickled without restriction: DCP's ``.metadata`` file is read with an unpickler that only
admits DCP's own metadata classes and torch sizes/dtypes; byte entries are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import logging
import pickle
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException  # stable since torch 2.2
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from pretrain.distributed import DistEnv
from pretrain.engines.state_io import CheckpointError

log = logging.getLogger(__name__)
# DCP warns on every single-process save/load; single-process is a supported mode here, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


# ---- safe loading ------------------------------------------------------------------------------
# Globals a DCP .metadata pickle legitimately references (checked against torch 2.11-2.14 output).
_ALLOWED_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "strided"),
    ("torch", "sparse_coo"),
    ("torch", "contiguous_format"),
    ("torch", "channels_last"),
    ("torch", "preserve_format"),
    ("torch.serialization", "_get_layout"),  # looks a torch.layout up by name
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "getattr"),
    ("enum", "Enum"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BufferedIOBase, source: str) -> None:
        super().__init__(f)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_ALLOWED_MODULE_PREFIXES) and not name.startswith("__"):
            return super().find_class(module, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.source}: refusing to unpickle '{module}.{name}': a checkpoint's metadata may only "
            "reference torch.distributed.checkpoint metadata classes, torch sizes and dtypes. "
            "This file was not written by this project (or was tampered with); it was not loaded."
        )


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata is read with a restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _RestrictedUnpickler(f, str(path)).load()
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{path}: unreadable checkpoint metadata: {e}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata (got {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters) are loaded with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"refusing to load entry '{read_item.dest_index.fqn}': not plain data ({e})"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _drop_state_never_saved(state: dict[str, Any], metadata: Metadata) -> None:
    """Remove from the load template the optimizer state of parameters the checkpoint has none for.

    AdamW creates a parameter's state at its first update. A parameter whose gradient a method cancels
    for a while (DINO's ``cancel_gradients_last_layer``, SwAV's frozen prototypes) has none in a
    checkpoint taken meanwhile, but DCP's load template (``get_state_dict``) has it for every trainable
    parameter: left there, the load fails with "Missing key"; zero-filled, the resumed run's first update
    of that parameter would differ (Adam's step count). Removed, the parameter starts fresh after the
    resume exactly as it would have without the interruption.
    """
    saved = metadata.state_dict_metadata
    optim_state = state["optim"]["state"]
    for fqn in list(optim_state):
        if not any(f"optim.state.{fqn}.{key}" in saved for key in optim_state[fqn]):
            del optim_state[fqn]


def _reusable_stager(device: torch.device) -> Any:
    """The manager's own stager: host buffers allocated at the first save and reused by the next ones.

    On CUDA the buffers are pinned and the copies non-blocking, synchronised before ``async_save``
    returns (``use_async_staging=False``), so the optimizer never changes a tensor mid-copy. ``None``
    (DCP's default copy per save) where this torch lacks the staging options.
    """
    cuda = device.type == "cuda"
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        options = StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=cuda,
        )
    except (ImportError, TypeError) as e:
        log.warning("checkpoint staging options unavailable (%s): DCP's default copy per save", e)
        return None
    return DefaultStager(options)


class DCPStateIO:
    """Reads and writes ``{"model": ..., "optim": ...}`` as DCP shards (the state an engine's
    ``state_dict`` gives: sharded DTensors under FSDP2, plain tensors in one process)."""

    def __init__(self, env: DistEnv, timeout_s: int) -> None:
        self.env, self.timeout_s = env, timeout_s
        self._group: dist.ProcessGroup | None = None
        self._stager: Any = None
        self._stager_ready = False

    def save(self, state: dict[str, Any], path: Path) -> None:
        dcp.save(state, checkpoint_id=path, no_dist=not self.env.distributed)

    def save_async(self, state: dict[str, Any], path: Path) -> Future:
        """Stage ``state`` to host memory and return the background write's future."""
        if not self._stager_ready:  # the first background save of the run, on every rank at once
            if self.env.distributed:
                # The writer thread's collectives must never interleave with the training loop's.
                self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
            self._stager = _reusable_stager(self.env.device)
            self._stager_ready = True
        kwargs: dict[str, Any] = {"process_group": self._group, "no_dist": not self.env.distributed}
        if self._stager is not None:
            kwargs["async_stager"] = self._stager
        future = dcp.async_save(state, checkpoint_id=path, **kwargs)
        if not isinstance(future, Future):  # AsyncSaveResponse (a stager with asynchronous staging)
            future.staging_completion.result()  # never let training change a tensor still being copied
            future = future.upload_completion
        return future

    def load(self, template: dict[str, Any], path: Path, apply: Callable[[dict[str, Any]], None]) -> None:
        """Fill ``template`` from ``path`` (any world size) and hand it to ``apply``."""
        reader = SafeFileSystemReader(path)
        try:
            _drop_state_never_saved(template, reader.read_metadata())
            dcp.load(
                template, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=not self.env.distributed
            )
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"{path}: cannot be loaded into this model: {e}") from None
        apply(template)

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        self._stager_ready = False
