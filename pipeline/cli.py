"""`clipcurate ...`: the command line the Makefile calls. Errors on bad input are one line, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import sys

from pipeline import config as config_mod
from pipeline import shards
from pipeline import recipe
from pipeline.errors import StageError
from pipeline.registry import stage_class, stage_names

log = logging.getLogger("clipcurate")

COMMANDS = "clipcurate.commands"  # entry-point group of the commands that live outside the spine


# Errors that are the user's input, not our bug: shown as one line.
def _user_errors():
    from pipeline.config import ConfigError
    from pipeline.runlock import RunLockError
    from pipeline.schema import SchemaError
    from pipeline.shards import ShardError

    return (ConfigError, SchemaError, ShardError, StageError, FileNotFoundError, RunLockError)


# ---- run names -----------------------------------------------------------------------------------
# A run name becomes a folder, RUNS_DIR/NAME: one path component, so that no name reaches outside RUNS_DIR
# (`../x`, `/abs`, `a/b`) or names RUNS_DIR itself (`.`, empty) or its parent (`..`).
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")
RUN_NAME_OPTIONS = (("run", "--run"), ("compare", "--compare"))  # the arguments that hold a run name


def check_run_name(name: str, option: str = "--run") -> str:
    """`name` when it is a run name; else a one-line ConfigError (before anything is created)."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise config_mod.ConfigError(
            f"{option} {name!r} is not a run name: give one folder name of letters, digits, '.', '_' or '-' "
            "(not '.' or '..'); the run lives in RUNS_DIR/NAME (--runs-dir sets RUNS_DIR)")
    return name


def check_run_args(args) -> None:
    """Every run name on the command line, and --runs-dir when one is used: one line, exit 2, nothing made."""
    named = False
    for attr, option in RUN_NAME_OPTIONS:
        value = getattr(args, attr, None)
        if value is not None:
            check_run_name(value, option)
            named = True
    if named:
        _check_runs_dir(args.runs_dir)


def _check_runs_dir(runs_dir: str) -> None:
    """A local --runs-dir that is (or lies under) a file cannot hold runs: say so, rather than a traceback from
    the first write under it."""
    if not shards.is_local(runs_dir):
        return
    d = os.path.abspath(runs_dir[len("file://"):] if runs_dir.startswith("file://") else runs_dir)
    while not os.path.lexists(d) and os.path.dirname(d) != d:
        d = os.path.dirname(d)
    if os.path.lexists(d) and not os.path.isdir(d):
        what = "is a file" if os.path.abspath(runs_dir) == d else f"is under {d}, which is a file"
        raise config_mod.ConfigError(f"--runs-dir {runs_dir} {what}, not a folder: runs go in RUNS_DIR/NAME")


def run_dir_of(args) -> str:
    return shards.join(args.runs_dir, args.run)


def print_funnel(results) -> None:
    for res in results:
        m = res.manifest
        print(f"{m['stage']:>9}: {m['rows_in']:>8} in  {m['rows_out']:>8} kept  {m['rejected']:>8} rejected   -> {res.folder}")
        for reason, n in m["reasons"].items():
            print(f"{'':>11}{n:>8}  {reason}")
        for note in m.get("notes", []):
            print(f"{'':>11}note: {note}")


# ---- commands ------------------------------------------------------------------------------------
def config_for(args, run_dir: str, running: list[str]) -> dict:
    """The run's saved config with --config laid over it (or defaults + --config with --fresh-config); prints
    what a --config changes in an existing run and which stages that redoes."""
    fresh = getattr(args, "fresh_config", False)
    if fresh and not args.config:
        raise config_mod.ConfigError("--fresh-config needs --config FILE (the settings to start afresh from)")
    before = config_mod.saved_config(run_dir)
    cfg = config_mod.for_run(run_dir, args.config, fresh=fresh)
    if before is not None and args.config:
        changed = config_mod.changes(before, cfg)
        changed_output = [c for c in changed if not _speed_only(c[0], c[1])]
        for section, key, old, new in changed:
            print(f"config: {section}.{key}: {_show(old)} -> {_show(new)}")
        if changed and not changed_output:
            print("config: only speed settings changed: this redoes nothing")
        elif changed:
            recipe_changed = any(c[:2] == ("run", "stages") for c in changed_output)
            if recipe_changed:  # which steps that redoes follows from their inputs: each step's fingerprint says
                print("config: the recipe changed: a step whose input or place changed is redone")
            sections = {c[0] for c in changed_output if c[:2] != ("run", "stages")}
            if sections or not recipe_changed:
                redo = config_mod.redone_by(sections, _run_stages(run_dir, running, cfg))
                print(f"config: this redoes {', '.join(redo)}" if redo
                      else "config: this redoes nothing (no step that has run depends on it)")
        else:
            print(f"config: {args.config} changes nothing in this run")
    return cfg


def _speed_only(section: str, key: str) -> bool:
    """A key that changes a stage's speed, not its output (Stage.speed_keys)."""
    section = section.partition("@")[0]  # a labelled step's section: its stage's keys
    if section == "run":
        return key in config_mod.RunConfig.speed_keys
    if section not in stage_names():
        return False
    try:
        return key in stage_class(section).speed_keys
    except StageError:
        return False


