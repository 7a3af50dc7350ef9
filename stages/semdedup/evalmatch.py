"""semdedup's eval rules on one shard: the nearest eval image and the nearest eval caption of each row, the item
a dropped row names, and the two cosines it reports (`match_eval`). The eval set's vectors come from the survey
(`SemDedupStage.conclude_survey`); memory is bounded by EVAL_BLOCK rows x eval items floats at a time."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

EVAL_BLOCK = 1 << 14  # rows per block against the eval set


class EvalMatch(NamedTuple):
    """Per row of a shard: dropped by the image rule, by the caption rule, the eval item named (None: neither),
    and the image's and caption's cosine to that item's image and nearest caption (NaN: not compared)."""
    image_hit: np.ndarray
    text_hit: np.ndarray
    item: np.ndarray
    image_cosine: np.ndarray
    text_cosine: np.ndarray


def no_eval_match(n: int) -> EvalMatch:
    return EvalMatch(np.zeros(n, bool), np.zeros(n, bool), np.full(n, None, dtype=object),
                     np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32))


def no_eval_captions(dims: int) -> dict:
    return {"eval_text_names": [], "eval_text_vectors": np.zeros((0, dims), np.float16),
            "eval_text_image": np.zeros(0, np.int64)}


def _nearest(vectors: np.ndarray, rows: np.ndarray, against: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, cosine) of each given row's nearest vector in `against`, EVAL_BLOCK rows at a time (memory: a block
    x eval items floats)."""
    best = np.full(len(rows), -1, np.int64)
    cos = np.full(len(rows), -np.inf, np.float32)
    if len(against) == 0:
        return best, cos
    e = np.asarray(against, np.float32)
    for lo in range(0, len(rows), EVAL_BLOCK):
        sims = np.asarray(vectors[rows[lo:lo + EVAL_BLOCK]], np.float32) @ e.T
        best[lo:lo + EVAL_BLOCK] = np.argmax(sims, axis=1)
        cos[lo:lo + EVAL_BLOCK] = sims[np.arange(len(sims)), best[lo:lo + EVAL_BLOCK]]
    return best, cos


def match_eval(img, read_text, survey: dict | None, image_threshold: float, text_threshold: float) -> EvalMatch:
    """The eval rules on one shard. `img`: its image ShardVectors; `read_text`: a function giving its caption
    ShardVectors, called only where captions are compared (the caption rule is on, or the image rule dropped a row
    whose item has captions: in image mode the store may lack text vectors, and encoding a shard's captions for
    nothing costs), or None: captions not compared. The image rule names the nearest eval image's item; the
    caption rule (text_threshold > 0), for rows the image rule left, the nearest caption's item. Each dropped row's
    other cosine is to the item it names: the caption against that item's captions (the best), the image against
    that item's image. Loops run over dropped rows only."""
    n = len(img.vectors)
    m = no_eval_match(n)
    if survey is None:
        return m
    ev = np.asarray(survey.get("eval_vectors", np.zeros((0, 0))), np.float32)
    tv = np.asarray(survey.get("eval_text_vectors", np.zeros((0, 0))), np.float32)
    text_image = np.asarray(survey.get("eval_text_image", np.zeros(0, np.int64)))
    rows = np.flatnonzero(img.found)
    best, cos = _nearest(img.vectors, rows, ev)
    close = cos >= image_threshold
    hit, hit_item = rows[close], best[close]
    m.image_hit[hit] = True
    m.image_cosine[hit] = cos[close]
    m.item[hit] = np.asarray(survey.get("eval_names") or [], dtype=object)[hit_item]
    if read_text is None or len(tv) == 0 or not (len(hit) or text_threshold > 0):
        return m
    txt = read_text()
    by_item = np.argsort(text_image, kind="stable")  # captions grouped by their item's image
    starts = np.searchsorted(text_image[by_item], hit_item, side="left")
    ends = np.searchsorted(text_image[by_item], hit_item, side="right")
    for r, lo, hi in zip(hit, starts, ends):  # the caption against the named item's own captions
        if hi > lo and txt.found[r]:
            m.text_cosine[r] = float(np.max(tv[by_item[lo:hi]] @ np.asarray(txt.vectors[r], np.float32)))
    if text_threshold <= 0:
        return m
    trows = np.flatnonzero(txt.found & ~m.image_hit)
    tbest, tcos = _nearest(txt.vectors, trows, tv)
    close = tcos >= text_threshold
    thit, tbest = trows[close], tbest[close]
    m.text_hit[thit] = True
    m.text_cosine[thit] = tcos[close]
    m.item[thit] = np.asarray(survey.get("eval_text_names") or [], dtype=object)[tbest]
    has_image = (text_image[tbest] >= 0) & img.found[thit]
    for r, c in zip(thit[has_image], tbest[has_image]):
        m.image_cosine[r] = float(ev[text_image[c]] @ np.asarray(img.vectors[r], np.float32))
    return m
