"""Margins of an ablation result file, recomputed from the per-seed figures it holds (no training): each
variant's difference from the raw pool and the controls, in units of the standard deviation of the difference
(`bench_ablate_web.margins`). For result files written before the margins had that unit.

    .venv/bin/python bench/ablation_margins.py bench/results/ablation.json bench/results/ablation_web*.json

Writes into each file: `full_vs` (the full pipeline, "+ dfn", against the raw pool and the random subset, where
the file has them), `semdedup_vs` (where "+ semdedup" was trained) and `steps_vs_raw` (every other variant against
the raw pool). The per-seed figures and the table are not touched.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ablate_web import margins  # noqa: E402

CONTROLS = ("raw pool", "random subset")


def recompute(result: dict) -> dict:
    rows = {r["variant"]: r for r in result["variants"]}
    full = "+ dfn" if "+ dfn" in rows else None
    out = dict(result)
    if full:
        out["full_vs"] = {o: margins(rows, full, o) for o in CONTROLS if o in rows}
    if "+ semdedup" in rows:
        out["semdedup_vs"] = {o: margins(rows, "+ semdedup", o) for o in (*CONTROLS, full) if o and o in rows}
    if "raw pool" in rows:
        out["steps_vs_raw"] = {v: margins(rows, v, "raw pool") for v in rows if v != "raw pool"}
    return out


def main(paths: list[str]) -> int:
    for p in paths:
        result = json.loads(Path(p).read_text())
        Path(p).write_text(json.dumps(recompute(result), indent=2, default=str) + "\n")
        print(f"{p}: margins recomputed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
