"""config.toml of a demo world: the pipeline config scaled to its pool size."""

from __future__ import annotations

import json
import math
from pathlib import Path

from demo.composition import NOISE_MODES
from stages.ingest.serve import DEMO_HOST

# The two recipes besides the default (stages/recipes/*.toml say what each is for; tests check these agree).
TEXT_FIRST = ["align@text", "metaclip", "klite", "ingest", "align", "dfn", "emit"]
TEXT_RULES = ["image_many_texts", "text_many_images", "too_few_words", "too_many_words", "rare_token",
              "exact_duplicate", "near_duplicate", "language"]
IMAGE_RULES = ["image_unreadable", "image_too_small", "aspect_ratio", "image_many_texts", "text_many_images",
               "exact_duplicate", "near_duplicate", "eval_near_duplicate"]
BALANCE_LAST = ["ingest", "align", "dfn", "metaclip", "emit"]
BALANCE_LAST_MIN_SCORE = 0.63
BALANCE_LAST_WHY = ("the demo's filtering network (dfn-train, 300 steps) on a 3000-row world: 79.7% of the 2095 pairs "
                    "align keeps score >= 0.63, about the default recipe's dfn share (keep_fraction 0.8)")


SEMDEDUP = ["ingest", "align", "dfn", "semdedup", "metaclip", "emit"]  # balance-last with semantic dedup
# semdedup's thresholds for the demo's network (dfn-train's 300-step clipcurate-tiny), chosen on the web world
# n = 3,000 seed 1 (/tmp grid in the closing note of issue 31; bench/results/filters.json measures seed 0): the
# largest recall of its semantic_duplicate groups with <= 1% of clean rows lost. That network places a re-crop no
# closer to its original than to other pictures of the same shape and colour (copy-original image cosine: median
# 0.959; many other clean pairs are closer), so recall stays low; a CLIP trained on the web tells instances apart.
# Its image cosines run high: 362 rows of 1,867 were within 0.95 of some eval image, none an eval copy (align's
# dHash had dropped those), 0 within 0.995.
SEMDEDUP_DEMO = {"eps_image": 0.03, "eps_text": 0.05, "eval_threshold": 0.995}

RECIPES = ("default", "text-first", "balance-last", "semdedup")  # stages/recipes/<name>.toml: what each is and why


def semdedup_demo() -> str:
    """The [semdedup] thresholds of a demo world's configs (SEMDEDUP_DEMO), as TOML lines."""
    return "".join(f"{k} = {v}   # the demo network's scale (demo/config.py SEMDEDUP_DEMO)\n"
                   for k, v in SEMDEDUP_DEMO.items())


def config_file(recipe: str = "default") -> str:
    """The world's config file for a recipe: config.toml (the default recipe), config-<recipe>.toml."""
    return "config.toml" if recipe == "default" else f"config-{recipe}.toml"


def demo_config(n: int, eval_path: Path, noise: str = "default", recipe: str = "default") -> str:
    """The pipeline config for a pool of n rows: web-scale thresholds scaled down (DESIGN.md, "Small pools").
    A web world (`noise="web"`) differs in one line: dfn keeps the papers' share, not 0.8. `recipe`: the
    default recipe's config, or another recipe's (stages/recipes/): the same scaled values, with that recipe's
    stage list and switches."""
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)} (got {noise!r})")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)} (got {recipe!r})")
    t = max(10, n // 100)
    shard = max(100, math.ceil(n / 6 / 100) * 100)

    def q(path: Path) -> str:  # a TOML basic string: JSON's escapes are TOML's (a path may hold " or \\)
        return json.dumps(path.as_posix())

    dfn_keep = ("keep_fraction = 0.8   # the pool is already curated twice by here; DFN papers keep 10-30% of raw pools"
                if noise == "default" else
                "keep_fraction = 0.3   # a web pool is mostly weak or mismatched pairs even after align: DataComp's "
                "CLIP-score baseline keeps 30%")
    run, align_text, align_rules, dfn_extra, metaclip_extra = "", "", "", "", ""
    if recipe == "text-first":
        run = f"stages = {json.dumps(TEXT_FIRST)}\n"
        align_text = f"""
["align@text"]   # ALIGN's text rules on the URL list, the url standing in for the image (stages/recipes)
max_texts_per_image = 20
max_images_per_text = 10
rules = {json.dumps(TEXT_RULES)}
"""
        align_rules = f"rules = {json.dumps(IMAGE_RULES)}   # after the download: image rules only\n"
    elif recipe in ("balance-last", "semdedup"):
        run = f"stages = {json.dumps(BALANCE_LAST if recipe == 'balance-last' else SEMDEDUP)}\n"
        dfn_extra = "score_only = true   # metaclip cuts on dfn_score as it balances\n"
        metaclip_extra = f"score_col = \"dfn_score\"\nmin_score = {BALANCE_LAST_MIN_SCORE}   # {BALANCE_LAST_WHY}\n"
    semdedup = "" if recipe != "semdedup" else f"""
[semdedup]   # the run's network (dfn-train's) vectors, stored by dfn: no second model pass
mode = "pair"
keep = "highest_score"
eval_images = {q(eval_path)}   # the eval set align's dHash rule reads, here by embedding
{semdedup_demo()}"""
    which = "" if recipe == "default" else f", {recipe} recipe (stages/recipes/{recipe}.toml)"
    return f"""# Demo config, written by `clipcurate demo-world` for a pool of {n} URL rows{which}.
# The papers' thresholds assume web-scale pools; here they are scaled to the pool (DESIGN.md, "Small pools").
[run]
seed = 0
{run}
[ingest]
shard_size = {shard}   # {math.ceil(n / shard)} shards, so the stages have several to spread over workers
processes = 2
threads = 16
allow_private_hosts = ["{DEMO_HOST}:80"]   # the world is served on loopback: the one internal server to fetch from

[align]
max_texts_per_image = 20   # ALIGN: 1,000 at 1.8B pairs
max_images_per_text = 10   # ALIGN's value works here too: boilerplate repeats far more often
eval_images = {q(eval_path)}
{align_rules}{align_text}
[metaclip]
t = {t}   # MetaCLIP: 20,000 at 400M pairs; here n/100, about the 25th percentile of the demo's entry counts
{metaclip_extra}
[dfn]
{dfn_keep}
{dfn_extra}{semdedup}
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
