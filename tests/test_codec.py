"""pipeline.codec: statistics, shuffle pieces and answers are data, never pickles (a run folder on shared storage
must not be a way to run code in the workers)."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from pipeline import codec
from pipeline import config as config_mod
from pipeline.runner import run_pipeline
from pipeline.errors import StageError
from stages.align import AlignAnswer, AlignStats
from tests.stages_for_tests import make_pool


def test_round_trip_keeps_types_and_values():
    u = pl.UInt64
    stats = AlignStats(
        pl.DataFrame({"tok": np.array([1, 2**64 - 1], np.uint64), "n": np.array([3, 4], np.uint64)}),
        pl.DataFrame(schema={"pair": u, "image": u, "text": u, "uid_min": u, "n": u}),
        pl.DataFrame({"key": np.array([7], np.uint64), "uid_min": np.array([0], np.uint64), "n": np.array([2], np.uint64)}),
        {"rows": 5, "image_rows": 0},
    )
    obj = {
        "stats": stats, "answer": AlignAnswer({"token_n": (np.arange(3, dtype=np.uint64), np.ones(3, np.uint64))}, {"rows": 1}),
        "nums": (1, 2.5, float("nan"), float("-inf"), None, True, "x"), "list": [np.zeros((2, 3), np.float32)],
        "strs": np.array(["en", "", "de"], dtype=object), "table": pa.table({"a": [1, None]}), "empty": {},
    }
    back = codec.decode(codec.encode(obj))
    assert back["stats"].tokens.equals(stats.tokens) and back["stats"].tokens.schema == stats.tokens.schema
    assert back["stats"].pairs.schema == stats.pairs.schema and back["stats"].pairs.height == 0
    assert back["stats"].meta == stats.meta and back["stats"].texts is None and back["stats"]._cache == {}
    k, v = back["answer"].tables["token_n"]
    assert k.dtype == np.uint64 and k.tolist() == [0, 1, 2] and back["answer"].meta == {"rows": 1}
    n = back["nums"]
    assert isinstance(n, tuple) and n[:2] == (1, 2.5) and np.isnan(n[2]) and n[3] == float("-inf") and n[4:] == (None, True, "x")
    assert back["list"][0].dtype == np.float32 and back["list"][0].shape == (2, 3)
    assert back["strs"].tolist() == ["en", "", "de"] and back["table"].equals(obj["table"]) and back["empty"] == {}


def test_refuses_what_it_did_not_write():
    @dataclasses.dataclass
    class NotRegistered:
        x: int = 1

    with pytest.raises(TypeError, match="not registered"):
        codec.encode(NotRegistered())
    with pytest.raises(TypeError, match="cannot write a set"):
        codec.encode({"s": {1, 2}})
    with pytest.raises(codec.CodecError, match="not a clipcurate data record"):
        codec.decode(pickle.dumps({"a": 1}))
    forged = codec.encode(AlignAnswer({}, {})).replace(b"stages.align.AlignAnswer", b"os.system.AlignAnswe")
    with pytest.raises(codec.CodecError, match="not a registered record"):
        codec.decode(forged)


class _Boom:
    """Unpickling this writes a marker file: the proof that a planted pickle ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_run_reads_no_pickle_and_a_planted_one_never_runs(tmp_path, monkeypatch):
    """align (statistics shuffled into partitions: pieces and answers), metaclip, klite and a stage with the
    default save_stats, in one process with every pickle reader disabled; then pickles planted where the old
    files were are ignored on a rerun."""
    def no_pickle(*a, **k):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    pool = tmp_path / "pool"
    make_pool(300, 4, str(pool))
    entries = tmp_path / "entries.txt"
    entries.write_text("w1\nw2\nw3\n")
    cfg = config_mod.resolve({"run": {"stats_shards_per_partition": 2}, "align": {"min_words": 1, "min_token_count": 0},
                              "metaclip": {"entries": str(entries), "t": 20}})
    run = tmp_path / "run"
    res = run_pipeline(["align", "metaclip", "klite"], str(run), cfg, input_dir=str(pool), workers=0)
    assert [r.manifest["rows_in"] for r in res][0] == 300
    assert list((run / "01_align" / "stats").glob("p*")), "align shuffled its statistics"
    (own,) = run_pipeline(["tests.stages_for_tests:FirstWordStage"], str(tmp_path / "own"), cfg, input_dir=str(pool),
                          workers=0)
    assert (Path(own.folder) / "stats" / "stats.data").exists()
    files = [p for p in run.rglob("*") if p.is_file()] + [p for p in Path(own.folder).rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pkl", ".pickle")]
    assert not [p for p in files if p.read_bytes()[:1] == b"\x80"]  # no pickle (protocol 2+ header) anywhere

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Boom(str(marker)))
    for d in (run / "02_metaclip" / "stats", Path(own.folder) / "stats"):
        (d / "stats.pkl").write_bytes(payload)
    monkeypatch.undo()
    import shutil

    for d in (run / "02_metaclip", Path(own.folder)):  # apply must run again, and read the statistics
        shutil.rmtree(d / "_done")
        (d / "_manifest.json").unlink()
    again = run_pipeline(["align", "metaclip", "klite"], str(run), cfg, input_dir=str(pool), workers=0)
    (own2,) = run_pipeline(["tests.stages_for_tests:FirstWordStage"], str(tmp_path / "own"), cfg, input_dir=str(pool),
                           workers=0)
    assert not marker.exists()
    assert [r.manifest["rows_out"] for r in again] == [r.manifest["rows_out"] for r in res]
    assert own2.manifest["rows_out"] == own.manifest["rows_out"]


def test_stats_that_are_not_data_are_a_one_line_error(tmp_path):
    from tests.stages_for_tests import FirstWordStage

    class SetStats(FirstWordStage):
        def merge(self, partials):
            return set(super().merge(partials))

    with pytest.raises(StageError, match="its statistics must be data"):
        SetStats({}).save_stats({1, 2}, str(tmp_path))
