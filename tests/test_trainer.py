"""trainer: loss goes down, exact resume, Parquet/tar sources, K-LITE choice, zero-shot metrics by hand, CLI."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(min(2, torch.get_num_threads()))

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 30)}
SHAPES = ["circle", "square", "triangle", "cross"]


def _image(shape: str, colour: str, rng: random.Random, size: int = 80) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), tuple(rng.randint(225, 250) for _ in range(3)))
    d = ImageDraw.Draw(im)
    c = COLOURS[colour]
    s = rng.randint(size // 2, size - 12)
    x, y = rng.randint(2, size - s - 2), rng.randint(2, size - s - 2)
    if shape == "circle":
        d.ellipse([x, y, x + s, y + s], fill=c)
    elif shape == "square":
        d.rectangle([x, y, x + s, y + s], fill=c)
    elif shape == "triangle":
        d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=c)
    else:
        w = s // 3
        d.rectangle([x + w, y, x + 2 * w, y + s], fill=c)
        d.rectangle([x, y + w, x + s, y + 2 * w], fill=c)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _caption(shape: str, colour: str, rng: random.Random) -> str:
    return rng.choice(["a {c} {s}", "a photo of a {c} {s}", "{c} {s} on a white background", "the {c} {s}"]).format(
        c=colour, s=shape
    )


def synthetic_world(out: Path, n: int = 600, seed: int = 0) -> dict:
    """A small stand-in for demo.world: hq.parquet (clean pairs), pool.parquet (clean + mismatched
    captions, with `kind`), eval/classification.parquet (+ classnames.txt) and eval/retrieval.parquet."""
    from pipeline.schema import compute_uid

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)

    def pairs(m, mismatch_share=0.0, tag="p"):
        rows = []
        for i in range(m):
            sh, co = rng.choice(SHAPES), rng.choice(list(COLOURS))
            kind = "clean"
            tsh, tco = sh, co
            if rng.random() < mismatch_share:
                kind = "mismatched"
                while (tsh, tco) == (sh, co):
                    tsh, tco = rng.choice(SHAPES), rng.choice(list(COLOURS))
            text = _caption(tsh, tco, rng)
            rows.append({"url": f"http://demo.invalid/{tag}/{i}.jpg", "text": text, "image": _image(sh, co, rng),
                         "width": 80, "height": 80, "kind": kind, "shape": sh, "colour": co,
                         "text_klite": f"{text} ; {tsh} , a plane figure"})
        t = pa.Table.from_pylist(rows)
        return t.append_column("uid", compute_uid(t.column("url"), t.column("text")))

    hq = pairs(n, 0.0, "hq")
    pq.write_table(hq.drop_columns(["kind", "text_klite"]), out / "hq.parquet")
    pool = pairs(n, 0.5, "pool")
    pq.write_table(pool, out / "pool.parquet")
    (out / "eval").mkdir(exist_ok=True)
    names = SHAPES
    cls_rows = []
    for i in range(64):
        sh, co = names[i % len(names)], rng.choice(list(COLOURS))
        cls_rows.append({"image": _image(sh, co, rng), "label": sh, "label_id": names.index(sh)})
    pq.write_table(pa.Table.from_pylist(cls_rows), out / "eval" / "classification.parquet")
    (out / "eval" / "classnames.txt").write_text("\n".join(names) + "\n")
    ret_rows = []
    for i in range(32):
        sh, co = rng.choice(SHAPES), rng.choice(list(COLOURS))
        ret_rows.append({"image": _image(sh, co, rng), "captions": [_caption(sh, co, rng), f"a {co} {sh}"]})
    pq.write_table(pa.Table.from_pylist(ret_rows), out / "eval" / "retrieval.parquet")
    return {"hq": str(out / "hq.parquet"), "pool": str(out / "pool.parquet"),
            "classification": str(out / "eval" / "classification.parquet"),
            "retrieval": str(out / "eval" / "retrieval.parquet")}


def tiny_cfg(**kw):
    from trainer.config import TrainConfig

    base = dict(steps=30, batch_size=32, workers=0, log_every=1, save_every=15, keep_checkpoints=1, warmup=5,
                lr=5e-4, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _losses(path: Path) -> list[tuple[int, float]]:
    return [(d["step"], d["loss"]) for d in map(json.loads, path.read_text().splitlines())]


def demo_or_synthetic_world(folder: Path, n_demo: int = 300) -> dict:
    """The demo world's HQ and eval sets (demo.world, n=300: 300 HQ pairs, 240 + 120 eval images) for
    training and evaluation; the synthetic world's pool (labelled clean / mismatched, with `text_klite`) for
    what needs rows with image bytes: the demo pool's images are only reachable through ingest."""
    w = synthetic_world(folder / "synthetic", n=400)
    w["demo"] = False
    try:
        from demo.world import make_world
    except ImportError:
        return w
    make_world(folder / "demo", n=n_demo, seed=0)
    d = folder / "demo"
    w.update(hq=str(d / "hq.parquet"), classification=str(d / "eval" / "classification.parquet"),
             retrieval=str(d / "eval" / "retrieval.parquet"), demo=True)
    return w


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return demo_or_synthetic_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """An uninterrupted 30-step run (batch 32) on the clean pairs."""
    from trainer.train import train

    out = tmp_path_factory.mktemp("train_full")
    summary = train(tiny_cfg(), world["hq"], str(out), progress=False)
    return out, summary


