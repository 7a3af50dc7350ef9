"""metaclip's pool-wide statistics: entry counts (per language) and each image's best draw, from collect's
per-shard partials to the stage folder and back.

A partial is {"n": entries, "langs": {lang: (entry ids, counts)}, "images": (image keys, smallest draw) or None,
"sample": the t solver's rows (target.py) when target_rows is set}. Counts travel sparse (an entry list has
~150k entries, a shard matches a few thousand); `merge` sums them and keeps the smallest draw per image key, so
it is associative and the result is the same whatever the shards. On disk (`save`, `load`):
  entry_counts.parquet              entry, text, count (all languages together)
  entry_counts_by_language.parquet  language, entry, count (nonzero only; with `language_col`)
  image_choice.parquet              image_key (pipeline.hashing, version-stable), draw (one_text_per_image)
  thresholds.json                   t per language, the tail share, the list's sha256, the solved target
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from metadata import concepts
from pipeline import shards


def sparse(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(dense)
    return idx.astype(np.int32), np.asarray(dense)[idx].astype(np.int64)


def dense(sparse_counts, n: int) -> np.ndarray:
    ids, cnt = sparse_counts
    out = np.zeros(n, dtype=np.int64)
    out[np.asarray(ids, dtype=np.int64)] = cnt
    return out


def lists_from(n_per_row: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """list<int32> with n_per_row[i] of `values` (in order) in row i."""
    offsets = np.zeros(len(n_per_row) + 1, dtype=np.int32)
    np.cumsum(n_per_row, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values.astype(np.int32), pa.int32()))


def without_rows(lists: pa.ListArray, drop: np.ndarray) -> pa.ListArray:
    """The lists with the `drop` rows emptied: rows under the quality cut match nothing for the pool's counts."""
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    n_per_row = np.diff(lists.offsets.to_numpy())
    kept_values = lists.values.to_numpy()[np.repeat(~drop, n_per_row)]
    return lists_from(n_per_row * ~drop, kept_values)


def min_by_key(keys: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, smallest draw of each), sorted by key."""
    df = pl.DataFrame({"k": keys.astype(np.uint64), "d": draws}).group_by("k").agg(pl.col("d").min()).sort("k")
    return df["k"].to_numpy(), df["d"].to_numpy()


def count(ids: np.ndarray, n_per_row: np.ndarray, langs: pl.Series | None, n: int) -> dict:
    """{lang: (entry ids, counts)}: per entry, the texts matching it (one group "" without languages)."""
    if langs is None:
        return {"": sparse(np.bincount(ids, minlength=n))}
    row_lang = np.repeat(langs.to_numpy(), n_per_row)
    return {str(lang): sparse(np.bincount(ids[row_lang == lang], minlength=n)) for lang in np.unique(langs.to_numpy())}


def merge(partials: list) -> dict:
    """Counts summed per language, the smallest draw per image key (the "sample" is target.merge_samples')."""
    n = partials[0]["n"]
    langs: dict[str, np.ndarray] = {}
    for part in partials:
        for lang, (ids, cnt) in part["langs"].items():
            d = langs.setdefault(lang, np.zeros(n, dtype=np.int64))
            d[ids] += cnt  # ids are unique within a partial
    images = [p["images"] for p in partials if p["images"] is not None]
    merged_images = None
    if images:
        merged_images = min_by_key(np.concatenate([k for k, _ in images]), np.concatenate([d for _, d in images]))
    return {"n": n, "langs": {k: sparse(v) for k, v in sorted(langs.items())}, "images": merged_images}


def save(folder: str, entries: list[str], langs: dict[str, np.ndarray], images, thresholds: dict,
         language_col: str) -> None:
    """Write the merged statistics (`langs` dense per language; `thresholds`: t, tail_share, target)."""
    n = len(entries)
    total = sum(langs.values()) if langs else np.zeros(n, dtype=np.int64)
    shards.write_shard(
        pa.table({"entry": pa.array(np.arange(n, dtype=np.int32)), "text": pa.array(entries, pa.string()),
                  "count": pa.array(np.asarray(total, dtype=np.int64))}),
        shards.join(folder, "entry_counts.parquet"),
    )
    if language_col:
        parts = [pl.DataFrame({"language": lang, "entry": np.flatnonzero(v).astype(np.int32),
                               "count": v[np.flatnonzero(v)].astype(np.int64)})
                 for lang, v in sorted(langs.items())]
        by_lang = pl.concat(parts) if parts else pl.DataFrame(
            schema={"language": pl.String, "entry": pl.Int32, "count": pl.Int64})
        shards.write_shard(by_lang.to_arrow(), shards.join(folder, "entry_counts_by_language.parquet"))
    if images is not None:
        keys, draws = images
        shards.write_shard(pa.table({"image_key": pa.array(keys, pa.uint64()), "draw": pa.array(draws)}),
                           shards.join(folder, "image_choice.parquet"))
    shards.write_json({"t": thresholds["t"], "tail_share": thresholds["tail_share"], "entries": n,
                       "entries_sha256": concepts.entries_sha256(entries), "target": thresholds["target"]},
                      shards.join(folder, "thresholds.json"))


def load(folder: str, language_col: str) -> dict:
    """{"n", "langs": {lang: sparse counts}, "images": (keys, draws) or None, "t": the solver's t per language
    (target_rows) or None}."""
    counts = shards.read_shard(shards.join(folder, "entry_counts.parquet"))
    langs: dict[str, Any]
    by_lang = shards.join(folder, "entry_counts_by_language.parquet")
    if language_col and shards.exists(by_lang):
        df = pl.from_arrow(shards.read_shard(by_lang))
        langs = {str(k[0]): (g["entry"].to_numpy(), g["count"].to_numpy()) for k, g in df.group_by("language")}
    else:
        langs = {"": sparse(counts.column("count").to_numpy())}
    images = None
    img = shards.join(folder, "image_choice.parquet")
    if shards.exists(img):
        t = shards.read_shard(img)
        images = (t.column("image_key").to_numpy(), t.column("draw").to_numpy())
    th = shards.read_json(shards.join(folder, "thresholds.json")) or {}
    solved = th.get("t") if th.get("target") else None  # the solver's t per language (target_rows)
    return {"n": counts.num_rows, "langs": langs, "images": images, "t": solved}
