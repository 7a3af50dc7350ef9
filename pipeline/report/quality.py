"""The report's side of filter quality against the truth (pipeline/truth.py computes it): which labels judge a
run by default (a demo world's own truth, `world_truth`), and the three tables drawn from the result."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from pipeline import shards
from pipeline.layout import read_manifest, stage_folders, started_from
from pipeline.truth import filter_quality

log = logging.getLogger("clipcurate.report")


def world_truth(run_dir: str) -> str | None:
    """The labelled truth of the demo world the run crawled, or None. Only a world's own record counts: next to the
    URL list the run ingested (a download step's manifest `url_list`) or its first step's input, a `world.json`
    (demo/world.py) whose file digests name `truth.parquet` with the bytes it has now. A `truth.parquet` that a
    user's crawl happens to hold beside its URL list is not labels of this run (give it with `report --truth`)."""
    steps = stage_folders(run_dir)
    if not steps:
        return None
    src = started_from([read_manifest(folder) or {} for _, folder in steps])
    if not src or "://" in str(src):
        return None
    p = Path(src)
    world = p if p.is_dir() else p.parent
    try:
        record = json.loads((world / "world.json").read_text())
        digest = record["files"]["truth.parquet"]
        cand = world / "truth.parquet"
        if hashlib.sha256(cand.read_bytes()).hexdigest() != digest:
            log.warning("%s: truth.parquet is not the one its world.json records: no filter quality section", world)
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(cand)


def judged(run_dir: str, truth: str, out_dir: Path) -> dict:
    """The run's filter quality against the labels at `truth` (pipeline/truth.py), over its finished steps in
    recipe order, also written as `filter_quality.json` in the report folder."""
    quality = filter_quality(run_dir, truth, stage_folders(run_dir))
    shards.write_json(quality, str(out_dir / "filter_quality.json"))
    return quality


def filter_quality_tables(q: dict) -> list[tuple[str, list[str], list[list]]]:
    """(title, header, rows) of the three truth tables (pipeline/truth.py)."""
    steps = list(q["precision"])
    rec = [[kind, r["rows"], r["dropped"], f"{r['recall']:.1%}" if r["recall"] is not None else ""]
           + [r["by_step"].get(st, "") for st in steps] + [r["by_step"].get("unaccounted", "")]
           for kind, r in q["recall"].items()]
    pre = [[st, p["dropped"], p["noise"], f"{p['precision']:.1%}" if p["precision"] is not None else "",
            ", ".join(f"{k} {v}" for k, v in list(p["by_reason"].items())[:5])] for st, p in q["precision"].items()]
    cl = q["clean_lost"]
    lost = [[x["step"], x["reason"], x["rows"], f"{x['rows'] / cl['clean_rows']:.1%}"] for x in cl["by_step_reason"]]
    return [
        (f"Recall: the share of each kind's rows the run dropped ({q['rows']} rows, {q['kept']} kept)",
         ["kind", "rows", "dropped", "recall", *(f"by {st}" for st in steps), "unaccounted"], rec),
        ("Precision: the share of each step's drops that were noise", ["step", "dropped", "noise", "precision",
                                                                      "top reasons"], pre),
        (f"Clean rows lost: {cl['lost']} of {cl['clean_rows']} ({cl['share']:.1%})" if cl["share"] is not None
         else "Clean rows lost", ["step", "reason", "rows", "share of clean rows"], lost),
    ]
