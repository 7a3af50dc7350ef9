"""List, read and write Parquet shards on any fsspec path, written atomically (`fileio.atomic_write`).

The files around the shards (paths, JSON, bundles, what a done-marker records) are fileio's and digests': their
names stay importable from here, where most callers have always found them (`shards.join`, `shards.read_json`).
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ShardError
from pipeline.fileio import atomic_write, fs_and_path, join, shard_name

# moved to fileio.py and digests.py (issue 34); re-exported for the callers of `shards.<name>`
from pipeline.digests import (  # noqa: F401
    DigestCache, content_digest, file_content_identity, file_identity, file_mismatch, file_record,
    records_mismatch, records_under, safe_relative)
from pipeline.fileio import (  # noqa: F401
    DIGEST_BLOCK, clean_temporaries, exists, is_local, json_bytes, makedirs, read_bundle_item, read_bytes,
    read_json, recording_writes, remove, write_bundle, write_bytes, write_if_changed, write_json)


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


def write_shard(table: pa.Table, path: str) -> dict:
    """Write `table` to `path` atomically. Deterministic bytes for the same table (no timestamps). Returns the
    file's record (size and XXH3 digest, `FileDigest.record`), for a done-marker to vouch for it."""
    try:
        return atomic_write(
            path,
            lambda f: pq.write_table(table, f, compression="zstd", row_group_size=64 * 1024, write_statistics=True),
        )
    except OSError as e:
        raise ShardError(f"shard {shard_name(path)}: write failed ({e})") from None
