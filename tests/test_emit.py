"""emit, the resharder: Parquet + WebDataset shards of exactly samples_per_shard rows across input shards (input
shard order, then row order), bytes read from the image store by reference, sizes.json, sorted uid list,
determinism, resume."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import config as config_mod
from pipeline import shards
from pipeline.runner import run_pipeline
from pipeline.schema import compute_uid


def _pool(folder: Path, n_per_shard=(7, 3, 0)) -> list[dict]:
    rows_all = []
    for s, n in enumerate(n_per_shard):
        rows = []
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 20, s * 50, 0)).save(buf, "JPEG")
            url, text = f"http://x.invalid/{s}/{i}.jpg", f"caption {s} {i} é"
            rows.append({"url": url, "text": text, "image": buf.getvalue(), "width": 8, "height": 8,
                         "text_klite": f"{text} ; thing , a definition", "score": float(i)})
        t = pa.Table.from_pylist(rows, schema=pa.schema([("url", pa.string()), ("text", pa.string()), ("image", pa.binary()),
                                                          ("width", pa.int32()), ("height", pa.int32()),
                                                          ("text_klite", pa.string()), ("score", pa.float32())]))
        t = t.append_column("uid", compute_uid(t.column("url"), t.column("text")))
        shards.write_shard(t, str(folder / f"part-{s:05d}.parquet"))
        rows_all += t.to_pylist()
    return rows_all


def test_emit_writes_parquet_wds_sizes_and_uids(tmp_path):
    rows = _pool(tmp_path / "in")
    cfg = config_mod.resolve({"emit": {"samples_per_shard": 4}})
    run_pipeline(["emit"], str(tmp_path / "r"), cfg, input_dir=str(tmp_path / "in"), workers=0)
    out = tmp_path / "r" / "emit"
    sizes = json.loads((out / "wds" / "sizes.json").read_text())
    # 10 kept rows over input shards of 7, 3 and 0 rows: resharded into 4 + 4 + 2
    assert sizes == {"part-00000.tar": 4, "part-00001.tar": 4, "part-00002.tar": 2}
    order = [u for p in sorted(glob.glob(str(out / "parquet" / "*.parquet")))
             for u in pq.read_table(p, columns=["uid"]).column("uid").to_pylist()]
    assert order == [r["uid"] for r in rows]  # input shard order, then row order
    by_uid = {r["uid"]: r for r in rows}
    seen = []
    for tar in sorted(glob.glob(str(out / "wds" / "*.tar"))):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        keys = sorted({n.split(".", 1)[0] for n in members})
        assert len(keys) == sizes[os.path.basename(tar)]
        for key in keys:
            r = by_uid[key]
            assert members[f"{key}.jpg"] == r["image"]
            assert members[f"{key}.txt"].decode() == r["text"]
            assert members[f"{key}.klite.txt"].decode() == r["text_klite"]
            meta = json.loads(members[f"{key}.json"])
            assert "image" not in meta and meta["url"] == r["url"] and meta["width"] == 8
            seen.append(key)
    assert sorted(seen) == sorted(by_uid)
    pq_rows = sum(pq.read_table(p).num_rows for p in glob.glob(str(out / "parquet" / "*.parquet")))
    assert pq_rows == len(rows)
    uids = np.load(out / "uids.npy")
    assert len(uids) == len(rows)
    as_hex = [f"{int(h):016x}{int(l):016x}" for h, l in zip(uids["hi"], uids["lo"])]
    assert as_hex == sorted(by_uid)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == len(rows) and summary["shards"] == 3
    emitted = pq.read_table(out / "parquet")
    assert "image_ref" not in emitted.column_names  # the training set holds the bytes themselves, in the tars
    assert "image" not in emitted.column_names  # the Parquet is their metadata: each image is written once
    assert emitted.column("tar").to_pylist() == [f"wds/part-{j:05d}.tar" for j in (0, 0, 0, 0, 1, 1, 1, 1, 2, 2)]
    assert emitted.column("member").to_pylist() == [f"{u}.jpg" for u in order]
    # the stage folder keeps the light table: no image bytes
    light = pq.read_table(tmp_path / "r" / "05_emit" / "part-00000.parquet")
    assert "image" not in light.column_names and light.num_rows == 7


def test_emit_is_byte_identical_and_cleans_stale_shards(tmp_path):
    _pool(tmp_path / "in", (9, 2))
    digests = []
    for run in ("a", "b"):
        run_pipeline(["emit"], str(tmp_path / run), config_mod.resolve({"emit": {"samples_per_shard": 4}}),
                     input_dir=str(tmp_path / "in"), workers=0)
        files = sorted(glob.glob(str(tmp_path / run / "emit" / "**" / "*.*"), recursive=True))
        digests.append([(os.path.relpath(f, tmp_path / run), hashlib.sha256(Path(f).read_bytes()).hexdigest())
                        for f in files if not f.endswith("summary.json")])
    assert digests[0] == digests[1]
    # bigger shards: the old -001/-002 pieces must not linger in the training set
    run_pipeline(["emit"], str(tmp_path / "a"), config_mod.resolve({"emit": {"samples_per_shard": 100}}),
                 input_dir=str(tmp_path / "in"), workers=0)
    assert sorted(os.listdir(tmp_path / "a" / "emit" / "wds")) == ["part-00000.tar", "sizes.json"]
    assert sorted(os.listdir(tmp_path / "a" / "emit" / "parquet")) == ["part-00000.parquet"]


def test_emit_rerun_rewrites_nothing_and_a_changed_row_rewrites_its_shard(tmp_path):
    _pool(tmp_path / "in", (5, 6))
    cfg = config_mod.resolve({"emit": {"samples_per_shard": 4}})
    run_pipeline(["emit"], str(tmp_path / "r"), cfg, input_dir=str(tmp_path / "in"), workers=0)
    wds = tmp_path / "r" / "emit" / "wds"
    before = {p.name: p.stat().st_mtime_ns for p in wds.glob("*.tar")}
    assert sorted(before) == ["part-00000.tar", "part-00001.tar", "part-00002.tar"]
    [res] = run_pipeline(["emit"], str(tmp_path / "r"), cfg, input_dir=str(tmp_path / "in"), workers=0)
    assert res.manifest["finalize"]["shards_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in wds.glob("*.tar")} == before
    # a caption changed in the second input shard: only the output shards holding its rows are rewritten
    t = pq.read_table(tmp_path / "in" / "part-00001.parquet")
    texts = t.column("text").to_pylist()
    texts[-1] = "a new caption"
    pq.write_table(t.set_column(t.column_names.index("text"), "text", pa.array(texts)), tmp_path / "in" / "part-00001.parquet")
    [res] = run_pipeline(["emit"], str(tmp_path / "r"), cfg, input_dir=str(tmp_path / "in"), workers=0)
    assert res.manifest["finalize"]["shards_written"] == 1
    after = {p.name: p.stat().st_mtime_ns for p in wds.glob("*.tar")}
    assert [n for n in before if after[n] != before[n]] == ["part-00002.tar"]


def test_open_clip_webdataset_loader_reads_an_emitted_shard(tmp_path):
    """open_clip_train's own get_wds_dataset (sizes.json, decode, rename jpg/txt) on our tars."""
    import argparse

    import open_clip
    import torch
    from open_clip_train.data import get_wds_dataset

    _pool(tmp_path / "in", (6, 4))
    run_pipeline(["emit"], str(tmp_path / "r"), config_mod.resolve({"emit": {"samples_per_shard": 6}}),
                 input_dir=str(tmp_path / "in"), workers=0)
    summary = json.loads((tmp_path / "r" / "emit" / "summary.json").read_text())
    wds_dir = tmp_path / "r" / "emit" / "wds"
    pattern = "::".join(str(wds_dir / n) for n in summary["wds_pattern"].split("::"))
    args = argparse.Namespace(train_data=pattern, val_data=None, train_num_samples=None, train_data_upsampling_factors=None,
                              batch_size=5, seed=0, workers=1, world_size=1, dataset_resampled=False)
    tok = open_clip.get_tokenizer("RN50")
    pre = lambda im: torch.tensor(np.asarray(im.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)
    info = get_wds_dataset(args, pre, is_train=True, tokenizer=tok)
    assert info.dataloader.num_samples == 10  # from our sizes.json
    images, texts = next(iter(info.dataloader))
    assert images.shape == (5, 3, 16, 16) and texts.shape[0] == 5


def test_emit_reshards_on_the_workers_with_the_same_bytes(tmp_path, dask_cluster, monkeypatch):
    """One task per output shard on the Dask workers (never in the driver: a driver-side finalize_item would raise
    here), byte for byte the in-process result."""
    from stages.emit import EmitStage

    _pool(tmp_path / "in", (9, 2, 5))
    cfg = config_mod.resolve({"emit": {"samples_per_shard": 4}})
    run_pipeline(["emit"], str(tmp_path / "a"), cfg, input_dir=str(tmp_path / "in"), workers=0)

    def not_here(*a, **k):
        raise AssertionError("an output shard was written in the driver")

    monkeypatch.setattr(EmitStage, "finalize_item", not_here)
    [res] = run_pipeline(["emit"], str(tmp_path / "b"), cfg, input_dir=str(tmp_path / "in"),
                         scheduler=dask_cluster.scheduler.address)
    assert res.manifest["finalize"]["shards_written"] == 4  # 16 rows in shards of 4
    digests = []
    for run in ("a", "b"):
        files = sorted(glob.glob(str(tmp_path / run / "emit" / "**" / "*.*"), recursive=True))
        digests.append([(os.path.relpath(f, tmp_path / run), hashlib.sha256(Path(f).read_bytes()).hexdigest())
                        for f in files if not f.endswith("summary.json")])
    assert digests[0] == digests[1] and len(digests[0]) >= 4 * 3 + 2
