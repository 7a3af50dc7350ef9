"""WebDataset stores: a crawl's tars, scanned for their members and read by (offset, size) reference.

A tar of a crawl comes from the open web: its headers are read through tarfile's own checks (checksums, sizes
against the end of the file) and nothing in it is ever extracted; a member is only ever a (offset, size) of
bytes that a reference names, and its name only ever a key to pair a sample's members by. Indexing a crawl's
tars (ingest) is a job of its own; the store's reader (pipeline/images.py) only asks `member_bytes` for the bytes
of a reference into a tar.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pyarrow as pa

from pipeline import shards
from pipeline.image_refs import ImageStoreError

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


def member_bytes(f, offset: int, size: int, header_crc: int = -1) -> bytes | None:
    """The bytes of the member recorded at `offset` with `size`, or None when the header before them no longer
    says so (a tar rewritten or cut since it was indexed): the very header block indexed (its CRC-32, when the
    reference records it: a name, size, mtime... that changed), else a valid header of a plain file of that
    size. Never another member's bytes under this reference."""
    import tarfile

    if offset < TAR_BLOCK or size < 0:
        return None
    f.seek(offset - TAR_BLOCK)
    block = f.read(TAR_BLOCK)
    if header_crc >= 0:  # the header tarfile checked when the tar was indexed, byte for byte (cheap)
        if zlib.crc32(block) != header_crc:
            return None
    else:  # a reference without it (FILE#OFFSET:SIZE): tarfile's checks on the header, dearer
        # (both timed by hand: bench/README.md, "The spine by hand")
        try:
            head = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except (tarfile.HeaderError, ValueError):
            return None
        if head.type not in _PLAIN_FILE_TYPES or head.size != size:
            return None
    data = f.read(size)
    return data if len(data) == size else None
