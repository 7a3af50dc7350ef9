"""The command line as a new user meets it: --config overlays a run's saved config, and every mistake a user
makes is one line that says what to do, exit 2, no traceback (issue: "A new user's first hour")."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import config as config_mod
from pipeline import executors, runner
from pipeline.cli import build_parser
from pipeline.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "clipcurate")  # the console script, as a user runs it


def _one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]


def _text_pool(folder: Path, shards: int = 2) -> Path:
    """Captions over two concepts: 2-word captions (kept only with min_words <= 2), and enough `dog` rows that
    metaclip's t = 30 and t = 50 keep different rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(240):
        animal = "dog" if i % 3 else "cat"
        text = f"{animal} {i}" if i % 4 == 0 else f"a {animal} number {i} sits"
        rows.append({"url": f"http://example.com/{i}.jpg", "text": text})
    for k in range(shards):
        part = rows[k::shards]
        pq.write_table(pa.Table.from_pylist(part), folder / f"part-{k:05d}.parquet")
    return folder


def _entries(tmp_path: Path) -> Path:
    p = tmp_path / "entries.txt"
    p.write_text("dog\ncat\nnumber\n")
    return p


def _kept(run_dir: Path, stage_dir: str) -> list[str]:
    out = []
    for f in sorted((run_dir / stage_dir).glob("part-*.parquet")):
        out += pq.read_table(f, columns=["uid"]).column("uid").to_pylist()
    return sorted(out)


# ---- 1. --config overlays the run's saved config -------------------------------------------------------
def test_config_file_overlays_the_saved_config_and_redoes_only_downstream_stages(tmp_path, capsys):
    pool = _text_pool(tmp_path / "pool")
    runs = tmp_path / "runs"
    run_dir = runs / "ov"
    full = tmp_path / "full.toml"
    full.write_text(f'[align]\nmin_words = 2\nmax_texts_per_image = 20\n\n'
                    f'[metaclip]\nentries = "{_entries(tmp_path)}"\nt = 30\n\n[emit]\nsamples_per_shard = 50\n')
    base = ["--runs-dir", str(runs), "run", "align,metaclip", "--run", "ov", "--input", str(pool), "--workers", "0"]
    assert cli_main(base + ["--config", str(full)]) == 0
    before_cfg = config_mod.saved_config(run_dir)
    align_before, meta_before = _kept(run_dir, "01_align"), _kept(run_dir, "02_metaclip")
    align_done = json.loads((run_dir / "01_align" / "_done" / "part-00000.parquet.json").read_text())
    capsys.readouterr()

    t50 = tmp_path / "t50.toml"
    t50.write_text("[metaclip]\nt = 50\n")
    assert cli_main(base + ["--config", str(t50)]) == 0
    out = capsys.readouterr().out
    assert "config: metaclip.t: 30 -> 50" in out
    assert "config: this redoes metaclip" in out and "align" not in out.split("this redoes")[1].splitlines()[0]

    after_cfg = config_mod.saved_config(run_dir)
    assert after_cfg["metaclip"]["t"] == 50
    diff = config_mod.changes(before_cfg, after_cfg)
    assert diff == [("metaclip", "t", 30, 50)]  # every other key keeps its saved value
    assert after_cfg["align"]["min_words"] == 2 and after_cfg["emit"]["samples_per_shard"] == 50
    # upstream of the change: same rows, and not even redone (same fingerprint on its done-markers)
    assert _kept(run_dir, "01_align") == align_before
    assert json.loads((run_dir / "01_align" / "_done" / "part-00000.parquet.json").read_text()) == align_done
    # the changed stage: redone with the new t
    assert _kept(run_dir, "02_metaclip") != meta_before and len(_kept(run_dir, "02_metaclip")) > len(meta_before)

    # [run] stats_shards_per_partition changes how align's statistics are cut, not what it keeps
    parts = tmp_path / "parts.toml"
    parts.write_text("[run]\nstats_shards_per_partition = 3\n")
    assert cli_main(base + ["--config", str(parts)]) == 0
    out = capsys.readouterr().out
    assert "only speed settings changed: this redoes nothing" in out and "this redoes align" not in out
    assert _kept(run_dir, "01_align") == align_before
    # a new recipe: said as such, not as "redoes every stage"
    rec = tmp_path / "recipe.toml"
    rec.write_text('[run]\nstages = ["ingest", "align", "metaclip", "klite", "emit"]\n')
    assert cli_main(base + ["--config", str(rec)]) == 0
    out = capsys.readouterr().out
    assert "the recipe changed" in out and "this redoes" not in out

    # starting afresh from the defaults is explicit
    assert cli_main(base + ["--config", str(t50), "--fresh-config"]) == 0
    fresh = config_mod.saved_config(run_dir)
    assert fresh["align"]["min_words"] == 3 and fresh["metaclip"]["t"] == 50
    assert _kept(run_dir, "01_align") != align_before


