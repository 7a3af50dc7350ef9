"""Images are written once: the image store, references, the one reader; stages carry metadata only; a crawl
the user already has (img2dataset Parquet or WebDataset output, made by img2dataset itself on the demo world) is
used in place and gives the same kept uids as `clipcurate ingest`."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import config as config_mod
from pipeline import shards
from pipeline.cli import main as cli_main
from pipeline.images import REF_COL, ImageStore, ImageStoreError, index_tar, parquet_refs, tar_refs
from pipeline.runner import run_pipeline
from pipeline.schema import compute_uid

RECORD = json.loads((Path(__file__).parent / "data" / "demo_kept_uids.json").read_text())


def _jpeg(i: int, size=(240, 220)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (i * 7 % 255, 90, 200 - i % 100)).save(buf, "JPEG")
    return buf.getvalue()


def _pool(folder: Path, shard_rows=(5, 4)) -> pa.Table:
    """A Parquet pool in our row schema (bytes in `image`), one null image."""
    out = []
    for s, n in enumerate(shard_rows):
        url = [f"http://x.invalid/{s}/{i}.jpg" for i in range(n)]
        text = [f"a red square number {s} {i}" for i in range(n)]
        img = [None if (s, i) == (1, 2) else _jpeg(10 * s + i) for i in range(n)]
        t = pa.table({"uid": compute_uid(pa.array(url), pa.array(text)), "url": url, "text": text,
                      "image": pa.array(img, pa.binary()), "width": pa.array([240] * n, pa.int32()),
                      "height": pa.array([220] * n, pa.int32())})
        shards.write_shard(t, str(folder / f"part-{s:05d}.parquet"))
        out.append(t)
    return pa.concat_tables(out)


# ---- the reader ------------------------------------------------------------------------------------
def test_reader_reads_parquet_rows_and_tar_members_by_reference(tmp_path):
    pool = _pool(tmp_path / "pool")
    reader = ImageStore(str(tmp_path / "pool"), "parquet", "image").reader()
    refs = pa.concat_arrays([parquet_refs("part-00001.parquet", 4), pa.array([None], pa.string()),
                             parquet_refs("part-00000.parquet", 5)])
    assert refs[0].as_py() == "part-00001.parquet#0"
    got = reader.read(refs).to_pylist()
    want = pool.column("image").to_pylist()
    assert got == want[5:] + [None] + want[:5]
    # a tar store: members by offset and size, found by one scan of the headers
    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "00000.tar", "w") as tf:
        for i, b in enumerate(want[:3]):
            ti = tarfile.TarInfo(f"{i:09d}.jpg")
            ti.size = len(b)
            tf.addfile(ti, io.BytesIO(b))
    idx = index_tar(str(tmp_path / "tars" / "00000.tar"))
    assert idx.column("key").to_pylist() == ["000000000", "000000001", "000000002"]
    trefs = tar_refs("00000.tar", idx.column("offset").to_numpy(), idx.column("size").to_numpy())
    assert trefs[1].as_py().startswith("00000.tar#") and ":" in trefs[1].as_py()
    tar_reader = ImageStore(str(tmp_path / "tars"), "wds").reader()
    assert tar_reader.read(trefs[::-1]).to_pylist() == want[:3][::-1]


def test_batches_stream_what_read_returns_a_store_file_at_a_time_in_store_order(tmp_path):
    """`batches` (what align decodes from) gives every non-null reference exactly once, with the bytes `read`
    gives it, at most `rows` a batch, forward through each store file; across row groups, for a sparse,
    shuffled subset with a repeat, and over tar members. Checked against a plain per-reference lookup."""
    import numpy as np

    rng = np.random.default_rng(0)
    blobs = [_jpeg(i, size=(24, 20)) if i % 9 else None for i in range(70)]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"jpg": pa.array(blobs, pa.binary())}), tmp_path / "pq" / "a.parquet", row_group_size=16)
    pq.write_table(pa.table({"jpg": pa.array(blobs[:5], pa.binary())}), tmp_path / "pq" / "b.parquet")
    (tmp_path / "tars").mkdir()
    offsets, sizes = [], []
    with tarfile.open(tmp_path / "tars" / "00000.tar", "w") as tf:
        for i, b in enumerate(x for x in blobs if x is not None):
            ti = tarfile.TarInfo(f"{i:09d}.jpg")
            ti.size = len(b)
            tf.addfile(ti, io.BytesIO(b))
    idx = index_tar(str(tmp_path / "tars" / "00000.tar"))
    members = [x for x in blobs if x is not None]

    rows = [int(x) for x in rng.choice(70, 30, replace=False)] + [3, 3]
    cases = [
        ("parquet", "jpg", pa.array([f"a.parquet#{i}" for i in range(70)]), blobs),
        ("parquet", "jpg", pa.array([f"a.parquet#{r}" for r in rows] + [None, "b.parquet#2"]),
         [blobs[r] for r in rows] + [None, blobs[2]]),
        ("wds", "jpg", tar_refs("00000.tar", idx.column("offset").to_numpy(), idx.column("size").to_numpy()).take(
            pa.array(rng.permutation(len(members)))), None),
    ]
    for fmt, col, refs, want in cases:
        reader = ImageStore(str(tmp_path / ("pq" if fmt == "parquet" else "tars")), fmt, col).reader()
        if want is None:  # the tar case: the members in the order the references name them
            order = {o: i for i, o in enumerate(idx.column("offset").to_pylist())}
            want = [members[order[int(r.split("#")[1].split(":")[0])]] for r in refs.to_pylist()]
        assert reader.read(refs).to_pylist() == want
        for size in (1, 7, 1000):
            got, seen = {}, []
            for at, b in reader.batches(refs, size):
                assert len(at) == len(b) > 0 and b.type == pa.binary()
                assert len({refs[i].as_py() for i in at.tolist()}) <= size  # a repeated reference rides along
                seen.extend(at.tolist())
                got.update(zip(at.tolist(), b.to_pylist()))
            assert sorted(seen) == [i for i, r in enumerate(refs.to_pylist()) if r is not None]  # each once
            assert [got.get(i) for i in range(len(refs))] == want
            # forward through each store file
            locs = [refs[i].as_py().split("#") for i in seen]
            for (f1, l1), (f2, l2) in zip(locs, locs[1:]):
                if f1 == f2:
                    assert int(l1.split(":")[0]) <= int(l2.split(":")[0])


def test_a_missing_store_file_is_one_line_naming_it(tmp_path):
    _pool(tmp_path / "pool")
    reader = ImageStore(str(tmp_path / "pool"), "parquet", "image").reader()
    with pytest.raises(ImageStoreError, match=r"part-00007\.parquet not found") as e:
        reader.read(pa.array(["part-00007.parquet#0"]))
    assert "\n" not in str(e.value)
    with pytest.raises(ImageStoreError, match="out of range"):
        reader.read(pa.array(["part-00000.parquet#99"]))
    with pytest.raises(ImageStoreError, match="malformed image reference 'part-00000.parquet'"):
        reader.read(pa.array(["part-00000.parquet"]))


def test_store_inside_the_run_is_recorded_relative_and_survives_moving_the_run(tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "00_ingest" / "_img2dataset").mkdir(parents=True)
    ImageStore(str(run / "00_ingest" / "_img2dataset"), "parquet", "jpg").save(str(run))
    assert json.loads((run / "image_store.json").read_text())["root"] == os.path.join("00_ingest", "_img2dataset")
    shutil.move(str(run), str(tmp_path / "moved"))
    store = ImageStore.load(str(tmp_path / "moved"))
    assert store.root == str(tmp_path / "moved" / "00_ingest" / "_img2dataset")
    # a store outside the run (a crawl on shared storage, s3://...) is recorded as given
    ImageStore("s3://bucket/crawl", "wds").save(str(tmp_path / "moved"))
    assert ImageStore.load(str(tmp_path / "moved")) == ImageStore("s3://bucket/crawl", "wds", "jpg")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_input_pool_is_the_store_and_stage_files_hold_no_bytes(tmp_path):
    """--input with image bytes: the runner records the folder as the store, stages get references, align
    and emit read pixels through the reader; only emit's output holds bytes; a moved run still emits."""
    pool = _pool(tmp_path / "pool")
    cfg = config_mod.resolve({"align": {"min_side": 10, "min_words": 1}, "emit": {"samples_per_shard": 3}})
    run = tmp_path / "runs" / "r"
    run_pipeline(["align"], str(run), cfg, input_dir=str(tmp_path / "pool"), workers=0)
    assert ImageStore.load(str(run)) == ImageStore(str(tmp_path / "pool"), "parquet", "image")
    kept = pa.concat_tables(pq.read_table(p) for p in sorted((run / "01_align").glob("part-*.parquet")))
    rej = pq.read_table(run / "01_align" / "rejected")
    assert "image" not in kept.column_names and REF_COL in kept.column_names
    assert kept.num_rows == 8 and rej.column("reason").to_pylist() == ["image_unreadable"]  # the null image
    assert kept.column("image_hash").null_count == 0  # the content hash, computed from the store's bytes
    # another run reading this run's stage folder with --input brings the store along
    run_pipeline(["emit"], str(tmp_path / "runs" / "other"), cfg, input_dir=str(run / "01_align"), workers=0)
    assert ImageStore.load(str(tmp_path / "runs" / "other")) == ImageStore.load(str(run))
    from trainer.data import open_source  # emit's metadata Parquet, the images read from its tars

    other = open_source(str(tmp_path / "runs" / "other" / "emit"))
    assert len(other) == 8 and other.skipped == 0
    # the run folder moves; the store (outside it, recorded absolute) is still found; emit materialises bytes
    shutil.move(str(run), str(tmp_path / "elsewhere"))
    run_pipeline(["emit"], str(tmp_path / "elsewhere"), cfg, workers=0)
    emitted = open_source(str(tmp_path / "elsewhere" / "emit"))
    by_uid = dict(zip(pool.column("uid").to_pylist(), pool.column("image").to_pylist()))
    assert len(emitted) == 8 and emitted.skipped == 0
    assert all(by_uid[uid] == b for b, _, _, uid in map(emitted.get, range(len(emitted))))


