"""klite: K-LITE knowledge enrichment (arXiv 2204.09222), offline, from WordNet 3.0 glosses.

Per caption:
  candidates  every word n-gram (n = 1..`max_ngram`) of the caption that WordNet's morphy lemmatiser
              (nltk's `morphy(form, "n")`) maps to a noun lemma: "golden retrievers" -> "golden retriever",
              "men" -> "man". Single words that are stop words, numbers or shorter than `min_chars` are
              skipped, and so are compounds that start or end with a stop word ("of the").
  pool count  `collect`/`merge`: for each lemma, the number of captions of the pool in which it is a
              candidate (counted once per caption).
  choice      the candidate with the smallest pool count. Ties: more words first (the compound "golden
              retriever" beats "retriever" at equal count: it is the more specific concept), then the
              lemma in plain string order. K-LITE takes the least frequent too (min over (count, phrase)).
  synset      the lemma's first noun synset (`lemma.n.01`): WordNet orders senses by tagged frequency, so
              this is the most frequent sense; no word-sense disambiguation is attempted.
  output      `klite_concept` (lemma, null when no candidate), `text_klite` =
              "{caption} ; {lemma} , {gloss}" (caption unchanged when no candidate), and with
              `hypernyms = true` `klite_hypernyms`: the first-hypernym chain of that synset up to
              "entity" (first lemma name of each synset; the concept itself not repeated).
No row is ever dropped, except the rows every stage's reader sets aside: text that is not UTF-8 (`invalid_utf8`),
a uid that is not 32 lowercase hex characters (`invalid_uid`), text over `[run] max_text_bytes` (`text_too_long`:
never tagged, so one 10 MB caption cannot cost gigabytes in the tagger).

Part of speech (`pos_tagger`, `tagger`). Morphy cannot tell a noun from the same word used as a verb,
adjective or adverb ("running fast" would get *fast* = "abstaining from food"), so the caption's tokens are
tagged (spaCy's small English pipeline) and an n-gram is a candidate only when its last word (the head of an
English noun compound) is tagged a noun (NN, NNS, NNP, NNPS): "running fast" then has no candidate and stays
unchanged, "golden retrievers" (JJ NNS) keeps "golden retriever". Morphy still lemmatises. `pos_tagger =
"auto"` (default) uses the tagger when its model package is installed and falls back to morphy alone, with
one logged notice, when it is not; "spacy" requires it; "none" is morphy alone; "every" requires it and tags
every caption the way klite did before the fast path below (the reference the tests and the bench compare
with). The tagger in use is part of the stage's fingerprint ("every" and "spacy" share it: same output).

Equivalence (what "auto"/"spacy" skip, and why the output is that of "every"). The code reads a tag in one
place only: a matched n-gram is dropped when the tag of its last token is not a noun tag. So:
  - a caption with no matched n-gram reads no tag: it is not tagged (exact: its tags are never read);
  - captions with the same token list get the same tags (the tagger's input is the token list alone:
    spaCy's tok2vec sees each token's NORM, PREFIX, SUFFIX, SHAPE, SPACY, IS_SPACE and a window of 4 tokens
    either side, all a function of that list), so each distinct list is tagged once per shard (exact);
  - spaCy's matrix products go through numpy's BLAS rather than thinc's BLIS (same weights, same formula,
    another summation order): exact up to rounding only, not by construction (a tag is an argmax over 50
    labels: it changes only where two scores tie to float32 precision; measured: no noun flag and no
    candidate differed on Flickr8k, LAION-10k and held-out COCO captions, bench/results/klite_pos.json and
    bench/README.md, klite's part-of-speech tagger; tests/test_klite_fast_pos.py checks 3,200 real captions).
What is NOT a safe rule, and not used: "skip a head word that WordNet lists as a noun only". The code drops a
match on the tag, not on WordNet's parts of speech, and spaCy tags noun-only words as JJ/VB in context; it
would also skip little (nearly every Flickr8k caption has a head that WordNet also lists as a verb or adjective:
"man", "dog", "running"; counted by hand: bench/README.md, klite's part-of-speech tagger). Nor is a rule learned
from spaCy's own tags (measured, not used: bench/bench_klite_pos.py's skip study, klite_pos.json "skip_study"):
tables of the noun share per word or per context, and a logistic classifier over lexical and context features that
decides a head only where it is confident, tuned on Flickr8k train + half of LAION-10k. On held-out captions
(Flickr8k test, the other LAION half, COCO-mini), keeping >= 99.5% concept agreement with "every" still sends most
captions to spaCy (projected: still far slower than morphy alone), and sending few loses agreement (bench/README.md,
klite's part-of-speech tagger). Why: the pool counts read every head's flag (counts from morphy alone with exact
flags in the choice still disagree, measured by hand: same section), and the rarest candidate, the one the
choice reads first, is rare by construction, so the least often decided. Batching does not change a tag: a document's tags do not depend on the
other documents of its batch (checked at batches of 37 and 1000), so shard and worker invariance holds.
Cost: the tagger's work per token is large (tok2vec's four 288->96x3 maxout layers and its 576-wide mixer),
and it is needed on almost every caption (almost every caption has a match), so the fast path is measured
faster than "every" and still far slower than morphy alone on one core (bench/results/klite_pos.json;
bench/README.md, klite's part-of-speech tagger); at web scale give klite more workers, or set
`pos_tagger = "none"` (morphy alone).

Tokens: lower case, ’ read as ', then runs of letters/digits with inner apostrophes; a possessive 's
is a token of its own ("dog's bowl" -> dog 's bowl: "dog" is found, and "child plays" never matches
"child's play"). The same rule tokenises WordNet's lemmas (underscores, hyphens, dots and slashes become
token breaks), so "t-shirt", "T shirt", "St. Bernard" and "Ph.D." all match their lemma.

Known limits: morphy keeps a form that is a lemma of its own ("men": the force of workers available;
"glasses": spectacles); the tagger makes mistakes of its own (Title Case alt-text reads as proper nouns,
which count as nouns). The first-sense rule picks no sense from context. Rarest-first keeps these rare in
practice.

The package: `wordnet` (tokens, stop words, and the cached WordNet tables as integer n-gram keys: why the
hot path has no per-row Python), `tagger` (the part-of-speech tagger, its fallback and fingerprint),
`report` (coverage and top concepts); the stage here is the rule list above: candidates, pool counts, choice.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import polars as pl
import pyarrow as pa

from pipeline.config import ConfigError, check_ranges
from pipeline import shards
from pipeline.context import ShardContext
from pipeline.stage import Stage

from .report import concept_report
from .tagger import NOUN_TAGS, cased_tokens, load_tagger, tagger_id
from .wordnet import STOP_WORDS, TOKEN_RE, as_series, build_lookup, normalise, signature

__all__ = ["KLiteStage", "STAGE", "NOUN_TAGS", "STOP_WORDS", "load_tagger", "tagger_id"]


class KLiteStage(Stage):
    """Appends the WordNet gloss of a caption's rarest noun concept (K-LITE); drops nothing."""

    name = "klite"
    requires = {"uid": pa.string(), "text": pa.string()}

    @dataclasses.dataclass
    class Config:
        max_ngram: int = 3  # longest compound, in words (1..3)
        min_chars: int = 2  # single-word candidates shorter than this are skipped ("e", "x")
        default_stop_words: bool = True  # use STOP_WORDS (function words + number words)
        extra_stop_words: list = dataclasses.field(default_factory=list)
        max_definition_chars: int = 0  # 0: whole gloss; else cut at a word boundary
        hypernyms: bool = False  # add klite_hypernyms (list<string>)
        pos_tagger: str = "auto"  # auto: spaCy's tagger when installed, else morphy alone; "spacy"; "none";
        # "every": spaCy's tagger on every caption, as before the fast path (the reference; same output)

        def __post_init__(self):
            check_ranges("klite", self, max_ngram=(1, 3), min_chars=(0, None), max_definition_chars=(0, None))
            if self.pos_tagger not in ("auto", "spacy", "every", "none"):
                raise ConfigError(f"config [klite] pos_tagger = {self.pos_tagger!r}: must be auto, spacy, every or none")

    # -- setup: tables -> integer keys ------------------------------------------------------------------
    def setup(self) -> None:
        """The WordNet tables as integer keys (`wordnet.build_lookup`) and the tagger: once per worker
        (`get_stage`), so a shard only joins against them."""
        lookup = build_lookup(self.config)
        self._vocab, self._base = lookup.vocab, lookup.base
        self._surface_keys, self._lemmas = lookup.surface_keys, lookup.lemmas
        self._tagger = load_tagger(self.config.pos_tagger)
        self._stats_ids: tuple[Any, pl.DataFrame] | None = None

    def fingerprint_parts(self, ctx: ShardContext | None = None) -> dict:
        """The WordNet install and table version: other glosses mean other output (resume redoes it)."""
        tagger = tagger_id(self.config.pos_tagger)
        return {"tables": signature(), "tagger": tagger}

    def preflight(self, ctx: ShardContext) -> list[str]:
        """WordNet's files (its glosses are the knowledge), and the spaCy tagger when `pos_tagger = "spacy"`
        requires it: looked for, not loaded (klite has no concept list of its own: its lemmas are WordNet's)."""
        from metadata.wordnet import not_installed

        out = [p for p in [not_installed()] if p]
        if self.config.pos_tagger in ("spacy", "every") and tagger_id("spacy") == "missing":
            out.append(f'pos_tagger = "{self.config.pos_tagger}" but no spaCy English model is installed: run `make setup` (it installs '
                       'the one requirements-tagger.lock pins), or set [klite] pos_tagger = "auto" or "none"')
        return out

    # -- candidates -------------------------------------------------------------------------------------
    def candidates(self, texts) -> pl.DataFrame:
        """(row, lemma_id) for every candidate of every caption, one row per distinct pair. The n-grams are
        matched first, by morphy alone; the tagger then reads only the captions with a match (`_noun_flags`)
        and drops the matches whose last word it does not call a noun."""
        series = as_series(texts)
        toks, matched = self.matches(series)
        if self._tagger is not None:  # a candidate's last word must be a noun (always true without a tagger)
            noun = self._noun_flags(series, toks, matched["row"].unique())
            matched = matched.filter(pl.Series(noun[matched["last"].to_numpy()]))
        return matched.select("row", "lemma_id").unique()

    def matches(self, series: pl.Series) -> tuple[pl.Series, pl.DataFrame]:
        """Morphy alone: the captions' lower-case tokens, and (row, key, last, lemma_id) for every matched
        n-gram, `last` being its last token's place in the exploded token order (where its tag is read).
        Public for the bench's skip study (bench/bench_klite_pos.py), which needs the head positions."""
        toks = normalise(series).str.extract_all(TOKEN_RE)
        df = (
            pl.DataFrame({"tok": toks})
            .with_row_index("row")
            .explode("tok")
            .drop_nulls("tok")
            .with_row_index("pos")  # the token's place in the exploded order: the tagger's flags are indexed by it
        )
        df = df.join(self._vocab, on="tok", how="left", maintain_order="left")
        b = self._base
        t1 = pl.col("tid")
        same1 = pl.col("row").shift(-1) == pl.col("row")
        same2 = pl.col("row").shift(-2) == pl.col("row")
        t2 = pl.when(same1).then(pl.col("tid").shift(-1))
        t3 = pl.when(same2).then(pl.col("tid").shift(-2))
        pos = pl.col("pos")
        grams = [df.select("row", key=t1, last=pos)]  # last: where the n-gram's last word (its head) is
        if self.config.max_ngram >= 2:
            grams.append(df.select("row", key=t1 * b + t2, last=pos + 1))
        if self.config.max_ngram >= 3:
            grams.append(df.select("row", key=(t1 * b + t2) * b + t3, last=pos + 2))
        return toks, pl.concat(grams).drop_nulls("key").join(self._surface_keys, on="key", how="inner")

    def _noun_flags(self, series: pl.Series, toks: pl.Series, rows: pl.Series):
        """Per token of the exploded order, whether the tagger calls it a noun. `pos_tagger = "every"` tags
        every caption (the reference); otherwise only `rows`, the captions with at least one matched n-gram:
        a flag is read only where an n-gram ends, so the other captions' tags could change nothing (the
        docstring's "Equivalence"), and their flags stay True, unread."""
        import numpy as np

        lens = toks.list.len().fill_null(0).to_numpy().astype(np.int64)
        if self.config.pos_tagger == "every":
            flags = [f for fs in self._tagger(cased_tokens(series, toks)) for f in fs]
            return np.asarray(flags, dtype=bool).reshape(-1)
        noun = np.ones(int(lens.sum()), dtype=bool)
        idx = rows.sort().cast(pl.Int64).to_numpy()
        if len(idx) == 0:
            return noun
        cased = cased_tokens(series.gather(idx), toks.gather(idx))
        flags = self._tagger(cased)
        starts, n = np.cumsum(lens) - lens, lens[idx]  # where each caption's tokens begin; how many
        at = np.repeat(starts[idx] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))  # their exploded positions
        noun[at] = np.concatenate([np.asarray(f, dtype=bool) for f in flags])
        return noun

    # -- collect / merge / stats ----------------------------------------------------------------------
    def _candidates_key(self) -> str:
        """What a shard's candidates are a function of, besides its texts: config, tagger, WordNet tables."""
        return json.dumps([dataclasses.asdict(self.config), self.fingerprint_parts()], sort_keys=True, default=str)

    def collect(self, table: pa.Table, ctx: ShardContext | None = None) -> pl.DataFrame:
        """Per lemma, the captions of this shard where it is a candidate: (lemma, count), bounded by
        WordNet's noun vocabulary. The candidates are left for apply (`ShardContext.cache_put`): with the
        part-of-speech tagger they are most of the stage's time, and apply would otherwise tag every caption
        again."""
        cand = self.candidates(table.column("text"))
        per_row = (pl.DataFrame({"row": pl.arange(0, table.num_rows, dtype=pl.UInt32, eager=True)})
                   .join(cand.group_by("row").agg(pl.col("lemma_id")), on="row", how="left").sort("row"))
        (ctx or self.detached()).cache_put("candidates", table, {"lemma_ids": per_row["lemma_id"].to_arrow()},
                                           self._candidates_key())
        counts = cand.group_by("lemma_id").agg(count=pl.len())
        return (
            counts.join(self._lemmas.select("lemma_id", "concept"), on="lemma_id")
            .select(lemma="concept", count=pl.col("count").cast(pl.Int64))
            .sort("lemma")
        )

    def merge(self, partials: list) -> pl.DataFrame:
        parts = [p for p in partials if p is not None and len(p)]
        if not parts:
            return pl.DataFrame(schema={"lemma": pl.String, "count": pl.Int64})
        return pl.concat(parts).group_by("lemma").agg(pl.col("count").sum()).sort("lemma")

    def save_stats(self, stats: pl.DataFrame, folder: str) -> None:
        """(lemma, count) as Parquet: readable by anyone, and the report's source of pool frequencies."""
        shards.write_shard(stats.to_arrow(), shards.join(folder, "lemma_counts.parquet"))

    def load_stats(self, folder: str) -> pl.DataFrame:
        return pl.from_arrow(shards.read_shard(shards.join(folder, "lemma_counts.parquet")))

    def _counts_by_id(self, stats: pl.DataFrame) -> pl.DataFrame:
        if self._stats_ids is None or self._stats_ids[0] is not stats:
            ids = stats.join(self._lemmas.select("lemma_id", "concept"), left_on="lemma", right_on="concept")
            self._stats_ids = (stats, ids.select("lemma_id", "count"))
        return self._stats_ids[1]

    # -- apply ----------------------------------------------------------------------------------------
    def choose(self, texts, stats: pl.DataFrame, cand: pl.DataFrame | None = None) -> pl.DataFrame:
        """Per row: concept, gloss, hypernyms (nulls when no candidate), in input row order. `cand`: the
        rows' candidates when collect left them (else computed here)."""
        n = len(texts)
        cand = self.candidates(texts) if cand is None else cand
        chosen = (
            cand.join(self._counts_by_id(stats), on="lemma_id", how="left")
            .with_columns(pl.col("count").fill_null(0))
            .join(self._lemmas.select("lemma_id", "words"), on="lemma_id")
            # lemma_id follows the lemma's string order, so it breaks the last ties alphabetically
            .sort(["row", "count", "words", "lemma_id"], descending=[False, False, True, False])
            .unique("row", keep="first")
            .join(self._lemmas.drop("words"), on="lemma_id")
        )
        rows = pl.DataFrame({"row": pl.arange(0, n, dtype=pl.UInt32, eager=True)})
        return rows.join(chosen, on="row", how="left").sort("row")

    def apply(self, table: pa.Table, stats: Any, ctx: ShardContext | None = None) -> tuple[pa.Table, pa.Table]:
        ctx = ctx or self.detached()
        if stats is None:
            stats = self.merge([self.collect(table, ctx)])
        text = as_series(table.column("text"))
        cand = None
        cached = ctx.cache_take("candidates", table, self._candidates_key())
        if cached is not None:
            cand = (pl.from_arrow(cached.select(["lemma_ids"])).with_row_index("row")
                    .explode("lemma_ids").drop_nulls("lemma_ids")
                    .select(pl.col("row").cast(pl.UInt32), lemma_id=pl.col("lemma_ids")))
        ch = self.choose(text, stats, cand)
        out = pl.DataFrame({"text": text}).with_columns(ch["concept"], ch["gloss"], ch["hypernyms"])
        out = out.select(
            klite_concept=pl.col("concept"),
            text_klite=pl.when(pl.col("concept").is_not_null())
            .then(pl.concat_str([pl.col("text"), pl.lit(" ; "), pl.col("concept"), pl.lit(" , "), pl.col("gloss")]))
            .otherwise(pl.col("text")),
            klite_hypernyms=pl.col("hypernyms"),
        )
        kept = table
        for col in ("klite_concept", "text_klite") + (("klite_hypernyms",) if self.config.hypernyms else ()):
            if col in kept.column_names:
                kept = kept.drop_columns([col])
            arr = out[col].to_arrow()
            typ = pa.list_(pa.string()) if col == "klite_hypernyms" else pa.string()
            kept = kept.append_column(pa.field(col, typ), arr.cast(typ))
        rejected = table.slice(0, 0).append_column("reason", pa.array([], pa.string()))
        return kept, rejected

    # -- report -----------------------------------------------------------------------------------------
    def report(self, stage_dir: str, out_dir: str) -> dict:
        return concept_report(stage_dir, out_dir)


STAGE = KLiteStage
