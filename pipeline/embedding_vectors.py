"""Vectors as the embedding store holds them and as scores use them: L2-normalised in float32, then float16
(`as_stored` gives a caller without a store the same bits), and the row-wise cosine every score is computed with
(in float32, divided by both norms again). One module, so a score computed anywhere equals one from the store."""

from __future__ import annotations

import numpy as np

from pipeline.embedding_keys import EmbeddingError, keys_to_hex, shard_stem

_CHUNK_ROWS = 1 << 16  # float32 work arrays are made this many rows at a time (memory bounded by a chunk)
_COSINE_ROWS = 1 << 12  # small enough for a chunk's float32 copies to stay in cache (bench/README.md)


def as_stored(vectors: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Vectors exactly as the store would hold them (L2-normalised in float32, then float16; zeros where not
    valid), without a store: a score computed from these equals one computed from stored vectors, bit for bit."""
    vectors = np.asarray(vectors)
    n = len(vectors)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, dtype=bool).reshape(-1)
    keys = np.zeros(n, "S16")
    return normalised_f16(vectors, np.arange(n), valid, keys, "memory")


def cosine(image_vecs: np.ndarray, text_vecs: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [n, dims] arrays, in float32 (float16 products summed in float16 lose digits).
    Divided by both norms again, so the float16 rounding of stored unit vectors does not shift scores; a row with
    a zero vector (not found) gives NaN. Computed a chunk of rows at a time: memory bounded by the chunk."""
    a, b = np.asarray(image_vecs), np.asarray(text_vecs)
    if a.shape != b.shape or a.ndim != 2:
        raise EmbeddingError(f"embeddings: cosine of shapes {a.shape} and {b.shape}: give two [rows, dims] arrays")
    out = np.empty(len(a), np.float32)
    for s in range(0, len(a), _COSINE_ROWS):
        x = a[s:s + _COSINE_ROWS].astype(np.float32)
        y = b[s:s + _COSINE_ROWS].astype(np.float32)
        dot = np.einsum("ij,ij->i", x, y)
        norm = np.sqrt(np.einsum("ij,ij->i", x, x) * np.einsum("ij,ij->i", y, y))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + _COSINE_ROWS] = np.where(norm > 0, dot / norm, np.nan)
    return out


def normalised_f16(vectors: np.ndarray, order: np.ndarray, valid: np.ndarray, keys: np.ndarray,
                   shard: str) -> np.ndarray:
    """The rows (in `order`) divided by their L2 norm in float32, as float16; rows not `valid` are zeros. A valid
    row that cannot be normalised (zero, inf or NaN) is an error naming its uid: it would score as anything."""
    n, d = len(order), vectors.shape[1]
    out = np.zeros((n, d), np.float16)
    for s in range(0, n, _CHUNK_ROWS):
        idx, ok = order[s:s + _CHUNK_ROWS], valid[s:s + _CHUNK_ROWS]
        x = vectors[idx].astype(np.float32, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
        bad = ok & ~(np.isfinite(norm) & (norm > 0))
        if bad.any():
            i = s + int(np.flatnonzero(bad)[0])
            raise EmbeddingError(f"embeddings: {shard_stem(shard)}: the vector of uid "
                                 f"{keys_to_hex(keys[i:i + 1])[0]} is zero or not finite")
        with np.errstate(invalid="ignore", divide="ignore"):
            unit = (x / np.where(ok, norm, 1.0)[:, None].astype(np.float32))
        out[s:s + _CHUNK_ROWS] = np.where(ok[:, None], unit, 0).astype(np.float16)
    return out
