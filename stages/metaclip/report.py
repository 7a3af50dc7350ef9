"""metaclip's part of the run report: entry counts before and after balancing, the cumulative share of matches
by entry rank, the head and the tail, and the solved t for a target size; a CSV of every matched entry."""

from __future__ import annotations

import os

import numpy as np
import polars as pl

from pipeline import shards


def entry_report(config, stage_dir: str, out_dir: str) -> dict:
    """Entry counts before/after balancing (after = expected kept matches min(count, t) per entry),
    cumulative share of matches by rank, top entries and the tail share; CSV of every matched entry."""
    stats_dir = shards.join(stage_dir, "stats")
    path = shards.join(stats_dir, "entry_counts.parquet")
    if not shards.exists(path):
        return {"figures": [], "tables": []}
    df = pl.from_arrow(shards.read_shard(path))
    th = shards.read_json(shards.join(stats_dir, "thresholds.json")) or {}
    ts = th.get("t", {"": config.t})
    t = int(ts.get("", ts.get(config.reference_language, config.t)))
    per_lang = len(ts) > 1 or "" not in ts
    df = df.filter(pl.col("count") > 0).with_columns(
        (pl.lit(float(t)) / pl.max_horizontal("count", pl.lit(t)).cast(pl.Float64)).alias("p"),
        pl.min_horizontal("count", pl.lit(t)).alias("expected_after"))
    df = df.sort(["count", "entry"], descending=[True, False]).with_row_index("rank", offset=1)
    total = int(df["count"].sum()) if df.height else 0
    total_after = int(df["expected_after"].sum()) if df.height else 0
    head = df.filter(pl.col("count") >= t)
    tail_share = 1.0 - (int(head["count"].sum()) / total) if total else 0.0
    os.makedirs(out_dir, exist_ok=True)
    csv = os.path.join(out_dir, "metaclip_entry_counts.csv")
    df.select("rank", "entry", "text", "count", "p", "expected_after").write_csv(csv)
    from pipeline.report import Table

    tables = []
    target = th.get("target")
    if target:
        actual = (shards.read_json(shards.join(stage_dir, "_manifest.json")) or {}).get("rows_out")
        off = f" ({100 * (actual - target['expected_kept']) / max(target['expected_kept'], 1):+.2f}%)" if actual is not None else ""
        tables.append(Table("t for a target size",
                            ["target_rows", "t solved", "expected kept", "actual kept", "sample (matched rows)"],
                            [[target["target_rows"], target["t"], f"{target['expected_kept']:.1f}",
                              f"{actual if actual is not None else '(not run)'}{off}",
                              f"{target['sample_rows']} of {target['matched_rows']}"]]))
    per_lang_t = (" (per language: " + ", ".join(f"{k or chr(34) * 2}={v}" for k, v in sorted(ts.items())) + ")"
                  if per_lang else "")
    tables += [
        Table("entry counts: head and tail",
              ["t", "matched entries", "head entries (count >= t)", "matches", "tail share of matches (count < t)",
               "expected matches after balancing"],
              [[f"{t}{per_lang_t}", df.height, head.height, total, f"{100 * tail_share:.2f}%", total_after]]),
        Table(f"top entries (before: matched texts; after: expected kept min(count, t); all in {os.path.basename(csv)})",
              ["rank", "entry", "text", "before", "after", "share before"],
              [[r, e, x, c, a, f"{100 * c / total:.2f}%"]
               for r, e, x, c, a in df.head(20).select("rank", "entry", "text", "count", "expected_after").iter_rows()]),
    ]
    figures = []
    if df.height:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rank = df["rank"].to_numpy()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.loglog(rank, df["count"].to_numpy(), label="before: texts matching the entry", color="#4c72b0")
        ax.loglog(rank, df["expected_after"].to_numpy(), label="after: expected kept, min(count, t)", color="#dd8452")
        ax.axhline(t, color="grey", ls="--", lw=1, label=f"t = {t}")
        ax.set_xlabel("entry rank (by count before balancing)")
        ax.set_ylabel("matches")
        ax.set_title(f"metaclip: {df.height} matched entries, {head.height} above t; tail share {100 * tail_share:.1f}%")
        ax.legend()
        fig.tight_layout()
        png1 = os.path.join(out_dir, "metaclip_entry_counts.png")
        fig.savefig(png1, dpi=100)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.semilogx(rank, np.cumsum(df["count"].to_numpy()) / max(total, 1), label="before", color="#4c72b0")
        ax.semilogx(rank, np.cumsum(df["expected_after"].to_numpy()) / max(total_after, 1), label="after (expected)",
                    color="#dd8452")
        if head.height:
            ax.axvline(head.height, color="grey", ls="--", lw=1, label=f"last entry with count >= t ({head.height})")
        ax.set_xlabel("entry rank")
        ax.set_ylabel("cumulative share of matches")
        ax.set_ylim(0, 1.02)
        ax.legend()
        fig.tight_layout()
        png2 = os.path.join(out_dir, "metaclip_cumulative_share.png")
        fig.savefig(png2, dpi=100)
        plt.close(fig)
        figures = [("entry counts before and after balancing (log-log)", png1),
                   ("cumulative share of matches by entry rank", png2)]
    return {"figures": figures, "tables": tables, "csv": csv}

