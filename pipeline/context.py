"""The per-shard context a stage's hooks get from the runner: where they run, and what they may read or leave.

The runner builds one `ShardContext` per call (collect, apply, a finalize item) and passes it in; a stage
keeps nothing per call on itself. Stage instances are cached per process (one setup per worker), so state set
on them by one call would be seen by the next, or by another thread's call under a threaded scheduler.

A stage used directly, without a runner (a notebook, a test), gets `ShardContext.detached(stage)`: no run
folder, so its pass-1 cache is off and its pixels come from an in-memory `image` column.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import shards
from pipeline.errors import StageError
from pipeline.hashing import hash64_strings

IMAGE_COL = "image"  # image bytes in a table built in memory (the runner never puts bytes in a stage's table)


@dataclasses.dataclass(frozen=True)
class ShardContext:
    stage: str = ""  # the stage's name, for messages
    run_dir: str = ""
    stage_dir: str = ""
    shard: str = ""  # the output shard's name ("" outside a shard: finalize, fingerprints)
    images: Any = None  # the run's ImageReader, given only to a stage that declares `needs_pixels`
    needs_pixels: bool = False
    verify: bool = False  # `--verify`: a stage that trusts its own earlier outputs (emit's) checks their digests
    notes: list[str] = dataclasses.field(default_factory=list)  # the sink: the runner puts them in the manifest
    # files a hook wrote in the run folder outside its stage folder (the embedding store): {path relative to the
    # run folder: {"size", "xxh3"}}; the runner's done-marker vouches for them as for the shard's own files
    outputs: dict[str, dict] = dataclasses.field(default_factory=dict)
    # a stage with a survey pass (Stage.survey): its concluded survey (semdedup's centroids), given to collect and
    # apply; None otherwise
    survey: Any = None

    @classmethod
    def detached(cls, stage) -> "ShardContext":
        return cls(stage=getattr(stage, "name", ""), needs_pixels=bool(getattr(stage, "needs_pixels", False)))

    def note(self, message: str) -> None:
        """A line for the shard's manifest and the funnel (each distinct line once)."""
        if message not in self.notes:
            self.notes.append(message)

    def wrote(self, path: str, record: dict) -> None:
        """Record a file written in the run folder (outside the stage folder) for this shard's done-marker: a
        resume redoes the shard when the file is gone or changed."""
        if not self.run_dir or not record:
            return
        root = self.run_dir.rstrip("/") + "/"
        if not path.startswith(root):
            raise ValueError(f"{self.stage}: {path} is not in the run folder {self.run_dir}")
        self.outputs[path[len(root):]] = dict(record)

    # ---- pixels ----------------------------------------------------------------------------------
    def pixels(self, table: pa.Table) -> pa.Array | None:
        """The rows' image bytes (binary, null where a row has no image), read by reference through the run's
        image reader, a store file at a time. None when the rows carry no references (a text-only pool).
        A table built in memory with its bytes in `image` gives those."""
        got = self._pixel_source(table)
        if got is None or isinstance(got, pa.Array):
            return got
        reader, refs = got
        return reader.read(refs)

    def pixel_batches(self, table: pa.Table, rows: int | None = None) -> Iterator[tuple[np.ndarray, pa.Array]] | None:
        """`pixels` as a stream: (row positions, their bytes) in batches of at most `rows` (the reader's
        default: `ImageReader.batches`), rows without an image left out. For stages that decode as they read:
        they hold one batch of bytes, not the shard's. None for a text-only pool, as `pixels`."""
        from pipeline.images import PIXEL_BATCH_ROWS

        rows = rows or PIXEL_BATCH_ROWS
        got = self._pixel_source(table)
        if got is None:
            return None
        if isinstance(got, pa.Array):
            return _array_batches(got, rows)
        reader, refs = got
        return reader.batches(refs, rows)

    def _pixel_source(self, table: pa.Table):
        """None (no images), the bytes themselves (an in-memory table, or references that are all null), or
        (reader, references)."""
        from pipeline.images import REF_COL, STORE_FILE

        if REF_COL not in table.column_names:
            if IMAGE_COL in table.column_names and _is_bytes(table.schema.field(IMAGE_COL).type):
                return table.column(IMAGE_COL).combine_chunks().cast(pa.binary())
            return None
        refs = table.column(REF_COL)
        if refs.null_count == len(refs):
            return pa.nulls(len(refs), pa.binary())
        if self.images is None and not self.needs_pixels:
            raise StageError(f"{self.stage}: reads pixels but does not declare `needs_pixels` (the runner gives "
                               "the image reader only to stages that do)")
        if self.images is None:
            raise StageError(f"{self.stage}: rows name their images ({REF_COL}) but the run records no image "
                               f"store ({STORE_FILE} in {self.run_dir or 'the run folder'})")
        return self.images, refs

    # ---- pass-1 cache: per-row work that collect did and apply needs again ---------------------
    # A Dask cluster may run a shard's collect and apply on different workers (or machines), so an
    # in-memory cache would miss; the stage folder is what every worker sees. apply takes the file
    # and removes it, so nothing outlives the stage. Validity is checked, never assumed: the cached
    # rows must be the shard's rows (uid and a hash of `text`, row by row) under the same `key`; on any
    # doubt the caller recomputes, so a stale or missing cache costs time, never correctness.
    def _cache_path(self, name: str) -> str | None:
        if not self.stage_dir or not self.shard:
            return None
        return shards.join(self.stage_dir, "_cache", f"{self.shard}.{name}.parquet")

    @staticmethod
    def _row_check(table: pa.Table) -> np.ndarray:
        """The texts' version-stable hash: collect and apply may run on workers with different polars."""
        return hash64_strings(table.column("text"), "pass-1 cache")

    def cache_put(self, name: str, table: pa.Table, columns: dict[str, Any], key: str) -> None:
        path = self._cache_path(name)
        if path is None:
            return
        t = pa.table({"uid": table.column("uid"), "_text_h": self._row_check(table), **columns})
        t = t.replace_schema_metadata({"key": key})
        try:
            shards.write_shard(t, path)
        except shards.ShardError:  # a cache is an optimisation: a full disk here is not a failure
            shards.remove(path)

    def cache_take(self, name: str, table: pa.Table, key: str) -> pa.Table | None:
        path = self._cache_path(name)
        if path is None or not shards.exists(path):
            return None
        try:
            t = shards.read_shard(path)
        except shards.ShardError:
            t = None
        shards.remove(path)
        if (
            t is None
            or (t.schema.metadata or {}).get(b"key") != key.encode()
            or t.num_rows != table.num_rows
            or not t.column("uid").equals(table.column("uid"))
            or not np.array_equal(t.column("_text_h").to_numpy(), self._row_check(table))
        ):
            return None
        return t.drop_columns(["uid", "_text_h"])


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t)


def _array_batches(blobs: pa.Array, rows: int) -> Iterator[tuple[np.ndarray, pa.Array]]:
    """`ImageReader.batches`' shape over bytes already in memory: slices, null rows left out."""
    import pyarrow.compute as pc

    valid = np.flatnonzero(pc.is_valid(blobs).to_numpy(zero_copy_only=False))
    for lo in range(0, len(valid), rows):
        at = valid[lo:lo + rows]
        yield at, blobs.take(pa.array(at))
