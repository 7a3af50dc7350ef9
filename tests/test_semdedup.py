"""semdedup (issue 31 items 1 and 2): the pairwise rule and the kept copy on hand-computed cases and against a
plain reference, the sample and k-means, the step through the runner on stored vectors (duplicates found and
named, the same result for any shard split, order or worker count), and eval decontamination naming its item."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from pipeline import config as config_mod  # noqa: E402
from pipeline import shards  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.runner import run_pipeline  # noqa: E402
from stages.semdedup import SemDedupStage, clusters, groups  # noqa: E402
from tests.test_trainer import synthetic_world  # noqa: E402


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---- the pairwise rule, by hand --------------------------------------------------------------------------------
def test_pairs_need_both_image_and_text_close_in_pair_mode():
    # rows 0, 1: same picture, same caption; row 2: same picture, another caption; row 3: another picture
    img = _unit([[1, 0, 0], [1, 0.01, 0], [1, 0, 0.02], [0, 1, 0]])
    txt = _unit([[1, 0], [1, 0.05], [0, 1], [1, 0]])
    i, j = groups.near_pairs(img, txt, eps_image=0.05, eps_text=0.1)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1)]
    i, j = groups.near_pairs(img, None, eps_image=0.05, eps_text=0.1)  # image mode: the caption does not matter
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 2)]


def test_blocked_pairs_equal_the_full_matrix():
    rng = np.random.default_rng(0)
    base = _unit(rng.standard_normal((30, 8)))
    img = _unit(np.repeat(base, 3, axis=0) + 0.05 * rng.standard_normal((90, 8)))
    txt = _unit(np.repeat(base, 3, axis=0) + 0.2 * rng.standard_normal((90, 8)))
    full_i, full_j = np.nonzero(np.triu((img @ img.T >= 0.95) & (txt @ txt.T >= 0.9), k=1))
    want = set(zip(full_i.tolist(), full_j.tolist()))
    for budget in (1, 7, 90, 10_000):  # a block of one row ... the whole cluster at once
        i, j = groups.near_pairs(img, txt, 0.05, 0.1, budget=budget)
        assert set(zip(i.tolist(), j.tolist())) == want
    assert want  # the case has pairs


def test_one_row_kept_per_group_by_each_rule():
    # rows 0-2 one group (a chain 0~1~2 with 0 !~ 2 is one group too), row 3 alone
    img = _unit([[1, 0, 0], [1, 0.25, 0], [1, 0.5, 0], [0, 0, 1]])
    sims = img @ img.T
    assert sims[0, 1] >= 0.97 and sims[1, 2] >= 0.97 and sims[0, 2] < 0.97  # the chain, by hand
    score = np.array([0.1, 0.3, np.nan, 0.9], np.float32)
    typical = np.array([0.9, 0.5, 0.7, 1.0], np.float32)
    uid_rank = np.arange(4)
    cases = {"highest_score": 1, "hard": 1, "easy": 0}
    for rule, keeper in cases.items():
        rank = groups.keep_rank(rule, uid_rank, score, typical)
        d = groups.decide(img, None, rank, eps_image=0.03, eps_text=0.0)
        assert sorted(d.dropped.tolist()) == sorted({0, 1, 2} - {keeper}), rule
        assert set(d.kept.tolist()) == {keeper}, rule
        assert np.allclose(d.image_cosine, sims[d.dropped, keeper])


def test_nearest_kept_keeps_the_far_end_of_a_chain_and_names_a_close_kept_copy():
    img = _unit([[1, 0, 0], [1, 0.25, 0], [1, 0.5, 0], [0, 0, 1]])  # 0 ~ 1 ~ 2, 0 !~ 2 (as above)
    rank = np.arange(4)
    d = groups.decide_nearest_kept(img, None, rank, eps_image=0.03, eps_text=0.0)
    assert d.dropped.tolist() == [1] and d.kept.tolist() == [0]  # 2's only close row (1) is gone: 2 stays
    comp = groups.decide(img, None, rank, eps_image=0.03, eps_text=0.0)
    assert sorted(comp.dropped.tolist()) == [1, 2]


def _copies_of_25_scenes(seed: int):
    """80 rows drawn from 25 scenes: close images; captions close (noise 0.02) or not (0.5); a random keep rank."""
    rng = np.random.default_rng(seed)
    base = _unit(rng.standard_normal((25, 16)))
    pick = rng.integers(0, 25, 80)
    img = _unit(base[pick] + 0.04 * rng.standard_normal((80, 16)))
    txt = _unit(base[pick] + rng.choice([0.02, 0.5], 80)[:, None] * rng.standard_normal((80, 16)))
    rank = rng.permutation(80)
    return img, txt, rank


def _greedy_reference(img, txt, rank, eps_i, eps_t):
    """The plainest greedy: rows in rank order; dropped when a kept earlier row is close; named: the most
    similar such row (ties: the better rank)."""
    n = len(img)
    kept, out = [], {}
    for r in sorted(range(n), key=lambda r: rank[r]):
        close = [k for k in kept if float(img[k] @ img[r]) >= 1 - eps_i
                 and (txt is None or float(txt[k] @ txt[r]) >= 1 - eps_t)]
        if close:
            out[r] = max(close, key=lambda k: (float(img[k] @ img[r]), -rank[k]))
        else:
            kept.append(r)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_kept_matches_a_plain_greedy_reference(seed):
    img, txt, rank = _copies_of_25_scenes(seed)
    d = groups.decide_nearest_kept(img, txt, rank, 0.02, 0.05, budget=100)
    got = dict(zip(d.dropped.tolist(), d.kept.tolist()))
    assert got == _greedy_reference(img, txt, rank, 0.02, 0.05)
    assert 5 < len(got) <= len(_reference(img, txt, rank, 0.02, 0.05))  # never more than components drop


def test_ties_and_missing_scores_fall_back_to_uid_order():
    score = np.array([np.nan, 0.5, 0.5, np.nan])
    rank = groups.keep_rank("highest_score", np.array([3, 2, 0, 1]), score, np.zeros(4))
    assert rank.tolist() == [3, 1, 0, 2]  # scored first (tie: lower uid rank), then unscored by uid


def _reference(img, txt, rank, eps_i, eps_t):
    """Union-find over every pair, the plainest way: each group keeps its best-ranked row."""
    n = len(img)
    parent = list(range(n))

    def root(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in itertools.combinations(range(n), 2):
        if float(img[a] @ img[b]) >= 1 - eps_i and (txt is None or float(txt[a] @ txt[b]) >= 1 - eps_t):
            parent[root(a)] = root(b)
    by_group = {}
    for r in range(n):
        by_group.setdefault(root(r), []).append(r)
    out = {}
    for members in by_group.values():
        keeper = min(members, key=lambda r: rank[r])
        out.update({r: keeper for r in members if r != keeper})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decisions_match_a_plain_reference(seed):
    img, txt, rank = _copies_of_25_scenes(seed)
    d = groups.decide(img, txt, rank, 0.02, 0.05, budget=100)
    got = dict(zip(d.dropped.tolist(), d.kept.tolist()))
    assert got == _reference(img, txt, rank, 0.02, 0.05)
    assert len(got) > 5


# ---- sample and clusters ---------------------------------------------------------------------------------------
def test_sample_is_the_same_for_any_grouping_of_the_shards():
    rng = np.random.default_rng(4)
    keys = rng.integers(0, 2**63, 1000, dtype=np.int64).astype(np.uint64)
    draw = rng.random(1000)
    vecs = rng.standard_normal((1000, 4)).astype(np.float16)

    def part(idx):
        at = clusters.sample_rows(draw[idx], 0.05, 30)
        return {"rows": len(idx), "keys": keys[idx][at], "draw": draw[idx][at], "vectors": vecs[idx][at]}

    whole = clusters.merge_samples([part(np.arange(1000))], 0.05, 30)
    for cuts in ([300, 700], [10, 20, 500, 999]):
        pieces = [part(idx) for idx in np.split(rng.permutation(1000), cuts)]
        tree = clusters.merge_samples([clusters.merge_samples(pieces[:2], 0.05, 30),
                                       clusters.merge_samples(pieces[2:], 0.05, 30)], 0.05, 30)
        for k in whole:
            np.testing.assert_array_equal(np.asarray(tree[k]), np.asarray(whole[k]))
    want = np.sort(np.union1d(np.flatnonzero(draw < 0.05), np.argsort(draw)[:30]))
    assert whole["rows"] == 1000 and sorted(whole["keys"].tolist()) == sorted(keys[want].tolist())
    tiny = clusters.merge_samples([part(np.arange(20))], 0.05, 30)  # a pool under the floor: all of it
    assert len(tiny["keys"]) == 20


def test_kmeans_finds_planted_clusters_and_assigns_to_the_nearest():
    rng = np.random.default_rng(5)
    centres = _unit(rng.standard_normal((6, 32)))
    x = _unit(np.repeat(centres, 200, axis=0) + 0.05 * rng.standard_normal((1200, 32)))
    c = clusters.kmeans(x, 6, 20, seed=0)
    label, best = clusters.assign(x, c)
    assert len(np.unique(label)) == 6
    # k-means may settle in a local minimum (one planted cluster cut in two, two merged); most stay whole
    whole = sum(len(np.unique(label[g * 200:(g + 1) * 200])) == 1 for g in range(6))
    assert whole >= 4
    # near copies land in the same cluster whatever the minimum: a row and its copy are never apart here
    copy_label, _ = clusters.assign(_unit(x + 0.002 * rng.standard_normal(x.shape)), c)
    assert (copy_label == label).mean() > 0.99
    np.testing.assert_allclose(best, np.max(x @ c.T, axis=1), rtol=1e-6)
    assert clusters.default_clusters(25_001, 10_000) == 3 and clusters.default_clusters(0, 10_000) == 1


def test_a_giant_cluster_is_split_to_bounded_parts():
    rng = np.random.default_rng(6)
    x = _unit(rng.standard_normal((500, 8)))
    sub = clusters.split_large(x, 60, seed=0, iterations=10)
    assert np.bincount(sub).max() <= 60
    same = np.ones((300, 8), np.float32) / np.sqrt(8)  # identical rows: k-means cannot split them
    assert np.bincount(clusters.split_large(same, 100, 0, 5)).max() <= 100
    assert (clusters.split_large(x, 500, 0, 5) == 0).all()


# ---- the step, through the runner -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world(tmp_path_factory.mktemp("semdedup_world"), n=90, seed=11)



def _content_vector(data: bytes | str, dims: int) -> np.ndarray:
    import xxhash

    raw = data.encode() if isinstance(data, str) else data
    v = np.random.default_rng(xxhash.xxh64_intdigest(raw)).standard_normal(dims)
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.fixture
def content_vectors(monkeypatch):
    """The network's vectors replaced by a function of the content: the same bytes or caption, the same vector;
    any other, an unrelated one (a random network maps these small synthetic pictures all within cosine 0.95 of
    each other, which says nothing about the rule). In-process only: a Dask worker runs the real network."""
    from trainer import score as score_mod

    def texts(self, t):
        return np.stack([_content_vector(x, self.dims) for x in t]) if t else np.zeros((0, self.dims), np.float32)

    def images(self, read, n):
        blobs = read(0, n)
        out = np.zeros((n, self.dims), np.float32)
        ok = np.array([b is not None for b in blobs], bool)
        for i in np.flatnonzero(ok):
            out[i] = _content_vector(blobs[i], self.dims)
        return out, ok, ok.copy()

    monkeypatch.setattr(score_mod.Scorer, "encode_texts", texts)
    monkeypatch.setattr(score_mod.Scorer, "encode_images", images)


def _planted(world) -> tuple[pa.Table, dict]:
    """The pool plus copies: rows 0-9 each copied twice under new uids (same image and caption: the same pair),
    and rows 10-14 copied once with the caption of another row (same image, other text: not a pair duplicate)."""
    from pipeline.schema import compute_uid

    t = pq.read_table(world["pool"]).select(["url", "text", "image"])
    extra, groups_of = [], {}
    rows = t.to_pylist()
    for i in range(10):
        for c in range(2):
            extra.append({**rows[i], "url": rows[i]["url"] + f"?copy={c}"})
    for i in range(10, 15):
        extra.append({**rows[i], "url": rows[i]["url"] + "?other", "text": rows[40 + i]["text"]})
    full = pa.concat_tables([t, pa.Table.from_pylist(extra, schema=t.schema)])
    full = full.append_column("uid", compute_uid(full.column("url"), full.column("text")))
    uids = full.column("uid").to_pylist()
    n = t.num_rows
    for i in range(10):
        groups_of[uids[i]] = {uids[n + 2 * i], uids[n + 2 * i + 1]}
    return full, groups_of


def _write(table: pa.Table, folder, parts: int, seed: int = 0):
    folder.mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(table.num_rows) if seed else np.arange(table.num_rows)
    t = table.take(pa.array(order))
    for k, idx in enumerate(np.array_split(np.arange(t.num_rows), parts)):
        shards.write_shard(t.take(pa.array(idx)), str(folder / f"part-{k:05d}.parquet"))
    return folder


def _cfg(network, **semdedup):
    return config_mod.resolve({"run": {"stages": ["semdedup"]}, "dfn": {"checkpoint": network, "batch_size": 32},
                               "semdedup": {"eps_image": 0.01, "eps_text": 0.01, "clusters": 3, **semdedup}})


def _rejected(run, step="00_semdedup"):
    t = pa.concat_tables([shards.read_shard(p) for p in shards.list_shards(str(run / step / "rejected"))])
    return {u: (r, d, e) for u, r, d, e in zip(*(t.column(c).to_pylist()
                                                   for c in ("uid", "reason", "duplicate_of", "eval_item")))}


def test_step_drops_planted_pair_duplicates_and_names_the_kept_copy(world, network, tmp_path, content_vectors):
    table, planted = _planted(world)
    pool = _write(table, tmp_path / "in", 3)
    [res] = run_pipeline(["semdedup"], str(tmp_path / "r"), _cfg(network), input_dir=str(pool), workers=0)
    got = _rejected(tmp_path / "r")
    # each planted group (an original and its two copies) keeps exactly one row and names it
    for original, copies in planted.items():
        members = {original} | copies
        gone = {u for u in members if u in got}
        assert len(gone) == 2, (original, gone)
        [keeper] = members - gone
        assert all(got[u][:2] == ("semantic_duplicate", keeper) for u in gone)
    # rows with the same image but another caption are not pair duplicates
    assert len(got) == 20 and res.manifest["rows_out"] == table.num_rows - 20
    assert any("k-means clusters" in n for n in res.manifest["notes"])
    # nearest_kept drops the same rows here: every group is a clique of identical vectors
    run_pipeline(["semdedup"], str(tmp_path / "nk"), _cfg(network, group="nearest_kept"), input_dir=str(pool),
                 workers=0)
    assert _rejected(tmp_path / "nk") == got
    # in image mode (NeMo's rule) the re-captioned copies go too
    run_pipeline(["semdedup"], str(tmp_path / "img"), _cfg(network, mode="image"), input_dir=str(pool), workers=0)
    assert len(_rejected(tmp_path / "img")) == 25


def test_same_result_for_any_shards_order_and_workers(world, network, tmp_path, content_vectors, dask_cluster):
    table, _ = _planted(world)
    cfg = config_mod.overlay(_cfg(network, keep="hard"), {"run": {"stages": ["embed", "semdedup"]}})
    results = []
    for name, parts, seed, dask in (("a", 1, 0, False), ("b", 4, 3, False), ("c", 3, 9, True)):
        pool = _write(table, tmp_path / f"in_{name}", parts, seed)
        # vectors stored in-process first (the stand-in network is this process's), then semdedup on two Dask
        # workers (the session's cluster: its survey, collect, partitions and applies run there)
        run_pipeline(["embed"], str(tmp_path / name), cfg, input_dir=str(pool), workers=0)
        where = {"scheduler": dask_cluster.scheduler.address} if dask else {"workers": 0}
        res = run_pipeline(["semdedup"], str(tmp_path / name), cfg, input_dir=str(pool), **where)
        results.append(_rejected(tmp_path / name, "01_semdedup"))
    assert results[0] == results[1] == results[2]
    assert len(results[0]) == 20
    assert res[-1].manifest["executor"].startswith("dask scheduler")


def test_eval_decontamination_names_the_eval_item(world, network, tmp_path, content_vectors):
    table, _ = _planted(world)
    eval_dir = tmp_path / "evalset"
    (eval_dir / "sub").mkdir(parents=True)
    imgs = table.column("image").to_pylist()
    (eval_dir / "sub" / "a.jpg").write_bytes(imgs[20])  # a pool image is an eval image
    (eval_dir / "b.jpg").write_bytes(imgs[21])
    pool = _write(table, tmp_path / "in", 2)
    run_pipeline(["semdedup"], str(tmp_path / "r"), _cfg(network, eval_images=str(eval_dir)), input_dir=str(pool),
                 workers=0)
    got = _rejected(tmp_path / "r")
    uids = table.column("uid").to_pylist()
    assert got[uids[20]] == ("eval_semantic_duplicate", None, "evalset/sub/a.jpg")
    assert got[uids[21]] == ("eval_semantic_duplicate", None, "evalset/b.jpg")
    assert sum(r == "eval_semantic_duplicate" for r, _, _ in got.values()) == 2
    assert sum(r == "semantic_duplicate" for r, _, _ in got.values()) == 20


def test_bad_config_is_one_line():
    for bad, word in (({"mode": "text"}, "mode"), ({"keep": "first"}, "keep"), ({"eps_image": -1}, "eps_image"),
                      ({"group": "clique"}, "group")):
        with pytest.raises(ConfigError, match=word):
            config_mod.resolve({"semdedup": bad})
    assert SemDedupStage.step_config({}, {"dfn": {"model": "hf-hub:apple/DFN-public"}})["model"] == \
        "hf-hub:apple/DFN-public"
    assert SemDedupStage.step_config({}, {"embed": {"checkpoint": "e.pt"}, "dfn": {"checkpoint": "d.pt"}})[
        "checkpoint"] == "e.pt"


def test_report_tables(world, network, tmp_path, content_vectors):
    table, _ = _planted(world)
    pool = _write(table, tmp_path / "in", 2)
    run_pipeline(["semdedup"], str(tmp_path / "r"), _cfg(network), input_dir=str(pool), workers=0)
    out = SemDedupStage(_cfg(network)["semdedup"]).report(str(tmp_path / "r" / "00_semdedup"), str(tmp_path))
    [summary, quantiles] = out["tables"]
    row = dict(zip(summary.header, summary.rows[0]))
    assert row["semantic_duplicate"] == 20 and row["clusters"] == 3 and row["rows in"] == table.num_rows
    assert row["k-means sample"] == table.num_rows  # a pool under min_sample: all of it
    assert quantiles.rows[-1][1] == row["largest cluster"]


def test_survey_is_reused_on_resume_and_redone_when_its_file_changed(world, network, tmp_path, content_vectors,
                                                                      monkeypatch):
    from stages.semdedup import clusters as clusters_mod

    calls = []
    real = clusters_mod.kmeans
    monkeypatch.setattr(clusters_mod, "kmeans", lambda *a, **k: calls.append(1) or real(*a, **k))
    table, _ = _planted(world)
    pool = _write(table, tmp_path / "in", 2)
    run = tmp_path / "r"
    run_pipeline(["semdedup"], str(run), _cfg(network), input_dir=str(pool), workers=0)
    first = _rejected(run)
    assert len(calls) == 1
    run_pipeline(["semdedup"], str(run), _cfg(network), input_dir=str(pool), workers=0)
    assert len(calls) == 1  # up to date: no survey, no k-means
    survey = run / "00_semdedup" / "survey" / "survey.data"
    survey.write_bytes(survey.read_bytes() + b"x")  # changed behind the marker's back: recomputed, not trusted
    (run / "00_semdedup" / "_done" / "part-00000.parquet.json").unlink()  # a shard to redo, so the statistics are needed
    run_pipeline(["semdedup"], str(run), _cfg(network), input_dir=str(pool), workers=0)
    assert len(calls) == 2 and _rejected(run) == first


def test_a_cluster_over_max_cluster_rows_is_split_and_identical_copies_still_meet(world, network, tmp_path,
                                                                                   content_vectors):
    table, planted = _planted(world)
    pool = _write(table, tmp_path / "in", 2)
    cfg = _cfg(network, clusters=1, max_cluster_rows=16)
    run_pipeline(["semdedup"], str(tmp_path / "r"), cfg, input_dir=str(pool), workers=0)
    got = _rejected(tmp_path / "r")
    assert len(got) == 20  # an original and its copies have one vector: the same sub-cluster, whatever the split
    out = SemDedupStage(cfg["semdedup"]).report(str(tmp_path / "r" / "00_semdedup"), str(tmp_path))
    row = dict(zip(out["tables"][0].header, out["tables"][0].rows[0]))
    assert row["clusters"] == 1 and row["clusters split"] == 1


# ---- eval captions (issue 31 item 2: the eval set's images and captions embedded once) --------------------------
def test_eval_items_read_captions_of_parquet_and_folder_sets(tmp_path):
    from pipeline import evalsets

    pq.write_table(pa.table({"image": [b"a", b"b", b"c"], "captions": [["one", " two "], [], None]}),
                   tmp_path / "ret.parquet")
    assert evalsets.read_eval_items(str(tmp_path / "ret.parquet")).captions == [["one", "two"], [], []]
    long = "é" * evalsets.MAX_CAPTION_BYTES  # 2 bytes a character: cut at the cap, never inside a character
    pq.write_table(pa.table({"jpg": [b"a", b"b", b"c"], "caption": ["x", "", long]}), tmp_path / "cap.parquet")
    items = evalsets.read_eval_items(str(tmp_path / "cap.parquet"))
    assert items.names == ["cap.parquet#0", "cap.parquet#1", "cap.parquet#2"]
    assert items.captions == [["x"], [], ["é" * (evalsets.MAX_CAPTION_BYTES // 2)]]
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.jpg").write_bytes(b"A")
    (folder / "sub" / "a.txt").write_text("a caption\n")
    (folder / "b.png").write_bytes(b"B")  # no caption file
    (folder / "c.jpg").write_bytes(b"C")
    (folder / "c.txt").write_bytes(b"y" * (evalsets.MAX_CAPTION_BYTES + 10))  # read up to the cap only
    items = evalsets.read_eval_items(str(folder))
    assert items.names == ["imgs/b.png", "imgs/c.jpg", "imgs/sub/a.jpg"]
    assert items.captions == [[], ["y" * evalsets.MAX_CAPTION_BYTES], ["a caption"]]


def test_eval_match_by_hand():
    from stages.semdedup import match_eval
    from trainer.embed import ShardVectors

    def vecs(x, found=None):
        v = _unit(x)
        return ShardVectors(v, np.ones(len(v), bool) if found is None else np.asarray(found), None, 0, None)

    survey = {"eval_names": ["E/a.jpg", "E/b.jpg"], "eval_vectors": _unit([[1, 0, 0], [0, 1, 0]]),
              # item a has two captions, item b none; the third caption's item has no image (-1)
              "eval_text_names": ["E/a.jpg", "E/a.jpg", "E/c.jpg"],
              "eval_text_vectors": _unit([[1, 0], [0.6, 0.8], [0, 1]]), "eval_text_image": np.array([0, 0, -1])}
    # row 0: image = a, caption 0.8 from a's 2nd caption; row 1: image near b (cos 0.995); row 2: image far from
    # both, caption = c's; row 3: far in both
    img = vecs([[1, 0, 0], [0.1, 1, 0], [0, 0, 1], [0, 0.5, 1]])
    txt = vecs([[0.6, 0.8], [1, 0], [0, 1], [1, -1]])
    reads = []

    def read(v):
        return lambda: reads.append(1) or v

    # no image hit and the caption rule off: the captions are not read at all
    m = match_eval(vecs([[0, 0, 1]]), read(vecs([[1, 0]])), survey, image_threshold=0.99, text_threshold=0.0)
    assert reads == [] and not m.image_hit.any() and np.isnan(m.text_cosine).all()
    m = match_eval(img, read(txt), survey, image_threshold=0.99, text_threshold=0.0)  # caption rule off
    assert reads == [1]  # read once: a dropped row's item has captions
    assert m.image_hit.tolist() == [True, True, False, False] and not m.text_hit.any()
    assert m.item.tolist() == ["E/a.jpg", "E/b.jpg", None, None]
    np.testing.assert_allclose(m.image_cosine[:2], [1.0, 1 / np.sqrt(1.01)], rtol=1e-6)
    assert m.text_cosine[0] == pytest.approx(1.0)  # the best of a's two captions (0.6*0.6 + 0.8*0.8)
    assert np.isnan(m.text_cosine[1:]).all()  # b has no caption; rows 2, 3 are not dropped
    m = match_eval(img, lambda: txt, survey, image_threshold=0.99, text_threshold=0.9)  # caption rule on
    assert m.text_hit.tolist() == [False, False, True, False]
    assert m.item[2] == "E/c.jpg" and m.text_cosine[2] == pytest.approx(1.0)
    assert np.isnan(m.image_cosine[2])  # c has no image to compare with
    # a row whose caption is within the threshold of a's captions: its image is compared with a's image
    m = match_eval(vecs([[0, 0.6, 0.8]]), lambda: vecs([[1, 0.01]]), survey, 0.99, 0.9)
    assert m.text_hit.tolist() == [True] and m.item[0] == "E/a.jpg"
    assert m.image_cosine[0] == pytest.approx(0.0, abs=1e-6)
    # a row without an image vector is judged on its caption alone
    m = match_eval(vecs([[1, 0, 0]], found=[False]), lambda: vecs([[1, 0]]), survey, 0.99, 0.9)
    assert m.text_hit.tolist() == [True] and np.isnan(m.image_cosine[0])


def test_eval_captions_are_compared_and_their_rule_names_the_item(world, network, tmp_path, content_vectors):
    table, _ = _planted(world)
    texts = table.column("text").to_pylist()
    imgs = table.column("image").to_pylist()
    eval_dir = tmp_path / "evalset"
    eval_dir.mkdir()
    (eval_dir / "a.jpg").write_bytes(imgs[20])  # the pair leaked: image and caption
    (eval_dir / "a.txt").write_text(texts[20])
    (eval_dir / "b.jpg").write_bytes(imgs[21])  # the picture alone
    (eval_dir / "b.txt").write_text("a caption no row of the pool has")
    (eval_dir / "c.jpg").write_bytes(imgs[30] + b"\0")  # another picture (other bytes), row 22's caption
    (eval_dir / "c.txt").write_text(texts[22])
    pool = _write(table, tmp_path / "in", 2)
    uids = table.column("uid").to_pylist()

    def rejected(run):
        t = pa.concat_tables([shards.read_shard(p) for p in shards.list_shards(str(run / "00_semdedup" / "rejected"))])
        return {r["uid"]: r for r in t.to_pylist()}

    run_pipeline(["semdedup"], str(tmp_path / "off"), _cfg(network, eval_images=str(eval_dir)), input_dir=str(pool),
                 workers=0)
    got = rejected(tmp_path / "off")
    assert got[uids[20]]["eval_text_cosine"] == pytest.approx(1.0, abs=1e-3)  # content vectors: same caption
    assert got[uids[20]]["eval_image_cosine"] == pytest.approx(1.0, abs=1e-3)
    assert abs(got[uids[21]]["eval_text_cosine"]) < 0.5  # unrelated random vectors
    assert {u for u, r in got.items() if r["reason"].startswith("eval_")} == {uids[20], uids[21]}
    assert all(r["eval_text_cosine"] is None for r in got.values() if r["reason"] == "semantic_duplicate")
    # the caption rule on: every row carrying c's caption goes, named c (a reference: the rows with that text)
    run_pipeline(["semdedup"], str(tmp_path / "on"),
                 _cfg(network, eval_images=str(eval_dir), eval_text_threshold=0.99), input_dir=str(pool), workers=0)
    got = rejected(tmp_path / "on")
    by_caption = {u for u, r in got.items() if r["reason"] == "eval_caption_duplicate"}
    same_text = {u for u, t in zip(uids, texts) if t == texts[22]} - {uids[20], uids[21]}
    assert by_caption == same_text and uids[22] in by_caption
    assert {got[u]["eval_item"] for u in by_caption} == {"evalset/c.jpg"}
    assert got[uids[20]]["reason"] == "eval_semantic_duplicate"  # the image rule comes first
    cfg = _cfg(network, eval_images=str(eval_dir), eval_text_threshold=0.99)["semdedup"]
    tables = {t.title: t for t in SemDedupStage(cfg).report(str(tmp_path / "on" / "00_semdedup"),
                                                            str(tmp_path))["tables"]}
    rules = {r[0].split(" (")[0]: r[1] for r in tables[next(k for k in tables if "dHash rule" in k)].rows}
    assert rules == {"dHash": 0, "embeddings, image": 2, "embeddings, caption": len(by_caption)}
    cos = tables["eval decontamination: dropped rows' cosine to the eval item they name (median)"]
    # image rule: rows 20 (caption 1.0) and 21 (caption ~0): one median over both; caption rule: all at 1.0
    assert [r[:2] + r[3:4] for r in cos.rows] == [["eval_semantic_duplicate", 2, 2],
                                                   ["eval_caption_duplicate", len(by_caption), len(by_caption)]]
    assert cos.rows[1][4] == "1.000"
    with pytest.raises(ConfigError, match="eval_text_threshold"):
        config_mod.resolve({"semdedup": {"eval_text_threshold": 1.5}})


def test_image_mode_encodes_no_pool_caption_unless_a_row_is_dropped_by_an_eval_rule(world, network, tmp_path,
                                                                                     content_vectors, monkeypatch):
    from trainer import score as score_mod

    encoded = []
    real = score_mod.Scorer.encode_texts
    monkeypatch.setattr(score_mod.Scorer, "encode_texts", lambda self, t: encoded.extend(t) or real(self, t))
    table, _ = _planted(world)
    imgs, texts = table.column("image").to_pylist(), table.column("text").to_pylist()
    pool = _write(table, tmp_path / "in", 2)
    eval_dir = tmp_path / "evalset"
    eval_dir.mkdir()
    (eval_dir / "c.jpg").write_bytes(imgs[30] + b"\0")  # no row's image
    (eval_dir / "c.txt").write_text("an eval caption")
    run_pipeline(["semdedup"], str(tmp_path / "a"), _cfg(network, mode="image", eval_images=str(eval_dir)),
                 input_dir=str(pool), workers=0)
    assert encoded == ["an eval caption"]  # the eval set's, once; no pool caption
    encoded.clear()
    (eval_dir / "a.jpg").write_bytes(imgs[20])  # now a row's image: its shard's captions are read for its cosine
    (eval_dir / "a.txt").write_text(texts[20])
    run_pipeline(["semdedup"], str(tmp_path / "b"), _cfg(network, mode="image", eval_images=str(eval_dir)),
                 input_dir=str(pool), workers=0)
    assert texts[20] in encoded[2:] and len(encoded) < 2 + len(texts)  # eval captions, then one shard's
