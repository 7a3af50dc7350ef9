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
bytes through `open_image`, which enforces the decompression-bomb limit.
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
import warnings
import zlib
from collections.abc import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shards

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default limit, fixed here
PIXEL_BATCH_ROWS = 256  # references per batch of ImageReader.batches: ~7 MB of 256-px JPEGs
STREAM_BUFFER = 4 << 20  # bytes pyarrow reads at a time when a Parquet store file is streamed
REF_COL = "image_ref"
STORE_FILE = "image_store.json"
# Binary columns that hold encoded images (ours: `image`; img2dataset: `jpg`, or its encode_format's name).
# The runner never reads them into a stage's table.
BYTE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")


class ImageTooLarge(ValueError):
    """An image whose header declares more than the pixel limit (a decompression bomb)."""


class ImageSizeMismatch(ValueError):
    """An image whose header declares a size its data cannot hold (a forged header): the decoder would fill
    the missing pixels with grey and report the declared size."""


class ImageStoreError(shards.ShardError):
    """The image store cannot be found or read. str() is one line naming the file."""


def _quiet_pillow_bomb_warning() -> None:
    """Pillow warns, on its own limit, about images our explicit `max_pixels` check refuses (or was told to
    allow). One process-wide filter, added when absent: `warnings.catch_warnings` per image is not thread-safe,
    and align decodes in threads (an exit in one thread restores the filters another thread entered with)."""
    from PIL import Image

    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def open_image(data: bytes | None, max_pixels: int = MAX_IMAGE_PIXELS):
    """Image.open from bytes (lazy: nothing decoded yet); ValueError for no bytes, ImageTooLarge for a bomb,
    Pillow's own errors for bytes that are not an image."""
    from PIL import Image

    if not data:
        raise ValueError("no image bytes")
    _quiet_pillow_bomb_warning()
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from None
    w, h = img.size
    if w <= 0 or h <= 0 or w * h > max_pixels:
        img.close()
        raise ImageTooLarge(f"image of {w}x{h} pixels is over the {max_pixels} pixel limit (decompression bomb)")
    if img.format == "JPEG":
        have, need = jpeg_data_budget(data)
        if have < need:
            img.close()
            raise ImageSizeMismatch(f"JPEG header declares {w}x{h} pixels, but its {have} bytes of image data cannot "
                                    f"hold that many (at least {need} bytes): a forged header")
    return img


# Sequential (SOF0, SOF1) and progressive (SOF2) Huffman-coded JPEG: the least number of bits one 8x8 block can
# take in the scans. Sequential: a DC code and at least one AC code (EOB), each at least one bit. Progressive:
# the first DC scan codes every block with at least a one-bit code (later scans may skip blocks by EOB runs).
# Arithmetic-coded and lossless JPEG have no such floor and are not checked.
_JPEG_MIN_BITS_PER_BLOCK = {0xC0: 2, 0xC1: 2, 0xC2: 1}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length (TEM, RSTn)


def jpeg_data_budget(data: bytes) -> tuple[int, int]:
    """(bytes of a JPEG from its first scan on, the fewest bytes the blocks its header declares can be coded in).

    libjpeg does not fail when a scan ends early: it warns (Pillow drops the warning) and decodes the missing
    blocks as flat grey, so a 300x240 JPEG whose SOF says 9000x9000 decodes "fine" as 9000x9000, 243 MB of RGB
    per decode in dfn and the trainer. Counting is exact and cheap: every component's blocks, from the frame
    header's size and sampling factors, at their floor in bits (`_JPEG_MIN_BITS_PER_BLOCK`); an honest JPEG is
    always above it (real ones take 20-100x more), so nothing honest is refused. Only the headers are parsed,
    up to the first scan. (0, 0) where the file is not one this can judge."""
    pos, n, frame = 2, len(data), None
    if data[:2] != b"\xff\xd8":
        return 0, 0
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return 0, 0  # not at a marker: let the decoder say what is wrong
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _JPEG_MIN_BITS_PER_BLOCK and frame is None:
            frame = (marker, data[pos + 4:pos + 2 + length])
        elif 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return 0, 0  # lossless or arithmetic-coded: no floor to check against
        if marker == 0xDA:  # start of scan: what follows is image data (and, progressive, later scans)
            return (n - pos - 2 - length, _jpeg_min_bytes(*frame)) if frame else (0, 0)
        pos += 2 + length
    return 0, 0


