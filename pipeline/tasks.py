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
from pipeline.context import ShardContext
from pipeline.errors import ConfigError, SchemaError, ShardError, StageError
from pipeline.registry import get_stage
from pipeline.stage import Stage

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


# ---- reading a shard ---------------------------------------------------------------------------------------
def _read_checked(stage, path: str, store: "images.ImageStore | None" = None,
                  max_text_bytes: int = schema.MAX_TEXT_BYTES) -> pa.Table:
    """The shard's metadata, checked: every column but the image bytes, which no stage reads from a shard.
    A shard of the image store itself (ingest's download, a crawl or a pool given with --input) gets an
    `image_ref` naming each of its rows instead. Rows no stage may see are flagged for `_set_aside_bad_rows`
    (`schema.ROW_ERROR_COL`): text that is not UTF-8, a uid that is not 32 lowercase hex characters, text over
    `[run] max_text_bytes` (cut to that here: nothing after the reader holds a 10 MB caption)."""
    table, had_bytes = _read_metadata(path)
    in_store = store is not None and store.format == "parquet" and store.holds(resume.parent_dir(path))
    if had_bytes and not in_store:  # its bytes would be dropped and nothing would name them: refuse
        raise StageError(f"{stage.name}: shard {shards.shard_name(path)} holds image bytes but is not in the run's "
                         f"image store ({images.STORE_FILE}); give its folder with --input")
    if in_store and had_bytes:
        if images.REF_COL in table.column_names:
            table = table.drop_columns([images.REF_COL])
        table = table.append_column(images.REF_COL, images.parquet_refs(shards.shard_name(path), table.num_rows))
    if "text" in stage.requires:  # first: a pool without text lacks its uid too, but text is what to fix
        table = schema.check_columns(table, {"text": pa.string()}, shards.shard_name(path), stage.name)
        table = schema.ensure_uid(table)  # a uid computed here is always valid; the pool's own are checked below
    table = schema.check_columns(table, stage.requires, shards.shard_name(path), stage.name)
    table, cut = schema.flag_row_limits(table, max_text_bytes, uid="uid" in stage.requires,
                                        text="text" in stage.requires)
    if cut:  # the long values were only in the tables just dropped
        schema.release_cut_memory()
    return table


def _read_metadata(path: str) -> tuple[pa.Table, bool]:
    """(every column but the image-bytes column, whether the shard had one)."""
    sch = shards.read_schema(path)
    byte_col = images.byte_column(sch)
    if byte_col is None:
        return shards.read_shard(path), False
    keep = [c for c in sch.names if c != byte_col]
    return shards.read_shard(path, columns=keep), True


def _good_rows(stage, path: str, ctx: ShardContext, max_text_bytes: int) -> pa.Table:
    """The rows of the shard a stage's pass 1 sees (survey, collect): those the reader did not set aside."""
    good, _ = _set_aside_bad_rows(_read_checked(stage, path, images.ImageStore.load(ctx.run_dir), max_text_bytes))
    return good


def shard_context(stage, stage_dir: str, shard: str, verify: bool = False) -> ShardContext:
    """What a stage's hooks get besides the table: run and stage folders, the shard, a notes sink, and, for a
    stage that declares `needs_pixels`, the run's image reader (the others never get one)."""
    run_dir = resume.parent_dir(stage_dir)
    reader = images.run_reader(run_dir) if stage.needs_pixels else None
    return ShardContext(stage=stage.name, run_dir=run_dir, stage_dir=stage_dir, shard=shard, images=reader,
                        needs_pixels=stage.needs_pixels, verify=verify,
                        survey=_survey_for(stage_dir) if stage.has_survey else None)


def _set_aside_bad_rows(table: pa.Table) -> tuple[pa.Table, pa.Table | None]:
    """(rows a stage may see, rows the reader marked unusable with their reason: `schema.ROW_ERROR_COL`,
    invalid_utf8, invalid_uid, text_too_long): collect never counts them, apply's rejected gets them with that
    reason. Filters only: no Python object per row (a too-long text was already cut by the reader)."""
    if schema.ROW_ERROR_COL not in table.column_names:
        return table, None
    err = table.column(schema.ROW_ERROR_COL)
    ok = pc.is_null(err)
    good = table.filter(ok).drop_columns([schema.ROW_ERROR_COL])
    bad = table.filter(pc.invert(ok))
    bad = bad.drop_columns([schema.ROW_ERROR_COL]).append_column("reason", bad.column(schema.ROW_ERROR_COL))
    return good, bad


