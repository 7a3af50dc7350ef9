"""Does curation pay on a crawl as noisy as the web? The ablation on the web-noise demo world, with DataComp's
size control and the oracle. Writes bench/results/ablation_web.json. `make ablate-web` runs it.

    .venv/bin/python bench/bench_ablate_web.py [--n 3000] [--seeds 0,1,2] [--steps 300] [--workers 2]

1. The web-noise world (`clipcurate demo-world --noise web`: its composition and sources are in
   demo/composition.py), crawled and curated as `bench/bench_filters.py` does it (same cache).
2. `clipcurate ablate --run web-... --seeds S`: the same model and compute on the raw pool, each step added,
   the full pipeline, a random subset of the raw pool the size of the full pipeline's output (one per seed) and
   the oracle (the raw pool's truth-clean rows); mean ± std over the seeds.
3. The result file holds the ablation table, each variant's per-seed figures, the filter table of the run,
   the full pipeline's margin over the raw pool and over the random subset in units of their larger std
   (the acceptance asks for > 2 on zero-shot top-1 and retrieval R@1), and the wall time of every command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_filters import ROOT, curate, sh  # noqa: E402


def margins(rows: dict, full: str, against: str) -> dict:
    """(full - other) / max(std) for every figure both rows hold: how many spreads apart they are."""
    a, b = rows[full], rows[against]
    out = {}
    for k, v in a.items():
        if isinstance(v, float) and isinstance(b.get(k), float):
            sd = max(a["std"].get(k, 0.0), b["std"].get(k, 0.0))
            out[k] = {"diff": round(v - b[k], 4), "in_std": round((v - b[k]) / sd, 2) if sd > 0 else None}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds")
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant (default: the world's config)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ablation_web.json"))
    args = ap.parse_args()
    work = ROOT / "bench" / ".cache" / "filters"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world, run_dir, secs = curate(work, "web", args.n, args.seed, args.workers, "align,metaclip,klite,dfn,emit")
    with open(work / f"{run_dir.name}.log", "a") as log:
        cmd = ["--runs-dir", str(run_dir.parent), "ablate", "--run", run_dir.name, "--seeds", args.seeds]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        secs["ablate"] = sh(cmd, log)
        secs["report"] = sh(["--runs-dir", str(run_dir.parent), "report", "--run", run_dir.name], log)  # + ablation
    ab = json.loads((run_dir / "ablation.json").read_text())
    rows = {r["variant"]: r for r in ab["variants"]}
    full = next((r["variant"] for r in ab["variants"] if r["variant"].startswith("+ dfn") and "K-LITE" not in r["variant"]),
                None)
    result = {
        "bench": "ablate_web", "command": " ".join(sys.argv), "world": {"noise": "web", "n": args.n, "seed": args.seed},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds": secs, "wall_s": round(time.perf_counter() - t0, 1),
        "ablation": {k: v for k, v in ab.items() if k != "variants"},
        "variants": [{k: v for k, v in r.items() if k not in ("eval",)} for r in ab["variants"]],
        "full_vs": {other: margins(rows, full, other) for other in ("raw pool", "random subset") if full and other in rows},
        "filters": json.loads((run_dir / "report" / "filter_quality.json").read_text()),
    }
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(ab["table_md"])
    print(f"wrote {args.out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
