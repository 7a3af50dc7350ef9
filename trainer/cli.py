"""`clipcurate train | eval | dfn-train | train-head | fetch-model` (registered under the `clipcurate.commands` entry point, pyproject.toml)."""

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
    from pipeline.hashing import fingerprint
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


def _head_store(run_dir: str, cfg: dict | None):
    """The run's embedding store a head is fitted on: the one of the network the heads step reads ([heads]'s keys,
    else [embed]'s, else [dfn]'s: trainer.embed.run_network_config), else the only store the run holds."""
    from pipeline import embeddings
    from trainer.embed import NETWORK_KEYS, Network, run_network_config

    section = run_network_config(dict((cfg or {}).get("heads") or {}), cfg or {})
    store = Network(*(str(section.get(k) or "") for k in NETWORK_KEYS)).stored(run_dir)
    if store is not None:
        return store
    folder = shards.join(run_dir, embeddings.FOLDER)
    fs, p = shards.fs_and_path(folder)
    ids = sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False)) if fs.exists(p) else []
    ids = [i for i in ids if shards.exists(shards.join(folder, i, embeddings.MANIFEST))]
    if len(ids) == 1:
        return embeddings.EmbeddingStore.open(run_dir, ids[0])
    if not ids:
        raise config_mod.ConfigError(f"train-head: {run_dir} holds no embeddings ({folder} is empty): run embed first "
                                     "(`clipcurate run embed --run NAME`)")
    raise config_mod.ConfigError(f"train-head: {run_dir} holds embeddings of {len(ids)} networks ({', '.join(ids)}) "
                                 "and none is the run's network: set [heads] (or [embed]) model/checkpoint to pick one")


