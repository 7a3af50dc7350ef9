"""List, read and write Parquet shards on any fsspec path, with atomic writes.

Atomic = write under a hidden temporary name in the same folder, then rename. Readers (and `list_shards`)
never see a half-written `part-*.parquet`: a killed writer leaves at most a `.tmp-*` file, which the next
run removes. On object stores (s3://, gs://) a put is already all-or-nothing; rename there is copy+delete.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
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


def list_shards(folder: str) -> list[str]:
    """Sorted Parquet files directly in `folder` (not sub-folders; hidden/temporary names skipped), or `folder`
    itself when it is one Parquet file."""
    fs, p = fs_and_path(folder)
    if not fs.exists(p):
        raise ShardError(f"input folder {folder} does not exist")
    if fs.isfile(p):  # one Parquet file given as the input: a pool of one shard
        if not p.endswith(".parquet"):
            raise ShardError(f"input {folder} is a file but not a .parquet shard: give a folder of Parquet shards "
                             "or one .parquet file")
        return [str(folder)]
    out = []
    for info in fs.ls(p, detail=True):
        name = posixpath.basename(info["name"].rstrip("/"))
        if not name.endswith(".parquet") or name.startswith((".", "_")):
            continue
        # a symlinked shard (a pool assembled from links) is a shard; fsspec reports its type as "other"
        if info.get("type") != "file" and not (info.get("islink") and fs.isfile(info["name"])):
            continue
        out.append(join(str(folder), name))
    return sorted(out, key=shard_name)


def read_shard(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, p = fs_and_path(path)
    try:
        with fs.open(p, "rb") as f:
            return pq.read_table(f, columns=columns)
    except FileNotFoundError:
        raise ShardError(f"shard {shard_name(path)}: file not found ({path})") from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ShardError(f"shard {shard_name(path)}: not a readable Parquet file ({msg})") from None


def read_schema(path: str) -> pa.Schema:
    """A shard's Arrow schema, from its footer (nothing else is read)."""
    fs, p = fs_and_path(path)
    try:
        with fs.open(p, "rb") as f:
            return pq.read_schema(f)
    except FileNotFoundError:
        raise ShardError(f"shard {shard_name(path)}: file not found ({path})") from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ShardError(f"shard {shard_name(path)}: not a readable Parquet file ({msg})") from None


def _atomic_write(path: str, write_fn) -> dict:
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


def write_shard(table: pa.Table, path: str) -> dict:
    """Write `table` to `path` atomically. Deterministic bytes for the same table (no timestamps). Returns the
    file's record (size and XXH3 digest, `FileDigest.record`), for a done-marker to vouch for it."""
    try:
        return _atomic_write(
            path,
            lambda f: pq.write_table(table, f, compression="zstd", row_group_size=64 * 1024, write_statistics=True),
        )
    except OSError as e:
        raise ShardError(f"shard {shard_name(path)}: write failed ({e})") from None


def write_json(obj: Any, path: str) -> dict:
    data = json_bytes(obj)
    return _atomic_write(path, lambda f: f.write(data))


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
    return _atomic_write(path, lambda f: f.write(data))


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

    _atomic_write(path, write)


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


def content_digest(path: str) -> str:
    """sha256 of a file's bytes (streamed: ~1 s per GB)."""
    fs, p = fs_and_path(path)
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---- what a done-marker vouches for: size and XXH3 of every file a task wrote -----------------------------
# XXH3-128, not sha256: this guards against truncation and bit rot (disks, copies, an interrupted sync), not an
# adversary who can rewrite the marker beside the file. On this project's 2-core machines it hashed 3.8-10 GB/s
# where sha256 did 0.7-0.8 GB/s, so hashing on write costs nothing measurable (<1% of a run) and `--verify` is
# bounded by reading the files back.
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


def records_under(folder: str, journal: dict[str, dict]) -> dict[str, dict]:
    """The journal's files inside `folder`, by their path relative to it ("/"-separated)."""
    base = str(folder).rstrip("/\\")
    out = {}
    for path, record in journal.items():
        if "://" in base:
            rel = path[len(base) + 1:] if path.startswith(base + "/") else None
        else:
            rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base)).replace(os.sep, "/")
        if rel and safe_relative(rel):
            out[rel] = record
    return out


