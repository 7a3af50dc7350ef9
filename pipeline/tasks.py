"""What runs on a worker: one task per shard (survey, collect, apply), per statistics partition (the shuffle's
merge) or per finalize item, each a top-level function given one small frozen dataclass that says what to do.
Both travel to a Dask worker by pickle (closures do not); the dataclass names its fields, where a positional
tuple made every reader count to seven, and says where it works (`where`) for the executor's messages.

Images are written once: a task reads its shard without the image-bytes column (pipeline/images.py), so no
stage's table, and no file a stage writes, holds pixels. A shard of the run's image store itself (ingest's
download, a crawl, a pool given with --input, recorded in `runs/NAME/image_store.json`) gets an `image_ref`
column naming each row's image instead; a stage that declares `needs_pixels` gets the run's image reader in its
context and reads the bytes by reference.

Each task builds its stage by name (`get_stage`: one ready instance per process) and names its stage, pass and
shard in any error it raises (`ShardFailed`), in one line.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from pipeline import codec, images, resume, schema, shards
from pipeline.errors import ConfigError, SchemaError, ShardError, StageError
from pipeline.partials import keep_partial, kept_partial, partial_path
from pipeline.registry import get_stage
from pipeline.stage import Stage
from pipeline.task_inputs import good_rows, read_checked, set_aside_bad_rows, set_aside_notes, shard_context

log = logging.getLogger("clipcurate.runner")  # the runner's logger: its lines read as one story to a user


# ---- what a task is given ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerStep:
    """The step as a worker needs it: the stage to build (by its stage name, `align`, not the step's), its
    config and seed, its folder, and the reader's text limit ([run] max_text_bytes)."""

    stage: str
    config: dict
    seed: int
    stage_dir: str
    max_text_bytes: int = schema.MAX_TEXT_BYTES

    @classmethod
    def of(cls, r: resume.StepRun) -> "WorkerStep":
        return cls(r.stage, r.stage_cfg, r.seed, r.stage_dir, r.max_text_bytes)

    def build(self) -> Stage:
        return get_stage(self.stage, self.config, self.seed)


@dataclass(frozen=True)
class ShardTask:
    """One input shard: its survey or its collect. `keep_key`: what the shard's collect is made of (pass 1
    keeps its partial under that key, and takes it back instead of collecting while the key holds)."""

    step: WorkerStep
    path: str
    keep_key: str = ""

    @property
    def where(self) -> str:
        return f"shard {shards.shard_name(self.path)}"


@dataclass(frozen=True)
class SplitTask(ShardTask):
    """One input shard's collect, cut into `partitions` pieces (the shuffle)."""

    partitions: int = 1


@dataclass(frozen=True)
class ApplyTask(ShardTask):
    """One input shard's apply: `fp`, the shard's fingerprint, goes in its done-marker; `stats_fp` names the
    statistics it reads (the step's fingerprint); `partitions` > 0 for a shuffled stage, whose answers for this
    shard it reads."""

    fp: str = ""
    partitions: int = 0
    stats_fp: str = ""


@dataclass(frozen=True)
class PartitionTask:
    """Partition k of a shuffled stage's statistics, over the shards `shard_names` (collect's outputs)."""

    step: WorkerStep
    k: int
    shard_names: list

    @property
    def where(self) -> str:
        return f"statistics partition {self.k}"


@dataclass(frozen=True)
class FinalizeTask:
    """One item of a stage's work after apply (Stage.finalize_items)."""

    step: WorkerStep
    item: Any
    verify: bool = False

    @property
    def where(self) -> str:
        name = self.item.get("name", "") if isinstance(self.item, dict) else str(self.item)[:80]
        return f"finalize item {name}"


@dataclass(frozen=True)
class MergeWith:
    """Merges partials with one of the stage's hooks (`merge`, `merge_survey`): a picklable callable for the
    executor's tree-reduce (closures do not travel to workers)."""

    step: WorkerStep
    hook: str = "merge"

    def __call__(self, partials):
        return getattr(self.step.build(), self.hook)(list(partials))


# ---- errors ------------------------------------------------------------------------------------------------
class ShardFailed(StageError):
    """A shard task died of something the stage did not foresee: says which stage, pass and shard.

    A user with a billion rows needs the shard to look at, not a traceback from a worker; `-v` keeps
    the original traceback in the log (it is chained as __cause__)."""


@contextmanager
def _naming_shard(name: str, step: str, where: str):
    try:
        yield
    except (StageError, ShardError, SchemaError, ConfigError):
        raise  # already one line naming what is wrong
    except MemoryError:
        raise StageError(f"{name} {step}: {where}: out of memory") from None
    except Exception as e:  # noqa: BLE001 - re-raised with the shard named, original chained
        log.debug("%s %s: %s failed", name, step, where, exc_info=True)
        msg = " ".join(str(e).split())[:300]
        raise ShardFailed(f"{name} {step}: {where}: {type(e).__name__}: {msg}") from e


# ---- the survey, for stages whose statistics need something pool-wide first (Stage.survey) -----------------
def survey_task(task: ShardTask) -> Any:
    with _naming_shard(task.step.stage, "survey", task.where):
        stage = task.step.build()
        ctx = shard_context(stage, task.step.stage_dir, stage.output_name(shards.shard_name(task.path)))
        return stage.survey(good_rows(stage, task.path, ctx, task.step.max_text_bytes), ctx)


# ---- pass 1: collect --------------------------------------------------------------------------------------
def collect_task(task: ShardTask) -> Any:
    """The shard's partial: the one an earlier pass 1 kept under the same key, else collected now (and kept)."""
    with _naming_shard(task.step.stage, "collect", task.where):
        stage_dir, out = task.step.stage_dir, task.step.build().output_name(shards.shard_name(task.path))
        if kept_partial(stage_dir, out, task.keep_key, ".data"):
            try:
                return codec.decode(shards.read_bytes(partial_path(stage_dir, out, ".data")))
            except (codec.CodecError, ShardError, OSError):
                pass  # unreadable: collected again below
        partial = _collect(task)
        if task.keep_key:
            try:
                data = codec.encode(partial)
            except TypeError:
                return partial  # not data (a stage's own save_stats): not kept, collected again next time
            keep_partial(stage_dir, out, task.keep_key, lambda: shards.write_bytes(data, partial_path(
                stage_dir, out, ".data")))
        return partial


def _collect(task: ShardTask) -> Any:
    stage = task.step.build()
    # the same context apply gets: stages that find run resources (dfn's default model) need it in pass 1 too
    ctx = shard_context(stage, task.step.stage_dir, stage.output_name(shards.shard_name(task.path)))
    return stage.collect(good_rows(stage, task.path, ctx, task.step.max_text_bytes), ctx)


# ---- the shuffle, for stages whose statistics grow with the pool (Stage.split) -----------------------
def _pieces_path(stage_dir: str, shard: str) -> str:
    return partial_path(stage_dir, shard, ".bundle")  # kept, as every partial is (see above)


def _answers_path(stage_dir: str, k: int) -> str:
    return shards.join(stage_dir, "_shuffle", "answers", f"p{k:04d}.bundle")


def answers_ready(stage_dir: str, partitions: int) -> bool:
    """Every partition's answers are still there (removed once every shard is applied)."""
    return partitions > 0 and all(shards.exists(_answers_path(stage_dir, k)) for k in range(partitions))


def collect_split_task(task: SplitTask) -> str:
    """collect, then write the partial cut into `partitions` pieces (one bundle per shard, kept: its key names
    the partitions too); or nothing, when an earlier pass kept them under the same key. Returns only the shard's
    name: partials never travel through the scheduler nor wait in worker memory."""
    with _naming_shard(task.step.stage, "collect", task.where):
        stage = task.step.build()
        out, stage_dir = stage.output_name(shards.shard_name(task.path)), task.step.stage_dir
        if kept_partial(stage_dir, out, task.keep_key, ".bundle"):
            return out
        partial = _collect(task)
        pieces = stage.split(partial, task.partitions)
        del partial
        blobs = {str(k): codec.encode(p) for k, p in enumerate(pieces)}
        del pieces
        write = lambda: shards.write_bundle(blobs, _pieces_path(stage_dir, out))  # noqa: E731
        if task.keep_key:
            keep_partial(stage_dir, out, task.keep_key, write)
        else:
            write()
        return out


def merge_partition_task(task: PartitionTask) -> tuple[list[int], dict, list[str]]:
    """Merge partition k of every shard, save it as stats/pNNNN, and write each shard's answer from it.
    Returns the answers' sizes in bytes, in shard order, the records of the statistics files it saved, and the
    answers' digests in shard order (a shard whose answers are unchanged need not be applied again)."""
    stage_dir, k, shard_names = task.step.stage_dir, task.k, task.shard_names
    with _naming_shard(task.step.stage, "merge", task.where):
        stage = task.step.build()
        pieces = [codec.decode(shards.read_bundle_item(_pieces_path(stage_dir, s), str(k))) for s in shard_names]
        merged = stage.merge(pieces)
        with shards.recording_writes() as wrote:
            stage.save_stats(merged, shards.join(stage_dir, "stats", f"p{k:04d}"))
        answers = {}
        for i, s in enumerate(shard_names):
            answers[s] = codec.encode(stage.answer(merged, pieces[i]))
            pieces[i] = None  # freed as we go
        shards.write_bundle(answers, _answers_path(stage_dir, k))
        return ([len(answers[s]) for s in shard_names], shards.records_under(stage_dir, wrote),
                [xxhash.xxh3_128_hexdigest(answers[s]) for s in shard_names])


# ---- pass 2: apply ----------------------------------------------------------------------------------------
_STATS_CACHE: dict[str, Any] = {}


def _stats_for(stage, stage_dir: str, fp: str, shard: str = "", partitions: int = 0):
    if not stage.has_stats:
        return None
    if stage.shuffles_stats:  # this shard's answers only: small, read per shard, never cached
        return stage.join_answers([codec.decode(shards.read_bundle_item(_answers_path(stage_dir, k), shard))
                                   for k in range(partitions)])
    key = f"{stage_dir}|{fp}"
    if key not in _STATS_CACHE:
        _STATS_CACHE.clear()  # one stage's stats at a time per worker: bounded memory
        _STATS_CACHE[key] = stage.load_stats(shards.join(stage_dir, "stats"))
    return _STATS_CACHE[key]


def apply_task(task: ApplyTask) -> dict:
    with _naming_shard(task.step.stage, "apply", task.where):
        return _apply(task)


def _apply(task: ApplyTask) -> dict:
    """Kept and rejected written atomically, then the done-marker (resume.write_done) as the last act."""
    t0 = time.perf_counter()
    stage, stage_dir, max_text_bytes = task.step.build(), task.step.stage_dir, task.step.max_text_bytes
    out_name = stage.output_name(shards.shard_name(task.path))
    ctx = shard_context(stage, stage_dir, out_name)
    table = read_checked(stage, task.path, images.ImageStore.load(ctx.run_dir), max_text_bytes)
    good, bad = set_aside_bad_rows(table)
    stats = _stats_for(stage, stage_dir, task.stats_fp or task.fp, out_name, task.partitions)
    kept, rejected = stage.apply(good, stats, ctx)
    if bad is not None and bad.num_rows:
        for line in set_aside_notes(stage.name, bad, max_text_bytes):
            ctx.note(line)
        rejected = pa.concat_tables([rejected, bad], promote_options="default")
    files = {out_name: shards.write_shard(kept, shards.join(stage_dir, out_name)),
             f"rejected/{out_name}": shards.write_shard(rejected, shards.join(stage_dir, "rejected", out_name))}
    reasons = Counter()
    if rejected.num_rows:
        vc = pc.value_counts(rejected.column("reason").combine_chunks())
        reasons = {str(d["values"]): int(d["counts"]) for d in vc.to_pylist()}
    summary = {
        "shard": out_name,
        "input": shards.shard_name(task.path),
        "rows_in": stage.rows_in(table, kept, rejected),
        "rows_out": kept.num_rows,
        "rejected": rejected.num_rows,
        "reasons": dict(reasons),
        "seconds": round(time.perf_counter() - t0, 4),
        "notes": list(ctx.notes),
        "fingerprint": task.fp,
    }
    resume.write_done(stage_dir, summary, files, ctx.outputs)
    return summary


# ---- after apply: a stage's pool-wide outputs (Stage.finalize_items) -----------------------------------------
def finalize_item_task(task: FinalizeTask) -> Any:
    """One unit of a stage's work after apply (Stage.finalize_items), on a worker."""
    with _naming_shard(task.step.stage, "finalize", where=f"item {str(task.item)[:80]}"):
        stage = task.step.build()
        return stage.finalize_item(task.item, shard_context(stage, task.step.stage_dir, "", task.verify))
