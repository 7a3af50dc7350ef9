"""An object-store run folder's lock: a lease object RUNS/NAME/.lock (pipeline/runlock.py says why and how).

A store has no flock and no process to watch, so the lock is an object with an expiry, taken and renewed by
conditional puts (S3 If-None-Match / If-Match): that machinery is this module's alone.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time

from pipeline import shards
from pipeline.runlock_holder import (LOCK_NAME, RunLockError, busy_error, describe, holder_record, notice,
                                     parse_record, run_name)


# ---- an object store: a lease object -------------------------------------------------------------
class _Conflict(Exception):
    """A conditional put found the object changed (or present) since it was read."""


class Lease:
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
                raise busy_error(self.run_dir, old)
            try:
                self.etag = _replace(fs, p, self._body(), tag)
            except _Conflict:
                continue  # another writer took it over first: read again
            notice(f"run {run_name(self.run_dir)}: taking over the lease left by "
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
                    print(f"clipcurate: error: run {run_name(self.run_dir)}: this command's lease was taken over"
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
        return parse_record(data), tag
    return None, tag
