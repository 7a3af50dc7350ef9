"""Runs the steps of a recipe over a folder of shards: `run_pipeline` chains the steps a command asks for, each
reading the output of the nearest earlier step that has run; `run_stage` runs one step. Top to bottom:

  fingerprint and shards to do (pipeline/resume.py: a done shard whose files still check out is skipped)
  -> pass 1, pool-wide statistics, for stages with `collect` (pipeline/stats_pass.py; reused when up to date)
  -> pass 2, `apply` per shard to do, on the executor (pipeline/tasks.py, pipeline/executors.py): each shard
     writes kept + rejected atomically, then a small `_done/<shard>.json`
  -> what is left of the tasks removed (temporaries, caches, outputs of shards no longer in the input)
  -> `finalize` (a stage's pool-wide outputs, its items on the executor) -> `_manifest.json`.

A step never reads an earlier step's output that fails its check: the earlier step, run in the same command,
redoes the shard first; not run, the later step refuses in one line (`_check_upstream_outputs`).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterable

from pipeline import recipe, resume, schema, shards
from pipeline.errors import StageError
from pipeline.executors import executor, pool_rows_at_least
from pipeline.layout import previous_stage_dir, record_input_store, record_source, recorded_source, skipped_stages
from pipeline.registry import get_stage, stage_class
from pipeline.stage import Stage
from pipeline.stats_pass import pass_one
from pipeline.partials import remove_stale_partials
from pipeline.tasks import ApplyTask, FinalizeTask, WorkerStep, answers_ready, apply_task, finalize_item_task

log = logging.getLogger("clipcurate.runner")


@dataclass
class StageResult:
    """What a step's run gives back: its name, its folder, its manifest (the commands print the funnel from it)."""

    stage: str
    folder: str
    manifest: dict = field(default_factory=dict)


def run_pipeline(
    stages: Iterable[str],
    run_dir: str,
    config: dict[str, dict],
    input_dir: str | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    verify: bool = False,
) -> list[StageResult]:
    """Run the recipe steps `stages` names, in recipe order ([run] stages); each reads the output of the
    nearest earlier step that has run (or `input_dir` first). Done shards are trusted while the files their
    markers record keep their sizes (and, with `verify`, their XXH3 digests); the others are redone.
    First the preflight (pipeline/preflight.py): a need any step lacks refuses the command before anything,
    the config included, is written."""
    steps = recipe.of_config(config)
    todo = recipe.plan(list(stages), steps)
    for st in todo:
        if stage_class(st.stage).downloads:  # (an unknown or missing stage fails here, before any work)
            raise StageError(f"{st.name} is not run with `run`: it downloads a URL list, use "
                             f"`clipcurate {st.stage} URLS --run NAME`")
    from pipeline import config as config_mod
    from pipeline import preflight

    preflight.require(todo, run_dir, config, input_dir=input_dir)
    _print_scale_notes(todo, run_dir, config, steps, input_dir)
    with _driver_writes("run", run_dir):
        config_mod.save(config, shards.join(run_dir, "config.toml"))
        if input_dir is not None:
            record_input_store(run_dir, input_dir)
            record_source(run_dir, input_dir)
    results = []
    with executor(workers, scheduler) as ex:
        current, from_stage = input_dir, False
        last: recipe.Step | None = None
        for st in todo:
            if last is not None and _download_between(last, st, steps):
                current = None  # it reads the download (`clipcurate ingest` ran it), not the step before it
            if current is None:
                current, from_stage = _input_in_run(st, run_dir, steps, todo, verify)
            with _driver_writes(st.name, run_dir):
                res = run_stage(st, run_dir, current, config, ex, upstream_is_stage=from_stage, verify=verify)
            results.append(res)
            current, from_stage, last = res.folder, True, st
    return results


def _input_in_run(st: "recipe.Step", run_dir: str, steps: list, todo: list, verify: bool) -> tuple[str, bool]:
    """What a step that does not read the step run just before it reads: the nearest earlier step's output in
    the run, else the pool the run was started on (--input). Checked before it is read (the download current,
    every shard what its marker vouches for); returns (folder, whether it is a step's output)."""
    current, from_stage = previous_stage_dir(run_dir, st, steps), True
    if current is None and recorded_source(run_dir):
        current, from_stage = recorded_source(run_dir), False
        log.info("%s reads %s, the pool this run was started on (--input)", st.name, current)
    if current is None:
        raise StageError(f"{st.name}: no input in run {run_dir}: ingest a URL list first "
                         f"(clipcurate {_download_step(steps)} URLS --run NAME), or give --input DIR")
    _check_download_current(st, current, steps, run_dir)
    if from_stage:
        _check_upstream_outputs(st, current, steps, run_dir, verify)
    _warn_skipped(st, current, steps, todo)
    return current, from_stage


