"""ingest: URL list reading, grouping by URL, img2dataset output -> row schema, and a real download."""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import logging
import os
import re
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import shards
from pipeline.cli import main as cli_main
from pipeline.images import ImageStore, parquet_refs
from pipeline.schema import ROW_SCHEMA, compute_uid
from pipeline.errors import StageError
from stages.ingest import CAPTIONS_COL, IngestStage, group_by_url, read_url_list

HOST = "http://demo.clipcurate.invalid"


def test_read_url_list_formats_and_missing_column(tmp_path):
    rows = [("http://a.invalid/1.jpg", "one"), ("http://a.invalid/2.jpg", "two, with comma")]
    pl.DataFrame(rows, schema=["url", "caption"], orient="row").write_parquet(tmp_path / "l.parquet")
    pl.DataFrame(rows, schema=["url", "text"], orient="row").write_csv(tmp_path / "l.csv")
    tsv = "URL\tTEXT\n" + "".join(f"{u}\t{c}\n" for u, c in rows)
    (tmp_path / "l.tsv.gz").write_bytes(gzip.compress(tsv.encode()))
    for p, kw in [("l.parquet", {}), ("l.csv", {}), ("l.tsv.gz", {"url_col": "URL", "caption_col": "TEXT"})]:
        df = read_url_list(str(tmp_path / p), **kw)
        assert df.rows() == rows, p
    with pytest.raises(StageError, match=r"has no column 'link'") as e:
        read_url_list(str(tmp_path / "l.parquet"), url_col="link")
    assert "\n" not in str(e.value)


def test_group_by_url_keeps_every_distinct_caption_and_first_seen_order():
    df = pl.DataFrame(
        {
            "url": ["http://h.invalid/b.jpg", "http://h.invalid/a.jpg", "http://h.invalid/b.jpg", "ftp://x/y.jpg", "not a url", None,
                    "http://h.invalid/b.jpg", " http://h.invalid/b.jpg", "http://h.invalid/a.jpg"],
            "caption": ["b1", "a1", 'b2 "quoted"', "f", "n", "none", "b3", "b1", "a1"],
        }
    )
    grouped, bad = group_by_url(df)
    assert grouped["url"].to_list() == ["http://h.invalid/b.jpg", "http://h.invalid/a.jpg"]
    decoded = [json.loads(s)["c"] for s in grouped[CAPTIONS_COL].to_list()]
    assert decoded == [["b1", 'b2 "quoted"', "b3"], ["a1"]]  # one row per distinct (url, caption)
    assert sorted(bad["caption"].to_list()) == ["a1", "b1", "f", "n", "none"]
    assert bad.filter(pl.col("status") == "duplicate")["caption"].sort().to_list() == ["a1", "b1"]
    assert sum(map(len, decoded)) + bad.height == df.height  # every row: downloaded, or rejected with a reason


def _img2dataset_like_table() -> pa.Table:
    """The columns img2dataset writes, for one success with 2 captions and two failures."""
    png = io.BytesIO()
    Image.new("RGB", (300, 240), "red").save(png, "PNG")
    caps = [json.dumps({"c": c}) for c in (["a red square", "red box"], ["x"], ["y"])]
    return pa.table(
        {
            "caption": ["a red square", "x", "y"],
            "url": [f"{HOST}/1.png", f"{HOST}/404.jpg", f"{HOST}/html.jpg"],
            "key": ["000000000", "000000001", "000000002"],
            "status": ["success", "failed_to_download", "failed_to_resize"],
            "error_message": [None, "HTTP Error 404: Not Found", "cannot identify image file <_io.BytesIO object at 0x7f>"],
            "width": [300, None, None],
            "height": [240, None, None],
            "original_width": [300, None, None],
            "original_height": [240, None, None],
            "jpg": [png.getvalue(), None, None],
            CAPTIONS_COL: caps,
        }
    )


