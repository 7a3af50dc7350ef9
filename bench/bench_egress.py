"""What the egress policy costs: the loopback ingest download with the guard on and off, and the check itself.

1. The download (bench_ingest.py's setup: a demo world, its `www/` served on loopback, processes 2, threads 16,
   shards of 1000): ingest's own call (`run_img2dataset`: GuardedDownloader in img2dataset's workers, the demo
   host pinned to the loopback server and listed in allow_private_hosts) against img2dataset's stock Downloader
   with the same arguments, reaching the same server as a proxy (as bench_ingest.py's bare run does). The stock
   run exists here only: nothing user-facing turns the policy off. Paired rounds, the order alternating. Each call
   is timed whole (spawned workers' imports included) and by img2dataset's own shard stats (the time its workers
   spend in `download_shard`: fetch, decode, write, summed over shards; and first shard start to last end).
2. The check per request, on loopback: check_url, the address rule on a global address, a checked connect
   against socket.create_connection, and one whole guarded fetch against stock urllib's.

    .venv/bin/python bench/bench_egress.py [--n 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def _shard_stats(out_dir: Path) -> dict:
    stats = [json.loads(Path(p).read_text()) for p in glob.glob(str(out_dir / "*_stats.json"))]
    return {"fetch_span_s": max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats),
            "shard_s": sum(s["duration"] for s in stats),  # time inside download_shard: fetch + decode + write
            "successes": sum(s["successes"] for s in stats), "count": sum(s["count"] for s in stats)}


def _download(which: str, list_path: Path, out_dir: Path, cfg) -> dict:
    """One img2dataset call: "on" as ingest makes it, "off" with img2dataset's stock Downloader."""
    from img2dataset import download

    from stages.ingest.download import img2dataset_args, run_img2dataset
    from stages.ingest.serve import proxy_env, serve_world

    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    if which == "on":
        run_img2dataset(str(list_path), str(out_dir), cfg)
    else:
        saved = dict(os.environ)
        with serve_world(cfg.serve_dir) as proxy:
            os.environ.update(proxy_env(proxy))
            try:
                download(**img2dataset_args(str(list_path), str(out_dir), cfg))
            finally:
                os.environ.clear()
                os.environ.update(saved)
    return {"call_s": time.perf_counter() - t0, **_shard_stats(out_dir)}


