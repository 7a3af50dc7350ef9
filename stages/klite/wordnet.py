"""klite's WordNet lookup: caption tokens, stop words, and the cached tables turned into integer n-gram keys.

Why integer keys. WordNet lookups are per token, and nltk's reader is slow to load (timed by hand: bench/README.md,
klite). So once (per WordNet install) `metadata.glosses` builds two small tables from WordNet and caches them as
Parquet under `metadata.wordnet.cache_root()/klite/`: every surface form whose morphy result is a noun lemma (the
lemmas themselves, their inverse-rule plurals -s/-es/-ies/-ves/-men, and noun.exc's irregular plurals: since morphy
only ever applies those rules or the exception list, this set is complete and the table equals morphy exactly), and
per lemma its gloss and hypernym chain. Workers then load the Parquet in well under a second (no WordNet reader at
all), map caption tokens to integer ids, and find candidates with integer joins in polars: no per-row Python on the
hot path.

Why `TOKEN_RE` and `normalise` live beside the tables: `metadata.glosses.tokens`, their Python twin, cut
WordNet's lemmas into the keys of the surfaces table, and a caption n-gram finds its lemma only when both
sides are cut alike (the rule: the stage's docstring, Tokens).
"""

from __future__ import annotations

import dataclasses

import polars as pl
import pyarrow as pa

from pipeline.errors import StageError
from metadata.glosses import cached_tables, wordnet_signature as _wordnet_signature  # the tables' home

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


def normalise(s):
    """Lower case, ’ -> ', possessive 's split off as a token of its own (a polars expression or Series)."""
    return s.str.to_lowercase().str.replace_all("’", "'", literal=True).str.replace_all(r"'s\b", " 's")


def as_series(texts) -> pl.Series:
    if isinstance(texts, pl.Series):
        return texts.cast(pl.String)
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        return pl.Series("text", pl.from_arrow(texts)).cast(pl.String)
    return pl.Series("text", list(texts), dtype=pl.String)


def truncate(gloss: str, limit: int) -> str:
    if limit <= 0 or len(gloss) <= limit:
        return gloss
    cut = gloss[:limit].rsplit(" ", 1)[0].rstrip(" ,;:")
    return cut or gloss[:limit]


def signature() -> str:
    """The WordNet install and table version ("missing" when absent: setup then stops with the one-line error)."""
    from metadata.wordnet import WordNetMissing

    try:
        return _wordnet_signature()
    except WordNetMissing:
        return "missing"


@dataclasses.dataclass(frozen=True)
class Lookup:
    """What `candidates` and `choose` join against: held by the stage once per process, never per shard."""

    vocab: pl.DataFrame  # (tok, tid): token ids 1..V
    base: int  # V + 1: n-gram keys of different n never collide
    surface_keys: pl.DataFrame  # (key, lemma_id): the integer key of every allowed surface n-gram
    lemmas: pl.DataFrame  # (lemma_id, concept, gloss, hypernyms, words)


def build_lookup(config) -> Lookup:
    """All the config decides about the vocabulary (stop words, lengths, n, gloss limit) is applied here, once
    per process, so the per-shard join sees only surfaces that may be candidates."""
    from metadata.wordnet import WordNetMissing

    c = config  # its values are range-checked by Config (config [klite] ...)
    try:
        surfaces, lemmas = cached_tables()
    except WordNetMissing as e:
        raise StageError(f"klite: {e}") from None
    stop = set(STOP_WORDS) if c.default_stop_words else set()
    stop |= {w.lower() for w in c.extra_stop_words}
    lemmas = _numbered_lemmas(lemmas, int(c.max_definition_chars))
    s = _allowed_surfaces(surfaces, lemmas, sorted(stop), int(c.min_chars), int(c.max_ngram))
    vocab, base, surface_keys = _integer_keys(s)
    words = normalise(pl.col("concept")).str.extract_all(TOKEN_RE).list.len()  # tie-break: more words first
    lemmas = lemmas.with_columns(words=words).select("lemma_id", "concept", "gloss", "hypernyms", "words")
    return Lookup(vocab=vocab, base=base, surface_keys=surface_keys, lemmas=lemmas)


def _numbered_lemmas(lemmas: pl.DataFrame, max_definition_chars: int) -> pl.DataFrame:
    """lemma_id follows the concept's string order (code points): `choose` breaks its last ties with it."""
    lemmas = lemmas.filter(pl.col("gloss").str.len_chars() > 0)
    lemmas = lemmas.with_columns(concept=pl.col("lemma").str.replace_all("_", " ", literal=True))
    return lemmas.sort("concept").with_row_index("lemma_id").with_columns(
        gloss=pl.col("gloss").map_elements(lambda g: truncate(g, max_definition_chars), pl.String)
        if max_definition_chars > 0 else pl.col("gloss"),
    )


def _allowed_surfaces(surfaces: pl.DataFrame, lemmas: pl.DataFrame, stop_list: list, min_chars: int,
                      max_ngram: int) -> pl.DataFrame:
    """The surfaces a caption n-gram may match, filtered here once rather than per caption: no single word
    that is a stop word, a number or too short, no compound that starts or ends with a stop word."""
    s = surfaces.join(lemmas.select("lemma", "lemma_id", "concept"), on="lemma", how="inner")
    s = s.with_columns(toks=pl.col("key").str.split(" "))
    s = s.with_columns(
        n=pl.col("toks").list.len(), first=pl.col("toks").list.first(), last=pl.col("toks").list.last()
    )
    single_bad = (
        pl.col("first").is_in(stop_list)
        | pl.col("concept").is_in(stop_list)
        | (pl.col("key").str.len_chars() < min_chars)
        | pl.col("key").str.contains(r"^[0-9]+$")
    )
    multi_bad = pl.col("first").is_in(stop_list) | pl.col("last").is_in(stop_list)
    return s.filter(
        (pl.col("n") <= max_ngram)
        & pl.when(pl.col("n") == 1).then(~single_bad).otherwise(~multi_bad)
    )


def _integer_keys(s: pl.DataFrame) -> tuple[pl.DataFrame, int, pl.DataFrame]:
    """(vocab, base, surface keys): an n-gram of token ids (t1, t2, t3) is the key (t1 * base + t2) * base + t3,
    so `candidates` matches captions with one integer join instead of string compares."""
    vocab = s.select(tok=pl.col("toks").explode()).unique().sort("tok")
    base = len(vocab) + 1  # token ids 1..V: n-gram keys of different n never collide
    vocab = vocab.with_row_index("tid", offset=1).with_columns(pl.col("tid").cast(pl.UInt64))
    ids = (
        s.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("sid"), "toks")
        .explode("toks")
        .join(vocab, left_on="toks", right_on="tok", how="left", maintain_order="left")
        .group_by("sid", maintain_order=True)
        .agg("tid")
    )
    b = base
    t = [pl.col("tid").list.get(i, null_on_oob=True) for i in range(3)]
    surface_keys = s.with_columns(tid=ids["tid"]).select(
        key=pl.when(pl.col("n") == 1).then(t[0])
        .when(pl.col("n") == 2).then(t[0] * b + t[1])
        .otherwise((t[0] * b + t[1]) * b + t[2]),
        lemma_id=pl.col("lemma_id"),
    )
    return vocab, base, surface_keys