def records_mismatch(folder: str, files: Any, digest: bool = False) -> str | None:
    """Why the files a marker records ({relative path: record}) are no longer those written (None: they are):
    the first that is missing, of another size or, with `digest`, of other content, named in the reason."""
    if not isinstance(files, dict) or not all(safe_relative(n) for n in files):
        return "its marker does not list its files"
    for rel in sorted(files):
        why = file_mismatch(join(folder, *rel.split("/")), files[rel], digest=digest)
        if why is not None:
            return f"{rel} {why}"
    return None


def file_record(path: str) -> dict:
    """{"size", "xxh3"} of a file as it is now, streamed."""
    fs, p = fs_and_path(path)
    h, n = xxhash.xxh3_128(), 0
    with fs.open(p, "rb") as f:
        for block in iter(lambda: f.read(DIGEST_BLOCK), b""):
            h.update(block)
            n += len(block)
    return {"size": n, DIGEST_KEY: h.hexdigest()}


def file_mismatch(path: str, record: Any, digest: bool = False) -> str | None:
    """Why the file at `path` is no longer the one `record` describes (None: it is): missing, another size, or,
    with `digest`, other content. Sizes cost one metadata request; the digest reads the whole file."""
    if not isinstance(record, dict) or not isinstance(record.get("size"), int):
        return "has no size recorded"
    fs, p = fs_and_path(path)
    try:
        size = fs.info(p).get("size")
    except FileNotFoundError:
        return "is missing"
    if size != record["size"]:
        return f"is {size} bytes, {record['size']} when written (size differs)"
    if digest:
        try:
            now = file_record(path)
        except OSError as e:
            return f"cannot be read ({e})"
        if now[DIGEST_KEY] != record.get(DIGEST_KEY):
            return (f"has other content than when written (xxh3 {now[DIGEST_KEY][:12]}, "
                    f"{str(record.get(DIGEST_KEY))[:12]} when written; digest differs)")
    return None


def safe_relative(name: Any) -> bool:
    """A file name recorded in a marker, relative to its folder: no absolute path, no `..` (a marker is data in
    the run folder; it must not point a check, or a rewrite, outside it)."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "://" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.replace("\\", "/").split("/"))


class DigestCache:
    """Content digests of data files for fingerprints, remembered in a JSON file (`path`) beside what uses
    them: {file: [size, mtime, sha256]}. A file whose size and mtime are those remembered is not read again; a
    file rewritten (another mtime) is read again, and the same bytes give the same digest, so a fingerprint
    follows the content, never the clock. Written atomically; a cache that cannot be written is only slower."""

    def __init__(self, path: str | None):
        self.path = path
        self.entries = (read_json(path) or {}) if path else {}
        self.changed = False

    def digest(self, path: str, info: dict | None = None) -> str:
        """`info`: the file's fsspec info when the caller has it (one metadata request per file, not two)."""
        if info is None:
            fs, p = fs_and_path(path)
            info = fs.info(p)
        stamp = [info.get("size"), _modified(info)]
        key = path if "://" in path else os.path.abspath(path)
        for tag in ("md5Hash", "ETag", "etag"):  # object stores hash the content themselves (gs: md5, s3: ETag)
            if "://" in path and info.get(tag):
                return f"{tag}:{str(info[tag]).strip(chr(34))}"
        got = self.entries.get(key)
        if isinstance(got, list) and len(got) == 3 and got[:2] == stamp:
            return got[2]
        d = content_digest(path)
        self.entries[key] = [*stamp, d]
        self.changed = True
        return d

    def save(self) -> None:
        if self.path and self.changed:
            try:
                write_json(self.entries, self.path)
            except (OSError, ShardError):
                pass
            self.changed = False


def file_content_identity(path: str, cache: DigestCache | None = None) -> dict:
    """What identifies a data file for fingerprints: its name, size and content digest (not its mtime: a file
    rewritten with the same bytes, e.g. a regenerated demo world, is the same input)."""
    fs, p = fs_and_path(path)
    info = fs.info(p)
    return {"name": shard_name(path), "size": info.get("size"), "sha256": (cache or DigestCache(None)).digest(path, info)}


def file_identity(path: str) -> dict:
    """Size and mtime of a file, without reading it: only for cache keys that must not read the bytes (the
    dfn score cache's image-store identity). Fingerprints of data files use `file_content_identity`."""
    fs, p = fs_and_path(path)
    info = fs.info(p)
    return {"name": shard_name(path), "size": info.get("size"), "mtime": _modified(info)}


def _modified(info: dict) -> str:
    """A file's modification stamp from fsspec's info, whichever key the filesystem uses."""
    return str(info.get("mtime") or info.get("LastModified") or info.get("created") or "")
