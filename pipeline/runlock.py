"""One writer per run folder: `RunLock`, held for the life of a command that writes a run.

Two commands writing one run (two `clipcurate run emit`) each see a consistent folder only in their own memory:
their shards, markers and manifests interleave on disk, and the run ends up with a training set that its
`sizes.json` and Parquet set disagree with. So every command that writes a run takes this lock first
(pipeline/cli.py `main`, for commands whose parser sets `writes_run`), and a second one exits 2 with one line
naming the holder. Dask workers never take it: they work for the process that holds it.

- **A local run folder**: `fcntl.flock(LOCK_EX | LOCK_NB)` on `RUNS/NAME/.lock`, whose content records the
  holder (pid, host, start time, command; JSON). The kernel drops a flock when its process dies, however it dies
  (SIGKILL included), so a lock file left behind by a dead holder is simply taken again; its content still names
  that holder, which the new holder prints as a notice. A clean release deletes the file (under the lock; a
  waiter that opened the old file checks, once it holds the lock, that it locked the file now at the path).
  flock is per host: a run folder on NFS shared by several hosts is not covered (use an object store).
- **An object store (s3://, gs://, ...)**: a lease object `RUNS/NAME/.lock` with the same record plus an expiry,
  created only where absent (S3 `If-None-Match: *`: fsspec `pipe_file(mode="create")`), renewed by a daemon thread
  every third of its life while the command lives, deleted at exit. An expired lease (its holder was killed, or
  lost its network for longer than the lease) is taken over with a notice. On S3 the takeover and each renewal
  are compare-and-swap puts (`If-Match: <the ETag read>`), so of two writers racing for one expired lease exactly
  one wins, and a holder whose lease was taken over learns it at its next renewal (and says so) instead of
  overwriting the new holder's lease. Expiry compares the holder's clock with the reader's: hosts must agree on
  the time to well within the lease (default 60 s). On a store without conditional puts the lease is best-effort
  (check, write, read back): two writers starting in the same instant may both proceed.

The lock is re-entrant within a process (a holder count per run folder): code that runs another command's code
in-process does not deadlock on its own lock (a second flock on a new descriptor conflicts even in one process).

The holder's record and the messages (pipeline/runlock_holder.py), the flock (pipeline/runlock_flock.py) and the
lease (pipeline/runlock_lease.py) each have their own module; this one is the lock callers take, and every name
they import is importable from here.
"""

from __future__ import annotations

import os
import threading

from pipeline import shards
from pipeline.runlock_flock import FileLock
from pipeline.runlock_holder import (  # noqa: F401 (re-exported: callers import them from here)
    LOCK_NAME,
    RunLockError,
    describe,
    holder_record,
    notice,
)
from pipeline.runlock_lease import Lease

LEASE_SECONDS = 60.0  # an object-store lease's life; renewed every third of it


# ---- re-entrancy within a process ------------------------------------------------------------------
_HELD: dict[str, list] = {}  # key -> [count, backend]
_GUARD = threading.Lock()


def _key(run_dir: str) -> str:
    return os.path.realpath(run_dir) if shards.is_local(run_dir) else str(run_dir).rstrip("/")


def held(run_dir: str) -> bool:
    """Whether this process holds the run's lock."""
    with _GUARD:
        return _key(run_dir) in _HELD


class RunLock:
    """`with RunLock(run_dir, command=...):` the body is the run's only writer; RunLockError (one line) otherwise.

    `run_dir` is a local folder or an fsspec URL. Re-entrant within a process: a nested RunLock on the same run
    folder counts up and the outermost release lets go."""

    def __init__(self, run_dir: str, command: str | None = None, lease_seconds: float = LEASE_SECONDS):
        self.run_dir = str(run_dir)
        self.command = command
        self.lease_seconds = float(lease_seconds)
        self._key = _key(self.run_dir)
        self._mine = False

    def acquire(self) -> "RunLock":
        with _GUARD:
            entry = _HELD.get(self._key)
            if entry is not None:
                entry[0] += 1
                self._mine = True
                return self
            backend = (FileLock if shards.is_local(self.run_dir) else Lease)(self.run_dir, self.command,
                                                                             self.lease_seconds)
            backend.acquire()
            _HELD[self._key] = [1, backend]
            self._mine = True
        return self

    def release(self) -> None:
        if not self._mine:
            return
        self._mine = False
        with _GUARD:
            entry = _HELD.get(self._key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] > 0:
                return
            del _HELD[self._key]
        entry[1].release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
