"""Histograms and the run report. The pipeline knows nothing of what a stage does: each stage's
`report(stage_dir, out_dir)` hook draws its own figures and tables; this package gathers them with what
every stage has (its manifest: funnel, reasons, timings) and writes `report.html` + `report.md`.

The HTML opens from disk with no server: figures are PNG files next to it (relative links) and thumbnails
are embedded as data URIs.

One job a module:
  sections.py  the report as data: `Table`, the summary, funnel and timing rows, the sections in reading order
  figures.py   the stages' report hooks (`histograms`), `bar_chart`, the training curve, thumbnails
  compare.py   recipes compared (`report --compare`)
  quality.py   filter quality against the truth: the default labels (`world_truth`) and their tables
  render.py    Markdown and HTML (the jinja2 template pipeline/templates/report.html.j2)
  build.py     `build_report`: all of the above, written to runs/NAME/report/
  browser.py   the headless-browser check (`render-check`)
  cli.py       the commands `report`, `histograms` and `render-check` (`register`)
Where a run's steps are on disk is pipeline/layout.py's.
"""

from pipeline.report.browser import find_browser, render_check
from pipeline.report.build import build_report
from pipeline.report.cli import register
from pipeline.report.compare import recipe_summary
from pipeline.report.figures import bar_chart, histograms, thumbnails
from pipeline.report.quality import world_truth
from pipeline.report.render import render_html, render_markdown
from pipeline.report.sections import Table

__all__ = ["Table", "bar_chart", "build_report", "find_browser", "histograms", "recipe_summary", "register",
           "render_check", "render_html", "render_markdown", "thumbnails", "world_truth"]
