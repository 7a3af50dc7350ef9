"""emit's default output is WebDataset plus a metadata-only Parquet (issue 35, item 9): each kept image is written
once, in the tars; `parquet/` holds the rows' metadata and each sample's `tar` and `member`, as DataComp ships its
sets. Parquet with the image bytes is the `parquet-images` format. The trainer reads an emit folder's metadata
Parquet with the images from its tars: the same pairs, in the same order, as the Parquet with the bytes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import config as config_mod
from pipeline import shards
from pipeline.cli import main as cli_main
from pipeline.runner import run_pipeline
from pipeline.schema import compute_uid

JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF"  # how Pillow's JPEGs begin


def _pool(folder: Path, n_per_shard=(13, 0, 11), size: int = 24, extra: dict | None = None) -> pa.Table:
    """Rows with JPEG bytes (distinct images), captions, glosses, sizes and a score, over input shards."""
    tables = []
    for s, n in enumerate(n_per_shard):
        rows = []
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (size, size), (i * 9 % 256, s * 70, (i * 37) % 256)).save(buf, "JPEG")
            text = f"a swatch {s} {i}"
            rows.append({"url": f"http://x.invalid/{s}/{i}.jpg", "text": text, "image": buf.getvalue(),
                         "width": size, "height": size, "text_klite": f"{text} ; swatch , a sample of colour",
                         "dfn_score": 0.5 + i / 100, **(extra or {})})
        schema = pa.schema([("url", pa.string()), ("text", pa.string()), ("image", pa.binary()),
                            ("width", pa.int32()), ("height", pa.int32()), ("text_klite", pa.string()),
                            ("dfn_score", pa.float32()),
                            *[(k, pa.string()) for k in (extra or {})]])
        t = pa.Table.from_pylist(rows, schema=schema)
        t = t.append_column("uid", compute_uid(t.column("url"), t.column("text")))
        shards.write_shard(t, str(folder / f"part-{s:05d}.parquet"))
        tables.append(t)
    return pa.concat_tables(tables)


def _emit(tmp_path: Path, run: str, **emit) -> Path:
    cfg = config_mod.resolve({"emit": {"samples_per_shard": 10, **emit}})
    run_pipeline(["emit"], str(tmp_path / run), cfg, input_dir=str(tmp_path / "in"), workers=0)
    return tmp_path / run / "emit"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_default_writes_each_image_once_with_a_metadata_parquet_naming_tar_and_member(tmp_path):
    pool = _pool(tmp_path / "in")
    out = _emit(tmp_path, "r")
    assert sorted(p.name for p in out.iterdir()) == ["_done", "parquet", "summary.json", "uids.npy", "wds"]
    meta = pq.read_table(out / "parquet")
    # the rows' metadata (uid, url, text, sizes, scores), then where each sample is; no bytes
    assert meta.column_names == ["url", "text", "width", "height", "text_klite", "dfn_score", "uid", "tar", "member"]
    assert not any(pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) for f in meta.schema)
    assert meta.column("uid").to_pylist() == pool.column("uid").to_pylist()  # input shard order, then row order
    assert meta.column("dfn_score").to_pylist() == pool.column("dfn_score").to_pylist()
    # 24 rows in shards of 10: each row's tar and member hold its image, byte for byte
    assert meta.column("tar").to_pylist() == ["wds/part-00000.tar"] * 10 + ["wds/part-00001.tar"] * 10 + \
        ["wds/part-00002.tar"] * 4
    image_of = dict(zip(pool.column("uid").to_pylist(), pool.column("image").to_pylist()))
    tars = {}
    for row in meta.select(["uid", "tar", "member"]).to_pylist():
        members = tars.setdefault(row["tar"], _members(out / row["tar"]))
        assert row["member"] == f"{row['uid']}.jpg" and members[row["member"]] == image_of[row["uid"]]
    # and the tars are the only files of the emit folder that hold an image
    holding = [p.relative_to(out).as_posix() for p in _files(out) if JPEG_HEAD in p.read_bytes()]
    assert holding == ["wds/part-00000.tar", "wds/part-00001.tar", "wds/part-00002.tar"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["formats"] == ["wds", "parquet"] and summary["columns"] == meta.column_names


def test_tar_members_have_plain_headers(tmp_path):
    """512 bytes of header a member, no PAX header of its own: a float mtime got one (1,024 bytes more a member,
    4 members a sample), and still the same rows give the same bytes."""
    _pool(tmp_path / "in")
    out = _emit(tmp_path, "r")
    for tar in sorted((out / "wds").glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = tf.getmembers()
        assert members and all(m.pax_headers == {} and m.mtime == 0 for m in members)
        assert all(m.offset_data - m.offset == 512 for m in members)
    again = _emit(tmp_path, "again")
    assert [p.read_bytes() for p in sorted((out / "wds").glob("*.tar"))] == \
        [p.read_bytes() for p in sorted((again / "wds").glob("*.tar"))]


def test_parquet_images_is_asked_for_and_switching_formats_leaves_no_stale_part(tmp_path):
    pool = _pool(tmp_path / "in")
    out = _emit(tmp_path, "r", formats=["wds", "parquet-images"])
    full = pq.read_table(out / "parquet-images")
    assert full.column("image").to_pylist() == pool.column("image").to_pylist()  # the bytes, in order
    assert "tar" not in full.column_names and "image_ref" not in full.column_names
    assert not (out / "parquet").exists()
    # back to the default: the Parquet with the bytes goes (it would be a second copy), the metadata comes
    out = _emit(tmp_path, "r")
    assert not (out / "parquet-images").exists()  # nor an empty folder left behind
    assert len(list((out / "parquet").glob("*.parquet"))) == 3
    # all three: the metadata and the bytes side by side
    out = _emit(tmp_path, "r", formats=["wds", "parquet", "parquet-images"])
    assert pq.read_table(out / "parquet-images").column("uid").to_pylist() == \
        pq.read_table(out / "parquet").column("uid").to_pylist()


@pytest.mark.parametrize("formats,words", [
    (["parquet"], ["formats = ['parquet']", "comes with 'wds'", "'parquet-images'"]),
    (["parquet", "parquet-images"], ["comes with 'wds'"]),
    (["images"], ["unknown format 'images'", "parquet, wds, parquet-images"]),
    ([], ["empty", "parquet, wds, parquet-images"]),
])
def test_formats_are_checked_in_one_line(tmp_path, capsys, formats, words):
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.resolve({"emit": {"formats": formats}})
    assert len(str(e.value).splitlines()) == 1
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    # through the command line: `clipcurate: error: ...`, exit 2, nothing emitted
    _pool(tmp_path / "in", (3,))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[emit]\nformats = {json.dumps(formats)}\n")
    code = cli_main(["--runs-dir", str(tmp_path / "runs"), "run", "emit", "--run", "r", "--input",
                     str(tmp_path / "in"), "--config", str(cfg), "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("clipcurate: error:"), err
    assert words[0] in err
    assert not (tmp_path / "runs" / "r" / "emit").exists()


def test_the_default_formats_spelled_out_are_accepted():
    for formats in (["wds"], ["wds", "parquet"], ["parquet", "wds"], ["parquet-images"], ["wds", "parquet-images"]):
        assert config_mod.resolve({"emit": {"formats": formats}})["emit"]["formats"] == formats


def test_a_column_named_tar_is_refused_in_one_line(tmp_path):
    from pipeline.errors import StageError

    _pool(tmp_path / "in", (4,), extra={"tar": "mine"})
    with pytest.raises(StageError) as e:
        _emit(tmp_path, "r")
    assert len(str(e.value).splitlines()) == 1 and "'tar'" in str(e.value) and "parquet-images" in str(e.value)
    _emit(tmp_path, "ok", formats=["wds", "parquet-images"])  # the way out it names works


def test_tar_references_follow_the_image_stores_grammar():
    from stages.emit import _tar_refs

    refs = pa.array(["a.tar#0:10", "00003.tar#1536:29876:123", "b.parquet#3", None, "odd#name.tar#512:6"])
    assert _tar_refs(refs).to_pylist() == [True, True, False, False, True]
    assert _tar_refs(pa.chunked_array([refs.slice(0, 2), refs.slice(2)])).to_pylist() == \
        [True, True, False, False, True]


# ---- the trainer reads an emit folder ----------------------------------------------------------------------
def _pairs(src) -> list[tuple]:
    return [src.get(i) for i in range(len(src))]


def test_trainer_reads_the_metadata_parquet_as_it_read_the_parquet_with_bytes(tmp_path):
    from trainer.data import locate, open_source, source_problem

    _pool(tmp_path / "in")
    meta = _emit(tmp_path, "m")
    full = _emit(tmp_path, "f", formats=["wds", "parquet-images"])
    a, b = open_source(str(meta)), open_source(str(full))
    assert locate(str(meta)) == ("parquet", [str(meta / "parquet" / f"part-{j:05d}.parquet") for j in range(3)])
    assert locate(str(full))[1][0] == str(full / "parquet-images" / "part-00000.parquet")
    assert len(a) == len(b) == 24 and a.skipped == b.skipped == 0
    assert _pairs(a) == _pairs(b)  # (image bytes, text, text_klite, uid), in the same order
    assert source_problem(str(meta)) is None
    # the Parquet part of a folder with both: the one with the bytes (no tar read)
    both = _emit(tmp_path, "b", formats=["wds", "parquet", "parquet-images"])
    assert locate(str(both))[1][0] == str(both / "parquet-images" / "part-00000.parquet")
    # a metadata Parquet file given alone still finds its tars
    one = open_source(str(meta / "parquet" / "part-00001.parquet"))
    assert _pairs(one) == _pairs(a)[10:20]


def test_training_on_the_default_emit_folder_gives_the_losses_of_the_parquet_with_bytes(tmp_path):
    pytest.importorskip("torch")
    from trainer.config import TrainConfig
    from trainer.train import train

    _pool(tmp_path / "in", (13, 0, 11), size=40)
    settings = dict(steps=3, batch_size=8, save_every=3, keep_checkpoints=1, warmup=1, log_every=1, workers=0,
                    device="cpu", lr=5e-4)
    losses = []
    for run, formats in (("m", ["wds", "parquet"]), ("f", ["wds", "parquet-images"])):
        out = _emit(tmp_path, run, formats=formats)
        res = train(TrainConfig(**settings), str(out), str(tmp_path / run / "train"), progress=False)
        assert res["pairs"] == 24
        losses.append([json.loads(line)["loss"] for line in (tmp_path / run / "train" / "metrics.jsonl")
                       .read_text().splitlines()])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_an_incomplete_emit_folder_is_one_line(tmp_path):
    from trainer.data import DataError, open_source, source_problem

    _pool(tmp_path / "in")
    out = _emit(tmp_path, "r")
    (out / "wds" / "part-00001.tar").unlink()
    why = source_problem(str(out))
    assert why and len(why.splitlines()) == 1 and "part-00001.tar" in why and "does not exist" in why
    with pytest.raises(DataError) as e:
        open_source(str(out))
    assert len(str(e.value).splitlines()) == 1 and "part-00001.tar" in str(e.value) and "rerun emit" in str(e.value)
    # a tar that lost a member
    out = _emit(tmp_path, "s")
    tar = out / "wds" / "part-00000.tar"
    members = _members(tar)
    with tarfile.open(tar, "w") as tf:
        for name, data in list(members.items())[4:]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError) as e:
        open_source(str(out))
    assert len(str(e.value).splitlines()) == 1 and "is not in wds/part-00000.tar" in str(e.value)


@pytest.mark.parametrize("value", ["../../elsewhere.tar", "/etc/x.tar", "wds/part-00000.parquet"])
def test_a_tar_outside_the_emit_folder_is_never_read(tmp_path, value):
    from trainer.data import DataError, open_source, source_problem

    _pool(tmp_path / "in", (4,))
    out = _emit(tmp_path, "r")
    p = out / "parquet" / "part-00000.parquet"
    t = pq.read_table(p)
    pq.write_table(t.set_column(t.column_names.index("tar"), "tar", pa.array([value] * t.num_rows)), p)
    with pytest.raises(DataError, match="is not a .tar inside the emit folder"):
        open_source(str(out))
    assert "is not a .tar inside the emit folder" in source_problem(str(out))


def test_an_emit_folder_on_an_fsspec_url_reads_its_tars_through_it(tmp_path):
    """A run in a bucket: the metadata Parquet and the tars it names are read through fsspec (memory:// here)."""
    import fsspec

    from trainer.data import open_source, source_problem

    _pool(tmp_path / "in")
    out = _emit(tmp_path, "r")
    fs = fsspec.filesystem("memory")
    for p in _files(out):
        fs.pipe(f"/bucket/emit/{p.relative_to(out).as_posix()}", p.read_bytes())
    try:
        remote = open_source("memory://bucket/emit")
        assert _pairs(remote) == _pairs(open_source(str(out)))
        assert source_problem("memory://bucket/emit") is None
        fs.rm("/bucket/emit/wds/part-00002.tar")
        assert "part-00002.tar, which does not exist" in source_problem("memory://bucket/emit")
    finally:
        fs.rm("/bucket", recursive=True)


def test_a_text_only_pool_names_its_tar_and_no_member(tmp_path):
    rows = [{"url": f"http://x.invalid/{i}", "text": f"caption {i}"} for i in range(5)]
    t = pa.Table.from_pylist(rows)
    (tmp_path / "in").mkdir()
    shards.write_shard(t.append_column("uid", compute_uid(t.column("url"), t.column("text"))),
                       str(tmp_path / "in" / "part-00000.parquet"))
    out = _emit(tmp_path, "r")
    meta = pq.read_table(out / "parquet")
    assert meta.column("tar").to_pylist() == ["wds/part-00000.tar"] * 5
    assert meta.column("member").null_count == 5
    names = set(_members(out / "wds" / "part-00000.tar"))
    assert {f"{u}.txt" for u in meta.column("uid").to_pylist()} <= names and not any(n.endswith(".jpg") for n in names)
    assert np.load(out / "uids.npy").shape == (5,)
