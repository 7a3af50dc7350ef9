"""The rows of each noise kind (demo/world.py's docstring says what each is), one function a kind.

Each draws from the builder's one random stream, so the world's bytes depend on the order they are called in:
`demo.world._draw_rows` calls them in the order the world has always drawn them.
"""

from __future__ import annotations

import io
from typing import Iterator

from PIL import Image

from demo.builder import HOST, Builder
from demo.captions import (BOILERPLATE, JUNK, LONG_FILLER, NON_ENGLISH, TRANSLATED, caption_for, paraphrase,
                           weak_caption_for)
from demo.composition import clean_images
from demo.draw import PLURAL, SHAPES, jpeg, redraw

# a clean image that duplicates may copy: (url, shape, colour, count, background, texture, jpeg bytes)
Original = tuple[str, str, str, int, str, str, bytes]


def clean(b: Builder, n: int) -> list[Original]:
    """n clean rows: images with a caption that describes them, some with a second or third alt-text
    (`dup_url`). Returns the clean images with one alt-text, shuffled: the originals duplicates copy (so that a
    duplicate is one, not a third caption)."""
    rng = b.rng
    n_images = clean_images(n)
    images: list[Original] = []
    for _ in range(n_images):
        shape, colour, count = b.pick()
        data, bg, tex = b.image(shape, colour, count)
        url = b.file(data)
        images.append((url, shape, colour, count, bg, tex, data))
        b.add(url, caption_for(shape, colour, count, bg, tex, rng), "clean", shape, colour, count)
    extra = n - n_images
    for url, shape, colour, count, bg, tex, _ in rng.sample(images, min(extra, len(images))):
        b.add(url, caption_for(shape, colour, count, bg, tex, rng), "clean", shape, colour, count, dup_url=True)
    taken = {r["url"] for r in b.rows if r["dup_url"]}
    for r in b.rows:
        if r["url"] in taken:
            r["dup_url"] = True
    singles = [c for c in images if c[0] not in taken]
    rng.shuffle(singles)
    return singles


