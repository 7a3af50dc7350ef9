"""Preloaded into the Dask workers of a LocalCluster the runner starts (`preload=`).

Ctrl-C in a terminal sends SIGINT to the whole process group: the driver and every worker process. The driver
turns it into one line ("interrupted; rerun the same command to resume") and closes the cluster; workers that
took the signal themselves died mid-task and printed ~65 lines of tracebacks first. Workers ignore it: the
driver's shutdown stops them.
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