def test_thirty_steps_lower_the_contrastive_loss(trained):
    out, s = trained
    losses = [l for _, l in _losses(out / "metrics.jsonl")]
    assert len(losses) == 30 and s["steps"] == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    assert (out / "model.pt").exists() and (out / "train.json").exists()
    # one step checkpoint kept (keep_checkpoints=1): the last one
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000030.pt"]


def test_the_tiny_resnet_trains_and_loads_back(world, tmp_path):
    """clipcurate-tiny-rn (the web-noise ablation's model): open_clip's ModifiedResNet under our text tower
    learns on the clean pairs and its checkpoint loads back as the same model."""
    from trainer import models
    from trainer.train import train

    s = train(tiny_cfg(model="clipcurate-tiny-rn", save_every=30), world["hq"], str(tmp_path), progress=False)
    losses = [l for _, l in _losses(tmp_path / "metrics.jsonl")]
    assert s["steps"] == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    model, pre, tok, name = models.load(str(tmp_path / "model.pt"), device="cpu")
    assert name == "clipcurate-tiny-rn" and type(model.visual).__name__ == "ModifiedResNet"
    trained = torch.load(tmp_path / "checkpoints" / "step-000030.pt", weights_only=True)["state_dict"]
    loaded = model.state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    with torch.no_grad():
        f = model.encode_image(torch.zeros(2, 3, 64, 64), normalize=True)
    assert f.shape == (2, 128) and torch.isfinite(f).all()


