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

Pool-wide facts come from `collect` (per shard) and `merge` (associative sums/mins over 64-bit keys):
token counts; one row per distinct (image, text) pair (its smallest uid and row count), from which
texts-per-image and images-per-text follow; the smallest uid per LSH band key; and, per uid, its smallest
content key and row count (`uids`), and per (uid, content key) the smallest position hash (`copies`). They are keyed by
64-bit hashes (16-40 bytes a row, never row payloads), but they still grow with the pool, so the runner
shuffles them (`split`: each table cut by its key's hash; `merge` per partition; `answer`: the lookups one
shard needs) and no task ever holds the whole. Nothing depends on shard boundaries, row order, worker
count or partition count.

Two image hashes, on purpose:
  * `image_hash` = blake2b-64 of the encoded bytes. "Same image" for the pool-wide counts and for
    duplicates. It is exact: two different product shots on white can share a 64-bit perceptual hash, and
    merging them would drop innocent captions. Re-encoded copies are missed by it; that is the price.
  * `image_phash` = 64-bit dHash (Pillow + numpy) of the decoded image, used only against the evaluation
    set, where near-copies (resized, re-encoded) must be caught.
Pixels are read once: rows carry only a reference to their image (`image_ref`, pipeline/images.py); `collect`
reads each shard's bytes through the run's image reader, a store file at a time, and computes every per-image
fact (content hash, decodable, decoded size, dHash) in that one pass. `apply` takes them from the pass-1 cache
(`Stage.cache_put`/`cache_take`) and reads the pixels again only when the cache is missing.
A text-only pool (no image bytes anywhere) uses the url as the image identity when there is one, so
boilerplate and duplicates are still found; the image-only rules are skipped and the manifest says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
import struct
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import check_ranges
from pipeline import schema, shards
from pipeline.codec import data_record
from pipeline.hashing import _count_gt, _mix64, _salt, blake64, combine64, hash64_strings, row_content_key, uid_rank
from pipeline.images import MAX_IMAGE_PIXELS, open_image
from pipeline.stage import Stage, StageError, first_reason, split_by_reason

log = logging.getLogger("clipcurate.align")

REASONS = [
    "image_unreadable",
    "image_too_small",
    "aspect_ratio",
    "image_many_texts",
    "text_many_images",
    "too_few_words",
    "too_many_words",
    "rare_token",
    "exact_duplicate",
    "near_duplicate",
    "eval_near_duplicate",
    "language",
]

# Word token: a run of letters/digits/underscore, with inner apostrophes ("don't" is one word).
TOKEN_RE = r"\w+(?:['’]\w+)*"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

_U64 = np.uint64
_MAX_U64 = np.iinfo(np.uint64).max


# ---- text features ---------------------------------------------------------------------------
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


def _explode_tokens(tokens: pl.Series) -> tuple[np.ndarray, pl.Series]:
    """(row index per token, tokens) for a list[str] column."""
    lens = tokens.list.len().fill_null(0).to_numpy()
    rows = np.repeat(np.arange(len(tokens), dtype=np.int64), lens)
    return rows, tokens.explode().drop_nulls() if len(rows) else pl.Series([], dtype=pl.String)


def shingles(tokens: pl.Series, k: int) -> tuple[np.ndarray, pl.Series]:
    """Word k-shingles per row (rows with 1..k-1 tokens give one shingle: all their tokens)."""
    rows, toks = _explode_tokens(tokens)
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


_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))


def _fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = _FMIX32
    with np.errstate(over="ignore"):
        h = h ^ (h >> s1)
        h = h * m1
        h = h ^ (h >> s2)
        h = h * m2
        return h ^ (h >> s3)


