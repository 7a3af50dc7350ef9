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
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid

from pipeline import shards

LOCK_NAME = ".lock"
LEASE_SECONDS = 60.0  # an object-store lease's life; renewed every third of it


class RunLockError(RuntimeError):
    """The run is being written by another command, or its lock cannot be written. str() is one line."""


def notice(message: str) -> None:
    """A one-line notice on stderr (a lock taken over from a dead holder): not an error, the command goes on."""
    print(f"clipcurate: notice: {message}", file=sys.stderr, flush=True)


# ---- the holder's record -------------------------------------------------------------------------
def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def holder_record(command: str | None = None) -> dict:
    """Who holds the lock: pid, host, since when, which command (cut to 200 characters)."""
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now_iso(), "token": uuid.uuid4().hex}
    if command:
        rec["command"] = command if len(command) <= 200 else command[:197] + "..."
    return rec


def describe(rec: dict) -> str:
    """'pid 123 on host-a since 2026-12-07T07:26:08Z (clipcurate run emit --run x)' from a record."""
    out = f"pid {rec.get('pid', '?')} on {rec.get('host', '?')} since {rec.get('since', '?')}"
    return out + (f" ({rec['command']})" if rec.get("command") else "")


def _parse(data: bytes) -> dict | None:
    try:
        rec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


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
            backend = (_FileLock if shards.is_local(self.run_dir) else _Lease)(self.run_dir, self.command,
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


def _name(run_dir: str) -> str:
    return shards.shard_name(run_dir)


def _busy(run_dir: str, rec: dict | None) -> RunLockError:
    who = describe(rec) if rec else "another command (its lock record is not readable)"
    return RunLockError(f"run {_name(run_dir)} is being written by {who}: one writer per run; wait for it to "
                        f"finish or stop it ({shards.join(run_dir, LOCK_NAME)})")


# ---- a local run folder: flock -------------------------------------------------------------------
class _FileLock:
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
                    raise _busy(self.run_dir, rec) from None
                raise RunLockError(f"cannot lock the run folder {self.run_dir} ({e.strerror or e})") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # a holder released (and deleted) it between our open and our lock: take the new one
        else:
            raise RunLockError(f"cannot lock the run folder {self.run_dir}: its lock file keeps changing")
        self.fd = fd
        old = _read_fd(fd)
        if old:  # a clean release deletes the file: one with a record was left by a holder that died
            notice(f"run {_name(self.run_dir)}: taking over the lock left by {describe(old)}: {_alive_here(old)}")
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
            rec = _parse(os.pread(fd, 65536, 0))
        except OSError:
            return None
        if rec is not None or not settle:
            return rec
        time.sleep(0.01)
    return None


# ---- an object store: a lease object -------------------------------------------------------------
class _Conflict(Exception):
    """A conditional put found the object changed (or present) since it was read."""


class _Lease:
    def __init__(self, run_dir: str, command: str | None, lease_seconds: float):
        self.run_dir = run_dir
        self.url = shards.join(run_dir, LOCK_NAME)
        self.command = command
        self.lease = max(lease_seconds, 0.3)
        self.record: dict | None = None
        self.etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # renewal vs release

    def _body(self) -> bytes:
        self.record["expires"] = time.time() + self.lease
        return json.dumps(self.record).encode()

    def acquire(self) -> None:
        try:
            self._acquire()
        except OSError as e:  # the store cannot be reached, the bucket is missing, access is denied
            raise RunLockError(f"cannot take the lease {self.url} ({e}): a command that writes a run first takes "
                               "its lock there") from None
        self._thread = threading.Thread(target=self._renew, name="clipcurate-run-lease", daemon=True)
        self._thread.start()

    def _acquire(self) -> None:
        fs, p = shards.fs_and_path(self.url)
        self.record = holder_record(self.command)
        for _ in range(10):
            try:
                self.etag = _create(fs, p, self._body())
                break
            except _Conflict:
                pass
            old, tag = _read_lease(fs, p)
            if old is None and tag is None:
                continue  # released between our put and our read: try to create it again
            if old is not None and _expires(old) > time.time():
                raise _busy(self.run_dir, old)
            try:
                self.etag = _replace(fs, p, self._body(), tag)
            except _Conflict:
                continue  # another writer took it over first: read again
            notice(f"run {_name(self.run_dir)}: taking over the lease left by "
                   + (f"{describe(old)}: it expired {_ago(old)}" if old else "an unknown holder: it is unreadable"))
            break
        else:
            raise RunLockError(f"cannot take the lease {self.url}: it keeps changing")

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 3):
            with self._lock:
                if self._stop.is_set():
                    return
                fs, p = shards.fs_and_path(self.url)
                try:
                    self.etag = _replace(fs, p, self._body(), self.etag)
                except (_Conflict, OSError) as e:
                    if isinstance(e, OSError):  # a network hiccup: the lease lives until it expires; retry
                        continue
                    try:
                        old, _ = _read_lease(fs, p)
                    except OSError:
                        old = None
                    print(f"clipcurate: error: run {_name(self.run_dir)}: this command's lease was taken over"
                          f"{' by ' + describe(old) if old else ''}: another command may now write this run",
                          file=sys.stderr, flush=True)
                    return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            fs, p = shards.fs_and_path(self.url)
            try:
                old, tag = _read_lease(fs, p)
                if old is not None and old.get("token") == (self.record or {}).get("token"):
                    fs.rm_file(p)  # (a takeover between this read and the delete would lose its lease: that needs
                    # a lease expired while its holder still lived, which the renewal prevents)
            except OSError:
                pass  # the lease expires by itself


