"""Hostile input (issue 29, "Untrusted input stays in its box"): one test or more per item of the issue.

A URL list, a crawl and a pool come from the open web. Each test here plays the attacker on loopback only
(no traffic leaves 127.0.0.1) and checks that the input stays in its box: no fetch of an internal address,
no name from data unchecked, one writer per run, bounded memory per row, verified outputs, a crawl read
defensively, and one line (or a quarantined row) instead of a traceback.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
import glob
import hashlib
import io
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import textwrap
import threading
import time

from PIL import Image
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.s3_server import moto_s3
from pipeline import config as config_mod
from pipeline import shards
from pipeline.cli import main as cli_main
from pipeline.images import ImageStore
from pipeline.runner import run_pipeline
from pipeline.schema import compute_uid
from tests.loopback import LoopbackServer
from tests.stages_for_tests import make_pool


# ====================================================================================================
# Item 1. One egress policy for every request  (was tests/test_hostile_egress.py)
# Issue 29, item 1: one egress policy for every request the project makes (pipeline/egress.py), img2dataset's
# workers included (stages/ingest/guard.py).
#
# Traffic goes to 127.0.0.1 only: private ranges and names that resolve inward are checked through a stub resolver
# (never a real lookup of them), and every socket the tests let the code open is checked to be a loopback one.
# Redirects use two loopback servers on different ports, one in allow_private_hosts and one not; the second must see
# no connection at all.
# ====================================================================================================

# ---- two loopback servers --------------------------------------------------------------------------------
_Server = LoopbackServer  # tests/loopback.py: counts connections, records (path, Host) per request


def _png(i: int) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (64 + i, 48 + i), (40 * i % 255, 120, 200)).save(b, "PNG")
    return b.getvalue()


def _site(other_port: int):
    """The allowed server's routes: images, redirects to the other server, to ftp:, to file:, and chains."""

    def route(path: str):
        if path.startswith("/img/"):
            return 200, {"Content-Type": "image/png"}, _png(int(path.split("/")[2].split(".")[0]))
        if path.startswith("/to-other-relative"):
            return 302, {"Location": f"//127.0.0.1:{other_port}/stolen"}, b""
        if path.startswith("/to-other"):
            return 302, {"Location": f"http://127.0.0.1:{other_port}/stolen"}, b""
        if path.startswith("/to-ftp"):
            return 302, {"Location": f"ftp://127.0.0.1:{other_port}/stolen"}, b""
        if path.startswith("/to-file"):
            return 302, {"Location": "file:///etc/passwd"}, b""
        if path.startswith("/hop/"):  # /hop/N: N redirects, then an image
            n = int(path.split("/")[2])
            return (302, {"Location": f"/hop/{n - 1}"}, b"") if n else (200, {"Content-Type": "image/png"}, _png(0))
        return 404, {}, b"missing"

    return route


@contextmanager
def _two_servers():
    other = _Server(lambda path: (200, {"Content-Type": "text/plain"}, b"secret"))
    with other, _Server(_site(other.port)) as allowed:
        yield allowed, other


@pytest.fixture
def loopback_only(monkeypatch):
    """Every socket the code under test opens may connect to loopback only: a broken check fails here instead of
    sending a packet to 10.0.0.1 or 169.254.169.254."""

    class LoopbackOnly(socket.socket):
        def connect(self, address):
            assert ipaddress.ip_address(address[0].split("%")[0]).is_loopback, f"connection to {address} attempted"
            return super().connect(address)

    monkeypatch.setattr(socket, "socket", LoopbackOnly)


class _StubResolver:
    """DNS for the tests: a fixed table, and a record of what was asked."""

    def __init__(self, table: dict[str, list[str]]):
        self.table, self.asked = table, []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(f"stub resolver: {host} unknown")
        return self.table[host]


def _refused(fetch, reason: str) -> str:
    from pipeline import egress

    with pytest.raises(egress.Blocked) as e:
        fetch()
    assert e.value.reason == reason, str(e.value)
    assert str(e.value).startswith(f"{reason}: ") and "\n" not in str(e.value)
    return str(e.value)


# ---- the address rule -------------------------------------------------------------------------------------
REFUSED = ["127.0.0.1", "127.255.0.9", "10.0.0.1", "172.16.5.4", "172.31.255.255", "192.168.1.1", "169.254.169.254",
           "100.64.0.1", "100.127.255.254", "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "240.0.0.1",
           "255.255.255.255", "192.0.2.1", "198.18.0.1",
           "::1", "::", "fc00::1", "fd12:3456::1", "fe80::1", "fe80::1%eth0", "ff02::1", "2001:db8::1",
           "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
           "2002:7f00:1::1", "2002:a9fe:a9fe::", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::1", "2001::1"]
GLOBAL = ["8.8.8.8", "93.184.216.34", "100.63.255.255", "100.128.0.0", "172.32.0.1", "2606:4700::1111",
          "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808"]


def test_item1_egress_address_rule_refuses_every_internal_range():
    from pipeline import egress

    for ip in REFUSED:
        assert egress.refusal(ip), ip
        assert not egress.address_allowed(ip), ip
    for ip in GLOBAL:  # checked, never connected to
        assert egress.refusal(ip) is None, ip


def test_item1_egress_names_resolving_inward_are_refused_before_connecting(loopback_only):
    from pipeline import egress

    dns = _StubResolver({
        "metadata.google.internal": ["169.254.169.254"], "intranet.test": ["10.0.0.1"],
        "router.test": ["192.168.1.1"], "cgnat.test": ["100.64.0.1"], "v6.test": ["fd00::1"],
        "mapped.test": ["::ffff:127.0.0.1"], "nat64.test": ["64:ff9b::a00:1"], "sixtofour.test": ["2002:a00:1::"],
        "rebind.test": ["8.8.8.8", "127.0.0.1"],  # one inward answer is enough to refuse the name
    })
    for host in dns.table:
        for scheme in ("http", "https"):
            msg = _refused(lambda: egress.urlopen(f"{scheme}://{host}/x.jpg", resolver=dns, timeout=2), "blocked_address")
            assert host in msg
    assert set(dns.asked) == set(dns.table)


def test_item1_egress_literal_addresses_are_refused_before_any_byte(loopback_only):
    from pipeline import egress
    from stages.ingest.urls import group_by_url

    dns = _StubResolver({})
    with _Server(lambda p: (200, {}, b"should never be served")) as srv:
        p = srv.port
        urls = [f"http://127.0.0.1:{p}/a.jpg", f"http://2130706433:{p}/a.jpg", f"http://0x7f.1:{p}/a.jpg",
                f"http://127.1:{p}/a.jpg", f"http://0177.0.0.1:{p}/a.jpg", f"http://0:{p}/a.jpg",
                f"http://[::ffff:127.0.0.1]:{p}/a.jpg", f"http://[::1]:{p}/a.jpg", f"http://localhost:{p}/a.jpg",
                f"http://LOCALHOST.:{p}/a.jpg", f"http://x.localhost:{p}/a.jpg", f"https://127.0.0.1:{p}/a.jpg"]
        for url in urls:
            _refused(lambda: egress.check_url(url), "blocked_address")
            _refused(lambda: egress.urlopen(url, resolver=dns, timeout=2), "blocked_address")
        # ingest's URL list: the same rows are set aside as blocked_address without any request
        grouped, bad = group_by_url(pl.DataFrame({"url": urls, "caption": [str(i) for i in range(len(urls))]}))
        assert grouped.height == 0 and bad["status"].to_list() == ["blocked_address"] * len(urls)
        assert srv.connections == 0 and not dns.asked


def test_item1_egress_other_schemes_and_userinfo_are_refused(loopback_only):
    from pipeline import egress
    from stages.ingest.urls import group_by_url

    with _two_servers() as (allowed, other):
        policy = egress.EgressPolicy(frozenset({f"127.0.0.1:{allowed.port}"}))
        for url in [f"ftp://127.0.0.1:{other.port}/a.jpg", "file:///etc/passwd", "data:image/png;base64,iVBORw0KGgo=",
                    "gopher://127.0.0.1/", "javascript:alert(1)"]:
            _refused(lambda: egress.urlopen(url, policy, timeout=2), "blocked_scheme")
        for url in [f"http://user@127.0.0.1:{allowed.port}/img/1.png",
                    f"http://127.0.0.1:{allowed.port}:pw@127.0.0.1:{other.port}/img/1.png",
                    f"http://example.com@127.0.0.1:{other.port}/img/1.png"]:
            _refused(lambda: egress.urlopen(url, policy, timeout=2), "blocked_userinfo")
        assert allowed.connections == other.connections == 0
        bad = group_by_url(pl.DataFrame({"url": ["file:///etc/passwd", "http://u@h.invalid/a.jpg", "not a url"],
                                         "caption": ["a", "b", "c"]}), policy)[1]
        assert bad["status"].to_list() == ["blocked_scheme", "blocked_userinfo", "invalid_url"]


def test_item1_egress_redirects_are_checked_hop_by_hop(loopback_only):
    from pipeline import egress

    with _two_servers() as (allowed, other):
        policy = egress.EgressPolicy(frozenset({f"127.0.0.1:{allowed.port}"}))
        with egress.urlopen(f"{allowed.url}/img/3.png", policy, timeout=5) as r:  # allowed: fetched
            assert r.read() == _png(3)
        with egress.urlopen(f"{allowed.url}/hop/5", policy, timeout=5) as r:  # 5 hops: fine
            assert r.read() == _png(0)
        _refused(lambda: egress.urlopen(f"{allowed.url}/hop/6", policy, timeout=5), "blocked_redirect")
        for path in ("/to-other", "/to-other-relative"):  # an allowed server may not send us inward elsewhere
            _refused(lambda: egress.urlopen(f"{allowed.url}{path}", policy, timeout=5), "blocked_address")
        _refused(lambda: egress.urlopen(f"{allowed.url}/to-ftp", policy, timeout=5), "blocked_scheme")
        _refused(lambda: egress.urlopen(f"{allowed.url}/to-file", policy, timeout=5), "blocked_scheme")
        assert other.connections == 0 and other.requests == []
        assert [p for p, _ in allowed.requests].count("/hop/0") == 1  # the 6-hop chain stopped before its end


def test_item1_egress_connects_to_the_checked_address_and_ignores_proxies(loopback_only, monkeypatch):
    from pipeline import egress

    with _two_servers() as (allowed, other):
        # a proxy in the environment would receive the request and connect on our behalf: never used
        for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.setenv(var, other.url)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        dns = _StubResolver({"images.test": ["127.0.0.1"]})
        policy = egress.EgressPolicy(frozenset({f"images.test:{allowed.port}"}))
        with egress.urlopen(f"http://images.test:{allowed.port}/img/2.png", policy, resolver=dns, timeout=5) as r:
            assert r.read() == _png(2)
        assert dns.asked == ["images.test"]  # resolved once; the connection went to the address checked
        assert allowed.requests[-1] == ("/img/2.png", f"images.test:{allowed.port}")
        # the exemption is exact: the same name on another port is refused
        _refused(lambda: egress.urlopen(f"http://images.test:{other.port}/x", policy, resolver=dns, timeout=5),
                 "blocked_address")
        # pinned (curl --resolve): no lookup at all; a pinned loopback address is still refused unless allowed
        pin = {"demo.test:80": ("127.0.0.1", allowed.port)}
        _refused(lambda: egress.urlopen("http://demo.test/img/1.png", egress.EgressPolicy(pinned=pin), resolver=dns),
                 "blocked_address")
        ok = egress.EgressPolicy(frozenset({"demo.test:80"}), pinned=pin)
        with egress.urlopen("http://demo.test/img/1.png", ok, resolver=dns, timeout=5) as r:
            assert r.read() == _png(1)
        assert dns.asked == ["images.test", "images.test"] and other.connections == 0


def test_item1_egress_allow_private_hosts_is_validated():
    from pipeline import config
    from pipeline.config import ConfigError
    from stages.ingest import IngestStage

    good = ["demo.clipcurate.invalid:80", "127.0.0.1:8000", "[::1]:8080", "LAN-Box.local:443"]
    cfg = config.resolve({"ingest": {"allow_private_hosts": good}})
    policy = IngestStage.Config(**cfg["ingest"]).egress_policy()
    assert policy.allow_private_hosts == {"demo.clipcurate.invalid:80", "127.0.0.1:8000", "[::1]:8080",
                                          "lan-box.local:443"}
    for bad in (["localhost"], ["127.0.0.1:0"], ["127.0.0.1:99999"], ["http://x:80"], ["*:80"], ["[nope]:80"], [5]):
        with pytest.raises(ConfigError) as e:
            config.resolve({"ingest": {"allow_private_hosts": bad}})
        assert "allow_private_hosts" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        config.resolve({"ingest": {"allow_private_hosts": "127.0.0.1:80"}})  # a list, not a string


def test_item1_egress_img2dataset_workers_obey_the_policy(tmp_path, capsys):
    """One ingest through img2dataset: its spawned workers must fetch through the guarded opener. A redirect from
    the allowed server to the other port is only refused there: were the hook not called, stock urllib would
    follow it (and an ftp: one) to the other server."""
    from pipeline import shards
    from pipeline.cli import main as cli_main

    with _two_servers() as (allowed, other):
        rows = [(f"{allowed.url}/img/{i}.png", f"picture {i}") for i in range(3)]
        rows += [(f"{allowed.url}/to-other?{i}", f"redirected {i}") for i in range(2)]
        rows += [(f"{allowed.url}/to-ftp", "to ftp"), (f"{allowed.url}/hop/7", "too many hops")]
        rows += [(f"{other.url}/img/1.png", "literal, not allowed"), (f"http://2130706433:{other.port}/x", "numeric"),
                 ("file:///etc/passwd", "a file")]
        pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), tmp_path / "u.parquet")
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[ingest]\nprocesses = 1\nthreads = 4\ntimeout = 5\n'
                       f'allow_private_hosts = ["127.0.0.1:{allowed.port}"]\n')
        code = cli_main(["--runs-dir", str(tmp_path / "runs"), "ingest", str(tmp_path / "u.parquet"), "--run", "r",
                         "--config", str(cfg), "--workers", "0"])
        assert code == 0, capsys.readouterr().err
        assert other.connections == 0 and other.requests == []
        served = [p for p, _ in allowed.requests]
        assert sum(p.startswith("/to-other") for p in served) == 2  # the worker did fetch these, and stopped there
    stage = tmp_path / "runs" / "r" / "00_ingest"
    kept = pa.concat_tables([pq.read_table(p) for p in sorted(stage.glob("part-*.parquet"))])
    assert sorted(kept.column("text").to_pylist()) == ["picture 0", "picture 1", "picture 2"]
    rej = pa.concat_tables([pq.read_table(p) for p in sorted((stage / "rejected").glob("*.parquet"))])
    got = dict(zip(rej.column("text").to_pylist(), rej.column("reason").to_pylist()))
    assert got == {"redirected 0": "blocked_address", "redirected 1": "blocked_address", "to ftp": "blocked_scheme",
                   "too many hops": "blocked_redirect", "literal, not allowed": "blocked_address",
                   "numeric": "blocked_address", "a file": "blocked_scheme"}
    m = shards.read_json(str(stage / "_manifest.json"))
    assert m["reasons"] == {"blocked_address": 4, "blocked_scheme": 2, "blocked_redirect": 1}


