"""dfn's part of the run report: the keep rule, the thresholds a user could copy (with what DFN and DataComp
keep), and the score histogram; read back from the stage folder, apart from the scoring."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards


# ---- report helpers: what the field keeps, the candidate thresholds, the figure ---------------------------
# the shares a user is offered a threshold for: DFN's range, DataComp's baseline, and half the pool
CANDIDATE_SHARES = {0.1: "top 10%: DFN keeps 10–30% of a raw web pool (arXiv 2309.17425)",
                    0.2: "top 20%: within DFN's 10–30%",
                    0.3: "top 30%: what DataComp's CLIP-score baseline keeps (OpenAI ViT-L/14; arXiv 2304.14108)",
                    0.5: "top 50%"}
# round cosines a CLIP score is often cut at (LAION-400M cut OpenAI ViT-B/32 cosines at 0.3, LAION-5B's
# English pairs at 0.28), offered where they fall in the pool's range; a grid of round values is added to them
ROUND_COSINES = (0.20, 0.25, 0.28, 0.30)
CANDIDATES_TITLE = ("candidate thresholds for [dfn] threshold or [metaclip] min_score (DFN keeps 10–30% of a raw "
                    "web pool; DataComp's CLIP-score baseline keeps the top 30%)")


def stage_report(config, stage_dir: str, out_dir: str) -> dict:
    """`DfnStage.report`, read from the stage folder (`config`: the stage's Config, for what the folder does not
    record)."""
    kept = _scores_in(stage_dir, None)
    dropped = _scores_in(shards.join(stage_dir, "rejected"), "dfn_low_score")
    cut = shards.read_json(shards.join(stage_dir, "stats", "cut.json")) or {}
    mode = cut.get("mode") or ("threshold" if config.threshold is not None else "fraction")
    score_only = config.score_only or _nothing_cut(cut, len(kept), len(dropped))
    keep_fraction = cut.get("keep_fraction", config.keep_fraction)
    threshold = cut.get("threshold") if isinstance(cut.get("threshold"), (int, float)) else None
    pool = np.concatenate([kept, dropped])
    total = len(pool)
    from pipeline.report import Table

    table = Table("dfn keep rule", ["scored", "kept", "dropped (dfn_low_score)", "kept share", "threshold", "mode"],
                  [[total, len(kept), len(dropped), f"{100.0 * len(kept) / total if total else 0:.2f}%",
                    "" if threshold is None or score_only else f"{threshold:.4f}",
                    "score_only (nothing cut)" if score_only else mode]])
    tables, marks = [table], {}
    if score_only or mode == "fraction":  # no threshold was chosen: offer some, from this pool
        cands = _candidate_table(pool, None if score_only else keep_fraction)
        tables += [cands] if cands is not None else []
        from pipeline.score_cuts import finite_sorted, threshold_for_share

        asc = finite_sorted(pool)
        marks = {p: t for p in CANDIDATE_SHARES if (t := threshold_for_share(asc, p)) is not None}
    figures = []
    if total:
        png = _histogram(os.path.join(out_dir, "dfn_scores.png"), kept, dropped,
                         None if score_only else threshold, marks, score_only)
        figures.append(("dfn score histogram (" + ("score_only: nothing cut" if score_only else "kept vs dropped")
                        + ")", png))
    return {"figures": figures, "tables": tables}


def _scores_in(folder: str, reason: str | None) -> np.ndarray:
    """The finite dfn_score values (float64) of a folder's shards, of the rows with `reason` when given; shards
    without the column (or without `reason`) hold none. [] for a folder that does not exist."""
    vals = []
    for p in shards.list_shards(folder) if shards.exists(folder) else []:
        names = shards.read_schema(p).names
        if "dfn_score" not in names or (reason and "reason" not in names):
            continue
        t = shards.read_shard(p, columns=["dfn_score"] + (["reason"] if reason else []))
        if reason:
            t = t.filter(pc.equal(t.column("reason"), reason))
        vals.append(pc.cast(t.column("dfn_score"), pa.float64()).to_numpy(zero_copy_only=False))
    v = np.concatenate(vals) if vals else np.zeros(0)
    return v[np.isfinite(v)]


def _nothing_cut(cut: dict, kept: int, dropped: int) -> bool:
    """A fraction cut that wanted fewer rows than were kept, with none dropped: score_only output (read from the
    data, for a stage built without the run's config)."""
    wanted = cut.get("wanted")
    return cut.get("mode") == "fraction" and dropped == 0 and isinstance(wanted, int) and wanted < kept


def _candidate_table(pool: np.ndarray, keep_fraction: float | None):
    """The share of the scored pool that each candidate threshold keeps (pipeline/score_cuts.py), with what DFN
    and DataComp keep; None when nothing is scored."""
    from pipeline.report import Table
    from pipeline.score_cuts import candidates, finite_sorted, round_values

    shares = dict(CANDIDATE_SHARES)
    if keep_fraction is not None and 0 < keep_fraction < 1:
        shares[keep_fraction] = (f"{shares[keep_fraction]}; this run's keep_fraction" if keep_fraction in shares
                                 else f"top {100 * keep_fraction:g}%: this run's keep_fraction")
    rounds = {v: "round value" for v in round_values(finite_sorted(pool), ROUND_COSINES)}
    rows = [[c.printed(), c.kept, f"{100 * c.share:.2f}%", "; ".join(c.notes)] for c in candidates(pool, shares, rounds)]
    if not rows:
        return None
    return Table(CANDIDATES_TITLE, ["threshold (this network's dfn_score)", "pairs kept (score >= threshold)",
                                    "share of scored pool", "note"], rows)


def _histogram(png: str, kept: np.ndarray, dropped: np.ndarray, cut_at: float | None, marks: dict[float, float],
               score_only: bool) -> str:
    """dfn_score histogram: kept vs dropped (all scored rows under score_only), the cut (dashed), the thresholds
    that keep the shares in `marks` ({share: threshold}, dotted) and DFN's 10–30% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    both = np.concatenate([kept, dropped])
    lo, hi = float(both.min()), float(both.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-3, 61)
    fig, ax = plt.subplots(figsize=(6.5, 3.4), dpi=100)
    if 0.1 in marks and 0.3 in marks:
        ax.axvspan(marks[0.3], max(marks[0.1], marks[0.3]), color="#dd8452", alpha=0.2, zorder=3, lw=0,
                   label="top 10–30% (DFN; DataComp: 30%)")
    if score_only:
        ax.hist(kept, bins=edges, color="#4c72b0", alpha=0.8, label=f"scored ({len(kept)}; score_only: none cut)")
    else:
        ax.hist(dropped, bins=edges, color="#c44e52", alpha=0.8, label=f"dropped ({len(dropped)})")
        ax.hist(kept, bins=edges, color="#4c72b0", alpha=0.8, label=f"kept ({len(kept)})")
    for share, t in sorted(marks.items()):
        ax.axvline(t, color="0.4", lw=0.8, ls=":")
        ax.annotate(f"top {100 * share:g}% ", (t, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                    rotation=90, ha="right", va="top", color="0.2", zorder=4,
                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})
    if cut_at is not None:
        ax.axvline(cut_at, color="k", lw=1, ls="--", label=f"cut {cut_at:.4f}")
    ax.set_xlabel("dfn_score (image-text cosine)")
    ax.set_ylabel("pairs")
    ax.set_title("dfn: score histogram" + (" (score_only)" if score_only else ", kept vs dropped"))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
