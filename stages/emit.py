"""emit: the kept rows of the last stage as a training set — Parquet and WebDataset shards.

Written per input shard (as img2dataset does), so emitting is parallel and resumable like every other
stage: input shard `part-00003` becomes `emit/parquet/part-00003-000.parquet`, `emit/wds/part-00003-000.tar`,
… each with at most `samples_per_shard` rows. `finalize` then writes the pool-wide index: `sizes.json`
(the file open_clip_train reads to know shard sizes), `uids.npy` (DataComp's habit: a sorted array of
128-bit uids, so a curated subset can be re-materialised from the pool) and `summary.json`.
The stage folder itself (`05_emit/part-*.parquet`) keeps every emitted row without image bytes: a light
table of what went in, for reports. Rows are never dropped here, except rows whose text is not UTF-8
(`invalid_utf8`, as in every stage: `pipeline.stage.Stage`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import check_ranges
from pipeline import shards
from pipeline.stage import Stage

TAR_MTIME = 0.0  # fixed member times: the same rows give byte-identical tars


def _stem(shard: str) -> str:
    return shard[: -len(".parquet")] if shard.endswith(".parquet") else shard


def _json_safe(v):
    if isinstance(v, bytes):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class EmitStage(Stage):
    name = "emit"
    requires = {"uid": pa.string(), "text": pa.string()}

    @dataclasses.dataclass
    class Config:
        samples_per_shard: int = 10000
        formats: list = dataclasses.field(default_factory=lambda: ["parquet", "wds"])
        image_ext: str = "jpg"  # name of the image member in tars (bytes are written as stored)
        klite: bool = True  # add `{uid}.klite.txt` when a `text_klite` column exists
        out: str = ""  # default: <run>/emit

        def __post_init__(self):
            check_ranges("emit", self, samples_per_shard=(1, None))

    def out_dir(self) -> str:
        return self.config.out or shards.join(self.context["run_dir"], "emit")

    def _pieces(self, n: int) -> int:
        return max(1, math.ceil(n / max(1, self.config.samples_per_shard)))

    def apply(self, table: pa.Table, stats) -> tuple[pa.Table, pa.Table]:
        out = self.out_dir()
        stem = _stem(self.context["shard"])
        k = self.config.samples_per_shard
        for i in range(self._pieces(table.num_rows)):
            piece = table.slice(i * k, k)
            name = f"{stem}-{i:03d}"
            if "parquet" in self.config.formats:
                shards.write_shard(piece, shards.join(out, "parquet", name + ".parquet"))
            if "wds" in self.config.formats:
                shards.write_bytes(self._tar(piece), shards.join(out, "wds", name + ".tar"))
        if table.num_rows == 0 and "wds" in self.config.formats:
            self.notes.append("an input shard was empty: it emits one empty shard of each format")
        light = table.drop_columns([c for c in ("image",) if c in table.column_names])
        rejected = table.slice(0, 0).append_column("reason", pa.array([], pa.string()))
        return light, rejected

    def _tar(self, table: pa.Table) -> bytes:
        """One WebDataset tar: {uid}.jpg (bytes as stored), {uid}.txt, {uid}.json (every other column)."""
        import webdataset as wds

        meta_cols = [c for c in table.column_names if c != "image"]
        rows = table.select(meta_cols).to_pylist()
        images = table.column("image").to_pylist() if "image" in table.column_names else [None] * table.num_rows
        klite = self.config.klite and "text_klite" in table.column_names
        buf = io.BytesIO()
        with wds.TarWriter(buf, mtime=TAR_MTIME, encoder=False) as w:
            for row, img in zip(rows, images):
                sample = {"__key__": row["uid"], "txt": (row["text"] or "").encode("utf-8")}
                if img is not None:
                    sample[self.config.image_ext] = img
                if klite and row.get("text_klite") is not None:
                    sample["klite.txt"] = row["text_klite"].encode("utf-8")
                meta = {k: _json_safe(v) for k, v in row.items()}
                sample["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
                w.write(sample)
        return buf.getvalue()

    def finalize(self, stage_dir: str, run_dir: str, summaries: list[dict]) -> dict:
        self.context = {"run_dir": run_dir, "stage_dir": stage_dir, "shard": ""}
        out = self.out_dir()
        sizes: dict[str, int] = {}
        expected: dict[str, set[str]] = {"parquet": set(), "wds": set()}
        k = self.config.samples_per_shard
        for s in summaries:
            n = s["rows_out"]
            for i in range(self._pieces(n)):
                name = f"{_stem(s['shard'])}-{i:03d}"
                count = min(k, n - i * k) if n else 0
                sizes[name + ".tar"] = count
                expected["parquet"].add(name + ".parquet")
                expected["wds"].add(name + ".tar")
        # files of an earlier run with other settings would silently join the training set: remove them
        for fmt, names in expected.items():
            folder = shards.join(out, fmt)
            if os.path.isdir(folder):
                for f in os.listdir(folder):
                    if (f.endswith((".tar", ".parquet")) and f not in names) or fmt not in self.config.formats:
                        os.remove(os.path.join(folder, f))
        uids = []
        for s in summaries:
            t = shards.read_shard(shards.join(stage_dir, s["shard"]), columns=["uid"])
            uids.append(t.column("uid"))
        uid_arr = pa.chunked_array(uids, pa.string()) if uids else pa.chunked_array([], pa.string())
        packed = _uids_to_u128(uid_arr)
        buf = io.BytesIO()
        np.save(buf, packed)
        shards.write_bytes(buf.getvalue(), shards.join(out, "uids.npy"))
        if "wds" in self.config.formats:
            shards.write_json(dict(sorted(sizes.items())), shards.join(out, "wds", "sizes.json"))
        total = int(sum(sizes.values()))
        summary = {
            "samples": total,
            "shards": len(sizes),
            "samples_per_shard": k,
            "formats": list(self.config.formats),
            "folder": out,
            "columns": [c for c in shards.read_shard(shards.join(stage_dir, summaries[0]["shard"])).column_names]
            if summaries else [],
            "wds_pattern": _brace_pattern(sorted(expected["wds"])) if expected["wds"] else "",
        }
        shards.write_json(summary, shards.join(out, "summary.json"))
        return summary


def _uids_to_u128(uids: pa.ChunkedArray) -> np.ndarray:
    """Sorted structured array (hi, lo) of 128-bit uids, as DataComp stores subset lists."""
    import polars as pl

    s = pl.Series(uids.combine_chunks() if uids.num_chunks else pa.array([], pa.string()))
    hi = s.str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False).fill_null(0).to_numpy()
    lo = s.str.slice(16, 16).str.to_integer(base=16, dtype=pl.UInt64, strict=False).fill_null(0).to_numpy()
    arr = np.empty(len(s), dtype=[("hi", "<u8"), ("lo", "<u8")])
    arr["hi"], arr["lo"] = hi, lo
    arr.sort(order=["hi", "lo"])
    return arr


def _brace_pattern(names: list[str]) -> str:
    """A shard list for open_clip's --train-data: brace-expansion per input stem ("a-{000..002}.tar")."""
    return "::".join(names)


STAGE = EmitStage
