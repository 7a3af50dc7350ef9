"""Where the report's truth comes from (issue 35, item 1): only a demo world's own record (world.json) or an
explicit `report --truth FILE`, checked in one line. A `truth.parquet` that a user's crawl holds beside its URL
list is not this run's labels."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli_main
from tests.stages_for_tests import make_pool

STAGE = "tests.stages_for_tests:FirstWordStage"


@pytest.fixture
def crawl_run(tmp_path):
    """A run whose input (one Parquet URL list) sits next to a user's unrelated truth.parquet (no uid column)."""
    crawl = tmp_path / "crawl"
    [urls] = make_pool(60, 1, crawl)
    pq.write_table(pa.table({"image": ["a.jpg", "b.jpg"], "label": ["cat", "dog"]}), crawl / "truth.parquet")
    runs = tmp_path / "runs"
    assert cli_main(["--runs-dir", str(runs), "run", STAGE, "--run", "r", "--input", urls, "--workers", "0"]) == 0
    return runs, crawl, urls


def _report(runs, *extra):
    return cli_main(["--runs-dir", str(runs), "report", "--run", "r", *extra])


def test_a_truth_parquet_beside_a_users_url_list_is_not_read(crawl_run, capsys):
    runs, _, _ = crawl_run
    capsys.readouterr()
    assert _report(runs) == 0
    md = (runs / "r" / "report" / "report.md").read_text()
    assert "Filter quality against the truth" not in md
    assert not (runs / "r" / "report" / "filter_quality.json").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_an_explicit_truth_without_uid_and_kind_is_one_line(crawl_run, capsys):
    runs, crawl, _ = crawl_run
    capsys.readouterr()
    assert _report(runs, "--truth", str(crawl / "truth.parquet")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"clipcurate: error: truth file {crawl / 'truth.parquet'} has no uid, kind column: a truth file "
                   "holds one row per uid with its `kind` (clean or a noise kind), as a demo world's truth.parquet "
                   "does"]


@pytest.mark.parametrize("content", [b"not parquet at all", None])
def test_an_unreadable_or_missing_truth_is_one_line(crawl_run, capsys, content):
    runs, crawl, _ = crawl_run
    bad = crawl / "bad.parquet"
    if content is not None:
        bad.write_bytes(content)
    capsys.readouterr()
    assert _report(runs, "--truth", str(bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"clipcurate: error: truth file {bad} ")
    assert ("is not a readable Parquet file" if content else "does not exist") in err[0]


def _labels(crawl, urls):
    uids = pq.read_table(urls, columns=["uid"]).column("uid").to_pylist()
    kinds = ["clean" if i % 4 else "mismatched" for i in range(len(uids))]
    pq.write_table(pa.table({"uid": uids, "kind": kinds}), crawl / "truth.parquet")
    return kinds


def test_an_explicit_truth_with_uid_and_kind_gives_the_section(crawl_run):
    runs, crawl, urls = crawl_run
    kinds = _labels(crawl, urls)
    labels = crawl / "labels.parquet"
    (crawl / "truth.parquet").rename(labels)
    assert _report(runs, "--truth", str(labels)) == 0
    q = json.loads((runs / "r" / "report" / "filter_quality.json").read_text())
    assert q["truth"] == str(labels) and q["rows"] == len(kinds)
    assert "Filter quality against the truth" in (runs / "r" / "report" / "report.md").read_text()


def test_a_world_json_that_records_the_truth_makes_it_the_runs_labels(crawl_run):
    """The demo world's way: world.json's file digests name truth.parquet. Changed bytes are no longer its own."""
    runs, crawl, urls = crawl_run
    _labels(crawl, urls)
    digest = hashlib.sha256((crawl / "truth.parquet").read_bytes()).hexdigest()
    (crawl / "world.json").write_text(json.dumps({"files": {"truth.parquet": digest}}))
    assert _report(runs) == 0
    q = json.loads((runs / "r" / "report" / "filter_quality.json").read_text())
    assert q["truth"] == str(crawl / "truth.parquet")
    (runs / "r" / "report" / "filter_quality.json").unlink()
    pq.write_table(pa.table({"uid": ["x"], "kind": ["clean"]}), crawl / "truth.parquet")  # not what world.json says
    assert _report(runs) == 0
    assert not (runs / "r" / "report" / "filter_quality.json").exists()
