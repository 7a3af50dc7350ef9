"""ingest: URL list -> img2dataset -> shards in the row schema.

Kept apart as in img2dataset itself: *reading* the URL list (`read_url_list`), *downloading*
(img2dataset, untouched), and *converting* its Parquet output to our rows (the `IngestStage`, run by the
ordinary runner so that resume, manifests and Dask apply to it too).

A URL that appears with several captions is downloaded once: the list is grouped by URL before
img2dataset sees it, all captions travel with it as a JSON column, and conversion yields one row per
caption (same image bytes, distinct uids since uid hashes url + text). A row repeating an earlier (url, caption)
would repeat its uid: it is rejected as `duplicate: same url and caption as an earlier row`, so ingest keeps one
row per distinct (url, caption) and every uid once.

Rejected rows (`reason`): img2dataset's status and error ("failed_to_download: HTTP Error 404: ..."), and two
of ours for rows that never reach img2dataset: `invalid_url: not an http(s) URL` (malformed, empty, or another
scheme: ftp:, file:, data:, javascript: ...) and `invalid_utf8: url or caption is not valid UTF-8` (a CSV/TSV or
Parquet list with a few rows in another encoding; their text is kept lossy-decoded, U+FFFD for bad bytes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import images, schema, shards
from pipeline.codec import data_record
from pipeline.config import check_ranges
from pipeline.images import REF_COL, ImageStore
from pipeline.stage import Stage, StageError, fingerprint

log = logging.getLogger("clipcurate.ingest")

CAPTIONS_COL = "clipcurate_captions"
DUPLICATE = "duplicate"  # reason of a repeated (url, caption) row: "duplicate: same url and caption ..."
VALID_URL = r"(?i)^https?://[^\s/:?#]+(:\d+)?([/?#]\S*)?$"  # schemes are case-insensitive (RFC 3986 3.1)


class IngestStage(Stage):
    name = "ingest"
    requires = {"url": pa.string(), "status": pa.string()}

    @dataclasses.dataclass
    class Config:
        url_col: str = "url"
        caption_col: str = "caption"
        resize_mode: str = "no"  # img2dataset's: no | border | keep_ratio | center_crop
        image_size: int = 256
        encode_format: str = "jpg"
        processes: int = 0  # 0 = cores
        threads: int = 32
        shard_size: int = 10000  # samples per img2dataset shard (= our shard)
        timeout: int = 10
        retries: int = 0
        serve_dir: str = ""  # a demo world's www/ served by a loopback proxy during the download

        def __post_init__(self):
            check_ranges("ingest", self, image_size=(1, None), processes=(0, None), threads=(1, None),
                         shard_size=(1, None), timeout=(1, None), retries=(0, None))

    def output_name(self, input_name: str) -> str:
        return f"part-{input_name}" if not input_name.startswith("part-") else input_name

    def rows_in(self, table, kept, rejected) -> int:
        """An img2dataset row is a URL with its captions, and each caption is a row of the funnel."""
        return kept.num_rows + rejected.num_rows

    def fingerprint_parts(self) -> dict:
        return {"unique_uids": 1}  # a repeated (url, caption) of a crawl is rejected as `duplicate`

    # ---- one row per uid: a crawl used in place may list the same (url, caption) twice -------------------
    # (a URL list is deduplicated before the download, `group_by_url`). Pool-wide and shuffled like align's
    # dedup keys: per uid the smallest content key, per (uid, content key) the smallest position hash.
    def collect(self, table: pa.Table) -> "CopyStats":
        kept, _ = self._convert(table)
        return CopyStats.of(*self._copy_keys(kept))

    def merge(self, partials: list) -> "CopyStats":
        return CopyStats.merge([p for p in partials if p is not None])

    def split(self, partial: "CopyStats", n: int) -> list:
        return partial.split(n)

    def answer(self, merged: "CopyStats", piece: "CopyStats") -> "CopyStats":
        return merged.restrict(piece)

    def join_answers(self, answers: list) -> "CopyStats":
        return CopyStats.merge(answers)

    def save_stats(self, stats: "CopyStats", folder: str) -> None:
        shards.write_shard(stats.uids.filter(pl.col("n") > 1).to_arrow(), shards.join(folder, "uid_copies.parquet"))
        shards.write_shard(stats.copies.filter(pl.col("n") > 1).to_arrow(), shards.join(folder, "identical_rows.parquet"))

    def load_stats(self, folder: str) -> "CopyStats":
        def read(name):
            return pl.from_arrow(shards.read_shard(shards.join(folder, name)))

        return CopyStats(read("uid_copies.parquet"), read("identical_rows.parquet"))

    def _copy_keys(self, kept: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uid key, content key, position hash) per kept row, as align orders the copies of a uid (its
        `row_content_key` without `image_ref`; ingest reads no pixels, so byte-equal rows are ordered by
        position: (shard, row) of the crawl, a property of the crawl and not of how the run cuts it)."""
        from pipeline.hashing import _U64, row_content_key, row_positions, uid_rank

        n = kept.num_rows
        pos = row_positions(self.context.get("shard", ""), n)
        return uid_rank(kept.column("uid")) if n else np.zeros(0, _U64), row_content_key(kept), pos

    def apply(self, table: pa.Table, stats) -> tuple[pa.Table, pa.Table]:
        """img2dataset rows -> one row per caption; failures to `rejected` with img2dataset's reason; a repeat
        of a uid (a crawl listing the same url and caption twice) to `rejected` as `duplicate`."""
        kept, rejected = self._convert(table)
        if stats is not None and kept.num_rows:
            extra = stats.extra_copies(*self._copy_keys(kept))
            if extra.any():
                mask = pa.array(extra)
                dup = kept.filter(mask).append_column(
                    "reason", pa.array([f"{DUPLICATE}: same url and caption as another row"] * int(extra.sum()), pa.string()))
                kept = kept.filter(pc.invert(mask))
                rejected = pa.concat_tables([rejected, dup.cast(rejected.schema)])
        return kept, rejected

    def _convert(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        """img2dataset rows -> one row per caption; failures to `rejected` with img2dataset's reason.

        The rows come without their image bytes: the img2dataset output is the run's image store, and the
        runner hands each row its reference (`image_ref`, pipeline/images.py)."""
        df = pl.from_arrow(table)
        if CAPTIONS_COL in df.columns:
            captions = pl.col(CAPTIONS_COL).str.json_decode(pl.Struct({"c": pl.List(pl.String)})).struct.field("c")
        else:
            captions = pl.concat_list(pl.col("caption").fill_null(""))  # a crawl used in place: one caption a row
        def int_col(name):
            return (pl.col(name) if name in df.columns else pl.lit(None)).cast(pl.Int32)
        ok = pl.col("status") == "success"
        ref = pl.col(REF_COL) if REF_COL in df.columns else pl.lit(None, dtype=pl.String)
        df = df.with_columns(
            text=captions,
            image_ref=pl.when(ok).then(ref).otherwise(pl.lit(None, dtype=pl.String)),
            width=int_col("width"),
            height=int_col("height"),
            orig_width=int_col("original_width"),
            orig_height=int_col("original_height"),
            reason=pl.when(ok)
            .then(pl.lit(None, dtype=pl.String))
            .otherwise(
                pl.col("status").fill_null("unknown")
                + pl.lit(": ")
                + pl.col("error_message").fill_null("").str.replace(r"\s+", " ").str.slice(0, 200)
            ),
        ).explode("text")
        uid = schema.compute_uid(df["url"].to_arrow(), df["text"].to_arrow())
        df = df.with_columns(uid=pl.Series(uid)).select(
            "uid", "url", "text", REF_COL, "width", "height", "orig_width", "orig_height", "reason"
        )
        out = df.to_arrow()
        out = schema.check_columns(out, schema.ROW_SCHEMA, "ingest")
        is_kept = pc.is_null(out.column("reason"))
        kept = out.filter(is_kept).drop_columns(["reason"])
        rejected = out.filter(pc.invert(is_kept))
        return kept, rejected


STAGE = IngestStage


_MAX = np.iinfo(np.uint64).max


@data_record
@dataclasses.dataclass
class CopyStats:
    """uids: key (uid), ck_min, n; copies: key (uid x content key), pos_min, n. Merge = concat + group-by
    min/sum (associative); a shard's answer is both tables restricted to the keys it holds."""

    uids: pl.DataFrame
    copies: pl.DataFrame

    @staticmethod
    def of(ukey: np.ndarray, ck: np.ndarray, pos: np.ndarray) -> "CopyStats":
        from pipeline.hashing import combine64

        u = pl.DataFrame({"key": ukey, "v": ck}).group_by("key").agg(ck_min=pl.col("v").min(), n=pl.len().cast(pl.UInt64))
        c = pl.DataFrame({"key": combine64(ukey, ck), "v": pos}).group_by("key").agg(
            pos_min=pl.col("v").min(), n=pl.len().cast(pl.UInt64))
        return CopyStats(u.sort("key"), c.sort("key"))

    @staticmethod
    def merge(parts: list) -> "CopyStats":
        if not parts:
            return CopyStats.of(*(np.zeros(0, np.uint64),) * 3)
        u = pl.concat([p.uids for p in parts]).group_by("key").agg(pl.col("ck_min").min(), pl.col("n").sum())
        c = pl.concat([p.copies for p in parts]).group_by("key").agg(pl.col("pos_min").min(), pl.col("n").sum())
        return CopyStats(u.sort("key"), c.sort("key"))

    def split(self, n: int) -> list:
        def part(df):
            which = (df["key"] % n).cast(pl.Int64).to_numpy() if df.height else np.zeros(0, np.int64)
            return [df.filter(pl.Series(which == k)) for k in range(n)]

        return [CopyStats(u, c) for u, c in zip(part(self.uids), part(self.copies))]

    def restrict(self, piece: "CopyStats") -> "CopyStats":
        """Rows of this (merged) partition seen more than once whose key the shard's piece holds."""
        return CopyStats(self.uids.filter((pl.col("n") > 1) & pl.col("key").is_in(piece.uids["key"])),
                         self.copies.filter((pl.col("n") > 1) & pl.col("key").is_in(piece.copies["key"])))

    def extra_copies(self, ukey: np.ndarray, ck: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Rows that are not the kept copy of their uid (pipeline.hashing.other_copy_kept)."""
        from pipeline.hashing import combine64, other_copy_kept

        def lookup(df, value, keys):
            m = pl.DataFrame({"key": keys}).join(df.select("key", value), on="key", how="left", maintain_order="left")
            return m[value].fill_null(_MAX).to_numpy().astype(np.uint64)

        ck_min = lookup(self.uids.filter(pl.col("n") > 1), "ck_min", ukey)
        pos_min = lookup(self.copies.filter(pl.col("n") > 1), "pos_min", combine64(ukey, ck))
        return other_copy_kept(ck, ck_min, pos, pos_min)


# ---- reading the URL list -----------------------------------------------------------------------
def read_url_list(path: str, url_col: str = "url", caption_col: str = "caption") -> pl.DataFrame:
    """Parquet, CSV, TSV or TSV.gz with a url column and a caption (or text) column."""
    p = str(path)
    if not Path(p).exists() and "://" not in p:
        raise StageError(f"ingest: URL list {p} does not exist")
    low = p.lower()
    try:
        if low.endswith(".parquet"):
            df = _read_parquet_list(p)
        elif low.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")):
            df = _read_text_list(p, "\t", None)
        elif low.endswith((".csv", ".csv.gz")):
            df = _read_text_list(p, ",", '"')
        else:
            raise StageError(f"ingest: {p}: unknown format (use .parquet, .csv, .tsv or .tsv.gz)")
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StageError(f"ingest: cannot read URL list {p}: {_where_it_breaks(p) or first}") from None
    if caption_col not in df.columns and caption_col == "caption" and "text" in df.columns:
        caption_col = "text"
    missing = [(c, key) for c, key in ((url_col, "url_col"), (caption_col, "caption_col")) if c not in df.columns]
    if missing:
        names = " or ".join(f"'{c}'" for c, _ in missing)
        hints = []
        for c, key in missing:
            hint = _column_hint(df.columns, c, key)
            if key == "caption_col" and hint.startswith("name the column") and c == "caption":
                hint = _column_hint(df.columns, "text", key)  # `text` is accepted for captions too
            if hint not in hints:
                hints.append(hint)
        raise StageError(f"ingest: URL list {p} has no column {names} (columns: {_shown(df.columns)}); "
                         + "; ".join(hints))
    out = df.select(pl.col(url_col).cast(pl.String).alias("url"), pl.col(caption_col).cast(pl.String).alias("caption"))
    bad = [f"_bad_{c}" for c in (url_col, caption_col) if f"_bad_{c}" in df.columns]
    if bad:
        out = out.with_columns(pl.any_horizontal([df[c] for c in bad]).alias(BAD_TEXT_COL))
    return out


def _shown(columns: list[str], n: int = 6) -> str:
    cut = [c if len(c) <= 40 else c[:37] + "..." for c in columns[:n]]
    return ", ".join(cut) + (f", ... ({len(columns)} columns)" if len(columns) > n else "")


def _column_hint(columns: list[str], wanted: str, key: str) -> str:
    """What to do when a column is missing: a header that is data, a name in another case, another separator."""
    if any("://" in c for c in columns):
        return "its first line looks like data, not a header: add a header line naming the columns (url, caption)"
    same = [c for c in columns if c.lower() == wanted.lower()]
    if same:
        return f'name it in the config: [ingest] {key} = "{same[0]}"'
    if len(columns) == 1 and any(sep in columns[0] for sep in ("\t", ",", ";", "|")):
        return "its lines are not split on the separator its extension says (.csv: comma, .tsv: tab): rename the file"
    return f'name the column to use in the config: [ingest] {key} = "..."'


def _where_it_breaks(p: str) -> str | None:
    """The first line of a CSV/TSV whose field count differs from the header's (polars names no line). Only read
    on the error path."""
    import csv
    import gzip

    low = p.lower()
    if not low.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")) or "://" in p:
        return None
    sep = "," if ".csv" in low else "\t"
    opener = gzip.open if low.endswith(".gz") else open
    try:
        with opener(p, "rt", encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.reader(f, delimiter=sep, quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE)
            header = next(reader, [])
            for row in reader:
                if len(row) != len(header):
                    hint = ("quote captions that hold a comma, or write a TSV" if sep == "," else
                            "a caption holds a tab: remove tabs from captions")
                    return (f"line {reader.line_num} has {len(row)} fields where the header has {len(header)} "
                            f"({hint})")
    except (OSError, csv.Error):
        return None
    return None


BAD_TEXT_COL = "_not_utf8"  # rows of a URL list whose url or caption bytes are not valid UTF-8


def _with_bad_text(table: pa.Table) -> pl.DataFrame:
    """Every string/binary column lossy-decoded, plus `_bad_<col>` flags where a value was not UTF-8."""
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type) \
                or pa.types.is_large_binary(col.type):
            fixed, bad = schema.lossy_utf8(col)
            cols[name], cols[f"_bad_{name}"] = fixed, pa.array(bad, pa.bool_())
        else:
            cols[name] = col
    return pl.from_arrow(pa.table(cols))


def _read_text_list(p: str, sep: str, quote: str | None) -> pl.DataFrame:
    """CSV/TSV as strings. A crawl's list may hold a few lines in another encoding: then every cell is read
    as bytes (pyarrow), so those rows become `invalid_utf8` rejects instead of failing the whole list."""
    try:
        return pl.read_csv(p, separator=sep, quote_char=quote, infer_schema=False)
    except pl.exceptions.ComputeError as e:
        if "utf-8" not in str(e).lower() and "utf8" not in str(e).lower():
            raise
    import pyarrow.csv as pcsv

    names = pl.read_csv(p, separator=sep, quote_char=quote, infer_schema=False, n_rows=0, encoding="utf8-lossy").columns
    table = pcsv.read_csv(
        p,
        parse_options=pcsv.ParseOptions(delimiter=sep, quote_char=quote or False),
        convert_options=pcsv.ConvertOptions(column_types={n: pa.binary() for n in names}),
    )
    return _with_bad_text(table)


def _read_parquet_list(p: str) -> pl.DataFrame:
    """Parquet read with pyarrow; string columns holding bytes that are not UTF-8 (Arrow does not check them
    on read, and polars crashes on them) are flagged per row, as in _read_text_list."""
    import pyarrow.parquet as pq

    table = pq.read_table(p)
    for c in table.columns:
        if pa.types.is_binary(c.type) or pa.types.is_large_binary(c.type):
            return _with_bad_text(table)
        if (pa.types.is_string(c.type) or pa.types.is_large_string(c.type)) and not schema.is_valid_utf8(c):
            return _with_bad_text(table)
    return pl.from_arrow(table)


def group_by_url(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(to_download, rejected): unique valid URLs in first-seen order with their distinct captions as JSON;
    rejected: malformed URLs, rows that are not UTF-8, and repeats of an earlier (url, caption) row."""
    if BAD_TEXT_COL not in df.columns:
        df = df.with_columns(pl.lit(False).alias(BAD_TEXT_COL))
    df = df.with_columns(pl.col("caption").fill_null(""), pl.col("url").str.strip_chars())
    url_ok = pl.col("url").is_not_null() & pl.col("url").str.contains(VALID_URL)
    is_bad = pl.col(BAD_TEXT_COL) | ~url_ok
    bad = df.filter(is_bad.fill_null(True)).with_columns(
        status=pl.when(pl.col(BAD_TEXT_COL)).then(pl.lit("invalid_utf8")).otherwise(pl.lit("invalid_url")),
        error_message=pl.when(pl.col(BAD_TEXT_COL)).then(pl.lit("url or caption is not valid UTF-8"))
        .otherwise(pl.lit("not an http(s) URL")),
    ).drop(BAD_TEXT_COL)
    good = df.filter(~is_bad.fill_null(True)).drop(BAD_TEXT_COL)
    # one row per distinct (url, caption): a repeated pair would be the same uid twice; later copies are
    # rejected rows (`duplicate`), so that rows in = kept + rejected still holds
    first = pl.struct("url", "caption").is_first_distinct()
    dups = good.filter(~first).with_columns(
        status=pl.lit(DUPLICATE), error_message=pl.lit("same url and caption as an earlier row"))
    bad = pl.concat([bad, dups.select(bad.columns)]) if dups.height else bad
    good = good.filter(first)
    grouped = (
        good.with_row_index("_order")
        .group_by("url", maintain_order=True)
        .agg(pl.col("caption"), pl.col("_order").min())
        .sort("_order")
        .select(
            "url",
            pl.col("caption").list.first().alias("caption"),
            pl.struct(pl.col("caption").alias("c")).struct.json_encode().alias(CAPTIONS_COL),
        )
    )
    return grouped, bad


# ---- downloading ----------------------------------------------------------------------------------
@contextmanager
def _env(overrides: dict[str, str]):
    old = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_img2dataset(url_parquet: str, out_dir: str, cfg: IngestStage.Config, additional_columns=None,
                    output_format: str = "parquet") -> dict:
    """Call img2dataset (in this process; it forks its own workers). Returns its summed stats."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from img2dataset import download

    processes = cfg.processes or (os.cpu_count() or 1)
    with ExitStack() as stack:
        if cfg.serve_dir:
            from pipeline.serve import proxy_env, serve_world

            proxy = stack.enter_context(serve_world(cfg.serve_dir))
            stack.enter_context(_env(proxy_env(proxy)))
            log.info("serving %s through a loopback proxy at %s", cfg.serve_dir, proxy)
        download(
            url_list=url_parquet,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=additional_columns,
            output_folder=out_dir,
            output_format=output_format,
            resize_mode=cfg.resize_mode,
            image_size=cfg.image_size,
            encode_format=cfg.encode_format,
            processes_count=processes,
            thread_count=cfg.threads,
            number_sample_per_shard=cfg.shard_size,
            timeout=cfg.timeout,
            retries=cfg.retries,
            enable_wandb=False,
            distributor="multiprocessing",
            incremental_mode="incremental",
        )
    totals = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    fs, root = shards.fs_and_path(out_dir)
    for f in sorted(fs.glob(f"{root.rstrip('/')}/*_stats.json")):  # out_dir may be s3://...
        s = json.loads(fs.cat_file(f))
        for k in totals:
            totals[k] += int(s.get(k, 0))
    return totals


def _content_digest(path: str) -> str:
    """sha256 of the URL list's bytes: a list rewritten with the same content (a regenerated demo world, a
    copy) must not trigger a new crawl, and an edited one must. Hashing costs ~1 s per GB; a crawl far more."""
    return shards.content_digest(path)


def download_pool(input_path: str, stage_dir: str, cfg: IngestStage.Config) -> tuple[str, dict]:
    """Group the list, run img2dataset into `<stage>/_img2dataset`. Skipped when already complete."""
    df = read_url_list(input_path, cfg.url_col, cfg.caption_col)
    grouped, bad = group_by_url(df)
    raw_dir = os.path.join(stage_dir, "_img2dataset")
    fp = fingerprint(
        {
            "input": _content_digest(str(input_path)),
            "grouping": 2,  # 2: one row per distinct (url, caption), repeats rejected
            "cfg": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("processes", "threads")},
        }
    )
    marker = os.path.join(raw_dir, "_clipcurate_done.json")
    prior = shards.read_json(marker)
    n_dup = int((bad["status"] == DUPLICATE).sum())
    info = {"input_rows": df.height, "unique_urls": grouped.height, "bad_urls": bad.height - n_dup,
            "duplicates": n_dup}
    if prior and prior.get("fingerprint") == fp:
        log.info("ingest: download already complete (%s), reusing", raw_dir)
        info.update(prior.get("img2dataset", {}))
        return raw_dir, info
    if prior or shards.exists(raw_dir):
        shards.remove(raw_dir)  # a different list or config: start the download afresh
    shards.makedirs(stage_dir)
    if grouped.height == 0 and bad.height == 0:
        raise StageError(f"ingest: URL list {input_path} has no rows")
    list_path = os.path.join(stage_dir, "_urls.parquet")
    grouped.write_parquet(list_path)
    log.info("ingest: %d rows, %d unique URLs, %d malformed URLs, %d repeated (url, caption) rows", df.height,
             grouped.height, info["bad_urls"], n_dup)
    t0 = time.perf_counter()
    totals = run_img2dataset(list_path, raw_dir, cfg, additional_columns=[CAPTIONS_COL]) if grouped.height else {}
    totals["seconds"] = round(time.perf_counter() - t0, 3)
    if bad.height:
        # malformed URLs, rows that are not UTF-8 and repeated rows never reach img2dataset; they travel as an extra
        # "failed" shard so no row is lost
        shards.makedirs(raw_dir)
        bad.select("url", "caption", "status", "error_message").write_parquet(os.path.join(raw_dir, "invalid-urls.parquet"))
    info["img2dataset"] = totals
    shards.write_json({"fingerprint": fp, "img2dataset": totals}, marker)
    info.update(totals)
    return raw_dir, info


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