class MinHasher:
    """datasketch 2.0 MinHash (default 'affine32' scheme), vectorised over a whole shard.

    Same permutations and the same `sha1_hash32` as `datasketch.MinHash(num_perm, seed)`, so a row's
    signature equals `MinHash.update` over its shingles (checked in the tests). sha1 runs once per
    distinct shingle of the shard (a Python call each: hashlib has no vectorised form), then the
    permutations are one numpy broadcast and the per-row minimum a loop over shingle positions.
    """

    def __init__(self, num_perm: int, seed: int, threshold: float):
        from datasketch import MinHash
        from datasketch.lsh import _optimal_param  # what MinHashLSH(threshold, num_perm) itself uses

        m = MinHash(num_perm=num_perm, seed=seed)
        if getattr(m, "scheme", "affine32") != "affine32":
            raise StageError(f"align: datasketch MinHash scheme {m.scheme!r} is not the expected 'affine32'")
        self.a = np.asarray(m.permutations[0], dtype=np.uint32)
        self.b = np.asarray(m.permutations[1], dtype=np.uint32)
        # bands x rows minimising false positive + false negative area around the threshold, as
        # datasketch's MinHashLSH picks them (at threshold 1.0 that is 1 band: identical sketches only)
        self.bands, self.rows = (int(x) for x in _optimal_param(threshold, num_perm, 0.5, 0.5))
        self.num_perm = num_perm

    def signatures(self, rows: np.ndarray, sh: pl.Series, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(row ids that have shingles, their signatures [m, num_perm] uint32). `rows` must be sorted."""
        if len(rows) == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.num_perm), np.uint32)
        uniq = sh.unique(maintain_order=False).sort()
        sid = pl.DataFrame({"sh": sh}).join(
            pl.DataFrame({"sh": uniq, "i": np.arange(len(uniq), dtype=np.int64)}), on="sh", how="left", maintain_order="left"
        )["i"].to_numpy()
        # one sha1 per distinct shingle: the only per-item Python step (no vectorised sha1 exists)
        hv = np.fromiter(
            (struct.unpack("<I", hashlib.sha1(s.encode("utf-8")).digest()[:4])[0] for s in uniq.to_list()),
            dtype=np.uint32,
            count=len(uniq),
        )
        with np.errstate(over="ignore"):
            pv = self.a[None, :] * _fmix32(hv)[:, None] + self.b[None, :]  # [distinct shingles, num_perm]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        row_ids = rows[starts]
        lens = np.diff(np.r_[starts, len(rows)])
        # Longest rows first; step j folds in every row's j-th shingle with one contiguous minimum over
        # the rows that have one (a prefix). ~10x faster than minimum.reduceat over axis 0.
        order = np.argsort(-lens, kind="stable")
        s_starts, s_lens = starts[order], lens[order]
        sig = pv[sid[s_starts]]
        active = _count_gt(s_lens, int(s_lens[0]))
        for j in range(1, int(s_lens[0])):
            k = int(active[j])
            np.minimum(sig[:k], pv[sid[s_starts[:k] + j]], out=sig[:k])
        out = np.empty_like(sig)
        out[order] = sig
        sig = out
        return row_ids, sig

    def band_keys(self, sig: np.ndarray, image_id: np.ndarray) -> np.ndarray:
        """[m, bands] uint64 keys: hash(image, band index, the band's r values)."""
        out = np.empty((len(sig), self.bands), dtype=_U64)
        for j in range(self.bands):
            h = combine64(image_id, np.full(len(sig), j, dtype=_U64))
            for v in sig[:, j * self.rows : (j + 1) * self.rows].T:
                h = _mix64(h ^ v.astype(_U64))
            out[:, j] = h
        return out


# ---- images ------------------------------------------------------------------------------------
def dhash64(img) -> int:
    """64-bit difference hash: 9x8 grey thumbnail, bit = left pixel brighter than its right neighbour."""
    from PIL import Image

    g = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (g[:, :-1] > g[:, 1:]).ravel()
    return int(np.packbits(bits, bitorder="big").view(">u8")[0])


def inspect_image(data: bytes | None, max_pixels: int) -> tuple[bool, int, int, int]:
    """(ok, width, height, dhash). One decode per image, in `collect` (apply only when the pass-1 cache is
    missing); never raises.

    Refuses images over `max_pixels` before decoding (decompression bombs), and truncated or corrupt
    files (Pillow raises; LOAD_TRUNCATED_IMAGES stays off). JPEGs are decoded at reduced scale
    (`draft`, at least 128 px a side): the hash needs a 9x8 thumbnail, not the full image. Not smaller:
    at 64 px the DCT-domain downscale differs enough between an image and its resized copy to push
    copies past k (measured on the demo world's eval copies: mean distance 1.6 bits at 64 px, 0.9 at
    128 px, 0.8 with a full decode; 128 px costs ~1.5x the 64 px decode, 0.65x a full one).
    And straight to grey (`draft("L")`: libjpeg returns the Y channel, no chroma upsampling nor colour
    conversion), as the hash only looks at luminance: 1.2x faster than decoding RGB and converting, and on
    bench_images' pool 96.4% of 3,000 hashes are the same bits, the rest 1-2 bits apart (mean 0.04).
    """
    try:
        with open_image(data, max_pixels) as img:
            w, h = img.size
            img.draft("L", (128, 128))
            img.load()
            return True, int(w), int(h), dhash64(img)
    except Exception:  # noqa: BLE001 - no bytes, a bomb, any decoder error: "unreadable", by design
        return False, 0, 0, 0


IMAGE_CHUNK = 256  # images per thread task: amortises the pool's per-task cost (~30 us) over ~0.15 s of work


def decode_threads(configured: int) -> int:
    """`configured`, or with 0 the cores this process may run on."""
    if configured > 0:
        return configured
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class HammingIndex:
    """Multi-index over 64-bit hashes: split into k+1 bit bands; by pigeonhole any hash within Hamming
    distance k shares at least one band exactly. Each band is a sorted array (searchsorted); candidates
    are verified with popcount. Work ~ pool x bands x (eval / 2^band bits), not pool x eval."""

    def __init__(self, hashes: np.ndarray, k: int):
        self.k = int(k)
        self.hashes = np.unique(np.asarray(hashes, dtype=_U64))
        nb = min(self.k + 1, 64)
        edges = np.linspace(0, 64, nb + 1).astype(int)
        self.bands = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            mask = _U64((1 << (hi - lo)) - 1)
            keys = (self.hashes >> _U64(lo)) & mask
            order = np.argsort(keys, kind="stable")
            self.bands.append((_U64(lo), mask, keys[order], order))

    def __len__(self) -> int:
        return len(self.hashes)

    def near(self, q: np.ndarray) -> np.ndarray:
        """Boolean per query hash: some indexed hash is within Hamming distance k."""
        q = np.asarray(q, dtype=_U64)
        hit = np.zeros(len(q), dtype=bool)
        if len(self.hashes) == 0 or len(q) == 0:
            return hit
        for lo, mask, keys, order in self.bands:
            qk = (q >> lo) & mask
            a = np.searchsorted(keys, qk, side="left")
            b = np.searchsorted(keys, qk, side="right")
            cnt = b - a
            if not cnt.any():
                continue
            qi = np.repeat(np.arange(len(q)), cnt)
            first = np.repeat(a - np.cumsum(np.r_[0, cnt[:-1]]), cnt)
            ei = order[first + np.arange(len(qi))]
            close = np.bitwise_count(q[qi] ^ self.hashes[ei]) <= self.k
            hit[qi[close]] = True
        return hit


def _image_column(table: pa.Table) -> str | None:
    for name in ("image", "jpg", "bytes", "img"):
        if name in table.column_names:
            t = table.schema.field(name).type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t):
                return name
            if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:  # Hugging Face Image feature
                return name
    return None


def load_eval_hashes(path: str, max_pixels: int) -> tuple[np.ndarray, int]:
    """dHashes of an evaluation set: a folder of image files (recursive) or a Parquet file/folder with
    an image-bytes column (image/jpg/bytes, or a {bytes: ...} struct) or a uint64 `image_phash` column.
    Returns (hashes, unreadable count)."""
    p = Path(path)
    blobs: list[bytes | None] = []
    if p.is_dir() and not any(p.glob("*.parquet")):
        for f in sorted(x for x in p.rglob("*") if x.suffix.lower() in IMAGE_EXTS and x.is_file()):
            blobs.append(f.read_bytes())
    else:
        files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        import pyarrow.parquet as pq

        for f in files:
            t = pq.read_table(f)
            if "image_phash" in t.column_names and _image_column(t) is None:
                col = pc.drop_null(t.column("image_phash")).to_numpy().astype(_U64)
                blobs.extend(int(x) for x in col)  # type: ignore[arg-type]
                continue
            name = _image_column(t)
            if name is None:
                raise StageError(f"align: eval set {f} has no image column (image/jpg/bytes) or image_phash")
            col = t.column(name)
            if pa.types.is_struct(col.type):
                col = pc.struct_field(col, "bytes")
            blobs.extend(col.to_pylist())
    hashes, bad = [], 0
    for b in blobs:  # one decode per eval image, once per process
        if isinstance(b, int):
            hashes.append(b)
            continue
        ok, _, _, h = inspect_image(b, max_pixels)
        if ok:
            hashes.append(h)
        else:
            bad += 1
    return np.asarray(hashes, dtype=_U64), bad


# ---- statistics ----------------------------------------------------------------------------------
META_SUMS = ("rows", "image_rows", "id_rows")  # rows; rows with image bytes; rows with an image identity


@data_record
@dataclasses.dataclass
class AlignStats:
    """Pool-wide counts. A per-shard partial, a partition of the pool and the merged whole have the same
    shape (merge is concat + group-by sum/min, hence associative and order-free; outputs sorted by key).

    On a cluster the runner shuffles them (`AlignStage.split`): each table is cut by the hash of the key
    its lookup is by, so texts-per-image and images-per-text are whole inside one partition."""

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


LOOKUPS = ("token_n", "image_texts", "text_images", "pair_uid", "band_uid", "uid_ck", "copy_pos")


def _empty_frame(value: str) -> pl.DataFrame:
    return pl.DataFrame(schema={"key": pl.UInt64, value: pl.UInt64, "n": pl.UInt64})


@data_record
@dataclasses.dataclass
class AlignAnswer:
    """What one shard's apply needs from the pool: every lookup restricted to the keys the shard holds
    (sorted key and value arrays), and the pool-wide meta. Its size follows the shard, not the pool: 5.2 MiB
    per 50k-row shard of bench_align's 1M-caption pool (bench/results/align.json)."""

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


def _lookup(table: tuple[np.ndarray, np.ndarray], keys: np.ndarray, default: int) -> np.ndarray:
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


# ---- the stage -----------------------------------------------------------------------------------
class AlignStage(Stage):
    needs_pixels = True
    """ALIGN / DataComp-basic filtering with exact and near-duplicate removal and eval decontamination."""

    name = "align"
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
        # default; raise it for web-scale pools. With Zipf < 1.5 (wordfreq 'en') the rule alone flags
        # 1.6% of Flickr8k captions and 31.5% of the raw LAION 10k sample (28.1% as the first broken
        # rule, after the word counts): typos, product codes, names, non-English (bench/results/align.json).
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

        def __post_init__(self):
            check_ranges("align", self, min_side=(0, None), max_aspect=(1, None), max_texts_per_image=(1, None),
                         max_images_per_text=(1, None), min_words=(0, None), max_words=(max(0, self.min_words), None),
                         min_token_count=(0, None), near_dup_threshold=(0, 1), num_perm=(2, None),
                         shingle_size=(1, None), eval_hamming=(0, 64), max_image_pixels=(1, None),
                         decode_threads=(0, None))

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
        self._zipf: dict[str, float] = {}
        self._langid = None

    # ---- resources ----
    @property
    def minhasher(self) -> MinHasher:
        if self._minhasher is None:
            c = self.config
            self._minhasher = MinHasher(c.num_perm, c.minhash_seed, c.near_dup_threshold)
        return self._minhasher

    def eval_index(self) -> HammingIndex | None:
        if not self.config.eval_images:
            return None
        if self._eval is None:
            if not Path(self.config.eval_images).exists():
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

    def fingerprint_parts(self) -> dict:
        import datasketch
        import wordfreq

        parts = {"datasketch": datasketch.__version__, "wordfreq": getattr(wordfreq, "__version__", "3.1.1"),
                 "uid_copies": 1, "polars": pl.__version__}  # row_content_key JSON-encodes nested columns with polars
        if self.config.eval_images and Path(self.config.eval_images).exists():
            p = Path(self.config.eval_images)
            files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
            parts["eval"] = [(str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size) for f in files]
        return parts

    # ---- per-row features shared by collect and apply ----
    def _features(self, table: pa.Table, img: dict | None) -> dict:
        """Per-row text features, and the image identity: the content hash where the row has image bytes
        (`img`, from `_inspect_images`), else the url in a text-only pool."""
        c = self.config
        texts = pl.Series("text", table.column("text"))
        norm = normalise_text(texts)
        tokens = tokenize(norm)
        nwords = tokens.list.len().fill_null(0).to_numpy().astype(np.int64)
        text_h = hash64_strings(norm.to_arrow(), "text")
        uid = uid_rank(table.column("uid"))
        n = table.num_rows
        has_bytes = img["has_bytes"] if img is not None else np.zeros(n, dtype=bool)
        content = img["content"] if img is not None else np.zeros(n, dtype=_U64)
        image_id = np.zeros(n, dtype=_U64)
        image_id[has_bytes] = _mix64(content[has_bytes] ^ _salt("image"))
        id_ok = has_bytes.copy()
        if c.url_as_image and "url" in table.column_names:
            url = table.column("url").cast(pa.string())
            url_ok = pc.invert(pc.is_null(url)).to_numpy(zero_copy_only=False) & ~has_bytes
            if url_ok.any():
                uh = hash64_strings(url, "url")
                image_id[url_ok] = uh[url_ok]
                id_ok |= url_ok
        return {
            "norm": norm, "tokens": tokens, "nwords": nwords, "text_h": text_h, "uid": uid,
            "has_bytes": has_bytes, "content": content, "image_id": image_id, "id_ok": id_ok, "images": img,
        }

    # ---- pixels: read once ----
    # Every per-image fact align needs (content hash, decodable, decoded size, dHash) comes from one read of the
    # shard's pixels through the image reader, in collect; apply takes them from the pass-1 cache
    # (Stage.cache_put/cache_take) and reads the pixels again only when the cache is missing.
    IMAGE_FACTS = {"has_bytes": np.bool_, "content": _U64, "decoded": np.bool_, "width": np.int64,
                   "height": np.int64, "phash": _U64}

    def _inspect_images(self, table: pa.Table) -> dict | None:
        """{fact: array per row} for a shard whose rows reference images; None for a text-only pool."""
        blobs = self.pixels(table)
        if blobs is None:
            return None
        n = len(blobs)
        out = {k: np.zeros(n, dtype=t) for k, t in self.IMAGE_FACTS.items()}
        items = blobs.to_pylist()
        limit = self.config.max_image_pixels

        def facts(lo: int, hi: int) -> None:  # hashing and decoding are per image by nature
            for i in range(lo, hi):
                b = items[i]
                if b is None:
                    continue
                out["has_bytes"][i] = True
                out["content"][i] = blake64(b)  # hashlib has no vectorised form; cheap next to the decode
                ok, w, h, ph = inspect_image(b, limit)
                out["decoded"][i], out["width"][i], out["height"][i], out["phash"][i] = ok, w, h, ph

        threads = decode_threads(self.config.decode_threads)
        if threads <= 1 or n < 2 * IMAGE_CHUNK:
            facts(0, n)
        else:
            # Pillow's decode and resize and hashlib's digest release the GIL, so threads use idle cores:
            # all of them in an in-process run, and on a cluster the ones a worker that has finished its
            # shards leaves idle (5 shards on 2 workers: the last shard alone). Each chunk writes only its rows.
            with ThreadPoolExecutor(threads, thread_name_prefix="align-decode") as pool:
                list(pool.map(lambda lo: facts(lo, min(n, lo + IMAGE_CHUNK)), range(0, n, IMAGE_CHUNK)))
        return out

    def _images_key(self) -> str:
        return json.dumps(["images", self.config.max_image_pixels])

    def _cached_images(self, table: pa.Table) -> dict | None:
        cached = self.cache_take("images", table, self._images_key())
        if cached is None:
            return self._inspect_images(table)
        return {k: cached.column(k).to_numpy(zero_copy_only=False).astype(t) for k, t in self.IMAGE_FACTS.items()}

    def _band_rows(self, f: dict) -> np.ndarray:
        """Rows that take part in near-duplicate search: an image identity and a word count in range
        (a caption dropped for its length must not knock out its near-duplicate twin)."""
        c = self.config
        return f["id_ok"] & (f["nwords"] >= c.min_words) & (f["nwords"] <= c.max_words)

    def _bands(self, f: dict, rows_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row ids, [m, bands] band keys) for the masked rows."""
        idx = np.flatnonzero(rows_mask)
        if len(idx) == 0:
            return idx, np.zeros((0, self.minhasher.bands), dtype=_U64)
        rows, sh = shingles(f["tokens"].gather(idx), self.config.shingle_size)
        sub_rows, sig = self.minhasher.signatures(rows, sh, len(idx))
        keys = self.minhasher.band_keys(sig, f["image_id"][idx][sub_rows])
        return idx[sub_rows], keys

    # MinHash signatures and band keys are the costliest per-row work of both passes, and apply needs
    # the same keys collect made: collect leaves them in the stage folder (Stage.cache_put), apply takes
    # them. A missing or mismatching cache means computing them again (same keys: pure functions).
    def _bands_key(self) -> str:
        return json.dumps([dataclasses.asdict(self.config), self.seed, self.minhasher.bands, self.minhasher.rows],
                          sort_keys=True, default=str)

    def _cache_bands(self, table: pa.Table, brow: np.ndarray, keys: np.ndarray) -> None:
        n, b = table.num_rows, self.minhasher.bands
        mat = np.zeros((n, b), dtype=_U64)
        mat[brow] = keys
        has = np.zeros(n, dtype=bool)
        has[brow] = True
        self.cache_put("bands", table, {"has_bands": has,
                                        "band_keys": pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel()), b)},
                       self._bands_key())

    def _cached_bands(self, table: pa.Table, f: dict, rows_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cached = self.cache_take("bands", table, self._bands_key())
        if cached is None:
            return self._bands(f, rows_mask)
        b = self.minhasher.bands
        mat = cached.column("band_keys").combine_chunks().flatten().to_numpy().reshape(-1, b)
        idx = np.flatnonzero(rows_mask & cached.column("has_bands").to_numpy(zero_copy_only=False))
        return idx, mat[idx]

    # ---- pass 1 ----
    def collect(self, table: pa.Table) -> AlignStats:
        img = self._inspect_images(table)
        if img is not None:
            self.cache_put("images", table, img, self._images_key())
        f = self._features(table, img)
        rows, toks = _explode_tokens(f["tokens"])
        tok_counts = (
            pl.DataFrame({"tok": hash64_strings(toks.to_arrow(), "tok") if len(toks) else np.zeros(0, _U64)})
            .group_by("tok").agg(n=pl.len().cast(pl.UInt64)).sort("tok")
        )
        ok = f["id_ok"]
        pairs = (
            pl.DataFrame({
                "pair": combine64(f["image_id"][ok], f["text_h"][ok]),
                "image": f["image_id"][ok], "text": f["text_h"][ok], "uid": f["uid"][ok],
            })
            .group_by("pair")
            .agg(pl.col("image").first(), pl.col("text").first(), uid_min=pl.col("uid").min(), n=pl.len().cast(pl.UInt64))
            .sort("pair")
        )
        brow, keys = self._bands(f, self._band_rows(f))
        self._cache_bands(table, brow, keys)
        bands = (
            pl.DataFrame({"key": keys.ravel(), "uid": np.repeat(f["uid"][brow], keys.shape[1])})
            .group_by("key").agg(uid_min=pl.col("uid").min(), n=pl.len().cast(pl.UInt64))
            .sort("key")
        )
        ck, copy_key, pos = self._copy_keys(table, f)
        uids = (
            pl.DataFrame({"key": f["uid"], "ck": ck})
            .group_by("key").agg(ck_min=pl.col("ck").min(), n=pl.len().cast(pl.UInt64)).sort("key")
        )
        copies = (
            pl.DataFrame({"key": copy_key, "pos": pos})
            .group_by("key").agg(pos_min=pl.col("pos").min(), n=pl.len().cast(pl.UInt64)).sort("key")
        )
        meta = {"rows": table.num_rows, "image_rows": int(f["has_bytes"].sum()), "id_rows": int(ok.sum())}
        return AlignStats(tok_counts, pairs, bands, meta, uids=uids, copies=copies)

    def _copy_keys(self, table: pa.Table, f: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(content key, uid x content key, position hash) per row: what decides which copy of a uid is kept.
        The position (shard name, row) only orders byte-identical rows, for which the choice changes nothing
        but the shard the one kept lands in."""
        ck = row_content_key(table, np.where(f["has_bytes"], f["content"], _U64(0)))
        shard = hash64_strings(pa.array([str(self.context.get("shard", ""))], pa.string()), "shard")[0]
        pos = combine64(np.full(table.num_rows, shard, dtype=_U64), np.arange(table.num_rows, dtype=_U64))
        return ck, combine64(f["uid"], ck), pos

    def _uid_copies(self, table: pa.Table, f: dict, stats) -> np.ndarray:
        """Rows that are not the kept copy of their uid (see `exact_duplicate`)."""
        ck, copy_key, pos = self._copy_keys(table, f)
        ck_min = _lookup(stats.lookup("uid_ck"), f["uid"], _MAX_U64)
        pos_min = _lookup(stats.lookup("copy_pos"), copy_key, _MAX_U64)
        return (ck > ck_min) | ((ck == ck_min) & (pos > pos_min))

    def merge(self, partials: list) -> AlignStats:
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

    # ---- the shuffle (runner: memory per task flat in the pool size) ----
    def split(self, partial: AlignStats, n: int) -> list[AlignStats]:
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

    def answer(self, merged: AlignStats, piece: AlignStats) -> AlignAnswer:
        def keys(df: pl.DataFrame, col: str) -> np.ndarray:
            return np.unique(df[col].to_numpy().astype(_U64))

        wanted = {
            "token_n": keys(piece.tokens, "tok"), "image_texts": keys(piece.pairs, "image"),
            "text_images": keys(piece.text_pairs(), "text"), "pair_uid": keys(piece.pairs, "pair"),
            "band_uid": keys(piece.bands, "key"), "uid_ck": keys(piece.uids, "key"),
            "copy_pos": keys(piece.copies, "key"),
        }
        return AlignAnswer({name: _restrict(merged.lookup(name), wanted[name]) for name in LOOKUPS}, dict(merged.meta))

    def join_answers(self, answers: list[AlignAnswer]) -> AlignAnswer:
        """Keys of different partitions are disjoint: concatenate and sort (the runner gives >= 1 answer)."""
        tables = {}
        for name in LOOKUPS:
            k = np.concatenate([a.tables[name][0] for a in answers])
            v = np.concatenate([a.tables[name][1] for a in answers])
            order = np.argsort(k, kind="stable")
            tables[name] = (k[order], v[order])
        return AlignAnswer(tables, _sum_meta([a.meta for a in answers]))

    def save_stats(self, stats: AlignStats, folder: str) -> None:
        """Parquet per table. Band keys seen once cannot make anyone a duplicate: they are dropped."""
        shards.write_shard(stats.tokens.to_arrow(), shards.join(folder, "token_counts.parquet"))
        shards.write_shard(stats.pairs.to_arrow(), shards.join(folder, "image_text_pairs.parquet"))
        shards.write_shard(stats.bands.filter(pl.col("n") > 1).to_arrow(), shards.join(folder, "lsh_bands.parquet"))
        # uids seen once, and rows with no byte-identical copy, cannot make anyone a copy: dropped too
        shards.write_shard(stats.uids.filter(pl.col("n") > 1).to_arrow(), shards.join(folder, "uid_copies.parquet"))
        shards.write_shard(stats.copies.filter(pl.col("n") > 1).to_arrow(), shards.join(folder, "identical_rows.parquet"))
        meta = dict(stats.meta, lsh_bands=self.minhasher.bands, lsh_rows=self.minhasher.rows,
                    band_keys_total=stats.bands.height)
        shards.write_json(meta, shards.join(folder, "meta.json"))

    def load_stats(self, folder: str) -> AlignStats:
        def read(name):
            return pl.from_arrow(shards.read_shard(shards.join(folder, name)))

        meta = shards.read_json(shards.join(folder, "meta.json")) or {}
        return AlignStats(read("token_counts.parquet"), read("image_text_pairs.parquet"), read("lsh_bands.parquet"), meta,
                          uids=read("uid_copies.parquet"), copies=read("identical_rows.parquet"))

    # ---- pass 2 ----
    def _zipf_of(self, words: list[str]) -> np.ndarray:
        """wordfreq Zipf frequency per word; a Python call per *distinct pool-rare* word, cached."""
        import wordfreq

        lang = self.config.zipf_language
        out = np.empty(len(words), dtype=np.float64)
        for i, w in enumerate(words):
            z = self._zipf.get(w)
            if z is None:
                z = self._zipf[w] = wordfreq.zipf_frequency(w, lang)
            out[i] = z
        return out

    def _rare(self, f: dict, stats: AlignStats) -> np.ndarray:
        c = self.config
        n = len(f["nwords"])
        rows, toks = _explode_tokens(f["tokens"])
        if len(rows) == 0:
            return np.zeros(n, dtype=bool)
        df = pl.DataFrame({"tok": toks}).with_columns(i=pl.col("tok").rank("dense").cast(pl.Int64) - 1)
        uniq = df.unique("i").sort("i")["tok"]
        counts = _lookup(stats.lookup("token_n"), hash64_strings(uniq.to_arrow(), "tok"), 0)
        cand = np.flatnonzero(counts < c.min_token_count)
        rare_u = np.zeros(len(uniq), dtype=bool)
        if len(cand):
            rare_u[cand] = self._zipf_of(uniq.gather(cand).to_list()) < c.min_zipf
        return np.bincount(rows, weights=rare_u[df["i"].to_numpy()], minlength=n) > 0

    def _language(self, texts: list) -> np.ndarray:
        """py3langid per caption: its classifier takes one text at a time."""
        if self._langid is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._langid = LanguageIdentifier.from_pickled_model(MODEL_FILE)
        want = self.config.language
        return np.array([bool(t) and self._langid.classify(t)[0] != want for t in texts], dtype=bool)

    def apply(self, table: pa.Table, stats: AlignStats | AlignAnswer) -> tuple[pa.Table, pa.Table]:
        c = self.config
        n = table.num_rows
        stats = stats if stats is not None else AlignStats.empty()
        f = self._features(table, self._cached_images(table))
        pool_has_images = int(stats.meta.get("image_rows", 0)) > 0
        skipped: list[str] = []

        # images: decoded once, in collect (the pass-1 cache), or here when the cache is missing
        img = f["images"]
        phash = np.zeros(n, dtype=_U64)
        decoded = np.zeros(n, dtype=bool)
        dw = np.zeros(n, dtype=np.int64)
        dh = np.zeros(n, dtype=np.int64)
        unreadable = None
        if pool_has_images and img is not None:
            decoded, dw, dh, phash = img["decoded"], img["width"], img["height"], img["phash"]
            unreadable = ~decoded
        else:
            skipped += ["image_unreadable", "eval_near_duplicate"]

        # sizes: the original size when ingest recorded it, else the decoded one
        size_cols = next(((a, b) for a, b in (("orig_width", "orig_height"), ("width", "height"))
                          if a in table.column_names and b in table.column_names), None)
        too_small = aspect = None
        if size_cols or unreadable is not None:
            if size_cols:
                W = pc.fill_null(table.column(size_cols[0]).cast(pa.int64()), -1).to_numpy()
                H = pc.fill_null(table.column(size_cols[1]).cast(pa.int64()), -1).to_numpy()
                missing = (W < 0) | (H < 0)
                W, H = np.where(missing, dw, W), np.where(missing, dh, H)
            else:
                W, H = dw, dh
            known = (W > 0) & (H > 0)
            if unreadable is not None:
                known &= ~unreadable
            lo, hi = np.minimum(W, H), np.maximum(W, H)
            too_small = known & (lo < c.min_side)
            with np.errstate(divide="ignore", invalid="ignore"):
                aspect = known & (hi > c.max_aspect * lo)
        else:
            skipped += ["image_too_small", "aspect_ratio"]

        # pool-wide counts by image identity (content hash, or url in text-only pools)
        ok = f["id_ok"]
        many_texts = many_images = near = None
        copy = self._uid_copies(table, f, stats)  # every row has a uid: this rule runs in every pool
        exact = copy
        if ok.any() or int(stats.meta.get("id_rows", 0)):
            n_texts = _lookup(stats.lookup("image_texts"), f["image_id"], 0)
            n_imgs = _lookup(stats.lookup("text_images"), f["text_h"], 0)
            many_texts = ok & (n_texts > c.max_texts_per_image)
            many_images = ok & (n_imgs > c.max_images_per_text)
            pair = combine64(f["image_id"], f["text_h"])
            exact = copy | (ok & (_lookup(stats.lookup("pair_uid"), pair, _MAX_U64) < f["uid"]))
            near = np.zeros(n, dtype=bool)
            brow, keys = self._cached_bands(table, f, self._band_rows(f) & ~exact)
            if len(brow):
                mins = _lookup(stats.lookup("band_uid"), keys.ravel(), _MAX_U64).reshape(keys.shape)
                near[brow] = (mins < f["uid"][brow, None]).any(axis=1)
            if not f["has_bytes"].any() and ok.any():
                self._note("no image bytes: the url stands in for the image in image_many_texts, "
                           "text_many_images, exact_duplicate and near_duplicate")
        else:
            skipped += ["image_many_texts", "text_many_images", "near_duplicate"]

        few = f["nwords"] < c.min_words
        many = f["nwords"] > c.max_words
        rare = self._rare(f, stats)

        eval_near = None
        idx = self.eval_index()
        if idx is not None and unreadable is not None:
            eval_near = decoded & idx.near(phash)
        elif idx is None and "eval_near_duplicate" not in skipped:
            skipped.append("eval_near_duplicate")

        lang = None
        if c.language:
            lang = self._language(table.column("text").to_pylist())
        else:
            skipped.append("language")

        rules = dict.fromkeys(REASONS)
        rules.update({
            "image_unreadable": unreadable, "image_too_small": too_small, "aspect_ratio": aspect,
            "image_many_texts": many_texts, "text_many_images": many_images,
            "too_few_words": few, "too_many_words": many, "rare_token": rare,
            "exact_duplicate": exact, "near_duplicate": near, "eval_near_duplicate": eval_near, "language": lang,
        })
        reason = first_reason(n, [(r, rules[r]) for r in REASONS])
        out = table
        for name in ("image_phash", "image_hash"):
            if name in out.column_names:
                out = out.drop_columns([name])
        if pool_has_images and img is not None:
            out = out.append_column("image_phash", pa.array(phash, pa.uint64(), mask=~decoded))
            out = out.append_column("image_hash", pa.array(f["content"], pa.uint64(), mask=~f["has_bytes"]))
        else:
            out = out.append_column("image_phash", pa.nulls(n, pa.uint64()))
            out = out.append_column("image_hash", pa.nulls(n, pa.uint64()))
        optional = {"image_unreadable", "eval_near_duplicate", "language"}
        shown = [s for s in skipped if s not in optional or (s == "eval_near_duplicate" and c.eval_images)]
        if shown:
            self._note("skipped (no data for them): " + ", ".join(r for r in REASONS if r in shown))
        return split_by_reason(out, reason)

    def _note(self, text: str) -> None:
        msg = f"align: {text}"
        if msg not in self.notes:
            self.notes.append(msg)
            log.info(msg)

    # ---- report ----
    def report(self, stage_dir: str, out_dir: str) -> dict:
        """Funnel (rows dropped per rule, in rule order) as a table and a bar chart."""
        m = shards.read_json(shards.join(stage_dir, "_manifest.json")) or {}
        rows_in = int(m.get("rows_in", 0))
        reasons = m.get("reasons", {})
        lines = ["| rule | dropped | share of input | remaining |", "|---|---:|---:|---:|"]
        left = rows_in
        order = REASONS + sorted(r for r in reasons if r not in REASONS)
        for r in order:
            d = int(reasons.get(r, 0))
            left -= d
            share = f"{100.0 * d / rows_in:.2f}%" if rows_in else "-"
            lines.append(f"| {r} | {d} | {share} | {left} |")
        lines.append(f"| **kept** | | {100.0 * left / rows_in:.2f}% | **{left}** |" if rows_in else "| **kept** | | | 0 |")
        tables = [("align funnel (rows in: %d)" % rows_in, "\n".join(lines))]
        if m.get("notes"):
            tables.append(("align notes", "\n".join(f"- {x}" for x in m["notes"])))
        from pipeline.report import bar_chart

        png = bar_chart(os.path.join(out_dir, "align_funnel.png"), order, [int(reasons.get(r, 0)) for r in order],
                        "rows dropped (first broken rule)", f"align: {rows_in} in, {left} kept")
        figures = [("align funnel", png)]
        return {"figures": figures, "tables": tables}


STAGE = AlignStage
