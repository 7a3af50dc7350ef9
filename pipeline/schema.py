"""The row schema every shard follows, and checks that fail with one line naming shard and column.

Type checks go by *family* (string/large_string, binary/large_binary, any integer width), because
polars writes large types and img2dataset writes int64 sizes: the data is right, only the width differs,
so we cast instead of refusing.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import SchemaError


# Rows the reader found unusable (today: a string column that is not valid UTF-8) carry their reason
# in this column, null for every good row. `Stage` sends such rows to `rejected` with that reason before
# a stage's collect/apply sees the shard, so one bad caption never fails a billion-row run.
ROW_ERROR_COL = "_row_error"
INVALID_UTF8 = "invalid_utf8"
# A uid names files (emit's tar members `<uid>.jpg`) and is read as a 128-bit number (emit's uids.npy): only
# what `compute_uid` makes is one. A pool's `../../x`, `<script>`, empty or uppercase uid is a row error.
INVALID_UID = "invalid_uid"
UID_PATTERN = r"^[0-9a-f]{32}$"
# Text longer than `[run] max_text_bytes` (UTF-8 bytes): set aside before any rule tokenises it.
TEXT_TOO_LONG = "text_too_long"
MAX_TEXT_BYTES = 4096  # RunConfig.max_text_bytes' default
# What a stage's notes say about rows of each reason (one line per reason present)
ROW_ERROR_NOTES = {
    INVALID_UTF8: "rows whose text is not valid UTF-8 are rejected",
    INVALID_UID: "rows whose uid is not 32 lowercase hex characters are rejected",
    TEXT_TOO_LONG: "rows whose text is over [run] max_text_bytes = {max_text_bytes} bytes are rejected",
}


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
            have = ", ".join(table.column_names[:12]) + (", ..." if table.num_columns > 12 else "")
            raise SchemaError(f"shard {shard}: missing column '{name}'{who}; its columns: {have or 'none'}")
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


def valid_uids(uids) -> pa.Array | pa.ChunkedArray:
    """Per row: the uid is exactly 32 lowercase hex characters, as `compute_uid` makes it (null: False).
    Vectorised: one anchored RE2 match per value, which stops at the first character that cannot follow."""
    uids = uids.cast(pa.string()) if not pa.types.is_string(uids.type) else uids
    ok = pc.and_(pc.equal(pc.binary_length(uids), 32), pc.match_substring_regex(uids, UID_PATTERN))
    return pc.fill_null(ok, False)


def _over(col, max_bytes: int):
    """Per row: the value is longer than `max_bytes` UTF-8 bytes (null: False); a length per value, no copy."""
    return pc.fill_null(pc.greater(pc.binary_length(col), max_bytes), False)


def _cut(table: pa.Table, name: str, mask, max_bytes: int) -> pa.Table:
    """`name`'s values where `mask` is set cut to their first `max_bytes` characters (valid UTF-8 still)."""
    col = table.column(name)
    cut = pc.if_else(mask, pc.utf8_slice_codeunits(col, 0, max_bytes), col)
    return table.set_column(table.schema.get_field_index(name), name, cut)


def flag_row_limits(table: pa.Table, max_text_bytes: int, uid: bool = True,
                    text: bool = True) -> tuple[pa.Table, bool]:
    """Rows no stage may see, flagged in ROW_ERROR_COL (a reason flagged earlier, `invalid_utf8`, stays):
    `invalid_uid` (`uid`: not 32 lowercase hex characters) and `text_too_long` (`text`: over `max_text_bytes`
    UTF-8 bytes). A value over the limit (a 10 MB caption, a 10 MB uid) is cut to its first `max_text_bytes`
    characters here, so nothing after the reader holds it: not the set-aside filter, the rejected shard, nor
    the report that reads it. The input keeps the whole value. Vectorised: a length and a regex per column,
    no Python object per row; a shard without such rows gets no new column. Returns (the table, whether a
    value was cut: the caller may then give the long values' memory back, `release_cut_memory`)."""
    rules, cut = [], False  # (reason, mask), first reason wins
    if uid and "uid" in table.column_names:
        rules.append((INVALID_UID, pc.invert(valid_uids(table.column("uid")))))
        if pc.any(long := _over(table.column("uid"), max_text_bytes)).as_py():
            table, cut = _cut(table, "uid", long, max_text_bytes), True
    if text and "text" in table.column_names and _family(table.schema.field("text").type) == "string":
        long = _over(table.column("text"), max_text_bytes)
        if pc.any(long).as_py():
            table, cut = _cut(table, "text", long, max_text_bytes), True
        rules.append((TEXT_TOO_LONG, long))
    rules = [(reason, mask) for reason, mask in rules if pc.any(mask).as_py()]
    if not rules:
        return table, cut
    err = pa.nulls(table.num_rows, pa.string())
    for reason, mask in reversed(rules):
        err = pc.if_else(mask, pa.scalar(reason, pa.string()), err)
    if ROW_ERROR_COL in table.column_names:
        err = pc.coalesce(table.column(ROW_ERROR_COL), err)
        return table.set_column(table.schema.get_field_index(ROW_ERROR_COL), ROW_ERROR_COL, err), cut
    return table.append_column(ROW_ERROR_COL, err), cut


def release_cut_memory() -> None:
    """Give the pages of values `flag_row_limits` cut (once nothing holds them) back to the OS. Reading a 10 MB
    caption from Parquet takes several times its size for a moment (page, dictionary, the column's buffer), and
    Arrow's default pool (mimalloc) keeps it after the tables are dropped, under whatever the stage does next:
    measured by hand, one such caption raised metaclip's peak on a small shard, and releasing here takes back
    over half of that (figures: bench/README.md, "The spine by hand")."""
    pa.default_memory_pool().release_unused()


def compute_uid(urls, texts) -> pa.Array:
    """uid = first 128 bits of blake2b(url + "\\n" + text), as 32 hex chars.

    A per-row hashlib call: neither Arrow nor polars offers a stable 128-bit hash (polars' hash
    is 64-bit and not stable across versions), and uids must never change. Cheap per row (timed by hand:
    bench/README.md, "The spine by hand"), and it runs once, at ingest (or when a user's input lacks uids).
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


def uid_list(uids):
    """A sorted structured array (hi, lo) of 128-bit uids: how DataComp stores a subset's uid list (`np.save`), and
    what emit's `uids.npy` and `optout-recheck`'s drop list hold. `uids`: valid uids (`valid_uids`), any Arrow
    string array or sequence."""
    import numpy as np
    import polars as pl

    s = pl.Series(pa.chunked_array([uids]) if isinstance(uids, pa.Array) else uids, dtype=pl.String)
    arr = np.empty(len(s), dtype=[("hi", "<u8"), ("lo", "<u8")])
    arr["hi"] = s.str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=True).to_numpy()
    arr["lo"] = s.str.slice(16, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=True).to_numpy()
    arr.sort(order=["hi", "lo"])
    return arr