def run_stage(
    name: "str | recipe.Step",
    run_dir: str,
    input_dir: str,
    config: dict[str, dict],
    ex,
    upstream_is_stage: bool = False,
    verify: bool = False,
) -> StageResult:
    """One step of the recipe over every shard of `input_dir`. Its tasks build the stage by its stage name
    (`step.stage`); its config section, folder, fingerprint and manifest use the step's name (`align@text`).

    Fingerprint -> shards to do (resume) -> pass 1, pool-wide statistics (`collect`, `merge`; reused when up to
    date) -> pass 2, `apply` per shard to do -> stale outputs removed -> `finalize` -> manifest."""
    r = _step_run(name, run_dir, input_dir, config, upstream_is_stage, verify)
    _clean_temporaries(r.stage_dir)
    before = _drop_stale_manifest(r)
    if hasattr(ex, "size_hint"):  # `--workers` not given: the pool's size decides (LazyExecutor)
        ex.size_hint(r.inputs)
    log.debug("%s: %d shards from %s (fingerprint %s, %s)", r.name, len(r.inputs), input_dir, r.fp, ex.name)
    timings: dict[str, float] = {}
    stats = pass_one(r, config, ex, timings)
    fps = resume.shard_fingerprints(r, stats.apply_keys)
    todo, summaries = resume.shards_to_do(r, ex.name, fps)
    if todo and r.probe.shuffles_stats and not answers_ready(r.stage_dir, stats.partitions):
        # the answers are removed once every shard is applied: made again for the shards to redo (the same bytes)
        stats = pass_one(r, config, ex, timings, force=True)
        if resume.shard_fingerprints(r, stats.apply_keys) != fps:
            fps = resume.shard_fingerprints(r, stats.apply_keys)
            todo, summaries = resume.shards_to_do(r, ex.name, fps)

    t0 = time.perf_counter()
    items = [ApplyTask(WorkerStep.of(r), p, fp=fps[r.probe.output_name(shards.shard_name(p))],
                       partitions=stats.partitions, stats_fp=r.fp) for p in todo]
    for _, summary in ex.map(apply_task, items, f"{r.name} apply"):
        summaries[summary["shard"]] = summary
    timings["apply_s"] = round(time.perf_counter() - t0, 3)
    _after_apply(r)

    per_shard = [summaries[k] for k in sorted(summaries)]
    t0 = time.perf_counter()
    final = _finalize(r, per_shard, ex)
    if final is not None:
        timings["finalize_s"] = round(time.perf_counter() - t0, 3)
    if not todo and not timings.get("collect_s") and before.get("timings"):
        timings = before["timings"]  # nothing redone: the time the step took is the time recorded when it ran
    manifest = resume.build_manifest(r, per_shard, timings)
    if final is not None:
        manifest["finalize"] = final
    manifest["executor"] = ex.name
    if stats.partitions:
        manifest["stats_partitions"] = stats.partitions
    if stats.answer_bytes:  # only when this run shuffled (a rerun that reused the statistics did not)
        manifest["stats_answer_bytes"] = stats.answer_bytes
    shards.write_json(manifest, shards.join(r.stage_dir, "_manifest.json"))
    log.info(
        "%s: %d rows in, %d kept, %d rejected %s",
        r.name, manifest["rows_in"], manifest["rows_out"], manifest["rejected"], manifest["reasons"],
    )
    return StageResult(r.name, r.stage_dir, manifest)


def _step_run(name, run_dir: str, input_dir: str, config: dict, upstream_is_stage: bool,
              verify: bool = False) -> resume.StepRun:
    """The step, its inputs and its fingerprint (resume.step_fingerprint)."""
    step = step_of(name, config)
    cls = stage_class(step.stage)
    seed = int(config.get("run", {}).get("seed", 0))
    stage_cfg = cls.step_config(config.get(step.name, {}), config)
    probe = cls(stage_cfg, seed)  # not set up: only for fingerprint parts and names
    inputs = shards.list_shards(input_dir)
    if not inputs:
        raise StageError(f"{step.name}: no Parquet shards in {input_dir}")
    r = resume.StepRun(step.name, step.stage, cls, probe, seed, stage_cfg, run_dir,
                       shards.join(run_dir, step.folder), input_dir, inputs, verify=verify,
                       max_text_bytes=int(config.get("run", {}).get("max_text_bytes", schema.MAX_TEXT_BYTES)))
    fp, base_fp, identities = resume.step_fingerprint(r, upstream_is_stage)
    return replace(r, fp=fp, base_fp=base_fp, identities=identities)


