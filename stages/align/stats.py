"""align's pool-wide statistics: the per-shard partial, its associative merge, and the shuffle that keeps them
out of any one task (`split` by key hash, `merge` per partition, `answer`: the lookups one shard needs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl

from pipeline import shards
from pipeline.codec import data_record

_U64 = np.uint64
_MAX_U64 = np.iinfo(np.uint64).max
META_SUMS = ("rows", "image_rows", "id_rows")  # rows; rows with image bytes; rows with an image identity
LOOKUPS = ("token_n", "image_texts", "text_images", "pair_uid", "band_uid", "uid_ck", "copy_pos")


@data_record
@dataclasses.dataclass
class AlignStats:
    """Pool-wide counts. A per-shard partial, a partition of the pool and the merged whole have the same
    shape (merge is concat + group-by sum/min, hence associative and order-free; outputs sorted by key).

    On a cluster the runner shuffles them (`AlignStage.split`): each table is cut by the hash of the key
    its lookup is by, so texts-per-image and images-per-text are whole inside one partition."""

    # The codec names a record by module and class: run folders hold "stages.align.AlignStats" (pieces and
    # answers written before align became a package read back the same)
    __module__ = "stages.align"

    tokens: pl.DataFrame  # tok: u64, n: u64                      occurrences per token
    pairs: pl.DataFrame  # pair, image, text: u64, uid_min: u64, n: u64   one row per (image, text)
    bands: pl.DataFrame  # key: u64, uid_min: u64, n: u64        rows per LSH band key
    meta: dict  # META_SUMS
    # text, image: u64: the distinct pairs again, for images-per-text (partitioned by text, where `pairs` is
    # partitioned by image); None = take them from `pairs` (a whole pool or a single shard)
    texts: pl.DataFrame | None = None
    # key (uid): u64, ck_min: u64, n: u64      rows per uid and their smallest content key
    uids: pl.DataFrame = dataclasses.field(default_factory=lambda: _empty_frame("ck_min"))
    # key (uid x content key): u64, pos_min: u64, n: u64   byte-identical copies and their first position
    copies: pl.DataFrame = dataclasses.field(default_factory=lambda: _empty_frame("pos_min"))
    _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def empty() -> "AlignStats":
        u = pl.UInt64
        return AlignStats(
            pl.DataFrame(schema={"tok": u, "n": u}),
            pl.DataFrame(schema={"pair": u, "image": u, "text": u, "uid_min": u, "n": u}),
            pl.DataFrame(schema={"key": u, "uid_min": u, "n": u}),
            dict.fromkeys(META_SUMS, 0),
        )

    def text_pairs(self) -> pl.DataFrame:
        return self.texts if self.texts is not None else self.pairs.select("text", "image")

    # lookups: sorted numpy arrays, built once per stats object (apply on a whole pool's stats; `answer` on
    # a merged partition)
    def lookup(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._cache:
            if name == "token_n":
                df = self.tokens.select("tok", "n")
            elif name == "image_texts":
                df = self.pairs.group_by("image").agg(n=pl.len().cast(pl.UInt64)).sort("image")
            elif name == "text_images":
                df = self.text_pairs().group_by("text").agg(n=pl.len().cast(pl.UInt64)).sort("text")
            elif name == "pair_uid":
                df = self.pairs.filter(pl.col("n") > 1).select("pair", "uid_min")
            elif name == "band_uid":
                df = self.bands.filter(pl.col("n") > 1).select("key", "uid_min")
            elif name == "uid_ck":
                df = self.uids.filter(pl.col("n") > 1).select("key", "ck_min")
            elif name == "copy_pos":
                df = self.copies.filter(pl.col("n") > 1).select("key", "pos_min")
            else:
                raise KeyError(name)
            k, v = df.columns
            df = df.sort(k)
            self._cache[name] = (df[k].to_numpy().astype(_U64), df[v].to_numpy().astype(_U64))
        return self._cache[name]


def _empty_frame(value: str) -> pl.DataFrame:
    return pl.DataFrame(schema={"key": pl.UInt64, value: pl.UInt64, "n": pl.UInt64})


@data_record
@dataclasses.dataclass
class AlignAnswer:
    """What one shard's apply needs from the pool: every lookup restricted to the keys the shard holds
    (sorted key and value arrays), and the pool-wide meta. Its size follows the shard, not the pool (bench_align's
    figure: bench/README.md, align row)."""

    __module__ = "stages.align"  # the record's name in run folders (see AlignStats)

    tables: dict  # lookup name -> (keys u64, values u64), keys sorted
    meta: dict

    def lookup(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.tables[name]


def _find(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in `sorted_keys` of each of `keys`, whether it is there)."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
    i = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return i, sorted_keys[i] == keys


def _restrict(table: tuple[np.ndarray, np.ndarray], keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a sorted lookup whose key is in `keys` (unique and sorted: so are the rows)."""
    i, found = _find(table[0], keys)
    return table[0][i[found]], table[1][i[found]]