def _show(v) -> str:
    return "(unset)" if v is None else repr(v) if isinstance(v, str) else str(v)


def _run_stages(run_dir: str, running: list[str], cfg: dict) -> list[str]:
    """The recipe steps that have already run in this run (their folder exists), in order, and the trainer when
    it has trained: what a config change may redo. A step about to run for the first time is not redone by it
    (on a brand-new run the line named every step the command was about to run)."""
    steps = recipe.of_config(cfg)
    have = [s.name for s in steps if recipe.output_exists(run_dir, s)]
    for name in running:  # a user's module:Class step outside the recipe: its place there (90_<name>)
        if name not in have and recipe.find(steps, name) is None:
            try:
                if recipe.output_exists(run_dir, recipe.plan([name], steps)[0]):
                    have.append(name)
            except StageError:
                pass  # an unknown stage: `run` says so itself
    if shards.exists(shards.join(run_dir, "train")):
        have.append("train")
    return have


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
    _refuse_a_download_left_behind(args, run_dir, before, cfg, names)
    results = run_pipeline(names, run_dir, cfg, input_dir=args.input, workers=args.workers, scheduler=args.scheduler,
                           verify=args.verify)
    print_funnel(results)
    _print_outputs(results)
    return 0


def _refuse_a_download_left_behind(args, run_dir: str, before: dict | None, cfg: dict, names: list[str]) -> None:
    """A config that redoes a step before the recipe's download (text-first: metaclip's t) changes what that
    download should have fetched, and `run` never downloads: the steps after it would refuse the old download,
    but only after the steps before it were redone. Refuse here, before any work, with the command that redoes
    both (`clipcurate ingest --config FILE` curates again and downloads what is kept)."""
    if before is None or not args.config:
        return
    changed = {c[0] for c in config_mod.changes(before, cfg)
               if not _speed_only(c[0], c[1]) and c[:2] != ("run", "stages")}
    if not changed:
        return
    steps = recipe.of_config(cfg)
    redo = config_mod.redone_by(changed, _run_stages(run_dir, names, cfg))
    for d in steps:
        if d.name not in redo or d.name in names or not recipe.downloads(d):
            continue
        after = [n for n in names if (s := recipe.find(steps, n)) is not None and s.position > d.position]
        if not after:
            continue
        upto = ", ".join(redo[:redo.index(d.name) + 1])
        name = shards.shard_name(run_dir)
        raise StageError(f"{after[0]}: this config redoes {upto}, and `run` does not download: give it to "
                         f"`clipcurate {d.stage} --run {name} --config {args.config}` first (it redoes the steps "
                         f"before the download and fetches what they keep), then `clipcurate run --run {name}`; "
                         "nothing was done")


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


def _workers(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n}: give 0 (in-process) or a positive number of workers")
    return n


def add_exec(p) -> None:
    p.add_argument("--workers", type=_workers, default=None, help="Dask workers; 0 = in-process (default: in-process for a small pool, else one per core)")
    p.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")


def add_verify(p) -> None:
    p.add_argument("--verify", action="store_true",
                   help="before trusting a finished shard, check the XXH3 digest of every file it wrote, not only "
                        "its size (reads them all); a shard that fails is redone")


