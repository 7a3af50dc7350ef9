"""config.toml of a demo world: the pipeline config scaled to its pool size."""

from __future__ import annotations

import json
import math
from pathlib import Path

from demo.composition import NOISE_MODES


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