# ---- bring your own crawl --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def crawls(demo_ingested, tmp_path_factory):
    """The demo world's URL list crawled by img2dataset itself, once as Parquet and once as WebDataset output,
    with the settings ingest uses (one row per list row here: img2dataset's own behaviour)."""
    from stages.ingest import IngestStage, run_img2dataset

    world, _, _ = demo_ingested
    root = tmp_path_factory.mktemp("crawls")
    cfg = IngestStage.Config(serve_dir=str(world / "www"), processes=2, threads=16, shard_size=500,
                             allow_private_hosts=["demo.clipcurate.invalid:80"])  # the world's loopback server
    out = {}
    for fmt in ("parquet", "webdataset"):
        run_img2dataset(str(world / "urls.parquet"), str(root / fmt), cfg, output_format=fmt)
        out[fmt] = root / fmt
    return world, out


def _kept_sha(folder: Path) -> tuple[int, str]:
    uids = sorted(u for p in sorted(glob.glob(str(folder / "part-*.parquet")))
                  for u in pq.read_table(p, columns=["uid"]).column("uid").to_pylist())
    return len(uids), hashlib.sha256("\n".join(uids).encode()).hexdigest()


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_a_crawl_is_used_in_place_and_gives_the_kept_uids_of_ingest(crawls, tmp_path, fmt):
    world, dirs = crawls
    crawl = dirs[fmt]
    before = {p: p.stat().st_mtime_ns for p in crawl.rglob("*")}
    runs = tmp_path / "runs"
    common = ["--runs-dir", str(runs)]
    assert cli_main(common + ["ingest", str(crawl), "--run", "byo", "--config", str(world / "config.toml"),
                              "--workers", "0"]) == 0
    run = runs / "byo"
    store = ImageStore.load(str(run))
    assert store.root == str(crawl) and store.format == ("wds" if fmt == "webdataset" else "parquet")
    m = shards.read_json(str(run / "00_ingest" / "_manifest.json"))
    # failures to rejected/ with img2dataset's error, as ingest does; the same rows kept
    assert m["reasons"] == RECORD["ingest"]["reasons"]
    assert _kept_sha(run / "00_ingest") == (RECORD["ingest"]["kept"], RECORD["ingest"]["kept_sha256"])
    # the image rules read the crawl's pixels in place: the same decisions as on ingest's own download
    assert cli_main(common + ["run", "align", "--run", "byo", "--workers", "0"]) == 0
    assert _kept_sha(run / "01_align") == (RECORD["align"]["kept"], RECORD["align"]["kept_sha256"])
    a = shards.read_json(str(run / "01_align" / "_manifest.json"))
    assert a["reasons"] == RECORD["align"]["reasons"]
    # nothing copied: the crawl untouched, the run a small fraction of it
    assert {p: p.stat().st_mtime_ns for p in crawl.rglob("*")} == before
    assert _dir_bytes(run) < 0.2 * _dir_bytes(crawl)
    # emit materialises the kept samples from the crawl
    assert cli_main(common + ["run", "emit", "--run", "byo", "--workers", "0"]) == 0
    from trainer.data import open_source  # emit's metadata Parquet, the images read from its tars

    emitted = open_source(str(run / "emit"))
    assert len(emitted) == RECORD["align"]["kept"] and emitted.skipped == 0


def test_a_folder_that_is_not_a_crawl_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = cli_main(["--runs-dir", str(tmp_path / "runs"), "ingest", str(tmp_path / "empty"), "--run", "x"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "not an img2dataset output folder" in err and "\n" not in err
