"""metaclip's balancing rules as units (MetaCLIP's balancing.py; MetaCLIP 2's curate.py for the options).

A row is rejected for the first rule it breaks, in the order of `RULES` (pipeline/rules.py's idiom): each rule
reads the shard's `Facts` it `needs` and returns a mask (True: the row breaks it); a fact that is None (no
quality cut, one_text_per_image off) turns its rule off.
What the rules need besides the matches: the keep probability of each match (`entry_probs`, `match_probs`, at
the t of `thresholds`), the draws that sample with it (`sampled`), and, for one_text_per_image, which text each
image chose (`image_keys`, `choice_draw`, `is_chosen_text`). Every draw is uniform(uid, seed, salt): a pure
function of the row, so the outcome never depends on shards, workers or row order.
"""

from __future__ import annotations


import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.errors import StageError
from pipeline.hashing import row_content_key, uid_to_u64, uniform, uniform_of_keys
from pipeline import rules
from pipeline.rules import Rule


class Facts(rules.Facts):
    """One shard's rows, as the rules read them (all given: the stage computes each once in apply)."""

    FIELDS = (
        "n_per_row",  # entries matched per row (its list under the cut, pass 1 counted the same)
        "sampled",  # some matched entry's draw fell under its keep probability p_e
        "below_cut",  # under the quality cut (score_col / min_score); None: no cut
        "chosen",  # the text its image chose (one_text_per_image); None: option off
    )


# ---- the rules, in order -----------------------------------------------------------------------------------
class LowScore(Rule):
    """Under the quality cut (`score_col` < `min_score`, or no score). Balance among the good pairs, not
    among all of them (balance last): these rows were not counted in pass 1 either."""
    name, needs, quiet = "low_score", ("below_cut",), True  # off without a cut

    def mask(self, f: Facts) -> np.ndarray:
        return f.below_cut


class NoEntry(Rule):
    """No entry of the concept list occurs in the text. MetaCLIP curates by the concepts a text names: a text
    that names none has no entry to be balanced under, and is dropped."""
    name, needs = "no_entry", ("n_per_row",)

    def mask(self, f: Facts) -> np.ndarray:
        return f.n_per_row == 0


class OtherTextOfImage(Rule):
    """Another matching text of the same image is the one kept (one_text_per_image). MetaCLIP 2 keeps one
    alt-text per image, `random.choice` among those that match an entry; here the one with the smallest
    uniform(uid, seed, "metaclip-one-text") pool-wide, so the choice is the same whatever the shards."""
    name, needs, quiet = "other_text_of_image", ("n_per_row", "chosen"), True  # off without the option

    def mask(self, f: Facts) -> np.ndarray:
        return (f.n_per_row > 0) & ~f.chosen


class BalancedOut(Rule):
    """Not sampled. A pair is kept with probability 1 - prod_e (1 - p_e) over its entries, p_e = t / max(count_e,
    t): tail entries (count < t) keep every text, head entries about t of them, so the kept set's concept
    distribution is flattened (MetaCLIP's Algorithm 1). Kept when any entry's draw u_e < p_e."""
    name, needs = "balanced_out", ("sampled",)

    def mask(self, f: Facts) -> np.ndarray:
        return ~f.sampled


RULES = (LowScore(), NoEntry(), OtherTextOfImage(), BalancedOut())
REASONS = rules.reasons(RULES)


def judge(f: Facts) -> pa.Array:
    """Per row, the name of the first rule it breaks (null: kept)."""
    return rules.judge(RULES, f, len(f.n_per_row))[0]


# ---- the keep probability and its draws ----------------------------------------------------------------------
def entry_probs(counts: np.ndarray, t: int) -> np.ndarray:
    """p_e = t / max(count_e, t): 1 for tail entries, t / count for head entries."""
    return t / np.maximum(np.asarray(counts, dtype=np.float64), float(t))


def match_probs(ids: np.ndarray, row_lang: np.ndarray | None, langs: dict[str, np.ndarray], ts: dict, t: int,
                n: int) -> np.ndarray:
    """p_e of each (row, entry) match: its entry's keep probability among the counts of the row's language (all
    counts summed when rows have no language), at that language's t. One home for apply and the t solver."""
    p = np.empty(len(ids), dtype=np.float64)
    if row_lang is None:
        counts = sum(langs.values()) if langs else np.zeros(n, dtype=np.int64)
        p[:] = entry_probs(counts, ts.get("", t))[ids]
        return p
    for lang in np.unique(row_lang):
        m = row_lang == lang
        p[m] = entry_probs(langs.get(str(lang), np.zeros(n, dtype=np.int64)), ts.get(str(lang), t))[ids[m]]
    return p


