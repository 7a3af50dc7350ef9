"""`build_report`: gather a run's manifests, its stages' figures and tables, thumbnails, training, filter quality
and the recipe comparison into sections, and write report.md and report.html from them (a remote run's report is
drawn in a local folder, then copied next to the run)."""

from __future__ import annotations

import posixpath
import tempfile
from pathlib import Path

from pipeline import shards
from pipeline.errors import StageError
from pipeline.layout import manifests
from pipeline.report.compare import compare_section
from pipeline.report.figures import histograms, read_training, remove_undrawn, thumbnails
from pipeline.report.quality import judged, world_truth
from pipeline.report.render import render_html, render_markdown
from pipeline.report.sections import Table, funnel_rows, no_evaluation_why, report_sections, section, summary_rows
from pipeline.truth import check_truth


def build_report(run_dir: str, compare: str | None = None, truth: str | None = None) -> dict:
    """Write runs/NAME/report/report.md and report.html, both from the same sections. Returns what went in (for
    tests and the CLI). `compare`: another run's folder, compared in a "Recipes compared" section. `truth`: a
    labels file (uid, kind) for the filter quality section, checked first (default: the demo world's own,
    world_truth)."""
    ms = manifests(run_dir)
    if not ms:
        raise StageError(f"run {run_dir} has no finished stage yet: nothing to report")
    if truth is not None:
        check_truth(truth)
    if not shards.is_local(run_dir):  # drawn in a local folder, then copied next to the run (s3://...)
        with tempfile.TemporaryDirectory(prefix="clipcurate-report-") as tmp:
            res = _build_report(run_dir, Path(tmp), compare, truth)
            dest = shards.join(run_dir, "report")
            fs, p = shards.fs_and_path(dest)
            fs.put(tmp.rstrip("/") + "/", p, recursive=True)
            return {**res, "html": shards.join(dest, "report.html"), "md": shards.join(dest, "report.md")}
    out_dir = Path(run_dir) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    return _build_report(run_dir, out_dir, compare, truth)


def _build_report(run_dir: str, out_dir: Path, compare: str | None = None, truth: str | None = None) -> dict:
    ms = manifests(run_dir)
    hooks = histograms(run_dir, str(out_dir))
    thumbs = thumbnails(run_dir)
    training = read_training(run_dir, str(out_dir))
    training["no_eval"] = no_evaluation_why(Path(run_dir).name, training)
    remove_undrawn(out_dir, [p for res in hooks.values() for _, p in res.get("figures", [])]
                   + ([training["curve"]] if training.get("curve") else []))
    funnel = funnel_rows(ms)
    truth = truth or world_truth(run_dir)
    quality = None
    if truth:
        quality = judged(run_dir, truth, out_dir)
    sections = report_sections(ms, funnel, truth, quality, hooks, training, thumbs, out_dir)
    summary = summary_rows(run_dir, training)
    sections.insert(0, section("Summary", tables=[Table("", ["", "this run"], summary)]))
    compared = None
    if compare is not None:  # after the funnel: what this recipe cost and kept against the other's
        cs = compare_section(run_dir, compare, posixpath.basename(str(compare).rstrip("/")))
        compared = cs["compare"]
        sections.insert(1, cs)
    run = Path(run_dir).name
    (out_dir / "report.md").write_text(render_markdown(run, sections))
    (out_dir / "report.html").write_text(render_html(run, sections))
    return {"manifests": ms, "funnel": funnel, "hooks": hooks, "thumb_groups": len(thumbs), "training": training,
            "filter_quality": quality, "sections": sections, "compare": compared, "summary": summary,
            "html": str(out_dir / "report.html"), "md": str(out_dir / "report.md")}
