"""The demo world: a seeded, synthetic web crawl with the noise real crawls have, labelled.

What it writes (`make_world(out)`; `clipcurate demo-world OUT`):

  urls.parquet                 url, caption: the crawl list ingest reads (shuffled, like a real dump)
  www/img/*.jpg                what the URLs serve (stages/ingest/serve.py proxies demo.clipcurate.invalid to it);
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
  config-text-first.toml       the same, for the text-first recipe (stages/recipes/text-first.toml)
  config-balance-last.toml     the same, for the balance-last recipe (stages/recipes/balance-last.toml)
  config-semdedup.toml         the same, for the semdedup recipe (stages/recipes/semdedup.toml)
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
  semantic_duplicate  (web mode only) the same scene again: a clean image re-framed (a shift and a zoom), re-sized,
                   sometimes re-coloured, re-encoded, at a URL of its own, with its caption paraphrased. Neither
                   a hash of its bytes nor caption MinHash ties it to its original, and a dHash rarely does (4-7%
                   within align's 6 bits); its `dup_group` does (the original's uid, as for the other
                   duplicates). SemDeDup's kind.
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
           kind, so that every rule of every stage has something to find. Its files are what the module wrote
           before the web mode existed, byte for byte (tests/test_demo_world_web.py holds their digests).
  web      the composition in WEB_SHARES (demo/composition.py: the table of shares and the sources each rests
           on): as noisy as a raw web crawl, where most pairs are weakly aligned or mismatched and a good curation
           keeps 10-30%. n >= WEB_MIN_N (the duplicate kinds need enough clean originals).

The evaluation sets (eval/*) are identical to the default world's for the same seed, and the HQ set
(hq.parquet) for the same seed and n: they are drawn before anything the noise mode changes, from the same
random stream. A web world's config.toml asks dfn for `keep_fraction = 0.3` (DataComp's CLIP-score baseline,
see demo/composition.py) instead of 0.8: most of what reaches dfn here is weak or mismatched.

The package: `composition.py` (kinds and shares), `draw.py` (images), `captions.py` (alt-texts), `builder.py` (the
random stream, the files served, the rows), `kinds.py` (the rows of each noise kind), `sets.py` (eval and HQ
sets), `config.py` (config.toml), this module (the world, in its steps), `cli.py` (`clipcurate demo-world`,
registered through the `clipcurate.commands` entry point: the spine does not import this package).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq

from demo import kinds, sets
from demo.builder import Builder
from demo.captions import BOILERPLATE
from demo.composition import (KINDS, MIN_N, NOISE_MODES, SHARES, WEB_MIN_N, WEB_ONLY_KINDS, WEB_SHARES,
                              WEB_ZIPF, clean_originals, kind_counts)
from demo.config import RECIPES, config_file, demo_config
from demo.draw import COLOURS, SHAPES, zipf_weights
from demo.sets import RETRIEVAL_IMAGES
from pipeline.schema import compute_uid
from stages.ingest.serve import DEMO_HOST

__all__ = ["make_world", "demo_config", "kind_counts", "KINDS", "SHARES", "WEB_SHARES", "WEB_ONLY_KINDS", "WEB_MIN_N",
           "NOISE_MODES", "SHAPES", "COLOURS", "BOILERPLATE"]

log = logging.getLogger("clipcurate.demo_world")

_HERE = Path(__file__).resolve().parent
_NOT_THE_WORLD = {"cli.py"}  # modules of this package the world's bytes do not depend on


def _code_digest() -> str:
    """sha256 of the modules the world's bytes come from (every module of this package but the command line)."""
    h = hashlib.sha256()
    for f in sorted(_HERE.glob("*.py")):
        if f.name not in _NOT_THE_WORLD:
            h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def _generator_key(n: int, seed: int, noise: str = "default") -> dict:
    """Everything the world's bytes are a function of, but its place: n, seed, noise, this package's code, and the
    encoders' versions (Pillow's PNG/JPEG, pyarrow's Parquet). config.toml, which names the eval set by absolute
    path, is checked against `demo_config` instead."""
    import PIL

    return {"n": n, "seed": seed, "noise": noise, "pillow": PIL.__version__, "pyarrow": pa.__version__,
            "code": _code_digest()}


def _file_digests(out: Path) -> dict[str, str]:
    """sha256 of every file of the world (world.json, the record itself, and the config files, which depend on
    where the world is, aside)."""
    aside = {"world.json", *(config_file(r) for r in RECIPES)}
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(out.rglob("*")) if f.is_file() and str(f.relative_to(out)) not in aside}


def _write_configs(out: Path, rows: int, noise: str) -> None:
    """config.toml (the default recipe) and config-<recipe>.toml for the other recipes (stages/recipes/)."""
    for r in RECIPES:
        (out / config_file(r)).write_text(demo_config(rows, (out / "eval" / "classification.parquet").resolve(), noise, r))


def _up_to_date(out: Path, key: dict) -> dict | None:
    """world.json, when the world under `out` is exactly what `make_world` would write now: the same generator
    key, and every file there with the recorded bytes (none missing, none added)."""
    try:
        summary = json.loads((out / "world.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("generator") != key or not summary.get("files"):
        return None
    for r in RECIPES:
        try:
            config = (out / config_file(r)).read_text()
        except OSError:
            return None
        if config != demo_config(int(summary.get("rows", -1)), (out / "eval" / "classification.parquet").resolve(),
                                 key["noise"], r):
            return None
    return summary if _file_digests(out) == summary["files"] else None



def _check_args(n: int, noise: str) -> None:
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)} (got {noise!r})")
    if n < MIN_N:
        raise ValueError(f"demo world needs n >= {MIN_N} (got {n}): every noise kind needs a few rows")
    if noise == "web" and n < WEB_MIN_N:
        raise ValueError(f"the web demo world needs n >= {WEB_MIN_N} (got {n}): its duplicates need enough clean "
                         "originals")


