"""metaclip's t solver: how close is the kept count to `[metaclip] target_rows` on a 1M-caption pool?

Pool: real captions (Flickr8k 40,450 + LAION 10k sample 10,000, from ../shared/data), repeated 20x
to 1,009,000 rows, each with its own URL (so its own uid and its own balancing draws). Entries: the WordNet list.
For each target, the metaclip stage runs in-process on 10 shards with `target_rows` set: it solves t from the
pool's entry counts and a uniform sample of `target_sample` matched rows (default 200,000), then balances with
that t. Reported: the t solved, the expected kept count, the actual kept count, and the actual's distance from
the target (goal: within 1%), with the stage's wall time. Accuracy is the point, not speed; load is recorded.

    .venv/bin/python bench/bench_metaclip_target.py [--targets 100000,300000] [--out bench/results/metaclip_target.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--targets", default="100000,300000")
    ap.add_argument("--target-sample", type=int, default=None, help="default: the stage's default")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "metaclip_target.json"))
    args = ap.parse_args()
    for p in (DATA / "flickr8k_captions" / "flickr8k_captions.parquet", DATA / "laion_sample_10k" / "laion_sample_10k.parquet"):
        if not p.exists():
            print(f"metaclip target bench: {p} not found (../shared/data)")
            return 1

    import numpy as np
    import polars as pl
    import pyarrow as pa

    from pipeline import config as config_mod
    from pipeline import shards
    from pipeline.runner import run_pipeline
    from pipeline.schema import compute_uid
    from stages.metaclip import MetaClipStage

    flickr = pl.read_parquet(DATA / "flickr8k_captions" / "flickr8k_captions.parquet")["caption"]
    laion = pl.read_parquet(DATA / "laion_sample_10k" / "laion_sample_10k.parquet")["text"]
    base = pl.concat([flickr, laion]).cast(pl.String)
    texts = pl.concat([base] * args.repeat).to_list()
    n = len(texts)
    urls = [f"http://bench.invalid/{i}.jpg" for i in range(n)]
    work = Path(tempfile.mkdtemp(prefix="bench-metaclip-target-"))
    result: dict = {
        "bench": "bench/bench_metaclip_target.py", "rows": n, "unique_captions": len(base), "shards": args.shards,
        "workers": args.workers, "seed": args.seed, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "goal": "actual kept within 1% of target_rows", "runs": [],
    }
    try:
        pool = work / "pool"
        pool.mkdir()
        table = pa.table({"uid": compute_uid(urls, texts), "url": urls, "text": texts})
        bounds = np.linspace(0, n, args.shards + 1).astype(int)
        for i in range(args.shards):
            shards.write_shard(table.slice(bounds[i], bounds[i + 1] - bounds[i]), str(pool / f"part-{i:05d}.parquet"))
        del table
        for target in [int(x) for x in args.targets.split(",") if x]:
            mc = {"target_rows": target}
            if args.target_sample:
                mc["target_sample"] = args.target_sample
            cfg = config_mod.resolve({"run": {"seed": args.seed}, "metaclip": mc})
            la = os.getloadavg()
            t0 = time.perf_counter()
            (res,) = run_pipeline(["metaclip"], str(work / f"run-{target}"), cfg, input_dir=str(pool),
                                  workers=args.workers)
            wall = time.perf_counter() - t0
            th = shards.read_json(str(Path(res.folder) / "stats" / "thresholds.json"))
            solved = th["target"]
            kept = int(res.manifest["rows_out"])
            run = {
                "target_rows": target, "t_solved": solved["t"], "expected_kept": round(solved["expected_kept"], 1),
                "actual_kept": kept, "actual_vs_target": round((kept - target) / target, 5),
                "expected_vs_target": round((solved["expected_kept"] - target) / target, 5),
                "within_1pct": abs(kept - target) <= 0.01 * target,
                "sample_rows": solved["sample_rows"], "matched_rows": solved["matched_rows"],
                "target_sample": MetaClipStage.Config(**mc).target_sample,
                "stage_wall_s": round(wall, 1), "loadavg_before": [round(x, 2) for x in la],
            }
            print(json.dumps(run), flush=True)
            result["runs"].append(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["all_within_1pct"] = all(r["within_1pct"] for r in result["runs"])
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
