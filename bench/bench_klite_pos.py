"""How often klite's part-of-speech tagger changes the chosen concept, on real captions; writes
bench/results/klite_pos.json.

    .venv/bin/python bench/bench_klite_pos.py

For Flickr8k's 40,450 captions and LAION-10k's 10,000 alt-texts (../shared/data; each set is its own pool):
the klite stage with `pos_tagger = "none"` (morphy alone, the old rule) and with `pos_tagger = "spacy"`, each
one in-process collect/merge/apply. Reported per set: captions enriched each way, captions whose chosen
concept differs (split into "now none": the tagger left the caption no noun candidate, and "other concept"),
the concepts most often dropped, random examples (seeded), and the seconds each way (2 shared cores: noisy).
Needs ../shared/data (reference data for benchmarks only) and the tagger model (make setup).
"""

from __future__ import annotations

import json
import os
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
}


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


def main() -> int:
    if tagger_id("spacy") == "missing":
        print("no spaCy English model installed: run make setup", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    morphy = KLiteStage({"pos_tagger": "none"}).ensure_ready()
    tagged = KLiteStage({"pos_tagger": "spacy"}).ensure_ready()
    setup_s = time.perf_counter() - t0
    out = {"bench": "klite_pos", "machine": f"{os.cpu_count()} cores", "timed": "collect + merge + apply on one shard, as the runner calls them (apply takes collect's candidates)", "loadavg_end": None,
           "tagger": tagger_id("spacy"), "setup_s_both_stages": round(setup_s, 1), "sets": {}}
    for name, (path, col) in SETS.items():
        texts = pl.read_parquet(path)[col].cast(pl.String)
        with tempfile.TemporaryDirectory() as folder:
            a, sa = choose(morphy, texts, folder)
            b, sb = choose(tagged, texts, folder)
        n = len(texts)
        changed = [i for i in range(n) if a[i] != b[i]]
        now_none = [i for i in changed if b[i] is None]
        other = [i for i in changed if b[i] is not None]
        newly = [i for i in changed if a[i] is None]
        rng = random.Random(0)
        examples = [{"text": texts[i], "morphy": a[i], "tagged": b[i]} for i in sorted(rng.sample(changed, min(12, len(changed))))]
        res = {
            "captions": n,
            "enriched_morphy": n - a.count(None),
            "enriched_tagged": n - b.count(None),
            "changed": len(changed),
            "changed_share": round(len(changed) / n, 4),
            "changed_to_none": len(now_none),
            "changed_to_other_concept": len(other),
            "changed_from_none": len(newly),
            "most_dropped_concepts": Counter(a[i] for i in changed if a[i]).most_common(15),
            "examples": examples,
            "seconds_morphy": round(sa, 1),
            "seconds_tagged": round(sb, 1),
            "captions_per_s_tagged": round(n / sb, 1),
        }
        out["sets"][name] = res
        print(f"{name}: {len(changed)} of {n} captions change ({100 * len(changed) / n:.1f}%): "
              f"{len(now_none)} now none, {len(other)} another concept; morphy {sa:.1f} s, tagged {sb:.1f} s")
        for e in examples[:6]:
            print(f"   {e['morphy']!s:>16} -> {e['tagged']!s:<16} {e['text'][:90]}")
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    dest = ROOT / "bench" / "results" / "klite_pos.json"
    dest.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"-> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
