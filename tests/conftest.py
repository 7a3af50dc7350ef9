"""Shared fixtures. The ingested demo world costs one img2dataset call (~20 s), so it is made once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_ingested(tmp_path_factory):
    """A small demo world (n=1500) ingested through img2dataset from the loopback server, in-process.
    Returns (world dir, runs dir, run name); stages may be run on top of it under other run names by
    copying `runs/<run>/00_ingest` or reading it as input."""
    from pipeline.cli import main as cli_main
    from demo.world import make_world

    root = tmp_path_factory.mktemp("demo")
    world = root / "world"
    make_world(world, n=1500, seed=0)
    runs = root / "runs"
    code = cli_main(["--runs-dir", str(runs), "ingest", str(world / "urls.parquet"), "--run", "demo",
                     "--config", str(world / "config.toml"), "--workers", "0"])
    assert code == 0
    return world, runs, "demo"


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """One two-worker Dask LocalCluster for the session (starting one costs ~10 s on 2 cores); runs reach it
    through the runner's `scheduler` address, as on a real cluster. Its workers preload tests/fault_hooks.py
    (faults switched on per test by a control file, see there), and are replaced by their nannies when a
    test kills one. allowed-failures = 1: a task survives one death of its worker, not two (default 3)."""
    import logging
    import os

    import dask
    from distributed import Client, LocalCluster

    from tests import fault_hooks

    folder = tmp_path_factory.mktemp("faults")
    os.environ[fault_hooks.ENV] = str(folder)  # inherited by the workers and by drivers started as subprocesses
    # worker-saturation 1.0: a worker holds only the task it runs, so a kill hits that task alone
    with dask.config.set({"distributed.scheduler.allowed-failures": 1, "distributed.worker.daemon": False,
                          "distributed.scheduler.worker-saturation": 1.0}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.CRITICAL, preload=["tests.fault_hooks"])
    client = Client(cluster)
    client.faults_dir = folder
    try:
        yield client
    finally:
        client.close()
        cluster.close()
        os.environ.pop(fault_hooks.ENV, None)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline. huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when the loader runs,
    not only at import, so setting them here is enough whatever imported it first; CLIPCURATE_CACHE too, so no
    test touches the user's caches."""
    home = tmp_path / "hf"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CLIPCURATE_CACHE", str(tmp_path / "cc"))
    return home


@pytest.fixture(scope="session")
def network(tmp_path_factory):
    """A clipcurate-tiny checkpoint with random weights: its vectors are arbitrary but deterministic (the embed,
    dfn, semdedup and heads tests' network)."""
    torch = pytest.importorskip("torch")
    from trainer import models

    torch.manual_seed(7)
    model, _, _, _ = models.create("clipcurate-tiny")
    path = tmp_path_factory.mktemp("net") / "model.pt"
    torch.save({"model_name": "clipcurate-tiny", "state_dict": model.state_dict(), "step": 0}, path)
    return str(path)
