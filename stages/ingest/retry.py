"""`clipcurate ingest --run NAME --retry-failed`: download again only the rows a crawl lost to passing trouble,
into the run's own image store, so that the run ends as a clean pass would have.

Which rows (the rule, on img2dataset's `status` and `error_message` and our opt-out evidence):
- retried: `failed_to_download` by a timeout, a refused/reset/closed connection, a DNS lookup that failed for now,
  or an HTTP 408, 425, 429 or 5xx answer (`TRANSIENT_ERROR`); and `robots_disallowed` because the host's
  robots.txt was unreachable (RFC 9309 2.3.1.4: disallow all, *for now*): that robots.txt is fetched again first,
  and only what it now allows is downloaded;
- never retried: any other HTTP answer (404, 403, 410 ...), an image that failed to decode or is no image, an
  opt-out (robots.txt rules, TDMRep, X-Robots-Tag), an egress refusal, a malformed or repeated row.

Where the retried rows go: a recovered row img2dataset had downloaded into shard S keeps its place in S (S is
rewritten with the retry's answer in that row: its status, bytes and sizes; the key and position stay, so every
image reference into S stays valid); a row that fails again keeps its first error, and its shard is not touched.
Rows that never reached img2dataset (robots.txt unreachable) that its robots.txt now allows go to one new store
shard, downloaded or not, and leave `invalid-urls.parquet`. Only rewritten or added files are new inputs: with
none, nothing is redone; else the runner's resume (per shard: pipeline/resume.py) redoes the ingest shards made
from those files and, on the next `clipcurate run`, the same shards in the steps after it, with any whose answer
from a step's pool-wide statistics changed.
"""

from __future__ import annotations

import datetime
import logging
import os

import polars as pl
import pyarrow as pa

from pipeline import shards
from pipeline.errors import StageError
from stages.ingest.curated import CARRY_COL
from stages.ingest.download import run_img2dataset
from stages.ingest.optout import EVIDENCE, check_urls, settings_of
from stages.ingest.policies import ROBOTS_DISALLOWED
from stages.ingest.urls import CAPTIONS_COL

log = logging.getLogger("clipcurate.ingest")

INVALID = "invalid-urls.parquet"  # the set-aside rows of a download (download.py): no bytes, never fetched
# str(err) of img2dataset's fetch for a failure worth a second try (urllib's and http.client's wording)
TRANSIENT_ERROR = (r"(?i)HTTP Error (408|425|429|5\d\d)\b|timed out|Connection (refused|reset|aborted)"
                   r"|Remote end closed connection|IncompleteRead|Temporary failure in name resolution"
                   r"|Network is unreachable|No route to host|Broken pipe|EOF occurred in violation")


def transient() -> pl.Expr:
    """An img2dataset row that failed in a way worth a second try (the module's rule)."""
    return ((pl.col("status") == "failed_to_download")
            & pl.col("error_message").cast(pl.String).str.contains(TRANSIENT_ERROR).fill_null(False))


def robots_unreachable() -> pl.Expr:
    """A set-aside row that robots.txt excluded only because it could not be fetched."""
    return (pl.col("status") == ROBOTS_DISALLOWED) & (pl.col("robots_status") == "unreachable")


def store_shards(raw_dir: str) -> list[str]:
    """img2dataset's own shards in the store (not the set-aside rows)."""
    return [f for f in shards.list_shards(raw_dir) if shards.shard_name(f) != INVALID]


def _list_columns(df: pl.DataFrame) -> list[str]:
    """What a row of the URL list img2dataset is given carries (download.py's extra columns)."""
    return ["url", "caption", CAPTIONS_COL] + [c for c in (CARRY_COL, *EVIDENCE) if c in df.columns]


