"""Bring your own crawl: an img2dataset output folder (Parquet or WebDataset) used in place as the run's image
store; ingest converts its metadata to rows (a WebDataset crawl's tars are indexed once for that, defensively:
a tar that is cut or lies, a repeated key, a malformed `.json` member or an unsafe member name gives rejected rows
with a reason, never a traceback and never a row lost without a word)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import polars as pl
import polars.selectors as cs
import pyarrow as pa

from pipeline import images, shards
from pipeline.images import REF_COL, ImageStore
from pipeline.errors import StageError
from pipeline.hashing import fingerprint

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
        sch = shards.read_schema(path)
        col = images.byte_column(sch)
        if col is not None:
            _check_required_columns(path, sch)
            return ImageStore(root, "parquet", col)
    raise StageError(f"ingest: img2dataset output {folder} holds no tars and no Parquet with image bytes "
                     f"(columns {', '.join(images.BYTE_COLUMNS)})")


def _check_required_columns(path: str, sch: pa.Schema) -> None:
    """A Parquet crawl's shard needs `url` (a row's identity) and `status` (whether its bytes are an image);
    img2dataset's other columns are optional (nulls). StageError (one line) naming what is missing, and what
    to do."""
    for name, why in (("url", "the URL each image came from"),
                      ("status", '"success", or why the row has no image')):
        if name not in sch.names:
            raise StageError(f"ingest: crawl shard {shards.shard_name(path)} has no '{name}' column "
                             f"(img2dataset writes it for every row: {why}); add it, or give img2dataset's own "
                             "output folder")


# ---- a WebDataset crawl, read defensively --------------------------------------------------------------
# Its tars come from the open web. Each is scanned once through tarfile's checks (pipeline/images.py
# `scan_tar`: nothing extracted, members are (offset, size) references), and each sample gets a verdict that
# ingest's conversion turns into a `reason` (status "truncated_tar" + error_message -> "truncated_tar: ..."):
#   truncated_tar  the tar is cut or damaged before the sample's members end (or, where NNNNN.parquet says it
#                  succeeded, the tar holds no image for it); the samples before the damage are kept
#   duplicate_key  a later copy of a key: the first copy's members stay together, the others are rejected
#   bad_metadata   its `.json` member is not a JSON object of img2dataset's fields (or, with no NNNNN.parquet
#                  to describe it, it has none)
#   unsafe_member  a member is a link, a device, or named absolute or with `..` (never read, never a sample)
INDEX_VERSION = 2  # part of the index's fingerprint: an index written by an earlier reader of tars is rebuilt
JSON_MEMBER_MAX = 1 << 20  # bytes: a `.json` member larger than this is bad_metadata, never read
TRUNCATED, DUPLICATE_KEY, BAD_METADATA, UNSAFE_MEMBER = "truncated_tar", "duplicate_key", "bad_metadata", "unsafe_member"
_VERDICTS = {  # verdict -> (status, error_message): one fixed message each, so the funnel counts them together
    "cut": (TRUNCATED, "its tar is cut or damaged before this sample's members end (see the ingest log)"),
    "missing": (TRUNCATED, "its tar holds no image member for it, though its metadata says success"),
    DUPLICATE_KEY: (DUPLICATE_KEY, "an earlier sample of its tar has the same key; the first one is kept"),
    BAD_METADATA: (BAD_METADATA, "its .json member is missing, not a JSON object, or has a field of the wrong type"),
    UNSAFE_MEMBER: (UNSAFE_MEMBER, "a member of it is a link or device, or is named with an absolute path or '..'"),
}
# the fields of img2dataset's `.json` member that a row is made of, with their types (an int is never a bool)
_JSON_FIELDS = {"url": pl.String, "caption": pl.String, "status": pl.String, "error_message": pl.String,
                "width": pl.Int64, "height": pl.Int64, "original_width": pl.Int64, "original_height": pl.Int64}
# what pairs a row of NNNNN.parquet with its members, and says what became of it
_PAIRING_COLUMNS = ("key", "url", "status")


def _copies(members: pa.Table) -> pl.DataFrame:
    """One row per copy of a key, in tar order: where its image and `.json` members are, and whether every
    member of it is safe and vouched for. A sample's members share a key (`KEY.jpg`, `KEY.txt`, `KEY.json`); the
    n-th member of a key with an extension belongs to the key's n-th copy, so a repeated key never lends one
    copy's caption to another copy's image."""
    m = pl.from_arrow(members).with_row_index("_cc_pos").with_columns(
        _cc_occ=pl.int_range(pl.len(), dtype=pl.Int64).over("key", "ext"))
    img = pl.col("ext").is_in(images.IMAGE_EXTS) & pl.col("safe")
    js = (pl.col("ext") == "json") & pl.col("safe")
    return m.group_by("key", "_cc_occ", maintain_order=True).agg(
        _cc_pos=pl.col("_cc_pos").min(), _cc_last=pl.col("_cc_pos").max(), _cc_exts=pl.col("ext").unique().sort(),
        _cc_safe=pl.col("safe").all(), _cc_vouched=pl.col("vouched").all(),
        _cc_img_offset=pl.col("offset").filter(img).first(), _cc_img_size=pl.col("size").filter(img).first(),
        _cc_img_header=pl.col("header").filter(img).first(),
        _cc_json_offset=pl.col("offset").filter(js).first(), _cc_json_size=pl.col("size").filter(js).first(),
        _cc_json_header=pl.col("header").filter(js).first(),
    )


def _whole(copies: pl.DataFrame) -> pl.Series:
    """Per copy, whether it has every kind of member (extension) that most of the tar's samples have:
    img2dataset writes the same members for every sample."""
    common = copies["_cc_exts"].explode().drop_nulls().value_counts().filter(pl.col("count") * 2 > copies.height)
    return copies.select(pl.all_horizontal([pl.repeat(True, pl.len())] + [pl.col("_cc_exts").list.contains(e)
                                                             for e in common[:, 0].to_list()]))[:, 0]


def _last_copy_incomplete(copies: pl.DataFrame) -> pl.DataFrame:
    """Where a tar's scan stopped early, the copy of its last member may have lost members with what was cut:
    it is vouched for only when it is whole (`_whole`, and not the tar's only copy)."""
    if copies.height < 2:
        return copies.with_columns(_cc_vouched=pl.lit(False)) if copies.height else copies
    last = pl.int_range(pl.len()) == int(copies["_cc_last"].arg_max())
    return copies.with_columns(_cc_vouched=pl.col("_cc_vouched") & (_whole(copies) | ~last))


def _json_record(data: bytes | None) -> dict | None:
    """img2dataset's fields of one `.json` member (absent ones None), or None when it is malformed: not JSON,
    not an object, a field of the wrong type, text that is not UTF-8. Never an exception."""
    if data is None:
        return None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(obj, dict):
        return None
    out = {}
    for name, dtype in _JSON_FIELDS.items():
        v = obj.get(name)
        if v is not None:
            if dtype == pl.String:
                if not isinstance(v, str):
                    return None
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
                    return None
            elif type(v) is not int or not -(2 ** 63) <= v < 2 ** 63:
                return None
        out[name] = v
    return out


def _json_fields(store: ImageStore, tar: str, copies: pl.DataFrame) -> pl.DataFrame:
    """Per copy: `_cc_json_bad` (it has a `.json` member that is malformed or too large) and img2dataset's fields
    from it as `_cc_j_<field>` (null where it has none). A JSON parse per sample, once, when the index is built;
    the members are read by reference in batches (a hostile tar's `.json` members never all held at once)."""
    n = copies.height
    has = copies["_cc_json_offset"].is_not_null().to_numpy() & copies["_cc_safe"].to_numpy() \
        & copies["_cc_vouched"].to_numpy()
    small = copies["_cc_json_size"].fill_null(0).to_numpy() <= JSON_MEMBER_MAX
    read = np.flatnonzero(has & small)
    records: list = [None] * n
    bad = has & ~small
    if len(read):
        refs = images.tar_refs(tar, *(copies[f"_cc_json_{c}"].gather(read) for c in ("offset", "size", "header")))
        for at, blobs in store.reader().batches(refs, rows=images.PIXEL_BATCH_ROWS):
            for i, blob in zip(read[at], blobs.to_pylist()):
                records[i] = _json_record(blob)
                bad[i] = records[i] is None
    cols = {f"_cc_j_{name}": pl.Series([r[name] if r else None for r in records], dtype=dtype)
            for name, dtype in _JSON_FIELDS.items()}
    return pl.DataFrame({"_cc_json_bad": bad, **cols})


def _sibling_metadata(store: ImageStore, tar: str) -> pl.DataFrame | None:
    """img2dataset's metadata of every sample of a tar (failures included): its sibling `NNNNN.parquet`, when
    there is one that can be paired with the tar (`key`, `url`, `status`); None otherwise (a log line says why,
    and the samples are described by their own `.json` members)."""
    meta_path = store.path(tar[: -len(".tar")] + ".parquet")
    if not shards.exists(meta_path):
        return None
    sch = shards.read_schema(meta_path)
    unusable = [c for c in _PAIRING_COLUMNS if c not in sch.names
                or not (pa.types.is_string(sch.field(c).type) or pa.types.is_large_string(sch.field(c).type))]
    if unusable:
        log.warning("ingest: %s has no text column '%s': the samples of %s are described by their .json members",
                    shards.shard_name(meta_path), unusable[0], tar)
        return None
    cols = [c for c in sch.names if c != images.byte_column(sch) and c != REF_COL and not c.startswith("_cc_")]
    return pl.from_arrow(shards.read_shard(meta_path, columns=cols))


def _paired(meta: pl.DataFrame | None, copies: pl.DataFrame) -> pl.DataFrame:
    """Rows of NNNNN.parquet and copies in the tar, joined on (key, n-th occurrence): img2dataset writes a
    sample's metadata row and its members together, in the same order. A copy without a row (no NNNNN.parquet,
    or a key it does not list) is a row described by its `.json` member."""
    if meta is None:
        meta = pl.DataFrame(schema={"key": pl.String})
    meta = meta.with_columns(
        _cc_row=pl.int_range(pl.len(), dtype=pl.Int64),
        _cc_occ=pl.when(pl.col("key").is_null()).then(0).otherwise(pl.int_range(pl.len(), dtype=pl.Int64).over("key")))
    df = meta.join(copies, on=["key", "_cc_occ"], how="full", coalesce=True).sort(
        ["_cc_row", "_cc_pos"], nulls_last=True)
    from_meta = pl.col("_cc_row").is_not_null()
    fill = []
    for name, dtype in _JSON_FIELDS.items():
        j = pl.col(f"_cc_j_{name}")
        if name == "status":
            j = j.fill_null("success")  # a sample in a tar succeeded unless its .json says otherwise
        have = name in meta.columns and meta.schema[name] != pl.Null
        fill.append(pl.when(from_meta).then(pl.col(name) if have else pl.lit(None, dtype=dtype))
                    .otherwise(j.cast(meta.schema[name], strict=False) if have else j).alias(name))
    return df.with_columns(fill)


def _verdicts(df: pl.DataFrame, problem: str | None) -> pl.DataFrame:
    """Each sample's verdict (`_cc_verdict`, null: as its metadata says), first that applies: a later copy of
    a key; img2dataset's own failure; an unsafe member; cut by the tar's damage; malformed metadata; no image."""
    from_meta = pl.col("_cc_row").is_not_null()
    has_copy = pl.col("_cc_pos").is_not_null()
    no_image = pl.col("_cc_img_offset").is_null()
    bad_meta = pl.col("_cc_json_bad").fill_null(False) | (
        ~from_meta & (pl.col("_cc_json_offset").is_null() | pl.col("url").is_null()))
    verdict = (pl.when(pl.col("_cc_occ") >= 1).then(pl.lit(DUPLICATE_KEY))
               .when(pl.col("status") != "success").then(pl.lit(None, dtype=pl.String))
               .when(has_copy & ~pl.col("_cc_safe")).then(pl.lit(UNSAFE_MEMBER))
               .when((has_copy & ~pl.col("_cc_vouched")) | (no_image & (problem is not None))).then(pl.lit("cut"))
               .when(bad_meta).then(pl.lit(BAD_METADATA))
               .when(no_image).then(pl.lit("missing")))
    return df.with_columns(_cc_verdict=verdict)


def _members_unseen(store: ImageStore, tar: str, meta: pl.DataFrame | None, members: pa.Table) -> bool:
    """Whether a tar whose scan ended cleanly still lacks members: a sample without every kind of member most
    have, or samples that its metadata says succeeded (rows of NNNNN.parquet; else the `successes` of
    NNNNN_stats.json). The mark of a header that lies by whole blocks, hiding the members after it."""
    if not _whole(_copies(members)).all():
        return True
    keys = pl.from_arrow(members.select(["key"]))["key"].unique()
    if meta is not None:
        return meta.filter((pl.col("status") == "success") & ~pl.col("key").is_in(keys.implode())).height > 0
    stats = shards.read_json(store.path(tar[: -len(".tar")] + "_stats.json")) or {}
    return isinstance(stats.get("successes"), int) and stats["successes"] > len(keys)


def _unvouch_members_hiding_headers(path: str, members: pa.Table) -> tuple[pa.Table, str | None]:
    """(members, problem) with every member whose bytes hold later members' headers no longer vouched for."""
    hiding = images.members_hiding_headers(path, members.column("offset").to_numpy(), members.column("size").to_numpy())
    if not hiding.any():
        return members, None
    first = int(np.flatnonzero(hiding)[0])
    vouched = members.column("vouched").to_numpy(zero_copy_only=False) & ~hiding
    members = members.set_column(members.schema.get_field_index("vouched"), "vouched", pa.array(vouched))
    name, size = members.column("name")[first].as_py(), members.column("size")[first].as_py()
    return members, f"the header of {name!r} claims {size} bytes, which hold later members' headers"


def _index_one_tar(store: ImageStore, tar: str) -> pa.Table:
    """The rows of one tar of a WebDataset crawl: img2dataset's metadata (its sibling NNNNN.parquet, else the
    `.json` members), each kept sample with the `image_ref` of its image member, and the samples the tar cannot
    vouch for marked with their verdict (status and error_message). No row of the metadata is ever dropped."""
    scan = images.scan_tar(store.path(tar))
    meta = _sibling_metadata(store, tar)
    members, problem = scan.members, scan.problem
    if problem is not None or _members_unseen(store, tar, meta, members):  # then, and only then, read the members
        members, hidden = _unvouch_members_hiding_headers(store.path(tar), members)
        problem = problem or hidden
    copies = _copies(members)
    if problem is not None:
        copies = _last_copy_incomplete(copies)
    copies = pl.concat([copies, _json_fields(store, tar, copies)], how="horizontal")
    df = _verdicts(_paired(meta, copies), problem)
    kept = (pl.col("status") == "success") & pl.col("_cc_verdict").is_null()
    status = pl.col("_cc_verdict").replace_strict({k: v[0] for k, v in _VERDICTS.items()}, default=pl.col("status"))
    error = pl.col("_cc_verdict").replace_strict({k: v[1] for k, v in _VERDICTS.items()},
                                                 default=pl.col("error_message").cast(pl.String))
    df = df.with_columns(status=status, error_message=error,
                         _cc_img_offset=pl.when(kept).then(pl.col("_cc_img_offset")))
    _log_tar(tar, problem, df, meta is None, store)
    refs = images.tar_refs(tar, df["_cc_img_offset"], df["_cc_img_size"], df["_cc_img_header"])  # null: not kept
    out = df.with_columns(pl.Series(REF_COL, refs, dtype=pl.String)).drop(cs.starts_with("_cc_"))
    return out.to_arrow()


def _log_tar(tar: str, problem: str | None, df: pl.DataFrame, no_meta: bool, store: ImageStore) -> None:
    """One warning line per tar that lost samples, saying where and why, and how many went to which reason."""
    counts = df["_cc_verdict"].drop_nulls().value_counts(sort=True)
    lost = ", ".join(f"{n} {_VERDICTS[v][0]}" for v, n in counts.iter_rows())
    if problem is None and not lost:
        return
    msg = f"ingest: {tar}: {problem + '; ' if problem else ''}{lost or 'no sample rejected'}"
    if problem is not None and no_meta:  # without NNNNN.parquet, samples past the damage have no name at all
        stats = shards.read_json(store.path(tar[: -len(".tar")] + "_stats.json")) or {}
        if isinstance(stats.get("successes"), int) and stats["successes"] > df.height:
            msg += (f"; {stats['successes'] - df.height} more samples that {tar[: -len('.tar')]}_stats.json counts "
                    f"cannot be named (no {tar[: -len('.tar')]}.parquet beside it)")
    log.warning(msg)


def index_webdataset(store: ImageStore, index_dir: str) -> str:
    """A Parquet shard of metadata per tar of a WebDataset crawl, each row with its `image_ref` (the member's
    offset and size): built once (a scan of the tar headers), redone when a tar changes. Returns the folder."""
    fs, p = shards.fs_and_path(store.root)
    tars = sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(p, detail=False)
                  if n.endswith(".tar") and not n.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_")))
    # by content (each tar read once, a cost per GB: bench/README.md, "The spine by hand"; remembered by size and
    # mtime in `_digests.json` beside the index)
    digests = shards.DigestCache(shards.join(index_dir, "_digests.json"))
    fp = fingerprint([INDEX_VERSION] + [shards.file_content_identity(store.path(t), digests) for t in tars])
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
