"""What align's rules read: one `RowFeatures` per shard, computed once.

The first group comes from the shard's rows alone (collect and apply both need it); apply adds the rest from
the pool's statistics (or the pass-1 answer) and the pixels. A field left None means there is no data for
it in this pool, and a rule that needs it is skipped (`rules.judge`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.hashing import hash64_strings, mix64, salt64, uid_rank

from .text import normalise_text, tokenize

_U64 = np.uint64


@dataclasses.dataclass
class RowFeatures:
    n: int  # rows
    # ---- from the shard's rows (collect and apply) ----
    uid: np.ndarray | None = None  # u64 rank of the uid: "a smaller uid" for duplicates
    tokens: pl.Series | None = None  # its word tokens, list[str]
    nwords: np.ndarray | None = None  # int64 word count
    text_h: np.ndarray | None = None  # u64 hash of the normalised alt-text
    has_bytes: np.ndarray | None = None  # the row has image bytes
    content: np.ndarray | None = None  # u64 content64 of the bytes (0 without)
    image_id: np.ndarray | None = None  # u64 image identity: the content hash, or the url in a text-only pool
    id_ok: np.ndarray | None = None  # the row has an image identity
    images: dict | None = None  # the image facts (images.IMAGE_FACTS); None for a text-only shard
    # ---- apply: pixels and pool facts ----
    decoded: np.ndarray | None = None  # bytes that decode within max_image_pixels; None: the pool holds no image bytes
    phash: np.ndarray | None = None  # u64 dHash of the decoded image (0 when not decoded)
    width: np.ndarray | None = None  # int64 size the size rules judge: ingest's original size, else the decoded
    height: np.ndarray | None = None  # one; 0 = unknown or unreadable. None: no sizes nor pixels in the pool
    texts_per_image: np.ndarray | None = None  # u64 distinct texts with the row's image identity in the pool
    images_per_text: np.ndarray | None = None  # u64 distinct images with the row's normalised text
    pair_uid_min: np.ndarray | None = None  # u64 smallest uid of the row's (image, text) when the pool has it
                                            # more than once, else the u64 maximum
    other_copy_kept: np.ndarray | None = None  # another row with the row's uid is the copy kept
    band_uid_min: np.ndarray | None = None  # u64 smallest uid sharing an LSH band key with the row (same image),
                                            # the u64 maximum when none or the row was not searched
    words: pl.Series | None = None  # the shard's distinct words
    word_count: np.ndarray | None = None  # u64 pool count per distinct word
    token_row: np.ndarray | None = None  # int64 row of each token
    token_word: np.ndarray | None = None  # int64 its word (index into `words`)
    captions: list | None = None  # raw texts (only for the language rule)


def row_features(table: pa.Table, img: dict | None, url_as_image: bool) -> RowFeatures:
    """Per-row text features, and the image identity: the content hash where the row has image bytes
    (`img`, the image facts), else the url in a text-only pool."""
    texts = pl.Series("text", table.column("text"))
    norm = normalise_text(texts)
    tokens = tokenize(norm)
    n = table.num_rows
    has_bytes = img["has_bytes"] if img is not None else np.zeros(n, dtype=bool)
    content = img["content"] if img is not None else np.zeros(n, dtype=_U64)
    image_id = np.zeros(n, dtype=_U64)
    image_id[has_bytes] = mix64(content[has_bytes] ^ salt64("image"))
    id_ok = has_bytes.copy()
    if url_as_image and "url" in table.column_names:
        url = table.column("url").cast(pa.string())
        url_ok = pc.invert(pc.is_null(url)).to_numpy(zero_copy_only=False) & ~has_bytes
        if url_ok.any():
            uh = hash64_strings(url, "url")
            image_id[url_ok] = uh[url_ok]
            id_ok |= url_ok
    return RowFeatures(
        n, uid=uid_rank(table.column("uid")), tokens=tokens,
        nwords=tokens.list.len().fill_null(0).to_numpy().astype(np.int64),
        text_h=hash64_strings(norm.to_arrow(), "text"), has_bytes=has_bytes, content=content, image_id=image_id,
        id_ok=id_ok, images=img,
    )


def judged_size(table: pa.Table, decoded: np.ndarray | None, dw: np.ndarray, dh: np.ndarray):
    """(width, height) the size rules judge: ingest's original size when it recorded one (orig_width/height,
    else width/height), else the decoded size (`dw`, `dh`); 0 for an unreadable image. (None, None) when
    the pool has neither sizes nor pixels."""
    size_cols = next(((a, b) for a, b in (("orig_width", "orig_height"), ("width", "height"))
                      if a in table.column_names and b in table.column_names), None)
    if size_cols is None and decoded is None:
        return None, None
    if size_cols:
        W = pc.fill_null(table.column(size_cols[0]).cast(pa.int64()), -1).to_numpy()
        H = pc.fill_null(table.column(size_cols[1]).cast(pa.int64()), -1).to_numpy()
        missing = (W < 0) | (H < 0)
        W, H = np.where(missing, dw, W), np.where(missing, dh, H)
    else:
        W, H = dw, dh
    if decoded is not None:  # an unreadable image has no size the rules may judge
        W, H = np.where(decoded, W, 0), np.where(decoded, H, 0)
    return W, H
