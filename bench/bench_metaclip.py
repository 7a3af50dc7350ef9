"""metaclip benchmark: captions/s of our matchers vs MetaCLIP's reference matcher, and the stage end to end.

Entries: the WordNet list (148,730). Three caption sets from ../shared/data, each repeated to --captions
(default 300,000; repeats change nothing for a matcher: every caption is matched afresh):
  tuning               Flickr8k train + dev + unsplit captions: the set the matcher was profiled and tuned on;
  heldout_flickr_test  Flickr8k's test split only, and
  heldout_laion        the LAION 10k sample only (raw web alt-text): both kept apart from tuning.
Per core: this process runs with POLARS_MAX_THREADS=1 (set before polars is imported), so every matcher
uses one core. The reference (per-caption spacing + automaton.iter + set, as MetaCLIP's substr_matching.py)
runs in the same process on the same captions; every matcher's output at every batch size is asserted
identical to it. The stage's matcher (the token trie) runs at every --batches size (captions per `match` call:
10k is ingest's shard size); its contenders, the two Aho-Corasick matchers of bench/contender_matchers.py
(pyahocorasick, polars), at the largest only (polars' figure includes the automaton it rebuilds on every call). Timing runs in --trials rounds (default 5) per set, each timing the reference and
then every contender, cyclic GC off: a speedup is the median of the per-round ratios (the VM's speed drifts
between minutes), captions/s come from median times; every trial is kept in the JSON. Then the stage end to
end (collect + merge + apply, t = 20000) on Flickr8k + LAION repeated 20x in 10 shards, in-process and on a
2-worker Dask LocalCluster; each stage figure records os.getloadavg() before it.

    .venv/bin/python bench/bench_metaclip.py [--captions 300000] [--batches 10000,50000,100000] [--skip-stage]
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
    """(last result, wall seconds per trial, CPU seconds per trial), cyclic GC off while timing (the same for
    every contender). CPU time (time.process_time: this process, all its threads) is the per-core cost; it
    is less moved than wall time by other work on a shared VM, which deschedules this process."""
    times, cpu, out = [], [], None
    for _ in range(trials):
        out = None  # the previous trial's result freed before the next starts
        gc.collect()
        gc.disable()
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        finally:
            gc.enable()
    return out, times, cpu


def load() -> dict:
    return dict(zip(("load1", "load5", "load15"), (round(x, 2) for x in os.getloadavg())))


CAPTION_SETS = {
    # name: (what, loader); the matcher was tuned on the first only, the other two are kept apart from it
    "tuning": "Flickr8k train + dev + unsplit captions (35,450): the set the matcher was profiled and tuned on",
    "heldout_flickr_test": "Flickr8k official test split only (5,000 captions): never used while tuning",
    "heldout_laion": "LAION 10k sample only (10,000 raw web alt-texts): never used while tuning",
}


def caption_sets(pl) -> dict:
    fl = pl.read_parquet(DATA / "flickr8k_captions" / "flickr8k_captions.parquet")
    laion = pl.read_parquet(DATA / "laion_sample_10k" / "laion_sample_10k.parquet")["text"]
    return {
        "tuning": fl.filter(pl.col("split") != "test")["caption"].cast(pl.String),
        "heldout_flickr_test": fl.filter(pl.col("split") == "test")["caption"].cast(pl.String),
        "heldout_laion": laion.cast(pl.String),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=300_000, help="captions per set (each set repeated to this)")
    ap.add_argument("--batches", default="10000,50000,100000", help="captions per Matcher.match call")
    ap.add_argument("--sets", default=",".join(CAPTION_SETS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "metaclip.json"))
    ap.add_argument("--skip-stage", action="store_true")
    ap.add_argument("--stage-repeat", type=int, default=20, help="the stage run: Flickr8k + LAION repeated")
    ap.add_argument("--stage-batch", type=int, default=100_900, help="the stage run: rows per shard")
    ap.add_argument("--trials", type=int, default=5, help="rounds; each times the reference, then every matcher "
                    "at every batch size (this VM's speed drifts by 20%% between runs a minute apart)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    big = max(batches)

    import ahocorasick
    import numpy as np
    import polars as pl

    from metadata import concepts
    from bench.contender_matchers import CONTENDERS
    from stages.metaclip import DEFAULT_MATCHER, Matcher

    entries = concepts.wordnet_entries()
    all_sets = caption_sets(pl)
    result: dict = {
        "captions_per_set": args.captions, "batches": batches,
        "entries": len(entries), "entry_list": "WordNet 3.0 (metadata.concepts.wordnet_entries)",
        "polars_max_threads": os.environ["POLARS_MAX_THREADS"], "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "polars": pl.__version__,
        "note": "2-core VM shared with other work; its speed drifts by tens of percent within minutes, hence "
                "paired rounds: each round times the reference and then every matcher on the same captions",
        "reference_is": "MetaCLIP's substr_matching.py loop: per caption spacing() + automaton.iter over the "
                        "spaced entries + set (its automaton values (id, key)); far faster than the older "
                        "`for entry: entry in text` loop, so the stricter baseline",
        "sets": {},
    }

    # the reference: MetaCLIP's substr_matching.py, reimplemented (automaton values (id, key), per caption)
    t0 = time.perf_counter()
    ref_auto = ahocorasick.Automaton()
    for idx, e in enumerate(entries):
        ref_auto.add_word(f" {e} ", (idx, e))
    ref_auto.make_automaton()
    result["reference_build_s"] = round(time.perf_counter() - t0, 2)

    def run_reference(py_texts):
        ref = []
        for text in py_texts:
            ids = set()
            for _end, (entry_id, _value) in ref_auto.iter(ref_spacing(text)):
                ids.add(entry_id)
            ref.append(list(ids))
        return ref

    matchers, builds = {}, {}
    for backend, build in {DEFAULT_MATCHER: Matcher, **CONTENDERS}.items():
        t0 = time.perf_counter()
        matchers[backend] = build(entries)
        builds[backend] = round(time.perf_counter() - t0, 2)
        matchers[backend].match(pl.Series(["a dog", "x"]))  # first-call imports (pyarrow's lazy modules) out of the timing
    result["build_s"] = builds
    # contenders: the stage's matcher at every batch size; the Aho-Corasick ones at the largest batch only
    # (polars rebuilds its automaton on every call, ~0.5 s, so small batches would only measure that)
    contenders = [(DEFAULT_MATCHER, b) for b in batches] + [(m, big) for m in CONTENDERS]

    for set_name in args.sets.split(","):
        base = all_sets[set_name]
        reps = -(-args.captions // len(base))
        texts = pl.concat([base] * reps).head(args.captions)
        n = len(texts)
        py_texts = texts.to_list()
        # the fixed cost of one call, whatever its size: 10 captions, best of 20
        m0 = matchers[DEFAULT_MATCHER]
        few = texts.head(10)
        _, small, _ = timed(lambda: m0.match(few), 20)
        times: dict[str, list[float]] = {"reference": [], **{f"{m}@{b}": [] for m, b in contenders}}
        cpu: dict[str, list[float]] = {k: [] for k in times}
        ref = None
        for r in range(args.trials):
            out, (secs,), (c,) = timed(lambda: run_reference(py_texts), 1)
            times["reference"].append(secs)
            cpu["reference"].append(c)
            if ref is None:
                ref = [sorted(x) for x in out]  # the reference returns list(set): order is not its output
            del out
            for backend, b in contenders:
                m = matchers[backend]
                outs, (secs,), (c,) = timed(lambda: [m.match(texts.slice(i, b)) for i in range(0, n, b)], 1)
                times[f"{backend}@{b}"].append(secs)
                cpu[f"{backend}@{b}"].append(c)
                if r == 0:
                    got = [x for o in outs for x in o.to_pylist()]
                    assert got == ref, f"{set_name}: {backend} at {b} per call: output differs from the reference"
                    del got
                del outs
            print(f"{set_name} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  flush=True)
        secs = statistics.median(times["reference"])
        res = {
            "what": CAPTION_SETS[set_name], "unique_captions": len(base), "captions": n,
            "mean_chars": round(float(base.str.len_chars().mean()), 1),
            "reference": {"match_s": round(secs, 3), "trials_s": [round(t, 3) for t in times["reference"]],
                          "cpu_trials_s": [round(t, 3) for t in cpu["reference"]],
                          "captions_per_s_per_core": round(n / secs),
                          "captions_per_cpu_s": round(n / statistics.median(cpu["reference"])),
                          "entry_hits": sum(map(len, ref))},
            "loadavg_after": load(),
            "call_overhead_ms_10_captions": round(1000 * min(small), 2),
            "matchers": {},
        }
        print(f"{set_name}: reference {n / secs:,.0f} captions/s; a 10-caption call {1000 * min(small):.2f} ms",
              flush=True)
        for backend, b in contenders:
            ts = times[f"{backend}@{b}"]
            secs = statistics.median(ts)
            ratios = [rt / mt for rt, mt in zip(times["reference"], ts)]
            cs = cpu[f"{backend}@{b}"]
            cpu_ratios = [rt / mt for rt, mt in zip(cpu["reference"], cs)]
            res["matchers"].setdefault(backend, {})[str(b)] = {
                "match_s": round(secs, 3), "trials_s": [round(t, 3) for t in ts],
                "cpu_trials_s": [round(t, 3) for t in cs],
                "captions_per_s_per_core": round(n / secs),
                "captions_per_cpu_s": round(n / statistics.median(cs)),
                "speedup_vs_reference": round(statistics.median(ratios), 2),  # median of the per-round ratios
                "speedup_per_round": [round(x, 2) for x in ratios],
                "cpu_speedup_vs_reference": round(statistics.median(cpu_ratios), 2),  # the same, in CPU time
                "cpu_speedup_per_round": [round(x, 2) for x in cpu_ratios],
                "identical_to_reference": True,
            }
            print(f"  {backend} at {b:,} per call: {n / secs:,.0f} captions/s, x{statistics.median(ratios):.2f} "
                  f"vs reference (per round {[round(x, 2) for x in ratios]}); CPU time "
                  f"x{statistics.median(cpu_ratios):.2f} ({[round(x, 2) for x in cpu_ratios]})", flush=True)
        result["sets"][set_name] = res
        del ref, py_texts
    del ref_auto, matchers
    result["goal"] = ">= 3x the reference per core at 10k, 50k and 100k captions per call, identical output"
    default = [v for st in result["sets"].values() for v in st["matchers"][DEFAULT_MATCHER].values()]
    result["goal_met_wall"] = all(v["speedup_vs_reference"] >= 3.0 for v in default)
    result["goal_met_cpu"] = all(v["cpu_speedup_vs_reference"] >= 3.0 for v in default)

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
            fl = pl.read_parquet(DATA / "flickr8k_captions" / "flickr8k_captions.parquet")["caption"]
            laion = pl.read_parquet(DATA / "laion_sample_10k" / "laion_sample_10k.parquet")["text"]
            texts = pl.concat([pl.concat([fl, laion]).cast(pl.String)] * args.stage_repeat)
            n = len(texts)
            tl = texts.to_list()
            urls = [f"http://bench.invalid/{i}.jpg" for i in range(n)]
            table = pa.table({"uid": compute_uid(urls, tl), "url": urls, "text": tl})
            for k, i in enumerate(range(0, n, args.stage_batch)):
                shards.write_shard(table.slice(i, args.stage_batch), str(inp / f"part-{k:05d}.parquet"))
            result["stage"] = {"shards": len(list(inp.glob("*.parquet"))), "t": 20000, "captions": n,
                               "sources": "flickr8k captions + laion 10k sample, repeated"}
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