def _set_aside_notes(stage: str, bad: pa.Table, max_text_bytes: int) -> list[str]:
    """A line for the manifest per reason the reader set rows aside for (`schema.ROW_ERROR_NOTES`)."""
    out = []
    for reason in pc.unique(bad.column("reason")).to_pylist():
        what = schema.ROW_ERROR_NOTES.get(reason, "rows the reader could not use are rejected")
        out.append(f"{stage}: {what.format(max_text_bytes=max_text_bytes)} ({reason})")
    return sorted(out)


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
def survey_path(stage_dir: str) -> str:
    return shards.join(stage_dir, "survey", "survey.data")


_SURVEY_CACHE: dict[str, tuple[tuple, Any]] = {}


def _survey_for(stage_dir: str) -> Any:
    """The stage's concluded survey (None before it exists: the survey pass itself), read once per process while
    the file is unchanged."""
    path = survey_path(stage_dir)
    try:
        fs, p = shards.fs_and_path(path)
        info = fs.info(p)
    except (OSError, FileNotFoundError):
        return None
    stamp = (info.get("size"), str(info.get("mtime") or info.get("LastModified") or ""))
    cached = _SURVEY_CACHE.get(path)
    if cached is None or cached[0] != stamp:
        try:
            value = codec.decode(shards.read_bytes(path))
        except codec.CodecError as e:
            raise StageError(f"survey {path}: {e}; rerun the stage") from None
        _SURVEY_CACHE.clear()  # one stage's survey at a time per process
        _SURVEY_CACHE[path] = cached = (stamp, value)
    return cached[1]


def survey_task(task: ShardTask) -> Any:
    with _naming_shard(task.step.stage, "survey", task.where):
        stage = task.step.build()
        ctx = shard_context(stage, task.step.stage_dir, stage.output_name(shards.shard_name(task.path)))
        return stage.survey(_good_rows(stage, task.path, ctx, task.step.max_text_bytes), ctx)


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


# ---- pass 1's partials, kept per shard -----------------------------------------------------------------------
# A resume whose input changed in one shard recomputes the pool-wide statistics; kept partials make that pass
# collect the changed shard alone, and merge (align reads pixels and klite tags every caption in collect: that is
# work to do once). A partial is kept under its key (the step less its inputs, the shard's input identity, the
# survey, the partitions) with the record of its file, in a sidecar written after it; the sidecar goes first
# when a partial is rewritten, so a kill leaves a partial without a sidecar, which is collected again.
def partials_dir(stage_dir: str) -> str:
    return shards.join(stage_dir, "_partials")


def partial_path(stage_dir: str, shard: str, ext: str) -> str:
    return shards.join(partials_dir(stage_dir), shard + ext)


def kept_partial(stage_dir: str, shard: str, key: str, ext: str) -> bool:
    """The shard's kept partial is what collect would give now: its sidecar carries `key`, and its file is
    still there at its recorded size."""
    if not key:
        return False
    side = shards.read_json(partial_path(stage_dir, shard, ".json"))
    if not isinstance(side, dict) or side.get("key") != key:
        return False
    return shards.records_mismatch(partials_dir(stage_dir), side.get(resume.FILES_KEY)) is None


def keep_partial(stage_dir: str, shard: str, key: str, write) -> None:
    """Write the partial (`write()`), then its sidecar: its key and the record of what was written."""
    shards.remove(partial_path(stage_dir, shard, ".json"))
    with shards.recording_writes() as wrote:
        write()
    shards.write_json({"key": key, resume.FILES_KEY: shards.records_under(partials_dir(stage_dir), wrote)},
                      partial_path(stage_dir, shard, ".json"))


def _collect(task: ShardTask) -> Any:
    stage = task.step.build()
    # the same context apply gets: stages that find run resources (dfn's default model) need it in pass 1 too
    ctx = shard_context(stage, task.step.stage_dir, stage.output_name(shards.shard_name(task.path)))
    return stage.collect(_good_rows(stage, task.path, ctx, task.step.max_text_bytes), ctx)


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
    table = _read_checked(stage, task.path, images.ImageStore.load(ctx.run_dir), max_text_bytes)
    good, bad = _set_aside_bad_rows(table)
    stats = _stats_for(stage, stage_dir, task.stats_fp or task.fp, out_name, task.partitions)
    kept, rejected = stage.apply(good, stats, ctx)
    if bad is not None and bad.num_rows:
        for line in _set_aside_notes(stage.name, bad, max_text_bytes):
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