def test_overlay_and_changes_units():
    base = {"align": {"min_words": 2, "max_words": 20}, "metaclip": {"t": 30}}
    over = {"metaclip": {"t": 50}, "dfn": {"keep_fraction": 0.5}}
    merged = config_mod.overlay(base, over)
    assert merged == {"align": {"min_words": 2, "max_words": 20}, "metaclip": {"t": 50}, "dfn": {"keep_fraction": 0.5}}
    assert base["metaclip"]["t"] == 30  # not modified in place
    assert config_mod.changes({"a": {"x": 1, "y": 2}}, {"a": {"x": 1, "y": 3}, "b": {"z": 1}}) == [
        ("a", "y", 2, 3), ("b", "z", None, 1)]
    stages = ["ingest", "align", "metaclip", "klite", "dfn", "emit"]
    assert config_mod.redone_by({"metaclip"}, stages) == ["metaclip", "klite", "dfn", "emit"]
    assert config_mod.redone_by({"run"}, stages) == stages
    assert config_mod.redone_by({"train"}, stages) == []


# ---- 2. a user's own stage, module:Class, found from the current folder -------------------------------------
def test_module_class_stage_needs_no_pythonpath(tmp_path):
    pool = _text_pool(tmp_path / "pool", shards=1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([CLI, "--runs-dir", str(tmp_path / "runs"), "run", "tests.stages_for_tests:FirstWordStage",
                        "--run", "x", "--input", str(pool), "--workers", "0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "No module named" not in r.stderr


# ---- 3, 6, 7, 11, 13: one-line errors that say what to do --------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["run", "align", "--run", "x", "--workers", "-1"], "give 0 (in-process) or a positive number of workers"),
    (["run", "align", "--run", "x", "--workers", "two"], "'two' is not a number"),
    (["demo-world", "OUT", "--n", "50"], "give at least 200"),
    (["run", "ingest", "--run", "x"], "use `clipcurate ingest URLS --run NAME`"),
    (["run", "alig", "--run", "x"], "stages: align, metaclip, klite, embed, dfn, semdedup, heads, emit; or your own as module:Class"),
    (["run", "align", "--run", "x"], "ingest a URL list first"),
    (["run", "align", "--run", "x", "--fresh-config"], "--fresh-config needs --config FILE"),
    (["run", "align", "--run", "x", "--bogus"], "unrecognized arguments: --bogus (see clipcurate run --help)"),
])
def test_usage_mistakes_are_one_line(tmp_path, capsys, argv, needle):
    argv = [a.replace("OUT", str(tmp_path / "w")) for a in argv]
    try:
        code = cli_main(["--runs-dir", str(tmp_path / "runs")] + argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    _one_line_error(code, err, needle)
    if "alig" in argv:  # 11: the first stage downloads; it is not among the stages `run` takes
        assert "ingest" not in err
    assert not (tmp_path / "runs" / "x").exists()  # 15: a failed command leaves no run folder behind


@pytest.mark.parametrize("text, needle", [
    ("[align]\nmin_words = -5\n", "config [align] min_words = -5: must be at least 0"),
    ("[metaclip]\nt = 0\n", "config [metaclip] t = 0: must be at least 1"),
    ("[metaclip]\ntail_share = 1.0\n", "config [metaclip] tail_share = 1.0: must be at least 0 and below 1"),
    ("[align]\ndecode_threads = -2\n", "config [align] decode_threads = -2: must be at least 0"),
    ("[dfn]\nkeep_fraction = 1.5\n", "config [dfn] keep_fraction = 1.5: must be between 0 and 1"),
    ("[emit]\nsamples_per_shard = 0\n", "config [emit] samples_per_shard = 0: must be at least 1"),
    ("[train]\nbatch_size = 0\n", "config [train] batch_size = 0: must be at least 1"),
])
def test_out_of_range_config_values_are_one_line(tmp_path, capsys, text, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    pool = _text_pool(tmp_path / "pool", shards=1)
    code = cli_main(["--runs-dir", str(tmp_path / "runs"), "run", "align", "--run", "x", "--input", str(pool),
                     "--config", str(cfg), "--workers", "0"])
    _one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "runs" / "x").exists()


def test_single_parquet_file_as_input(tmp_path, capsys):
    pool = _text_pool(tmp_path / "pool", shards=1)
    one = pool / "part-00000.parquet"
    assert cli_main(["--runs-dir", str(tmp_path / "runs"), "run", "tests.stages_for_tests:FirstWordStage",
                     "--run", "x", "--input", str(one), "--workers", "0"]) == 0
    assert (tmp_path / "runs" / "x" / "90_firstword" / "part-00000.parquet").exists()
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    code = cli_main(["--runs-dir", str(tmp_path / "runs"), "run", "align", "--run", "y", "--input", str(txt),
                     "--workers", "0"])
    _one_line_error(code, capsys.readouterr().err, "is a file but not a .parquet shard")


# ---- 8: URL lists ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, body, needle", [
    ("more.csv", "url,caption\nhttp://a/1.jpg,a dog\nhttp://a/2.jpg,a cat,with a comma\n",
     "line 3 has 3 fields where the header has 2 (quote captions that hold a comma, or write a TSV)"),
    ("nohdr.tsv", "http://a/1.jpg\ta dog\nhttp://a/2.jpg\ta cat\n",
     "its first line looks like data, not a header: add a header line naming the columns (url, caption)"),
    ("upper.csv", "URL,TEXT\nhttp://a/1.jpg,a dog\n", '[ingest] url_col = "URL"'),
    ("upper2.csv", "URL,TEXT\nhttp://a/1.jpg,a dog\n", '[ingest] caption_col = "TEXT"'),
    ("tabs.csv", "url\tcaption\nhttp://a/1.jpg\ta dog\n", "not split on the separator its extension says"),
])
def test_url_list_errors_say_where_and_what_to_do(tmp_path, capsys, name, body, needle):
    path = tmp_path / name
    path.write_text(body)
    code = cli_main(["--runs-dir", str(tmp_path / "runs"), "ingest", str(path), "--run", "r", "--workers", "0"])
    _one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "runs" / "r").exists()


