"""`--workers` default: in-process against a 2-worker Dask LocalCluster on small pools (issue 35, item 8).

For each pool size, a demo world of about that many URL rows is made and ingested once (in-process), then
`clipcurate run align,metaclip` is timed as a user runs it: a fresh subprocess (imports, the cluster's start
and close included), its step folders removed before each timing, the two modes alternated per repeat to
spread drift in machine load. Also records whether the command's stderr carried Dask's
"Worker process still alive after ... seconds, killing" warning. Writes bench/results/workers_default.json; the
runner's `IN_PROCESS_BELOW` (pipeline/executors.py) is read off it.

    .venv/bin/python bench/bench_workers_default.py [--sizes 300,3000,10000] [--repeats 2] [--append]

`--append` keeps the sizes already in the result file (each size records its own date and command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "workers_default.json"
NANNY_WARNING = "Worker process still alive"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise SystemExit(f"clipcurate {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def prepare(size: int, work: Path) -> tuple[Path, int]:
    """A demo world of ~`size` URL rows, ingested into runs/w<size>: (runs dir, rows ingest kept)."""
    sys.path.insert(0, str(ROOT))
    from demo.world import make_world

    world, runs = work / f"world-{size}", work / "runs"
    make_world(world, n=size, seed=0)
    cli("--runs-dir", str(runs), "ingest", str(world / "urls.parquet"), "--run", f"w{size}",
        "--config", str(world / "config.toml"), "--workers", "0")
    m = json.loads((runs / f"w{size}" / "00_ingest" / "_manifest.json").read_text())
    return runs, int(m["rows_out"])


def timed(runs: Path, size: int, workers: int) -> dict:
    run_dir = runs / f"w{size}"
    for d in run_dir.iterdir():
        if d.is_dir() and d.name[:2].isdigit() and d.name != "00_ingest":
            shutil.rmtree(d)  # align and metaclip redo their work from scratch each time
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = cli("--runs-dir", str(runs), "run", "align,metaclip", "--run", f"w{size}", "--workers", str(workers))
    wall = time.perf_counter() - t0
    return {"workers": workers, "wall_s": round(wall, 2), "load_1min_before": round(load, 2),
            "load_1min_after": round(os.getloadavg()[0], 2), "nanny_warning": NANNY_WARNING in p.stderr}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="300,3000,10000")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--append", action="store_true", help="keep the other sizes already in --out")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            runs, rows = prepare(size, Path(tmp))
            rounds = []
            for r in range(args.repeats):
                for w in ((0, 2) if r % 2 == 0 else (2, 0)):
                    rounds.append(timed(runs, size, w))
                    print(f"{size} URL rows ({rows} ingested): --workers {w}: {rounds[-1]}", flush=True)
            best = {w: min(x["wall_s"] for x in rounds if x["workers"] == w) for w in (0, 2)}
            results.append({"world_n": size, "pool_rows": rows, "rounds": rounds, "best_wall_s": best,
                            "two_workers_over_in_process": round(best[2] / best[0], 2),
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            "command": "python bench/bench_workers_default.py " + " ".join(sys.argv[1:])})
    if args.append and Path(args.out).exists():
        new = {r["world_n"] for r in results}
        before = json.loads(Path(args.out).read_text())
        results += [{"date": before.get("date"), "command": before.get("command"), **r}
                    for r in before["sizes"] if r["world_n"] not in new]
        results.sort(key=lambda r: r["world_n"])
    out = {
        "what": "clipcurate run align,metaclip on a demo world's ingested pool, fresh subprocess per timing: "
                "--workers 0 (in-process) against --workers 2 (a Dask LocalCluster, started and closed by the command)",
        "command": "python bench/bench_workers_default.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "note": "a shared 2-core VM: the 1-minute load average before and after each timing is recorded with it",
        "sizes": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({r["pool_rows"]: r["best_wall_s"] for r in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