def boilerplate(b: Builder, n: int) -> None:
    """Every boilerplate string on many different images (each on > 10)."""
    n_strings = max(1, min(len(BOILERPLATE), n // 12))
    for i in range(n):
        shape, colour, count = b.pick()
        data, _, _ = b.image(shape, colour, count)
        b.add(b.file(data), BOILERPLATE[i % n_strings], "boilerplate", shape, colour, count)


def many_texts(b: Builder, n: int) -> None:
    """One image, a few mirror URLs, n different alt-texts."""
    rng = b.rng
    shape, colour, count = b.pick()
    data, bg, tex = b.image(shape, colour, count)
    mirrors = [b.file(data) for _ in range(3)]
    seen: set[str] = set()
    i = 0
    while i < n:
        cap = caption_for(shape, colour, count, bg, tex, rng) + rng.choice(["", " | shop", " - free download", " (new)", " #art"]) + (
            f" {rng.choice(LONG_FILLER)}" if rng.random() < 0.7 else "")
        if cap in seen:
            continue
        seen.add(cap)
        b.add(mirrors[i % 3], cap, "many_texts", shape, colour, count)
        i += 1


def mismatched(b: Builder, n: int) -> None:
    """A fluent caption written for another image."""
    rng = b.rng
    for _ in range(n):
        shape, colour, count = b.pick()
        data, bg, tex = b.image(shape, colour, count)
        o_shape, o_colour = shape, colour
        while o_shape == shape or o_colour == colour:
            o_shape, o_colour, _ = b.pick()
            if rng.random() < 0.5:
                o_shape = rng.choice(SHAPES)
        b.add(b.file(data), caption_for(o_shape, o_colour, count, bg, tex, rng), "mismatched", shape, colour, count)


def weak(b: Builder, n: int) -> None:
    """(web world only) true of the picture but saying little about it, each worded afresh."""
    seen: set[str] = set()
    for _ in range(n):
        shape, colour, count = b.pick()
        data, bg, tex = b.image(shape, colour, count)
        for _try in range(50):
            cap = weak_caption_for(shape, colour, count, bg, tex, b.rng)
            if cap not in seen:
                break
        seen.add(cap)
        b.add(b.file(data), cap, "weak", shape, colour, count)


def exact_duplicates(b: Builder, n: int, originals: Iterator[Original]) -> None:
    """The same bytes at a mirror URL, the same caption up to case and spacing."""
    rng = b.rng
    for _ in range(n):
        url, shape, colour, count, bg, tex, data = next(originals)
        row = next(r for r in b.rows if r["url"] == url)
        cap = row["caption"]
        variant = rng.choice([cap, cap.upper(), cap.lower(), "  " + cap.replace(" ", "  ") + " "])
        b.add(b.file(data), variant, "exact_duplicate", shape, colour, count, dup_of=(url, cap))
        row["dup_of"] = (url, cap)


def near_duplicates(b: Builder, n: int, originals: Iterator[Original]) -> None:
    """The same bytes at a mirror URL, the caption lightly edited (one word added)."""
    rng = b.rng
    for _ in range(n):
        url, shape, colour, count, bg, tex, data = next(originals)
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


def semantic_duplicates(b: Builder, n: int, originals: Iterator[Original]) -> None:
    """(web world only) The same scene again at a URL of its own: the original's picture re-framed, re-sized,
    sometimes re-coloured and re-encoded (`draw.redraw`), its caption paraphrased (`captions.paraphrase`). Bytes
    and words differ, the content does not: what align's hashes and MinHash miss and a semantic dedup should
    find. The truth records the group as for the other duplicates (`dup_group`: the original's uid, on both)."""
    rng = b.rng
    for _ in range(n):
        url, shape, colour, count, bg, tex, data = next(originals)
        row = next(r for r in b.rows if r["url"] == url)
        b.add(b.file(redraw(data, rng)), paraphrase(row["caption"], rng), "semantic_duplicate", shape, colour, count,
              dup_of=(url, row["caption"]))
        row["dup_of"] = (url, row["caption"])


def too_short(b: Builder, n: int) -> None:
    rng = b.rng
    for _ in range(n):
        shape, colour, count = b.pick()
        data, _, _ = b.image(shape, colour, count)
        cap = rng.choice([shape, f"{colour} {shape}", PLURAL[shape].capitalize(), f"{shape}!"])
        b.add(b.file(data), cap, "too_short", shape, colour, count)


def too_long(b: Builder, n: int) -> None:
    rng = b.rng
    for _ in range(n):
        shape, colour, count = b.pick()
        data, bg, tex = b.image(shape, colour, count)
        base = caption_for(shape, colour, count, bg, tex, rng)
        soup = " ".join(rng.sample(LONG_FILLER, rng.randint(14, 20)))
        b.add(b.file(data), f"{base} {soup} {colour} {shape}", "too_long", shape, colour, count)


def rare_token(b: Builder, n: int) -> None:
    rng = b.rng
    for _ in range(n):
        shape, colour, count = b.pick()
        data, bg, tex = b.image(shape, colour, count)
        words = caption_for(shape, colour, count, bg, tex, rng).split()
        words.insert(rng.randint(1, len(words)), rng.choice(JUNK) + rng.choice("abcdefghk") + str(rng.randint(10, 99)))
        b.add(b.file(data), " ".join(words), "rare_token", shape, colour, count)


def small_image(b: Builder, n: int) -> None:
    rng = b.rng
    for _ in range(n):
        shape, colour, count = b.pick()
        side = rng.randint(48, 180)
        data, bg, tex = b.image(shape, colour, count, (side, max(48, int(side * rng.uniform(0.8, 1.25)))))
        b.add(b.file(data), caption_for(shape, colour, count, bg, tex, rng), "small_image", shape, colour, count)


def odd_aspect(b: Builder, n: int) -> None:
    rng = b.rng
    for _ in range(n):
        shape, colour, count = b.pick()
        h = rng.randint(200, 240)
        w = int(h * rng.uniform(3.3, 5.0))
        size = (w, h) if rng.random() < 0.7 else (h, w)
        data, bg, tex = b.image(shape, colour, count, size)
        b.add(b.file(data), caption_for(shape, colour, count, bg, tex, rng), "odd_aspect", shape, colour, count)


def non_english(b: Builder, n: int) -> None:
    rng = b.rng
    langs = list(NON_ENGLISH)
    for i in range(n):
        lang = langs[i % len(langs)]
        shapes_tr, colours_tr = TRANSLATED[lang]
        shape, colour = rng.choice(list(shapes_tr)), rng.choice(list(colours_tr))
        data, _, _ = b.image(shape, colour, 1)
        cap = rng.choice(NON_ENGLISH[lang]).format(s=shapes_tr[shape], c=colours_tr[colour])
        b.add(b.file(data), cap, "non_english", shape, colour, 1)


def eval_copies(b: Builder, n: int, eval_images: list[bytes]) -> None:
    """Copies of held-out eval images: resized up or down (>= 200 px) and re-encoded."""
    rng = b.rng
    for eval_id in rng.sample(range(len(eval_images)), n):
        with Image.open(io.BytesIO(eval_images[eval_id])) as im:
            side = rng.randint(200, 400)
            copy = im.convert("RGB").resize((side, side), Image.BICUBIC)
        shape = SHAPES[eval_id % len(SHAPES)]
        b.add(b.file(jpeg(copy, rng.randint(75, 95))), f"{rng.choice(['a', 'one'])} {shape} on a background, free image",
              "eval_copy", shape, "", 0, eval_image_id=eval_id)


def dead_links(b: Builder, n_404: int, n_not_image: int) -> None:
    """URLs that do not exist (http_404), and URLs that serve an HTML page under a .jpg name (not_image)."""
    rng = b.rng
    for i in range(n_404):
        shape, colour, count = b.pick()
        b.add(f"{HOST}/img/gone-{i:05d}.jpg", caption_for(shape, colour, count, "white", "plain", rng), "http_404",
              shape, colour, count)
    for i in range(n_not_image):
        name = f"page-{i:05d}.jpg"
        (b.img_dir / name).write_bytes(b"<!doctype html><html><head><title>Not found</title></head>"
                                       b"<body><h1>Sorry, this page has moved</h1></body></html>\n")
        shape, colour, count = b.pick()
        b.add(f"{HOST}/img/{name}", caption_for(shape, colour, count, "white", "plain", rng), "not_image",
              shape, colour, count)
