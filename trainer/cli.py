"""`clipcurate train | eval | dfn-train | fetch-model` (registered under the `clipcurate.commands` entry point, pyproject.toml)."""

from __future__ import annotations

import json
import os
import sys

from pipeline import config as config_mod
from pipeline import shards


def _train_config(args, section: str = "train"):
    from trainer.config import TrainConfig

    run_dir = shards.join(args.runs_dir, args.run)
    cfg = config_mod.for_run(run_dir, args.config)
    tc = TrainConfig(**cfg.get(section, {}))
    for field in ("steps", "batch_size", "workers", "device", "model"):
        v = getattr(args, field, None)
        if v is not None:
            setattr(tc, field, v)
    return run_dir, cfg, tc


def _default_data(run_dir: str) -> str:
    emit = shards.join(run_dir, "emit")
    if not shards.exists(emit):
        raise FileNotFoundError(
            f"no training data: {emit} does not exist (run the emit stage first, or give --data PATH)"
        )
    return emit


def _print_summary(s: dict) -> None:
    print(
        f"trained {s['model']} for {s['steps']} steps on {s.get('pairs', '?')} pairs ({s.get('device')}, "
        f"{s.get('precision')}): loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}"
        if s.get("first_loss") is not None else f"nothing to train: already at step {s['steps']}"
    )


def _interrupted(e) -> int:
    """Ctrl-C or SIGTERM stopped training with the step it was in saved: one line that says where and how to go
    on; the exit status of a process that signal ended (130, 143)."""
    print(f"clipcurate: {e}; rerun the same command with --resume to go on from it", file=sys.stderr)
    return 128 + e.signum