def step_of(name: "str | recipe.Step", config: dict) -> "recipe.Step":
    """A step of the config's recipe by name (a stage outside it: its pre-recipe place, 90_<name>)."""
    if isinstance(name, recipe.Step):
        return name
    return recipe.plan([name], recipe.of_config(config))[0]


def _drop_stale_manifest(r: resume.StepRun) -> dict:
    """The step's manifest when it carries this fingerprint ({} otherwise). A manifest vouches for the whole
    folder. Once a run with another fingerprint starts rewriting shards it no longer does: removed now, so that
    a kill below cannot leave a folder of mixed old and new shards that the report, or a later stage run alone,
    would take for a finished stage."""
    manifest_path = shards.join(r.stage_dir, "_manifest.json")
    before = shards.read_json(manifest_path) or {}
    if before.get("fingerprint") != r.fp:
        shards.remove(manifest_path)
        before = {}
    return before


def _clean_temporaries(stage_dir: str) -> None:
    """Every folder a stage writes in: shards, rejected/, _done/, stats/ (align's stats/pNNNN/ too), _shuffle/."""
    shards.clean_temporaries(stage_dir, recursive=True)


def _after_apply(r: resume.StepRun) -> None:
    """Every apply has finished: what is left of them goes."""
    # A Dask worker killed mid-write (its task rerun elsewhere by the nanny) leaves its `.tmp-*` file behind;
    # every task of this stage has finished now, so any temporary left is such an orphan, and so is any
    # pass-1 cache file (ShardContext.cache_put) that no apply took: e.g. one of a shard done by a killed run.
    _clean_temporaries(r.stage_dir)
    shards.remove(shards.join(r.stage_dir, "_cache"))
    shards.remove(shards.join(r.stage_dir, "_shuffle"))
    # outputs of shards no longer in the input are stale, and so are their kept partials (pipeline/partials.py)
    expected = {r.probe.output_name(shards.shard_name(p)) for p in r.inputs}
    for sub in ("", "rejected"):
        folder = shards.join(r.stage_dir, sub) if sub else r.stage_dir
        if shards.exists(folder):
            for p in shards.list_shards(folder):
                if shards.shard_name(p) not in expected:
                    shards.remove(p)
    remove_stale_partials(r.stage_dir, expected)


def _finalize(r: resume.StepRun, per_shard: list[dict], ex) -> dict | None:
    """The stage's pool-wide outputs (Stage.finalize), its items run on the executor; None for a stage
    without one (not set up then: setup may be heavy, models, automata)."""
    if type(r.probe).finalize is Stage.finalize:
        return None
    inst = get_stage(r.stage, r.stage_cfg, r.seed)
    items = inst.finalize_items(r.stage_dir, r.run_dir, per_shard)
    done = [None] * len(items)
    work = [FinalizeTask(WorkerStep.of(r), item, r.verify) for item in items]
    for i, result in ex.map(finalize_item_task, work, f"{r.name} finalize"):
        done[i] = result
    return inst.finalize(r.stage_dir, r.run_dir, per_shard, done if items else None)


@contextmanager
def _driver_writes(name: str, run_dir: str):
    """What the driver itself writes (config, stats, markers, manifest) can fail too: a full disk, a folder
    made read-only. Shard tasks already say which shard; this says which stage, in one line, not a traceback."""
    try:
        yield
    except OSError as e:
        raise StageError(f"{name}: cannot write in the run folder {run_dir}: {e}") from e


# ---- before a step reads an earlier step's output: refuse what it must not read, say what it skips -------
SCALE_ROWS_LIMIT = 10_000_000  # footers read to size the pool for `scale_notes`; a bigger pool is web scale


def _print_scale_notes(todo: list, run_dir: str, config: dict, steps: list, input_dir: str | None) -> None:
    """Before any work: each step's `scale_notes` for the pool the command's first step reads (rows counted
    from the shards' footers, up to SCALE_ROWS_LIMIT: above that no default is off scale), one line per note,
    `STEP: note`. Printed, not logged: they are about the result, and a user reads them before waiting for it."""
    if not todo:
        return
    pool = input_dir or previous_stage_dir(run_dir, todo[0], steps) or recorded_source(run_dir)
    if pool is None:
        return
    try:
        rows = pool_rows_at_least(shards.list_shards(pool), SCALE_ROWS_LIMIT)
    except (shards.ShardError, OSError):
        return  # the step that reads it says why, in its own words
    if rows is None or rows >= SCALE_ROWS_LIMIT:
        return
    seed = int(config.get("run", {}).get("seed", 0))
    for st in todo:
        cls = stage_class(st.stage)
        for note in cls(cls.step_config(config.get(st.name, {}), config), seed).scale_notes(rows) or []:
            print(f"{st.name}: {note}")