# ====================================================================================================
# Item 2, 4, 8. uid form, emit names, bounded memory per row, images and config  (was tests/test_hostile_rows.py)
# Hostile rows (issue 29, items 2, 4 and part of 8): a pool from the open web must not name files, cost a worker
# gigabytes, nor slip past the reader with a forged image header; bad config and bad side files are one line.
#
# - item 2: a uid that is not 32 lowercase hex characters is `invalid_uid` in every stage (never a tar member, never
#   zeros in uids.npy); emit's `image_ext` and `formats` are checked against fixed sets.
# - item 4: text over `[run] max_text_bytes` is `text_too_long`, set aside by the reader; a 10 MB caption leaves each
#   stage's peak RSS within 10% of the same shard without it (measured in a fresh child process per stage).
# - item 8: a float config value that is not finite, a JPEG whose header lies about its size, a pool without `text`,
#   a concept list that is not UTF-8 and a checkpoint that is not one: one line, or a rejected row.
# ====================================================================================================

STAGES = ["align", "metaclip", "klite", "dfn", "emit"]
needs_wordnet = pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="WordNet not installed")
REPO = Path(__file__).resolve().parents[1]

BAD_UIDS = {
    "escape": "../../../../escape",
    "script": "<script>alert(1)</script>",
    "empty": "",
    "upper": "0123456789ABCDEF0123456789ABCDEF",
    "short": "0123456789abcdef0123456789abcde",  # 31 characters
}
MEMBER = re.compile(r"^[0-9a-f]{32}\.(jpg|txt|json|klite\.txt)$")


# ---- inputs ------------------------------------------------------------------------------------------
def jpeg(seed: int = 0, size=(300, 240), progressive: bool = False) -> bytes:
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", quality=90, progressive=progressive)
    return b.getvalue()


def lying_jpeg(width: int = 9000, height: int = 9000, progressive: bool = False) -> bytes:
    """A real 300x240 JPEG whose frame header (SOF0, or SOF2) says width x height: the scan holds 300x240's
    blocks."""
    data = jpeg(7, progressive=progressive)
    i = data.find(b"\xff\xc2" if progressive else b"\xff\xc0")
    assert i > 0 and struct.unpack(">HH", data[i + 5:i + 9]) == (240, 300)
    return data[:i + 5] + struct.pack(">HH", height, width) + data[i + 9:]


CAPTIONS = ["a photo of a dog on the grass", "a cat sleeping on a red sofa", "a tall tree standing in the park",
            "a dog and a cat in the garden", "a red car parked near a tree", "a bird sitting on a branch"]


def pool_table(n: int, images: bool = True, start: int = 0, texts=None, uids=None) -> pa.Table:
    urls = [f"http://example.invalid/{start + i}.jpg" for i in range(n)]
    texts = texts or [f"{CAPTIONS[(start + i) % len(CAPTIONS)]} number {start + i}" for i in range(n)]
    cols = {"uid": pa.array(uids, pa.string()) if uids is not None else compute_uid(urls, texts),
            "url": pa.array(urls, pa.string()), "text": pa.array(texts, pa.string())}
    if images:
        pics = [jpeg(i % 16) for i in range(16)]
        cols["image"] = pa.array([pics[(start + i) % 16] for i in range(n)], pa.binary())
        cols["orig_width"] = pa.array([300] * n, pa.int32())
        cols["orig_height"] = pa.array([240] * n, pa.int32())
    return pa.table(cols)


