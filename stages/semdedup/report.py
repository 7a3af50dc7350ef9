"""semdedup's part of the run report: what it judged and dropped, its clusters (from the saved partitions),
and eval decontamination beside align's dHash rule (read from the run's manifests, not from align)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline import shards
from pipeline.errors import StageError


def stage_report(config, stage_dir: str, out_dir: str, load_stats: Callable[[str], dict]) -> dict:
    """`SemDedupStage.report` (`config`: the stage's Config; `load_stats`: how the stage reads a partition's
    statistics)."""
    from pipeline.layout import stage_folders
    from pipeline.report import Table

    man = shards.read_json(shards.join(stage_dir, "_manifest.json")) or {}
    reasons = man.get("reasons", {})
    survey = _read_survey(stage_dir)
    sizes, dropped_per, split = _cluster_stats(stage_dir, load_stats)
    c = config
    rule = (f"image cos >= {1 - c.eps_image:.3f} and text cos >= {1 - c.eps_text:.3f}" if c.mode == "pair"
            else f"image cos >= {1 - c.eps_image:.3f}")
    tables = [Table("semdedup", ["rows in", "semantic_duplicate", "eval_semantic_duplicate", "duplicate rule",
                                 "keep", "clusters", "k-means sample", "largest cluster", "clusters split"],
                    [[man.get("rows_in", 0), reasons.get("semantic_duplicate", 0),
                      reasons.get("eval_semantic_duplicate", 0), rule, c.keep,
                      len(survey["centroids"]) if survey else 0, survey["sample"] if survey else 0,
                      int(sizes.max()) if len(sizes) else 0, split]])]
    if len(sizes):
        share = np.divide(dropped_per, sizes, out=np.zeros(len(sizes)), where=sizes > 0)
        q = [0.5, 0.9, 1.0]
        tables.append(Table("semdedup clusters: rows and the share dropped (quantiles over clusters)",
                            ["quantile", "rows", "dropped share"],
                            [[f"{int(x * 100)}%", int(np.quantile(sizes, x)), f"{100 * np.quantile(share, x):.1f}%"]
                             for x in q]))
    manifests = [shards.read_json(shards.join(d, "_manifest.json")) or {}
                 for _, d in stage_folders(posixpath_parent(stage_dir))]
    align = [m for m in manifests if m.get("stage") == "align"]
    dhash = sum(int(m.get("reasons", {}).get("eval_near_duplicate", 0)) for m in align)
    if c.eval_images or dhash:
        tables.append(Table(
            "eval decontamination: align's dHash rule and semdedup's embedding rule",
            ["rule", "rows dropped", "caught by this rule alone"],
            [["dHash (align eval_near_duplicate)", dhash,
              "not measured: align dropped them before any embedding (bench/results/filters.json compares both "
              "on the same rows)" if dhash else 0],
             ["embeddings (semdedup eval_semantic_duplicate, after align)", reasons.get("eval_semantic_duplicate", 0),
              reasons.get("eval_semantic_duplicate", 0) if align else "align did not run"]]))
    return {"figures": [], "tables": tables}


def posixpath_parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0]


def _read_survey(stage_dir: str) -> dict | None:
    from pipeline import codec

    path = shards.join(stage_dir, "survey", "survey.data")
    try:
        return codec.decode(shards.read_bytes(path)) if shards.exists(path) else None
    except codec.CodecError:
        return None


def _cluster_stats(stage_dir: str, load_stats: Callable[[str], dict]) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows per cluster, rows dropped per cluster, clusters split again) over the saved partitions."""
    sizes, lost, split = [], [], 0
    folder = shards.join(stage_dir, "stats")
    fs, p = shards.fs_and_path(folder)
    if not fs.exists(p):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    for part in sorted(fs.ls(p, detail=False)):
        name = str(part).rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("p"):
            continue
        try:
            merged = load_stats(shards.join(folder, name))
        except StageError:
            continue
        sizes.append(merged["cluster_rows"])
        lost.append(merged["cluster_dropped"])
        split += int(merged["split_clusters"])
    if not sizes:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    return np.concatenate(sizes), np.concatenate(lost), split
