"""Runs stages over a folder of shards: in-process, on a Dask LocalCluster, or on an existing cluster.

Per stage:
  pass 1 (stages with `collect`): map collect over shards, tree-reduce with `merge`, save the stats; or, for
    stages whose statistics grow with the pool (`Stage.split`), a shuffle: collect writes its partial cut by
    key hash into partitions, one task per partition merges and saves it and writes each shard's answer;
  pass 2: map apply; each shard writes kept + rejected atomically, then a small `_done/<shard>.json`.

Images are written once: a task reads its shard without the image-bytes column (pipeline/images.py), so no
stage's table, and no file a stage writes, holds pixels. A shard of the run's image store itself (ingest's
download, a crawl, a pool given with --input, recorded in `runs/NAME/image_store.json`) gets an `image_ref`
column naming each row's image instead; a stage that declares `needs_pixels` gets the run's image reader in its
context and reads the bytes by reference.

Resume: a shard is skipped when its done-marker carries the stage fingerprint (stage config + inputs) and every
file the marker records (size and XXH3, hashed as written) is still there at its size, and with `--verify` still
hashes to its digest; otherwise it is redone, in one line that names the file. Stats are reused when
`_stats.json` carries the fingerprint and its files pass the same check. A step never reads an earlier step's
output that fails it: the earlier step, run in the same command, redoes the shard first; not run, the later
step refuses in one line (`_check_upstream_outputs`). A kill at any moment leaves either a complete shard with
its marker, or no marker (the shard is redone, overwriting by name), so a rerun never loses or
duplicates a row. Partials are reduced in shard order with a fixed fan-in, so the merge tree (and any
float sum inside it) is the same for any worker count.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from pipeline import codec, images, schema, shards
from pipeline.config import ConfigError, RunConfig
from pipeline import recipe
from pipeline.context import ShardContext
from pipeline.stage import Stage, StageError, fingerprint, get_stage, stage_class
from pipeline.worker_init import LOCAL_WORKER_ENV

log = logging.getLogger("clipcurate.runner")

MERGE_FAN_IN = 8


# ---- executors ---------------------------------------------------------------------------------
class InProcessExecutor:
    """`--workers 0`: everything in this process (debugging, tests, tiny pools)."""

    name = "in-process"

    def map(self, fn: Callable, items: list, desc: str) -> Iterator[tuple[int, Any]]:
        for i, item in enumerate(tqdm(items, desc=desc, unit="shard", leave=False, disable=None)):
            yield i, fn(*item)

    def tree_reduce(self, fn: Callable, values: list, desc: str = "merge") -> Any:
        while len(values) > 1:
            values = [fn(values[i : i + MERGE_FAN_IN]) for i in range(0, len(values), MERGE_FAN_IN)]
        return values[0]

    def collect_values(self, fn: Callable, items: list, desc: str) -> list:
        out = [None] * len(items)
        for i, v in self.map(fn, items, desc):
            out[i] = v
        return out

    def close(self) -> None:
        pass


def worker_env(workers: int) -> dict[str, str]:
    """Environment for `workers` single-threaded worker processes on one machine.

    polars sizes its thread pool to every core of the machine in every process, so two workers on two cores
    ran four busy threads. One pool of cores // workers threads per worker: on 2 cores, 2 workers, the
    1M-caption scale bench went from 64.1 s to 59.4 s (metaclip 6.5 -> 5.1 s, klite 9.4 -> 6.0 s; align, whose
    time is mostly its own numpy code, unchanged; bench/results/scale_polars_threads.json). A POLARS_MAX_THREADS
    the user set is left alone."""
    if "POLARS_MAX_THREADS" in os.environ:
        return {"POLARS_MAX_THREADS": os.environ["POLARS_MAX_THREADS"]}
    return {"POLARS_MAX_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, workers)))}


# How the workers of a LocalCluster of ours run (bench/bench_images.py starts its own cluster with the same):
# - the worker's statistical profiler samples every thread's stack each 10 ms for a dashboard that our
#   LocalCluster never shows: 3% of align's decode time (its steady shards took 2.65 s against 2.73 s);
# - pipeline.worker_init: workers ignore Ctrl-C (the driver stops them, in one line) and import the spine
#   as they start.
WORKER_DASK_CONFIG = {"distributed.worker.profile.enabled": False}
WORKER_PRELOAD = ["pipeline.worker_init"]


class DaskExecutor:
    """A Dask distributed client: a LocalCluster of `workers` processes, or an existing scheduler."""

    name = "dask"

    def __init__(self, workers: int | None = None, scheduler: str | None = None):
        import dask
        from distributed import Client, LocalCluster

        dask.config.set({"distributed.worker.daemon": False, "distributed.scheduler.work-stealing": True,
                         **WORKER_DASK_CONFIG})
        if not log.isEnabledFor(logging.DEBUG):
            # importing distributed installs its own INFO handlers; a user wants our progress, not its chatter.
            # `batched` logs a harmless CommClosedError traceback when a LocalCluster shuts down.
            logging.getLogger("distributed").setLevel(logging.WARNING)
            logging.getLogger("distributed.batched").setLevel(logging.CRITICAL)
        self.cluster = None
        if scheduler:
            self.client = Client(scheduler, timeout="30s")
            self.name = f"dask scheduler {scheduler}"
        else:
            n = workers or os.cpu_count() or 1
            # the scheduler's HTTP server (health routes, even with no dashboard) wants port 8787 and takes
            # another when that one is busy, warning in 4 lines that nothing is wrong
            warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)
            # Dask sets its nanny environment (MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS=1) in this process's
            # os.environ to pass it to the workers and leaves it there: restored on close, so a process the
            # command starts later (a DataLoader, a bench's own loop) does not inherit a worker's settings
            self._saved_environ = dict(os.environ)
            self.cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
                # set in each worker process before it imports polars; LOCAL_WORKER_ENV: see worker_init
                env={**worker_env(n), LOCAL_WORKER_ENV: "1"},
                preload=WORKER_PRELOAD,
            )
            self.client = Client(self.cluster)
            self.name = f"dask LocalCluster ({n} workers)"

    def map(self, fn: Callable, items: list, desc: str) -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        futures = [self.client.submit(fn, *item, pure=False, retries=0) for item in items]
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            with tqdm(total=len(futures), desc=desc, unit="shard", leave=False, disable=None) as bar:
                for fut in as_completed(futures):
                    with _worker_deaths(desc, items[index[fut.key]]):
                        result = fut.result()
                    bar.update(1)
                    yield index[fut.key], result
        finally:
            for f in futures:
                f.cancel()

    def tree_reduce(self, fn: Callable, values: list, desc: str = "merge") -> Any:
        # values are futures living on workers: partials never travel to the client until merged
        while len(values) > 1:
            values = [
                self.client.submit(fn, values[i : i + MERGE_FAN_IN], pure=False)
                for i in range(0, len(values), MERGE_FAN_IN)
            ]
        v = values[0]
        with _worker_deaths(desc, None):
            return v.result() if hasattr(v, "result") else v

    def collect_values(self, fn: Callable, items: list, desc: str) -> list:
        from distributed import wait

        futures = [self.client.submit(fn, *item, pure=False) for item in items]
        item_of = {f.key: item for f, item in zip(futures, items)}
        with tqdm(total=len(futures), desc=desc, unit="shard", leave=False, disable=None) as bar:
            # wait on the futures still pending only: waiting on all of them returns at once as soon as one is
            # done, and the loop spun the driver's event loop for the rest of the pass (on 2 cores, CPU taken
            # from the workers; one run by hand: dfn's collect on bench_images' pool 66 s, 49 s with this)
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=None, return_when="FIRST_COMPLETED")
                bar.update(len(done))
                for f in done:
                    if f.status == "error":
                        with _worker_deaths(desc, item_of[f.key]):
                            f.result()  # raises the task's exception here
        return futures

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        saved = getattr(self, "_saved_environ", None)
        if saved is not None:
            for key in [k for k in os.environ if k not in saved]:
                del os.environ[key]
            os.environ.update({k: v for k, v in saved.items() if os.environ.get(k) != v})


@contextmanager
def _worker_deaths(desc: str, item: tuple | None):
    """A task whose worker process died more often than the scheduler allows (`allowed-failures`, 3 by
    default: a worker killed once, e.g. by the OOM killer, is replaced by its nanny and the task rerun)
    surfaces as KilledWorker, a multi-line message naming a task key. Say which stage, pass and shard."""
    from distributed import KilledWorker

    try:
        yield
    except KilledWorker:
        if not item:
            where = "merge task"
        elif isinstance(item[-1], dict):
            where = f"finalize item {item[-1].get('name', '')}"  # finalize_item_task
        elif isinstance(item[3], int):
            where = f"statistics partition {item[3]}"  # merge_partition_task
        else:
            where = f"shard {shards.shard_name(item[3])}"
        raise StageError(
            f"{desc}: {where}: the Dask worker running it died on every try (killed, e.g. out of memory); "
            "rerun the same command to resume"
        ) from None


# `--workers` not given: below this many rows in the pool a step reads, everything runs in-process; from it on, a
# LocalCluster of one worker per core. bench/results/workers_default.json (`clipcurate run align,metaclip` on
# demo worlds, 2 cores, best of 2): 2 workers against in-process took 11.4 / 3.5 s on 291 rows, 13.8 / 9.9 s on
# 9,700, 15.5 / 13.2 s on 29,096, 70.9 / 64.4 s on 96,990. The cluster's fixed cost (start, tasks' travel,
# close: ~8 s, the 291-row gap) is more than the whole in-process work below ~10,000 rows (9.9 - 3.5 = 6.4 s at
# 9,700), so there no number of workers can win; above it more cores than these 2 may. Not measured elsewhere.
IN_PROCESS_BELOW = 10_000


def default_workers(pool_rows: int | None, cores: int | None = None) -> int:
    """The worker count a command that was given no `--workers` uses: 0 (in-process) for a pool under
    IN_PROCESS_BELOW rows, else one worker per core. `pool_rows` None (not known): one per core."""
    if pool_rows is not None and pool_rows < IN_PROCESS_BELOW:
        return 0
    return cores or os.cpu_count() or 1


def pool_rows_at_least(paths: list[str], limit: int = IN_PROCESS_BELOW) -> int | None:
    """The rows of the Parquet shards `paths`, from their footers, counted until `limit` is reached (a big pool
    on an object store costs one footer read per shard up to there, not one per shard). None when a footer
    cannot be read: the step itself will say why."""
    import pyarrow.parquet as pq

    n = 0
    for p in paths:
        fs, path = shards.fs_and_path(p)
        try:
            with fs.open(path, "rb") as f:
                n += pq.ParquetFile(f).metadata.num_rows
        except Exception:  # noqa: BLE001 - an unreadable shard is the step's to report, in its own words
            return None
        if n >= limit:
            break
    return n


class LazyExecutor:
    """Starts its executor (a Dask cluster costs ~10 s) on the first task, not before: a rerun with every shard
    up to date starts nothing. Given no worker count (`--workers` not given), the first step's pool decides
    (`size_hint`, `default_workers`): in-process for a small pool, else one worker per core."""

    def __init__(self, workers: int | None, scheduler: str | None = None):
        if workers is not None and workers < 0:
            raise StageError(f"--workers {workers}: give 0 (in-process) or a positive number of workers")
        self.args = (workers, scheduler)
        self.inner = None
        self._name_for(workers, scheduler)

    def _name_for(self, workers: int | None, scheduler: str | None) -> None:
        if workers == 0 and not scheduler:
            self.name = InProcessExecutor.name
        elif scheduler:
            self.name = f"dask scheduler {scheduler}"
        else:
            self.name = f"dask LocalCluster ({workers or os.cpu_count() or 1} workers)"

    def size_hint(self, inputs: list[str]) -> None:
        """The shards of the pool the first step reads: with no worker count given and nothing started yet,
        they decide between in-process and a LocalCluster (`default_workers`). An explicit `--workers N` or
        `--scheduler` is always honoured."""
        workers, scheduler = self.args
        if workers is not None or scheduler or self.inner is not None or getattr(self, "_sized", False):
            return
        self._sized = True
        rows = pool_rows_at_least(inputs)
        chosen = default_workers(rows)
        if chosen == 0:
            log.info("%d rows: in-process (a pool under %d rows gains nothing from a Dask cluster; --workers N "
                     "starts one)", rows, IN_PROCESS_BELOW)
        self.args = (chosen, None)
        self._name_for(chosen, None)

    def _started(self):
        if self.inner is None:
            workers, scheduler = self.args
            if workers == 0 and not scheduler:
                self.inner = InProcessExecutor()
            else:
                log.info("starting %s", self.name)
                self.inner = DaskExecutor(workers, scheduler)
        return self.inner

    def map(self, fn: Callable, items: list, desc: str) -> Iterator[tuple[int, Any]]:
        return iter(()) if not items else self._started().map(fn, items, desc)

    def tree_reduce(self, fn: Callable, values: list, desc: str = "merge") -> Any:
        return self._started().tree_reduce(fn, values, desc)

    def collect_values(self, fn: Callable, items: list, desc: str) -> list:
        return [] if not items else self._started().collect_values(fn, items, desc)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


@contextmanager
def executor(workers: int | None, scheduler: str | None = None):
    ex = LazyExecutor(workers, scheduler)
    try:
        yield ex
    finally:
        ex.close()


# ---- tasks (top-level functions: they travel to Dask workers) --------------------------------
def _read_checked(stage, path: str, store: "images.ImageStore | None" = None,
                  max_text_bytes: int = schema.MAX_TEXT_BYTES) -> pa.Table:
    """The shard's metadata, checked: every column but the image bytes, which no stage reads from a shard.
    A shard of the image store itself (ingest's download, a crawl or a pool given with --input) gets an
    `image_ref` naming each of its rows instead. Rows no stage may see are flagged for `_set_aside_bad_rows`
    (`schema.ROW_ERROR_COL`): text that is not UTF-8, a uid that is not 32 lowercase hex characters, text over
    `[run] max_text_bytes` (cut to that here: nothing after the reader holds a 10 MB caption)."""
    table, had_bytes = _read_metadata(path)
    in_store = store is not None and store.format == "parquet" and store.holds(_parent(path))
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


def _context(stage, stage_dir: str, shard: str, verify: bool = False) -> ShardContext:
    """What a stage's hooks get besides the table: run and stage folders, the shard, a notes sink, and, for a
    stage that declares `needs_pixels`, the run's image reader (the others never get one)."""
    run_dir = _parent(stage_dir)
    reader = images.run_reader(run_dir) if stage.needs_pixels else None
    return ShardContext(stage=stage.name, run_dir=run_dir, stage_dir=stage_dir, shard=shard, images=reader,
                        needs_pixels=stage.needs_pixels, verify=verify,
                        survey=_survey_for(stage_dir) if stage.has_survey else None)


# ---- the survey, for stages whose statistics need something pool-wide first (Stage.survey) -----------------
def _survey_path(stage_dir: str) -> str:
    return shards.join(stage_dir, "survey", "survey.data")


_SURVEY_CACHE: dict[str, tuple[tuple, Any]] = {}


def _survey_for(stage_dir: str) -> Any:
    """The stage's concluded survey (None before it exists: the survey pass itself), read once per process while
    the file is unchanged."""
    path = _survey_path(stage_dir)
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


def survey_task(name: str, config: dict, seed: int, path: str, stage_dir: str,
                max_text_bytes: int = schema.MAX_TEXT_BYTES) -> Any:
    with _naming_shard(name, "survey", path):
        stage = get_stage(name, config, seed)
        ctx = _context(stage, stage_dir, stage.output_name(shards.shard_name(path)))
        good, _ = _set_aside_bad_rows(_read_checked(stage, path, images.ImageStore.load(ctx.run_dir), max_text_bytes))
        return stage.survey(good, ctx)


class _MergeSurvey:
    """Picklable survey merge (closures do not travel to workers)."""

    def __init__(self, name: str, config: dict, seed: int):
        self.args = (name, config, seed)

    def __call__(self, partials):
        return get_stage(*self.args).merge_survey(list(partials))


def _surveyed(r: "_StepRun", ex, timings: dict, files: dict) -> None:
    """The survey pass: partials per shard, tree-reduced, concluded once here, saved beside the statistics."""
    t0 = time.perf_counter()
    items = [(r.stage, r.stage_cfg, r.seed, p, r.stage_dir, r.max_text_bytes) for p in r.inputs]
    partials = ex.collect_values(survey_task, items, f"{r.name} survey")
    merged = ex.tree_reduce(_MergeSurvey(r.stage, r.stage_cfg, r.seed), partials, f"{r.name} survey merge")
    del partials
    stage = get_stage(r.stage, r.stage_cfg, r.seed)
    result = stage.conclude_survey(merged, _context(stage, r.stage_dir, ""))
    with shards.recording_writes() as wrote:
        shards.write_bytes(codec.encode(result), _survey_path(r.stage_dir))
    files.update(shards.records_under(r.stage_dir, wrote))
    timings["survey_s"] = round(time.perf_counter() - t0, 3)


def finalize_item_task(name: str, config: dict, seed: int, stage_dir: str, verify: bool, item) -> Any:
    """One unit of a stage's work after apply (Stage.finalize_items), on a worker."""
    with _naming_shard(name, "finalize", where=f"item {str(item)[:80]}"):
        stage = get_stage(name, config, seed)
        return stage.finalize_item(item, _context(stage, stage_dir, "", verify))


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


class ShardFailed(StageError):
    """A shard task died of something the stage did not foresee: says which stage, pass and shard.

    A user with a billion rows needs the shard to look at, not a traceback from a worker; `-v` keeps
    the original traceback in the log (it is chained as __cause__)."""


@contextmanager
def _naming_shard(name: str, step: str, path: str = "", where: str | None = None):
    from pipeline.schema import SchemaError

    where = where or f"shard {shards.shard_name(path)}"
    try:
        yield
    except (StageError, shards.ShardError, SchemaError, ConfigError):
        raise  # already one line naming what is wrong
    except MemoryError:
        raise StageError(f"{name} {step}: {where}: out of memory") from None
    except Exception as e:  # noqa: BLE001 - re-raised with the shard named, original chained
        log.debug("%s %s: %s failed", name, step, where, exc_info=True)
        msg = " ".join(str(e).split())[:300]
        raise ShardFailed(f"{name} {step}: {where}: {type(e).__name__}: {msg}") from e


def collect_task(name: str, config: dict, seed: int, path: str, stage_dir: str,
                 max_text_bytes: int = schema.MAX_TEXT_BYTES) -> Any:
    with _naming_shard(name, "collect", path):
        return _collect(name, config, seed, path, stage_dir, max_text_bytes)


def _collect(name: str, config: dict, seed: int, path: str, stage_dir: str,
             max_text_bytes: int = schema.MAX_TEXT_BYTES) -> Any:
    stage = get_stage(name, config, seed)
    # the same context apply gets: stages that find run resources (dfn's default model) need it in pass 1 too
    ctx = _context(stage, stage_dir, stage.output_name(shards.shard_name(path)))
    good, _ = _set_aside_bad_rows(_read_checked(stage, path, images.ImageStore.load(ctx.run_dir), max_text_bytes))
    return stage.collect(good, ctx)


# ---- the shuffle, for stages whose statistics grow with the pool (Stage.split) -----------------------
def stats_partitions(n_shards: int, shards_per_partition: int) -> int:
    """A partition's merge holds about `shards_per_partition` shards' worth of keys whatever the pool size
    (`[run] stats_shards_per_partition`), so memory per task stays flat as the pool grows. The result does not
    depend on it: every key is merged whole inside its one partition."""
    return max(1, -(-n_shards // max(1, int(shards_per_partition))))


def _pieces_path(stage_dir: str, shard: str) -> str:
    return shards.join(stage_dir, "_shuffle", "pieces", shard + ".bundle")


def _answers_path(stage_dir: str, k: int) -> str:
    return shards.join(stage_dir, "_shuffle", "answers", f"p{k:04d}.bundle")


def collect_split_task(name: str, config: dict, seed: int, path: str, stage_dir: str, partitions: int,
                       max_text_bytes: int = schema.MAX_TEXT_BYTES) -> str:
    """collect, then write the partial cut into `partitions` pieces (one bundle per shard). Returns only the
    shard's name: partials never travel through the scheduler nor wait in worker memory."""
    with _naming_shard(name, "collect", path):
        stage = get_stage(name, config, seed)
        partial = _collect(name, config, seed, path, stage_dir, max_text_bytes)
        pieces = stage.split(partial, partitions)
        del partial
        out = stage.output_name(shards.shard_name(path))
        shards.write_bundle({str(k): codec.encode(p) for k, p in enumerate(pieces)},
                            _pieces_path(stage_dir, out))
        return out


def merge_partition_task(name: str, config: dict, seed: int, k: int, stage_dir: str,
                         shard_names: list[str]) -> tuple[list[int], dict]:
    """Merge partition k of every shard, save it as stats/pNNNN, and write each shard's answer from it.
    Returns the answers' sizes in bytes, in shard order, and the records of the statistics files it saved."""
    with _naming_shard(name, "merge", where=f"statistics partition {k}"):
        stage = get_stage(name, config, seed)
        pieces = [codec.decode(shards.read_bundle_item(_pieces_path(stage_dir, s), str(k))) for s in shard_names]
        merged = stage.merge(pieces)
        with shards.recording_writes() as wrote:
            stage.save_stats(merged, shards.join(stage_dir, "stats", f"p{k:04d}"))
        answers = {}
        for i, s in enumerate(shard_names):
            answers[s] = codec.encode(stage.answer(merged, pieces[i]))
            pieces[i] = None  # freed as we go
        shards.write_bundle(answers, _answers_path(stage_dir, k))
        return [len(answers[s]) for s in shard_names], shards.records_under(stage_dir, wrote)


def _answers_ready(stage_dir: str, partitions: int) -> bool:
    return partitions > 0 and all(shards.exists(_answers_path(stage_dir, k)) for k in range(partitions))


class _Merge:
    """Picklable merge callable (closures do not travel to workers)."""

    def __init__(self, name: str, config: dict, seed: int):
        self.args = (name, config, seed)

    def __call__(self, partials):
        return get_stage(*self.args).merge(list(partials))


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


def apply_task(name: str, config: dict, seed: int, path: str, stage_dir: str, fp: str, partitions: int = 0,
               max_text_bytes: int = schema.MAX_TEXT_BYTES) -> dict:
    with _naming_shard(name, "apply", path):
        return _apply(name, config, seed, path, stage_dir, fp, partitions, max_text_bytes)


def _apply(name: str, config: dict, seed: int, path: str, stage_dir: str, fp: str, partitions: int = 0,
           max_text_bytes: int = schema.MAX_TEXT_BYTES) -> dict:
    t0 = time.perf_counter()
    stage = get_stage(name, config, seed)
    out_name = stage.output_name(shards.shard_name(path))
    ctx = _context(stage, stage_dir, out_name)
    table = _read_checked(stage, path, images.ImageStore.load(ctx.run_dir), max_text_bytes)
    good, bad = _set_aside_bad_rows(table)
    kept, rejected = stage.apply(good, _stats_for(stage, stage_dir, fp, out_name, partitions), ctx)
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
        "input": shards.shard_name(path),
        "rows_in": stage.rows_in(table, kept, rejected),
        "rows_out": kept.num_rows,
        "rejected": rejected.num_rows,
        "reasons": dict(reasons),
        "seconds": round(time.perf_counter() - t0, 4),
        "notes": list(ctx.notes),
        "fingerprint": fp,
    }
    # the marker vouches for exactly these bytes: a resume trusts the shard only while they are still there
    run_files = {RUN_FILES_KEY: dict(ctx.outputs)} if ctx.outputs else {}
    shards.write_json({**summary, FILES_KEY: files, **run_files}, shards.join(stage_dir, "_done", out_name + ".json"))
    return summary


def _parent(path: str) -> str:
    import posixpath

    return posixpath.dirname(path.rstrip("/")) if "://" in path else os.path.dirname(os.path.abspath(path))


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


# ---- the runner --------------------------------------------------------------------------------
@dataclass
class StageResult:
    stage: str
    folder: str
    manifest: dict = field(default_factory=dict)


def _clean_temporaries(stage_dir: str) -> None:
    """Every folder a stage writes in: shards, rejected/, _done/, stats/ (align's stats/pNNNN/ too), _shuffle/."""
    shards.clean_temporaries(stage_dir, recursive=True)


DIGESTS_FILE = "_digests.json"  # content digests of a run's input files, by size and mtime (shards.DigestCache)


def _input_identity(path: str, upstream_dir: str | None, digests: shards.DigestCache | None = None,
                    run_dir: str | None = None) -> dict:
    """An upstream stage's shard: that stage's fingerprint for it. A file the run wrote itself (ingest's
    download, which holds the image bytes: a content digest would read the whole image store): its size and
    mtime. Any other file (a crawl, an --input folder): its content digest, remembered by size and mtime in the
    run's `_digests.json` (a file rewritten with the same bytes, e.g. a regenerated demo world, is the same)."""
    if upstream_dir:
        done = shards.read_json(shards.join(upstream_dir, "_done", shards.shard_name(path) + ".json"))
        if done and "fingerprint" in done:
            return {"name": shards.shard_name(path), "upstream": done["fingerprint"]}
    if run_dir and images.within(str(path), str(run_dir)):  # (a run's --input may be named either way)
        return shards.file_identity(path)
    return shards.file_content_identity(path, digests)


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
        if shards.exists(shards.join(d, "_manifest.json")):
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


def _warn_skipped(step: "recipe.Step", upstream_dir: str, steps: list, running: list) -> None:
    missing = [s for s in skipped_stages(step, upstream_dir, steps) if s not in {r.name for r in running}]
    if missing:
        log.warning("%s reads %s: %s did not run in this run, so its rows are not curated by %s "
                    "(to include: clipcurate run %s,%s --run ...)", step.name, upstream_dir, ", ".join(missing),
                    "it" if len(missing) == 1 else "them", ",".join(missing), step.name)


def step_of(name: "str | recipe.Step", config: dict) -> "recipe.Step":
    """A step of the config's recipe by name (a stage outside it: its pre-recipe place, 90_<name>)."""
    if isinstance(name, recipe.Step):
        return name
    return recipe.plan([name], recipe.of_config(config))[0]


@dataclass(frozen=True)
class _StepRun:
    """One step's run over its input: what every part of `run_stage` needs to know."""

    name: str  # the step's name (`align@text`): config section, manifest
    stage: str  # the stage it builds (`align`)
    cls: type
    probe: Stage  # not set up: only for fingerprint parts and names
    seed: int
    stage_cfg: dict
    run_dir: str
    stage_dir: str
    input_dir: str
    inputs: list
    fp: str = ""
    verify: bool = False  # `--verify`: a resume checks the digests of what done shards wrote, not only sizes
    max_text_bytes: int = schema.MAX_TEXT_BYTES  # [run]: the shard reader's limit, given to every task


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
    # A manifest vouches for the whole folder. Once a run with another fingerprint starts rewriting shards
    # it no longer does: removed now, so that a kill below cannot leave a folder of mixed old and new
    # shards that the report, or a later stage run alone, would take for a finished stage.
    manifest_path = shards.join(r.stage_dir, "_manifest.json")
    before = shards.read_json(manifest_path) or {}
    if before.get("fingerprint") != r.fp:
        shards.remove(manifest_path)
        before = {}
    if hasattr(ex, "size_hint"):  # `--workers` not given: the pool's size decides (LazyExecutor)
        ex.size_hint(r.inputs)
    log.debug("%s: %d shards from %s (fingerprint %s, %s)", r.name, len(r.inputs), input_dir, r.fp, ex.name)
    timings: dict[str, float] = {}
    todo, summaries = _shards_to_do(r, ex)
    partitions, answer_bytes = _pass_one(r, config, todo, ex, timings)

    t0 = time.perf_counter()
    items = [(r.stage, r.stage_cfg, r.seed, p, r.stage_dir, r.fp, partitions, r.max_text_bytes) for p in todo]
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
    manifest = build_manifest(r.name, r.fp, r.stage_cfg, input_dir, per_shard, timings)
    if final is not None:
        manifest["finalize"] = final
    manifest["executor"] = ex.name
    if partitions:
        manifest["stats_partitions"] = partitions
    if answer_bytes:  # only when this run shuffled (a rerun that reused the statistics did not)
        manifest["stats_answer_bytes"] = answer_bytes
    shards.write_json(manifest, manifest_path)
    log.info(
        "%s: %d rows in, %d kept, %d rejected %s",
        r.name, manifest["rows_in"], manifest["rows_out"], manifest["rejected"], manifest["reasons"],
    )
    return StageResult(r.name, r.stage_dir, manifest)


def _step_run(name, run_dir: str, input_dir: str, config: dict, upstream_is_stage: bool,
              verify: bool = False) -> _StepRun:
    """The step, its inputs and its fingerprint: config (less speed keys), seed, the stage's own parts, and
    the identity of every input shard."""
    step = step_of(name, config)
    cls = stage_class(step.stage)
    seed = int(config.get("run", {}).get("seed", 0))
    stage_cfg = cls.step_config(config.get(step.name, {}), config)
    probe = cls(stage_cfg, seed)
    stage_dir = shards.join(run_dir, step.folder)
    inputs = shards.list_shards(input_dir)
    if not inputs:
        raise StageError(f"{step.name}: no Parquet shards in {input_dir}")
    digests = shards.DigestCache(shards.join(run_dir, DIGESTS_FILE))
    probe_ctx = ShardContext(stage=probe.name, run_dir=run_dir, stage_dir=stage_dir)  # parts may name run resources
    # the reader's limit decides which rows a stage that reads text sees: part of what its output is made from
    max_text_bytes = int(config.get("run", {}).get("max_text_bytes", schema.MAX_TEXT_BYTES))
    limits = {"max_text_bytes": max_text_bytes} if "text" in cls.requires else {}
    fp = fingerprint(
        {
            "stage": step.name,
            "config": {k: v for k, v in stage_cfg.items() if k not in cls.speed_keys},
            "seed": seed,
            **limits,
            "parts": probe.fingerprint_parts(probe_ctx),
            "inputs": [_input_identity(p, input_dir if upstream_is_stage else None, digests, run_dir) for p in inputs],
        }
    )
    digests.save()
    return _StepRun(step.name, step.stage, cls, probe, seed, stage_cfg, run_dir, stage_dir, input_dir, inputs, fp,
                    verify, max_text_bytes)


FILES_KEY = "files"  # a done-marker's {path relative to the stage folder: {"size", "xxh3"}} of what its task wrote
RUN_FILES_KEY = "run_files"  # the same for files written in the run folder outside the stage's (ShardContext.wrote)
# A marker written before markers recorded their files (no FILES_KEY). Such a shard is redone, not trusted: its
# marker says only that a file of that name once existed, which is exactly what let a truncated shard be trusted
# for ever. Redoing is cheap and happens once (a rerun is byte-identical, so later stages' inputs, which name the
# upstream fingerprint, not its bytes, are not redone with it); trusting would leave every existing run unchecked.
UNRECORDED = "its done-marker records no sizes or digests (written by an older clipcurate)"


def outputs_mismatch(stage_dir: str, out: str, done: dict, verify: bool = False) -> str | None:
    """Why a done shard's outputs are no longer the files its marker vouches for (None: they are). Every
    recorded file must exist with its recorded size; with `verify`, also hash to its recorded XXH3 digest.
    UNRECORDED for a marker of an older version. The reason names the file and what differs, for one line."""
    files = done.get(FILES_KEY)
    if not isinstance(files, dict):
        return UNRECORDED
    if not {out, f"rejected/{out}"} <= files.keys():
        return "its done-marker does not list the shard's files"
    why = shards.records_mismatch(stage_dir, files, digest=verify)
    if why is None and RUN_FILES_KEY in done:
        why = shards.records_mismatch(_parent(stage_dir), done[RUN_FILES_KEY], digest=verify)
    return why


def _shards_to_do(r: _StepRun, ex) -> tuple[list[str], dict[str, dict]]:
    """(input shards to apply, summaries of those already done under this fingerprint: the resume)."""
    todo, summaries, unrecorded = [], {}, 0
    for p in r.inputs:
        out = r.probe.output_name(shards.shard_name(p))
        done = shards.read_json(shards.join(r.stage_dir, "_done", out + ".json"))
        if not done or done.get("fingerprint") != r.fp:
            todo.append(p)
            continue
        why = outputs_mismatch(r.stage_dir, out, done, r.verify)
        if why is None:
            summaries[out] = {k: v for k, v in done.items() if k not in (FILES_KEY, RUN_FILES_KEY)}
            continue
        todo.append(p)
        if why is UNRECORDED:
            unrecorded += 1
        else:
            log.warning("%s: shard %s: %s: redoing it", r.name, out, why)
    if unrecorded:
        log.warning("%s: %d shards were marked done by an older clipcurate, which recorded no sizes or digests of "
                    "what they wrote: redoing them, once, so that every later resume can check them", r.name,
                    unrecorded)
    if not todo:
        log.info("%s: %d shards up to date, skipped", r.name, len(r.inputs))
    else:
        done_note = f"; {len(r.inputs) - len(todo)} up to date, skipped" if len(todo) < len(r.inputs) else ""
        log.info("%s: %d shards to do from %s (%s)%s", r.name, len(todo), r.input_dir, ex.name, done_note)
    return todo, summaries


def _pass_one(r: _StepRun, config: dict, todo: list[str], ex, timings: dict) -> tuple[int, int | None]:
    """Pool-wide statistics, unless up to date: tree-reduced, or shuffled by key into partitions for a stage
    whose statistics grow with the pool. Returns (partitions, answer bytes written; None when reused)."""
    if not r.probe.has_stats:
        return 0, None
    marker = shards.join(r.stage_dir, "_stats.json")
    prior = shards.read_json(marker) or {}
    shuffled = r.probe.shuffles_stats
    partitions = int(prior.get("partitions", 0)) if shuffled else 0
    # a shuffled stage's per-shard answers are removed once every shard is applied: needed again only
    # when some shard is to do
    if prior.get("fingerprint") == r.fp and (not shuffled or not todo or _answers_ready(r.stage_dir, partitions)):
        why = _stats_mismatch(r.stage_dir, prior, r.verify)
        if why is None:
            log.info("%s: statistics up to date, reusing", r.name)
            return partitions, None
        log.warning("%s: statistics: %s: recomputing them", r.name, why)
    shards.remove(marker)  # stale stats must never be trusted if we die below
    # ... nor left lying around: the report and a reader of the folder would take them as this run's
    shards.remove(shards.join(r.stage_dir, "stats"))
    shards.remove(shards.join(r.stage_dir, "_shuffle"))
    shards.remove(shards.join(r.stage_dir, "survey"))
    answer_bytes, files = None, {}
    if r.probe.has_survey:
        _surveyed(r, ex, timings, files)
    if shuffled:
        per = config.get("run", {}).get("stats_shards_per_partition", RunConfig.stats_shards_per_partition)
        partitions = stats_partitions(len(r.inputs), per)
        answer_bytes = _shuffled_stats(r.stage, r.stage_cfg, r.seed, r.inputs, r.stage_dir, ex, timings, partitions,
                                       r.max_text_bytes, files=files)
    else:
        _reduced_stats(r.probe, r.stage, r.stage_cfg, r.seed, r.inputs, r.stage_dir, ex, timings, r.max_text_bytes,
                       files=files)
    # like a shard's marker, `_stats.json` vouches for the bytes saved (hashed as written), checked before reuse
    shards.write_json({"fingerprint": r.fp, "partitions": partitions, FILES_KEY: files}, marker)
    return partitions, answer_bytes


def _stats_mismatch(stage_dir: str, prior: dict, verify: bool) -> str | None:
    """Why saved statistics are no longer what `_stats.json` vouches for (None: they are), as for a shard: every
    file it records, sizes (digests with `verify`). Statistics saved by an older version, which recorded none,
    are recomputed once (see UNRECORDED)."""
    if not isinstance(prior.get(FILES_KEY), dict):
        return "saved by an older clipcurate, which recorded no sizes or digests"
    return shards.records_mismatch(stage_dir, prior[FILES_KEY], digest=verify)


def _after_apply(r: _StepRun) -> None:
    """Every apply has finished: what is left of them goes."""
    # A Dask worker killed mid-write (its task rerun elsewhere by the nanny) leaves its `.tmp-*` file behind;
    # every task of this stage has finished now, so any temporary left is such an orphan, and so is any
    # pass-1 cache file (ShardContext.cache_put) that no apply took: e.g. one of a shard done by a killed run.
    _clean_temporaries(r.stage_dir)
    shards.remove(shards.join(r.stage_dir, "_cache"))
    shards.remove(shards.join(r.stage_dir, "_shuffle"))
    # outputs of shards no longer in the input are stale
    expected = {r.probe.output_name(shards.shard_name(p)) for p in r.inputs}
    for sub in ("", "rejected"):
        folder = shards.join(r.stage_dir, sub) if sub else r.stage_dir
        if shards.exists(folder):
            for p in shards.list_shards(folder):
                if shards.shard_name(p) not in expected:
                    shards.remove(p)


def _finalize(r: _StepRun, per_shard: list[dict], ex) -> dict | None:
    """The stage's pool-wide outputs (Stage.finalize), its items run on the executor; None for a stage
    without one (not set up then: setup may be heavy, models, automata)."""
    if type(r.probe).finalize is Stage.finalize:
        return None
    inst = get_stage(r.stage, r.stage_cfg, r.seed)
    items = inst.finalize_items(r.stage_dir, r.run_dir, per_shard)
    done = [None] * len(items)
    work = [(r.stage, r.stage_cfg, r.seed, r.stage_dir, r.verify, item) for item in items]
    for i, result in ex.map(finalize_item_task, work, f"{r.name} finalize"):
        done[i] = result
    return inst.finalize(r.stage_dir, r.run_dir, per_shard, done if items else None)


def _reduced_stats(probe, name, stage_cfg, seed, inputs, stage_dir, ex, timings,
                   max_text_bytes: int = schema.MAX_TEXT_BYTES, files: dict | None = None) -> None:
    """Statistics bounded by something other than the pool (metaclip: entries; klite: lemmas): partials
    tree-reduced with `merge`, saved by the driver; `files` gets the records of the files saved."""
    t0 = time.perf_counter()
    items = [(name, stage_cfg, seed, p, stage_dir, max_text_bytes) for p in inputs]
    partials = ex.collect_values(collect_task, items, f"{name} collect")
    timings["collect_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    stats = ex.tree_reduce(_Merge(name, stage_cfg, seed), partials, f"{name} merge")
    # On Dask these are futures: held, they make the scheduler recompute a partial whose worker dies
    # later, in apply, rerunning collect (and its side effects, e.g. a pass-1 cache file written
    # after apply took it) for nothing. Released now.
    del partials
    stats_dir = shards.join(stage_dir, "stats")
    shards.remove(stats_dir)
    with shards.recording_writes() as wrote:
        probe.save_stats(stats, stats_dir)
    if files is not None:
        files.update(shards.records_under(stage_dir, wrote))
    timings["merge_s"] = round(time.perf_counter() - t0, 3)


def _shuffled_stats(name, stage_cfg, seed, inputs, stage_dir, ex, timings, partitions: int,
                    max_text_bytes: int = schema.MAX_TEXT_BYTES, files: dict | None = None) -> dict:
    """Statistics that grow with the pool (Stage.split): collect writes each shard's partial cut into
    partitions; one task per partition merges it, saves it as stats/pNNNN and writes every shard's answer.
    No task ever holds more than one partition of the pool; the driver holds none. Returns the size of
    the answers one shard reads in apply (bytes: max and mean over shards); `files` gets the records of the
    statistics files saved (for `_stats.json`)."""
    files = {} if files is None else files
    t0 = time.perf_counter()
    items = [(name, stage_cfg, seed, p, stage_dir, partitions, max_text_bytes) for p in inputs]
    names = [None] * len(items)
    for i, out in ex.map(collect_split_task, items, f"{name} collect"):
        names[i] = out
    timings["collect_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    items = [(name, stage_cfg, seed, k, stage_dir, names) for k in range(partitions)]
    per_shard = [0] * len(names)  # what each shard's apply will read, over all partitions
    for _, (sizes, saved) in ex.map(merge_partition_task, items, f"{name} merge ({partitions} partitions)"):
        per_shard = [a + b for a, b in zip(per_shard, sizes)]
        files.update(saved)
    shards.remove(shards.join(stage_dir, "_shuffle", "pieces"))
    timings["merge_s"] = round(time.perf_counter() - t0, 3)
    log.info("%s: statistics in %d partitions; answers per shard: max %.1f MiB, mean %.1f MiB", name, partitions,
             max(per_shard) / 2**20, sum(per_shard) / len(per_shard) / 2**20)
    return {"max": max(per_shard), "mean": round(sum(per_shard) / len(per_shard))}


def build_manifest(name, fp, cfg, input_dir, per_shard: list[dict], timings: dict) -> dict:
    reasons: Counter = Counter()
    notes: list[str] = []
    for s in per_shard:
        reasons.update(s.get("reasons", {}))
        for n in s.get("notes", []):
            if n not in notes:
                notes.append(n)
    return {
        "stage": name,
        "fingerprint": fp,
        "config": cfg,
        "input": str(input_dir),
        "shards": per_shard,
        "rows_in": sum(s["rows_in"] for s in per_shard),
        "rows_out": sum(s["rows_out"] for s in per_shard),
        "rejected": sum(s["rejected"] for s in per_shard),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "notes": notes,
        "timings": timings,
        "shard_seconds": round(sum(s.get("seconds", 0.0) for s in per_shard), 3),
    }


@contextmanager
def _driver_writes(name: str, run_dir: str):
    """What the driver itself writes (config, stats, markers, manifest) can fail too: a full disk, a folder
    made read-only. Shard tasks already say which shard; this says which stage, in one line, not a traceback."""
    try:
        yield
    except OSError as e:
        raise StageError(f"{name}: cannot write in the run folder {run_dir}: {e}") from e


def _download_step(steps) -> str:
    """The recipe's downloading step, for messages ("ingest" in the default recipe)."""
    return next((s.name for s in steps if recipe.downloads(s)), "ingest")


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
                current = previous_stage_dir(run_dir, st, steps)
                from_stage = True
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
            with _driver_writes(st.name, run_dir):
                res = run_stage(st, run_dir, current, config, ex, upstream_is_stage=from_stage, verify=verify)
            results.append(res)
            current, from_stage, last = res.folder, True, st
    return results


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
    recorded sizes (UNRECORDED) is not refused for that: the earlier step redoes it the next time it runs."""
    folder = shards.shard_name(upstream_dir)
    prev = next((s for s in steps if s.folder == folder), None)
    # the shards its manifest counts (a kept shard deleted outright is not listed, and its rows would just be
    # missing downstream), and any other shard in the folder
    made = [s.get("shard") for s in (shards.read_json(shards.join(upstream_dir, "_manifest.json")) or {})
            .get("shards", []) if isinstance(s, dict)]
    names = sorted({n for n in made if isinstance(n, str)}
                   | {shards.shard_name(p) for p in shards.list_shards(upstream_dir)})
    for out in names:
        done = shards.read_json(shards.join(upstream_dir, "_done", out + ".json"))
        if not isinstance(done, dict):  # a folder not made by the runner (no markers): nothing vouches, nothing to check
            continue
        why = outputs_mismatch(upstream_dir, out, done, verify)
        if why is None or why is UNRECORDED:
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