def test_resume_continues_the_step_count_with_the_same_loss(trained, world, tmp_path):
    from trainer.train import latest_checkpoint, train

    full_out, full = trained
    out = tmp_path / "interrupted"
    part = train(tiny_cfg(), world["hq"], str(out), progress=False, stop_after=15)
    assert part["stopped"] and part["steps"] == 15 and latest_checkpoint(str(out)).endswith("step-000015.pt")
    assert not (out / "model.pt").exists()
    # resumed with DataLoader workers: batch order and augmentation do not depend on them
    rest = train(tiny_cfg(workers=1), world["hq"], str(out), resume=True, progress=False)
    assert rest["resumed_from"] == 15 and rest["steps"] == 30
    a, b = _losses(full_out / "metrics.jsonl"), _losses(out / "metrics.jsonl")
    assert [s for s, _ in b] == list(range(1, 31))
    assert a == b  # bit-identical on CPU
    assert rest["last_loss"] == full["last_loss"]
    sa = torch.load(full_out / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_on_other_data_or_settings_starts_afresh(world, tmp_path):
    """A checkpoint is resumed only by the run that wrote it: other data (the pipeline re-curated) or other
    training settings start from step 0 and leave no step file of the old run behind."""
    import shutil

    from trainer.train import checkpoints, train

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(world["hq"], data / "part-00000.parquet")
    pq.write_table(pa.table({"url": ["x"]}), data / "_urls.parquet")  # bookkeeping: never read as data
    out = tmp_path / "out"
    first = train(tiny_cfg(steps=10, save_every=5, keep_checkpoints=2), str(data), str(out), progress=False)
    assert first["steps"] == 10 and [s for s, _ in checkpoints(str(out))] == [5, 10]
    again = train(tiny_cfg(steps=10, save_every=5), str(data), str(out), resume=True, progress=False)
    assert again["first_loss"] is None  # same run: nothing left to do
    more = train(tiny_cfg(steps=12, save_every=5), str(data), str(out), resume=True, progress=False)
    assert more["resumed_from"] == 10  # more steps of the same run: a resume
    t = pq.read_table(data / "part-00000.parquet")
    pq.write_table(t.slice(0, t.num_rows - 7), data / "part-00000.parquet")  # the data changed
    fresh = train(tiny_cfg(steps=6, save_every=5), str(data), str(out), resume=True, progress=False)
    assert fresh["resumed_from"] == 0 and fresh["steps"] == 6 and fresh["pairs"] == t.num_rows - 7
    assert [s for s, _ in checkpoints(str(out))] == [6]  # not the old run's step 10 or 12
    other = train(tiny_cfg(steps=6, save_every=5, lr=1e-4), str(data), str(out), resume=True, progress=False)
    assert other["resumed_from"] == 0  # other settings


def test_step_sampler_resume_and_epochs():
    from trainer.data import StepBatchSampler

    full = list(StepBatchSampler(10, 3, seed=1, start_step=0, total_steps=7))
    assert list(StepBatchSampler(10, 3, seed=1, start_step=4, total_steps=7)) == full[4:]
    per_epoch = 10 // 3
    for e in range(2):
        rows = [r for batch in full[e * per_epoch:(e + 1) * per_epoch] for r, ep in batch]
        assert len(set(rows)) == 9 and all(ep == e for b in full[e * per_epoch:(e + 1) * per_epoch] for _, ep in b)
    assert full[0] != full[per_epoch]  # a new permutation each epoch


def _tars_from(table: pa.Table, folder: Path) -> None:
    from stages.emit import EmitStage  # the format the trainer must read is what emit writes

    folder.mkdir(parents=True, exist_ok=True)
    half = table.num_rows // 2
    for i, piece in enumerate([table.slice(0, half), table.slice(half)]):
        (folder / f"part-{i:05d}-000.tar").write_bytes(EmitStage()._tar(piece))


def test_parquet_and_webdataset_sources_give_the_same_pairs(world, tmp_path):
    from trainer.data import open_source

    t = pq.read_table(world["pool"]).slice(0, 40)
    pq.write_table(t, tmp_path / "p.parquet")
    _tars_from(t, tmp_path / "wds")
    a, b = open_source(str(tmp_path / "p.parquet")), open_source(str(tmp_path / "wds"))
    assert len(a) == len(b) == 40
    got_a = sorted(a.get(i) for i in range(40))
    got_b = sorted(b.get(i) for i in range(40))
    assert got_a == got_b  # image bytes, text, text_klite, uid
    # an emit folder (parquet/ + wds/) reads its Parquet part
    (tmp_path / "emit" / "parquet").mkdir(parents=True)
    pq.write_table(t, tmp_path / "emit" / "parquet" / "part-00000-000.parquet")
    _tars_from(t, tmp_path / "emit" / "wds")
    assert type(open_source(str(tmp_path / "emit"))).__name__ == "ParquetSource"


def test_klite_choice_is_per_sample_seeded_and_configurable(world):
    import open_clip

    from trainer import models
    from trainer.data import PairDataset, open_source

    models.register_configs()
    tok = open_clip.get_tokenizer("clipcurate-tiny")
    src = open_source(world["pool"])
    ident = lambda img: torch.zeros(1)  # noqa: E731

    def chosen(prob, epoch, seed=0):
        ds = PairDataset(src, ident, tok, seed=seed, klite_prob=prob)
        u, _ = ds._draws(epoch)
        return np.array([src.klite[i] is not None and u[i] < prob for i in range(len(src))])

    c0 = chosen(0.5, 0)
    assert 0.4 < c0.mean() < 0.6
    assert (chosen(0.5, 0) == c0).all()  # pure function of (uid, seed, epoch)
    assert (chosen(0.5, 1) != c0).any()  # a new draw each epoch
    assert not chosen(0.0, 0).any() and chosen(1.0, 0).all()
    assert 0.15 < chosen(0.25, 0).mean() < 0.35
    # the dataset returns the chosen text's tokens
    ds = PairDataset(src, ident, tok, seed=0, klite_prob=1.0)
    _, tokens = ds[(0, 0)]
    assert torch.equal(tokens, tok([src.klite[0]])[0])


# ---- zero-shot metrics, by hand -------------------------------------------------------------------
def test_topk_accuracy_by_hand():
    from trainer.evaluate import topk_accuracy

    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # label 0: top-1 hit
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],   # label 4: rank 5 -> top-5 hit only
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],   # label 5: rank 6 -> miss
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],   # label 2: hit
    ])
    res = topk_accuracy(logits, [0, 4, 5, 2])
    assert res == {"top1": 0.5, "top5": 0.75}


