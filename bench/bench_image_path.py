"""Two per-image choices of the image path, each side by side with its baseline in one run, paired rounds (order
alternating), on two data sets. Writes bench/results/image_path.json.

    .venv/bin/python bench/bench_image_path.py [--rounds 3]

Data sets: `coco` = the 239 real COCO photos of ../shared/data/coco_mini_images (JPEG, ~640x480), and `demo` =
the JPEGs a demo world serves (`demo.world.make_world(n=600)`: synthetic scenes, a data set the choices
were not measured on when they were made).

dhash   align's per-image fact: decode at >= 128 px (JPEG draft) to RGB then convert to grey (before) against
        decoding straight to grey (`draft("L")`, the Y channel: stages/align/images.py inspect_image), then the
        9x8 dHash. Images/s on one core, and how many hashes are the same bits / how far the others are.
heap    dfn's scoring (trainer.score.Scorer, a randomly initialised clipcurate-tiny: speed does not depend on the
        weights; 1 torch thread, batches of 256) in three child processes: without MALLOC_TRIM_THRESHOLD_ (a plain
        process); with it at 65536 (as a Dask nanny starts its workers) and heap_for_tensors disabled; with it and
        heap_for_tensors (what dfn does now). Pairs/s, timed after a warm-up batch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COCO = ROOT.parent / "shared" / "data" / "coco_mini_images" / "coco_mini_images.parquet"


def coco_images() -> list[bytes]:
    import pyarrow.parquet as pq

    return pq.read_table(COCO, columns=["image"]).column("image").to_pylist()


def demo_images(folder: Path) -> list[bytes]:
    from demo.world import make_world

    from PIL import Image

    make_world(folder, n=600, seed=0)
    out = []
    for p in sorted((folder / "www" / "img").glob("*.jpg")):
        try:  # the world serves some broken files on purpose (align's bad_image): left out here
            with Image.open(p) as img:
                img.load()
        except Exception:  # noqa: BLE001
            continue
        out.append(p.read_bytes())
    return out


# ---- dhash -------------------------------------------------------------------------------------------
def _dhash(data: bytes, mode: str) -> int:
    from PIL import Image

    from stages.align import dhash64

    with Image.open(io.BytesIO(data)) as img:
        img.draft(mode, (128, 128))
        img.load()
        return dhash64(img)


def dhash_side_by_side(images: list[bytes], rounds: int) -> dict:
    rates = {"rgb_then_grey": [], "grey": []}
    hashes = {}
    for r in range(rounds):
        for mode in (("RGB", "L") if r % 2 == 0 else ("L", "RGB")):
            t0 = time.perf_counter()
            hashes[mode] = [_dhash(b, mode) for b in images]
            rates["rgb_then_grey" if mode == "RGB" else "grey"].append(len(images) / (time.perf_counter() - t0))
    dist = [bin(a ^ b).count("1") for a, b in zip(hashes["RGB"], hashes["L"])]
    med = {k: round(sorted(v)[len(v) // 2], 1) for k, v in rates.items()}
    return {"images": len(images), "images_per_s_per_round": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "median_images_per_s": med, "grey_vs_rgb": round(med["grey"] / med["rgb_then_grey"], 3),
            "same_hash_share": round(sum(d == 0 for d in dist) / len(dist), 4),
            "differing_bits_max": max(dist), "differing_bits_mean": round(sum(dist) / len(dist), 3)}


# ---- heap ----------------------------------------------------------------------------------------------
HEAP_CHILD = r"""
import json, sys, time
import pyarrow as pa
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import trainer.score as score
from trainer import models
if sys.argv[3] == "off":
    import contextlib
    score.heap_for_tensors = lambda libc=None: contextlib.nullcontext()
images = pa.ipc.open_file(sys.argv[2]).read_all().column("image").to_pylist()
texts = ["a photo of a dog running on the grass in a park"] * len(images)
models.register_configs()
model, _, _ = models.create("clipcurate-tiny")[:3]
ck = sys.argv[4]
torch.save({"model_name": "clipcurate-tiny", "state_dict": model.state_dict(), "step": 0}, ck)
sc = score.Scorer(ck, device="cpu", batch_size=256)
sc.score(images[:256], texts[:256])
t0 = time.perf_counter()
sc.score(images, texts)
print("HEAP " + json.dumps({"pairs_per_s": len(images) / (time.perf_counter() - t0), "rows": len(images)}))
"""

HEAP_SIDES = {"plain_process": ({}, "on"), "nanny_trim_no_heap": ({"MALLOC_TRIM_THRESHOLD_": "65536"}, "off"),
              "nanny_trim_heap_for_tensors": ({"MALLOC_TRIM_THRESHOLD_": "65536"}, "on")}


def heap_side_by_side(images: list[bytes], rounds: int, work: Path) -> dict:
    import pyarrow as pa

    data = work / "images.arrow"
    with pa.OSFile(str(data), "wb") as f, pa.ipc.new_file(f, pa.schema([("image", pa.binary())])) as w:
        w.write_table(pa.table({"image": pa.array(images, pa.binary())}))
    rates = {k: [] for k in HEAP_SIDES}
    order = list(HEAP_SIDES)
    for r in range(rounds):
        for side in (order if r % 2 == 0 else order[::-1]):
            extra, heap = HEAP_SIDES[side]
            env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
            env.update(extra, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            out = subprocess.run([sys.executable, "-c", HEAP_CHILD, str(ROOT), str(data), heap, str(work / "m.pt")],
                                 env=env, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("HEAP ")), None)
            if line is None:
                raise SystemExit(f"heap child failed:\n{out.stderr[-2000:]}")
            rates[side].append(json.loads(line[5:])["pairs_per_s"])
    med = {k: round(sorted(v)[len(v) // 2], 1) for k, v in rates.items()}
    return {"rows": len(images), "pairs_per_s_per_round": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "median_pairs_per_s": med,
            "trim_without_heap_vs_plain": round(med["nanny_trim_no_heap"] / med["plain_process"], 3),
            "trim_with_heap_vs_plain": round(med["nanny_trim_heap_for_tensors"] / med["plain_process"], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "image_path.json"))
    args = ap.parse_args()
    if not COCO.exists():
        print(f"image path bench: {COCO} not found (../shared/data)")
        return 1
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-image-path-") as tmp:
        work = Path(tmp)
        sets = {"coco": coco_images() * 4, "demo": demo_images(work / "world")}
        res = {"bench": "image_path", "command": "python bench/bench_image_path.py --rounds %d" % args.rounds,
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "loadavg_start": list(os.getloadavg())},
               "data": {"coco": "the 239 COCO mini photos, each 4 times (956 JPEGs)",
                        "demo": f"the {len(sets['demo'])} decodable JPEGs of a demo world (make_world n=600, seed 0)"},
               "dhash": {}, "heap": {}}
        for name, images in sets.items():
            print(f"[{name}] dhash, {len(images)} images ...", flush=True)
            res["dhash"][name] = dhash_side_by_side(images, args.rounds)
            print(f"[{name}] heap, {len(images)} pairs ...", flush=True)
            res["heap"][name] = heap_side_by_side(images, args.rounds, work)
        res["machine"]["loadavg_end"] = list(os.getloadavg())
        res["bench_s"] = round(time.perf_counter() - t_all, 1)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("dhash", "heap")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
