"""Histograms and the run report. The pipeline knows nothing of what a stage does: each stage's
`report(stage_dir, out_dir)` hook draws its own figures and tables; this module gathers them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline import shards
from pipeline.stage import STAGE_ORDER, StageError, stage_class

log = logging.getLogger("clipcurate.report")


def stage_folders(run_dir: str) -> list[tuple[str, str]]:
    """(stage name, folder) for every stage of the run that has finished (has a manifest)."""
    out = []
    for name in STAGE_ORDER:
        for d in sorted(Path(run_dir).glob(f"*_{name}")):
            if (d / "_manifest.json").exists():
                out.append((name, str(d)))
    return out


def histograms(run_dir: str) -> dict[str, dict]:
    """Run every finished stage's report hook; figures land in runs/NAME/report/."""
    if not Path(run_dir).exists():
        raise StageError(f"run folder {run_dir} does not exist")
    out_dir = os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for name, folder in stage_folders(run_dir):
        try:
            cls = stage_class(name)
        except StageError:
            continue
        cfg = (shards.read_json(os.path.join(folder, "_manifest.json")) or {}).get("config", {})
        try:
            stage = cls(cfg)
        except TypeError:
            stage = cls()
        results[name] = stage.report(folder, out_dir)
    return results


def cmd_histograms(args) -> int:
    run_dir = shards.join(args.runs_dir, args.run)
    results = histograms(run_dir)
    n = 0
    for name, res in results.items():
        for title, path in res.get("figures", []):
            print(f"{name}: {title}: {path}")
            n += 1
        for title, table in res.get("tables", []):
            print(f"\n{name}: {title}\n{table}")
    if not n:
        print(f"no figures: no finished stage in {run_dir} draws any yet")
    return 0


def register(sub) -> None:
    p = sub.add_parser("histograms", help="draw each stage's histograms (PNG) and tables into runs/NAME/report/")
    p.add_argument("--run", required=True)
    p.set_defaults(fn=cmd_histograms)
