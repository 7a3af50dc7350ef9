"""Recipes compared (`report --compare OTHER`): what two runs' recipes cost and kept, side by side, from their
manifests (URLs downloaded, image store bytes, rows emitted, recorded time) and their final sets by uid."""

from __future__ import annotations

import posixpath

from pipeline import shards
from pipeline.images import ImageStore, within
from pipeline.layout import part_shards, read_manifest, stage_folders, started_from
from pipeline.report.sections import Table, planned_steps, section


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


def recipe_summary(run_dir: str) -> dict:
    """What a run's recipe cost and gave, from its manifests: its steps, the URLs it downloaded, the bytes of
    its image store, the rows its last step kept (and their uids), the recorded stage time. The final set is the
    recipe's last step's kept shards when that step has finished, else the last finished step's (`final_step`
    says which, `finished` whether it is the recipe's last)."""
    steps = stage_folders(run_dir)
    planned = planned_steps(run_dir, [n for n, _ in steps])
    ms = [(n, read_manifest(f) or {}) for n, f in steps]
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
        for f in part_shards(folder):
            if "uid" in shards.read_schema(f).names:
                uids += shards.read_shard(f, columns=["uid"]).column("uid").to_pylist()
        out.update(final_step=name, rows_out=ms[-1][1].get("rows_out"), uids=set(uids),
                   complete=bool(planned) and name == planned[-1])
    else:
        out.update(final_step=None, rows_out=None, uids=set(), complete=False)
    return out


def mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.1f}"


def compare_section(run_dir: str, other_dir: str, other: str) -> dict:
    """The "Recipes compared" section: this run and `other` side by side (recipe, URLs downloaded, image store
    bytes, emitted rows, recorded time) and their final sets by uid. A missing other run is one line, not an
    error."""
    title = "Recipes compared"
    if not shards.exists(other_dir) or not stage_folders(other_dir):
        what = "does not exist" if not shards.exists(other_dir) else "has no finished step yet"
        line = f"run {other} ({other_dir}) {what}: nothing to compare with."
        return section(title, text=line, compare={"missing": line})
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
                     "" if store is None else store, mib(store) + store_note,
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
    return section(title, text=f"This run ({a['run']}) against {b['run']}.", notes=notes,
                   tables=[Table("", header, rows),
                           Table("Final sets, by uid", ["rows", "count", f"share of {a['run']}",
                                                        f"share of {b['run']}"], sets)],
                   compare=data)
