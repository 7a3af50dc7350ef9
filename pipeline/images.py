"""The image store, references into it, and the one reader of pixels.

Images are written once. Their bytes live in one place, the *image store*: ingest's img2dataset output, a crawl
the user already has (img2dataset Parquet or WebDataset output), or a Parquet pool in our row schema given with
`--input`. Every file a curation stage writes holds metadata only; a row names its image with a reference:

    image_ref = "<file>#<locator>"        <file> relative to the store root
        Parquet file:  "00003.parquet#17"          row 17 of that file
        tar file:      "00003.tar#1536:29876:CRC"  the member's bytes: offset 1536, 29,876 bytes; CRC (optional):
                                                   the CRC-32 of its header block, checked on every read

It names the source, not the metadata shard, so it survives resharding; it is relative to the store root, so it
survives moving the store; the root itself is recorded once per run in `runs/<name>/image_store.json`
({"root", "format", "column"}), relative to the run folder when the store lives inside it (ingest's download),
so a moved run folder still finds it; else as given (an absolute path or an fsspec URI such as s3://bucket/crawl).

`ImageReader.read(refs)` returns the bytes of many references at once, a store file at a time: one Parquet
column read (or one open tar) per source file, never one open per row. Every decoder of pool images opens the
bytes through `open_image` (pipeline/image_open.py), which enforces the decompression-bomb limit.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shards
from pipeline.image_refs import ImageStoreError, parse_refs
from pipeline.tars import member_bytes

# moved to image_open.py, image_refs.py and tars.py (issue 34); re-exported for their callers
from pipeline.image_open import MAX_IMAGE_PIXELS, ImageTooLarge, open_image  # noqa: F401
from pipeline.image_refs import REF_COL, parquet_refs, tar_refs  # noqa: F401
from pipeline.tars import IMAGE_EXTS, index_tar, members_hiding_headers, scan_tar  # noqa: F401

PIXEL_BATCH_ROWS = 256  # references per batch of ImageReader.batches: ~7 MB of 256-px JPEGs
STREAM_BUFFER = 4 << 20  # bytes pyarrow reads at a time when a Parquet store file is streamed
STORE_FILE = "image_store.json"
# Binary columns that hold encoded images (ours: `image`; img2dataset: `jpg`, or its encode_format's name).
# The runner never reads them into a stage's table.
BYTE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")


# ---- the store -------------------------------------------------------------------------------------
def byte_column(schema: pa.Schema) -> str | None:
    """The column of a Parquet schema that holds encoded images, if any."""
    for name in BYTE_COLUMNS:
        if name in schema.names:
            t = schema.field(name).type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t):
                return name
    return None


def _is_url(path: str) -> bool:
    return "://" in str(path)


def normalised(path: str) -> str:
    """A folder's one spelling (absolute, normalised; an fsspec URI without its trailing slash)."""
    return str(path).rstrip("/") if _is_url(path) else os.path.normpath(os.path.abspath(str(path)))


def within(path: str, folder: str) -> bool:
    """`path` is `folder` or under it, whichever way either is spelt (relative, absolute, trailing slash)."""
    a, b = normalised(path), normalised(folder)
    return a == b or a.startswith(b.rstrip("/") + "/")


@dataclasses.dataclass(frozen=True)
class ImageStore:
    """Where a run's image bytes live: `root` (absolute path or fsspec URI), `format` ("parquet" | "wds") and,
    for Parquet, the bytes `column`."""

    root: str
    format: str = "parquet"
    column: str = "jpg"

    def __post_init__(self):
        if self.format not in ("parquet", "wds"):
            raise ImageStoreError(f"image store {self.root}: unknown format {self.format!r} (parquet or wds)")

    def holds(self, folder: str) -> bool:
        """Whether `folder` is this store's root (its files are the ones references name)."""
        return normalised(folder) == normalised(self.root)

    def path(self, file: str) -> str:
        return shards.join(self.root, file)

    def save(self, run_dir: str) -> None:
        """Record the store in the run: its root relative to the run folder when it lives inside it."""
        root = self.root
        if not _is_url(root) and not _is_url(run_dir):
            rel = os.path.relpath(normalised(root), normalised(run_dir))
            if not rel.startswith(".."):
                root = rel
        record = shards.json_bytes({"root": root, "format": self.format, "column": self.column})
        shards.write_if_changed(record, shards.join(run_dir, STORE_FILE))

    @staticmethod
    def load(run_dir: str) -> "ImageStore | None":
        rec = shards.read_json(shards.join(run_dir, STORE_FILE))
        if not rec:
            return None
        root = str(rec["root"])
        if not _is_url(root) and not os.path.isabs(root):
            root = shards.join(run_dir, root) if _is_url(run_dir) else normalised(os.path.join(run_dir, root))
        return ImageStore(root, rec.get("format", "parquet"), rec.get("column", "jpg"))

    def reader(self) -> "ImageReader":
        return ImageReader(self)


