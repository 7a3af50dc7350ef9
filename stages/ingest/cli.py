"""`clipcurate ingest`: download a URL list with img2dataset (or take an img2dataset output folder in place) as
the run's image store, then run the ingest stage on it. A `clipcurate.commands` entry point (pyproject.toml):
the spine's CLI finds it without naming this package."""

from __future__ import annotations

from pathlib import Path

from pipeline import config as config_mod
from pipeline import recipe, shards
from pipeline.cli import add_config, add_exec, add_verify, config_for, print_funnel, run_dir_of
from pipeline.errors import StageError
from stages.ingest import IngestStage, crawl_input, download_pool
from stages.ingest.curated import is_curated_folder, url_list_rows


def register(sub) -> None:
    p = sub.add_parser("ingest", help="download a URL list with img2dataset into the run's ingest folder, or use an "
                                      "img2dataset output folder in place; a recipe with steps before ingest "
                                      "(text-first) runs them on the URL list first and downloads only what they keep")
    p.add_argument("input", nargs="?", default=None,
                   help="Parquet/CSV/TSV(.gz) with url and caption columns; or an img2dataset output folder (Parquet "
                        "or WebDataset): used in place as the image store, no download; or a run's curated output "
                        "(a folder of row shards with url and text): its URLs are downloaded, its columns kept. "
                        "Omitted: the pool this run was started on (a recipe with steps before ingest)")
    p.add_argument("--run", required=True, help="run name: runs/NAME")
    add_config(p)
    p.add_argument("--serve", default=None, help="serve this folder on loopback as the demo host while downloading "
                                                 "(demo); fetched only if [ingest] allow_private_hosts lists "
                                                 "demo.clipcurate.invalid:80")
    p.add_argument("--retry-failed", action="store_true",
                   help="download again only the rows this run's download lost to passing trouble (timeouts, "
                        "connection errors, 429 and 5xx answers, an unreachable robots.txt), into its image store; "
                        "never a 404, an image that failed to decode or an opt-out")
    add_exec(p)
    add_verify(p)
    p.set_defaults(fn=cmd_ingest, writes_run=True)  # pipeline/cli.py main takes the run's lock
    r = sub.add_parser("optout-recheck", help="fetch today's robots.txt and TDMRep of the emitted rows' hosts and "
                                              "write the uids they now exclude as a DataComp-style uid list")
    r.add_argument("--run", required=True, help="run name: runs/NAME")
    r.add_argument("--out", default=None, help="the uid list (.npy) to write (default: "
                                               "runs/NAME/optout-recheck/<UTC time>/drop_uids.npy)")
    r.set_defaults(fn=cmd_optout_recheck, writes_run=True)


URL_LIST_DIR = "url_list"  # runs/NAME/url_list: the URL list as rows, for the steps before the download


def _ingest_step(cfg: dict) -> "recipe.Step":
    """The recipe's ingest step: where `clipcurate ingest` writes."""
    step = recipe.find(recipe.of_config(cfg), "ingest")
    if step is None:
        raise StageError("this run's recipe ([run] stages) has no ingest step to download into")
    return step


