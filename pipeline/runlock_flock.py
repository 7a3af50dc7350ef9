"""A local run folder's lock: `fcntl.flock` on RUNS/NAME/.lock (pipeline/runlock.py says why and how).

The kernel drops a flock when its holder dies, however it dies, so this side needs no expiry: a lock file left by
a dead holder is taken again with a notice. Its own module because it shares nothing with the lease but the
holder's record (pipeline/runlock_holder.py).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time

from pipeline.runlock_holder import (LOCK_NAME, RunLockError, busy_error, describe, holder_record, notice,
                                     parse_record, run_name)


# ---- a holder that is gone -------------------------------------------------------------------------
def _alive_here(rec: dict) -> str:
    """Why a holder whose lock was free is gone, for the notice."""
    if rec.get("host") != socket.gethostname():
        return "it was on another host"
    try:
        os.kill(int(rec.get("pid", -1)), 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return "that process is gone"
    except PermissionError:
        pass
    return "it no longer holds the lock"


# ---- a local run folder: flock -------------------------------------------------------------------
class FileLock:
    def __init__(self, run_dir: str, command: str | None, _lease: float):
        self.run_dir = run_dir[len("file://"):] if run_dir.startswith("file://") else run_dir
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self.command = command
        self.fd: int | None = None
        self.created: list[str] = []  # folders this lock made (removed at release when left empty)

    def _makedirs(self) -> None:
        missing, d = [], os.path.abspath(self.run_dir)
        while not os.path.lexists(d):
            missing.append(d)
            d = os.path.dirname(d)
        if os.path.lexists(d) and not os.path.isdir(d):
            raise RunLockError(f"{d} is a file, not a folder: a run folder cannot be made under it")
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as e:
            raise RunLockError(f"cannot make the run folder {self.run_dir}: {e.strerror or e}") from None
        self.created = missing  # deepest first

    def acquire(self) -> None:
        import fcntl

        if os.path.lexists(self.run_dir) and not os.path.isdir(self.run_dir):
            raise RunLockError(f"run folder {self.run_dir} is a file, not a folder")
        self._makedirs()
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                self._remove_created()
                raise RunLockError(f"cannot write in the run folder {self.run_dir} ({e.strerror or e}): a command "
                                   f"that writes a run first takes its lock {LOCK_NAME} there") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                rec = _read_fd(fd, settle=True)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise busy_error(self.run_dir, rec) from None
                raise RunLockError(f"cannot lock the run folder {self.run_dir} ({e.strerror or e})") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # a holder released (and deleted) it between our open and our lock: take the new one
        else:
            raise RunLockError(f"cannot lock the run folder {self.run_dir}: its lock file keeps changing")
        self.fd = fd
        old = _read_fd(fd)
        if old:  # a clean release deletes the file: one with a record was left by a holder that died
            notice(f"run {run_name(self.run_dir)}: taking over the lock left by {describe(old)}: {_alive_here(old)}")
        data = json.dumps(holder_record(self.command)).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except OSError as e:
            self.release()
            raise RunLockError(f"cannot write the lock of run folder {self.run_dir} ({e.strerror or e})") from None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: see _same_file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        """A command that made the run folder and left nothing in it leaves no empty folder behind."""
        for d in self.created:
            try:
                os.rmdir(d)
            except OSError:
                break
        self.created = []


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_fd(fd: int, settle: bool = False) -> dict | None:
    """The record in the lock file; `settle`: the holder may be writing it this instant, so retry briefly."""
    for _ in range(20 if settle else 1):
        try:
            rec = parse_record(os.pread(fd, 65536, 0))
        except OSError:
            return None
        if rec is not None or not settle:
            return rec
        time.sleep(0.01)
    return None
