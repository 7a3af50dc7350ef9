"""`--workers` not given: in-process below a measured pool size (pipeline/executors.py `default_workers`,
bench/results/workers_default.json); an explicit `--workers N` is honoured; and a LocalCluster whose workers
imported spaCy closes without Dask's "Worker process still alive after 4.0 seconds, killing"
(pipeline/worker_init.py)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

from pipeline.executors import IN_PROCESS_BELOW, LazyExecutor, default_workers
from pipeline.rules import split_by_reason
from pipeline.stage import Stage
from tests.stages_for_tests import make_pool

ROOT = Path(__file__).resolve().parents[1]


def test_default_is_in_process_below_the_measured_pool_size():
    assert default_workers(0, cores=2) == 0
    assert default_workers(326, cores=2) == 0  # the pool: 2 workers were 2.7x slower than in-process
    assert default_workers(IN_PROCESS_BELOW - 1, cores=8) == 0
    assert default_workers(IN_PROCESS_BELOW, cores=8) == 8
    assert default_workers(None, cores=3) == 3  # size unknown: one worker per core, as before


def test_the_first_steps_pool_decides_unless_workers_are_given(tmp_path):
    small = make_pool(300, 3, tmp_path / "small")
    big = make_pool(IN_PROCESS_BELOW + 10, 2, tmp_path / "big")
    ex = LazyExecutor(None)
    ex.size_hint(small)
    assert ex.args == (0, None) and ex.name == "in-process"
    ex.size_hint(big)  # decided once, by the first step's pool (the largest: steps only remove rows)
    assert ex.args == (0, None)
    ex = LazyExecutor(None)
    ex.size_hint(big)
    assert ex.args[0] == (os.cpu_count() or 1) and ex.name.startswith("dask LocalCluster")
    for workers in (1, 2):  # an explicit --workers N is honoured, whatever the pool
        ex = LazyExecutor(workers)
        ex.size_hint(small)
        assert ex.args == (workers, None) and ex.name == f"dask LocalCluster ({workers} workers)"
    ex = LazyExecutor(None, "tcp://127.0.0.1:1")
    ex.size_hint(small)
    assert ex.args == (None, "tcp://127.0.0.1:1")
    assert all(ex.inner is None for ex in [ex])  # nothing started by deciding


class SpacyStage(Stage):
    """Keeps every row, after importing spaCy in the worker (as klite does): a worker holding spaCy took ~4 s to
    tear its interpreter down on a loaded 2-core machine, past the nanny's 4 s."""

    name = "spacyimport"

    @dataclasses.dataclass
    class Config:
        pass

    def apply(self, table: pa.Table, stats, ctx=None):
        import spacy  # noqa: F401
        import torch  # noqa: F401

        return split_by_reason(table, pa.nulls(table.num_rows, pa.string()))


def _run(tmp_path: Path, pool: Path, run: str, *workers: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--runs-dir", str(tmp_path / "runs"), "run",
         "tests.test_workers_default:SpacyStage", "--run", run, "--input", str(pool), *workers],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_workers_close_without_the_nanny_warning_and_no_flag_runs_in_process(tmp_path):
    pool = tmp_path / "pool"
    make_pool(200, 2, pool)
    r = _run(tmp_path, pool, "two", "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dask LocalCluster (2 workers)" in r.stderr  # --workers 2 is honoured on a small pool
    assert "still alive" not in r.stderr and "killing" not in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    r = _run(tmp_path, pool, "default")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"200 rows: in-process (a pool under {IN_PROCESS_BELOW} rows" in r.stderr
    assert "LocalCluster" not in r.stderr


def test_a_closed_cluster_leaves_the_drivers_environment_as_it_was(monkeypatch):
    """Dask puts its nanny settings (MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS) in the driver's os.environ; a
    process the command starts after the cluster closed must not inherit them (bench_embed's bare loop ran ~40%
    slower per CPU second with them)."""
    from pipeline.executors import DaskExecutor

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    before = dict(os.environ)
    ex = DaskExecutor(1)
    try:
        during = dict(os.environ)
    finally:
        ex.close()
    assert during != before  # Dask did set its nanny environment here (else this test checks nothing)
    assert dict(os.environ) == before
