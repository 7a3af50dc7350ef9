"""Histograms and the run report. The pipeline knows nothing of what a stage does: each stage's
`report(stage_dir, out_dir)` hook draws its own figures and tables; this module gathers them with what
every stage has (its manifest: funnel, reasons, timings) and writes `report.html` + `report.md`.

The HTML opens from disk with no server: figures are PNG files next to it (relative links) and thumbnails
are embedded as data URIs.
"""

from __future__ import annotations

import base64
import posixpath
import dataclasses
import html
import io
import json
import logging
import contextlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards
from pipeline.images import REF_COL, ImageStoreError, run_reader
from pipeline.stage import StageError, stage_class

log = logging.getLogger("clipcurate.report")

THUMB_PX = 96
THUMBS_PER_GROUP = 8


def stage_folders(run_dir: str) -> list[tuple[str, str]]:
    """(step name, folder) for every step of the run's recipe that has finished (has a manifest), in recipe
    order; then any other finished stage folder (a user's stage run outside the recipe), but an older recipe's
    (stale: pipeline/stale.py, listed in the summary). A step name is a stage name, or stage@label for a repeated
    stage."""
    from pipeline import config as config_mod
    from pipeline import recipe

    try:
        steps = recipe.of_config(config_mod.saved_config(run_dir) or config_mod.resolve({}))
    except (StageError, ValueError):
        steps = recipe.steps_of(recipe.default_recipe())
    out, seen = [], set()
    for step in steps:
        d = shards.join(run_dir, step.folder)
        seen.add(step.folder)
        if shards.exists(shards.join(d, "_manifest.json")):
            out.append((step.name, d))
    seen |= _stale_names(run_dir)  # an older recipe's folders: listed in the summary, not steps of this run
    fs, p = shards.fs_and_path(run_dir)
    for name in sorted(posixpath.basename(x.rstrip("/")) for x in fs.glob(p.rstrip("/") + "/[0-9][0-9]_*")):
        if name not in seen:
            stage = (shards.read_json(shards.join(run_dir, name, "_manifest.json")) or {}).get("stage", "")
            if stage:
                out.append((stage, shards.join(run_dir, name)))
    return out


def _stale_names(run_dir: str) -> set[str]:
    """The run's stale step folders (pipeline/stale.py), those `clean` keeps too; none where they cannot be told."""
    from pipeline import stale

    try:
        return set(stale.find(run_dir, dependencies=False).stale)
    except (StageError, ValueError, OSError):
        return set()


def manifests(run_dir: str) -> list[dict]:
    return [shards.read_json(shards.join(folder, "_manifest.json")) for _, folder in stage_folders(run_dir)]


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
        cfg = (shards.read_json(shards.join(folder, "_manifest.json")) or {}).get("config", {})
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


# ---- thumbnails --------------------------------------------------------------------------------
def _thumb(image: bytes | None) -> str | None:
    if not image:
        return None
    from pipeline.images import open_image

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


def _parts(folder: str) -> list[str]:
    """The folder's part-*.parquet shards, local or fsspec; [] when there is no such folder."""
    if not shards.exists(folder):
        return []
    return [p for p in shards.list_shards(folder) if shards.shard_name(p).startswith("part-")]


def thumbnails(run_dir: str) -> list[dict]:
    """Per stage: a group of kept rows and one group per rejection reason, with thumbnails and captions."""
    groups = []
    reader = run_reader(run_dir)
    for name, folder in stage_folders(run_dir):
        m = shards.read_json(shards.join(folder, "_manifest.json")) or {}
        kept_files = _parts(folder)
        rej_files = _parts(shards.join(folder, "rejected"))
        specs = [("kept", kept_files, None)] + [(r, rej_files, r) for r in list(m.get("reasons", {}))[:12]]
        for label, files, reason in specs:
            rows = _sample_rows(files, reason, THUMBS_PER_GROUP)
            if not rows:
                continue
            groups.append({
                "stage": name, "label": label,
                "items": [{"thumb": _thumb(b), "text": r.get("text") or ""}
                          for r, b in zip(rows, _with_pixels(rows, reader))],
            })
    return groups


