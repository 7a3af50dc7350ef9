"""align's pixels: the per-image facts of one read (content hash, decodable, decoded size, dHash), threaded
over a shard, and the evaluation set as a Hamming index of dHashes."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards
from pipeline.hashing import content64
from pipeline.evalsets import IMAGE_EXTS, EvalSetError, eval_files, image_bytes, parquet_files
from pipeline.evalsets import image_column as _image_column
from pipeline.images import open_image
from pipeline.errors import StageError

_U64 = np.uint64
IMAGE_CHUNK = 256  # images per batch read and per thread task: the pool's per-task cost is nothing next to a
# batch's decoding (timed by hand: bench/README.md, image path), and a batch of 256-px JPEGs is ~7 MB
# Every per-image fact align needs, from one read of the shard's pixels (collect's; apply takes them from the
# pass-1 cache)
IMAGE_FACTS = {"has_bytes": np.bool_, "content": _U64, "decoded": np.bool_, "width": np.int64,
               "height": np.int64, "phash": _U64}


def dhash64(img) -> int:
    """64-bit difference hash: 9x8 grey thumbnail, bit = left pixel brighter than its right neighbour."""
    from PIL import Image

    g = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (g[:, :-1] > g[:, 1:]).ravel()
    return int(np.packbits(bits, bitorder="big").view(">u8")[0])


def inspect_image(data: bytes | None, max_pixels: int) -> tuple[bool, int, int, int]:
    """(ok, width, height, dhash). One decode per image, in `collect` (apply only when the pass-1 cache is
    missing); never raises.

    Refuses images over `max_pixels` before decoding (decompression bombs), and truncated or corrupt
    files (Pillow raises; LOAD_TRUNCATED_IMAGES stays off). JPEGs are decoded at reduced scale
    (`draft`, at least 128 px a side): the hash needs a 9x8 thumbnail, not the full image. Not smaller:
    at 64 px the DCT-domain downscale differs enough between an image and its resized copy to push
    copies past k, while 128 px stays well under the cost of a full decode and hashes nearly as a full decode
    does (measured on the demo world's eval copies: bench/README.md, image path).
    And straight to grey (`draft("L")`: libjpeg returns the Y channel, no chroma upsampling nor colour
    conversion), as the hash only looks at luminance: measured faster than decoding RGB and converting, with
    the same bits for all or nearly all of the hashes (bench/results/image_path.json; bench/README.md, image path).
    """
    try:
        with open_image(data, max_pixels) as img:
            w, h = img.size
            img.draft("L", (128, 128))
            img.load()
            return True, int(w), int(h), dhash64(img)
    except Exception:  # noqa: BLE001 - no bytes, a bomb, any decoder error: "unreadable", by design
        return False, 0, 0, 0


def decode_threads(configured: int) -> int:
    """`configured`, or with 0 the cores this process may run on."""
    if configured > 0:
        return configured
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def image_facts(batches: Iterable[tuple[np.ndarray, pa.Array]], n: int, max_pixels: int, threads: int) -> dict:
    """{fact: array per row} (`IMAGE_FACTS`) for a shard of `n` rows, from its image bytes streamed as
    (row positions, bytes) batches (`Stage.pixel_batches`); rows in no batch, or with null bytes, have none.

    The batches are decoded as they arrive, each by one thread: Pillow's decode and resize and hashlib's digest
    release the GIL, so threads use idle cores: all of them in an in-process run, and on a cluster the ones a
    worker that has finished its shards leaves idle (5 shards on 2 workers: the last shard alone). At most
    2 x threads batches are read ahead, so a worker holds a few batches of bytes, never the shard's."""
    out = {k: np.zeros(n, dtype=t) for k, t in IMAGE_FACTS.items()}

    def facts(at: np.ndarray, blobs: pa.Array) -> None:  # hashing and decoding are per image by nature
        for i, b in zip(at.tolist(), blobs.to_pylist()):
            if b is None:
                continue
            out["has_bytes"][i] = True
            out["content"][i] = content64(b)  # per image: no vectorised byte hash over an Arrow array
            ok, w, h, ph = inspect_image(b, max_pixels)
            out["decoded"][i], out["width"][i], out["height"][i], out["phash"][i] = ok, w, h, ph

    if threads <= 1:
        for at, blobs in batches:
            facts(at, blobs)
        return out
    with ThreadPoolExecutor(threads, thread_name_prefix="align-decode") as pool:
        pending: deque = deque()
        for at, blobs in batches:  # each batch writes only its rows
            pending.append(pool.submit(facts, at, blobs))
            while len(pending) > 2 * threads:
                pending.popleft().result()
        for f in pending:
            f.result()
    return out


class HammingIndex:
    """Multi-index over 64-bit hashes: split into k+1 bit bands; by pigeonhole any hash within Hamming
    distance k shares at least one band exactly. Each band is a sorted array (searchsorted); candidates
    are verified with popcount. Work ~ pool x bands x (eval / 2^band bits), not pool x eval."""

    def __init__(self, hashes: np.ndarray, k: int):
        self.k = int(k)
        self.hashes = np.unique(np.asarray(hashes, dtype=_U64))
        nb = min(self.k + 1, 64)
        edges = np.linspace(0, 64, nb + 1).astype(int)
        self.bands = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            mask = _U64((1 << (hi - lo)) - 1)
            keys = (self.hashes >> _U64(lo)) & mask
            order = np.argsort(keys, kind="stable")
            self.bands.append((_U64(lo), mask, keys[order], order))

    def __len__(self) -> int:
        return len(self.hashes)

    def near(self, q: np.ndarray) -> np.ndarray:
        """Boolean per query hash: some indexed hash is within Hamming distance k."""
        q = np.asarray(q, dtype=_U64)
        hit = np.zeros(len(q), dtype=bool)
        if len(self.hashes) == 0 or len(q) == 0:
            return hit
        for lo, mask, keys, order in self.bands:
            qk = (q >> lo) & mask
            a = np.searchsorted(keys, qk, side="left")
            b = np.searchsorted(keys, qk, side="right")
            cnt = b - a
            if not cnt.any():
                continue
            qi = np.repeat(np.arange(len(q)), cnt)
            first = np.repeat(a - np.cumsum(np.r_[0, cnt[:-1]]), cnt)
            ei = order[first + np.arange(len(qi))]
            close = np.bitwise_count(q[qi] ^ self.hashes[ei]) <= self.k
            hit[qi[close]] = True
        return hit


def load_eval_hashes(path: str, max_pixels: int) -> tuple[np.ndarray, int]:
    """dHashes of an evaluation set: a folder of image files (recursive) or a Parquet file/folder with
    an image-bytes column (image/jpg/bytes, or a {bytes: ...} struct) or a uint64 `image_phash` column.
    Returns (hashes, unreadable count)."""
    blobs: list[bytes | None] = []
    files = eval_files(path)
    # a folder: its own Parquet files if it has any (not its subfolders'), else its images, recursively
    parquet = parquet_files(path, files)
    if parquet:
        for f in parquet:
            t = shards.read_shard(f)
            if "image_phash" in t.column_names and _image_column(t) is None:
                col = pc.drop_null(t.column("image_phash")).to_numpy().astype(_U64)
                blobs.extend(int(x) for x in col)  # type: ignore[arg-type]
                continue
            try:
                blobs.extend(image_bytes(t, f))
            except EvalSetError as e:
                raise StageError(f"align: {e} or image_phash") from None
    else:
        for rel, _ in files:
            if os.path.splitext(rel)[1].lower() in IMAGE_EXTS:
                blobs.append(shards.read_bytes(shards.join(path, rel)))
    hashes, bad = [], 0
    for b in blobs:  # one decode per eval image, once per process
        if isinstance(b, int):
            hashes.append(b)
            continue
        ok, _, _, h = inspect_image(b, max_pixels)
        if ok:
            hashes.append(h)
        else:
            bad += 1
    return np.asarray(hashes, dtype=_U64), bad
