"""Test-only fault hooks around the REAL stages (align, metaclip, klite): where a run is, and time to kill it.

Installed on import when $CLIPCURATE_FAULTS names a folder: in a test's driver process (`python -c "import
tests.fault_hooks; ..."`) and in Dask workers as a worker preload (so a worker restarted by its nanny after
a SIGKILL has them too). Nothing happens unless `$CLIPCURATE_FAULTS/control.json` exists; it is read on
every call, so a test switches faults on and off while workers keep running:

    {"marks": "/folder",                       # each hooked step touches <stage>.<step>.<shard>.<pid> here
     "sleep": {"align.collect": 0.3, ...},     # seconds to sleep in a step, every shard (widens kill windows)
     "once": {"metaclip.merge": 5, "write:03_klite/part-00003.parquet": 5, "metaclip.save_stats": 5},
                                               # sleep only the first time (a rerun task does not wait again);
                                               # write:<dir>/<shard> sleeps inside the shard's write, after the
                                               # temporary file holds the bytes and before its rename
     "die": ["metaclip.apply.part-00002.parquet"],   # SIGKILL the process running this step, every time
     "enospc": ["02_metaclip/part-00002.parquet"]}   # the write of this shard fails: disk full, half written
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import time

ENV = "CLIPCURATE_FAULTS"
HOOKED = ("stages.align:AlignStage", "stages.metaclip:MetaClipStage", "stages.klite:KLiteStage")
_installed = False


def control() -> dict:
    folder = os.environ.get(ENV)
    if not folder:
        return {}
    try:
        with open(os.path.join(folder, "control.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _mark(ctl: dict, key: str) -> bool:
    """Touch the mark for `key`; True when it is the first one for this key (any process)."""
    folder = ctl.get("marks")
    if not folder:
        return True
    os.makedirs(folder, exist_ok=True)
    first = not any(n.startswith(key + ".") and n[len(key) + 1 :].isdigit() for n in os.listdir(folder))
    with open(os.path.join(folder, f"{key}.{os.getpid()}"), "w") as f:
        f.write(str(time.time()))
    return first


def _point(key: str) -> None:
    ctl = control()
    if not ctl:
        return
    first = _mark(ctl, key)
    if key in ctl.get("die", []):
        os.kill(os.getpid(), signal.SIGKILL)
    if first and key in ctl.get("once", {}):
        time.sleep(float(ctl["once"][key]))
    short = ".".join(key.split(".")[:2])  # "align.apply.part-00001.parquet" -> "align.apply"
    if short in ctl.get("sleep", {}):
        time.sleep(float(ctl["sleep"][short]))


def _wrap_step(cls, step: str) -> None:
    original = getattr(cls, step)

    @functools.wraps(original)
    def hooked(self, *args, **kwargs):
        if step in ("collect", "apply"):
            from pipeline.context import ShardContext

            ctx = args[-1] if args and isinstance(args[-1], ShardContext) else None
            _point(f"{cls.name}.{step}.{ctx.shard if ctx is not None and ctx.shard else '-'}")
        out = original(self, *args, **kwargs)
        if step in ("merge", "save_stats"):
            # merge: after the partials are reduced; save_stats: after stats/ is written, before _stats.json
            _point(f"{cls.name}.{step}")
        return out

    setattr(cls, step, hooked)


def _wrap_write() -> None:
    import pyarrow.parquet as pq

    original = pq.write_table

    @functools.wraps(original)
    def write_table(table, where, *args, **kwargs):
        path = str(getattr(where, "path", None) or getattr(where, "name", "") or "")
        base = os.path.basename(path)
        parts = base.split("-", 2)  # .tmp-<hex>-part-00001.parquet
        ctl = control() if base.startswith(".tmp-") and len(parts) == 3 else {}
        key = f"{os.path.basename(os.path.dirname(path))}/{parts[-1]}" if ctl else ""
        if ctl and key in ctl.get("enospc", []):
            _mark(ctl, "enospc:" + key.replace("/", ":"))
            where.write(b"PAR1 half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        out = original(table, where, *args, **kwargs)
        if ctl and f"write:{key}" in ctl.get("once", {}):
            if hasattr(where, "flush"):
                where.flush()
            if _mark(ctl, "write:" + key.replace("/", ":")):
                time.sleep(float(ctl["once"][f"write:{key}"]))
        return out

    pq.write_table = write_table


def install() -> None:
    global _installed
    if _installed:
        return
    import importlib

    for spec in HOOKED:
        module, _, name = spec.partition(":")
        cls = getattr(importlib.import_module(module), name)
        for step in ("collect", "merge", "apply", "save_stats"):
            _wrap_step(cls, step)
    _wrap_write()
    _installed = True


if os.environ.get(ENV):
    install()
