"""metaclip's t for a target size (`target_rows`; MetaCLIP issues #19, #24: "what t gives N pairs?").

Expected kept = sum over matched rows of 1 - prod_e (1 - p_e(t)), from the pool's counts and the rows' entry sets
(a row with several entries is likelier kept than its entries' counts say), evaluated on a uniform sample of
`target_sample` matched rows: each shard's bottom-k by uniform(uid, seed, "metaclip-target-sample"), merged into
the pool's bottom-k (every row in a smaller pool: exact). The expectation rises with t, so t is bisected over the
integers. With languages the candidate t is the reference language's, and the others follow it
(`balance.thresholds`). A row that is not its image's chosen text (one_text_per_image) counts 0, as apply drops it.
"""

from __future__ import annotations

import functools

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.hashing import uniform

from .balance import is_chosen_text, match_probs, thresholds


def sample_rows(uids: pa.ChunkedArray, lists: pa.ListArray, n_per_row: np.ndarray, langs: pl.Series | None,
                images: tuple[np.ndarray, np.ndarray] | None, k: int, seed: int) -> dict:
    """A shard's matched rows with the k smallest draws of uniform(uid, seed, salt): merged pool-wide, the
    bottom-k of all matched rows, a uniform sample of fixed size. Each row carries its entry ids (and language,
    and its image key and choice draw: `images`, per row of the shard) for the solver."""
    matched = np.flatnonzero(n_per_row > 0)
    draw = uniform(pl.from_arrow(pc.take(uids, pa.array(matched))), seed,
                   "metaclip-target-sample") if len(matched) else np.zeros(0)
    if len(matched) > k:
        keep = np.sort(np.argpartition(draw, k - 1)[:k])
        matched, draw = matched[keep], draw[keep]
    sub = pc.take(lists, pa.array(matched))
    return {
        "matched_rows": int((n_per_row > 0).sum()),
        "draw": draw,
        "lengths": n_per_row[matched].astype(np.int64),
        "ids": sub.flatten().to_numpy().astype(np.int32),
        "lang": langs.to_numpy()[matched] if langs is not None else None,
        "image": (images[0][matched], images[1][matched]) if images is not None else None,
    }


def merge_samples(samples: list[dict], k: int) -> dict:
    """Bottom-k (by draw) of several bottom-k samples: the bottom-k of their union."""
    draw = np.concatenate([s["draw"] for s in samples])
    lengths = np.concatenate([s["lengths"] for s in samples])
    ids = np.concatenate([s["ids"] for s in samples])
    order = np.argsort(draw, kind="stable")[:k]
    order.sort()  # the rows keep their order, so each one's entry ids stay a contiguous run
    chosen = np.zeros(len(draw), dtype=bool)
    chosen[order] = True
    out = {"matched_rows": sum(s["matched_rows"] for s in samples), "draw": draw[order], "lengths": lengths[order],
           "ids": ids[np.repeat(chosen, lengths)], "lang": None, "image": None}
    if samples[0]["lang"] is not None:
        out["lang"] = np.concatenate([np.asarray(s["lang"]) for s in samples])[order]
    if samples[0]["image"] is not None:
        out["image"] = (np.concatenate([s["image"][0] for s in samples])[order],
                        np.concatenate([s["image"][1] for s in samples])[order])
    return out


def _sample_parts(sample: dict, images) -> dict:
    """What the expectation needs of the sample and does not depend on t (computed once per solve)."""
    n_rows = len(sample["draw"])
    row = np.repeat(np.arange(n_rows), sample["lengths"])
    chosen = None
    if sample.get("image") is not None and images is not None:
        chosen = is_chosen_text(sample["image"][0], sample["image"][1], images)
    return {"n_rows": n_rows, "row": row, "ids": sample["ids"].astype(np.int64), "chosen": chosen,
            "row_lang": None if sample["lang"] is None else np.asarray(sample["lang"])[row],
            "matched_rows": sample["matched_rows"]}


def _expected(config, n_entries: int, parts: dict, langs: dict[str, np.ndarray], t: int) -> float:
    if parts["n_rows"] == 0:
        return 0.0
    ts, _ = thresholds(config, langs, t)
    row_lang = None if list(ts) == [""] else parts["row_lang"]
    p = match_probs(parts["ids"], row_lang, langs, ts, t, n_entries)
    with np.errstate(divide="ignore"):
        log_miss = np.bincount(parts["row"], weights=np.log1p(-p), minlength=parts["n_rows"])  # -inf: p = 1
    keep = 1.0 - np.exp(log_miss)
    if parts["chosen"] is not None:
        keep = keep * parts["chosen"]
    return float(keep.sum() * parts["matched_rows"] / parts["n_rows"])


def expected_kept(config, n_entries: int, sample: dict, langs: dict[str, np.ndarray], images, t: int) -> float:
    """Expected kept rows of the pool at `t`: sum over the sampled rows of 1 - prod_e (1 - p_e), scaled by
    matched rows / sampled rows (exact when the sample is every matched row)."""
    return _expected(config, n_entries, _sample_parts(sample, images), langs, t)


def solve_t(config, n_entries: int, sample: dict, langs: dict[str, np.ndarray], images) -> tuple[int, float]:
    """(t, expected kept): the t whose expected kept count is nearest `target_rows`. The expectation rises
    with t (every p_e does), so a bisection over integer t in [1, largest count] finds it; past the
    largest count every pair is kept, and a target above that keeps everything."""
    parts = _sample_parts(sample, images)
    kept = functools.cache(lambda t: _expected(config, n_entries, parts, langs, t))
    target = float(config.target_rows)
    hi = max(1, max((int(v.max()) for v in langs.values() if len(v)), default=1))
    if config.language_col and len(langs) > 1:
        hi = max(hi, int(sum(langs.values()).max()))  # a reference t above every count
    if kept(hi) <= target:
        return hi, kept(hi)
    lo = 1
    if kept(lo) >= target:
        return lo, kept(lo)
    while hi - lo > 1:  # invariant: K(lo) < target <= K(hi)
        mid = (lo + hi) // 2
        if kept(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo, kept(lo)) if target - kept(lo) < kept(hi) - target else (hi, kept(hi))
