"""Record the system files a test's child processes read (see ``tests/system_reads.py``).

The suite puts this directory first on ``PYTHONPATH`` of every process it starts (training ranks,
shard builds, SLURM jobs), so Python imports it at start-up. Self-contained on purpose: it imports
nothing from the project, and does nothing unless ``SSL_SYSTEM_READS_DIR`` is set.
"""

import os
import sys

_DIR = os.environ.get("SSL_SYSTEM_READS_DIR")
_PREFIXES = tuple(p for p in os.environ.get("SSL_SYSTEM_READS_PREFIXES", "").split(os.pathsep) if p)
_EXCLUDE = tuple(p for p in os.environ.get("SSL_SYSTEM_READS_EXCLUDE", "").split(os.pathsep) if p)

if _DIR and _PREFIXES:
    _seen: set = set()
    _busy = [False]

    def _record(event: str, args: tuple) -> None:
        if event not in ("open", "os.listdir", "os.scandir") or _busy[0] or not args:
            return
        path = args[0]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        elif hasattr(path, "__fspath__"):
            path = os.fspath(path)
        if not isinstance(path, str) or not path.startswith(_PREFIXES) or path.startswith(_EXCLUDE):
            return
        if path in _seen:
            return
        _seen.add(path)
        _busy[0] = True
        try:  # one line per new path, written at once: training processes end with os._exit
            with open(os.path.join(_DIR, f"reads.{os.getpid()}"), "a", encoding="utf-8") as f:
                f.write(path + "\n")
        except OSError:
            pass
        finally:
            _busy[0] = False

    sys.addaudithook(_record)
