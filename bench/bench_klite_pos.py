"""klite's part-of-speech tagger on real captions: what it changes, what it costs, and whether the fast path
(the default, "auto"/"spacy") gives the reference's output (`pos_tagger = "every"`); writes
bench/results/klite_pos.json.

    .venv/bin/python bench/bench_klite_pos.py [--rounds 3]

Sets (../shared/data; each set is its own pool, one shard): Flickr8k's 40,450 captions, LAION-10k's 10,000
alt-texts, and a held-out set nothing was tuned on: COCO-mini's 1,195 captions (5 per image; never read
while the fast path was built). Per set, in one process on one core (OPENBLAS/OMP/POLARS threads = 1), the
klite stage three ways, `pos_tagger = "none"` (morphy alone), "every" (the reference: every caption through
`nlp.pipe`) and "spacy" (the fast path), each timed as the runner calls it (collect + merge + apply on one
shard, apply taking collect's candidates), in paired rounds (the three ways back to back, order rotated each
round), medians reported. Reported: captions/s each way and as a ratio to morphy alone (the issue's goal for
the tagger: >= 0.25x), the fast path's concept agreement with "every" (and whether the candidates, hence the
pool counts, are identical), how often the tagger changes the choice against morphy alone (now none / other
concept, the concepts most dropped, seeded examples), and the load average (2 shared cores: noisy).
Ablation (tagger calls only, not the stage): each of the fast path's steps added in turn, on the first 5,000
captions of Flickr8k and LAION, with the noun flags of the fast path and the reference compared token by token. Needs ../shared/data and the tagger model (make setup).
"""

from __future__ import annotations

import json
import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS"):
    os.environ[_v] = "1"  # one core: before numpy and polars load
import argparse
import statistics
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.klite import KLiteStage, tagger_id  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SETS = {
    "flickr8k_captions": (DATA / "flickr8k_captions" / "flickr8k_captions.parquet", "caption"),
    "laion_sample_10k": (DATA / "laion_sample_10k" / "laion_sample_10k.parquet", "text"),
    "heldout_coco_mini_captions": (DATA / "coco_mini_images" / "coco_mini_images.parquet", "captions"),
}


def load_texts(path, col) -> pl.Series:
    s = pl.read_parquet(path, columns=[col])[col]
    return (s.explode(empty_as_null=True) if s.dtype == pl.List(pl.String) else s).cast(pl.String).rename("text")


def choose(stage: KLiteStage, texts: pl.Series, folder: str) -> tuple[list, float]:
    """collect, merge, apply as the runner calls them on one shard (a stage folder given, so apply takes the
    candidates collect found: the tagger runs once per caption)."""
    from pipeline.schema import compute_uid

    urls = [f"http://bench.invalid/{i}" for i in range(len(texts))]
    table = pa.table({"uid": compute_uid(urls, texts.to_list()), "text": texts.to_arrow()})
    from pipeline.context import ShardContext

    ctx = ShardContext(stage=stage.name, stage_dir=folder, shard="part-00000.parquet")
    t0 = time.perf_counter()
    stats = stage.merge([stage.collect(table, ctx)])
    kept, _ = stage.apply(table, stats, ctx)
    return kept.column("klite_concept").to_pylist(), time.perf_counter() - t0


