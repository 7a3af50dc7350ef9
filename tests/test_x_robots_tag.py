"""Opt-outs in the response (issue 32, item 2, the X-Robots-Tag part): an image response whose X-Robots-Tag names a
configured directive (`[ingest] x_robots_directives`, img2dataset's noai, noimageai, noindex, noimageindex by
default), for every crawler or for our product token, is rejected as `x_robots_tag`; a directive for another
crawler, or one not in the list, is not. Loopback only."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli import main as cli_main
from tests.test_optout import Host, UA, _png

TAGS = {  # path -> the X-Robots-Tag header that host sends with that image
    "/all.png": "noai",
    "/ours.png": "clipcurate-test: noimageai",
    "/other.png": "otherbot: noai",
    "/list.png": "noarchive, nofollow",
    "/none.png": None,
}


def _route(path: str):
    tag = TAGS.get(path.split("?")[0])
    headers = {"Content-Type": "image/png", **({"X-Robots-Tag": tag} if tag else {})}
    return 200, headers, _png(len(path))


def _ingest(tmp_path, host: Host, paths, extra: str = "", name: str = "r") -> dict[str, str | None]:
    """Ingest one image per path of `host` (a config with `extra` lines); path -> the row's reason (None: kept)."""
    urls = [f"{host.url}{p}" for p in paths]
    pq.write_table(pa.table({"url": urls, "caption": [f"an image at {p}" for p in paths]}), tmp_path / f"{name}.parquet")
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'[ingest]\nprocesses = 1\nthreads = 2\ntimeout = 30\nuser_agent = "{UA}"\n'
                   f'allow_private_hosts = ["127.0.0.1:{host.port}"]\n{extra}')
    run = f"{name}{len(extra)}"  # one run per setting
    assert cli_main(["--runs-dir", str(tmp_path / "runs"), "ingest", str(tmp_path / f"{name}.parquet"), "--run", run,
                     "--config", str(cfg), "--workers", "0"]) == 0
    stage = tmp_path / "runs" / run / "00_ingest"
    rows = pl.concat([pl.read_parquet(p) for p in sorted(stage.glob("part-*.parquet"))]
                     + [pl.read_parquet(p) for p in sorted((stage / "rejected").glob("*.parquet"))], how="diagonal_relaxed")
    return {t.removeprefix("an image at "): r for t, r in rows.select("text", "reason").rows()}


def test_x_robots_tag_for_everyone_or_for_us_rejects_the_row(tmp_path):
    host = Host({p: _route for p in TAGS})
    with host:
        got = _ingest(tmp_path, host, TAGS)
    assert got == {"/all.png": "x_robots_tag", "/ours.png": "x_robots_tag", "/other.png": None, "/list.png": None,
                   "/none.png": None}


def test_the_directive_list_is_configurable(tmp_path):
    host = Host({p: _route for p in TAGS})
    with host:
        off = _ingest(tmp_path, host, TAGS, "x_robots_directives = []\n")
        narrow = _ingest(tmp_path, host, TAGS, 'x_robots_directives = ["noarchive"]\n')
    assert set(off.values()) == {None}
    assert narrow == {"/all.png": None, "/ours.png": None, "/other.png": None, "/list.png": "x_robots_tag",
                      "/none.png": None}


def test_a_bad_directive_list_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[ingest]\nx_robots_directives = ["noai", ""]\n')
    pq.write_table(pa.table({"url": ["http://example.com/a.png"], "caption": ["a"]}), tmp_path / "u.parquet")
    assert cli_main(["--runs-dir", str(tmp_path / "runs"), "ingest", str(tmp_path / "u.parquet"), "--run", "x",
                     "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipcurate: error: config [ingest] x_robots_directives = ['noai', '']: give a list")
    assert len(err.splitlines()) == 1


# ---- TDMRep's HTTP header on the image response ----------------------------------------------------------------
TDM = {"/reserved.png": "1", "/open.png": "0", "/plain.png": None}


def _tdm_route(path: str):
    value = TDM.get(path.split("?")[0])
    return 200, {"Content-Type": "image/png", **({"tdm-reservation": value} if value else {})}, _png(len(path))


def test_a_tdm_reservation_header_of_1_rejects_the_row_as_tdm_reserved(tmp_path):
    host = Host({p: _tdm_route for p in TDM})
    with host:
        got = _ingest(tmp_path, host, TDM, name="t")
        off = _ingest(tmp_path, host, TDM, "respect_tdmrep = false\n", name="t")
    assert got == {"/reserved.png": "tdm_reserved", "/open.png": None, "/plain.png": None}
    assert set(off.values()) == {None}  # the user's choice: not checked