def cmd_ingest(args) -> int:
    from pipeline.executors import executor
    from pipeline.runner import UPSTREAM_KEY, run_stage

    if getattr(args, "retry_failed", False):
        return _ingest_retry(args)
    run_dir = run_dir_of(args)
    cfg = config_for(args, run_dir, ["ingest"])
    steps = recipe.of_config(cfg)
    step = _ingest_step(cfg)
    before = [s for s in steps if s.position < step.position]
    if args.input is None and not before:
        raise StageError("ingest: give the URL list (or an img2dataset output folder): clipcurate ingest URLS --run NAME")
    _preflight(args, run_dir, cfg, before + [step])
    if args.input is not None and _is_folder(args.input) and not is_curated_folder(args.input):
        if before:
            raise StageError(f"ingest: this run's recipe runs {', '.join(s.name for s in before)} before the download: "
                             f"give a URL list or a folder of row shards, not an img2dataset output")
        return _ingest_crawl(args, run_dir, cfg)
    from pipeline.images import ImageStore

    serve = args.serve
    if serve is None and args.input is not None:
        world = Path(args.input).resolve().parent
        if (world / "world.json").exists() and (world / "www").is_dir():
            serve = str(world / "www")  # a demo world: its URLs are served from this machine
    if serve:
        cfg["ingest"]["serve_dir"] = str(Path(serve).resolve())
    config_mod.save(cfg, shards.join(run_dir, "config.toml"))
    ingest_cfg = IngestStage.Config(**cfg["ingest"])
    stage_dir = shards.join(run_dir, step.folder)
    source, upstream, url_list = args.input, None, args.input
    if before:  # text-first: curate the URL list, then download what the steps before ingest kept
        source, upstream, url_list = _curate_before_download(args, run_dir, cfg, steps, step, before, ingest_cfg)
    raw_dir, info = download_pool(source, stage_dir, ingest_cfg)
    # the download is the run's image store: ingest's shards and every later stage's hold references into it
    ImageStore(raw_dir, "parquet", ingest_cfg.encode_format).save(run_dir)
    with executor(args.workers, args.scheduler) as ex:
        res = run_stage(step, run_dir, raw_dir, cfg, ex, verify=args.verify)
    res.manifest["download"] = info
    # the stage's input shards hold one row per unique URL; what the user gave was the caption rows
    # what the report compares between recipes: the URLs requested (not those robots.txt or TDMRep excluded)
    res.manifest["urls_downloaded"] = info.get("urls_fetched", info["unique_urls"])
    res.manifest["rows_in"] = info["input_rows"]
    # the list the run started from (the report's truth check finds a demo world by it), not the curated rows
    res.manifest["url_list"] = url_list if "://" in str(url_list) else str(Path(url_list).resolve())
    if source != url_list:
        res.manifest["downloaded_from"] = str(source)
    if upstream is not None:
        res.manifest[UPSTREAM_KEY] = upstream
    shards.write_json(res.manifest, shards.join(res.folder, "_manifest.json"))
    what = "curated rows" if "curated" in info else "URL rows"
    print(
        f"ingest: {info['input_rows']} {what}: {info['unique_urls']} unique URLs (each fetched once), "
        f"{info['bad_urls']} malformed, "
        + (f"{info['blocked_urls']} refused by the egress policy, " if info.get("blocked_urls") else "")
        + (f"{info['robots_disallowed']} disallowed by robots.txt, " if info.get("robots_disallowed") else "")
        + (f"{info['tdm_reserved']} reserved by TDMRep, " if info.get("tdm_reserved") else "")
        + f"{info.get('duplicates', 0)} repeated (url, caption) rows (kept once)"
    )
    print_funnel([res])
    print(f"shards: {res.folder}/part-*.parquet   rejected: {res.folder}/rejected/")
    _print_next(run_dir, steps, step)
    _fail_if_nothing_kept(res, "no URL downloaded", "check the URLs and the network")
    return 0


MANIFEST_KEPT = ("download", "urls_downloaded", "rows_in", "url_list", "downloaded_from")  # what cmd_ingest adds


def _ingest_retry(args) -> int:
    """`ingest --retry-failed`: the run's transient failures downloaded again into its store (retry.py), then
    the ingest step redone on the store (the runner redoes what the rewritten store shards changed)."""
    from pipeline.executors import executor
    from pipeline.runner import UPSTREAM_KEY, run_stage
    from stages.ingest.download import DONE_MARKER, optout_folder, served
    from stages.ingest.retry import retry_failed

    if args.input is not None:
        raise StageError("ingest --retry-failed: give no input: it retries what this run's own download lost")
    if args.config is not None:
        raise StageError("ingest --retry-failed: it retries with the run's own config (runs/NAME/config.toml); "
                         "--config would make it another download")
    run_dir = run_dir_of(args)
    cfg = config_mod.saved_config(run_dir)
    if cfg is None:
        raise StageError(f"ingest --retry-failed: {run_dir} is not a run (it has no config.toml): nothing to retry")
    step = _ingest_step(cfg)
    stage_dir = shards.join(run_dir, step.folder)
    raw_dir = shards.join(stage_dir, "_img2dataset")
    marker_path = shards.join(raw_dir, DONE_MARKER)
    marker = shards.read_json(marker_path)
    if not marker:
        raise StageError(f"ingest --retry-failed: run {args.run} has no finished download to retry (a crawl used in "
                         "place is retried with img2dataset itself; an ingest that did not finish: run it again)")
    ingest_cfg = IngestStage.Config(**(cfg.get("ingest") or {}))
    with served(ingest_cfg) as policy:
        got = retry_failed(raw_dir, stage_dir, ingest_cfg, policy, optout_folder(stage_dir))
    marker.setdefault("retries", []).append({k: v for k, v in got.items() if k != "img2dataset"})
    shards.write_json(marker, marker_path)
    if not got["tried"]:
        print(f"ingest --retry-failed: nothing to retry in run {args.run}: no row failed for a transient reason "
              "(a timeout, a connection error, a 429 or 5xx answer, an unreachable robots.txt)")
        return 0
    if not got["changed_files"]:
        print(f"ingest --retry-failed: {got['tried']} URLs retried, none downloaded now: run {args.run} is unchanged")
        return 0
    before = shards.read_json(shards.join(stage_dir, "_manifest.json")) or {}
    with executor(args.workers, args.scheduler) as ex:
        res = run_stage(step, run_dir, raw_dir, cfg, ex, verify=args.verify)
    for key in (*MANIFEST_KEPT, UPSTREAM_KEY):
        if key in before:
            res.manifest[key] = before[key]
    res.manifest.setdefault("download", {})["retries"] = marker["retries"]
    shards.write_json(res.manifest, shards.join(res.folder, "_manifest.json"))
    print(f"ingest --retry-failed: {got['tried']} URLs retried (timeouts, connection errors, 429 and 5xx answers"
          + (f"; robots.txt fetched again from {got['robots_refetched_hosts']} hosts" if got["robots_refetched_hosts"]
             else "") + f"): {got['recovered']} downloaded now, {got['still_failing']} still failing")
    print_funnel([res])
    _print_next(run_dir, recipe.of_config(cfg), step)
    return 0


