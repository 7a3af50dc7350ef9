"""The spine's own commands, `run`, `check` and `clean`: what each one does once its arguments are parsed.

pipeline/cli.py names them in its parser and runs them under the run's lock; the doing is here, apart from the
parsing, with the funnel and output lines they (and ingest's command) print.
"""

from __future__ import annotations

import os
import sys

from pipeline import config as config_mod
from pipeline import recipe
from pipeline import shards
from pipeline.cli_config import config_for, refuse_a_download_left_behind
from pipeline.cli_run_names import run_dir_of
from pipeline.errors import StageError
from pipeline.registry import stage_class


def print_funnel(results) -> None:
    for res in results:
        m = res.manifest
        print(f"{m['stage']:>9}: {m['rows_in']:>8} in  {m['rows_out']:>8} kept  {m['rejected']:>8} rejected   -> {res.folder}")
        for reason, n in m["reasons"].items():
            print(f"{'':>11}{n:>8}  {reason}")
        for note in m.get("notes", []):
            print(f"{'':>11}note: {note}")



# ---- commands ------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from pipeline.runner import run_pipeline

    run_dir = run_dir_of(args)
    _import_from_cwd()  # a user's module:Class stage may be named on the command line or in the saved recipe
    before = config_mod.saved_config(run_dir)
    if args.stages is None:  # the whole recipe, but its download step (`clipcurate ingest` does that)
        cfg = config_for(args, run_dir, [])
        names = [s.name for s in recipe.of_config(cfg) if not stage_class(s.stage).downloads]
    else:
        names = [s.strip() for s in args.stages.split(",") if s.strip()]
        if not names:
            raise StageError(f"no stages given (e.g. {','.join(runnable()[:2])})")
        cfg = config_for(args, run_dir, names)
    refuse_a_download_left_behind(args, run_dir, before, cfg, names)
    results = run_pipeline(names, run_dir, cfg, input_dir=args.input, workers=args.workers, scheduler=args.scheduler,
                           verify=args.verify)
    print_funnel(results)
    _print_outputs(results)
    return 0

def cmd_check(args) -> int:
    """`clipcurate check --run NAME`: the preflight of every step of the run's recipe (its saved config with
    --config over it; a run that does not exist yet: the defaults with --config), one line per step, `ok` or
    each problem; exit 2 when any. Writes nothing: no lock, no run folder, no config."""
    from pipeline import preflight

    run_dir = run_dir_of(args)
    _import_from_cwd()  # a user's module:Class step, as `run` finds it
    if args.fresh_config and not args.config:
        raise config_mod.ConfigError("--fresh-config needs --config FILE (the settings to start afresh from)")
    cfg = config_mod.for_run(run_dir, args.config, fresh=args.fresh_config)
    results = preflight.check(recipe.of_config(cfg), run_dir, cfg, input_dir=args.input)
    for extra in args.extra_checks:
        results += extra(args, run_dir, cfg)
    bad = 0
    for label, problems in results:
        for problem in problems or ["ok"]:
            print(f"{label}: {problem}")
        bad += len(problems)
    if bad:
        print(f"clipcurate: error: check: {bad} problem{'s' if bad > 1 else ''} (above): the run would be refused "
              "until they are fixed", file=sys.stderr)
        return 2
    return 0


def _import_from_cwd() -> None:
    """`module:Class` stages are found from the current folder, as `python -m` finds modules, here and in the
    Dask workers this command starts (they inherit PYTHONPATH)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *paths])


def _print_outputs(results) -> None:
    """Where the training set is: emit's output folder, not its stage folder (metadata only)."""
    for res in results:
        fin = res.manifest.get("finalize") or {}
        if "samples" in fin and "folder" in fin:
            out = fin["folder"]
            print(f"training set: {fin['samples']} samples in {fin['shards']} shards")
            for fmt in fin.get("formats", []):
                print(f"  {fmt:>8}: {shards.join(out, fmt)}/")
            print(f"  {'uids':>8}: {shards.join(out, 'uids.npy')}   summary: {shards.join(out, 'summary.json')}")


def runnable() -> list[str]:
    """The default recipe's steps that `run` runs: all but the download, which has its own command."""
    try:
        return [n for n in recipe.default_recipe() if not stage_class(n).downloads]
    except StageError:
        return []


def cmd_clean(args) -> int:
    """`clipcurate clean --run NAME --stale`: remove the run's stale step folders (pipeline/stale.py: an older
    recipe's `NN_name` folders, which no step of its current recipe writes or reads and `report` lists), one line
    per folder, and nothing else. Without --stale it refuses, saying what it would remove (a command named
    `clean` must not guess what to clean); --dry-run lists only."""
    from pipeline import stale

    run_dir = run_dir_of(args)
    cfg = config_mod.saved_config(run_dir)
    if cfg is None:
        raise config_mod.ConfigError(f"clean: {run_dir} is not a run (it has no config.toml): nothing to clean")
    _import_from_cwd()  # a user's module:Class step is named by its class: found as `run` finds it
    found = stale.find(run_dir, cfg)
    if not (args.stale or args.dry_run):
        what = f"removes {', '.join(found.stale)}" if found.stale else "would remove nothing (the run has none now)"
        raise config_mod.ConfigError(f"clean: say what to remove: --stale {what}, the run's stale step folders "
                                     f"(`report` lists them); --dry-run lists them; nothing was removed")
    for name, why in found.kept.items():
        print(f"kept {shards.join(run_dir, name)}: not a step of the recipe now, but {why}")
    for note in found.unjudged:
        print(f"kept {shards.join(run_dir, note)}")
    if args.dry_run:
        for name in found.stale:
            print(f"would remove {shards.join(run_dir, name)}")
        print(f"clean: {len(found.stale)} stale step folder{'' if len(found.stale) == 1 else 's'} (--dry-run: "
              "nothing removed)")
        return 0
    for name in found.stale:
        try:
            print(stale.remove(run_dir, name), flush=True)
        except OSError as e:
            raise StageError(f"clean: cannot remove {shards.join(run_dir, name)} ({e.strerror or e}); the folders "
                             "above were removed, the others are as they were") from None
    n = len(found.stale)
    print(f"clean: removed {n} stale step folder{'' if n == 1 else 's'}" if n else
          f"clean: no stale step folder (the recipe's: {', '.join(found.recipe or [])})")
    return 0

