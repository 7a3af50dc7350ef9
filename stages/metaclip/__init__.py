"""metaclip: MetaCLIP curation (arXiv 2309.16671): substring matching against a concept list, then balancing.

Each text gets the ids of the list's entries it holds (`metaclip_entries`, list<int32>), found exactly as
MetaCLIP's substr_matching.py finds them (`matcher`). Pass 1 counts, per entry, the texts matching it; pass 2
keeps or rejects each pair. A row is rejected for the first rule it breaks, in this order (`balance.RULES`):

  low_score            (only with `score_col`/`min_score`) its score is under the cut, or missing: balance among
                       the good pairs, so these are not counted either
  no_entry             no entry occurs in the text: MetaCLIP curates by the concepts a text names
  other_text_of_image  (only with `one_text_per_image`) another matching text of the same image is kept:
                       MetaCLIP 2 keeps one alt-text per image
  balanced_out         not sampled: kept with probability 1 - prod_e (1 - p_e), p_e = t / max(count_e, t), so
                       tail entries (count < t) keep every text and head entries about t, which flattens the
                       kept set's concept distribution
  invalid_utf8         (every stage, before its rules: the runner sets these rows aside) text bytes that are not UTF-8
  invalid_uid          (the same) a uid that is not 32 lowercase hex characters
  text_too_long        (the same) text over `[run] max_text_bytes` UTF-8 bytes: never matched nor counted

Every draw is uniform(uid, seed, salt): u_e with salt = the entry id for balanced_out, "metaclip-one-text" for the
image's choice, "metaclip-target-sample" for the solver's sample; the outcome never depends on shards or workers.

Options:
  language_col   when set and present: counts per language, and per-language t by MetaCLIP 2's rule
                 (curate.py): p = t_to_p(counts[reference_language], t) = share of matches in entries
                 below t; every other language gets t_lang = p_to_t(counts[lang], p), the count at which
                 the cumulative share of its sorted counts is nearest p. `tail_share` > 0 sets p directly
                 for every language (reference language included). A null language is its own group "".
                 Without the reference language in the pool, p comes from all languages together.
  one_text_per_image  among a pool's matching texts with the same `image_col` value, the one with the smallest
                 uniform(uid, seed, "metaclip-one-text") (MetaCLIP 2: random.choice among the texts that match
                 an entry), pool-wide via collect/merge of (image key, smallest draw). Counts stay over all
                 matching texts, as in MetaCLIP 2. Ties (two 53-bit draws equal) keep both. Image keys are
                 pipeline.hashing's version-stable 64-bit hash of the `image_col` value (`balance.image_keys`).
  target_rows    > 0: t is solved for an expected kept count (`target`).

The package: `matcher` (spacing and the token-trie matcher), `balance` (the rules above as units, the keep
probabilities and their draws, MetaCLIP 2's t per language, one_text_per_image's choice), `target` (t for
target_rows), `stats` (the pool-wide counts: collect, merge, save, load), `report`. The stage here wires them.
Matching is most of the stage's time, so `collect` leaves each shard's matches in the stage folder
(`ShardContext.cache_put`, `_cache/`) and `apply` takes them instead of matching again; a missing or mismatching cache
(uids, texts, concept list) means matching again, with the same result.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from metadata import concepts
from pipeline.config import ConfigError, check_ranges
from pipeline.context import ShardContext
from pipeline.errors import StageError
from pipeline.rules import split_by_reason
from pipeline.stage import Stage

from . import balance, stats as _stats, target as _target
from .balance import Facts, entry_probs, judge, p_to_t, t_to_p, thresholds
from .matcher import DEFAULT_MATCHER, MATCHERS, Matcher, spacing
from .report import entry_report

# what other code imports from the package (tests, bench): the stage, its column, the matcher, MetaCLIP's formulas
__all__ = ["MetaClipStage", "STAGE", "OUT_COL", "MATCHERS", "DEFAULT_MATCHER", "Matcher", "spacing", "entry_probs",
           "p_to_t", "t_to_p"]

OUT_COL = "metaclip_entries"


class MetaClipStage(Stage):
    """Adds `metaclip_entries`; keeps each pair with MetaCLIP's balancing probability."""

    name = "metaclip"
    requires = {"uid": pa.string(), "text": pa.string()}

    @dataclasses.dataclass
    class Config:
        entries: str = ""  # concept list: "" = WordNet (built and cached); a .json list or one-a-line file
        t: int = 20000  # head/tail threshold (MetaCLIP: 20k for 400M pairs; scale it for small pools)
        matcher: str = DEFAULT_MATCHER  # the token trie, the only one (its contenders: bench/contender_matchers.py)
        language_col: str = ""  # column with a language code: per-language counts and t (MetaCLIP 2)
        tail_share: float = 0.0  # > 0: every language's t from this tail share; 0: from t on reference_language
        reference_language: str = "en"  # the language `t` applies to (MetaCLIP 2: English)
        one_text_per_image: bool = False  # keep one matching alt-text per image (MetaCLIP 2)
        image_col: str = "url"  # what identifies an image for one_text_per_image
        target_rows: int = 0  # > 0: solve t so that the expected kept count is this (t is then not used)
        target_sample: int = 200_000  # matched rows (a uniform sample by uid) the solver evaluates; all when fewer
        score_col: str = ""  # e.g. "dfn_score" (dfn with score_only): balance among the rows at or above min_score
        min_score: float | None = None  # rows below it (or unscored) are `low_score`, and are not counted

        def __post_init__(self):
            check_ranges("metaclip", self, t=(1, None), tail_share=(0, 1), target_rows=(0, None),
                         target_sample=(1, None))
            if self.matcher not in MATCHERS:
                raise ConfigError(f"config [metaclip] matcher = {self.matcher!r}: must be "
                                  f"{' or '.join(repr(m) for m in MATCHERS)} "
                                  "(the Aho-Corasick contenders are benchmark code: bench/contender_matchers.py)")
            if self.tail_share >= 1:  # a share of the matches, below all of them
                raise ConfigError(f"config [metaclip] tail_share = {self.tail_share!r}: must be at least 0 and below 1")
            if bool(self.score_col) != (self.min_score is not None):
                raise ConfigError("config [metaclip] score_col and min_score go together: the column holding a "
                                  "quality score (e.g. \"dfn_score\") and the cut to balance above")
            if self.target_rows and self.tail_share:
                raise ConfigError("config [metaclip] target_rows and tail_share both set: tail_share fixes every "
                                  "language's t, so there is no t left to solve (set one of them)")

    def __init__(self, config: Any = None, seed: int = 0):
        super().__init__(config, seed)  # Config checks every value (config [metaclip] ...)
        self._entries: list[str] | None = None
        self.matcher: Matcher | None = None

    # -- resources ------------------------------------------------------------------------------------------
    @property
    def entries(self) -> list[str]:
        if self._entries is None:
            try:
                self._entries = concepts.resolve_entries(self.config.entries)
            except concepts.ConceptListError as e:
                raise StageError(f"metaclip: {e}") from None
        return self._entries

    def setup(self) -> None:
        """The matcher, built once per worker process (the runner keeps one ready instance per process)."""
        self.matcher = Matcher(self.entries)

    @functools.cached_property
    def entries_sha256(self) -> str:
        """The list's identity: in the fingerprint, and the key of the pass-1 match cache."""
        return concepts.entries_sha256(self.entries)

    def preflight(self, ctx: ShardContext) -> list[str]:
        """The concept list: a file that exists and reads as one (UTF-8, one entry a line, or a JSON list), read
        as the fingerprint will read it anyway (well under a second for MetaCLIP's 500k entries); or, for the
        WordNet list (`entries` empty), WordNet's files, looked for (the list is built at the first run)."""
        from metadata.wordnet import not_installed

        spec = self.config.entries
        if spec in ("", "wordnet"):
            why = not_installed()
            return [f"{why} (the concept list is WordNet's: [metaclip] entries is empty)"] if why else []
        try:
            concepts.load_entries(spec)
        except concepts.ConceptListError as e:
            return [f"{e}: set [metaclip] entries to a concept list (one entry a line, or MetaCLIP's metadata.json), "
                    "or leave it empty for WordNet's (`clipcurate metadata wordnet OUT` writes it)"]
        return []

    def fingerprint_parts(self, ctx: ShardContext | None = None) -> dict:
        parts = {"entries_sha256": self.entries_sha256}
        if self.config.one_text_per_image:  # image_choice.parquet's keys were polars' hash before: not reused
            parts["image_keys"] = "pipeline.hashing.row_content_key"
        return parts

    def match(self, table: pa.Table) -> pa.ListArray:
        self.ensure_ready()
        return self.matcher.match(pl.from_arrow(table.column("text")))

    # -- per-row inputs of the rules --------------------------------------------------------------------------
    def _languages(self, table: pa.Table, ctx: ShardContext) -> pl.Series | None:
        col = self.config.language_col
        if not col:
            return None
        if col not in table.column_names:
            ctx.note(f"language column '{col}' absent: one t for all texts")
            return None
        return pl.from_arrow(table.column(col)).cast(pl.String).fill_null("")

    def _images(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray] | None:
        """(image key, choice draw) per row with one_text_per_image, else None."""
        if not self.config.one_text_per_image:
            return None
        return (balance.image_keys(table, self.config.image_col),
                balance.choice_draw(table.column("uid"), self.seed))

    def _below_cut(self, table: pa.Table) -> np.ndarray | None:
        """Rows under the quality cut (`score_col` < `min_score`, or no score), or None without a cut."""
        c = self.config
        if not c.score_col:
            return None
        if c.score_col not in table.column_names:
            raise StageError(f"metaclip: score_col '{c.score_col}' is not a column of the shard (run the scorer "
                             "first, e.g. dfn with score_only = true)")
        v = pc.fill_null(pc.cast(table.column(c.score_col), pa.float64()), float("-inf")).to_numpy(zero_copy_only=False)
        return ~(v >= float(c.min_score))

    # -- pass 1: count -------------------------------------------------------------------------------------------
    def collect(self, table: pa.Table, ctx: ShardContext | None = None) -> dict:
        """{"langs": {lang: (entry ids, counts)}, "images": (key hash, smallest draw) or None, "sample": the t
        solver's rows with target_rows}. Under a quality cut only the rows above it are counted, sampled and
        offered to an image."""
        ctx = ctx or self.detached()
        lists = self.match(table)
        ctx.cache_put("matches", table, {OUT_COL: lists}, self.entries_sha256)
        below = self._below_cut(table)
        if below is not None and below.any():  # the rows under the cut match nothing, for the pool's statistics
            lists = _stats.without_rows(lists, below)
        n_per_row = np.diff(lists.offsets.to_numpy())
        langs = self._languages(table, ctx)
        images = self._images(table)
        n = len(self.entries)
        out: dict = {"n": n, "langs": _stats.count(lists.values.to_numpy(), n_per_row, langs, n), "images": None}
        if images is not None:
            m = n_per_row > 0
            out["images"] = _stats.min_by_key(images[0][m], images[1][m])
        if self.config.target_rows:
            out["sample"] = _target.sample_rows(table.column("uid"), lists, n_per_row, langs, images,
                                                self.config.target_sample, self.seed)
        return out

    def merge(self, partials: list) -> dict:
        out = _stats.merge(partials)
        samples = [p["sample"] for p in partials if p.get("sample") is not None]
        if samples:
            out["sample"] = _target.merge_samples(samples, self.config.target_sample)
        return out

    def save_stats(self, stats: dict, folder: str) -> None:
        """The counts, and the t per language: solved for target_rows, else from `t` (`balance.thresholds`)."""
        c, n = self.config, stats["n"]
        langs = {k: _stats.dense(v, n) for k, v in stats["langs"].items()}
        target, t = None, None
        if c.target_rows and stats.get("sample") is not None:
            t, expected = _target.solve_t(c, n, stats["sample"], langs, stats.get("images"))
            target = {"target_rows": int(c.target_rows), "t": t, "expected_kept": expected,
                      "sample_rows": int(len(stats["sample"]["draw"])),
                      "matched_rows": int(stats["sample"]["matched_rows"])}
        ts, p = thresholds(c, langs, t)
        _stats.save(folder, self.entries, langs, stats["images"], {"t": ts, "tail_share": p, "target": target},
                    c.language_col)

    def load_stats(self, folder: str) -> dict:
        return _stats.load(folder, self.config.language_col)

    def apply_key(self, stats: dict) -> dict:
        """What apply reads of the counts: the t per language, and the entries above it with their counts (an
        entry at or under its t is kept with p = 1 whatever its count), the largest count when nothing is capped
        (apply's note names it), and the image choices with one_text_per_image. A retry that adds rows to tail
        entries redoes no shard of metaclip but those whose rows changed."""
        n = stats["n"]
        langs = {k: _stats.dense(v, n) for k, v in stats["langs"].items()}
        ts = stats.get("t") or thresholds(self.config, langs)[0]
        largest, capped = balance.largest_over_t(langs, ts)
        # the counts and t each row's p_e is drawn from (balance.match_probs): all languages summed at ts[""] for
        # rows without a language, else the row's language at its own t
        views = {"*": (sum(langs.values()) if langs else np.zeros(n, np.int64), int(ts.get("", self.config.t)))}
        views.update({lang: (counts, int(ts.get(lang, self.config.t))) for lang, counts in langs.items()})
        over = {}
        for view, (counts, t) in sorted(views.items()):
            ids = np.flatnonzero(counts > t)
            over[view] = [ids.tolist(), counts[ids].tolist()]
        key = {"t": {k: int(v) for k, v in ts.items()}, "over": over, "largest": None if capped else int(largest)}
        if self.config.one_text_per_image and stats.get("images") is not None:  # per image: a digest, not a list
            key["images"] = [xxhash.xxh3_128_hexdigest(np.ascontiguousarray(a).tobytes()) for a in stats["images"]]
        return key

    # -- pass 2: keep or reject ---------------------------------------------------------------------------------
    def apply(self, table: pa.Table, stats: dict, ctx: ShardContext | None = None) -> tuple[pa.Table, pa.Table]:
        ctx = ctx or self.detached()
        cached = ctx.cache_take("matches", table, self.entries_sha256)
        # (Parquet names a list's child "element": cast back to list<item: int32>, the type match() returns)
        lists = self.match(table) if cached is None else cached.column(OUT_COL).combine_chunks().cast(pa.list_(pa.int32()))
        n_per_row = np.diff(lists.offsets.to_numpy())
        ids = lists.values.to_numpy().astype(np.int64)
        row = np.repeat(np.arange(table.num_rows), n_per_row)
        langs = {k: _stats.dense(v, stats["n"]) for k, v in stats["langs"].items()}
        ts = stats.get("t") or thresholds(self.config, langs)[0]
        lang_col = self._languages(table, ctx)
        row_lang = None if lang_col is None else np.repeat(lang_col.to_numpy(), n_per_row)
        p = balance.match_probs(ids, row_lang, langs, ts, self.config.t, stats["n"])
        largest, capped = balance.largest_over_t(langs, ts)
        if not capped:
            ctx.note(self.caps_nothing_note(ts, largest))
        chosen = None
        if self.config.one_text_per_image and stats.get("images") is not None:
            chosen = balance.is_chosen_text(*self._images(table), stats["images"])
        facts = Facts(n_per_row=n_per_row, sampled=balance.sampled(table.column("uid"), row, ids, p, self.seed),
                      below_cut=self._below_cut(table), chosen=chosen)
        out = table.append_column(OUT_COL, lists) if OUT_COL not in table.column_names else table.set_column(
            table.column_names.index(OUT_COL), OUT_COL, lists)
        return split_by_reason(out, judge(facts))

    def caps_nothing_note(self, ts: dict, largest: int) -> str:
        """Said when balancing does nothing: MetaCLIP's t is for 400M pairs, and on a small pool no entry reaches
        it, so every matched pair is kept and the set is as unbalanced as the pool."""
        t = min(ts.values()) if ts else self.config.t
        return (f"t = {t} caps no entry of this pool (largest count {largest}): every matched pair is kept; "
                "set [metaclip] target_rows (the rows to keep) or a smaller t")

    def scale_notes(self, pool_rows: int) -> list[str]:
        """Before a run: a pool smaller than t cannot have an entry that reaches it."""
        c = self.config
        if c.target_rows or c.tail_share or pool_rows >= c.t:
            return []
        return [f"t = {c.t} caps no entry of this pool: it has {pool_rows} rows, fewer than t (MetaCLIP's t is for "
                "400M pairs); set [metaclip] target_rows (the rows to keep) or a smaller t"]

    def report(self, stage_dir: str, out_dir: str) -> dict:
        """Entry counts before/after balancing, the head and the tail, the solved t (`report.entry_report`)."""
        return entry_report(self.config, stage_dir, out_dir)


STAGE = MetaClipStage
