"""Property: every stage's output is independent of how the pool is split into shards, of row order, and of
the worker count. Random small pools (captions from a small vocabulary with exact copies, case copies,
near copies, alt-texts shared across images, images shared across alt-texts, rare tokens, optionally image
bytes) and random shard splits (empty shards included) through align -> metaclip -> klite -> a toy stage
must give, stage by stage, the same kept rows (every column) and the same rejected uids and reasons as one
shard. The split run also shuffles align's statistics into a random number of partitions (the one-shard run
has one). Worker count 0 vs 2 is checked on one fixed pool (a Dask cluster is slow to start)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import config as config_mod
from pipeline import shards
from pipeline.runner import run_pipeline
from pipeline.schema import compute_uid

TOY = "tests.stages_for_tests:FirstWordStage"
STAGES = ["align", "metaclip", "klite", TOY]
DIRS = ["01_align", "02_metaclip", "03_klite", "90_firstword"]
ENTRIES = ["dog", "cat", "ball", "beach", "tree", "water", "red"]
VOCAB = ENTRIES + ["a", "the", "on", "runs", "small", "park", "zqxvbn"]  # zqxvbn: a rare token
SIZES = [(400, 300), (400, 300), (150, 300), (900, 200), (300, 300), (400, 300)] + [(320, 240)] * 6  # 2 too small/wide


def _png(seed: int) -> bytes:
    arr = (np.random.default_rng(seed).random((16, 16, 3)) * 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


IMAGES = [_png(i) for i in range(5)] + [_png(0)] + [_png(i) for i in range(5, 11)]  # 5: image 0's bytes, another url


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    entries = tmp_path_factory.mktemp("entries") / "entries.txt"
    entries.write_text("\n".join(ENTRIES) + "\n")
    return config_mod.resolve({
        "align": {"max_images_per_text": 2, "max_texts_per_image": 5, "min_words": 2, "near_dup_threshold": 0.6},
        "metaclip": {"entries": str(entries), "t": 2},
        TOY: {"min_count": 2, "keep": 0.6},
    })


@st.composite
def pools(draw):
    bases = draw(st.lists(st.lists(st.sampled_from(VOCAB), min_size=1, max_size=7), min_size=1, max_size=5))
    n = draw(st.integers(1, 36))
    rows, seen = [], set()
    for _ in range(n):
        words = list(draw(st.sampled_from(bases)))
        op = draw(st.sampled_from(["same", "same", "upper", "extra", "drop", "new"]))
        if op == "upper":
            words = [w.upper() for w in words]
        elif op == "extra":
            words.append(draw(st.sampled_from(VOCAB)))
        elif op == "drop" and len(words) > 1:
            words.pop(draw(st.integers(0, len(words) - 1)))
        elif op == "new":
            words = draw(st.lists(st.sampled_from(VOCAB), min_size=1, max_size=9))
        img = draw(st.integers(0, len(IMAGES) - 1))
        key = (img, " ".join(words))
        if key not in seen:  # a uid names one row: the same (url, text) twice is one row
            seen.add(key)
            rows.append(key)
    with_images = draw(st.booleans())
    order = draw(st.permutations(range(len(rows))))
    cuts = sorted(draw(st.lists(st.integers(0, len(rows)), max_size=5)))
    per_partition = draw(st.integers(1, 3))  # shards per align statistics partition in the split run
    return [rows[i] for i in order], with_images, cuts, per_partition


def pool_table(rows, with_images: bool) -> pa.Table:
    urls = [f"http://e.invalid/{img}.jpg" for img, _ in rows]
    texts = [t for _, t in rows]
    cols = {"uid": compute_uid(urls, texts), "url": urls, "text": texts}
    if with_images:
        cols["image"] = pa.array([IMAGES[img] for img, _ in rows], pa.binary())
        cols["orig_width"] = pa.array([SIZES[img][0] for img, _ in rows], pa.int32())
        cols["orig_height"] = pa.array([SIZES[img][1] for img, _ in rows], pa.int32())
        cols["width"], cols["height"] = pa.array([16] * len(rows), pa.int32()), pa.array([16] * len(rows), pa.int32())
    return pa.table(cols)


def write_split(table: pa.Table, folder: Path, cuts: list[int]) -> None:
    bounds = [0, *cuts, table.num_rows]
    for i in range(len(bounds) - 1):
        shards.write_shard(table.slice(bounds[i], bounds[i + 1] - bounds[i]), str(folder / f"part-{i:05d}.parquet"))


def outcome(run: Path) -> dict[str, tuple[list, list]]:
    """Per stage: kept rows (all columns) and rejected (uid, reason), both sorted by uid. A row's image
    reference names a source shard of its own pool, so it differs between splits: it is compared by the bytes
    it resolves to in the run's image store."""
    from pipeline.images import REF_COL, ImageStore

    store = ImageStore.load(str(run))
    out = {}
    for d in DIRS:
        kept, rej = [], []
        for p in sorted((run / d).glob("part-*.parquet")):
            t = pq.read_table(p)
            if REF_COL in t.column_names:
                t = t.append_column("image_bytes", store.reader().read(t.column(REF_COL))).drop_columns([REF_COL])
            kept += t.to_pylist()
        for p in sorted((run / d / "rejected").glob("part-*.parquet")):
            t = pq.read_table(p, columns=["uid", "reason"])
            rej += list(zip(t.column("uid").to_pylist(), t.column("reason").to_pylist()))
        out[d] = (sorted(kept, key=lambda r: r["uid"]), sorted(rej))
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pool=pools())
def test_every_stage_is_independent_of_shard_split_and_order(pool, cfg):
    rows, with_images, cuts, per_partition = pool
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        table = pool_table(rows, with_images)
        (root / "one").mkdir()
        (root / "split").mkdir()
        # one shard with the rows sorted by uid; the split pool in the drawn (random) order
        write_split(table.sort_by("uid"), root / "one", [])
        write_split(table, root / "split", cuts)
        run_pipeline(STAGES, str(root / "r1"), cfg, input_dir=str(root / "one"), workers=0)
        shuffled = dict(cfg, run=dict(cfg["run"], stats_shards_per_partition=per_partition))
        run_pipeline(STAGES, str(root / "rs"), shuffled, input_dir=str(root / "split"), workers=0)
        assert partitions(root / "rs") == -(-(len(cuts) + 1) // per_partition)
        one, split = outcome(root / "r1"), outcome(root / "rs")
        assert len(list((root / "rs" / "01_align").glob("part-*.parquet"))) == len(cuts) + 1
        n = table.num_rows
        for d in DIRS:
            assert split[d] == one[d], d
            kept, rej = one[d]
            assert len(kept) + len(rej) == n, d  # every row of the stage's input is accounted for once
            assert len({r["uid"] for r in kept} | {u for u, _ in rej}) == n
            n = len(kept)


def partitions(run: Path) -> int:
    return json.loads((run / "01_align" / "_manifest.json").read_text())["stats_partitions"]


def test_worker_count_0_vs_2_on_a_fixed_pool(cfg, tmp_path, dask_cluster):
    rng = np.random.default_rng(3)
    rows, seen = [], set()
    for i in range(50):
        words = list(rng.choice(VOCAB, size=int(rng.integers(1, 9))))
        key = (int(rng.integers(0, len(IMAGES))), " ".join(words))
        if key not in seen:
            seen.add(key)
            rows.append(key)
    rows += [(i % len(IMAGES), "the dog runs on the beach") for i in range(6)]  # one alt-text on many images
    table = pool_table(rows, with_images=True)
    (tmp_path / "one").mkdir()
    (tmp_path / "split").mkdir()
    write_split(table.sort_by("uid"), tmp_path / "one", [])
    write_split(table, tmp_path / "split", [10, 10, 25, 40])  # an empty shard too
    run_pipeline(STAGES, str(tmp_path / "r0"), cfg, input_dir=str(tmp_path / "one"), workers=0)
    shuffled = dict(cfg, run=dict(cfg["run"], stats_shards_per_partition=1))  # 5 partitions merged on 2 workers
    run_pipeline(STAGES, str(tmp_path / "r2"), shuffled, input_dir=str(tmp_path / "split"),
                 scheduler=dask_cluster.scheduler.address)
    assert partitions(tmp_path / "r2") == 5 and partitions(tmp_path / "r0") == 1
    one, two = outcome(tmp_path / "r0"), outcome(tmp_path / "r2")
    for d in DIRS:
        assert two[d] == one[d], d
    reasons = {r for _, r in one["01_align"][1]} | {r for _, r in one["02_metaclip"][1]}
    assert {"image_too_small", "aspect_ratio", "text_many_images", "too_few_words", "balanced_out"} <= reasons
    assert one["03_klite"][0] and one["90_firstword"][0]  # rows reach the last stage


# ---- uid is unique in every stage's output and in the emitted set ------------------------------------------
EMIT_DIRS = DIRS + ["05_emit"]


@st.composite
def pools_with_copies(draw):
    """A pool as above, plus copies of some rows (same url and text: the same uid), each either the very same
    row or one that differs in another column (its original size), spread over shards in a random order."""
    rows, with_images, _, per_partition = draw(pools())
    picks = draw(st.lists(st.tuples(st.integers(0, len(rows) - 1), st.booleans()), min_size=1, max_size=12))
    variants = [(img, text, False) for img, text in rows] + [(rows[i][0], rows[i][1], other) for i, other in picks]
    order = draw(st.permutations(range(len(variants))))
    cuts = sorted(draw(st.lists(st.integers(0, len(variants)), max_size=5)))
    return [variants[i] for i in order], with_images, cuts, per_partition


def copies_table(rows, with_images: bool) -> pa.Table:
    table = pool_table([(img, text) for img, text, _ in rows], with_images)
    if with_images:  # a copy that differs: another original width (still large enough for align's size rules)
        w = [SIZES[img][0] + (7 if other else 0) for img, _, other in rows]
        table = table.set_column(table.column_names.index("orig_width"), "orig_width", pa.array(w, pa.int32()))
    else:  # a text-only pool: another extra column
        table = table.append_column("source", pa.array(["b" if other else "a" for *_, other in rows], pa.string()))
    return table


def assert_uids_unique(run: Path) -> list[str]:
    """uid once in every stage's kept shards (together) and in emit's uids.npy; returns the emitted uids."""
    for d in EMIT_DIRS:
        uids = [u for p in sorted((run / d).glob("part-*.parquet")) for u in pq.read_table(p, columns=["uid"]).column("uid").to_pylist()]
        assert len(uids) == len(set(uids)), (d, len(uids) - len(set(uids)))
    arr = np.load(run / "emit" / "uids.npy")
    assert len(np.unique(arr)) == len(arr), "emit's uids.npy holds a uid twice"
    emitted = [f"{int(h):016x}{int(lo):016x}" for h, lo in zip(arr["hi"], arr["lo"])]
    return sorted(emitted)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pool=pools_with_copies())
