"""dfn stage: pool-wide top fraction (collect/merge/apply over shards), reasons, a DFN trained on clean pairs
scores mismatched captions lower, score cache, threshold mode, runner + report, fingerprint."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from pipeline import config as config_mod  # noqa: E402
from pipeline import shards  # noqa: E402
from pipeline.schema import compute_uid  # noqa: E402
from stages.dfn import DfnStage, cut_for_fraction, score_bins  # noqa: E402
from tests.test_trainer import synthetic_world, tiny_cfg  # noqa: E402


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    # dfn's score cache lives under $CLIPCURATE_CACHE: keep the tests' scores out of the user's cache
    monkeypatch.setenv("CLIPCURATE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _run_stage(stage: DfnStage, tables: list[pa.Table]):
    """The runner's two passes, by hand: collect per shard, merge, apply per shard."""
    stats = stage.merge([stage.collect(t) for t in tables])
    return stats, [stage.apply(t, stats) for t in tables]


def _uids(n: int, tag: str = "u") -> list[str]:
    return compute_uid(pa.array([f"http://x.invalid/{tag}/{i}" for i in range(n)]), pa.array(["t"] * n)).to_pylist()


def _stub_pool(scores: np.ndarray, cuts: list[int]) -> list[pa.Table]:
    uids = _uids(len(scores))
    img = pa.array([b"x"] * len(scores), pa.binary())
    t = pa.table({"uid": uids, "text": ["t"] * len(scores), "image": img, "s": scores.astype(np.float32)})
    edges = [0, *cuts, len(scores)]
    return [t.slice(a, b - a) for a, b in zip(edges[:-1], edges[1:])]


@pytest.fixture
def stub_scores(monkeypatch):
    """DfnStage.score_rows reads a column `s` instead of running a model (the keep rule on its own)."""
    monkeypatch.setattr(DfnStage, "score_rows", lambda self, table, ctx=None: (
        table.column("s").to_numpy().astype(np.float32), pc.is_valid(table.column("image")).to_numpy(), 0))


# ---- the keep rule, without a model ---------------------------------------------------------------
@pytest.mark.parametrize("dist", ["normal", "tied", "constant", "skewed_shards"])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.75])
def test_top_fraction_is_pool_wide_within_one_percent(stub_scores, dist, fraction):
    rng = np.random.default_rng(7)
    n = 12_000
    if dist == "normal":
        s = rng.normal(0.2, 0.1, n)
    elif dist == "tied":  # 21 distinct values: the boundary bin holds hundreds of rows
        s = np.round(rng.normal(0.2, 0.05, n), 2)
    elif dist == "constant":  # every row in one bin: the cut is the per-row draw alone
        s = np.full(n, 0.31)
    else:  # shards with very different scores: a per-shard cut would keep `fraction` of each
        s = np.sort(rng.uniform(-0.2, 0.8, n))[::-1]
    cuts = [1000, 1500, 4000, 4001, 9000]  # uneven shards, one of a single row
    tables = _stub_pool(s, cuts)
    stage = DfnStage({"keep_fraction": fraction}, seed=3)
    stats, outs = _run_stage(stage, tables)
    assert stats["scored"] == n and stats["hist"].sum() == n
    kept = sum(k.num_rows for k, _ in outs)
    assert abs(kept / n - fraction) <= 0.01, (kept, n)
    if dist != "constant":  # continuous-ish scores: kept rows are the top ones (up to the boundary bin)
        kept_s = np.concatenate([k.column("dfn_score").to_numpy() for k, _ in outs])
        drop_s = np.concatenate([r.column("dfn_score").to_numpy() for _, r in outs])
        assert kept_s.min() >= drop_s.max() - 2.0 / (stage.config.bins - 1)
    if dist == "normal":  # no ties: exact up to a handful of rows in one 1e-4 bin
        assert abs(kept - round(fraction * n)) <= 5
    if dist == "skewed_shards":  # pool-wide: the best shard is kept whole, the worst dropped whole
        assert outs[0][0].num_rows == 1000 and outs[-1][0].num_rows == 0
    for k, r in outs:
        assert set(r.column("reason").to_pylist()) <= {"dfn_low_score"}
        assert k.column("dfn_score").type == pa.float32() and k.column("dfn_score").null_count == 0
        assert r.column("dfn_score").null_count == 0  # a dropped row keeps its score


