"""emit: the resharder. The kept rows of the last stage, with their image bytes, as a training set.

Curation stages carry metadata only (rows name their image with `image_ref`, pipeline/images.py); emit is where
the kept samples' bytes are materialised, once. `apply` passes each shard's rows through (the stage folder
`05_emit/part-*.parquet` is the light table of what went in: no bytes); then the whole kept set is resharded
into consecutive shards of exactly `samples_per_shard` rows (the last one holds the rest), in a fixed order:
input shard order, then row order. Output shard j is written in each of `formats`, a folder each:
  wds             `emit/wds/part-{j:05d}.tar` (WebDataset: `{uid}.jpg`, `{uid}.txt`, `{uid}.json` with every other
                  column, `{uid}.klite.txt`): the training set, the only copy of the images (default);
  parquet         `emit/parquet/part-{j:05d}.parquet`: the same rows' metadata (uid, url, text, sizes, scores, ...)
                  and where each sample is, `tar` (relative to the emit folder) and `member` (its image's member
                  name; null for a row without an image), as DataComp ships its sets (default);
  parquet-images  `emit/parquet-images/part-{j:05d}.parquet`: the rows with their image bytes (`image`), for
                  those who want Parquet alone: a second copy of every image when given with wds.
Each shard's bytes are read through the run's image reader a store file at a time. One task per
output shard (`finalize_items` plans the slices of input shards each is cut from; the runner runs `finalize_item`
on the workers, in parallel): the bytes never pass through the driver. Then the
pool-wide index: `sizes.json` (what open_clip_train reads to know shard sizes), `uids.npy` (DataComp's habit: a
sorted array of 128-bit uids, so a curated subset can be re-materialised from the pool) and `summary.json`.

Resume: each output shard's marker (`emit/_done/part-NNNNN.json`) records a digest of its rows (uids and
references), the store and the config; a rerun rewrites only shards whose digest changed. Same rows, same
bytes (fixed tar member times, deterministic Parquet). Rows are never dropped here, except the rows every stage's
reader sets aside (`invalid_utf8`, `invalid_uid`, `text_too_long`: `pipeline.task_inputs.read_checked`). Member names
are `<uid>.<ext>` only: a uid is 32 lowercase hex characters (checked again here: any other is an error, never a
name), `image_ext` one of IMAGE_EXTS, `formats` of FORMATS (config errors otherwise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError, check_ranges
from pipeline import schema, shards
from pipeline.images import REF_COL
from pipeline.context import ShardContext
from pipeline.errors import StageError
from pipeline.stage import Stage

# Fixed member times: the same rows give byte-identical tars. An int: Python's tarfile gives a float mtime a PAX
# header of its own, 1,024 more bytes a member (4 members a sample: a visible share of the demo's tars, measured
# by hand: bench/README.md, "emit's tars by hand").
TAR_MTIME = 0
IMAGE_COL = "image"

log = logging.getLogger("clipcurate.emit")
UNRECORDED = "its marker records no sizes or digests (written by an older clipcurate)"


def _json_safe(v):
    if isinstance(v, bytes):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# `parquet` is the metadata of the WebDataset samples (it names their tar and member), so it comes with `wds`;
# `parquet-images` is Parquet with the image bytes. The error lists them in this order.
FORMATS = ("parquet", "wds", "parquet-images")
TAR_COL, MEMBER_COL = "tar", "member"  # the metadata Parquet's columns naming where each sample is
# The image member's extension: one a WebDataset reader decodes as an image (open_clip_train's `jpg;png;jpeg;webp`).
# It is part of every member name, so it is one of these, never a path.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _check_choices(config) -> None:
    """`formats` and `image_ext` name things this stage writes: a typo (`formats = ["zip"]`) would otherwise
    exit 0 with no training set, and `image_ext = "../../x"` would become part of tar member names."""
    formats = config.formats if isinstance(config.formats, (list, tuple)) else [config.formats]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"config [emit] formats = {list(formats)!r}: "
                          f"{'unknown format ' + repr(unknown[0]) if unknown else 'empty'}; give one or more of "
                          f"{', '.join(FORMATS)} (parquet: the metadata of the wds samples; parquet-images: "
                          "Parquet with the image bytes)")
    if "parquet" in formats and "wds" not in formats:
        # an older config's `formats = ["parquet"]` meant the image bytes: never a set without its images, silently
        raise ConfigError(f"config [emit] formats = {list(formats)!r}: 'parquet' is the metadata of the WebDataset "
                          "samples (their tar and member), so it comes with 'wds'; for Parquet with the image bytes "
                          "give 'parquet-images'")
    if config.image_ext not in IMAGE_EXTS:
        raise ConfigError(f"config [emit] image_ext = {config.image_ext!r}: give one of {', '.join(IMAGE_EXTS)}")


def _check_uids(uids, where: str) -> None:
    """Every uid names tar members and is read as a 128-bit number: 32 lowercase hex characters. The runner's
    reader rejects any other (`invalid_uid`) before a stage sees it, so one here means a stage folder written by
    something else: an error, never a member name."""
    ok = schema.valid_uids(uids)
    if not pc.all(ok, min_count=0).as_py():  # (an empty shard: all, not null)
        bad = pc.filter(uids, pc.invert(ok))[0].as_py()
        raise StageError(f"emit: {where}: uid {str(bad)[:80]!r} is not 32 lowercase hex characters; such rows belong "
                         "in rejected/ as invalid_uid: rerun the stages before emit")


def out_name(j: int) -> str:
    return f"part-{j:05d}"


class EmitStage(Stage):
    name = "emit"
    requires = {"uid": pa.string(), "text": pa.string()}
    needs_pixels = True  # in finalize: the resharder reads the kept rows' bytes
    pixels_optional = True  # a text-only pool's rows are emitted without images (no image store asked for)

    @dataclasses.dataclass
    class Config:
        samples_per_shard: int = 10000
        # WebDataset plus a metadata-only Parquet, as DataComp ships its sets: each image is written once.
        formats: list = dataclasses.field(default_factory=lambda: ["wds", "parquet"])
        image_ext: str = "jpg"  # name of the image member in tars (bytes are written as stored)
        klite: bool = True  # add `{uid}.klite.txt` when a `text_klite` column exists
        out: str = ""  # default: <run>/emit

        def __post_init__(self):
            check_ranges("emit", self, samples_per_shard=(1, None))
            _check_choices(self)

    def out_dir(self, run_dir: str) -> str:
        return self.config.out or shards.join(run_dir, "emit")

    def scale_notes(self, pool_rows: int) -> list[str]:
        """A web-scale shard size on a small pool makes one shard, and open_clip_train's WebDataset loader wants at
        least one shard per data-loader worker: said before the run, while the setting can still change."""
        c = self.config
        if pool_rows > c.samples_per_shard or c.samples_per_shard != self.Config.samples_per_shard:
            return []
        return [f"samples_per_shard = {c.samples_per_shard} writes this pool ({pool_rows} rows at most) as one shard; "
                "open_clip_train's WebDataset loader wants a shard per data-loader worker: set [emit] "
                "samples_per_shard"]

    def preflight(self, ctx: ShardContext) -> list[str]:
        """Beyond the image store (the spine's check; none needed for a text-only pool): a training-set folder
        outside the run (`out`) that can be written (inside the run, the runs folder's check covers it)."""
        from pipeline.preflight import unwritable

        why = unwritable(self.config.out) if self.config.out else None
        return [f"[emit] out = {self.config.out!r}: {why}: give a folder that can be written"] if why else []

    def apply(self, table: pa.Table, stats, ctx: ShardContext | None = None) -> tuple[pa.Table, pa.Table]:
        """Every row passes: the stage folder is the light table of the emitted set, in order."""
        return table, table.slice(0, 0).append_column("reason", pa.array([], pa.string()))

    # ---- the resharder ----------------------------------------------------------------------------
    def finalize_items(self, stage_dir: str, run_dir: str, summaries: list[dict]) -> list[dict]:
        """One item per output shard: its name and the (input shard, start, rows) slices it is cut from. The
        runner writes them in parallel (finalize_item), one task per output shard."""
        k = max(1, int(self.config.samples_per_shard))
        items, slices, have = [], [], 0
        for s in summaries:  # input shard order, then row order
            start, n = 0, int(s["rows_out"])
            while start < n:
                take = min(k - have, n - start)
                slices.append([s["shard"], start, take])
                have, start = have + take, start + take
                if have == k:
                    items.append({"name": out_name(len(items)), "slices": slices})
                    slices, have = [], 0
        if have:
            items.append({"name": out_name(len(items)), "slices": slices})
        return items

    def finalize_item(self, item: dict, ctx: ShardContext) -> dict:
        """Write one output shard (unless its marker says it is up to date): the slices' rows with their bytes."""
        tables = {}
        for shard, _, _ in item["slices"]:
            if shard not in tables:
                tables[shard] = shards.read_shard(shards.join(ctx.stage_dir, shard))
        piece = pa.concat_tables([tables[shard].slice(start, n) for shard, start, n in item["slices"]],
                                 promote_options="default").combine_chunks()
        written, redone = self._write_piece(piece, self.out_dir(ctx.run_dir), item["name"], ctx)
        return {"name": item["name"], "rows": piece.num_rows, "written": written,
                "columns": _emitted_columns(piece, self.config.formats), "redone": redone}

    def finalize(self, stage_dir: str, run_dir: str, summaries: list[dict], done: list | None = None) -> dict:
        out = self.out_dir(run_dir)
        k = max(1, int(self.config.samples_per_shard))
        done = done or []
        _say_redone(done)
        sizes = {d["name"] + ".tar": d["rows"] for d in done}
        self._remove_stale(out, {d["name"] for d in done})
        files = [shards.join(stage_dir, s["shard"]) for s in summaries]
        # the index files are rewritten only when they change: a resume that wrote no shard leaves them as they are
        shards.write_if_changed(_npy(_uids_to_u128(_read_uids(files))), shards.join(out, "uids.npy"))
        if "wds" in self.config.formats:
            shards.write_if_changed(shards.json_bytes(dict(sorted(sizes.items()))), shards.join(out, "wds", "sizes.json"))
        summary = {
            "samples": int(sum(sizes.values())),
            "shards": len(sizes),
            "samples_per_shard": k,
            "formats": list(self.config.formats),
            "folder": out,
            "columns": done[0]["columns"] if done else [],
            "wds_pattern": "::".join(sorted(sizes)) if "wds" in self.config.formats else "",
            "shards_written": sum(d["written"] for d in done),  # the others were up to date (resume)
        }
        shards.write_json(summary, shards.join(out, "summary.json"))
        return summary

    def _piece_digest(self, piece: pa.Table, ctx: ShardContext) -> str:
        """Config, store and every column of the rows (a changed caption or score must rewrite the shard)."""
        store = ctx.images.store if ctx.images is not None else None
        h = hashlib.sha256(json.dumps([dataclasses.asdict(self.config), repr(store)]).encode())
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, piece.schema) as w:
            w.write_table(piece)
        h.update(sink.getvalue())
        return h.hexdigest()

    def _write_piece(self, piece: pa.Table, out: str, name: str, ctx: ShardContext) -> tuple[int, str | None]:
        """Write one output shard in every format, unless its marker says it is already there: same rows, and each
        file still of the size it was written at (and of its XXH3 digest with `--verify`, ctx.verify). Returns
        (1 if written, why a shard that was there was redone: a file that failed that check)."""
        digest = self._piece_digest(piece, ctx)
        marker = shards.join(out, "_done", name + ".json")
        targets = _targets(name)
        wanted = [targets[f] for f in FORMATS if f in self.config.formats]
        done = shards.read_json(marker) or {}
        redone = None
        if done.get("digest") == digest:
            files = done.get("files")
            if not isinstance(files, dict):  # an older marker: sizes unknown, rewritten once (resume.UNRECORDED)
                redone = UNRECORDED
            else:
                for rel in wanted:
                    why = shards.file_mismatch(shards.join(out, rel), files.get(rel), digest=ctx.verify)
                    if why is not None:
                        redone = f"{rel} {why}"
                        break
                else:
                    return 0, None
        shards.remove(marker)
        full = self._materialise(piece, ctx)
        files = {}
        if "parquet-images" in self.config.formats:
            files[targets["parquet-images"]] = shards.write_shard(full, shards.join(out, targets["parquet-images"]))
        if "parquet" in self.config.formats:
            meta = self._metadata(full, targets["wds"])
            files[targets["parquet"]] = shards.write_shard(meta, shards.join(out, targets["parquet"]))
        if "wds" in self.config.formats:
            files[targets["wds"]] = shards.write_bytes(self._tar(full), shards.join(out, targets["wds"]))
        shards.write_json({"digest": digest, "rows": piece.num_rows, "files": files}, marker)
        return 1, redone

    def _materialise(self, piece: pa.Table, ctx: ShardContext) -> pa.Table:
        """The rows with their image bytes (`image`, read by reference) in place of the reference."""
        if REF_COL not in piece.column_names:
            return piece
        blobs = ctx.pixels(piece)
        # the reader gives no bytes where a tar member's reference ("FILE#OFFSET:SIZE[:CRC]") no longer names what
        # it named (a tar rewritten or cut after the stages before emit read it): a sample without its image must
        # not enter the training set unnoticed. A Parquet store's row ("FILE#ROW") may hold no image: emitted as is.
        lost = pc.and_(_tar_refs(piece.column(REF_COL)), pc.is_null(blobs))
        if pc.any(lost).as_py():
            first = pc.filter(piece.column("uid"), lost)[0].as_py()
            raise StageError(f"emit: {pc.sum(lost).as_py()} kept rows' images can no longer be read from the image "
                             f"store (first: uid {first}): it changed after the stages before emit read it; rerun "
                             "them (clipcurate run --run NAME redoes what changed) or restore the store")
        return piece.drop_columns([REF_COL]).append_column(IMAGE_COL, blobs)

    def _remove_stale(self, out: str, names: set[str]) -> None:
        """Shards of an earlier run with other settings would silently join the training set."""
        for fmt, ext in (("parquet", ".parquet"), ("parquet-images", ".parquet"), ("wds", ".tar"), ("_done", ".json")):
            folder = shards.join(out, fmt)
            fs, p = shards.fs_and_path(folder)
            if not fs.exists(p):
                continue
            unwanted = fmt != "_done" and fmt not in self.config.formats
            for info in fs.ls(p, detail=True):
                base = info["name"].rstrip("/").rsplit("/", 1)[-1]
                stem = base[: -len(ext)] if base.endswith(ext) else None
                if stem is not None and (stem not in names or unwanted):
                    fs.rm(info["name"])
            if unwanted and shards.is_local(folder) and not fs.ls(p):  # a format no longer asked for: no empty
                fs.rmdir(p)  # folder left behind (an object store has no folders)

    def _metadata(self, table: pa.Table, tar: str) -> pa.Table:
        """The metadata Parquet of one output shard: every column but the bytes, then `tar` (the shard's tar,
        relative to the emit folder) and `member` (each sample's image member in it, as `_tar` names it; null
        where the row has no image). Readers fetch an image by (tar, member) from the WebDataset part."""
        clash = [c for c in (TAR_COL, MEMBER_COL) if c in table.column_names]
        if clash:
            raise StageError(f"emit: the kept rows have a column named {clash[0]!r}, which the metadata Parquet "
                             "uses for where each sample is: rename it, or set [emit] formats = "
                             "[\"wds\", \"parquet-images\"]")
        n = table.num_rows
        _check_uids(table.column("uid"), "member names")
        if IMAGE_COL in table.column_names:
            has = pc.is_valid(table.column(IMAGE_COL))
            uids = table.column("uid").cast(pa.string())
            names = pc.binary_join_element_wise(uids, pa.scalar(self.config.image_ext), ".")
            member = pc.if_else(has, names, pa.scalar(None, pa.string()))
            table = table.drop_columns([IMAGE_COL])
        else:
            member = pa.nulls(n, pa.string())
        return table.append_column(TAR_COL, pa.array([tar] * n, pa.string())).append_column(MEMBER_COL, member)

    def _tar(self, table: pa.Table) -> bytes:
        """One WebDataset tar: {uid}.jpg (bytes as stored), {uid}.txt, {uid}.json (every other column)."""
        import webdataset as wds

        _check_uids(table.column("uid"), "tar members")
        meta_cols = [c for c in table.column_names if c != IMAGE_COL]
        rows = table.select(meta_cols).to_pylist()
        images = table.column(IMAGE_COL).to_pylist() if IMAGE_COL in table.column_names else [None] * table.num_rows
        klite = self.config.klite and "text_klite" in table.column_names
        buf = io.BytesIO()
        with wds.TarWriter(buf, mtime=TAR_MTIME, encoder=False) as w:
            for row, img in zip(rows, images):
                sample = {"__key__": row["uid"], "txt": (row["text"] or "").encode("utf-8")}
                if img is not None:
                    sample[self.config.image_ext] = img
                if klite and row.get("text_klite") is not None:
                    sample["klite.txt"] = row["text_klite"].encode("utf-8")
                meta = {k: _json_safe(v) for k, v in row.items()}
                sample["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
                w.write(sample)
        return buf.getvalue()


def _say_redone(done: list[dict]) -> None:
    """Output shards that were there but failed their check, one line each (on the driver: a worker's log never
    reaches the user's terminal); those an older version marked, in one line together."""
    old = [d["name"] for d in done if d.get("redone") == UNRECORDED]
    for d in done:
        if d.get("redone") and d["redone"] != UNRECORDED:
            log.warning("emit: output shard %s: %s: rewritten", d["name"], d["redone"])
    if old:
        log.warning("emit: %d output shards were marked by an older clipcurate, which recorded no sizes or digests: "
                    "rewritten, once, so that every later resume can check them", len(old))


def _targets(name: str) -> dict[str, str]:
    """Each format's file of output shard `name`, relative to the emit folder (the folder is the format's name)."""
    return {"parquet": f"parquet/{name}.parquet", "parquet-images": f"parquet-images/{name}.parquet",
            "wds": f"wds/{name}.tar"}


def _tar_refs(refs) -> pa.Array:
    """True where a reference names a tar member ("FILE#OFFSET:SIZE[:CRC]", pipeline.images' grammar), False for
    a Parquet row ("FILE#ROW") or no reference."""
    import polars as pl

    from pipeline.images import parse_refs

    refs = refs.combine_chunks() if isinstance(refs, pa.ChunkedArray) else refs
    at = parse_refs(refs).filter(pl.col("loc").str.contains(":"))["i"].to_numpy()
    mask = np.zeros(len(refs), dtype=bool)
    mask[at] = True
    return pa.array(mask)


def _emitted_columns(piece: pa.Table, formats) -> list[str]:
    """The columns of an emitted shard's Parquet: the rows' metadata, then where each sample is (`tar`, `member`:
    the metadata Parquet) or the bytes in `image` in place of the reference (parquet-images)."""
    cols = [c for c in piece.column_names if c != REF_COL]
    if "parquet" in formats:
        return cols + [TAR_COL, MEMBER_COL]
    if "parquet-images" in formats and REF_COL in piece.column_names:
        return cols + [IMAGE_COL]
    return cols  # (wds alone: the keys of each sample's .json member)


def _read_uids(files: list[str]) -> pa.ChunkedArray:
    cols = [shards.read_shard(f, columns=["uid"]).column("uid") for f in files]
    return pa.chunked_array([c for col in cols for c in col.chunks], pa.string())


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _uids_to_u128(uids: pa.ChunkedArray) -> np.ndarray:
    """Sorted structured array (hi, lo) of 128-bit uids, as DataComp stores subset lists (`schema.uid_list`). Each
    uid's own value: one that is not 32 lowercase hex characters is an error (it used to become zeros)."""
    uids = uids.combine_chunks() if uids.num_chunks else pa.array([], pa.string())
    _check_uids(uids, "uids.npy")
    return schema.uid_list(uids)


STAGE = EmitStage
