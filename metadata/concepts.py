"""Concept lists ("entries", MetaCLIP's metadata) as data: build, load, save, extend, fingerprint.

An entry list is a plain list of strings; an entry's id is its position. Entries are unique: a list with
repeats keeps the first occurrence (ids of later entries shift) and warns, and empty entries are dropped
(spaced, "" would be "  " and match any double space). Matching is case-sensitive, so "Gas" and "gas" are
two entries.

Sources:
  wordnet     `wordnet_entries()`: "0".."99" (numeric order), then every lemma name of every WordNet 3.0
              synset in data-file order: nouns, verbs, adjectives (heads and satellites, as data.adj
              interleaves them), adverbs; within a file by synset offset, within a synset in lemma order.
              Underscores become spaces ("ice_cream" -> "ice cream"); case is kept as WordNet writes it
              ("Einstein", "gas", and where both exist, "Gas" and "gas"); single punctuation characters
              are dropped (MetaCLIP drops `string.punctuation` entries). First occurrence wins.
              WordNet 3.0 gives 148,730 entries. nltk's reader takes ~18 s to load, so the list is cached as
              a text file under `metadata.wordnet.cache_root()/metaclip/`, keyed by the WordNet data files
              (name, size, mtime) and the builder version: later loads take milliseconds.
  files       `load_entries(path)`: MetaCLIP's `metadata.json` (a JSON list of strings, kept verbatim) or a
              one-entry-per-line text file (surrounding whitespace stripped, blank lines skipped).
  corpus      `mine_ngrams(texts)`: frequent unigrams and high-PMI bigrams of the user's caption corpus,
              standing in for MetaCLIP's Wikipedia unigrams (count >= 100) and bigrams (PMI >= 30, nltk's
              log2 PMI); `extend(base, extra)` appends the new ones after a base list (base ids unchanged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import string
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import polars as pl

log = logging.getLogger("clipcurate.metadata")

BUILDER_VERSION = "1"
DIGITS = [str(i) for i in range(100)]
PUNCTUATION = frozenset(string.punctuation)
WORDNET_POS_ORDER = ("n", "v", "a", "r")  # data.noun, data.verb, data.adj (incl. satellites), data.adv

# spacing(): the characters MetaCLIP wraps in spaces, and the ones it turns into a space (DESIGN.md).
SPACED_PUNCT = ",.;:?!`"


class ConceptListError(ValueError):
    """A concept list cannot be read. str() is one line."""


# ---- uniqueness and identity -----------------------------------------------------------------------
def unique_entries(entries: Iterable[str], source: str = "entries") -> list[str]:
    """Keep the first occurrence of each entry (ids are positions, so order matters); warn on repeats."""
    seen: set[str] = set()
    out: list[str] = []
    repeats, empty = [], 0
    for e in entries:
        if not isinstance(e, str):
            raise ConceptListError(f"{source}: entry {e!r} is not a string")
        if e == "":
            empty += 1
            continue
        if e in seen:
            repeats.append(e)
            continue
        seen.add(e)
        out.append(e)
    if repeats or empty:
        msg = (f"{source}: {len(repeats)} repeated entries dropped (first occurrence kept, e.g. "
               f"{repeats[:3]!r}), {empty} empty entries dropped")
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
    return out


def entries_sha256(entries: Sequence[str]) -> str:
    """Identity of a list (content and order): goes into the metaclip stage fingerprint."""
    return hashlib.sha256(json.dumps(list(entries), ensure_ascii=False).encode()).hexdigest()


# ---- files -------------------------------------------------------------------------------------------
def load_entries(path: str | os.PathLike) -> list[str]:
    """MetaCLIP's metadata.json (JSON list of strings) or one entry per line; made unique."""
    p = Path(path)
    if not p.exists():
        raise ConceptListError(f"concept list {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConceptListError(f"concept list {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                               f"{e.start}): save it as UTF-8") from None
    except OSError as e:  # a folder, no permission
        raise ConceptListError(f"concept list {path} cannot be read: {e.strerror or e}") from None
    if p.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConceptListError(f"concept list {path}: not valid JSON ({e})") from None
        if not isinstance(raw, list):
            raise ConceptListError(f"concept list {path}: expected a JSON list of strings")
    else:
        raw = [line.strip() for line in text.splitlines()]
        raw = [e for e in raw if e]
    return unique_entries(raw, source=str(path))


def save_entries(entries: Sequence[str], path: str | os.PathLike) -> None:
    """`.json` -> a JSON list (MetaCLIP's format); else one entry per line. Written atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() == ".json":
        data = json.dumps(list(entries), ensure_ascii=False)
    else:
        bad = [e for e in entries if "\n" in e or "\r" in e or e != e.strip()]
        if bad:
            raise ConceptListError(f"{path}: {len(bad)} entries cannot be written one a line (e.g. {bad[0]!r}); use .json")
        data = "\n".join(entries) + "\n"
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, p)


# ---- WordNet -----------------------------------------------------------------------------------------
def build_wordnet_entries(wn=None) -> list[str]:
    """The WordNet list from nltk's reader (see the module docstring for the order)."""
    if wn is None:
        from metadata import wordnet

        wn = wordnet.load()
    names: list[str] = list(DIGITS)
    for pos in WORDNET_POS_ORDER:
        for ss in wn.all_synsets(pos):
            for lemma in ss.lemmas():
                names.append(lemma.name().replace("_", " "))
    names = [e for e in names if e not in PUNCTUATION]
    seen: set[str] = set()
    return [e for e in names if e and not (e in seen or seen.add(e))]  # repeats are expected here: no warning


def _wordnet_key() -> str:
    from metadata import wordnet

    parts = [BUILDER_VERSION]
    for name in sorted(("data.noun", "data.verb", "data.adj", "data.adv")):
        f = wordnet.WORDNET_SRC / name
        st = f.stat() if f.exists() else None
        parts.append(f"{name}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def wordnet_cache_path() -> Path:
    from metadata import wordnet

    return wordnet.cache_root() / "metaclip" / f"wordnet-entries-{_wordnet_key()}.txt"


def wordnet_entries() -> list[str]:
    """The WordNet list, from the cache when built before (instant), else built (~20 s) and cached."""
    from metadata import wordnet

    missing = [n for n in ("data.noun", "data.verb", "data.adj", "data.adv") if not (wordnet.WORDNET_SRC / n).exists()]
    if missing:
        raise wordnet.WordNetMissing(
            f"WordNet is not installed ({wordnet.WORDNET_SRC}/{missing[0]} missing): run '{wordnet.INSTALL_HINT}'"
        )
    path = wordnet_cache_path()
    if path.exists():
        return path.read_text(encoding="utf-8").split("\n")[:-1]
    entries = build_wordnet_entries()
    save_entries(entries, path)
    return entries


def resolve_entries(spec: str) -> list[str]:
    """A stage's `entries` setting: "" (or "wordnet") = the cached WordNet list; else a file path."""
    if spec in ("", "wordnet"):
        return wordnet_entries()
    return load_entries(spec)


# ---- mining a caption corpus -------------------------------------------------------------------------
def spaced_tokens(texts: pl.Series) -> pl.Series:
    """Tokens as the matcher sees them: spacing() then split on spaces (case kept, punctuation alone)."""
    cls = "[" + "".join("\\" + c if c in "\\^]-[" else c for c in SPACED_PUNCT) + "]"
    s = texts.cast(pl.String).fill_null("")
    s = s.str.replace_all(f"({cls})", " ${1} ").str.replace_all(r"[\t\n\r]", " ")
    return s.str.split(" ").list.eval(pl.element().filter(pl.element() != ""))


def mine_ngrams(
    texts: Sequence[str] | pl.Series,
    min_count: int = 100,
    min_bigram_count: int = 5,
    min_pmi: float = 30.0,
) -> pl.DataFrame:
    """Frequent unigrams (count >= min_count) and bigrams (count >= min_bigram_count, PMI >= min_pmi).

    MetaCLIP's recipe on Wikipedia: unigrams counted >= 100 times, bigrams with nltk's PMI
    log2(c(w1 w2) * N / (c(w1) c(w2))) >= 30, N = number of word tokens. PMI can never exceed log2(N), so
    30 needs a corpus of > 1e9 words: on a smaller corpus lower `min_pmi` (e.g. 10-15) and say so.
    Single-punctuation tokens are never entries. Returns (entry, kind, count, pmi) sorted by kind
    (unigram first), then count descending, then entry.
    """
    s = texts if isinstance(texts, pl.Series) else pl.Series("text", list(texts), dtype=pl.String)
    toks = pl.DataFrame({"tok": spaced_tokens(s)}).with_row_index("row").explode("tok").drop_nulls("tok")
    toks = toks.with_columns(pl.int_range(pl.len()).over("row").alias("pos"))
    n_tokens = toks.height
    uni = toks.group_by("tok").agg(pl.len().alias("count"))
    nxt = toks.select("row", (pl.col("pos") - 1).alias("pos"), pl.col("tok").alias("tok2"))
    bi = (
        toks.join(nxt, on=["row", "pos"])
        .group_by("tok", "tok2")
        .agg(pl.len().alias("count"))
        .filter(pl.col("count") >= min_bigram_count)
        .join(uni.rename({"count": "c1"}), on="tok")
        .join(uni.rename({"tok": "tok2", "count": "c2"}), on="tok2")
        .with_columns(
            (pl.col("count").cast(pl.Float64).log(2) + math.log2(max(n_tokens, 1))
             - pl.col("c1").cast(pl.Float64).log(2) - pl.col("c2").cast(pl.Float64).log(2)).alias("pmi")
        )
        .filter(pl.col("pmi") >= min_pmi)
        .filter(~pl.col("tok").is_in(list(PUNCTUATION)) & ~pl.col("tok2").is_in(list(PUNCTUATION)))
        .select((pl.col("tok") + " " + pl.col("tok2")).alias("entry"), pl.lit("bigram").alias("kind"), "count", "pmi")
    )
    uni = (
        uni.filter((pl.col("count") >= min_count) & ~pl.col("tok").is_in(list(PUNCTUATION)))
        .select(pl.col("tok").alias("entry"), pl.lit("unigram").alias("kind"), "count", pl.lit(None, pl.Float64).alias("pmi"))
    )
    out = pl.concat([uni, bi]).with_columns(pl.col("count").cast(pl.Int64))
    return out.sort(["kind", "count", "entry"], descending=[True, True, False])


def extend(base: Sequence[str], extra: Iterable[str]) -> list[str]:
    """`base` unchanged (its ids stay), then the entries of `extra` not already in it, in order."""
    seen = set(base)
    out = list(base)
    for e in extra:
        if e and e not in seen:
            seen.add(e)
            out.append(e)
    return out


def read_corpus(path: str, column: str | None = None) -> pl.Series:
    """Captions from a Parquet/CSV/TSV file (column `text`, `caption` or the one given) or a text file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"corpus {path} does not exist")
    suffixes = "".join(p.suffixes).lower()
    if ".parquet" in suffixes or p.is_dir():
        df = pl.read_parquet(p / "*.parquet" if p.is_dir() else p)
    elif ".csv" in suffixes or ".tsv" in suffixes:
        df = pl.read_csv(p, separator="\t" if ".tsv" in suffixes else ",", infer_schema_length=0)
    else:
        return pl.Series("text", p.read_text(encoding="utf-8").splitlines(), dtype=pl.String)
    for c in ([column] if column else ["text", "caption"]):
        if c in df.columns:
            return df[c].cast(pl.String)
    raise ConceptListError(f"corpus {path}: no column {column or 'text/caption'} (columns: {', '.join(df.columns)})")