def lookup_values(table: tuple[np.ndarray, np.ndarray], keys: np.ndarray, default: int) -> np.ndarray:
    i, found = _find(table[0], keys)
    out = np.full(len(keys), default, dtype=_U64)
    out[found] = table[1][i[found]]
    return out


def _sum_meta(metas: list[dict]) -> dict:
    return {k: sum(int(m.get(k, 0)) for m in metas) for k in META_SUMS}


def _merge_frames(frames: list[pl.DataFrame], key: str, aggs: list) -> pl.DataFrame:
    frames = [f for f in frames if f.height]
    if not frames:
        return None  # type: ignore[return-value]
    return pl.concat(frames).group_by(key).agg(aggs).sort(key)


# ---- pass 1: one shard's partial -----------------------------------------------------------------
def _count_min(key: np.ndarray, value: np.ndarray, out: str) -> pl.DataFrame:
    """key, out (smallest value), n (rows) per distinct key, sorted by key."""
    return (pl.DataFrame({"key": key, "v": value})
            .group_by("key").agg(pl.col("v").min().alias(out), n=pl.len().cast(pl.UInt64)).sort("key"))


def shard_stats(tokens: np.ndarray, image: np.ndarray, text: np.ndarray, uid: np.ndarray, pair: np.ndarray,
                band_keys: np.ndarray, band_uid: np.ndarray, uid_keys: tuple, copy_keys: tuple, meta: dict) -> AlignStats:
    """A shard's partial: token hashes (one per occurrence); the (image, text, uid, pair hash) of rows with an
    image identity; band keys [m, bands] with their rows' uids; (uid, content key) and (uid x content key,
    position) per row."""
    tok_counts = pl.DataFrame({"tok": tokens}).group_by("tok").agg(n=pl.len().cast(pl.UInt64)).sort("tok")
    pairs = (
        pl.DataFrame({"pair": pair, "image": image, "text": text, "uid": uid})
        .group_by("pair")
        .agg(pl.col("image").first(), pl.col("text").first(), uid_min=pl.col("uid").min(), n=pl.len().cast(pl.UInt64))
        .sort("pair")
    )
    bands = _count_min(band_keys.ravel(), np.repeat(band_uid, band_keys.shape[1]), "uid_min")
    return AlignStats(tok_counts, pairs, bands, meta, uids=_count_min(*uid_keys, "ck_min"),
                      copies=_count_min(*copy_keys, "pos_min"))


# ---- merge and the shuffle (runner: memory per task flat in the pool size) ----------------------------
def merge(partials: list) -> AlignStats:
    parts = [p for p in partials if p is not None]
    out = AlignStats.empty()
    if not parts:
        return out
    u = pl.UInt64
    tokens = _merge_frames([p.tokens for p in parts], "tok", [pl.col("n").sum().cast(u)])
    pairs = _merge_frames(
        [p.pairs for p in parts], "pair",
        [pl.col("image").first(), pl.col("text").first(), pl.col("uid_min").min(), pl.col("n").sum().cast(u)],
    )
    bands = _merge_frames([p.bands for p in parts], "key", [pl.col("uid_min").min(), pl.col("n").sum().cast(u)])
    uids = _merge_frames([p.uids for p in parts], "key", [pl.col("ck_min").min(), pl.col("n").sum().cast(u)])
    copies = _merge_frames([p.copies for p in parts], "key", [pl.col("pos_min").min(), pl.col("n").sum().cast(u)])
    texts = None
    if any(p.texts is not None for p in parts):
        texts = pl.concat([p.text_pairs() for p in parts]).unique().sort("text", "image")
    return AlignStats(
        tokens if tokens is not None else out.tokens,
        pairs if pairs is not None else out.pairs,
        bands if bands is not None else out.bands,
        _sum_meta([p.meta for p in parts]),
        texts,
        uids=uids if uids is not None else out.uids,
        copies=copies if copies is not None else out.copies,
    )