# ---- the report --------------------------------------------------------------------------------
def bar_chart(path: str, labels: list[str], values: list, xlabel: str, title: str, row_height: float = 0.35) -> str:
    """A horizontal bar per label, top to bottom, written as a PNG at `path` (the stages' report figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


@dataclasses.dataclass(frozen=True)
class Table:
    """A report table as data. Stages' report hooks return these; the Markdown and the HTML report (one jinja2
    template, templates/report.html.j2) are both made from them, so neither is parsed back from the other."""

    title: str
    header: list[str]
    rows: list[list]

    def markdown(self) -> str:
        return _md_table(self.header, self.rows)

    @property
    def text_columns(self) -> str:
        """The HTML class that left-aligns this table's text columns ("l1 l5": the 1st and 5th), as its first column
        is: numbers stay right-aligned, and a column of names (the funnel's reasons, under its stage names) reads
        from the same edge as the names beside it. A column is text when every filled cell is a string that does not
        start as a number does ("7 (1.8%)" is a number)."""
        out = []
        for j in range(len(self.header)):
            cells = [r[j] for r in self.rows if j < len(r) and r[j] not in (None, "")]
            if cells and all(isinstance(c, str) and not _numeric_start(c) for c in cells):
                out.append(f"l{j + 1}")
        return " ".join(out)


def _numeric_start(c: str) -> bool:
    c = c.lstrip()
    return bool(c) and (c[0].isdigit() or (c[0] in "+-." and c[1:2].isdigit()))


def _md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _cell(c) -> str:
    return "" if c is None else str(c).replace("|", "\\|").replace("\n", " ")


def funnel_rows(ms: list[dict]) -> list[list]:
    rows = []
    for m in ms:
        rows.append([m["stage"], m["rows_in"], m["rows_out"], m["rejected"], "", ""])
        for reason, n in m.get("reasons", {}).items():
            share = f"{100.0 * n / m['rows_in']:.1f}%" if m["rows_in"] else ""
            rows.append(["", "", "", "", reason, f"{n} ({share})"])
    return rows


def timing_rows(ms: list[dict]) -> list[list]:
    rows = []
    for m in ms:
        t = m.get("timings", {})
        wall = sum(v for k, v in t.items() if k.endswith("_s"))
        rate = f"{m['rows_in'] / wall:,.0f}" if wall else ""
        rows.append([m["stage"], m.get("executor", ""), *(t.get(k, "") for k in ("collect_s", "merge_s", "apply_s", "finalize_s")), round(wall, 2), rate])
    return rows


def _training(run_dir: str, out_dir: str) -> dict:
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
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

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


# ---- the summary at the top ---------------------------------------------------------------------
def planned_steps(run_dir: str, finished: list[str]) -> list[str]:
    """The step names of the run's recipe (its saved config's), or the finished ones where it has none readable."""
    from pipeline import config as config_mod
    from pipeline import recipe

    try:
        return [s.name for s in recipe.of_config(config_mod.saved_config(run_dir) or config_mod.resolve({}))]
    except (StageError, ValueError):
        return list(finished)


def training_set(ms: list[dict]) -> dict | None:
    """The training set a step wrote: the last finished step whose pool-wide output (its manifest's `finalize`)
    names a `folder` and counts its `samples` (the resharder's). None when no step has written one."""
    for m in reversed(ms):
        fin = m.get("finalize")
        if isinstance(fin, dict) and fin.get("folder") and isinstance(fin.get("samples"), int):
            return fin
    return None


def evaluation_state(run: str, training: dict) -> str:
    """One line: the zero-shot results the run has, or why it has none (no model, training unfinished, not
    evaluated): a training curve alone says nothing of the model's quality."""
    evals = training.get("eval") or {}
    if evals:
        parts = []
        for name, ev in evals.items():
            key = next((k for k in ("top1", "image_to_text_R@1") if isinstance(ev.get(k), float)), None)
            parts.append(f"{name}: {key} {ev[key]:.4f}" if key else name)
        return "; ".join(parts)
    return f"none: {no_evaluation_why(run, training)}"


def no_evaluation_why(run: str, training: dict) -> str:
    """Why a run has no zero-shot result: no model trained, its training unfinished, or not evaluated."""
    if not training.get("trained"):
        return f"no model has been trained on this run (clipcurate train --run {run})"
    if not training.get("finished"):
        at = training.get("last_step")
        return (f"training has not finished ({f'last logged step {at}' if at is not None else 'no step logged'}); "
                f"its model is evaluated when it ends (clipcurate train --run {run} --resume)")
    return f"the trained model has not been evaluated (clipcurate eval --run {run})"


def summary_rows(run_dir: str, training: dict) -> list[list]:
    """The run in six lines, first in the report: rows in, rows emitted, where the training set is, which steps
    of the recipe have not run, whether an evaluation exists, which step folders are stale (an older recipe's:
    `clipcurate clean --stale` removes them)."""
    run = posixpath.basename(str(run_dir).rstrip("/"))
    steps = stage_folders(run_dir)
    ms = [shards.read_json(shards.join(folder, "_manifest.json")) or {} for _, folder in steps]
    names = [n for n, _ in steps]
    missing = [n for n in planned_steps(run_dir, names) if n not in names]
    src = started_from(ms)
    first = f"{ms[0].get('rows_in')} (read by {names[0]}" + (f" from {src})" if src else ")") if ms else "none"
    ts = training_set(ms)
    if ts:
        emitted = str(ts["samples"])
        n = ts.get("shards", "?")
        where = f"{ts['folder']} ({', '.join(ts.get('formats') or [])}; {n} shard{'' if n == 1 else 's'})"
    else:
        emitted = f"none yet: the last finished step, {names[-1]}, kept {ms[-1].get('rows_out')}" if ms else "none"
        where = "none: no finished step has written a training set"
    return [["rows in", first], ["rows emitted", emitted], ["training set", where],
            ["recipe steps not run", ", ".join(missing) if missing else "none: every step of the recipe has run"],
            ["evaluation", evaluation_state(run, training)], ["stale step folders", stale_folders_line(run_dir)]]


def stale_folders_line(run_dir: str) -> str:
    """The summary's line on stale step folders (pipeline/stale.py): which, and that `clean --stale` removes them."""
    from pipeline import stale

    try:
        return stale.find(run_dir).describe(posixpath.basename(str(run_dir).rstrip("/")))
    except (StageError, ValueError) as e:
        return f"not judged: {e}"


def world_truth(run_dir: str) -> str | None:
    """The labelled truth of the demo world the run crawled, or None. Only a world's own record counts: next to the
    URL list the run ingested (a download step's manifest `url_list`) or its first step's input, a `world.json`
    (demo/world.py) whose file digests name `truth.parquet` with the bytes it has now. A `truth.parquet` that a
    user's crawl happens to hold beside its URL list is not labels of this run (give it with `report --truth`)."""
    import hashlib

    steps = stage_folders(run_dir)
    if not steps:
        return None
    src = started_from([shards.read_json(os.path.join(folder, "_manifest.json")) or {} for _, folder in steps])
    if not src or "://" in str(src):
        return None
    p = Path(src)
    world = p if p.is_dir() else p.parent
    try:
        record = json.loads((world / "world.json").read_text())
        digest = record["files"]["truth.parquet"]
        cand = world / "truth.parquet"
        if hashlib.sha256(cand.read_bytes()).hexdigest() != digest:
            log.warning("%s: truth.parquet is not the one its world.json records: no filter quality section", world)
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(cand)


def filter_quality_tables(q: dict) -> list[tuple[str, list[str], list[list]]]:
    """(title, header, rows) of the three truth tables (pipeline/truth.py)."""
    steps = list(q["precision"])
    rec = [[kind, r["rows"], r["dropped"], f"{r['recall']:.1%}" if r["recall"] is not None else ""]
           + [r["by_step"].get(st, "") for st in steps] + [r["by_step"].get("unaccounted", "")]
           for kind, r in q["recall"].items()]
    pre = [[st, p["dropped"], p["noise"], f"{p['precision']:.1%}" if p["precision"] is not None else "",
            ", ".join(f"{k} {v}" for k, v in list(p["by_reason"].items())[:5])] for st, p in q["precision"].items()]
    cl = q["clean_lost"]
    lost = [[x["step"], x["reason"], x["rows"], f"{x['rows'] / cl['clean_rows']:.1%}"] for x in cl["by_step_reason"]]
    return [
        (f"Recall: the share of each kind's rows the run dropped ({q['rows']} rows, {q['kept']} kept)",
         ["kind", "rows", "dropped", "recall", *(f"by {st}" for st in steps), "unaccounted"], rec),
        ("Precision: the share of each step's drops that were noise", ["step", "dropped", "noise", "precision",
                                                                      "top reasons"], pre),
        (f"Clean rows lost: {cl['lost']} of {cl['clean_rows']} ({cl['share']:.1%})" if cl["share"] is not None
         else "Clean rows lost", ["step", "reason", "rows", "share of clean rows"], lost),
    ]


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str)):
            out.append((prefix + k, round(v, 4) if isinstance(v, float) else v))
    return out


