"""`clipcurate report --run R --compare OTHER`: two recipes side by side (URLs downloaded, image store bytes,
rows emitted, recorded time) and their final sets by uid."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli_main
from pipeline.report import build_report
from tests.stages_for_tests import make_pool

FW = "tests.stages_for_tests:FirstWordStage"


def _run(runs, name: str, pool, tmp_path, keep: float, seed: int = 0) -> None:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'[run]\nseed = {seed}\nstages = ["{FW}@first", "align", "{FW}"]\n["{FW}@first"]\nkeep = 0.9\n'
                   f'["{FW}"]\nkeep = {keep}\n')
    assert cli_main(["--runs-dir", str(runs), "run", "--run", name, "--input", str(pool), "--config", str(cfg),
                     "--workers", "0"]) == 0


def _manifest(run, folder) -> dict:
    return json.loads((run / folder / "_manifest.json").read_text())


def _patch(run, folder, **keys) -> None:
    p = run / folder / "_manifest.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **keys}))


def _uids(folder) -> set[str]:
    return {u for f in sorted(os.listdir(folder)) if f.startswith("part-")
            for u in pq.read_table(os.path.join(folder, f), columns=["uid"]).column("uid").to_pylist()}


def _seconds(run) -> float:
    return sum(v for d in ("00_firstword-first", "01_align", "02_firstword")
               for k, v in _manifest(run, d)["timings"].items() if k.endswith("_s"))


def test_two_recipes_compared_by_the_numbers_and_by_uid(tmp_path, capsys):
    pool = tmp_path / "pool"
    make_pool(600, 3, pool)
    runs = tmp_path / "runs"
    _run(runs, "a", pool, tmp_path, keep=0.5)
    _run(runs, "b", pool, tmp_path, keep=0.8, seed=1)  # other draws: each run keeps rows the other drops
    a, b = runs / "a", runs / "b"
    # a download step is found by its manifest keys, whichever step it is: `urls_downloaded` first, else the
    # downloader's unique_urls; its seconds count as recorded time
    _patch(a, "01_align", urls_downloaded=123, download={"unique_urls": 999, "seconds": 4.5})
    _patch(b, "00_firstword-first", download={"unique_urls": 77, "seconds": 1.25})
    # a's image store: a folder inside the run, of known size; b has none
    (a / "store" / "sub").mkdir(parents=True)
    (a / "store" / "00000.parquet").write_bytes(b"x" * 1000)
    (a / "store" / "sub" / "00001.parquet").write_bytes(b"y" * 234)
    (a / "image_store.json").write_text(json.dumps({"root": "store", "format": "parquet", "column": "jpg"}))

    assert cli_main(["--runs-dir", str(runs), "report", "--run", "a", "--compare", "b"]) == 0
    printed = capsys.readouterr().out
    out = build_report(str(a), str(b))
    [sec] = [s for s in out["sections"] if s["title"] == "Recipes compared"]
    runs_t, sets_t = sec["tables"]
    recipe = f"{FW}@first → align → {FW}"
    ma, mb = _manifest(a, "02_firstword"), _manifest(b, "02_firstword")
    ta, tb = round(_seconds(a) + 4.5, 3), round(_seconds(b) + 1.25, 3)
    assert runs_t.rows == [
        ["a", recipe, 123, 1234, "0.0", FW, ma["rows_out"], ta, 4.5],
        ["b", recipe, 77, "", "", FW, mb["rows_out"], tb, 1.25],
    ]
    ua, ub = _uids(a / "02_firstword"), _uids(b / "02_firstword")
    assert len(ua) == ma["rows_out"] and len(ub) == mb["rows_out"] and ua != ub
    both, only_a, only_b = len(ua & ub), len(ua - ub), len(ub - ua)
    assert both > 0 and only_a > 0 and only_b > 0
    assert [r[:2] for r in sets_t.rows] == [["in both", both], ["only in a", only_a], ["only in b", only_b]]
    assert sets_t.rows[0][2:] == [f"{both / len(ua):.1%}", f"{both / len(ub):.1%}"]
    assert out["compare"]["sets"] == {"both": both, "only_this": only_a, "only_other": only_b,
                                      "union": len(ua | ub)}
    # the note says what the time is; the sets overlap, so no note asks whether the runs read the same list
    assert any("recorded stage time" in n and "not a stopwatch" in n for n in sec["notes"])
    assert not any("share no row" in n or "different inputs" in n or "last ran as a resume" in n
                   for n in sec["notes"])
    # in both renderings, and in the command's lines
    md, html = open(out["md"]).read(), open(out["html"]).read()
    assert "## Recipes compared" in md and f"| a | {recipe} | 123 | 1234 |" in md
    assert "<h2>Recipes compared</h2>" in html and f"<td>only in b</td><td>{only_b}</td>" in html
    assert f"final sets: {both} in both, {only_a} only in a, {only_b} only in b" in printed


def test_an_unfinished_recipe_and_sets_with_nothing_in_common_are_said(tmp_path):
    pool, other_pool = tmp_path / "pool", tmp_path / "pool2"
    make_pool(300, 2, pool)
    make_pool(300, 2, other_pool, seed=1)
    runs = tmp_path / "runs"
    _run(runs, "a", pool, tmp_path, keep=0.5)
    cfg = tmp_path / "b.toml"
    cfg.write_text(f'[run]\nstages = ["{FW}@first", "align", "{FW}"]\n')
    assert cli_main(["--runs-dir", str(runs), "run", f"{FW}@first", "--run", "b", "--input", str(other_pool),
                     "--config", str(cfg), "--workers", "0"]) == 0
    # a rerun of a finished run finds every step up to date and keeps the time each took when it ran
    folders = ["00_firstword-first", "01_align", "02_firstword"]
    ran = {d: _manifest(runs / "a", d)["timings"] for d in folders}
    assert cli_main(["--runs-dir", str(runs), "run", "--run", "a", "--workers", "0"]) == 0
    assert {d: _manifest(runs / "a", d)["timings"] for d in folders} == ran
    out = build_report(str(runs / "a"), str(runs / "b"))
    [sec] = [s for s in out["sections"] if s["title"] == "Recipes compared"]
    assert sec["tables"][0].rows[0][7] == pytest.approx(sum(v for t in ran.values() for k, v in t.items()
                                                           if k.endswith("_s")), abs=2e-3)  # the time they took
    row_b = sec["tables"][0].rows[1]
    assert row_b[5] == f"{FW}@first (recipe not finished)"
    assert row_b[6] == _manifest(runs / "b", "00_firstword-first")["rows_out"]
    assert any(n.startswith(f"b: its recipe's last step ({FW}) has not finished") for n in sec["notes"])
    assert any(n.startswith(f"the runs started from different inputs ({pool}, {other_pool})") for n in sec["notes"])
    # a download step's url_list is where a run started, whichever step downloads
    _patch(runs / "b", "00_firstword-first", url_list=str(pool))
    out = build_report(str(runs / "a"), str(runs / "b"))
    [sec] = [s for s in out["sections"] if s["title"] == "Recipes compared"]
    assert not any("different inputs" in n for n in sec["notes"])
    assert any("share no row: did both runs read the same URL list?" in n for n in sec["notes"])


def test_a_missing_other_run_is_one_line_not_an_error(tmp_path, capsys):
    pool = tmp_path / "pool"
    make_pool(200, 2, pool)
    runs = tmp_path / "runs"
    _run(runs, "a", pool, tmp_path, keep=0.5)
    assert cli_main(["--runs-dir", str(runs), "report", "--run", "a", "--compare", "nope"]) == 0
    printed = capsys.readouterr().out
    line = f"run nope ({runs / 'nope'}) does not exist: nothing to compare with."
    assert f"recipes compared: {line}" in printed
    md = (runs / "a" / "report" / "report.md").read_text()
    assert f"## Recipes compared\n\n{line}\n" in md
    assert not (runs / "nope").exists()
