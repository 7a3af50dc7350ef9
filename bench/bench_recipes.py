"""The three recipes side by side on one demo world, each from nothing through emit (no CLIP training).

    .venv/bin/python bench/bench_recipes.py [--n 3000] [--rounds 2] [--recipes default,text-first,balance-last]
                                            [--dfn-steps N] [--workers W]

One demo world (`clipcurate demo-world`); each recipe runs as a user runs it, every command a fresh subprocess
(imports included), timed by a stopwatch:

    clipcurate ingest W/urls.parquet --run R --config W/<the recipe's config>   (text-first: align@text,
                                                      metaclip, klite on the URL list, then the download)
    clipcurate dfn-train --run R --hq W/hq.parquet --resume
    clipcurate run --run R                            (the recipe's steps after the download)

The filtering network depends on the HQ set and `[train]`, not on the recipe (the three configs share both), so
it is trained once, before the rounds (its time is recorded apart), and its `dfn_model/` is copied into each run
before `dfn-train --resume`, which then finds it finished ("nothing to train"): that command's stopwatch is its
start and check, the same for every recipe. Per recipe and round: URLs downloaded, bytes of the image store and
of emit's output (separately), rows emitted, the stopwatch per command and in total, the recorded stage time
(`clipcurate report --compare`'s figure), and the emitted uids' overlap with the default recipe's in the same
round. Rounds are paired and the recipes interleaved (round r runs them in the order rotated by r): this VM's
speed drifts, so a recipe's time is compared with the default's of the same round. Writes
bench/results/recipes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = ("default", "text-first", "balance-last")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def config_file(recipe: str) -> str:
    from demo.config import config_file as cf

    return cf(recipe)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


class Runner:
    def __init__(self, runs: Path, env: dict, logs: Path, workers: int | None):
        self.runs, self.env, self.logs, self.workers = runs, env, logs, workers
        self.n = 0

    def cli(self, *args: str, workers: bool = False) -> dict:
        """One `clipcurate` command in a fresh process: its stopwatch and the load average around it."""
        cmd = [sys.executable, "-m", "pipeline.cli", "--runs-dir", str(self.runs), *args]
        if workers and self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        self.n += 1
        out = self.logs / f"{self.n:03d}-{args[0]}.log"
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        with open(out, "w") as f:
            r = subprocess.run(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        s = time.perf_counter() - t0
        if r.returncode != 0:
            tail = out.read_text()[-3000:]
            raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{tail}")
        return {"seconds": round(s, 2), "load1_before": round(load0, 2), "load1_after": round(os.getloadavg()[0], 2)}


def run_recipe(rn: Runner, world: Path, recipe: str, name: str, dfn_model: Path) -> tuple[dict, set[str]]:
    from pipeline.report import recipe_summary

    run = rn.runs / name
    shutil.rmtree(run, ignore_errors=True)
    steps = {}
    steps["ingest"] = rn.cli("ingest", str(world / "urls.parquet"), "--run", name, "--config",
                             str(world / config_file(recipe)), workers=True)
    log(f"  {recipe}: ingest {steps['ingest']['seconds']:.1f} s")
    shutil.copytree(dfn_model, run / "dfn_model")  # trained once: the same network for every recipe
    steps["dfn-train"] = rn.cli("dfn-train", "--run", name, "--hq", str(world / "hq.parquet"), "--resume",
                                *rn.dfn_steps_args)
    if "nothing to train" not in (rn.logs / f"{rn.n:03d}-dfn-train.log").read_text():
        raise SystemExit(f"{recipe}: dfn-train trained again: the copied filtering network was not taken")
    log(f"  {recipe}: dfn-train (model copied in) {steps['dfn-train']['seconds']:.1f} s")
    steps["run"] = rn.cli("run", "--run", name, workers=True)
    log(f"  {recipe}: run {steps['run']['seconds']:.1f} s")
    s = recipe_summary(str(run))
    emit_manifest = json.loads(next(run.glob("[0-9][0-9]_emit/_manifest.json")).read_text())
    emit_out = Path((emit_manifest.get("finalize") or {}).get("folder") or run / "emit")
    res = {
        "recipe": s["recipe"],
        "urls_downloaded": s["urls_downloaded"],
        "image_store_bytes": s["store_bytes"],
        "emit_output_bytes": folder_bytes(emit_out),
        "run_folder_bytes": folder_bytes(run),
        "rows_emitted": emit_manifest["rows_out"],
        "seconds": {k: v["seconds"] for k, v in steps.items()},
        "seconds_total": round(sum(v["seconds"] for v in steps.values()), 2),
        "recorded_stage_seconds": s["seconds"],
        "recorded_download_seconds": s["download_seconds"],
        "load1": {k: [v["load1_before"], v["load1_after"]] for k, v in steps.items()},
        "funnel": [[m["stage"], m["rows_in"], m["rows_out"]] for m in _manifests(run)],
    }
    assert s["complete"] and s["rows_out"] == res["rows_emitted"] == len(s["uids"]), (recipe, s["final_step"])
    log(f"  {recipe}: {res['urls_downloaded']} URLs downloaded, store {res['image_store_bytes'] / 2**20:.1f} MiB, "
        f"emit {res['emit_output_bytes'] / 2**20:.1f} MiB, {res['rows_emitted']} rows emitted, "
        f"{res['seconds_total']:.1f} s by stopwatch ({res['recorded_stage_seconds']:.1f} s recorded)")
    return res, s["uids"]


def _manifests(run: Path) -> list[dict]:
    from pipeline.layout import manifests

    return manifests(str(run))


def overlap(a: set[str], d: set[str]) -> dict:
    both = len(a & d)
    return {"both": both, "only_this": len(a - d), "only_default": len(d - a),
            "share_of_this": round(both / len(a), 4) if a else None,
            "share_of_default": round(both / len(d), 4) if d else None,
            "jaccard": round(both / len(a | d), 4) if a | d else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--dfn-steps", type=int, default=None,
                    help="steps of the filtering network, trained once (default: the world's [train] steps)")
    ap.add_argument("--workers", type=int, default=None, help="Dask workers per command (default: cores)")
    ap.add_argument("--keep", default=None, help="keep the work folder here (default: a temporary one, removed)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "recipes.json"))
    args = ap.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for r in recipes:
        if r not in RECIPES:
            raise SystemExit(f"unknown recipe {r!r} (one of {', '.join(RECIPES)})")

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    (work / "logs").mkdir(exist_ok=True)
    rn = Runner(work / "runs", env, work / "logs", args.workers)
    rn.dfn_steps_args = ["--steps", str(args.dfn_steps)] if args.dfn_steps else []
    t_all = time.perf_counter()
    try:
        world = work / "world"
        log(f"demo world n={args.n} in {world}")
        world_s = rn.cli("demo-world", str(world), "--n", str(args.n))
        import polars as pl

        url_rows = pl.read_parquet(world / "urls.parquet").height
        log(f"training the filtering network once ({args.dfn_steps or 'the world config''s'} steps) ...")
        dfn_s = rn.cli("dfn-train", "--run", "_dfn", "--hq", str(world / "hq.parquet"), "--config",
                       str(world / "config.toml"), "--resume", *rn.dfn_steps_args)  # --keep: trained once
        dfn_model = rn.runs / "_dfn" / "dfn_model"
        dfn_summary = json.loads((dfn_model / "train.json").read_text())
        log(f"filtering network: {dfn_s['seconds']:.1f} s")

        rounds = []
        uids: dict[tuple[int, str], set[str]] = {}
        for r in range(args.rounds):
            order = recipes[r % len(recipes):] + recipes[:r % len(recipes)]  # interleaved: rotated each round
            log(f"round {r}: {', '.join(order)}")
            row = {"round": r, "order": order, "recipes": {}}
            for recipe in order:
                res, u = run_recipe(rn, world, recipe, f"{recipe}-r{r}", dfn_model)
                row["recipes"][recipe] = res
                uids[(r, recipe)] = u
            if "default" in recipes:
                for recipe in recipes:
                    row["recipes"][recipe]["overlap_with_default"] = overlap(uids[(r, recipe)], uids[(r, "default")])
                    d = row["recipes"]["default"]["seconds_total"]
                    row["recipes"][recipe]["seconds_total_over_default"] = round(
                        row["recipes"][recipe]["seconds_total"] / d, 3)
            rounds.append(row)
            for recipe in order:
                shutil.rmtree(rn.runs / f"{recipe}-r{r}", ignore_errors=True)

        def med(recipe: str, f) -> float:
            return round(statistics.median(f(x["recipes"][recipe]) for x in rounds), 3)

        summary = {}
        for recipe in recipes:
            first = rounds[0]["recipes"][recipe]
            same = all(uids[(x["round"], recipe)] == uids[(0, recipe)] for x in rounds)
            summary[recipe] = {
                "recipe": first["recipe"],
                "urls_downloaded": first["urls_downloaded"],
                "image_store_bytes": first["image_store_bytes"],
                "emit_output_bytes": first["emit_output_bytes"],
                "image_store_bytes_per_round": [x["recipes"][recipe]["image_store_bytes"] for x in rounds],
                "emit_output_bytes_per_round": [x["recipes"][recipe]["emit_output_bytes"] for x in rounds],
                "rows_emitted": first["rows_emitted"],
                "same_uids_every_round": same,
                "seconds_total_median": med(recipe, lambda x: x["seconds_total"]),
                "seconds_total_per_round": [x["recipes"][recipe]["seconds_total"] for x in rounds],
                "seconds_median": {k: med(recipe, lambda x, k=k: x["seconds"][k]) for k in first["seconds"]},
                "recorded_stage_seconds_median": med(recipe, lambda x: x["recorded_stage_seconds"]),
            }
            if "default" in recipes:
                summary[recipe]["overlap_with_default"] = first["overlap_with_default"]
                summary[recipe]["seconds_total_over_default_median"] = med(
                    recipe, lambda x: x["seconds_total_over_default"])
                if recipe != "default":
                    d = rounds[0]["recipes"]["default"]
                    summary[recipe]["urls_downloaded_vs_default"] = (
                        round(first["urls_downloaded"] / d["urls_downloaded"], 4)
                        if first["urls_downloaded"] and d["urls_downloaded"] else None)
                    summary[recipe]["image_store_bytes_vs_default"] = (
                        round(first["image_store_bytes"] / d["image_store_bytes"], 4)
                        if first["image_store_bytes"] and d["image_store_bytes"] else None)

        result = {
            "what": "each recipe from nothing through emit on one demo world (no CLIP training): URLs downloaded, "
                    "bytes written (image store; emit's output), rows emitted, stopwatch per command and total, "
                    "the emitted uids' overlap with the default recipe's",
            "n": args.n,
            "url_rows": url_rows,
            "rounds": args.rounds,
            "recipes": recipes,
            "commands": ["clipcurate ingest W/urls.parquet --run R --config W/<config of the recipe>",
                         "clipcurate dfn-train --run R --hq W/hq.parquet --resume  (filtering network copied in)",
                         "clipcurate run --run R"],
            "notes": [
                "seconds: stopwatch of each command in a fresh process (imports, Dask cluster start, the loopback "
                "server included); seconds_total: their sum. recorded_stage_seconds: the manifests' timings plus "
                "the download's seconds (what `clipcurate report --compare` shows), not a stopwatch.",
                "the filtering network is trained once before the rounds (filtering_network.seconds) and copied "
                "into each run: it depends on the HQ set and [train], which the three configs share, not on the "
                "recipe. dfn-train --resume then finds it finished: its stopwatch is the command's start and check.",
                "paired rounds, recipes interleaved (the order rotates each round); compare a recipe's time with "
                "the default's of the same round (seconds_total_over_default): this shared 2-core VM's speed "
                "drifts (load1 is recorded per command).",
                "image_store_bytes: the run's image store folder (img2dataset's output: images, its metadata "
                "and stats); emit_output_bytes: emit's output folder (Parquet and WebDataset shards, index). The "
                "summary gives round 0's bytes; a store's bytes may differ by a little between rounds (img2dataset's "
                "shards and stats are not byte-identical from one download to the next).",
            ],
            "filtering_network": {"seconds": dfn_s["seconds"], "steps": dfn_summary.get("steps"),
                                  "model": dfn_summary.get("model")},
            "demo_world_seconds": world_s["seconds"],
            "summary": summary,
            "per_round": rounds,
            "bench_seconds": round(time.perf_counter() - t_all, 1),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out}")
        for recipe, s in summary.items():
            ov = s.get("overlap_with_default") or {}
            log(f"{recipe:>13}: {s['urls_downloaded']} URLs, store {s['image_store_bytes'] / 2**20:.1f} MiB, "
                f"emit {s['emit_output_bytes'] / 2**20:.1f} MiB, {s['rows_emitted']} rows, "
                f"{s['seconds_total_median']:.1f} s median ({s.get('seconds_total_over_default_median', '-')}x "
                f"default), overlap with default {ov.get('both', '-')} ({ov.get('share_of_this', '-')} of its rows)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