# ---- recipes compared ----------------------------------------------------------------------------
# The download step is found by what its manifest records, not by its name: the spine names no stage.
DOWNLOADED_KEY = "urls_downloaded"  # unique URLs handed to the downloader
DOWNLOAD_KEY = "download"  # the downloader's stats: {"unique_urls", "seconds", ...}


def _step_seconds(m: dict) -> float:
    return sum(v for k, v in (m.get("timings") or {}).items() if k.endswith("_s") and isinstance(v, (int, float)))


def _urls_downloaded(m: dict) -> int | None:
    if isinstance(m.get(DOWNLOADED_KEY), int):
        return m[DOWNLOADED_KEY]
    d = m.get(DOWNLOAD_KEY)
    return d.get("unique_urls") if isinstance(d, dict) and isinstance(d.get("unique_urls"), int) else None


def folder_bytes(folder: str) -> int:
    """Bytes of every file under `folder` (local or fsspec); 0 when there is no such folder."""
    fs, p = shards.fs_and_path(folder)
    if not fs.exists(p):
        return 0
    return int(sum(info.get("size") or 0 for info in fs.find(p, detail=True).values()))


def started_from(ms: list[dict]) -> str | None:
    """The URL list (or input) a run started from, given its steps' manifests in recipe order: a download step's
    `url_list` (the download may come after curation steps, text-first), else the first step's input; one spelling
    of a local path."""
    src = next((m["url_list"] for m in ms if m.get("url_list")), None) or (ms[0].get("input") if ms else None)
    if not src:
        return None
    return str(src).rstrip("/") if "://" in str(src) else os.path.normpath(os.path.abspath(str(src)))


