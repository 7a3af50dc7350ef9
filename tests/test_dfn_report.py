"""dfn's report where no threshold was set (keep_fraction alone, or score_only): the histogram with the cut, and
the share of the scored pool each candidate threshold keeps, counted exactly from the scores, beside what DFN and
DataComp keep. Stage folders are built by hand (kept shards, rejected/ with reasons, stats/cut.json): no model."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import shards
from pipeline.schema import compute_uid
from pipeline.score_cuts import candidates, round_values, threshold_for_share
from stages.dfn import DfnStage

N = 2000


def _uids(n: int, tag: str) -> list[str]:
    return compute_uid(pa.array([f"http://x.invalid/{tag}/{i}" for i in range(n)]), pa.array(["t"] * n)).to_pylist()


def _rows(scores, tag: str, reason: str | None = None) -> pa.Table:
    s = np.asarray(scores, dtype=np.float32)
    t = pa.table({"uid": pa.array(_uids(len(s), tag), pa.string()), "text": pa.array(["t"] * len(s), pa.string()),
                  "dfn_score": pa.array(s, pa.float32(), mask=~np.isfinite(s))})
    return t if reason is None else t.append_column("reason", pa.array([reason] * len(s), pa.string()))


def _stage_folder(root, kept, dropped, cut: dict | None, unscored: int = 3, n_shards: int = 2) -> str:
    """A dfn stage folder as the runner writes it: kept rows in part-*.parquet, rejected rows (dfn_low_score
    with their score, no_image with none) in rejected/, the keep rule in stats/cut.json."""
    d = str(root)
    kept_t = _rows(kept, "k")
    rej_t = pa.concat_tables([_rows(dropped, "d", "dfn_low_score"), _rows([np.nan] * unscored, "n", "no_image")])
    for i in range(n_shards):
        for t, folder in ((kept_t, d), (rej_t, os.path.join(d, "rejected"))):
            a, b = i * t.num_rows // n_shards, (i + 1) * t.num_rows // n_shards
            shards.write_shard(t.slice(a, b - a), os.path.join(folder, f"part-{i:05d}.parquet"))
    if cut is not None:
        shards.write_json(cut, os.path.join(d, "stats", "cut.json"))
    return d


def _fraction_pool(keep_fraction: float = 0.3, seed: int = 1):
    """N float32 scores, the top keep_fraction kept (as dfn's fraction cut does, up to its boundary bin)."""
    s = np.random.default_rng(seed).normal(0.25, 0.06, N).astype(np.float32)
    desc = np.sort(s)[::-1]
    want = int(round(keep_fraction * N))
    cut = {"mode": "fraction", "keep_fraction": keep_fraction, "scored": N, "unscored": 3, "wanted": want,
           "bin": 12345, "q": 0.5, "threshold": float(desc[want - 1])}
    return s, desc[:want], desc[want:], cut


def _reference(s: np.ndarray, share: float) -> tuple[str, int]:
    """By hand: the k-th highest score rounded down to 4 decimals, and how many scores are >= it."""
    k = int(round(share * len(s)))
    x = float(np.sort(s.astype(np.float64))[::-1][k - 1])
    t = np.floor(x * 1e4) / 1e4
    return f"{t:.4f}", int((s.astype(np.float64) >= float(f"{t:.4f}")).sum())


def _by_threshold(table) -> dict[str, list]:
    return {r[0]: r for r in table.rows}


# ---- keep_fraction alone: the candidates --------------------------------------------------------------------
def test_fraction_cut_offers_thresholds_with_exact_shares_and_the_fields_shares(tmp_path):
    s, kept, dropped, cut = _fraction_pool(0.3)
    d = _stage_folder(tmp_path / "04_dfn", kept, dropped, cut)
    rep = DfnStage({"keep_fraction": 0.3}).report(d, str(tmp_path / "report"))
    rule, cand = rep["tables"]
    assert rule.rows[0][:3] == [N, len(kept), len(dropped)] and rule.rows[0][5] == "fraction"
    assert rule.rows[0][4] == f"{cut['threshold']:.4f}"
    # the note: what DFN and DataComp keep, in the table's title and beside their rows
    assert "DFN keeps 10–30% of a raw web pool" in cand.title and "DataComp's CLIP-score baseline keeps the top 30%" in cand.title
    rows = _by_threshold(cand)
    for share, must in ((0.1, ["DFN keeps 10–30%", "2309.17425"]), (0.2, ["top 20%"]), (0.5, ["top 50%"]),
                        (0.3, ["DataComp's CLIP-score baseline", "ViT-L/14", "2304.14108", "this run's keep_fraction"])):
        t, n_kept = _reference(s, share)
        assert t in rows, (share, t, list(rows))
        assert rows[t][1] == n_kept and rows[t][2] == f"{100 * n_kept / N:.2f}%"
        assert abs(n_kept / N - share) < 0.005  # at most a few rows between the rounded value and the k-th score
        assert all(m in rows[t][3] for m in must), rows[t]
    # round cosines in the pool's range, each counted from the scores
    s64 = s.astype(np.float64)
    for v in ("0.2000", "0.2500", "0.2800", "0.3000"):
        assert rows[v][1] == int((s64 >= float(v)).sum()) and rows[v][3] == "round value"
    # every row: exactly the scores at or above the printed threshold; highest threshold first
    assert all(r[1] == int((s64 >= float(r[0])).sum()) for r in cand.rows)
    assert [float(r[0]) for r in cand.rows] == sorted((float(r[0]) for r in cand.rows), reverse=True)
    [(title, png)] = rep["figures"]
    assert "kept vs dropped" in title and os.path.getsize(png) > 5000


def test_a_copied_threshold_keeps_what_the_table_says(tmp_path, monkeypatch):
    """The printed threshold is what a user copies into [dfn] threshold: dfn's threshold mode keeps the
    table's count."""
    s, kept, dropped, cut = _fraction_pool(0.2, seed=4)
    d = _stage_folder(tmp_path / "04_dfn", kept, dropped, cut)
    cand = DfnStage({"keep_fraction": 0.2}).report(d, str(tmp_path / "report"))["tables"][1]
    pool = pa.table({"uid": _uids(N, "p"), "text": ["t"] * N, "image": pa.array([b"x"] * N, pa.binary()), "s": s})
    monkeypatch.setattr(DfnStage, "score_rows", lambda self, table, ctx=None: (
        table.column("s").to_numpy().astype(np.float32), pc.is_valid(table.column("image")).to_numpy(), 0))
    for t, n_kept, _, _ in cand.rows:
        k, _ = DfnStage({"threshold": float(t)}).apply(pool, {})
        assert k.num_rows == n_kept, t


def test_keep_fraction_outside_the_offered_shares_gets_its_own_row(tmp_path):
    s, kept, dropped, cut = _fraction_pool(0.15)
    d = _stage_folder(tmp_path / "04_dfn", kept, dropped, cut)
    cand = DfnStage({"keep_fraction": 0.15}).report(d, str(tmp_path / "report"))["tables"][1]
    t, n_kept = _reference(s, 0.15)
    row = _by_threshold(cand)[t]
    assert row[1] == n_kept and row[3] == "top 15%: this run's keep_fraction"


# ---- score_only: nothing cut, metaclip's min_score is chosen here ---------------------------------------------
@pytest.mark.parametrize("config", [{"score_only": True}, {}], ids=["score_only_config", "read_from_the_data"])
def test_score_only_output_offers_thresholds_and_draws_no_cut(tmp_path, config):
    s = np.random.default_rng(2).normal(0.1, 0.03, N).astype(np.float32)
    cut = {"mode": "fraction", "keep_fraction": 0.3, "scored": N, "unscored": 3, "wanted": 600, "bin": 1, "q": 0.1,
           "threshold": 0.11}
    d = _stage_folder(tmp_path / "04_dfn", s, [], cut)  # every scored row kept: no dfn_low_score
    rep = DfnStage(config).report(d, str(tmp_path / "report"))
    rule, cand = rep["tables"]
    assert rule.rows[0][:3] == [N, N, 0] and rule.rows[0][4] == "" and rule.rows[0][5] == "score_only (nothing cut)"
    rows = _by_threshold(cand)
    for share in (0.1, 0.2, 0.3, 0.5):
        t, n_kept = _reference(s, share)
        assert rows[t][1] == n_kept
    assert not any("keep_fraction" in r[3] for r in cand.rows)  # nothing was cut at keep_fraction
    # scores around 0.1: the round values are a grid inside the pool's range (the CLIP cosines are outside it)
    grid = [r for r in cand.rows if r[3] == "round value"]
    assert 2 <= len(grid) <= 6 and all(0.03 < float(r[0]) < 0.17 for r in grid)
    [(title, png)] = rep["figures"]
    assert "score_only" in title and os.path.getsize(png) > 5000


def test_a_threshold_cut_offers_no_candidates(tmp_path):
    s, kept, dropped, _ = _fraction_pool(0.3)
    cut = {"mode": "threshold", "threshold": float(kept.min()), "scored": N, "unscored": 3, "keep_fraction": 0.3}
    d = _stage_folder(tmp_path / "04_dfn", kept, dropped, cut)
    rep = DfnStage({"threshold": float(kept.min())}).report(d, str(tmp_path / "report"))
    assert [t.title for t in rep["tables"]] == ["dfn keep rule"] and rep["tables"][0].rows[0][5] == "threshold"
    assert len(rep["figures"]) == 1


# ---- folders with little or nothing in them --------------------------------------------------------------------
def _edge(tmp_path, case: str) -> str:
    d = tmp_path / "04_dfn"
    if case == "no_folder":
        return str(d)
    if case == "no_shards":
        (d / "stats").mkdir(parents=True)
        return str(d)
    if case == "no_rows":
        return _stage_folder(d, [], [], {"mode": "fraction", "keep_fraction": 0.3, "scored": 0, "unscored": 0,
                                         "wanted": 0, "bin": 20001, "q": 0.0, "threshold": 1.0}, unscored=0)
    if case == "all_nan":
        return _stage_folder(d, [], [], {"mode": "fraction", "keep_fraction": 0.3, "scored": 0, "unscored": 5,
                                         "wanted": 0, "bin": 20001, "q": 0.0, "threshold": 1.0}, unscored=5)
    if case == "null_scores_kept":  # a score_only-like folder whose kept rows hold no score
        return _stage_folder(d, [np.nan] * 4, [], None)
    if case == "no_cut_json":
        s, kept, dropped, _ = _fraction_pool(0.3)
        return _stage_folder(d, kept, dropped, None)
    if case == "no_score_column":
        shards.write_shard(pa.table({"uid": _uids(3, "x"), "text": ["a"] * 3}), str(d / "part-00000.parquet"))
        shards.write_shard(pa.table({"uid": _uids(2, "y"), "dfn_score": pa.array([0.1, 0.2], pa.float32())}),
                           str(d / "rejected" / "part-00000.parquet"))  # no reason column
        shards.write_json({"mode": "fraction"}, str(d / "stats" / "cut.json"))
        return str(d)
    if case == "one_row":
        return _stage_folder(d, [0.31], [], {"mode": "fraction", "keep_fraction": 0.3, "scored": 1, "unscored": 0,
                                             "wanted": 0, "bin": 20001, "q": 0.0, "threshold": 1.0}, n_shards=1)
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no_folder", "no_shards", "no_rows", "all_nan", "null_scores_kept", "no_cut_json",
                                  "no_score_column", "one_row"])
