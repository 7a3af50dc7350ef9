"""Who holds a run's lock, and the lines that tell the user (pipeline/runlock.py).

Both kinds of lock (a local flock, an object-store lease) write the same record and refuse a second writer with
the same one-line error, so the record and its wording live here once, beside the error class itself.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
import uuid

from pipeline import shards

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """The run is being written by another command, or its lock cannot be written. str() is one line."""


def notice(message: str) -> None:
    """A one-line notice on stderr (a lock taken over from a dead holder): not an error, the command goes on."""
    print(f"clipcurate: notice: {message}", file=sys.stderr, flush=True)


# ---- the holder's record -------------------------------------------------------------------------
def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def holder_record(command: str | None = None) -> dict:
    """Who holds the lock: pid, host, since when, which command (cut to 200 characters)."""
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now_iso(), "token": uuid.uuid4().hex}
    if command:
        rec["command"] = command if len(command) <= 200 else command[:197] + "..."
    return rec


def describe(rec: dict) -> str:
    """'pid 123 on host-a since 2026-12-07T07:26:08Z (clipcurate run emit --run x)' from a record."""
    out = f"pid {rec.get('pid', '?')} on {rec.get('host', '?')} since {rec.get('since', '?')}"
    return out + (f" ({rec['command']})" if rec.get("command") else "")


def parse_record(data: bytes) -> dict | None:
    try:
        rec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def run_name(run_dir: str) -> str:
    return shards.shard_name(run_dir)


def busy_error(run_dir: str, rec: dict | None) -> RunLockError:
    who = describe(rec) if rec else "another command (its lock record is not readable)"
    return RunLockError(f"run {run_name(run_dir)} is being written by {who}: one writer per run; wait for it to "
                        f"finish or stop it ({shards.join(run_dir, LOCK_NAME)})")
