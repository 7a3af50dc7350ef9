"""The demo world generator and its loopback server."""

from __future__ import annotations

import hashlib
import io
import os
import urllib.error
import urllib.request

import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from demo.world import BOILERPLATE, COLOURS, KINDS, SHAPES, WEB_ONLY_KINDS, make_world
from pipeline.schema import compute_uid
from stages.ingest.serve import DEMO_HOST, proxy_env, serve_world


def _digest(root) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    summary = make_world(out, n=600, seed=3)
    return out, summary


def test_deterministic_and_seeded(world, tmp_path):
    out, _ = world
    make_world(tmp_path / "again", n=600, seed=3)
    a, b = _digest(out), _digest(tmp_path / "again")
    for name in ("config.toml", "config-text-first.toml", "config-balance-last.toml", "config-semdedup.toml"):
        assert a.pop(name) and b.pop(name)  # each holds the world's absolute eval path
    assert a == b
    make_world(tmp_path / "other", n=600, seed=4)
    assert _digest(tmp_path / "other")["urls.parquet"] != _digest(out)["urls.parquet"]


def test_every_noise_kind_is_present_and_labelled(world):
    out, summary = world
    truth = pl.read_parquet(out / "truth.parquet")
    urls = pl.read_parquet(out / "urls.parquet")
    assert truth.select("url", "caption").equals(urls)  # same rows, same order: truth is the crawl list, labelled
    assert set(truth["kind"].unique()) == set(KINDS) - set(WEB_ONLY_KINDS)  # weak: web worlds only
    assert summary["counts"] == {k: truth.filter(pl.col("kind") == k).height for k in KINDS}
    assert truth["uid"].to_list() == compute_uid(truth["url"].to_arrow(), truth["caption"].to_arrow()).to_pylist()
    assert truth["uid"].n_unique() == truth.height  # (url, caption) never repeats
    assert truth.filter(pl.col("kind") == "clean").height > 0.55 * truth.height


def _serve_path(out, url: str):
    return out / "www" / url.split(f"{DEMO_HOST}/", 1)[1]


def test_noise_kinds_are_what_they_say(world):
    out, _ = world
    truth = pl.read_parquet(out / "truth.parquet")

    def sizes(kind):
        for url in truth.filter(pl.col("kind") == kind)["url"]:
            with Image.open(_serve_path(out, url)) as im:
                yield im.size

    assert all(min(s) < 200 for s in sizes("small_image"))
    assert all(max(s) / min(s) > 3 and min(s) >= 200 for s in sizes("odd_aspect"))
    assert all(min(s) >= 200 and max(s) / min(s) <= 3 for s in sizes("clean"))
    # boilerplate: each string on more than 10 different images
    bp = truth.filter(pl.col("kind") == "boilerplate").group_by("caption").agg(pl.col("url").n_unique())
    assert set(bp["caption"]) <= set(BOILERPLATE) and bp["url"].min() > 10
    # many_texts: one image (same bytes under mirror URLs) with many different alt-texts
    mt = truth.filter(pl.col("kind") == "many_texts")
    assert len({_serve_path(out, u).read_bytes() for u in mt["url"].unique()}) == 1
    assert mt["caption"].n_unique() == mt.height >= 25
    # word counts
    words = lambda k: truth.filter(pl.col("kind") == k)["caption"].str.split(" ").list.len()  # noqa: E731
    assert words("too_short").max() <= 2 and words("too_long").min() > 20
    assert words("clean").min() >= 3 and words("clean").max() <= 20
    # missing and non-image URLs
    for url in truth.filter(pl.col("kind") == "http_404")["url"]:
        assert not _serve_path(out, url).exists()
    for url in truth.filter(pl.col("kind") == "not_image")["url"]:
        assert _serve_path(out, url).read_bytes().startswith(b"<!doctype html>")
    # duplicates: same bytes as their original under another URL; a group is exactly one pair
    dup = truth.filter(pl.col("dup_group").is_not_null())
    for _, g in dup.group_by("dup_group"):
        assert g.height == 2 and g["url"].n_unique() == 2
        assert len({_serve_path(out, u).read_bytes() for u in g["url"]}) == 1
        assert g.filter(pl.col("kind") == "clean")["uid"].to_list() == g["dup_group"].unique().to_list()
    exact = dup.group_by("dup_group").agg(pl.col("caption").str.to_lowercase().str.split(" ").list.join(""))
    assert all(len(set(c.to_list())) == 1 for c in exact.filter(pl.col("dup_group").is_in(
        truth.filter(pl.col("kind") == "exact_duplicate")["dup_group"].implode()))["caption"])


