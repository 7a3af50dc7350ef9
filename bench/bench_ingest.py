"""Ingest with its opt-out and politeness checks on, off, and bare img2dataset (#32's benchmark): same loopback
server, same URL list, same processes/threads, side by side in paired rounds. Goal: the checks cost at most 10%
on top of the download (checks on / checks off <= 1.10, median over rounds).

Variants, each measurement a fresh subprocess (imports included, as a user pays them):
- `bare`: `img2dataset.download` unmodified, reaching the demo server as a proxy (serve.py's `proxy_env`). It
  fetches every URL row (repeated URLs included) and checks only X-Robots-Tag (img2dataset's default list).
- `off`: `clipcurate ingest` with `respect_robots = false`, `respect_tdmrep = false`, `x_robots_directives = []`,
  `backoff_tries = 0`. The egress guard stays: it is always on.
- `on`: the defaults. robots.txt and /.well-known/tdmrep.json fetched once for the host and every URL matched
  against them before the download (optout.py); X-Robots-Tag and `tdm-reservation` checked on each response and
  429/503 waited out (guard.py).
- `limit`, only when `IngestStage.Config` has the per-host limiter (`per_host_concurrency`, `per_host_rps`,
  `per_host_limit_private`): `on` plus the limiter applied to the loopback host with a cap that never binds
  (concurrency = processes x threads, rps 0), so what it measures is the limiter's bookkeeping.

The world is the demo world (`make_world`, in a temporary folder); the server serves a copy of its `www/` with a
robots.txt (`Disallow: /private/`) and a tdmrep.json (one rule reserving `/private/*`) added, so that `on` fetches,
parses and matches real files while keeping the same rows as `off` (checked: the run fails otherwise).
Each round runs every variant once, in an order from a Williams design (`round_orders`): over k rounds (k
variants; 2k when k is odd) each variant takes each position equally often and directly follows each other
variant equally often, so neither a position nor the run before it (its page cache, its writes still flushing)
favours one. Overheads are per-round ratios, median over rounds, of the wall time (the goal) and of the CPU time
(user + system of the subprocess and its workers: on a machine shared with other jobs it moves far less than the
wall time). The opt-out phase's own time is the stage manifest's `download.optout.seconds`; the download's,
`download.seconds` (img2dataset alone). Writes bench/results/ingest.json.

    .venv/bin/python bench/bench_ingest.py [--n 3000] [--rounds 3] [--processes 2] [--threads 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

BARE = """
import os, sys
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
from stages.ingest.serve import serve_world, proxy_env
from img2dataset import download
www, urls, out, procs, threads = sys.argv[1:6]
with serve_world(www) as proxy:
    os.environ.update(proxy_env(proxy))
    download(url_list=urls, input_format="parquet", url_col="url", caption_col="caption", output_folder=out,
             output_format="parquet", resize_mode="no", processes_count=int(procs), thread_count=int(threads),
             number_sample_per_shard=1000, timeout=10, retries=0, enable_wandb=False, distributor="multiprocessing")
"""


ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"  # matches no URL of the demo world (all under /img/)
TDMREP_JSON = [{"location": "/private/*", "tdm-reservation": 1}]  # nor does this rule

OFF = {"respect_robots": False, "respect_tdmrep": False, "x_robots_directives": [], "backoff_tries": 0}
LIMITER_FIELDS = ("per_host_concurrency", "per_host_rps", "per_host_limit_private")
WHAT = {
    "bare": "img2dataset.download unmodified, through the demo server as a proxy; checks X-Robots-Tag only "
            "(its default list); fetches every URL row, repeated URLs included",
    "off": "clipcurate ingest, respect_robots = false, respect_tdmrep = false, x_robots_directives = [], "
           "backoff_tries = 0 (the egress guard is always on)",
    "on": "clipcurate ingest, defaults: robots.txt + tdmrep.json before the download, X-Robots-Tag and "
          "tdm-reservation on each response, 429/503 backoff",
    "limit": "on + the per-host limiter applied to the loopback host (per_host_limit_private = true), "
             "per_host_concurrency = processes x threads, per_host_rps = 0: a cap that never binds",
}


class Failed(RuntimeError):
    pass


def cpu_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one subprocess. The CPU time (user + system, the subprocess and the
    workers it waits for: img2dataset's processes, the loopback server's threads) is what the checks add to the
    work; on a machine shared with other jobs it varies far less than the wall time does."""
    c0, t0 = cpu_of_children(), time.perf_counter()
    with open(log, "wb") as err:
        rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err).returncode
    s, cpu = time.perf_counter() - t0, cpu_of_children() - c0
    if rc:
        tail = log.read_text(errors="replace")[-2000:]
        raise Failed(f"{cmd[:3]} exited {rc} after {s:.1f} s:\n{tail}")
    return s, cpu


def toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()  # JSON strings/lists are TOML


def has_limiter() -> bool:
    """Whether this tree's ingest has the per-host limiter (added beside this bench, #32 item 4)."""
    import dataclasses

    from stages.ingest import IngestStage

    names = {f.name for f in dataclasses.fields(IngestStage.Config)}
    return all(f in names for f in LIMITER_FIELDS)


def policy_www(world: Path, dest: Path) -> Path:
    """A copy of the world's www/ with a robots.txt and a tdmrep.json that exclude nothing the world lists."""
    shutil.copytree(world / "www", dest)
    (dest / "robots.txt").write_text(ROBOTS_TXT)
    (dest / ".well-known").mkdir()
    (dest / ".well-known" / "tdmrep.json").write_text(json.dumps(TDMREP_JSON))
    return dest


def round_orders(k: int) -> list[list[int]]:
    """A Williams design: orders of 0..k-1 in which each index takes each position once and directly follows
    each other index once (k rows for even k; for odd k the k rows and their reverses)."""
    first, lo, hi = [0], 1, k - 1
    while len(first) < k:
        first.append(lo)
        lo += 1
        if len(first) < k:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % k for x in first] for r in range(k)]
    return rows if k % 2 == 0 else rows + [row[::-1] for row in rows]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    args = ap.parse_args()

    from demo.world import make_world

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    load_before = os.getloadavg()
    try:
        world = work / "world"
        make_world(world, n=args.n, seed=0)
        www = policy_www(world, work / "www")
        import polars as pl

        rows = pl.read_parquet(world / "urls.parquet").height
        base = {"processes": args.processes, "threads": args.threads, "shard_size": 1000,
                "allow_private_hosts": ["demo.clipcurate.invalid:80"]}  # the world's loopback server
        configs = {"off": {**base, **OFF}, "on": dict(base)}
        limiter = has_limiter()
        if limiter:
            configs["limit"] = {**base, "per_host_limit_private": True,
                                "per_host_concurrency": args.processes * args.threads, "per_host_rps": 0}
        for name, c in configs.items():
            (work / f"{name}.toml").write_text("[ingest]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in c.items()))
        variants = ["bare", *configs]
        res = {v: {"seconds": [], "cpu_seconds": [], "rows_kept": [], "load1_before": []} for v in variants}
        orders, schedule = [], round_orders(len(variants))
        for r in range(args.rounds):
            order = [variants[i] for i in schedule[r % len(schedule)]]
            orders.append(order)
            for which in order:
                shutil.rmtree(work / "runs", ignore_errors=True)
                shutil.rmtree(work / "bare", ignore_errors=True)
                res[which]["load1_before"].append(round(os.getloadavg()[0], 2))
                log = work / f"{which}-{r}.log"
                if which == "bare":
                    s, cpu = timed([sys.executable, "-c", BARE, str(www), str(world / "urls.parquet"),
                                    str(work / "bare"), str(args.processes), str(args.threads)], env, log)
                    kept = sum(json.loads(f.read_text())["successes"] for f in (work / "bare").glob("*_stats.json"))
                else:
                    s, cpu = timed([str(BIN / "clipcurate"), "--runs-dir", str(work / "runs"), "ingest",
                                    str(world / "urls.parquet"), "--run", "b", "--config", str(work / f"{which}.toml"),
                                    "--serve", str(www), "--workers", "0"], env, log)
                    m = json.loads((work / "runs" / "b" / "00_ingest" / "_manifest.json").read_text())
                    kept, d = m["rows_out"], m["download"]
                    res[which].setdefault("rows_rejected", []).append(m["rejected"])
                    res[which].setdefault("img2dataset_seconds", []).append(d.get("seconds"))
                    res[which].setdefault("optout_seconds", []).append(d["optout"]["seconds"])
                    res[which]["optout"] = d["optout"]
                    res[which]["unique_urls"], res[which]["urls_fetched"] = d["unique_urls"], d.get("urls_fetched")
                    hosts = work / "runs" / "b" / "optout" / "hosts.parquet"
                    if hosts.exists():
                        h = pl.read_parquet(hosts)
                        res[which]["optout_hosts"] = h.select(c for c in (
                            "host", "robots_status", "robots_http", "robots_bytes", "tdmrep_status", "tdmrep_http",
                            "urls", "robots_disallowed", "tdm_reserved") if c in h.columns).to_dicts()
                res[which]["seconds"].append(round(s, 2))
                res[which]["cpu_seconds"].append(round(cpu, 2))
                res[which]["rows_kept"].append(kept)
                print(f"round {r + 1} {which}: {s:.1f} s, CPU {cpu:.1f} s ({rows / s:.0f} URL rows/s), "
                      f"{kept} rows kept", flush=True)
        ours = [v for v in variants if v != "bare"]
        kept_sets = {v: sorted(set(res[v]["rows_kept"])) for v in ours}
        if len({tuple(k) for k in kept_sets.values()}) != 1:
            raise Failed(f"rows kept differ between our variants: {kept_sets}")
        for v in variants:
            res[v]["median_s"] = round(median(res[v]["seconds"]), 2)
            res[v]["min_s"] = min(res[v]["seconds"])
            res[v]["rows_per_s_median"] = round(rows / res[v]["median_s"], 1)
            res[v]["cpu_median_s"] = round(median(res[v]["cpu_seconds"]), 2)

        def ratio(a: str, b: str, key: str) -> dict:
            per = [round(x / y, 3) for x, y in zip(res[a][key], res[b][key])]
            return {"per_round": per, "median": round(median(per), 3),
                    "of_medians": round(median(res[a][key]) / median(res[b][key]), 3)}

        pairs = [("on", "off"), ("on", "bare"), ("off", "bare")]
        if limiter:
            pairs += [("limit", "on"), ("limit", "off")]
        ratios = {f"{a}_over_{b}": ratio(a, b, "seconds") for a, b in pairs}
        cpu_ratios = {f"{a}_over_{b}": ratio(a, b, "cpu_seconds") for a, b in pairs}
        result = {
            "what": "ingest wall time (subprocess, imports included) with the opt-out/politeness checks on vs off vs "
                    "bare img2dataset.download, same loopback server, URL list, processes and threads; paired "
                    "rounds, order rotated",
            "url_rows": rows,
            "unique_urls": res["on"]["unique_urls"],
            "note": "bare img2dataset fetches every URL row (repeated URLs included) and converts nothing; ours "
                    "fetches each unique URL once, then converts to the row schema (uids, one row per caption, "
                    "rejected rows with reasons)",
            "policy_files": {"robots.txt": ROBOTS_TXT, ".well-known/tdmrep.json": TDMREP_JSON},
            "processes": args.processes,
            "threads": args.threads,
            "rounds": args.rounds,
            "orders": orders,
            "variants": {v: {"what": WHAT[v], **({"config": configs[v]} if v in configs else {}), **res[v]}
                         for v in variants},
            "limiter": "measured (variant limit)" if limiter else
                       "skipped: IngestStage.Config has no " + "/".join(LIMITER_FIELDS) + " in this tree yet",
            "ratios": ratios,
            "cpu_ratios": cpu_ratios,
            "goal": "checks on / checks off <= 1.10 (median of per-round wall-time ratios)",
            "goal_met": ratios["on_over_off"]["median"] <= 1.10,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_before": [round(x, 2) for x in load_before],
                        "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        }
        out = ROOT / "bench" / "results" / "ingest.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("ratios", "cpu_ratios", "goal_met", "limiter", "machine")}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