def write(folder: Path, tables: list[pa.Table]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(tables):
        pq.write_table(t, folder / f"part-{i:05d}.parquet")
    return folder


def outcome(stage_dir: Path) -> dict[str, str | None]:
    """uid -> reason (None = kept); fails on a uid seen twice."""
    out: dict[str, str | None] = {}
    for sub, rejected in (("", False), ("rejected", True)):
        for p in sorted((stage_dir / sub).glob("part-*.parquet")):
            t = pq.read_table(p)
            reasons = t.column("reason").to_pylist() if rejected else [None] * t.num_rows
            for u, r in zip(t.column("uid").to_pylist(), reasons):
                assert u not in out, f"uid {u!r} twice in {stage_dir}"
                out[u] = r
    return out


def tar_members(emit_dir: Path) -> list[str]:
    names = []
    for tar in sorted((emit_dir / "wds").glob("*.tar")):
        with tarfile.open(tar) as tf:
            names += tf.getnames()
    return names


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An untrained tiny open_clip checkpoint for dfn, a 4-entry concept list, and a config for every stage sized
    to small pools (saved as TOML too, for the CLI and for child processes)."""
    torch = pytest.importorskip("torch")
    from trainer import models

    root = tmp_path_factory.mktemp("hostile_rows_env")
    model, *_ = models.create("clipcurate-tiny")
    torch.save({"model_name": "clipcurate-tiny", "state_dict": model.state_dict(), "step": 0}, root / "dfn.pt")
    (root / "entries.txt").write_text("dog\ncat\ntree\nphoto\n")
    raw = {"align": {"min_token_count": 0},
           "metaclip": {"entries": str(root / "entries.txt"), "t": 1000},
           "dfn": {"checkpoint": str(root / "dfn.pt"), "keep_fraction": 1.0, "batch_size": 64, "cache": False}}
    cfg = config_mod.resolve(raw)
    config_mod.save(cfg, str(root / "config.toml"))
    return {"root": root, "raw": raw, "cfg": cfg, "cfg_file": str(root / "config.toml")}


def run_cli(tmp_path: Path, args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(["--runs-dir", str(tmp_path / "runs"), *args])
    return code, capsys.readouterr().err.strip()


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("clipcurate: error: "), err
    assert "Traceback" not in err
    return err


# ---- item 2: uid is 32 lowercase hex, everywhere -------------------------------------------------------
@pytest.fixture(scope="module")
def uid_pool(tmp_path_factory):
    """Four good rows and one row per bad uid, with images, over two shards; label -> uid."""
    good = pool_table(4)
    bad = pool_table(len(BAD_UIDS), start=4, uids=list(BAD_UIDS.values()))
    folder = write(tmp_path_factory.mktemp("uid_pool"), [good, bad])
    return folder, good.column("uid").to_pylist()


@needs_wordnet
@pytest.mark.parametrize("stage", STAGES)
def test_item2_invalid_uid_is_rejected_by_every_stage_before_its_rules(tmp_path, env, uid_pool, stage):
    folder, good = uid_pool
    res = run_pipeline([stage], str(tmp_path / "run"), env["cfg"], input_dir=str(folder), workers=0)[0]
    got = outcome(Path(res.folder))
    assert {u: got[u] for u in BAD_UIDS.values()} == {u: "invalid_uid" for u in BAD_UIDS.values()}
    assert all(got[u] != "invalid_uid" for u in good)
    assert any("32 lowercase hex" in n for n in res.manifest["notes"])


def test_item2_pool_uid_never_becomes_a_tar_member_and_uids_npy_holds_real_values(tmp_path, uid_pool, capsys):
    """The issue's run: `clipcurate run emit --input POOL` with uid `../../../../escape` (and the others)."""
    folder, good = uid_pool
    code, err = run_cli(tmp_path, ["run", "emit", "--run", "r", "--input", str(folder), "--workers", "0"], capsys)
    assert code == 0, err
    emit = tmp_path / "runs" / "r" / "emit"
    names = tar_members(emit)
    assert names and all(MEMBER.match(n) for n in names), names
    assert {n.split(".")[0] for n in names} == set(good)
    assert not list(tmp_path.rglob("escape*")) and not list(tmp_path.parent.glob("escape*"))
    arr = np.load(emit / "uids.npy")
    want = sorted((int(u[:16], 16), int(u[16:], 16)) for u in good)
    assert [(int(h), int(lo)) for h, lo in arr[["hi", "lo"]].tolist()] == want  # the uids' own 128 bits, sorted


def test_item2_emit_refuses_a_bad_uid_that_reaches_it(tmp_path):
    """A last line of defence: a row with a bad uid that reaches emit's writer (a stage folder written by
    something else) is an error, not a member name nor a zero in uids.npy."""
    from pipeline.errors import StageError
    from stages.emit import EmitStage, _uids_to_u128

    t = pool_table(2, images=False, uids=["0" * 32, "../../../../escape"])
    with pytest.raises(StageError, match="32 lowercase hex"):
        EmitStage()._tar(t)
    with pytest.raises(StageError, match="32 lowercase hex"):
        _uids_to_u128(pa.chunked_array([pa.array(["0" * 32, "zz" * 16])]))
    ok = _uids_to_u128(pa.chunked_array([pa.array(["f" * 32, "0" * 31 + "1"])]))
    assert ok.tolist() == [(0, 1), (2**64 - 1, 2**64 - 1)]
    assert len(_uids_to_u128(pa.chunked_array([], pa.string()))) == 0  # an emit of no rows


@pytest.mark.parametrize("key,value,words", [
    ("image_ext", "../../x", ["[emit] image_ext", "jpg, jpeg, png, webp"]),
    ("formats", ["zip"], ["[emit] formats", "'zip'", "parquet, wds"]),
    ("formats", [], ["[emit] formats", "parquet, wds"]),
])
def test_item2_emit_image_ext_and_formats_are_one_line_errors(tmp_path, capsys, key, value, words):
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.resolve({"emit": {key: value}})
    assert len(str(e.value).splitlines()) == 1
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[emit]\n{key} = {json.dumps(value)}\n")
    inp = write(tmp_path / "in", [pool_table(2, images=False)])
    err = one_line_error(*run_cli(tmp_path, ["run", "emit", "--run", "r", "--input", str(inp), "--config", str(cfg),
                                             "--workers", "0"], capsys))
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "runs" / "r" / "emit").exists()


# ---- item 8: a float config value that is not finite ---------------------------------------------------
@pytest.mark.parametrize("toml_value", ["nan", "inf", "-inf"])
def test_item8_non_finite_float_config_is_one_line(tmp_path, capsys, toml_value):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[align]\nmax_aspect = {toml_value}\n")
    inp = write(tmp_path / "in", [pool_table(2, images=False)])
    err = one_line_error(*run_cli(tmp_path, ["run", "align", "--run", "r", "--input", str(inp), "--config", str(cfg),
                                             "--workers", "0"], capsys))
    assert "[align] max_aspect" in err and "not a finite number" in err, err
    with pytest.raises(config_mod.ConfigError, match=r"\[dfn\] keep_fraction"):
        config_mod.resolve({"dfn": {"keep_fraction": math.nan}})


# ---- item 4: bounded memory per row ---------------------------------------------------------------------
def test_item4_text_over_max_text_bytes_is_set_aside_before_the_rules(tmp_path, env):
    """10 KB of caption: `text_too_long` (not align's too_many_words: the rules never saw it), its text cut to the
    limit in rejected/; with the limit raised the same row reaches the rules."""
    long_text = ("a dog runs " * 1000)[:10_000]
    t = pool_table(3, images=False, texts=["a photo of a dog on the grass", long_text, "é" * 3000])
    inp = write(tmp_path / "in", [t])
    uid = t.column("uid").to_pylist()
    res = run_pipeline(["align"], str(tmp_path / "run"), env["cfg"], input_dir=str(inp), workers=0)[0]
    got = outcome(Path(res.folder))
    assert got[uid[1]] == got[uid[2]] == "text_too_long"  # 10,000 and 6,000 UTF-8 bytes
    assert got[uid[0]] != "text_too_long"
    rej = pq.read_table(next(Path(res.folder, "rejected").glob("*.parquet")))
    cut = dict(zip(rej.column("uid").to_pylist(), rej.column("text").to_pylist()))
    assert cut[uid[1]] == long_text[:4096]
    assert any("max_text_bytes = 4096 bytes" in n for n in res.manifest["notes"])
    cfg = {**env["cfg"], "run": {**env["cfg"]["run"], "max_text_bytes": 20_000}}
    res = run_pipeline(["align"], str(tmp_path / "run"), cfg, input_dir=str(inp), workers=0)[0]
    assert outcome(Path(res.folder))[uid[1]] == "too_many_words"  # redone (the limit is in the fingerprint)


def test_item4_max_text_bytes_reaches_dask_workers(tmp_path, env, dask_cluster):
    """`[run] max_text_bytes` travels with every task (collect and apply), not through a worker's defaults."""
    t = pool_table(3, images=False, texts=["a photo of a dog", "a cat " * 20, "a tree"])
    inp = write(tmp_path / "in", [t, pool_table(2, images=False, start=3)])
    cfg = {**env["cfg"], "run": {**env["cfg"]["run"], "max_text_bytes": 50}}
    res = run_pipeline(["metaclip"], str(tmp_path / "run"), cfg, input_dir=str(inp),
                       scheduler=dask_cluster.scheduler.address)[0]
    assert outcome(Path(res.folder))[t.column("uid")[1].as_py()] == "text_too_long"  # 120 bytes > 50


# The child reports its own peak RSS: VmHWM, the high-water mark of the memory it has had since its exec. (Its
# ru_maxrss, as getrusage(RUSAGE_CHILDREN) or wait4 give it, starts at the parent's size: Linux carries the
# high-water mark over fork and exec, so every child of this 1.4 GB test process read 1.4 GB.)
RSS_CHILD = r"""
import json, sys
from pipeline import config
from pipeline.runner import run_pipeline
stage, inp, run, cfg = sys.argv[1:5]
res = run_pipeline([stage], run, config.load(cfg), input_dir=inp, workers=0)[0]
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"reasons": res.manifest["reasons"], "peak_rss": hwm}))
"""
RSS_CAP = 4 << 30  # a child over this is killed: without the limit klite grew to 20 GB on one 10 MB caption