def _head_labels(path: str):
    """(uids, labels float64 in [0, 1]) from a Parquet file with `uid` and `label` columns; one-line errors."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not shards.exists(path):
        raise FileNotFoundError(f"train-head: labels file {path} does not exist")
    try:
        fs, p = shards.fs_and_path(path)
        t = pq.read_table(p, filesystem=fs)
    except (pa.ArrowException, OSError) as e:
        why = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise config_mod.ConfigError(f"train-head: {path} is not a readable Parquet file ({why})") from None
    missing = [c for c in ("uid", "label") if c not in t.column_names]
    if missing:
        raise config_mod.ConfigError(f"train-head: {path} lacks column(s) {', '.join(missing)}: give uid (the row's "
                                     "uid) and label (0/1, or a number in [0, 1])")
    lab = t.column("label")
    if not (pa.types.is_integer(lab.type) or pa.types.is_floating(lab.type) or pa.types.is_boolean(lab.type)):
        raise config_mod.ConfigError(f"train-head: {path}: label is {lab.type}, not a number or bool")
    y = lab.cast(pa.float64()).to_numpy(zero_copy_only=False)
    bad = ~(np.isfinite(y) & (y >= 0) & (y <= 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise config_mod.ConfigError(f"train-head: {path}: label of row {i} is {lab[i].as_py()!r}: labels are 0/1 "
                                     "or numbers in [0, 1]")
    uids = t.column("uid").cast(pa.string()).combine_chunks()
    if uids.null_count:
        raise config_mod.ConfigError(f"train-head: {path}: a uid is null")
    if len(set(uids.to_pylist())) != len(uids):
        raise config_mod.ConfigError(f"train-head: {path}: a uid is labelled twice: give each row one label")
    return uids, y


def cmd_train_head(args) -> int:
    """Fit a linear (logistic-regression) head on the run's stored vectors with labels given by uid, report its
    held-out accuracy and AUC, and write it in the heads format (trainer/heads.py)."""
    import numpy as np

    from pipeline.hashing import uniform
    from trainer import heads

    run_dir = shards.join(args.runs_dir, args.run)
    if not shards.exists(run_dir):
        raise config_mod.ConfigError(f"train-head: no run {args.run} under {args.runs_dir}")
    if not 0 <= args.holdout < 1:
        raise config_mod.ConfigError(f"train-head --holdout {args.holdout}: give a share in [0, 1)")
    if args.epochs < 1 or args.penalty < 0:
        raise config_mod.ConfigError("train-head: --epochs must be at least 1 and --penalty at least 0")
    store = _head_store(run_dir, config_mod.saved_config(run_dir))
    uids, y = _head_labels(args.labels)
    kinds = ("image", "text") if args.on == "pair" else (args.on,)
    got = [store.read_any(uids, kind) for kind in kinds]
    found = np.logical_and.reduce([f for _, f in got])
    if not found.all():
        print(f"labels: {int((~found).sum())} of {len(y)} labelled uids have no {args.on} vector in store "
              f"{store.model_id} (not in the run, or no image): left out")
    x = np.concatenate([v[found] for v, _ in got], axis=1).astype(np.float32)
    y, kept_uids = y[found], uids.filter(found)
    held = uniform(kept_uids, args.seed, "train-head") < args.holdout
    train = ~held
    if len(set((y[train] >= 0.5).tolist())) < 2:
        raise config_mod.ConfigError(f"train-head: the {int(train.sum())} training rows hold one class only: "
                                     "label rows of both classes")
    w, b = heads.fit_logistic(x[train], y[train], steps=args.epochs, l2=args.penalty, seed=args.seed)
    head = heads.Head(((w[None, :].astype(np.float32), np.array([b], np.float32)),), "relu", "sigmoid")
    p = head(x)

    def figures(mask) -> tuple[float, float]:
        return float(((p[mask] >= 0.5) == (y[mask] >= 0.5)).mean()), heads.auc(p[mask], y[mask] >= 0.5)

    tr_acc, tr_auc = figures(train)
    te_acc, te_auc = figures(held) if held.any() else (float("nan"), float("nan"))
    print(f"fitted on {int(train.sum())} rows ({int((y[train] >= 0.5).sum())} positive), {x.shape[1]}-d {args.on} "
          f"vectors of {store.model_id}: train accuracy {tr_acc:.3f}, AUC {tr_auc:.3f}")
    print(f"held out {int(held.sum())} rows ({int((y[held] >= 0.5).sum())} positive): accuracy {te_acc:.3f}, "
          f"AUC {te_auc:.3f}")
    out = args.out or shards.join(run_dir, "heads", f"head-{args.on}.safetensors")
    heads.save(out, [(w[None, :], np.array([b]))], {
        "on": args.on, "hidden": "relu", "activation": "sigmoid", "dims": x.shape[1], "model_id": store.model_id,
        "rows_train": int(train.sum()), "rows_heldout": int(held.sum()), "heldout_accuracy": f"{te_acc:.4f}",
        "heldout_auc": f"{te_auc:.4f}", "labels": args.labels})
    print(f"head: {out} (output: the probability of label 1); use it with\n"
          f"  [heads.mine]\n  path = \"{out}\"\n  on = \"{args.on}\"\n  threshold = 0.5\n  drop = \"above\"   "
          "# drops rows the head calls label 1")
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

    p = sub.add_parser("train-head", help="fit a linear (logistic-regression) head on the run's stored embeddings, "
                                          "labels given by uid, for the heads step")
    p.add_argument("--run", required=True, help="run name: its folder is RUNS_DIR/NAME (its embeddings are read)")
    p.add_argument("--labels", required=True, help="Parquet with uid and label (0/1, or a number in [0, 1]) columns")
    p.add_argument("--on", choices=("image", "text", "pair"), default="image",
                   help="the head's input: image vectors (default), text vectors, or [image, text] concatenated")
    p.add_argument("--out", default=None, help="the head file (default: runs/NAME/heads/head-ON.safetensors)")
    p.add_argument("--epochs", type=int, default=100, help="full-batch L-BFGS iterations (default 100)")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of labelled rows held out (by uid) for the accuracy / AUC printed (default 0.2)")
    p.add_argument("--penalty", type=float, default=1e-3, help="L2 penalty on the standardised weights (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    p.set_defaults(fn=cmd_train_head, writes_run=lambda a: not a.out)

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

