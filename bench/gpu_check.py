"""The trainer and the dfn scorer on a GPU, as they are (no code path special to this script).

On a machine with CUDA: trains the tiny CLIP on a small demo world's HQ set (AMP autocast, pinned memory,
DataLoader workers), scores pairs with the Scorer on the GPU and on the CPU (same checkpoint) and compares,
evaluates zero-shot on the GPU, and times scoring against a bare open_clip forward on the same batches.
Writes bench/results/gpu.json (or --out). Exits 2 when no GPU is present: it checks nothing on a CPU.

    python bench/gpu_check.py [--steps 200] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    args = ap.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check", file=sys.stderr)
        return 2

    from demo.world import make_world
    from trainer import models
    from trainer.config import TrainConfig
    from trainer.evaluate import evaluate
    from trainer.score import Scorer
    from trainer.train import train

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    world = work / "world"
    make_world(world, n=args.n, seed=0)
    result: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "python": platform.python_version()}

    tc = TrainConfig(steps=args.steps, batch_size=128, workers=4, save_every=args.steps, log_every=10,
                     device="auto", precision="auto")
    t0 = time.perf_counter()
    s = train(tc, str(world / "hq.parquet"), str(work / "dfn"), progress=False)
    result["train"] = {k: s.get(k) for k in ("model", "steps", "pairs", "device", "precision", "first_loss", "last_loss")}
    result["train"]["seconds"] = round(time.perf_counter() - t0, 2)
    assert s["device"].startswith("cuda"), s["device"]
    assert s["last_loss"] < s["first_loss"], (s["first_loss"], s["last_loss"])

    hq = pq.read_table(world / "hq.parquet")
    images, texts = hq.column("image").to_pylist(), hq.column("text").to_pylist()
    gpu = Scorer(s["model_path"], device="cuda", precision="auto", batch_size=256, num_workers=4)
    cpu = Scorer(s["model_path"], device="cpu", precision="fp32", batch_size=256, num_workers=0)
    sg = gpu.score(images, texts)  # warm-up included in the first call: time a second one
    t0 = time.perf_counter()
    sg = gpu.score(images, texts)
    ours_s = time.perf_counter() - t0
    sc = cpu.score(images[:256], texts[:256])
    diff = float(np.nanmax(np.abs(sg[:256] - sc)))
    result["score"] = {"precision": gpu.precision, "pairs": len(texts), "pairs_per_s": round(len(texts) / ours_s, 1),
                       "max_abs_diff_vs_cpu_fp32": round(diff, 4)}
    assert diff < 0.05, diff  # bf16/fp16 autocast against fp32 on the CPU

    # bare forward on ready, device-resident batches: the ceiling the Scorer's decode pipeline competes with
    xs, toks = [], []
    for i in range(0, len(texts), 256):
        import io

        from PIL import Image

        batch = [gpu.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[i : i + 256]]
        xs.append(torch.stack(batch).to("cuda"))
        toks.append(gpu.tokenizer(texts[i : i + 256]).to("cuda"))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x, tok in zip(xs, toks):
        gpu.forward(x, tok)
    torch.cuda.synchronize()
    bare_s = time.perf_counter() - t0
    result["score"]["bare_forward_pairs_per_s"] = round(len(texts) / bare_s, 1)

    ev = evaluate(s["model_path"], [str(world / "eval" / "colours.parquet"), str(world / "eval" / "retrieval.parquet")],
                  device="cuda", precision="auto")
    result["eval"] = {k: {m: v for m, v in r.items() if isinstance(v, float)} for k, r in ev["results"].items()}
    result["autocast_dtype"] = str(models.pick_precision("auto", torch.device("cuda")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
