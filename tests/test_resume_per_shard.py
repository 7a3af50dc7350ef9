"""Resume per shard (#32, item 5: "every later step redoes only what changed"): an input shard rewritten (a retried
download) redoes its own shard, the shards whose answer from the pool-wide statistics it changed, and the same
shards in the steps after it: never the whole step. Whatever is redone, the outputs are those of a run from
scratch over the final pool."""

from __future__ import annotations

import os

import polars as pl
import pyarrow as pa
import pytest

from pipeline import config as config_mod
from pipeline import executors, resume, shards
from pipeline.runner import run_stage
from tests.stages_for_tests import FirstWordStage, ShuffledFirstWordStage, make_pool

KEEP = "tests.stages_for_tests:KeepShareStage"  # no statistics
SHUFFLED = "tests.stages_for_tests:ShuffledFirstWordStage"  # shuffled statistics: an answer per shard
REDUCED = "tests.stages_for_tests:FirstWordStage"  # reduced statistics: every shard reads all of them


def _marks(folder: str) -> dict[str, tuple]:
    """Each done-marker's inode and mtime: a marker is rewritten (a new file, renamed in) exactly when its shard
    is redone."""
    out = {}
    for name in sorted(os.listdir(os.path.join(folder, "_done"))):
        st = os.stat(os.path.join(folder, "_done", name))
        out[name.removesuffix(".json")] = (st.st_ino, st.st_mtime_ns)
    return out


def _redone(before: dict, after: dict) -> set[str]:
    return {k for k in after if before.get(k) != after[k]}


