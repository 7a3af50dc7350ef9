"""The row schema every shard follows, and checks that fail with one line naming shard and column.

Type checks go by *family* (string/large_string, binary/large_binary, any integer width), because
polars writes large types and img2dataset writes int64 sizes: the data is right, only the width differs,
so we cast instead of refusing.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc


class SchemaError(ValueError):
    """A shard lacks a column or has one of the wrong type. str() is one line naming both."""


# Rows the reader found unusable (today: a string column that is not valid UTF-8) carry their reason
# in this column, null for every good row. `Stage` sends such rows to `rejected` with that reason before
# a stage's collect/apply sees the shard, so one bad caption never fails a billion-row run.
ROW_ERROR_COL = "_row_error"
INVALID_UTF8 = "invalid_utf8"


# The row every stage reads and writes: metadata only. The image is named by `image_ref` (a reference into
# the run's image store, pipeline/images.py); its bytes are never in a stage's shard.
ROW_SCHEMA: dict[str, pa.DataType] = {
    "uid": pa.string(),
    "url": pa.string(),
    "text": pa.string(),
    "image_ref": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "orig_width": pa.int32(),
    "orig_height": pa.int32(),
}

# A pool that holds its images (a Parquet pool in our row schema given with --input, the demo's HQ and eval
# sets, emit's Parquet output): the bytes in `image` where a stage's row has `image_ref`.
POOL_SCHEMA: dict[str, pa.DataType] = {
    **{k: v for k, v in ROW_SCHEMA.items() if k != "image_ref"}, "image": pa.binary(),
}
_KNOWN = {**ROW_SCHEMA, **POOL_SCHEMA}  # checked (type family) wherever present

def _family(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "list"
    return str(t)


def check_columns(table: pa.Table, required: dict[str, pa.DataType], shard: str, stage: str = "") -> pa.Table:
    """Return `table` with the required columns cast to their canonical types.

    Raises SchemaError (one line) for a missing column or a column of another type family.
    An all-null column (type null) is accepted and cast, so an empty text-only shard still passes.
    """
    who = f" (required by {stage})" if stage else ""
    for name, want in required.items():
        if name not in table.column_names:
            raise SchemaError(f"shard {shard}: missing column '{name}'{who}")
        table = _check_one(table, name, want, shard, who, cast=True)
    # the row schema's other columns, when present, must be of their family too: a string `width` or
    # `image` is a broken shard, said here in one line rather than as a crash inside a stage
    for name, want in _KNOWN.items():
        if name in table.column_names and name not in required:
            table = _check_one(table, name, want, shard, "", cast=want == pa.string())
    return _flag_invalid_utf8(table)


def _check_one(table: pa.Table, name: str, want: pa.DataType, shard: str, who: str, cast: bool) -> pa.Table:
    have = table.schema.field(name).type
    if have == want:
        return table
    fam_have, fam_want = _family(have), _family(want)
    # bytes where text is expected (files from writers that store strings without the UTF-8 annotation)
    # are read as UTF-8; rows that are not valid UTF-8 become `invalid_utf8` rejects (_flag_invalid_utf8)
    text_as_bytes = fam_want == "string" and fam_have == "binary"
    if fam_have != fam_want and fam_have != "null" and not text_as_bytes:
        raise SchemaError(f"shard {shard}: column '{name}' has type {have}, expected {want}{who}")
    if not cast:
        return table
    try:
        col = table.column(name)
        col = _binary_to_string(col) if text_as_bytes else col.cast(want)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        msg = " ".join(str(e).split())
        raise SchemaError(f"shard {shard}: column '{name}' cannot be read as {want}: {msg}") from None
    return table.set_column(table.schema.get_field_index(name), name, col)


def _binary_to_string(col) -> pa.ChunkedArray:
    """Reinterpret a binary column as string without validating (validation is per row, later)."""
    col = col.cast(pa.binary()) if not pa.types.is_binary(col.type) else col
    chunks = [pa.Array.from_buffers(pa.string(), len(c), c.buffers(), c.null_count, c.offset) for c in col.chunks]
    return pa.chunked_array(chunks, pa.string())


def is_valid_utf8(col) -> bool:
    """Whether every value of a string column is valid UTF-8 (Arrow does not check on read; polars crashes
    the process on invalid bytes). One SIMD validation pass per chunk."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    try:
        for chunk in chunks:
            chunk.validate(full=True)
        return True
    except pa.ArrowInvalid:
        return False


