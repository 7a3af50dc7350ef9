"""Ablation bookkeeping: which rows each variant trains on, seeds averaged, table figures = the eval figures."""

import json
import os
import statistics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer import ablate as ablate_mod


def _stage(run_dir, name, n):
    d = run_dir / name
    d.mkdir(parents=True)
    pq.write_table(pa.table({"uid": [f"{i:032x}" for i in range(n)]}), d / "part-00000.parquet")
    (d / "_manifest.json").write_text("{}")
    return str(d)


def test_ablate_trains_each_stage_output_per_seed_and_averages(tmp_path, monkeypatch):
    import trainer.evaluate
    import trainer.train

    run = tmp_path / "run"
    sizes = {"00_ingest": 10, "01_align": 8, "02_metaclip": 6}  # klite, dfn not run: skipped, not an error
    folders = {name: _stage(run, name, n) for name, n in sizes.items()}
    calls = []

    def fake_train(tc, data, out, resume):
        calls.append((os.path.basename(data), out, tc.seed, tc.steps))
        os.makedirs(out, exist_ok=True)
        return {"model_path": json.dumps([os.path.basename(data), tc.seed]), "last_loss": 1.0}

    def fake_eval(model_path, sets, **kw):
        stage, seed = json.loads(model_path)
        acc = sizes[stage] / 10 + seed / 100  # a figure that depends on both, to check the averaging
        return {"results": {"shapes": {"kind": "classification", "top1": acc, "top5": 1.0},
                            "ret": {"kind": "retrieval", "image_to_text_R@1": acc, "text_to_image_R@1": 0.0,
                                    "image_to_text_R@5": 1.0, "text_to_image_R@5": 1.0}}}

    monkeypatch.setattr(trainer.train, "train", fake_train)
    monkeypatch.setattr(trainer.evaluate, "evaluate", fake_eval)
    cfg = {"train": {"eval_sets": ["x.parquet"], "seed": 0, "steps": 99}}
    res = ablate_mod.ablate(str(run), cfg, steps=7, seeds=[0, 3])

    assert [r["variant"] for r in res["variants"]] == ["raw pool", "align", "+ metaclip"]
    assert [r["pairs"] for r in res["variants"]] == [10, 8, 6]
    # every variant trained once per seed, with the same step count; seed 0 keeps the plain folder name
    assert sorted((c[0], c[2], c[3]) for c in calls) == sorted((s, seed, 7) for s in sizes for seed in (0, 3))
    outs = {os.path.relpath(c[1], run) for c in calls}
    assert "ablation/raw-pool" in outs and "ablation/plus-metaclip-seed3" in outs
    align = res["variants"][1]
    assert abs(align["shapes top1"] - 0.815) < 1e-12  # (0.8 + 0.83) / 2
    assert abs(align["std"]["shapes top1"] - statistics.stdev([0.8, 0.83])) < 1e-12
    assert abs(align["ret R@1"] - statistics.fmean([0.4, 0.415])) < 1e-12
    assert "| align | 8 | 7 | 0.815 ± 0.021 |" in res["table_md"]
    saved = json.loads((run / "ablation.json").read_text())
    assert saved["seeds"] == [0, 3] and saved["table_md"] == res["table_md"]


def test_ablate_follows_the_runs_recipe(tmp_path, monkeypatch):
    """Variants are the recipe's curation steps in recipe order (a repeated stage by its label; emit, which
    writes the last step's rows again, is none); the last one is the full pipeline, with K-LITE prompts."""
    import trainer.evaluate
    import trainer.train

    from pipeline import config as config_mod

    run = tmp_path / "run"
    sizes = {"00_ingest": 10, "01_align-text": 9, "02_dfn": 8, "03_metaclip": 6, "04_align": 5, "05_emit": 5}
    for name, n in sizes.items():
        _stage(run, name, n)
    trained = []

    def fake_train(tc, data, out, resume):
        trained.append(os.path.basename(data))
        return {"model_path": os.path.basename(data), "last_loss": 1.0}

    def fake_eval(model_path, sets, klite=False, **kw):
        r = {"kind": "classification", "top1": sizes.get(model_path, 5) / 10, "top5": 1.0}
        if klite:
            r["klite"] = {"top1": 0.5, "top5": 1.0, "classes_with_gloss": 1}
        return {"results": {"shapes": r}}

    monkeypatch.setattr(trainer.train, "train", fake_train)
    monkeypatch.setattr(trainer.evaluate, "evaluate", fake_eval)
    cfg = config_mod.resolve({"run": {"stages": ["ingest", "align@text", "dfn", "metaclip", "align", "emit"]},
                              "train": {"eval_sets": ["x.parquet"]}})
    res = ablate_mod.ablate(str(run), cfg, steps=3, seeds=[0, 1])
    assert [(r["variant"], r["pairs"]) for r in res["variants"]] == [
        ("raw pool", 10), ("align@text", 9), ("+ dfn", 8), ("+ metaclip", 6), ("+ align", 5),
        ("+ align, K-LITE prompts", 5), ("random subset", 5)]  # no truth here: no oracle
    assert sorted(set(trained)) == ["00_ingest", "01_align-text", "02_dfn", "03_metaclip", "04_align",
                                    "random-n5-seed0", "random-n5-seed1"]


