"""Stop requests: a signal handler only sets a flag; ranks agree on it at the next step boundary.

Never run collectives or I/O inside a signal handler (a sharded save there deadlocks): the trainer polls
:func:`stop_requested` once per step, all ranks agree through a CPU all-reduce, then all save
together and return.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_STOP = threading.Event()
_REASON: list[str] = []


def request_stop(reason: str) -> None:
    if not _STOP.is_set():
        _REASON.append(reason)
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def stop_reason() -> str:
    return _REASON[0] if _REASON else ""


def clear() -> None:
    _STOP.clear()
    _REASON.clear()


def install_handlers(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
    """Make ``signals`` request a checkpoint-and-stop at the next step (main thread only)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        request_stop(signal.Signals(signum).name)

    for s in signals:
        signal.signal(s, handler)
