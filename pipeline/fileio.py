"""Files on any fsspec path (local, s3://, gs://): one spelling of paths, and writes that are atomic and recorded.

Why one module: every file the pipeline writes (shards, markers, manifests, vectors, bundles) goes through
`atomic_write`, so a reader never sees half a file and a done-marker can vouch for what was written without
reading it back. Atomic = write under a hidden temporary name in the same folder, then rename. Readers (and
`list_shards`) never see a half-written `part-*.parquet`: a killed writer leaves at most a `.tmp-*` file, which the
next run removes. On object stores (s3://, gs://) a put is already all-or-nothing; rename there is copy+delete.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
import xxhash

from pipeline.errors import ShardError

TMP_PREFIX = ".tmp-"


def fs_and_path(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a local path or URI. On an object store, what the filesystem has cached about
    the path (s3fs keeps listings and ETags per process) is dropped first: other processes (the workers)
    rewrite `_done` markers, manifests and shards, and a stale ETag makes s3fs refuse to read the new object
    ("no longer exists"), which a resume then took for a missing marker and redid the stage."""
    fs, p = fsspec.core.url_to_fs(str(path))
    if not is_local(path):
        fs.invalidate_cache(p)
    return fs, p


def is_local(path: str) -> bool:
    """A path on this machine's filesystem (a plain path or file://), not an object store."""
    return "://" not in str(path) or str(path).startswith("file://")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def shard_name(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/"))


def atomic_write(path: str, write_fn) -> dict:
    """Returns the file's record ({"size", "xxh3"}, `FileDigest`): hashed as it is written, never read back."""
    fs, p = fs_and_path(path)
    parent = posixpath.dirname(p) if "://" in str(path) else os.path.dirname(p)
    fs.makedirs(parent, exist_ok=True)
    tmp = (posixpath if "://" in str(path) else os.path).join(
        parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(p)}"
    )
    try:
        with fs.open(tmp, "wb") as f:
            sink = FileDigest(f)
            write_fn(sink)
            if hasattr(f, "flush"):
                f.flush()
            if hasattr(f, "fileno"):
                try:
                    os.fsync(f.fileno())
                except (OSError, ValueError, AttributeError):
                    pass
        fs.mv(tmp, p)
        record = sink.record()
        journal = _WRITES.get()
        if journal is not None:
            journal[str(path)] = record
        return record
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:
            pass
        raise


def write_json(obj: Any, path: str) -> dict:
    data = json_bytes(obj)
    return atomic_write(path, lambda f: f.write(data))


