"""semdedup's part of the run report: what it judged and dropped, its clusters (from the saved partitions),
and eval decontamination beside align's dHash rule (read from the run's manifests, not from align)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
        by_image, by_caption = reasons.get("eval_semantic_duplicate", 0), reasons.get("eval_caption_duplicate", 0)
        rows = [["dHash (align eval_near_duplicate)", dhash,
                 "not measured: align dropped them before any embedding (bench/results/filters.json compares both "
                 "on the same rows)" if dhash else 0],
                ["embeddings, image (semdedup eval_semantic_duplicate, after align)", by_image,
                 by_image if align else "align did not run"]]
        if c.eval_text_threshold > 0:
            rows.append([f"embeddings, caption (semdedup eval_caption_duplicate, cos >= {c.eval_text_threshold})",
                         by_caption, by_caption])
        tables.append(Table("eval decontamination: align's dHash rule and semdedup's embedding rules",
                            ["rule", "rows dropped", "caught by this rule alone"], rows))
        leaks = _eval_cosines(stage_dir)
        if leaks is not None:
            tables.append(leaks)
    return {"figures": [], "tables": tables}


def _eval_cosines(stage_dir: str):
    """How close each row an eval rule dropped is to its eval item, in both modalities: the picture alone, or the
    pair (None: no such row, or no caption compared)."""
    from pipeline.report import Table

    folder = shards.join(stage_dir, "rejected")
    files = shards.list_shards(folder) if shards.exists(folder) else []
    cols = ("reason", "eval_image_cosine", "eval_text_cosine")
    parts = [shards.read_shard(f, columns=list(cols)) for f in files if set(cols) <= set(shards.read_schema(f).names)]
    if not parts:
        return None
    t = pa.concat_tables(parts)
    out = []
    for reason in ("eval_semantic_duplicate", "eval_caption_duplicate"):
        at = np.asarray(pc.equal(t.column("reason"), reason).fill_null(False).to_numpy(zero_copy_only=False), bool)
        if not at.any():
            continue
        img = np.asarray(t.column("eval_image_cosine").to_numpy(zero_copy_only=False), np.float64)[at]
        txt = np.asarray(t.column("eval_text_cosine").to_numpy(zero_copy_only=False), np.float64)[at]
        out.append([reason, int(at.sum()), _median(img), int(np.isfinite(txt).sum()), _median(txt)])
    if not out:
        return None
    return Table("eval decontamination: dropped rows' cosine to the eval item they name (median)",
                 ["rule", "rows", "image cosine", "rows with a caption compared", "caption cosine"], out)


def _median(x: np.ndarray) -> str:
    x = x[np.isfinite(x)]
    return f"{np.median(x):.3f}" if len(x) else "-"


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
