"""Benchmark of the klite stage: coverage on real captions, and throughput on >= 200k real captions with
0 (in-process), 1 and 2 Dask workers. Prints ten random enriched examples; writes bench/results/klite.json.

    .venv/bin/python bench/bench_klite.py [--repeat 4] [--shards 20]

The pool is Flickr8k's 40,450 captions plus LAION-10k's 10,000 alt-texts, tiled `--repeat` times (default 10: 504,500
rows; every row gets its own url so uids differ). Tiling scales every pool count by the same factor, so the
chosen concepts are those of the untiled pool. The Dask cluster is started before the clock starts; each
worker's first `setup()` (loading the cached WordNet tables, ~2 s) is inside the measurement. The machine
has 2 cores shared with other jobs: timings are noisy, so the load average at start and end of each
measurement is recorded next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
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
from metadata.glosses import cached_tables  # noqa: E402
from stages.klite import KLiteStage  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
POS_TAGGER = "none"  # --pos-tagger
LAION = DATA / "laion_sample_10k" / "laion_sample_10k.parquet"
FLICKR = DATA / "flickr8k_captions" / "flickr8k_captions.parquet"


def load_real() -> dict[str, pl.Series]:
    return {
        "flickr8k_captions": pl.read_parquet(FLICKR)["caption"],
        "laion_sample_10k": pl.read_parquet(LAION)["text"],
    }


def coverage(stage: KLiteStage, texts: pl.Series) -> dict:
    """Share of captions enriched, with that set as the pool (one in-process collect/merge/apply)."""
    t0 = time.perf_counter()
    stats = stage.merge([stage.collect(pa.table({"text": texts.to_arrow()}))])
    ch = stage.choose(texts, stats)
    secs = time.perf_counter() - t0
    n = len(texts)
    enriched = n - ch["concept"].null_count()
    top = ch["concept"].drop_nulls().value_counts(sort=True, name="n").head(10)
    return {
        "rows": n,
        "enriched": enriched,
        "coverage": round(enriched / n, 4),
        "distinct_concepts": ch["concept"].n_unique() - (1 if enriched < n else 0),
        "top_concepts": [[c, int(k)] for c, k in top.iter_rows()],
        "seconds_in_process": round(secs, 2),
    }


def build_pool(real: dict[str, pl.Series], repeat: int, n_shards: int, folder: str) -> int:
    texts = pl.concat(list(real.values()) * repeat)
    rows = len(texts)
    urls = pl.Series([f"http://bench.invalid/{i}.jpg" for i in range(rows)])
    table = pa.table({"uid": compute_uid(urls.to_arrow(), texts.to_arrow()), "url": urls.to_arrow(),
                      "text": texts.to_arrow()})
    bounds = np.linspace(0, rows, n_shards + 1).astype(int)
    os.makedirs(folder, exist_ok=True)
    for i in range(n_shards):
        shards.write_shard(table.slice(bounds[i], bounds[i + 1] - bounds[i]), os.path.join(folder, f"part-{i:05d}.parquet"))
    return rows


def timed_run(pool: str, workdir: str, workers: int, rows: int) -> dict:
    cfg = config_mod.resolve({"klite": {"pos_tagger": POS_TAGGER}})
    run_dir = os.path.join(workdir, f"run-w{workers}")
    cluster = client = None
    kw: dict = {"workers": 0}
    if workers:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        client = Client(cluster)
        kw = {"scheduler": cluster.scheduler_address}
    try:
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        res = run_pipeline(["klite"], run_dir, cfg, input_dir=pool, **kw)
        wall = time.perf_counter() - t0
        load1 = os.getloadavg()
    finally:
        if client is not None:
            client.close()
            cluster.close()
    m = res[0].manifest
    return {
        "workers": workers,
        "executor": m.get("executor"),
        "rows": rows,
        "wall_s": round(wall, 2),
        "captions_per_s": round(rows / wall),
        "timings": m["timings"],
        "shard_seconds": m["shard_seconds"],
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in load1],
        "run_dir": run_dir,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "klite.json"))
    ap.add_argument("--pos-tagger", default="none", choices=["none", "auto", "spacy"],
                    help="[klite] pos_tagger (default none: morphy alone, as klite.json was measured; the tagger's "
                         "cost and effect: bench_klite_pos.py)")
    args = ap.parse_args()
    global POS_TAGGER
    POS_TAGGER = args.pos_tagger
    if not DATA.exists():
        sys.exit(f"bench_klite: {DATA} is absent (real captions needed)")
    logging.basicConfig(level=logging.WARNING)
    import distributed  # noqa: F401  (configures its loggers on import: quiet them after)

    for noisy in ("distributed", "asyncio", "tornado"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    t0 = time.perf_counter()
    cached_tables()  # builds the WordNet tables once if this machine has none yet
    tables_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stage = KLiteStage({"pos_tagger": POS_TAGGER}).ensure_ready()
    setup_s = time.perf_counter() - t0

    real = load_real()
    cov = {name: coverage(stage, s) for name, s in real.items()}
    for name, c in cov.items():
        print(f"{name}: {c['enriched']}/{c['rows']} enriched ({100 * c['coverage']:.2f}%), "
              f"{c['distinct_concepts']} distinct concepts; top: {', '.join(x for x, _ in c['top_concepts'][:5])}")

    # ten random enriched examples (seeded), from both sets, each set being its own pool
    rng = random.Random(0)
    examples = []
    for name, s in real.items():
        stats = stage.merge([stage.collect(pa.table({"text": s.to_arrow()}))])
        kept, _ = stage.apply(pa.table({"uid": pa.array([str(i) for i in range(len(s))]), "text": s.to_arrow()}), stats)
        enriched = [i for i, c in enumerate(kept.column("klite_concept").to_pylist()) if c is not None]
        for i in sorted(rng.sample(enriched, 5)):
            examples.append({"set": name, "text_klite": kept.column("text_klite")[i].as_py()})
    print("\nten random enriched examples:")
    for e in examples:
        print(f"  [{e['set']}] {e['text_klite']}")

    work = tempfile.mkdtemp(prefix="bench-klite-")
    try:
        pool = os.path.join(work, "pool")
        rows = build_pool(real, args.repeat, args.shards, pool)
        print(f"\npool: {rows} captions in {args.shards} shards ({args.repeat}x the 50,450 real captions)")
        runs = []
        for w in (0, 1, 2):
            r = timed_run(pool, work, w, rows)
            runs.append(r)
            print(f"workers={w}: {r['wall_s']} s wall, {r['captions_per_s']} captions/s "
                  f"(collect {r['timings'].get('collect_s')} s, apply {r['timings'].get('apply_s')} s; "
                  f"load avg {r['loadavg_start'][0]} -> {r['loadavg_end'][0]})")
        # outputs must not depend on the worker count
        ref = None
        for r in runs:
            t = pl.concat([pl.read_parquet(p, columns=["uid", "text_klite"]) for p in
                           shards.list_shards(os.path.join(r.pop("run_dir"), "03_klite"))]).sort("uid")
            ref = t if ref is None else ref
            assert t.equals(ref), "klite output differs between worker counts"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "bench": "klite",
        "machine": f"{os.cpu_count()} cores (shared with other jobs: timings are noisy; see loadavg)",
        "python": sys.version.split()[0],
        "pos_tagger": POS_TAGGER,
        "tables_ready_s": round(tables_s, 2),
        "setup_s": round(setup_s, 2),
        "coverage": cov,
        "pool": {"rows": rows, "shards": args.shards, "repeat": args.repeat,
                 "source": "flickr8k_captions + laion_sample_10k, tiled"},
        "runs": runs,
        "same_output_for_all_worker_counts": True,
        "examples": examples,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
