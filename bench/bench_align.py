"""Benchmark of the align stage: share dropped per rule on real captions, and throughput + peak memory on
>= 1M text-only captions built from them, with 1 and 2 Dask workers. Writes bench/results/align.json.

    .venv/bin/python bench/bench_align.py [--rows 1000000] [--shards 20]

The big pool resamples LAION-10k and Flickr8k captions with light perturbation (case, punctuation, a
dropped last word, a one-character typo) and keeps the source url for 70% of rows (the same "image" with
a near-identical caption, so dedup has work) and a fresh url for the rest. Text-only: the url stands in for
the image (see stages/align/). Timings on a shared 2-core machine are noisy: the load average at start
and end of each measurement is recorded next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import config as config_mod  # noqa: E402
from pipeline import shards  # noqa: E402
from pipeline.runner import run_pipeline  # noqa: E402
from pipeline.schema import compute_uid  # noqa: E402
from stages.align import REASONS, AlignStage  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
LAION = DATA / "laion_sample_10k" / "laion_sample_10k.parquet"
FLICKR = DATA / "flickr8k_captions" / "flickr8k_captions.parquet"


def load_real() -> dict[str, pa.Table]:
    a = pl.read_parquet(LAION).select("url", "text")
    b = pl.read_parquet(FLICKR)
    b = pl.DataFrame({"url": ("flickr8k/" + b["image"]), "text": b["caption"]})  # 5 captions per image
    out = {}
    for name, df in (("laion_sample_10k", a), ("flickr8k_captions", b)):
        url, text = df["url"].to_arrow(), df["text"].to_arrow()
        out[name] = pa.table({"uid": compute_uid(url, text), "url": url, "text": text})
    return out


def shares(table: pa.Table, cfg: dict | None = None) -> dict:
    """Share of rows dropped per rule (first broken rule), one in-process collect/merge/apply."""
    st = AlignStage(cfg or {}).ensure_ready()
    ctx = st.detached()
    t0 = time.perf_counter()
    stats = st.merge([st.collect(table, ctx)])
    kept, rej = st.apply(table, stats, ctx)
    secs = time.perf_counter() - t0
    c = Counter(rej.column("reason").to_pylist())
    n = table.num_rows
    text_rules = ("too_few_words", "too_many_words", "rare_token")
    return {
        "rows": n,
        "kept_share": round(kept.num_rows / n, 4),
        "kept_share_text_rules": round(1 - sum(c[r] for r in text_rules) / n, 4),
        "dropped_share": {r: round(c[r] / n, 4) for r in REASONS if c[r]},
        "seconds_in_process": round(secs, 2),
        "notes": ctx.notes,
    }


def build_pool(real: dict[str, pa.Table], rows: int, n_shards: int, folder: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = pl.concat([pl.from_arrow(t).select("url", "text") for t in real.values()])
    idx = rng.integers(0, base.height, rows)
    df = base[idx].with_columns(r=pl.Series(rng.random(rows)), k=pl.Series(np.arange(rows)))
    t = pl.col("text")
    df = df.with_columns(
        text=pl.when(pl.col("r") < 0.15).then(t.str.to_lowercase())
        .when(pl.col("r") < 0.25).then(t + pl.lit(" ."))
        .when(pl.col("r") < 0.35).then(t.str.replace(r"\s+\S+$", ""))
        .when(pl.col("r") < 0.45).then(t.str.replace("e", "3"))
        .when(pl.col("r") < 0.50).then(t.str.to_uppercase())
        .otherwise(t),
        url=pl.when(pl.Series(rng.random(rows)) < 0.7).then(pl.col("url"))
        .otherwise(pl.col("url") + pl.lit("?v=") + pl.col("k").cast(pl.String)),
    )
    table = pa.table({"uid": compute_uid(df["url"].to_arrow(), df["text"].to_arrow()),
                      "url": df["url"].to_arrow(), "text": df["text"].to_arrow()})
    bounds = np.linspace(0, rows, n_shards + 1).astype(int)
    for i in range(n_shards):
        shards.write_shard(table.slice(bounds[i], bounds[i + 1] - bounds[i]), os.path.join(folder, f"part-{i:05d}.parquet"))


def _worker_peak_rss() -> int:
    """Peak RSS of this process's own memory since it started (or since `reset_peak_rss`), in bytes.

    Not getrusage's ru_maxrss: a child process inherits its parent's RSS at fork into ru_maxrss and keeps it
    across exec, so a Dask worker started by a driver holding a 1.5 GB pool reports >= 1.5 GB before doing
    anything (measured: worker ru_maxrss 1,505 MiB, its RSS 75 MiB). VmHWM in /proc/self/status belongs to the
    process's own address space."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux


