"""dfn's keep-the-top-fraction arithmetic over a histogram of cosines: a pool-wide cut found from per-shard
counts, so no task holds the pool's scores."""

from __future__ import annotations

import numpy as np


def score_bins(scores: np.ndarray, bins: int) -> np.ndarray:
    """Bin index of each (finite) cosine in [-1, 1]: bins of width 2 / (bins - 1) centred on -1 .. 1."""
    x = np.clip(np.asarray(scores, dtype=np.float64), -1.0, 1.0)
    return np.clip(np.rint((x + 1.0) * ((bins - 1) / 2.0)), 0, bins - 1).astype(np.int64)


def bin_lower_edge(b: int, bins: int) -> float:
    return max(-1.0, (b - 0.5) * 2.0 / (bins - 1) - 1.0)


def cut_for_fraction(hist: np.ndarray, fraction: float) -> tuple[int, float, int]:
    """(boundary bin, keep probability inside it, rows wanted) for keeping the top `fraction` of `hist`."""
    n = int(hist.sum())
    want = int(round(min(max(fraction, 0.0), 1.0) * n))
    if want <= 0:
        return len(hist), 0.0, 0  # nothing kept: boundary above every bin
    above = np.concatenate([np.cumsum(hist[::-1])[::-1][1:], [0]])  # rows in bins strictly above b
    b = int(np.flatnonzero((above < want) & (above + hist >= want)).max())
    q = (want - int(above[b])) / int(hist[b])
    return b, float(q), want

