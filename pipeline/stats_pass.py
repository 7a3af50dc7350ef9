"""Pass 1, driven from the driver: a step's pool-wide statistics, for stages with `collect`.

- A survey first, for a stage whose statistics need something pool-wide before collect (Stage.survey:
  semdedup's centroids): partials per shard, tree-reduced, concluded once, saved beside the statistics.
- Statistics bounded by something other than the pool (metaclip: entries; klite: lemmas): collect per shard,
  partials tree-reduced with `merge` in shard order with a fixed fan-in, saved by the driver.
- Statistics that grow with the pool (Stage.split: align), a shuffle: collect writes its partial cut by key hash
  into partitions, one task per partition merges and saves it and writes each shard's answer. No task ever holds
  more than one partition of the pool; the driver holds none.

Reused, not recomputed, while `_stats.json` carries the step's fingerprint and its files pass their check
(pipeline/resume.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pipeline import codec, resume, shards
from pipeline.config import RunConfig
from pipeline.hashing import fingerprint
from pipeline.stage import Stage
from pipeline.task_inputs import shard_context, survey_path
from pipeline.tasks import (MergeWith, PartitionTask, ShardTask, SplitTask, WorkerStep, collect_split_task,
                            collect_task, merge_partition_task, survey_task)

log = logging.getLogger("clipcurate.runner")  # the runner's logger: its lines read as one story to a user


def stats_partitions(n_shards: int, shards_per_partition: int) -> int:
    """A partition's merge holds about `shards_per_partition` shards' worth of keys whatever the pool size
    (`[run] stats_shards_per_partition`), so memory per task stays flat as the pool grows. The result does not
    depend on it: every key is merged whole inside its one partition."""
    return max(1, -(-n_shards // max(1, int(shards_per_partition))))


@dataclass(frozen=True)
class StatsPass:
    """What pass 1 leaves for apply: the shuffle's partitions (0: not shuffled), the size of the answers one
    shard reads (None: reused, not written now), and each output shard's key into the statistics, for its
    fingerprint (resume.shard_fingerprints)."""

    partitions: int = 0
    answer_bytes: dict | None = None
    apply_keys: dict = field(default_factory=dict)


def pass_one(r: resume.StepRun, config: dict, ex, timings: dict, force: bool = False) -> StatsPass:
    """Pool-wide statistics, unless up to date (and not `force`d: a shuffled stage's answers, removed once every
    shard was applied, are wanted again): tree-reduced, or shuffled by key into partitions for a stage whose
    statistics grow with the pool."""
    if not r.probe.has_stats:
        return StatsPass()
    prior = shards.read_json(resume.stats_marker(r.stage_dir)) or {}
    shuffled = r.probe.shuffles_stats
    if prior.get("fingerprint") == r.fp and not force:
        why = resume.stats_mismatch(r.stage_dir, prior, r.verify)
        if why is None:
            log.info("%s: statistics up to date, reusing", r.name)
            return StatsPass(int(prior.get("partitions", 0)) if shuffled else 0, None, prior[resume.APPLY_KEYS])
        log.warning("%s: statistics: %s: recomputing them", r.name, why)
    shards.remove(resume.stats_marker(r.stage_dir))  # stale stats must never be trusted if we die below
    # ... nor left lying around: the report and a reader of the folder would take them as this run's
    for sub in ("stats", "_shuffle", "survey"):
        shards.remove(shards.join(r.stage_dir, sub))
    answer_bytes, files, partitions = None, {}, 0
    if r.probe.has_survey:
        _surveyed(r, ex, timings, files)
    survey = fingerprint({k: v for k, v in files.items() if k.startswith("survey/")})  # collect reads it too
    if shuffled:
        per = config.get("run", {}).get("stats_shards_per_partition", RunConfig.stats_shards_per_partition)
        partitions = stats_partitions(len(r.inputs), per)
        answer_bytes, answers = _shuffled_stats(r, ex, timings, partitions, files, _keep_keys(r, survey, partitions))
        # a shard's apply reads its answers, and the survey (ctx.survey) when there is one
        keys = {out: {"answers": digest, "survey": survey} for out, digest in answers.items()}
    else:
        _reduced_stats(r, ex, timings, files, _keep_keys(r, survey, 0))
        whole = fingerprint(files)  # every apply reads all of it, unless the stage says what it reads
        if type(r.probe).apply_key is not Stage.apply_key:
            # read back as apply will read it: save_stats may derive what apply uses (metaclip's t)
            key = r.probe.apply_key(r.probe.load_stats(shards.join(r.stage_dir, "stats")))
            whole = fingerprint({"apply_key": key, "survey": survey})
        keys = {r.probe.output_name(shards.shard_name(p)): whole for p in r.inputs}
    resume.write_stats_marker(r, partitions, files, keys)
    return StatsPass(partitions, answer_bytes, keys)


def _keep_keys(r: resume.StepRun, survey: str, partitions: int) -> list[str]:
    """Per input shard, what its collect is made of: the step less its inputs, the shard's input, the survey
    and the partitions its pieces are cut into (pipeline/partials.py)."""
    return [fingerprint({"step": r.base_fp, "input": ident, "survey": survey, "partitions": partitions})
            for ident in r.identities]


def _surveyed(r: resume.StepRun, ex, timings: dict, files: dict) -> None:
    """The survey pass: partials per shard, tree-reduced, concluded once here, saved beside the statistics."""
    t0 = time.perf_counter()
    step = WorkerStep.of(r)
    partials = ex.collect_values(survey_task, [ShardTask(step, p) for p in r.inputs], f"{r.name} survey")
    merged = ex.tree_reduce(MergeWith(step, "merge_survey"), partials, f"{r.name} survey merge")
    del partials
    stage = step.build()
    result = stage.conclude_survey(merged, shard_context(stage, r.stage_dir, ""))
    with shards.recording_writes() as wrote:
        shards.write_bytes(codec.encode(result), survey_path(r.stage_dir))
    files.update(shards.records_under(r.stage_dir, wrote))
    timings["survey_s"] = round(time.perf_counter() - t0, 3)


# (these two name their passes by the stage's name, `align`, as they always have; the survey by the step's)
def _reduced_stats(r: resume.StepRun, ex, timings: dict, files: dict, keep: list[str]) -> None:
    """Statistics bounded by something other than the pool (metaclip: entries; klite: lemmas): partials
    tree-reduced with `merge`, saved by the driver; `files` gets the records of the files saved."""
    t0 = time.perf_counter()
    step = WorkerStep.of(r)
    partials = ex.collect_values(collect_task, [ShardTask(step, p, k) for p, k in zip(r.inputs, keep)],
                                 f"{r.stage} collect")
    timings["collect_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    stats = ex.tree_reduce(MergeWith(step), partials, f"{r.stage} merge")
    # On Dask these are futures: held, they make the scheduler recompute a partial whose worker dies
    # later, in apply, rerunning collect (and its side effects, e.g. a pass-1 cache file written
    # after apply took it) for nothing. Released now.
    del partials
    stats_dir = shards.join(r.stage_dir, "stats")
    shards.remove(stats_dir)
    with shards.recording_writes() as wrote:
        r.probe.save_stats(stats, stats_dir)
    files.update(shards.records_under(r.stage_dir, wrote))
    timings["merge_s"] = round(time.perf_counter() - t0, 3)


def _shuffled_stats(r: resume.StepRun, ex, timings: dict, partitions: int, files: dict,
                    keep: list[str]) -> tuple[dict, dict]:
    """Statistics that grow with the pool (Stage.split): collect writes each shard's partial cut into
    partitions; one task per partition merges it, saves it as stats/pNNNN and writes every shard's answer.
    Returns the size of the answers one shard reads in apply (bytes: max and mean over shards) and each output
    shard's digest of them; `files` gets the records of the statistics files saved (for `_stats.json`)."""
    t0 = time.perf_counter()
    step = WorkerStep.of(r)
    names = [None] * len(r.inputs)
    items = [SplitTask(step, p, k, partitions) for p, k in zip(r.inputs, keep)]
    for i, out in ex.map(collect_split_task, items, f"{r.stage} collect"):
        names[i] = out
    timings["collect_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    per_shard = [0] * len(names)  # what each shard's apply will read, over all partitions
    digests = [[""] * partitions for _ in names]  # ... and its digest, per partition
    items = [PartitionTask(step, k, names) for k in range(partitions)]
    for k, (sizes, saved, dig) in ex.map(merge_partition_task, items, f"{r.stage} merge ({partitions} partitions)"):
        per_shard = [a + b for a, b in zip(per_shard, sizes)]
        for i, d in enumerate(dig):
            digests[i][k] = d
        files.update(saved)
    timings["merge_s"] = round(time.perf_counter() - t0, 3)
    log.info("%s: statistics in %d partitions; answers per shard: max %.1f MiB, mean %.1f MiB", r.stage, partitions,
             max(per_shard) / 2**20, sum(per_shard) / len(per_shard) / 2**20)
    return ({"max": max(per_shard), "mean": round(sum(per_shard) / len(per_shard))},
            {out: fingerprint(d) for out, d in zip(names, digests)})
