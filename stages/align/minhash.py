"""align's MinHash engine for near-duplicate captions: datasketch's MinHash, vectorised over a shard, and the
LSH band keys that `collect` counts over the pool and `apply` looks up."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import polars as pl

from pipeline.hashing import combine64, count_gt, mix64
from pipeline.errors import StageError

_U64 = np.uint64
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))


def _fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = _FMIX32
    with np.errstate(over="ignore"):
        h = h ^ (h >> s1)
        h = h * m1
        h = h ^ (h >> s2)
        h = h * m2
        return h ^ (h >> s3)


class MinHasher:
    """datasketch 2.0 MinHash (default 'affine32' scheme), vectorised over a whole shard.

    Same permutations and the same `sha1_hash32` as `datasketch.MinHash(num_perm, seed)`, so a row's
    signature equals `MinHash.update` over its shingles (checked in the tests). sha1 runs once per
    distinct shingle of the shard (a Python call each: hashlib has no vectorised form), then the
    permutations are one numpy broadcast and the per-row minimum a loop over shingle positions.
    """

    def __init__(self, num_perm: int, seed: int, threshold: float):
        from datasketch import MinHash
        from datasketch.lsh import _optimal_param  # what MinHashLSH(threshold, num_perm) itself uses

        m = MinHash(num_perm=num_perm, seed=seed)
        if getattr(m, "scheme", "affine32") != "affine32":
            raise StageError(f"align: datasketch MinHash scheme {m.scheme!r} is not the expected 'affine32'")
        self.a = np.asarray(m.permutations[0], dtype=np.uint32)
        self.b = np.asarray(m.permutations[1], dtype=np.uint32)
        # bands x rows minimising false positive + false negative area around the threshold, as
        # datasketch's MinHashLSH picks them (at threshold 1.0 that is 1 band: identical sketches only)
        self.bands, self.rows = (int(x) for x in _optimal_param(threshold, num_perm, 0.5, 0.5))
        self.num_perm = num_perm

    def signatures(self, rows: np.ndarray, sh: pl.Series, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(row ids that have shingles, their signatures [m, num_perm] uint32). `rows` must be sorted."""
        if len(rows) == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.num_perm), np.uint32)
        uniq = sh.unique(maintain_order=False).sort()
        sid = pl.DataFrame({"sh": sh}).join(
            pl.DataFrame({"sh": uniq, "i": np.arange(len(uniq), dtype=np.int64)}), on="sh", how="left", maintain_order="left"
        )["i"].to_numpy()
        # one sha1 per distinct shingle: the only per-item Python step (no vectorised sha1 exists)
        hv = np.fromiter(
            (struct.unpack("<I", hashlib.sha1(s.encode("utf-8")).digest()[:4])[0] for s in uniq.to_list()),
            dtype=np.uint32,
            count=len(uniq),
        )
        with np.errstate(over="ignore"):
            pv = self.a[None, :] * _fmix32(hv)[:, None] + self.b[None, :]  # [distinct shingles, num_perm]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        row_ids = rows[starts]
        lens = np.diff(np.r_[starts, len(rows)])
        # Longest rows first; step j folds in every row's j-th shingle with one contiguous minimum over
        # the rows that have one (a prefix): timed by hand much faster than minimum.reduceat over axis 0
        # (bench/README.md, "align by hand").
        order = np.argsort(-lens, kind="stable")
        s_starts, s_lens = starts[order], lens[order]
        sig = pv[sid[s_starts]]
        active = count_gt(s_lens, int(s_lens[0]))
        for j in range(1, int(s_lens[0])):
            k = int(active[j])
            np.minimum(sig[:k], pv[sid[s_starts[:k] + j]], out=sig[:k])
        out = np.empty_like(sig)
        out[order] = sig
        sig = out
        return row_ids, sig

    def band_keys(self, sig: np.ndarray, image_id: np.ndarray) -> np.ndarray:
        """[m, bands] uint64 keys: hash(image, band index, the band's r values)."""
        out = np.empty((len(sig), self.bands), dtype=_U64)
        for j in range(self.bands):
            h = combine64(image_id, np.full(len(sig), j, dtype=_U64))
            for v in sig[:, j * self.rows : (j + 1) * self.rows].T:
                h = mix64(h ^ v.astype(_U64))
            out[:, j] = h
        return out
