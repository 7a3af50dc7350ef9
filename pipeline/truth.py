"""Filter quality against the truth: how a run's drops match a labelled world (the demo world's truth.parquet,
one `kind` per row: `clean` or a noise kind).

  recall     per kind: the share of its rows that the run dropped, and which step dropped them
  precision  per step: the share of its drops that were noise (kind != clean)
  clean lost per step and reason: the clean rows dropped

A row is counted at the first step that dropped it (a step's `rejected/` shards: `uid`, `reason`); the reason's
category is what precedes its first ':' ("failed_to_download: HTTP Error 404" -> failed_to_download). Steps are
the run's finished recipe steps in order (as the report lists them): the table names no stage. Rows of the truth
that no step holds and none dropped (a list row img2dataset never reported) are counted as `unaccounted`, never
silently as kept. Duplicates are judged by group (`_stand_ins`): keeping any one copy of a group is right.
"""

from __future__ import annotations

import polars as pl

from pipeline import shards
from pipeline.errors import StageError
from pipeline.layout import stage_folders

REQUIRED = ("uid", "kind")


def check_truth(path: str) -> None:
    """A truth file a user names (`report --truth`, `ablate --truth`) is checked before any table is drawn: a file
    that is missing, not Parquet, or without `uid` and `kind` is one line (a StageError), never a traceback from
    deep in a join."""
    try:
        cols = pl.read_parquet_schema(path)
    except FileNotFoundError:
        raise StageError(f"truth file {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - polars/pyarrow raise several kinds for a file that is not Parquet
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StageError(f"truth file {path} is not a readable Parquet file ({first})") from None
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise StageError(f"truth file {path} has no {', '.join(missing)} column: a truth file holds one row per "
                         "uid with its `kind` (clean or a noise kind), as a demo world's truth.parquet does")


def _uids(folder: str, columns: list[str]) -> pl.DataFrame:
    paths = shards.list_shards(folder) if shards.exists(folder) else []
    frames = [pl.from_arrow(shards.read_shard(p, columns=columns)) for p in paths]
    frames = [f for f in frames if f.height]
    if not frames:
        return pl.DataFrame(schema={c: pl.String for c in columns})
    return pl.concat(frames, how="vertical_relaxed")


def drops(steps: list[tuple[str, str]]) -> pl.DataFrame:
    """(uid, step, reason) for every row the steps (name, folder) dropped, at the first step that dropped it."""
    out = []
    for i, (name, folder) in enumerate(steps):
        rej = _uids(shards.join(folder, "rejected"), ["uid", "reason"])
        out.append(rej.with_columns(step=pl.lit(name), order=pl.lit(i),
                                    reason=pl.col("reason").str.split(":").list.first().str.strip_chars()))
    if not out:
        return pl.DataFrame(schema={"uid": pl.String, "step": pl.String, "reason": pl.String})
    return pl.concat(out).sort("order", maintain_order=True).unique("uid", keep="first", maintain_order=True) \
        .select("uid", "step", "reason")


def _stand_ins(rows: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Which copy of a duplicate group is "the original" is the world's arbitrary choice (truth's `dup_group`:
    the original's uid, on the original too). A run that keeps one copy of a group and drops the rest has caught
    every duplicate, whichever copy it kept. So where the original was dropped and a copy kept, the kept copy
    (the smallest uid among them) is counted as the group's clean row and the original as that copy's kind."""
    if "dup_group" not in rows.columns:
        return rows, 0
    g = rows.filter(pl.col("dup_group").is_not_null())
    orig = g.filter((pl.col("uid") == pl.col("dup_group")) & ~pl.col("kept")).select("dup_group")
    kept = g.filter((pl.col("uid") != pl.col("dup_group")) & pl.col("kept")).sort("uid") \
        .unique("dup_group", keep="first", maintain_order=True).select("dup_group", stand_in="uid", its_kind="kind")
    swap = orig.join(kept, on="dup_group")
    if not swap.height:
        return rows, 0
    relabel = pl.concat([swap.select(uid="dup_group", new_kind="its_kind"),
                         swap.select(uid="stand_in", new_kind=pl.lit("clean"))])
    rows = rows.join(relabel, on="uid", how="left", maintain_order="left") \
        .with_columns(kind=pl.coalesce("new_kind", "kind")).drop("new_kind")
    return rows, swap.height


def filter_quality(run_dir: str, truth_path: str, steps: list[tuple[str, str]] | None = None) -> dict:
    """The recall / precision / clean-lost tables of a run against its world's truth. `steps`: (name, folder)
    of the finished steps in recipe order (default: the run's, as the report lists them)."""
    if steps is None:
        steps = stage_folders(run_dir)
    cols = [c for c in ("uid", "kind", "dup_group") if c in pl.read_parquet_schema(truth_path)]
    truth = pl.read_parquet(truth_path, columns=cols)
    dropped = drops(steps)
    kept = _uids(steps[-1][1], ["uid"]) if steps else pl.DataFrame(schema={"uid": pl.String})
    rows = truth.join(dropped, on="uid", how="left").with_columns(
        kept=pl.col("uid").is_in(kept["uid"].implode()))
    rows = rows.with_columns(
        step=pl.when(pl.col("step").is_null() & ~pl.col("kept")).then(pl.lit("unaccounted")).otherwise(pl.col("step")))
    rows, swapped = _stand_ins(rows)

    recall = {}
    for (kind,), g in rows.group_by("kind", maintain_order=True):
        n = g.height
        by_step = dict(g.filter(pl.col("step").is_not_null()).group_by("step").len().sort("step").iter_rows())
        n_drop = sum(v for k, v in by_step.items() if k != "unaccounted")
        recall[kind] = {"rows": n, "dropped": n_drop, "recall": round(n_drop / n, 4) if n else None,
                        "by_step": by_step}
    precision = {}
    for step, _ in steps:
        g = rows.filter(pl.col("step") == step)
        noise = int((g["kind"] != "clean").sum())
        precision[step] = {"dropped": g.height, "noise": noise,
                           "precision": round(noise / g.height, 4) if g.height else None,
                           "by_reason": dict(g.group_by("reason").len()  # ties by name: the same report every time
                                             .sort(["len", "reason"], descending=[True, False]).iter_rows())}
    order = {name: i for i, (name, _) in enumerate(steps)}
    clean = rows.filter(pl.col("kind") == "clean")
    lost = clean.filter(pl.col("step").is_not_null() & (pl.col("step") != "unaccounted"))
    return {
        "truth": truth_path, "rows": truth.height, "kept": int(rows["kept"].sum()), "stand_ins": swapped,
        "recall": dict(sorted(recall.items())), "precision": precision,
        "clean_lost": {"clean_rows": clean.height, "lost": lost.height,
                       "share": round(lost.height / clean.height, 4) if clean.height else None,
                       "by_step_reason": [{"step": s, "reason": r, "rows": n} for s, r, n in sorted(
                           lost.group_by("step", "reason").len().iter_rows(),
                           key=lambda x: (order.get(x[0], len(order)), -x[2], x[1]))]},
    }
