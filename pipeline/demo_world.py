"""The demo world: a seeded, synthetic web crawl with the noise real crawls have, labelled.

What it writes (`make_world(out)`; `clipcurate demo-world OUT`):

  urls.parquet                 url, caption: the crawl list ingest reads (shuffled, like a real dump)
  www/img/*.jpg                what the URLs serve (pipeline.serve proxies demo.clipcurate.invalid to it);
                               some URLs 404, some serve an HTML page under a .jpg name
  truth.parquet                the ground truth the pipeline never reads: url, caption, uid, kind, shape,
                               colour, count, eval_image_id, dup_url, dup_group (a duplicate and its
                               original share it: the original's uid)
  eval/classification.parquet  held-out labelled images (zero-shot classification over the shape names)
  eval/classnames.txt          the class names, in label_id order
  eval/colours.parquet         the same images labelled by colour (learnt first by a tiny model)
  eval/retrieval.parquet       held-out images with two human-style captions each (retrieval)
  hq.parquet                   a small clean, high-quality set in the row schema (to train a DFN)
  config.toml                  the pipeline config scaled to this pool size (DESIGN.md, "Small pools")
  world.json                   n, seed, host, counts per kind, class names

Images are drawn with Pillow: shapes (circle, square, triangle, star, ring, cross, ...) in named colours,
1-4 of them, on plain, striped, dotted, gradient, checked or noisy backgrounds. Shapes and colours have
Zipf-like frequencies (a head and a long tail), so MetaCLIP's balancing has something to flatten.

Noise kinds (the `kind` column; one per row):
  clean            caption describes its image (some images have 2-3 alt-texts: `dup_url`)
  boilerplate      alt-text shared by many images ("IMG_2041.JPG", "click to enlarge", "1920x1080", ...)
  many_texts       one image (served under a few mirror URLs) with very many different alt-texts
  mismatched       a well-formed caption that describes another image
  exact_duplicate  a mirror URL of an image with the same caption (re-cased / re-spaced)
  near_duplicate   a mirror URL of an image with its caption lightly edited
  too_short        1-2 words;  too_long: SEO keyword soup over 20 words
  rare_token       a caption carrying junk tokens (SKU codes, hashes)
  small_image      image under 200 px;  odd_aspect: banner with aspect ratio over 3
  non_english      a caption in French, German, Spanish or Italian
  eval_copy        a resized, re-encoded copy of a held-out evaluation image
  http_404         the URL does not exist;  not_image: the URL serves an HTML page
  weak             (web mode only) a caption that is true but says little about its image: a generic product or
                   SEO phrase, only the background, only the colour, only "some shapes". Each is worded afresh,
                   so no rule for repeated alt-text catches it; a CLIP score (the dfn stage) is what should.
Everything is a pure function of (n, seed, noise): two calls give byte-identical files.

Noise modes (`make_world(..., noise=)`, `clipcurate demo-world --noise`):
  default  the composition in SHARES: a mostly clean pool (about 60% clean rows) with a few percent of each
           kind, so that every rule of every stage has something to find. Its files are what this module wrote
           before the web mode existed, byte for byte (tests/test_demo_world_web.py holds their digests).
  web      the composition in WEB_SHARES below: as noisy as a raw web crawl, where most pairs are weakly aligned
           or mismatched and a good curation keeps 10-30%. n >= WEB_MIN_N (the duplicate kinds need enough clean
           originals).

The web composition (share of the n URL rows; set from the published figures below before any ablation was run).
"Our choice" marks a value no source we found gives; the rest cite what they rest on.

  kind             share   where it comes from
  clean            ~0.13   the rest (0.127 at n=3000; many_texts takes max(25, min(60, n/50)) rows first). What
                           a good curation should keep: DataComp-1B is 1.4B of CommonPool's 12.8B pairs (11%) [1],
                           DFN-2B 2B of 12.8B (15.6%) [2].
  weak             0.30    weak + mismatched = 0.52, a majority: LAION's CLIP-similarity thresholds (ViT-B/32:
  mismatched       0.22    0.30 for LAION-400M [3], 0.28 for LAION-5B [4]) keep only 20% (>= 0.300) and 30%
                           (>= 0.281) of CommonPool [1, Table 16], and DataComp's CLIP-score baseline keeps the top
                           30% [1, Table 3]: 70-80% of a raw crawl scores below what LAION kept. Here the rows a CLIP
                           filter would pass (clean, duplicates, and the rule-caught kinds whose caption is right:
                           sizes, too_long, rare_token, many_texts, eval_copy) are ~0.31; of the rest, 0.52 are
                           only a CLIP score's to catch. The 0.30 / 0.22 split is our choice (alt-text that says
                           little is commoner than alt-text written for another picture; no source splits them).
  boilerplate      0.04    our choice (ALIGN drops alt-text shared by more than 10 images [5]; we found no share).
  exact_duplicate  0.03    duplicates are 0.06 = ~32% of the clean rows plus their copies (0.06 / 0.187): Webster
  near_duplicate   0.03    et al. find roughly 700M, about 30%, of LAION-2B's images likely duplicated [6]. The
                           exact / near split is our choice.
  too_short        0.02    our choice (DataComp's basic filter drops captions of <= 2 words or < 6 characters [1];
  too_long         0.015   no share given for them alone).
  rare_token       0.01    our choice.
  small_image      0.04    our choice; LAION-400M, already filtered, has 211M of 413M images with both sides
  odd_aspect       0.01    >= 256 px [3], i.e. half with a side under 256 px, but no source gives the share under
                           ALIGN's / DataComp's 200 px (or over aspect 3) [1, 5].
  non_english      0.03    our choice, for an English-targeted crawl after language ID. Without language ID a crawl
                           is mostly not English: LAION-5B is 2.3B English, 2.2B other languages and 1B undetermined
                           of 5.85B [4], and in CommonPool English filtering halves what a CLIP threshold of 0.30
                           keeps (10.2% vs 20% of the pool) [1, Table 16]. The demo's stages and evaluation are
                           English, its non-English captions come from a small glossary (more rows would make them
                           repeated alt-text), and align's language rule is off by default, so we keep the residue
                           small.
  eval_copy        0.028   DataComp flags ~2.8% of CommonPool's downloaded samples as near-duplicates of its
                           evaluation images [1, App. F] (capped at the eval set's size: 240 images).
  http_404         0.06    failed downloads are 0.08: img2dataset's author reports LAION-400M at ~95% download
  not_image        0.02    success at release and ~87% eight months later (~1% link rot a month), and a user's
                           stats file of 8,542 successes, 594 HTTP 404s and over 200 other failures (403, 503,
                           DNS, robots) [7]: 404s 0.06, other failures (stood in for by a page that is not an
                           image) 0.02.
                           A URL list drawn from old snapshots rots far more (DataComp downloaded ~16.8B of ~40B
                           attempted [1]); ours is a fresh list.
  many_texts       fixed   as in the default world (one image, max(25, min(60, n/50)) alt-texts).

Concept frequencies (web): Zipf exponents 1.5 over shapes and 1.2 over colours instead of 1.1 and 0.9 (our choice).
On the web a few concepts match millions of pairs and most match few (MetaCLIP's entry counts, which is why it caps
each entry at t = 20,000 at 400M pairs [8]); with only 12 shapes the default exponent leaves a mild head (the top
shape 36% of images, the last 2.3%), the steeper one a real head and a thin tail (49% and 1.2%), so metaclip's
balancing has something to cap and the tail shapes are as data-poor as the web's.

The evaluation sets (eval/*) are identical to the default world's for the same seed, and the HQ set
(hq.parquet) for the same seed and n: they are drawn before anything the noise mode changes, from the same
random stream. A web world's config.toml asks dfn for `keep_fraction = 0.3` (DataComp's CLIP-score baseline
[1]) instead of 0.8: most of what reaches dfn here is weak or mismatched.

Sources:
  [1] Gadre et al. 2023, "DataComp: In search of the next generation of multimodal datasets", arXiv 2304.14108,
      https://arxiv.org/abs/2304.14108 (Table 3, Table 16, section 3.2, Appendix F).
  [2] Fang et al. 2023, "Data Filtering Networks", arXiv 2309.17425, https://arxiv.org/abs/2309.17425; the DFN-2B
      models' card: "2B images that were filtered from a pool of 12.8B",
      https://huggingface.co/apple/DFN2B-CLIP-ViT-L-14
  [3] LAION-400M, https://laion.ai/blog/laion-400-open-dataset/ (CLIP ViT-B/32 similarity >= 0.3; size statistics).
  [4] LAION-5B, https://laion.ai/blog/laion-5b/ and Schuhmann et al. 2022, arXiv 2210.08402 (threshold 0.28;
      2.3B English, 2.2B other languages, 1B undetermined of 5.85B).
  [5] Jia et al. 2021, "Scaling Up Visual and Vision-Language Representation Learning With Noisy Text
      Supervision" (ALIGN), arXiv 2102.05918, https://arxiv.org/abs/2102.05918, section 3.
  [6] Webster et al. 2023, "On the De-duplication of LAION-2B", arXiv 2303.12733, https://arxiv.org/abs/2303.12733.
  [7] rom1504/img2dataset issue #277, "Failed to download all of LAION-400M",
      https://github.com/rom1504/img2dataset/issues/277
  [8] Xu et al. 2023, "Demystifying CLIP Data" (MetaCLIP), arXiv 2309.16671, https://arxiv.org/abs/2309.16671.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from pipeline.schema import compute_uid
from pipeline.serve import DEMO_HOST

log = logging.getLogger("clipcurate.demo_world")

HOST = f"http://{DEMO_HOST}"

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

KINDS = ["clean", "boilerplate", "many_texts", "mismatched", "weak", "exact_duplicate", "near_duplicate",
         "too_short", "too_long", "rare_token", "small_image", "odd_aspect", "non_english", "eval_copy", "http_404",
         "not_image"]
# share of the n URL rows per kind (clean is the rest); many_texts is a fixed block
SHARES = {"boilerplate": 0.05, "mismatched": 0.08, "exact_duplicate": 0.03, "near_duplicate": 0.03,
          "too_short": 0.03, "too_long": 0.025, "rare_token": 0.01, "small_image": 0.03, "odd_aspect": 0.02,
          "non_english": 0.01, "eval_copy": 0.02, "http_404": 0.02, "not_image": 0.01}
# the web world's composition: the table and its sources are in the module docstring
WEB_SHARES = {"weak": 0.30, "mismatched": 0.22, "boilerplate": 0.04, "exact_duplicate": 0.03, "near_duplicate": 0.03,
              "too_short": 0.02, "too_long": 0.015, "rare_token": 0.01, "small_image": 0.04, "odd_aspect": 0.01,
              "non_english": 0.03, "eval_copy": 0.028, "http_404": 0.06, "not_image": 0.02}
NOISE_SHARES = {"default": SHARES, "web": WEB_SHARES}
NOISE_MODES = tuple(NOISE_SHARES)
WEB_ONLY_KINDS = [k for k in KINDS if k != "clean" and k != "many_texts" and k not in SHARES]  # ["weak"]
WEB_MIN_N = 500  # below it the web world's duplicates outnumber the clean originals they copy
WEB_ZIPF = (1.5, 1.2)  # shape and colour exponents of the web world (default: 1.1 and 0.9); see the docstring
DUP_URL_SHARE = 0.05  # clean images that come with a second (or third) alt-text

BOILERPLATE = ["image", "IMG_2041.JPG", "click to enlarge", "1920x1080", "alt_img", "untitled",
               "Photo", "thumbnail image", "DSC00417.jpg", "no description available"]
NON_ENGLISH = {
    "fr": ["un {c} {s} sur un fond blanc", "photo d'un {s} {c} dessiné à la main"],
    "de": ["ein {c} {s} auf weißem Hintergrund", "Foto von einem {c} {s} aus Papier"],
    "es": ["un {s} de color {c} sobre fondo blanco", "foto de un {s} {c} hecho a mano"],
    "it": ["un {s} {c} su sfondo bianco", "foto di un {s} {c} disegnato a mano"],
}
# translated shape/colour words for the non-English captions (a small glossary is enough for a demo)
_TR = {"fr": ({"circle": "cercle", "square": "carré", "star": "étoile"}, {"red": "rouge", "blue": "bleu"}),
       "de": ({"circle": "Kreis", "square": "Quadrat", "star": "Stern"}, {"red": "roter", "blue": "blauer"}),
       "es": ({"circle": "círculo", "square": "cuadrado", "star": "estrella"}, {"red": "rojo", "blue": "azul"}),
       "it": ({"circle": "cerchio", "square": "quadrato", "star": "stella"}, {"red": "rosso", "blue": "blu"})}

EVAL_PER_CLASS = 20
RETRIEVAL_IMAGES = 120
EVAL_SIDE = 224
EVAL_TEXTURES = ["striped", "checked", "gradient"]


# ---- drawing -------------------------------------------------------------------------------------------
def _zipf_weights(k: int, a: float) -> np.ndarray:
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


# ---- captions ------------------------------------------------------------------------------------------
# Alt-text as people and CMSs write it: a description of shape, colour and count, dressed with the words
# real alt-texts carry. Enough slots that two images rarely share a caption by chance (real boilerplate is
# the exception the align stage must find, not clean captions of popular concepts).
TEMPLATES = [
    "{pre}{count} {size}{colour} {shapes} on a {texture} {bg} background{post}",
    "{pre}{count} {size}{colour} {shapes} drawn on {texture} {bg} paper{post}",
    "{Colour} {shape} icon, {style} vector illustration on {bg}{post}",
    "{pre}a {size}{style} {colour} {shape} shape{post}",
    "close-up of {count} {size}{colour} {shape} {obj} on {bg} card{post}",
    "hand drawn {count} {colour} {shapes} isolated on {texture} {bg}{post}",
    "{pre}{count} {colour} {shapes} in a row on a {bg} wall{post}",
    "the {size}{colour} {shape} logo printed on {texture} {bg} fabric{post}",
    "cut-out paper {shapes} in {colour} on {bg}, {style} craft project for kids",
    "{pre}{count} {style} {colour} {shape} {obj} on a {texture} {bg} table{post}",
]
PREFIXES = ["", "", "", "photo of ", "picture of ", "image of ", "illustration of ", "drawing of ", "a photo of ",
            "stock photo of "]
SUFFIXES = ["", "", "", "", " - stock image", " | free clipart", ", high resolution", " for print", " (detail)",
            " in the center", " in the corner", " from above"]
SIZES = ["", "", "small ", "large ", "big ", "little ", "tiny ", "medium ", "bright ", "bold "]
STYLES = ["flat", "simple", "minimal", "modern", "retro", "cute", "classic", "colourful", "geometric", "plain"]
OBJECTS = ["sticker", "magnet", "badge", "button", "token", "coaster", "patch", "tile", "card", "decal"]
PLURAL_OBJ = {o: o + ("es" if o.endswith("ch") else "s") for o in OBJECTS}
TEXTURE_WORDS = {"plain": "plain", "striped": "striped", "dotted": "dotted", "gradient": "shaded",
                 "checked": "checkered", "noisy": "grainy"}
LONG_FILLER = ["best", "free", "download", "hd", "wallpaper", "cheap", "buy", "online", "sale", "new", "top",
               "quality", "vector", "clipart", "png", "icon", "design", "art", "print", "poster", "shop", "deal"]
JUNK = ["sku-88213", "zx9qv", "b7f3k2", "ref#4471x", "qqpzl", "x7y8z9w", "jjkkqq", "id_99821a", "wpx-00417", "zzkq8"]


def caption_for(shape: str, colour: str, count: int, bg: str, texture: str, rng: random.Random,
                min_words: int = 0) -> str:
    """An alt-text for the image; `min_words` asks for at least that many words (near-duplicates)."""
    while True:
        singular = count == 1
        text = rng.choice(TEMPLATES).format(
            pre=rng.choice(PREFIXES), post=rng.choice(SUFFIXES), size=rng.choice(SIZES), style=rng.choice(STYLES),
            obj=rng.choice(OBJECTS) if singular else PLURAL_OBJ[rng.choice(OBJECTS)],
            count="a" if singular else COUNT_WORDS[count], colour=colour, Colour=colour.capitalize(), shape=shape,
            shapes=shape if singular else PLURAL[shape], bg=bg, texture=TEXTURE_WORDS[texture],
        )
        text = re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)
        text = (text[0].upper() + text[1:]) if rng.random() < 0.3 else text
        if len(text.split()) >= min_words:
            return text


# Weak alt-text (the web world): true of the picture but saying little about it. The slots are common English
# words (wordfreq knows them: align's rare-token rule passes them) and the combinations many, so a caption is
# written afresh for each image and no rule for repeated alt-text catches it; only a CLIP score can.
WEAK_SEO = [
    "{adj} {item} for your {place}, {cta}",
    "{cta}: {adj} {item} at a great price",
    "our {adj} {item} collection, new this {season}",
    "{adj} {item} ideas for the {place}",
    "{item} for every {place}, {adj} and {adj2}",
]
WEAK_BACKGROUND = [
    "{texture} {bg} background{post}",
    "a {texture} {bg} backdrop for {use}",
    "close-up of a {texture} {bg} surface",
    "{bg} paper with a {texture} pattern{post}",
]
WEAK_COLOUR = [
    "shades of {colour} for {use}",
    "a touch of {colour} for your {place}",
    "{colour} is the colour of the {season}",
    "bright {colour} tones, {adj} and {adj2}",
    "the colour {colour} on {bg}",
]
WEAK_GENERIC = [
    "{count} simple {things} on a page",
    "a {adj} {style} graphic for {use}",
    "{style} design for {use}, {cta}",
    "a simple picture for {use}",
    "{count} {things} in a {style} style",
]
WEAK_SLOTS = {
    "adj": ["beautiful", "simple", "modern", "elegant", "cheap", "quality", "handmade", "lovely", "unique", "classic",
            "stylish", "affordable", "cute", "fresh"],
    "item": ["wall art", "home decor", "gift ideas", "party supplies", "craft supplies", "print designs", "posters",
             "greeting cards", "sticker packs", "school supplies", "office decor", "room decor", "gift wrap"],
    "place": ["living room", "bedroom", "office", "classroom", "kitchen", "nursery", "studio", "shop", "website",
              "blog", "home", "party"],
    "cta": ["shop now", "free shipping", "order today", "see more", "buy online", "learn more", "find out more",
            "available now", "save today"],
    "season": ["spring", "summer", "autumn", "winter", "season", "week", "month", "year"],
    "use": ["a school project", "your presentation", "a blog post", "kids crafts", "a birthday card",
            "print and web", "social media", "a poster", "your next project", "the holidays"],
    "post": ["", "", " texture", ", close up", " for your design", ", plain and simple", " pattern"],
}


def weak_caption_for(shape: str, colour: str, count: int, bg: str, texture: str, rng: random.Random) -> str:
    """A weakly aligned alt-text for the image: true, but never naming its shape (SEO phrase, background only,
    colour only, or "some shapes")."""
    del shape  # what makes it weak: the caption never says what the picture is of
    slot = {k: rng.choice(v) for k, v in WEAK_SLOTS.items()}
    slot["adj2"] = rng.choice([a for a in WEAK_SLOTS["adj"] if a != slot["adj"]])
    group = rng.choices([WEAK_SEO, WEAK_BACKGROUND, WEAK_COLOUR, WEAK_GENERIC], weights=[0.35, 0.25, 0.2, 0.2])[0]
    text = rng.choice(group).format(
        **slot, bg=bg, texture=TEXTURE_WORDS[texture], colour=colour, style=rng.choice(STYLES),
        count="one" if count == 1 else COUNT_WORDS[count], things="shape" if count == 1 else "shapes")
    text = re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)
    return (text[0].upper() + text[1:]) if rng.random() < 0.3 else text


# ---- the world -----------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, out: Path, seed: int):
        self.out, self.rng = out, random.Random(seed)
        self.img_dir = out / "www" / "img"
        self.rows: list[dict] = []
        self.n_files = 0
        self.shape_w = _zipf_weights(len(SHAPES), 1.1)
        self.colour_w = _zipf_weights(len(COLOURS), 0.9)

    def pick(self) -> tuple[str, str, int]:
        r = self.rng
        shape = SHAPES[int(np.searchsorted(np.cumsum(self.shape_w), r.random(), side="right").clip(0, len(SHAPES) - 1))]
        colour = list(COLOURS)[int(np.searchsorted(np.cumsum(self.colour_w), r.random(), side="right").clip(0, len(COLOURS) - 1))]
        count = r.choices([1, 2, 3, 4], weights=[0.55, 0.25, 0.12, 0.08])[0]
        return shape, colour, count

    def size(self) -> tuple[int, int]:
        r = self.rng
        w = r.randint(220, 360)
        h = int(w * r.uniform(0.6, 1.6))
        return w, max(210, h)

    def file(self, data: bytes, name: str | None = None) -> str:
        name = name or f"{self.n_files:06d}.jpg"
        self.n_files += 1
        (self.img_dir / name).write_bytes(data)
        return f"{HOST}/img/{name}"

    def add(self, url, caption, kind, shape="", colour="", count=0, eval_image_id=-1, dup_url=False, dup_of=None):
        self.rows.append({"url": url, "caption": caption, "kind": kind, "shape": shape, "colour": colour,
                          "count": count, "eval_image_id": eval_image_id, "dup_url": dup_url, "dup_of": dup_of})

    def image(self, shape, colour, count, size=None):
        w, h = size or self.size()
        im, bg, tex = render(shape, colour, count, w, h, self.rng)
        return jpeg(im, self.rng.randint(80, 92)), bg, tex


def _eval_sets(b: _Builder, out: Path) -> list[bytes]:
    """Held-out classification (balanced over shapes) and retrieval sets, drawn with their own seed."""
    rng = random.Random(b.rng.getrandbits(64))
    cls_rows, images = [], []
    for k in range(EVAL_PER_CLASS):
        for label_id, shape in enumerate(SHAPES):
            colour = rng.choice(list(COLOURS))
            # structured backgrounds: a perceptual hash of a flat image is mostly noise, and the eval set is
            # what decontamination compares against
            im, _, _ = render(shape, colour, rng.choice([1, 1, 2, 3]), EVAL_SIDE, EVAL_SIDE, rng,
                              texture=rng.choice(EVAL_TEXTURES))
            data = jpeg(im, 90)
            images.append(data)
            cls_rows.append({"image": data, "label": shape, "label_id": label_id, "width": EVAL_SIDE,
                             "height": EVAL_SIDE, "colour": colour})
    (out / "eval").mkdir(parents=True, exist_ok=True)
    cls = pa.Table.from_pylist(cls_rows)
    pq.write_table(cls.drop_columns(["colour"]), out / "eval" / "classification.parquet")
    # the same images labelled by colour: at demo scale a tiny CPU model learns colour long before shape
    # (captions name both, and colour alone tells most pairs in a batch apart), so this is the set where
    # curation shows first
    colours = cls.column("colour").to_pylist()
    names = list(COLOURS)
    pq.write_table(pa.table({"image": cls.column("image"), "label": colours,
                             "label_id": pa.array([names.index(c) for c in colours], pa.int32())}),
                   out / "eval" / "colours.parquet")
    (out / "eval" / "classnames.txt").write_text("\n".join(SHAPES) + "\n")
    ret_rows = []
    for _ in range(RETRIEVAL_IMAGES):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        count = rng.choice([1, 2, 3])
        im, bg, tex = render(shape, colour, count, EVAL_SIDE, EVAL_SIDE, rng)
        caps = [f"{'a' if count == 1 else COUNT_WORDS[count]} {colour} {shape if count == 1 else PLURAL[shape]} "
                f"on a {TEXTURE_WORDS[tex]} {bg} background", caption_for(shape, colour, count, bg, tex, rng)]
        ret_rows.append({"image": jpeg(im, 90), "captions": caps})
    pq.write_table(pa.Table.from_pylist(ret_rows), out / "eval" / "retrieval.parquet")
    return images


def _hq_set(b: _Builder, out: Path, n: int) -> None:
    """Clean pairs in the row schema, never in the pool (a DFN is trained on them)."""
    rng = random.Random(b.rng.getrandbits(64))
    rows = []
    for i in range(n):
        shape, colour, count = b.pick()
        w, h = rng.randint(220, 320), rng.randint(220, 320)
        im, bg, tex = render(shape, colour, count, w, h, rng)
        rows.append({"url": f"{HOST}/hq/{i:06d}.jpg", "text": caption_for(shape, colour, count, bg, tex, rng),
                     "image": jpeg(im, 90), "width": w, "height": h, "orig_width": w, "orig_height": h})
    t = pa.Table.from_pylist(rows)
    uid = compute_uid(t.column("url"), t.column("text"))
    t = t.add_column(0, "uid", uid)
    i32 = pa.int32()
    t = t.cast(pa.schema([("uid", pa.string()), ("url", pa.string()), ("text", pa.string()), ("image", pa.binary()),
                          ("width", i32), ("height", i32), ("orig_width", i32), ("orig_height", i32)]))
    pq.write_table(t, out / "hq.parquet")


def demo_config(n: int, eval_path: Path, noise: str = "default") -> str:
    """The pipeline config for a pool of n rows: web-scale thresholds scaled down (DESIGN.md, "Small pools").
    A web world (`noise="web"`) differs in one line: dfn keeps the papers' share, not 0.8."""
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)} (got {noise!r})")
    t = max(10, n // 100)
    shard = max(100, math.ceil(n / 6 / 100) * 100)

    def q(path: Path) -> str:  # a TOML basic string: JSON's escapes are TOML's (a path may hold " or \\)
        return json.dumps(path.as_posix())

    dfn_keep = ("keep_fraction = 0.8   # the pool is already curated twice by here; DFN papers keep 10-30% of raw pools"
                if noise == "default" else
                "keep_fraction = 0.3   # a web pool is mostly weak or mismatched pairs even after align: DataComp's "
                "CLIP-score baseline keeps 30%")
    return f"""# Demo config, written by `clipcurate demo-world` for a pool of {n} URL rows.
# The papers' thresholds assume web-scale pools; here they are scaled to the pool (DESIGN.md, "Small pools").
[run]
seed = 0

[ingest]
shard_size = {shard}   # {math.ceil(n / shard)} shards, so the stages have several to spread over workers
processes = 2
threads = 16

[align]
max_texts_per_image = 20   # ALIGN: 1,000 at 1.8B pairs
max_images_per_text = 10   # ALIGN's value works here too: boilerplate repeats far more often
eval_images = {q(eval_path)}

[metaclip]
t = {t}   # MetaCLIP: 20,000 at 400M pairs; here n/100, about the 25th percentile of the demo's entry counts

[dfn]
{dfn_keep}

[emit]
samples_per_shard = 1000

[train]
steps = 300        # the tiny model (64 px ViT) on CPU: ~3 steps/s at batch 64 on 2 cores
batch_size = 64
workers = 1
save_every = 100
log_every = 10
eval_sets = [{q(eval_path.parent / "classification.parquet")}, {q(eval_path.parent / "colours.parquet")},
             {q(eval_path.parent / "retrieval.parquet")}]
"""


def kind_counts(n: int, noise: str = "default") -> dict[str, int]:
    """Rows per kind for a world of n rows, before the eval-copy cap: round(n * share) per kind of the mode's
    table, many_texts a fixed block, clean the rest."""
    counts = {k: int(round(n * s)) for k, s in NOISE_SHARES[noise].items()}
    counts["many_texts"] = max(25, min(60, n // 50))
    counts["clean"] = n - sum(counts.values())
    return counts


def _generator_key(n: int, seed: int, noise: str = "default") -> dict:
    """Everything the world's bytes are a function of, but its place: n, seed, noise, this module's code, and the
    encoders' versions (Pillow's PNG/JPEG, pyarrow's Parquet). config.toml, which names the eval set by absolute
    path, is checked against `demo_config` instead."""
    import PIL

    return {"n": n, "seed": seed, "noise": noise, "pillow": PIL.__version__, "pyarrow": pa.__version__,
            "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}


def _file_digests(out: Path) -> dict[str, str]:
    """sha256 of every file of the world (world.json, the record itself, and config.toml, which depends on where
    the world is, aside)."""
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(out.rglob("*")) if f.is_file() and str(f.relative_to(out)) not in ("world.json", "config.toml")}


def _up_to_date(out: Path, key: dict) -> dict | None:
    """world.json, when the world under `out` is exactly what `make_world` would write now: the same generator
    key, and every file there with the recorded bytes (none missing, none added)."""
    try:
        summary = json.loads((out / "world.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("generator") != key or not summary.get("files"):
        return None
    try:
        config = (out / "config.toml").read_text()
    except OSError:
        return None
    if config != demo_config(int(summary.get("rows", -1)), (out / "eval" / "classification.parquet").resolve(),
                             key["noise"]):
        return None
    return summary if _file_digests(out) == summary["files"] else None


def make_world(out: str | Path, n: int = 3000, seed: int = 0, noise: str = "default") -> dict:
    """Write the demo world for about `n` URL rows under `out` (replacing one already there). A world already
    there exactly as it would be written (world.json's generator key and file digests) is left untouched, so
    that a second `make demo` finds every input with its bytes and its mtime unchanged: summary["unchanged"].
    `noise`: "default" (SHARES) or "web" (WEB_SHARES: as noisy as a raw crawl; see the module docstring)."""
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)} (got {noise!r})")
    if n < 200:
        raise ValueError(f"demo world needs n >= 200 (got {n}): every noise kind needs a few rows")
    if noise == "web" and n < WEB_MIN_N:
        raise ValueError(f"the web demo world needs n >= {WEB_MIN_N} (got {n}): its duplicates need enough clean "
                         "originals")
    out = Path(out)
    key = _generator_key(n, seed, noise)
    prior = _up_to_date(out, key)
    if prior is not None:
        log.info("demo world under %s is up to date: not rewritten", out)
        return {**prior, "unchanged": True}
    for sub in ("www", "eval"):
        shutil.rmtree(out / sub, ignore_errors=True)
    b = _Builder(out, seed)
    b.img_dir.mkdir(parents=True, exist_ok=True)
    rng = b.rng

    eval_images = _eval_sets(b, out)
    _hq_set(b, out, max(300, n // 3))
    # everything the noise mode changes comes after the eval and HQ sets: they are the same in every mode
    if noise == "web":
        b.shape_w = _zipf_weights(len(SHAPES), WEB_ZIPF[0])
        b.colour_w = _zipf_weights(len(COLOURS), WEB_ZIPF[1])

    counts = kind_counts(n, noise)
    counts["eval_copy"] = min(counts["eval_copy"], len(eval_images))  # a copy per eval image at most
    counts["clean"] = n - sum(v for k, v in counts.items() if k != "clean")
    n_clean_images = int(counts["clean"] / (1 + DUP_URL_SHARE * 1.5))

    # clean images, some with a second or third alt-text
    clean: list[tuple[str, str, str, int, str, str, bytes]] = []
    for _ in range(n_clean_images):
        shape, colour, count = b.pick()
        data, bg, tex = b.image(shape, colour, count)
        url = b.file(data)
        clean.append((url, shape, colour, count, bg, tex, data))
        b.add(url, caption_for(shape, colour, count, bg, tex, rng), "clean", shape, colour, count)
    extra = counts["clean"] - n_clean_images
    for url, shape, colour, count, bg, tex, _ in rng.sample(clean, min(extra, len(clean))):
        b.add(url, caption_for(shape, colour, count, bg, tex, rng), "clean", shape, colour, count, dup_url=True)
    taken = {r["url"] for r in b.rows if r["dup_url"]}
    for r in b.rows:
        if r["url"] in taken:
            r["dup_url"] = True
    # duplicates come from clean images with one alt-text (so a duplicate is one, not a third caption)
    singles = [c for c in clean if c[0] not in taken]
    rng.shuffle(singles)

    # boilerplate: every string on many different images
    n_strings = max(1, min(len(BOILERPLATE), counts["boilerplate"] // 12))  # each on > 10 images
    for i in range(counts["boilerplate"]):
        shape, colour, count = b.pick()
        data, _, _ = b.image(shape, colour, count)
        b.add(b.file(data), BOILERPLATE[i % n_strings], "boilerplate", shape, colour, count)

    # one image, a few mirror URLs, very many alt-texts
    shape, colour, count = b.pick()
    data, bg, tex = b.image(shape, colour, count)
    mirrors = [b.file(data) for _ in range(3)]
    seen: set[str] = set()
    i = 0
    while i < counts["many_texts"]:
        cap = caption_for(shape, colour, count, bg, tex, rng) + rng.choice(["", " | shop", " - free download", " (new)", " #art"]) + (
            f" {rng.choice(LONG_FILLER)}" if rng.random() < 0.7 else "")
        if cap in seen:
            continue
        seen.add(cap)
        b.add(mirrors[i % 3], cap, "many_texts", shape, colour, count)
        i += 1

    # mismatched: a fluent caption written for another image
    for _ in range(counts["mismatched"]):
        shape, colour, count = b.pick()
        data, bg, tex = b.image(shape, colour, count)
        o_shape, o_colour = shape, colour
        while o_shape == shape or o_colour == colour:
            o_shape, o_colour, _ = b.pick()
            if rng.random() < 0.5:
                o_shape = rng.choice(SHAPES)
        b.add(b.file(data), caption_for(o_shape, o_colour, count, bg, tex, rng), "mismatched", shape, colour, count)

    # weak (web world only): true of the picture but saying little about it, each worded afresh
    weak_seen: set[str] = set()
    for _ in range(counts.get("weak", 0)):
        shape, colour, count = b.pick()
        data, bg, tex = b.image(shape, colour, count)
        for _try in range(50):
            cap = weak_caption_for(shape, colour, count, bg, tex, rng)
            if cap not in weak_seen:
                break
        weak_seen.add(cap)
        b.add(b.file(data), cap, "weak", shape, colour, count)

    # exact duplicates: same bytes at a mirror URL, same caption up to case and spacing
    src = iter(singles)
    for _ in range(counts["exact_duplicate"]):
        url, shape, colour, count, bg, tex, data = next(src)
        row = next(r for r in b.rows if r["url"] == url)
        cap = row["caption"]
        variant = rng.choice([cap, cap.upper(), cap.lower(), "  " + cap.replace(" ", "  ") + " "])
        b.add(b.file(data), variant, "exact_duplicate", shape, colour, count, dup_of=(url, cap))
        row["dup_of"] = (url, cap)

    # near duplicates: same bytes at a mirror URL, caption lightly edited (one word added)
    for _ in range(counts["near_duplicate"]):
        url, shape, colour, count, bg, tex, data = next(src)
        row = next(r for r in b.rows if r["url"] == url)
        # one word added to a caption of >= 10 distinct words: Jaccard >= 10/11 on word sets, well above the
        # 0.8 threshold, so the MinHash estimate's noise rarely hides it
        while len(set(w.lower() for w in row["caption"].split())) < 10:
            row["caption"] = caption_for(shape, colour, count, bg, tex, rng, min_words=10)
        words = row["caption"].split()
        pos = rng.randint(1, len(words))
        extra = rng.choice([w for w in ["HD", "free", "new", "nice", "original", "great"] if w.lower() not in
                            {x.lower() for x in words}])
        edited = " ".join(words[:pos] + [extra] + words[pos:])
        b.add(b.file(data), edited, "near_duplicate", shape, colour, count, dup_of=(url, row["caption"]))
        row["dup_of"] = (url, row["caption"])

    for _ in range(counts["too_short"]):
        shape, colour, count = b.pick()
        data, _, _ = b.image(shape, colour, count)
        cap = rng.choice([shape, f"{colour} {shape}", PLURAL[shape].capitalize(), f"{shape}!"])
        b.add(b.file(data), cap, "too_short", shape, colour, count)

    for _ in range(counts["too_long"]):
        shape, colour, count = b.pick()
        data, bg, tex = b.image(shape, colour, count)
        base = caption_for(shape, colour, count, bg, tex, rng)
        soup = " ".join(rng.sample(LONG_FILLER, rng.randint(14, 20)))
        b.add(b.file(data), f"{base} {soup} {colour} {shape}", "too_long", shape, colour, count)

    for _ in range(counts["rare_token"]):
        shape, colour, count = b.pick()
        data, bg, tex = b.image(shape, colour, count)
        words = caption_for(shape, colour, count, bg, tex, rng).split()
        words.insert(rng.randint(1, len(words)), rng.choice(JUNK) + rng.choice("abcdefghk") + str(rng.randint(10, 99)))
        b.add(b.file(data), " ".join(words), "rare_token", shape, colour, count)

    for _ in range(counts["small_image"]):
        shape, colour, count = b.pick()
        side = rng.randint(48, 180)
        data, bg, tex = b.image(shape, colour, count, (side, max(48, int(side * rng.uniform(0.8, 1.25)))))
        b.add(b.file(data), caption_for(shape, colour, count, bg, tex, rng), "small_image", shape, colour, count)

    for _ in range(counts["odd_aspect"]):
        shape, colour, count = b.pick()
        h = rng.randint(200, 240)
        w = int(h * rng.uniform(3.3, 5.0))
        size = (w, h) if rng.random() < 0.7 else (h, w)
        data, bg, tex = b.image(shape, colour, count, size)
        b.add(b.file(data), caption_for(shape, colour, count, bg, tex, rng), "odd_aspect", shape, colour, count)

    langs = list(NON_ENGLISH)
    for i in range(counts["non_english"]):
        lang = langs[i % len(langs)]
        shapes_tr, colours_tr = _TR[lang]
        shape, colour = rng.choice(list(shapes_tr)), rng.choice(list(colours_tr))
        data, _, _ = b.image(shape, colour, 1)
        cap = rng.choice(NON_ENGLISH[lang]).format(s=shapes_tr[shape], c=colours_tr[colour])
        b.add(b.file(data), cap, "non_english", shape, colour, 1)

    # copies of held-out eval images: resized up or down (>= 200 px) and re-encoded
    for eval_id in rng.sample(range(len(eval_images)), counts["eval_copy"]):
        with Image.open(io.BytesIO(eval_images[eval_id])) as im:
            side = rng.randint(200, 400)
            copy = im.convert("RGB").resize((side, side), Image.BICUBIC)
        shape = SHAPES[eval_id % len(SHAPES)]
        b.add(b.file(jpeg(copy, rng.randint(75, 95))), f"{rng.choice(['a', 'one'])} {shape} on a background, free image",
              "eval_copy", shape, "", 0, eval_image_id=eval_id)

    for i in range(counts["http_404"]):
        shape, colour, count = b.pick()
        b.add(f"{HOST}/img/gone-{i:05d}.jpg", caption_for(shape, colour, count, "white", "plain", rng), "http_404",
              shape, colour, count)
    for i in range(counts["not_image"]):
        name = f"page-{i:05d}.jpg"
        (b.img_dir / name).write_bytes(b"<!doctype html><html><head><title>Not found</title></head>"
                                       b"<body><h1>Sorry, this page has moved</h1></body></html>\n")
        shape, colour, count = b.pick()
        b.add(f"{HOST}/img/{name}", caption_for(shape, colour, count, "white", "plain", rng), "not_image",
              shape, colour, count)

    # (url, caption) pairs are unique (a repeat would be the same uid twice); shuffle like a crawl dump
    uniq, keys = [], set()
    for r in b.rows:
        if (r["url"], r["caption"]) not in keys:
            keys.add((r["url"], r["caption"]))
            uniq.append(r)
    rng.shuffle(uniq)
    # a duplicate pair shares `dup_group` (the original's uid): align must drop exactly one of the two
    for r in uniq:
        r["dup_group"] = r.pop("dup_of")
    truth = pa.Table.from_pylist([{**r, "dup_group": None} for r in uniq])
    truth = truth.append_column("uid", compute_uid(truth.column("url"), truth.column("caption")))
    groups = [r["dup_group"] for r in uniq]
    g_urls = pa.array([g[0] if g else None for g in groups], pa.string())
    g_caps = pa.array([g[1] if g else None for g in groups], pa.string())
    g_uid = compute_uid(pa.array([u or "" for u in g_urls.to_pylist()]), pa.array([c or "" for c in g_caps.to_pylist()]))
    truth = truth.set_column(truth.schema.get_field_index("dup_group"), "dup_group",
                             pa.compute.if_else(pa.compute.is_null(g_urls), pa.nulls(len(groups), pa.string()), g_uid))
    truth = truth.cast(truth.schema.set(truth.schema.get_field_index("count"), pa.field("count", pa.int32()))
                       .set(truth.schema.get_field_index("eval_image_id"), pa.field("eval_image_id", pa.int32())))
    pq.write_table(truth.select(["url", "caption"]), out / "urls.parquet")
    pq.write_table(truth.select(["url", "caption", "uid", "kind", "shape", "colour", "count", "eval_image_id",
                                 "dup_url", "dup_group"]), out / "truth.parquet")
    (out / "config.toml").write_text(demo_config(truth.num_rows, (out / "eval" / "classification.parquet").resolve(),
                                                 noise))

    kinds = truth.column("kind").to_pylist()
    summary = {
        "n": n, "seed": seed, "noise": noise, "rows": truth.num_rows, "host": DEMO_HOST, "images_served": b.n_files,
        "counts": {k: kinds.count(k) for k in KINDS},
        "dup_url_rows": int(sum(truth.column("dup_url").to_pylist())),
        "classnames": SHAPES, "eval_classification": len(eval_images), "eval_retrieval": RETRIEVAL_IMAGES,
        "hq": max(300, n // 3),
    }
    summary["generator"], summary["files"] = key, _file_digests(out)
    (out / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("demo world: %d URL rows, %d images under %s", truth.num_rows, b.n_files, out)
    return summary
