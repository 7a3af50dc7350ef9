"""klite's part of the run report. Read from the kept shards, not from the stage's stats: the pool counts say
how often a concept was a candidate, the report what captions were actually enriched with."""

from __future__ import annotations

import os

import polars as pl

from pipeline import shards


def concept_report(stage_dir: str, out_dir: str) -> dict:
    """Coverage (share of kept captions enriched) and the most used concepts, as tables and a bar chart."""
    paths = shards.list_shards(stage_dir) if shards.exists(stage_dir) else []
    col = pl.concat(
        [pl.from_arrow(shards.read_shard(p, columns=["klite_concept"]).column(0)) for p in paths]
    ) if paths else pl.Series("klite_concept", [], pl.String)
    total = len(col)
    enriched = total - col.null_count()
    cov = 100.0 * enriched / total if total else 0.0
    top = col.drop_nulls().value_counts(sort=True, name="n").head(20) if enriched else pl.DataFrame(
        {"klite_concept": [], "n": []}, schema={"klite_concept": pl.String, "n": pl.UInt32}
    )
    top = top.sort(["n", "klite_concept"], descending=[True, False])
    from pipeline.report import Table

    tables = [
        Table("coverage (share of captions enriched)", ["captions", "enriched", "coverage"],
              [[total, enriched, f"{cov:.2f}%"]]),
        Table("most used concepts (top 20)", ["concept", "captions", "share of enriched"],
              [[c, k, f"{100.0 * k / enriched:.2f}%"] for c, k in top.iter_rows()]),
    ]
    figures = []
    if len(top):
        from pipeline.report import bar_chart

        png = bar_chart(os.path.join(out_dir, "klite_concepts.png"), top["klite_concept"].to_list(), top["n"].to_list(),
                        "captions enriched with this concept", f"klite: {cov:.2f}% of {total} captions enriched",
                        row_height=0.3)
        figures.append(("most used concepts", png))
    return {"figures": figures, "tables": tables}
