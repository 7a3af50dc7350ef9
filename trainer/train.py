"""The training loop: open_clip's model, tokenizer, transforms, ClipLoss and cosine schedule, in a small loop.

One step = one batch = one AdamW update; everything that decides a step (the batch's rows, K-LITE choice,
augmentation, learning rate) is a function of (seed, step), so `--resume` from a step checkpoint continues
exactly as an uninterrupted run would (bit for bit on CPU; on a GPU up to cuDNN/atomics nondeterminism).

Outputs in `out_dir` (runs/NAME/train/ or runs/NAME/dfn_model/):
  checkpoints/step-000250.pt   model + optimizer + scaler + config (the last `keep_checkpoints` are kept)
  model.pt                     the final model only (what `eval` and the dfn stage load)
  metrics.jsonl                {"step", "epoch", "loss", "lr", "logit_scale", "samples_per_s", "wall_s"} lines
  train.json                   summary of the finished run
  data_digests.json            content digests of the training files (for the run's fingerprint)

`out_dir` is a local folder or an fsspec URL (s3://bucket/runs/NAME/train): checkpoints, model.pt, train.json
and metrics.jsonl are written through pipeline.shards there (torch.save into memory, then one atomic put),
checkpoints are listed with fs.glob and read back through memory. An object store cannot append: there
metrics.jsonl is kept in memory and the whole file is rewritten at each checkpoint and at the end (see
`_Metrics`). `data_path` may be an fsspec URL too for Parquet (trainer/data.py; tars: local paths only).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import signal
import threading
import time
from contextlib import contextmanager

from pipeline import shards
from trainer.config import TrainConfig
from trainer import data as data_mod
from trainer import models

log = logging.getLogger("clipcurate.train")

CKPT_RE = re.compile(r"step-(\d+)\.pt$")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped training after a finished step, whose checkpoint is saved: a run
    with `resume=True` (`--resume`) goes on from `step`. A KeyboardInterrupt, so code that knows nothing of it
    treats it as Ctrl-C."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"training stopped by {signal.Signals(signum).name} at step {step}"
                         + (f" (checkpoint {checkpoint})" if checkpoint else " (no step finished: nothing saved)"))


@contextmanager
def _stop_requests():
    """While open, SIGINT and SIGTERM ask the training loop to stop after the step it is in (it then saves
    that step's checkpoint) instead of killing it mid-step: checkpoints come every `save_every` steps, and a
    Ctrl-C used to lose all the steps since the last one. A second Ctrl-C stops at once, as before. Yields the
    list of the signals received. Signal handlers can only be set from the main thread: elsewhere (a training
    run in a thread) the signals keep their handlers and the list stays empty."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum, frame):
        if got and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint of this step
        got.append(signum)
        log.warning("%s: stopping after this step, with a checkpoint (Ctrl-C again to stop at once)",
                    signal.Signals(signum).name)

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, handler)
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _atomic_save(obj, path: str) -> None:
    """torch.save to `path` atomically: locally a temporary file and os.replace; on an fsspec URL the bytes are
    made in memory and put once (pipeline.shards.write_bytes)."""
    import torch

    if not shards.is_local(path):
        buf = io.BytesIO()
        torch.save(obj, buf)
        shards.write_bytes(buf.getvalue(), path)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the step checkpoints in `out_dir` (a local folder or an fsspec URL), by step."""
    pattern = shards.join(out_dir, "checkpoints", "step-*.pt")
    if shards.is_local(out_dir):
        paths = glob.glob(pattern)
    else:
        fs, p = shards.fs_and_path(pattern)
        paths = [shards.join(out_dir, "checkpoints", shards.shard_name(g)) for g in fs.glob(p)]
    found = []
    for p in paths:
        m = CKPT_RE.search(p)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> str | None:
    ck = checkpoints(out_dir)
    return ck[-1][1] if ck else None


# settings that may change between a checkpoint and its resume without making it another run
_RESUMABLE = {"steps", "workers", "device", "log_every", "save_every", "keep_checkpoints", "eval_sets", "klite_eval",
              "eval_batch_size", "templates", "data"}


def run_fingerprint(cfg: TrainConfig, data_path: str, digests_path: str | None = None) -> str:
    """What a checkpoint must share with a run to be resumed by it: the training settings and the data files
    (name, size, sha256 of the content; on an object store, its own content hash, e.g. S3's ETag). A resumed
    run on other data would silently mix two runs; the same bytes written again (a regenerated demo world, a
    copy) are the same data. Digests are remembered by size and mtime in `digests_path`
    (pipeline.shards.DigestCache), so an unchanged file is not read twice."""
    from pipeline.shards import DigestCache

    digests = DigestCache(digests_path)
    files = _data_files(data_path, digests)
    digests.save()
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE}
    blob = json.dumps({"settings": settings, "files": sorted(files)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _data_files(data_path: str, digests) -> list[tuple[str, int, str]]:
    """(path relative to `data_path`, size, digest) of its .parquet and .tar files (or of the file itself)."""
    if not shards.is_local(data_path):  # an fsspec URL: one listing gives the sizes and the store's digests
        fs, root = shards.fs_and_path(data_path)
        if fs.isfile(root):
            return [(shards.shard_name(data_path), fs.info(root).get("size"), digests.digest(data_path))]
        found = fs.find(root, detail=True) if fs.exists(root) else {}
        rels = {name: name[len(root):].lstrip("/") for name in found if name.endswith((".parquet", ".tar"))}
        return [(rel, found[name].get("size"), digests.digest(shards.join(data_path, rel), found[name]))
                for name, rel in rels.items()]
    paths = []
    if os.path.isdir(data_path):
        for root, _, names in os.walk(data_path):
            for n in names:
                if n.endswith((".parquet", ".tar")):
                    p = os.path.join(root, n)
                    paths.append((os.path.relpath(p, data_path), p))
    elif os.path.exists(data_path):
        paths.append((os.path.basename(data_path), data_path))
    return [(rel, os.path.getsize(p), digests.digest(p)) for rel, p in paths]


def _finished(out_dir: str, cfg: TrainConfig, fp: str) -> dict | None:
    """The summary of a finished run in `out_dir` with this fingerprint and step count, else None."""
    ck_path, summary_path = latest_checkpoint(out_dir), shards.join(out_dir, "train.json")
    if not ck_path or not shards.exists(shards.join(out_dir, "model.pt")) or not shards.exists(summary_path):
        return None
    try:
        summary = shards.read_json(summary_path)  # None when unreadable JSON
    except OSError:
        return None
    if not isinstance(summary, dict) or summary.get("steps") != cfg.steps:  # more steps asked: no need to load
        return None
    ck = models.read_checkpoint(ck_path)
    if ck.get("fingerprint") != fp or int(ck.get("step", -1)) != cfg.steps or ck.get("model_name") != cfg.model:
        return None
    return {**summary, "resumed_from": cfg.steps, "first_loss": None, "already_trained": True}


def _clear_checkpoints(out_dir: str) -> None:
    for _, p in checkpoints(out_dir):
        shards.remove(p)


def _param_groups(model, weight_decay: float):
    # open_clip_train's rule: no decay on gains, biases, norms, logit scale, embeddings of size < 2 dims
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _truncate_metrics(path: str, step: int) -> None:
    """On resume: drop lines written after the checkpoint, so the file reads as one uninterrupted run."""
    if not shards.is_local(path):
        if shards.exists(path):
            text = shards.read_bytes(path).decode("utf-8")
            shards.write_bytes("".join(_lines_upto(text.splitlines(keepends=True), step)).encode("utf-8"), path)
        return
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = _lines_upto(f, step)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _lines_upto(lines, step: int) -> list[str]:
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    return keep


class _Metrics:
    """metrics.jsonl as the loop writes it, one JSON line per logged step.

    Local: appended and flushed line by line (a killed run keeps every line it logged). On an fsspec URL (an
    object store cannot append): the file's lines are held in memory and the whole file is rewritten by
    `save()` at each checkpoint and once more when the loop ends without an error, so a killed run loses at most the lines after its
    last checkpoint, which a resume redoes anyway (it starts from that checkpoint, and `_truncate_metrics`
    drops any line past it)."""

    def __init__(self, path: str):
        self.path = path
        self.local = shards.is_local(path)
        if self.local:
            self.file = open(path, "a")
        else:
            self.lines = [shards.read_bytes(path).decode("utf-8")] if shards.exists(path) else []

    def write(self, rec: dict) -> None:
        line = json.dumps(rec) + "\n"
        if self.local:
            self.file.write(line)
            self.file.flush()
        else:
            self.lines.append(line)

    def save(self) -> None:
        if not self.local:
            shards.write_bytes("".join(self.lines).encode("utf-8"), self.path)

    def __enter__(self) -> "_Metrics":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.local:
            self.file.close()
        elif exc_type is None:  # a failed run keeps the file as its last checkpoint saved it
            self.save()


@dataclasses.dataclass
class _Parts:
    """What one training run is made of: built in a fixed order (the order decides torch's random draws)."""

    model: object
    dataset: object
    optimizer: object
    scaler: object  # a GradScaler under amp_fp16, else None
    scheduler: object
    loss_fn: object
    device: object
    precision: str


def train(
    cfg: TrainConfig,
    data_path: str,
    out_dir: str,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Train `cfg.model` on `data_path` for `cfg.steps` steps, checkpointing into `out_dir`. Returns a summary.

    `stop_after`: end this call after that step (with a checkpoint), as a kill would; `resume=True` goes on.
    """
    shards.makedirs(out_dir)
    fp = run_fingerprint(cfg, data_path, shards.join(out_dir, "data_digests.json"))
    if resume:
        done = _finished(out_dir, cfg, fp)
        if done is not None:  # nothing to train: model.pt and train.json stay as they are (not rewritten)
            log.info("--resume: %s already holds %d steps on this data and settings: nothing to train", out_dir, cfg.steps)
            return done
    parts = _build(cfg, data_path)
    metrics_path = shards.join(out_dir, "metrics.jsonl")
    start = _resume_from_checkpoint(out_dir, cfg, fp, parts) if resume else 0
    _reset_outputs(out_dir, metrics_path, start)
    if start >= cfg.steps:
        log.info("already trained %d of %d steps", start, cfg.steps)
    end = cfg.steps if stop_after is None else min(cfg.steps, int(stop_after))
    t_start = time.perf_counter()
    step, first_loss, last_loss = _run_steps(cfg, parts, out_dir, metrics_path, fp, start, end, progress)
    if step < cfg.steps:  # stopped early on purpose: the step checkpoint is the output
        return {"model": cfg.model, "steps": step, "resumed_from": start, "first_loss": first_loss,
                "last_loss": last_loss, "stopped": True, "checkpoint": latest_checkpoint(out_dir)}
    final = {"model_name": cfg.model, "state_dict": parts.model.state_dict(), "step": step}
    _atomic_save(final, shards.join(out_dir, "model.pt"))
    summary = {
        "model": cfg.model,
        "data": data_path,
        "pairs": len(parts.dataset),
        "steps": step,
        "resumed_from": start,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "device": str(parts.device),
        "precision": parts.precision,
        "seconds": round(time.perf_counter() - t_start, 2),
        "model_path": shards.join(out_dir, "model.pt"),
    }
    shards.write_bytes(json.dumps(summary, indent=2).encode(), shards.join(out_dir, "train.json"))
    return summary


def _build(cfg: TrainConfig, data_path: str) -> _Parts:
    """open_clip's model, transforms and ClipLoss, AdamW and the cosine schedule, over the pairs at `data_path`."""
    import torch
    from open_clip import ClipLoss
    from open_clip_train.scheduler import cosine_lr

    device = models.pick_device(cfg.device)
    precision = models.pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)  # model init
    model, pre_train, pre_val, tokenizer = models.create(cfg.model, device="cpu")
    model.to(device)
    model.train()
    source = data_mod.open_source(data_path)
    if source.skipped:
        log.info("training data: %d rows without image or text skipped", source.skipped)
    dataset = data_mod.PairDataset(
        source, pre_train if cfg.augment else pre_val, tokenizer, seed=cfg.seed, klite_prob=cfg.klite_prob,
        decode_size=models.image_size(model),
    )
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
    scaler = torch.amp.GradScaler(device=device.type) if precision == "amp_fp16" else None
    scheduler = cosine_lr(optimizer, cfg.lr, cfg.warmup, cfg.steps)
    return _Parts(model, dataset, optimizer, scaler, scheduler, ClipLoss(), device, precision)


def _resume_from_checkpoint(out_dir: str, cfg: TrainConfig, fp: str, parts: _Parts) -> int:
    """Load the latest step checkpoint of this run (same data and settings) into `parts`; the step it holds."""
    import torch

    ck_path = latest_checkpoint(out_dir)
    ck = models.read_checkpoint(ck_path) if ck_path else None
    if ck is not None and ck.get("fingerprint", fp) != fp:
        log.warning("--resume: %s was trained on other data or settings: starting afresh", ck_path)
        ck = None
    if ck is None:
        log.info("no checkpoint of this run in %s: starting from step 0", out_dir)
        return 0
    if ck.get("model_name") != cfg.model:
        raise ValueError(f"--resume: checkpoint {ck_path} is a '{ck.get('model_name')}', config says '{cfg.model}'")
    parts.model.load_state_dict(ck["state_dict"])
    parts.optimizer.load_state_dict(ck["optimizer"])
    if parts.scaler is not None and ck.get("scaler"):
        parts.scaler.load_state_dict(ck["scaler"])
    if "rng" in ck:
        torch.set_rng_state(ck["rng"])
    log.info("resuming from %s (step %d)", ck_path, int(ck["step"]))
    return int(ck["step"])


def _reset_outputs(out_dir: str, metrics_path: str, start: int) -> None:
    """A run from step 0 never inherits another run's step files or metrics; a resumed one drops the metric
    lines past its checkpoint (the steps it will redo)."""
    if start == 0:
        _clear_checkpoints(out_dir)
        shards.remove(metrics_path)
    else:
        _truncate_metrics(metrics_path, start)


def _run_steps(cfg: TrainConfig, parts: _Parts, out_dir: str, metrics_path: str, fp: str, start: int, end: int,
               progress: bool) -> tuple[int, float | None, float | None]:
    """Steps start+1 .. end: one batch and one update each, metrics every `log_every`, a checkpoint every
    `save_every` and at `end`. Returns (last step, first loss, last loss)."""
    import torch
    from tqdm.auto import tqdm

    sampler = data_mod.StepBatchSampler(len(parts.dataset), cfg.batch_size, cfg.seed, start, end)
    workers = max(0, int(cfg.workers))
    loader = torch.utils.data.DataLoader(
        parts.dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=parts.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    cfg_dict = dataclasses.asdict(cfg)
    step, last_loss, first_loss, saved = start, None, None, start
    t_start = time.perf_counter()
    t_last, n_since = t_start, 0
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    with _Metrics(metrics_path) as mf, _stop_requests() as stop:
        batches = iter(loader)
        while not stop:
            try:
                images, tokens = next(batches)
            except StopIteration:
                break
            except Exception:
                if stop:  # DataLoader workers that took the Ctrl-C themselves: the last finished step is saved below
                    break
                raise
            step += 1
            lr = parts.scheduler(step - 1)
            last_loss = _step(cfg, parts, images, tokens)
            if first_loss is None:
                first_loss = last_loss
            n_since += images.shape[0]
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            if step % max(1, cfg.log_every) == 0 or step == cfg.steps:
                now = time.perf_counter()
                rec = {
                    "step": step,
                    "epoch": sampler.epoch_of(step),
                    "loss": last_loss,
                    "lr": lr,
                    "logit_scale": float(parts.model.logit_scale.detach().exp()),
                    "samples_per_s": round(n_since / max(now - t_last, 1e-9), 1),
                    "wall_s": round(now - t_start, 2),
                }
                mf.write(rec)
                t_last, n_since = now, 0
            if step % max(1, cfg.save_every) == 0 or step == end:
                mf.save()
                _save_step(out_dir, step, sampler.epoch_of(step), cfg, parts.model, parts.optimizer, parts.scaler,
                           cfg_dict, fp)
                saved = step
        if stop:
            if step > saved:  # the step the signal came in: saved, so a resume loses nothing
                mf.save()
                _save_step(out_dir, step, sampler.epoch_of(step), cfg, parts.model, parts.optimizer, parts.scaler,
                           cfg_dict, fp)
            bar.close()
            raise TrainingInterrupted(stop[0], step, latest_checkpoint(out_dir) if step else None)
    bar.close()
    return step, first_loss, last_loss


def _step(cfg: TrainConfig, parts: _Parts, images, tokens) -> float:
    """One AdamW update on one batch under the run's precision; the contrastive loss before it."""
    import torch

    model, optimizer, scaler = parts.model, parts.optimizer, parts.scaler
    images = images.to(parts.device, non_blocking=True)
    tokens = tokens.to(parts.device, non_blocking=True)
    with models.autocast(parts.device, parts.precision):
        out = model(images, tokens)
        if isinstance(out, dict):
            out = (out["image_features"], out["text_features"], out["logit_scale"])
        loss = parts.loss_fn(out[0], out[1], out[2])
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
    with torch.no_grad():  # open_clip_train clamps the temperature at 100
        model.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


def _save_step(out_dir, step, epoch, cfg, model, optimizer, scaler, cfg_dict, fp: str) -> None:
    import torch

    state = {
        "model_name": cfg.model,
        "step": step,
        "epoch": epoch,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "config": cfg_dict,
        "fingerprint": fp,
        "rng": torch.get_rng_state(),
    }
    _atomic_save(state, shards.join(out_dir, "checkpoints", f"step-{step:06d}.pt"))
    for _, old in checkpoints(out_dir)[: -max(1, cfg.keep_checkpoints)]:
        shards.remove(old)
