"""Version-stable 64-bit hashing, vectorised over Arrow/numpy columns: one home for every stage.

Keys built here are saved in a run (statistics Parquet, shuffle pieces) and compared by later processes and
other machines, so they must be pure functions of the bytes: not polars' `hash` (not stable across polars
versions), not Python's `hash` (salted per process). SplitMix64's finaliser mixes; blake2b seeds and salts.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from pipeline.images import REF_COL

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_MAX_U64 = np.iinfo(np.uint64).max


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a well-mixed bijection on uint64, vectorised (wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> _U64(30))) * _M1
        z = (z ^ (z >> _U64(27))) * _M2
        return z ^ (z >> _U64(31))


def blake64(b: bytes) -> int:
    """The first 64 bits of blake2b, little-endian: salts and seeds."""
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")


def content64(b: bytes) -> int:
    """64-bit hash of an image's bytes (its content identity): XXH3, timed by hand far faster than blake2b on a
    JPEG, where blake2b was a visible share of align's whole per-image work (decode and dHash included; figures:
    bench/README.md, "The spine by hand"). Not cryptographic; none is needed: a collision among 10^8 images has
    odds ~3e-4, and costs one pair wrongly dropped as a copy."""
    return xxhash.xxh3_64_intdigest(b)


def salt64(name: str) -> np.uint64:
    return _U64(blake64(name.encode()))


def hash64_value(value: str | int) -> np.uint64:
    """A seed or salt as 64 bits: an integer as itself (mod 2^64), anything else by blake64 of its str."""
    if isinstance(value, (int, np.integer)):
        return _U64(int(value) & 0xFFFFFFFFFFFFFFFF)
    return salt64(str(value))


def uid_to_u64(uids) -> np.ndarray:
    """Fold a 128-bit hex uid into 64 bits (high half ^ mix64(low half)). Non-hex uids (user data) are hashed."""
    s = pl.Series(values=uids, dtype=pl.String) if not isinstance(uids, pl.Series) else uids.cast(pl.String)
    hi = s.str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False)
    lo = s.str.slice(16, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False)
    bad = (hi.is_null() | lo.is_null() | (s.str.len_chars() != 32)).to_numpy()
    hi_np = hi.fill_null(0).to_numpy().astype(_U64)
    lo_np = lo.fill_null(0).to_numpy().astype(_U64)
    out = hi_np ^ mix64(lo_np)
    if bad.any():
        for i in np.flatnonzero(bad):  # rare path: only malformed user uids
            out[i] = hash64_value(str(s[int(i)]))
    return out


def uniform_of_keys(keys: np.ndarray, seed: int, salt: str | int | np.ndarray = 0) -> np.ndarray:
    """`uniform` from the uids' 64-bit keys (`uid_to_u64`): numpy only, so safe in forked DataLoader workers
    (polars deadlocks in a child forked after the parent used its thread pool)."""
    keys = np.asarray(keys, dtype=_U64)
    base = mix64(np.asarray([hash64_value(seed)], dtype=_U64))[0]
    if isinstance(salt, np.ndarray):
        salt_arr = salt.astype(_U64)
    else:
        salt_arr = np.full(len(keys), hash64_value(salt), dtype=_U64)
    with np.errstate(over="ignore"):
        x = mix64(keys ^ mix64(salt_arr ^ base))
    return (x >> _U64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def uniform(uids, seed: int, salt: str | int | np.ndarray = 0) -> np.ndarray:
    """U(uid, seed, salt) in [0, 1): a pure function of its arguments, vectorised over uids.

    `salt` may be a per-row integer array (e.g. MetaCLIP's entry id, so each (uid, entry) pair gets its
    own draw). Results never depend on shard boundaries, worker count or row order.
    """
    return uniform_of_keys(uid_to_u64(uids), seed, salt)


def combine64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Order-sensitive 64-bit combination of two hash columns."""
    return mix64(mix64(np.asarray(a, dtype=_U64)) ^ np.asarray(b, dtype=_U64))


def hash64_strings(values, salt: str = "") -> np.ndarray:
    """64-bit hash of each string's UTF-8 bytes, vectorised over an Arrow string column.

    Why not polars' `hash`: it is not stable across polars versions, and these keys are saved in the
    run (stats Parquet) and compared by later processes. This is a pure function of the bytes: the
    string is read as little-endian 8-byte words (one numpy step per word position, over all strings
    at once), each folded in with SplitMix64, seeded with the byte length and `salt`. Nulls hash as "".
    """
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], type=pa.string())
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=_U64)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lo, hi = int(offsets[0]), int(offsets[-1])
    padded = np.zeros(hi - lo + 8, dtype=np.uint8)
    padded[: hi - lo] = data[lo:hi]
    starts = offsets[:-1] - lo
    lens = offsets[1:] - offsets[:-1]
    # every byte offset viewed as a little-endian uint64 (unaligned, overlapping): one gather per word
    words = np.ndarray(shape=(hi - lo + 1,), dtype="<u8", buffer=padded, offset=0, strides=(1,))
    nwords = (lens + 7) // 8
    long = np.flatnonzero(nwords > _LONG_WORDS)
    if len(long):
        # the vectorised fold below costs one numpy round per word position of the LONGEST string: a single
        # 1 MB caption would take seconds. Strings over _LONG_WORDS words are folded one by one in plain
        # Python integers instead (same function, same values), and leave the vectorised loop short.
        seed = mix64(lens[long].astype(_U64) ^ salt64("hash64:" + salt))
        long_h = np.array([_fold_words(int(h0), padded[starts[i] : starts[i] + lens[i]].tobytes())
                           for h0, i in zip(seed, long)], dtype=_U64)
        nwords = nwords.copy()
        nwords[long] = 0  # hashed above; the loop below skips them (0 words), their slot is overwritten
    order = np.argsort(-nwords, kind="stable")
    s_starts, s_lens, s_nw = starts[order], lens[order], nwords[order]
    h = mix64(s_lens.astype(_U64) ^ salt64("hash64:" + salt))
    max_w = int(s_nw[0]) if n else 0
    active = count_gt(s_nw, max_w)  # active[w]: strings with more than w words (a prefix: sorted)
    for w in range(max_w):
        k = int(active[w])
        rem = s_lens[:k] - 8 * w
        word = words[s_starts[:k] + 8 * w].astype(_U64)
        part = rem < 8
        if part.any():
            shift = (rem[part] * 8).astype(_U64)
            word[part] &= (_U64(1) << shift) - _U64(1)
        h[:k] = mix64(h[:k] ^ word)
    out = np.empty(n, dtype=_U64)
    out[order] = h
    if len(long):
        out[long] = long_h
    return out