def test_keep_rule_ignores_shard_boundaries(stub_scores):
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(0.3, 0.05, 5000), 3)  # ties, so the boundary-bin draw matters

    def kept(cuts):
        _, outs = _run_stage(DfnStage({"keep_fraction": 0.3}), _stub_pool(s, cuts))
        return sorted(u for k, _ in outs for u in k.column("uid").to_pylist())

    assert kept([]) == kept([10, 2000, 2001, 4999]) == kept([2500])


def test_partials_are_sparse_and_merge_to_the_pool_histogram(stub_scores):
    from pipeline import codec

    rng = np.random.default_rng(5)
    s = np.round(rng.normal(0.2, 0.1, 3000), 3)
    tables = _stub_pool(s, [1000, 1001, 2500])
    stage = DfnStage({"keep_fraction": 0.3})
    partials = [stage.collect(t) for t in tables]
    reference = np.bincount(score_bins(s.astype(np.float32), stage.config.bins), minlength=stage.config.bins)
    assert np.array_equal(stage.merge(partials)["hist"], reference)
    # a kept partial of an older run (dense) merges with the new ones; a merged histogram merges again
    dense = {**{k: v for k, v in partials[0].items() if k not in ("bins", "counts")},
             "hist": np.bincount(partials[0]["bins"], partials[0]["counts"], stage.config.bins).astype(np.int64)}
    assert np.array_equal(stage.merge([dense, *partials[1:]])["hist"], reference)
    assert np.array_equal(stage.merge([stage.merge(partials[:2]), stage.merge(partials[2:])])["hist"], reference)
    # a one-shard pool's statistics are a merge's output too (the executors merge at least once)
    from pipeline.executors import InProcessExecutor

    one = InProcessExecutor().tree_reduce(stage.merge, partials[:1])
    assert np.array_equal(one["hist"], np.bincount(partials[0]["bins"], partials[0]["counts"], stage.config.bins))
    # its size follows the shard's distinct scores, not the histogram's 20,001 bins (a one-row shard: ~100 B)
    assert len(codec.encode(partials[1])) < 1000 < 8 * stage.config.bins


def test_cut_for_fraction_by_hand():
    hist = np.array([0, 5, 0, 3, 2])  # 10 rows; from the top: 2 (bin 4), 3 (bin 3), 5 (bin 1)
    assert cut_for_fraction(hist, 0.2) == (4, 1.0, 2)
    assert cut_for_fraction(hist, 0.3) == (3, pytest.approx(1 / 3), 3)
    assert cut_for_fraction(hist, 0.5) == (3, 1.0, 5)
    assert cut_for_fraction(hist, 0.6) == (1, pytest.approx(1 / 5), 6)
    assert cut_for_fraction(hist, 1.0) == (1, 1.0, 10)
    assert cut_for_fraction(hist, 0.0)[2] == 0
    assert list(score_bins(np.array([-1.0, -0.9999, 0.0, 0.99996, 1.0, 2.0]), 20001)) == [0, 1, 10000, 20000, 20000, 20000]


