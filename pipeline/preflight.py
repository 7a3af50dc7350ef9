"""The preflight: before a command writes anything in a run, what every step it is about to run needs.

Why. A run that stops at its fourth step for a network that was never fetched has spent the first three for
nothing, and a new user then learns the next missing need one stop at a time. So a command that writes a run
(`run`, `ingest`) first asks each step it will run what it lacks (`Stage.preflight`: its network, concept list,
WordNet, eval sets), and checks what the spine knows itself: a runs folder it may write in, a readable --input,
and an image store for every step that reads pixels. Any missing need refuses the command with every need at
once, one line each (`clipcurate: error: STEP: WHAT IS MISSING: THE FIX`), exit 2, and nothing written: not the
config, not a step folder. `clipcurate check --run NAME` runs the preflight alone, for the whole recipe.

Cheap by design: it looks (a file exists, the Hugging Face cache holds a model, a Parquet footer names its
columns), it never loads (no model, no WordNet reader, no automaton).

Steps a resume would skip are checked too. Whether a step is done is known only from its fingerprint, which
reads the identity of every input shard and the step's own resources (the concept list's digest, the
checkpoint's, the weights in the cache): exactly what may be missing. A done step whose resource is gone fails
at its fingerprint anyway (or, a pretrained network gone from the cache, its fingerprint changes and the step is
redone, which needs the network): refusing it first is the same outcome, earlier.

The image store a pixel step needs comes from where its rows come from: the recipe's download before it (run by
this command, as `clipcurate ingest` and `check` do, or recorded in the run), or the run's input (--input
with image bytes, or another run's stage folder, whose run records the store). A step before the recipe's
download (text-first) reads the URL list: it has no images. Steps that declare `pixels_optional` (their image
rules are skipped on a text-only pool) need none.
"""

from __future__ import annotations

import os
from typing import Iterable

from pipeline import images, recipe, shards
from pipeline.config import ConfigError
from pipeline.context import ShardContext
from pipeline.errors import StageError
from pipeline.registry import stage_class

RUNS_DIR = "runs-dir"  # the label of the spine's line about the runs folder
INPUT = "input"  # the label of the spine's line about --input


class PreflightError(StageError):
    """Needs a command lacks. str() is one line per need, `STEP: PROBLEM`; the CLI prefixes each line."""

    def __init__(self, needs: list[tuple[str, str]]):
        self.needs = list(needs)
        super().__init__("\n".join(f"{label}: {problem}" for label, problem in self.needs))


def require(steps: Iterable["recipe.Step"], run_dir: str, config: dict, input_dir: str | None = None,
            extra: Iterable[tuple[str, str]] = ()) -> None:
    """Raise PreflightError naming every need `steps` lack (plus the command's own `extra` (label, problem)s);
    return when there is none. Call it before the command writes anything in the run."""
    needs = [(label, p) for label, problems in check(steps, run_dir, config, input_dir) for p in problems]
    needs += [(label, p) for label, p in extra if p]
    if needs:
        raise PreflightError(needs)


def check(steps: Iterable["recipe.Step"], run_dir: str, config: dict,
          input_dir: str | None = None) -> list[tuple[str, list[str]]]:
    """(label, problems) for the runs folder, --input when given, then each step of `steps` (what the command
    runs), in order; no problems = ready. `config`: the run's resolved config (its recipe decides where a
    step's rows, and so its images, come from)."""
    running = list(steps)
    recipe_steps = recipe.of_config(config)
    out: list[tuple[str, list[str]]] = [(RUNS_DIR, _listed(run_folder_problem(run_dir)))]
    state, why = _input_images(input_dir) if input_dir is not None else (None, None)
    if input_dir is not None:
        out.append((INPUT, _listed(why)))
    store = images.ImageStore.load(run_dir) is not None
    for step in running:
        problems = step_problems(step, run_dir, config, recipe_steps, running, input_dir, state, store)
        out.append((step.name, _listed(_download_problem(step, run_dir, recipe_steps, running)) + problems))
    return out


def _download_problem(step: "recipe.Step", run_dir: str, recipe_steps: list, running: list) -> str | None:
    """A step after a download that follows curation steps (text-first) reads that download: when it has not
    run and this command does not run it, the first such step says so (the runner's words: pipeline/runner.py
    `_check_download_current`, which would refuse it too, after the config is written). A download that comes
    first (the default recipe) can be stood in for by --input: the runner says what is missing then."""
    downloads = [s for s in recipe_steps if recipe.downloads(s) and 0 < s.position < step.position
                 and s not in running and not recipe.output_exists(run_dir, s)]
    if not downloads:
        return None
    d = downloads[-1]
    if any(p.position > d.position and p.position < step.position for p in running):
        return None  # an earlier step of this command says it
    return (f"{d.name} has not run in this run: it downloads what the steps before it kept (clipcurate {d.stage} URLS "
            f"--run NAME), then run {step.name}")


def _listed(problem: str | None) -> list[str]:
    return [problem] if problem else []