def _per_call_us(fn, n: int) -> float:
    """Mean µs per call over n calls."""
    fn()  # warm
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def _micro(www: Path, n: int) -> dict:
    """µs per call on loopback: the checks alone (median of 5 repeats of n calls); connect and fetch, stock and
    guarded interleaved (n/4 pairs each)."""
    from pipeline import egress
    from stages.ingest.serve import serve_world

    img = sorted((www / "img").glob("*.jpg"))[0].name
    with serve_world(www, hosts=("127.0.0.1",)) as server:
        port = int(server.rsplit(":", 1)[1])
        policy = egress.EgressPolicy(frozenset({f"127.0.0.1:{port}"}))
        url = f"{server}/img/{img}"
        stock = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # stock urllib, no proxy
        guarded = egress.guarded_opener(policy)

        def fetch(opener):
            with opener.open(url, timeout=10) as r:
                r.read()

        # connects go to a bare listener that accepts and closes at once (the HTTP server's backlog of 5 would
        # time its accept loop, not the connect)
        listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        lport = listener.getsockname()[1]

        def drain():
            while True:
                try:
                    listener.accept()[0].close()
                except OSError:
                    return

        threading.Thread(target=drain, daemon=True).start()
        lpolicy = egress.EgressPolicy(frozenset({f"127.0.0.1:{port}", f"127.0.0.1:{lport}"}))

        def connect(create):
            create(("127.0.0.1", lport), 10).close()

        guarded_connect = lambda addr, t: egress.guarded_create_connection(addr, t, policy=lpolicy)  # noqa: E731
        solo = {
            "check_url (a host name)": lambda: egress.check_url("http://images.example.com/a/b/c.jpg?x=1", policy),
            "address rule (a global IPv4)": lambda: egress.refusal("93.184.216.34"),
            "address rule (a global IPv6)": lambda: egress.refusal("2606:2800:220:1:248:1893:25c8:1946"),
        }
        out = {name: round(statistics.median(_per_call_us(fn, n) for _ in range(5)), 2) for name, fn in solo.items()}
        # stock and guarded interleaved call by call (machine load drifts): medians, and the median difference
        for what, stock_fn, guarded_fn in (("connect", lambda: connect(socket.create_connection),
                                            lambda: connect(guarded_connect)),
                                           ("fetch", lambda: fetch(stock), lambda: fetch(guarded))):
            times = {"stock": [], "guarded": []}
            for i in range(n // 4):
                for which in (("stock", "guarded") if i % 2 == 0 else ("guarded", "stock")):
                    fn = stock_fn if which == "stock" else guarded_fn
                    t0 = time.perf_counter()
                    fn()
                    times[which].append((time.perf_counter() - t0) * 1e6)
            out[f"{what}: stock, median"] = round(statistics.median(times["stock"]), 1)
            out[f"{what}: guarded, median"] = round(statistics.median(times["guarded"]), 1)
            out[f"{what}: guarded - stock, median of pairs"] = round(statistics.median(
                g - s for g, s in zip(times["guarded"], times["stock"])), 1)
        listener.close()
    out["guard_cost_per_fetch_us"] = out["fetch: guarded - stock, median of pairs"]
    out["address_rule_worst_us"] = max(out["address rule (a global IPv4)"], out["address rule (a global IPv6)"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--micro", type=int, default=4000, help="calls per microbenchmark repeat")
    args = ap.parse_args()

    from demo.world import make_world
    from stages.ingest import IngestStage
    from stages.ingest.urls import group_by_url, read_url_list

    work = Path(tempfile.mkdtemp(prefix="bench-egress-"))
    try:
        world = work / "world"
        make_world(world, n=args.n, seed=0)
        cfg = IngestStage.Config(processes=args.processes, threads=args.threads, shard_size=1000,
                                 serve_dir=str(world / "www"), allow_private_hosts=["demo.clipcurate.invalid:80"])
        grouped, _ = group_by_url(read_url_list(str(world / "urls.parquet")), cfg.egress_policy())
        list_path = work / "urls.parquet"
        grouped.write_parquet(list_path)
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        for r in range(args.rounds):
            for which in (("on", "off") if r % 2 == 0 else ("off", "on")):
                got = _download(which, list_path, work / which, cfg)
                runs[which].append(got)
                print(f"round {r} {which}: call {got['call_s']:.2f} s, shards {got['shard_s']:.2f} s, "
                      f"{got['successes']}/{got['count']} fetched", flush=True)
        assert {g["successes"] for g in runs["on"] + runs["off"]} == {runs["on"][0]["successes"]}, "runs differ"
        micro = _micro(world / "www", args.micro)

        def med(which, key):
            return statistics.median(g[key] for g in runs[which])

        pairs = [(on["shard_s"] / off["shard_s"] - 1) * 100 for on, off in zip(runs["on"], runs["off"])]
        call_pairs = [(on["call_s"] / off["call_s"] - 1) * 100 for on, off in zip(runs["on"], runs["off"])]
        urls = runs["on"][0]["count"]
        # the guard's extra time per fetch, all of it counted as serial work in one of `processes` processes (GIL
        # held throughout): an upper bound of its share of the fetch phase
        guard_share = micro["guard_cost_per_fetch_us"] * urls / (med("off", "shard_s") * 1e6)
        result = {
            "what": "ingest's loopback download with the egress guard on (GuardedDownloader, pinned demo host in "
                    "allow_private_hosts) vs img2dataset's stock Downloader (same server as a proxy, same arguments)",
            "unique_urls": urls,
            "fetched": runs["on"][0]["successes"],
            "processes": args.processes,
            "threads": args.threads,
            "rounds": args.rounds,
            "order": "paired rounds, alternating on/off and off/on",
            "on_shard_s": [round(g["shard_s"], 3) for g in runs["on"]],
            "off_shard_s": [round(g["shard_s"], 3) for g in runs["off"]],
            "on_fetch_span_s": [round(g["fetch_span_s"], 3) for g in runs["on"]],
            "off_fetch_span_s": [round(g["fetch_span_s"], 3) for g in runs["off"]],
            "on_call_s": [round(g["call_s"], 3) for g in runs["on"]],
            "off_call_s": [round(g["call_s"], 3) for g in runs["off"]],
            "shard_time_overhead_pct_per_pair": [round(x, 2) for x in pairs],
            "shard_time_overhead_pct_median": round(statistics.median(pairs), 2),
            "call_overhead_pct_per_pair": [round(x, 2) for x in call_pairs],
            "call_overhead_pct_median": round(statistics.median(call_pairs), 2),
            "micro_us": micro,
            # the guard's measured extra µs per fetch x URLs, as a share of the stock run's shard time
            "guard_cost_pct_of_shard_time_estimate": round(guard_share * 100, 3),
            "goal": "guard costs <= 2% of download time",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_after": os.getloadavg()},
        }
        out = ROOT / "bench" / "results" / "egress.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