def _run_measured(args: list[str], cap: int = RSS_CAP) -> tuple[int, dict]:
    """(peak RSS in bytes, reasons of the stage's manifest) of a stage run in a fresh child process (RSS_CHILD);
    killed if its RSS passes `cap`, so that a regression fails this test instead of the machine."""
    p = subprocess.Popen([sys.executable, "-c", RSS_CHILD, *args], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out: dict = {}
    readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()))
               for k, f in (("out", p.stdout), ("err", p.stderr))]
    for r in readers:
        r.start()
    killed = False
    while p.poll() is None:
        try:
            rss = int(Path(f"/proc/{p.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            rss = 0
        if rss > cap:
            killed = True
            p.kill()
        time.sleep(0.05)
    for r in readers:
        r.join()
    assert not killed, f"{args[0]}: killed at {cap >> 20} MiB of RSS"
    assert p.returncode == 0, out.get("err", "")[-2000:]
    got = json.loads(out["out"].strip().splitlines()[-1])
    return got["peak_rss"], got["reasons"]


@needs_wordnet
def test_item4_a_10mb_caption_leaves_every_stages_peak_rss_within_10_percent(tmp_path, env):
    """Each stage, in a fresh process, on a 2,000-row shard with images, with and without one more row holding a
    10 MB caption: peak RSS (the child's own VmHWM) within 10%; the long row is `text_too_long`. metaclip with its
    default concept list (WordNet), as a run has it: with 4 entries its whole process is 190 MB, and reading a
    10 MB value from Parquet alone takes ~40 MB for a moment (page, dictionary, the column's buffer)."""
    cfg = tmp_path / "config.toml"
    config_mod.save(config_mod.resolve({**env["raw"], "metaclip": {"t": 1000}}), str(cfg))
    base = pool_table(2000)
    big = pool_table(1, start=2000, texts=[("a dog runs " * 1_000_000)[:10_000_000]])
    pools = {"without": write(tmp_path / "without", [base]),
             "with": write(tmp_path / "with", [pa.concat_tables([base.slice(0, 1000), big, base.slice(1000)])])}
    peaks: dict = {}
    reasons: dict = {}

    def measure(stage: str, attempt: int) -> None:
        """The two children of a stage side by side (a peak is per process): half the wait. A stage over the
        limit is measured again, the children one after the other, and that pair is kept: side by side, a peak
        can move by which child gets ahead (emit: ~1,050 or ~1,330 MiB on the same pool, 10 MB caption or not;
        one at a time, ~1,330 both), and dfn's torch by +-60 MB between identical runs."""
        with ThreadPoolExecutor(2 if attempt == 0 else 1) as pool:
            runs = {kind: pool.submit(_run_measured, [stage, str(inp), str(tmp_path / f"run-{stage}-{kind}-{attempt}"),
                                                      str(cfg)]) for kind, inp in pools.items()}
        for kind, run in runs.items():
            rss, reasons[(stage, kind)] = run.result()
            peaks[(stage, kind)] = rss

    for stage in STAGES:
        measure(stage, 0)
        if peaks[(stage, "with")] > 1.10 * peaks[(stage, "without")]:
            measure(stage, 1)
    figures = {s: (peaks[(s, "without")] >> 20, peaks[(s, "with")] >> 20) for s in STAGES}
    print("peak RSS MiB (without, with 10 MB caption):", figures)
    (tmp_path / "rss.json").write_text(json.dumps(figures))
    for s in STAGES:
        assert peaks[(s, "with")] <= 1.10 * peaks[(s, "without")], (s, figures[s])
    for (s, kind), got in reasons.items():
        assert got.get("text_too_long", 0) == (kind == "with"), (s, kind, got)


# ---- item 8: an image whose decoded size differs from its header's ----------------------------------------
def test_item8_jpeg_whose_header_lies_about_its_size_is_image_unreadable(tmp_path, env):
    """A real 300x240 JPEG whose SOF0 says 9000x9000: libjpeg decodes it without an error (the missing blocks
    come out flat grey), so it used to be kept and emitted at 9000x9000."""
    from pipeline.images import open_image
    from trainer.data import decode_image

    lie = lying_jpeg()
    t = pool_table(3)
    t = t.set_column(t.column_names.index("image"), "image", pa.array([jpeg(1), lie, jpeg(2)], pa.binary()))
    inp = write(tmp_path / "in", [t])
    res = run_pipeline(["align"], str(tmp_path / "run"), env["cfg"], input_dir=str(inp), workers=0)[0]
    got = outcome(Path(res.folder))
    assert got[t.column("uid")[1].as_py()] == "image_unreadable"
    assert got[t.column("uid")[0].as_py()] != "image_unreadable"
    for forged in (lie, lying_jpeg(progressive=True)):
        with pytest.raises(ValueError, match="9000x9000"):
            open_image(forged)  # every decoder's opener: align, dfn, the trainer, the report
    with pytest.raises(ValueError, match="9000x9000"):
        decode_image(lie, 64)  # dfn's and the trainer's decoder: never a 243 MB grey image
    for honest in (jpeg(3), jpeg(4, (2000, 1500)), lying_jpeg(320, 256)):  # a small lie is within what data can hold
        open_image(honest).load()


# ---- item 8: cryptic messages say what was wrong and what to do -----------------------------------------
def test_item8_missing_text_column_is_reported_as_text_not_uid(tmp_path, capsys):
    t = pool_table(3).drop_columns(["uid", "text"])  # no uid either: it would be computed from url + text
    inp = write(tmp_path / "in", [t])
    err = one_line_error(*run_cli(tmp_path, ["run", "align", "--run", "r", "--input", str(inp), "--workers", "0"],
                                  capsys))
    assert "missing column 'text'" in err and "'uid'" not in err, err
    assert "part-00000.parquet" in err and "url" in err, err  # names the shard, and the columns it has


def test_item8_concept_list_that_is_not_utf8_is_one_line(tmp_path, capsys, env):
    entries = tmp_path / "entries.txt"
    entries.write_bytes(b"dog\ncaf\xe9\ntree\n")  # Latin-1
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[metaclip]\nentries = {json.dumps(str(entries))}\n")
    inp = write(tmp_path / "in", [pool_table(2, images=False)])
    err = one_line_error(*run_cli(tmp_path, ["run", "metaclip", "--run", "r", "--input", str(inp), "--config",
                                             str(cfg), "--workers", "0"], capsys))
    assert str(entries) in err and "not UTF-8" in err and "0xe9" in err, err


def test_item8_checkpoint_that_is_not_one_says_so(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[dfn]\ncheckpoint = "/etc/passwd"\n')
    inp = write(tmp_path / "in", [pool_table(2)])
    err = one_line_error(*run_cli(tmp_path, ["run", "dfn", "--run", "r", "--input", str(inp), "--config", str(cfg),
                                             "--workers", "0"], capsys))
    assert "/etc/passwd is not a PyTorch checkpoint" in err and "dfn-train" in err, err
    assert "list index out of range" not in err


# ====================================================================================================
# Item 3, 5, 8, 9. One writer per run, run names, CLI errors, module:Class  (was tests/test_hostile_lock.py)
# Issue 29, items 3, 5, 8 and 9 (part): one writer per run folder (a flock locally, a lease on S3), run names
# that stay in RUNS_DIR, one line instead of a traceback for a read-only run folder, a --runs-dir that is a file
# and a `module:Class` that is not a stage, and only the steps being run are imported.
# ====================================================================================================

ROOT = Path(__file__).resolve().parents[1]
FW = "tests.stages_for_tests:FirstWordStage"
HOST = socket.gethostname()


def _error_line(stderr: str) -> str:
    """The CLI's error: exactly one line, no traceback (stderr may also hold log lines and notices)."""
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("clipcurate: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the lock file aside) and its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture()
def finished_run(tmp_path):
    """A run `r` with one finished step (the test stage), and the pool it was made from."""
    pool = tmp_path / "pool"
    make_pool(90, 3, pool)
    runs = tmp_path / "runs"
    assert cli_main(["--runs-dir", str(runs), "run", FW, "--run", "r", "--input", str(pool), "--workers", "0"]) == 0
    return runs, pool


HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from pipeline.runlock import RunLock
    RunLock(sys.argv[1], command="holder-for-test", lease_seconds=float(sys.argv[2])).acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def _hold(run_dir: str, lease_seconds: float = 60.0) -> subprocess.Popen:
    """A process that takes the run's lock (pipeline.runlock.RunLock) and sleeps, holding it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT)), run_dir, str(lease_seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if line.strip() != "held":
        proc.kill()
        raise AssertionError(f"the holder did not take the lock: {line!r} {proc.stderr.read()}")
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# ---- item 3: one writer per run folder -------------------------------------------------------------
def test_item3_second_writer_exits_2_naming_the_holder_and_touches_nothing(finished_run, tmp_path, capsys):
    """While a process holds run r's lock, every command that writes a run refuses r in one line naming the
    holder's pid and host, exit 2, and no file of the run changes (a config change that would redo the step
    included)."""
    runs, pool = finished_run
    before = _snapshot(runs / "r")
    seed = _write(tmp_path / "seed.toml", "[run]\nseed = 7\n")
    proc = _hold(str(runs / "r"))
    try:
        base = ["--runs-dir", str(runs)]
        for argv in (["run", FW, "--run", "r", "--config", seed, "--workers", "0"],
                     ["run", "--run", "r", "--workers", "0"],
                     ["ingest", str(pool), "--run", "r"],
                     ["report", "--run", "r"],
                     ["train", "--run", "r"],
                     ["dfn-train", "--run", "r", "--hq", str(pool)],
                     ["ablate", "--run", "r"]):
            capsys.readouterr()
            assert cli_main(base + argv) == 2, argv
            err = _error_line(capsys.readouterr().err)
            assert f"pid {proc.pid} on {HOST}" in err and "holder-for-test" in err, (argv, err)
            assert _snapshot(runs / "r") == before, argv
    finally:
        _kill(proc)


def test_item3_two_run_commands_at_once_the_second_is_refused(tmp_path, capsys):
    """Two `clipcurate run` on one run: the first (a real CLI process, slowed per shard) holds the lock; the
    second exits 2 naming it; the first completes undisturbed, with rows in = kept + rejected."""
    pool = tmp_path / "pool"
    make_pool(200, 8, pool)
    runs = tmp_path / "runs"
    driver = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from tests.stages_for_tests import FirstWordStage
        real = FirstWordStage.apply
        def slow(self, *a, **k):
            time.sleep(0.3)
            return real(self, *a, **k)
        FirstWordStage.apply = slow
        from pipeline.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    argv = ["--runs-dir", str(runs), "run", FW, "--run", "r", "--input", str(pool), "--workers", "0"]
    first = subprocess.Popen([sys.executable, "-c", driver, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lock = runs / "r" / ".lock"
        deadline = time.time() + 60
        while time.time() < deadline and not (lock.exists() and f'"pid": {first.pid}' in lock.read_text()):
            assert first.poll() is None, first.communicate()
            time.sleep(0.02)
        assert cli_main(argv) == 2
        err = _error_line(capsys.readouterr().err)
        assert f"pid {first.pid} on {HOST}" in err and "run r is being written" in err, err
        assert first.poll() is None, "the first run must still be running when the second is refused"
        out, err1 = first.communicate(timeout=120)
        assert first.returncode == 0, err1
    finally:
        _kill(first)
    import json

    m = json.loads((runs / "r" / "90_firstword" / "_manifest.json").read_text())
    assert m["rows_in"] == 200 == m["rows_out"] + m["rejected"]
    assert not lock.exists()  # released at exit


def test_item3_lock_left_by_a_sigkilled_holder_is_taken_over_with_a_notice(finished_run, capsys):
    """SIGKILL leaves the lock file (with the dead holder's record) behind: the next writer takes it over,
    saying whose it was, and completes; its own clean exit removes the file."""
    runs, _ = finished_run
    proc = _hold(str(runs / "r"))
    dead = proc.pid
    _kill(proc)
    assert (runs / "r" / ".lock").exists()
    capsys.readouterr()
    assert cli_main(["--runs-dir", str(runs), "run", FW, "--run", "r", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    notice = [ln for ln in err.splitlines() if ln.startswith("clipcurate: notice:")]
    assert len(notice) == 1 and f"pid {dead} on {HOST}" in notice[0] and "gone" in notice[0], err
    assert not (runs / "r" / ".lock").exists()


def test_item3_the_lock_is_reentrant_within_a_process_and_leaves_no_empty_run(tmp_path):
    """Code that runs another command's code in-process re-enters its own lock (a second flock on a new
    descriptor would conflict); the outermost release lets go. A lock on a run that did not exist leaves no
    empty folder behind."""
    from pipeline.runlock import RunLock, held

    run = tmp_path / "runs" / "new"
    with RunLock(str(run)):
        with RunLock(str(run)):
            assert held(str(run))
        assert held(str(run)) and (run / ".lock").exists()
    assert not held(str(run)) and not (tmp_path / "runs").exists()


S3_HOLDER_LEASE = 1.5  # seconds: the helper's lease, renewed every 0.5 s while it lives


@pytest.fixture()
def s3(tmp_path):
    """A fresh moto server on 127.0.0.1 for each lease test (tests/s3_server.py)."""
    with moto_s3(tmp_path, "locks") as fs:
        yield fs


def test_item3_lease_on_s3_refuses_a_second_holder_and_takes_over_an_expired_one(s3, tmp_path, capsys):
    """On S3 the lock is a lease object: a live holder's lease (renewed while it lives, past its 1.5 s life)
    refuses a second writer in one line naming it; once the holder is SIGKILLed its lease expires and the next
    writer takes it over with a notice, runs, and deletes the lease at exit."""
    pool = tmp_path / "pool"
    make_pool(60, 2, pool)
    runs = "s3://locks/runs"
    lease = "locks/runs/r/.lock"
    proc = _hold(f"{runs}/r", S3_HOLDER_LEASE)
    argv = ["--runs-dir", runs, "run", FW, "--run", "r", "--input", str(pool), "--workers", "0"]
    try:
        assert s3.exists(lease)
        for wait in (0, 2 * S3_HOLDER_LEASE):  # refused at once, and still after the lease's life: renewed
            time.sleep(wait)
            capsys.readouterr()
            assert cli_main(argv) == 2
            err = _error_line(capsys.readouterr().err)
            assert f"pid {proc.pid} on {HOST}" in err and "being written" in err, err
        assert not s3.exists("locks/runs/r/config.toml")  # the refused writer wrote nothing
    finally:
        _kill(proc)
    time.sleep(S3_HOLDER_LEASE + 0.5)  # the dead holder's lease expires
    capsys.readouterr()
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    notice = [ln for ln in err.splitlines() if ln.startswith("clipcurate: notice:")]
    assert len(notice) == 1 and f"pid {proc.pid} on {HOST}" in notice[0] and "expired" in notice[0], err
    s3.invalidate_cache()
    assert s3.exists("locks/runs/r/90_firstword/_manifest.json") and not s3.exists(lease)


# ---- item 5: run names ------------------------------------------------------------------------------
BAD_NAMES = ["../escape", "ABS", "..", ".", "", "a/b", "a\\b", "sp ace", "x\n"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_item5_a_run_name_that_is_not_one_folder_name_is_one_line_and_creates_nothing(tmp_path, capsys, name):
    """A run name is one path component of [A-Za-z0-9._-], not . or ..: anything else, given to any command
    (or as report's --compare), is one line, exit 2, and nothing is created anywhere."""
    work = tmp_path / "work"
    pool = tmp_path / "pool"
    make_pool(20, 1, pool)
    work.mkdir()
    name = str(tmp_path / "abs") if name == "ABS" else name
    runs = work / "runs"
    before = _tree(tmp_path)
    base = ["--runs-dir", str(runs)]
    for argv in (["run", FW, "--run", name, "--input", str(pool), "--workers", "0"],
                 ["ingest", str(pool), "--run", name],
                 ["report", "--run", name],
                 ["train", "--run", name],
                 ["ablate", "--run", name],
                 ["eval", "--run", name, "--data", str(pool)]):
        capsys.readouterr()
        assert cli_main(base + argv) == 2, argv
        err = _error_line(capsys.readouterr().err)
        assert "is not a run name" in err, (argv, err)
        assert _tree(tmp_path) == before, argv
    runs.mkdir()
    (runs / "ok").mkdir()
    before = _tree(tmp_path)
    assert cli_main(base + ["report", "--run", "ok", "--compare", name]) == 2
    assert "--compare" in _error_line(capsys.readouterr().err)
    assert _tree(tmp_path) == before


# ---- item 8: one line instead of a traceback ---------------------------------------------------------
def test_item8_runs_dir_that_is_a_file_on_ingest_is_one_line(tmp_path, capsys):
    pool = tmp_path / "pool"
    make_pool(20, 1, pool)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for runs in (afile, afile / "below"):
        assert cli_main(["--runs-dir", str(runs), "ingest", str(pool), "--run", "r"]) == 2
        err = _error_line(capsys.readouterr().err)
        assert "--runs-dir" in err and "file" in err, err
    assert afile.read_text() == "not a folder"


def test_item8_report_on_a_read_only_run_folder_is_one_line(tmp_path, capsys):
    """`report` on a run folder it cannot write: a read-only mount (chmod does not stop root) and a run whose
    report/ is a file. One line each, exit 2, the run unchanged."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        pool = tmp_path / "pool"
        make_pool(60, 2, pool)
        base = ["--runs-dir", str(disk)]
        assert cli_main(base + ["run", FW, "--run", "t", "--input", str(pool), "--workers", "0"]) == 0
        before = _snapshot(disk / "t")
        r = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True)
        assert r.returncode == 0, r.stderr
        capsys.readouterr()
        assert cli_main(base + ["report", "--run", "t"]) == 2
        err = _error_line(capsys.readouterr().err)
        assert "Read-only file system" in err and str(disk / "t") in err, err
        assert _snapshot(disk / "t") == before
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    runs = tmp_path / "runs"
    assert cli_main(["--runs-dir", str(runs), "run", FW, "--run", "t", "--input", str(pool), "--workers", "0"]) == 0
    (runs / "t" / "report").write_text("a file where the report folder goes")
    capsys.readouterr()
    assert cli_main(["--runs-dir", str(runs), "report", "--run", "t"]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "cannot write the report" in err, err


@pytest.mark.parametrize("step, named", [("os:system", "function"), ("collections:OrderedDict", "class OrderedDict"),
                                         ("pipeline.stage:Stage", "class Stage")])
def test_item8_a_module_class_that_is_not_a_stage_is_one_line_naming_it(tmp_path, capsys, step, named):
    """`module:Class` naming something that is not a Stage subclass, on the command line or in [run] stages: one
    line naming it, exit 2, no run left behind."""
    pool = tmp_path / "pool"
    make_pool(20, 1, pool)
    runs = tmp_path / "runs"
    cfg = _write(tmp_path / "c.toml", f'[run]\nstages = ["{step}"]\n')
    for argv in (["run", step, "--run", "a", "--input", str(pool), "--workers", "0"],
                 ["run", "--run", "b", "--input", str(pool), "--config", cfg, "--workers", "0"]):
        assert cli_main(["--runs-dir", str(runs)] + argv) == 2
        err = _error_line(capsys.readouterr().err)
        assert f"'{step}' is not a stage" in err and named in err, err
    assert not runs.exists() or not list(runs.iterdir())


# ---- item 9: only the steps being run are imported ------------------------------------------------------
MARKING_MODULE = """
import os, pathlib
pathlib.Path(os.environ["CLIPCURATE_TEST_MARKER"]).write_text("imported")
from tests.stages_for_tests import FirstWordStage


class Marking(FirstWordStage):
    name = "marking"
"""


@pytest.fixture()
def marking_recipe(tmp_path, monkeypatch):
    """A user's module whose import writes a marker file, importable from the current folder, and a recipe
    naming it after the test stage. Returns (module, marker, pool, runs, recipe config)."""
    work = tmp_path / "work"
    work.mkdir()
    module = f"lockmark_{os.getpid()}_{time.monotonic_ns()}"
    (work / f"{module}.py").write_text(MARKING_MODULE)
    marker = tmp_path / "imported"
    monkeypatch.setenv("CLIPCURATE_TEST_MARKER", str(marker))
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    pool = tmp_path / "pool"
    make_pool(60, 2, pool)
    cfg = _write(tmp_path / "c.toml", f'[run]\nstages = ["{FW}", "{module}:Marking"]\n')
    yield module, marker, pool, tmp_path / "runs", cfg
    sys.modules.pop(module, None)


def test_item9_a_step_that_is_not_run_is_not_imported(tmp_path, marking_recipe):
    """The recipe names a user's module whose import writes a marker file; commands that run another step (a
    first run, then a config change on the run, which reads the recipe to say what it redoes) never import it.
    Running it does."""
    module, marker, pool, runs, cfg = marking_recipe
    seed = _write(tmp_path / "seed.toml", "[run]\nseed = 3\n")
    base = ["--runs-dir", str(runs)]
    assert cli_main(base + ["run", FW, "--run", "r", "--input", str(pool), "--config", cfg, "--workers", "0"]) == 0
    assert not marker.exists(), "a step that was not run was imported"
    assert cli_main(base + ["run", FW, "--run", "r", "--input", str(pool), "--config", seed, "--workers", "0"]) == 0
    assert not marker.exists(), "a step that was not run was imported (config change)"
    assert cli_main(base + ["run", f"{module}:Marking", "--run", "r", "--workers", "0"]) == 0
    assert marker.exists() and (runs / "r" / "01_marking" / "_manifest.json").exists()


def test_item9_a_later_step_is_not_imported_when_a_run_reads_its_own_input(tmp_path, marking_recipe):
    """A rerun without --input finds its input through the recipe (the pool the run was started on): the steps
    after the one it runs are not imported to do so."""
    module, marker, pool, runs, cfg = marking_recipe
    base = ["--runs-dir", str(runs)]
    assert cli_main(base + ["run", FW, "--run", "r", "--input", str(pool), "--config", cfg, "--workers", "0"]) == 0
    seed = _write(tmp_path / "seed.toml", "[run]\nseed = 3\n")
    assert cli_main(base + ["run", FW, "--run", "r", "--config", seed, "--workers", "0"]) == 0
    assert not marker.exists(), "a step that was not run was imported (a run reading its recorded input)"


# ====================================================================================================
# Item 6. Outputs are verified before they are trusted  (was tests/test_hostile_verify.py)
# Issue 29, item 6: outputs are verified before they are trusted.
#
# A finished step's done-markers record the size and XXH3 digest of every file its shard task wrote. A resume
# checks sizes always, digests with `--verify`; a shard that fails is redone (one line says which file, and
# what differs), byte-identical to the original. A later step never reads an earlier step's output that failed:
# run in the same command, the earlier step redoes it first; not run, the later step refuses in one line.
#
# Text-only runs of a two-step recipe of the test stage (`00_firstword-a` -> `01_firstword-b`), in-process.
# ====================================================================================================

S = "tests.stages_for_tests:FirstWordStage"
A, B = "00_firstword-a", "01_firstword-b"
SHARD = "part-00001.parquet"


def _setup(tmp_path: Path) -> tuple[list[str], Path]:
    """A pool of 3 text shards and a config whose recipe is the test stage twice; returns (common argv, run)."""
    make_pool(600, 3, tmp_path / "in")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[run]\nstages = ["{S}@a", "{S}@b"]\n\n["{S}@b"]\nkeep = 0.8\n')
    runs = tmp_path / "runs"
    return ["--runs-dir", str(runs)], runs / "r"


def _run(common: list[str], *extra: str, first: bool = False, cfg: Path | None = None) -> int:
    argv = [*common, "run", *extra, "--run", "r", "--workers", "0"]
    if first:
        argv += ["--input", str(cfg.parent / "in"), "--config", str(cfg)]
    return cli_main(argv)


def _digests(run: Path) -> dict[str, str]:
    """sha256 of every shard (kept and rejected) and every statistics file of both steps."""
    out = {}
    for step in (A, B):
        for p in sorted((run / step).rglob("*")):
            if p.is_file() and (p.suffix == ".parquet" or "stats" in p.parts):
                out[str(p.relative_to(run))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*.parquet")}


def _finished(tmp_path: Path) -> tuple[list[str], Path, dict[str, str]]:
    common, run = _setup(tmp_path)
    assert _run(common, first=True, cfg=tmp_path / "cfg.toml") == 0
    return common, run, _digests(run)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a data page: same size, other bytes
    path.write_bytes(bytes(data))


def _lines(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


def test_item6_truncated_shard_of_a_finished_step_is_redone_byte_identical(tmp_path, caplog):
    common, run, before = _finished(tmp_path)
    b_times = _mtimes(run / B)
    target = run / A / SHARD
    with open(target, "r+b") as f:
        f.truncate(target.stat().st_size // 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipcurate"):
        assert _run(common) == 0
    said = _lines(caplog, "redoing it")
    assert len(said) == 1, said  # one line: which step, which shard, which file, what differs
    assert f"{S}@a: shard {SHARD}: {SHARD} is " in said[0] and "size differs" in said[0], said
    assert f"{S}@a: 1 shards to do" in caplog.text  # not "3 shards up to date, skipped"
    assert _digests(run) == before  # repaired, byte-identical
    assert _mtimes(run / B) == b_times  # the later step's outputs were made from the same bytes: not redone
    # a missing rejected shard is redone too
    (run / A / "rejected" / SHARD).unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipcurate"):
        assert _run(common) == 0
    assert len(_lines(caplog, f"rejected/{SHARD} is missing")) == 1
    assert _digests(run) == before


def test_item6_flipped_byte_is_trusted_on_sizes_and_redone_with_verify(tmp_path, caplog):
    common, run, before = _finished(tmp_path)
    target = run / A / SHARD
    _flip_a_byte(target)
    flipped = target.read_bytes()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipcurate"):
        assert _run(common, S + "@a") == 0
    assert target.read_bytes() == flipped  # a plain resume checks sizes only: the same size is trusted
    assert not _lines(caplog, "redoing it") and "3 shards up to date, skipped" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipcurate"):
        assert _run(common, "--verify") == 0
    said = _lines(caplog, "redoing it")
    assert len(said) == 1 and SHARD in said[0] and "digest differs" in said[0], said
    assert _digests(run) == before


def test_item6_later_step_never_reads_a_failed_output(tmp_path, caplog, capsys):
    common, run, before = _finished(tmp_path)
    b_times = _mtimes(run / B)
    read = []
    real = shards.read_shard

    def spy(path, *a, **k):
        read.append(str(path))
        return real(path, *a, **k)

    # the later step alone, its earlier step not run: refused in one line before anything is read or written.
    # A config change redoes every shard of b, so without the check it would read a's truncated shard.
    (tmp_path / "more.toml").write_text(f'["{S}@b"]\nkeep = 0.7\n')
    target = run / A / SHARD
    with open(target, "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    import pipeline.runner as runner

    runner.shards.read_shard = spy
    try:
        code = _run(common, S + "@b", "--config", str(tmp_path / "more.toml"))
    finally:
        runner.shards.read_shard = real
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert SHARD in err[0] and "size differs" in err[0] and f"clipcurate run {S}@a,{S}@b" in err[0]
    assert not any(A in p for p in read), read
    assert _mtimes(run / B) == b_times
    # same with a flipped byte under --verify (without it, sizes match and b would read it)
    assert _run(common, S + "@a") == 0 and _digests(run) == before
    _flip_a_byte(target)
    capsys.readouterr()
    assert _run(common, S + "@b", "--verify") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "digest differs" in err[0], err
    # run together, the earlier step repairs the shard before the later one reads it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipcurate"):
        assert _run(common, f"{S}@a,{S}@b", "--verify") == 0
    assert len(_lines(caplog, "redoing it")) == 1
    assert _digests(run) == before


def test_item6_saved_statistics_are_checked_before_reuse(tmp_path, caplog):
    common, run, before = _finished(tmp_path)
    stats = next(p for p in (run / A / "stats").rglob("*") if p.is_file())
    with open(stats, "r+b") as f:
        f.truncate(3)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipcurate"):
        assert _run(common, S + "@a") == 0
    said = _lines(caplog, "recomputing them")
    assert len(said) == 1 and "size differs" in said[0], said
    assert _digests(run) == before


def test_item6_marker_of_an_older_version_is_redone_once(tmp_path, caplog):
    common, run, before = _finished(tmp_path)
    for marker in (run / A / "_done").glob("*.json"):
        done = json.loads(marker.read_text())
        assert set(done["files"]) == {marker.stem, f"rejected/{marker.stem}"}
        assert all(set(r) == {"size", "xxh3"} for r in done["files"].values())
        del done["files"]
        marker.write_text(json.dumps(done))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipcurate"):
        assert _run(common, S + "@a") == 0
    said = _lines(caplog, "older clipcurate")
    assert len(said) == 1 and "3 shards" in said[0], said  # one line for the step, not one per shard
    assert _digests(run) == before
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipcurate"):
        assert _run(common, S + "@a", "--verify") == 0
    assert "3 shards up to date, skipped" in caplog.text and not _lines(caplog, "older clipcurate")


def _image_pool(folder: Path) -> None:
    from PIL import Image

    rows = []
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(buf, "JPEG")
        rows.append({"url": f"http://x.invalid/{i}.jpg", "text": f"caption {i}", "image": buf.getvalue()})
    t = pa.Table.from_pylist(rows)
    shards.write_shard(t.append_column("uid", compute_uid(t.column("url"), t.column("text"))),
                       str(folder / "part-00000.parquet"))


def test_item6_emitted_training_set_is_checked_before_reuse(tmp_path, caplog):
    _image_pool(tmp_path / "in")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[emit]\nsamples_per_shard = 4\n")
    common = ["--runs-dir", str(tmp_path / "runs")]
    assert cli_main([*common, "run", "emit", "--run", "r", "--input", str(tmp_path / "in"), "--config", str(cfg),
                     "--workers", "0"]) == 0
    out = tmp_path / "runs" / "r" / "emit"
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".tar", ".parquet", ".npy")
                   or p.name == "sizes.json")
    before = {p: p.read_bytes() for p in files}
    tar = out / "wds" / "part-00001.tar"
    with open(tar, "r+b") as f:
        f.truncate(512)
    _flip_a_byte(out / "parquet" / "part-00000.parquet")
    (out / "wds" / "sizes.json").write_text("{}")
    argv = [*common, "run", "emit", "--run", "r", "--workers", "0"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipcurate"):
        assert cli_main(argv) == 0
    said = _lines(caplog, "rewritten")
    assert len(said) == 1 and "wds/part-00001.tar" in said[0] and "size differs" in said[0], said
    assert all(p.read_bytes() == before[p] for p in files if p.suffix != ".parquet" or "part-00000" not in p.name)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipcurate"):
        assert cli_main([*argv, "--verify"]) == 0
    said = _lines(caplog, "rewritten")
    assert len(said) == 1 and "parquet/part-00000.parquet" in said[0] and "digest differs" in said[0], said
    assert {p: p.read_bytes() for p in files} == before


def test_item6_flag_on_run_and_ingest():
    from pipeline.cli import build_parser

    p = build_parser()
    assert p.parse_args(["run", "align", "--run", "r", "--verify"]).verify is True
    assert p.parse_args(["run", "align", "--run", "r"]).verify is False
    assert p.parse_args(["ingest", "urls.parquet", "--run", "r", "--verify"]).verify is True


def test_item6_file_records_are_hashed_as_written(tmp_path):
    """The record a write returns is the file's own (size, XXH3-128 of its bytes), streamed in blocks."""
    import xxhash

    t = pa.table({"x": list(range(50_000))})
    rec = shards.write_shard(t, str(tmp_path / "a.parquet"))
    data = (tmp_path / "a.parquet").read_bytes()
    assert rec == {"size": len(data), "xxh3": xxhash.xxh3_128(data).hexdigest()}
    assert shards.file_record(str(tmp_path / "a.parquet")) == rec
    big = os.urandom(shards.DIGEST_BLOCK * 2 + 7)
    assert shards.write_bytes(big, str(tmp_path / "b")) == shards.file_record(str(tmp_path / "b"))
    assert shards.file_mismatch(str(tmp_path / "a.parquet"), rec, digest=True) is None
    assert "missing" in shards.file_mismatch(str(tmp_path / "nope"), rec)
    assert not shards.safe_relative("../x") and not shards.safe_relative("/etc/passwd")
    assert shards.safe_relative("rejected/part-00000.parquet")


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "/etc/passwd", "rejected/../../x"])
def test_item6_marker_cannot_point_outside_its_folder(tmp_path, caplog, bad):
    common, run, before = _finished(tmp_path)
    marker = run / A / "_done" / f"{SHARD}.json"
    done = json.loads(marker.read_text())
    done["files"][bad] = {"size": 1, "xxh3": "0" * 32}
    marker.write_text(json.dumps(done))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipcurate"):
        assert _run(common, S + "@a") == 0
    said = _lines(caplog, "redoing it")
    assert len(said) == 1 and "does not list its files" in said[0], said
    assert _digests(run) == before


# ====================================================================================================
# Item 7. A WebDataset crawl used in place is read defensively  (was tests/test_hostile_crawl.py)
# Issue 29, item 7 (a WebDataset crawl used in place is read defensively) and the crawl without img2dataset's
# optional columns (item 8's ColumnNotFoundError). Crawls built by hand in img2dataset's layout: NNNNN.tar
# (`KEY.jpg`, `KEY.json`, `KEY.txt`, as webdataset's TarWriter orders them) + NNNNN.parquet (every sample's
# metadata) + NNNNN_stats.json; each driven through the CLI, so no traceback and no silent loss is what is tested.
# ====================================================================================================

CRAWL_HOST = "http://crawl.invalid"


def _jpeg(i: int, pad: int = 0) -> bytes:
    """A small JPEG that is different for every i; `pad`: zeros after its end to that many bytes (decoders
    ignore them), so that every sample's members have the same sizes."""
    b = io.BytesIO()
    Image.new("RGB", (32 + i % 8, 24), ((37 * i) % 256, (91 * i) % 256, 120)).save(b, "JPEG", quality=90)
    return b.getvalue().ljust(pad, b"\0")


def _sample(i: int, key: str | None = None, caption: str | None = None, pad: bool = False) -> dict:
    key = key or f"{i:09d}"
    caption = caption or f"sample {i:03d} a photo of thing number {i:03d}"
    meta = {"url": f"{CRAWL_HOST}/{i}.jpg", "caption": caption, "key": key, "status": "success", "error_message": None,
            "width": 32 + i % 8, "height": 24, "original_width": 32 + i % 8, "original_height": 24}
    js = json.dumps(meta, indent=4).encode()
    return {"key": key, "jpg": _jpeg(i, 4096 if pad else 0), "json": js.ljust(1024) if pad else js,
            "txt": caption.encode(), "meta": meta}


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _members(samples: list[dict]) -> list[tuple[str, bytes]]:
    return [(f"{s['key']}.{ext}", s[ext]) for s in samples for ext in ("jpg", "json", "txt")]


def _write_crawl(folder: Path, samples: list[dict], tar: bytes | None = None, parquet: bool = True,
                 drop_columns: tuple[str, ...] = ()) -> Path:
    """An img2dataset WebDataset output folder of one shard 00000; `tar` replaces the tar's bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "00000.tar").write_bytes(tar if tar is not None else _tar_bytes(_members(samples)))
    if parquet:
        rows = [s["meta"] for s in samples]
        table = pa.table({c: [r[c] for r in rows] for c in rows[0]})
        if "error_message" in table.column_names:  # all null: typed as img2dataset types it
            table = table.set_column(table.schema.get_field_index("error_message"), "error_message",
                                     pa.nulls(len(rows), pa.string()))
        pq.write_table(table.drop_columns(list(drop_columns)), folder / "00000.parquet")
    (folder / "00000_stats.json").write_text(json.dumps({"count": len(samples), "successes": len(samples)}))
    return folder


def _ingest(tmp_path: Path, crawl: Path, run: str = "r") -> tuple[int, Path]:
    runs = tmp_path / "runs"
    code = cli_main(["--runs-dir", str(runs), "ingest", str(crawl), "--run", run, "--workers", "0"])
    return code, runs / run


def _kept(run: Path) -> list[dict]:
    parts = sorted(glob.glob(str(run / "00_ingest" / "part-*.parquet")))
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def _rejected(run: Path) -> list[dict]:
    parts = sorted(glob.glob(str(run / "00_ingest" / "rejected" / "*.parquet")))
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def _manifest(run: Path) -> dict:
    return shards.read_json(str(run / "00_ingest" / "_manifest.json"))


def _reasons(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        kind = r["reason"].split(":")[0]
        out[kind] = out.get(kind, 0) + 1
    return out


def _kept_bytes(run: Path, kept: list[dict]) -> list[bytes | None]:
    reader = ImageStore.load(str(run)).reader()
    return reader.read(pa.array([r["image_ref"] for r in kept], pa.string())).to_pylist()


def _assert_pairs_intact(run: Path, kept: list[dict], samples: list[dict]) -> None:
    """Every kept row's caption and url belong with the image bytes its reference reads."""
    by_caption = {s["meta"]["caption"]: s for s in samples}
    for row, blob in zip(kept, _kept_bytes(run, kept)):
        s = by_caption[row["text"]]
        assert row["url"] == s["meta"]["url"]
        assert blob == s["jpg"], f"{row['text']!r} is paired with another sample's image"


def _header_offsets(tar: bytes) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of every member."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        return [(m.name, m.offset, m.offset_data) for m in tf.getmembers()]


def _set_size(tar: bytes, header_at: int, size: int) -> bytes:
    """The tar with one member header claiming `size` bytes, its checksum made right again (a header that
    lies, not a damaged one)."""
    b = bytearray(tar)
    h = header_at
    b[h + 124:h + 136] = b"%011o\0" % size
    b[h + 148:h + 156] = b" " * 8
    b[h + 148:h + 156] = b"%06o\0 " % sum(b[h:h + 512])
    return bytes(b)


# ---- item 7: truncated_tar -------------------------------------------------------------------------------
@pytest.mark.parametrize("lie", ["into_a_member", "into_the_end_zeros", "onto_a_later_header", "onto_its_own_txt",
                                 "bad_checksum"])
def test_item7_a_lying_header_rejects_the_rest_of_its_tar_as_truncated_tar_and_keeps_what_came_before(tmp_path, lie):
    """Sample 10's image header of a 20-sample tar lies about its size: its next header falls inside a member
    (garbage), in the end-of-archive zeros (tarfile sees a clean end), exactly on sample 15's header or on its own
    .txt member's (tarfile reads on from there), or the header's checksum is wrong (tarfile stops there without a
    word). The samples the tar cannot vouch for are truncated_tar, every other one is kept."""
    samples = [_sample(i) for i in range(20)]
    tar = _tar_bytes(_members(samples))
    heads = {name: (h, d) for name, h, d in _header_offsets(tar)}
    h10, d10 = heads["000000010.jpg"]
    if lie == "into_a_member":  # 512 bytes into sample 12's image bytes
        tar = _set_size(tar, h10, heads["000000012.jpg"][1] + 512 - d10)
    elif lie == "into_the_end_zeros":
        tar = _set_size(tar, h10, len(tar) - 2048 - d10)
    elif lie == "onto_a_later_header":
        tar = _set_size(tar, h10, heads["000000015.jpg"][0] - d10)
    elif lie == "onto_its_own_txt":  # hides only sample 10's .json member: the sample is seen, but not whole
        tar = _set_size(tar, h10, heads["000000010.txt"][0] - d10)
    else:
        tar = tar[:h10 + 124] + b"%011o\0" % 3_000 + tar[h10 + 136:]  # size changed, checksum not
    lost = {"onto_a_later_header": range(10, 15), "onto_its_own_txt": range(10, 11)}.get(lie, range(10, 20))
    crawl = _write_crawl(tmp_path / "crawl", samples, tar=tar)
    code, run = _ingest(tmp_path, crawl)
    assert code == 0
    kept, rejected, m = _kept(run), _rejected(run), _manifest(run)
    assert m["rows_in"] == 20 == m["rows_out"] + m["rejected"]  # no row lost silently
    assert sorted(r["text"] for r in kept) == sorted(s["meta"]["caption"] for i, s in enumerate(samples) if i not in lost)
    assert _reasons(rejected) == {"truncated_tar": len(lost)}
    assert sorted(r["url"] for r in rejected) == sorted(samples[i]["meta"]["url"] for i in lost)
    _assert_pairs_intact(run, kept, samples)


@pytest.mark.parametrize("with_parquet", [True, False])
def test_item7_a_tar_cut_inside_a_member_keeps_the_whole_samples_before_it(tmp_path, with_parquet):
    samples = [_sample(i) for i in range(20)]
    tar = _tar_bytes(_members(samples))
    _, _, data12 = next(x for x in _header_offsets(tar) if x[0] == "000000012.jpg")
    crawl = _write_crawl(tmp_path / "crawl", samples, tar=tar[:data12 + 200], parquet=with_parquet)
    code, run = _ingest(tmp_path, crawl)
    assert code == 0
    kept, rejected, m = _kept(run), _rejected(run), _manifest(run)
    assert sorted(r["text"] for r in kept) == sorted(s["meta"]["caption"] for s in samples[:12])
    _assert_pairs_intact(run, kept, samples)
    if with_parquet:  # NNNNN.parquet names every sample: each one past the cut is a truncated_tar row
        assert m["rows_in"] == 20 == m["rows_out"] + m["rejected"]
        assert _reasons(rejected) == {"truncated_tar": 8}
    else:  # only the .json members describe samples: the one whose image header survived is named
        assert m["rows_in"] == 13 == m["rows_out"] + m["rejected"]
        assert _reasons(rejected) == {"truncated_tar": 1}


# ---- item 7: duplicate_key -------------------------------------------------------------------------------
@pytest.mark.parametrize("with_parquet", [True, False])
def test_item7_a_duplicate_key_rejects_every_later_copy_and_keeps_the_first_copy_paired(tmp_path, with_parquet):
    a = _sample(1, key="000000001", caption="the first copy: a red kite")
    b = _sample(2)
    a2 = _sample(3, key="000000001", caption="the second copy: a green boat")  # same key, other sample
    a3 = _sample(4, key="000000001", caption="the third copy: a blue house")
    samples = [a, b, a2, a3]
    crawl = _write_crawl(tmp_path / "crawl", samples, parquet=with_parquet)
    code, run = _ingest(tmp_path, crawl)
    assert code == 0
    kept, rejected, m = _kept(run), _rejected(run), _manifest(run)
    assert m["rows_in"] == 4 == m["rows_out"] + m["rejected"]
    assert sorted(r["text"] for r in kept) == sorted([a["meta"]["caption"], b["meta"]["caption"]])
    assert _reasons(rejected) == {"duplicate_key": 2}
    assert sorted(r["text"] for r in rejected) == sorted([a2["meta"]["caption"], a3["meta"]["caption"]])
    _assert_pairs_intact(run, kept, samples)  # the kept copy's caption with its own image, byte for byte


# ---- item 7: bad_metadata --------------------------------------------------------------------------------
@pytest.mark.parametrize("with_parquet", [True, False])
def test_item7_a_malformed_json_member_is_bad_metadata_not_a_traceback(tmp_path, with_parquet):
    samples = [_sample(i) for i in range(6)]
    samples[1]["json"] = b'{"url": "http://crawl.invalid/1.jpg", "caption": "unterminated'
    samples[3]["json"] = b"[1, 2, 3]"
    samples[4]["json"] = json.dumps({**samples[4]["meta"], "width": "wide"}).encode()
    crawl = _write_crawl(tmp_path / "crawl", samples, parquet=with_parquet)
    code, run = _ingest(tmp_path, crawl)
    assert code == 0
    kept, rejected, m = _kept(run), _rejected(run), _manifest(run)
    assert m["rows_in"] == 6 == m["rows_out"] + m["rejected"]
    assert _reasons(rejected) == {"bad_metadata": 3}
    assert sorted(r["text"] for r in kept) == sorted(samples[i]["meta"]["caption"] for i in (0, 2, 5))
    _assert_pairs_intact(run, kept, samples)


# ---- item 7: members that name something outside -------------------------------------------------------
def test_item7_a_member_named_with_dotdot_an_absolute_path_or_a_link_is_never_a_sample(tmp_path):
    good = [_sample(i) for i in range(3)]
    evil = {"../escape": _sample(7), "/abs/escape": _sample(8)}
    members = _members(good)
    for key, s in evil.items():
        members += [(f"{key}.jpg", s["jpg"]), (f"{key}.json", s["json"]), (f"{key}.txt", s["txt"])]
    buf = io.BytesIO(_tar_bytes(members))
    with tarfile.open(fileobj=buf, mode="a") as tf:  # a link named like a sample, its .json a regular file
        link = tarfile.TarInfo("000000009.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        js = _sample(9)["json"]
        ti = tarfile.TarInfo("000000009.json")
        ti.size = len(js)
        tf.addfile(ti, io.BytesIO(js))
    crawl = _write_crawl(tmp_path / "crawl", good, tar=buf.getvalue(), parquet=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, run = _ingest(tmp_path, crawl)
    assert code == 0
    kept, rejected, m = _kept(run), _rejected(run), _manifest(run)
    assert sorted(r["text"] for r in kept) == sorted(s["meta"]["caption"] for s in good)
    _assert_pairs_intact(run, kept, good)
    assert _reasons(rejected) == {"unsafe_member": 3}
    assert m["rows_in"] == m["rows_out"] + m["rejected"] == 6
    # nothing was written anywhere but the run folder, and no file is named after a member
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert [p for p in after if p not in before and p.parts[0] != "runs"] == []
    assert not [p for p in after if "escape" in p.name or p.name.startswith("000000009")]
    assert not (tmp_path.parent / "escape.jpg").exists() and not Path("/abs/escape.jpg").exists()


# ---- the image reader: a tar changed after it was indexed ------------------------------------------------
def test_item7_a_tar_rewritten_after_ingest_gives_no_bytes_rather_than_another_samples(tmp_path):
    """Every sample's members of the same sizes: the tar rewritten in reverse order puts another sample's image
    exactly where the index recorded each one (same offset, same size)."""
    samples = [_sample(i, pad=True) for i in range(6)]
    crawl = _write_crawl(tmp_path / "crawl", samples)
    code, run = _ingest(tmp_path, crawl)
    assert code == 0
    kept = _kept(run)
    assert len(kept) == 6
    _assert_pairs_intact(run, kept, samples)
    (crawl / "00000.tar").write_bytes(_tar_bytes(_members(samples[::-1])))
    assert _kept_bytes(run, kept) == [None] * 6  # no bytes (image_unreadable in align), not another sample's
    # a rewrite that keeps each sample's image where it was still reads it
    (crawl / "00000.tar").write_bytes(_tar_bytes(_members(samples)))
    _assert_pairs_intact(run, kept, samples)



def test_item7_emit_refuses_rows_whose_tar_was_rewritten_after_the_stages_before_it(tmp_path, capsys):
    """The reader gives no bytes for a reference that no longer names its member; emit, the resharder, must then
    stop in one line rather than write samples without their images into the training set."""
    samples = [_sample(i, pad=True) for i in range(6)]
    crawl = _write_crawl(tmp_path / "crawl", samples)
    code, run = _ingest(tmp_path, crawl)
    assert code == 0
    (crawl / "00000.tar").write_bytes(_tar_bytes(_members(samples[::-1])))
    capsys.readouterr()
    code = cli_main(["--runs-dir", str(tmp_path / "runs"), "run", "emit", "--run", "r", "--workers", "0",
                     "--input", str(run / "00_ingest")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "images can no longer be read from the image store" in err
    assert not list((run / "emit").glob("wds/*.tar"))

# ---- a crawl without img2dataset's optional columns --------------------------------------------------------
def test_item8_a_webdataset_crawl_without_error_message_or_sizes_is_ingested(tmp_path):
    samples = [_sample(i) for i in range(4)]
    for s in samples:
        for c in ("error_message", "width", "height", "original_width", "original_height"):
            s["meta"].pop(c)
        s["json"] = json.dumps(s["meta"]).encode()
    crawl = _write_crawl(tmp_path / "crawl", samples)
    code, run = _ingest(tmp_path, crawl)
    assert code == 0
    kept = _kept(run)
    assert sorted(r["text"] for r in kept) == sorted(s["meta"]["caption"] for s in samples)
    _assert_pairs_intact(run, kept, samples)
    # and with no NNNNN.parquet beside the tar: its .json members alone
    crawl2 = _write_crawl(tmp_path / "crawl2", samples, parquet=False)
    code, run2 = _ingest(tmp_path, crawl2, run="r2")
    assert code == 0 and len(_kept(run2)) == 4


def test_item8_a_parquet_crawl_without_error_message_is_ingested_and_without_url_is_one_line(tmp_path, capsys):
    samples = [_sample(i) for i in range(4)]
    crawl = tmp_path / "pq"
    crawl.mkdir()
    rows = [s["meta"] for s in samples]
    table = pa.table({"caption": [r["caption"] for r in rows], "url": [r["url"] for r in rows],
                      "status": ["success", "success", "failed_to_download", "success"],
                      "jpg": pa.array([s["jpg"] if i != 2 else None for i, s in enumerate(samples)], pa.binary())})
    pq.write_table(table, crawl / "00000.parquet")
    (crawl / "00000_stats.json").write_text(json.dumps({"count": 4, "successes": 3}))
    code, run = _ingest(tmp_path, crawl)
    assert code == 0
    m = _manifest(run)
    assert (m["rows_in"], m["rows_out"], m["rejected"]) == (4, 3, 1)
    assert _reasons(_rejected(run)) == {"failed_to_download": 1}
    # a crawl without `url` (a column every row needs): one line naming it, no traceback
    pq.write_table(table.drop_columns(["url"]), crawl / "00000.parquet")
    capsys.readouterr()
    code, _ = _ingest(tmp_path, crawl, run="r2")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'url'" in err[0] and err[0].startswith("clipcurate: error:")