def test_threshold_mode_and_unscorable_rows(stub_scores):
    s = np.array([0.1, 0.5, np.nan, 0.25, np.nan, 0.2], dtype=np.float32)
    t = _stub_pool(s, [])[0]
    img = t.column("image").to_pylist()
    img[4] = None
    t = t.set_column(t.column_names.index("image"), "image", pa.array(img, pa.binary()))
    stats, [(kept, rej)] = _run_stage(DfnStage({"threshold": 0.2}), [t])
    assert stats["scored"] == 4 and stats["unscored"] == 2
    assert kept.column("dfn_score").to_pylist() == pytest.approx([0.5, 0.25, 0.2])
    reasons = dict(zip(rej.column("uid").to_pylist(), rej.column("reason").to_pylist()))
    u = t.column("uid").to_pylist()
    assert reasons == {u[0]: "dfn_low_score", u[2]: "bad_image", u[4]: "no_image"}
    assert rej.column("dfn_score").to_pylist()[0] == pytest.approx(0.1)
    assert rej.column("dfn_score").to_pylist()[1:] == [None, None]  # no score: null, not NaN


# ---- with a real filtering network -------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world(tmp_path_factory.mktemp("dfn_world"), n=400, seed=1)


@pytest.fixture(scope="module")
def dfn_model(world, tmp_path_factory):
    """The DFN recipe in small: our trainer, 30 CPU steps on the clean (HQ) pairs only."""
    from trainer.train import train

    out = tmp_path_factory.mktemp("dfn_model")
    s = train(tiny_cfg(steps=30, save_every=1000, klite_prob=0.0), world["hq"], str(out), progress=False)
    return s["model_path"]


def _pool_shards(world, folder: Path, n_shards: int = 4) -> pa.Table:
    """The synthetic pool (half the captions mismatched) in `n_shards` shards, plus a null and a broken image."""
    pool = pq.read_table(world["pool"])
    img = pool.column("image").to_pylist()
    img[5], img[11] = None, b"\xff\xd8 truncated"
    pool = pool.set_column(pool.column_names.index("image"), "image", pa.array(img, pa.binary()))
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-pool.num_rows // n_shards)
    for i in range(n_shards):
        shards.write_shard(pool.slice(i * per, per), str(folder / f"part-{i:05d}.parquet"))
    return pool


def test_dfn_trained_on_clean_pairs_scores_mismatched_captions_lower(world, dfn_model, tmp_path):
    pool = _pool_shards(world, tmp_path / "in")
    tables = [pq.read_table(p) for p in shards.list_shards(str(tmp_path / "in"))]
    stage = DfnStage({"checkpoint": dfn_model, "keep_fraction": 0.3, "batch_size": 64})
    stats, outs = _run_stage(stage, tables)
    both = pa.concat_tables([k for k, _ in outs] + [r.drop_columns(["reason"]) for _, r in outs])
    kind = dict(zip(pool.column("uid").to_pylist(), pool.column("kind").to_pylist()))
    k = np.array([kind[u] for u in both.column("uid").to_pylist()])
    s = both.column("dfn_score").to_numpy(zero_copy_only=False).astype(np.float64)
    clean, mis = s[(k == "clean") & np.isfinite(s)], s[(k == "mismatched") & np.isfinite(s)]
    assert len(clean) > 100 and len(mis) > 100
    assert clean.mean() > mis.mean() + 0.2, (clean.mean(), mis.mean())
    auc = (clean[:, None] > mis[None, :]).mean()
    assert auc > 0.8, auc
    # the top 30% pool-wide, mostly clean; rows without a usable image are named, not scored
    scored = stats["scored"]
    kept = sum(t.num_rows for t, _ in outs)
    assert scored == pool.num_rows - 2 and abs(kept / scored - 0.3) <= 0.01
    kept_kinds = [kind[u] for t, _ in outs for u in t.column("uid").to_pylist()]
    assert kept_kinds.count("clean") / len(kept_kinds) > 0.9
    reasons = [x for _, r in outs for x in r.column("reason").to_pylist()]
    assert reasons.count("dfn_low_score") == scored - kept
    assert reasons.count("no_image") == 1 and reasons.count("bad_image") == 1
    # a fresh stage (a new process) scores the same rows to the same bits: vectors are rounded as stored
    fresh = DfnStage({"checkpoint": dfn_model, "batch_size": 32})
    np.testing.assert_array_equal(fresh.scores(tables[0]), stage.scores(tables[0]))