def test_eval_copies_are_resized_reencoded_eval_images(world):
    out, _ = world
    truth = pl.read_parquet(out / "truth.parquet").filter(pl.col("kind") == "eval_copy")
    ev = pq.read_table(out / "eval" / "classification.parquet")
    names = (out / "eval" / "classnames.txt").read_text().split()
    assert names == SHAPES and set(ev.column("label").to_pylist()) == set(SHAPES)
    for url, eid in zip(truth["url"], truth["eval_image_id"]):
        copy = _serve_path(out, url).read_bytes()
        original = ev.column("image")[eid].as_py()
        assert copy != original
        with Image.open(io.BytesIO(copy)) as a, Image.open(io.BytesIO(original)) as b:
            assert min(a.size) >= 200
            small_a = a.convert("L").resize((16, 16))
            small_b = b.convert("L").resize((16, 16))
            diff = sum(abs(x - y) for x, y in zip(small_a.getdata(), small_b.getdata())) / 256
            assert diff < 12  # the same picture
    colours = pq.read_table(out / "eval" / "colours.parquet")
    assert colours.column("image").equals(ev.column("image"))  # same images, labelled by colour
    assert set(colours.column("label").to_pylist()) <= set(COLOURS)
    ret = pq.read_table(out / "eval" / "retrieval.parquet")
    assert ret.num_rows > 0 and all(len(c) == 2 for c in ret.column("captions").to_pylist())


def test_hq_set_is_in_the_row_schema_and_outside_the_pool(world):
    from pipeline.schema import POOL_SCHEMA

    out, summary = world
    hq = pq.read_table(out / "hq.parquet")
    for name, typ in POOL_SCHEMA.items():
        assert hq.schema.field(name).type == typ
    assert hq.num_rows == summary["hq"]
    pool_urls = set(pl.read_parquet(out / "urls.parquet")["url"])
    assert not pool_urls & set(hq.column("url").to_pylist())


def test_config_scales_thresholds_and_points_at_the_eval_set(world):
    import tomllib

    out, _ = world
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["align"]["eval_images"] == str((out / "eval" / "classification.parquet").resolve())
    assert 1 <= cfg["metaclip"]["t"] < 20000 and cfg["align"]["max_texts_per_image"] < 1000


def test_loopback_proxy_serves_404s_and_refuses_other_hosts(world):
    out, _ = world
    truth = pl.read_parquet(out / "truth.parquet")
    good = truth.filter(pl.col("kind") == "clean")["url"][0]
    gone = truth.filter(pl.col("kind") == "http_404")["url"][0]
    with serve_world(out / "www") as proxy:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler(
            {"http": proxy_env(proxy)["http_proxy"]}))
        body = opener.open(good, timeout=5).read()
        assert body == _serve_path(out, good).read_bytes()
        with pytest.raises(urllib.error.HTTPError) as e404:
            opener.open(gone, timeout=5)
        assert e404.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as e403:
            opener.open("http://example.com/img/000001.jpg", timeout=5)
        assert e403.value.code == 403
        with pytest.raises(urllib.error.HTTPError):  # no escaping the served folder
            opener.open(f"http://{DEMO_HOST}/../truth.parquet", timeout=5)
    with pytest.raises(FileNotFoundError):
        with serve_world(out / "nope"):
            pass


def test_too_small_n_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="n >= 200"):
        make_world(tmp_path, n=50)


def _mtimes(root) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(root) for f in fs}


def test_a_world_already_written_is_not_rewritten(tmp_path):
    out = tmp_path / "w"
    first = make_world(out, n=200, seed=1)
    assert not first.get("unchanged")
    stamps, digests = _mtimes(out), _digest(out)
    again = make_world(out, n=200, seed=1)  # `make demo` a second time
    assert again["unchanged"] and _mtimes(out) == stamps
    # anything else is written afresh: another n, a file edited, a file missing or added
    for change in ("n", "edit", "missing", "added"):
        if change == "edit":
            (out / "hq.parquet").write_bytes(b"not the world's bytes")
        elif change == "missing":
            next((out / "www").rglob("*.jpg")).unlink()
        elif change == "added":
            (out / "www" / "stray.txt").write_text("x")
        got = make_world(out, n=201 if change == "n" else 200, seed=1)
        assert not got.get("unchanged"), change
        if change == "n":
            make_world(out, n=200, seed=1)
        assert _digest(out) == digests, change  # the same world again, byte for byte


def test_demo_config_is_valid_toml_for_any_path():
    """The config names the eval sets by path; a path with a quote, a backslash or a space stays one TOML string."""
    import tomllib
    from pathlib import Path

    from demo.world import demo_config

    odd = Path('/tmp/a b/we"ird\\dir/eval/classification.parquet')
    cfg = tomllib.loads(demo_config(3000, odd))
    assert cfg["align"]["eval_images"] == odd.as_posix()
    assert cfg["train"]["eval_sets"] == [(odd.parent / f).as_posix() for f in
                                         ("classification.parquet", "colours.parquet", "retrieval.parquet")]
    assert cfg["metaclip"]["t"] == 30 and cfg["ingest"]["shard_size"] == 500