def test_per_class_top1_by_hand():
    from trainer.evaluate import per_class_top1

    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.7, 0.3, 0.0], [0.1, 0.2, 0.6]])
    # a: rows 0 (hit) and 3 (predicted c: miss); b: rows 1 (hit) and 2 (predicted a: miss)
    assert per_class_top1(logits, [0, 1, 1, 0], ["a", "b", "c"]) == {"a": 0.5, "b": 0.5}  # c has no images


def test_retrieval_recall_by_hand():
    from trainer.evaluate import retrieval_recall

    img = torch.eye(3)
    # texts 0 and 1 describe image 0, text 2 image 1, text 3 image 2 (unit vectors; no ties that matter)
    txt = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0, 0.6, 0.8], [0.8, 0, 0.6]])
    r = retrieval_recall(img, txt, [0, 0, 1, 2], ks=(1, 2))
    # text -> image: t0 -> img0 (hit); t1 -> img1 0.8 > img0 0.6; t2 -> img2 0.8 > img1 0.6; t3 -> img0 0.8 > img2 0.6
    assert r["text_to_image_R@1"] == pytest.approx(1 / 4)
    assert r["text_to_image_R@2"] == pytest.approx(1.0)
    # image -> text: img0 -> t0 (own); img1 -> t1 (img0's) then t2 (own); img2 -> t2 (img1's) then t3 (own)
    assert r["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(1.0)


def test_class_embeddings_average_templates_by_hand():
    from trainer.evaluate import class_embeddings, topk_accuracy

    vecs = {"a photo of a cat.": [1.0, 0.0], "a cat.": [0.0, 1.0], "a photo of a dog.": [-1.0, 0.0], "a dog.": [0.0, -1.0]}

    keys = list(vecs)

    class FakeModel:  # "token ids" = the prompt's index in `keys`; unnormalised embeddings are fine here
        def encode_text(self, tokens, normalize=True):
            e = torch.tensor([vecs[keys[int(t)]] for t in tokens])
            return e / e.norm(dim=1, keepdim=True) if normalize else e

    tokenizer = lambda texts: torch.tensor([keys.index(t) for t in texts])  # noqa: E731
    emb = class_embeddings(FakeModel(), tokenizer, ["cat", "dog"], ["a photo of a {}.", "a {}."], "cpu")
    s = 2 ** -0.5
    assert torch.allclose(emb, torch.tensor([[s, s], [-s, -s]]))
    images = torch.tensor([[1.0, 0.2], [-0.3, -1.0], [0.1, 0.1]])
    assert topk_accuracy(images @ emb.T, [0, 1, 1], ks=(1,)) == {"top1": pytest.approx(2 / 3)}


def _ref_topk(logits: np.ndarray, labels, k: int) -> float:
    """Straightforward top-k: the label's score beaten by fewer than k others (no ties in random floats)."""
    hits = [sum(row[j] > row[y] for j in range(len(row))) < k for row, y in zip(logits, labels)]
    return sum(hits) / len(hits)


def _ref_recall(img: np.ndarray, txt: np.ndarray, t2i: list[int], k: int) -> tuple[float, float]:
    """Straightforward R@k both ways, by sorting per query."""
    sim = img @ txt.T
    i2t = []
    for i in range(len(img)):
        best = sorted(range(len(txt)), key=lambda t: -sim[i, t])[:k]
        i2t.append(any(t2i[t] == i for t in best))
    t2i_hits = []
    for t in range(len(txt)):
        best = sorted(range(len(img)), key=lambda i: -sim[i, t])[:k]
        t2i_hits.append(t2i[t] in best)
    return sum(i2t) / len(i2t), sum(t2i_hits) / len(t2i_hits)


def test_zero_shot_metrics_equal_a_straightforward_reference():
    from trainer.evaluate import retrieval_recall, topk_accuracy

    rng = np.random.default_rng(0)
    for trial in range(5):
        n, c = int(rng.integers(5, 40)), int(rng.integers(2, 12))
        logits = rng.normal(size=(n, c)).astype(np.float32)
        labels = rng.integers(0, c, n)
        got = topk_accuracy(torch.from_numpy(logits), labels, ks=(1, 3, 5))
        for k in (1, 3, 5):
            assert got[f"top{k}"] == pytest.approx(_ref_topk(logits, labels, min(k, c)))
        n_img = int(rng.integers(3, 15))
        t2i = [i for i in range(n_img) for _ in range(int(rng.integers(1, 4)))]  # 1-3 captions per image
        img = rng.normal(size=(n_img, 8)).astype(np.float32)
        txt = (img[t2i] + rng.normal(scale=1.5, size=(len(t2i), 8))).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        got = retrieval_recall(img, txt, t2i, ks=(1, 2, 5, 10))
        for k in (1, 2, 5, 10):
            i2t, t2i_r = _ref_recall(img, txt, t2i, k)
            assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t), (trial, k)
            assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i_r), (trial, k)


