"""Filter quality against the truth (pipeline/truth.py) on a hand-made run folder, figures computed by hand."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline import shards
from pipeline.truth import drops, filter_quality


def _shard(path, uids, reasons=None):
    cols = {"uid": pa.array(uids, pa.string())}
    if reasons is not None:
        cols["reason"] = pa.array(reasons, pa.string())
    shards.write_shard(pa.table(cols), str(path))


@pytest.fixture
def run(tmp_path):
    """10 rows: 6 clean (c0..c5), 2 boilerplate (b0, b1), 1 tiny image (s0), 1 broken URL (h0).
    00_ingest drops h0 (404) and c5 (a clean row lost to a timeout); 01_align drops b0, b1 (boilerplate), s0 and
    c4; 02_dfn drops c3 and lists b1 again (a row is counted at its first drop); c0..c2 reach the end; the truth
    also holds x0, which no step reports (unaccounted)."""
    truth = {"c0": "clean", "c1": "clean", "c2": "clean", "c3": "clean", "c4": "clean", "c5": "clean",
             "b0": "boilerplate", "b1": "boilerplate", "s0": "small_image", "h0": "http_404", "x0": "http_404"}
    shards.write_shard(pa.table({"uid": list(truth), "kind": list(truth.values()), "shape": [""] * len(truth)}),
                       str(tmp_path / "truth.parquet"))
    r = tmp_path / "runs" / "r"
    _shard(r / "00_ingest" / "part-00000.parquet", ["c0", "c1", "c2", "c3", "c4", "b0", "b1", "s0"])
    _shard(r / "00_ingest" / "rejected" / "part-00000.parquet", ["h0", "c5"],
           ["failed_to_download: HTTP Error 404: Not Found", "failed_to_download: timed out"])
    _shard(r / "01_align" / "part-00000.parquet", ["c0", "c1", "c2", "c3"])
    _shard(r / "01_align" / "rejected" / "part-00000.parquet", ["b0", "b1", "s0", "c4"],
           ["text_many_images", "text_many_images", "small_image", "near_duplicate"])
    _shard(r / "02_dfn" / "part-00000.parquet", ["c0", "c1", "c2"])
    _shard(r / "02_dfn" / "rejected" / "part-00000.parquet", ["c3", "b1"], ["dfn_low_score", "dfn_low_score"])
    steps = [(name, str(r / folder)) for name, folder in (("ingest", "00_ingest"), ("align", "01_align"),
                                                           ("dfn", "02_dfn"))]
    return r, tmp_path / "truth.parquet", steps


def test_a_row_counts_at_its_first_drop_with_its_reason_category(run):
    _, _, steps = run
    d = drops(steps)
    assert d.height == 7
    assert dict(zip(d["uid"], d["step"]))["b1"] == "align"  # not dfn's later listing
    assert dict(zip(d["uid"], d["reason"]))["h0"] == "failed_to_download"


def test_recall_precision_and_clean_lost_by_hand(run):
    r, truth, steps = run
    q = filter_quality(str(r), str(truth), steps)
    assert q["rows"] == 11 and q["kept"] == 3
    assert q["recall"]["boilerplate"] == {"rows": 2, "dropped": 2, "recall": 1.0, "by_step": {"align": 2}}
    assert q["recall"]["http_404"]["recall"] == 0.5  # x0: never reported by any step
    assert q["recall"]["http_404"]["by_step"] == {"ingest": 1, "unaccounted": 1}
    assert q["recall"]["clean"]["dropped"] == 3  # c5, c4, c3
    # precision: ingest dropped h0 (noise) and c5 (clean); align b0 b1 s0 (noise) and c4; dfn c3 only
    assert q["precision"]["ingest"]["precision"] == 0.5
    assert q["precision"]["align"]["precision"] == 0.75
    assert q["precision"]["align"]["by_reason"] == {"text_many_images": 2, "small_image": 1, "near_duplicate": 1}
    assert q["precision"]["dfn"] == {"dropped": 1, "noise": 0, "precision": 0.0, "by_reason": {"dfn_low_score": 1}}
    assert q["clean_lost"]["clean_rows"] == 6 and q["clean_lost"]["lost"] == 3 and q["clean_lost"]["share"] == 0.5
    assert q["clean_lost"]["by_step_reason"] == [
        {"step": "ingest", "reason": "failed_to_download", "rows": 1},
        {"step": "align", "reason": "near_duplicate", "rows": 1},
        {"step": "dfn", "reason": "dfn_low_score", "rows": 1}]


def test_a_duplicate_group_is_caught_whichever_copy_is_kept(tmp_path):
    """Group g1: original o1 (clean) dropped as a duplicate, its copy d1 kept: the run caught the duplicate, so d1
    counts as the clean row and o1 as the duplicate. Group g2: original and copy both kept: a missed duplicate.
    Group g3: the copy dropped, the original kept: plain."""
    truth = [("o1", "clean", "o1"), ("d1", "exact_duplicate", "o1"), ("o2", "clean", "o2"),
             ("d2", "near_duplicate", "o2"), ("o3", "clean", "o3"), ("d3", "exact_duplicate", "o3"),
             ("c0", "clean", None)]
    shards.write_shard(pa.table({"uid": [t[0] for t in truth], "kind": [t[1] for t in truth],
                                 "dup_group": pa.array([t[2] for t in truth], pa.string())}), str(tmp_path / "t.parquet"))
    r = tmp_path / "run"
    _shard(r / "01_align" / "part-00000.parquet", ["d1", "o2", "d2", "o3", "c0"])
    _shard(r / "01_align" / "rejected" / "part-00000.parquet", ["o1", "d3"], ["exact_duplicate", "exact_duplicate"])
    q = filter_quality(str(r), str(tmp_path / "t.parquet"), [("align", str(r / "01_align"))])
    assert q["stand_ins"] == 1
    assert q["recall"]["exact_duplicate"] == {"rows": 2, "dropped": 2, "recall": 1.0, "by_step": {"align": 2}}
    assert q["recall"]["near_duplicate"]["recall"] == 0.0  # d2 kept beside o2
    assert q["clean_lost"]["lost"] == 0 and q["precision"]["align"]["precision"] == 1.0
