"""A run's curated output as the URL list: the text-first recipe downloads only what text curation kept.

Steps before ingest (align@text, metaclip, klite) run on the URL list as rows (`url_list_rows`: one row per
distinct valid (url, caption), the caption as `text`, its uid; malformed, not-UTF-8 and repeated rows set aside
with the reasons ingest gives them). Their output is a folder of shards with every column they computed
(`metaclip_entries`, `text_klite`, ...). `download_curated` groups its rows by URL (each surviving URL is fetched
once, with all its captions, as from a URL list) and sets every row aside, whole, in `_carry/`: one file per
img2dataset shard's worth of URLs, named in an extra column (`CARRY_COL`) that img2dataset carries through.
The ingest stage joins each shard's rows back to their carried columns by uid (`carried_columns`), so a row
leaves ingest with everything it had before the download, plus its image reference and sizes.

Why files beside the download and not a column of JSON through img2dataset: the carried columns keep their
Arrow types (lists, floats, nested), and a change to what an earlier step wrote (a klite gloss) rewrites the
carry, not the download: the download's fingerprint is the URL list's (urls and captions), the ingest stage's
includes the carry's digest.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import images, schema, shards
from pipeline.errors import StageError
from pipeline.hashing import fingerprint
from stages.ingest.urls import CAPTIONS_COL, group_by_url, read_url_list, reason_expr, split_rows

log = logging.getLogger("clipcurate.ingest")

CARRY_COL = "clipcurate_carry"  # img2dataset's extra column: the `_carry/` file holding the URL's rows
CARRY_DIR = "_carry"
CARRY_RECORD = "_carry.json"  # {"digest": ..., "files": n}: in the ingest stage's fingerprint
INVALID = "invalid"  # the carry file of rows that never reach img2dataset (malformed url, repeated row)
# what ingest itself computes for a row: never taken from the carry
OWN_COLUMNS = ("uid", "url", "text", images.REF_COL, "width", "height", "orig_width", "orig_height")


# ---- the URL list as rows, for steps that run before the download --------------------------------------
def url_list_rows(path: str, out_dir: str, url_col: str, caption_col: str, shard_size: int, policy=None) -> dict:
    """Write the URL list as row shards (uid, url, text) under `out_dir`, `shard_size` rows each, and its
    malformed, not-UTF-8 and repeated rows under `out_dir/rejected/` with ingest's reasons. Skipped when the list's
    content is what the folder was written from. Returns {"rows", "kept", "rejected", "reasons"}. `policy`: the
    egress policy (pipeline/egress.py) that sets aside URLs refused without a request."""
    digest = shards.content_digest(str(path))
    marker = shards.join(out_dir, "_url_list.json")
    prior = shards.read_json(marker)
    allowed = sorted(policy.allow_private_hosts) if policy is not None else []
    if prior and prior.get("digest") == digest and prior.get("shard_size") == shard_size \
            and prior.get("allow_private_hosts", []) == allowed:
        return prior["summary"]
    df = read_url_list(path, url_col, caption_col)
    good, bad = split_rows(df, policy)  # the rows ingest would download, one per distinct (url, caption)
    if good.height == 0 and bad.height == 0:
        raise StageError(f"ingest: URL list {path} has no rows")
    good = good.select("url", text="caption")
    if shards.exists(out_dir):
        shards.remove(out_dir)
    shards.makedirs(out_dir)
    rows = good.to_arrow()
    rows = pa.table({"uid": schema.compute_uid(rows.column("url"), rows.column("text")),
                     "url": rows.column("url").cast(pa.string()), "text": rows.column("text").cast(pa.string())})
    for k, start in enumerate(range(0, max(rows.num_rows, 1), shard_size)):
        shards.write_shard(rows.slice(start, shard_size), shards.join(out_dir, f"part-{k:05d}.parquet"))
    reasons: dict[str, int] = {}
    if bad.height:
        rej = bad.select("url", text="caption", reason=reason_expr()).to_arrow()
        rej = rej.add_column(0, "uid", schema.compute_uid(rej.column("url"), rej.column("text")))
        shards.write_shard(rej, shards.join(out_dir, "rejected", "part-00000.parquet"))
        for r, n in bad.group_by("status").len().iter_rows():
            reasons[r] = n
    summary = {"rows": df.height, "kept": rows.num_rows, "rejected": bad.height, "reasons": reasons}
    source = str(path) if "://" in str(path) else os.path.abspath(str(path))
    shards.write_json({"digest": digest, "shard_size": shard_size, "summary": summary, "source": source,
                       "allow_private_hosts": allowed}, marker)
    return summary


# ---- a run's curated output, grouped for the download --------------------------------------------------
def is_curated_folder(folder: str) -> bool:
    """A folder of row shards (uid, url, text) that is not an img2dataset output (no *_stats.json)."""
    fs, p = shards.fs_and_path(folder)
    if not fs.isdir(p) or fs.glob(f"{p.rstrip('/')}/[0-9]*_stats.json"):  # img2dataset's NNNNN_stats.json
        return False
    paths = shards.list_shards(folder)
    return bool(paths) and {"uid", "url", "text"} <= set(shards.read_schema(paths[0]).names)


def _read_rows(folder: str) -> pa.Table:
    """Every row of the folder, every column but image bytes (a curated row never needs them here)."""
    tables = []
    for path in shards.list_shards(folder):
        sch = shards.read_schema(path)
        byte_col = images.byte_column(sch)
        tables.append(shards.read_shard(path, columns=[c for c in sch.names if c != byte_col]))
    if not tables:
        raise StageError(f"ingest: {folder} holds no Parquet shards")
    return pa.concat_tables(tables, promote_options="permissive")


def group_curated(folder: str, stage_dir: str, shard_size: int, policy=None) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """(grouped URL list with `CARRY_COL`, rejected list rows with `CARRY_COL`, info) for a curated folder; every
    row's columns written to `<stage>/_carry/` by the img2dataset shard its URL will land in."""
    rows = _read_rows(folder)
    missing = [c for c in ("url", "text") if c not in rows.column_names]
    if missing:
        raise StageError(f"ingest: {folder} has no column {', '.join(missing)}: not a run's curated output")
    df = pl.from_arrow(rows.select(["url", "text"])).select(pl.col("url").cast(pl.String),
                                                           caption=pl.col("text").cast(pl.String))
    grouped, bad = group_by_url(df, policy)
    # the img2dataset shard a URL lands in: its position in the grouped list // shard_size
    grouped = grouped.with_columns((pl.int_range(pl.len()) // shard_size).cast(pl.String).str.zfill(5).alias(CARRY_COL))
    bad = bad.with_columns(pl.lit(INVALID).alias(CARRY_COL))

    # the carry: each row whole, keyed by the uid ingest will give it (url as img2dataset gets it, stripped)
    key = schema.compute_uid(pc.utf8_trim_whitespace(rows.column("url").cast(pa.string())), rows.column("text"))
    carried = rows.drop_columns([c for c in OWN_COLUMNS if c in rows.column_names]).append_column("uid", key)
    where = (pl.from_arrow(pa.table({"url": pc.utf8_trim_whitespace(rows.column("url").cast(pa.string()))}))
             .join(grouped.select("url", CARRY_COL), on="url", how="left", maintain_order="left")[CARRY_COL]
             .fill_null(INVALID))
    carry_dir = shards.join(stage_dir, CARRY_DIR)
    if shards.exists(carry_dir):
        shards.remove(carry_dir)
    shards.makedirs(carry_dir)
    # one pass: rows ordered by carry file (a stable sort keeps their order within one), each file a slice
    names = where.to_arrow()
    order = pc.sort_indices(names)
    carried, names = carried.take(order), names.take(order).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]]) if len(names) else np.zeros(0, np.int64)
    digests = []
    for start, end in zip(starts, np.r_[starts[1:], len(names)]):
        path = shards.join(carry_dir, f"{names[start]}.parquet")
        shards.write_shard(carried.slice(start, end - start), path)
        digests.append((str(names[start]), shards.content_digest(path)))
    shards.write_json({"digest": fingerprint(digests), "files": len(digests),
                       "columns": [c for c in carried.column_names if c != "uid"]},
                      shards.join(carry_dir, CARRY_RECORD))
    info = {"curated_rows": rows.num_rows, "carried_columns": [c for c in carried.column_names if c != "uid"]}
    return grouped, bad, info


