"""Build, once and ahead of time, the DeepSpeed ops that ``engine.name=deepspeed`` would otherwise compile
at the first run on this machine (``make install`` runs this).

DeepSpeed 0.19.8 installs from source without building any op. At ``deepspeed.initialize`` its
communication backend loads ``deepspeed_shm_comm`` (shared-memory collectives, used on CPU hosts), which
is JIT-compiled with the system's C++ compiler (~30-45 s on 2 cores) into the torch extensions cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions/py<ver>_<device>/``). Built here, every
later run only loads it. Our engine names no DeepSpeed optimizer (it keeps ``torch.optim.AdamW``), so
DeepSpeed's fused/CPU Adam ops are never built. On a CUDA machine DeepSpeed needs no op at start-up.

Usage: ``python -m pretrain.engines.deepspeed_ops`` (prints what it built and where; exit 0 when there is
nothing to build or DeepSpeed is not installed).
"""

from __future__ import annotations

import importlib.util
import sys
import time


def prebuild() -> list[str]:
    """Build the ops DeepSpeed loads at initialisation on this machine; return their names."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    built = []
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        t0 = time.perf_counter()
        builder.load()
        built.append(f"{builder.NAME} ({time.perf_counter() - t0:.0f} s)")
    return built


def main() -> int:
    if importlib.util.find_spec("deepspeed") is None:
        print("deepspeed_ops: DeepSpeed is not installed; nothing to build")
        return 0
    from torch.utils.cpp_extension import _get_build_directory

    built = prebuild()
    where = _get_build_directory("", verbose=False)
    print(f"deepspeed_ops: ready in {where}: {', '.join(built) if built else 'no op needed on this machine'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