def cmd_train(args) -> int:
    from trainer.data import DataError
    from trainer.evaluate import EvalError
    from trainer.train import TrainingInterrupted, train

    run_dir, _, tc = _train_config(args)
    data = args.data or tc.data or _default_data(run_dir)
    out = shards.join(run_dir, "train")
    try:
        s = train(tc, data, out, resume=args.resume)
    except (DataError, ValueError) as e:
        print(f"clipcurate: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        return _interrupted(e)
    _print_summary(s)
    print(f"model: {s['model_path']}   metrics: {out}/metrics.jsonl")
    if tc.eval_sets and not args.no_eval:
        try:
            return _run_eval(s["model_path"], tc.eval_sets, tc, out, reuse=bool(args.resume))
        except (EvalError, ValueError) as e:
            print(f"clipcurate: error: {e}", file=sys.stderr)
            return 2
    return 0


def _eval_fingerprint(checkpoint: str, sets: list, tc, model_name: str, out_dir: str) -> str:
    """The model's bytes, the eval sets' bytes (and per set whether K-LITE prompts run) and the settings that
    change a number: an eval with the same fingerprint as the one recorded in `out_dir` would print the same
    results."""
    from pipeline.stage import fingerprint
    from trainer.evaluate import eval_specs

    digests = shards.DigestCache(shards.join(out_dir, "eval_digests.json"))
    files = []
    for p, klite in eval_specs(sets, tc.klite_eval):
        found = ([os.path.join(r, n) for r, _, ns in os.walk(p) for n in ns] if os.path.isdir(p) else [p])
        files += [(os.path.relpath(f, p) if os.path.isdir(p) else p, digests.digest(f), klite) for f in sorted(found)
                  if not os.path.basename(f).startswith((".", "_"))]
    fp = fingerprint({"model": digests.digest(checkpoint), "model_name": model_name, "sets": files,
                      "templates": tc.templates, "precision": tc.precision, "device": tc.device})
    digests.save()
    return fp


def _print_result(name: str, r: dict, note: str = "") -> None:
    """One line per set (plain prompts), and one more with K-LITE's prompts when they ran."""
    metrics = {k: v for k, v in r.items() if k not in ("kind", "data", "checkpoint", "model", "klite")}
    print(f"{name} ({r['kind']}): " + "  ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        + ("  [plain prompts]" if "klite" in r else "") + note)
    if "klite" in r:
        k = r["klite"]
        print(f"{name} ({r['kind']}): " + "  ".join(f"{m}={k[m]:.4f}" for m in ("top1", "top5"))
              + f"  [K-LITE prompts; {k['classes_with_gloss']}/{r['classes']} classes with a WordNet gloss]")


def _run_eval(checkpoint: str, paths: list[str], tc, out_dir: str | None, model_name: str = "",
              reuse: bool = False) -> int:
    """Zero-shot eval, results printed and written to `out_dir`/eval-NAME.json. `reuse`: when the recorded
    results were computed from the same model bytes, eval sets and settings, print them instead (no scoring)."""
    from trainer.evaluate import evaluate

    fp = _eval_fingerprint(checkpoint, paths, tc, model_name, out_dir) if out_dir and reuse else None
    record = shards.join(out_dir, "eval_fingerprint.json") if out_dir else None
    prior = shards.read_json(record) if fp else None
    if prior and prior.get("fingerprint") == fp and all(
            shards.exists(shards.join(out_dir, f"eval-{n}.json")) for n in prior.get("names", [])):
        for name in prior["names"]:
            recorded = json.loads(shards.read_bytes(shards.join(out_dir, f"eval-{name}.json")))
            _print_result(name, recorded, "   (unchanged model and eval sets: recorded results)")
        return 0
    if record:
        shards.remove(record)  # vouches for the eval-*.json files only once they are written again below
    res = evaluate(checkpoint, paths, model_name=model_name, device=tc.device, precision=tc.precision,
                   templates=tc.templates, batch_size=tc.eval_batch_size, klite=tc.klite_eval)
    for name, r in res["results"].items():
        _print_result(name, r)
        if out_dir:
            path = shards.join(out_dir, f"eval-{name}.json")
            data = {"checkpoint": checkpoint, "model": res["model"], **r}
            shards.write_bytes(json.dumps(data, indent=2).encode(), path)  # atomic, parents made, local or not
            print(f"  -> {path}")
    if record and fp:
        shards.write_json({"fingerprint": fp, "names": list(res["results"])}, record)
    return 0


def cmd_eval(args) -> int:
    from trainer.config import TrainConfig
    from trainer.evaluate import EvalError
    from trainer.train import latest_checkpoint

    if not args.checkpoint and not args.run:
        print("clipcurate: error: eval needs --checkpoint P or --run NAME", file=sys.stderr)
        return 2
    out_dir = None
    tc = TrainConfig()
    if args.run:
        run_dir, _, tc = _train_config(args)
        out_dir = shards.join(run_dir, "train")
    checkpoint = args.checkpoint
    if not checkpoint:
        final = shards.join(out_dir, "model.pt")
        checkpoint = final if shards.exists(final) else latest_checkpoint(out_dir)
        if not checkpoint:
            print(f"clipcurate: error: no checkpoint in {out_dir} (train first)", file=sys.stderr)
            return 2
    paths = args.data or tc.eval_sets
    if not paths:
        print("clipcurate: error: no eval set: give --data EVAL.parquet or [train] eval_sets", file=sys.stderr)
        return 2
    if args.out:
        out_dir = args.out
    if args.klite:
        tc.klite_eval = True
    try:
        return _run_eval(checkpoint, paths, tc, out_dir, model_name=args.model or "")
    except (EvalError, ValueError) as e:
        print(f"clipcurate: error: {e}", file=sys.stderr)
        return 2


def cmd_dfn_train(args) -> int:
    from trainer.config import DFN_MODEL_DIR
    from trainer.data import DataError
    from trainer.train import TrainingInterrupted, train

    run_dir, cfg, tc = _train_config(args)
    why = hq_problem(args.hq)  # the preflight: before anything is written
    if why:
        print(f"clipcurate: error: dfn-train: {why}", file=sys.stderr)
        return 2
    tc.klite_prob = 0.0  # the filtering network learns from the HQ captions as they are
    out = shards.join(run_dir, DFN_MODEL_DIR)
    try:
        s = train(tc, args.hq, out, resume=args.resume)
    except (DataError, ValueError) as e:
        print(f"clipcurate: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        return _interrupted(e)
    _print_summary(s)
    # record the model in the run's config, so `clipcurate run dfn --run NAME` finds it
    model_path = s["model_path"]
    cfg.setdefault("dfn", {})["checkpoint"] = os.path.abspath(model_path) if shards.is_local(model_path) else model_path
    cfg["dfn"]["model"] = tc.model
    config_mod.save(cfg, shards.join(run_dir, "config.toml"))
    print(f"filtering network: {s['model_path']} (recorded as [dfn] checkpoint in {run_dir}/config.toml)")
    return 0


def hq_problem(path: str) -> str | None:
    """Why dfn-train could not read its high-quality set (one line with the fix), from names and Parquet footers
    only (trainer.data.source_problem); None when it looks readable."""
    from trainer.data import source_problem

    why = source_problem(path)
    if why is None:
        return None
    return (f"HQ set: {why}; give --hq the high-quality pairs: a Parquet file or folder with `image` (bytes) and "
            "`text` columns, or WebDataset tars (a demo world writes hq.parquet)")


def _check_dfn_train(args, run_dir: str, cfg: dict) -> list:
    """`clipcurate check --hq HQ`: what dfn-train needs, as a line of the check."""
    return [] if args.hq is None else [("dfn-train", [p for p in [hq_problem(args.hq)] if p])]


def cmd_fetch_model(args) -> int:
    """Put a pretrained network in Hugging Face's cache ahead of a run, through the egress policy (trainer/hub.py):
    a run itself never downloads."""
    from pipeline import egress
    from trainer import hub, models

    models.register_configs()
    source = hub.plan(args.name, args.pretrained or "")
    if source.kind == "none":
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(args.name)
        raise config_mod.ConfigError(f"fetch-model {args.name}: no weights named: give --pretrained TAG (its tags: "
                                     f"{', '.join(tags) or 'none'}), or an hf-hub:ORG/NAME model")
    if source.kind == "file":
        print(f"{source.pretrained} is a local weights file: nothing to fetch")
        return 0
    try:
        policy = egress.EgressPolicy(frozenset(args.allow_private_host or ()))
    except ValueError as e:
        raise config_mod.ConfigError(f"fetch-model --allow-private-host: {e}") from None
    paths, downloaded = hub.fetch(source, policy)
    weights = paths[-1]
    print(f"{'fetched' if downloaded else 'already in the cache:'} {source.name}"
          f"{' (' + source.pretrained + ')' if source.pretrained else ''} -> {os.path.dirname(weights)} "
          f"({os.path.getsize(weights) / 1e6:,.1f} MB, weights xxh3 {models.weights_digest([weights])})")
    use = f'model = "{source.name}"' + (f', pretrained = "{source.pretrained}"' if source.pretrained else "")
    print(f"score with it: [dfn] {use}")
    return 0


def _add_train_flags(p) -> None:
    p.add_argument("--run", required=True, help="run name: its folder is RUNS_DIR/NAME")
    p.add_argument("--config", default=None, help="TOML file laid over the run's saved config ([train] section)")
    p.add_argument("--steps", type=int, default=None, help="override [train] steps")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="override [train] batch_size")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (override [train] workers)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--model", default=None, help="open_clip model name (default [train] model: clipcurate-tiny)")
    p.add_argument("--resume", action="store_true", help="continue from the latest step checkpoint")


def register(sub) -> None:
    p = sub.add_parser("train", help="train CLIP (open_clip) on the run's emitted set; checkpoints in runs/NAME/train")
    _add_train_flags(p)
    p.add_argument("--data", default=None, help="Parquet file/folder or WebDataset tars (default: runs/NAME/emit)")
    p.add_argument("--no-eval", action="store_true", help="skip [train] eval_sets after training")
    p.set_defaults(fn=cmd_train, writes_run=True)  # pipeline/cli.py main takes the run's lock

    p = sub.add_parser("eval", help="zero-shot classification / retrieval of a checkpoint on Parquet eval sets")
    p.add_argument("--checkpoint", default=None, help="model file (default with --run: runs/NAME/train/model.pt)")
    p.add_argument("--run", default=None, help="use this run's latest model and its [train] eval_sets")
    p.add_argument("--config", default=None, help="TOML file laid over the run's saved config ([train] section)")
    p.add_argument("--data", action="append", default=None, help="eval Parquet (image+label or image+captions); repeatable")
    p.add_argument("--model", default=None, help="model name for a bare open_clip checkpoint")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--out", default=None, help="folder for eval-NAME.json (default with --run: runs/NAME/train)")
    p.add_argument("--klite", action="store_true",
                   help="classification sets also with K-LITE knowledge prompts (template ; class , WordNet gloss); "
                        "both results are reported")
    # with --run and no --out it writes eval-*.json into runs/NAME/train: a writer of the run, which main locks;
    # an eval of a --checkpoint, or with --out, writes no run
    p.set_defaults(fn=cmd_eval, writes_run=lambda a: bool(a.run) and not a.out)

    p = sub.add_parser("dfn-train", help="train the data filtering network on a high-quality set (runs/NAME/dfn_model)")
    _add_train_flags(p)
    p.add_argument("--hq", required=True, help="high-quality pairs: Parquet with image + text")
    p.set_defaults(fn=cmd_dfn_train, writes_run=True)

    p = sub.add_parser("fetch-model", help="download a pretrained open_clip network into the Hugging Face cache "
                                           "(HF_HOME) ahead of a run, through the egress policy")
    p.add_argument("name", help="open_clip model name (ViT-L-14, ...) or hf-hub:ORG/NAME (e.g. hf-hub:apple/DFN-public)")
    p.add_argument("--pretrained", default=None, help="open_clip tag of the model (openai, datacomp_xl_s13b_b90k, ...)")
    p.add_argument("--allow-private-host", action="append", default=None, metavar="HOST:PORT",
                   help="a private hub mirror (HF_ENDPOINT) the egress policy may reach; repeatable")
    p.set_defaults(fn=cmd_fetch_model)

    check = sub.choices.get("check")  # the spine's preflight command: what dfn-train needs too, when asked
    if check is not None:
        check.add_argument("--hq", default=None, help="also check what `dfn-train --hq HQ` needs (the HQ set)")
        check.set_defaults(extra_checks=(*check.get_default("extra_checks"), _check_dfn_train))

