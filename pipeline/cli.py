"""`clipcurate ...`: the command line the Makefile calls. Errors on bad input are one line, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline import config as config_mod
from pipeline import shards
from pipeline.stage import STAGE_ORDER, StageError, stage_dirname

log = logging.getLogger("clipcurate")

# Errors that are the user's input, not our bug: shown as one line.
def _user_errors():
    from pipeline.config import ConfigError
    from pipeline.schema import SchemaError
    from pipeline.shards import ShardError
    from metadata.wordnet import WordNetMissing

    return (ConfigError, SchemaError, ShardError, StageError, WordNetMissing, FileNotFoundError)


def _run_dir(args) -> str:
    return shards.join(args.runs_dir, args.run)


def _print_funnel(results) -> None:
    for res in results:
        m = res.manifest
        print(f"{m['stage']:>9}: {m['rows_in']:>8} in  {m['rows_out']:>8} kept  {m['rejected']:>8} rejected   -> {res.folder}")
        for reason, n in m["reasons"].items():
            print(f"{'':>11}{n:>8}  {reason}")
        for note in m.get("notes", []):
            print(f"{'':>11}note: {note}")


# ---- commands ------------------------------------------------------------------------------------
def cmd_demo_world(args) -> int:
    from pipeline.demo_world import make_world

    summary = make_world(args.out, n=args.n, seed=args.seed)
    print(f"demo world written to {args.out}: {summary.get('rows', summary.get('n'))} URL rows")
    for k, v in sorted(summary.get("counts", {}).items()):
        print(f"  {k:>16}: {v}")
    return 0


def cmd_ingest(args) -> int:
    from pipeline.runner import executor, run_stage

    run_dir = _run_dir(args)
    cfg = config_mod.for_run(run_dir, args.config)
    if _is_folder(args.input):
        return _ingest_crawl(args, run_dir, cfg)
    from pipeline.images import ImageStore
    from stages.ingest import IngestStage, download_pool

    serve = args.serve
    if serve is None:
        world = Path(args.input).resolve().parent
        if (world / "world.json").exists() and (world / "www").is_dir():
            serve = str(world / "www")  # a demo world: its URLs are served from this machine
    if serve:
        cfg["ingest"]["serve_dir"] = str(Path(serve).resolve())
    config_mod.save(cfg, shards.join(run_dir, "config.toml"))
    ingest_cfg = IngestStage.Config(**cfg["ingest"])
    stage_dir = shards.join(run_dir, stage_dirname("ingest"))
    raw_dir, info = download_pool(args.input, stage_dir, ingest_cfg)
    # the download is the run's image store: ingest's shards and every later stage's hold references into it
    ImageStore(raw_dir, "parquet", ingest_cfg.encode_format).save(run_dir)
    with executor(args.workers, args.scheduler) as ex:
        res = run_stage("ingest", run_dir, raw_dir, cfg, ex)
    res.manifest["download"] = info
    # the stage's input shards hold one row per unique URL; what the user gave was the caption rows
    res.manifest["urls_in"] = res.manifest["rows_in"]
    res.manifest["rows_in"] = info["input_rows"]
    shards.write_json(res.manifest, shards.join(res.folder, "_manifest.json"))
    print(
        f"ingest: {info['input_rows']} URL rows, {info['unique_urls']} unique URLs downloaded once each, "
        f"{info['bad_urls']} malformed URLs"
    )
    _print_funnel([res])
    print(f"shards: {res.folder}/part-*.parquet   rejected: {res.folder}/rejected/")
    return 0


def _is_folder(path: str) -> bool:
    fs, p = shards.fs_and_path(path)
    return fs.isdir(p)


def _ingest_crawl(args, run_dir: str, cfg: dict) -> int:
    """Bring your own crawl: an img2dataset output folder (Parquet or WebDataset) is the run's image store, in
    place; ingest converts its metadata to rows with references, failures to rejected/ with img2dataset's error."""
    from pipeline.runner import executor, run_stage
    from stages.ingest import crawl_input

    config_mod.save(cfg, shards.join(run_dir, "config.toml"))
    stage_dir = shards.join(run_dir, stage_dirname("ingest"))
    store, input_dir = crawl_input(args.input, stage_dir)
    store.save(run_dir)
    with executor(args.workers, args.scheduler) as ex:
        res = run_stage("ingest", run_dir, input_dir, cfg, ex)
    res.manifest["crawl"] = {"root": store.root, "format": store.format}
    shards.write_json(res.manifest, shards.join(res.folder, "_manifest.json"))
    kind = "WebDataset" if store.format == "wds" else "Parquet"
    print(f"ingest: img2dataset {kind} output {store.root} used in place as the image store")
    _print_funnel([res])
    print(f"shards: {res.folder}/part-*.parquet   rejected: {res.folder}/rejected/")
    return 0


def cmd_run(args) -> int:
    from pipeline.runner import run_pipeline

    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not names:
        raise StageError("no stages given (e.g. align,metaclip)")
    run_dir = _run_dir(args)
    cfg = config_mod.for_run(run_dir, args.config)
    results = run_pipeline(names, run_dir, cfg, input_dir=args.input, workers=args.workers, scheduler=args.scheduler)
    _print_funnel(results)
    return 0


def _add_exec(p) -> None:
    p.add_argument("--workers", type=int, default=None, help="Dask workers (default: cores); 0 = in-process")
    p.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clipcurate", description="Curate image-text pairs for CLIP training.")
    ap.add_argument("--runs-dir", default=os.environ.get("CLIPCURATE_RUNS", "runs"), help="root of runs (default runs/)")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-world", help="write the synthetic demo crawl (url list, served images, eval + HQ sets)")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_demo_world)

    p = sub.add_parser("ingest", help="download a URL list with img2dataset into runs/NAME/00_ingest, or use an "
                                      "img2dataset output folder in place")
    p.add_argument("input", help="Parquet/CSV/TSV(.gz) with url and caption columns, or an img2dataset output "
                                 "folder (Parquet or WebDataset): used in place as the image store, no download")
    p.add_argument("--run", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--serve", default=None, help="serve this folder on a loopback proxy while downloading (demo)")
    _add_exec(p)
    p.set_defaults(fn=cmd_ingest)

    p = sub.add_parser("run", help="run stages (comma list: " + ",".join(STAGE_ORDER[1:]) + ")")
    p.add_argument("stages")
    p.add_argument("--run", required=True)
    p.add_argument("--input", default=None, help="folder of Parquet shards with a text column")
    p.add_argument("--config", default=None)
    _add_exec(p)
    p.set_defaults(fn=cmd_run)

    for extra in _extra_commands():
        extra(sub)
    return ap


def _extra_commands():
    """Commands that live with the stages/trainer they belong to, registered when those modules exist."""
    out = []
    for mod in ("pipeline.report", "pipeline.ablate", "metadata.cli", "trainer.cli"):
        try:
            m = __import__(mod, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue
            raise
        if hasattr(m, "register"):
            out.append(m.register)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("distributed", "asyncio", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.fn(args) or 0)
    except _user_errors() as e:
        print(f"clipcurate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipcurate: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
