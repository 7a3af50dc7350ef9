"""What the report draws and shows of the rows: each stage's figures and tables (its `report` hook), the bar
chart the hooks use, the training curve (with the zero-shot results beside it), and thumbnails of kept and
rejected rows embedded as data URIs. Figures are PNG files in the report folder; `remove_undrawn` keeps only
this report's."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import posixpath
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards
from pipeline.errors import StageError
from pipeline.images import REF_COL, ImageStoreError, open_image, run_reader
from pipeline.layout import part_shards, read_manifest, stage_folders
from pipeline.registry import stage_class

log = logging.getLogger("clipcurate.report")

THUMB_PX = 96
THUMBS_PER_GROUP = 8
SCREENSHOT = "report.png"  # render-check's picture of the report, not one of its figures


def _pyplot():
    """matplotlib's pyplot on the Agg backend: figures are drawn to files, never to a screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: str, labels: list[str], values: list, xlabel: str, title: str, row_height: float = 0.35) -> str:
    """A horizontal bar per label, top to bottom, written as a PNG at `path` (the stages' report figures)."""
    plt = _pyplot()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, row_height * len(labels) + 1.2))
    ax.barh(range(len(labels)), values, color="#4c72b0")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def histograms(run_dir: str, out_dir: str | None = None) -> dict[str, dict]:
    """Run every finished stage's report hook; figures land in `out_dir` (a local folder: runs/NAME/report/ for
    a local run; the hooks read the stage folders wherever they are, through fsspec)."""
    if not shards.exists(run_dir):
        raise StageError(f"run folder {run_dir} does not exist")
    out_dir = out_dir or os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for name, folder in stage_folders(run_dir):
        try:
            cls = stage_class(name.partition("@")[0])
        except StageError:
            continue
        step_out = out_dir
        if "@" in name:  # a repeated stage: its figures must not overwrite the other step's
            step_out = os.path.join(out_dir, name.replace("@", "-"))
            os.makedirs(step_out, exist_ok=True)
        cfg = (read_manifest(folder) or {}).get("config", {})
        try:
            stage = cls(cfg)
        except TypeError:
            stage = cls()
        try:
            results[name] = stage.report(folder, step_out)
        except Exception as e:  # a figure that fails must not lose the rest of the report
            log.warning("%s: report hook failed: %s", name, e)
            results[name] = {"figures": [], "tables": [], "error": str(e)}
    return results


def read_training(run_dir: str, out_dir: str) -> dict:
    """Training curve (drawn into `out_dir`) + zero-shot results if the trainer wrote them (metrics.jsonl /
    eval-*.json), and the ablation; read through fsspec."""
    out: dict = {}
    train = shards.join(run_dir, "train")
    metrics = shards.join(train, "metrics.jsonl")
    if shards.exists(metrics):
        pts = []
        for line in shards.read_bytes(metrics).decode("utf-8", "replace").splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" in d and "loss" in d:
                pts.append((d["step"], d["loss"]))
        out["last_step"] = pts[-1][0] if pts else None
        if pts:
            plt = _pyplot()
            fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            ax.set_xlabel("step")
            ax.set_ylabel("contrastive loss")
            ax.set_title("training curve")
            fig.tight_layout()
            path = os.path.join(out_dir, "training_curve.png")
            fig.savefig(path)
            plt.close(fig)
            out["curve"] = path
    evals = {}
    fs, tp = shards.fs_and_path(train)
    # eval-NAME.json (not eval_digests.json)
    for f in sorted(fs.glob(tp.rstrip("/") + "/eval-*.json")) if fs.exists(tp) else []:
        name = posixpath.basename(f)
        ev = shards.read_json(shards.join(train, name))
        if ev is not None:
            evals[name.removesuffix(".json")] = ev
    if evals:
        out["eval"] = evals
    out["trained"] = shards.exists(train)
    out["finished"] = shards.exists(shards.join(train, "train.json"))  # the trainer's summary of a finished run
    ablation = shards.read_json(shards.join(run_dir, "ablation.json"))
    if ablation is not None:
        out["ablation"] = ablation
    return out


def remove_undrawn(out_dir: Path, drawn: list[str]) -> None:
    """Every figure in the report folder is one this report drew: a PNG left by an earlier report (a step rerun
    that no longer draws it, a hook that failed this time, a step gone from the recipe) is removed, so that no
    figure on disk or linked in an old page outlives the run it showed."""
    keep = {Path(p).resolve() for p in drawn} | {(out_dir / SCREENSHOT).resolve()}
    for png in out_dir.rglob("*.png"):
        if png.resolve() not in keep:
            log.info("report: removed %s, a figure this report no longer draws", png)
            png.unlink(missing_ok=True)


def thumb(image: bytes | None) -> str | None:
    if not image:
        return None
    try:
        with open_image(image) as im:  # refuses decompression bombs (rejected rows are shown here too)
            im.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except Exception:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _sample_rows(files: list[str], reason: str | None, k: int) -> list[dict]:
    """First k rows (in shard order: deterministic) with this reason, reading few columns (never bytes)."""
    rows: list[dict] = []
    for f in files:
        try:
            schema = shards.read_schema(f)
        except Exception:
            continue
        cols = [c for c in ("uid", "text", REF_COL, "reason") if c in schema.names]
        if REF_COL not in cols:
            return []
        t = shards.read_shard(f, columns=cols)
        if reason is not None and "reason" in cols:
            t = t.filter(pc.equal(t.column("reason"), reason))
        rows += t.slice(0, k - len(rows)).to_pylist()
        if len(rows) >= k:
            break
    return rows


def _with_pixels(rows: list[dict], reader) -> list[bytes | None]:
    """The rows' image bytes, read by reference through the run's image reader (one call: a store file at a time)."""
    if reader is None or not rows:
        return [None] * len(rows)
    try:
        return reader.read(pa.array([r.get(REF_COL) for r in rows], pa.string())).to_pylist()
    except ImageStoreError as e:  # a report without some thumbnails beats no report
        log.warning("thumbnails: %s", e)
        return [None] * len(rows)


def thumbnails(run_dir: str) -> list[dict]:
    """Per stage: a group of kept rows and one group per rejection reason, with thumbnails and captions."""
    groups = []
    reader = run_reader(run_dir)
    for name, folder in stage_folders(run_dir):
        m = read_manifest(folder) or {}
        kept_files = part_shards(folder)
        rej_files = part_shards(shards.join(folder, "rejected"))
        specs = [("kept", kept_files, None)] + [(r, rej_files, r) for r in list(m.get("reasons", {}))[:12]]
        for label, files, reason in specs:
            rows = _sample_rows(files, reason, THUMBS_PER_GROUP)
            if not rows:
                continue
            groups.append({
                "stage": name, "label": label,
                "items": [{"thumb": thumb(b), "text": r.get("text") or ""}
                          for r, b in zip(rows, _with_pixels(rows, reader))],
            })
    return groups
