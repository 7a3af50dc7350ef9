"""Does curation pay on a crawl as noisy as the web? The ablation on the web-noise demo world, with DataComp's
size control and the oracle. Writes bench/results/ablation_web.json. `make ablate-web` runs it.

    .venv/bin/python bench/bench_ablate_web.py [--n 10000] [--seeds 0,1,2] [--steps 300] [--model clipcurate-tiny-rn]

It trains `clipcurate-tiny-rn` on a 10,000-row web world: on the first, smaller setting the oracle itself could
rank nothing (why and the figures: bench/README.md, "Why the web ablation trains a small ResNet on 10,000 rows").
The world's noise composition is fixed in demo/composition.py.

1. The web-noise world (`clipcurate demo-world --noise web`: its composition and sources are in
   demo/composition.py), crawled and curated as `bench/bench_filters.py` does it (same cache).
2. `clipcurate ablate --run web-... --seeds S`: the same model and compute on the raw pool, each step added,
   the full pipeline, a random subset of the raw pool the size of the full pipeline's output (one per seed) and
   the oracle (the raw pool's truth-clean rows); mean ± std over the seeds.
3. The result file holds the ablation table, each variant's per-seed figures, the filter table of the run,
   the full pipeline's ("+ dfn") margin over the raw pool and over the random subset in units of their larger std,
   and "+ semdedup"'s over both and over "+ dfn" (the run's recipe ends dfn -> semdedup -> emit; the random subset
   has the size of semdedup's output)
   (the acceptance asks for > 2 on zero-shot top-1 and retrieval R@1), and the wall time of every command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_filters import ROOT, curate, sh  # noqa: E402


def margins(rows: dict, full: str, against: str) -> dict:
    """full - other for every figure both rows hold, in three spreads:
    in_std                the larger of the two rows' standard deviations across seeds (the first measure kept);
    in_std_of_difference  the standard deviation of the per-seed differences (full at seed s - other at seed s:
                          the same training seed, so the same initial weights and batch order draw): the spread of
                          the difference itself, which is what says whether it is noise;
    in_std_unpaired       sqrt(std_full^2 + std_other^2), the difference's spread if the seeds were unrelated.
    Standard deviations are the sample's (n - 1), as the table's."""
    a, b = rows[full], rows[against]
    by_seed_a = {s.get("seed"): s for s in a.get("seeds") or []}
    by_seed_b = {s.get("seed"): s for s in b.get("seeds") or []}
    common = sorted(set(by_seed_a) & set(by_seed_b), key=str)
    out = {}
    for k, v in a.items():
        if not (isinstance(v, float) and isinstance(b.get(k), float)):
            continue
        diff = v - b[k]
        sd = max(a["std"].get(k, 0.0), b["std"].get(k, 0.0))
        per_seed = [by_seed_a[s][k] - by_seed_b[s][k] for s in common
                    if isinstance(by_seed_a[s].get(k), float) and isinstance(by_seed_b[s].get(k), float)]
        sd_diff = statistics.stdev(per_seed) if len(per_seed) >= 2 else 0.0
        sd_unpaired = math.hypot(a["std"].get(k, 0.0), b["std"].get(k, 0.0))
        out[k] = {"diff": round(diff, 4), "in_std": _ratio(diff, sd),
                  "in_std_of_difference": _ratio(diff, sd_diff), "in_std_unpaired": _ratio(diff, sd_unpaired),
                  "seeds_paired": len(per_seed)}
    return out


def _ratio(diff: float, sd: float) -> float | None:
    return round(diff / sd, 2) if sd > 0 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds")
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant (default: the world's config)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="clipcurate-tiny-rn", help="the model every variant trains (docstring)")
    ap.add_argument("--variants", default=None, help="only these variants, comma-separated (ablate --variants)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ablation_web.json"))
    args = ap.parse_args()
    work = ROOT / "bench" / ".cache" / "filters"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # the default recipe with semdedup after dfn's cut: "+ dfn" is the full pipeline as before, "+ semdedup" adds
    # it (issue 31), and the random subset is sized to the last step's output
    steps = ["ingest", "align", "metaclip", "klite", "dfn", "semdedup", "emit"]
    world, run_dir, secs = curate(work, "web", args.n, args.seed, args.workers, ",".join(steps[1:]), steps, "semdedup")
    with open(work / f"{run_dir.name}.log", "a") as log:
        overlay = work / f"{run_dir.name}.ablate.toml"  # [train] laid over the run's config, for ablate only
        overlay.write_text(f"[train]\nmodel = {json.dumps(args.model)}\n")
        cmd = ["--runs-dir", str(run_dir.parent), "ablate", "--run", run_dir.name, "--seeds", args.seeds,
               "--config", str(overlay)]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        if args.variants:
            cmd += ["--variants", args.variants]
        secs["ablate"] = sh(cmd, log)
        secs["report"] = sh(["--runs-dir", str(run_dir.parent), "report", "--run", run_dir.name], log)  # + ablation
    ab = json.loads((run_dir / "ablation.json").read_text())
    rows = {r["variant"]: r for r in ab["variants"]}
    full = next((r["variant"] for r in ab["variants"] if r["variant"].startswith("+ dfn") and "K-LITE" not in r["variant"]),
                None)
    result = {
        "bench": "ablate_web", "command": " ".join(sys.argv), "world": {"noise": "web", "n": args.n, "seed": args.seed},
        "model": args.model,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds": secs, "wall_s": round(time.perf_counter() - t0, 1),
        "ablation": {k: v for k, v in ab.items() if k != "variants"},
        "variants": [{k: v for k, v in r.items() if k not in ("eval",)} for r in ab["variants"]],
        "full_vs": {other: margins(rows, full, other) for other in ("raw pool", "random subset") if full and other in rows},
        # semdedup added to the full pipeline: against both controls, and against the pipeline without it
        "semdedup_vs": {other: margins(rows, "+ semdedup", other) for other in ("raw pool", "random subset", full)
                        if "+ semdedup" in rows and other in rows},
        "filters": json.loads((run_dir / "report" / "filter_quality.json").read_text()),
    }
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(ab["table_md"])
    print(f"wrote {args.out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
