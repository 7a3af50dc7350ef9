"""Stale step folders (issue 35, item 4): a recipe that gains a step shifts the folders after it, and the old ones
(`00_align`, `01_firstword`) stay beside the new ones. `report` lists exactly those in its summary (and leaves them
out of the funnel), `clipcurate clean --run NAME --stale` removes exactly those, under the run's lock, one line each,
and a following `run` redoes nothing. Without --stale: exit 2, one line, nothing removed. A linked stale folder is
unlinked, never followed; a user's stage run outside the recipe (90_<name>) stays until the recipe runs that stage
itself; a folder the run still reads (its image store) is kept; a user's step that does not import is not judged.

Runs are small text pools through toy stages (tests/stages_for_tests.py) and align's text rules: no download."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys

import pytest

from pipeline.cli import main as cli_main
from tests.stages_for_tests import make_pool

FW = "tests.stages_for_tests:FirstWordStage"
NOTING = "tests.stages_for_tests:NotingStage"
STALE = ["00_align", "01_firstword"]  # v1's folders that v2 shifted
CURRENT = ["00_firstword-pre", "01_align", "02_firstword"]


def cli(runs, *argv) -> int:
    extra = ["--workers", "0"] if argv[0] == "run" else []
    return cli_main(["--runs-dir", str(runs), *argv, *extra])


def _folders(run) -> list[str]:
    return sorted(n for n in os.listdir(run) if re.match(r"\d\d_", n))


def _snapshot(run, names) -> dict[str, bytes]:
    """Every file under the named folders, by path: what must not change. Of a manifest (rewritten by every run,
    its `input` naming the template's folder until then) what says the output is the same: its fingerprint and
    counts."""
    out = {}
    for name in names:
        for root, _, files in os.walk(run / name):
            for f in files:
                p = os.path.join(root, f)
                data = open(p, "rb").read()
                if f == "_manifest.json":
                    data = json.dumps({k: v for k, v in json.loads(data).items()
                                       if k in ("fingerprint", "rows_in", "rows_out", "reasons")}).encode()
                out[os.path.relpath(p, run)] = data
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A run on recipe v1 = [align, firstword] (00_align, 01_firstword), a user's stage run outside it
    (90_noting), then v2 = [firstword@pre, align, firstword]: the folders shift to 00_firstword-pre, 01_align,
    02_firstword. Built once; each test works on a copy."""
    root = tmp_path_factory.mktemp("stale")
    make_pool(240, 2, root / "pool")
    (root / "v1.toml").write_text(f'[run]\nstages = ["align", "{FW}"]\n')
    (root / "v2.toml").write_text(f'[run]\nstages = ["{FW}@pre", "align", "{FW}"]\n["{FW}@pre"]\nkeep = 0.8\n')
    runs = root / "runs"
    assert cli(runs, "run", "--run", "r", "--input", str(root / "pool"), "--config", str(root / "v1.toml")) == 0
    assert cli(runs, "run", NOTING, "--run", "r") == 0
    assert cli(runs, "run", "--run", "r", "--config", str(root / "v2.toml")) == 0
    assert _folders(runs / "r") == sorted(STALE + CURRENT + ["90_noting"])
    return root


@pytest.fixture
def runs(template, tmp_path):
    dest = tmp_path / "runs"
    shutil.copytree(template / "runs", dest, symlinks=True)
    return dest


def _summary(md: str) -> dict[str, str]:
    block = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [l.strip("|").split(" | ") for l in block.splitlines() if l.startswith("| ") and "---" not in l]
    return {k.strip(): v.strip() for k, v in rows[1:]}


def _listed(line: str) -> list[str]:
    """The folders a summary line names as stale (before the first ':')."""
    return [] if line == "none" else [n.strip() for n in line.split(":", 1)[0].split(",")]


def test_report_lists_exactly_the_stale_folders_and_clean_removes_exactly_them(runs, capsys, caplog):
    run = runs / "r"
    assert cli(runs, "report", "--run", "r") == 0
    printed = capsys.readouterr().out
    s = _summary((run / "report" / "report.md").read_text())
    assert _listed(s["stale step folders"]) == STALE
    assert "clipcurate clean --run r --stale" in s["stale step folders"]
    assert f"stale step folders: {s['stale step folders']}" in printed.splitlines()  # the CLI's summary too
    assert s["recipe steps not run"] == "none: every step of the recipe has run"
    # the funnel has the recipe's steps and the user's stage run outside it, not the older recipe's folders
    funnel = printed.split("funnel:\n", 1)[1].split("report:", 1)[0]
    assert re.findall(r"^\s*(\S+):\s+\d+ in", funnel, re.M) == [f"{FW}@pre", "align", FW, NOTING]

    keep = _snapshot(run, CURRENT + ["90_noting"])
    assert cli(runs, "clean", "--run", "r", "--stale") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"removed {run / n}" for n in STALE] + ["clean: removed 2 stale step folders"]
    assert _folders(run) == sorted(CURRENT + ["90_noting"])
    assert _snapshot(run, CURRENT + ["90_noting"]) == keep
    assert not (run / ".lock").exists()  # the lock was taken and released

    # nothing that was current is redone
    caplog.clear()
    with caplog.at_level("INFO", logger="clipcurate"):
        assert cli(runs, "run", "--run", "r") == 0
    assert caplog.text.count("shards up to date, skipped") == 3 and "shards to do" not in caplog.text
    assert _snapshot(run, CURRENT + ["90_noting"]) == keep

    assert cli(runs, "report", "--run", "r") == 0
    assert _summary((run / "report" / "report.md").read_text())["stale step folders"] == "none"
    capsys.readouterr()
    assert cli(runs, "clean", "--run", "r", "--stale") == 0  # again: nothing to do
    assert capsys.readouterr().out.startswith("clean: no stale step folder")


