"""Process helpers shared by the benchmarks that start their own `dask scheduler` + `dask worker` processes."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_groups(procs: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM each process's group (workers first, the scheduler last), then SIGKILL what outlives `timeout`."""
    for p in reversed(procs):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
