"""Scale benchmark: >= 1M text-only captions through align -> metaclip -> klite on a real dask.distributed
cluster (a `dask scheduler` and `dask worker` processes started on loopback, as a user would on a cluster),
with 1 and 2 workers, then 3M rows to show that memory per worker stays flat. Writes bench/results/scale.json.

    .venv/bin/python bench/bench_scale.py [--rows 1000000,3000000] [--workers 1,2] [--shard-rows 50000]

The pool is bench_align's: LAION-10k + Flickr8k captions resampled with light perturbation (case,
punctuation, a dropped word, a typo), 70% keeping their source url, so dedup and the text rules have real
work. Shards have a fixed size (50k rows), so a bigger pool means more shards, not bigger ones. Per-worker
memory should then not depend on the pool size: rows stream shard by shard, and align's pool-wide tables
(which do grow with the pool) are shuffled into ceil(shards / 8) partitions, each merged by one task.

Per stage: rows in, wall time (driver's view: collect + merge + apply + scheduling), rows/s, and each
worker's peak RSS in that stage (VmHWM, reset before the stage; not ru_maxrss, which a worker inherits from
the driver that spawned it). The run's peak per worker is the largest over its stages. The machine is a shared 2-core VM: the
load average at start and end is recorded next to each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _procs import stop_groups

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_align import DATA, FLICKR, LAION, _worker_peak_rss, build_pool, load_real, reset_peak_rss  # noqa: E402

from pipeline import config as config_mod  # noqa: E402
from pipeline.executors import worker_env  # noqa: E402
from pipeline.runner import run_pipeline  # noqa: E402

STAGES = ["align", "metaclip", "klite"]
GOAL_ROWS_PER_MIN = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; the driver's own


class Cluster:
    """A scheduler and n single-threaded workers, each its own OS process (with a nanny), on loopback."""

    def __init__(self, workers: int, workdir: str):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        dask = str(Path(sys.executable).with_name("dask"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]),
                   **worker_env(workers))  # what the runner's LocalCluster gives its workers
        log = open(os.path.join(workdir, f"cluster-w{workers}.log"), "w")
        common = dict(env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                        "--no-dashboard"], **common)]
        for i in range(workers):
            self.procs.append(subprocess.Popen(
                [dask, "worker", self.address, "--name", f"w{i}", "--nthreads", "1", "--nworkers", "1",
                 "--memory-limit", "0", "--no-dashboard", "--local-directory", os.path.join(workdir, f"w{i}")],
                **common))
        from distributed import Client

        self.client = Client(self.address, timeout="60s")
        self.client.wait_for_workers(workers, timeout=120)

    def worker_peaks_mib(self) -> dict[str, int]:
        """Each worker's peak RSS since the last `reset_peaks` (VmHWM: see bench_align._worker_peak_rss)."""
        return {w: round(v / 2**20) for w, v in self.client.run(_worker_peak_rss).items()}

    def reset_peaks(self) -> None:
        self.client.run(reset_peak_rss)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            stop_groups(self.procs, timeout=20)


def timed_run(pool: str, workdir: str, workers: int, rows: int) -> dict:
    run_dir = os.path.join(workdir, f"run-{rows}-w{workers}")
    cfg = config_mod.resolve({})
    t_start = time.perf_counter()
    cluster = Cluster(workers, workdir)
    startup = time.perf_counter() - t_start
    per_stage, worker_peak = [], {}
    try:
        load0 = os.getloadavg()
        t_all = time.perf_counter()
        for i, stage in enumerate(STAGES):
            cluster.reset_peaks()
            t0 = time.perf_counter()
            res = run_pipeline([stage], run_dir, cfg, input_dir=pool if i == 0 else None,
                               scheduler=cluster.address)[0]
            wall = time.perf_counter() - t0
            m = res.manifest
            stage_peaks = cluster.worker_peaks_mib()
            for w, v in stage_peaks.items():
                worker_peak[w] = max(worker_peak.get(w, 0), v)
            per_stage.append({"stage": stage, "rows_in": m["rows_in"], "rows_out": m["rows_out"],
                              "wall_s": round(wall, 1), "rows_per_s": round(m["rows_in"] / wall),
                              "timings": m["timings"], "reasons": m["reasons"],
                              "stats_partitions": m.get("stats_partitions"),
                              "stats_answer_mib_per_shard": {k: round(v / 2**20, 2) for k, v in
                                                             m.get("stats_answer_bytes", {}).items()},
                              "peak_rss_per_worker_mib": sorted(stage_peaks.values())})
            print(f"  {rows:,} rows, {workers} worker(s): {stage} {m['rows_in']:,} -> {m['rows_out']:,} "
                  f"in {wall:.1f} s ({m['rows_in'] / wall:,.0f} rows/s)", flush=True)
        total = time.perf_counter() - t_all
        load1 = os.getloadavg()
        peaks = sorted(worker_peak.values())
    finally:
        cluster.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "rows": rows,
        "workers": workers,
        "cluster_startup_s": round(startup, 1),
        "stages": per_stage,
        "total_wall_s": round(total, 1),
        "pool_rows_per_min": round(rows / total * 60),
        "peak_rss_per_worker_mib": peaks,
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in load1],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1000000,3000000", help="pool sizes; the first runs with every --workers "
                    "count, the others with the largest only")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = ap.parse_args()
    if not LAION.exists() or not FLICKR.exists():
        print(f"scale bench: real caption sets not found under {DATA}")
        return 1
    sizes = [int(x) for x in args.rows.split(",")]
    worker_counts = [int(x) for x in args.workers.split(",")]
    real = load_real()
    result = {
        "machine": {"cpus": os.cpu_count(), "note": "shared 2-core VM; see loadavg next to each figure"},
        "stages": STAGES,
        "config": "defaults (align rules, metaclip t=20,000 on the WordNet list, klite)",
        "shard_rows": args.shard_rows,
        "goal": f">= {GOAL_ROWS_PER_MIN:,} captions/min through the text stages on 2 cores",
        "runs": [],
    }
    work = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        for k, rows in enumerate(sizes):
            pool = os.path.join(work, f"pool-{rows}")
            t0 = time.perf_counter()
            build_pool(real, rows, max(1, -(-rows // args.shard_rows)), pool, seed=k)
            print(f"pool of {rows:,} captions built in {time.perf_counter() - t0:.1f} s", flush=True)
            for w in (worker_counts if k == 0 else [max(worker_counts)]):
                r = timed_run(pool, work, w, rows)
                print(json.dumps({x: r[x] for x in ("rows", "workers", "total_wall_s", "pool_rows_per_min",
                                                     "peak_rss_per_worker_mib")}), flush=True)
                result["runs"].append(r)
            shutil.rmtree(pool, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = [r for r in result["runs"] if r["rows"] == sizes[0]]
    if len(first) > 1:
        one = next(r for r in first if r["workers"] == min(worker_counts))
        many = next(r for r in first if r["workers"] == max(worker_counts))
        result["scaling"] = {
            "workers": [one["workers"], many["workers"]],
            "speedup_total": round(one["total_wall_s"] / many["total_wall_s"], 2),
            "speedup_per_stage": {s["stage"]: round(s["wall_s"] / t["wall_s"], 2)
                                  for s, t in zip(one["stages"], many["stages"])},
        }
    best = max(r["pool_rows_per_min"] for r in result["runs"])
    result["goal_met"] = best >= GOAL_ROWS_PER_MIN
    result["driver_peak_rss_mib"] = round(_peak_rss() / 2**20)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"best {best:,} captions/min (goal {GOAL_ROWS_PER_MIN:,}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