def _print_next(run_dir: str, steps: list, step) -> None:
    """The one `next:` line every ingest ends with (a URL list, text-first or not; a crawl used in place): the
    command that runs the recipe's steps after the download."""
    after = [s.name for s in steps if s.position > step.position]
    if after:
        print(f"next: clipcurate run --run {Path(run_dir).name}   ({', '.join(after)})")


def _preflight(args, run_dir: str, cfg: dict, steps: list) -> None:
    """The preflight of what this command runs (the download and the recipe's steps before it, text-first), and
    its input, before anything is written (pipeline/preflight.py). The steps after the download are checked by
    the `run` that runs them: the default recipe's dfn needs a network that dfn-train, run after ingest, makes."""
    from pipeline import preflight

    missing = None
    if args.input is not None and shards.is_local(args.input) and not Path(args.input).exists():
        missing = f"{args.input} does not exist: give a URL list (Parquet/CSV/TSV with url and caption columns) or an " \
                  "img2dataset output folder"
    # the steps before the download read a folder of row shards given as input (its images, if a step needs them)
    rows = args.input if len(steps) > 1 and args.input is not None and not missing and _is_folder(args.input) \
        and is_curated_folder(args.input) else None
    preflight.require(steps, run_dir, cfg, input_dir=rows, extra=[("ingest", missing)])


def _curate_before_download(args, run_dir: str, cfg: dict, steps: list, step, before: list, ingest_cfg) -> tuple:
    """Run the recipe's steps before ingest on the URL list (written as rows under runs/NAME/url_list) or on a
    folder of row shards, or, given no input, on the pool the run was started on; returns (the folder whose
    rows to download: the last of those steps' output, {"folder", "fingerprint"} of that step, the URL list or
    folder the run started from)."""
    from pipeline.layout import previous_stage_dir
    from pipeline.runner import run_pipeline

    input_dir, started_from = None, args.input
    if args.input is not None and _is_folder(args.input):
        input_dir = args.input
    elif args.input is not None:
        input_dir = shards.join(run_dir, URL_LIST_DIR)
        got = url_list_rows(args.input, input_dir, ingest_cfg.url_col, ingest_cfg.caption_col, ingest_cfg.shard_size,
                            ingest_cfg.egress_policy())
        print(f"url list: {got['rows']} rows: {got['kept']} to curate before the download, {got['rejected']} set "
              f"aside {got['reasons'] or ''} ({input_dir}/rejected/)")
    if started_from is None:
        started_from = ((shards.read_json(shards.join(run_dir, URL_LIST_DIR, "_url_list.json")) or {}).get("source")
                        or shards.join(run_dir, URL_LIST_DIR))
    results = run_pipeline([s.name for s in before], run_dir, cfg, input_dir=input_dir, workers=args.workers,
                           scheduler=args.scheduler, verify=args.verify)
    print_funnel(results)
    source = previous_stage_dir(run_dir, step, steps)
    if source is None:
        raise StageError(f"ingest: {before[-1].name} has no output in this run: give the URL list "
                         "(clipcurate ingest URLS --run NAME)")
    fp = (shards.read_json(shards.join(source, "_manifest.json")) or {}).get("fingerprint")
    return source, {"folder": shards.shard_name(source), "fingerprint": fp}, started_from


def _fail_if_nothing_kept(res, what: str, todo: str) -> None:
    """An ingest that kept no row is an error (exit 2), not a success with a funnel of zeros; its rows stay in
    rejected/ with their reasons."""
    if res.manifest["rows_out"] == 0 and res.manifest["rejected"] > 0:
        top = next(iter(res.manifest["reasons"]), "")
        raise StageError(f"ingest: {what} ({res.manifest['rejected']} rows rejected, most as '{top}'); "
                         f"{todo}, reasons per row in {res.folder}/rejected/")


