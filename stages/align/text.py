"""align's text: what "the same alt-text" means, its word tokens, word shingles, and the shard's word table
that the rare-token rule reads."""

from __future__ import annotations

import numpy as np
import polars as pl

# Word token: a run of letters/digits/underscore, with inner apostrophes ("don't" is one word).
TOKEN_RE = r"\w+(?:['’]\w+)*"


def normalise_text(texts: pl.Series) -> pl.Series:
    """NFKC, lower case, runs of whitespace to one space, trimmed: what "the same alt-text" means."""
    return (
        texts.cast(pl.String)
        .fill_null("")
        .str.normalize("NFKC")
        .str.to_lowercase()
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
    )


def tokenize(norm: pl.Series) -> pl.Series:
    """Word tokens of normalised texts (list[str]); their count is the ALIGN word count."""
    return norm.str.extract_all(TOKEN_RE).fill_null([])


def explode_tokens(tokens: pl.Series) -> tuple[np.ndarray, pl.Series]:
    """(row index per token, tokens) for a list[str] column."""
    lens = tokens.list.len().fill_null(0).to_numpy()
    rows = np.repeat(np.arange(len(tokens), dtype=np.int64), lens)
    return rows, tokens.explode().drop_nulls() if len(rows) else pl.Series([], dtype=pl.String)


def shingles(tokens: pl.Series, k: int) -> tuple[np.ndarray, pl.Series]:
    """Word k-shingles per row (rows with 1..k-1 tokens give one shingle: all their tokens)."""
    rows, toks = explode_tokens(tokens)
    if k <= 1 or len(rows) == 0:
        return rows, toks
    df = pl.DataFrame({"row": rows, "tok": toks})
    parts = [pl.col("tok").shift(-j) for j in range(k)]
    df = df.with_columns(sh=pl.concat_str(parts, separator=" "), ok=pl.col("row").shift(-(k - 1)) == pl.col("row"))
    full = df.filter(pl.col("ok").fill_null(False)).select("row", "sh")
    ntok = tokens.list.len().fill_null(0)
    short_idx = np.flatnonzero(((ntok > 0) & (ntok < k)).to_numpy())
    if len(short_idx):
        short = pl.DataFrame(
            {"row": short_idx.astype(np.int64), "sh": tokens.gather(short_idx).list.join(" ")}
        )
        full = pl.concat([full, short]).sort("row", maintain_order=True)
    return full["row"].to_numpy(), full["sh"]


def word_table(tokens: pl.Series) -> tuple[pl.Series, np.ndarray, np.ndarray]:
    """(the shard's distinct words, sorted; row of each token; its word's index in the first): pool counts
    and reference-vocabulary lookups then go once per distinct word, not per token."""
    rows, toks = explode_tokens(tokens)
    if len(rows) == 0:
        return pl.Series([], dtype=pl.String), rows, np.zeros(0, np.int64)
    df = pl.DataFrame({"tok": toks}).with_columns(i=pl.col("tok").rank("dense").cast(pl.Int64) - 1)
    return df.unique("i").sort("i")["tok"], rows, df["i"].to_numpy()