def reset_peak_rss() -> bool:
    """Start VmHWM again from the current RSS (Linux >= 4.0: `5` in /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed_run(pool: str, workdir: str, workers: int) -> dict:
    import logging

    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    run_dir = os.path.join(workdir, f"run-w{workers}")
    try:
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        res = run_pipeline(["align"], run_dir, config_mod.resolve({}), input_dir=pool, scheduler=cluster.scheduler_address)
        wall = time.perf_counter() - t0
        load1 = os.getloadavg()
        peaks = client.run(_worker_peak_rss)
    finally:
        client.close()
        cluster.close()
    m = res[0].manifest
    stats_bytes = sum(f.stat().st_size for f in Path(run_dir, "01_align", "stats").rglob("*") if f.is_file())
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "workers": workers,
        "rows": m["rows_in"],
        "wall_s": round(wall, 1),
        "captions_per_s": round(m["rows_in"] / wall),
        "collect_s": m["timings"].get("collect_s"),
        "merge_and_save_stats_s": m["timings"].get("merge_s"),
        "apply_s": m["timings"].get("apply_s"),
        "stats_partitions": m.get("stats_partitions"),
        # what one shard's apply reads from the shuffled statistics (max, mean over shards)
        "stats_answer_mib_per_shard": {k: round(v / 2**20, 2) for k, v in m.get("stats_answer_bytes", {}).items()},
        "peak_rss_per_worker_mib": sorted(round(v / 2**20) for v in peaks.values()),
        "stats_on_disk_mib": round(stats_bytes / 2**20, 1),
        "kept_share": round(m["rows_out"] / m["rows_in"], 4),
        "dropped_share": {r: round(m["reasons"].get(r, 0) / m["rows_in"], 4) for r in REASONS if m["reasons"].get(r)},
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in load1],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "align.json"))
    args = ap.parse_args()
    if not LAION.exists() or not FLICKR.exists():
        print(f"align bench: real caption sets not found under {DATA}")
        return 1
    real = load_real()
    result = {
        "machine": {"cpus": os.cpu_count(), "note": "shared 2-core machine with other jobs running: timings are noisy; "
                    "see loadavg next to each figure"},
        "config": AlignStage.Config().__dict__,
        "real_sets": {},
        "throughput": [],
    }
    for name, t in real.items():
        result["real_sets"][name] = shares(t) | {"loadavg": [round(x, 2) for x in os.getloadavg()]}
        print(name, json.dumps(result["real_sets"][name]))
    work = tempfile.mkdtemp(prefix="bench-align-")
    try:
        pool = os.path.join(work, "pool")
        t0 = time.perf_counter()
        build_pool(real, args.rows, args.shards, pool)
        result["pool"] = {"rows": args.rows, "shards": args.shards, "build_s": round(time.perf_counter() - t0, 1),
                          "source": "LAION-10k + Flickr8k captions resampled with perturbation; 70% keep their url"}
        for w in [int(x) for x in args.workers.split(",")]:
            r = timed_run(pool, work, w)
            print(json.dumps(r))
            result["throughput"].append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["client_peak_rss_mib"] = round(_worker_peak_rss() / 2**20)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
