"""What the benchmark scripts share: the repository root, a child-process environment, and one real
training run (``pretrain.train`` as users start it) whose ``metrics.jsonl`` records come back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH`` (an inherited entry,
    such as wheels installed with ``--target``, is kept) and the hub offline."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", **extra)


def train_records(config: str, overrides: list[str], run_root: Path, name: str, nproc: int = 1) -> list[dict]:
    """Run ``pretrain.train`` (under torchrun when ``nproc > 1``) into ``run_root/name``; return its
    metrics.jsonl records. Exits with the run's output tail if it fails."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd = [*launcher, "-m", "pretrain.train", "--config", config]
    cmd += [f"run.root={run_root}", f"run.name={name}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(x) for x in (run_root / name / "metrics.jsonl").read_text().splitlines()]
