"""The world's builder: its one random stream, the images it serves (`www/img/`) and the rows of its URL list,
as the noise kinds (`demo/kinds.py`) and the held-out sets (`demo/sets.py`) draw them."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from demo.draw import COLOURS, SHAPES, jpeg, render, zipf_weights
from stages.ingest.serve import DEMO_HOST

HOST = f"http://{DEMO_HOST}"


class Builder:
    def __init__(self, out: Path, seed: int):
        self.out, self.rng = out, random.Random(seed)
        self.img_dir = out / "www" / "img"
        self.rows: list[dict] = []
        self.n_files = 0
        self.shape_w = zipf_weights(len(SHAPES), 1.1)
        self.colour_w = zipf_weights(len(COLOURS), 0.9)

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
