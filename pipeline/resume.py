"""Resume: what a step's output is made from (its fingerprint), and which of its shards are still what their
markers vouch for.

A step's fingerprint covers its config (less its speed keys), the seed, the reader's text limit for a stage that
reads text, the stage's own parts (a model file, an automaton) and the identity of every input shard
(`input_identity`); its statistics and its manifest carry it. Each shard has its own fingerprint too
(`shard_fingerprints`): the step's less the inputs, its one input, and its key into the statistics. A shard is
skipped when its done-marker (`_done/<shard>.json`) carries that fingerprint and every file the marker records
(size and XXH3, hashed as written) is still there at its size, and with `--verify` still hashes to its digest;
otherwise it is redone, in one line that names the file. So an input rewritten redoes its own shard and those
whose statistics it changed, and, a later step's input identity being the upstream shard's fingerprint, the same
shards down the recipe: never the whole step. Statistics are
reused when `_stats.json` carries the fingerprint and its files pass the same check. A kill at any moment leaves
either a complete shard with its marker, or no marker (the shard is redone, overwriting by name), so a rerun
never loses or duplicates a row.

The markers' and the manifest's formats live here, so that the task that writes a marker (pipeline/tasks.py)
and every reader of one (the runner, its check of an earlier step's outputs) agree on them.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

from pipeline import images, schema, shards
from pipeline.context import ShardContext
from pipeline.hashing import fingerprint
from pipeline.stage import Stage

log = logging.getLogger("clipcurate.runner")  # the runner's logger: its lines read as one story to a user

DIGESTS_FILE = "_digests.json"  # content digests of a run's input files, by size and mtime (shards.DigestCache)
FILES_KEY = "files"  # a done-marker's {path relative to the stage folder: {"size", "xxh3"}} of what its task wrote
RUN_FILES_KEY = "run_files"  # the same for files written in the run folder outside the stage's (ShardContext.wrote)
# A marker written before markers recorded their files (no FILES_KEY). Such a shard is redone, not trusted: its
# marker says only that a file of that name once existed, which is exactly what let a truncated shard be trusted
# for ever. Redoing is cheap and happens once (a rerun is byte-identical, so later stages' inputs, which name the
# upstream fingerprint, not its bytes, are not redone with it); trusting would leave every existing run unchecked.
UNRECORDED = "its done-marker records no sizes or digests (written by an older clipcurate)"


@dataclass(frozen=True)
class StepRun:
    """One step's run over its input: what every part of the runner (resume, statistics, apply, finalize) needs
    to know, built once by `runner.run_stage`."""

    name: str  # the step's name (`align@text`): config section, manifest
    stage: str  # the stage it builds (`align`)
    cls: type
    probe: Stage  # not set up: only for fingerprint parts and names
    seed: int
    stage_cfg: dict
    run_dir: str
    stage_dir: str
    input_dir: str
    inputs: list
    fp: str = ""  # the step's: config, stage parts and every input shard (the manifest's; the statistics')
    base_fp: str = ""  # config and stage parts alone: what every shard of the step shares
    identities: tuple = ()  # each input shard's identity (input_identity), in `inputs` order
    verify: bool = False  # `--verify`: a resume checks the digests of what done shards wrote, not only sizes
    max_text_bytes: int = schema.MAX_TEXT_BYTES  # [run]: the shard reader's limit, given to every task


def parent_dir(path: str) -> str:
    """The folder `path` sits in, local or on an object store: a stage folder's run folder (where a marker's
    run files are relative to), a shard's folder (is it the image store's?)."""
    import posixpath

    return posixpath.dirname(path.rstrip("/")) if "://" in path else os.path.dirname(os.path.abspath(path))


def input_identity(path: str, upstream_dir: str | None, digests: shards.DigestCache | None = None,
                   run_dir: str | None = None) -> dict:
    """An upstream stage's shard: that stage's fingerprint for it. A file the run wrote itself (ingest's
    download, which holds the image bytes: a content digest would read the whole image store): its size and
    mtime. Any other file (a crawl, an --input folder): its content digest, remembered by size and mtime in the
    run's `_digests.json` (a file rewritten with the same bytes, e.g. a regenerated demo world, is the same)."""
    if upstream_dir:
        done = read_done(upstream_dir, shards.shard_name(path))
        if done and "fingerprint" in done:
            return {"name": shards.shard_name(path), "upstream": done["fingerprint"]}
    if run_dir and images.within(str(path), str(run_dir)):  # (a run's --input may be named either way)
        return shards.file_identity(path)
    return shards.file_content_identity(path, digests)