def lossy_utf8(col) -> tuple[pa.Array, list[bool]]:
    """(values decoded as UTF-8 with U+FFFD for bad bytes, per row: were the bytes invalid). A Python loop,
    but only over a column that `is_valid_utf8` refused: the rare shard or list that holds broken text."""
    fixed, bad = [], []
    for b in col.cast(pa.binary()).to_pylist():
        try:
            fixed.append(None if b is None else b.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            fixed.append(b.decode("utf-8", "replace"))
            bad.append(True)
    return pa.array(fixed, pa.string()), bad


def _flag_invalid_utf8(table: pa.Table) -> pa.Table:
    """Rows whose uid/url/text bytes are not valid UTF-8 (Arrow and polars assume they are: polars
    crashes the process on them) get `invalid_utf8` in ROW_ERROR_COL, and the bad values are replaced
    by their lossy decoding (U+FFFD), so the rejected shard is readable. Valid shards: one SIMD pass."""
    bad = None
    for name in ("uid", "url", "text"):
        if name not in table.column_names or not pa.types.is_string(table.schema.field(name).type):
            continue
        col = table.column(name)
        if is_valid_utf8(col):
            continue
        fixed, mask = lossy_utf8(col)
        table = table.set_column(table.schema.get_field_index(name), name, fixed)
        bad = mask if bad is None else [a or b for a, b in zip(bad, mask)]
    if bad is None:
        return table
    err = pa.array([INVALID_UTF8 if b else None for b in bad], pa.string())
    if ROW_ERROR_COL in table.column_names:
        old = table.column(ROW_ERROR_COL)
        err = pc.coalesce(old, err)
        return table.set_column(table.schema.get_field_index(ROW_ERROR_COL), ROW_ERROR_COL, err)
    return table.append_column(ROW_ERROR_COL, err)

def compute_uid(urls, texts) -> pa.Array:
    """uid = first 128 bits of blake2b(url + "\\n" + text), as 32 hex chars.

    A per-row hashlib call: neither Arrow nor polars offers a stable 128-bit hash (polars' hash
    is 64-bit and not stable across versions), and uids must never change. ~1.5 µs a row; it runs
    once, at ingest (or when a user's input lacks uids).
    """
    urls = pa.array(urls, type=pa.string()) if not isinstance(urls, (pa.Array, pa.ChunkedArray)) else urls
    texts = pa.array(texts, type=pa.string()) if not isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts
    # as bytes: equal to hashing the UTF-8 of f"{url}\n{text}", and never a decode error on broken text
    urls = pc.fill_null(urls.cast(pa.string()).cast(pa.binary()), b"").to_pylist()
    texts = pc.fill_null(texts.cast(pa.string()).cast(pa.binary()), b"").to_pylist()
    out = [hashlib.blake2b(u + b"\n" + t, digest_size=16).hexdigest() for u, t in zip(urls, texts)]
    return pa.array(out, type=pa.string())


def ensure_uid(table: pa.Table) -> pa.Table:
    """Add a uid column computed from url+text when the input has none (user-supplied folders); rows whose
    uid is null get theirs the same way (a row must have a uid: WebDataset keys, dedup and draws use it)."""
    have = "uid" in table.column_names
    if have and table.column("uid").null_count == 0:
        return table
    urls = table.column("url") if "url" in table.column_names else pa.nulls(table.num_rows, pa.string())
    uid = compute_uid(urls, table.column("text"))
    if not have:
        return table.append_column("uid", uid)
    old = table.column("uid")
    if not pa.types.is_string(old.type) and not pa.types.is_null(old.type):
        return table  # a mistyped uid column: check_columns says so in one line
    filled = pc.coalesce(old.cast(pa.string()), uid)
    return table.set_column(table.schema.get_field_index("uid"), "uid", filled)