def add_config(p) -> None:
    p.add_argument("--config", default=None,
                   help="TOML file laid over the run's saved config (keys it does not name keep their values)")
    p.add_argument("--fresh-config", action="store_true",
                   help="start from the defaults + --config instead of the run's saved config")


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes as one line that says where help is, exit 2 (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


GLOBAL_HELP = {
    "runs_dir": "root of runs (default: $CLIPCURATE_RUNS, else runs/)",
    "verbose": "debug logs, third-party libraries' too",
}


def _add_globals(p, top: bool) -> None:
    """--runs-dir and -v are accepted before or after the subcommand (SUPPRESS: an absent one after the
    subcommand does not overwrite one given before it)."""
    default = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("--runs-dir", default=default(os.environ.get("CLIPCURATE_RUNS", "runs")), help=GLOBAL_HELP["runs_dir"])
    p.add_argument("-v", "--verbose", action="store_true", default=default(False), help=GLOBAL_HELP["verbose"])


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, p in action.choices.items():
                yield name, p
                yield from _subparsers(p)


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="clipcurate", description="Curate image-text pairs for CLIP training.")
    _add_globals(ap, top=True)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    try:  # the names only: importing every stage to ask which one downloads would slow every command's start
        steps = ",".join(recipe.default_recipe())
    except StageError:
        steps = "(none installed)"
    p = sub.add_parser("run", help="run recipe steps on a run's previous output or --input, or your own "
                                   "module:Class")
    p.add_argument("stages", nargs="?", default=None,
                   help=f"comma list of recipe steps, run in recipe order ([run] stages; the default recipe: "
                        f"{steps}); a repeated stage by its label (align@text); or a Stage subclass "
                        "as module:Class (importable from the current folder). Default: every step of the recipe "
                        "but its download, which `clipcurate ingest` runs")
    p.add_argument("--run", required=True, help="run name: runs/NAME")
    p.add_argument("--input", default=None,
                   help="folder of Parquet shards (or one .parquet file) with a text column; default: the run's "
                        "previous stage output")
    add_config(p)
    add_exec(p)
    add_verify(p)
    p.set_defaults(fn=cmd_run, writes_run=True)  # main takes the run's lock (pipeline/runlock.py)

    p = sub.add_parser("check", help="the preflight alone: what every step of the run's recipe needs (network, "
                                     "concept list, WordNet, eval sets, image store, a writable runs folder); "
                                     "writes nothing")
    p.add_argument("--run", required=True, help="run name: RUNS_DIR/NAME (it need not exist yet)")
    p.add_argument("--input", default=None, help="the folder of Parquet shards `run --input` would be given")
    add_config(p)
    # no lock, no run folder: it writes nothing. Other packages add what their own commands need
    # (`extra_checks`: functions (args, run_dir, config) -> [(label, [problems])]; the trainer's --hq)
    p.set_defaults(fn=cmd_check, extra_checks=())

    p = sub.add_parser("clean", help="remove a run's stale step folders: an older recipe's NN_name folders that no "
                                     "step of its current recipe writes or reads (`report` lists them)")
    p.add_argument("--run", required=True, help="run name: its folder is RUNS_DIR/NAME")
    p.add_argument("--stale", action="store_true",
                   help="remove the stale step folders (required: clean removes nothing else)")
    p.add_argument("--dry-run", action="store_true", help="list what --stale would remove; remove nothing")
    # main takes the run's lock when it removes (pipeline/runlock.py); a refusal or a listing writes nothing
    p.set_defaults(fn=cmd_clean, writes_run=lambda a: a.stale and not a.dry_run)

    for extra in _extra_commands():
        extra(sub)
    for _, p in _subparsers(ap):
        if "--runs-dir" not in p._option_string_actions:
            _add_globals(p, top=False)
        run = p._option_string_actions.get("--run")
        if run is not None and not run.help:
            run.help = "run name: its folder is RUNS_DIR/NAME"
    return ap


def _extra_commands():
    """The spine's own extra commands (report), then the commands other packages register under the
    `clipcurate.commands` entry point (pyproject.toml: `name = "module:register"`, e.g. the demo world's, the
    trainer's), each a function that adds its subparsers. The spine names none of them; one whose package is not
    installed is left out."""
    from pipeline import plugins, report

    out = [report.register]
    for _, target in plugins.registered(COMMANDS):
        register = plugins.load(target)
        if register is not None:
            out.append(register)
    return out


def _setup_logging(verbose: bool) -> None:
    """Our progress at INFO; third-party libraries (open_clip logs every model load at INFO on the root logger)
    only from WARNING, unless -v."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("clipcurate").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("distributed", "asyncio", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _remove_if_only_config(run_dir: str) -> None:
    """A command that failed on a run it created leaves nothing behind (not an empty run with a config). The
    run's lock file is its lock's to remove (with the folder it made, once empty)."""
    from pipeline.runlock import LOCK_NAME

    try:
        fs, p = shards.fs_and_path(run_dir)
        names = {shards.shard_name(x) for x in fs.ls(p)} if fs.exists(p) else None
        if names is not None and names <= {"config.toml", LOCK_NAME}:
            if LOCK_NAME not in names:
                fs.rm(p, recursive=True)
            elif "config.toml" in names:
                fs.rm(shards.join(p, "config.toml"))
    except OSError:
        pass


def _run_lock(args, run_dir: str | None, argv: list[str] | None):
    """The run's lock (pipeline/runlock.py), held while a command that writes the run runs: its parser sets
    `writes_run` (True, or a function of the arguments). Taken here, once, not in each command; a command that
    runs another's code in-process re-enters it. A null context for a command that does not write a run."""
    from pipeline.runlock import RunLock

    writes = getattr(args, "writes_run", False)
    if callable(writes):
        writes = writes(args)
    if not writes or run_dir is None:
        return contextlib.nullcontext()
    words = sys.argv[1:] if argv is None else argv
    return RunLock(run_dir, command=" ".join(["clipcurate", *(shlex.quote(str(w)) for w in words)]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand's parser, so that the line points at its --help
        subs = dict(_subparsers(parser))
        (subs.get(getattr(args, "command", ""), parser)).error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose)
    try:
        check_run_args(args)  # a run name that is not one folder name: one line, before anything is made
        run_dir = run_dir_of(args) if getattr(args, "run", None) is not None else None
        created = run_dir is not None and not shards.exists(run_dir)
        with _run_lock(args, run_dir, argv):  # one writer per run: a second one stops here, in one line
            try:
                return int(args.fn(args) or 0)
            except _user_errors():
                if created:
                    _remove_if_only_config(run_dir)
                raise
    except _user_errors() as e:
        for line in str(e).splitlines() or [""]:  # one line per problem (the preflight's needs), each prefixed
            print(f"clipcurate: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipcurate: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