def test_evaluate_model_equals_a_hand_computed_zero_shot(trained, world):
    """evaluate() on a real checkpoint and eval set == class prompts / captions embedded and ranked by hand."""
    from trainer import models
    from trainer.config import DEFAULT_TEMPLATES
    from trainer.data import decode_image
    from trainer.evaluate import evaluate

    out, _ = trained
    res = evaluate(str(out / "model.pt"), [world["classification"], world["retrieval"]], device="cpu")["results"]
    model, pre, tok, _ = models.load(str(out / "model.pt"), device="cpu")
    size = models.image_size(model)

    def enc_img(blobs):
        with torch.no_grad():
            return model.encode_image(torch.stack([pre(decode_image(b, size)) for b in blobs]), normalize=True).numpy()

    def enc_txt(texts):
        with torch.no_grad():
            return model.encode_text(tok(texts), normalize=True).numpy()

    t = pq.read_table(world["classification"])
    names = Path(world["classification"]).with_name("classnames.txt").read_text().split("\n")
    names = [x for x in names if x]
    cls_emb = []
    for name in names:
        e = enc_txt([tpl.format(name) for tpl in DEFAULT_TEMPLATES]).mean(0)
        cls_emb.append(e / np.linalg.norm(e))
    logits = enc_img(t.column("image").to_pylist()) @ np.stack(cls_emb).T
    labels = [names.index(x) for x in t.column("label").to_pylist()]
    assert res["classification"]["top1"] == pytest.approx(_ref_topk(logits, labels, 1), abs=1e-6)
    assert res["classification"]["top5"] == pytest.approx(_ref_topk(logits, labels, 5), abs=1e-6)
    r = pq.read_table(world["retrieval"])
    caps = r.column("captions").to_pylist()
    t2i = [i for i, cs in enumerate(caps) for _ in cs]
    img, txt = enc_img(r.column("image").to_pylist()), enc_txt([c for cs in caps for c in cs])
    for k in (1, 5, 10):
        i2t, t2i_r = _ref_recall(img, txt, t2i, k)
        assert res["retrieval"][f"image_to_text_R@{k}"] == pytest.approx(i2t, abs=1e-6)
        assert res["retrieval"][f"text_to_image_R@{k}"] == pytest.approx(t2i_r, abs=1e-6)