def test_controls_a_random_subset_the_full_pipelines_size_and_the_truth_clean_oracle(tmp_path, monkeypatch):
    """DataComp's size control: per seed a uniform sample of the raw pool (2 shards) as large as the full
    pipeline's output; the oracle: the raw pool's truth-clean rows. Both are metadata shards that name the
    run's image store (the trainer reads pixels through it); trained with the same steps as every variant."""
    import numpy as np
    import polars as pl

    import trainer.evaluate
    import trainer.train
    from pipeline.images import ImageStore, store_of_folder

    run = tmp_path / "run"
    uids = [f"{i:032x}" for i in range(30)]
    d = run / "00_ingest"
    d.mkdir(parents=True)
    for k, part in enumerate((uids[:18], uids[18:])):
        pq.write_table(pa.table({"uid": part, "image_ref": [f"s.parquet#{u}" for u in part]}), d / f"part-{k:05d}.parquet")
    (d / "_manifest.json").write_text(json.dumps({"input": str(tmp_path / "world" / "urls.parquet")}))
    for name, n in {"01_align": 20, "02_metaclip": 15, "03_klite": 15, "04_dfn": 12}.items():
        _stage(run, name, n)
    ImageStore(str(tmp_path / "store"), "parquet", "image").save(str(run))
    (tmp_path / "world").mkdir()
    kinds = ["clean" if i % 3 else "mismatched" for i in range(30)] + ["clean"]  # one uid the pool never had
    pq.write_table(pa.table({"uid": uids + ["f" * 32], "kind": kinds}), tmp_path / "world" / "truth.parquet")
    import hashlib  # a demo world's own record (world.json) names its truth: only then is it the run's labels

    digest = hashlib.sha256((tmp_path / "world" / "truth.parquet").read_bytes()).hexdigest()
    (tmp_path / "world" / "world.json").write_text(json.dumps({"files": {"truth.parquet": digest}}))
    seen = {}

    def fake_train(tc, data, out, resume):
        rows = pl.read_parquet(os.path.join(data, "*.parquet"))["uid"].to_list()
        seen[(os.path.basename(data), tc.seed, tc.steps)] = rows
        if "_subsets" in data:
            assert store_of_folder(data) == ImageStore.load(str(run))  # the trainer finds the pixels
        return {"model_path": "m", "last_loss": 1.0}

    monkeypatch.setattr(trainer.train, "train", fake_train)
    monkeypatch.setattr(trainer.evaluate, "evaluate",
                        lambda *a, **k: {"results": {"s": {"kind": "classification", "top1": 0.5, "top5": 1.0}}})
    res = ablate_mod.ablate(str(run), {"train": {"eval_sets": ["x.parquet"], "seed": 0}}, steps=4, seeds=[0, 1])
    rows = {r["variant"]: r for r in res["variants"]}
    assert list(rows)[-2:] == ["random subset", "oracle"]
    assert rows["random subset"]["pairs"] == rows["+ dfn"]["pairs"] == 12
    a, b = seen[("random-n12-seed0", 0, 4)], seen[("random-n12-seed1", 1, 4)]
    assert len(set(a)) == len(set(b)) == 12 and set(a) | set(b) <= set(uids) and set(a) != set(b)
    assert set(a) == {uids[i] for i in np.flatnonzero(_pick(30, 12, 0))}  # numpy's Generator(seed).choice
    oracle = [v for k, v in seen.items() if k[0].startswith("oracle-")]
    assert len(oracle) == 2 and sorted(oracle[0]) == [u for i, u in enumerate(uids) if i % 3]
    assert rows["oracle"]["pairs"] == 20 and rows["oracle"]["stage"] == "ingest, truth-clean"
    # rerun: the subsets are reused, not drawn again
    before = {p: os.path.getmtime(p) for p in (run / "ablation" / "_subsets").rglob("part-*.parquet")}
    ablate_mod.ablate(str(run), {"train": {"eval_sets": ["x.parquet"], "seed": 0}}, steps=4, seeds=[0, 1])
    assert {p: os.path.getmtime(p) for p in (run / "ablation" / "_subsets").rglob("part-*.parquet")} == before


def _pick(n, k, seed):
    import numpy as np

    m = np.zeros(n, dtype=bool)
    m[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return m


def test_head_and_tail_classes_are_ranked_by_how_often_the_raw_pool_names_them(tmp_path, monkeypatch):
    """MetaCLIP's claim is about the tail: the table splits each classification set's top-1 into the half of its
    classes the raw pool's captions name most (word match) and the rest. Hand-computed on 4 classes."""
    import trainer.evaluate
    import trainer.train

    run = tmp_path / "run"
    d = run / "00_ingest"
    d.mkdir(parents=True)
    texts = ["a red circle", "two circles", "a circle", "a square", "a blue square", "squares", "a star",
             "a starry night", "one ring"]  # circle 2 (not "circles"), square 2, star 1 ("starry" is not), ring 1
    pq.write_table(pa.table({"uid": [f"{i:032x}" for i in range(len(texts))], "text": texts}), d / "part-00000.parquet")
    (d / "_manifest.json").write_text("{}")
    per = {"circle": 0.9, "square": 0.7, "star": 0.2, "ring": 0.4}
    monkeypatch.setattr(trainer.train, "train", lambda tc, data, out, resume: {"model_path": "m", "last_loss": 1.0})
    monkeypatch.setattr(trainer.evaluate, "evaluate", lambda *a, **k: {"results": {"shapes": {
        "kind": "classification", "top1": 0.55, "top5": 1.0, "per_class_top1": per}}})
    res = ablate_mod.ablate(str(run), {"train": {"eval_sets": ["x.parquet"], "seed": 0}}, steps=2, seeds=[0])
    g = res["class_groups"]["shapes"]
    assert g["pool_mentions"] == {"circle": 2, "square": 2, "star": 1, "ring": 1}
    assert g["head"] == ["circle", "square"] and g["tail"] == ["ring", "star"]  # ties by name
    raw = res["variants"][0]
    assert raw["shapes head top1"] == pytest.approx(0.8) and raw["shapes tail top1"] == pytest.approx(0.3)
    assert "shapes head top1" in res["table_md"]
