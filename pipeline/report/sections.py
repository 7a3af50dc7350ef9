"""The report as data: the tables (`Table`, which the stages' report hooks return too), the summary at the top,
the funnel and timings, and the list of sections in reading order that render.py turns into Markdown and HTML.
Nothing here draws or writes a file."""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from pathlib import Path

from pipeline import stale
from pipeline.errors import StageError
from pipeline.layout import read_manifest, recipe_steps, stage_folders, started_from
from pipeline.report.quality import filter_quality_tables


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


def section(title: str, level: int = 2, **kw) -> dict:
    return {"title": title, "level": level, "text": "", "notes": [], "tables": [], "figures": [], "pre": "",
            "cards": [], **kw}


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


def planned_steps(run_dir: str, finished: list[str]) -> list[str]:
    """The step names of the run's recipe (its saved config's), or the finished ones where it has none readable."""
    try:
        return [s.name for s in recipe_steps(run_dir)]
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
    ms = [read_manifest(folder) or {} for _, folder in steps]
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
    try:
        return stale.find(run_dir).describe(posixpath.basename(str(run_dir).rstrip("/")))
    except (StageError, ValueError) as e:
        return f"not judged: {e}"


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str)):
            out.append((prefix + k, round(v, 4) if isinstance(v, float) else v))
    return out


def report_sections(ms, funnel, truth, quality, hooks, training, thumbs, out_dir: Path) -> list[dict]:
    """The report as data, in reading order: funnel, filter quality, timings, each stage's own figures and
    tables, training, ablation, sample thumbnails."""
    fh = ["stage", "rows in", "kept", "rejected", "reason", "rows (share of stage input)"]
    th = ["stage", "executor", "collect s", "merge s", "apply s", "finalize s", "total s", "rows/s"]
    rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731 - figures are linked next to the report
    out = [section("Funnel", tables=[Table("", fh, funnel)],
                   notes=[f"{m['stage']}: {n}" for m in ms for n in m.get("notes", [])])]
    if quality:
        out.append(section("Filter quality against the truth",
                           text=f"Labels: {truth} (pipeline/truth.py).",
                           tables=[Table(t, h, r) for t, h, r in filter_quality_tables(quality)]))
    out.append(section("Timings", tables=[Table("", th, timing_rows(ms))]))
    for name, res in hooks.items():
        for title, path in res.get("figures", []):
            out.append(section(f"{name}: {title}", 3, figures=[(title, rel(path))]))
        for t in res.get("tables", []):
            out.append(section(f"{name}: {t.title}", 3, tables=[Table("", t.header, t.rows)]))
    if training.get("curve"):
        no_eval = [] if training.get("eval") else [f"No evaluation exists: {training['no_eval']}."]
        out.append(section("Training", figures=[("training curve", rel(training["curve"]))], notes=no_eval))
    for name, ev in training.get("eval", {}).items():
        out.append(section(name, 3, tables=[Table("", ["metric", "value"], [list(x) for x in _flat(ev)])]))
    if "ablation" in training:
        ab = training["ablation"]
        if "table" in ab:
            out.append(section("Ablations", tables=[Table("", ab["table"]["header"], ab["table"]["rows"])]))
        else:  # an ablation.json written before ablations carried their table as data
            out.append(section("Ablations", pre=ab.get("table_md") or json.dumps(ab, indent=2)))
    if thumbs:
        out.append(section("Samples"))
    for g in thumbs:
        out.append(section(f"{g['stage']}: {g['label']}", 3,
                           cards=[{"thumb": it["thumb"], "text": it["text"][:120]} for it in g["items"]]))
    return out