def split(partial: AlignStats, n: int) -> list[AlignStats]:
    """Each table cut by the key its lookup goes by: tokens by token, pairs by image (texts per image and
    the pair's smallest uid), the (text, image) pairs again by text (images per text), bands by key."""
    def part(df: pl.DataFrame, key: str) -> list[pl.DataFrame]:
        which = (df[key] % n).cast(pl.Int64).to_numpy() if df.height else np.zeros(0, np.int64)
        return [df.filter(pl.Series(which == k)) for k in range(n)]

    tokens, pairs, bands = part(partial.tokens, "tok"), part(partial.pairs, "image"), part(partial.bands, "key")
    texts = part(partial.text_pairs().unique().sort("text", "image"), "text")
    uids, copies = part(partial.uids, "key"), part(partial.copies, "key")
    zero = dict.fromkeys(META_SUMS, 0)
    return [AlignStats(tokens[k], pairs[k], bands[k], dict(partial.meta) if k == 0 else zero, texts[k],
                       uids=uids[k], copies=copies[k])
            for k in range(n)]


def answer(merged: AlignStats, piece: AlignStats) -> AlignAnswer:
    def keys(df: pl.DataFrame, col: str) -> np.ndarray:
        return np.unique(df[col].to_numpy().astype(_U64))

    wanted = {
        "token_n": keys(piece.tokens, "tok"), "image_texts": keys(piece.pairs, "image"),
        "text_images": keys(piece.text_pairs(), "text"), "pair_uid": keys(piece.pairs, "pair"),
        "band_uid": keys(piece.bands, "key"), "uid_ck": keys(piece.uids, "key"),
        "copy_pos": keys(piece.copies, "key"),
    }
    return AlignAnswer({name: _restrict(merged.lookup(name), wanted[name]) for name in LOOKUPS}, dict(merged.meta))


def join_answers(answers: list[AlignAnswer]) -> AlignAnswer:
    """Keys of different partitions are disjoint: concatenate and sort (the runner gives >= 1 answer)."""
    tables = {}
    for name in LOOKUPS:
        k = np.concatenate([a.tables[name][0] for a in answers])
        v = np.concatenate([a.tables[name][1] for a in answers])
        order = np.argsort(k, kind="stable")
        tables[name] = (k[order], v[order])
    return AlignAnswer(tables, _sum_meta([a.meta for a in answers]))


# ---- in the stage folder -----------------------------------------------------------------------------
def save(stats: AlignStats, folder: str, lsh_bands: int, lsh_rows: int) -> None:
    """Parquet per table. Band keys seen once cannot make anyone a duplicate: they are dropped."""
    shards.write_shard(stats.tokens.to_arrow(), shards.join(folder, "token_counts.parquet"))
    shards.write_shard(stats.pairs.to_arrow(), shards.join(folder, "image_text_pairs.parquet"))
    shards.write_shard(stats.bands.filter(pl.col("n") > 1).to_arrow(), shards.join(folder, "lsh_bands.parquet"))
    # uids seen once, and rows with no byte-identical copy, cannot make anyone a copy: dropped too
    shards.write_shard(stats.uids.filter(pl.col("n") > 1).to_arrow(), shards.join(folder, "uid_copies.parquet"))
    shards.write_shard(stats.copies.filter(pl.col("n") > 1).to_arrow(), shards.join(folder, "identical_rows.parquet"))
    meta = dict(stats.meta, lsh_bands=lsh_bands, lsh_rows=lsh_rows, band_keys_total=stats.bands.height)
    shards.write_json(meta, shards.join(folder, "meta.json"))


def load(folder: str) -> AlignStats:
    def read(name):
        return pl.from_arrow(shards.read_shard(shards.join(folder, name)))

    meta = shards.read_json(shards.join(folder, "meta.json")) or {}
    return AlignStats(read("token_counts.parquet"), read("image_text_pairs.parquet"), read("lsh_bands.parquet"), meta,
                      uids=read("uid_copies.parquet"), copies=read("identical_rows.parquet"))
