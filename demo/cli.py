"""`clipcurate demo-world`: registered under the `clipcurate.commands` entry point (pyproject.toml), which
pipeline/cli.py discovers, so that the spine imports nothing of the demo."""

from __future__ import annotations

from pathlib import Path

from demo.composition import MIN_N


def cmd_demo_world(args) -> int:
    from demo.composition import WEB_MIN_N, WEB_ONLY_KINDS
    from demo.world import make_world
    from pipeline.config import ConfigError

    if args.n < MIN_N:
        raise ConfigError(f"demo-world --n {args.n}: give at least {MIN_N} (every noise kind needs a few rows)")
    if args.noise == "web" and args.n < WEB_MIN_N:
        raise ConfigError(f"demo-world --noise web --n {args.n}: give at least {WEB_MIN_N} (its duplicates need "
                          "enough clean originals)")
    summary = make_world(args.out, n=args.n, seed=args.seed, noise=args.noise)
    if summary.get("unchanged"):
        print(f"demo world in {args.out} is up to date ({summary.get('rows')} URL rows, n={args.n}, seed={args.seed}): "
              "not rewritten")
    else:
        print(f"demo world written to {args.out}: {summary.get('rows', summary.get('n'))} URL rows"
              + ("" if args.noise == "default" else f" (noise: {args.noise})"))
    for k, v in sorted(summary.get("counts", {}).items()):
        if v or k not in WEB_ONLY_KINDS:  # a default world has no weak rows: no line for them
            print(f"  {k:>16}: {v}")
    out = Path(args.out)
    print("its config scales the papers' thresholds to this pool and turns on eval decontamination; use it:")
    print(f"  clipcurate ingest {out / 'urls.parquet'} --run NAME --config {out / 'config.toml'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo-world", help="write the synthetic demo crawl (url list, served images, eval + HQ sets)")
    p.add_argument("out", help="folder to write the world in (replaced when it exists)")
    p.add_argument("--n", type=int, default=3000, help=f"about this many URL rows (at least {MIN_N}; default 3000)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--noise", choices=["default", "web"], default="default",
                   help="noise composition: 'default' (mostly clean, a few percent of each noise kind) or 'web' (as "
                        "noisy as a raw crawl: most pairs weakly aligned or mismatched, from published figures; "
                        "n >= 500); the eval and HQ sets are the same in both (default: default)")
    p.set_defaults(fn=cmd_demo_world)