def _expires(rec: dict) -> float:
    """A lease record's expiry (epoch seconds); 0 (long expired) when it has none that reads as a number."""
    try:
        return float(rec.get("expires", 0))
    except (TypeError, ValueError):
        return 0.0


def _ago(rec: dict | None) -> str:
    return f"{max(0.0, time.time() - _expires(rec)):.0f} s ago" if rec else ""


def _is_s3(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in ("s3", "s3a") for p in protocol)


def _etag(fs, p: str, data: bytes, reply=None) -> str:
    """The object's version tag: its ETag (S3), else a digest of its bytes (a store without ETags)."""
    if isinstance(reply, dict) and reply.get("ETag"):
        return reply["ETag"]
    try:
        info = fs.info(p)
    except FileNotFoundError:
        info = {}
    tag = info.get("ETag") if _is_s3(fs) else None
    return tag or "sha256:" + hashlib.sha256(data).hexdigest()


def _create(fs, p: str, data: bytes) -> str | None:
    """Put `data` at `p` only where nothing is there: S3 `If-None-Match: *` (fsspec pipe_file mode="create"; a
    store whose filesystem does not implement it gets fsspec's check-then-put, best-effort). Returns the new
    object's tag; _Conflict when something is there."""
    try:
        reply = fs.pipe_file(p, data, mode="create")
    except FileExistsError:
        raise _Conflict() from None
    except OSError as e:
        if _precondition_failed(e):
            raise _Conflict() from None
        raise RunLockError(f"cannot write the lease {p} ({e})") from None
    return _etag(fs, p, data, reply)


def _replace(fs, p: str, data: bytes, etag: str | None) -> str | None:
    """Put `data` at `p` only if the object there is still the one whose ETag is `etag` (S3 If-Match); elsewhere
    a check then a put (best-effort). _Conflict when it changed."""
    if _is_s3(fs) and etag:
        try:
            reply = fs.pipe_file(p, data, IfMatch=etag)
        except FileNotFoundError:
            raise _Conflict() from None
        except OSError as e:
            if _precondition_failed(e):
                raise _Conflict() from None
            raise
        return _etag(fs, p, data, reply)
    _, now = _read_lease(fs, p)
    if now != etag:
        raise _Conflict()
    return _etag(fs, p, data, fs.pipe_file(p, data))


def _precondition_failed(e: OSError) -> bool:
    return "precondition" in str(e).lower().replace("-", "") or "412" in str(e)


def _read_lease(fs, p: str) -> tuple[dict | None, str | None]:
    """(the lease's record, its ETag), the two from one version of the object; (None, None) where there is none."""
    tag = None
    for _ in range(5):
        fs.invalidate_cache(p)
        try:
            before = fs.info(p).get("ETag") if _is_s3(fs) else None
            data = fs.cat_file(p)
            fs.invalidate_cache(p)
            tag = _etag(fs, p, data)
        except FileNotFoundError:
            return None, None
        if before is not None and before != tag:
            continue  # renewed between the two reads
        return _parse(data), tag
    return None, tag
