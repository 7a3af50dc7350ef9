"""The report's commands: `clipcurate report`, `histograms` and `render-check` (registered by pipeline/cli.py)."""

from __future__ import annotations

import contextlib
import os

from pipeline import shards
from pipeline.errors import StageError
from pipeline.report.browser import render_check
from pipeline.report.build import build_report
from pipeline.report.compare import mib
from pipeline.report.figures import histograms


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
        print(f"  {s['run']:>16}: {urls} URLs downloaded, image store {mib(s['store_bytes']) or '-'} MiB, "
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