# ---- the runs folder -------------------------------------------------------------------------------
def unwritable(path: str) -> str | None:
    """Why nothing could be written at `path` (a folder that exists, or one a command would make), looking only:
    the nearest folder that exists must be a folder this process may write in. None when it may, and for an
    object store (there the first write says so, in one line)."""
    if not shards.is_local(path):
        return None
    d = os.path.abspath(path[len("file://"):] if str(path).startswith("file://") else str(path))
    while not os.path.lexists(d) and os.path.dirname(d) != d:
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        return f"{d} is a file, not a folder: nothing can be made under it"
    if not os.access(d, os.W_OK | os.X_OK):
        return f"cannot write in {d} (permission denied)"
    return None


def run_folder_problem(run_dir: str) -> str | None:
    """The runs folder (or the run's own folder, when it exists) is not one this command can write in."""
    why = unwritable(run_dir)
    if why is None:
        return None
    return (f"{why}: the run folder {run_dir} cannot be written; give another --runs-dir (or $CLIPCURATE_RUNS), or "
            "make it writable")


# ---- one step ----------------------------------------------------------------------------------------
def step_problems(step: "recipe.Step", run_dir: str, config: dict, recipe_steps: list, running: list,
                  input_dir: str | None = None, input_state: str | None = None, store: bool = False) -> list[str]:
    """The step's own needs (`Stage.preflight`, its config's checks) and the image store it reads pixels from."""
    try:
        cls = stage_class(step.stage)
        stage = cls(cls.step_config(config.get(step.name, {}), config), int(config.get("run", {}).get("seed", 0)))
        ctx = ShardContext(stage=stage.name, run_dir=run_dir, stage_dir=shards.join(run_dir, step.folder))
        problems = [str(p) for p in (stage.preflight(ctx) or []) if p]
    except (ConfigError, StageError) as e:  # a config value the stage refuses, a user's module that is not a stage
        return [str(e)]
    if cls.needs_pixels and not cls.pixels_optional:
        why = _store_problem(step, run_dir, recipe_steps, running, input_dir, input_state, store)
        if why:
            problems.append(why)
    return problems


# ---- the image store -----------------------------------------------------------------------------------
IMAGES, REFS_WITHOUT_STORE, NO_IMAGES = "images", "refs without a store", "no images"


def _input_images(input_dir: str) -> tuple[str | None, str | None]:
    """(what --input holds, why it cannot be read): IMAGES (image bytes, or references whose run records their
    store), REFS_WITHOUT_STORE or NO_IMAGES, read from the shards' footers as `layout.record_input_store` reads
    them (the first shard that has columns says)."""
    try:
        paths = shards.list_shards(input_dir)
        for path in paths:
            sch = shards.read_schema(path)
            if images.byte_column(sch) is not None:
                return IMAGES, None
            if images.REF_COL in sch.names:
                return (IMAGES if images.store_of_folder(input_dir) is not None else REFS_WITHOUT_STORE), None
    except (shards.ShardError, OSError) as e:
        return None, f"--input {input_dir}: {e}"
    if not paths:
        return None, f"--input {input_dir} holds no Parquet shards: give a folder of Parquet shards or one .parquet file"
    return NO_IMAGES, None


def _input_lacks_images(input_dir: str, state: str | None) -> str:
    if state == REFS_WITHOUT_STORE:
        return (f"--input {input_dir}: its rows name their images ({images.REF_COL}) but no run records their image "
                f"store ({images.STORE_FILE} beside the folder): give the stage folder of the run that made them")
    return (f"--input {input_dir} holds no images (no image-bytes column, no {images.REF_COL}): give a pool with "
            "image bytes (an img2dataset Parquet output, or a run's stage folder)")


def _store_problem(step, run_dir: str, recipe_steps: list, running: list, input_dir: str | None,
                   input_state: str | None, store: bool) -> str | None:
    """Why the rows this pixel step reads will have no images behind them (None: they will)."""
    if input_dir is not None and input_state is None:
        return None  # --input cannot be read: its own line says so
    name = shards.shard_name(run_dir)
    downloads = [s for s in recipe_steps if recipe.downloads(s)]
    before = [s for s in downloads if s.position < step.position]
    if before:  # its rows come from the recipe's download
        d = before[-1]
        if d in running or store:
            return None
        if d.position > 0 and not recipe.output_exists(run_dir, d):
            return None  # that download has not run: _download_problem says so, once
        if input_dir is not None and d.position == 0 and input_state == IMAGES:
            return None  # a pool given with --input stands in for a download that comes first
        also = (f", or give --input a pool with images ({_input_lacks_images(input_dir, input_state)})"
                if input_dir is not None and d.position == 0 else
                ", or give --input a pool with image bytes" if d.position == 0 else "")
        return (f"it reads pixels, and this run has no image store: {d.name} has not run in it; run "
                f"`clipcurate {d.stage} URLS --run {name}` first{also}")
    if input_dir is not None:  # its rows come from --input
        return None if input_state == IMAGES else f"it reads pixels, but {_input_lacks_images(input_dir, input_state)}"
    after = [s for s in downloads if s.position > step.position]
    if after:
        return (f"it reads pixels, but comes before {after[0].name} in the recipe ([run] stages): its rows are the "
                f"URL list's, with no images yet; move it after {after[0].name}")
    if store:
        return None
    return (f"it reads pixels, but this run has no image store ({images.STORE_FILE}): give --input a pool with image "
            f"bytes (an img2dataset Parquet output, or a run's stage folder), or add ingest to the recipe and run "
            f"`clipcurate ingest URLS --run {name}`")
