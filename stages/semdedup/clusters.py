"""semdedup's clusters: a pool-wide sample drawn by uid, spherical k-means on it, each row's nearest centroid, and a
second split of a cluster too big for its pairwise step.

The sample is a pure function of the uids (`uniform(uid)`), so it is the same for any shard split, worker count or
row order: a row is in it when its draw is under `rate` (sample_per_cluster / rows_per_cluster: ~`sample_per_cluster`
rows per cluster the default sizing makes) or among the `floor` lowest draws of the pool (a small pool, or a user's
`clusters` far above the default, still gets enough rows). Both parts merge associatively (a union, then the
lowest `floor` draws), so the survey's tree reduction gives the same sample in any order.

k-means: faiss (faiss-cpu from PyPI; its `Kmeans` with `spherical=True`, since the vectors are unit vectors and
SemDeDup clusters by cosine; fast enough on a CPU for the sample: bench/README.md, semdedup), and
is what NeMo Curator's GPU k-means replaces at scale. The sample is sorted by (draw, uid key) before training and the
seed is fixed, so the centroids are a function of the pool alone. They are computed once, in the driver, and saved;
every shard assigns its rows to them.
"""

from __future__ import annotations

import math

import numpy as np

# floats of one block of the assignment's similarity matrix (64 MiB): rows per block = this / clusters, so memory
# stays flat as the clusters grow with the pool (a block of fixed rows grew with the centroids to gigabytes at the
# default for 1B rows: bench/results/semdedup.json; bench/README.md, semdedup)
ASSIGN_BUDGET = 1 << 24


def sample_rows(draw: np.ndarray, rate: float, floor: int) -> np.ndarray:
    """Indices of the rows in the sample: draw < rate, or among the `floor` lowest draws (ties by position)."""
    keep = draw < rate
    if floor > 0 and len(draw) > int(keep.sum()):
        lowest = np.argsort(draw, kind="stable")[:floor]
        keep[lowest] = True
    return np.flatnonzero(keep)


def merge_samples(parts: list[dict], rate: float, floor: int) -> dict:
    """Union of sample partials ({"rows", "keys", "draw", "vectors"}), cut back to the sample rule, sorted by
    (draw, key): the same result for any grouping of the parts."""
    parts = [p for p in parts if p is not None]
    rows = sum(int(p["rows"]) for p in parts)
    keys = np.concatenate([p["keys"] for p in parts]) if parts else np.zeros(0, np.uint64)
    draw = np.concatenate([p["draw"] for p in parts]) if parts else np.zeros(0, np.float64)
    dims = max((p["vectors"].shape[1] for p in parts), default=0)
    vectors = (np.concatenate([p["vectors"] for p in parts]) if parts else np.zeros((0, dims), np.float16))
    order = np.lexsort((keys, draw))
    keys, draw, vectors = keys[order], draw[order], vectors[order]
    at = sample_rows(draw, rate, floor)  # draws sorted: the lowest `floor` are the first
    return {"rows": rows, "keys": keys[at], "draw": draw[at], "vectors": vectors[at]}


def default_clusters(rows: int, rows_per_cluster: int) -> int:
    """About one cluster per `rows_per_cluster` rows, at least one."""
    return max(1, math.ceil(rows / max(1, rows_per_cluster)))


def kmeans(vectors: np.ndarray, k: int, iterations: int, seed: int, threads: int | None = None) -> np.ndarray:
    """Spherical k-means centroids (float32, unit rows) of `vectors`; k is capped at the number of rows. `threads`:
    faiss's OpenMP threads for this call (1 where the result must not depend on the machine's core count)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    k = max(1, min(int(k), len(x)))
    if k == 1 or len(x) == 0:
        c = x.mean(axis=0, keepdims=True) if len(x) else np.zeros((1, x.shape[1]), np.float32)
        return _unit(c)
    import faiss

    before = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        km = faiss.Kmeans(x.shape[1], k, niter=int(iterations), seed=int(seed) & 0x7FFFFFFF, spherical=True,
                          verbose=False, min_points_per_centroid=1, max_points_per_centroid=1 << 30)
        km.train(x)
    finally:
        faiss.omp_set_num_threads(before)
    return _unit(np.asarray(km.centroids, np.float32))


def _unit(c: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(c, axis=1, keepdims=True)
    return (c / np.where(n > 0, n, 1)).astype(np.float32)


def assign(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid by cosine, that cosine) per row; ties go to the lower centroid index. Blocked: memory
    is ASSIGN_BUDGET floats whatever the shard's size and the number of centroids."""
    n = len(vectors)
    label = np.zeros(n, np.int32)
    best = np.zeros(n, np.float32)
    c = np.asarray(centroids, np.float32)
    block = max(1, ASSIGN_BUDGET // max(1, len(c)))
    for lo in range(0, n, block):
        sims = np.asarray(vectors[lo:lo + block], np.float32) @ c.T
        label[lo:lo + block] = np.argmax(sims, axis=1)
        best[lo:lo + block] = sims[np.arange(len(sims)), label[lo:lo + block]]
    return label, best


def split_large(vectors: np.ndarray, max_rows: int, seed: int, iterations: int) -> np.ndarray:
    """Sub-cluster labels for one cluster's rows (given in uid order) so that no sub-cluster has more than
    `max_rows` rows: k-means inside the cluster, again on any part still too big. The pairwise step then works
    per sub-cluster, its memory and time bounded by `max_rows`; duplicates split across a sub-cluster border
    are missed, as across a cluster border. One faiss thread: the same labels on any machine."""
    n = len(vectors)
    labels = np.zeros(n, np.int64)
    if n <= max_rows:
        return labels
    todo = [np.arange(n)]
    next_label = 0
    while todo:
        idx = todo.pop()
        if len(idx) <= max_rows:
            labels[idx] = next_label
            next_label += 1
            continue
        k = math.ceil(len(idx) / max_rows) * 2  # some slack: k-means parts are uneven
        c = kmeans(vectors[idx], k, iterations, seed + len(idx), threads=1)
        sub, _ = assign(vectors[idx], c)
        parts = [idx[sub == j] for j in range(len(c)) if (sub == j).any()]
        if len(parts) == 1:  # k-means could not split it (identical vectors): cut it in uid-order blocks
            parts = [idx[lo:lo + max_rows] for lo in range(0, len(idx), max_rows)]
        todo.extend(reversed(parts))
    return labels
