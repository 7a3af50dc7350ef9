"""The whole job on a small demo world, as `make demo` runs it (short training), and the report's numbers
checked against the manifests it is built from."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import shards
from pipeline.cli import main as cli_main

STAGES = ["ingest", "align", "metaclip", "klite", "dfn", "emit"]


@pytest.fixture(scope="module")
def demo_run(demo_ingested):
    world, runs, base = demo_ingested
    run = "e2e"
    # a run of its own on top of the shared ingest (other tests add stages to the shared run)
    import shutil

    shutil.copytree(runs / base / "00_ingest", runs / run / "00_ingest")
    shutil.copy(runs / base / "config.toml", runs / run / "config.toml")
    shutil.copy(runs / base / "image_store.json", runs / run / "image_store.json")  # root: 00_ingest/_img2dataset
    cfg = (world / "config.toml").read_text()
    cfg = re.sub(r"steps = \d+", "steps = 25", cfg)
    cfg = re.sub(r"workers = \d+", "workers = 0", cfg)
    (runs / run / "e2e.toml").write_text(cfg)
    common = ["--runs-dir", str(runs)]
    assert cli_main(common + ["dfn-train", "--run", run, "--config", str(runs / run / "e2e.toml"),
                              "--hq", str(world / "hq.parquet")]) == 0
    assert cli_main(common + ["run", "align,metaclip,klite,dfn,emit", "--run", run, "--workers", "0"]) == 0
    assert cli_main(common + ["train", "--run", run, "--resume"]) == 0  # as make demo: records eval_fingerprint.json
    assert cli_main(common + ["report", "--run", run]) == 0
    return world, runs / run


def _manifests(run_dir):
    out = {}
    for name in STAGES:
        paths = glob.glob(str(run_dir / f"*_{name}" / "_manifest.json"))
        assert len(paths) == 1, name
        out[name] = json.loads(open(paths[0]).read())
    return out


def test_funnel_adds_up_and_every_row_is_accounted_for(demo_run):
    world, run_dir = demo_run
    ms = _manifests(run_dir)
    n_urls = pq.read_metadata(world / "urls.parquet").num_rows
    assert ms["ingest"]["rows_in"] == n_urls
    prev_out = None
    for name in STAGES:
        m = ms[name]
        assert m["rows_out"] + m["rejected"] == m["rows_in"], name
        assert sum(m["reasons"].values()) == m["rejected"], name
        if prev_out is not None:
            assert m["rows_in"] == prev_out, name  # each stage reads exactly what the previous one kept
        prev_out = m["rows_out"]
        stage_dir = glob.glob(str(run_dir / f"*_{name}"))[0]
        kept = sum(pq.read_metadata(p).num_rows for p in glob.glob(f"{stage_dir}/part-*.parquet"))
        rejected = pq.read_table(f"{stage_dir}/rejected") if glob.glob(f"{stage_dir}/rejected/*.parquet") else None
        assert kept == m["rows_out"], name
        if rejected is not None:
            reasons = rejected.column("reason").to_pylist()
            counted = {r: reasons.count(r) for r in set(reasons)}
            assert counted == m["reasons"], name
    emitted = sum(pq.read_metadata(p).num_rows for p in glob.glob(str(run_dir / "emit" / "parquet" / "*.parquet")))
    assert emitted == ms["emit"]["rows_out"] > 0


def test_report_shows_the_manifests_numbers_and_the_metrics(demo_run):
    _, run_dir = demo_run
    ms = _manifests(run_dir)
    md = (run_dir / "report" / "report.md").read_text()
    html = (run_dir / "report" / "report.html").read_text()
    rows = [l for l in md.splitlines() if l.startswith("|")]
    for name in STAGES:
        m = ms[name]
        # the stage's total line: stage, rows in, kept, rejected
        assert any(re.match(rf"\|\s*{name}\s*\|\s*{m['rows_in']}\s*\|\s*{m['rows_out']}\s*\|\s*{m['rejected']}\s*\|", l)
                   for l in rows), name
        for reason, n in m["reasons"].items():
            assert any(reason in l and re.search(rf"\|\s*{n}\b", l) for l in rows), (name, reason)
    # figures the stages draw, linked relatively and present on disk
    for src in re.findall(r"src=[\"']([^\"']+\.png)[\"']", html):
        assert (run_dir / "report" / src).is_file(), src
    assert "metaclip" in html and "dfn" in html and "training curve" in html
    assert "eval_digests" not in md and "eval_fingerprint" not in md  # bookkeeping beside the results, not results
    evals = sorted(glob.glob(str(run_dir / "train" / "eval-*.json")))
    assert evals, "train should have evaluated the model on the demo world's held-out sets"
    for f in evals:
        ev = json.loads(open(f).read())
        key = "top1" if ev["kind"] == "classification" else "image_to_text_R@1"
        assert 0.0 <= ev[key] <= 1.0
        assert f"{ev[key]:.4f}".rstrip("0") in md or str(round(ev[key], 4)) in md


# The noise kinds of the demo world that a rule targets, and the step whose rules do. `mismatched` is left to dfn's
# learnt score (no rule can tell a well-formed caption of another image); `non_english` to the language rule,
# which the demo config leaves off (its figure is reported, not held to a bound).
TARGETED = {"http_404": "ingest", "not_image": "ingest", "boilerplate": "align", "many_texts": "align",
            "exact_duplicate": "align", "near_duplicate": "align", "too_short": "align", "too_long": "align",
            "rare_token": "align", "small_image": "align", "odd_aspect": "align", "eval_copy": "align"}


def test_filters_against_the_truth_recall_95_and_clean_loss_5(demo_run):
    """The report's filter table (pipeline/truth.py) on the demo world: each noise kind a rule targets is dropped
    at >= 95% recall (by the whole run), mostly by the step that targets it; the cleaning steps (ingest and align) lose <= 5% of the
    clean rows. metaclip's balancing and dfn's keep fraction drop clean rows by design: reported, not bounded."""
    world, run_dir = demo_run
    q = json.loads((run_dir / "report" / "filter_quality.json").read_text())
    assert q["truth"] == str(world / "truth.parquet")
    assert set(TARGETED) <= set(q["recall"])
    for kind, step in TARGETED.items():
        r = q["recall"][kind]
        assert r["rows"] > 0 and r["recall"] >= 0.95, (kind, r)
        # and mostly by the step whose rule targets it (align alone catches 40 of the 45 near duplicates
        # here: MinHash at 0.8 misses some lightly edited captions; dfn drops the other 5)
        assert r["by_step"].get(step, 0) >= 0.85 * r["dropped"], (kind, r)
    lost = q["clean_lost"]
    cleaning = sum(x["rows"] for x in lost["by_step_reason"] if x["step"] in ("ingest", "align"))
    assert cleaning <= 0.05 * lost["clean_rows"], lost
    assert q["rows"] == pq.read_metadata(world / "truth.parquet").num_rows
    assert q["recall"]["clean"]["by_step"].get("unaccounted", 0) == 0  # every row is somewhere
    md = (run_dir / "report" / "report.md").read_text()
    assert "## Filter quality against the truth" in md and "| boilerplate |" in md


def test_emitted_set_is_what_the_last_stage_kept(demo_run):
    _, run_dir = demo_run
    dfn_dir = glob.glob(str(run_dir / "*_dfn"))[0]
    last = [u for p in sorted(glob.glob(f"{dfn_dir}/part-*.parquet")) for u in pq.read_table(p, columns=["uid"]).column("uid").to_pylist()]
    emitted = pq.read_table(run_dir / "emit" / "parquet", columns=["uid"]).column("uid").to_pylist()
    assert sorted(emitted) == sorted(last)
    summary = shards.read_json(str(run_dir / "emit" / "summary.json"))
    assert summary


def test_report_renders_in_headless_chromium_without_broken_images(demo_run, tmp_path):
    from pipeline.report import find_browser, render_check

    if not find_browser():
        # `make setup` installs it where it runs as root; CI must run this check, never skip it
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed and CI is set: run `make setup` as root, or "
                        "'sudo apt-get install -y chromium'")
        pytest.skip("Chromium is not installed: `make setup` as root installs it, or 'sudo apt-get install -y chromium'")
    _, run_dir = demo_run
    res = render_check(str(run_dir / "report" / "report.html"), str(tmp_path / "report.png"))
    assert res["broken"] == []
    assert res["figures"] >= 4 and res["figures_loaded"] == res["figures"]  # the stages' histograms drew
    assert res["png"] and (tmp_path / "report.png").stat().st_size > 10_000
    assert not list((run_dir / "report").glob(".probe-*"))  # the probe copy is cleaned up


# ---- the funnel and the kept uids per stage, against a record made before images moved to a store ----------
KEPT_RECORD = Path(__file__).parent / "data" / "demo_kept_uids.json"


def kept_record(run_dir) -> dict:
    """Per stage: the funnel (rows in, kept, rejected, reasons) and the sorted kept uids' count and sha256;
    for emit also the emitted set's uids (the Parquet training set). Written by `CLIPCURATE_WRITE_RECORD=1`."""
    ms = _manifests(run_dir)
    out = {}
    for name in STAGES:
        stage_dir = glob.glob(str(run_dir / f"*_{name}"))[0]
        uids = sorted(u for p in sorted(glob.glob(f"{stage_dir}/part-*.parquet"))
                      for u in pq.read_table(p, columns=["uid"]).column("uid").to_pylist())
        m = ms[name]
        out[name] = {"rows_in": m["rows_in"], "rows_out": m["rows_out"], "rejected": m["rejected"],
                     "reasons": dict(sorted(m["reasons"].items())), "kept": len(uids),
                     "kept_sha256": hashlib.sha256("\n".join(uids).encode()).hexdigest()}
    emitted = sorted(pq.read_table(run_dir / "emit" / "parquet", columns=["uid"]).column("uid").to_pylist())
    out["emitted"] = {"kept": len(emitted), "kept_sha256": hashlib.sha256("\n".join(emitted).encode()).hexdigest()}
    return out


