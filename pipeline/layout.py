"""Run-folder discovery: which step folders a run has, in what order, what their manifests say, and where the run
started from. Read-only: nothing here writes a run. The report (pipeline/report/) and truth (pipeline/truth.py)
both find a run's steps here, so neither imports the other to learn where the data is.

A run on disk (DESIGN.md, "A run on disk"): `runs/NAME/NN_<stage>[-<label>]/` per step of its recipe, each with
a `_manifest.json` once the step has finished, its kept shards (`part-*.parquet`) and its `rejected/` shards.
"""

from __future__ import annotations

import os
import posixpath

from pipeline import config as config_mod
from pipeline import recipe, shards, stale
from pipeline.errors import StageError

MANIFEST = "_manifest.json"  # what the runner writes in a step's folder when the step has finished


def read_manifest(folder: str) -> dict | None:
    """The step folder's manifest, or None when it has none (not finished)."""
    return shards.read_json(shards.join(folder, MANIFEST))


def recipe_steps(run_dir: str) -> list[recipe.Step]:
    """The steps of the run's recipe: its saved config's, else the default config's. Raises StageError or
    ValueError where the saved config names a recipe that cannot be read; each caller says what it falls back to."""
    return recipe.of_config(config_mod.saved_config(run_dir) or config_mod.resolve({}))


def stage_folders(run_dir: str) -> list[tuple[str, str]]:
    """(step name, folder) for every step of the run's recipe that has finished (has a manifest), in recipe
    order; then any other finished stage folder (a user's stage run outside the recipe), but an older recipe's
    (stale: pipeline/stale.py, listed in the summary). A step name is a stage name, or stage@label for a repeated
    stage."""
    try:
        steps = recipe_steps(run_dir)
    except (StageError, ValueError):
        steps = recipe.steps_of(recipe.default_recipe())
    out, seen = [], set()
    for step in steps:
        d = shards.join(run_dir, step.folder)
        seen.add(step.folder)
        if shards.exists(shards.join(d, MANIFEST)):
            out.append((step.name, d))
    seen |= _stale_names(run_dir)  # an older recipe's folders: listed in the summary, not steps of this run
    fs, p = shards.fs_and_path(run_dir)
    for name in sorted(posixpath.basename(x.rstrip("/")) for x in fs.glob(p.rstrip("/") + "/[0-9][0-9]_*")):
        if name not in seen:
            stage = (read_manifest(shards.join(run_dir, name)) or {}).get("stage", "")
            if stage:
                out.append((stage, shards.join(run_dir, name)))
    return out


def _stale_names(run_dir: str) -> set[str]:
    """The run's stale step folders (pipeline/stale.py), those `clean` keeps too; none where they cannot be told."""
    try:
        return set(stale.find(run_dir, dependencies=False).stale)
    except (StageError, ValueError, OSError):
        return set()


def manifests(run_dir: str) -> list[dict]:
    """The manifests of the run's finished steps, in the order of stage_folders."""
    return [read_manifest(folder) for _, folder in stage_folders(run_dir)]


def part_shards(folder: str) -> list[str]:
    """The folder's part-*.parquet shards (a step's kept rows, or its rejected/ ones), local or fsspec; [] when
    there is no such folder."""
    if not shards.exists(folder):
        return []
    return [p for p in shards.list_shards(folder) if shards.shard_name(p).startswith("part-")]


def started_from(ms: list[dict]) -> str | None:
    """The URL list (or input) a run started from, given its steps' manifests in recipe order: a download step's
    `url_list` (the download may come after curation steps, text-first), else the first step's input; one spelling
    of a local path."""
    src = next((m["url_list"] for m in ms if m.get("url_list")), None) or (ms[0].get("input") if ms else None)
    if not src:
        return None
    return str(src).rstrip("/") if "://" in str(src) else os.path.normpath(os.path.abspath(str(src)))
