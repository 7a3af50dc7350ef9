"""align's near-duplicate search keys: each row's MinHash LSH band keys, the costliest per-row work of both
passes, computed once in collect and left in the stage folder for apply (the stage's mixin)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa

from pipeline.context import ShardContext

from .features import RowFeatures
from .minhash import MinHasher
from .rules import TooFewWords, TooManyWords
from .text import shingles

_U64 = np.uint64


class BandKeys:
    """AlignStage's band keys: its `minhasher` (from the stage's config and seed) and their pass-1 cache."""

    @property
    def minhasher(self) -> MinHasher:
        if self._minhasher is None:
            c = self.config
            self._minhasher = MinHasher(c.num_perm, c.minhash_seed, c.near_dup_threshold)
        return self._minhasher

    # ---- near-duplicate search: MinHash LSH band keys ----
    def _band_rows(self, f: RowFeatures) -> np.ndarray:
        """Rows that take part in near-duplicate search: an image identity and a word count in range
        (a caption dropped for its length must not knock out its near-duplicate twin)."""
        c = self.config
        return f.id_ok & ~TooFewWords(c.min_words).mask(f) & ~TooManyWords(c.max_words).mask(f)

    def _bands(self, f: RowFeatures, rows_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row ids, [m, bands] band keys) for the masked rows."""
        idx = np.flatnonzero(rows_mask)
        if len(idx) == 0:
            return idx, np.zeros((0, self.minhasher.bands), dtype=_U64)
        rows, sh = shingles(f.tokens.gather(idx), self.config.shingle_size)
        sub_rows, sig = self.minhasher.signatures(rows, sh, len(idx))
        keys = self.minhasher.band_keys(sig, f.image_id[idx][sub_rows])
        return idx[sub_rows], keys

    # MinHash signatures and band keys are the costliest per-row work of both passes, and apply needs
    # the same keys collect made: collect leaves them in the stage folder (ShardContext.cache_put), apply takes
    # them. A missing or mismatching cache means computing them again (same keys: pure functions).
    def _bands_key(self) -> str:
        return json.dumps([dataclasses.asdict(self.config), self.seed, self.minhasher.bands, self.minhasher.rows],
                          sort_keys=True, default=str)

    def _cache_bands(self, table: pa.Table, brow: np.ndarray, keys: np.ndarray, ctx: ShardContext) -> None:
        n, b = table.num_rows, self.minhasher.bands
        mat = np.zeros((n, b), dtype=_U64)
        mat[brow] = keys
        has = np.zeros(n, dtype=bool)
        has[brow] = True
        ctx.cache_put("bands", table, {"has_bands": has,
                                        "band_keys": pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel()), b)},
                       self._bands_key())

    def _cached_bands(self, table: pa.Table, f: RowFeatures, rows_mask: np.ndarray,
                      ctx: ShardContext) -> tuple[np.ndarray, np.ndarray]:
        cached = ctx.cache_take("bands", table, self._bands_key())
        if cached is None:
            return self._bands(f, rows_mask)
        b = self.minhasher.bands
        mat = cached.column("band_keys").combine_chunks().flatten().to_numpy().reshape(-1, b)
        idx = np.flatnonzero(rows_mask & cached.column("has_bands").to_numpy(zero_copy_only=False))
        return idx, mat[idx]
