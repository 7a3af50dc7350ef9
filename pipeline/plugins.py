"""Entry points through which the project's other packages (and a user's) plug into the spine, so that the spine
imports nothing outside itself: `clipcurate.commands` ("module:register", a function that adds subcommands to
the CLI: pipeline/cli.py) and `clipcurate.config_sections` (pipeline/config.py). pyproject.toml declares them.

They are read from the installed metadata, and, when the spine runs from the project's source tree, from its
pyproject.toml too, which then counts for the project's own: an editable install's metadata is as old as the
install, so a command added since (or a checkout run with PYTHONPATH over another checkout's install) would
otherwise be missing until the next `make setup`. Other distributions' entry points come from their metadata.
"""

from __future__ import annotations

import importlib
import tomllib
from functools import lru_cache
from pathlib import Path

PROJECT = "clipcurate"
_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@lru_cache(maxsize=None)
def _source_tree_entry_points() -> dict[str, dict[str, str]] | None:
    """pyproject.toml's [project.entry-points] when this spine runs from the project's source tree; else None."""
    try:
        project = tomllib.loads(_PYPROJECT.read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    if project.get("name") != PROJECT:
        return None
    return {group: dict(eps) for group, eps in project.get("entry-points", {}).items()}


@lru_cache(maxsize=None)
def registered(group: str) -> tuple[tuple[str, str], ...]:
    """(name, "module:attr") of every entry point of `group`: the project's own (from its source tree's
    pyproject.toml when there is one, else from the installed metadata), then other distributions'. A name the
    project registers is not overridden. Read once per process (`registered.cache_clear()` reads again): the
    stage registry is asked on every stage lookup, and a metadata scan is not free (timed by hand: bench/README.md,
    "The spine by hand")."""
    from importlib.metadata import entry_points

    source = _source_tree_entry_points()
    out = dict(source.get(group, {})) if source is not None else {}
    for ep in entry_points(group=group):
        if source is not None and ep.dist is not None and ep.dist.name == PROJECT:
            continue  # the source tree's list replaces the install's
        out.setdefault(ep.name, ep.value)
    return tuple(out.items())


def load(value: str):
    """The object "module:attr" names; None when that module is not there (a package left out of an install).
    A module that is there but fails to import (a dependency of it missing) raises."""
    module, _, attr = value.partition(":")
    try:
        obj = importlib.import_module(module.strip())
    except ModuleNotFoundError as e:
        name = module.strip()
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            return None
        raise
    for part in attr.strip().split(".") if attr.strip() else []:
        obj = getattr(obj, part)
    return obj
