"""align's part of the run report: the funnel, rows dropped per rule in rule order."""

from __future__ import annotations

import os

from pipeline import shards

from .rules import REASONS


def funnel_report(stage_dir: str, out_dir: str) -> dict:
    """The funnel from the stage's manifest, as a table and a bar chart (rules not in `REASONS`, such as
    invalid_utf8, after them)."""
    m = shards.read_json(shards.join(stage_dir, "_manifest.json")) or {}
    rows_in = int(m.get("rows_in", 0))
    reasons = m.get("reasons", {})
    from pipeline.report import Table, bar_chart

    rows, left = [], rows_in
    order = REASONS + sorted(r for r in reasons if r not in REASONS)
    for r in order:
        d = int(reasons.get(r, 0))
        left -= d
        rows.append([r, d, f"{100.0 * d / rows_in:.2f}%" if rows_in else "-", left])
    rows.append(["kept", "", f"{100.0 * left / rows_in:.2f}%" if rows_in else "", left])
    tables = [Table(f"align funnel (rows in: {rows_in})", ["rule", "dropped", "share of input", "remaining"], rows)]
    if m.get("notes"):
        tables.append(Table("align notes", ["note"], [[x] for x in m["notes"]]))
    png = bar_chart(os.path.join(out_dir, "align_funnel.png"), order, [int(reasons.get(r, 0)) for r in order],
                    "rows dropped (first broken rule)", f"align: {rows_in} in, {left} kept")
    figures = [("align funnel", png)]
    return {"figures": figures, "tables": tables}