def step_fingerprint(r: StepRun, upstream_is_stage: bool) -> tuple[str, str, tuple]:
    """What the step's output is made from: config (less speed keys), seed, the reader's text limit (it decides
    which rows a stage that reads text sees), the stage's own parts (they may name run resources, so they get a
    context of the run), and the identity of every input shard. Returns (the step's fingerprint, the same less
    the inputs, each input's identity): a shard's own fingerprint (`shard_fingerprints`) is made of the last two."""
    digests = shards.DigestCache(shards.join(r.run_dir, DIGESTS_FILE))
    probe_ctx = ShardContext(stage=r.probe.name, run_dir=r.run_dir, stage_dir=r.stage_dir)
    limits = {"max_text_bytes": r.max_text_bytes} if "text" in r.cls.requires else {}
    base = {
        "stage": r.name,
        "config": {k: v for k, v in r.stage_cfg.items() if k not in r.cls.speed_keys},
        "seed": r.seed,
        **limits,
        "parts": r.probe.fingerprint_parts(probe_ctx),
    }
    identities = tuple(input_identity(p, r.input_dir if upstream_is_stage else None, digests, r.run_dir)
                       for p in r.inputs)
    digests.save()
    return fingerprint({**base, "inputs": list(identities)}), fingerprint(base), identities


def shard_fingerprints(r: StepRun, stats_keys: dict | None) -> dict[str, str]:
    """Each output shard's own fingerprint, in its done-marker: the step less its inputs, the shard's input, and
    what apply reads of the pool-wide statistics for it (`stats_keys[out]`: a shuffled stage's answer for that
    shard; the statistics whole for any other; None without statistics). A shard is redone exactly when one of
    these changed: an input rewritten (a retried download) redoes its shard, and the shards whose answers it
    changed, not the step. A later step's input identity is this fingerprint, so the same holds down the recipe."""
    out = {}
    for p, ident in zip(r.inputs, r.identities):
        name = r.probe.output_name(shards.shard_name(p))
        key = (stats_keys or {}).get(name)
        out[name] = fingerprint({"step": r.base_fp, "input": ident, "stats": key})
    return out


# ---- done-markers: `_done/<shard>.json`, written by the shard's apply task as its last act ----------------
def done_path(stage_dir: str, out: str) -> str:
    return shards.join(stage_dir, "_done", out + ".json")


def read_done(stage_dir: str, out: str) -> dict | None:
    """The done-marker of output shard `out` (None: not done, or not a runner's folder)."""
    return shards.read_json(done_path(stage_dir, out))


def write_done(stage_dir: str, summary: dict, files: dict, run_files: dict) -> None:
    """The marker vouches for exactly these bytes (`files` in the stage folder, `run_files` in the run folder):
    a resume trusts the shard only while they are still there."""
    extra = {RUN_FILES_KEY: dict(run_files)} if run_files else {}
    shards.write_json({**summary, FILES_KEY: files, **extra}, done_path(stage_dir, summary["shard"]))


def outputs_mismatch(stage_dir: str, out: str, done: dict, verify: bool = False) -> str | None:
    """Why a done shard's outputs are no longer the files its marker vouches for (None: they are). Every
    recorded file must exist with its recorded size; with `verify`, also hash to its recorded XXH3 digest.
    UNRECORDED for a marker of an older version. The reason names the file and what differs, for one line."""
    files = done.get(FILES_KEY)
    if not isinstance(files, dict):
        return UNRECORDED
    if not {out, f"rejected/{out}"} <= files.keys():
        return "its done-marker does not list the shard's files"
    why = shards.records_mismatch(stage_dir, files, digest=verify)
    if why is None and RUN_FILES_KEY in done:
        why = shards.records_mismatch(parent_dir(stage_dir), done[RUN_FILES_KEY], digest=verify)
    return why