def test_conversion_one_row_per_caption_and_reasons():
    # as the runner hands it over: img2dataset's rows without their bytes, each with its reference
    t = _img2dataset_like_table()
    t = t.drop_columns(["jpg"]).append_column("image_ref", parquet_refs("00000.parquet", t.num_rows))
    kept, rejected = IngestStage().apply(t, None)
    assert kept.schema == pa.schema([(k, v) for k, v in ROW_SCHEMA.items()])
    assert kept.column("text").to_pylist() == ["a red square", "red box"]
    assert kept.column("uid").to_pylist() == compute_uid([f"{HOST}/1.png"] * 2, ["a red square", "red box"]).to_pylist()
    assert kept.column("image_ref").to_pylist() == ["00000.parquet#0"] * 2  # both captions: the one image
    assert rejected.column("image_ref").null_count == 2  # a failed download names no image
    assert kept.column("orig_width").to_pylist() == [300, 300]
    reasons = rejected.column("reason").to_pylist()
    assert reasons[0] == "failed_to_download: HTTP Error 404: Not Found"
    assert reasons[1].startswith("failed_to_resize: cannot identify image file")
    assert rejected.column("text").to_pylist() == ["x", "y"]


# ---- a real download through img2dataset and the loopback proxy --------------------------------
def _make_site(root: Path) -> tuple[list[tuple[str, str]], dict]:
    """A tiny crawl: 12 good images (one URL listed 3 times), 3 404s, 2 non-images, a malformed URL and one of
    another scheme."""
    www = root / "www"
    (www / "img").mkdir(parents=True)
    rows = []
    for i in range(12):
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        Image.new("RGB", (220 + 10 * i, 210 + 5 * i), (20 * i, 100, 200 - 10 * i)).save(www / "img" / f"{i}.{ext}", fmt)
        rows.append((f"{HOST}/img/{i}.{ext}", f"picture number {i}"))
    rows += [(f"{HOST}/img/0.jpg", "the first picture again"), (f"{HOST}/img/0.jpg", "yet another caption")]
    rows += [(f"{HOST}/img/missing{i}.jpg", f"gone {i}") for i in range(3)]
    for i in range(2):
        (www / "img" / f"html{i}.jpg").write_bytes(b"<html><body>Not an image</body></html>")
        rows.append((f"{HOST}/img/html{i}.jpg", f"html page {i}"))
    (www / "img" / "denied.jpg").write_bytes(b"Access denied\n")  # text, no HTML: not an image either
    rows.append((f"{HOST}/img/denied.jpg", "a text page"))
    jpeg = (www / "img" / "0.jpg").read_bytes()
    (www / "img" / "cut.jpg").write_bytes(jpeg[:40])  # an image cut short: still img2dataset's decoding error
    rows.append((f"{HOST}/img/cut.jpg", "a truncated picture"))
    rows += [("javascript:alert(1)", "script"), ("http:/broken", "broken")]
    # the same (url, caption) again: the same uid; kept once, the repeats rejected as `duplicate`
    rows += [(f"{HOST}/img/1.png", "picture number 1")] * 2 + [(f"{HOST}/img/missing0.jpg", "gone 0")]
    expect = {"good_urls": 12, "good_rows": 14, "http_404": 3, "not_image": 2, "not_image_text": 1, "corrupt": 1,
              "invalid": 1, "blocked_scheme": 1, "repeats": 3, "rows": len(rows)}
    return rows, expect


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    pytest.importorskip("stages.ingest.serve")
    root = tmp_path_factory.mktemp("crawl")
    rows, expect = _make_site(root)
    pl.DataFrame(rows, schema=["url", "caption"], orient="row").write_parquet(root / "urls.parquet")
    cfg = root / "c.toml"
    cfg.write_text('[ingest]\nprocesses = 1\nthreads = 8\nshard_size = 8\nallow_private_hosts = ["demo.clipcurate.invalid:80"]\n')
    runs = root / "runs"
    out, records = io.StringIO(), []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("clipcurate").addHandler(handler)
    try:
        with contextlib.redirect_stdout(out):
            code = cli_main(
                ["--runs-dir", str(runs), "ingest", str(root / "urls.parquet"), "--run", "r", "--config", str(cfg),
                 "--serve", str(root / "www"), "--workers", "0"]
            )
    finally:
        logging.getLogger("clipcurate").removeHandler(handler)
    assert code == 0
    expect.update(stdout=out.getvalue(), log=records)
    return runs / "r" / "00_ingest", expect


