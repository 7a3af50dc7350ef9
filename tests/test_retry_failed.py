"""`clipcurate ingest --run NAME --retry-failed` (issue 32, item 5): after a flaky first pass, only the rows lost
to passing trouble are fetched again (a 503, an unreachable robots.txt), never a 404, a response that is no image
or an opt-out; the run then holds the rows of a clean pass, in its own image store. Loopback only."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli_main
from pipeline.images import ImageStore
from stages.ingest.retry import TRANSIENT_ERROR
from tests.test_optout import UA, Host

PATHS_A = [f"/img/{i}.png" for i in range(6)] + ["/flaky/1.png", "/flaky/2.png", "/gone.png", "/page.png",
                                                  "/private/x.png"]
PATHS_B = [f"/b/{i}.png" for i in range(4)]


class Flaky:
    """Host A answers /flaky/* with 503 (no Retry-After) the first time; host B's robots.txt is 503 the first
    time (RFC 9309: unreachable, disallow all). `flaky=False`: a clean pass."""

    def __init__(self, flaky: bool):
        self.flaky = flaky
        self.a = Host({"/gone.png": (404, b"missing"), "/page.png": (200, b"<html><body>hi</body></html>"),
                       "/robots.txt": (200, b"User-agent: *\nDisallow: /private/\n")})
        self.a.files.update({p: self._flaky_image for p in ("/flaky/1.png", "/flaky/2.png")})
        self.b = Host({"/robots.txt": self._flaky_robots})

    def _flaky_image(self, path: str):
        from tests.test_optout import _png

        if self.flaky and self.a.paths[path.split("?")[0]] == 1:
            return 503, {}, b"busy"
        return 200, {"Content-Type": "image/png"}, _png(len(path))

    def _flaky_robots(self, path: str):
        if self.flaky and self.b.paths["/robots.txt"] == 1:
            return 503, {}, b"down"
        return 200, {}, b"User-agent: *\nDisallow:\n"

    def __enter__(self):
        self.a.__enter__()
        self.b.__enter__()
        return self

    def __exit__(self, *exc):
        self.a.__exit__(*exc)
        self.b.__exit__(*exc)


def _ingest(tmp_path, world: Flaky, run: str, *extra: str) -> int:
    urls = [world.a.url + p for p in PATHS_A] + [world.b.url + p for p in PATHS_B]
    caps = [f"caption {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"url": urls + urls[:2], "caption": caps + ["second caption a", "second caption b"]}),
                   tmp_path / f"{run}.parquet")
    cfg = tmp_path / f"{run}.toml"
    cfg.write_text(f'[ingest]\nprocesses = 1\nthreads = 4\nshard_size = 5\ntimeout = 20\nuser_agent = "{UA}"\n'
                   f'backoff_tries = 0\nallow_private_hosts = ["127.0.0.1:{world.a.port}", "127.0.0.1:{world.b.port}"]\n')
    args = ["--runs-dir", str(tmp_path / "runs"), "ingest"]
    if not extra:
        args += [str(tmp_path / f"{run}.parquet"), "--config", str(cfg)]
    return cli_main(args + ["--run", run, "--workers", "0", *extra])


def _rows(tmp_path, run: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    stage = tmp_path / "runs" / run / "00_ingest"
    kept = pl.concat([pl.read_parquet(p) for p in sorted(stage.glob("part-*.parquet"))])
    rejected = pl.concat([pl.read_parquet(p) for p in sorted((stage / "rejected").glob("*.parquet"))],
                         how="diagonal_relaxed")
    return kept, rejected


def _path(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def test_retry_failed_ends_with_the_rows_of_a_clean_pass(tmp_path, capsys):
    with Flaky(flaky=False) as clean:
        assert _ingest(tmp_path, clean, "clean") == 0
    with Flaky(flaky=True) as world:
        assert _ingest(tmp_path, world, "flaky") == 0
        kept1, rej1 = _rows(tmp_path, "flaky")
        first = dict(world.a.paths)
        lost = rej1.filter(pl.col("reason").str.contains("503") | (pl.col("robots_status") == "unreachable"))
        assert lost.height == 2 + 4  # /flaky/*, and host B's images (its robots.txt did not answer)
        assert rej1.filter(pl.col("reason") == "robots_disallowed").height == 5  # and /private/x.png
        capsys.readouterr()
        step = tmp_path / "runs" / "flaky" / "00_ingest"
        raw_before = {p.name: p.stat().st_mtime_ns for p in (step / "_img2dataset").glob("*.parquet")}
        marks_before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (step / "_done").glob("*.json")}
        assert _ingest(tmp_path, world, "flaky", "--retry-failed") == 0
        out = capsys.readouterr().out
        # the 404, the HTML page and the opted-out path are not asked again; the 503s and host B's images are
        assert world.a.paths["/gone.png"] == first["/gone.png"] == 1
        assert world.a.paths["/page.png"] == 1 and world.a.paths.get("/private/x.png", 0) == 0
        assert world.a.paths["/flaky/1.png"] == 2 and world.a.paths["/img/0.png"] == 1
        assert world.b.paths["/robots.txt"] == 2 and all(world.b.paths[p] == 1 for p in PATHS_B)
    assert "6 URLs retried" in out and "6 downloaded now, 0 still failing" in out, out
    # resume per shard: the ingest step redid the shards whose store shard the retry rewrote or added, no other
    raw_after = {p.name: p.stat().st_mtime_ns for p in (step / "_img2dataset").glob("*.parquet")}
    changed = {n for n in raw_after if raw_before.get(n) != raw_after[n]}  # the set-aside rows too
    marks_after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (step / "_done").glob("*.json")}
    redone = {n.removesuffix(".json") for n in marks_after if marks_before.get(n) != marks_after[n]}
    assert redone == {"part-" + n for n in changed} and 0 < len(redone) < len(marks_after), (changed, redone)
    kept, rejected = _rows(tmp_path, "flaky")
    clean_kept, clean_rej = _rows(tmp_path, "clean")
    def facts(rows: pl.DataFrame, hosts) -> pl.DataFrame:  # the servers' ports differ between the passes
        host = pl.col("url").str.replace(f"127.0.0.1:{hosts.a.port}", "A", literal=True) \
            .str.replace(f"127.0.0.1:{hosts.b.port}", "B", literal=True)
        return rows.select(host, "text", "width", "height", "orig_width", "orig_height").sort("url", "text")

    assert kept.height == clean_kept.height == 14
    assert facts(kept, world).equals(facts(clean_kept, clean))
    assert sorted(rejected["reason"].to_list()) == sorted(clean_rej["reason"].to_list())
    assert kept["text"].str.starts_with("caption").sum() + 2 == kept.height  # the second captions are kept too
    # the recovered rows' bytes are in the run's own image store, where their references say
    store = ImageStore.load(str(tmp_path / "runs" / "flaky"))
    recovered = kept.filter(pl.col("url").map_elements(_path, return_dtype=pl.String).str.starts_with("/flaky/")
                            | pl.col("url").str.contains("/b/"))
    got = store.reader().read(recovered["image_ref"].to_list())
    assert len(got) == recovered.height and all(b.as_py().startswith(b"\xff\xd8\xff") for b in got)  # JPEG: encode_format
    # a second retry finds nothing to do
    with Flaky(flaky=True) as again:
        assert _ingest(tmp_path, again, "flaky", "--retry-failed") == 0
    assert "nothing to retry" in capsys.readouterr().out


def test_retry_failed_refusals_are_one_line(tmp_path, capsys):
    assert cli_main(["--runs-dir", str(tmp_path / "runs"), "ingest", "--run", "nope", "--retry-failed"]) == 2
    assert "not a run" in capsys.readouterr().err


@pytest.mark.parametrize("error, transient", [
    ("HTTP Error 503: Service Unavailable", True), ("HTTP Error 429: Too Many Requests", True),
    ("HTTP Error 500: Internal Server Error", True), ("<urlopen error timed out>", True),
    ("The read operation timed out", True), ("<urlopen error [Errno 111] Connection refused>", True),
    ("Remote end closed connection without response", True), ("[Errno 104] Connection reset by peer", True),
    ("HTTP Error 404: Not Found", False), ("HTTP Error 403: Forbidden", False), ("HTTP Error 410: Gone", False),
    ("<urlopen error [Errno -2] Name or service not known>", False),
    ("Use of image disallowed by X-Robots-Tag directive", False), ("HTTP Error 5000: odd", False),
])
def test_transient_rule_hand_cases(error, transient):
    import re

    assert bool(re.search(TRANSIENT_ERROR, error)) is transient


def test_a_retry_that_recovers_nothing_leaves_the_run_unchanged(tmp_path, capsys):
    from tests.test_optout import _png

    host = Host({"/down.png": (503, b"busy"), "/up.png": (200, _png(3))})
    with host:
        pq.write_table(pa.table({"url": [host.url + "/down.png", host.url + "/up.png"], "caption": ["a", "b"]}),
                       tmp_path / "u.parquet")
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[ingest]\nprocesses = 1\nthreads = 2\ntimeout = 20\nuser_agent = "{UA}"\nbackoff_tries = 0\n'
                       f'allow_private_hosts = ["127.0.0.1:{host.port}"]\n')
        runs = ["--runs-dir", str(tmp_path / "runs"), "ingest"]
        assert cli_main(runs + [str(tmp_path / "u.parquet"), "--run", "r", "--config", str(cfg), "--workers", "0"]) == 0
        store = tmp_path / "runs" / "r" / "00_ingest"
        before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.rglob("*.parquet")}
        capsys.readouterr()
        assert cli_main(runs + ["--run", "r", "--retry-failed", "--workers", "0"]) == 0
        assert host.paths["/down.png"] == 2 and host.paths["/up.png"] == 1
    assert "1 URLs retried, none downloaded now: run r is unchanged" in capsys.readouterr().out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.rglob("*.parquet")} == before