def shards_to_do(r: StepRun, executor_name: str, shard_fps: dict[str, str]) -> tuple[list[str], dict[str, dict]]:
    """(input shards to apply, summaries of those already done: the resume). A shard is done when its marker
    carries its own fingerprint (`shard_fps`), or the step's (a marker of an older clipcurate, which fingerprinted
    the step whole: it was made from exactly these inputs), and its files check out."""
    todo, summaries, unrecorded = [], {}, 0
    for p in r.inputs:
        out = r.probe.output_name(shards.shard_name(p))
        done = read_done(r.stage_dir, out)
        if not done or done.get("fingerprint") not in (shard_fps[out], r.fp):
            todo.append(p)
            continue
        why = outputs_mismatch(r.stage_dir, out, done, r.verify)
        if why is None:
            summaries[out] = {k: v for k, v in done.items() if k not in (FILES_KEY, RUN_FILES_KEY)}
            continue
        todo.append(p)
        if why is UNRECORDED:
            unrecorded += 1
        else:
            log.warning("%s: shard %s: %s: redoing it", r.name, out, why)
    if unrecorded:
        log.warning("%s: %d shards were marked done by an older clipcurate, which recorded no sizes or digests of "
                    "what they wrote: redoing them, once, so that every later resume can check them", r.name,
                    unrecorded)
    if not todo:
        log.info("%s: %d shards up to date, skipped", r.name, len(r.inputs))
    else:
        done_note = f"; {len(r.inputs) - len(todo)} up to date, skipped" if len(todo) < len(r.inputs) else ""
        log.info("%s: %d shards to do from %s (%s)%s", r.name, len(todo), r.input_dir, executor_name, done_note)
    return todo, summaries


# ---- statistics: `_stats.json` vouches for the files pass 1 saved, as a done-marker does for a shard's ------------
def stats_marker(stage_dir: str) -> str:
    return shards.join(stage_dir, "_stats.json")


def stats_mismatch(stage_dir: str, prior: dict, verify: bool) -> str | None:
    """Why saved statistics are no longer what `_stats.json` vouches for (None: they are), as for a shard: every
    file it records, sizes (digests with `verify`). Statistics saved by an older version, which recorded none,
    are recomputed once (see UNRECORDED)."""
    if not isinstance(prior.get(FILES_KEY), dict):
        return "saved by an older clipcurate, which recorded no sizes or digests"
    if not isinstance(prior.get(APPLY_KEYS), dict):
        return "saved by an older clipcurate, which recorded no key per shard"
    return shards.records_mismatch(stage_dir, prior[FILES_KEY], digest=verify)


APPLY_KEYS = "apply_keys"  # `_stats.json`: {output shard: what its apply reads of the statistics} (shard_fingerprints)


def write_stats_marker(r: StepRun, partitions: int, files: dict, apply_keys: dict) -> None:
    """Like a shard's marker, `_stats.json` vouches for the bytes saved (hashed as written), checked before reuse;
    it keeps each shard's key into them, for the shard fingerprints of a resume that reuses them."""
    shards.write_json({"fingerprint": r.fp, "partitions": partitions, FILES_KEY: files, APPLY_KEYS: apply_keys},
                      stats_marker(r.stage_dir))


# ---- the manifest: `_manifest.json`, the step's summary, written last; it vouches for the whole folder ------------
def build_manifest(r: StepRun, per_shard: list[dict], timings: dict) -> dict:
    reasons: Counter = Counter()
    notes: list[str] = []
    for s in per_shard:
        reasons.update(s.get("reasons", {}))
        for n in s.get("notes", []):
            if n not in notes:
                notes.append(n)
    return {
        "stage": r.name,
        "fingerprint": r.fp,
        "config": r.stage_cfg,
        "input": str(r.input_dir),
        "shards": per_shard,
        "rows_in": sum(s["rows_in"] for s in per_shard),
        "rows_out": sum(s["rows_out"] for s in per_shard),
        "rejected": sum(s["rejected"] for s in per_shard),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "notes": notes,
        "timings": timings,
        "shard_seconds": round(sum(s.get("seconds", 0.0) for s in per_shard), 3),
    }
