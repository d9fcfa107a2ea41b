"""Training metrics: TensorBoard scalars, a JSON-lines log, one readable line per interval, and MFU.

MFU = achieved model FLOP/s / (device peak x ranks). Model FLOPs come from the method's
``flops_per_sample()`` (2 FLOPs per multiply-add, training = 3x forward, recomputation not counted).
The peak is known for common GPUs or given by ``metrics.peak_tflops``; on a CPU without one MFU
is not reported rather than guessed.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("pretrain")

# Dense bf16 peak (TFLOP/s) by device-name substring, from the vendors' data sheets.
_PEAK_BF16_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("V100", 125.0),  # fp16 tensor cores
]


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak dense FLOP/s of ``device`` in the training precision, or None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory (CUDA) or the process's peak RSS (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsWriter:
    """Rank-0 sink for scalars: TensorBoard under ``run/tb``, ``run/metrics.jsonl`` and the log."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.jsonl = run_dir / "metrics.jsonl"
        self.tb = None
        self._image_thread: ThreadPoolExecutor | None = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a killed attempt wrote after the checkpoint we resume from:
            # those of steps > start_step (the points of start_step itself were logged before its save).
            self.tb = SummaryWriter(
                log_dir=str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None
            )

    def event(self, kind: str, **fields: Any) -> None:
        """A non-scalar record (start, resume, checkpoint, stop) in metrics.jsonl."""
        if self.enabled:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        assert self.tb is not None
        for k, v in values.items():
            if v is not None and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    def images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        """Write ``{tag: float [N, C, H, W] in [0, 1] (CPU)}`` to TensorBoard off the calling thread
        (PNG encoding takes milliseconds per image; the training loop does not wait for it)."""
        if not self.enabled or not images:
            return
        if self._image_thread is None:
            self._image_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tb-images")
        tb = self.tb
        assert tb is not None

        def write() -> None:
            for tag, value in images.items():
                tb.add_images(tag, value, step, dataformats="NCHW")
            tb.flush()

        self._image_thread.submit(write)

    def close(self) -> None:
        if self._image_thread is not None:
            self._image_thread.shutdown(wait=True)
            self._image_thread = None
        if self.tb is not None:
            self.tb.close()


def format_line(step: int, total: int, v: dict[str, float]) -> str:
    """The per-interval log line: progress, loss, lr, grad norm, throughput, MFU, data wait, memory."""
    parts = [f"step {step}/{total}", f"loss {v['train/loss']:.4f}", f"lr {v['train/lr']:.3e}"]
    if "train/grad_norm" in v:
        parts.append(f"gnorm {v['train/grad_norm']:.3f}")
    parts.append(f"{v['perf/images_per_s']:.1f} img/s")
    if "perf/mfu" in v:
        parts.append(f"MFU {100 * v['perf/mfu']:.1f}%")
    parts.append(f"data-wait {100 * v['perf/data_wait_frac']:.0f}%")
    parts.append(f"mem {v['perf/memory_gib']:.2f}GiB")
    if v.get("data/corrupt", 0):
        parts.append(f"corrupt {int(v['data/corrupt'])}")
    eta = v.get("perf/eta_s")
    if eta is not None:
        parts.append(f"eta {_fmt_duration(eta)}")
    return " | ".join(parts)


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
