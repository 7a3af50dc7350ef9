"""What pass 2 adds to a shard's `RowFeatures` from the pool: word counts, which copy of a uid is kept, the
counts by image identity and the smallest uid per band key, looked up in the merged statistics (or the
answers for this shard), and the pass-1 pixel facts (the stage's mixin)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.context import ShardContext
from pipeline.hashing import combine64, hash64_strings, other_copy_kept, row_content_key, row_positions

from .features import RowFeatures, judged_size
from .rules import ExactDuplicate
from .stats import AlignAnswer, AlignStats, lookup_values
from .text import word_table

_U64 = np.uint64
_MAX_U64 = np.iinfo(np.uint64).max


class PoolLookups:
    """AlignStage's pass-2 features, and the copy keys collect counts and apply looks up."""

    def _copy_keys(self, table: pa.Table, f: RowFeatures, ctx: ShardContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(content key, uid x content key, position hash) per row: what decides which copy of a uid is kept.
        The position (shard name, row) only orders byte-identical rows, for which the choice changes nothing
        but the shard the one kept lands in."""
        ck = row_content_key(table, np.where(f.has_bytes, f.content, _U64(0)))
        return ck, combine64(f.uid, ck), row_positions(ctx.shard, table.num_rows)

    def _rule_features(self, table: pa.Table, stats: AlignStats | AlignAnswer, ctx: ShardContext) -> RowFeatures:
        """The shard's features, and what the rules read from the pool and the pixels (None: no data)."""
        n = table.num_rows
        f = self._features(table, self._cached_images(table, ctx))
        # images: decoded once, in collect (the pass-1 cache), or here when the cache is missing
        img = f.images if int(stats.meta.get("image_rows", 0)) > 0 else None
        if img is not None:
            f.decoded, f.phash = img["decoded"], img["phash"]
        zeros = np.zeros(n, dtype=np.int64)
        dw, dh = (img["width"], img["height"]) if img is not None else (zeros, zeros)
        f.width, f.height = judged_size(table, f.decoded, dw, dh)

        # each distinct word's pool count, for rare_token
        f.words, f.token_row, f.token_word = word_table(f.tokens)
        f.word_count = (lookup_values(stats.lookup("token_n"), hash64_strings(f.words.to_arrow(), "tok"), 0) if len(f.words)
                        else np.zeros(0, _U64))

        # which copy of each uid is kept: every row has a uid, so this is known in every pool
        ck, copy_key, pos = self._copy_keys(table, f, ctx)
        ck_min = lookup_values(stats.lookup("uid_ck"), f.uid, _MAX_U64)
        pos_min = lookup_values(stats.lookup("copy_pos"), copy_key, _MAX_U64)
        f.other_copy_kept = other_copy_kept(ck, ck_min, pos, pos_min)

        # pool-wide counts by image identity (content hash, or url in text-only pools)
        f.pair_uid_min = np.full(n, _MAX_U64, dtype=_U64)
        if f.id_ok.any() or int(stats.meta.get("id_rows", 0)):
            f.texts_per_image = lookup_values(stats.lookup("image_texts"), f.image_id, 0)
            f.images_per_text = lookup_values(stats.lookup("text_images"), f.text_h, 0)
            f.pair_uid_min = lookup_values(stats.lookup("pair_uid"), combine64(f.image_id, f.text_h), _MAX_U64)
            # an exact duplicate is not searched for near ones (exact_duplicate comes first): less MinHash work
            f.band_uid_min = np.full(n, _MAX_U64, dtype=_U64)
            brow, keys = self._cached_bands(table, f, self._band_rows(f) & ~ExactDuplicate().mask(f), ctx)
            if len(brow):
                mins = lookup_values(stats.lookup("band_uid"), keys.ravel(), _MAX_U64).reshape(keys.shape)
                f.band_uid_min[brow] = mins.min(axis=1)
            if not f.has_bytes.any() and f.id_ok.any():
                self._note(ctx, "no image bytes: the url stands in for the image in image_many_texts, "
                           "text_many_images, exact_duplicate and near_duplicate")
        if self.config.language:
            f.captions = table.column("text").to_pylist()
        return f
