"""`make demo`, timed command by command: where docs/commands.md's "make demo takes N min" and "dfn-train takes N min"
come from. Writes bench/results/demo.json.

    .venv/bin/python bench/bench_demo.py [--rounds 1] [--n 3000]

The commands are the Makefile's own (`make -n demo`, so this follows the target as it changes), run in a fresh
temporary runs folder ($CLIPCURATE_RUNS) and demo-world folder, after the install (setup is not timed: its cost is
the package download). Each command's wall time and the load average before it are recorded; the funnel's last
line and the zero-shot metrics are checked to exist, so a broken demo is not timed as a fast one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "demo.json"


def demo_commands(world: str, n: int) -> list[str]:
    """The shell lines `make demo` runs, less setup's (the install is not what a user waits for twice)."""
    dry = subprocess.run(["make", "-n", "demo", f"DEMO_WORLD={world}", f"DEMO_N={n}", "RUN=demo"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in dry.splitlines() if line.strip().startswith(".venv/bin/clipcurate ")]


def _name(cmd: str) -> str:
    return shlex.split(cmd)[1]


def one_round(n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        env = {**os.environ, "CLIPCURATE_RUNS": str(Path(tmp) / "runs"), "PYTHONUNBUFFERED": "1"}
        steps = []
        for cmd in demo_commands(str(Path(tmp) / "world"), n):
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, shell=True, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                raise SystemExit(f"bench_demo: `{cmd}` failed ({p.returncode}): {p.stderr.strip()[-500:]}")
            steps.append({"command": _name(cmd), "argv": cmd, "wall_s": round(wall, 1), "load_before": round(load, 2),
                          "last_line": (p.stdout.strip().splitlines() or [""])[-1][:200]})
            print(f"  {_name(cmd):<12} {wall:7.1f} s  (load {load:.2f})", flush=True)
        evals = sorted((Path(tmp) / "runs" / "demo" / "train").glob("eval-*.json"))
        if not evals:
            raise SystemExit("bench_demo: the demo wrote no zero-shot evaluation: not a demo that ran to the end")
        return {"steps": steps, "total_s": round(sum(s["wall_s"] for s in steps), 1),
                "eval_files": [p.name for p in evals]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--n", type=int, default=3000, help="demo world size (the Makefile's DEMO_N)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    rounds = []
    for r in range(args.rounds):
        print(f"round {r}", flush=True)
        rounds.append(one_round(args.n))
    by_cmd: dict[str, list[float]] = {}
    for rd in rounds:
        for s in rd["steps"]:
            by_cmd.setdefault(s["command"], []).append(s["wall_s"])
    out = {
        "bench": "demo",
        "command": "python bench/bench_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "n": args.n,
        "rounds": rounds,
        "median_s": {k: sorted(v)[len(v) // 2] for k, v in by_cmd.items()},
        "median_total_s": sorted(r["total_s"] for r in rounds)[len(rounds) // 2],
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"demo: {out['median_total_s']:.0f} s in all; dfn-train {out['median_s'].get('dfn-train')} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
