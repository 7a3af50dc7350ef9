"""Shared fixtures. The ingested demo world costs one img2dataset call (~20 s), so it is made once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_ingested(tmp_path_factory):
    """A small demo world (n=1500) ingested through img2dataset from the loopback server, in-process.
    Returns (world dir, runs dir, run name); stages may be run on top of it under other run names by
    copying `runs/<run>/00_ingest` or reading it as input."""
    from pipeline.cli import main as cli_main
    from pipeline.demo_world import make_world

    root = tmp_path_factory.mktemp("demo")
    world = root / "world"
    make_world(world, n=1500, seed=0)
    runs = root / "runs"
    code = cli_main(["--runs-dir", str(runs), "ingest", str(world / "urls.parquet"), "--run", "demo",
                     "--config", str(world / "config.toml"), "--workers", "0"])
    assert code == 0
    return world, runs, "demo"