def test_empty_and_odd_folders_do_not_crash(tmp_path, case):
    d = _edge(tmp_path, case)
    rep = DfnStage().report(d, str(tmp_path / "report"))
    rule = rep["tables"][0]
    scored = rule.rows[0][0]
    markdown = "\n".join(t.markdown() for t in rep["tables"])  # every table renders
    assert "nan" not in markdown.lower()
    if case == "no_cut_json":  # no keep rule recorded, no threshold configured: a fraction cut's candidates
        assert scored == N and len(rep["tables"]) == 2 and rep["figures"]
    elif case == "one_row":  # every offered share of one row rounds to no row: the round value 0.31 alone
        assert scored == 1 and rep["tables"][1].rows[0][:3] == ["0.3100", 1, "100.00%"]
    else:
        assert scored == 0 and rep["figures"] == [] and len(rep["tables"]) == 1


# ---- pipeline/score_cuts.py on its own --------------------------------------------------------------------------
def test_threshold_for_share_rounds_down_and_keeps_at_least_the_share():
    asc = np.sort(np.array([0.1, 0.2, 0.25, 0.30004, 0.35, 0.40007, 0.5, 0.6, 0.7, 0.8], np.float32).astype(np.float64))
    assert threshold_for_share(asc, 0.3) == 0.6  # the 3rd highest, 0.6 in float32 = 0.60000002
    assert threshold_for_share(asc, 0.5) == 0.4  # 0.40007 rounded down
    assert threshold_for_share(asc, 0.04) is None  # round(0.4) = 0 rows: no threshold keeps them
    assert threshold_for_share(np.zeros(0), 0.3) is None
    for share in np.linspace(0.05, 1.0, 20):
        t = threshold_for_share(asc, share)
        if t is not None:
            assert (asc >= t).sum() >= round(share * len(asc))
    # a score just below a round value: the threshold goes below it, never above
    x = np.array([np.nextafter(0.3, 0.0)])
    assert threshold_for_share(x, 1.0) == 0.2999


