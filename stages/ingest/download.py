"""Downloading: the grouped URL list through img2dataset (its own code, in this process; it spawns its own
workers; every fetch under the egress policy, guard.py) into `<stage>/_img2dataset`, skipped when a download of
the same list and config is complete. A demo world's `www/` is served on loopback meanwhile (`serve.py`) when
`[ingest] serve_dir` names it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import tempfile
import time
from contextlib import ExitStack, contextmanager

from pipeline import egress, shards
from pipeline.errors import StageError
from pipeline.hashing import fingerprint
from stages.ingest import optout, policies
from stages.ingest.config import IngestConfig
from stages.ingest.hostlimit import HostLimits
from stages.ingest.policies import product_token
from stages.ingest.urls import CAPTIONS_COL, DUPLICATE, group_by_url, read_url_list, spread_hosts


log = logging.getLogger("clipcurate.ingest")


def img2dataset_args(url_parquet: str, out_dir: str, cfg: IngestConfig, additional_columns=None,
                     output_format: str = "parquet") -> dict:
    """The keyword arguments ingest calls `img2dataset.download` with (the egress bench reuses them)."""
    return dict(
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
        processes_count=cfg.processes or (os.cpu_count() or 1),
        thread_count=cfg.threads,
        number_sample_per_shard=cfg.shard_size,
        timeout=cfg.timeout,
        retries=cfg.retries,
        # X-Robots-Tag on each image response (img2dataset's check): directives for all crawlers, or for our
        # product token, which img2dataset also names in its User-Agent ("compatible; TOKEN")
        disallowed_header_directives=[d.strip().lower() for d in cfg.x_robots_directives],
        user_agent_token=product_token(cfg.user_agent).lower(),
        enable_wandb=False,
        distributor="multiprocessing",
        incremental_mode="incremental",
    )


@contextmanager
def served(cfg: IngestConfig):
    """While open, a demo world's `www/` (`serve_dir`) is served on loopback, its host pinned there; yields the
    egress policy every fetch of the download obeys (whether that loopback server may be fetched from is still
    allow_private_hosts' say)."""
    with ExitStack() as stack:
        pinned = {}
        if cfg.serve_dir:
            from stages.ingest.serve import DEMO_HOST, serve_world

            server = stack.enter_context(serve_world(cfg.serve_dir))
            pinned = {f"{DEMO_HOST}:80": ("127.0.0.1", int(server.rsplit(":", 1)[1]))}
            log.info("serving %s as %s on %s", cfg.serve_dir, DEMO_HOST, server)
        yield cfg.egress_policy(pinned)


@contextmanager
def host_limits(cfg: IngestConfig):
    """The per-host limits of one download (hostlimit.py), with their lock folder, removed after it; None when
    nothing is limited."""
    if cfg.per_host_concurrency <= 0 and cfg.per_host_rps <= 0:
        yield None
        return
    exempt = frozenset() if cfg.per_host_limit_private else frozenset(
        egress.host_key(*egress.parse_host_port(h)) for h in cfg.allow_private_hosts)
    with tempfile.TemporaryDirectory(prefix="clipcurate-hosts-") as folder:
        log.info("ingest: per host at most %s open requests and %s request starts a second%s",
                 cfg.per_host_concurrency or "any number of", cfg.per_host_rps or "any number of",
                 f" ({len(exempt)} private hosts exempt)" if exempt else "")
        yield HostLimits(folder, cfg.per_host_concurrency, float(cfg.per_host_rps), exempt)


def run_img2dataset(url_parquet: str, out_dir: str, cfg: IngestConfig, additional_columns=None,
                    output_format: str = "parquet", policy: egress.EgressPolicy | None = None) -> dict:
    """Call img2dataset (in this process; it spawns its own workers), every fetch under the egress policy
    (`[ingest] allow_private_hosts`; guard.py says how its workers are made to obey it). Returns its summed
    stats. A demo world's `www/` (`serve_dir`) is served on loopback meanwhile (`served`), unless `policy` is
    given: the caller serves it already (download_pool, which fetches the opt-out files first)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from img2dataset import download

    from stages.ingest.guard import guarded_downloads

    with ExitStack() as stack:
        if policy is None:
            policy = stack.enter_context(served(cfg))
        limits = stack.enter_context(host_limits(cfg))
        built = stack.enter_context(guarded_downloads(policy, tdm_header=cfg.respect_tdmrep,
                                                      backoff=(cfg.backoff_tries, float(cfg.backoff_max_wait)),
                                                      host_limits=limits))
        download(**img2dataset_args(url_parquet, out_dir, cfg, additional_columns, output_format))
        if not built:
            raise StageError("ingest: img2dataset did not build its downloader through clipcurate's egress guard "
                             "(stages/ingest/guard.py): is img2dataset the pinned version?")
    totals = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    fs, root = shards.fs_and_path(out_dir)
    for f in sorted(fs.glob(f"{root.rstrip('/')}/*_stats.json")):  # out_dir may be s3://...
        s = json.loads(fs.cat_file(f))
        for k in totals:
            totals[k] += int(s.get(k, 0))
    return totals


POLITENESS = ("processes", "threads", "per_host_concurrency", "per_host_rps", "per_host_limit_private")


def _content_digest(path: str) -> str:
    """sha256 of the URL list's bytes: a list rewritten with the same content (a regenerated demo world, a
    copy) must not trigger a new crawl, and an edited one must. Hashing costs far less than a crawl (its
    cost per GB, timed by hand: bench/README.md, "The spine by hand")."""
    return shards.content_digest(path)


def optout_folder(stage_dir: str) -> str:
    """The run's `optout/` (beside the ingest stage's folder): the policy files fetched for its download."""
    return shards.join((posixpath if "://" in str(stage_dir) else os.path).dirname(str(stage_dir).rstrip("/")),
                       "optout")


DONE_MARKER = "_clipcurate_done.json"  # in the download folder: its fingerprint, counts, and retries


def download_pool(input_path: str, stage_dir: str, cfg: IngestConfig,
                  optout_dir: str | None = None) -> tuple[str, dict]:
    """Group the list, set aside what robots.txt and TDMRep exclude (optout.py: no request for those URLs), run
    img2dataset into `<stage>/_img2dataset`. Skipped when already complete.

    `input_path`: a URL list file, or a run's curated output (a folder of row shards: `curated.py`), whose
    rows' columns are set aside in `<stage>/_carry/` for the ingest stage to join back. `optout_dir`: where the
    fetched policy files are recorded, default the run's `optout/` (beside the stage folder)."""
    from stages.ingest.curated import CARRY_COL, group_curated, is_curated_folder

    list_path = os.path.join(stage_dir, "_urls.parquet")
    extra_cols = [CAPTIONS_COL]
    if is_curated_folder(str(input_path)):
        shards.makedirs(stage_dir)
        grouped, bad, curated = group_curated(str(input_path), stage_dir, cfg.shard_size, cfg.egress_policy())
        input_rows = curated["curated_rows"]
        extra_cols.append(CARRY_COL)
        # the download depends on the URLs and captions only: what else the rows carry is joined after it
        shards.write_shard(grouped.to_arrow(), list_path)
        identity = {"urls": _content_digest(list_path)}
    else:
        df = read_url_list(input_path, cfg.url_col, cfg.caption_col)
        grouped, bad = group_by_url(df, cfg.egress_policy())
        input_rows, curated = df.height, None
        identity = _content_digest(str(input_path))
    raw_dir = os.path.join(stage_dir, "_img2dataset")
    fp = fingerprint(
        {
            "input": identity,
            "grouping": 2,  # 2: one row per distinct (url, caption), repeats rejected
            "egress": 1,  # every fetch under the egress policy: a download made before it is not reused
            "optout": 1,  # robots.txt and TDMRep checked before the download (optout.py)
            # how fast and how politely it is fetched does not change what is downloaded
            "cfg": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in POLITENESS},
        }
    )
    marker = os.path.join(raw_dir, DONE_MARKER)
    prior = shards.read_json(marker)
    n_dup = int((bad["status"] == DUPLICATE).sum())
    n_blocked = int(bad["status"].is_in(egress.REASONS).sum())  # refused by the egress policy, no request made
    info = {"input_rows": input_rows, "unique_urls": grouped.height, "bad_urls": bad.height - n_dup - n_blocked,
            "blocked_urls": n_blocked, "duplicates": n_dup}
    if curated is not None:
        info["curated"] = curated
    if prior and prior.get("fingerprint") == fp:
        log.info("ingest: download already complete (%s), reusing", raw_dir)
        info.update(prior.get("img2dataset", {}))
        info.update(prior.get("optout_counts", {}))
        return raw_dir, info
    if prior or shards.exists(raw_dir):
        shards.remove(raw_dir)  # a different list or config: start the download afresh
    shards.makedirs(stage_dir)
    if grouped.height == 0 and bad.height == 0:
        raise StageError(f"ingest: URL list {input_path} has no rows")
    if optout_dir is None:
        optout_dir = optout_folder(stage_dir)
    with served(cfg) as policy:  # the demo's loopback host answers the policy fetches too
        t0 = time.perf_counter()
        grouped, bad, opt = optout.apply(grouped, bad, cfg, policy, optout_dir, CAPTIONS_COL)
        opt["seconds"] = round(time.perf_counter() - t0, 3)
        counts = {"robots_disallowed": int((bad["status"] == policies.ROBOTS_DISALLOWED).sum()),
                  "tdm_reserved": int((bad["status"] == policies.TDM_RESERVED).sum()),
                  "blocked_urls": int(bad["status"].is_in(egress.REASONS).sum()), "optout": opt,
                  "urls_fetched": grouped.height}
        info.update(counts)
        extra_cols += list(optout.EVIDENCE)
        grouped = spread_hosts(grouped)  # one host's URLs spread over img2dataset's shards and threads
        if curated is None:
            grouped.write_parquet(list_path)
        else:
            shards.write_shard(grouped.to_arrow(), list_path)
        log.info("ingest: %d rows, %d unique URLs, %d malformed URLs, %d refused by the egress policy, %d repeated "
                 "(url, caption) rows, %d disallowed by robots.txt, %d reserved by TDMRep (%d hosts, %.1f s)",
                 input_rows, grouped.height, info["bad_urls"], counts["blocked_urls"], n_dup,
                 counts["robots_disallowed"], counts["tdm_reserved"], opt["hosts"], opt["seconds"])
        t0 = time.perf_counter()
        totals = run_img2dataset(list_path, raw_dir, cfg, additional_columns=extra_cols, policy=policy) \
            if grouped.height else {}
        totals["seconds"] = round(time.perf_counter() - t0, 3)
    if bad.height:
        # malformed URLs, rows that are not UTF-8, repeated rows and opt-outs never reach img2dataset; they travel as
        # an extra "failed" shard so no row is lost
        shards.makedirs(raw_dir)
        cols = ["url", "caption", "status", "error_message"] + [c for c in (CARRY_COL,) if c in bad.columns] \
            + list(optout.EVIDENCE)
        bad.select(cols).write_parquet(os.path.join(raw_dir, "invalid-urls.parquet"))
    info["img2dataset"] = totals
    shards.write_json({"fingerprint": fp, "img2dataset": totals, "optout_counts": counts}, marker)
    info.update(totals)
    return raw_dir, info