def test_ingest_where_every_download_failed_is_an_error(tmp_path, capsys):
    urls = tmp_path / "urls.csv"
    # port 9 on loopback: nothing listens, every download fails at once (no traffic leaves the machine)
    urls.write_text("url,caption\n" + "".join(f"http://127.0.0.1:9/{i}.jpg,a picture {i}\n" for i in range(5)))
    cfg = tmp_path / "c.toml"
    cfg.write_text('[ingest]\nprocesses = 1\nthreads = 2\ntimeout = 2\nallow_private_hosts = ["127.0.0.1:9"]\n')
    code = cli_main(["--runs-dir", str(tmp_path / "runs"), "ingest", str(urls), "--run", "r", "--config", str(cfg),
                     "--workers", "0"])
    captured = capsys.readouterr()
    assert code == 2
    assert "ingest: no URL downloaded (5 rows rejected" in captured.err and "Traceback" not in captured.err
    rejected = pq.read_table(next((tmp_path / "runs" / "r" / "00_ingest" / "rejected").glob("*.parquet")))
    assert rejected.num_rows == 5  # the rows are kept, with their reasons


# ---- 4, 10, 14: where the output is, what a single stage skips, reruns with nothing to do ------------------
def _fake_ingest(run_dir: Path) -> None:
    stage = run_dir / "00_ingest"
    stage.mkdir(parents=True)
    table = pa.table({"uid": [f"{i:032x}" for i in range(6)], "url": [f"http://x/{i}" for i in range(6)],
                      "text": [f"a red dog number {i}" for i in range(6)]})
    pq.write_table(table, stage / "part-00000.parquet")
    (stage / "_manifest.json").write_text(json.dumps({"stage": "ingest", "fingerprint": "x"}))


