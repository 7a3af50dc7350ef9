"""Preloaded into the Dask workers of a LocalCluster the runner starts (`preload=`).

Workers ignore Ctrl-C, and import the spine while they wait for their first task.

Ctrl-C in a terminal sends SIGINT to the whole process group: the driver and every worker process. The driver
turns it into one line ("interrupted; rerun the same command to resume") and closes the cluster; workers that
took the signal themselves died mid-task and printed ~65 lines of tracebacks first. Workers ignore it: the
driver's shutdown stops them.

A fresh worker's first task paid for importing the spine (pipeline.runner with pyarrow, polars and numpy:
0.26 s), Pillow's plugins and its stage's lazy libraries (align's datasketch and scipy: 0.28 s), on top of its
work. A background thread imports them as the worker starts, while the driver plans the stage; a task that needs
them first waits on Python's import lock, never imports twice. Only what a built-in stage lists in
`Stage.worker_imports` (cheap to hold); torch and spaCy stay lazy: a worker imports them when its stage runs.

Dask's own `dask worker` (a cluster of your own, `--scheduler`) takes the same file: `--preload pipeline.worker_init`.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading


def dask_setup(worker=None) -> None:
    # only in a worker's own process: a LocalCluster's nannies run in the driver, which may import this module
    if multiprocessing.current_process().name == "MainProcess":
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_import_spine, name="clipcurate-warm-imports", daemon=True).start()


def _import_spine() -> None:
    try:
        import importlib

        import pipeline.runner  # noqa: F401
        from PIL import Image

        from pipeline.stage import stage_class, stage_names

        Image.preinit()
        for name in stage_names():  # the registered stages' own cheap lazy imports (Stage.worker_imports)
            for module in stage_class(name).worker_imports:
                importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a warm-up only: the task that needs the module reports the error
        pass
