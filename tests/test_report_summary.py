"""The report's top and its figures (issue 35, item 6): a summary first (rows in, rows emitted, the training
set, the recipe steps not run, the evaluation), figures redrawn on every report with none left from an earlier
one, a training curve that says when no evaluation exists, and text columns aligned with the stage names."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from pipeline.cli import main as cli_main
from pipeline.report import Table
from tests.stages_for_tests import make_pool


@pytest.fixture
def run(tmp_path):
    """A metaclip run (t = 5) on 400 text rows, with a 40-entry list: it draws two figures and drops rows."""
    make_pool(400, 2, tmp_path / "in")
    (tmp_path / "ent.txt").write_text("\n".join(f"w{i}" for i in range(40)) + "\n")
    for t in (5, 50):
        (tmp_path / f"t{t}.toml").write_text(f'[metaclip]\nentries = "{tmp_path / "ent.txt"}"\nt = {t}\n')
    runs = tmp_path / "runs"
    assert cli(runs, "run", "metaclip", "--input", str(tmp_path / "in"), "--config", str(tmp_path / "t5.toml")) == 0
    return runs, tmp_path


def cli(runs, command, *args):
    extra = ["--workers", "0"] if command == "run" else []
    return cli_main(["--runs-dir", str(runs), command, "--run", "r", *args, *extra])


def _summary(md: str) -> dict[str, str]:
    """The summary table's rows, read back from report.md; it must be the first section."""
    sections = re.findall(r"^## (.+)$", md, re.M)
    assert sections[0] == "Summary", sections
    block = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [l.strip("|").split(" | ") for l in block.splitlines() if l.startswith("| ") and "---" not in l]
    return {k.strip(): v.strip() for k, v in rows[1:]}


def test_the_summary_comes_first_and_says_what_has_not_run(run, capsys):
    runs, tmp = run
    capsys.readouterr()
    assert cli(runs, "report") == 0
    printed = capsys.readouterr().out
    s = _summary((runs / "r" / "report" / "report.md").read_text())
    assert s["rows in"] == f"400 (read by metaclip from {tmp / 'in'})"
    m = json.loads((runs / "r" / "02_metaclip" / "_manifest.json").read_text())
    assert s["rows emitted"] == f"none yet: the last finished step, metaclip, kept {m['rows_out']}"
    assert s["training set"] == "none: no finished step has written a training set"
    assert s["recipe steps not run"] == "ingest, align, klite, dfn, emit"  # the default recipe's other steps
    assert s["evaluation"] == "none: no model has been trained on this run (clipcurate train --run r)"
    assert printed.splitlines()[0] == f"rows in: {s['rows in']}"  # the CLI prints it first too
    assert "<h2>Summary</h2>" in (runs / "r" / "report" / "report.html").read_text().split("<h2>Funnel</h2>")[0]
    # after emit: the rows emitted and where they are
    assert cli(runs, "run", "emit") == 0
    assert cli(runs, "report") == 0
    s = _summary((runs / "r" / "report" / "report.md").read_text())
    assert s["rows emitted"] == str(m["rows_out"])
    assert s["training set"] == f"{runs / 'r' / 'emit'} (wds, parquet; 1 shard)"
    assert s["recipe steps not run"] == "ingest, align, klite, dfn"


def _training_notes(md: str) -> list[str]:
    block = md.split("## Training", 1)[1].split("\n## ", 1)[0]
    return [l[2:] for l in block.splitlines() if l.startswith("- ")]


def test_a_training_curve_without_an_evaluation_says_so(run):
    runs, _ = run
    train = runs / "r" / "train"
    train.mkdir()
    (train / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "loss": 5.0 - k / 10}) + "\n"
                                                 for k in (10, 20, 30)))
    assert cli(runs, "report") == 0
    md = (runs / "r" / "report" / "report.md").read_text()
    why = "training has not finished (last logged step 30); its model is evaluated when it ends " \
          "(clipcurate train --run r --resume)"
    assert _training_notes(md) == [f"No evaluation exists: {why}."]
    assert _summary(md)["evaluation"] == f"none: {why}"
    (train / "train.json").write_text("{}")  # finished, never evaluated (train --no-eval)
    assert cli(runs, "report") == 0
    md = (runs / "r" / "report" / "report.md").read_text()
    assert _training_notes(md) == ["No evaluation exists: the trained model has not been evaluated "
                                   "(clipcurate eval --run r)."]
    (train / "eval-shapes.json").write_text(json.dumps({"kind": "classification", "top1": 0.625, "top5": 1.0}))
    assert cli(runs, "report") == 0
    md = (runs / "r" / "report" / "report.md").read_text()
    assert _training_notes(md) == []
    assert _summary(md)["evaluation"] == "eval-shapes: top1 0.6250"


def _pngs(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.png")}


def test_figures_are_redrawn_after_a_rerun_and_none_is_left_from_before(run):
    runs, tmp = run
    report = runs / "r" / "report"
    assert cli(runs, "report") == 0
    before = _pngs(report)
    assert set(before) == {"metaclip_entry_counts.png", "metaclip_cumulative_share.png"}
    # figures an earlier report drew that this one does not (a step gone, a hook that now draws nothing)
    (report / "dfn_scores.png").write_bytes(b"old")
    (report / "metaclip-x").mkdir()
    (report / "metaclip-x" / "metaclip_entry_counts.png").write_bytes(b"old")
    (report / "report.png").write_bytes(b"render-check's screenshot")
    assert cli(runs, "run", "metaclip", "--config", str(tmp / "t50.toml")) == 0  # another t: other counts after
    assert cli(runs, "report") == 0
    after = _pngs(report)
    assert set(after) == set(before) | {"report.png"}
    assert all(after[k] != before[k] for k in before), "every figure is drawn again from the rerun step"
    html = (report / "report.html").read_text()
    assert sorted(re.findall(r'src="([^"]+\.png)"', html)) == sorted(before)


def test_text_columns_are_aligned_with_the_stage_names(run):
    runs, _ = run
    assert cli(runs, "report") == 0
    html = (runs / "r" / "report" / "report.html").read_text()
    funnel = html.split("<h2>Funnel</h2>", 1)[1]
    assert funnel.lstrip().startswith('<table class="l1 l5"><thead>')  # stage and reason: both left-aligned
    assert ".l5 td:nth-child(5),.l5 th:nth-child(5){text-align:left}" in html
    t = Table("", ["stage", "rows in", "reason", "rows", "delta"],
              [["align", 10, "", "", "-3"], ["", "", "too_short", "7 (1.8%)", "+.5"], ["", None, "odd_aspect", "3", ""]])
    assert t.text_columns == "l1 l3"  # a share such as "7 (1.8%)" or a signed number stays right-aligned