def test_dfn_through_the_runner_with_report_and_fingerprint(world, dfn_model, tmp_path):
    import shutil

    from pipeline.runner import run_pipeline

    _pool_shards(world, tmp_path / "in", n_shards=3)
    ck = tmp_path / "model.pt"
    shutil.copy(dfn_model, ck)
    cfg = config_mod.resolve({"dfn": {"checkpoint": str(ck), "keep_fraction": 0.5, "batch_size": 64}})
    run = tmp_path / "r"
    [res] = run_pipeline(["dfn"], str(run), cfg, input_dir=str(tmp_path / "in"), workers=0)
    m = res.manifest
    assert m["rows_in"] == 400 and abs(m["rows_out"] / 398 - 0.5) <= 0.01
    assert m["reasons"]["dfn_low_score"] == 398 - m["rows_out"] and m["reasons"]["no_image"] == 1
    cut = shards.read_json(str(run / "04_dfn" / "stats" / "cut.json"))
    assert cut["mode"] == "fraction" and cut["scored"] == 398
    rep = DfnStage(cfg["dfn"]).report(str(run / "04_dfn"), str(tmp_path / "report"))
    assert rep["figures"] and os.path.getsize(rep["figures"][0][1]) > 1000
    assert rep["tables"][0].rows[0][:2] == [398, m["rows_out"]]
    assert f"| 398 | {m['rows_out']} |" in rep["tables"][0].markdown()
    # the model file is part of the fingerprint: another network redoes the stage
    fp1 = m["fingerprint"]
    torch.manual_seed(5)
    from trainer import models

    other, _, _, _ = models.create("clipcurate-tiny")
    torch.save({"model_name": "clipcurate-tiny", "state_dict": other.state_dict(), "step": 0}, ck)
    [res2] = run_pipeline(["dfn"], str(run), cfg, input_dir=str(tmp_path / "in"), workers=0)
    assert res2.manifest["fingerprint"] != fp1


def test_dfn_default_model_is_the_runs_dfn_model_through_the_runner(world, dfn_model, tmp_path):
    """`checkpoint = ""` means runs/NAME/dfn_model/model.pt: collect (pass 1) and the fingerprint must see the
    run folder as apply does, and a retrained network there redoes the stage on resume."""
    import shutil

    from pipeline.runner import run_pipeline
    from trainer.config import DFN_MODEL_DIR

    _pool_shards(world, tmp_path / "in", n_shards=2)
    run = tmp_path / "r"
    (run / DFN_MODEL_DIR).mkdir(parents=True)
    shutil.copy(dfn_model, run / DFN_MODEL_DIR / "model.pt")
    cfg = config_mod.resolve({"dfn": {"keep_fraction": 0.5, "batch_size": 64}})
    [res] = run_pipeline(["dfn"], str(run), cfg, input_dir=str(tmp_path / "in"), workers=0)
    assert res.manifest["rows_out"] > 0
    from trainer import models

    torch.manual_seed(6)
    other, _, _, _ = models.create("clipcurate-tiny")
    torch.save({"model_name": "clipcurate-tiny", "state_dict": other.state_dict(), "step": 0},
               run / DFN_MODEL_DIR / "model.pt")
    [res2] = run_pipeline(["dfn"], str(run), cfg, input_dir=str(tmp_path / "in"), workers=0)
    assert res2.manifest["fingerprint"] != res.manifest["fingerprint"]


