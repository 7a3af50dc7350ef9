"""Preloaded into the Dask workers of a LocalCluster the runner starts (`preload=`).

Workers ignore Ctrl-C, and import the spine while they wait for their first task.

Ctrl-C in a terminal sends SIGINT to the whole process group: the driver and every worker process. The driver
turns it into one line ("interrupted; rerun the same command to resume") and closes the cluster; workers that
took the signal themselves died mid-task and printed ~65 lines of tracebacks first. Workers ignore it: the
driver's shutdown stops them.

A fresh worker's first task paid for importing the spine (its tasks, pipeline/tasks.py, with pyarrow, polars and
numpy), Pillow's plugins and its stage's lazy libraries (align's datasketch and scipy), on top of its work (each a
fraction of a second, timed by hand: bench/README.md, "The Dask executor"). A background thread imports them as the
worker starts, while the driver plans the stage; a task that needs them first waits on Python's import lock, never
imports twice. Only what a built-in stage lists in `Stage.worker_imports` (cheap to hold); torch and spaCy stay
lazy: a worker imports them when its stage runs.

A closed worker leaves at once. Once a worker has run klite (spaCy) or dfn (torch), its process took seconds on a
loaded 2-core machine to tear its interpreter down after the worker had closed (far longer than without them; timed
by hand: bench/README.md, "The Dask executor"); the nanny waits 4 s, then kills it and warns, once per worker, at
every command's end ("Worker process still alive after 4.0 seconds, killing"). The worker has nothing left to write
then (a task's files are written atomically by the task), so once Dask has closed the worker (`dask_teardown`), its
process skips that teardown (`os._exit` at exit, after the standard streams are flushed). A worker that dies any
other way exits as before, with its own exit status.

A LocalCluster's scheduler lives in the driver. When the driver stops (Ctrl-C) while a worker is inside a
long task, the worker's next heartbeat finds the scheduler gone and Dask logs it as an error with a 20-line
`CommClosedError` traceback, after the driver's one line. In a worker of our LocalCluster (`LOCAL_WORKER_ENV`
set) the scheduler cannot be away for any other reason, so that one message is dropped; a worker of a cluster
of your own keeps it (there a lost scheduler is news).

Dask's own `dask worker` (a cluster of your own, `--scheduler`) takes the same file: `--preload pipeline.worker_init`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import sys
import threading

LOCAL_WORKER_ENV = "CLIPCURATE_LOCAL_WORKER"  # set in the workers of a LocalCluster the runner starts
HEARTBEAT_LOST = "Failed to communicate with scheduler during heartbeat"

_closed = threading.Event()  # set when Dask closes this worker: its process may then skip the interpreter's teardown


def dask_setup(worker=None) -> None:
    # only in a worker's own process: a LocalCluster's nannies run in the driver, which may import this module
    if multiprocessing.current_process().name == "MainProcess":
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    atexit.register(_exit_now_if_closed)
    if os.environ.get(LOCAL_WORKER_ENV):
        logging.getLogger("distributed.worker").addFilter(_drop_lost_heartbeat)
    threading.Thread(target=_import_spine, name="clipcurate-warm-imports", daemon=True).start()


def dask_teardown(worker=None) -> None:
    """Dask closes this worker (Worker.close runs its preloads' teardown): nothing of ours is left to do."""
    if multiprocessing.current_process().name != "MainProcess":
        _closed.set()


def _drop_lost_heartbeat(record: logging.LogRecord) -> bool:
    """False for the heartbeat failure a LocalCluster worker logs when the driver has stopped its scheduler."""
    return not str(record.msg).startswith(HEARTBEAT_LOST)


def _exit_now_if_closed() -> None:
    """At the exit of a worker process that Dask closed: leave without tearing the interpreter down (seconds
    once spaCy or torch are imported; the nanny kills a worker that takes over 4 s, with a warning)."""
    if _closed.is_set():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream: nothing to flush
                pass
        os._exit(0)


def _import_spine() -> None:
    try:
        import importlib

        import pipeline.tasks  # noqa: F401  (what a worker runs; not the runner: it imports this module)
        from PIL import Image

        from pipeline.registry import stage_class, stage_names

        Image.preinit()
        for name in stage_names():  # the registered stages' own cheap lazy imports (Stage.worker_imports)
            for module in stage_class(name).worker_imports:
                importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a warm-up only: the task that needs the module reports the error
        pass
