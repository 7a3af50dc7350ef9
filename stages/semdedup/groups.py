"""semdedup's pairwise step, inside one cluster: which rows are the same pair, and which copy stays.

Duplicates  rows a and b are duplicates when cos(image_a, image_b) >= 1 - eps_image and, in pair mode, also
            cos(text_a, text_b) >= 1 - eps_text (image mode: the image alone, NeMo Curator's rule).
Groups      the connected components of that relation (scipy's connected_components): one row of each group is
            kept, every other row is rejected with `duplicate_of` naming the kept one. SemDeDup's own code
            drops a row similar to *any* row ranked before it, kept or not, so a chain a ~ b ~ c with a !~ c
            loses b and c, and c's named copy b is itself gone; a group keeps exactly one row and names it.
            Both lose the same rows when the relation is transitive (a group is a clique), as for re-encodes,
            crops and re-captions of one picture. Where it chains, components lose the most, SemDeDup's rule
            fewer, and "dropped only next to a better-ranked row that is kept" the fewest (measured by hand on
            the web demo world: bench/README.md, semdedup); thresholds must fit the network's scale.
Option      `group = "nearest_kept"` instead: rows in keep order, a row dropped only when a better-ranked row that
            is *kept* is its duplicate (`duplicate_of`: the most similar such row). Every dropped row then has its
            named copy within the thresholds, and a chain a ~ b ~ c with a !~ c keeps a and c. It drops the fewest
            of the three rules (in the measurement above).
Kept row    `highest_score`: the highest dfn_score (rows without one after those with one), then the lowest uid;
            `hard`: the least typical row, the lowest cosine to its cluster centroid (NeMo's default: SemDeDup
            found keeping hard examples best); `easy`: the most typical. Ties: the lowest uid.
Memory      the similarities are computed a block of rows against the cluster at a time (block x rows floats,
            PAIR_BUDGET floats in all), never a rows x rows matrix; clusters.split_large bounds `rows`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

PAIR_BUDGET = 1 << 24  # floats of one block's similarity matrix (64 MiB)
KEEP_RULES = ("highest_score", "hard", "easy")
MODES = ("pair", "image")
GROUPINGS = ("component", "nearest_kept")


class Decisions(NamedTuple):
    """For the rows of one cluster (indices into it): those dropped, the index of the row kept in their group,
    and the image cosine to it."""

    dropped: np.ndarray
    kept: np.ndarray
    image_cosine: np.ndarray


def near_pairs(image: np.ndarray, text: np.ndarray | None, eps_image: float, eps_text: float,
               budget: int = PAIR_BUDGET) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j for every duplicate pair of the rows (text None: image mode)."""
    x = np.asarray(image, np.float32)
    t = None if text is None else np.asarray(text, np.float32)
    n = len(x)
    block = max(1, budget // max(1, n))
    ii, jj = [], []
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        sims = x[lo:hi] @ x[lo:].T  # row r of the block against rows lo.. (the upper triangle and its diagonal)
        r, c = np.nonzero(sims >= 1.0 - eps_image)
        above = c > r  # j > i, without the diagonal
        i, j = r[above] + lo, c[above] + lo
        if t is not None and len(i):
            close = np.einsum("ij,ij->i", t[i], t[j]) >= 1.0 - eps_text
            i, j = i[close], j[close]
        ii.append(i)
        jj.append(j)
    return (np.concatenate(ii) if ii else np.zeros(0, np.int64)), (np.concatenate(jj) if jj else np.zeros(0, np.int64))


def keep_rank(rule: str, uid_order: np.ndarray, score: np.ndarray, typicality: np.ndarray) -> np.ndarray:
    """Rank of each row for keeping (0 = kept first). `uid_order`: each row's rank by uid (ties' last word);
    `score`: dfn_score (NaN: none); `typicality`: cosine to the cluster centroid."""
    if rule == "highest_score":
        s = np.asarray(score, np.float64)
        primary = np.where(np.isnan(s), np.inf, -s)
    elif rule == "hard":
        primary = np.asarray(typicality, np.float64)
    elif rule == "easy":
        primary = -np.asarray(typicality, np.float64)
    else:
        raise ValueError(f"keep = {rule!r}")
    order = np.lexsort((uid_order, primary))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


def decide(image: np.ndarray, text: np.ndarray | None, rank: np.ndarray, eps_image: float, eps_text: float,
           budget: int = PAIR_BUDGET) -> Decisions:
    """One cluster's decisions: the groups of duplicate rows, the best-ranked row of each kept."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(image)
    i, j = near_pairs(image, text, eps_image, eps_text, budget)
    if len(i) == 0:
        empty = np.zeros(0, np.int64)
        return Decisions(empty, empty, np.zeros(0, np.float32))
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    # the kept row of each group: its lowest rank
    order = np.lexsort((rank, group))
    first = np.ones(n, bool)
    first[1:] = group[order][1:] != group[order][:-1]
    keeper_of_group = np.empty(group.max() + 1, np.int64)
    keeper_of_group[group[order][first]] = order[first]
    keeper = keeper_of_group[group]
    dropped = np.flatnonzero(keeper != np.arange(n))
    kept = keeper[dropped]
    x = np.asarray(image, np.float32)
    cos = np.einsum("ij,ij->i", x[dropped], x[kept]).astype(np.float32)
    return Decisions(dropped, kept, cos)


def decide_nearest_kept(image: np.ndarray, text: np.ndarray | None, rank: np.ndarray, eps_image: float,
                        eps_text: float, budget: int = PAIR_BUDGET) -> Decisions:
    """One cluster's decisions under `group = "nearest_kept"`: in keep order, a row is dropped when one of its
    better-ranked duplicates is kept, and names the most similar of those.

    A loop over the rows that have a better-ranked duplicate (only those: the rest are kept at once), because a
    row's fate depends on the fates of the rows ranked before it (a greedy maximal independent set in rank order);
    no library we use computes it. Each step is a numpy lookup over the row's own duplicates."""
    n = len(image)
    i, j = near_pairs(image, text, eps_image, eps_text, budget)
    empty = np.zeros(0, np.int64)
    if len(i) == 0:
        return Decisions(empty, empty, np.zeros(0, np.float32))
    x = np.asarray(image, np.float32)
    better = np.where(rank[i] < rank[j], i, j)
    worse = np.where(rank[i] < rank[j], j, i)
    cos = np.einsum("ij,ij->i", x[better], x[worse]).astype(np.float32)
    # each worse row's duplicates, most similar first (ties: the better rank)
    order = np.lexsort((rank[better], -cos, rank[worse]))
    better, worse, cos = better[order], worse[order], cos[order]
    starts = np.flatnonzero(np.r_[True, worse[1:] != worse[:-1]])
    ends = np.r_[starts[1:], len(worse)]
    kept = np.ones(n, bool)
    dropped, keeper, sim = [], [], []
    for lo, hi in zip(starts, ends):  # rows in keep order (sorted by rank[worse] above)
        alive = kept[better[lo:hi]]
        if alive.any():
            first = lo + int(np.argmax(alive))
            kept[worse[lo]] = False
            dropped.append(worse[lo])
            keeper.append(better[first])
            sim.append(cos[first])
    return Decisions(np.asarray(dropped, np.int64), np.asarray(keeper, np.int64), np.asarray(sim, np.float32))
