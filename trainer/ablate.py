"""Stage ablations: DataComp's experiment in one command.

The same pool, curated with the recipe's stages switched on one after another (default recipe: raw pool,
align only, + metaclip, + klite, + dfn), each result trained with the same compute (model, steps, batch, seed) and evaluated
zero-shot on the same held-out sets. Because every stage reads the previous one's output, the variants
are the run's own stage folders: nothing is curated twice, only trained. Each variant trains into
`runs/NAME/ablation/<variant>/` (resumable: a rerun skips finished training), and the table goes to
`runs/NAME/ablation.json` (+ the run report).

    clipcurate ablate --run demo [--steps 300] [--seeds 0,1,2]

With several seeds each variant is trained once per seed and the table shows mean ± standard deviation:
a tiny model trained for minutes moves by a few points between seeds, which is as large as some of the
differences the table is meant to show.

K-LITE has two halves: knowledge-enriched captions in training (the klite stage) and knowledge prompts at
zero-shot evaluation. The "+ klite" row measures only the first. So the full pipeline's models (the "+ dfn"
variant, the same checkpoints, no extra training) are also evaluated with K-LITE's prompts
(`"{template} ; {class} , {definition}"`, trainer/evaluate.py) and reported as one more row,
"+ dfn, K-LITE prompts": classification figures only (retrieval has no class prompts: those cells are empty).
`--variants "+ dfn"` reruns just that variant (finished training is reused: only the evaluation runs).

Controls (DataComp's, and the ceiling). "Full pipeline vs raw pool" mixes two effects: fewer pairs and better
pairs. So two more variants train with the same compute:
  * "random subset": a uniform random sample of the raw pool, the size of the full pipeline's output (a new
    sample per training seed, so the spread counts the sampling too);
  * "oracle": the raw pool's rows that the world's truth labels clean (`--truth`, default the demo world's
    truth.parquet, which its world.json records): what a perfect filter would keep; the ceiling of the table.
Their rows are metadata shards under `ablation/_subsets/` naming the run's image store (no image is copied).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import statistics
import time

from pipeline import config as config_mod
from pipeline import shards
from pipeline.report import Table
from pipeline import recipe
from pipeline.errors import StageError

log = logging.getLogger("clipcurate.ablate")

RESHARDER = "emit"  # writes the last curation step's kept rows again (with bytes): not a variant of its own


def variants_of(steps: list) -> list[tuple[str, str]]:
    """(variant, recipe step it trains on) for each curation step of the run's recipe, in recipe order: the
    first step's output is the raw pool, then each step added (default recipe: raw pool, align, + metaclip,
    + klite, + dfn). The last one is the full pipeline, also evaluated with K-LITE's prompts."""
    cur = [s for s in steps if s.stage != RESHARDER]
    return [("raw pool" if i == 0 else s.name if i == 1 else f"+ {s.name}", s.name) for i, s in enumerate(cur)]


def _count_rows(folder: str) -> int:
    return sum(n for _, n in _shard_rows(folder))


