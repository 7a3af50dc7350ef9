"""ingest: URL list -> img2dataset -> shards in the row schema.

Kept apart as in img2dataset itself: *reading* the URL list (`read_url_list`), *downloading*
(img2dataset, untouched), and *converting* its Parquet output to our rows (the `IngestStage`, run by the
ordinary runner so that resume, manifests and Dask apply to it too).

A URL that appears with several captions is downloaded once: the list is grouped by URL before
img2dataset sees it, all captions travel with it as a JSON column, and conversion yields one row per
caption (same image bytes, distinct uids since uid hashes url + text). A row repeating an earlier (url, caption)
would repeat its uid: it is rejected as `duplicate: same url and caption as another row`, so ingest keeps one
row per distinct (url, caption) and every uid once.

Rejected rows (`reason`): img2dataset's status and error ("failed_to_download: HTTP Error 404: ..."), and
ours for rows that never reach img2dataset: `invalid_url: not an http(s) URL` (malformed or empty) and
`invalid_utf8: url or caption is not valid UTF-8` (a CSV/TSV or Parquet list with a few rows in another encoding;
their text is kept lossy-decoded, U+FFFD for bad bytes). The egress policy (pipeline/egress.py) gives
`blocked_scheme` (ftp:, file:, data:, javascript: ...), `blocked_userinfo` (user@host), `blocked_address` (a
loopback, private, link-local... address, literal or resolved, outside `[ingest] allow_private_hosts`) and
`blocked_redirect` (more than 5 redirects): before the download where the URL alone says so, else from the
fetch in img2dataset's worker (guard.py). A response that is no image at all (an HTML page under a .jpg name,
text, an empty body) is `not_an_image: an HTML page` (guard.py sniffs the bytes img2dataset failed to decode).
Opt-outs: `robots_disallowed` and `tdm_reserved` before any request (optout.py); after it, on the image response's
headers, before its body is read: `x_robots_tag` (an X-Robots-Tag naming one of `x_robots_directives`:
img2dataset's check) and `tdm_reserved` (a `tdm-reservation: 1` header: guard.TdmHeaderProcessor). Both sets are
rules (optout_rules.py, pipeline/rules.py's idiom); after the download their reason ranks below the egress refusals
and not_an_image, above duplicate and img2dataset's own status.
Opt-outs, checked before the download (optout.py: each host's robots.txt and /.well-known/tdmrep.json, fetched
once per run): `robots_disallowed` and `tdm_reserved`, never requested; every downloaded row carries the evidence
(`robots_status`, `robots_rule`, `robots_sha256`, `tdm_reservation`) and the run's `optout/` holds the files.

The package: this module is the stage (`IngestStage`, and `CopyStats`, its statistics); `urls.py` reads and
groups the URL list, `optout.py` checks robots.txt and TDMRep before the download, `download.py` runs img2dataset
(`download_pool`, `run_img2dataset`), `crawl.py` uses an img2dataset output folder in place (`crawl_input`), and
`serve.py` is the loopback server that a demo world's `www/` is downloaded from (`[ingest] serve_dir`). Every
name other code imports is importable from here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import egress, schema, shards
from pipeline.codec import data_record
from pipeline.images import REF_COL
from pipeline.context import ShardContext
from pipeline.rules import judge
from pipeline.stage import Stage
from stages.ingest.config import IngestConfig
from stages.ingest.crawl import crawl_input
from stages.ingest.curated import CARRY_COL, carried_columns, carry_record, read_carry
from stages.ingest.download import download_pool, run_img2dataset
from stages.ingest.optout import EVIDENCE
from stages.ingest.optout_rules import AFTER_DOWNLOAD, X_ROBOTS_TAG, OptoutFacts  # X_ROBOTS_TAG: importable here
from stages.ingest.policies import REASONS as OPTOUT_REASONS
from stages.ingest.urls import (CAPTIONS_COL, DUPLICATE, DUPLICATE_REASON, NOT_AN_IMAGE, TDM_HEADER_ERROR, group_by_url,
                                read_url_list)

__all__ = ["IngestStage", "STAGE", "CopyStats", "CAPTIONS_COL", "read_url_list", "group_by_url", "download_pool",
           "run_img2dataset", "crawl_input"]


class IngestStage(Stage):
    name = "ingest"
    downloads = True  # `clipcurate ingest` (stages/ingest/cli.py) downloads, then runs this stage on the download
    requires = {"url": pa.string(), "status": pa.string()}

    Config = IngestConfig  # stages/ingest/config.py

    def output_name(self, input_name: str) -> str:
        return f"part-{input_name}" if not input_name.startswith("part-") else input_name

    def rows_in(self, table, kept, rejected) -> int:
        """An img2dataset row is a URL with its captions, and each caption is a row of the funnel."""
        return kept.num_rows + rejected.num_rows

    def fingerprint_parts(self, ctx: ShardContext | None = None) -> dict:
        parts = {"unique_uids": 1}  # a repeated (url, caption) of a crawl is rejected as `duplicate`
        carry = carry_record(ctx.stage_dir) if ctx is not None and ctx.stage_dir else None
        if carry:  # a run's curated output was downloaded: its rows' columns are joined back (curated.py)
            parts["carry"] = carry["digest"]
        return parts

    # ---- one row per uid: a crawl used in place may list the same (url, caption) twice -------------------
    # (a URL list is deduplicated before the download, `group_by_url`). Pool-wide and shuffled like align's
    # dedup keys: per uid the smallest content key, per (uid, content key) the smallest position hash.
    def collect(self, table: pa.Table, ctx: ShardContext | None = None) -> "CopyStats":
        kept, _ = self._convert(table)
        return CopyStats.of(*self._copy_keys(kept, ctx or self.detached()))

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

    def _copy_keys(self, kept: pa.Table, ctx: ShardContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uid key, content key, position hash) per kept row, as align orders the copies of a uid (its
        `row_content_key` without `image_ref`; ingest reads no pixels, so byte-equal rows are ordered by
        position: (shard, row) of the crawl, a property of the crawl and not of how the run cuts it)."""
        from pipeline.hashing import row_content_key, row_positions, uid_rank

        n = kept.num_rows
        pos = row_positions(ctx.shard, n)
        return uid_rank(kept.column("uid")) if n else np.zeros(0, np.uint64), row_content_key(kept), pos

    def apply(self, table: pa.Table, stats, ctx: ShardContext | None = None) -> tuple[pa.Table, pa.Table]:
        """img2dataset rows -> one row per caption; failures to `rejected` with img2dataset's reason; a repeat
        of a uid (a crawl listing the same url and caption twice) to `rejected` as `duplicate`."""
        ctx = ctx or self.detached()
        kept, rejected = self._convert(table)
        if stats is not None and kept.num_rows:
            extra = stats.extra_copies(*self._copy_keys(kept, ctx))  # on the rows as collect saw them
            if extra.any():
                mask = pa.array(extra)
                dup = kept.filter(mask).append_column(
                    "reason", pa.array([DUPLICATE_REASON] * int(extra.sum()), pa.string()))
                kept = kept.filter(pc.invert(mask))
                rejected = pa.concat_tables([rejected, dup.cast(rejected.schema)])
        if CARRY_COL in table.column_names:  # a run's curated output: each row gets back what it had
            carry = read_carry(pc.unique(table.column(CARRY_COL)).to_pylist(), ctx.stage_dir)
            kept, rejected = carried_columns(kept, carry), carried_columns(rejected, carry)
        return kept, rejected

    def _convert(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        """img2dataset rows -> one row per caption; failures to `rejected` with img2dataset's reason.

        The rows come without their image bytes: the img2dataset output is the run's image store, and the
        runner hands each row its reference (`image_ref`, pipeline/images.py)."""
        df = pl.from_arrow(table)
        # img2dataset's optional columns (a crawl used in place may lack them: no captions, no error text)
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias(c) for c in ("caption", "error_message")
                             if c not in df.columns)
        if "key" in df.columns:
            # img2dataset writes a shard's samples as its threads finish them: in its `key` order (the URL list's)
            # a shard's rows are the same whatever the download's timing (their image_ref still says where
            # the bytes landed)
            df = df.sort("key", nulls_last=True, maintain_order=True)
        if CAPTIONS_COL in df.columns:
            captions = pl.col(CAPTIONS_COL).str.json_decode(pl.Struct({"c": pl.List(pl.String)})).struct.field("c")
        else:
            captions = pl.concat_list(pl.col("caption").fill_null(""))  # a crawl used in place: one caption a row
        def int_col(name):
            return (pl.col(name) if name in df.columns else pl.lit(None)).cast(pl.Int32)
        ok = pl.col("status") == "success"
        # the egress policy's refusals: one reason each (no address in it), from a row set aside before the
        # download (status) or a fetch img2dataset's worker was refused (error "blocked_address: ...", guard.py)
        blocked = pl.coalesce(
            pl.when(pl.col("status").is_in(egress.REASONS + OPTOUT_REASONS)).then(pl.col("status")),
            pl.col("error_message").cast(pl.String).str.extract(BLOCKED_ERROR, 1) if "error_message" in df.columns
            else pl.lit(None, dtype=pl.String))
        not_image = pl.col("error_message").cast(pl.String).str.starts_with(f"{NOT_AN_IMAGE}: ").fill_null(False)
        # the opt-outs the image response's headers state (optout_rules.AFTER_DOWNLOAD: X-Robots-Tag, then
        # tdm-reservation), judged as rules; their reason takes its place in the chain below
        heads = df.select(x_robots_tag=(pl.col("error_message").cast(pl.String) == X_ROBOTS_ERROR).fill_null(False),
                          tdm_header=(pl.col("error_message").cast(pl.String) == TDM_HEADER_ERROR).fill_null(False))
        facts = OptoutFacts(x_robots_tag=heads["x_robots_tag"].to_numpy(), tdm_header=heads["tdm_header"].to_numpy())
        df = df.with_columns(pl.from_arrow(judge(AFTER_DOWNLOAD, facts, df.height)[0]).alias("_optout"))
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
            .when(blocked.is_not_null())
            .then(blocked)
            .when(not_image)  # a response that is no image (an HTML page under a .jpg name): guard.SniffingResizer
            .then(pl.col("error_message"))
            .when(pl.col("_optout").is_not_null())  # the response's headers opt the image out (its body unread)
            .then(pl.col("_optout"))
            .when(pl.col("status") == DUPLICATE)  # one wording, whatever a download made before it wrote
            .then(pl.lit(DUPLICATE_REASON))
            .otherwise(
                pl.col("status").fill_null("unknown")
                + pl.lit(": ")
                + pl.col("error_message").fill_null("").str.replace(r"\s+", " ").str.slice(0, 200)
            ),
        ).explode("text")
        uid = schema.compute_uid(df["url"].to_arrow(), df["text"].to_arrow())
        # the opt-out evidence of a downloaded URL list (optout.py), on kept and rejected rows alike
        evidence = [pl.col(c).cast(t, strict=False) for c, t in EVIDENCE.items() if c in df.columns]
        df = df.with_columns(uid=pl.Series(uid)).select(
            "uid", "url", "text", REF_COL, "width", "height", "orig_width", "orig_height", "reason", *evidence
        )
        out = df.to_arrow()
        out = schema.check_columns(out, schema.ROW_SCHEMA, "ingest")
        is_kept = pc.is_null(out.column("reason"))
        kept = out.filter(is_kept).drop_columns(["reason"])
        rejected = out.filter(pc.invert(is_kept))
        return kept, rejected


STAGE = IngestStage
BLOCKED_ERROR = r"^(" + "|".join(egress.REASONS) + r"): "  # str(egress.Blocked) as img2dataset records it
X_ROBOTS_ERROR = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset 1.47's words (downloader.py)


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

