"""Bring your own crawl: an img2dataset output folder (Parquet or WebDataset) used in place as the run's image
store; ingest converts its metadata to rows (a WebDataset crawl's tars are indexed once for that)."""

from __future__ import annotations

import json
import logging
import os

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import images, shards
from pipeline.images import REF_COL, ImageStore
from pipeline.stage import StageError, fingerprint

log = logging.getLogger("clipcurate.ingest")


# ---- bring your own crawl: an img2dataset output folder, used in place -------------------------------------
# img2dataset writes, per shard NNNNN: `NNNNN_stats.json`, and either `NNNNN.parquet` (every sample, the image
# bytes in a `jpg`/`png`/`webp` column, null for failures) or `NNNNN.tar` (the successes: `{key}.jpg`,
# `{key}.txt`, `{key}.json`) plus `NNNNN.parquet` (every sample's metadata, failures included). Either is the
# run's image store as it is: nothing is converted or copied.
def crawl_store(folder: str) -> ImageStore:
    """The image store that an img2dataset output folder is. StageError (one line) when it is not one."""
    fs, p = shards.fs_and_path(folder)
    if not fs.isdir(p):
        raise StageError(f"ingest: {folder} is not a folder")
    names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(p, detail=False)]
    if not any(n.endswith("_stats.json") for n in names):
        raise StageError(f"ingest: {folder} is not an img2dataset output folder (no *_stats.json in it); give a "
                         "URL list (.parquet/.csv/.tsv) or img2dataset's output folder")
    root = folder.rstrip("/") if "://" in folder else os.path.abspath(folder)
    if any(n.endswith(".tar") and not n.startswith((".", "_")) for n in names):
        return ImageStore(root, "wds")
    for path in shards.list_shards(folder):
        col = images.byte_column(shards.read_schema(path))
        if col is not None:
            return ImageStore(root, "parquet", col)
    raise StageError(f"ingest: img2dataset output {folder} holds no tars and no Parquet with image bytes "
                     f"(columns {', '.join(images.BYTE_COLUMNS)})")


def _tar_metadata(store: ImageStore, tar: str, members: pa.Table) -> pl.DataFrame:
    """The samples of one tar: its sibling `NNNNN.parquet` (img2dataset's metadata of every sample, failures
    included) when present, else the tar's own `{key}.json` members (successes only)."""
    meta_path = store.path(tar[: -len(".tar")] + ".parquet")
    if shards.exists(meta_path):
        sch = shards.read_schema(meta_path)
        cols = [c for c in sch.names if c != images.byte_column(sch)]
        return pl.from_arrow(shards.read_shard(meta_path, columns=cols))
    js = members.filter(pc.equal(members.column("ext"), "json"))
    refs = images.tar_refs(tar, js.column("offset").to_numpy(), js.column("size").to_numpy())
    blobs = store.reader().read(refs).to_pylist()
    rows = [json.loads(b) for b in blobs]  # a JSON parse per sample: once, when the index is built
    df = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame({"key": pl.Series([], dtype=pl.String)})
    if "status" not in df.columns:
        df = df.with_columns(status=pl.lit("success"))
    return df.with_columns(pl.Series("key", js.column("key").to_pylist(), dtype=pl.String))


def _index_one_tar(store: ImageStore, tar: str) -> pa.Table:
    members = images.index_tar(store.path(tar))
    meta = _tar_metadata(store, tar, members)
    img = pl.from_arrow(members).filter(pl.col("ext").is_in(images.IMAGE_EXTS)).unique("key", keep="first")
    img = img.with_columns(pl.Series(REF_COL, images.tar_refs(tar, img["offset"].to_numpy(), img["size"].to_numpy())))
    out = meta.with_columns(pl.col("key").cast(pl.String)).join(img.select("key", REF_COL), on="key", how="left")
    return out.to_arrow()


def index_webdataset(store: ImageStore, index_dir: str) -> str:
    """A Parquet shard of metadata per tar of a WebDataset crawl, each row with its `image_ref` (the member's
    offset and size): built once (a scan of the tar headers), redone when a tar changes. Returns the folder."""
    fs, p = shards.fs_and_path(store.root)
    tars = sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(p, detail=False)
                  if n.endswith(".tar") and not n.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_")))
    # by content (each tar read once, ~1 s per GB; remembered by size and mtime in `_digests.json` beside the index)
    digests = shards.DigestCache(shards.join(index_dir, "_digests.json"))
    fp = fingerprint([shards.file_content_identity(store.path(t), digests) for t in tars])
    marker = shards.join(index_dir, "_index.json")
    if (shards.read_json(marker) or {}).get("fingerprint") == fp:
        digests.save()
        return index_dir
    shards.remove(index_dir)
    digests.save()
    for tar in tars:
        shards.write_shard(_index_one_tar(store, tar), shards.join(index_dir, tar[: -len(".tar")] + ".parquet"))
    shards.write_json({"fingerprint": fp, "tars": len(tars)}, marker)
    log.info("ingest: indexed %d tars of %s", len(tars), store.root)
    return index_dir


def crawl_input(folder: str, stage_dir: str) -> tuple[ImageStore, str]:
    """(the crawl's image store, the folder of Parquet shards ingest converts): the crawl's own Parquet files,
    or for a WebDataset crawl the index built in `<stage>/_wds_index`."""
    store = crawl_store(folder)
    if store.format == "wds":
        return store, index_webdataset(store, shards.join(stage_dir, "_wds_index"))
    return store, store.root
