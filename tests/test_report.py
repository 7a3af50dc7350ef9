"""The run report: one set of sections, rendered as Markdown and, through one jinja2 template, as HTML."""

from __future__ import annotations

import re

from pipeline import config as config_mod
from pipeline.report import Table, build_report, render_markdown
from pipeline.runner import run_pipeline
from tests.stages_for_tests import make_pool

STAGE = "tests.stages_for_tests:NotingStage"


def test_markdown_and_html_hold_the_same_tables_and_html_escapes(tmp_path):
    make_pool(300, 3, tmp_path / "in")
    [res] = run_pipeline([STAGE], str(tmp_path / "run"), config_mod.resolve({}), input_dir=str(tmp_path / "in"),
                         workers=0)
    m = res.manifest
    out = build_report(str(tmp_path / "run"))
    md = open(out["md"]).read()
    html = open(out["html"]).read()
    # the funnel's total line, in both
    name = re.escape(m["stage"])  # the step's name: tests.stages_for_tests:NotingStage
    assert re.search(rf"\| {name} \| {m['rows_in']} \| {m['rows_out']} \| {m['rejected']} \|", md)
    assert re.search(rf"<td>{name}</td><td>{m['rows_in']}</td><td>{m['rows_out']}</td><td>{m['rejected']}</td>", html)
    # the stage's own table (data, not Markdown) and the notes its context collected, once per shard
    assert "| w0 | <script>x</script> |" in md
    assert "<td>&lt;script&gt;x&lt;/script&gt;</td>" in html and "<script>x" not in html
    notes = [n for n in m["notes"] if n.startswith("saw")]
    assert sorted(notes) == [f"saw <part-0000{i}.parquet> & kept what it could" for i in range(3)]
    assert "saw &lt;part-00000.parquet&gt; &amp; kept" in html
    # every table of every section is in both renderings
    from html import escape

    tables = [t for s in out["sections"] for t in s["tables"]]
    assert len(tables) >= 3  # funnel, timings, the stage's own
    for t in tables:
        for row in t.rows:
            assert "| " + " | ".join("" if c is None else str(c) for c in row) + " |" in md
            assert "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" in html, row


def test_a_table_renders_its_cells_once_escaped_for_markdown():
    t = Table("x", ["a", "b"], [["p|q", None], [1, "two\nlines"]])
    assert t.markdown().splitlines() == ["| a | b |", "|---|---|", "| p\\|q |  |", "| 1 | two lines |"]
    md = render_markdown("r", [{"title": "T", "level": 2, "text": "", "notes": ["n"], "tables": [t], "figures": [],
                                "pre": "", "cards": []}])
    assert md.startswith("# clipcurate run report: r\n\n## T\n\n### x\n\n| a | b |") and "- n" in md