def test_dfn_without_a_model_is_one_clear_error(tmp_path):
    from pipeline.errors import StageError

    t = pa.table({"uid": _uids(2), "text": ["a", "b"], "image": pa.array([b"x", b"y"], pa.binary())})
    with pytest.raises(StageError, match="dfn-train"):
        DfnStage().collect(t)
    with pytest.raises(StageError, match="does not exist"):
        DfnStage({"checkpoint": str(tmp_path / "none.pt")}).collect(t)


# ---- on the demo world --------------------------------------------------------------------------------
def _demo_pairs(world: Path) -> pa.Table:
    """truth.parquet rows (clean and mismatched) with the bytes their URL serves: www/<url path>. (The pool
    itself is reachable only through ingest's loopback download; this reads the same files directly.)"""
    from urllib.parse import urlparse

    truth = pq.read_table(world / "truth.parquet", columns=["uid", "url", "caption", "kind"])
    rows = []
    for r in truth.to_pylist():
        path = world / "www" / urlparse(r["url"]).path.lstrip("/")
        if r["kind"] in ("clean", "mismatched") and path.is_file():
            rows.append({"uid": r["uid"], "text": r["caption"], "image": path.read_bytes(), "kind": r["kind"]})
    return pa.Table.from_pylist(rows, schema=pa.schema([("uid", pa.string()), ("text", pa.string()),
                                                        ("image", pa.binary()), ("kind", pa.string())]))


