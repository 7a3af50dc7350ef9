"""The one door from a pool image's bytes to pixels: `open_image` refuses what would make a decoder allocate
far more than the bytes hold (a decompression bomb, a JPEG header that declares more pixels than its data can
code), so every decoder (align, dfn, the trainer, the report) is safe by going through it."""

from __future__ import annotations

import io
import warnings

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default limit, fixed here


class ImageTooLarge(ValueError):
    """An image whose header declares more than the pixel limit (a decompression bomb)."""


class ImageSizeMismatch(ValueError):
    """An image whose header declares a size its data cannot hold (a forged header): the decoder would fill
    the missing pixels with grey and report the declared size."""


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
    always above it (real ones take many times more, measured by hand: bench/README.md, "The spine by hand"), so
    nothing honest is refused. Only the headers are parsed, up to the first scan. (0, 0) where the file is not one
    this can judge."""
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