def _is_folder(path: str) -> bool:
    fs, p = shards.fs_and_path(path)
    return fs.isdir(p)


def _ingest_crawl(args, run_dir: str, cfg: dict) -> int:
    """Bring your own crawl: an img2dataset output folder (Parquet or WebDataset) is the run's image store, in
    place; ingest converts its metadata to rows with references, failures to rejected/ with img2dataset's error."""
    from pipeline.executors import executor
    from pipeline.runner import run_stage

    config_mod.save(cfg, shards.join(run_dir, "config.toml"))
    stage_dir = shards.join(run_dir, _ingest_step(cfg).folder)
    store, input_dir = crawl_input(args.input, stage_dir)
    store.save(run_dir)
    with executor(args.workers, args.scheduler) as ex:
        res = run_stage(_ingest_step(cfg), run_dir, input_dir, cfg, ex, verify=args.verify)
    res.manifest["crawl"] = {"root": store.root, "format": store.format}
    shards.write_json(res.manifest, shards.join(res.folder, "_manifest.json"))
    kind = "WebDataset" if store.format == "wds" else "Parquet"
    print(f"ingest: img2dataset {kind} output {store.root} used in place as the image store")
    print_funnel([res])
    print(f"shards: {res.folder}/part-*.parquet   rejected: {res.folder}/rejected/")
    _print_next(run_dir, recipe.of_config(cfg), _ingest_step(cfg))
    _fail_if_nothing_kept(res, "no image of the crawl is usable", "check the crawl's status column")
    return 0


# ---- optout-recheck: opt-outs published after the crawl ----------------------------------------------------------
def cmd_optout_recheck(args) -> int:
    """Opt-outs change after a crawl (Re-LAION-5B removed links later): fetch today's robots.txt and tdmrep.json
    of every host the emitted rows name, afresh (not the run's recorded files), and write the uids they now
    exclude as a DataComp-style uid list (`schema.uid_list`, np.save), beside that day's evidence: the fetched
    files and hosts.parquet, and dropped.parquet (uid, url, reason, message). Nothing in the run is changed: the
    list is for the user to filter the set with (or to hand to whoever trains on it)."""
    import datetime

    import numpy as np
    import polars as pl

    from pipeline import schema
    from stages.ingest import optout
    from stages.ingest.download import served

    run_dir = run_dir_of(args)
    cfg = config_mod.saved_config(run_dir)
    if cfg is None:
        raise StageError(f"optout-recheck: {run_dir} is not a run (it has no config.toml)")
    emit = next((s for s in recipe.of_config(cfg) if s.stage == "emit"), None)
    folder = shards.join(run_dir, emit.folder) if emit is not None else None
    files = shards.list_shards(folder) if folder is not None and shards.exists(folder) else []
    if not files:
        raise StageError(f"optout-recheck: run {args.run} has emitted nothing yet (no {emit.folder if emit else 'emit'}"
                         " shards): run emit first")
    rows = pl.concat([pl.from_arrow(shards.read_shard(f, columns=["uid", "url"])) for f in files])
    ingest_cfg = IngestStage.Config(**(cfg.get("ingest") or {}))
    settings = optout.settings_of(ingest_cfg)
    if not (settings.respect_robots or settings.respect_tdmrep):
        raise StageError("optout-recheck: this run's [ingest] respect_robots and respect_tdmrep are both false: "
                         "nothing to check")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    day = shards.join(run_dir, "optout-recheck", stamp)
    urls = rows.get_column("url").unique(maintain_order=True)
    with served(ingest_cfg) as policy:
        checked, info = optout.check_urls(urls, settings, policy, day)
    verdict = pl.DataFrame({"url": urls}).hstack(checked.select("optout", "message"))
    dropped = rows.join(verdict.filter(pl.col("optout").is_not_null()), on="url", how="inner") \
        .rename({"optout": "reason"}).sort("uid")
    shards.write_shard(dropped.to_arrow(), shards.join(day, "dropped.parquet"))
    out = args.out or shards.join(day, "drop_uids.npy")
    import io
    buf = io.BytesIO()
    np.save(buf, schema.uid_list(dropped.get_column("uid").to_arrow()))
    shards.write_bytes(buf.getvalue(), out)
    by = dropped.group_by("reason").len().sort("reason").rows()
    print(f"optout-recheck: {rows.height} emitted rows on {info['hosts']} hosts, policies fetched today: "
          f"{dropped.height} now excluded" + (f" ({', '.join(f'{n} {r}' for r, n in by)})" if by else ""))
    print(f"drop list: {out}   evidence: {day}/")
    return 0
