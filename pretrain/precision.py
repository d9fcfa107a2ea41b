"""One precision policy for every engine: what runs in bf16 and what stays in float32.

Mixed precision as the strong stacks use it (torchtitan, DINOv2, OpenCLIP):

* **float32**: parameters as the optimizer sees them (master weights), optimizer state, gradient
  reductions across ranks, and the batch as it enters a method (engines never cast inputs: a
  target computed from the images, such as MAE's normalized pixels, is the same under every engine).
* **the compute dtype** (``train.precision``: ``auto`` = bf16 on CUDA, fp32 elsewhere): matrix
  multiplications, convolutions and attention, through ``torch.autocast`` in every engine (FSDP2
  additionally gathers its parameters in that dtype instead of float32, halving the traffic).
* **float32 inside the compute region**: what autocast itself keeps in float32 (softmax, log-softmax,
  layer norm, reductions such as sum and mean on CUDA), and every loss: methods compute their losses,
  temperatures, centers and other running statistics under :func:`full_precision` on float32 tensors
  (DINO's softmax at temperature 0.04 over 65,536 prototypes loses the distribution in bf16).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 elsewhere (CPU bf16 is slow and not what tests compare)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


@dataclass(frozen=True)
class PrecisionPolicy:
    """The policy of one run (see the module docstring).

    Attributes:
        compute_dtype: dtype of matmuls, convolutions and attention.
        device_type: ``cuda`` or ``cpu`` (autocast's device type).
    """

    compute_dtype: torch.dtype
    device_type: str

    @staticmethod
    def from_config(precision: str, device: torch.device) -> PrecisionPolicy:
        return PrecisionPolicy(resolve_precision(precision, device), device.type)

    @property
    def mixed(self) -> bool:
        """Whether anything runs below float32."""
        return self.compute_dtype != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """The compute region of a forward pass (a no-op in float32)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute_dtype)


def full_precision(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A float32 region inside a forward pass, for losses and running statistics.

    Use it with float32 tensors (``x.float()``): ``with full_precision(x): loss = ...``.
    """
    return torch.autocast(device_type=t.device.type, enabled=False)
