"""One owner per save dir: the run that trains into a directory holds ``{save_dir}/owner.lock``.

The lock is a small JSON file (host, PID namespace, PID and its start time, SLURM job id and restart
count, a random run id, a heartbeat time) created with ``O_CREAT | O_EXCL`` by rank 0 before the run
writes anything. A second run on the same directory finds it and refuses with a message naming the
owner, unless the owner is gone:

* same host and PID namespace: the PID is not alive (or is another process now: its start time differs);
* same SLURM job id with a lower ``SLURM_RESTART_COUNT``: a requeued job replaces its own earlier
  instance (SLURM stops that one first); two ``srun`` in one allocation do not take each other's lock;
* otherwise (another host, another container): the heartbeat is older than ``stale_after`` seconds. A
  background thread refreshes it every ``HEARTBEAT_SECONDS`` from the moment the lock is taken, so
  loading, index building and long saves do not make a live run look stale.

A stale lock is taken over under a second lock, ``owner.lock.takeover`` (also ``O_EXCL``): the taker
reads and judges the owner again while holding it, so of two runs taking over at the same moment one
wins and the other refuses. An owner whose lock was taken over (it was stalled for longer than
``stale_after``) stops at its next step. Limits: on network file systems without reliable ``O_EXCL``
or rename atomicity (old NFS) two runs starting within the same second on different hosts may both
win: documented, not prevented.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..errors import UserError

LOCK_FILE = "owner.lock"
TAKEOVER_FILE = "owner.lock.takeover"
HEARTBEAT_SECONDS = 30.0
TAKEOVER_STALE_SECONDS = 60.0  # a takeover lock this old was left by a crashed taker


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
    pid_ns: str = ""  # the PID namespace (containers on one host have their own)
    slurm_restart: int = 0  # SLURM_RESTART_COUNT: a requeued job's instance number

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


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _me() -> Owner:
    now = time.time()
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return Owner(host=socket.gethostname(), pid=os.getpid(), pid_start=_pid_start(os.getpid()),
                 run_id=uuid.uuid4().hex, slurm_job_id=os.environ.get("SLURM_JOB_ID", ""), started=now, heartbeat=now,
                 pid_ns=_pid_ns(), slurm_restart=int(restart) if restart.isdigit() else 0)


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
        self.lost: Optional[str] = None
        self._last_beat = 0.0
        self._beat_lock = threading.Lock()

    def _read(self) -> Optional[Owner]:
        """The owner in the lock file; None when there is no file or it cannot be parsed (being written, or
        foreign: judged by the file's age)."""
        try:
            return Owner(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            return None

    def _age(self) -> Optional[float]:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
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

    def _same_process_space(self, owner: Owner) -> bool:
        return owner.host == self.me.host and (not owner.pid_ns or not self.me.pid_ns or owner.pid_ns == self.me.pid_ns)

    def _stale(self, owner: Optional[Owner]) -> Optional[str]:
        """Why ``owner`` no longer holds the lock, or None while it does."""
        if owner is None:
            age = self._age()
            if age is None:
                return "it was removed"
            return f"an unreadable lock file {age:.0f} s old" if age > self.stale_after else None
        if self._same_process_space(owner) and not _alive(owner):
            return f"its owner, PID {owner.pid} on {owner.host}, is gone"
        if (owner.slurm_job_id and owner.slurm_job_id == self.me.slurm_job_id
                and owner.slurm_restart < self.me.slurm_restart):
            return (f"its owner is an earlier instance of this SLURM job ({owner.slurm_job_id}, restart "
                    f"{owner.slurm_restart}), requeued")
        if not self._same_process_space(owner) and time.time() - owner.heartbeat > self.stale_after:
            return f"its owner on {owner.host} has not refreshed it for {time.time() - owner.heartbeat:.0f} s"
        return None

    def _busy(self, owner: Optional[Owner]) -> SaveDirBusy:
        who = owner.describe() if owner is not None else "a run that is writing its lock right now"
        return SaveDirBusy(f"{self.path.parent} is in use by another run ({who}); wait for it, stop it, or give this "
                           f"run another training.save_dir (lock: {self.path})")

    def _take_over(self) -> str:
        """Replace a stale lock under the takeover lock (the owner is judged again while holding it);
        returns why the old owner was stale."""
        mutex = self.path.with_name(TAKEOVER_FILE)
        try:
            fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                old = time.time() - mutex.stat().st_mtime > TAKEOVER_STALE_SECONDS
            except FileNotFoundError:
                old = False
            if not old:
                raise SaveDirBusy(f"{self.path.parent}: another run is taking over its stale lock right now "
                                  f"(lock: {self.path})") from None
            mutex.unlink(missing_ok=True)  # left by a taker that crashed
            return self._take_over()
        try:
            os.write(fd, self.me.run_id.encode())
            os.close(fd)
            if self._write_new():
                return "it was removed"
            owner = self._read()
            reason = self._stale(owner)
            if reason is None:
                raise self._busy(owner)
            self._replace()
            return reason
        finally:
            mutex.unlink(missing_ok=True)

    def acquire(self) -> Optional[str]:
        """Take the lock and start the heartbeat; returns why a stale lock was replaced (None when there
        was none). Raises :class:`SaveDirBusy` naming the owner while it is alive."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        reason = None
        if not self._write_new():
            owner = self._read()
            if self._stale(owner) is None:
                raise self._busy(owner)
            reason = self._take_over()
        self.held = True
        self._start_heartbeat()
        return reason

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self.lost: Optional[str] = None
        self._last_beat = time.time()

        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                try:
                    self._beat()
                except SaveDirBusy as e:
                    self.lost = str(e)
                    return
                except OSError:  # a transient file-system error: try again at the next beat
                    continue

        self._thread = threading.Thread(target=beat, name="save-dir-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        with self._beat_lock:
            owner = self._read()
            if owner is not None and owner.run_id != self.me.run_id:
                raise SaveDirBusy(f"{self.path.parent}: the lock was taken over by another run ({owner.describe()}); "
                                  f"stopping so the two runs do not overwrite each other")
            self.me.heartbeat = time.time()
            self._replace()
            self._last_beat = self.me.heartbeat

    def heartbeat(self, force: bool = False) -> None:
        """Raise :class:`SaveDirBusy` if another run took the lock over (the training loop calls this every
        step; the background thread does the refreshing); ``force``: refresh now."""
        if not self.held:
            return
        if self.lost is not None:
            raise SaveDirBusy(self.lost)
        if force:
            self._beat()

    def release(self) -> None:
        if self.held:
            self._stop.set()
            self._thread.join(timeout=5)
            owner = self._read()
            if owner is not None and owner.run_id == self.me.run_id:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "SaveDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