def recipe_summary(run_dir: str) -> dict:
    """What a run's recipe cost and gave, from its manifests: its steps, the URLs it downloaded, the bytes of
    its image store, the rows its last step kept (and their uids), the recorded stage time. The final set is the
    recipe's last step's kept shards when that step has finished, else the last finished step's (`final_step`
    says which, `finished` whether it is the recipe's last)."""
    from pipeline import config as config_mod
    from pipeline import recipe
    from pipeline.images import ImageStore, within

    steps = stage_folders(run_dir)
    try:
        planned = [s.name for s in recipe.of_config(config_mod.saved_config(run_dir) or config_mod.resolve({}))]
    except (StageError, ValueError):
        planned = [n for n, _ in steps]
    ms = [(n, shards.read_json(shards.join(f, "_manifest.json")) or {}) for n, f in steps]
    downloaded = [d for d in (_urls_downloaded(m) for _, m in ms) if d is not None]
    download_s = sum(float((m.get(DOWNLOAD_KEY) or {}).get("seconds") or 0) for _, m in ms
                     if isinstance(m.get(DOWNLOAD_KEY), dict))
    store = ImageStore.load(run_dir)
    out = {
        "run": posixpath.basename(str(run_dir).rstrip("/")),
        "recipe": planned,
        "finished": [n for n, _ in steps],
        "urls_downloaded": sum(downloaded) if downloaded else None,
        "store_root": store.root if store else None,
        "store_bytes": folder_bytes(store.root) if store else None,
        "store_in_run": bool(store) and within(store.root, run_dir),
        "stage_seconds": round(sum(_step_seconds(m) for _, m in ms), 3),
        "download_seconds": round(download_s, 3),
        "started_from": started_from([m for _, m in ms]),
    }
    out["seconds"] = round(out["stage_seconds"] + out["download_seconds"], 3)
    if steps:
        name, folder = steps[-1]
        uids: list[str] = []
        for f in _parts(folder):
            if "uid" in shards.read_schema(f).names:
                uids += shards.read_shard(f, columns=["uid"]).column("uid").to_pylist()
        out.update(final_step=name, rows_out=ms[-1][1].get("rows_out"), uids=set(uids),
                   complete=bool(planned) and name == planned[-1])
    else:
        out.update(final_step=None, rows_out=None, uids=set(), complete=False)
    return out


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.1f}"


