"""`clipcurate optout-recheck` (issue 32, item 3): after the crawl a host changes its robots.txt (or publishes a
tdmrep.json); the recheck fetches today's files afresh and lists exactly the emitted uids they now exclude, as a
DataComp-style uid list, with the day's evidence beside it. Loopback only."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.cli import main as cli_main
from tests.test_optout import UA, Host

ALLOW_ALL = (200, b"User-agent: *\nAllow: /\n")


def test_recheck_lists_exactly_the_newly_excluded_uids(tmp_path, capsys):
    a = Host({"/robots.txt": ALLOW_ALL})
    b = Host({"/robots.txt": ALLOW_ALL})
    with a, b:
        rows = [(f"{h.url}/img/{i}.png", f"host {n} image {i}") for h, n in ((a, "a"), (b, "b")) for i in range(4)]
        pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), tmp_path / "u.parquet")
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[ingest]\nprocesses = 1\nthreads = 2\ntimeout = 30\nuser_agent = "{UA}"\n'
                       f'allow_private_hosts = ["127.0.0.1:{a.port}", "127.0.0.1:{b.port}"]\n')
        base = ["--runs-dir", str(tmp_path / "runs")]
        assert cli_main(base + ["ingest", str(tmp_path / "u.parquet"), "--run", "r", "--config", str(cfg),
                                "--workers", "0"]) == 0
        assert cli_main(base + ["run", "emit", "--run", "r", "--workers", "0"]) == 0
        # after the crawl: a disallows two of its images for us, b reserves one path by TDMRep
        a.files["/robots.txt"] = (200, b"User-agent: clipcurate-test\nDisallow: /img/1.png\nDisallow: /img/3\n")
        b.files["/.well-known/tdmrep.json"] = (200, b'[{"location": "/img/2.png", "tdm-reservation": 1}]')
        fetched_before = a.paths["/robots.txt"]
        capsys.readouterr()
        assert cli_main(base + ["optout-recheck", "--run", "r"]) == 0
        out = capsys.readouterr().out
    assert a.paths["/robots.txt"] == fetched_before + 1  # fetched afresh, not the run's recorded file
    assert not any(p.startswith("/img/") and n > 1 for p, n in a.paths.items())  # no image fetched again
    uid = dict((c, schema.compute_uid(pa.array([u]), pa.array([c]))[0].as_py()) for u, c in rows)
    want = {uid["host a image 1"], uid["host a image 3"], uid["host b image 2"]}
    day = next((tmp_path / "runs" / "r" / "optout-recheck").iterdir())
    got = np.load(day / "drop_uids.npy")
    assert np.array_equal(got, schema.uid_list(sorted(want)))
    dropped = pl.read_parquet(day / "dropped.parquet")
    assert dict(zip(dropped["uid"], dropped["reason"])) == {
        uid["host a image 1"]: "robots_disallowed", uid["host a image 3"]: "robots_disallowed",
        uid["host b image 2"]: "tdm_reserved"}
    assert (day / "hosts.parquet").exists()
    assert "8 emitted rows on 2 hosts, policies fetched today: 3 now excluded (2 robots_disallowed, 1 tdm_reserved)" \
        in out


def test_recheck_before_emit_is_one_line(tmp_path, capsys):
    (tmp_path / "runs" / "e").mkdir(parents=True)
    (tmp_path / "runs" / "e" / "config.toml").write_text("[run]\nseed = 0\n")
    assert cli_main(["--runs-dir", str(tmp_path / "runs"), "optout-recheck", "--run", "e"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "clipcurate: error: optout-recheck: run e has emitted nothing yet (no 05_emit shards): run emit first"
