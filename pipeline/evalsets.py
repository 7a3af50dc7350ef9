"""Evaluation sets, as the rules that keep them out of the training set read them (align's dHash rule,
semdedup's embedding rule): a folder of image files (recursive), or a Parquet file or folder with an image-bytes
column (image/jpg/bytes/img, or a Hugging Face {bytes: ...} struct). An item's captions, where the set has them:
a Parquet text column (text/caption/captions/txt: a string or a list of strings per row), or beside a folder's
image the file of the same stem with `.txt` (the WebDataset and img2dataset convention).

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
TEXT_COLUMNS = ("text", "caption", "captions", "txt")
MAX_CAPTION_BYTES = 1 << 16  # of a caption read: a text encoder reads 77 tokens, memory stays bounded


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


def _first_column(table: pa.Table, names: tuple, holds) -> str | None:
    """The first of `names` that the table has with a type `holds` accepts."""
    return next((n for n in names if n in table.column_names and holds(table.schema.field(n).type)), None)


def _binary(t) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _string(t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def image_column(table: pa.Table) -> str | None:
    """The column holding image bytes (or a {bytes: ...} struct: a Hugging Face Image feature), if any."""
    return _first_column(table, IMAGE_COLUMNS,
                         lambda t: _binary(t) or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0))


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


def text_column(table: pa.Table) -> str | None:
    """The column holding captions (a string, or a list of strings, per row), if any."""
    return _first_column(table, TEXT_COLUMNS, lambda t: _string(t) or (
        (pa.types.is_list(t) or pa.types.is_large_list(t)) and _string(t.value_type)))


def captions_of(table: pa.Table) -> list[list[str]]:
    """Each row's non-empty captions ([] for a row without, or a table without a text column)."""
    name = text_column(table)
    if name is None:
        return [[] for _ in range(table.num_rows)]
    out = []
    for v in table.column(name).to_pylist():
        caps = v if isinstance(v, list) else [v]
        out.append([t for t in (_bounded(c) for c in caps if isinstance(c, str)) if t])
    return out


def _bounded(text: str) -> str:
    """A caption cut to its first MAX_CAPTION_BYTES of UTF-8 (a tokeniser encodes all of it before it truncates
    to 77 tokens), stripped."""
    raw = text.encode("utf-8")
    return (raw[:MAX_CAPTION_BYTES].decode("utf-8", errors="ignore") if len(raw) > MAX_CAPTION_BYTES else text).strip()


def _sidecar_caption(path: str, rel: str, sizes: dict) -> list[str]:
    """The caption file beside a folder's image (`a.jpg` -> `a.txt`), its first MAX_CAPTION_BYTES, if any."""
    txt = os.path.splitext(rel)[0] + ".txt"
    if txt not in sizes:
        return []
    fs, p = shards.fs_and_path(shards.join(path, txt))
    with fs.open(p, "rb") as f:
        text = _bounded(f.read(MAX_CAPTION_BYTES).decode("utf-8", errors="ignore"))
    return [text] if text else []


class EvalItems(NamedTuple):
    names: list[str]  # one per item, as `eval_item` names it
    blobs: list  # bytes, or None for a Parquet row without bytes
    captions: list  # per item, its captions (a list of str; [] for an item without)


def read_eval_items(path: str) -> EvalItems:
    """Every image of the eval set, with its name and captions. EvalSetError: a Parquet file without an image
    column."""
    files = eval_files(path)
    top = set_name(path)
    names: list[str] = []
    blobs: list = []
    captions: list = []
    parquet = parquet_files(path, files)
    if parquet:
        for f in parquet:
            t = shards.read_shard(f)
            label = top if f == path else f"{top}/{set_name(f)}"
            names.extend(f"{label}#{i}" for i in range(t.num_rows))
            blobs.extend(image_bytes(t, f))
            captions.extend(captions_of(t))
    else:
        sizes = dict(files)
        for rel, _ in files:
            if os.path.splitext(rel)[1].lower() in IMAGE_EXTS:
                names.append(f"{top}/{rel}")
                blobs.append(shards.read_bytes(shards.join(path, rel)))
                captions.append(_sidecar_caption(path, rel, sizes))
    return EvalItems(names, blobs, captions)
