"""``build_loader``: the one entry point the trainer uses to get batches.

Batch contract (both backends): each item is a dict

* ``images``: list with one float32 tensor ``[B, 3, S, S]`` per view (normalized with the view's
  mean/std; grey images become 3 channels);
* ``label``: int64 ``[B]`` (-1 where unknown);
* ``text``: int64 ``[B, context_length]`` caption tokens (only when ``LoaderConfig.text_key`` is set;
  CLIP's BPE, see :mod:`data_pipelines.tokenizer`);
* ``num_corrupt``: int, samples of this batch that were corrupt and replaced;
* ``keys``: list of ``"<shard>/<key>"`` strings (only when ``LoaderConfig.return_keys``).

``B`` is the per-rank micro-batch size; batches are always full. Images are on this rank's CUDA
device when CUDA is available (``wds``: the workers' uint8 pixels are copied there and normalized
on the GPU; ``dali``: when it runs on the GPU), else on the CPU. The stream is infinite and a pure
function of ``(seed, batch number, rank, world_size, num_workers, mix_shards)`` -- the same for the
``wds`` and ``dali`` backends: to resume, the trainer stores how many batches (micro-batches) this
rank has consumed and passes it as ``start_batch``. See :mod:`data_pipelines.wds` for the slot
design that makes this true (and the rule when the world size changes on resume),
:mod:`data_pipelines.dali` for the DALI graph.

Stop signals. ``scancel`` and SLURM's time limit send SIGTERM to every process of a job, and a
Ctrl-C sends SIGINT to the whole foreground process group: ``wds`` worker processes ignore SIGTERM,
SIGINT, SIGUSR1 and SIGUSR2, so only the training process decides what a stop means (save, then
exit); it stops the workers when it closes the loader (``close()`` on the returned iterator; a
worker that does not exit in time is killed with SIGKILL, which nothing can ignore). Workers also
exit on their own within seconds when the training process dies.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from data_pipelines.augment import ViewSpec, normalize_view
from data_pipelines.synthetic import synthetic_batches
from data_pipelines.wds import (
    DEFAULT_MIX_SHARDS,
    MAX_MIX_SHARDS,
    CorruptDataError,
    ShardSpecError,
    WdsBatches,
    resolve_shards,
)

__all__ = ["BACKENDS", "CorruptDataError", "LoaderConfig", "ShardSpecError", "build_loader"]

BACKENDS = ("wds", "dali", "synthetic")
DALI_DEVICES = ("auto", "cpu", "gpu")
WORKER_PRIORITIES = ("auto", "normal", "idle")


@dataclass
class LoaderConfig:
    """The ``data`` section of a training config.

    Attributes:
        backend: ``wds`` (PyTorch DataLoader over WebDataset shards, torchvision augmentation on
            the CPU), ``dali`` (the same stream, decoded and augmented by NVIDIA DALI: on the GPU
            when there is one, else with DALI's CPU operators) or ``synthetic`` (random images with
            the same contract, for benchmarks and equivalence tests; ``shards`` unused).
        shards: a directory with ``manifest.json`` written by ``data_pipelines.build_shards``
            (preferred), a directory of ``*.tar`` (e.g. img2dataset output), a glob
            (``data/*.tar``) or a brace pattern (``data/shard-{000000..000009}.tar``).
        num_workers: loader slots per rank: DataLoader worker processes with ``wds`` (0: load in
            the training process), slots played in turn with ``dali``. Part of the data order:
            changing it changes the stream.
        mix_shards: shards each loader slot reads at once (1 to 64, default 16): a slot takes its
            shards in a seeded order, in groups of ``mix_shards``, and reads the samples of a group
            in one seeded permutation of their union, so a batch draws from up to ``mix_shards``
            shards -- the random-access analogue of WebDataset's shuffle buffer across shards. With
            shards that each hold one class (built with ``--no-shuffle`` from an ImageFolder, or
            by another tool), a batch holds up to ``mix_shards`` classes. Costs: one open memory
            map per shard of the group, and a permutation of ``mix_shards x`` shard size integers
            (8 bytes each) per slot. Part of the data order: changing it changes the stream.
        prefetch_factor: batches prepared ahead by each worker (``wds``) or by DALI.
        max_corrupt_fraction: stop with ``CorruptDataError`` when more than this fraction of the
            samples a slot has read (after at least 100) were corrupt.
        return_keys: add the sample keys to each batch (tests, debugging).
        text_key: member extension of the captions (``txt``) to read and tokenize into
            ``batch["text"]``; empty: no captions. A sample without it counts as corrupt.
        context_length: tokens per caption (CLIP: 77).
        dali_device: ``auto`` (GPU when CUDA is available), ``cpu`` or ``gpu``.
        dali_threads: DALI CPU threads per rank.
        dali_hw_decoder_load: share of JPEGs sent to the GPU's hardware JPEG decoder (``mixed``
            decoding only); ``null`` keeps DALI's default.
        worker_priority: CPU scheduling of the ``wds`` worker processes: ``idle`` (Linux
            ``SCHED_IDLE``: they run only on cores the training process leaves idle), ``normal``,
            or ``auto``: ``idle`` when there is no GPU, ``normal`` otherwise. When the model trains
            on the CPU, workers at normal priority preempt its intra-op threads, and a parallel op
            waits for its slowest thread, so each millisecond a worker takes costs the step up to
            two; at idle priority they fill the gaps (Python between ops, the optimizer) instead.
            If the data-wait fraction grows, the gaps are too small: use ``normal``.
    """

    backend: str = "wds"
    shards: str = ""
    num_workers: int = 2
    mix_shards: int = DEFAULT_MIX_SHARDS
    prefetch_factor: int = 2
    max_corrupt_fraction: float = 0.01
    return_keys: bool = False
    text_key: str = ""
    context_length: int = 77
    dali_device: str = "auto"
    dali_threads: int = 2
    dali_hw_decoder_load: float | None = None
    worker_priority: str = "auto"

    def validate(self) -> None:
        """Check field values, raising ``ValueError`` naming the field and what is valid."""
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend {self.backend!r} is not available; valid: {', '.join(BACKENDS)}")
        if not self.shards and self.backend != "synthetic":
            raise ValueError("data.shards is empty: set it to a shard directory, glob or brace pattern")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 1 <= self.mix_shards <= MAX_MIX_SHARDS:
            raise ValueError(
                f"data.mix_shards must be between 1 and {MAX_MIX_SHARDS} (shards a loader slot reads at once), "
                f"got {self.mix_shards}"
            )
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if not 0.0 <= self.max_corrupt_fraction <= 1.0:
            raise ValueError(f"data.max_corrupt_fraction must be in [0, 1], got {self.max_corrupt_fraction}")
        if self.text_key and (not self.text_key.replace(".", "").replace("_", "").isalnum()):
            raise ValueError(f"data.text_key must be a member extension such as 'txt', got {self.text_key!r}")
        if self.context_length < 2:
            raise ValueError(f"data.context_length must be >= 2, got {self.context_length}")
        if self.dali_device not in DALI_DEVICES:
            raise ValueError(
                f"data.dali_device {self.dali_device!r} is not valid; choose one of {', '.join(DALI_DEVICES)}"
            )
        if self.dali_threads < 1:
            raise ValueError(f"data.dali_threads must be >= 1, got {self.dali_threads}")
        if self.dali_hw_decoder_load is not None and not 0.0 <= self.dali_hw_decoder_load <= 1.0:
            raise ValueError(f"data.dali_hw_decoder_load must be in [0, 1], got {self.dali_hw_decoder_load}")
        if self.worker_priority not in WORKER_PRIORITIES:
            raise ValueError(
                f"data.worker_priority {self.worker_priority!r} is not valid; "
                f"choose one of {', '.join(WORKER_PRIORITIES)}"
            )


def _as_config(cfg: LoaderConfig | Mapping[str, Any]) -> LoaderConfig:
    if isinstance(cfg, LoaderConfig):
        return cfg
    names = {f.name for f in fields(LoaderConfig)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; valid: {sorted(names)}")
    return LoaderConfig(**dict(cfg))


def build_loader(
    cfg: LoaderConfig | Mapping[str, Any],
    views: Sequence[ViewSpec],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int = 0,
) -> Iterator[dict[str, Any]]:
    """An infinite iterator of batches for one rank (see the module docstring for the contract).

    Args:
        cfg: the data config (a :class:`LoaderConfig` or a mapping of its fields).
        views: the views the method needs, in order.
        batch_size: samples per batch on this rank (per micro-batch).
        rank: this rank, 0 <= rank < world_size.
        world_size: number of ranks.
        seed: run seed.
        start_batch: number of the first batch to yield (batches already consumed by this rank).

    Returns:
        An infinite iterator (a generator) whose ``k``-th item is batch ``start_batch + k``;
        ``close()`` it to stop the worker processes early.

    Raises:
        ValueError: invalid config values or arguments.
        ShardSpecError: missing path, unreadable manifest, no shards, a shard whose size differs
            from the manifest, or fewer shards than ``world_size * num_workers``.
        DaliUnavailableError: ``backend=dali`` without DALI installed (or ``dali_device=gpu``
            without CUDA).
    """
    cfg = _as_config(cfg)
    cfg.validate()
    if not views:
        raise ValueError("build_loader needs at least one ViewSpec")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if cfg.backend == "synthetic":
        return synthetic_batches(
            views,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            start_batch=start_batch,
            context_length=cfg.context_length if cfg.text_key else 0,
        )
    shard_set = resolve_shards(cfg.shards)
    members = (shard_set.manifest or {}).get("members")
    if cfg.text_key and isinstance(members, list) and cfg.text_key not in members:
        raise ShardSpecError(
            f"data.text_key={cfg.text_key!r} but the shards of {shard_set.origin} hold only {', '.join(members)} "
            f"members: build them from a caption source (a folder of images with <name>.txt files, or a CSV of "
            f"path,caption) or unset data.text_key"
        )
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "rank": rank,
        "world_size": world_size,
        "num_workers": cfg.num_workers,
        "mix_shards": cfg.mix_shards,
        "seed": seed,
        "start_batch": start_batch,
        "max_corrupt_fraction": cfg.max_corrupt_fraction,
        "require_labels": shard_set.classes is not None,
        "text_key": cfg.text_key,
        "context_length": cfg.context_length,
        "return_keys": cfg.return_keys,
    }
    if cfg.backend == "dali":
        from data_pipelines.dali import DaliBatches

        dali = DaliBatches(
            shard_set,
            views,
            device=cfg.dali_device,
            num_threads=cfg.dali_threads,
            prefetch=cfg.prefetch_factor,
            hw_decoder_load=cfg.dali_hw_decoder_load,
            **common,
        )
        return iter(dali)
    dataset = WdsBatches(shard_set, views, **common)
    workers = cfg.num_workers
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        in_order=True,
        persistent_workers=workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=functools.partial(_init_worker, idle=_idle_workers(cfg.worker_priority)),
    )
    return _normalized(_batches(loader), views)


def _normalized(batches: Iterator[dict[str, Any]], views: Sequence[ViewSpec]) -> Iterator[dict[str, Any]]:
    """Turn the workers' uint8 views into the contract's float32 views, on the GPU when there is one.

    Workers ship uint8 (a quarter of the bytes through shared memory and, on a GPU node, over
    PCIe; a twelfth for grey images) and the normalization runs here, in one pass; labels and
    tokens arrive as NumPy arrays.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    try:
        for batch in batches:
            images = [x.to(device, non_blocking=True) if device is not None else x for x in batch["images"]]
            batch["images"] = [normalize_view(x, spec) for x, spec in zip(images, views, strict=True)]
            for key, value in batch.items():  # small tensors travel as NumPy arrays (WdsBatches.batch)
                if isinstance(value, np.ndarray):
                    batch[key] = torch.from_numpy(value)
            yield batch
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _idle_workers(priority: str) -> bool:
    if priority == "auto":
        return not torch.cuda.is_available()
    return priority == "idle"


# Signals a job's processes receive to stop: scancel / time limit (TERM), Ctrl-C (INT), the launcher's
# preemption and requeue signals (USR1, USR2). Only the training process acts on them.
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
_WORKER_EXIT_TIMEOUT_S = 5.0
_open_iterators: weakref.WeakSet[Any] = weakref.WeakSet()
_atexit_registered = False


def _init_worker(worker_id: int, *, idle: bool) -> None:
    """DataLoader ``worker_init_fn``: ignore the stop signals; optionally run at idle priority.

    The signals are blocked from before the fork (:func:`_start_workers`) until they are ignored
    here, so one that arrives while the worker starts is not fatal either.
    """
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)
    if idle and hasattr(os, "SCHED_IDLE"):  # run only on otherwise idle cores (Linux)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _start_workers(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)`` with the stop signals blocked while the worker processes are forked."""
    if loader.num_workers == 0:
        return iter(loader)
    _register_atexit()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
    try:
        it = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # pending ones are delivered here, to this process
    _open_iterators.add(it)
    return it


def _stop_workers(it: Any) -> None:
    """Shut down a multi-process iterator's workers; SIGKILL any that outlives the shutdown.

    PyTorch asks workers to exit, waits, then sends SIGTERM -- which our workers ignore -- so a
    worker stuck in a batch would outlive its loader without the SIGKILL.
    """
    shutdown = getattr(it, "_shutdown_workers", None)  # multi-process iterators only
    if shutdown is None:
        return
    workers = list(getattr(it, "_workers", []))
    shutdown()
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=_WORKER_EXIT_TIMEOUT_S)
    _open_iterators.discard(it)


def _stop_open_workers() -> None:
    for it in list(_open_iterators):
        _stop_workers(it)


def _register_atexit() -> None:
    """Stop the workers of loaders still open at interpreter exit, before ``multiprocessing`` does.

    ``multiprocessing`` ends daemonic children at exit with SIGTERM and then joins them without a
    timeout: with workers that ignore SIGTERM that would hang. atexit runs handlers last-registered
    first, and ``multiprocessing.util`` registered its handler on import, so this one runs before.
    """
    global _atexit_registered
    if not _atexit_registered:
        import multiprocessing.util  # noqa: F401  (its exit handler is registered before ours)

        atexit.register(_stop_open_workers)
        _atexit_registered = True


def _worker_message(exc: BaseException) -> str:
    """The message of an exception re-raised from a DataLoader worker, without the worker's traceback.

    PyTorch re-raises a worker's exception as ``Caught X in DataLoader worker process N.
    Original Traceback ...: X: message``; for a data problem the message is what the user needs.
    """
    text = str(exc)
    marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    at = text.rfind(marker)
    if not text.startswith("Caught ") or at < 0:
        return text
    return text[at + len(marker) :].strip()


def _batches(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """Iterate ``loader``; stop its worker processes as soon as iteration ends.

    Without this, an iterator whose worker raised (e.g. ``CorruptDataError``) sits in a reference
    cycle with the exception's traceback, and its workers linger until the garbage collector
    runs, then take seconds to be joined. A data error raised in a worker keeps its message, not
    the worker's traceback.
    """
    it = _start_workers(loader)
    try:
        yield from it
    except (CorruptDataError, ShardSpecError) as exc:
        message = _worker_message(exc)
        if message == str(exc):
            raise
        raise type(exc)(message) from None
    finally:
        _stop_workers(it)
