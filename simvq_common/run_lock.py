"""One run per directory: a lock file its holder keeps for its lifetime.

`RUN/.simvq.lock` names the holder (host, pid, the process's start time, what it runs) and is refreshed by a
heartbeat thread. A second launch into the same directory is refused, naming the holder, unless the holder is
dead: on the same host, no process with that pid and start time exists (a reused pid has another start
time); on another host (a shared file system) its heartbeat is older than STALE_S. A dead holder's lock is
reclaimed. The lock is created with O_EXCL and reclaimed by an atomic rename, so two launches racing for it
cannot both win.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from . import distributed
from .errors import RunLockedError

LOCK_NAME = ".simvq.lock"
HEARTBEAT_S = 30.0
STALE_S = 180.0  # a lock from another host whose heartbeat is older than this is taken for dead


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name; 22 is the 20th of them


def pid_namespace() -> str | None:
    """This process's pid namespace (containers sharing a host name may each have their own pids)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def holder_alive(holder: dict, age_s: float) -> bool:
    if holder.get("host") != socket.gethostname() or holder.get("pid_namespace") != pid_namespace():
        return age_s < STALE_S  # its pids are not ours to look up: its heartbeat says
    if holder.get("pid") == os.getpid():  # this process's own, left by a run it gave up (an error in it)
        return False
    start = process_start_time(int(holder.get("pid", -1)))
    return start is not None and start == holder.get("start_time")


class RunLock:
    """Hold `directory`'s lock while open (`with`); `what` says what runs (for the refusal message)."""

    def __init__(self, directory: str | Path, what: str) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "start_time": process_start_time(os.getpid()), "pid_namespace": pid_namespace(), "what": what,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._set_aside_if_dead()
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(self.record).encode())
            break
        else:
            raise RunLockedError(f"could not take the lock {self.path}: other launches keep taking it")
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _set_aside_if_dead(self) -> None:
        """Remove the lock when its holder is dead (then the caller creates its own with O_EXCL, which one launch
        alone wins); raise when it lives. The lock is first renamed aside, which one process alone does, and put
        back if what was moved is not what was judged dead (another launch's fresh lock)."""
        try:
            holder = json.loads(self.path.read_text() or "{}")
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return  # vanished or half-written: try to create it again
        if holder_alive(holder, age):
            raise RunLockedError(
                f"{self.path.parent} is in use by {holder.get('what', 'another run')} (pid {holder.get('pid')} on "
                f"{holder.get('host')}, since {holder.get('since')}): two runs in one directory would interleave "
                f"their logs and overwrite each other's checkpoints. Wait for it, stop it, or give this run "
                f"another output directory (if that process is gone, delete {self.path})")
        aside = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.{time.time_ns()}.dead")
        try:
            os.rename(self.path, aside)
        except OSError:
            return  # another launch moved it first
        try:
            if json.loads(aside.read_text() or "{}") != holder:
                os.link(aside, self.path)  # a fresh lock, not the dead one: back where it was
        except (OSError, ValueError):
            pass
        aside.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if json.loads(self.path.read_text()) != self.record:
                    return  # not ours any more (deleted by hand and taken by another run): touch nothing
                os.utime(self.path)
            except (OSError, ValueError):
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()) == self.record:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def holding_run_dir(directory: str | Path, what: str):
    """Rank 0 holds `directory`'s lock while the block runs; a refusal raises on every rank (call it after the
    process has joined its launcher's group)."""
    lock = RunLock(directory, what) if distributed.rank() == 0 else None
    distributed.rank0_decides(lambda: lock.acquire())
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
