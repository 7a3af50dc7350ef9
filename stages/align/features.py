"""What align's rules read: one `RowFeatures` per shard, each fact computed once.

The first group comes from the shard's rows alone (collect and apply both need it); in apply, the rest comes
from the pool's statistics (or the pass-1 answer) and the pixels, each fact by its named provider
(`lookups.PoolFacts`) when a rule first reads it. A fact that is None means there is no data for it in this
pool, and a rule that needs it is skipped (`pipeline.rules.judge`)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.hashing import hash64_strings, mix64, salt64, uid_rank
from pipeline.rules import Facts

from .text import normalise_text, tokenize

_U64 = np.uint64


class RowFeatures(Facts):
    """A shard's facts, by name (pipeline.rules.Facts): the first group given when made (`row_features`), the
    second computed on first read by the providers of `lookups.PoolFacts`, or given (a test's hand-made rows)."""

    FIELDS = (
        # ---- from the shard's rows (collect and apply) ----
        "uid",  # u64 rank of the uid: "a smaller uid" for duplicates
        "tokens",  # its word tokens, list[str]
        "nwords",  # int64 word count
        "text_h",  # u64 hash of the normalised alt-text
        "has_bytes",  # the row has image bytes
        "content",  # u64 content64 of the bytes (0 without)
        "image_id",  # u64 image identity: the content hash, or the url in a text-only pool
        "id_ok",  # the row has an image identity
        "images",  # the image facts (images.IMAGE_FACTS); None for a text-only shard
        # ---- apply: pixels and pool facts ----
        "decoded",  # bytes that decode within max_image_pixels; None: the pool holds no image bytes
        "phash",  # u64 dHash of the decoded image (0 when not decoded)
        "width",  # int64 size the size rules judge: ingest's original size, else the decoded
        "height",  # one; 0 = unknown or unreadable. None: no sizes nor pixels in the pool
        "texts_per_image",  # u64 distinct texts with the row's image identity in the pool
        "images_per_text",  # u64 distinct images with the row's normalised text
        "pair_uid_min",  # u64 smallest uid of the row's (image, text) when the pool has it more than once,
                         # else the u64 maximum
        "other_copy_kept",  # another row with the row's uid is the copy kept
        "band_uid_min",  # u64 smallest uid sharing an LSH band key with the row (same image), the u64 maximum
                         # when none or the row was not searched
        "words",  # the shard's distinct words
        "word_count",  # u64 pool count per distinct word
        "token_row",  # int64 row of each token
        "token_word",  # int64 its word (index into `words`)
        "captions",  # raw texts (only for the language rule)
    )


def row_features(table: pa.Table, img: dict | None, url_as_image: bool, cls: type = RowFeatures,
                 **more) -> RowFeatures:
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
    return cls(
        n, **more, uid=uid_rank(table.column("uid")), tokens=tokens,
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