def compare_section(run_dir: str, other_dir: str, other: str) -> dict:
    """The "Recipes compared" section: this run and `other` side by side (recipe, URLs downloaded, image store
    bytes, emitted rows, recorded time) and their final sets by uid. A missing other run is one line, not an
    error."""
    title = "Recipes compared"
    if not shards.exists(other_dir) or not stage_folders(other_dir):
        what = "does not exist" if not shards.exists(other_dir) else "has no finished step yet"
        line = f"run {other} ({other_dir}) {what}: nothing to compare with."
        return _section(title, text=line, compare={"missing": line})
    a, b = recipe_summary(run_dir), recipe_summary(other_dir)
    header = ["run", "recipe", "URLs downloaded", "image store bytes", "image store MiB", "final step",
              "rows emitted", "stage time s", "of which download s"]
    rows = []
    for s in (a, b):
        store = s["store_bytes"]
        if store is not None and not s["store_in_run"]:
            store_note = " (in place: not written by this run)"
        else:
            store_note = ""
        rows.append([s["run"], " → ".join(s["recipe"]),
                     "" if s["urls_downloaded"] is None else s["urls_downloaded"],
                     "" if store is None else store, _mib(store) + store_note,
                     (s["final_step"] or "") + ("" if s["complete"] else " (recipe not finished)"),
                     "" if s["rows_out"] is None else s["rows_out"], s["seconds"], s["download_seconds"]])
    both, only_a, only_b = a["uids"] & b["uids"], a["uids"] - b["uids"], b["uids"] - a["uids"]
    union = len(a["uids"] | b["uids"])

    def share(n: int, of: int) -> str:
        return f"{n / of:.1%}" if of else ""

    sets = [["in both", len(both), share(len(both), len(a["uids"])), share(len(both), len(b["uids"]))],
            [f"only in {a['run']}", len(only_a), share(len(only_a), len(a["uids"])), ""],
            [f"only in {b['run']}", len(only_b), "", share(len(only_b), len(b["uids"]))]]
    notes = ["stage time: the recorded stage time, the sum of every finished step's manifest timings plus the "
             "download's seconds; not a stopwatch (process starts, imports and commands outside the recipe, "
             "such as training, are not in it).",
             "image store bytes: the size of the run's image store folder (image_store.json); rows emitted: the "
             "last finished step's kept rows; the final sets compare the uids of those rows.",
             f"overlap (Jaccard): {share(len(both), union) or 'n/a'} of the {union} uids either run kept."]
    for s in (a, b):
        if not s["complete"]:
            notes.append(f"{s['run']}: its recipe's last step ({s['recipe'][-1] if s['recipe'] else '?'}) has not "
                         f"finished; its final set is {s['final_step'] or 'empty'}'s output.")
    if a["started_from"] and b["started_from"] and a["started_from"] != b["started_from"]:
        notes.append(f"the runs started from different inputs ({a['started_from']}, {b['started_from']}): "
                     "their final sets need not overlap.")
    elif a["uids"] and b["uids"] and not both:
        notes.append("the two final sets share no row: did both runs read the same URL list?")
    data = {k: {x: y for x, y in s.items() if x != "uids"} | {"uids": len(s["uids"])} for k, s in
            (("this", a), ("other", b))}
    data["sets"] = {"both": len(both), "only_this": len(only_a), "only_other": len(only_b), "union": union}
    return _section(title, text=f"This run ({a['run']}) against {b['run']}.", notes=notes,
                    tables=[Table("", header, rows),
                            Table("Final sets, by uid", ["rows", "count", f"share of {a['run']}",
                                                         f"share of {b['run']}"], sets)],
                    compare=data)


def build_report(run_dir: str, compare: str | None = None, truth: str | None = None) -> dict:
    """Write runs/NAME/report/report.md and report.html, both from the same sections. Returns what went in (for
    tests and the CLI). `compare`: another run's folder, compared in a "Recipes compared" section. `truth`: a
    labels file (uid, kind) for the filter quality section, checked first (default: the demo world's own,
    world_truth)."""
    ms = manifests(run_dir)
    if not ms:
        raise StageError(f"run {run_dir} has no finished stage yet: nothing to report")
    if truth is not None:
        from pipeline.truth import check_truth

        check_truth(truth)
    if not shards.is_local(run_dir):  # drawn in a local folder, then copied next to the run (s3://...)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="clipcurate-report-") as tmp:
            res = _build_report(run_dir, Path(tmp), compare, truth)
            dest = shards.join(run_dir, "report")
            fs, p = shards.fs_and_path(dest)
            fs.put(tmp.rstrip("/") + "/", p, recursive=True)
            return {**res, "html": shards.join(dest, "report.html"), "md": shards.join(dest, "report.md")}
    out_dir = Path(run_dir) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    return _build_report(run_dir, out_dir, compare, truth)