def test_funnel_and_kept_uids_match_the_record(demo_run):
    _, run_dir = demo_run
    got = kept_record(run_dir)
    if os.environ.get("CLIPCURATE_WRITE_RECORD") == "1":
        KEPT_RECORD.parent.mkdir(exist_ok=True)
        KEPT_RECORD.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(KEPT_RECORD.read_text())
    for name in STAGES + ["emitted"]:
        assert got[name] == want[name], name


JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF"  # how Pillow's and OpenCV's JPEGs (the demo's, img2dataset's) begin


def test_no_file_of_a_curation_stage_holds_image_bytes(demo_run):
    """Images are written once: every file align, metaclip, klite and dfn write (kept, rejected, statistics,
    manifests) is metadata: no binary image column, no JPEG in the bytes, a small fraction of the store."""
    from pipeline.images import ImageStore

    _, run_dir = demo_run
    store = ImageStore.load(str(run_dir))
    store_bytes = sum(p.stat().st_size for p in Path(store.root).rglob("*") if p.is_file())
    written = 0
    for name in ("align", "metaclip", "klite", "dfn"):
        [stage_dir] = glob.glob(str(run_dir / f"*_{name}"))
        files = [p for p in Path(stage_dir).rglob("*") if p.is_file()]
        assert files, name
        for p in files:
            data = p.read_bytes()
            written += len(data)
            assert JPEG_HEAD not in data, p
            if p.suffix == ".parquet":
                schema = pq.read_schema(p)
                binary = [f.name for f in schema if str(f.type) in ("binary", "large_binary")]
                assert not binary, (p, binary)
                if p.parent == Path(stage_dir) and p.name.startswith("part-"):
                    assert "image_ref" in schema.names, p  # kept rows name their image instead
    # rows in the store, against the curated stages' metadata (4 stages, kept + rejected + statistics)
    assert written < 0.25 * store_bytes, (written, store_bytes)