def test_uid_is_unique_in_every_stage_and_in_the_emitted_set(pool, cfg, dask_cluster):
    rows, with_images, cuts, per_partition = pool
    stages = STAGES + ["emit"]
    cfg = dict(cfg, emit={"samples_per_shard": 4, "formats": ["parquet-images"]})
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        table = copies_table(rows, with_images)
        (root / "one").mkdir()
        (root / "split").mkdir()
        write_split(table.sort_by([("uid", "ascending"), ("orig_width" if with_images else "source", "descending")]),
                    root / "one", [])
        write_split(table, root / "split", cuts)
        run_pipeline(stages, str(root / "r1"), cfg, input_dir=str(root / "one"), workers=0)
        shuffled = dict(cfg, run=dict(cfg["run"], stats_shards_per_partition=per_partition))
        # the split pool on a two-worker Dask cluster, its statistics shuffled into partitions
        run_pipeline(stages, str(root / "rs"), shuffled, input_dir=str(root / "split"),
                     scheduler=dask_cluster.scheduler.address)
        assert assert_uids_unique(root / "r1") == assert_uids_unique(root / "rs")
        one, split = outcome(root / "r1"), outcome(root / "rs")
        for d in DIRS:  # the same copy is kept whatever the shards, their order and the workers
            assert split[d] == one[d], d
        kept, rej = one["01_align"]
        assert len(kept) + len(rej) == table.num_rows  # every copy accounted for: kept once or rejected