def test_ties_and_merged_rows():
    s = np.array([0.2] * 6 + [0.3] * 4, np.float32)
    cs = candidates(s, {0.1: "a", 0.3: "b", 0.5: "c"}, {0.3: "round value"})
    # 0.1 and 0.3 land on the tied 0.3 (rounded down from float32 0.3 = 0.30000001): one row, all notes
    assert [(c.printed(), c.kept, c.notes) for c in cs] == [("0.3000", 4, ("a", "b", "round value")),
                                                          ("0.2000", 10, ("c",))]
    assert candidates([np.nan, np.inf], {0.1: "a"}, {}) == []
    # a score exactly at the threshold is kept (score >= threshold, as [dfn] threshold and [metaclip] min_score)
    [c] = candidates(np.array([0.25, 0.25, 0.5, np.nan]), {}, {0.25: "round value"})
    assert (c.kept, c.share) == (3, 1.0)


def test_round_values_choose_a_grid_inside_the_range():
    asc = np.linspace(0.0, 0.5, 1001)
    assert round_values(asc, ()) == [0.1, 0.2, 0.3, 0.4]  # 0.01..0.99 quantiles: 0.005..0.495; step 0.1
    assert round_values(asc, (0.28,)) == [0.1, 0.2, 0.28, 0.3, 0.4]
    assert round_values(np.linspace(0.02, 0.09, 100), (0.2,)) == [0.03, 0.04, 0.05, 0.06, 0.07, 0.08]
    assert round_values(np.linspace(0.02, 0.1, 100), (0.2,)) == [0.04, 0.06, 0.08]  # 7 hundredths: step 0.02
    assert round_values(np.zeros(0), (0.2,)) == []
    assert round_values(np.full(5, 0.25), (0.25,)) == [0.25]
    assert round_values(np.array([0.31], np.float32).astype(np.float64), ()) == [0.31]  # 0.31000000238 in float32