def retry_failed(raw_dir: str, stage_dir: str, cfg, policy, optout_dir: str) -> dict:
    """Download the run's transient failures (the module's rule) again with img2dataset, under `policy`;
    returns counts for the manifest and the summary line."""
    failed: dict[str, list[str]] = {}  # store shard -> its URLs to retry
    lists = []
    for f in store_shards(raw_dir):
        cols = [x.name for x in shards.read_schema(f) if not pa.types.is_binary(x.type)
                and not pa.types.is_large_binary(x.type)]  # no image bytes: the rows' facts only
        meta = pl.from_arrow(shards.read_shard(f, columns=cols))
        bad = meta.filter(transient())
        if bad.height:
            failed[f] = bad["url"].to_list()
            lists.append(bad.select(_list_columns(bad)))
    invalid_path = shards.join(raw_dir, INVALID)
    invalid = pl.from_arrow(shards.read_shard(invalid_path)) if shards.exists(invalid_path) else None
    refetched_hosts, allowed_now, robots_changed = 0, None, False
    if invalid is not None and "robots_status" in invalid.columns:
        unreachable = invalid.filter(robots_unreachable())
        if unreachable.height:
            urls = unreachable["url"].unique(maintain_order=True)
            checked, info = check_urls(urls, settings_of(cfg), policy, optout_dir, refetch_unreachable=True)
            refetched_hosts = info["fetched"]
            verdict = pl.DataFrame({"url": urls}).hstack(checked)
            robots_changed = bool((verdict["robots_status"] != "unreachable").any())
            allowed_now = verdict.filter(pl.col("optout").is_null())["url"]
            # the rows robots.txt now allows, as a URL list again (their captions grouped back, as download.py does)
            again = (unreachable.filter(pl.col("url").is_in(allowed_now.implode()))
                     .group_by("url", maintain_order=True)
                     .agg(pl.col("caption").first().alias("caption"), pl.col("caption").alias("_c"),
                          *[pl.col(c).first() for c in (CARRY_COL,) if c in unreachable.columns])
                     .with_columns(pl.struct(pl.col("_c").alias("c")).struct.json_encode().alias(CAPTIONS_COL))
                     .drop("_c")
                     .join(verdict.select("url", *EVIDENCE), on="url", how="left"))
            if again.height:
                lists.append(again.select(_list_columns(again)))
            # the rows still excluded get today's evidence; the others leave the set-aside rows below
            invalid = _with_fresh_evidence(invalid, verdict)
    tried = sum(x.height for x in lists)
    out = {"tried": tried, "robots_refetched_hosts": refetched_hosts, "recovered": 0, "still_failing": 0,
           "changed_files": 0,
           "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if not tried:
        return out
    todo = pl.concat(lists, how="diagonal_relaxed")
    work = shards.join(stage_dir, "_retry")
    shards.remove(work)
    shards.makedirs(work)
    list_path = shards.join(work, "_urls.parquet")
    shards.write_shard(todo.to_arrow(), list_path)
    extra = [c for c in todo.columns if c not in ("url", "caption")]
    log.info("ingest: retrying %d URLs that failed for transient reasons", tried)
    stats = run_img2dataset(list_path, shards.join(work, "out"), cfg, additional_columns=extra, policy=policy)
    got = pl.concat([pl.from_arrow(shards.read_shard(f)) for f in shards.list_shards(shards.join(work, "out"))],
                    how="diagonal_relaxed")
    changed = 0  # store files rewritten or added: what the ingest step has to redo
    for f, urls in failed.items():  # a row that fails again keeps its first error: its shard stays as it was
        recovered = got.filter(pl.col("url").is_in(urls) & (pl.col("status") == "success"))
        if recovered.height:
            _patch_shard(f, recovered)
            changed += 1
    if allowed_now is not None and allowed_now.len():
        fresh = got.filter(pl.col("url").is_in(allowed_now.implode()))
        if fresh.height:
            names = [shards.shard_name(f) for f in store_shards(raw_dir)]
            stem = max((n.split(".")[0] for n in names if n.split(".")[0].isdigit()), default="-1")
            name = f"{int(stem) + 1:0{max(len(stem), 5)}d}.parquet"
            template = shards.read_schema(shards.join(raw_dir, names[0])) if names else None
            table = fresh.to_arrow()
            shards.write_shard(_cast_like(table, template), shards.join(raw_dir, name))
            out["new_shard"] = name
            changed += 1
        # (their evidence is today's already: what marks them is the URL, now in a store shard)
        invalid = invalid.filter(~((pl.col("status") == ROBOTS_DISALLOWED) & pl.col("url").is_in(allowed_now.implode())))
    if invalid is not None and robots_changed:  # a robots.txt that answered today: its rows' evidence is new
        shards.write_shard(invalid.to_arrow(), invalid_path)
        changed += 1
    ok = int((got["status"] == "success").sum())
    out.update(recovered=ok, still_failing=got.height - ok, changed_files=changed, img2dataset=stats)
    shards.remove(work)
    return out


def _with_fresh_evidence(invalid: pl.DataFrame, verdict: pl.DataFrame) -> pl.DataFrame:
    """The robots.txt-unreachable rows with the evidence and message of today's fetch (rows it still excludes
    keep `robots_disallowed`, with why; the others are removed by the caller once downloaded)."""
    mask = robots_unreachable()
    new = invalid.filter(mask).drop(*EVIDENCE, "error_message", strict=False).join(
        verdict.select("url", *EVIDENCE, pl.col("message").alias("error_message"),
                       pl.col("optout").alias("_optout")), on="url", how="left")
    new = new.with_columns(status=pl.coalesce("_optout", "status")).drop("_optout")
    return pl.concat([invalid.filter(~mask), new.select(invalid.columns)], how="vertical_relaxed")


def _cast_like(table: pa.Table, template: pa.Schema | None) -> pa.Table:
    """The retry's rows in the schema of the store's shards (null columns typed as theirs)."""
    if template is None:
        return table
    cols = [table.column(n).cast(template.field(n).type) if n in table.column_names
            else pa.nulls(table.num_rows, template.field(n).type) for n in template.names]
    return pa.table(cols, schema=template)


def _patch_shard(path: str, answers: pl.DataFrame) -> None:
    """Store shard `path` with each retried URL's row replaced by the retry's answer, in place: same key, same
    position (image references are FILE#ROW), the rest of the row (status, error, bytes, sizes) the retry's."""
    table = shards.read_shard(path)
    orig = pl.from_arrow(table).with_row_index("_pos")
    answers = answers.unique("url", keep="first")
    keep = orig.filter(~pl.col("url").is_in(answers["url"].implode()))
    redone = orig.select("_pos", "key", "url").join(answers.drop("key", strict=False), on="url", how="inner")
    merged = pl.concat([keep, redone.select(orig.columns)], how="vertical_relaxed").sort("_pos").drop("_pos")
    if merged.height != table.num_rows:
        raise StageError(f"ingest --retry-failed: shard {shards.shard_name(path)} would change its row count "
                         f"({table.num_rows} -> {merged.height}); nothing was written to it")
    shards.write_shard(_cast_like(merged.to_arrow(), table.schema), path)
    log.info("ingest: %s: %d rows replaced by the retry's answer", os.path.basename(str(path)), answers.height)