def _check_upstream_outputs(step: "recipe.Step", upstream_dir: str, steps: list, run_dir: str, verify: bool) -> None:
    """A step about to read the output of an earlier step that this command does not run: refuse, in one line,
    when a shard there is no longer what its marker vouches for (sizes; digests with `verify`), so that no step
    ever reads a truncated or corrupt output.

    Refused, not redone here: redoing means running a step the user did not ask for (a download, a model, a
    user's module:Class), with its own input and statistics checks; the command that does exactly that is one
    line, and is named in the error. Nothing has been written when this refuses. A shard whose marker predates
    recorded sizes (resume.UNRECORDED) is not refused for that: the earlier step redoes it the next time it runs."""
    folder = shards.shard_name(upstream_dir)
    prev = next((s for s in steps if s.folder == folder), None)
    # the shards its manifest counts (a kept shard deleted outright is not listed, and its rows would just be
    # missing downstream), and any other shard in the folder
    made = [s.get("shard") for s in (shards.read_json(shards.join(upstream_dir, "_manifest.json")) or {})
            .get("shards", []) if isinstance(s, dict)]
    names = sorted({n for n in made if isinstance(n, str)}
                   | {shards.shard_name(p) for p in shards.list_shards(upstream_dir)})
    for out in names:
        done = resume.read_done(upstream_dir, out)
        if not isinstance(done, dict):  # a folder not made by the runner (no markers): nothing vouches, nothing to check
            continue
        why = resume.outputs_mismatch(upstream_dir, out, done, verify)
        if why is None or why is resume.UNRECORDED:
            continue
        name = prev.name if prev is not None else folder
        if prev is not None and stage_class(prev.stage).downloads:
            redo = f"rerun `clipcurate {prev.stage} ... --run {shards.shard_name(run_dir)}` (it redoes that shard)"
        else:
            redo = (f"run {name} again first, which redoes that shard: clipcurate run {name},{step.name} "
                    f"--run {shards.shard_name(run_dir)}")
        raise StageError(f"{step.name}: shard {out} of {name} ({folder}) failed its check: {why}; {redo}")


def _download_between(a: "recipe.Step", b: "recipe.Step", steps: list) -> bool:
    """A downloading step sits between recipe steps a and b (text-first: klite, ingest, align)."""
    return any(a.position < s.position < b.position and recipe.downloads(s) for s in steps)


UPSTREAM_KEY = "upstream"  # a step's manifest: {"folder", "fingerprint"} of the step output it was made from


def _check_download_current(step: "recipe.Step", upstream_dir: str, steps: list, run_dir: str) -> None:
    """A step after the download reads it: refuse a download that is missing, or that was made from an older output
    of the steps before it (their config changed since: download again first)."""
    folder = shards.shard_name(upstream_dir)
    at = next((p.position for p in steps if p.position < step.position and p.folder == folder), None)
    # a pool given with --input stands in for a download that comes first (the default recipe); a download after
    # curation steps (text-first) cannot be stood in for
    skipped = [s for s in steps if s.position < step.position and recipe.downloads(s)
               and (s.position > at if at is not None else s.position > 0)]
    if skipped:
        raise StageError(f"{step.name}: {skipped[0].name} has not run in this run: it downloads what the steps before "
                         f"it kept (clipcurate {skipped[0].stage} URLS --run NAME), then run {step.name}")
    made_from = (shards.read_json(shards.join(upstream_dir, "_manifest.json")) or {}).get(UPSTREAM_KEY)
    if made_from:
        now = shards.read_json(shards.join(run_dir, made_from["folder"], "_manifest.json")) or {}
        if now.get("fingerprint") != made_from.get("fingerprint"):
            raise StageError(f"{step.name}: {folder} was downloaded from an older output of {made_from['folder']} "
                             f"(its config or input changed since): download again (clipcurate "
                             f"{_download_step(steps)} --run NAME), then run {step.name}")


def _download_step(steps) -> str:
    """The recipe's downloading step, for messages ("ingest" in the default recipe)."""
    return next((s.name for s in steps if recipe.downloads(s)), "ingest")


def _warn_skipped(step: "recipe.Step", upstream_dir: str, steps: list, running: list) -> None:
    missing = [s for s in skipped_stages(step, upstream_dir, steps) if s not in {r.name for r in running}]
    if missing:
        log.warning("%s reads %s: %s did not run in this run, so its rows are not curated by %s "
                    "(to include: clipcurate run %s,%s --run ...)", step.name, upstream_dir, ", ".join(missing),
                    "it" if len(missing) == 1 else "them", ",".join(missing), step.name)
