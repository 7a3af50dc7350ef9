"""Candidate cuts of a score column, counted from the scores themselves.

A stage that keeps the top share of a pool (or adds a score for a later cut) leaves the user to choose a
threshold they can copy into a config. A report shows them, for a few candidate thresholds, how many of the
scored rows each would keep: the thresholds at which given shares are kept, and round values in the pool's range.
Each share is counted exactly from the scores (never from a plot's bins), at the threshold as printed, with the
rule `score >= threshold`: the printed threshold is what the user copies, so it is what is counted.

The threshold for a share is the k-th highest score (k = share x rows) rounded *down* to the printed decimals,
so it keeps at least k rows (a few more where scores sit between the rounded value and the k-th score).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

DECIMALS = 4  # printed thresholds: 1e-4 apart (a CLIP cosine's useful resolution)
ROUND_STEPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # grid of round values: the finest with at most max_points


@dataclasses.dataclass(frozen=True)
class Candidate:
    threshold: float  # as printed: `decimals` places
    kept: int  # rows with score >= threshold
    share: float  # kept / scored rows
    notes: tuple[str, ...]  # why it is offered ("top 10%", "round value", ...)

    def printed(self, decimals: int = DECIMALS) -> str:
        return f"{self.threshold:.{decimals}f}"


def finite_sorted(scores) -> np.ndarray:
    """The finite scores, as float64, ascending (a float32 score is exact in float64)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    return np.sort(s[np.isfinite(s)])


def kept_at(asc: np.ndarray, threshold: float) -> int:
    """Rows of the ascending scores with score >= threshold."""
    return int(len(asc) - np.searchsorted(asc, threshold, side="left"))


def _printed(x: float, decimals: int) -> float:
    return float(f"{x:.{decimals}f}")


def threshold_for_share(asc: np.ndarray, share: float, decimals: int = DECIMALS) -> float | None:
    """The highest printed threshold that keeps at least round(share x rows) rows; None when that is no row."""
    k = int(round(min(max(share, 0.0), 1.0) * len(asc)))
    if k <= 0:
        return None
    x = float(asc[len(asc) - k])  # the k-th highest score
    scale = 10 ** decimals
    t = _printed(math.floor(x * scale) / scale, decimals)
    if t > x:  # x * scale rounded up to a whole number: one step lower keeps the k-th row
        t = _printed(t - 1.0 / scale, decimals)
    return t


def round_values(asc: np.ndarray, known: tuple[float, ...] = (), max_points: int = 6,
                 span: tuple[float, float] = (0.01, 0.99)) -> list[float]:
    """Round thresholds inside the pool's range (between its `span` quantiles, so that one outlier does not
    stretch it): the `known` values that fall there, and the finest grid of ROUND_STEPS with at most
    `max_points` values in it."""
    if not len(asc):
        return []
    lo, hi = (round(float(q), 6) for q in np.quantile(asc, span))  # float32 0.31 is 0.31000000238...
    out = {round(v, 6) for v in known if lo <= v <= hi}
    for step in ROUND_STEPS:
        grid = np.arange(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1) * step
        if len(grid) <= max_points:
            out |= {round(float(v), 6) for v in grid}
            break
    return sorted(out)


def candidates(scores, shares: dict[float, str], values: dict[float, str],
               decimals: int = DECIMALS) -> list[Candidate]:
    """Candidate thresholds, highest first: one per share in `shares` (the threshold that keeps it) and one per
    value in `values`, each with its note; two that print the same are one row with both notes. Non-finite
    scores (unscored rows) are not part of the pool. [] when nothing is scored."""
    asc = finite_sorted(scores)
    if not len(asc):
        return []
    notes: dict[float, list[str]] = {}
    for share, note in shares.items():
        t = threshold_for_share(asc, share, decimals)
        if t is not None:
            notes.setdefault(t, []).append(note)
    for v, note in values.items():
        notes.setdefault(_printed(v, decimals), []).append(note)
    return [Candidate(t, kept_at(asc, t), kept_at(asc, t) / len(asc), tuple(dict.fromkeys(n)))
            for t, n in sorted(notes.items(), reverse=True)]