def _hq_size(n: int) -> int:
    return max(300, n // 3)


def make_world(out: str | Path, n: int = 3000, seed: int = 0, noise: str = "default") -> dict:
    """Write the demo world for about `n` URL rows under `out` (replacing one already there). A world already
    there exactly as it would be written (world.json's generator key and file digests) is left untouched, so
    that a second `make demo` finds every input with its bytes and its mtime unchanged: summary["unchanged"].
    `noise`: "default" (SHARES) or "web" (WEB_SHARES: as noisy as a raw crawl; see demo/composition.py)."""
    _check_args(n, noise)
    out = Path(out)
    key = _generator_key(n, seed, noise)
    prior = _up_to_date(out, key)
    if prior is not None:
        log.info("demo world under %s is up to date: not rewritten", out)
        return {**prior, "unchanged": True}
    for sub in ("www", "eval"):
        shutil.rmtree(out / sub, ignore_errors=True)
    b = Builder(out, seed)
    b.img_dir.mkdir(parents=True, exist_ok=True)

    eval_images = sets.eval_sets(b, out)
    sets.hq_set(b, out, _hq_size(n))
    # everything the noise mode changes comes after the eval and HQ sets: they are the same in every mode
    if noise == "web":
        b.shape_w = zipf_weights(len(SHAPES), WEB_ZIPF[0])
        b.colour_w = zipf_weights(len(COLOURS), WEB_ZIPF[1])
    _draw_rows(b, _final_counts(n, noise, len(eval_images)), eval_images)

    truth = _truth_table(b)
    pq.write_table(truth.select(["url", "caption"]), out / "urls.parquet")
    pq.write_table(truth.select(["url", "caption", "uid", "kind", "shape", "colour", "count", "eval_image_id",
                                 "dup_url", "dup_group"]), out / "truth.parquet")
    _write_configs(out, truth.num_rows, noise)
    summary = _summary(n, seed, noise, truth, b, len(eval_images))
    summary["generator"], summary["files"] = key, _file_digests(out)
    (out / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("demo world: %d URL rows, %d images under %s", truth.num_rows, b.n_files, out)
    return summary


def _final_counts(n: int, noise: str, n_eval_images: int) -> dict[str, int]:
    """kind_counts, with a copy per eval image at most, and semantic duplicates no more than the clean originals
    the exact and near ones leave (one each; clean takes the rest, so each one given up is a clean row more)."""
    counts = kind_counts(n, noise)
    counts["eval_copy"] = min(counts["eval_copy"], n_eval_images)
    counts["clean"] = n - sum(v for k, v in counts.items() if k != "clean")
    while counts.get("semantic_duplicate", 0) > 0 and clean_originals(counts["clean"]) < (
            counts["exact_duplicate"] + counts["near_duplicate"] + counts["semantic_duplicate"]):
        counts["semantic_duplicate"] -= 1
        counts["clean"] += 1
    return counts


def _draw_rows(b: Builder, counts: dict[str, int], eval_images: list[bytes]) -> None:
    """Every row of the URL list, kind by kind, in the order the world's bytes depend on (one random stream)."""
    originals = iter(kinds.clean(b, counts["clean"]))  # what the duplicates copy: exact ones first, then near
    kinds.boilerplate(b, counts["boilerplate"])
    kinds.many_texts(b, counts["many_texts"])
    kinds.mismatched(b, counts["mismatched"])
    kinds.weak(b, counts.get("weak", 0))
    kinds.exact_duplicates(b, counts["exact_duplicate"], originals)
    kinds.near_duplicates(b, counts["near_duplicate"], originals)
    kinds.semantic_duplicates(b, counts.get("semantic_duplicate", 0), originals)  # web only: none drawn, no draw
    kinds.too_short(b, counts["too_short"])
    kinds.too_long(b, counts["too_long"])
    kinds.rare_token(b, counts["rare_token"])
    kinds.small_image(b, counts["small_image"])
    kinds.odd_aspect(b, counts["odd_aspect"])
    kinds.non_english(b, counts["non_english"])
    kinds.eval_copies(b, counts["eval_copy"], eval_images)
    kinds.dead_links(b, counts["http_404"], counts["not_image"])


def _truth_table(b: Builder) -> pa.Table:
    """The builder's rows as the truth table, in crawl-dump order (shuffled); a duplicate pair shares `dup_group`
    (the original's uid): align must drop exactly one of the two."""
    # (url, caption) pairs are unique (a repeat would be the same uid twice)
    uniq, keys = [], set()
    for r in b.rows:
        if (r["url"], r["caption"]) not in keys:
            keys.add((r["url"], r["caption"]))
            uniq.append(r)
    b.rng.shuffle(uniq)
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
    return truth.cast(truth.schema.set(truth.schema.get_field_index("count"), pa.field("count", pa.int32()))
                      .set(truth.schema.get_field_index("eval_image_id"), pa.field("eval_image_id", pa.int32())))


def _summary(n: int, seed: int, noise: str, truth: pa.Table, b: Builder, n_eval_images: int) -> dict:
    """world.json, but its generator key and file digests."""
    row_kinds = truth.column("kind").to_pylist()
    return {
        "n": n, "seed": seed, "noise": noise, "rows": truth.num_rows, "host": DEMO_HOST, "images_served": b.n_files,
        "counts": {k: row_kinds.count(k) for k in KINDS},
        "dup_url_rows": int(sum(truth.column("dup_url").to_pylist())),
        "classnames": SHAPES, "eval_classification": n_eval_images, "eval_retrieval": RETRIEVAL_IMAGES,
        "hq": _hq_size(n),
    }
