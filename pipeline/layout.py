"""Run-folder discovery: which step folders a run has, in what order, what their manifests say, and where the run
started from, and the earlier step a step reads. The runner, the report (pipeline/report/) and truth
(pipeline/truth.py) all find a run's steps here, so none imports another to learn where the data is. Two
functions write: the run's record of its input pool (`record_source`) and of its image store
(`record_input_store`), the two files that say where a run's data comes from.

A run on disk (DESIGN.md, "A run on disk"): `runs/NAME/NN_<stage>[-<label>]/` per step of its recipe, each with
a `_manifest.json` once the step has finished, its kept shards (`part-*.parquet`) and its `rejected/` shards.
"""

from __future__ import annotations

import logging
import os
import posixpath

from pipeline import config as config_mod
from pipeline import images, recipe, shards, stale
from pipeline.errors import StageError

log = logging.getLogger("clipcurate.runner")  # the runner's words, where the runner calls these

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


# ---- what a run folder records of its input, and the step a step reads --------------------------------------
def record_input_store(run_dir: str, input_dir: str) -> "images.ImageStore | None":
    """A pool given with --input becomes the run's image store when its shards hold image bytes (the runner
    then reads them without the bytes, with references); a folder of metadata shards with references (another
    run's stage) brings its run's store along. A text-only pool leaves the run's record as it is."""
    store, refs = None, False
    for path in shards.list_shards(input_dir):  # the first shard that says (an empty one may have no columns)
        sch = shards.read_schema(path)
        col = images.byte_column(sch)
        if col is not None:
            store = images.ImageStore(images.normalised(input_dir), "parquet", col)
            break
        if images.REF_COL in sch.names:
            refs = True
            break
    if refs:
        store = images.store_of_folder(input_dir)
        if store is None:
            log.warning("%s has image references but no run of its own records their image store (%s); "
                        "stages that need pixels will fail", input_dir, images.STORE_FILE)
            return None
    elif store is None:
        return None
    store.save(run_dir)
    return store


SOURCE_FILE = "source.json"


def record_source(run_dir: str, input_dir: str) -> None:
    """The pool a run was started on with --input (`runs/NAME/source.json`): a later `run` without --input
    reads it where no earlier stage of the run exists, as it reads ingest's output in a run that ingested."""
    shards.write_json({"input": images.normalised(input_dir)}, shards.join(run_dir, SOURCE_FILE))


def recorded_source(run_dir: str) -> str | None:
    rec = shards.read_json(shards.join(run_dir, SOURCE_FILE)) or {}
    return rec.get("input") or None


def previous_stage_dir(run_dir: str, step: "recipe.Step", steps: list) -> str | None:
    """The output of the nearest earlier step of the recipe that exists in this run (for a run given no --input)."""
    for prev in reversed([s for s in steps if s.position < step.position]):
        d = shards.join(run_dir, prev.folder)
        if shards.exists(shards.join(d, MANIFEST)):
            return d
        if shards.exists(d) and shards.list_shards(d):
            # a stage that wrote shards but no manifest was killed (or failed) mid-way: its folder may mix
            # shards of an old and a new config. Reading past it to an earlier stage would silently skip it.
            raise StageError(f"{step.name}: {prev.name} did not finish in this run ({d} has no _manifest.json); "
                             f"rerun it first")
    return None


def skipped_stages(step: "recipe.Step", upstream_dir: str, steps: list) -> list[str]:
    """Recipe steps between the folder a step reads and the step itself that have not run: `run klite` on a
    fresh run reads ingest's output, and align and metaclip are then silently not part of the data."""
    folder = shards.shard_name(upstream_dir)
    earlier = [s for s in steps if s.position < step.position and s.folder == folder]
    if not earlier:
        return []
    return [s.name for s in steps if earlier[0].position < s.position < step.position]
