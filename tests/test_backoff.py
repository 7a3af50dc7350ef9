"""Politeness (issue 32, item 4, the backoff part): a host that answers 429 or 503 is asked again after its
Retry-After (else 1, 2, 4 ... s), up to `[ingest] backoff_tries` times; the row is kept when a retry succeeds,
after the wait. Loopback only."""

from __future__ import annotations

import email.utils
import time

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli import main as cli_main
from stages.ingest.guard import retry_after_seconds
from tests.test_optout import UA, Host, _png


def test_retry_after_seconds_hand_cases():
    assert retry_after_seconds("3", 0, 60) == 3.0
    assert retry_after_seconds("120", 0, 60) == 60.0  # capped
    assert retry_after_seconds(None, 0, 60) == 1.0 and retry_after_seconds(None, 2, 60) == 4.0  # 1, 2, 4 ...
    assert retry_after_seconds("soon", 1, 60) == 2.0  # unreadable: backoff
    later = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.0 <= retry_after_seconds(later, 0, 60) <= 5.0  # an HTTP date
    assert retry_after_seconds(email.utils.formatdate(time.time() - 50, usegmt=True), 0, 60) == 0.0


def test_503_with_retry_after_then_200_is_kept_after_the_wait(tmp_path):
    seen: dict[str, list[float]] = {}

    def busy(path: str):
        times = seen.setdefault(path, [])
        times.append(time.monotonic())
        if path.startswith("/busy") and len(times) == 1:
            return 503, {"Retry-After": "1"}, b"busy"
        if path.startswith("/flood"):
            return 429, {"Retry-After": "0"}, b"slow down"
        return 200, {"Content-Type": "image/png"}, _png(len(path))

    host = Host({p: busy for p in ("/busy.png", "/flood.png", "/fine.png")})
    with host:
        urls = [f"{host.url}{p}" for p in ("/busy.png", "/flood.png", "/fine.png")]
        pq.write_table(pa.table({"url": urls, "caption": ["busy", "flood", "fine"]}), tmp_path / "u.parquet")
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[ingest]\nprocesses = 1\nthreads = 2\ntimeout = 30\nuser_agent = "{UA}"\nbackoff_tries = 2\n'
                       f'allow_private_hosts = ["127.0.0.1:{host.port}"]\n')
        assert cli_main(["--runs-dir", str(tmp_path / "runs"), "ingest", str(tmp_path / "u.parquet"), "--run", "r",
                         "--config", str(cfg), "--workers", "0"]) == 0
    stage = tmp_path / "runs" / "r" / "00_ingest"
    rows = pl.concat([pl.read_parquet(p) for p in sorted(stage.glob("part-*.parquet"))]
                     + [pl.read_parquet(p) for p in sorted((stage / "rejected").glob("*.parquet"))],
                     how="diagonal_relaxed")
    reasons = dict(rows.select("text", "reason").rows())
    assert reasons["busy"] is None and reasons["fine"] is None  # kept on the retry
    assert "429" in reasons["flood"]  # tries exhausted: the host's answer stands
    assert len(seen["/busy.png"]) == 2 and seen["/busy.png"][1] - seen["/busy.png"][0] >= 0.95  # after the wait
    assert len(seen["/flood.png"]) == 3  # the first answer and backoff_tries = 2 more
    assert len(seen["/fine.png"]) == 1


def test_spread_hosts_is_round_robin_and_keeps_a_single_host_in_order():
    from stages.ingest.urls import spread_hosts

    urls = ["http://a.org/1", "http://a.org/2", "http://a.org/3", "https://B.org/1", "http://c.org/1",
            "https://b.org/2"]
    got = spread_hosts(pl.DataFrame({"url": urls, "n": range(6)}))
    assert got["url"].to_list() == ["http://a.org/1", "https://B.org/1", "http://c.org/1",
                                    "http://a.org/2", "https://b.org/2", "http://a.org/3"]
    assert got.columns == ["url", "n"]
    one = pl.DataFrame({"url": [f"http://a.org/{i}" for i in (5, 1, 3)]})
    assert spread_hosts(one).equals(one)
