"""The spine: schema checks, atomic writes, resume after SIGKILL, determinism, executors, config."""

from __future__ import annotations

import glob
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import config as config_mod
from pipeline import schema, shards
from pipeline.cli import main as cli_main
from pipeline.runner import run_pipeline
from pipeline.hashing import uniform
from pipeline.rules import first_reason, split_by_reason
from tests.stages_for_tests import FirstWordStage, make_pool

ROOT = Path(__file__).resolve().parents[1]
STAGE = "tests.stages_for_tests:FirstWordStage"
OUT = "90_firstword"


def _files(folder) -> dict[str, str]:
    out = {}
    for p in sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True)):
        out[os.path.relpath(p, folder)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def _uids(folder) -> list[str]:
    uids = []
    for p in sorted(glob.glob(os.path.join(folder, "part-*.parquet"))):
        uids += pq.read_table(p, columns=["uid"]).column("uid").to_pylist()
    return uids


def _reference_firstword(table: pa.Table, min_count=2, keep=0.5, seed=0) -> set[str]:
    """Straightforward reference: count first words pool-wide, keep rare-free rows with u < keep."""
    texts = table.column("text").to_pylist()
    uids = table.column("uid").to_pylist()
    counts: dict[str, int] = {}
    for t in texts:
        counts[t.split(" ")[0]] = counts.get(t.split(" ")[0], 0) + 1
    u = uniform(uids, seed, "firstword")
    return {uid for uid, t, x in zip(uids, texts, u) if counts[t.split(" ")[0]] >= min_count and x < keep}


# ---- schema -------------------------------------------------------------------------------------
def test_missing_column_is_one_line_naming_shard_and_column(tmp_path, capsys):
    shards.write_shard(pa.table({"uid": ["a" * 32], "caption": ["x"]}), str(tmp_path / "in" / "part-00007.parquet"))
    code = cli_main(["--runs-dir", str(tmp_path / "runs"), "run", STAGE, "--run", "r", "--input", str(tmp_path / "in"), "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "part-00007.parquet" in err and "'text'" in err and "Traceback" not in err


def test_mistyped_column_is_one_line_naming_it():
    t = pa.table({"uid": ["a" * 32], "text": [3]})
    with pytest.raises(schema.SchemaError) as e:
        schema.check_columns(t, {"uid": pa.string(), "text": pa.string()}, "part-1.parquet", "align")
    msg = str(e.value)
    assert "\n" not in msg and "'text'" in msg and "part-1.parquet" in msg and "int64" in msg


def test_compatible_types_are_cast_not_refused():
    t = pa.table({"text": pa.array(["a"], pa.large_string()), "width": pa.array([5], pa.int64())})
    out = schema.check_columns(t, {"text": pa.string(), "width": pa.int32()}, "s")
    assert out.schema.field("text").type == pa.string() and out.schema.field("width").type == pa.int32()


def test_corrupt_parquet_is_one_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    code = cli_main(["--runs-dir", str(tmp_path / "runs"), "run", STAGE, "--run", "r", "--input", str(tmp_path / "in"), "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "part-00000.parquet" in err


def test_uid_is_blake2b_of_url_newline_text_and_added_when_missing():
    uid = schema.compute_uid(["http://a/x.jpg"], ["a dog"]).to_pylist()[0]
    assert uid == hashlib.blake2b(b"http://a/x.jpg\na dog", digest_size=16).hexdigest()
    t = schema.ensure_uid(pa.table({"text": ["a dog"]}))
    assert t.column("uid").to_pylist()[0] == hashlib.blake2b(b"\na dog", digest_size=16).hexdigest()


# ---- randomness ---------------------------------------------------------------------------------
def test_uniform_is_pure_and_order_independent():
    uids = schema.compute_uid([f"u{i}" for i in range(5000)], ["t"] * 5000).to_pylist()
    a = uniform(uids, 0, "s")
    perm = np.random.default_rng(1).permutation(5000)
    b = uniform([uids[i] for i in perm], 0, "s")
    assert np.array_equal(a[perm], b)
    assert np.all((a >= 0) & (a < 1))
    assert abs(a.mean() - 0.5) < 0.02  # 5000 draws: sd of mean ~0.004
    assert not np.array_equal(a, uniform(uids, 1, "s")) and not np.array_equal(a, uniform(uids, 0, "t"))
    # a per-row integer salt (e.g. an entry id) equals the scalar salt row by row
    ids = np.arange(5000) % 7
    per_row = uniform(uids, 0, ids)
    for k in range(7):
        assert np.array_equal(per_row[ids == k], uniform([u for u, i in zip(uids, ids) if i == k], 0, k))


def test_first_reason_names_first_rule_in_order():
    r = first_reason(4, [("a", np.array([0, 1, 0, 1], bool)), ("b", np.array([0, 1, 1, 0], bool))])
    assert r.to_pylist() == [None, "a", "b", "a"]
    kept, rej = split_by_reason(pa.table({"x": [1, 2, 3, 4]}), r)
    assert kept.column("x").to_pylist() == [1] and rej.column("reason").to_pylist() == ["a", "b", "a"]


# ---- runner -------------------------------------------------------------------------------------
def test_runner_matches_reference_and_shard_split(tmp_path):
    make_pool(600, 1, tmp_path / "one")
    make_pool(600, 5, tmp_path / "five")
    cfg = config_mod.resolve({})
    run_pipeline([STAGE], str(tmp_path / "r1"), cfg, input_dir=str(tmp_path / "one"), workers=0)
    run_pipeline([STAGE], str(tmp_path / "r5"), cfg, input_dir=str(tmp_path / "five"), workers=0)
    pool = pq.read_table(str(tmp_path / "one" / "part-00000.parquet"))
    want = _reference_firstword(pool)
    assert set(_uids(tmp_path / "r1" / OUT)) == want == set(_uids(tmp_path / "r5" / OUT))
    m = shards.read_json(str(tmp_path / "r5" / OUT / "_manifest.json"))
    assert m["rows_in"] == 600 and m["rows_out"] == len(want)
    assert m["rows_out"] + sum(m["reasons"].values()) == 600
    assert len(m["shards"]) == 5


def test_two_runs_byte_identical_and_workers_0_vs_2(tmp_path):
    make_pool(1500, 4, tmp_path / "in")
    cfg = config_mod.resolve({})
    for name, w in (("a", 0), ("b", 0), ("c", 2)):
        run_pipeline([STAGE], str(tmp_path / name), cfg, input_dir=str(tmp_path / "in"), workers=w)
    a, b, c = (_files(tmp_path / n / OUT) for n in "abc")
    assert len(a) == 8  # 4 kept + 4 rejected shards
    assert a == b == c


def test_rerun_skips_done_shards_and_config_change_redoes(tmp_path):
    make_pool(400, 3, tmp_path / "in")
    run_dir = str(tmp_path / "r")
    run_pipeline([STAGE], run_dir, config_mod.resolve({}), input_dir=str(tmp_path / "in"), workers=0)
    part = Path(run_dir) / OUT / "part-00001.parquet"
    before = part.stat().st_mtime_ns
    time.sleep(0.01)
    run_pipeline([STAGE], run_dir, config_mod.resolve({}), input_dir=str(tmp_path / "in"), workers=0)
    assert part.stat().st_mtime_ns == before  # resumed: nothing redone
    # a changed stage config changes the fingerprint: shards redone with the new rule
    cfg = config_mod.resolve({})
    cfg[STAGE] = {"keep": 0.9}
    run_pipeline([STAGE], run_dir, cfg, input_dir=str(tmp_path / "in"), workers=0)
    assert part.stat().st_mtime_ns != before
    m = shards.read_json(str(Path(run_dir) / OUT / "_manifest.json"))
    assert m["config"]["keep"] == 0.9


def test_input_shard_removed_removes_its_stale_output(tmp_path):
    paths = make_pool(300, 3, tmp_path / "in")
    run_dir = str(tmp_path / "r")
    run_pipeline([STAGE], run_dir, config_mod.resolve({}), input_dir=str(tmp_path / "in"), workers=0)
    os.remove(paths[2])
    run_pipeline([STAGE], run_dir, config_mod.resolve({}), input_dir=str(tmp_path / "in"), workers=0)
    assert sorted(os.listdir(Path(run_dir) / OUT / "rejected")) == ["part-00000.parquet", "part-00001.parquet"]
    assert not (Path(run_dir) / OUT / "part-00002.parquet").exists()


def test_crash_in_merge_leaves_no_stale_stats(tmp_path, monkeypatch):
    make_pool(300, 3, tmp_path / "in")
    run_dir = str(tmp_path / "r")
    run_pipeline([STAGE], run_dir, config_mod.resolve({}), input_dir=str(tmp_path / "in"), workers=0)
    cfg = config_mod.resolve({})
    cfg[STAGE] = {"min_count": 3}

    def boom(self, partials):
        raise RuntimeError("merge died")

    monkeypatch.setattr(FirstWordStage, "merge", boom)
    with pytest.raises(RuntimeError):
        run_pipeline([STAGE], run_dir, cfg, input_dir=str(tmp_path / "in"), workers=0)
    assert not (Path(run_dir) / OUT / "_stats.json").exists()  # old stats no longer vouched for
    monkeypatch.undo()
    run_pipeline([STAGE], run_dir, cfg, input_dir=str(tmp_path / "in"), workers=0)
    pool = pa.concat_tables(pq.read_table(p) for p in sorted(glob.glob(str(tmp_path / "in" / "*.parquet"))))
    assert set(_uids(Path(run_dir) / OUT)) == _reference_firstword(pool, min_count=3)


def test_failed_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    target = tmp_path / "out" / "part-00000.parquet"
    real = pq.write_table

    def half_then_fail(table, where, **kw):
        where.write(b"PAR1 partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", half_then_fail)
    with pytest.raises(shards.ShardError, match="part-00000.parquet.*No space left"):
        shards.write_shard(pa.table({"x": [1]}), str(target))
    assert os.listdir(tmp_path / "out") == []  # neither the shard nor a temporary
    monkeypatch.setattr(pq, "write_table", real)
    shards.write_shard(pa.table({"x": [1]}), str(target))
    assert pq.read_table(target).num_rows == 1


def test_clean_temporaries_tolerates_a_temporary_renamed_away_under_it(tmp_path, monkeypatch):
    """A rerun started while a cancelled Dask task of the failed run is still finishing its write lists that
    task's `.tmp-*`, which is renamed into place before the rm: seen in make test as 'cannot write in the run
    folder ... No such file or directory'. The cleanup must skip it, and still remove the real orphans."""
    folder = tmp_path / "stage"
    folder.mkdir()
    for name in (".tmp-aaa-part-00000.parquet", ".tmp-bbb-part-00001.parquet", "part-00002.parquet"):
        (folder / name).write_bytes(b"x")
    fs, _ = shards.fs_and_path(str(folder))
    real_rm = type(fs).rm

    def rm_racing_a_rename(self, path, *a, **kw):
        if path.endswith(".tmp-aaa-part-00000.parquet"):
            os.rename(path, str(folder / "part-00000.parquet"))  # the straggler's rename wins the race
        return real_rm(self, path, *a, **kw)

    monkeypatch.setattr(type(fs), "rm", rm_racing_a_rename)
    assert shards.clean_temporaries(str(folder)) == 1
    assert sorted(os.listdir(folder)) == ["part-00000.parquet", "part-00002.parquet"]


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from pipeline import config
    from pipeline.runner import run_pipeline
    if __name__ == "__main__":
        cfg = config.resolve({{}})
        cfg[{stage!r}] = {{"sleep_per_shard": float(sys.argv[3])}}
        run_pipeline([{stage!r}], sys.argv[1], cfg, input_dir=sys.argv[2], workers=int(sys.argv[4]))
    """
)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_mid_stage_then_rerun_gives_same_rows(tmp_path, workers):
    make_pool(2000, 10, tmp_path / "in")
    script = tmp_path / "go.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), stage=STAGE))
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(script), str(ref), str(tmp_path / "in"), "0", "0"], check=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run), str(tmp_path / "in"), "0.4", str(workers)], start_new_session=True
    )
    done_dir = run / OUT / "_done"
    deadline = time.time() + 120
    while time.time() < deadline and (not done_dir.exists() or len(os.listdir(done_dir)) < 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Dask worker, mid-stage
    proc.wait()
    done_before = len(os.listdir(done_dir))
    assert 3 <= done_before < 10, "the kill must land in the middle of the stage"
    for p in glob.glob(str(run / OUT / "**" / "part-*.parquet"), recursive=True):
        pq.read_table(p)  # every visible shard is complete
    subprocess.run([sys.executable, str(script), str(run), str(tmp_path / "in"), "0", "0"], check=True)
    got = _uids(run / OUT)
    assert len(got) == len(set(got))  # none twice
    assert sorted(got) == sorted(_uids(ref / OUT))
    assert _files(run / OUT) == _files(ref / OUT)
    assert not glob.glob(str(run / OUT / "**" / ".tmp-*"), recursive=True)


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, needle",
    [
        ("[nosuch]\nx = 1\n", "unknown section [nosuch]"),
        ("[run]\nsede = 1\n", "unknown key 'sede'"),
        ("[run]\nseed = 'zero'\n", "expected int"),
        ("[run\nseed = 1\n", "not valid TOML"),
        ("[run]\nstats_shards_per_partition = 0\n", "must be at least 1"),
    ],
)
def test_config_errors_are_one_line(tmp_path, text, needle):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(p)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bundles_read_back_by_name_and_say_what_is_wrong_in_one_line(tmp_path):
    path = str(tmp_path / "b" / "x.bundle")
    shards.write_bundle({"part-00000.parquet": b"abc", "part-00001.parquet": b"", "p1": bytes(range(256)) * 9}, path)
    assert shards.read_bundle_item(path, "part-00000.parquet") == b"abc"
    assert shards.read_bundle_item(path, "part-00001.parquet") == b""
    assert shards.read_bundle_item(path, "p1") == bytes(range(256)) * 9
    (tmp_path / "not.bundle").write_bytes(b"PAR1 something else")
    for where, name, needle in [(path, "part-00002.parquet", "holds nothing for part-00002.parquet"),
                                (str(tmp_path / "not.bundle"), "p1", "not a statistics bundle"),
                                (str(tmp_path / "none.bundle"), "p1", "file not found")]:
        with pytest.raises(shards.ShardError) as e:
            shards.read_bundle_item(where, name)
        assert needle in str(e.value) and "\n" not in str(e.value)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-100])  # truncated
    with pytest.raises(shards.ShardError, match="truncated"):
        shards.read_bundle_item(path, "p1")


def test_resolved_config_saved_in_run_and_reused(tmp_path):
    make_pool(100, 1, tmp_path / "in")
    cfgfile = tmp_path / "c.toml"
    cfgfile.write_text("[run]\nseed = 7\n")
    runs = str(tmp_path / "runs")
    assert cli_main(["--runs-dir", runs, "run", STAGE, "--run", "x", "--input", str(tmp_path / "in"), "--config", str(cfgfile), "--workers", "0"]) == 0
    saved = config_mod.load(Path(runs) / "x" / "config.toml")
    assert saved["run"]["seed"] == 7
    assert config_mod.for_run(Path(runs) / "x", None)["run"]["seed"] == 7  # a plain rerun resumes as configured


@pytest.mark.parametrize("step", ["collect", "apply"])
def test_unforeseen_error_in_a_shard_is_one_line_naming_stage_and_shard(tmp_path, monkeypatch, capsys, step):
    make_pool(300, 3, tmp_path / "in")

    def boom(self, *a):
        raise KeyError("surprise")

    monkeypatch.setattr(FirstWordStage, step, boom)
    from pipeline.tasks import ShardFailed

    with pytest.raises(ShardFailed, match=rf"{STAGE} {step}: shard part-0000\d.parquet: KeyError: 'surprise'") as e:
        run_pipeline([STAGE], str(tmp_path / "r"), config_mod.resolve({}), input_dir=str(tmp_path / "in"), workers=0)
    assert "\n" not in str(e.value) and isinstance(e.value.__cause__, KeyError)  # the traceback stays chained


def test_worker_env_splits_cores_among_workers_and_keeps_a_users_setting(monkeypatch):
    from pipeline.executors import worker_env

    monkeypatch.delenv("POLARS_MAX_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert worker_env(2) == {"POLARS_MAX_THREADS": "4"}
    assert worker_env(3) == {"POLARS_MAX_THREADS": "2"}
    assert worker_env(16) == {"POLARS_MAX_THREADS": "1"}
    monkeypatch.setenv("POLARS_MAX_THREADS", "5")
    assert worker_env(2) == {"POLARS_MAX_THREADS": "5"}


def test_local_cluster_workers_get_their_share_of_polars_threads(monkeypatch):
    """Each worker process imports polars with cores // workers threads (not all cores each)."""
    from pipeline.executors import DaskExecutor

    monkeypatch.delenv("POLARS_MAX_THREADS", raising=False)

    def pool_size():
        import polars

        return polars.thread_pool_size()

    ex = DaskExecutor(workers=2)
    try:
        sizes = list(ex.client.run(pool_size).values())
    finally:
        ex.close()
    assert sizes == [max(1, (os.cpu_count() or 1) // 2)] * 2


def test_symlinked_shards_are_listed_and_hidden_ones_are_not(tmp_path):
    """A pool assembled from links to shards elsewhere is a pool (fsspec calls a link's type "other")."""
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"x": [1]}), src / "part-00001.parquet")
    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(pa.table({"x": [0]}), pool / "part-00000.parquet")
    os.symlink(src / "part-00001.parquet", pool / "part-00001.parquet")
    os.symlink(src / "part-00001.parquet", pool / "_part-00002.parquet")
    os.symlink(src / "missing.parquet", pool / "part-00003.parquet")  # dangling: not a shard
    assert [os.path.basename(p) for p in shards.list_shards(str(pool))] == ["part-00000.parquet", "part-00001.parquet"]


def _nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_dask_collect_values_waits_instead_of_spinning(monkeypatch):
    """The driver waits for each shard's partial; it must not spin (on 2 cores a spinning driver takes a worker's
    core). One wait per completion at most."""
    import distributed
    from distributed import LocalCluster

    from pipeline.executors import DaskExecutor

    calls = []
    real_wait = distributed.wait

    def counting_wait(*a, **k):
        calls.append(1)
        return real_wait(*a, **k)

    monkeypatch.setattr(distributed, "wait", counting_wait)
    with LocalCluster(n_workers=1, threads_per_worker=3, processes=False, dashboard_address=None) as cluster:
        ex = DaskExecutor(scheduler=cluster.scheduler_address)
        try:
            futures = ex.collect_values(_nap, [0.01, 0.6, 1.2], "nap")  # one item per task
            assert [f.result() for f in futures] == [0.01, 0.6, 1.2]  # in the items' order
        finally:
            ex.close()
    assert 1 <= len(calls) <= 3


def test_a_file_the_run_wrote_is_identified_without_reading_it(tmp_path, monkeypatch):
    """Ingest's input is the run's own download (the image store): its fingerprint must not read the bytes
    (a content digest of a 3 TB store). A file from outside the run (--input, a crawl) is digested."""
    from pipeline import resume, shards

    run = tmp_path / "runs" / "r"
    inside = run / "00_ingest" / "_img2dataset" / "00000.parquet"
    outside = tmp_path / "crawl" / "00000.parquet"
    for p in (inside, outside):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"jpeg bytes")
    read = []
    monkeypatch.setattr(shards.DigestCache, "digest", lambda self, path, info=None: read.append(path) or "d")
    ident = resume.input_identity(str(inside), None, shards.DigestCache(None), str(run))
    assert read == [] and ident["size"] == 10 and "mtime" in ident
    assert resume.input_identity(str(outside), None, shards.DigestCache(None), str(run))["sha256"] == "d"
    assert read == [str(outside)]
