"""One owner per save dir: the run that trains into a directory holds ``{save_dir}/owner.lock``.

The lock is a small JSON file (host, PID and its start time, SLURM job id, a random run id, a
heartbeat time) created with ``O_CREAT | O_EXCL`` by rank 0 before the run writes anything. A second
run on the same directory finds it and refuses with a message naming the owner, unless the owner is
gone:

* same host: the PID is not alive (or is another process now: its start time differs);
* same SLURM job id: a requeued job replaces its own earlier instance (SLURM stops that one first);
* another host: the heartbeat (refreshed by the owner while it trains, at most every
  ``HEARTBEAT_SECONDS``) is older than ``stale_after`` seconds.

A stale lock is replaced atomically (temp file + rename) and then read back: of two runs taking over
at the same moment, the one whose run id is in the file wins, the other refuses. Limits: on network
file systems without reliable ``O_EXCL`` or rename atomicity (old NFS) two runs starting within the
same second on different hosts may both win; a run stalled for longer than ``stale_after`` (e.g.
suspended) can lose its lock to another host's run: both are documented, not prevented.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..errors import UserError

LOCK_FILE = "owner.lock"
HEARTBEAT_SECONDS = 30.0


class SaveDirBusy(RuntimeError, UserError):
    """Another live run owns the save dir (the message names it)."""


@dataclass
class Owner:
    host: str
    pid: int
    pid_start: str  # the process's start time (``/proc/<pid>/stat``), against PID reuse
    run_id: str
    slurm_job_id: str
    started: float
    heartbeat: float

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        age = time.time() - self.heartbeat
        return (f"PID {self.pid} on {self.host}{job}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}"
                f", last heartbeat {age:.0f} s ago")


def _pid_start(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _me() -> Owner:
    now = time.time()
    return Owner(host=socket.gethostname(), pid=os.getpid(), pid_start=_pid_start(os.getpid()),
                 run_id=uuid.uuid4().hex, slurm_job_id=os.environ.get("SLURM_JOB_ID", ""), started=now, heartbeat=now)


def _alive(owner: Owner) -> bool:
    """Whether a process of this host is still the owner."""
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return not owner.pid_start or _pid_start(owner.pid) == owner.pid_start


class SaveDirLock:
    """Take with :meth:`acquire` (raises :class:`SaveDirBusy`), refresh with :meth:`heartbeat`, give back
    with :meth:`release`; also a context manager."""

    def __init__(self, save_dir: str | os.PathLike, stale_after: float = 600.0):
        self.path = Path(save_dir) / LOCK_FILE
        self.stale_after = stale_after
        self.me = _me()
        self.held = False
        self._last_beat = 0.0

    def _read(self) -> Optional[Owner]:
        try:
            return Owner(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # half-written or foreign: judged by the file's age below
            return None

    def _write_new(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.me), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _replace(self) -> None:
        tmp = self.path.with_name(f".{LOCK_FILE}.{self.me.run_id}")
        tmp.write_text(json.dumps(asdict(self.me)))
        os.replace(tmp, self.path)

    def _stale(self, owner: Optional[Owner]) -> Optional[str]:
        """Why ``owner`` no longer holds the lock, or None while it does."""
        if owner is None:
            age = time.time() - self.path.stat().st_mtime
            return f"an unreadable lock file {age:.0f} s old" if age > self.stale_after else None
        if owner.host == self.me.host and not _alive(owner):
            return f"its owner, PID {owner.pid} on {owner.host}, is gone"
        if owner.slurm_job_id and owner.slurm_job_id == self.me.slurm_job_id and (owner.host, owner.pid) != (
                self.me.host, self.me.pid):
            return f"its owner is an earlier instance of this SLURM job ({owner.slurm_job_id}), requeued"
        if owner.host != self.me.host and time.time() - owner.heartbeat > self.stale_after:
            return f"its owner on {owner.host} has not refreshed it for {time.time() - owner.heartbeat:.0f} s"
        return None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns why a stale lock was replaced (None when there was none)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._write_new():
            self.held = True
            return None
        owner = self._read()
        if owner is not None and owner.run_id == self.me.run_id:
            self.held = True
            return None
        reason = self._stale(owner)
        if reason is None:
            raise SaveDirBusy(f"{self.path.parent} is in use by another run ({owner.describe()}); wait for it, stop "
                              f"it, or give this run another training.save_dir (lock: {self.path})")
        self._replace()
        again = self._read()
        if again is None or again.run_id != self.me.run_id:  # another run took it over at the same moment
            raise SaveDirBusy(f"{self.path.parent} was taken over by another run at the same moment "
                              f"({again.describe() if again else 'unknown'}); lock: {self.path}")
        self.held = True
        return reason

    def heartbeat(self, force: bool = False) -> None:
        """Refresh the heartbeat (at most every ``HEARTBEAT_SECONDS`` unless ``force``)."""
        now = time.time()
        if not self.held or (not force and now - self._last_beat < HEARTBEAT_SECONDS):
            return
        owner = self._read()
        if owner is not None and owner.run_id != self.me.run_id:
            raise SaveDirBusy(f"{self.path.parent}: the lock was taken over by another run ({owner.describe()}); "
                              f"stopping so the two runs do not overwrite each other")
        self.me.heartbeat = now
        self._replace()
        self._last_beat = now

    def release(self) -> None:
        if self.held:
            owner = self._read()
            if owner is not None and owner.run_id == self.me.run_id:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "SaveDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
