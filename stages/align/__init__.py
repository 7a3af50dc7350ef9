"""align: ALIGN's noise filters (arXiv 2102.05918, section 3), DataComp's basic filter, and dedup.

Rules, in the order a rejected row names the first one it breaks (`REASONS`):

  image_unreadable     image bytes null, not decodable, truncated, or over `max_image_pixels`
                       (Pillow's decompression-bomb limit). Our own rule, first, so a bad image never
                       crashes a worker and never reaches the size rules. Only in pools that hold images.
  image_too_small      min(orig_width, orig_height) < min_side
  aspect_ratio         max/min side > max_aspect
  image_many_texts     the image (exact content hash) comes with > max_texts_per_image distinct alt-texts
  text_many_images     the normalised alt-text comes with > max_images_per_text distinct images
  too_few_words        < min_words word tokens
  too_many_words       > max_words word tokens
  rare_token           a token seen < min_token_count times in the pool AND unknown to wordfreq's
                       reference vocabulary (Zipf < min_zipf)
  exact_duplicate      same image hash and same normalised text as a row with a smaller uid; or another copy
                       of the row's uid (same url and text) is the one kept: of the rows that share a uid, align
                       keeps exactly one, the one with the smallest content key (`row_content_key`: a 64-bit
                       hash of every column of the row, names sorted, so copies that differ anywhere, e.g. in
                       the caption's other columns or the image bytes, are ordered by what they hold; the
                       `image_ref`, a place, is left out and the image's content hash stands in for it).
                       Copies with the same content key hold the same row and the same image bytes: any one of
                       them is the same output, and the one kept is the one with the smallest (shard name, row)
                       hash. uid stays unique downstream.
  near_duplicate       shares a MinHash-LSH band (word shingles, Jaccard threshold) with a caption of
                       the same image that has a smaller uid
  eval_near_duplicate  perceptual hash within `eval_hamming` bits of an evaluation image
  language             (off unless `language` is set) py3langid says another language
  invalid_utf8         (every stage, before its rules: `pipeline.stage.Stage`) uid/url/text bytes that are not
                       UTF-8; the row is set aside before collect, so pool counts never see it
  invalid_uid          (every stage, the same way) a uid that is not 32 lowercase hex characters
  text_too_long        (every stage, the same way) text over `[run] max_text_bytes` UTF-8 bytes

Pool-wide facts come from `collect` (per shard) and `merge` (associative sums/mins over 64-bit keys):
token counts; one row per distinct (image, text) pair (its smallest uid and row count), from which
texts-per-image and images-per-text follow; the smallest uid per LSH band key; and, per uid, its smallest
content key and row count (`uids`), and per (uid, content key) the smallest position hash (`copies`). They are keyed by
64-bit hashes (16-40 bytes a row, never row payloads), but they still grow with the pool, so the runner
shuffles them (`split`: each table cut by its key's hash; `merge` per partition; `answer`: the lookups one
shard needs) and no task ever holds the whole. Nothing depends on shard boundaries, row order, worker
count or partition count.

Two image hashes, on purpose:
  * `image_hash` = XXH3-64 of the encoded bytes (`content64`). "Same image" for the pool-wide counts and for
    duplicates. It is exact: two different product shots on white can share a 64-bit perceptual hash, and
    merging them would drop innocent captions. Re-encoded copies are missed by it; that is the price.
  * `image_phash` = 64-bit dHash (Pillow + numpy) of the decoded image, used only against the evaluation
    set, where near-copies (resized, re-encoded) must be caught.
Pixels are read once: rows carry only a reference to their image (`image_ref`, pipeline/images.py); `collect`
reads each shard's bytes through the run's image reader, a store file at a time, and computes every per-image
fact (content hash, decodable, decoded size, dHash) in that one pass. `apply` takes them from the pass-1 cache
(`ShardContext.cache_put`/`cache_take`) and reads the pixels again only when the cache is missing.
A text-only pool (no image bytes anywhere) uses the url as the image identity when there is one, so
boilerplate and duplicates are still found; the image-only rules are skipped and the manifest says so.

The package: `rules` (each rule a small unit over `features.RowFeatures`, and `judge`), `text` (normalise,
tokens, shingles), `minhash` (MinHash and LSH band keys), `images` (image facts, dHash, the eval set's Hamming
index), `stats` (the pool-wide tables, their merge and shuffle), and two parts of the stage as mixins: `bands` (the
band keys, cached from collect for apply) and `lookups` (pass 2's features from the pool); the stage here wires
them: `rules()` is the list.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import shards
from pipeline.config import ConfigError, check_ranges
from pipeline.hashing import combine64, hash64_strings
from pipeline.images import MAX_IMAGE_PIXELS
from pipeline.context import ShardContext
from pipeline.errors import StageError
from pipeline.rules import Rule, judge, split_by_reason
from pipeline.stage import Stage

from . import stats as _stats
from .bands import BandKeys
from .features import RowFeatures, row_features
from .images import (IMAGE_CHUNK, IMAGE_EXTS, IMAGE_FACTS, HammingIndex, decode_threads, dhash64, eval_files,
                     image_facts, inspect_image, load_eval_hashes)
from .lookups import PoolLookups
from .minhash import MinHasher
from .report import funnel_report
from .rules import (REASONS, AspectRatio, EvalNearDuplicate, ExactDuplicate, ImageManyTexts, ImageTooSmall,
                    ImageUnreadable, Language, LanguageId, NearDuplicate, RareToken, TextManyImages, TooFewWords,
                    TooManyWords, ZipfVocabulary)
from .stats import LOOKUPS, META_SUMS, AlignAnswer, AlignStats
from .text import TOKEN_RE, explode_tokens, normalise_text, shingles, tokenize

__all__ = [
    "REASONS", "AlignStage", "STAGE", "AlignStats", "AlignAnswer", "RowFeatures", "Rule", "MinHasher", "HammingIndex",
    "dhash64", "inspect_image", "load_eval_hashes", "decode_threads", "normalise_text", "tokenize", "shingles",
    "TOKEN_RE", "IMAGE_EXTS", "IMAGE_CHUNK", "META_SUMS", "LOOKUPS",
]

log = logging.getLogger("clipcurate.align")

_U64 = np.uint64


class AlignStage(BandKeys, PoolLookups, Stage):
    """ALIGN / DataComp-basic filtering with exact and near-duplicate removal and eval decontamination."""

    needs_pixels = True
    pixels_optional = True  # a text-only pool (a URL list): the text rules run, the image rules are skipped
    name = "align"
    worker_imports = ("datasketch",)  # MinHash permutations and LSH parameters: scipy is slow to import
    requires = {"uid": pa.string(), "text": pa.string()}

    @dataclasses.dataclass
    class Config:
        min_side: int = 200  # px, on orig_width/orig_height (size before any ingest resize)
        max_aspect: float = 3.0
        max_texts_per_image: int = 1000  # distinct normalised alt-texts per image hash
        max_images_per_text: int = 10  # distinct images per normalised alt-text
        min_words: int = 3
        max_words: int = 20
        # Rare = pool count < min_token_count AND Zipf < min_zipf. ALIGN keeps the 100M most frequent
        # unigrams+bigrams of 1.8B pairs; the count at that cut scales with pool size and is below 2
        # for any pool under ~1e9 pairs, so the smallest meaningful threshold, 2 ("seen once"), is the
        # default; raise it for web-scale pools. With Zipf < 1.5 (wordfreq 'en') it flags typos, product
        # codes, names and non-English words: a third of raw LAION alt-text, few human captions (the shares:
        # bench/README.md, align row; bench/results/align.json).
        min_token_count: int = 2
        min_zipf: float = 1.5
        zipf_language: str = "en"  # wordfreq reference vocabulary
        near_dup_threshold: float = 0.8  # Jaccard of word-shingle sets (MinHash LSH)
        num_perm: int = 128  # datasketch's default; LSH bands x rows chosen by datasketch (9 x 13)
        shingle_size: int = 1  # words per shingle: captions are short, one changed word in ten = J 0.82
        minhash_seed: int = 1
        eval_images: str = ""  # folder of images, or Parquet with image bytes / image_phash; "" = off
        eval_hamming: int = 6  # bits of dHash distance that count as the same image
        language: str = ""  # e.g. "en": drop captions py3langid assigns to another language; "" = off
        max_image_pixels: int = MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit (pipeline.images)
        url_as_image: bool = True  # text-only pools: the url stands in for the image in pool counts
        decode_threads: int = 0  # threads that hash and decode a shard's images; 0 = one per core
        # the rules this step runs, by name (REASONS), in REASONS' order whatever the order given; [] = every rule.
        # A text-first recipe runs the text rules on the URL list (`align@text`) and, after the download, the
        # image rules and the content-keyed counts and duplicates: running the pool-relative text rules
        # (rare_token) again on the survivors would judge them against a smaller pool.
        rules: list = dataclasses.field(default_factory=list)

        def __post_init__(self):
            check_ranges("align", self, min_side=(0, None), max_aspect=(1, None), max_texts_per_image=(1, None),
                         max_images_per_text=(1, None), min_words=(0, None), max_words=(max(0, self.min_words), None),
                         min_token_count=(0, None), near_dup_threshold=(0, 1), num_perm=(2, None),
                         shingle_size=(1, None), eval_hamming=(0, 64), max_image_pixels=(1, None),
                         decode_threads=(0, None))
            unknown = [r for r in self.rules if r not in REASONS]
            if unknown or not all(isinstance(r, str) for r in self.rules):
                raise ConfigError(f"config [align] rules: unknown rule {unknown[0] if unknown else self.rules!r} "
                                  f"(the rules: {', '.join(REASONS)})")

    speed_keys = frozenset({"decode_threads"})

    def __init__(self, config: Any = None, seed: int = 0):
        super().__init__(config, seed)
        c = self.config
        if c.min_words > c.max_words:
            raise StageError(f"align: min_words {c.min_words} > max_words {c.max_words}")
        if not 0.0 < c.near_dup_threshold <= 1.0:
            raise StageError(f"align: near_dup_threshold must be in (0, 1], got {c.near_dup_threshold}")
        if not 0 <= c.eval_hamming < 64:
            raise StageError(f"align: eval_hamming must be in [0, 63], got {c.eval_hamming}")
        self._minhasher: MinHasher | None = None
        self._eval: HammingIndex | None = None
        self._zipf = ZipfVocabulary(c.zipf_language)
        self._langid = LanguageId()

    # ---- the rules, in the order a rejected row names the first one it breaks ----
    def rules(self) -> list[Rule]:
        """Every rule, in order; those `rules` leaves out are not in the list (their rows are never judged by
        them, and the manifest does not name them as skipped)."""
        every = self._all_rules()  # a subclass may add its own rule to the list: it runs unless `rules` leaves it out
        chosen = set(self.config.rules) if self.config.rules else {r.name for r in every}
        return [r for r in every if r.name in chosen]

    def _all_rules(self) -> list[Rule]:
        c = self.config
        return [
            ImageUnreadable(),
            ImageTooSmall(c.min_side),
            AspectRatio(c.max_aspect),
            ImageManyTexts(c.max_texts_per_image),
            TextManyImages(c.max_images_per_text),
            TooFewWords(c.min_words),
            TooManyWords(c.max_words),
            RareToken(c.min_token_count, c.min_zipf, self._zipf),
            ExactDuplicate(),
            NearDuplicate(),
            EvalNearDuplicate(self.eval_index()),
            Language(c.language, self._langid),
        ]

    # ---- resources (the MinHash permutations, `minhasher`: bands.py) ----
    def eval_index(self) -> HammingIndex | None:
        if not self.config.eval_images:
            return None
        if self._eval is None:
            if not shards.exists(self.config.eval_images):
                raise StageError(f"align: eval_images {self.config.eval_images} does not exist")
            hashes, bad = load_eval_hashes(self.config.eval_images, self.config.max_image_pixels)
            self._eval = HammingIndex(hashes, self.config.eval_hamming)
            self._eval_bad = bad
        return self._eval

    def setup(self) -> None:
        if self.config.language:
            try:
                import py3langid  # noqa: F401
            except ModuleNotFoundError:
                raise StageError(
                    "align: language = "
                    f"{self.config.language!r} needs the py3langid package (pip install py3langid==0.3.0)"
                ) from None

    def preflight(self, ctx: ShardContext) -> list[str]:
        """The eval set `eval_images` names (it is read whenever set: its hashes build the eval rule), and
        py3langid when the language rule is on: looked for, nothing decoded or loaded."""
        import importlib.util

        c, out = self.config, []
        if c.eval_images:
            what = ("does not exist" if not shards.exists(c.eval_images)
                    else "is empty" if not eval_files(c.eval_images) else None)
            if what:
                out.append(f"eval set {c.eval_images} ([align] eval_images) {what}: give a folder of images or a "
                           "Parquet file/folder with image bytes or image_phash (a demo world writes eval/), or set "
                           "eval_images = \"\" to run without eval decontamination")
        if c.language and importlib.util.find_spec("py3langid") is None:  # as setup asks
            out.append(f"language = {c.language!r} needs the py3langid package: pip install py3langid==0.3.0, or set "
                       "[align] language = \"\"")
        return out

    def fingerprint_parts(self, ctx=None) -> dict:
        from importlib.metadata import version

        import datasketch

        # wordfreq's installed version (it has no __version__): its word lists judge rare_token, so an upgrade
        # redoes align
        parts = {"datasketch": datasketch.__version__, "wordfreq": version("wordfreq"),
                 "uid_copies": 1, "polars": pl.__version__,  # row_content_key JSON-encodes nested columns with polars
                 "dhash": "draft-L"}  # dHash of the image decoded straight to grey (was "RGB", then converted)
        if self.config.eval_images and shards.exists(self.config.eval_images):
            # the eval set's files and sizes, local or fsspec: a changed set redoes the stage
            files = eval_files(self.config.eval_images)
            name = self.config.eval_images.rstrip("/").rsplit("/", 1)[-1]
            parts["eval"] = [(rel or name, size) for rel, size in files]
        return parts

    # ---- per-row features shared by collect and apply ----
    def _features(self, table: pa.Table, img: dict | None) -> RowFeatures:
        return row_features(table, img, self.config.url_as_image)

    # ---- pixels: read once ----
    # Every per-image fact align needs (content hash, decodable, decoded size, dHash) comes from one read of the
    # shard's pixels through the image reader, in collect; apply takes them from the pass-1 cache
    # (ShardContext.cache_put/cache_take) and reads the pixels again only when the cache is missing.
    IMAGE_FACTS = IMAGE_FACTS

    def _inspect_images(self, table: pa.Table, ctx: ShardContext) -> dict | None:
        """{fact: array per row} for a shard whose rows reference images; None for a text-only pool."""
        batches = ctx.pixel_batches(table, IMAGE_CHUNK)
        if batches is None:
            return None
        c = self.config
        return image_facts(batches, table.num_rows, c.max_image_pixels, decode_threads(c.decode_threads))

    def _images_key(self) -> str:
        return json.dumps(["images", self.config.max_image_pixels, "dhash-draft-L"])

    def _cached_images(self, table: pa.Table, ctx: ShardContext) -> dict | None:
        cached = ctx.cache_take("images", table, self._images_key())
        if cached is None:
            return self._inspect_images(table, ctx)
        return {k: cached.column(k).to_numpy(zero_copy_only=False).astype(t) for k, t in self.IMAGE_FACTS.items()}

    # ---- pass 1 (near-duplicate search's MinHash LSH band keys, made here and cached for apply: bands.py) ----
    def collect(self, table: pa.Table, ctx: ShardContext | None = None) -> AlignStats:
        ctx = ctx or self.detached()
        img = self._inspect_images(table, ctx)
        if img is not None:
            ctx.cache_put("images", table, img, self._images_key())
        f = self._features(table, img)
        _, toks = explode_tokens(f.tokens)
        tok = hash64_strings(toks.to_arrow(), "tok") if len(toks) else np.zeros(0, _U64)
        ok = f.id_ok
        brow, keys = self._bands(f, self._band_rows(f))
        self._cache_bands(table, brow, keys, ctx)
        ck, copy_key, pos = self._copy_keys(table, f, ctx)
        meta = {"rows": table.num_rows, "image_rows": int(f.has_bytes.sum()), "id_rows": int(ok.sum())}
        return _stats.shard_stats(tok, f.image_id[ok], f.text_h[ok], f.uid[ok], combine64(f.image_id[ok], f.text_h[ok]),
                                  keys, f.uid[brow], (f.uid, ck), (copy_key, pos), meta)

    def merge(self, partials: list) -> AlignStats:
        return _stats.merge(partials)

    # ---- the shuffle (runner: memory per task flat in the pool size): stats.py ----
    def split(self, partial: AlignStats, n: int) -> list[AlignStats]:
        return _stats.split(partial, n)

    def answer(self, merged: AlignStats, piece: AlignStats) -> AlignAnswer:
        return _stats.answer(merged, piece)

    def join_answers(self, answers: list[AlignAnswer]) -> AlignAnswer:
        return _stats.join_answers(answers)

    def save_stats(self, stats: AlignStats, folder: str) -> None:
        _stats.save(stats, folder, self.minhasher.bands, self.minhasher.rows)

    def load_stats(self, folder: str) -> AlignStats:
        return _stats.load(folder)

    # ---- pass 2 ----
    # (the shard's features, and what the rules read from the pool and the pixels: lookups.py)
    def apply(self, table: pa.Table, stats: AlignStats | AlignAnswer,
              ctx: ShardContext | None = None) -> tuple[pa.Table, pa.Table]:
        ctx = ctx or self.detached()
        stats = stats if stats is not None else AlignStats.empty()
        f = self._rule_features(table, stats, ctx)
        reason, skipped = judge(self.rules(), f, f.n)
        out = table
        for name in ("image_phash", "image_hash"):
            if name in out.column_names:
                out = out.drop_columns([name])
        if f.decoded is not None:
            out = out.append_column("image_phash", pa.array(f.phash, pa.uint64(), mask=~f.decoded))
            out = out.append_column("image_hash", pa.array(f.content, pa.uint64(), mask=~f.has_bytes))
        else:
            out = out.append_column("image_phash", pa.nulls(f.n, pa.uint64()))
            out = out.append_column("image_hash", pa.nulls(f.n, pa.uint64()))
        if skipped:
            self._note(ctx, "skipped (no data for them): " + ", ".join(skipped))
        return split_by_reason(out, reason)

    @staticmethod
    def _note(ctx: ShardContext, text: str) -> None:
        msg = f"align: {text}"
        if msg not in ctx.notes:
            log.info(msg)
        ctx.note(msg)

    def report(self, stage_dir: str, out_dir: str) -> dict:
        """Funnel (rows dropped per rule, in rule order) as a table and a bar chart."""
        return funnel_report(stage_dir, out_dir)


STAGE = AlignStage
