"""Run names on the command line: the one argument that becomes a path, checked before anything is made.

Every command that names a run goes through here (pipeline/cli.py `main` checks them all; a command finds its run
folder with `run_dir_of`), so the rule that keeps a name inside RUNS_DIR is written once.
"""

from __future__ import annotations

import os
import re

from pipeline import config as config_mod
from pipeline import shards


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