def sampled(uids: pa.ChunkedArray, row: np.ndarray, ids: np.ndarray, p: np.ndarray, seed: int) -> np.ndarray:
    """Per row: whether any of its matches drew u_e = uniform(uid, seed, salt=e) < p_e."""
    u = uniform_of_keys(uid_to_u64(pl.from_arrow(uids))[row], seed, salt=ids)  # each uid parsed once, not per match
    return np.bincount(row, weights=(u < p), minlength=len(uids)) > 0


# ---- MetaCLIP 2: a t per language, from the tail share ----------------------------------------------------------
def t_to_p(counts: np.ndarray, t: int) -> float:
    """Share of all matches that fall in tail entries (count < t)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return float(counts[counts < t].sum() / total) if total else 0.0


def p_to_t(counts: np.ndarray, p: float) -> int:
    """The count at which the cumulative share of the ascending counts is nearest p (first on ties)."""
    c = np.sort(np.asarray(counts, dtype=np.int64))
    if c.sum() == 0:
        return 1
    share = np.cumsum(c) / c.sum()
    return max(int(c[int(np.abs(share - p).argmin())]), 1)


def thresholds(config, langs: dict[str, np.ndarray], t: int | None = None) -> tuple[dict[str, int], float | None]:
    """t per language (MetaCLIP 2), and the tail share used (None with one language). `t` (the solver's
    candidate) stands in for the configured t. The reference language keeps t; every other language gets the t
    at which its own tail holds the reference language's tail share p (`tail_share` > 0 sets p for all)."""
    t = int(config.t if t is None else t)
    if not config.language_col or list(langs) == [""]:  # no language information: one t
        return {"": t}, None
    if config.tail_share > 0:
        p = float(config.tail_share)
        return {k: p_to_t(v, p) for k, v in langs.items()}, p
    ref = langs.get(config.reference_language)
    p = t_to_p(ref if ref is not None else sum(langs.values()), t)
    return {k: (t if k == config.reference_language else p_to_t(v, p)) for k, v in langs.items()}, p


def largest_over_t(langs: dict[str, np.ndarray], ts: dict[str, int]) -> tuple[int, bool]:
    """(the largest entry count, whether any entry's count is above its t): when none is, balancing keeps every
    matched pair. One t (`ts` = {"": t}) is compared with the counts of all languages summed, as `match_probs`."""
    if not langs:
        return 0, False
    if set(ts) == {""}:
        pools = {"": sum(langs.values())}
    else:
        pools = langs
    largest = max((int(v.max()) for v in pools.values() if np.size(v)), default=0)
    over = any(np.size(v) and int(v.max()) > int(ts.get(k, min(ts.values()))) for k, v in pools.items())
    return largest, over


# ---- one_text_per_image: which text each image keeps ------------------------------------------------------------
def image_keys(table: pa.Table, col: str) -> np.ndarray:
    """A 64-bit key per row for its image (`image_col`'s value). The keys are saved (image_choice.parquet) and
    compared by later processes, so they come from the project's version-stable hash: `row_content_key` of the
    one column (its values' bytes through `hash64_strings`, any column type, a null apart from "")."""
    if col not in table.column_names:
        raise StageError(f"metaclip: one_text_per_image needs the image column '{col}' (set image_col)")
    return row_content_key(pa.table({"image": table.column(col)}))


def choice_draw(uids, seed: int) -> np.ndarray:
    """Each text's draw in its image's choice: the smallest draw among the image's matching texts wins."""
    return uniform(pl.from_arrow(uids), seed, "metaclip-one-text")


def is_chosen_text(keys: np.ndarray, draws: np.ndarray, images: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Whether each row is its image's chosen text: its draw is the image's best one (pool-wide `images`:
    keys and their smallest draws). Ties (two 53-bit draws equal) keep both."""
    best = pl.DataFrame({"k": np.asarray(keys, dtype=np.uint64), "d": draws}).join(
        pl.DataFrame({"k": np.asarray(images[0], dtype=np.uint64), "best": images[1]}), on="k", how="left",
        maintain_order="left")
    return best["d"].to_numpy() == best["best"].fill_null(-1.0).to_numpy()