def test_ingest_keeps_every_good_image_once_per_caption(ingested):
    stage_dir, expect = ingested
    kept = pa.concat_tables(pq.read_table(p) for p in sorted(glob.glob(str(stage_dir / "part-*.parquet"))))
    assert kept.num_rows == expect["good_rows"]
    assert len(set(kept.column("uid").to_pylist())) == kept.num_rows
    assert len(set(kept.column("url").to_pylist())) == expect["good_urls"]
    first = kept.filter(pa.compute.equal(kept.column("url"), f"{HOST}/img/0.jpg"))
    assert sorted(first.column("text").to_pylist()) == ["picture number 0", "the first picture again", "yet another caption"]
    assert "image" not in kept.column_names  # metadata only: the bytes stay in the download (the store)
    blobs = ImageStore.load(str(stage_dir.parent)).reader().read(kept.column("image_ref")).to_pylist()
    for row, blob in zip(kept.slice(0, 5).to_pylist(), blobs):
        with Image.open(io.BytesIO(blob)) as im:
            assert im.size == (row["orig_width"], row["orig_height"]) == (row["width"], row["height"])


def test_ingest_downloads_duplicate_urls_once(ingested):
    stage_dir, expect = ingested
    raw = pa.concat_tables(pq.read_table(p, columns=["url"]) for p in glob.glob(str(stage_dir / "_img2dataset" / "0*.parquet")))
    urls = raw.column("url").to_pylist()
    assert len(urls) == len(set(urls)) == expect["good_urls"] + expect["http_404"] + _failed_to_decode(expect)


def _failed_to_decode(expect: dict) -> int:
    """Fetched URLs whose bytes did not decode: HTML pages, a text page, a truncated JPEG."""
    return expect["not_image"] + expect["not_image_text"] + expect["corrupt"]


def test_ingest_rejects_404_and_non_images_with_reasons(ingested):
    stage_dir, expect = ingested
    m = shards.read_json(str(stage_dir / "_manifest.json"))
    reasons = m["reasons"]
    n404 = sum(v for k, v in reasons.items() if k.startswith("failed_to_download") and "404" in k)
    assert n404 == expect["http_404"]
    # an HTML page or text under a .jpg name is not an image; an image cut short is one that failed to decode
    assert reasons.get("not_an_image: an HTML page") == expect["not_image"]
    assert reasons.get("not_an_image: text") == expect["not_image_text"]
    assert reasons.get("failed_to_resize: Image decoding error") == expect["corrupt"]
    assert reasons.get("invalid_url: not an http(s) URL") == expect["invalid"]
    assert reasons.get("blocked_scheme") == expect["blocked_scheme"]  # javascript: (the egress policy)
    assert reasons.get("duplicate: same url and caption as another row") == expect["repeats"]  # as from a crawl
    assert m["rows_out"] + m["rejected"] == m["rows_in"] == expect["rows"] == (
        expect["good_rows"] + expect["http_404"] + _failed_to_decode(expect) + expect["invalid"]
        + expect["blocked_scheme"] + expect["repeats"])
    assert m["download"]["unique_urls"] == expect["good_urls"] + expect["http_404"] + _failed_to_decode(expect)


FUNNEL_LOG = re.compile(r"^(\w+): (\d+) rows in, (\d+) kept, (\d+) rejected")
FUNNEL_OUT = re.compile(r"^\s*(\w+):\s+(\d+) in\s+(\d+) kept\s+(\d+) rejected")


def test_every_funnel_line_reads_rows_in_equals_kept_plus_rejected(ingested):
    # the log line (runner) and the printed funnel (cli) of ingest count rows, not URLs: a URL with three
    # captions is three rows, a repeated (url, caption) row is a rejected row
    _, expect = ingested
    logged = [FUNNEL_LOG.match(r) for r in expect["log"]]
    printed = [FUNNEL_OUT.match(line) for line in expect["stdout"].splitlines()]
    lines = [m for m in logged + printed if m]
    assert len(lines) == 2, (expect["log"], expect["stdout"])
    for m in lines:
        _, rows_in, kept, rejected = m.groups()
        assert int(rows_in) == int(kept) + int(rejected) == expect["rows"], m.group(0)
    assert f"{expect['repeats']} repeated (url, caption) rows" in expect["stdout"]
    # the same last line as text-first's ingest: what to run next
    assert expect["stdout"].splitlines()[-1] == "next: clipcurate run --run r   (align, metaclip, klite, dfn, emit)"