def _build_report(run_dir: str, out_dir: Path, compare: str | None = None, truth: str | None = None) -> dict:
    ms = manifests(run_dir)
    hooks = histograms(run_dir, str(out_dir))
    thumbs = thumbnails(run_dir)
    training = _training(run_dir, str(out_dir))
    training["no_eval"] = no_evaluation_why(Path(run_dir).name, training)
    _remove_undrawn(out_dir, [p for res in hooks.values() for _, p in res.get("figures", [])]
                    + ([training["curve"]] if training.get("curve") else []))
    funnel = funnel_rows(ms)
    truth = truth or world_truth(run_dir)
    quality = None
    if truth:
        from pipeline.truth import filter_quality

        quality = filter_quality(run_dir, truth, stage_folders(run_dir))
        shards.write_json(quality, str(out_dir / "filter_quality.json"))
    sections = _sections(ms, funnel, truth, quality, hooks, training, thumbs, out_dir)
    summary = summary_rows(run_dir, training)
    sections.insert(0, _section("Summary", tables=[Table("", ["", "this run"], summary)]))
    compared = None
    if compare is not None:  # after the funnel: what this recipe cost and kept against the other's
        cs = compare_section(run_dir, compare, posixpath.basename(str(compare).rstrip("/")))
        compared = cs["compare"]
        sections.insert(1, cs)
    run = Path(run_dir).name
    (out_dir / "report.md").write_text(render_markdown(run, sections))
    (out_dir / "report.html").write_text(render_html(run, sections))
    return {"manifests": ms, "funnel": funnel, "hooks": hooks, "thumb_groups": len(thumbs), "training": training,
            "filter_quality": quality, "sections": sections, "compare": compared, "summary": summary,
            "html": str(out_dir / "report.html"), "md": str(out_dir / "report.md")}


SCREENSHOT = "report.png"  # render-check's picture of the report, not one of its figures


def _remove_undrawn(out_dir: Path, drawn: list[str]) -> None:
    """Every figure in the report folder is one this report drew: a PNG left by an earlier report (a step rerun
    that no longer draws it, a hook that failed this time, a step gone from the recipe) is removed, so that no
    figure on disk or linked in an old page outlives the run it showed."""
    keep = {Path(p).resolve() for p in drawn} | {(out_dir / SCREENSHOT).resolve()}
    for png in out_dir.rglob("*.png"):
        if png.resolve() not in keep:
            log.info("report: removed %s, a figure this report no longer draws", png)
            png.unlink(missing_ok=True)


def _section(title: str, level: int = 2, **kw) -> dict:
    return {"title": title, "level": level, "text": "", "notes": [], "tables": [], "figures": [], "pre": "",
            "cards": [], **kw}


def _sections(ms, funnel, truth, quality, hooks, training, thumbs, out_dir: Path) -> list[dict]:
    """The report as data, in reading order: funnel, filter quality, timings, each stage's own figures and
    tables, training, ablation, sample thumbnails."""
    fh = ["stage", "rows in", "kept", "rejected", "reason", "rows (share of stage input)"]
    th = ["stage", "executor", "collect s", "merge s", "apply s", "finalize s", "total s", "rows/s"]
    rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731 - figures are linked next to the report
    out = [_section("Funnel", tables=[Table("", fh, funnel)],
                    notes=[f"{m['stage']}: {n}" for m in ms for n in m.get("notes", [])])]
    if quality:
        out.append(_section("Filter quality against the truth",
                            text=f"Labels: {truth} (pipeline/truth.py).",
                            tables=[Table(t, h, r) for t, h, r in filter_quality_tables(quality)]))
    out.append(_section("Timings", tables=[Table("", th, timing_rows(ms))]))
    for name, res in hooks.items():
        for title, path in res.get("figures", []):
            out.append(_section(f"{name}: {title}", 3, figures=[(title, rel(path))]))
        for t in res.get("tables", []):
            out.append(_section(f"{name}: {t.title}", 3, tables=[Table("", t.header, t.rows)]))
    if training.get("curve"):
        no_eval = [] if training.get("eval") else [f"No evaluation exists: {training['no_eval']}."]
        out.append(_section("Training", figures=[("training curve", rel(training["curve"]))], notes=no_eval))
    for name, ev in training.get("eval", {}).items():
        out.append(_section(name, 3, tables=[Table("", ["metric", "value"], [list(x) for x in _flat(ev)])]))
    if "ablation" in training:
        ab = training["ablation"]
        if "table" in ab:
            out.append(_section("Ablations", tables=[Table("", ab["table"]["header"], ab["table"]["rows"])]))
        else:  # an ablation.json written before ablations carried their table as data
            out.append(_section("Ablations", pre=ab.get("table_md") or json.dumps(ab, indent=2)))
    if thumbs:
        out.append(_section("Samples"))
    for g in thumbs:
        out.append(_section(f"{g['stage']}: {g['label']}", 3,
                            cards=[{"thumb": it["thumb"], "text": it["text"][:120]} for it in g["items"]]))
    return out