def store_of_folder(folder: str) -> ImageStore | None:
    """The store that a folder of metadata shards refers to: the one recorded by its run (the folder's
    parent, for a stage folder; or the folder itself)."""
    for run_dir in (posixpath.dirname(str(folder).rstrip("/")) if _is_url(folder) else os.path.dirname(normalised(folder)),
                    folder):
        store = ImageStore.load(run_dir)
        if store is not None:
            return store
    return None


def _binary(col: pa.Array) -> pa.Array:
    return col.cast(pa.binary()) if col.type != pa.binary() else col


class ImageReader:
    """Bytes by reference, a store file at a time."""

    def __init__(self, store: ImageStore):
        self.store = store

    def read(self, refs) -> pa.Array:
        """Binary array aligned with `refs`: the image bytes, null where the reference is null or names an
        empty cell. ImageStoreError (one line) for a store file that is missing or unreadable.

        Streamed (`batches`' default batch), never a store file's whole column at once: read whole, the column
        and the rows taken from it (any row of the file not asked for: one row set aside by the reader) were
        both held, and in Arrow's pool (mimalloc) what was freed stayed resident under what the stage did next.
        Measured by hand: read whole, one row set aside raised dfn's peak RSS; streamed, the peak is the same
        either way (figures: bench/README.md, "The image store by hand"; tests/test_hostile_rows.py measures it
        with a 10 MB caption)."""
        refs = refs.combine_chunks() if isinstance(refs, pa.ChunkedArray) else refs
        rows, values = [], []
        for at, blobs in self.batches(refs):  # a store file at a time, a batch at a time
            rows.append(at)
            values.append(blobs)
        where = np.full(len(refs), -1, dtype=np.int64)  # row -> position in the values read
        if rows:
            at = np.concatenate(rows)
            where[at] = np.arange(len(at))
        blobs = pa.concat_arrays(values) if len(values) > 1 else values[0] if values else pa.array([], pa.binary())
        if np.array_equal(where, np.arange(len(where))):  # every row, in store order: no copy
            return blobs
        return blobs.take(pa.array(where, pa.int64(), mask=where < 0))

    def batches(self, refs, rows: int | None = PIXEL_BATCH_ROWS) -> Iterator[tuple[np.ndarray, pa.Array]]:
        """(positions in `refs`, their bytes as a binary array) for every non-null reference: a store file at a
        time, within it in store order, at most `rows` store rows a batch (None: a file's references at once; a
        reference repeated rides in its row's batch).

        For readers that decode as they read (align): they hold one batch of bytes, not a shard's (5,000 256-px
        JPEGs are 147 MB; a real crawl's shard of full-size images, a GB), and each batch reuses the memory the
        previous one freed. That is also faster: in a fresh process the first whole read of a column is slow (first
        touch of new pages), and streamed, align's first shard takes as long as its later ones, where the whole
        read made it slower (timed by hand: bench/README.md, "The image store by hand").
        ImageStoreError (one line) for a store file that is missing or unreadable."""
        refs = refs.combine_chunks() if isinstance(refs, pa.ChunkedArray) else refs
        parsed = parse_refs(refs)
        for (file,), group in parsed.group_by("file", maintain_order=True):
            yield from self._file_batches(file, group["i"].to_numpy(), group["loc"], rows)

    def _file_batches(self, file: str, at: np.ndarray, locs: pl.Series, rows: int | None):
        path = self.store.path(file)
        fs, p = shards.fs_and_path(path)
        try:
            if self.store.format == "parquet" and shards.is_local(path):
                # pyarrow's own reader on a local file (GIL released, no Python file object in between):
                # timed by hand faster than through an fsspec file object (bench/README.md, "The image store by hand")
                yield from self._parquet_rows(p, at, locs, rows)
                return
            with fs.open(p, "rb") as f:
                if self.store.format == "parquet":
                    yield from self._parquet_rows(f, at, locs, rows)
                else:
                    yield from self._tar_members(f, at, locs, rows)
        except FileNotFoundError:
            raise ImageStoreError(f"image store: {file} not found ({path})") from None
        except (pa.ArrowException, OSError, ValueError) as e:
            msg = " ".join(str(e).split())[:200]
            raise ImageStoreError(f"image store: {file} cannot be read ({msg})") from None

    def _parquet_rows(self, f, at: np.ndarray, locs: pl.Series, rows: int | None):
        """The bytes of the referenced rows, reading only the row groups they fall in: whole (rows None) or
        streamed in batches through a buffered stream (the file's column chunk never held at once)."""
        r = locs.cast(pl.Int64, strict=False)
        if r.null_count():
            raise ValueError(f"bad row reference {locs.filter(r.is_null())[0]!r}")
        pf = pq.ParquetFile(f, buffer_size=STREAM_BUFFER if rows else 0)
        if self.store.column not in pf.schema_arrow.names:
            raise ValueError(f"no column '{self.store.column}'")
        meta = pf.metadata
        bounds = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        r = r.to_numpy()
        if len(r) and (r.min() < 0 or r.max() >= bounds[-1]):
            raise ValueError(f"row reference out of range (the file has {bounds[-1]} rows)")
        group_of = np.searchsorted(bounds, r, side="right") - 1
        groups = np.unique(group_of)
        sizes = bounds[groups + 1] - bounds[groups]
        start_in_read = np.cumsum(np.r_[0, sizes[:-1]])  # where each group read begins in the read
        take = r - bounds[group_of] + start_in_read[np.searchsorted(groups, group_of)]
        order = np.argsort(take, kind="stable")  # forward through the file
        take, at = take[order], at[order]
        if rows is None:
            col = pf.read_row_groups(groups.tolist(), columns=[self.store.column]).column(0).combine_chunks()
            yield at, _binary(col if np.array_equal(take, np.arange(len(col))) else col.take(pa.array(take)))
            return
        start = 0
        for batch in pf.iter_batches(batch_size=rows, row_groups=groups.tolist(), columns=[self.store.column],
                                     use_threads=False):
            lo, hi = np.searchsorted(take, [start, start + batch.num_rows])
            if hi > lo:
                col, idx = batch.column(0), take[lo:hi] - start
                whole = np.array_equal(idx, np.arange(len(col)))
                yield at[lo:hi], _binary(col if whole else col.take(pa.array(idx)))
            start += batch.num_rows

    @staticmethod
    def _tar_members(f, at: np.ndarray, locs: pl.Series, rows: int | None):
        parts = locs.str.split(":")
        off = parts.list.get(0, null_on_oob=True).cast(pl.Int64, strict=False)
        size = parts.list.get(1, null_on_oob=True).cast(pl.Int64, strict=False)
        head = parts.list.get(2, null_on_oob=True).cast(pl.Int64, strict=False).fill_null(-1)  # -1: not recorded
        if off.null_count() or size.null_count() or (parts.list.len() > 3).any():
            raise ValueError(f"bad member reference in {locs.to_list()[:1]}")
        order = off.arg_sort().to_numpy()  # forward reads through the file
        o, s, h = off.to_numpy()[order], size.to_numpy()[order], head.to_numpy()[order]
        step = rows or max(1, len(order))
        for lo in range(0, len(order), step):
            out = [member_bytes(f, int(o[j]), int(s[j]), int(h[j])) for j in range(lo, min(len(order), lo + step))]
            yield at[order[lo:lo + step]], pa.array(out, pa.binary())

    def identity(self, refs) -> str:
        """What identifies the referenced bytes without reading them: the store, and size and mtime of each
        store file the references name (for caches keyed by content, e.g. dfn's scores)."""
        files = parse_refs(refs)["file"].unique(maintain_order=True).to_list()
        ids = [shards.file_identity(self.store.path(x)) for x in files]
        return repr((self.store.format, self.store.column, ids))


def run_reader(run_dir: str) -> ImageReader | None:
    """The reader of the store recorded in a run folder (None for a text-only run)."""
    store = ImageStore.load(run_dir)
    return store.reader() if store is not None else None