def read_bytes(path: str) -> bytes:
    """A whole file; ShardError (one line) when it is missing or unreadable."""
    fs, p = fs_and_path(path)
    try:
        with fs.open(p, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ShardError(f"{shard_name(path)}: file not found ({path})") from None
    except OSError as e:
        raise ShardError(f"{shard_name(path)}: cannot read ({e})") from None


def write_bytes(data: bytes, path: str) -> dict:
    return atomic_write(path, lambda f: f.write(data))


def write_if_changed(data: bytes, path: str) -> bool:
    """Write unless the file already holds exactly these bytes (an index rewritten on every resume would
    change its mtime for nothing). Returns whether it wrote."""
    fs, p = fs_and_path(path)
    try:
        if fs.info(p).get("size") == len(data):
            with fs.open(p, "rb") as f:
                if f.read() == data:
                    return False
    except FileNotFoundError:
        pass
    write_bytes(data, path)
    return True


def json_bytes(obj: Any) -> bytes:
    """The bytes `write_json` writes."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


BUNDLE_MAGIC = b"CCBUNDLE1\n"


def write_bundle(items: dict[str, bytes], path: str) -> None:
    """Many named blobs in one file, written atomically; `read_bundle_item` reads one back by name with a
    ranged read. Why not one file per blob: a shuffle of S shards into P partitions would make S x P files
    (slow to list and to put on object stores); bundles make S + P, each read in place."""
    offsets, pos = {}, 0
    for name, blob in items.items():
        offsets[name] = [pos, len(blob)]
        pos += len(blob)
    header = json.dumps(offsets, sort_keys=True).encode()

    def write(f):
        f.write(BUNDLE_MAGIC + len(header).to_bytes(8, "little") + header)
        for blob in items.values():
            f.write(blob)

    atomic_write(path, write)


def read_bundle_item(path: str, name: str) -> bytes:
    """One blob of a bundle. ShardError (one line) when the file or the name is missing or the file is not a bundle."""
    fs, p = fs_and_path(path)
    try:
        with fs.open(p, "rb") as f:
            head = f.read(len(BUNDLE_MAGIC) + 8)
            if len(head) != len(BUNDLE_MAGIC) + 8 or not head.startswith(BUNDLE_MAGIC):
                raise ShardError(f"{shard_name(path)}: not a statistics bundle ({path})")
            n = int.from_bytes(head[len(BUNDLE_MAGIC):], "little")
            offsets = json.loads(f.read(n))
            if name not in offsets:
                raise ShardError(f"{shard_name(path)}: holds nothing for {name}")
            start, length = offsets[name]
            f.seek(len(head) + n + start)
            data = f.read(length)
    except FileNotFoundError:
        raise ShardError(f"{shard_name(path)}: file not found ({path})") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"{shard_name(path)}: unreadable statistics bundle ({e})") from None
    if len(data) != length:
        raise ShardError(f"{shard_name(path)}: truncated statistics bundle")
    return data


def read_json(path: str) -> Any | None:
    fs, p = fs_and_path(path)
    try:
        with fs.open(p, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def makedirs(path: str) -> None:
    """A folder, local or fsspec (os.makedirs of "s3://b/x" would make a local folder "s3:/b/x")."""
    fs, p = fs_and_path(path)
    fs.makedirs(p, exist_ok=True)


def exists(path: str) -> bool:
    fs, p = fs_and_path(path)
    return fs.exists(p)


def remove(path: str) -> None:
    fs, p = fs_and_path(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def clean_temporaries(folder: str, recursive: bool = False) -> int:
    """Remove `.tmp-*` leftovers of killed writers in `folder` (and its sub-folders). Returns how many."""
    fs, p = fs_and_path(folder)
    if not fs.exists(p):
        return 0
    n = 0
    names = fs.find(p) if recursive else [info["name"] for info in fs.ls(p, detail=True)]
    for name in names:
        if posixpath.basename(name).startswith(TMP_PREFIX):
            try:
                fs.rm(name)
            except FileNotFoundError:
                # gone between the listing and now: renamed into place by a task still finishing (e.g. a
                # straggler of a failed Dask run whose cancelled task was already executing), or its writer's
                # own clean-up. Either way there is nothing left to remove.
                continue
            n += 1
    return n


# ---- what a done-marker vouches for: size and XXH3 of every file a task wrote -----------------------------
# XXH3-128, not sha256: this guards against truncation and bit rot (disks, copies, an interrupted sync), not an
# adversary who can rewrite the marker beside the file. On this project's 2-core machines it hashed several times
# faster than sha256 (timed by hand: bench/README.md, "The spine by hand"), so hashing on write costs nothing
# measurable in a run and `--verify` is bounded by reading the files back.
DIGEST_KEY = "xxh3"  # xxh3_128 hexdigest
DIGEST_BLOCK = 1 << 22  # streamed in 4 MiB blocks: a file is never held whole


class FileDigest:
    """A write-only file wrapper that counts and hashes what passes through it, so a writer gets its file's
    record without reading the file back (on an object store that would be a second download)."""

    def __init__(self, f):
        self._f = f
        self._h = xxhash.xxh3_128()
        self.size = 0

    def write(self, data) -> int:
        self._h.update(data)
        self.size += memoryview(data).nbytes
        return self._f.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if hasattr(self._f, "flush"):
            self._f.flush()

    @property
    def closed(self) -> bool:
        return bool(getattr(self._f, "closed", False))

    @property
    def name(self) -> str:  # the file's own name and path, for whoever asks a writer where it writes
        return getattr(self._f, "name", "")

    @property
    def path(self) -> str:
        return getattr(self._f, "path", "")

    def record(self) -> dict:
        return {"size": self.size, DIGEST_KEY: self._h.hexdigest()}


_WRITES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("clipcurate_writes", default=None)


@contextlib.contextmanager
def recording_writes():
    """{path: record} of every file written through this module inside the block, by any code (a stage's own
    `save_stats`), in this thread or task only: what the runner's markers vouch for without the stage's help."""
    journal: dict[str, dict] = {}
    token = _WRITES.set(journal)
    try:
        yield journal
    finally:
        _WRITES.reset(token)
