"""What a worker task reads: its shard, checked (the image bytes left out, an `image_ref` per row of the run's
image store, rows no stage may see set aside with their reason), and the context a stage's hooks get (folders,
the notes sink, the image reader for a stage that reads pixels, the stage's survey)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import codec, images, resume, schema, shards
from pipeline.context import ShardContext
from pipeline.errors import StageError


def read_checked(stage, path: str, store: "images.ImageStore | None" = None,
                 max_text_bytes: int = schema.MAX_TEXT_BYTES) -> pa.Table:
    """The shard's metadata, checked: every column but the image bytes, which no stage reads from a shard.
    A shard of the image store itself (ingest's download, a crawl or a pool given with --input) gets an
    `image_ref` naming each of its rows instead. Rows no stage may see are flagged for `set_aside_bad_rows`
    (`schema.ROW_ERROR_COL`): text that is not UTF-8, a uid that is not 32 lowercase hex characters, text over
    `[run] max_text_bytes` (cut to that here: nothing after the reader holds a 10 MB caption)."""
    table, had_bytes = read_metadata(path)
    in_store = store is not None and store.format == "parquet" and store.holds(resume.parent_dir(path))
    if had_bytes and not in_store:  # its bytes would be dropped and nothing would name them: refuse
        raise StageError(f"{stage.name}: shard {shards.shard_name(path)} holds image bytes but is not in the run's "
                         f"image store ({images.STORE_FILE}); give its folder with --input")
    if in_store and had_bytes:
        if images.REF_COL in table.column_names:
            table = table.drop_columns([images.REF_COL])
        table = table.append_column(images.REF_COL, images.parquet_refs(shards.shard_name(path), table.num_rows))
    if "text" in stage.requires:  # first: a pool without text lacks its uid too, but text is what to fix
        table = schema.check_columns(table, {"text": pa.string()}, shards.shard_name(path), stage.name)
        table = schema.ensure_uid(table)  # a uid computed here is always valid; the pool's own are checked below
    table = schema.check_columns(table, stage.requires, shards.shard_name(path), stage.name)
    table, cut = schema.flag_row_limits(table, max_text_bytes, uid="uid" in stage.requires,
                                        text="text" in stage.requires)
    if cut:  # the long values were only in the tables just dropped
        schema.release_cut_memory()
    return table


def read_metadata(path: str) -> tuple[pa.Table, bool]:
    """(every column but the image-bytes column, whether the shard had one)."""
    sch = shards.read_schema(path)
    byte_col = images.byte_column(sch)
    if byte_col is None:
        return shards.read_shard(path), False
    keep = [c for c in sch.names if c != byte_col]
    return shards.read_shard(path, columns=keep), True


def good_rows(stage, path: str, ctx: ShardContext, max_text_bytes: int) -> pa.Table:
    """The rows of the shard a stage's pass 1 sees (survey, collect): those the reader did not set aside."""
    good, _ = set_aside_bad_rows(read_checked(stage, path, images.ImageStore.load(ctx.run_dir), max_text_bytes))
    return good


def shard_context(stage, stage_dir: str, shard: str, verify: bool = False) -> ShardContext:
    """What a stage's hooks get besides the table: run and stage folders, the shard, a notes sink, and, for a
    stage that declares `needs_pixels`, the run's image reader (the others never get one)."""
    run_dir = resume.parent_dir(stage_dir)
    reader = images.run_reader(run_dir) if stage.needs_pixels else None
    return ShardContext(stage=stage.name, run_dir=run_dir, stage_dir=stage_dir, shard=shard, images=reader,
                        needs_pixels=stage.needs_pixels, verify=verify,
                        survey=survey_for(stage_dir) if stage.has_survey else None)


def set_aside_bad_rows(table: pa.Table) -> tuple[pa.Table, pa.Table | None]:
    """(rows a stage may see, rows the reader marked unusable with their reason: `schema.ROW_ERROR_COL`,
    invalid_utf8, invalid_uid, text_too_long): collect never counts them, apply's rejected gets them with that
    reason. Filters only: no Python object per row (a too-long text was already cut by the reader)."""
    if schema.ROW_ERROR_COL not in table.column_names:
        return table, None
    err = table.column(schema.ROW_ERROR_COL)
    ok = pc.is_null(err)
    good = table.filter(ok).drop_columns([schema.ROW_ERROR_COL])
    bad = table.filter(pc.invert(ok))
    bad = bad.drop_columns([schema.ROW_ERROR_COL]).append_column("reason", bad.column(schema.ROW_ERROR_COL))
    return good, bad


def set_aside_notes(stage: str, bad: pa.Table, max_text_bytes: int) -> list[str]:
    """A line for the manifest per reason the reader set rows aside for (`schema.ROW_ERROR_NOTES`)."""
    out = []
    for reason in pc.unique(bad.column("reason")).to_pylist():
        what = schema.ROW_ERROR_NOTES.get(reason, "rows the reader could not use are rejected")
        out.append(f"{stage}: {what.format(max_text_bytes=max_text_bytes)} ({reason})")
    return sorted(out)


# ---- the survey a stage concluded (Stage.survey), read once per process -------------------------------------
def survey_path(stage_dir: str) -> str:
    return shards.join(stage_dir, "survey", "survey.data")


_SURVEY_CACHE: dict[str, tuple[tuple, Any]] = {}


def survey_for(stage_dir: str) -> Any:
    """The stage's concluded survey (None before it exists: the survey pass itself), read once per process while
    the file is unchanged."""
    path = survey_path(stage_dir)
    try:
        fs, p = shards.fs_and_path(path)
        info = fs.info(p)
    except (OSError, FileNotFoundError):
        return None
    stamp = (info.get("size"), str(info.get("mtime") or info.get("LastModified") or ""))
    cached = _SURVEY_CACHE.get(path)
    if cached is None or cached[0] != stamp:
        try:
            value = codec.decode(shards.read_bytes(path))
        except codec.CodecError as e:
            raise StageError(f"survey {path}: {e}; rerun the stage") from None
        _SURVEY_CACHE.clear()  # one stage's survey at a time per process
        _SURVEY_CACHE[path] = cached = (stamp, value)
    return cached[1]
