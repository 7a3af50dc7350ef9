"""`clipcurate ...`: the command line the Makefile calls. Errors on bad input are one line, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys

from pipeline import shards
from pipeline import recipe
from pipeline.cli_commands import cmd_check, cmd_clean, cmd_run
from pipeline.cli_run_names import check_run_args, run_dir_of
from pipeline.errors import StageError

# re-exported: what other packages (stages/ingest/cli.py) and callers import from here
from pipeline.cli_commands import print_funnel, runnable  # noqa: F401
from pipeline.cli_config import config_for  # noqa: F401
from pipeline.cli_run_names import RUN_NAME, RUN_NAME_OPTIONS, check_run_name  # noqa: F401

log = logging.getLogger("clipcurate")

COMMANDS = "clipcurate.commands"  # entry-point group of the commands that live outside the spine


# Errors that are the user's input, not our bug: shown as one line.
def _user_errors():
    from pipeline.config import ConfigError
    from pipeline.runlock import RunLockError
    from pipeline.schema import SchemaError
    from pipeline.shards import ShardError

    return (ConfigError, SchemaError, ShardError, StageError, FileNotFoundError, RunLockError)


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