# ---- command line ----------------------------------------------------------------------------------
def test_cli_train_then_eval(world, tmp_path, capsys):
    from pipeline.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[train]\nbatch_size = 16\nsave_every = 2\nkeep_checkpoints = 1\nworkers = 0\nwarmup = 1\ndevice = \"cpu\"\n"
        f"eval_sets = [\"{world['classification']}\", \"{world['retrieval']}\"]\n"
    )
    runs = str(tmp_path / "runs")
    rc = main(["--runs-dir", runs, "train", "--run", "r", "--config", str(cfg), "--data", world["hq"], "--steps", "3"])
    assert rc == 0
    train_dir = Path(runs) / "r" / "train"
    assert (train_dir / "model.pt").exists() and len(_losses(train_dir / "metrics.jsonl")) == 1  # log_every 10: last step
    cls = json.loads((train_dir / "eval-classification.json").read_text())
    n_cls = pq.read_metadata(world["classification"]).num_rows
    classes = len(Path(world["classification"]).with_name("classnames.txt").read_text().split())
    assert cls["kind"] == "classification" and cls["classes"] == classes and cls["images"] == n_cls
    assert 0.0 <= cls["top1"] <= cls["top5"] <= 1.0
    ret = json.loads((train_dir / "eval-retrieval.json").read_text())
    caps = pq.read_table(world["retrieval"], columns=["captions"]).column("captions").to_pylist()
    assert ret["images"] == len(caps) and ret["texts"] == sum(map(len, caps))
    assert all(0 <= ret[k] <= 1 for k in ret if "R@" in k)
    # --resume at the end: nothing left to do, same model
    assert main(["--runs-dir", runs, "train", "--run", "r", "--config", str(cfg), "--data", world["hq"],
                 "--steps", "3", "--resume", "--no-eval"]) == 0
    # eval a checkpoint file on one set, and a run by name (its [train] eval_sets)
    out = tmp_path / "ev"
    assert main(["--runs-dir", runs, "eval", "--checkpoint", str(train_dir / "model.pt"),
                 "--data", world["classification"], "--out", str(out)]) == 0
    assert json.loads((out / "eval-classification.json").read_text())["top1"] == cls["top1"]
    assert main(["--runs-dir", runs, "eval", "--run", "r", "--config", str(cfg)]) == 0
    assert "image_to_text_R@1" in capsys.readouterr().out


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    from pipeline.cli import main

    runs = str(tmp_path / "runs")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstep = 3\n")
    assert main(["--runs-dir", runs, "train", "--run", "r", "--config", str(bad)]) == 2
    assert "unknown key 'step'" in capsys.readouterr().err
    assert main(["--runs-dir", runs, "train", "--run", "r"]) == 2  # no emit folder yet
    err = capsys.readouterr().err
    assert "emit" in err and len(err.strip().splitlines()) == 1
    assert main(["--runs-dir", runs, "eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", world["retrieval"]]) == 2
    assert main(["--runs-dir", runs, "eval", "--checkpoint", world["hq"], "--data", world["hq"]]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "is not a PyTorch checkpoint" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_training_uses_cuda_and_autocast(world, tmp_path):
    from trainer import models
    from trainer.train import train

    dev = models.pick_device("auto")
    assert dev.type == "cuda" and models.pick_precision("auto", dev) in ("amp_bf16", "amp_fp16")
    s = train(tiny_cfg(device="auto", workers=2, steps=10, save_every=10), world["hq"], str(tmp_path), progress=False)
    assert s["device"].startswith("cuda") and s["precision"].startswith("amp") and np.isfinite(s["last_loss"])


# ---- the scorer's eval transform ---------------------------------------------------------------------
def _noise_image(w: int, h: int, mode: str, seed: int):
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, bands), dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0] if bands == 1 else arr, mode)
    return img.filter(ImageFilter.GaussianBlur(1)) if seed % 2 else img  # sharp noise and smooth content


@pytest.mark.parametrize("model_name", ["clipcurate-tiny", "clipcurate-tiny-rn", "clipcurate-small"])
def test_fast_eval_transform_matches_open_clip_preprocess(model_name):
    """FastEvalTransform (uint8 Pillow part + batched normalisation) == open_clip's preprocess, image by image."""
    import open_clip

    from trainer import models
    from trainer.data import FastEvalTransform

    models.register_configs()
    pre = open_clip.image_transform(open_clip.get_model_config(model_name)["vision_cfg"]["image_size"], is_train=False)
    fast = FastEvalTransform.from_compose(pre)
    assert fast is not None
    S = fast.size
    # square, exact size, off-by-one, upscales, wide, tall, extreme aspects, odd crops; RGBA and grayscale too
    sizes = [(S, S), (S + 1, S), (S, S + 1), (S - 3, S - 3), (80, 80), (200, 50), (50, 200), (37, 300), (640, 481),
             (481, 640), (7, 300), (1000, 3), (1, 1)]
    imgs = [_noise_image(w, h, "RGB", i) for i, (w, h) in enumerate(sizes)]
    imgs += [_noise_image(123, 77, "RGBA", 1), _noise_image(90, 150, "L", 2)]
    for img in imgs:
        ref = pre(img)
        u8 = fast(img)
        assert u8.dtype == np.uint8 and u8.shape == (S, S, 3), (img.size, img.mode, u8.shape)
        got = fast.normalize(torch.from_numpy(u8.copy())[None])[0]
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-5, rtol=0), (img.size, img.mode, float((got - ref).abs().max()))


