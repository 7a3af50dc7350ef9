"""Ingest throughput vs bare img2dataset: same loopback server, same URL list, same processes/threads.

Each measurement is a fresh subprocess (imports included, as a user pays them), alternating the order
ours/bare to spread any drift in machine load. Writes bench/results/ingest.json.

    .venv/bin/python bench/bench_ingest.py [--n 3000] [--repeats 2]
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
BIN = Path(sys.executable).parent

BARE = """
import os, sys
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
from stages.ingest.serve import serve_world, proxy_env
from img2dataset import download
www, urls, out, procs, threads = sys.argv[1:6]
with serve_world(www) as proxy:
    os.environ.update(proxy_env(proxy))
    download(url_list=urls, input_format="parquet", url_col="url", caption_col="caption", output_folder=out,
             output_format="parquet", resize_mode="no", processes_count=int(procs), thread_count=int(threads),
             number_sample_per_shard=1000, timeout=10, retries=0, enable_wandb=False, distributor="multiprocessing")
"""


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    args = ap.parse_args()

    from demo.world import make_world

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    try:
        world = work / "world"
        make_world(world, n=args.n, seed=0)
        import polars as pl

        rows = pl.read_parquet(world / "urls.parquet").height
        cfg = work / "c.toml"
        cfg.write_text(f"[ingest]\nprocesses = {args.processes}\nthreads = {args.threads}\nshard_size = 1000\n"
                       'allow_private_hosts = ["demo.clipcurate.invalid:80"]\n')  # the world's loopback server
        ours_s, bare_s = [], []
        for r in range(args.repeats):
            order = ["ours", "bare"] if r % 2 == 0 else ["bare", "ours"]
            for which in order:
                shutil.rmtree(work / "runs", ignore_errors=True)
                shutil.rmtree(work / "bare", ignore_errors=True)
                if which == "ours":
                    s = timed([str(BIN / "clipcurate"), "--runs-dir", str(work / "runs"), "ingest", str(world / "urls.parquet"),
                               "--run", "b", "--config", str(cfg), "--workers", "0"], env)
                    ours_s.append(s)
                else:
                    s = timed([sys.executable, "-c", BARE, str(world / "www"), str(world / "urls.parquet"), str(work / "bare"),
                               str(args.processes), str(args.threads)], env)
                    bare_s.append(s)
                print(f"{which}: {s:.1f} s ({rows / s:.0f} URL rows/s)", flush=True)
        m = json.loads((work / "runs" / "b" / "00_ingest" / "_manifest.json").read_text())
        best_ours, best_bare = min(ours_s), min(bare_s)
        result = {
            "what": "ingest wall time (subprocess, imports included) vs bare img2dataset.download on the same loopback server and URL list",
            "url_rows": rows,
            "unique_urls": m["download"]["unique_urls"],
            "note": "bare img2dataset fetches every URL row (duplicate URLs included); ours fetches each unique URL once "
                    "and then converts to the row schema (uids, captions per URL, rejected rows with reasons)",
            "rows_kept": m["rows_out"],
            "rows_rejected": m["rejected"],
            "processes": args.processes,
            "threads": args.threads,
            "ours_seconds": [round(x, 2) for x in ours_s],
            "bare_seconds": [round(x, 2) for x in bare_s],
            "ours_rows_per_s_best": round(rows / best_ours, 1),
            "bare_rows_per_s_best": round(rows / best_bare, 1),
            "ratio_ours_over_bare": round(best_bare / best_ours, 3),
            "goal": ">= 0.90",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_after": os.getloadavg()},
        }
        out = ROOT / "bench" / "results" / "ingest.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
