"""Opening untrusted image bytes: the one place that enforces the decompression-bomb limit.

Every decoder of pool images (align's perceptual hash, the trainer and dfn's scorer, the report's
thumbnails) opens bytes through `open_image`. Pillow itself only *warns* between 1x and 2x its
MAX_IMAGE_PIXELS (and any library may set that global to None), so the size is checked here from the
header, before anything is decoded.
"""

from __future__ import annotations

import io
import warnings

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default limit, fixed here


class ImageTooLarge(ValueError):
    """An image whose header declares more than the pixel limit (a decompression bomb)."""


def open_image(data: bytes | None, max_pixels: int = MAX_IMAGE_PIXELS):
    """Image.open from bytes (lazy: nothing decoded yet); ValueError for no bytes, ImageTooLarge for a bomb,
    Pillow's own errors for bytes that are not an image."""
    from PIL import Image

    if not data:
        raise ValueError("no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageTooLarge(str(e)) from None
    w, h = img.size
    if w <= 0 or h <= 0 or w * h > max_pixels:
        img.close()
        raise ImageTooLarge(f"image of {w}x{h} pixels is over the {max_pixels} pixel limit (decompression bomb)")
    return img