_LONG_WORDS = 256  # strings longer than this many 8-byte words (2 KB) are hashed by _fold_words
_MASK64 = (1 << 64) - 1


def _fold_words(h: int, data: bytes) -> int:
    """hash64_strings' fold for one string, in Python integers: h = mix64(h ^ word) per little-endian
    8-byte word (the last one zero-padded), starting from the seeded length hash `h`."""
    g, m1, m2 = int(_GOLDEN), int(_M1), int(_M2)
    data = data + b"\0" * (-len(data) % 8)
    for word in np.frombuffer(data, dtype="<u8").tolist():
        z = ((h ^ word) + g) & _MASK64
        z = ((z ^ (z >> 30)) * m1) & _MASK64
        z = ((z ^ (z >> 27)) * m2) & _MASK64
        h = z ^ (z >> 31)
    return h


def count_gt(sorted_desc: np.ndarray, max_w: int) -> np.ndarray:
    """For w in 0..max_w-1: how many entries of a descending array are > w."""
    asc = sorted_desc[::-1]
    return len(asc) - np.searchsorted(asc, np.arange(max_w), side="right")


def uid_rank(uids) -> np.ndarray:
    """uint64 whose order is the order of the uids (first 64 of their 128 bits, hex), for "smallest uid".

    Ingest's uids are 32 lowercase hex chars, so this is their string order. A user's malformed uid
    ranks by a hash of itself instead (still a pure function of the uid).
    """
    s = pl.Series("uid", uids).cast(pl.String).str.to_lowercase()
    hi = s.str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False)
    bad = (hi.is_null() | (s.str.len_chars() != 32)).fill_null(True).to_numpy()
    out = hi.fill_null(0).to_numpy().astype(_U64)
    if bad.any():
        out[bad] = hash64_strings(pa.array(s.filter(pl.Series(bad)).fill_null("").to_list(), pa.string()), "uid")
    return out


def row_content_key(table: pa.Table, image_content: np.ndarray | None = None) -> np.ndarray:
    """64-bit key of each row's whole content: every column (names sorted, so column order does not matter),
    each value hashed with `hash64_strings` from a canonical string (strings and binaries as their bytes,
    numbers and other scalars as Arrow's cast to string, lists and structs as JSON), nulls apart from "".
    `image_ref` is a place, not content (the same bytes stored twice, or a pool cut into other shards, give other
    references): it is left out, and the image's content hash (`image_content`, 0 = no bytes) stands in for it.
    A pure function of what the row holds: copies of a uid are ordered by that, never by where they sit."""
    n = table.num_rows
    h = np.full(n, salt64("row"), dtype=_U64)
    if image_content is not None:
        h = combine64(h, np.asarray(image_content, dtype=_U64))
    for name in sorted(c for c in table.column_names if c != REF_COL):
        col = table.column(name)
        col = col.combine_chunks() if col.num_chunks else pa.array([], col.type)
        t = col.type
        if pa.types.is_dictionary(t):
            col, t = col.cast(t.value_type), t.value_type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            text = col
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            text = col.cast(pa.large_binary()).view(pa.large_string())  # the bytes as they are, unvalidated
        elif pa.types.is_nested(t):
            text = pl.from_arrow(pa.table({name: col})).select(pl.struct(name).struct.json_encode())
            text = text.to_series().to_arrow()
        else:
            text = col.cast(pa.string())
        v = hash64_strings(text, "col:" + name)
        null = pc.is_null(col).to_numpy(zero_copy_only=False)
        v[null] = salt64("null")
        h = combine64(combine64(h, salt64("name:" + name)), v)
    return h


# ---- which copy of a uid is kept (ingest and align: one rule) -----------------------------------------------
def row_positions(shard: str, n: int) -> np.ndarray:
    """A position hash per row of a shard, (shard name, row): orders byte-identical copies of a uid, for which the
    choice changes nothing but the shard the one kept lands in."""
    at = hash64_strings(pa.array([str(shard)], pa.string()), "shard")[0]
    return combine64(np.full(n, at, dtype=_U64), np.arange(n, dtype=_U64))


def other_copy_kept(ck: np.ndarray, ck_min: np.ndarray, pos: np.ndarray, pos_min: np.ndarray) -> np.ndarray:
    """Rows that are not the kept copy of their uid. The copy kept has the smallest content key (`row_content_key`)
    among the uid's rows, then the smallest position among those with that key; `ck_min` and `pos_min` are those
    pool-wide minima (the u64 maximum where the uid, or the uid x content key, occurs once)."""
    return (ck > ck_min) | ((ck == ck_min) & (pos > pos_min))


def fingerprint(obj: Any) -> str:
    """A step's (or a download's, a cache entry's) identity: sha256 of the canonical JSON of what it is made
    from, 16 hex digits. Key order does not matter; values JSON cannot hold are taken by str()."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
