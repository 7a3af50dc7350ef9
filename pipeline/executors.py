"""Where a step's tasks run: in this process, on a Dask LocalCluster of ours, or on an existing cluster.

Every executor has the same three verbs, so that the runner reads the same for all of them: `map` (one task per
item, results as they come), `collect_values` (one task per item, results kept where they are: on Dask, futures
that stay on the workers until merged) and `tree_reduce` (merge with a fixed fan-in, MERGE_FAN_IN, at least
once: what it returns is always a merge's output, so a stage's collect may return a smaller form than its
statistics, as dfn's sparse histogram). A task is a top-level function and one item (pipeline/tasks.py): both
travel to a Dask worker by pickle. Partials are reduced in item order with a fixed fan-in, so the merge tree (and
any float sum inside it) is the same for any worker count.

`executor(workers, scheduler)` is what the runner and the commands use: a LazyExecutor, which starts nothing
until the first task and, given no worker count, lets the first step's pool size choose (`default_workers`).
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

from pipeline import shards
from pipeline.errors import StageError
from pipeline.worker_init import LOCAL_WORKER_ENV

log = logging.getLogger("clipcurate.runner")  # the runner's logger: its lines read as one story to a user

MERGE_FAN_IN = 8  # partials merged per merge task: fixed, so the merge tree is the same for any worker count


class InProcessExecutor:
    """`--workers 0`: everything in this process (debugging, tests, tiny pools)."""

    name = "in-process"

    def map(self, fn: Callable, items: list, desc: str) -> Iterator[tuple[int, Any]]:
        """(index, fn(item)) per item; on Dask in the order they finish, so callers place results by index."""
        for i, item in enumerate(tqdm(items, desc=desc, unit="shard", leave=False, disable=None)):
            yield i, fn(item)

    def tree_reduce(self, fn: Callable, values: list, desc: str = "merge") -> Any:
        while True:  # at least one round: the result is `fn`'s, even of one value (collect's form may differ)
            values = [fn(values[i : i + MERGE_FAN_IN]) for i in range(0, len(values), MERGE_FAN_IN)]
            if len(values) <= 1:
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
    1M-caption scale bench ran faster (metaclip and klite; align, whose time is mostly its own numpy code,
    unchanged; bench/results/scale_polars_threads.json, bench/README.md, scale). A POLARS_MAX_THREADS the user
    set is left alone."""
    if "POLARS_MAX_THREADS" in os.environ:
        return {"POLARS_MAX_THREADS": os.environ["POLARS_MAX_THREADS"]}
    return {"POLARS_MAX_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, workers)))}


# How the workers of a LocalCluster of ours run (bench/bench_images.py starts its own cluster with the same):
# - the worker's statistical profiler samples every thread's stack each 10 ms for a dashboard that our
#   LocalCluster never shows, at a measurable share of align's decode time (timed by hand: bench/README.md,
#   "The Dask executor");
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

        futures = [self.client.submit(fn, item, pure=False, retries=0) for item in items]
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
        # values are futures living on workers: partials never travel to the client until merged; at least one
        # round, as in-process
        while True:
            values = [
                self.client.submit(fn, values[i : i + MERGE_FAN_IN], pure=False)
                for i in range(0, len(values), MERGE_FAN_IN)
            ]
            if len(values) <= 1:
                break
        v = values[0]
        with _worker_deaths(desc, None):
            return v.result() if hasattr(v, "result") else v

    def collect_values(self, fn: Callable, items: list, desc: str) -> list:
        from distributed import wait

        futures = [self.client.submit(fn, item, pure=False) for item in items]
        item_of = {f.key: item for f, item in zip(futures, items)}
        with tqdm(total=len(futures), desc=desc, unit="shard", leave=False, disable=None) as bar:
            # wait on the futures still pending only: waiting on all of them returns at once as soon as one is
            # done, and the loop spun the driver's event loop for the rest of the pass (on 2 cores, CPU taken
            # from the workers; timed by hand on dfn's collect: bench/README.md, "The Dask executor")
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
def _worker_deaths(desc: str, item: Any):
    """A task whose worker process died more often than the scheduler allows (`allowed-failures`, 3 by
    default: a worker killed once, e.g. by the OOM killer, is replaced by its nanny and the task rerun)
    surfaces as KilledWorker, a multi-line message naming a task key. Say which stage, pass and shard: the
    item says where it works (`where`, pipeline/tasks.py); None is a merge of partials."""
    from distributed import KilledWorker

    try:
        yield
    except KilledWorker:
        where = "merge task" if item is None else getattr(item, "where", f"task {str(item)[:80]}")
        raise StageError(
            f"{desc}: {where}: the Dask worker running it died on every try (killed, e.g. out of memory); "
            "rerun the same command to resume"
        ) from None


# `--workers` not given: below this many rows in the pool a step reads, everything runs in-process; from it on, a
# LocalCluster of one worker per core. The cluster's fixed cost (start, tasks' travel, close) is more than the
# whole in-process work of a smaller pool, so there no number of workers can win; above it more cores than the 2
# measured may (bench/results/workers_default.json: `clipcurate run align,metaclip` on demo worlds; bench/README.md,
# "The Dask executor"). Not measured elsewhere.
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
    """Starts its executor (a Dask cluster is slow to start: bench/README.md, "The Dask executor") on the first
    task, not before: a rerun with every shard up to date starts nothing. Given no worker count (`--workers` not
    given), the first step's pool decides (`size_hint`, `default_workers`): in-process for a small pool, else one
    worker per core."""

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