def test_without_stale_it_refuses_in_one_line_and_removes_nothing(runs, capsys):
    run = runs / "r"
    before = _snapshot(run, _folders(run))
    assert cli(runs, "clean", "--run", "r") == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clipcurate: error: clean: say what to remove: --stale removes "
                                               "00_align, 01_firstword,")
    assert _snapshot(run, _folders(run)) == before
    # --dry-run lists them, removes nothing
    assert cli(runs, "clean", "--run", "r", "--dry-run") == 0
    assert capsys.readouterr().out.splitlines() == [f"would remove {run / n}" for n in STALE] + [
        "clean: 2 stale step folders (--dry-run: nothing removed)"]
    assert _snapshot(run, _folders(run)) == before
    # a run that does not exist: one line, and no folder is left behind by the lock
    assert cli(runs, "clean", "--run", "nope", "--stale") == 2
    assert "is not a run" in capsys.readouterr().err and not (runs / "nope").exists()


def test_clean_takes_the_run_lock(runs, capsys):
    """Another writer holds the run: clean --stale stops in one line and removes nothing."""
    run = runs / "r"
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": 1, "host": "elsewhere", "since": "now", "command": "clipcurate run"}).encode())
        assert cli(runs, "clean", "--run", "r", "--stale") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is being written by pid 1 on elsewhere" in err[0]
        assert _folders(run) == sorted(STALE + CURRENT + ["90_noting"])
    finally:
        os.close(fd)


def test_a_linked_stale_folder_is_unlinked_not_followed(runs, tmp_path, capsys):
    run = runs / "r"
    outside = tmp_path / "outside"
    shutil.move(str(run / "01_firstword"), outside)  # the stale folder now lives outside the run, linked in
    os.symlink(outside, run / "01_firstword")
    precious = tmp_path / "precious.txt"
    precious.write_text("not the run's")
    os.symlink(precious, run / "00_align" / "link-out.txt")  # a link inside a real stale folder
    outside_files = sorted(os.listdir(outside))
    assert cli(runs, "report", "--run", "r") == 0
    assert _listed(_summary((run / "report" / "report.md").read_text())["stale step folders"]) == STALE
    capsys.readouterr()
    assert cli(runs, "clean", "--run", "r", "--stale") == 0
    out = capsys.readouterr().out
    assert f"removed {run / '01_firstword'} (a link to {outside}: unlinked, its target left as it is)" in out
    assert not os.path.lexists(run / "01_firstword") and not os.path.lexists(run / "00_align")
    assert sorted(os.listdir(outside)) == outside_files and precious.read_text() == "not the run's"
    assert _folders(run) == sorted(CURRENT + ["90_noting"])


def test_a_users_stage_outside_the_recipe_is_stale_only_once_the_recipe_runs_it(runs, tmp_path, capsys):
    """90_noting is the output of `run module:Class` outside the recipe: not stale (kept above). Once the recipe
    runs that stage itself (03_noting), `run module:Class` means that step: 90_noting is stale."""
    run = runs / "r"
    v3 = tmp_path / "v3.toml"
    v3.write_text(f'[run]\nstages = ["{FW}@pre", "align", "{FW}", "{NOTING}"]\n')
    assert cli(runs, "run", NOTING, "--run", "r", "--config", str(v3)) == 0
    assert (run / "03_noting" / "_manifest.json").exists()
    capsys.readouterr()
    assert cli(runs, "clean", "--run", "r", "--dry-run") == 0
    assert capsys.readouterr().out.splitlines()[:3] == [f"would remove {run / n}" for n in STALE + ["90_noting"]]