def ablation(texts: pl.Series, rounds: int) -> dict:
    """The tagger call alone, its steps added in turn, on the captions' cased token lists: seconds (median)."""
    import spacy
    from spacy.tokens import Doc

    from stages.klite import tagger as T
    from stages.klite.wordnet import TOKEN_RE, normalise

    sample = T.cased_tokens(texts, normalise(texts).str.extract_all(TOKEN_RE))

    name = tagger_id("spacy").split(":", 1)[1].split("==")[0]

    def nlp():
        return spacy.load(name, exclude=["parser", "ner", "lemmatizer", "senter", "attribute_ruler"])

    m = KLiteStage({"pos_tagger": "none"}).ensure_ready().candidates(texts)  # rows with a matched n-gram (the captions the fast path tags)
    need = [sample[i] for i in sorted(set(m["row"].to_list()))]
    variants = {
        "every: nlp.pipe, all captions": (T._every_tagger(nlp(), Doc), sample),
        "+ only captions with a match": (T._every_tagger(nlp(), Doc), need),
        "+ distinct token lists (BLIS)": (T._fast_tagger(nlp(), Doc, numpy_gemm=False), need),
        "+ numpy BLAS for the matrix products (the fast path)": (T._fast_tagger(nlp(), Doc), need),
    }
    times = {k: [] for k in variants}
    for r in range(rounds):
        for k, (f, data) in variants.items():
            t0 = time.perf_counter()
            f(data)
            times[k].append(time.perf_counter() - t0)
    ref = [list(x) for x in variants["every: nlp.pipe, all captions"][0](need)]
    got = [list(map(bool, x)) for x in variants["+ numpy BLAS for the matrix products (the fast path)"][0](need)]
    diff = sum(a != b for x, y in zip(ref, got) for a, b in zip(x, y))
    base = statistics.median(times["every: nlp.pipe, all captions"])
    return {"captions": len(sample), "captions_with_a_match": len(need),
            "distinct_token_lists_with_a_match": len({tuple(x) for x in need}),
            "tokens_tagged_by_both": sum(len(x) for x in ref), "noun_flags_differing_fast_vs_every": diff,
            "seconds_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
            "speedup_vs_every": {k: round(base / statistics.median(v), 2) for k, v in times.items()}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="first N captions of each set (a smoke run; no json written)")
    args = ap.parse_args()
    if tagger_id("spacy") == "missing":
        print("no spaCy English model installed: run make setup", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    ways = {"none": KLiteStage({"pos_tagger": "none"}).ensure_ready(),
            "every": KLiteStage({"pos_tagger": "every"}).ensure_ready(),
            "fast": KLiteStage({"pos_tagger": "spacy"}).ensure_ready()}
    setup_s = time.perf_counter() - t0
    out = {"bench": "klite_pos", "machine": f"{os.cpu_count()} cores (shared)", "threads": "1 (OPENBLAS/OMP/MKL/POLARS)",
           "timed": "collect + merge + apply on one shard, as the runner calls them (apply takes collect's candidates); "
                    f"medians of {args.rounds} paired rounds (none, every, fast back to back, order rotated)",
           "loadavg_start": [round(x, 2) for x in os.getloadavg()], "loadavg_end": None,
           "tagger": tagger_id("spacy"), "setup_s_three_stages": round(setup_s, 1),
           "goal": "fast path >= 0.25x morphy alone; concept agreement with every >= 99.5% (100% where exact)", "sets": {}}
    for name, (path, col) in SETS.items():
        texts = load_texts(path, col)
        texts = texts.head(args.limit) if args.limit else texts
        secs = {k: [] for k in ways}
        res_by = {}
        for r in range(args.rounds):
            order = list(ways)[r % 3:] + list(ways)[:r % 3]
            for k in order:
                with tempfile.TemporaryDirectory() as folder:
                    res_by[k], dt = choose(ways[k], texts, folder)
                secs[k].append(dt)
        a, b, f = res_by["none"], res_by["every"], res_by["fast"]
        n = len(texts)
        same_cands = ways["every"].candidates(texts).sort(["row", "lemma_id"]).equals(
            ways["fast"].candidates(texts).sort(["row", "lemma_id"]))
        agree = sum(x == y for x, y in zip(b, f))
        med = {k: statistics.median(v) for k, v in secs.items()}
        changed = [i for i in range(n) if a[i] != b[i]]
        now_none = [i for i in changed if b[i] is None]
        other = [i for i in changed if b[i] is not None]
        newly = [i for i in changed if a[i] is None]
        rng = random.Random(0)
        examples = [{"text": texts[i], "morphy": a[i], "tagged": b[i]} for i in sorted(rng.sample(changed, min(12, len(changed))))]
        res = {
            "captions": n,
            "captions_per_s": {k: round(n / v, 1) for k, v in med.items()},
            "seconds_median": {k: round(v, 3) for k, v in med.items()},
            "seconds_rounds": {k: [round(x, 3) for x in v] for k, v in secs.items()},
            "ratio_to_morphy_alone": {"every": round(med["none"] / med["every"], 4), "fast": round(med["none"] / med["fast"], 4)},
            "fast_speedup_vs_every": round(med["every"] / med["fast"], 2),
            "fast_concept_agreement_with_every": round(agree / n, 6),
            "fast_candidates_identical_to_every": same_cands,
            "enriched_morphy": n - a.count(None),
            "enriched_tagged": n - b.count(None),
            "changed": len(changed),
            "changed_share": round(len(changed) / n, 4),
            "changed_to_none": len(now_none),
            "changed_to_other_concept": len(other),
            "changed_from_none": len(newly),
            "most_dropped_concepts": Counter(a[i] for i in changed if a[i]).most_common(15),
            "examples": examples,
        }
        out["sets"][name] = res
        print(f"{name}: {n} captions/s none {n / med['none']:.0f}, every {n / med['every']:.0f}, fast {n / med['fast']:.0f} "
              f"(fast/none {med['none'] / med['fast']:.3f}x, fast/every {med['every'] / med['fast']:.2f}x); "
              f"agreement {agree}/{n}, candidates identical {same_cands}; morphy->tagged changes {len(changed)}", flush=True)
    k = min(5000, args.limit or 5000)
    sample = pl.concat([load_texts(*SETS["flickr8k_captions"]).head(k), load_texts(*SETS["laion_sample_10k"]).head(k)])
    out["ablation_tagger_calls"] = ablation(sample, args.rounds)
    print("ablation:", json.dumps(out["ablation_tagger_calls"]["seconds_median"]), flush=True)
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    dest = ROOT / "bench" / "results" / "klite_pos.json"
    if args.limit:
        print(json.dumps(out)[:3000])
        return 0
    dest.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"-> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
