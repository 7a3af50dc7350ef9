"""The world's held-out sets: zero-shot classification (by shape and by colour) and retrieval (`eval/`), and the
small clean, high-quality set a DFN is trained on (`hq.parquet`). Each is drawn from its own stream, seeded from
the builder's, before anything the noise mode changes: they are the same in every mode."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from demo.builder import HOST, Builder
from demo.captions import TEXTURE_WORDS, caption_for
from demo.draw import COLOURS, COUNT_WORDS, PLURAL, SHAPES, jpeg, render
from pipeline.schema import compute_uid

EVAL_PER_CLASS = 20
RETRIEVAL_IMAGES = 120
EVAL_SIDE = 224
EVAL_TEXTURES = ["striped", "checked", "gradient"]


def eval_sets(b: Builder, out: Path) -> list[bytes]:
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


def hq_set(b: Builder, out: Path, n: int) -> None:
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
