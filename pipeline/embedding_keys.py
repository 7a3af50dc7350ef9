"""Names and keys of the embedding store (pipeline/embeddings.py): the path components a model id or a shard
stem may be (checked before they touch a path), the two kinds, and uids as 16-byte keys, the form every file of
the store is sorted and searched by. Apart from the store because its files, its vector arithmetic and its callers
all need them, and they need nothing of the store."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schema, shards
from pipeline.shards import ShardError

KINDS = ("image", "text")
UID_BYTES = 16

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # one path component, not hidden, no `..` alone
_HEX = np.full(256, 255, dtype=np.uint8)  # ASCII byte -> nibble (255: not lowercase hex)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


class EmbeddingError(ShardError):
    """An embedding store cannot be used as asked. One line (a ShardError: the CLI prints it, exit 2)."""


# ---- names ------------------------------------------------------------------------------------------------

def check_component(value: Any, what: str) -> str:
    """`value` as one safe path component ([A-Za-z0-9._-], not starting with `.`, `_` or `-`, at most 200
    characters): a model id or a shard stem names a folder or file, so it is checked before it touches a path."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        shown = repr(value)[:60]
        raise EmbeddingError(f"embeddings: {what} {shown} is not one path component of letters, digits, '.', '_' "
                             "or '-' (starting with a letter or digit)")
    return value


def shard_stem(shard: str) -> str:
    """The metadata shard's name without `.parquet` (a path or a bare name): the store names its files after it."""
    name = shards.shard_name(str(shard))
    if name.endswith(".parquet"):
        name = name[: -len(".parquet")]
    return check_component(name, "shard name")


def check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise EmbeddingError(f"embeddings: kind {str(kind)[:40]!r} is neither 'image' nor 'text'")
    return kind


def uid_keys(uids: Any) -> np.ndarray:
    """32-hex uids (a pyarrow string array or chunked array, or a numpy/list of str) as 16-byte keys (numpy
    `S16`, whose order is the bytes' order and the hex strings' order). Every uid is checked first (32 lowercase
    hex characters, not null); the first bad one is named in a one-line error. Vectorised: one regex per value
    (schema.valid_uids), then a table lookup per character."""
    arr = _as_string_array(uids)
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype="S16")
    ok = schema.valid_uids(arr)
    if ok.false_count:
        bad = int(np.flatnonzero(~ok.to_numpy(zero_copy_only=False))[0])
        raise EmbeddingError(f"embeddings: uid {repr(arr[bad].as_py())[:50]} (row {bad}) is not 32 lowercase hex "
                             "characters")
    fixed = arr.cast(pa.binary(32))
    chars = np.frombuffer(fixed.buffers()[1], np.uint8, count=32 * n, offset=32 * fixed.offset).reshape(n, 32)
    nib = _HEX[chars]
    raw = (nib[:, 0::2] << 4) | nib[:, 1::2]
    return np.ascontiguousarray(raw).view("S16").ravel()


def keys_to_hex(keys: np.ndarray) -> pa.Array:
    """16-byte keys back to 32-hex uid strings (vectorised), e.g. to name rows a store holds."""
    raw = np.ascontiguousarray(keys, dtype="S16").view(np.uint8).reshape(-1, UID_BYTES)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    chars = np.empty((len(raw), 32), np.uint8)
    chars[:, 0::2], chars[:, 1::2] = digits[raw >> 4], digits[raw & 15]
    return pa.array(chars.view("S32").ravel(), pa.binary(32)).cast(pa.string())


def _as_string_array(uids: Any) -> pa.Array:
    if isinstance(uids, pa.ChunkedArray):
        uids = uids.combine_chunks()
    if isinstance(uids, np.ndarray) and uids.dtype.kind == "S":
        try:
            uids = uids.astype("U")
        except UnicodeDecodeError:
            raise EmbeddingError("embeddings: a uid is not 32 lowercase hex characters (not ASCII)") from None
    if not isinstance(uids, pa.Array):
        try:
            uids = pa.array(uids, pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            raise EmbeddingError("embeddings: uids must be strings of 32 lowercase hex characters") from None
    if pa.types.is_large_string(uids.type) or pa.types.is_string_view(uids.type):
        uids = uids.cast(pa.string())
    if not pa.types.is_string(uids.type):
        raise EmbeddingError(f"embeddings: uids must be strings of 32 lowercase hex characters, not {uids.type}")
    return uids
