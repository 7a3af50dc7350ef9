"""Evaluation sets, as the rules that keep them out of the training set read them (align's dHash rule,
semdedup's embedding rule): a folder of image files (recursive), or a Parquet file or folder with an image-bytes
column (image/jpg/bytes/img, or a Hugging Face {bytes: ...} struct).

Every item has a name that says where it is, for a rejected row's `eval_item`: `SET/RELATIVE/PATH.jpg` for a
folder's file, `SET/FILE.parquet#ROW` for a Parquet row (ROW counts from 0 in the file), with SET the eval set's
own folder or file name. The eval set is a path the user configured; names inside it are only ever joined under
it, and come from its listing, never from a row of the pool."""

from __future__ import annotations

import os
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
IMAGE_COLUMNS = ("image", "jpg", "bytes", "img")


class EvalSetError(ValueError):
    """An eval set that cannot be read (no image column); str() is one line."""


def eval_files(path: str) -> list[tuple[str, int]]:
    """(path relative to `path`, size) of every file of an eval set, local or fsspec (s3://...): a folder's files,
    recursively, in path order, or ("", size) for a single file. [] when there is nothing at `path`."""
    fs, p = shards.fs_and_path(path)
    if not fs.exists(p):
        return []
    if not fs.isdir(p):
        return [("", int(fs.info(p).get("size") or 0))]
    root = p.rstrip("/") + "/"
    found = [(f[len(root):], int(info.get("size") or 0)) for f, info in fs.find(p, detail=True).items()
             if f.startswith(root) and info.get("type", "file") != "directory"]
    return sorted(found, key=lambda x: x[0].split("/"))  # the order of the parts, as pathlib sorts paths


def set_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def image_column(table: pa.Table) -> str | None:
    """The column holding image bytes (or a {bytes: ...} struct), if any."""
    for name in IMAGE_COLUMNS:
        if name in table.column_names:
            t = table.schema.field(name).type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t):
                return name
            if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:  # Hugging Face Image feature
                return name
    return None


def image_bytes(table: pa.Table, where: str) -> list:
    """The table's image bytes, row by row (None: a row without). EvalSetError: it has no image column."""
    name = image_column(table)
    if name is None:
        raise EvalSetError(f"eval set {where} has no image column ({'/'.join(IMAGE_COLUMNS)})")
    col = table.column(name)
    if pa.types.is_struct(col.type):
        col = pc.struct_field(col, "bytes")
    return col.to_pylist()


def parquet_files(path: str, files: list[tuple[str, int]] | None = None) -> list[str]:
    """The eval set's Parquet files: the file itself, or a folder's own (not its subfolders'); [] for a folder of
    images."""
    files = eval_files(path) if files is None else files
    fs, fp = shards.fs_and_path(path)
    if not fs.isdir(fp):
        return [path]
    return [shards.join(path, rel) for rel, _ in files if "/" not in rel and rel.endswith(".parquet")]


class EvalImages(NamedTuple):
    names: list[str]  # one per item, as `eval_item` names it
    blobs: list  # bytes, or None for a Parquet row without bytes


def read_eval_images(path: str) -> EvalImages:
    """Every image of the eval set, with its name. EvalSetError: a Parquet file without an image column."""
    files = eval_files(path)
    top = set_name(path)
    names: list[str] = []
    blobs: list = []
    parquet = parquet_files(path, files)
    if parquet:
        for f in parquet:
            t = shards.read_shard(f)
            label = top if f == path else f"{top}/{set_name(f)}"
            names.extend(f"{label}#{i}" for i in range(t.num_rows))
            blobs.extend(image_bytes(t, f))
    else:
        for rel, _ in files:
            if os.path.splitext(rel)[1].lower() in IMAGE_EXTS:
                names.append(f"{top}/{rel}")
                blobs.append(shards.read_bytes(shards.join(path, rel)))
    return EvalImages(names, blobs)
