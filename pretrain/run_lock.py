"""One trainer per run directory: ``runs/<name>/owner.json``.

Two trainers writing the same run would interleave checkpoints, exports and metrics (seen: the same
``--local`` command started twice wrote one run's files from two processes). Rank 0 of a run takes
the directory before anything is written and gives it back when the run ends:

* **Taking it** is an exclusive create (``O_CREAT | O_EXCL``) of ``owner.json`` holding the owner's
  host, pid, process start time, SLURM job id and restart count, and start time. Exclusive create
  is atomic on local file systems, NFSv3+ and Lustre, so two trainers can never both succeed.
* **A live owner** refuses the newcomer (:class:`RunOwnedError`, exit code 2) with who owns it and
  how to proceed.
* **A dead owner never blocks its own restart.** The file is taken over at once when its process
  is gone (same host: no such pid, or the pid now belongs to a process started later), or when it
  was an earlier attempt of the same SLURM job (a requeue, whatever node it ran on). Otherwise (an
  owner on another machine that died with its node) it is taken over once its heartbeat -- the
  file's mtime, refreshed every :data:`HEARTBEAT_S` seconds by a thread of the owner -- is older
  than :data:`STALE_AFTER_S`. A takeover renames the stale file away first (atomic: one winner).

Shared file systems: the heartbeat is the file's mtime as set by the file server (``utime`` with
the current time), so clocks of different nodes only need to agree to well within
:data:`STALE_AFTER_S`; no ``flock``/``fcntl`` locking is used (unreliable on NFS without lockd and
on Lustre mounted without ``flock``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pretrain.fileio import fsync_dir

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
HEARTBEAT_S = 30.0  # how often the owner refreshes the file's mtime
STALE_AFTER_S = 300.0  # an owner on another host without a heartbeat for this long is dead
_UNREADABLE_GRACE_S = 10.0  # a file being written right now may briefly be empty


class RunOwnedError(RuntimeError):
    """Another live trainer owns the run directory (the message names it and how to proceed)."""


@dataclass(frozen=True)
class Owner:
    """Who owns a run directory (the content of ``owner.json``)."""

    host: str
    pid: int
    pid_start: int | None  # /proc/<pid>/stat start time (clock ticks since boot): detects pid reuse
    slurm_job_id: str | None
    slurm_restart_count: int
    started: float  # time.time() when the directory was taken

    @staticmethod
    def of_this_process() -> Owner:
        return Owner(
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=process_start_ticks(os.getpid()),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            started=time.time(),
        )

    def describe(self) -> str:
        job = f" (SLURM job {self.slurm_job_id})" if self.slurm_job_id else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host}{job}, started {when}"


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces and parentheses: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def _read(path: Path) -> Owner | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Owner(**data)
    except (OSError, ValueError, TypeError):
        return None


def dead_reason(owner: Owner, heartbeat_age_s: float, me: Owner | None = None) -> str | None:
    """Why ``owner`` is certainly gone, or None when it may still be running."""
    me = me or Owner.of_this_process()
    if owner.host == me.host:
        try:
            os.kill(owner.pid, 0)
        except ProcessLookupError:
            return f"process {owner.pid} no longer exists on {owner.host}"
        except PermissionError:
            pass  # exists, another user's process
        start = process_start_ticks(owner.pid)
        if owner.pid_start is not None and start is not None and start != owner.pid_start:
            return f"pid {owner.pid} on {owner.host} now belongs to another process"
        return None
    same_job = bool(owner.slurm_job_id) and owner.slurm_job_id == me.slurm_job_id
    if same_job and me.slurm_restart_count > owner.slurm_restart_count:
        return f"it was attempt {owner.slurm_restart_count + 1} of this SLURM job, which was requeued"
    if heartbeat_age_s > STALE_AFTER_S:
        return f"no heartbeat for {heartbeat_age_s:.0f} s (> {STALE_AFTER_S:.0f} s)"
    return None


class RunLock:
    """The run directory's owner file, held by rank 0 for the whole run (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / OWNER_FILE
        self.me = Owner.of_this_process()
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the run directory, or raise :class:`RunOwnedError` naming its live owner."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._held = True
                self._thread = threading.Thread(target=self._beat, name="run-owner-heartbeat", daemon=True)
                self._thread.start()
                return
            self._take_over_if_dead()
        raise RunOwnedError(
            f"{self.path}: could not take the run directory (it kept changing owner); try again"
        )

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(self.me), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.run_dir)
        return True

    def _take_over_if_dead(self) -> None:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try to create it again
        owner = _read(self.path)
        if owner is None:
            if age < _UNREADABLE_GRACE_S:  # being written by a process that just took it
                time.sleep(0.5)
                return
            reason = f"its owner file is unreadable and {age:.0f} s old"
        else:
            reason = dead_reason(owner, age, self.me)
            if reason is None:
                raise RunOwnedError(self._owned_message(owner, age))
        stale = self.path.with_name(f"{OWNER_FILE}.stale.{self.me.host}.{self.me.pid}")
        try:
            os.rename(self.path, stale)  # atomic: of several newcomers, one moves it
        except FileNotFoundError:
            return
        moved = _read(stale)
        if moved != owner:  # another newcomer took over between our read and our rename: give it back
            if not self.path.exists():
                os.rename(stale, self.path)
            if moved is not None:
                raise RunOwnedError(self._owned_message(moved, 0.0))
            return
        stale.unlink(missing_ok=True)
        what = owner.describe() if owner is not None else "an unknown process"
        log.warning(
            "run directory %s: its previous owner (%s) is gone (%s); taking it over",
            self.run_dir,
            what,
            reason,
        )

    def _owned_message(self, owner: Owner, age: float) -> str:
        stop = f"scancel {owner.slurm_job_id}" if owner.slurm_job_id else f"kill -TERM {owner.pid}"
        return (
            f"run directory {self.run_dir} is in use by {owner.describe()} (heartbeat {age:.0f} s ago). "
            f"Only one trainer may write a run: wait for that one to finish, stop it (`{stop}` on "
            f"{owner.host}: it saves a checkpoint and exits) and run this command again to resume, or "
            f"start a new run with another run.name. If that process is gone with its machine, the run "
            f"is freed {STALE_AFTER_S:.0f} s after its last heartbeat (or delete {self.path})."
        )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if _read(self.path) != self.me:
                    log.error("run directory %s: %s no longer names this process", self.run_dir, self.path)
                    return
                os.utime(self.path)
            except OSError as e:  # a file-server hiccup: try again at the next beat
                log.warning("run directory %s: heartbeat failed (%s)", self.run_dir, e)

    def release(self) -> None:
        """Give the run directory back (only if this process still owns it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._held and _read(self.path) == self.me:
            self.path.unlink(missing_ok=True)
        self._held = False
