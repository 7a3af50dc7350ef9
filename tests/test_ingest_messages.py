"""What ingest and `run --config` print (issue 35, item 10), through the CLI: every ingest ends with the same
`next:` line; a repeated (url, caption) row reads the same wherever it is found; the config line names only the
steps that have already run. (The URL-list ingest's `next:` line and duplicate wording: test_ingest.py, on its
one real download.)"""

from __future__ import annotations

import re

import polars as pl

from pipeline import shards
from pipeline.cli import main as cli_main
from stages.ingest.urls import DUPLICATE_REASON, reason_expr
from tests.test_ingest import _crawl_shard


def _crawl(tmp_path):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    a = ("http://h.invalid/a.jpg", "a red square on a white table", (220, 220))
    b = ("http://h.invalid/b.jpg", "a blue circle on a white table", (230, 210))
    _crawl_shard(crawl, "00000", [a, b, a])  # a listed twice: the same uid, kept once
    return crawl


def test_a_crawl_used_in_place_ends_with_the_next_line_and_the_one_duplicate_wording(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert cli_main(["--runs-dir", str(runs), "ingest", str(_crawl(tmp_path)), "--run", "r", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "next: clipcurate run --run r   (align, metaclip, klite, dfn, emit)" in out.splitlines()
    m = shards.read_json(str(runs / "r" / "00_ingest" / "_manifest.json"))
    assert m["reasons"] == {DUPLICATE_REASON: 1} and DUPLICATE_REASON == "duplicate: same url and caption as another row"


def test_a_url_lists_duplicate_reason_reads_the_same_whatever_an_older_list_wrote():
    # text-first's URL list rows (curated.url_list_rows) and a download made before the wording was one
    df = pl.DataFrame({"status": ["duplicate", "duplicate", "invalid_url"],
                       "error_message": ["same url and caption as an earlier row", "same url and caption as another row",
                                         "not an http(s) URL"]})
    assert df.select(reason=reason_expr())["reason"].to_list() == [DUPLICATE_REASON, DUPLICATE_REASON,
                                                                   "invalid_url: not an http(s) URL"]


def test_the_config_line_names_only_steps_that_have_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert cli_main(["--runs-dir", str(runs), "ingest", str(_crawl(tmp_path)), "--run", "r", "--workers", "0"]) == 0
    capsys.readouterr()
    words = tmp_path / "words.toml"
    words.write_text("[align]\nmin_words = 5\n")
    # a brand-new run (ingest only): align is about to run for the first time, nothing is redone
    assert cli_main(["--runs-dir", str(runs), "run", "align", "--run", "r", "--config", str(words)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^config: align.min_words: \d+ -> 5$", out, re.M), out
    assert "config: this redoes nothing (no step that has run depends on it)" in out
    assert "this redoes align" not in out
    # now align has run: the same kind of change redoes it (and not the steps that have not run)
    words.write_text("[align]\nmin_words = 6\n")
    assert cli_main(["--runs-dir", str(runs), "run", "align", "--run", "r", "--config", str(words)]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("config: this redoes")]
    assert lines == ["config: this redoes align"]