def test_fast_eval_transform_declines_other_transforms():
    import open_clip
    from torchvision import transforms as T

    from trainer.data import FastEvalTransform

    assert FastEvalTransform.from_compose(open_clip.image_transform(64, is_train=True)) is None  # random crop
    squash = open_clip.image_transform(64, is_train=False, resize_mode="squash")
    assert FastEvalTransform.from_compose(squash) is None
    nearest = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(64), T.ToTensor(),
                         T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert FastEvalTransform.from_compose(nearest) is None
    assert FastEvalTransform.from_compose(lambda img: img) is None


def _random_checkpoint(path: Path, model_name: str = "clipcurate-tiny", seed: int = 0) -> str:
    from trainer import models

    torch.manual_seed(seed)
    model, _, _, _ = models.create(model_name)
    torch.save({"model_name": model_name, "state_dict": model.state_dict(), "step": 0}, path)
    return str(path)


def test_scorer_equals_a_plain_open_clip_cosine(world, tmp_path):
    """Scorer (fast transform, DataLoader, NaN for bad images) == preprocess + encode + cosine, pair by pair."""
    from trainer import models
    from trainer.data import decode_image
    from trainer.score import Scorer

    ck = _random_checkpoint(tmp_path / "m.pt")
    t = pq.read_table(world["pool"]).slice(0, 40)
    images, texts = t.column("image").to_pylist(), t.column("text").to_pylist()
    images[3], images[7] = None, b"not an image"
    for i, (w, h) in zip((0, 1, 2), [(300, 260), (520, 140), (256, 256)]):  # big JPEGs: decoded in draft mode
        buf = io.BytesIO()
        _noise_image(w, h, "RGB", i).save(buf, "JPEG", quality=90)
        images[i] = buf.getvalue()
    for workers in (0, 1):
        sc = Scorer(ck, device="cpu", batch_size=16, num_workers=workers)
        assert sc.fast is not None
        got = sc.score(images, texts)
        assert got.dtype == np.float32 and np.isnan(got[[3, 7]]).all() and np.isfinite(np.delete(got, [3, 7])).all()
    model, pre, tok, _ = models.load(ck, device="cpu")
    ok = [i for i in range(40) if i not in (3, 7)]
    with torch.no_grad():
        x = torch.stack([pre(decode_image(images[i], models.image_size(model))) for i in ok])
        fi = model.encode_image(x, normalize=True)
        ft = model.encode_text(tok([texts[i] for i in ok]), normalize=True)
    ref = (fi * ft).sum(-1).numpy()
    np.testing.assert_allclose(got[ok], ref, atol=1e-5, rtol=0)
    assert np.ptp(ref) > 1e-3  # a non-degenerate comparison


def test_draws_in_workers_equal_pipeline_uniform(world):
    from pipeline.hashing import uid_to_u64, uniform, uniform_of_keys

    uids = pq.read_table(world["pool"], columns=["uid"]).column("uid").to_pylist() + ["not-a-hex-uid", "row7"]
    for seed, salt in [(0, "klite:0"), (3, "aug:5")]:
        assert np.array_equal(uniform_of_keys(uid_to_u64(uids), seed, salt), uniform(uids, seed, salt))


def test_eval_reuse_fingerprint_takes_table_eval_sets_and_the_klite_choice(tmp_path):
    """`[train] eval_sets` may hold {path, klite} tables; turning K-LITE prompts on must not reuse results
    recorded without them."""
    import dataclasses as dc

    from trainer.cli import _eval_fingerprint
    from trainer.config import TrainConfig

    (tmp_path / "model.pt").write_bytes(b"model")
    (tmp_path / "cls.parquet").write_bytes(b"set")
    out = tmp_path / "out"
    out.mkdir()
    tc = TrainConfig()
    ck, cls = str(tmp_path / "model.pt"), str(tmp_path / "cls.parquet")
    plain = _eval_fingerprint(ck, [cls], tc, "", str(out))
    assert _eval_fingerprint(ck, [{"path": cls}], tc, "", str(out)) == plain  # the same set, written as a table
    assert _eval_fingerprint(ck, [{"path": cls, "klite": True}], tc, "", str(out)) != plain
    assert _eval_fingerprint(ck, [cls], dc.replace(tc, klite_eval=True), "", str(out)) != plain
