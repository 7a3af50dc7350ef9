"""Statistics, shuffle pieces and answers as data that cannot run code when read: never pickle.

A run folder may sit on shared storage. A pickle there is a program: whoever can write one file in it runs
code in every worker that loads it. This codec writes a JSON skeleton plus binary parts instead:
  numpy arrays        .npy bytes (allow_pickle=False both ways; object arrays of str go as Arrow strings)
  polars DataFrames   Arrow IPC streams (pyarrow Tables likewise)
  dataclasses         only classes registered with `@data_record` (the name in the file picks from that
                      registry; nothing is imported by name); fields whose name starts with "_" are caches
                      and are not written (the dataclass's default rebuilds them)
  tuple, list, dict (str keys), str, int, float, bool, None: JSON, tuples tagged.
Layout: magic, 8-byte little-endian JSON length, JSON {"skeleton", "parts": [[offset, length], ...]}, parts.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa

MAGIC = b"CCDATA1\n"
_RECORDS: dict[str, type] = {}


class CodecError(ValueError):
    """Bytes that are not a record this codec wrote (one line)."""


def data_record(cls: type) -> type:
    """Register a dataclass whose instances `encode` may write and `decode` may build."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    _RECORDS[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def encode(obj: Any) -> bytes:
    parts: list[bytes] = []

    def part(b: bytes) -> int:
        parts.append(b)
        return len(parts) - 1

    def walk(x: Any) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, np.integer)):
            return int(x)
        if isinstance(x, (float, np.floating)):
            return float(x) if np.isfinite(x) else {"f": repr(float(x))}  # JSON has no NaN/inf: "nan", "inf"
        if isinstance(x, np.ndarray):
            if x.dtype == object:
                return {"strs": part(_ipc(pa.table({"s": pa.array(x.tolist(), pa.string())})))}
            buf = io.BytesIO()
            np.save(buf, x, allow_pickle=False)
            return {"nd": part(buf.getvalue())}
        if isinstance(x, pa.Table):
            return {"arrow": part(_ipc(x))}
        if type(x).__module__.startswith("polars") and type(x).__name__ == "DataFrame":
            return {"polars": part(_ipc(x.to_arrow()))}
        if isinstance(x, tuple):
            return {"tuple": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise TypeError("codec: dict keys must be str")
            return {"dict": {k: walk(v) for k, v in x.items()}}
        if dataclasses.is_dataclass(x):
            name = f"{type(x).__module__}.{type(x).__qualname__}"
            if _RECORDS.get(name) is not type(x):
                raise TypeError(f"codec: {name} is not registered with @data_record")
            return {"record": name, "fields": {f.name: walk(getattr(x, f.name))
                                                for f in dataclasses.fields(x) if not f.name.startswith("_")}}
        raise TypeError(f"codec: cannot write a {type(x).__name__}")

    skeleton = walk(obj)
    offsets, pos = [], 0
    for b in parts:
        offsets.append([pos, len(b)])
        pos += len(b)
    head = json.dumps({"skeleton": skeleton, "parts": offsets}).encode()
    return b"".join([MAGIC, len(head).to_bytes(8, "little"), head, *parts])


def decode(data: bytes) -> Any:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise CodecError("not a clipcurate data record (a file from another version, or not ours)")
    n = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "little")
    base = len(MAGIC) + 8 + n
    try:
        head = json.loads(data[len(MAGIC) + 8 : base])
    except ValueError:
        raise CodecError("data record header is not JSON") from None
    offsets = head["parts"]

    def part(i: int) -> memoryview:
        start, length = offsets[i]
        return memoryview(data)[base + start : base + start + length]

    def walk(x: Any) -> Any:
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "nd" in x:
            return np.load(io.BytesIO(part(x["nd"])), allow_pickle=False)
        if "strs" in x:
            return np.array(_read_ipc(part(x["strs"])).column("s").to_pylist(), dtype=object)
        if "arrow" in x:
            return _read_ipc(part(x["arrow"]))
        if "polars" in x:
            import polars as pl

            return pl.from_arrow(_read_ipc(part(x["polars"])))
        if "f" in x:
            return float(x["f"])
        if "tuple" in x:
            return tuple(walk(v) for v in x["tuple"])
        if "dict" in x:
            return {k: walk(v) for k, v in x["dict"].items()}
        if "record" in x:
            cls = _RECORDS.get(x["record"])
            if cls is None:
                raise CodecError(f"data record names {x['record']!r}, which is not a registered record")
            return cls(**{k: walk(v) for k, v in x["fields"].items()})
        raise CodecError(f"data record holds an unknown tag {sorted(x)}")

    return walk(head["skeleton"])


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _read_ipc(buf) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(buf)).read_all()
