"""What pass 2 adds to a shard's `RowFeatures` from the pool, each fact by its named provider (`PoolFacts`):
word counts, which copy of a uid is kept, the counts by image identity and the smallest uid per band key,
looked up in the merged statistics (or the answers for this shard), and the pass-1 pixel facts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.context import ShardContext
from pipeline.hashing import combine64, hash64_strings, other_copy_kept, row_content_key, row_positions
from pipeline.rules import provides

from .features import RowFeatures, judged_size, row_features
from .rules import ExactDuplicate
from .stats import AlignAnswer, AlignStats, lookup_values
from .text import word_table

_U64 = np.uint64
_MAX_U64 = np.iinfo(np.uint64).max


class PoolFacts(RowFeatures):
    """align's pass-2 facts, each by its named provider, from `source`: (the stage, the shard, its statistics or
    answers, its context)."""

    FIELDS = RowFeatures.FIELDS + ("source",)

    def _has_ids(self) -> bool:
        """Pool-wide counts by image identity (content hash, or url in text-only pools) exist."""
        _, _, stats, _ = self.source
        return bool(self.id_ok.any() or int(stats.meta.get("id_rows", 0)))

    @provides("decoded", "phash", "width", "height")
    def _pixels(self):
        _, table, stats, _ = self.source
        img = self.images if int(stats.meta.get("image_rows", 0)) > 0 else None
        decoded, phash = (img["decoded"], img["phash"]) if img is not None else (None, None)
        zeros = np.zeros(self.n, dtype=np.int64)
        dw, dh = (img["width"], img["height"]) if img is not None else (zeros, zeros)
        return (decoded, phash, *judged_size(table, decoded, dw, dh))

    @provides("words", "token_row", "token_word", "word_count")
    def _word_counts(self):
        """Each distinct word's pool count, for rare_token."""
        _, _, stats, _ = self.source
        words, token_row, token_word = word_table(self.tokens)
        counts = (lookup_values(stats.lookup("token_n"), hash64_strings(words.to_arrow(), "tok"), 0) if len(words)
                  else np.zeros(0, _U64))
        return words, token_row, token_word, counts

    @provides("other_copy_kept")
    def _copy_kept(self):
        """Which copy of each uid is kept: every row has a uid, so this is known in every pool."""
        stage, table, stats, ctx = self.source
        ck, copy_key, pos = stage._copy_keys(table, self, ctx)
        ck_min = lookup_values(stats.lookup("uid_ck"), self.uid, _MAX_U64)
        pos_min = lookup_values(stats.lookup("copy_pos"), copy_key, _MAX_U64)
        return other_copy_kept(ck, ck_min, pos, pos_min)

    @provides("texts_per_image", "images_per_text", "pair_uid_min")
    def _image_counts(self):
        stage, _, stats, ctx = self.source
        if not self._has_ids():
            return None, None, np.full(self.n, _MAX_U64, dtype=_U64)
        if not self.has_bytes.any() and self.id_ok.any():
            stage._note(ctx, "no image bytes: the url stands in for the image in image_many_texts, "
                        "text_many_images, exact_duplicate and near_duplicate")
        return (lookup_values(stats.lookup("image_texts"), self.image_id, 0),
                lookup_values(stats.lookup("text_images"), self.text_h, 0),
                lookup_values(stats.lookup("pair_uid"), combine64(self.image_id, self.text_h), _MAX_U64))

    @provides("band_uid_min")
    def _band_minimum(self):
        if not self._has_ids():
            return None
        stage, table, stats, ctx = self.source
        band_uid_min = np.full(self.n, _MAX_U64, dtype=_U64)
        # an exact duplicate is not searched for near ones (exact_duplicate comes first): less MinHash work
        brow, keys = stage._cached_bands(table, self, stage._band_rows(self) & ~ExactDuplicate().mask(self), ctx)
        if len(brow):
            mins = lookup_values(stats.lookup("band_uid"), keys.ravel(), _MAX_U64).reshape(keys.shape)
            band_uid_min[brow] = mins.min(axis=1)
        return band_uid_min

    @provides("captions")
    def _captions(self):
        stage, table, _, _ = self.source
        return table.column("text").to_pylist() if stage.config.language else None


class PoolLookups:
    """AlignStage's pass-2 features, and the copy keys collect counts and apply looks up."""

    # the class of a shard's facts in apply: a stage that adds a rule over a new fact subclasses it with one
    # `@provides` method (tests/test_add_a_rule.py)
    facts_class: type = PoolFacts

    def _copy_keys(self, table: pa.Table, f: RowFeatures, ctx: ShardContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(content key, uid x content key, position hash) per row: what decides which copy of a uid is kept.
        The position (shard name, row) only orders byte-identical rows, for which the choice changes nothing
        but the shard the one kept lands in."""
        ck = row_content_key(table, np.where(f.has_bytes, f.content, _U64(0)))
        return ck, combine64(f.uid, ck), row_positions(ctx.shard, table.num_rows)

    def _rule_features(self, table: pa.Table, stats: AlignStats | AlignAnswer, ctx: ShardContext) -> RowFeatures:
        """The shard's features; what the rules read from the pool and the pixels comes from `PoolFacts`'
        providers, each when first read (None: no data)."""
        # images: decoded once, in collect (the pass-1 cache), or here when the cache is missing
        return row_features(table, self._cached_images(table, ctx), self.config.url_as_image, cls=self.facts_class,
                            source=(self, table, stats, ctx))
