"""``launch/slurm.py --local``: the same job as N processes on this machine, without SLURM.

Every process runs ``python -m pretrain.train`` with the environment contract torchrun and the
SLURM launcher use (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``), so the run is the one a SLURM job with the same world size trains (bit for bit on
CPU with ``run.deterministic=true``) and writes the same run directory.

Ctrl-C / SIGTERM are forwarded to every rank as SIGTERM: the ranks agree to stop at the next step,
save, and exit 3; run the same command to continue. A second Ctrl-C kills them. When one rank
fails, the others are killed at once instead of waiting for the collective timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of rank ``rank`` of a ``world_size``-process job on this machine."""
    env = dict(os.environ if base is None else base)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if "OMP_NUM_THREADS" not in env:  # as torchrun: do not oversubscribe the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world_size))
    return env


def combine_exit_codes(codes: list[int]) -> int:
    """One exit code for the job: 0 all finished, 2 bad input, 3 stopped with a checkpoint, else 1."""
    if all(c == EXIT_OK for c in codes):
        return EXIT_OK
    if EXIT_BAD_INPUT in codes:
        return EXIT_BAD_INPUT
    if all(c in (EXIT_OK, EXIT_STOPPED) for c in codes):
        return EXIT_STOPPED
    return EXIT_FAILED


def run_local(config_path: str, overrides: list[str], nproc: int, python: str = sys.executable) -> int:
    """Train ``config_path`` + ``overrides`` as ``nproc`` ranks here; return the job's exit code."""
    port = free_port()
    cmd = [python, "-m", "pretrain.train", "--config", str(config_path), *overrides]
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        # Own process group per rank: signals reach the rank and its data-loader workers, not us.
        procs.append(subprocess.Popen(cmd, env=rank_env(rank, nproc, port), start_new_session=True))

    interrupts = 0

    def forward(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print(
                f"[launch.local] {signal.Signals(signum).name}: asking every rank to save and stop "
                "(again to kill)",
                file=sys.stderr,
                flush=True,
            )
            _signal_all(procs, signal.SIGTERM, group=False)
        else:
            _signal_all(procs, signal.SIGKILL, group=True)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes: list[int | None] = [None] * nproc
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is None and p.poll() is not None:
                    codes[i] = p.returncode
                    if p.returncode not in (EXIT_OK, EXIT_STOPPED):
                        # The others would block in a collective until engine.timeout_s: end them now.
                        print(
                            f"[launch.local] rank {i} exited with {p.returncode}: stopping the other ranks",
                            file=sys.stderr,
                            flush=True,
                        )
                        _signal_all(procs, signal.SIGKILL, group=True)
            time.sleep(0.1)
        for p in procs:  # reap the data-loader workers of killed ranks too
            _killpg(p.pid, signal.SIGKILL)
        final = [int(c) if c is not None and c >= 0 else EXIT_FAILED for c in codes]
        return combine_exit_codes(final)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _signal_all(procs: list[subprocess.Popen], sig: int, group: bool) -> None:
    for p in procs:
        if group:
            _killpg(p.pid, sig)
        elif p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