def _jpeg_min_bytes(sof: int, header: bytes) -> int:
    """The fewest bytes a frame header's blocks can be coded in (`jpeg_data_budget`)."""
    if len(header) < 6:
        return 0
    height, width, count = int.from_bytes(header[1:3], "big"), int.from_bytes(header[3:5], "big"), header[5]
    comps = [(header[7 + 3 * i] >> 4, header[7 + 3 * i] & 15) for i in range(count) if 8 + 3 * i <= len(header)]
    if not comps or min(min(c) for c in comps) == 0:
        return 0
    hmax, vmax = max(h for h, _ in comps), max(v for _, v in comps)

    def ceil(a: int, b: int) -> int:
        return -(-a // b)

    # a component's size is the image's scaled by its sampling factor over the largest (JPEG's rounding up)
    blocks = sum(ceil(ceil(width * h, hmax), 8) * ceil(ceil(height * v, vmax), 8) for h, v in comps)
    return blocks * _JPEG_MIN_BITS_PER_BLOCK[sof] // 8


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


# ---- references ------------------------------------------------------------------------------------
def parquet_refs(file: str, n: int) -> pa.Array:
    """References to rows 0..n-1 of a Parquet file of the store."""
    return pl.select((pl.lit(f"{file}#") + pl.int_range(0, n, dtype=pl.Int64).cast(pl.String)).alias(REF_COL)) \
        .to_series().to_arrow().cast(pa.string()) if n else pa.array([], pa.string())


def tar_refs(file: str, offsets, sizes, headers=None) -> pa.Array:
    """References to tar members of a store file, from their data offsets and sizes, and (optional) the CRC-32
    of each member's header block: "FILE#OFFSET:SIZE:CRC". The reader then checks that the header before those
    bytes is still that member's (a tar rewritten since it was indexed gives no bytes, never another member's)."""
    df = pl.DataFrame({"o": offsets, "s": sizes, "h": headers if headers is not None else [None] * len(offsets)},
                      schema={"o": pl.Int64, "s": pl.Int64, "h": pl.Int64})
    crc = pl.when(pl.col("h").is_not_null()).then(pl.lit(":") + pl.col("h").cast(pl.String)).otherwise(pl.lit(""))
    return df.select((pl.lit(f"{file}#") + pl.col("o").cast(pl.String) + ":" + pl.col("s").cast(pl.String) + crc)
                     .alias(REF_COL)).to_series().to_arrow().cast(pa.string())


def _binary(col: pa.Array) -> pa.Array:
    return col.cast(pa.binary()) if col.type != pa.binary() else col


def parse_refs(refs) -> pl.DataFrame:
    """(i, file, loc) for every non-null reference; i is its position in `refs`. Vectorised; the locator is
    what follows the last '#' (digits and ':'), so a file name may hold a '#' of its own."""
    s = pl.Series(REF_COL, refs, dtype=pl.String)
    parts = s.str.extract_groups(r"^(.*)#([0-9:]+)$")
    df = pl.DataFrame({"i": pl.int_range(0, len(s), eager=True), "ref": s,
                       "file": parts.struct.field("1"), "loc": parts.struct.field("2")})
    bad = df.filter(pl.col("ref").is_not_null() & pl.col("loc").is_null())
    if bad.height:
        raise ImageStoreError(f"image store: malformed image reference {bad['ref'][0]!r} (expected FILE#ROW or "
                              "FILE#OFFSET:SIZE[:CRC])")
    return df.filter(pl.col("loc").is_not_null()).drop("ref")


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
        dfn's peak RSS on 2,000 images went from 1.54-1.61 GB to 1.66-1.79 GB with one row set aside; streamed,
        1.56-1.58 GB either way (tests/test_hostile_rows.py measures it with a 10 MB caption)."""
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
        previous one freed. That is also faster: two fresh processes each reading a 147 MB column whole took
        1.0-1.2 s for the first read on this VM (first touch of new pages), 0.07 s for a later one; streamed in
        batches of 256, align's first shard in each such process took 2.56 s, as its later ones (2.48 s), where
        the whole read made it 3.3-4.0 s.
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
                # 0.16-0.24 s for a 295 MB column where an fsspec file object took 0.40-0.54 s (warm cache)
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
            out = [_member_bytes(f, int(o[j]), int(s[j]), int(h[j])) for j in range(lo, min(len(order), lo + step))]
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


# ---- WebDataset stores -----------------------------------------------------------------------------
# A tar of a crawl comes from the open web: its headers are read through tarfile's own checks (checksums, sizes
# against the end of the file) and nothing in it is ever extracted; a member is only ever a (offset, size) of
# bytes that a reference names, and its name only ever a key to pair a sample's members by.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TAR_BLOCK = 512
_PLAIN_FILE_TYPES = (b"0", b"\0", b"7")  # tarfile's REGTYPE, AREGTYPE, CONTTYPE: bytes stored as they are


@dataclasses.dataclass(frozen=True)
class TarScan:
    """One pass over a tar's headers. `members`: every member but folders, in tar order: name, key, ext,
    offset (where its bytes start), size, header (its header block's CRC-32), `safe` (a plain file whose name is relative, without `..`: what
    tarfile's `data_filter` would extract, less links, devices and sparse files, which are no sample's bytes)
    and `vouched` (its extent is confirmed by the header that follows it, or by a clean end of the archive).
    `problem`: None when the archive is sound to its last byte; else one line saying where and why reading
    stopped (members after that point are not in `members`: the tar can no longer say where they are)."""

    members: pa.Table
    problem: str | None


def safe_member_name(name: str) -> bool:
    """A member name that names nothing outside a folder it would be extracted into: relative, no `..`
    component, no NUL, no backslash (a separator elsewhere); valid UTF-8."""
    if not name or name.startswith("/") or "\0" in name or "\\" in name:
        return False
    if ".." in name.split("/"):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # tarfile decodes names with surrogateescape: bytes that are not UTF-8
        return False
    return True


def scan_tar(path: str) -> TarScan:
    """Every member header of a tar (seeking past member bytes, never reading them). A tar that ends inside a
    member, a header whose checksum fails, or bytes after the last member that are not the end-of-archive
    zeros stop the scan: `problem` says so, and the member just before that point is vouched for only when the
    damaged block sits where its size says the next header starts (it has a header's `ustar` magic).
    ImageStoreError (one line) when the file cannot be opened or read at all (I/O), not for what it holds."""
    import tarfile

    fs, p = shards.fs_and_path(path)
    rows: list[tuple] = []
    problem, last_vouched = None, True
    try:
        end = int(fs.size(p))
        with fs.open(p, "rb") as raw:
            f = _HeaderTap(raw)
            try:
                tf = tarfile.open(fileobj=f, mode="r:")  # no compression: a crawl's tars are plain
            except (tarfile.TarError, ValueError, EOFError, OverflowError) as e:
                return TarScan(_members_table([]), f"not a readable tar from byte 0 ({_one_line(e)})")
            try:
                while (m := tf.next()) is not None:
                    if not m.isdir():
                        rows.append(_member_row(m, f.header_crc(m.offset_data - TAR_BLOCK)))
            except (tarfile.TarError, ValueError, EOFError, OverflowError) as e:
                problem, last_vouched = f"{_one_line(e)} at byte {min(tf.offset, end)}", False
            else:
                problem, last_vouched = _check_archive_end(f, tf.offset, end)
    except FileNotFoundError:
        raise ImageStoreError(f"image store: {shards.shard_name(path)} not found ({path})") from None
    except OSError as e:
        raise ImageStoreError(f"image store: {shards.shard_name(path)} cannot be read ({_one_line(e)})") from None
    members = _members_table(rows)
    if not last_vouched and members.num_rows:
        vouched = np.ones(members.num_rows, dtype=bool)
        vouched[-1] = False
        members = members.set_column(members.schema.get_field_index("vouched"), "vouched", pa.array(vouched))
    return TarScan(members, problem)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


class _HeaderTap:
    """The file tarfile scans, remembering the last header-sized block it read (a member's own header is the
    last block read before tarfile returns the member), so the index records each header's CRC-32 without
    reading it twice."""

    def __init__(self, f):
        self._f, self._at, self._block = f, -1, b""

    def read(self, n: int = -1) -> bytes:
        at = self._f.tell()
        data = self._f.read(n)
        if n == TAR_BLOCK:
            self._at, self._block = at, data
        return data

    def seek(self, *args):
        return self._f.seek(*args)

    def tell(self) -> int:
        return self._f.tell()

    def header_crc(self, at: int) -> int | None:
        return zlib.crc32(self._block) if at == self._at and len(self._block) == TAR_BLOCK else None


def _member_row(m, header_crc: int | None) -> tuple:
    """(name, key, ext, offset, size, header, safe, vouched) of a member; key and ext as WebDataset splits a
    name: at the first dot of its last component; header: its header block's CRC-32."""
    name, safe = m.name, m.type in _PLAIN_FILE_TYPES and m.sparse is None and safe_member_name(m.name)
    if not safe:  # never raise on a name: keep a printable spelling of it (bytes that are not UTF-8 as U+FFFD)
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return name, f"{d}/{stem}" if d else stem, ext.lower(), m.offset_data, m.size, header_crc, safe, True


def _members_table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [()] * 8
    types = [pa.string(), pa.string(), pa.string(), pa.int64(), pa.int64(), pa.int64(), pa.bool_(), pa.bool_()]
    names = ["name", "key", "ext", "offset", "size", "header", "safe", "vouched"]
    return pa.table({n: pa.array(list(c), t) for n, c, t in zip(names, cols, types)})


def _check_archive_end(f, at: int, end: int) -> tuple[str | None, bool]:
    """(problem, whether the last member is vouched for) where tarfile stopped at byte `at` without an error.
    tarfile ends quietly at a zero block, at the end of the file, and at a damaged header after the first: a
    sound tar has only zeros from there on (the end-of-archive blocks and the record's padding)."""
    f.seek(at)
    block = f.read(TAR_BLOCK)
    if not block:  # every member whole, but no end-of-archive blocks: the writer never finished (cut?)
        return f"the tar ends at byte {at} without its end-of-archive blocks", True
    # where the last member's size said the next header starts: zeros (the end) or a header's magic (a damaged
    # header, not a lying size) vouch for that member's extent; anything else says its size lied
    in_place = not block.strip(b"\0") or block[257:262] == b"ustar"
    pos, chunk = at, block
    while chunk:
        if chunk.strip(b"\0"):
            if pos == at:
                what = "a damaged header" if in_place else "bytes that are no tar header"
                return f"{what} at byte {at}", in_place
            return f"bytes after the end of the archive at byte {pos}", in_place
        pos += len(chunk)
        chunk = f.read(1 << 20)
    return None, True


def members_hiding_headers(path: str, offsets, sizes) -> np.ndarray:
    """Per member (data offset, size): whether its bytes hold a valid tar header at a block boundary, i.e. its
    size covers later members (a header that lies by whole blocks, landing on a later header or in the
    end-of-archive zeros, which tarfile cannot notice). Reads those members' bytes, a member at a time: for a
    tar whose metadata lists samples that its scan did not find, not for every tar."""
    import tarfile

    fs, p = shards.fs_and_path(path)
    out = np.zeros(len(offsets), dtype=bool)
    with fs.open(p, "rb") as f:
        for i, (o, s) in enumerate(zip(np.asarray(offsets), np.asarray(sizes))):
            n = int(s) // TAR_BLOCK * TAR_BLOCK
            if n < TAR_BLOCK or o % TAR_BLOCK:
                continue
            f.seek(int(o))
            blocks = np.frombuffer(f.read(n), dtype=np.uint8)
            blocks = blocks[: len(blocks) // TAR_BLOCK * TAR_BLOCK].reshape(-1, TAR_BLOCK)
            magic = (blocks[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1)
            for b in np.flatnonzero(magic):  # a header's magic: a header if its checksum holds too
                try:
                    tarfile.TarInfo.frombuf(blocks[b].tobytes(), "utf-8", "surrogateescape")
                except (tarfile.HeaderError, ValueError):
                    continue
                out[i] = True
                break
    return out


def index_tar(path: str) -> pa.Table:
    """(key, ext, offset, size, header) per member that a reference may name: safe, and vouched for by the scan
    (`scan_tar`). Members are then read by reference."""
    members = scan_tar(path).members
    ok = members.column("safe").to_numpy(zero_copy_only=False) & members.column("vouched").to_numpy(zero_copy_only=False)
    return members.filter(pa.array(ok)).select(["key", "ext", "offset", "size", "header"])


def _member_bytes(f, offset: int, size: int, header_crc: int = -1) -> bytes | None:
    """The bytes of the member recorded at `offset` with `size`, or None when the header before them no longer
    says so (a tar rewritten or cut since it was indexed): the very header block indexed (its CRC-32, when the
    reference records it: a name, size, mtime... that changed), else a valid header of a plain file of that
    size. Never another member's bytes under this reference."""
    import tarfile

    if offset < TAR_BLOCK or size < 0:
        return None
    f.seek(offset - TAR_BLOCK)
    block = f.read(TAR_BLOCK)
    if header_crc >= 0:  # the header tarfile checked when the tar was indexed, byte for byte (~1 us)
        if zlib.crc32(block) != header_crc:
            return None
    else:  # a reference without it (FILE#OFFSET:SIZE): tarfile's checks on the header, ~45 us
        try:
            head = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except (tarfile.HeaderError, ValueError):
            return None
        if head.type not in _PLAIN_FILE_TYPES or head.size != size:
            return None
    data = f.read(size)
    return data if len(data) == size else None