# ---- the whole report ----------------------------------------------------------------------------------------
def test_the_run_report_renders_the_candidates(tmp_path):
    """build_report (pipeline/report.py) over a run whose only finished step is this dfn folder."""
    from pipeline.report import build_report

    s, kept, dropped, cut = _fraction_pool(0.3)
    run = tmp_path / "r"
    _stage_folder(run / "04_dfn", kept, dropped, cut)
    cfg = dataclasses.asdict(DfnStage.Config(keep_fraction=0.3))
    manifest = {"stage": "dfn", "rows_in": N + 3, "rows_out": len(kept), "rejected": N + 3 - len(kept),
                "reasons": {"dfn_low_score": len(dropped), "no_image": 3}, "timings": {}, "config": cfg, "notes": []}
    (run / "04_dfn" / "_manifest.json").write_text(json.dumps(manifest))
    out = build_report(str(run))
    md, html = open(out["md"]).read(), open(out["html"]).read()
    assert "candidate thresholds for [dfn] threshold or [metaclip] min_score" in md
    assert "DFN keeps 10–30% of a raw web pool" in md and "DFN keeps 10–30% of a raw web pool" in html
    t, n_kept = _reference(s, 0.3)
    assert f"| {t} | {n_kept} | {100 * n_kept / N:.2f}% |" in md
    assert "dfn_scores.png" in md and (run / "report" / "dfn_scores.png").exists()