def _rows(folder: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    kept = pl.concat([pl.read_parquet(p) for p in shards.list_shards(folder)]).sort("uid")
    rej = pl.concat([pl.read_parquet(p) for p in shards.list_shards(os.path.join(folder, "rejected"))],
                    how="diagonal_relaxed").sort("uid")
    return kept, rej


def _set_text(path: str, row: int, text: str) -> None:
    t = pa.parquet.read_table(path)
    texts = t.column("text").to_pylist()
    texts[row] = text
    shards.write_shard(t.set_column(t.column_names.index("text"), "text", pa.array(texts)), path)


def _run(step: str, run, src: str, upstream_is_stage: bool = False, cfg: dict | None = None):
    return run_stage(step, str(run), src, config_mod.resolve(cfg or {}), executors.InProcessExecutor(),
                     upstream_is_stage=upstream_is_stage)


def _same_as_from_scratch(tmp_path, pool: str, steps: list[str], results: list, cfg: dict | None = None) -> None:
    fresh = tmp_path / "runs" / "fresh"
    shards.remove(str(fresh))  # from scratch every time: a second call must not resume the first's run
    src, upstream = pool, False
    for step, res in zip(steps, results):
        again = _run(step, fresh, src, upstream, cfg)
        for a, b in zip(_rows(res.folder), _rows(again.folder)):
            assert a.equals(b)
        src, upstream = again.folder, True


def test_a_rewritten_input_redoes_its_shard_and_the_shards_whose_answer_it_changed(tmp_path):
    pool = str(tmp_path / "pool")
    paths = make_pool(80, 4, pool)
    # shard 0 holds the only "solo" text: rare until shard 3 gets one too
    _set_text(paths[0], 0, "solo a b c #0")
    run = tmp_path / "runs" / "r"
    first = _run(SHUFFLED, run, pool)
    second = _run(KEEP, run, first.folder, upstream_is_stage=True)
    assert first.manifest["reasons"]["rare_first_word"] >= 1
    m1, m2 = _marks(first.folder), _marks(second.folder)

    # (a) a row of shard 2 changes, but no first word's count: shard 2 alone is redone, in both steps
    t = pa.parquet.read_table(paths[2]).column("text").to_pylist()
    _set_text(paths[2], 3, t[3] + " changed")
    ShuffledFirstWordStage.collected.clear()
    a1 = _run(SHUFFLED, run, pool)
    assert ShuffledFirstWordStage.collected == ["part-00002.parquet"]  # pass 1 took the other partials it kept
    a2 = _run(KEEP, run, a1.folder, upstream_is_stage=True)
    assert _redone(m1, _marks(a1.folder)) == {"part-00002.parquet"}
    assert _redone(m2, _marks(a2.folder)) == {"part-00002.parquet"}
    _same_as_from_scratch(tmp_path, pool, [SHUFFLED, KEEP], [a1, a2])

    # (b) shard 3 gains a second "solo": shard 0's answer changes (its "solo" row is kept now), so 0 and 3 are
    # redone, 1 and 2 are not; the step after redoes the same two
    m1, m2 = _marks(a1.folder), _marks(a2.folder)
    _set_text(paths[3], 5, "solo x y z #65")
    ShuffledFirstWordStage.collected.clear()
    b1 = _run(SHUFFLED, run, pool)
    assert ShuffledFirstWordStage.collected == ["part-00003.parquet"]
    b2 = _run(KEEP, run, b1.folder, upstream_is_stage=True)
    assert _redone(m1, _marks(b1.folder)) == {"part-00000.parquet", "part-00003.parquet"}
    assert _redone(m2, _marks(b2.folder)) == {"part-00000.parquet", "part-00003.parquet"}
    kept, _ = _rows(b1.folder)
    assert kept.filter(pl.col("text").str.starts_with("solo ")).height == 2
    _same_as_from_scratch(tmp_path, pool, [SHUFFLED, KEEP], [b1, b2])

    # (c) nothing changed: nothing redone, statistics reused
    m1, m2 = _marks(b1.folder), _marks(b2.folder)
    stats_mark = os.stat(resume.stats_marker(b1.folder)).st_mtime_ns
    ShuffledFirstWordStage.collected.clear()
    c1 = _run(SHUFFLED, run, pool)
    c2 = _run(KEEP, run, c1.folder, upstream_is_stage=True)
    assert _marks(c1.folder) == m1 and _marks(c2.folder) == m2
    assert ShuffledFirstWordStage.collected == []  # the statistics were reused: no collect, not even a kept one
    assert os.stat(resume.stats_marker(c1.folder)).st_mtime_ns == stats_mark


def test_a_shard_to_redo_after_the_answers_were_removed_gets_them_again(tmp_path):
    """The shuffle's answers are removed once every shard is applied; a shard whose output is lost later is
    redone from answers made again from the same statistics, with the same result."""
    pool = str(tmp_path / "pool")
    make_pool(60, 3, pool)
    run = tmp_path / "runs" / "r"
    first = _run(SHUFFLED, run, pool)
    before = _rows(first.folder)
    assert not os.path.exists(os.path.join(first.folder, "_shuffle"))
    os.remove(os.path.join(first.folder, "part-00001.parquet"))
    m = _marks(first.folder)
    again = _run(SHUFFLED, run, pool)
    assert _redone(m, _marks(again.folder)) == {"part-00001.parquet"}
    for a, b in zip(before, _rows(again.folder)):
        assert a.equals(b)


@pytest.mark.parametrize("counts_change", [False, True])
def test_reduced_statistics_redo_every_shard_only_when_they_change(tmp_path, counts_change):
    """A stage whose every apply reads the whole statistics (FirstWordStage's counts): a rewritten shard that
    leaves them as they were redoes that shard alone; one that changes them redoes every shard."""
    pool = str(tmp_path / "pool")
    paths = make_pool(80, 4, pool)
    run = tmp_path / "runs" / "r"
    first = _run(REDUCED, run, pool)
    m = _marks(first.folder)
    t = pa.parquet.read_table(paths[1]).column("text").to_pylist()
    _set_text(paths[1], 2, "brandnew q r s #22" if counts_change else t[2] + " changed")
    FirstWordStage.collected.clear()
    again = _run(REDUCED, run, pool)
    assert FirstWordStage.collected == ["part-00001.parquet"]  # the other partials were kept
    want = set(m) if counts_change else {"part-00001.parquet"}
    assert _redone(m, _marks(again.folder)) == want
    _same_as_from_scratch(tmp_path, pool, [REDUCED], [again])


def test_markers_carry_a_fingerprint_per_shard_and_the_manifest_the_steps(tmp_path):
    pool = str(tmp_path / "pool")
    make_pool(40, 2, pool)
    res = _run(SHUFFLED, tmp_path / "runs" / "r", pool)
    fps = [resume.read_done(res.folder, s["shard"])["fingerprint"] for s in res.manifest["shards"]]
    assert len(set(fps)) == 2 and res.manifest["fingerprint"] not in fps
    keys = shards.read_json(resume.stats_marker(res.folder))[resume.APPLY_KEYS]
    assert set(keys) == {s["shard"] for s in res.manifest["shards"]}


def test_kept_partials_follow_the_pool(tmp_path):
    """A kept partial is taken back only under its key: another config collects every shard again; a shard gone
    from the input takes its partial with it; a partial whose file was cut short is collected again."""
    pool = str(tmp_path / "pool")
    paths = make_pool(60, 3, pool)
    run = tmp_path / "runs" / "r"
    res = _run(SHUFFLED, run, pool)
    kept = os.path.join(res.folder, "_partials")
    assert sorted(os.listdir(kept)) == sorted(f"part-0000{i}.parquet{e}" for i in range(3) for e in (".bundle", ".json"))
    ShuffledFirstWordStage.collected.clear()
    _run(SHUFFLED, run, pool, cfg={SHUFFLED: {"min_count": 3}})
    assert sorted(ShuffledFirstWordStage.collected) == [f"part-0000{i}.parquet" for i in range(3)]
    os.remove(paths[2])
    with open(os.path.join(kept, "part-00001.parquet.bundle"), "r+b") as f:
        f.truncate(10)
    _set_text(paths[0], 1, "changed a b c #1")
    ShuffledFirstWordStage.collected.clear()
    res = _run(SHUFFLED, run, pool, cfg={SHUFFLED: {"min_count": 3}})
    assert sorted(ShuffledFirstWordStage.collected) == ["part-00000.parquet", "part-00001.parquet"]
    assert not any(n.startswith("part-00002") for n in os.listdir(kept))
    _same_as_from_scratch(tmp_path, pool, [SHUFFLED], [res], cfg={SHUFFLED: {"min_count": 3}})


def test_a_kept_partial_whose_bytes_changed_is_collected_again(tmp_path):
    """Same size, other bytes (a bit flipped on disk): the partial is not trusted, the shard is collected again,
    and the result is a run from scratch's."""
    pool = str(tmp_path / "pool")
    paths = make_pool(60, 3, pool)
    run = tmp_path / "runs" / "r"
    _run(SHUFFLED, run, pool)
    bundle = os.path.join(run, "90_shuffledfirstword", "_partials", "part-00001.parquet.bundle")
    data = bytearray(open(bundle, "rb").read())
    data[-3] ^= 0xFF
    open(bundle, "wb").write(bytes(data))
    _set_text(paths[0], 1, "changed a b c #1")  # an input changes: the statistics are recomputed
    ShuffledFirstWordStage.collected.clear()
    res = _run(SHUFFLED, run, pool)
    assert sorted(ShuffledFirstWordStage.collected) == ["part-00000.parquet", "part-00001.parquet"]
    _same_as_from_scratch(tmp_path, pool, [SHUFFLED], [res])