def test_a_stale_folder_the_run_still_reads_is_kept(runs, capsys):
    """The run's image store recorded inside a stale folder (a download whose step moved in the recipe): removing
    it would break every row's image reference, so clean keeps it and says why."""
    run = runs / "r"
    (run / "01_firstword" / "raw").mkdir()
    (run / "image_store.json").write_text(json.dumps({"root": "01_firstword/raw", "format": "parquet",
                                                      "column": "jpg"}))
    assert cli(runs, "report", "--run", "r") == 0
    line = _summary((run / "report" / "report.md").read_text())["stale step folders"]
    assert _listed(line) == ["00_align"] and "01_firstword: not a step of the recipe now, but the run's image " \
                                             "store is in it" in line
    capsys.readouterr()
    assert cli(runs, "clean", "--run", "r", "--stale") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"kept {run / '01_firstword'}: not a step of the recipe now, but the run's image store")
    assert out[1:] == [f"removed {run / '00_align'}", "clean: removed 1 stale step folder"]
    assert (run / "01_firstword" / "_manifest.json").exists()


def test_a_users_step_that_does_not_import_is_not_judged(tmp_path, monkeypatch, capsys):
    """A recipe's module:Class step is named by its class: where the module is gone, which folder at its position
    is its own cannot be told, so none there is called stale (the others still are)."""
    monkeypatch.delenv("PYTHONPATH", raising=False)  # `run` puts the current folder on it: restored after
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine_cs.py").write_text("from tests.stages_for_tests import FirstWordStage as Mine\n")
    monkeypatch.chdir(work)
    make_pool(120, 2, tmp_path / "pool")
    runs = tmp_path / "runs"
    (tmp_path / "v1.toml").write_text(f'[run]\nstages = ["align", "{FW}"]\n')
    (tmp_path / "v2.toml").write_text(f'[run]\nstages = ["mine_cs:Mine", "{FW}"]\n')
    assert cli(runs, "run", "--run", "r", "--input", str(tmp_path / "pool"), "--config", str(tmp_path / "v1.toml")) == 0
    assert cli(runs, "run", "--run", "r", "--config", str(tmp_path / "v2.toml")) == 0
    run = runs / "r"
    assert _folders(run) == ["00_align", "00_firstword", "01_firstword"]  # 00_firstword: Mine's (class name)
    capsys.readouterr()
    assert cli(runs, "clean", "--run", "r", "--dry-run") == 0
    assert capsys.readouterr().out.splitlines() == [f"would remove {run / '00_align'}",
                                                    "clean: 1 stale step folder (--dry-run: nothing removed)"]
    # the module is gone: position 00 is not judged, nothing removed there
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in (str(work), "")])
    sys.modules.pop("mine_cs", None)
    assert cli(runs, "clean", "--run", "r", "--stale") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"kept {run / '00_align'}: not judged (mine_cs:Mine does not import")
    assert out[1].startswith(f"kept {run / '00_firstword'}: not judged (mine_cs:Mine does not import")
    assert out[-1] == "clean: no stale step folder (the recipe's: mine_cs:Mine, " + FW + ")"
    assert _folders(run) == ["00_align", "00_firstword", "01_firstword"]


def test_on_an_object_store_clean_removes_exactly_the_stale_folders(template, tmp_path, capsys):
    """The same run copied into a bucket (moto on loopback): no links there; folders are prefixes, removed with
    what is under them, under the run's lease."""
    from tests.s3_server import moto_s3

    with moto_s3(tmp_path, "stale") as fs:
        fs.put(str(template / "runs" / "r") + "/", "stale/runs/r", recursive=True)
        runs = "s3://stale/runs"
        assert sorted(n for n in (p.rsplit("/", 1)[1] for p in fs.ls("stale/runs/r")) if re.match(r"\d\d_", n)) == \
            sorted(STALE + CURRENT + ["90_noting"])
        capsys.readouterr()
        assert cli(runs, "clean", "--run", "r", "--dry-run") == 0
        assert capsys.readouterr().out.splitlines()[:2] == [f"would remove {runs}/r/{n}" for n in STALE]
        assert cli(runs, "clean", "--run", "r", "--stale") == 0
        assert capsys.readouterr().out.splitlines() == [f"removed {runs}/r/{n}" for n in STALE] + [
            "clean: removed 2 stale step folders"]
        left = sorted(p.rsplit("/", 1)[1] for p in fs.ls("stale/runs/r", refresh=True))
        assert [n for n in left if re.match(r"\d\d_", n)] == sorted(CURRENT + ["90_noting"])
        assert ".lock" not in left and fs.ls("stale/runs/r/02_firstword", refresh=True)
