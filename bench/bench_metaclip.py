"""metaclip benchmark: captions/s of our matchers vs MetaCLIP's reference matcher, and the stage end to end.

Captions: Flickr8k (40,450) + the LAION 10k sample (10,000) from ../shared/data, repeated 20x to 1,009,000
(repeats change nothing for a matcher: every caption is matched afresh). Entries: the WordNet list.
Per core: this process runs with POLARS_MAX_THREADS=1 (set before polars is imported), so every matcher
uses one core. The reference (per-caption spacing + automaton.iter + set, as MetaCLIP's
substr_matching.py) runs in the same process on the same captions; every matcher's output is asserted
identical to it. Ours runs per 100,900-caption batch (one shard); polars' figure includes the automaton
it rebuilds on every call. Then the stage end to end (collect + merge + apply, t = 20000) on 10 shards,
in-process and on a 2-worker Dask LocalCluster. The machine is shared: each figure records
os.getloadavg() before it. Timing runs in --trials rounds (default 5), each timing the reference and then every
matcher, cyclic GC off: a speedup is the median of the per-round ratios (the VM's speed drifts between
minutes), captions/s come from median times; every trial is kept in the JSON.

    .venv/bin/python bench/bench_metaclip.py [--repeat 20] [--out bench/results/metaclip.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("POLARS_MAX_THREADS", "1")

import argparse
import gc
import statistics
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def ref_spacing(text):
    spaced = f" {text} "
    for punct in [",", ".", ";", ":", "?", "!", "`"]:
        spaced = spaced.replace(punct, f" {punct} ")
    for ch in ["\t", "\n", "\r"]:
        spaced = spaced.replace(ch, " ")
    return spaced


def timed(fn, trials: int):
    """(last result, seconds per trial), cyclic GC off while timing (the same for every contender)."""
    times, out = [], None
    for _ in range(trials):
        out = None  # the previous trial's result freed before the next starts
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return out, times


def load() -> dict:
    return dict(zip(("load1", "load5", "load15"), (round(x, 2) for x in os.getloadavg())))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--batch", type=int, default=100_900)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "metaclip.json"))
    ap.add_argument("--skip-stage", action="store_true")
    ap.add_argument("--trials", type=int, default=5, help="rounds; each times the reference, then every matcher "
                    "(this VM's speed drifts by 20%% between runs a minute apart)")
    args = ap.parse_args()

    import ahocorasick
    import numpy as np
    import polars as pl

    from metadata import concepts
    from stages.metaclip import MATCHERS, Matcher

    flickr = pl.read_parquet(DATA / "flickr8k_captions" / "flickr8k_captions.parquet")["caption"]
    laion = pl.read_parquet(DATA / "laion_sample_10k" / "laion_sample_10k.parquet")["text"]
    base = pl.concat([flickr, laion]).cast(pl.String)
    texts = pl.concat([base] * args.repeat)
    n = len(texts)
    entries = concepts.wordnet_entries()
    result: dict = {
        "captions": n, "unique_captions": len(base), "sources": "flickr8k captions + laion 10k sample, repeated",
        "entries": len(entries), "entry_list": "WordNet 3.0 (metadata.concepts.wordnet_entries)",
        "polars_max_threads": os.environ["POLARS_MAX_THREADS"], "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "polars": pl.__version__,
        "note": "2-core VM, no other work running; its speed drifts ~20% within minutes, hence paired rounds",
        "matchers": {},
    }

    # the reference: MetaCLIP's substr_matching.py, reimplemented (automaton values (id, key), per caption)
    t0 = time.perf_counter()
    ref_auto = ahocorasick.Automaton()
    for idx, e in enumerate(entries):
        ref_auto.add_word(f" {e} ", (idx, e))
    ref_auto.make_automaton()
    build = time.perf_counter() - t0
    la = load()
    py_texts = texts.to_list()
    # the reference at its best: Python's cyclic GC off while it runs (otherwise the 1M result lists it keeps
    # trigger repeated full collections: 9.6 s instead of ~7 s on this machine, a handicap that is not MetaCLIP's)

    def run_reference():
        ref = []
        for text in py_texts:
            ids = set()
            for _end, (entry_id, _value) in ref_auto.iter(ref_spacing(text)):
                ids.add(entry_id)
            ref.append(list(ids))
        return ref

    matchers, builds = {}, {}
    for backend in MATCHERS:
        t0 = time.perf_counter()
        matchers[backend] = Matcher(entries, backend)
        builds[backend] = time.perf_counter() - t0
        matchers[backend].match(texts.head(10))  # first-call imports (pyarrow's lazy modules) out of the timing

    # Rounds, each timing the reference and then every matcher: this VM's speed drifts by 20% within minutes,
    # so each speedup is a ratio within one round (same conditions), and the median over rounds is reported.
    times: dict[str, list[float]] = {"reference": [], **{b: [] for b in MATCHERS}}
    ref = None
    for r in range(args.trials):
        out, (secs,) = timed(run_reference, 1)
        times["reference"].append(secs)
        if ref is None:
            ref = [sorted(x) for x in out]  # the reference returns list(set): order is not part of its output
        del out
        for backend, m in matchers.items():
            outs, (secs,) = timed(lambda: [m.match(texts.slice(i, args.batch)) for i in range(0, n, args.batch)], 1)
            times[backend].append(secs)
            if r == 0:
                got = [x for o in outs for x in o.to_pylist()]
                assert got == ref, f"{backend}: output differs from the reference"
                del got
            del outs
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    del ref_auto
    secs = statistics.median(times["reference"])
    hits = sum(map(len, ref))
    result["reference"] = {"build_s": round(build, 2), "match_s": round(secs, 2),
                           "trials_s": [round(t, 2) for t in times["reference"]],
                           "captions_per_s_per_core": round(n / secs), "entry_hits": hits, "loadavg_before": la}
    print(f"reference: {n / secs:,.0f} captions/s (median {secs:.1f} s, {hits} hits), load {la}", flush=True)
    for backend in MATCHERS:
        secs = statistics.median(times[backend])
        ratios = [rt / mt for rt, mt in zip(times["reference"], times[backend])]
        result["matchers"][backend] = {
            "build_s": round(builds[backend], 2), "match_s": round(secs, 2),
            "trials_s": [round(t, 2) for t in times[backend]], "captions_per_s_per_core": round(n / secs),
            "speedup_vs_reference": round(statistics.median(ratios), 2),  # median of the per-round ratios
            "speedup_per_round": [round(x, 2) for x in ratios],
            "identical_to_reference": True,
        }
        print(f"{backend}: {n / secs:,.0f} captions/s (median {secs:.2f} s, build {builds[backend]:.1f} s), "
              f"x{statistics.median(ratios):.2f} vs reference (per round {[round(x, 2) for x in ratios]})",
              flush=True)
    del matchers
    best = max(result["matchers"], key=lambda b: result["matchers"][b]["captions_per_s_per_core"])
    result["fastest_matcher"] = best

    if not args.skip_stage:
        from pipeline import config as config_mod
        from pipeline import shards
        from pipeline.runner import run_pipeline
        from pipeline.schema import compute_uid
        from stages.metaclip import MetaClipStage
        import pyarrow as pa

        tmp = Path(tempfile.mkdtemp(prefix="bench_metaclip_"))
        try:
            inp = tmp / "in"
            inp.mkdir()
            tl = texts.to_list()
            urls = [f"http://bench.invalid/{i}.jpg" for i in range(n)]
            table = pa.table({"uid": compute_uid(urls, tl), "url": urls, "text": tl})
            for k, i in enumerate(range(0, n, args.batch)):
                shards.write_shard(table.slice(i, args.batch), str(inp / f"part-{k:05d}.parquet"))
            result["stage"] = {"shards": len(list(inp.glob("*.parquet"))), "t": 20000}
            for matcher in (MetaClipStage.Config().matcher,):  # the default
                for workers in (0, 2):
                    cfg = config_mod.resolve({"metaclip": {"matcher": matcher}})
                    la = load()
                    t0 = time.perf_counter()
                    (res,) = run_pipeline(["metaclip"], str(tmp / f"run{workers}"), cfg, input_dir=str(inp),
                                          workers=workers)
                    secs = time.perf_counter() - t0
                    m = res.manifest
                    result["stage"][f"{matcher}_workers_{workers}"] = {
                        "wall_s": round(secs, 2), "captions_per_s": round(n / secs), "timings": m["timings"],
                        "rows_out": m["rows_out"], "reasons": m["reasons"], "loadavg_before": la,
                        "includes": "cluster start, matcher build per worker, collect (match, cached) + merge + "
                                    "apply (takes the cached matches, samples) + Parquet reads/writes",
                    }
                    print(f"stage ({matcher}, workers={workers}): {secs:.1f} s, {n / secs:,.0f} captions/s, "
                          f"{m['rows_out']} kept, {m['reasons']}, load {la}", flush=True)
            a = pl.read_parquet(str(tmp / "run0" / "02_metaclip" / "part-*.parquet")).sort("uid")
            b = pl.read_parquet(str(tmp / "run2" / "02_metaclip" / "part-*.parquet")).sort("uid")
            assert a.equals(b), "0 vs 2 workers differ"
            result["stage"]["workers_0_vs_2_identical"] = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    result["loadavg_end"] = load()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
