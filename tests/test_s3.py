"""A run folder and the image store on an S3 API (moto's standalone server on loopback, as s3fs's own tests
do): ingest downloads into the bucket, curation stages read pixels from it on 2 Dask workers, emit writes the
training set there, and a rerun resumes there (only what is missing is redone, to the same bytes)."""

from __future__ import annotations

import hashlib
import io

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from tests.s3_server import moto_s3
from pipeline.cli import main as cli_main  # noqa: E402



@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A fresh moto server on loopback; the AWS and fsspec settings point there (Dask workers inherit them)."""
    with moto_s3(tmp_path_factory.mktemp("moto"), "curation") as fs:
        yield fs


def _digest(fs, path: str) -> str:
    return hashlib.sha256(fs.cat_file(path)).hexdigest()


def test_run_folder_and_image_store_on_s3_with_resume(s3, tmp_path, capsys, caplog):
    from demo.world import make_world

    world = tmp_path / "world"
    make_world(world, n=300, seed=0)
    runs = "s3://curation/runs"
    base = ["--runs-dir", runs]
    assert cli_main(base + ["ingest", str(world / "urls.parquet"), "--run", "w", "--config", str(world / "config.toml"),
                            "--workers", "0"]) == 0
    assert s3.ls("curation/runs/w/00_ingest/_img2dataset")  # the image store itself is in the bucket
    # a filtering network in the bucket too (untrained weights: the path is what is tested, not the scores)
    import io as _io

    import torch

    from trainer import models

    model, *_ = models.create("clipcurate-tiny", device="cpu")
    buf = _io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "model_name": "clipcurate-tiny"}, buf)
    s3.pipe("curation/models/dfn.pt", buf.getvalue())
    cfg = tmp_path / "dfn.toml"
    cfg.write_text('[dfn]\ncheckpoint = "s3://curation/models/dfn.pt"\nkeep_fraction = 0.5\ndevice = "cpu"\n')
    stages = ["run", "align,metaclip,klite,dfn,emit", "--run", "w", "--workers", "2"]
    assert cli_main(base + stages + ["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "s3://curation/runs/w/emit/wds/" in out
    tars = s3.glob("curation/runs/w/emit/wds/*.tar")
    assert tars and s3.exists("curation/runs/w/emit/uids.npy")
    import io
    import tarfile

    import numpy as np

    uids = np.load(io.BytesIO(s3.cat_file("curation/runs/w/emit/uids.npy")))
    with tarfile.open(fileobj=io.BytesIO(s3.cat_file(tars[0]))) as tar:
        jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert len(jpgs) == len(uids) > 50  # every emitted sample's image, read from the store in the bucket
    before = {p: _digest(s3, p) for p in s3.glob("curation/runs/w/0*/part-*.parquet") + tars}

    # resume: a stage shard lost in the bucket (output and marker) is redone alone, to the same bytes
    lost = sorted(s3.glob("curation/runs/w/01_align/part-*.parquet"))[0]
    s3.rm(lost)
    s3.rm(lost.replace("/01_align/", "/01_align/_done/") + ".json")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a new command is a new process: no listing cached from before
    caplog.clear()
    with caplog.at_level("INFO", logger="clipcurate"):
        assert cli_main(base + stages) == 0
    assert "align: 1 shards to do" in caplog.text and "2 up to date, skipped" in caplog.text
    for later in ("metaclip", "klite", "dfn", "emit"):  # the redone shard has the same bytes: nothing after is redone
        assert f"{later}: 3 shards up to date, skipped" in caplog.text
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    after = {p: _digest(s3, p) for p in s3.glob("curation/runs/w/0*/part-*.parquet") + tars}
    assert after == before

    # the report, drawn here and written next to the run in the bucket: funnel, the stages' figures, thumbnails
    assert cli_main(base + ["report", "--run", "w"]) == 0
    html = s3.cat_file("curation/runs/w/report/report.html").decode()
    md = s3.cat_file("curation/runs/w/report/report.md").decode()
    assert "<h2>Funnel</h2>" in html and "## Funnel" in md and "data:image/jpeg;base64," in html
    import re

    figures = re.findall(r'src="([^"]+\.png)"', html)
    assert len(figures) >= 3 and all(s3.exists(f"curation/runs/w/report/{f}") for f in figures)


def test_eval_images_on_s3_give_the_same_hashes_and_fingerprint(s3, tmp_path):
    """align's eval set (a folder of images, nested, or Parquet files) read through fsspec: the same dHashes and
    the same fingerprint part as the local copy."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from stages.align import AlignStage
    from stages.align.images import load_eval_hashes

    local = tmp_path / "eval"
    rng = np.random.default_rng(0)
    for i, rel in enumerate(["a.png", "b-c/x.png", "b/y.jpg", "b/z/w.png", "notes.txt"]):
        f = local / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            f.write_text("not an image")
            continue
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(buf, "PNG")
        f.write_bytes(buf.getvalue())
    s3.put(str(local), "curation/eval", recursive=True)
    pq.write_table(pa.table({"image": [(local / "a.png").read_bytes(), b"junk"]}), tmp_path / "set.parquet")
    s3.put(str(tmp_path / "set.parquet"), "curation/sets/set.parquet")

    for here, there in ((str(local), "s3://curation/eval"), (str(tmp_path / "set.parquet"), "s3://curation/sets"),
                        (str(tmp_path / "set.parquet"), "s3://curation/sets/set.parquet")):
        a, bad_a = load_eval_hashes(here, 10**7)
        b, bad_b = load_eval_hashes(there, 10**7)
        assert sorted(a.tolist()) == sorted(b.tolist()) and bad_a == bad_b and len(a) >= 1
    assert len(load_eval_hashes("s3://curation/eval", 10**7)[0]) == 4
    fl = AlignStage({"eval_images": str(local)}).fingerprint_parts()["eval"]
    fs3 = AlignStage({"eval_images": "s3://curation/eval"}).fingerprint_parts()["eval"]
    assert fl == fs3 and [r for r, _ in fl] == ["a.png", "b/y.jpg", "b/z/w.png", "b-c/x.png", "notes.txt"]
    # the part as it was before fsspec (pathlib's order and sizes), so a local eval set's runs are not redone
    before = [(str(f.relative_to(local)), f.stat().st_size) for f in sorted(x for x in local.rglob("*") if x.is_file())]
    assert fl == before


