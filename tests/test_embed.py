"""The embed step and dfn on stored embeddings (issue 30 items 3 and 4): vectors computed once per row, found by
uid, verified on resume; dfn from stored vectors keeps exactly the rows of direct scoring, and a new cut costs no
model pass."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from pipeline import config as config_mod  # noqa: E402
from pipeline import embeddings, shards  # noqa: E402
from pipeline.runner import run_pipeline  # noqa: E402
from tests.test_trainer import synthetic_world  # noqa: E402
from trainer import score as score_mod  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world(tmp_path_factory.mktemp("embed_world"), n=120, seed=3)



@pytest.fixture
def pool(world, tmp_path):
    """The pool in 3 shards, with one row without an image and one whose bytes do not decode."""
    t = pq.read_table(world["pool"])
    img = t.column("image").to_pylist()
    img[4], img[9] = None, b"\xff\xd8 not a jpeg"
    t = t.set_column(t.column_names.index("image"), "image", pa.array(img, pa.binary()))
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        shards.write_shard(t.slice(i * 40, 40), str(folder / f"part-{i:05d}.parquet"))
    return folder


@pytest.fixture
def passes(monkeypatch):
    """How many rows the model embedded, by kind (rows with image bytes; the runner runs in-process with
    workers=0)."""
    counts = {"text": 0, "image": 0}
    real_t, real_i = score_mod.Scorer.encode_texts, score_mod.Scorer.encode_images

    def texts(self, t):
        counts["text"] += len(t)
        return real_t(self, t)

    def images(self, read, n):
        out = real_i(self, read, n)
        counts["image"] += int(out[2].sum())
        return out

    monkeypatch.setattr(score_mod.Scorer, "encode_texts", texts)
    monkeypatch.setattr(score_mod.Scorer, "encode_images", images)
    return counts


def _cfg(network, stages, **dfn):
    return config_mod.resolve({"run": {"stages": stages}, "dfn": {"checkpoint": network, "batch_size": 32, **dfn}})


def _rows(run, folder):
    out = {}
    for sub in ("", "rejected"):
        d = run / folder / sub if sub else run / folder
        for p in shards.list_shards(str(d)):
            t = shards.read_shard(p)
            for u, s, r in zip(t.column("uid").to_pylist(), t.column("dfn_score").to_pylist(),
                               t.column("reason").to_pylist() if "reason" in t.column_names else [None] * t.num_rows):
                out[u] = (s, r)
    return out


def test_item3_embed_stores_every_row_once_and_keeps_every_row(pool, network, tmp_path, passes):
    run = tmp_path / "r"
    [res] = run_pipeline(["embed"], str(run), _cfg(network, ["embed", "dfn"]), input_dir=str(pool), workers=0)
    assert res.manifest["rows_in"] == 120 and res.manifest["rows_out"] == 120  # embed decides nothing
    assert passes == {"text": 120, "image": 119}
    [model_dir] = (run / "embeddings").iterdir()
    store = embeddings.EmbeddingStore.open(str(run), model_dir.name)
    man = store.manifest()
    assert man["identity"]["name"] == "clipcurate-tiny" and man["dims"] > 0
    uids = pa.concat_tables([shards.read_shard(p) for p in shards.list_shards(str(pool))]).column("uid")
    txt, tfound = store.read_any(uids, "text")
    img, ifound = store.read_any(uids, "image")
    assert tfound.all() and txt.dtype == np.float16
    assert ifound.sum() == 118 and not ifound[4] and not ifound[9]  # no bytes; bytes that do not decode
    norms = np.linalg.norm(img[ifound].astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)
    # the vectors are the model's: the same rows embedded directly, rounded as stored, are bit-identical
    scorer = score_mod.Scorer(network, batch_size=16)
    t0 = shards.read_shard(shards.list_shards(str(pool))[0])
    direct = embeddings.as_stored(scorer.encode_texts(t0.column("text").to_pylist()))
    got, _ = store.read("part-00000", "text", t0.column("uid"))
    np.testing.assert_array_equal(got, direct)
    # the done-marker vouches for the store files: one removed is redone on resume, and only that shard
    (model_dir / "part-00001.image.arrow").unlink()
    passes.update(text=0, image=0)
    [res2] = run_pipeline(["embed"], str(run), _cfg(network, ["embed", "dfn"]), input_dir=str(pool), workers=0)
    assert (model_dir / "part-00001.image.arrow").exists()
    assert passes == {"text": 0, "image": 40}  # its text vectors were still stored: not embedded again


def test_item4_dfn_from_stored_vectors_keeps_exactly_the_rows_of_direct_scoring(pool, network, tmp_path, passes):
    direct = tmp_path / "direct"
    run_pipeline(["dfn"], str(direct), _cfg(network, ["dfn"]), input_dir=str(pool), workers=0)
    assert passes == {"text": 120, "image": 119}  # dfn embedded (once: apply read collect's vectors back)
    passes.update(text=0, image=0)
    stored = tmp_path / "stored"
    res = run_pipeline(["embed", "dfn"], str(stored), _cfg(network, ["embed", "dfn"]), input_dir=str(pool), workers=0)
    assert passes == {"text": 120, "image": 119}  # embed only: dfn ran no model pass
    assert any("scored from stored vectors" in n for n in res[1].manifest["notes"]), res[1].manifest["notes"]
    a, b = _rows(direct, "00_dfn"), _rows(stored, "01_dfn")
    assert a == b  # same rows kept, same reasons, same scores to the bit
    reasons = [r for _, r in a.values()]
    assert reasons.count("no_image") == 1 and reasons.count("bad_image") == 1
    # a new cut costs no model pass, nor even loading the network, and keeps the top share of the same scores
    passes.update(text=0, image=0)
    loads = []
    real_init = score_mod.Scorer.__init__

    def counting_init(self, *a, **kw):
        loads.append(a)
        real_init(self, *a, **kw)

    score_mod.Scorer.__init__ = counting_init
    try:
        [res3] = run_pipeline(["dfn"], str(direct), _cfg(network, ["dfn"], keep_fraction=0.6), input_dir=str(pool),
                              workers=0)
    finally:
        score_mod.Scorer.__init__ = real_init
    assert passes == {"text": 0, "image": 0} and loads == []
    assert shards.read_json(str(direct / "00_dfn" / "stats" / "cut.json"))["embedded"] == 0
    c = _rows(direct, "00_dfn")
    assert {u: s for u, (s, _) in c.items()} == {u: s for u, (s, _) in a.items()}
    kept = sum(r is None for _, r in c.values())
    assert kept == round(0.6 * 118) or abs(kept - 0.6 * 118) <= 2


def test_item4_a_changed_caption_behind_a_uid_is_embedded_again(pool, network, tmp_path, passes):
    run = tmp_path / "r"
    run_pipeline(["embed"], str(run), _cfg(network, ["embed"]), input_dir=str(pool), workers=0)
    t = shards.read_shard(shards.list_shards(str(pool))[0])
    texts = t.column("text").to_pylist()
    texts[0] = "a different caption entirely"
    t = t.set_column(t.column_names.index("text"), "text", pa.array(texts))
    from stages.dfn import DfnStage
    from pipeline.context import ShardContext
    from pipeline import images

    stage = DfnStage({"checkpoint": network, "batch_size": 32}).ensure_ready()
    ctx = ShardContext(stage="dfn", run_dir=str(run), stage_dir=str(run / "01_dfn"), shard="part-00000",
                       images=images.run_reader(str(run)), needs_pixels=True)
    passes.update(text=0, image=0)
    table = shards.read_shard(str(run / "00_embed" / "part-00000.parquet"))
    table = table.set_column(table.column_names.index("text"), "text", pa.array(texts))
    s = stage.scores(table, ctx)
    assert passes == {"text": 1, "image": 0}  # only the changed caption
    detached = DfnStage({"checkpoint": network, "batch_size": 32}).scores(t)
    np.testing.assert_array_equal(s, detached)


def test_item3_text_before_the_download_then_images(pool, network, tmp_path, passes):
    """A URL list has no images: `embed@text` stores text vectors; `embed` after the download adds the images
    without embedding a text again."""
    urls = tmp_path / "urls"
    urls.mkdir()
    for p in shards.list_shards(str(pool)):
        shards.write_shard(shards.read_shard(p).drop_columns(["image"]), str(urls / shards.shard_name(p)))
    run = tmp_path / "r"
    cfg = _cfg(network, ["embed@text", "embed", "dfn"])
    [r1] = run_pipeline(["embed@text"], str(run), cfg, input_dir=str(urls), workers=0)
    assert passes == {"text": 120, "image": 0}
    assert any("text vectors only" in n for n in r1.manifest["notes"]), r1.manifest["notes"]
    passes.update(text=0, image=0)
    run_pipeline(["embed", "dfn"], str(run), cfg, input_dir=str(pool), workers=0)
    assert passes == {"text": 0, "image": 119}


def test_item3_decode_workers_give_the_same_vectors(pool, network, tmp_path):
    """The GPU path's DataLoader workers (each reads and decodes its own chunks through the run's image reader)
    give the vectors of the in-process path, row for row."""
    runs = {}
    for workers in (0, 2):
        run = tmp_path / f"w{workers}"
        cfg = config_mod.resolve({"run": {"stages": ["embed"]}, "embed": {
            "checkpoint": network, "batch_size": 16, "num_workers": workers}})
        run_pipeline(["embed"], str(run), cfg, input_dir=str(pool), workers=0)
        [model_dir] = (run / "embeddings").iterdir()
        runs[workers] = embeddings.EmbeddingStore.open(str(run), model_dir.name)
    uids = pa.concat_tables([shards.read_shard(p) for p in shards.list_shards(str(pool))]).column("uid")
    a, fa = runs[0].read_any(uids, "image")
    b, fb = runs[2].read_any(uids, "image")
    np.testing.assert_array_equal(fa, fb)
    np.testing.assert_array_equal(a, b)


def test_item4_new_weights_behind_the_same_checkpoint_path_are_loaded(pool, network, tmp_path):
    """A process keeps its loaded network only while the weights file is unchanged: a retrained checkpoint at the
    same path is loaded and embedded anew (into another store folder), never scored with the old weights."""
    import shutil

    from trainer import models

    ck = tmp_path / "model.pt"
    shutil.copy(network, ck)
    run = tmp_path / "r"
    run_pipeline(["dfn"], str(run), _cfg(str(ck), ["dfn"]), input_dir=str(pool), workers=0)
    before = _rows(run, "00_dfn")
    torch.manual_seed(11)
    other, _, _, _ = models.create("clipcurate-tiny")
    torch.save({"model_name": "clipcurate-tiny", "state_dict": other.state_dict(), "step": 0}, ck)
    run_pipeline(["dfn"], str(run), _cfg(str(ck), ["dfn"]), input_dir=str(pool), workers=0)
    assert len(list((run / "embeddings").iterdir())) == 2
    after = _rows(run, "00_dfn")
    assert [s for s, _ in before.values()] != [after[u][0] for u in before]


def test_item4_the_dfn_train_network_is_just_another_model_for_embed(pool, network, tmp_path, passes):
    """No network named anywhere: embed and dfn both use the run's dfn-train network (runs/NAME/dfn_model/model.pt),
    and dfn scores from what embed stored."""
    import shutil

    from trainer.config import DFN_MODEL_DIR

    run = tmp_path / "r"
    (run / DFN_MODEL_DIR).mkdir(parents=True)
    shutil.copy(network, run / DFN_MODEL_DIR / "model.pt")
    cfg = config_mod.resolve({"run": {"stages": ["embed", "dfn"]}, "dfn": {"batch_size": 32}})
    run_pipeline(["embed"], str(run), cfg, input_dir=str(pool), workers=0)
    assert passes == {"text": 120, "image": 119}
    passes.update(text=0, image=0)
    run_pipeline(["dfn"], str(run), cfg, input_dir=str(pool), workers=0)
    assert passes == {"text": 0, "image": 0}
    [model_dir] = (run / "embeddings").iterdir()
    assert model_dir.name.startswith("clipcurate-tiny.file.")
