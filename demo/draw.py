"""Drawing the demo world's images with Pillow: 1-4 shapes (circle, square, triangle, star, ring, cross, ...)
of one named colour on a plain, striped, dotted, gradient, checked or noisy background, JPEG-encoded."""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

# Head first: index = frequency rank.
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "heart", "crescent",
          "pentagon", "arrow"]
PLURAL = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPES}
COLOURS = {
    "red": (214, 39, 40), "blue": (31, 90, 200), "green": (44, 160, 44), "black": (20, 20, 20),
    "yellow": (240, 200, 20), "orange": (255, 127, 14), "purple": (128, 60, 170), "pink": (240, 110, 180),
    "brown": (140, 86, 50), "grey": (128, 128, 128), "teal": (0, 128, 128), "navy": (20, 30, 100),
    "maroon": (120, 20, 30), "olive": (120, 130, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "beige": (235, 225, 200), "light grey": (215, 215, 215),
               "pale blue": (205, 225, 245), "cream": (250, 245, 225), "mint": (210, 240, 220)}
TEXTURES = ["plain", "striped", "dotted", "gradient", "checked", "noisy"]
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def zipf_weights(k: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, k + 1) ** a
    return w / w.sum()


def _polygon(cx, cy, r, k, rot=0.0, inner=None):
    pts = []
    for i in range(k * (2 if inner else 1)):
        ang = rot + math.pi * 2 * i / (k * (2 if inner else 1)) - math.pi / 2
        rr = (r if i % 2 == 0 else r * inner) if inner else r
        pts.append((cx + rr * math.cos(ang), cy + rr * math.sin(ang)))
    return pts


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, bg, rot: float) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, rot + math.pi / 4), fill=fill)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.15, 3, rot), fill=fill)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, r * 1.15, 5, rot, inner=0.45), fill=fill)
    elif shape == "ring":
        d.ellipse(box, outline=fill, width=max(3, int(r * 0.3)))
    elif shape == "cross":
        w = r * 0.35
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r * 1.2), (cx + r * 0.75, cy), (cx, cy + r * 1.2), (cx - r * 0.75, cy)], fill=fill)
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, r * 1.1, 6, rot), fill=fill)
    elif shape == "pentagon":
        d.polygon(_polygon(cx, cy, r * 1.1, 5, rot), fill=fill)
    elif shape == "heart":
        q = r * 0.55
        d.ellipse([cx - 2 * q, cy - 1.6 * q, cx, cy + 0.4 * q], fill=fill)
        d.ellipse([cx, cy - 1.6 * q, cx + 2 * q, cy + 0.4 * q], fill=fill)
        d.polygon([(cx - 1.95 * q, cy - 0.3 * q), (cx + 1.95 * q, cy - 0.3 * q), (cx, cy + 1.9 * q)], fill=fill)
    elif shape == "crescent":
        d.ellipse(box, fill=fill)
        off = r * 0.45
        d.ellipse([cx - r + off, cy - r - off * 0.3, cx + r + off, cy + r - off * 0.3], fill=bg)
    elif shape == "arrow":
        w = r * 0.28
        d.rectangle([cx - r, cy - w, cx + r * 0.2, cy + w], fill=fill)
        d.polygon([(cx + r * 0.2, cy - r * 0.7), (cx + r, cy), (cx + r * 0.2, cy + r * 0.7)], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def _background(w: int, h: int, bg, texture: str, rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(im)
    darker = tuple(max(0, c - rng.randint(18, 40)) for c in bg)
    if texture == "striped":
        step = rng.randint(10, 30)
        diagonal = rng.random() < 0.5
        for x in range(-h if diagonal else 0, w, step):
            d.line([(x, 0), (x + h, h)] if diagonal else [(x, 0), (x, h)], fill=darker, width=max(2, step // 4))
    elif texture == "dotted":
        step = rng.randint(12, 28)
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=darker)
    elif texture == "gradient":
        a = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h, dtype=np.float32)
        lo, hi = np.array(bg, np.float32), np.array(darker, np.float32)
        ramp = (lo[None] * (1 - a[:, None]) + hi[None] * a[:, None]).astype(np.uint8)
        arr = np.broadcast_to(ramp[None, :, :], (h, w, 3)) if len(a) == w else np.broadcast_to(ramp[:, None, :], (h, w, 3))
        im = Image.fromarray(np.ascontiguousarray(arr))
    elif texture == "checked":
        step = rng.randint(16, 40)
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=darker)
    elif texture == "noisy":
        nrng = np.random.default_rng(rng.getrandbits(32))
        arr = np.asarray(im, np.int16) + nrng.integers(-22, 23, size=(h, w, 1), dtype=np.int16)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return im


def render(shape: str, colour: str, count: int, w: int, h: int, rng: random.Random, bg_name: str | None = None,
           texture: str | None = None) -> tuple[Image.Image, str, str]:
    """Draw `count` shapes of one colour; returns (image, background name, texture)."""
    bg_name = bg_name or rng.choice(list(BACKGROUNDS))
    texture = texture or rng.choice(TEXTURES)
    bg = BACKGROUNDS[bg_name]
    im = _background(w, h, bg, texture, rng)
    d = ImageDraw.Draw(im)
    side = min(w, h)
    cols = count if w >= h else 1
    rows_ = 1 if w >= h else count
    cell_w, cell_h = w / cols, h / rows_
    r_max = 0.42 * min(cell_w, cell_h)
    fill = tuple(int(np.clip(c + rng.randint(-15, 15), 0, 255)) for c in COLOURS[colour])
    for i in range(count):
        ci, ri = (i, 0) if w >= h else (0, i)
        r = r_max * rng.uniform(0.6, 1.0)
        jx, jy = (cell_w / 2 - r) * rng.uniform(-0.8, 0.8), (cell_h / 2 - r) * rng.uniform(-0.8, 0.8)
        cx, cy = cell_w * (ci + 0.5) + jx, cell_h * (ri + 0.5) + jy
        _draw_shape(d, shape, cx, cy, max(r, side * 0.06), fill, bg, rng.uniform(0, math.pi / 6))
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return im, bg_name, texture


def jpeg(im: Image.Image, quality: int = 88) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def redraw(data: bytes, rng: random.Random) -> bytes:
    """The same scene again, as a second photo or a re-post of it would show it (a semantic duplicate): re-framed
    (4-10% cut from each side, drawn independently: a shift of up to 6% and a zoom of 8-20%), re-sized (x0.9-1.15,
    the short side kept >= 210 px, so align's size rules pass it), half the time re-coloured (saturation and
    contrast; never the hue, so the colour keeps its name, nor the brightness, which moves every pixel of the
    pale backgrounds more than the scene changed) and re-encoded. The crop moves the dHash's 9x8 thumbnail: of
    the web world's clean images (n = 3000, seeds 0 and 1), 4-5% of copies land within align's 6 bits of their
    original (median 14-15 bits), while in 16 x 16 pixels the original stays the nearest clean image to >= 99%
    of them (tests/test_world_semantic.py): the content is the original's, the hashes are not."""
    with Image.open(io.BytesIO(data)) as src:
        im = src.convert("RGB")
    w, h = im.size
    left, right, top, bottom = (rng.uniform(0.04, 0.10) for _ in range(4))
    im = im.crop((round(w * left), round(h * top), round(w * (1 - right)), round(h * (1 - bottom))))
    scale = max(rng.uniform(0.9, 1.15), 210 / min(im.size))
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    if rng.random() < 0.5:
        im = ImageEnhance.Color(im).enhance(rng.uniform(0.75, 1.3))
        im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.85, 1.2))
    return jpeg(im, rng.randint(75, 92))