def test_ingest_rerun_reuses_download_and_shards(ingested, capsys):
    stage_dir, _ = ingested
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(stage_dir / "part-*.parquet"))}
    runs = stage_dir.parents[1]
    root = runs.parent
    lst = root / "urls.parquet"
    data = lst.read_bytes()
    lst.unlink()
    lst.write_bytes(data)  # the same list written again (a regenerated world): a new mtime, the same bytes
    code = cli_main(["--runs-dir", str(runs), "ingest", str(lst), "--run", "r", "--serve", str(root / "www"), "--workers", "0"])
    assert code == 0
    assert {p: os.stat(p).st_mtime_ns for p in before} == before


def test_url_scheme_is_case_insensitive_but_still_http_only():
    """RFC 3986: 'HTTP://' is the same scheme as 'http://' (urllib, which img2dataset uses, fetches both)."""
    urls = ["HTTP://h.invalid/a.jpg", "Https://h.invalid/b.jpg", "FTP://h.invalid/c.jpg", "HTTP://", "hTtP:/x"]
    grouped, bad = group_by_url(pl.DataFrame({"url": urls, "caption": ["a", "b", "c", "d", "e"]}))
    assert grouped["url"].to_list() == urls[:2]
    assert sorted(bad["caption"].to_list()) == ["c", "d", "e"]


def _crawl_shard(folder: Path, name: str, rows: list[tuple[str, str, tuple[int, int]]]) -> None:
    """An img2dataset Parquet output shard (the columns it writes) with real image bytes."""
    blobs = []
    for _, _, size in rows:
        b = io.BytesIO()
        Image.new("RGB", size, (size[0] % 255, 90, 200)).save(b, "JPEG")
        blobs.append(b.getvalue())
    pq.write_table(pa.table({
        "caption": [c for _, c, _ in rows], "url": [u for u, _, _ in rows], "key": [f"{name}{i:04d}" for i in range(len(rows))],
        "status": ["success"] * len(rows), "error_message": pa.nulls(len(rows), pa.string()),
        "width": [s[0] for *_, s in rows], "height": [s[1] for *_, s in rows],
        "original_width": [s[0] for *_, s in rows], "original_height": [s[1] for *_, s in rows],
        "jpg": pa.array(blobs, pa.binary()),
    }), folder / f"{name}.parquet")
    (folder / f"{name}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))


def test_a_crawl_listing_the_same_url_and_caption_twice_keeps_one_row(tmp_path):
    # img2dataset fetches every row of its list: a list with repeats gives a crawl with repeats (the same uid)
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    a, b, c = ("http://h.invalid/a.jpg", "a red square on white", (220, 220)), \
        ("http://h.invalid/b.jpg", "a blue circle", (230, 210)), ("http://h.invalid/c.jpg", "a green star", (240, 240))
    b2 = (b[0], b[1], (231, 210))  # the same url and caption, other bytes (fetched again later)
    _crawl_shard(crawl, "00000", [a, b, a, c])
    _crawl_shard(crawl, "00001", [b2, a, c])
    kept_by_run = []
    for i, cfg_text in enumerate(["", "[run]\nstats_shards_per_partition = 1\n"]):
        cfg = tmp_path / f"c{i}.toml"
        cfg.write_text(cfg_text)
        runs = tmp_path / f"runs{i}"
        assert cli_main(["--runs-dir", str(runs), "ingest", str(crawl), "--run", "r", "--config", str(cfg),
                         "--workers", "0"]) == 0
        stage = runs / "r" / "00_ingest"
        kept = pa.concat_tables(pq.read_table(p) for p in sorted(glob.glob(str(stage / "part-*.parquet"))))
        uids = kept.column("uid").to_pylist()
        assert len(uids) == len(set(uids)) == 3
        m = shards.read_json(str(stage / "_manifest.json"))
        assert m["reasons"] == {"duplicate: same url and caption as another row": 4}
        assert m["rows_in"] == m["rows_out"] + m["rejected"] == 7
        kept_by_run.append(sorted(zip(uids, kept.column("orig_width").to_pylist())))
    assert kept_by_run[0] == kept_by_run[1]  # the same copies kept with 1 or 2 statistics partitions
