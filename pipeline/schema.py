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


# column -> (type family, arrow type we store it as)
ROW_SCHEMA: dict[str, pa.DataType] = {
    "uid": pa.string(),
    "url": pa.string(),
    "text": pa.string(),
    "image": pa.binary(),
    "width": pa.int32(),
    "height": pa.int32(),
    "orig_width": pa.int32(),
    "orig_height": pa.int32(),
}

IMAGE_COLUMNS = ("image", "width", "height", "orig_width", "orig_height")


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
        have = table.schema.field(name).type
        if have == want:
            continue
        fam_have, fam_want = _family(have), _family(want)
        if fam_have != fam_want and fam_have != "null":
            raise SchemaError(f"shard {shard}: column '{name}' has type {have}, expected {want}{who}")
        try:
            col = table.column(name).cast(want)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise SchemaError(f"shard {shard}: column '{name}' cannot be read as {want}: {e}") from None
        table = table.set_column(table.schema.get_field_index(name), name, col)
    return table


def compute_uid(urls, texts) -> pa.Array:
    """uid = first 128 bits of blake2b(url + "\\n" + text), as 32 hex chars.

    A per-row hashlib call: neither Arrow nor polars offers a stable 128-bit hash (polars' hash
    is 64-bit and not stable across versions), and uids must never change. ~1.5 µs a row; it runs
    once, at ingest (or when a user's input lacks uids).
    """
    urls = pa.array(urls, type=pa.string()) if not isinstance(urls, (pa.Array, pa.ChunkedArray)) else urls
    texts = pa.array(texts, type=pa.string()) if not isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts
    urls = pc.fill_null(urls.cast(pa.string()), "").to_pylist()
    texts = pc.fill_null(texts.cast(pa.string()), "").to_pylist()
    out = [
        hashlib.blake2b(f"{u}\n{t}".encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        for u, t in zip(urls, texts)
    ]
    return pa.array(out, type=pa.string())


def ensure_uid(table: pa.Table) -> pa.Table:
    """Add a uid column computed from url+text when the input has none (user-supplied folders)."""
    if "uid" in table.column_names:
        return table
    urls = table.column("url") if "url" in table.column_names else pa.nulls(table.num_rows, pa.string())
    uid = compute_uid(urls, table.column("text"))
    return table.append_column("uid", uid)