def test_training_runs_resumes_and_evaluates_in_the_bucket(s3, tmp_path, capsys):
    """A run whose runs dir is s3://: the training Parquet is read from the run's emit folder in the bucket;
    step checkpoints, model.pt, metrics.jsonl, train.json and the eval results land there; a run stopped after
    step 3 resumes from its checkpoint there and ends with the weights and losses of an uninterrupted local run
    on a local copy of the data (bit for bit on CPU). The eval sets stay local."""
    import json

    import s3fs
    import torch

    from demo.world import make_world
    from tests.test_trainer import _losses
    from trainer.config import TrainConfig
    from trainer.train import checkpoints, train

    world = tmp_path / "world"
    make_world(world, n=300, seed=0)
    hq = str(world / "hq.parquet")
    settings = dict(steps=6, batch_size=16, save_every=2, keep_checkpoints=1, warmup=1, log_every=1, workers=0,
                    device="cpu", lr=5e-4)
    local = tmp_path / "local"
    full = train(TrainConfig(**settings), hq, str(local), progress=False)

    s3.put(hq, "curation/runs/t/emit/parquet/part-00000.parquet")  # the emit folder's Parquet part
    out = "s3://curation/runs/t/train"
    part = train(TrainConfig(**settings), "s3://curation/runs/t/emit", out, progress=False, stop_after=3)
    assert part["stopped"] and part["checkpoint"] == f"{out}/checkpoints/step-000003.pt"
    assert checkpoints(out) == [(3, f"{out}/checkpoints/step-000003.pt")]  # step 2's pruned (keep_checkpoints=1)
    assert not s3.exists("curation/runs/t/train/model.pt")
    metrics = s3.cat_file("curation/runs/t/train/metrics.jsonl").decode()
    assert [json.loads(line)["step"] for line in metrics.splitlines()] == [1, 2, 3]  # rewritten at the checkpoint

    # resumed through the command line (a new process: nothing cached), evaluated on the demo's eval sets
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
                   + f"eval_sets = [\"{world / 'eval' / 'classification.parquet'}\"]\n")
    s3fs.S3FileSystem.clear_instance_cache()
    base = ["--runs-dir", "s3://curation/runs"]
    train_args = base + ["train", "--run", "t", "--config", str(cfg), "--resume"]  # data: the run's emit folder
    assert cli_main(train_args) == 0
    printed = capsys.readouterr().out
    assert f"model: {out}/model.pt" in printed and f"-> {out}/eval-classification.json" in printed
    names = {p.rsplit("/", 1)[-1] for p in s3.ls("curation/runs/t/train")}
    assert "data_digests.json" not in names  # the data's digests are the bucket's ETags: nothing to remember
    assert {"model.pt", "train.json", "metrics.jsonl", "eval-classification.json", "eval_fingerprint.json",
            "checkpoints"} <= names
    assert not [n for n in s3.find("curation/runs/t") if "tmp" in n.rsplit("/", 1)[-1]]  # no temporaries left
    summary = json.loads(s3.cat_file("curation/runs/t/train/train.json"))
    assert summary["resumed_from"] == 3 and summary["steps"] == 6 and summary["model_path"] == f"{out}/model.pt"
    assert summary["last_loss"] == full["last_loss"] and summary["pairs"] == full["pairs"]
    assert summary["data"] == "s3://curation/runs/t/emit"
    remote = [(d["step"], d["loss"]) for d in map(json.loads, s3.cat_file("curation/runs/t/train/metrics.jsonl")
                                                   .decode().splitlines())]
    assert remote == _losses(local / "metrics.jsonl") and [s for s, _ in remote] == list(range(1, 7))
    sa = torch.load(local / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(io.BytesIO(s3.cat_file("curation/runs/t/train/model.pt")), weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert checkpoints(out) == [(6, f"{out}/checkpoints/step-000006.pt")]

    # --resume again: nothing to train, and the recorded eval results are read back from the bucket
    s3fs.S3FileSystem.clear_instance_cache()
    assert cli_main(train_args) == 0
    printed = capsys.readouterr().out
    assert "nothing to train" in printed and "recorded results" in printed
    # eval by run name: the model in the bucket, results written there again
    s3.rm("curation/runs/t/train/eval-classification.json")
    assert cli_main(base + ["eval", "--run", "t", "--config", str(cfg)]) == 0
    assert json.loads(s3.cat_file("curation/runs/t/train/eval-classification.json"))["checkpoint"] == f"{out}/model.pt"