def test_dfn_trained_on_the_demo_hq_set_scores_its_mismatched_captions_lower(tmp_path):
    """The acceptance case on demo.world: a DFN trained on the world's HQ set only (our trainer, 60 CPU
    steps), then the stage (collect/merge/apply over 3 shards) on the world's clean and mismatched pairs."""
    demo_world = pytest.importorskip("demo.world")
    from trainer.train import train

    world = tmp_path / "world"
    demo_world.make_world(world, n=600, seed=0)
    s = train(tiny_cfg(steps=60, batch_size=64, save_every=1000, klite_prob=0.0, warmup=6, workers=1),
              str(world / "hq.parquet"), str(tmp_path / "dfn"), progress=False)
    pairs = _demo_pairs(world)
    kind = dict(zip(pairs.column("uid").to_pylist(), pairs.column("kind").to_pylist()))
    n = pairs.num_rows
    tables = [pairs.slice(a, b - a).drop_columns(["kind"]) for a, b in [(0, n // 3), (n // 3, n // 2), (n // 2, n)]]
    stats, outs = _run_stage(DfnStage({"checkpoint": s["model_path"], "keep_fraction": 0.3}), tables)
    scored = pa.concat_tables([k for k, _ in outs] + [r.drop_columns(["reason"]) for _, r in outs])
    k = np.array([kind[u] for u in scored.column("uid").to_pylist()])
    v = scored.column("dfn_score").to_numpy(zero_copy_only=False).astype(np.float64)
    clean, mis = v[k == "clean"], v[k == "mismatched"]
    assert len(clean) > 200 and len(mis) > 30 and np.isfinite(v).all()
    assert clean.mean() > mis.mean() + 0.2, (clean.mean(), mis.mean())  # measured: 0.64 vs -0.06
    assert (clean[:, None] > mis[None, :]).mean() > 0.85  # AUC; measured 0.94
    kept = [kind[u] for t, _ in outs for u in t.column("uid").to_pylist()]
    assert abs(len(kept) / n - 0.3) <= 0.01
    assert kept.count("mismatched") / len(kept) < 0.5 * len(mis) / n  # mismatched pairs are filtered out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_scoring_uses_cuda_autocast_and_matches_cpu(world, dfn_model):
    from trainer.score import Scorer

    t = pq.read_table(world["pool"]).slice(0, 300)
    images, texts = t.column("image").to_pylist(), t.column("text").to_pylist()
    gpu = Scorer(dfn_model, device="auto", batch_size=64, num_workers=2)  # pinned memory, worker decoding
    assert gpu.device.type == "cuda" and gpu.precision in ("amp_bf16", "amp_fp16")
    cpu = Scorer(dfn_model, device="cpu", precision="fp32", batch_size=64)
    np.testing.assert_allclose(gpu.score(images, texts), cpu.score(images, texts), atol=0.03)
    stage = DfnStage({"checkpoint": dfn_model, "keep_fraction": 0.3})  # num_workers -1: 4 on a GPU
    stats, [(kept, _)] = _run_stage(stage, [t.select(["uid", "text", "image"])])
    assert stage.scorer.device.type == "cuda" and stage.scorer.num_workers == 4
    assert abs(kept.num_rows / 300 - 0.3) <= 0.01


def test_score_only_keeps_every_scored_row_and_adds_the_score(stub_scores):
    """dfn as a scorer (balance-last): no quality cut, rows without a usable image still go."""
    scores = np.linspace(-1, 1, 50)
    scores[7] = np.nan  # an image that does not decode
    scores[3] = np.nan  # no image at all (the scorer gives NaN, and has_image says why)
    (t,) = _stub_pool(scores, [])
    t = t.set_column(t.column_names.index("image"), "image",
                     pa.array([None if i == 3 else b"x" for i in range(50)], pa.binary()))
    stage = DfnStage({"checkpoint": "unused", "score_only": True, "keep_fraction": 0.1})
    _, [(kept, rej)] = _run_stage(stage, [t])
    assert kept.num_rows == 48 and sorted(rej.column("reason").to_pylist()) == ["bad_image", "no_image"]
    np.testing.assert_allclose(kept.column("dfn_score").to_numpy(), np.delete(scores, [3, 7]).astype(np.float32))


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_heap_for_tensors_lifts_the_dask_nanny_trim_while_scoring_and_restores_it(monkeypatch):
    """A Dask nanny's MALLOC_TRIM_THRESHOLD_ makes every activation an mmap (1.5x slower scoring on CPU):
    inside the context the heap may keep tensors; after it, the nanny's setting is back and the heap trimmed."""
    from trainer.score import (GLIBC_MMAP_THRESHOLD, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, TENSOR_MMAP_THRESHOLD,
                               TENSOR_TRIM_THRESHOLD, heap_for_tensors)

    assert (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD) == (-1, -3, 128 * 1024)  # malloc.h, glibc
    libc = _FakeLibc()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with heap_for_tensors(libc):
        assert libc.calls == [("mallopt", M_MMAP_THRESHOLD, TENSOR_MMAP_THRESHOLD),
                              ("mallopt", M_TRIM_THRESHOLD, TENSOR_TRIM_THRESHOLD)]
    assert libc.calls[2:] == [("mallopt", M_TRIM_THRESHOLD, 65536), ("mallopt", M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD),
                              ("malloc_trim", 0)]
    # restored on an error too
    libc.calls.clear()
    with pytest.raises(RuntimeError):
        with heap_for_tensors(libc):
            raise RuntimeError("boom")
    assert libc.calls[-1] == ("malloc_trim", 0)
    # without the nanny's variable glibc adapts its thresholds itself: nothing is touched
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    libc.calls.clear()
    with heap_for_tensors(libc):
        pass
    assert libc.calls == []


def test_balance_last_recipe_balances_among_the_pairs_above_the_score_cut(world, dfn_model, tmp_path):
    """The balance-last recipe (MetaCLIP's advice: balance after the quality losses): dfn only scores, then
    metaclip balances among the pairs at or above a score cut, in one run, in recipe order."""
    import re
    import shutil
    from collections import Counter

    from pipeline.runner import run_pipeline

    _pool_shards(world, tmp_path / "in", n_shards=3)
    texts = pq.read_table(world["pool"], columns=["text"]).column("text").to_pylist()
    words = Counter(w for t in texts for w in set(re.findall(r"[a-z]{4,}", (t or "").lower())))
    entries = [w for w, _ in words.most_common(4)]
    (tmp_path / "entries.txt").write_text("\n".join(entries) + "\n")
    ck = tmp_path / "model.pt"
    shutil.copy(dfn_model, ck)
    raw = {"run": {"stages": ["dfn", "metaclip"]},
           "dfn": {"checkpoint": str(ck), "score_only": True, "batch_size": 64},
           "metaclip": {"entries": str(tmp_path / "entries.txt"), "t": 20, "score_col": "dfn_score", "min_score": -1.0}}
    run = tmp_path / "r"
    [scored] = run_pipeline(["dfn"], str(run), config_mod.resolve(raw), input_dir=str(tmp_path / "in"), workers=0)
    assert scored.folder.endswith("00_dfn") and scored.manifest["rows_out"] == 398  # score only: no cut
    scored_rows = pa.concat_tables([pq.read_table(p, columns=["text", "dfn_score"])
                                    for p in sorted((run / "00_dfn").glob("part-*.parquet"))])
    s = scored_rows.column("dfn_score").to_numpy()
    cut = float(np.median(s))
    raw["metaclip"]["min_score"] = cut
    dfn_res, meta_res = run_pipeline(["dfn", "metaclip"], str(run), config_mod.resolve(raw), workers=0)
    assert dfn_res.manifest["fingerprint"] == scored.manifest["fingerprint"]  # up to date: not rescored
    assert meta_res.folder.endswith("01_metaclip")
    kept = pa.concat_tables([pq.read_table(p) for p in sorted((run / "01_metaclip").glob("part-*.parquet"))])
    assert kept.num_rows > 0 and pc.all(pc.greater_equal(kept.column("dfn_score"), cut)).as_py()
    rej = pa.concat_tables([pq.read_table(p) for p in sorted((run / "01_metaclip" / "rejected").glob("*.parquet"))])
    low = pc.equal(rej.column("reason"), "low_score").to_numpy(zero_copy_only=False)
    assert (rej.column("dfn_score").to_numpy(zero_copy_only=False)[low] < cut).all()
    # the entry counts are those of the rows above the cut; no entry keeps much more than t (each of its rows is
    # kept with probability t / count; a row that also matches a rarer entry may be kept through that one)
    above = [t.lower() for t, v in zip(scored_rows.column("text").to_pylist(), s) if v >= cut]
    kept_texts = [t.lower() for t in kept.column("text").to_pylist()]
    heads = [e for e in entries if sum(e in t for t in above) > 20]
    assert heads, "the test needs an entry with more than t rows above the cut"
    for e in entries:
        n_above = sum(e in t for t in above)
        n_kept = sum(e in t for t in kept_texts)
        via_others = sum(e in t and any(o in t for o in entries if o != e) for t in kept_texts)
        assert n_kept <= n_above
        if n_above > 20:  # a head entry: about t of its rows, plus those kept through another entry
            assert n_kept <= 20 + 4.5 * np.sqrt(20) + via_others, (e, n_above, n_kept, via_others)


def test_apply_key_is_the_cut():
    """Resume per shard: dfn's apply reads only the cut, so a histogram change that moves no score across it
    leaves every other shard as it is."""
    from stages.dfn import DfnStage

    stage = DfnStage({"keep_fraction": 0.5, "bins": 10})
    hist = np.array([0, 0, 4, 0, 0, 0, 3, 1, 0, 0], dtype=np.int64)  # 8 scored: keep 4, the top 4 (bins 6 and 7)
    moved = np.array([0, 0, 3, 1, 0, 0, 3, 1, 0, 0], dtype=np.int64)  # one score moved below the cut
    crossed = np.array([0, 0, 3, 0, 0, 0, 4, 1, 0, 0], dtype=np.int64)  # one score moved across it
    key = stage.apply_key({"hist": hist})
    assert key == stage.apply_key({"hist": moved}) and key != stage.apply_key({"hist": crossed})
    import json

    json.dumps(key)  # plain data