def class_groups(pool: str, results: dict) -> dict:
    """Per classification set with per-class figures: its head and tail classes, the half of its class names
    the raw pool's captions name most often (word match, case-insensitive) and the rest. MetaCLIP's claim is
    that balancing helps the tail: the table shows top-1 on each half."""
    import re

    import polars as pl

    if not any(r.get("kind") == "classification" and len(r.get("per_class_top1") or {}) > 1 for r in results.values()):
        return {}
    files = [f for f, _ in _shard_rows(pool) if "text" in shards.read_schema(f).names]
    texts = pl.concat([pl.read_parquet(f, columns=["text"]) for f in files])["text"].str.to_lowercase() if files \
        else pl.Series([], dtype=pl.String)
    out = {}
    for name, r in results.items():
        per = r.get("per_class_top1") if r.get("kind") == "classification" else None
        if not per or len(per) < 2:
            continue
        freq = {c: int(texts.str.contains(rf"\b{re.escape(c.lower())}\b").sum()) for c in per}
        ranked = sorted(per, key=lambda c: (-freq[c], c))
        out[name] = {"head": ranked[: len(ranked) // 2], "tail": ranked[len(ranked) // 2:], "pool_mentions": freq}
    return out


def _headline(results: dict, groups: dict | None = None) -> dict:
    """The figures a table shows: top-1/top-5 of classification sets (and top-1 on their head and tail classes,
    `class_groups`), mean recall@1/5 of retrieval sets."""
    out = {}
    for name, r in results.items():
        if r["kind"] == "classification":
            out[f"{name} top1"] = r.get("top1")
            out[f"{name} top5"] = r.get("top5")
            g, per = (groups or {}).get(name), r.get("per_class_top1") or {}
            if g and all(c in per for c in g["head"] + g["tail"]):
                out[f"{name} head top1"] = statistics.fmean(per[c] for c in g["head"])
                out[f"{name} tail top1"] = statistics.fmean(per[c] for c in g["tail"])
        else:
            for k in (1, 5):
                a, b = r.get(f"image_to_text_R@{k}"), r.get(f"text_to_image_R@{k}")
                if a is not None and b is not None:
                    out[f"{name} R@{k}"] = (a + b) / 2
    return out


def _klite_headline(results: dict) -> dict:
    """The classification figures with K-LITE prompts (sets evaluated with klite); retrieval has none."""
    out = {}
    for name, r in results.items():
        if r["kind"] == "classification" and "klite" in r:
            out[f"{name} top1"] = r["klite"].get("top1")
            out[f"{name} top5"] = r["klite"].get("top5")
    return out


RANDOM, ORACLE = "random subset", "oracle"


def _shard_rows(folder: str) -> list[tuple[str, int]]:
    """(shard, rows) of a folder's part-*.parquet, in name order: one footer read each."""
    import pyarrow.parquet as pq

    return [(p, pq.ParquetFile(p).metadata.num_rows) for p in sorted(glob.glob(os.path.join(folder, "part-*.parquet")))]


def write_subset(run_dir: str, pool: str, out: str, keep) -> int:
    """Rows of the raw pool's shards (`pool`) that `keep(shard_index, table) -> bool mask` selects, written as
    metadata shards to `out` with the run's image store recorded there (the trainer finds pixels through it).
    Rewritten only when missing; returns the rows written."""
    import numpy as np
    import pyarrow as pa

    from pipeline.images import ImageStore

    done = os.path.join(out, "_subset.json")
    if os.path.exists(done):
        return int(shards.read_json(done)["rows"])
    shards.remove(out)
    n = 0
    for i, (path, _) in enumerate(_shard_rows(pool)):
        t = shards.read_shard(path)
        mask = np.asarray(keep(i, t), dtype=bool)
        if mask.any():
            shards.write_shard(t.filter(pa.array(mask)), os.path.join(out, f"part-{i:05d}.parquet"))
            n += int(mask.sum())
    store = ImageStore.load(run_dir)
    if store is not None:
        store.save(out)
    shards.write_json({"rows": n, "pool": pool}, done)
    return n


def random_subset(run_dir: str, pool: str, n: int, seed: int) -> str:
    """A uniform sample of `n` rows of the raw pool (numpy's Generator, `seed`), as shards."""
    import numpy as np

    sizes = [k for _, k in _shard_rows(pool)]
    pick = np.zeros(sum(sizes), dtype=bool)
    pick[np.random.default_rng(seed).choice(len(pick), size=min(n, len(pick)), replace=False)] = True
    starts = np.cumsum([0] + sizes)
    out = os.path.join(run_dir, "ablation", "_subsets", f"random-n{n}-seed{seed}")
    write_subset(run_dir, pool, out, lambda i, t: pick[starts[i]:starts[i + 1]])
    return out


def oracle_subset(run_dir: str, pool: str, truth: str) -> str:
    """The raw pool's rows whose uid the truth labels `clean`."""
    import polars as pl
    import pyarrow.compute as pc

    from pipeline.truth import check_truth

    check_truth(truth)  # a user's --truth without uid/kind: one line, not a traceback from polars
    t = pl.read_parquet(truth, columns=["uid", "kind"])
    clean = t.filter(pl.col("kind") == "clean")["uid"].to_arrow()
    tag = shards.content_digest(truth)[:12]
    out = os.path.join(run_dir, "ablation", "_subsets", f"oracle-{tag}")
    write_subset(run_dir, pool, out, lambda i, tab: pc.is_in(tab.column("uid"), value_set=clean).to_numpy(
        zero_copy_only=False))
    return out


def _variant_dir(run_dir: str, variant: str, seed: int, default_seed: int) -> str:
    name = variant.replace("+ ", "plus-").replace(" ", "-")
    # The config's own seed keeps the plain folder name, so a single-seed run's training is reused.
    return os.path.join(run_dir, "ablation", name if seed == default_seed else f"{name}-seed{seed}")


def _mean_std(rows: list[dict]) -> tuple[dict, dict]:
    keys = [k for k, v in rows[0].items() if isinstance(v, float)] if rows else []
    mean = {k: statistics.fmean(r[k] for r in rows) for k in keys}
    std = {k: (statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0) for k in keys}
    return mean, std


def ablate(run_dir: str, cfg: dict, steps: int | None = None, variants=None, seeds=None,
           truth: str | None = None) -> dict:
    from pipeline.report import world_truth
    from trainer.config import TrainConfig
    from trainer.evaluate import evaluate
    from trainer.train import train

    tc = TrainConfig(**cfg.get("train", {}))
    if steps:
        tc.steps = int(steps)
    if not tc.eval_sets:
        raise StageError("ablate: no eval set: give [train] eval_sets in the config (Parquet files)")
    seeds = [int(x) for x in (seeds or [tc.seed])]
    rows = []
    recipe_steps = recipe.of_config(cfg)
    curation = variants_of(recipe_steps)
    every = curation + [(RANDOM, None), (ORACLE, None)]
    full = curation[-1][0] if curation else None  # the full pipeline: also evaluated with K-LITE's prompts
    finished = {}  # variant -> (stage, folder) of the recipe variants that have run
    for variant, name in every:
        step = recipe.find(recipe_steps, name) if name else None
        if step is not None and os.path.exists(os.path.join(run_dir, step.folder, "_manifest.json")):
            finished[variant] = (step.name, os.path.join(run_dir, step.folder))
    raw = finished.get(curation[0][0]) if curation else None  # the raw pool: the first step's output
    groups = None  # head and tail classes of each classification set, from the raw pool (class_groups)
    for variant, name in variants or every:
        with_klite = variant == full
        if variant == RANDOM or variant == ORACLE:
            if raw is None or full not in finished:
                log.warning("ablate: %s skipped (the run has no raw pool and full pipeline to compare)", variant)
                continue
            if variant == RANDOM:
                n = _count_rows(finished[full][1])
                folders = {seed: random_subset(run_dir, raw[1], n, seed) for seed in seeds}
                stage = f"{raw[0]}, sampled"
            else:
                truth = truth or world_truth(run_dir)
                if not truth:
                    log.warning("ablate: %s skipped (no truth: give --truth, a world's truth.parquet)", variant)
                    continue
                folders = dict.fromkeys(seeds, oracle_subset(run_dir, raw[1], truth))
                stage = f"{raw[0]}, truth-clean"
        else:
            if variant not in finished:
                log.warning("ablate: %s skipped (%s has not run in %s)", variant, name, run_dir)
                continue
            stage, folder = finished[variant]
            folders = dict.fromkeys(seeds, folder)
        pairs = _count_rows(folders[seeds[0]])
        per_seed, per_seed_klite = [], []
        t0 = time.perf_counter()
        for seed in seeds:
            out = _variant_dir(run_dir, variant, seed, tc.seed)
            log.info("ablate: %s, seed %d: training on %d pairs from %s", variant, seed, pairs, folders[seed])
            s = train(dataclasses.replace(tc, seed=seed), folders[seed], out, resume=True)
            # the full pipeline: K-LITE prompts too, on every set (those naming `klite` keep their choice)
            res = evaluate(s["model_path"], tc.eval_sets, device=tc.device, precision=tc.precision,
                           templates=tc.templates, batch_size=tc.eval_batch_size,
                           klite=with_klite or tc.klite_eval)["results"]
            shards.write_json(res, os.path.join(out, "eval.json"))
            if groups is None:
                groups = class_groups(raw[1], res) if raw else {}
            per_seed.append({"seed": seed, "last_loss": s.get("last_loss"), **_headline(res, groups), "eval": res})
            if with_klite:
                per_seed_klite.append({"seed": seed, **_klite_headline(res)})
        mean, std = _mean_std([{k: v for k, v in r.items() if k not in ("seed", "last_loss")} for r in per_seed])
        rows.append({"variant": variant, "stage": stage, "pairs": pairs, "steps": tc.steps,
                     "batch_size": tc.batch_size, "seconds": round(time.perf_counter() - t0, 1), **mean,
                     "std": std, "seeds": per_seed,
                     # kept for single-seed readers of ablation.json (the report, scripts)
                     "last_loss": per_seed[-1]["last_loss"], "eval": per_seed[-1]["eval"]})
        if with_klite and any(len(r) > 1 for r in per_seed_klite):
            kmean, kstd = _mean_std([{k: v for k, v in r.items() if k != "seed"} for r in per_seed_klite])
            rows.append({"variant": f"{variant}, K-LITE prompts", "stage": stage, "prompts": "klite", "pairs": pairs,
                         "steps": tc.steps, "batch_size": tc.batch_size, **kmean, "std": kstd,
                         "seeds": per_seed_klite})
    if not rows:
        raise StageError(f"ablate: no finished stage in {run_dir} (run the pipeline first)")
    skip = ("variant", "stage", "eval", "last_loss", "seconds", "batch_size", "std", "seeds", "prompts")
    cols = [k for k in rows[0] if k not in skip]
    body = []
    for r in rows:
        cells = [r["variant"]]
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                cells.append(f"{v:.3f} ± {r['std'][c]:.3f}" if len(seeds) > 1 else f"{v:.4f}")
            else:
                cells.append(str(v if v is not None else ""))
        body.append(cells)
    table = Table("ablation", ["variant", *cols], body)
    result = {"model": tc.model, "steps": tc.steps, "batch_size": tc.batch_size, "seed": seeds[0], "seeds": seeds,
              "eval_sets": tc.eval_sets, "class_groups": groups or {}, "variants": rows,
              "table": {"header": table.header, "rows": table.rows}, "table_md": table.markdown()}
    shards.write_json(result, os.path.join(run_dir, "ablation.json"))
    return result


def cmd_ablate(args) -> int:
    run_dir = shards.join(args.runs_dir, args.run)
    cfg = config_mod.for_run(run_dir, args.config)
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise StageError(f"ablate: --seeds wants comma-separated integers, got {args.seeds!r}") from None
    variants = None
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        known = dict(variants_of(recipe.of_config(cfg)) + [(RANDOM, None), (ORACLE, None)])
        bad = [v for v in names if v not in known]
        if bad:
            raise StageError(f"ablate: unknown variant {bad[0]!r} (variants: {', '.join(known)})")
        variants = [(v, known[v]) for v in names]
    result = ablate(run_dir, cfg, steps=args.steps, seeds=seeds, variants=variants, truth=args.truth)
    how = f"mean ± std over seeds {result['seeds']}" if len(result["seeds"]) > 1 else f"seed {result['seed']}"
    print(f"ablation ({result['model']}, {result['steps']} steps x batch {result['batch_size']}, {how}):")
    print(result["table_md"])
    print(f"-> {os.path.join(run_dir, 'ablation.json')} (and the run report: clipcurate report --run {args.run})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("ablate", help="train + zero-shot eval on each stage's output in turn (raw, align, +metaclip, ...)")
    p.add_argument("--run", required=True)
    p.add_argument("--config", default=None, help="TOML file laid over the run's saved config ([train] section)")
    p.add_argument("--steps", type=int, default=None, help="training steps per variant (default [train] steps)")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds, e.g. 0,1,2 (mean ± std)")
    p.add_argument("--variants", default=None,
                   help='comma-separated subset, e.g. "+ dfn" (default: one per step of the run\'s recipe: raw pool, '
                        'align, + metaclip, + klite, + dfn for the default one; then "random subset" and "oracle")')
    p.add_argument("--truth", default=None,
                   help="the world's labels (truth.parquet: uid, kind) for the oracle variant (default: the demo "
                        "world's own, which its world.json records next to the run's URL list)")
    p.set_defaults(fn=cmd_ablate, writes_run=True)  # pipeline/cli.py main takes the run's lock