def test_single_stage_run_warns_of_skipped_stages_and_says_where_the_training_set_is(tmp_path, capsys, caplog):
    runs = tmp_path / "runs"
    _fake_ingest(runs / "r")
    with caplog.at_level("INFO", logger="clipcurate"):
        assert cli_main(["--runs-dir", str(runs), "run", "emit", "--run", "r", "--workers", "0"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("emit reads" in w and "align, metaclip, klite, dfn did not run in this run" in w for w in warnings)
    out = capsys.readouterr().out
    emit = runs / "r" / "emit"
    assert "training set: 6 samples in 1 shards" in out
    assert f"{emit / 'wds'}/" in out and f"{emit / 'parquet'}/" in out and str(emit / "uids.npy") in out


def test_rerun_with_nothing_to_do_starts_no_cluster(tmp_path, caplog, monkeypatch):
    runs = tmp_path / "runs"
    pool = _text_pool(tmp_path / "pool")
    argv = ["--runs-dir", str(runs), "run", "align", "--run", "r", "--input", str(pool)]
    assert cli_main(argv + ["--workers", "0"]) == 0

    class NoCluster:
        def __init__(self, *a, **k):
            raise AssertionError("a cluster was started for a run with nothing to do")

    monkeypatch.setattr(executors, "DaskExecutor", NoCluster)
    caplog.clear()
    with caplog.at_level("INFO", logger="clipcurate"):
        assert cli_main(argv + ["--workers", "2"]) == 0
    assert "align: 2 shards up to date, skipped" in caplog.text


def test_global_options_before_or_after_the_command(tmp_path):
    pool = _text_pool(tmp_path / "pool", shards=1)
    assert cli_main(["run", "tests.stages_for_tests:FirstWordStage", "--run", "x", "--input", str(pool),
                     "--workers", "0", "--runs-dir", str(tmp_path / "after")]) == 0
    assert (tmp_path / "after" / "x" / "config.toml").exists()
    args = build_parser().parse_args(["--runs-dir", "A", "report", "--run", "x"])
    assert args.runs_dir == "A"  # not overwritten by the subcommand's default


# ---- 5: demo-world says how to use its config ------------------------------------------------------------
def test_demo_world_prints_the_command_that_uses_its_config(tmp_path, capsys):
    assert cli_main(["demo-world", str(tmp_path / "w"), "--n", "200"]) == 0
    out = capsys.readouterr().out
    assert f"--config {tmp_path / 'w' / 'config.toml'}" in out


# ---- 9: Ctrl-C with Dask workers -------------------------------------------------------------------------
def test_ctrl_c_with_dask_workers_is_one_line(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for k in range(6):
        texts = [f"caption number {i} of shard {k} with some words" for i in range(40000)]
        pq.write_table(pa.table({"url": [f"http://x/{k}/{i}" for i in range(40000)], "text": texts}),
                       pool / f"part-{k:05d}.parquet")
    cmd = [CLI, "--runs-dir", str(tmp_path / "runs"), "run", "align", "--run", "c", "--input", str(pool),
           "--workers", "2"]
    # a terminal's Ctrl-C: SIGINT to the whole process group (a background shell would have it ignored)
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 90
    started = tmp_path / "runs" / "c" / "01_align" / "_shuffle"
    while not started.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # the workers are inside align's collect
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "clipcurate: interrupted; rerun the same command to resume"
    assert len([ln for ln in err.splitlines() if "INFO" not in ln]) == 1, err


# ---- 16: help and README agree ---------------------------------------------------------------------------
def _readme_commands() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    out: dict[str, str] = {}
    for line in block.splitlines():
        m = re.match(r"clipcurate ((?:metadata )?[a-z-]+)(.*)", line.strip())
        if m:
            out[m.group(1)] = out.get(m.group(1), "") + m.group(2)
    return out


def _parser_commands() -> dict[str, argparse.ArgumentParser]:
    from pipeline.cli import _subparsers

    out = {}
    for name, p in _subparsers(build_parser()):
        if p.prog.endswith(" metadata"):
            continue  # a group: its commands are `metadata wordnet`, `metadata mine`
        out[p.prog.removeprefix("clipcurate ")] = p
    return out


def test_help_and_readme_name_the_same_commands_and_options():
    readme, parsers = _readme_commands(), _parser_commands()
    assert set(readme) == set(parsers)
    top = build_parser().format_help()
    for name in parsers:
        assert name.split()[0] in top
    for name, p in parsers.items():
        options = {o for a in p._actions for o in a.option_strings if o.startswith("--")}
        options -= {"--help", "--runs-dir", "--verbose"}  # global, documented once below the list
        missing = [o for o in options if not re.search(re.escape(o) + r"\b", readme[name])]
        assert not missing, f"README's `clipcurate {name}` line lacks {missing}"
        documented = set(re.findall(r"--[a-z][a-z-]*", readme[name]))
        assert documented <= options, f"README's `clipcurate {name}` names options it has not: {documented - options}"
        for a in p._actions:  # every argument has help text
            if a.option_strings != ["-h", "--help"] and not isinstance(a, argparse._SubParsersAction):
                assert a.help, f"clipcurate {name}: {a.dest} has no help"


def test_a_run_started_with_input_remembers_it(tmp_path, caplog):
    """`run align --input POOL` then `run align,metaclip` with no --input: align reads the pool it was started
    on (source.json), is up to date, and metaclip reads align; a run with neither ingest nor a source still
    says to ingest or give --input."""
    runs = tmp_path / "runs"
    pool = _text_pool(tmp_path / "pool")
    base = ["--runs-dir", str(runs)]
    assert cli_main(base + ["run", "align", "--run", "r", "--input", str(pool), "--workers", "0"]) == 0
    assert json.loads((runs / "r" / "source.json").read_text()) == {"input": str(pool.resolve())}
    caplog.clear()
    with caplog.at_level("INFO", logger="clipcurate"):
        assert cli_main(base + ["run", "align,metaclip", "--run", "r", "--workers", "0",
                                "--config", str(_metaclip_config(tmp_path))]) == 0
    assert f"align reads {pool.resolve()}, the pool this run was started on" in caplog.text
    assert "align: 2 shards up to date, skipped" in caplog.text
    assert _kept(runs / "r", "02_metaclip")
    with pytest.raises(Exception, match="ingest a URL list first"):
        runner.run_pipeline(["align"], str(runs / "fresh"), config_mod.resolve({}))


def _metaclip_config(tmp_path: Path) -> Path:
    p = tmp_path / "mc.toml"
    p.write_text(f'[metaclip]\nentries = "{_entries(tmp_path)}"\nt = 30\n')
    return p


def test_local_worker_drops_only_the_lost_heartbeat_message():
    import logging

    from pipeline.worker_init import _drop_lost_heartbeat

    def record(msg):
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg, None, None)

    assert not _drop_lost_heartbeat(record("Failed to communicate with scheduler during heartbeat."))
    assert _drop_lost_heartbeat(record("Unexpected exception during heartbeat. Closing worker."))
    assert _drop_lost_heartbeat(record("Compute Failed"))