def render_markdown(run: str, sections: list[dict]) -> str:
    md = [f"# clipcurate run report: {run}", ""]
    for s in sections:
        md += ["#" * s["level"] + " " + s["title"], ""]
        if s["text"]:
            md += [s["text"], ""]
        for t in s["tables"]:
            if t.title:
                md += ["#" * (s["level"] + 1) + " " + t.title, ""]
            md += [t.markdown(), ""]
        md += [f"- {n}" for n in s["notes"]] + ([""] if s["notes"] else [])
        md += [f"![{title}]({src})" for title, src in s["figures"]] + ([""] if s["figures"] else [])
        if s["pre"]:
            md += [s["pre"], ""]
        if s["cards"]:
            md += [f"- {'(no image) ' if not c['thumb'] else ''}{c['text']}" for c in s["cards"]] + [""]
    return "\n".join(md)


def render_html(run: str, sections: list[dict]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(run=run, sections=sections)


# ---- browser check -----------------------------------------------------------------------------
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    import shutil

    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.getAttribute('src').slice(0, 80); });
  var figs = imgs.filter(function (i) { return i.className === 'fig'; });
  var out = document.createElement('pre');
  out.id = 'clipcurate-probe';
  out.textContent = JSON.stringify({images: imgs.length, figures: figs.length,
    figures_loaded: figs.filter(function (i) { return i.naturalWidth > 0; }).length, broken: broken});
  document.body.appendChild(out);
});
</script>"""


def render_check(html_path: str, png_path: str | None = None, browser: str | None = None, timeout: int = 120) -> dict:
    """Open the report in headless Chromium as a reader would (file://, no server): count images that
    failed to load, and optionally screenshot the page to `png_path`. The probe runs on a copy of the
    page next to it (same relative links), so the report itself is never modified."""
    import re
    import subprocess
    import tempfile

    browser = browser or find_browser()
    if not browser:
        raise FileNotFoundError("no Chromium found: install it with 'sudo apt-get install -y chromium'")
    src = Path(html_path).resolve()
    page = src.read_text(encoding="utf-8")
    probe = src.with_name(f".probe-{os.getpid()}.html")
    probe.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--hide-scrollbars", "--virtual-time-budget=10000"]
    try:
        with tempfile.TemporaryDirectory(prefix="clipcurate-chromium-") as profile:
            flags.append(f"--user-data-dir={profile}")
            dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                                 timeout=timeout, check=False)
            m = re.search(r'<pre id="clipcurate-probe">(.*?)</pre>', dom.stdout, re.S)
            if not m:
                raise RuntimeError(f"{browser} rendered no probe result (exit {dom.returncode}): "
                                   f"{dom.stderr.strip().splitlines()[-1:] or ''}")
            result = json.loads(html.unescape(m.group(1)))
            if png_path:
                png = Path(png_path).resolve()
                png.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run([browser, *flags, "--window-size=1280,3000", f"--screenshot={png}", src.as_uri()],
                               capture_output=True, text=True, timeout=timeout, check=False)
                result["png"] = str(png) if png.exists() and png.stat().st_size > 0 else None
    finally:
        probe.unlink(missing_ok=True)
    result["browser"] = browser
    return result


# ---- CLI -----------------------------------------------------------------------------------------
def cmd_histograms(args) -> int:
    run_dir = shards.join(args.runs_dir, args.run)
    out_dir = None
    if not shards.is_local(run_dir):  # figures are drawn on this machine: next to the current folder
        out_dir = os.path.abspath(f"report-{args.run}")
        print(f"{run_dir} is not on this machine: figures go to {out_dir} (`clipcurate report` puts them in the run)")
    with _writing_report(run_dir):
        results = histograms(run_dir, out_dir)
    n = 0
    for name, res in results.items():
        for title, path in res.get("figures", []):
            print(f"{name}: {title}: {path}")
            n += 1
        for t in res.get("tables", []):
            print(f"\n{name}: {t.title}\n{t.markdown()}")
    if not n:
        print(f"no figures: no finished stage in {run_dir} draws any yet")
    return 0


@contextlib.contextmanager
def _writing_report(run_dir: str):
    """A report folder that cannot be written (a read-only run folder, `report` made a file): one line. A missing
    file stays what it is (the CLI says it in one line already)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        where = e.filename or shards.join(run_dir, "report")
        raise StageError(f"cannot write the report in {where} ({e.strerror or e}): the run folder {run_dir} must be "
                         "writable, with report/ a folder") from None


def cmd_report(args) -> int:
    compare = shards.join(args.runs_dir, args.compare) if args.compare else None
    run_dir = shards.join(args.runs_dir, args.run)
    with _writing_report(run_dir):
        res = build_report(run_dir, compare, args.truth)
    # the run in a few lines: the summary, what each stage kept, how the trained model did
    for what, value in res["summary"]:
        print(f"{what}: {value}")
    print("funnel:")
    for m in res["manifests"]:
        top = ", ".join(f"{k} {v}" for k, v in sorted(m.get("reasons", {}).items(), key=lambda kv: -kv[1])[:4])
        print(f"  {m['stage']:>9}: {m['rows_in']:>8} in -> {m['rows_out']:>8} kept" + (f"   ({top})" if top else ""))
    for name, ev in res["training"].get("eval", {}).items():
        figures = {k: v for k, v in ev.items() if isinstance(v, float)}
        print(f"  {name}: " + "  ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    if res.get("compare"):
        _print_compare(res["compare"])
    print(f"report: {res['html']}  (and {res['md']})")
    return 0


def _print_compare(c: dict) -> None:
    if "missing" in c:
        print(f"recipes compared: {c['missing']}")
        return
    print("recipes compared:")
    for s in (c["this"], c["other"]):
        urls = "-" if s["urls_downloaded"] is None else s["urls_downloaded"]
        print(f"  {s['run']:>16}: {urls} URLs downloaded, image store {_mib(s['store_bytes']) or '-'} MiB, "
              f"{s['rows_out']} rows emitted, {s['seconds']:.1f} s recorded   ({' -> '.join(s['recipe'])})")
    sets = c["sets"]
    print(f"  final sets: {sets['both']} in both, {sets['only_this']} only in {c['this']['run']}, "
          f"{sets['only_other']} only in {c['other']['run']}")


def cmd_render_check(args) -> int:
    run_dir = shards.join(args.runs_dir, args.run)
    html_path = os.path.join(run_dir, "report", "report.html")
    if not os.path.exists(html_path):
        raise FileNotFoundError(f"{html_path} does not exist (run: clipcurate report --run {args.run})")
    png = args.png or os.path.join(run_dir, "report", "report.png")
    res = render_check(html_path, png)
    print(f"{res['browser']}: {res['images']} images, {res['figures_loaded']}/{res['figures']} figures loaded, "
          f"{len(res['broken'])} broken; screenshot: {res.get('png')}")
    for b in res["broken"]:
        print(f"  broken: {b}")
    return 1 if res["broken"] or res["figures_loaded"] < res["figures"] else 0


def register(sub) -> None:
    p = sub.add_parser("render-check", help="open report.html in headless Chromium: broken images? + a PNG screenshot")
    p.add_argument("--run", required=True)
    p.add_argument("--png", default=None, help="screenshot path (default runs/NAME/report/report.png)")
    p.set_defaults(fn=cmd_render_check, writes_run=True)  # report/report.png: main takes the run's lock
    p = sub.add_parser("histograms", help="draw each stage's histograms (PNG) and tables into runs/NAME/report/")
    p.add_argument("--run", required=True)
    # it writes runs/NAME/report/ for a local run (a remote run's figures go to the current folder)
    p.set_defaults(fn=cmd_histograms, writes_run=lambda a: shards.is_local(a.runs_dir))
    p = sub.add_parser("report", help="write runs/NAME/report/report.html and report.md")
    p.add_argument("--run", required=True)
    p.add_argument("--compare", default=None, metavar="OTHER",
                   help="another run (RUNS_DIR/OTHER) to compare recipes with: URLs downloaded, image store bytes, "
                        "rows emitted, recorded time, and the two final sets by uid")
    p.add_argument("--truth", default=None, metavar="FILE",
                   help="labels (Parquet: uid, kind) to judge the filters against, in a filter quality section "
                        "(default: a demo world's own truth, which its world.json records; none otherwise)")
    p.set_defaults(fn=cmd_report, writes_run=True)