def carry_record(stage_dir: str) -> dict | None:
    return shards.read_json(shards.join(stage_dir, CARRY_DIR, CARRY_RECORD))


def read_carry(carry_names: list[str], stage_dir: str) -> pa.Table | None:
    """The carried rows of the carry files named (one img2dataset shard's: usually one file)."""
    parts = [shards.read_shard(shards.join(stage_dir, CARRY_DIR, f"{n}.parquet"))
             for n in sorted(set(carry_names)) if n]
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def carried_columns(table: pa.Table, carry: pa.Table | None) -> pa.Table:
    """`table` (rows with uid) with the columns its rows had before the download (`read_carry`). A row with no
    carried row (none should be) gets nulls."""
    if carry is None:
        return table
    extra = [c for c in carry.column_names if c != "uid" and c not in table.column_names]
    if not extra:
        return table
    carry_df = pl.from_arrow(carry.select(["uid", *extra])).unique("uid", keep="first", maintain_order=True)
    joined = (pl.from_arrow(table.select(["uid"])).join(carry_df, on="uid", how="left", maintain_order="left")
              .to_arrow())
    for name in extra:  # back to the carried Arrow types (polars gives large strings and lists)
        table = table.append_column(carry.schema.field(name), joined.column(name).cast(carry.schema.field(name).type))
    return table


__all__ = ["CARRY_COL", "url_list_rows", "is_curated_folder", "group_curated", "read_carry", "carried_columns",
           "carry_record",
           "CAPTIONS_COL"]
