"""What vouches for a file's content: the records a done-marker keeps ({"size", "xxh3"}, made as a file is
written: `fileio.FileDigest`) checked against the files, and the content digests that fingerprints use (sha256,
remembered by size and mtime in a `DigestCache`). Apart from the writing, because checking and fingerprinting
read files back, which writing never does."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import xxhash

from pipeline.errors import ShardError
from pipeline.fileio import DIGEST_BLOCK, DIGEST_KEY, fs_and_path, join, read_json, shard_name, write_json


def content_digest(path: str) -> str:
    """sha256 of a file's bytes, streamed (its cost per GB, timed by hand: bench/README.md, "The spine by hand")."""
    fs, p = fs_and_path(path)
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
