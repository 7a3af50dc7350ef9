"""What a --config does to a run: the saved config with the file laid over it, and what that redoes.

Shared by every command that writes a run (`run` here, `ingest` in its stage), and refused before any work when a
change would need a download that `run` does not make, so it lives apart from the commands themselves.
"""

from __future__ import annotations

from pipeline import config as config_mod
from pipeline import recipe
from pipeline import shards
from pipeline.errors import StageError
from pipeline.registry import stage_class, stage_names


def config_for(args, run_dir: str, running: list[str]) -> dict:
    """The run's saved config with --config laid over it (or defaults + --config with --fresh-config); prints
    what a --config changes in an existing run and which stages that redoes."""
    fresh = getattr(args, "fresh_config", False)
    if fresh and not args.config:
        raise config_mod.ConfigError("--fresh-config needs --config FILE (the settings to start afresh from)")
    before = config_mod.saved_config(run_dir)
    cfg = config_mod.for_run(run_dir, args.config, fresh=fresh)
    if before is not None and args.config:
        changed = config_mod.changes(before, cfg)
        changed_output = [c for c in changed if not _speed_only(c[0], c[1])]
        for section, key, old, new in changed:
            print(f"config: {section}.{key}: {_show(old)} -> {_show(new)}")
        if changed and not changed_output:
            print("config: only speed settings changed: this redoes nothing")
        elif changed:
            recipe_changed = any(c[:2] == ("run", "stages") for c in changed_output)
            if recipe_changed:  # which steps that redoes follows from their inputs: each step's fingerprint says
                print("config: the recipe changed: a step whose input or place changed is redone")
            sections = {c[0] for c in changed_output if c[:2] != ("run", "stages")}
            if sections or not recipe_changed:
                redo = config_mod.redone_by(sections, _run_stages(run_dir, running, cfg))
                print(f"config: this redoes {', '.join(redo)}" if redo
                      else "config: this redoes nothing (no step that has run depends on it)")
        else:
            print(f"config: {args.config} changes nothing in this run")
    return cfg


def _speed_only(section: str, key: str) -> bool:
    """A key that changes a stage's speed, not its output (Stage.speed_keys)."""
    section = section.partition("@")[0]  # a labelled step's section: its stage's keys
    if section == "run":
        return key in config_mod.RunConfig.speed_keys
    if section not in stage_names():
        return False
    try:
        return key in stage_class(section).speed_keys
    except StageError:
        return False


def _show(v) -> str:
    return "(unset)" if v is None else repr(v) if isinstance(v, str) else str(v)


def _run_stages(run_dir: str, running: list[str], cfg: dict) -> list[str]:
    """The recipe steps that have already run in this run (their folder exists), in order, and the trainer when
    it has trained: what a config change may redo. A step about to run for the first time is not redone by it
    (on a brand-new run the line named every step the command was about to run)."""
    steps = recipe.of_config(cfg)
    have = [s.name for s in steps if recipe.output_exists(run_dir, s)]
    for name in running:  # a user's module:Class step outside the recipe: its place there (90_<name>)
        if name not in have and recipe.find(steps, name) is None:
            try:
                if recipe.output_exists(run_dir, recipe.plan([name], steps)[0]):
                    have.append(name)
            except StageError:
                pass  # an unknown stage: `run` says so itself
    if shards.exists(shards.join(run_dir, "train")):
        have.append("train")
    return have


def refuse_a_download_left_behind(args, run_dir: str, before: dict | None, cfg: dict, names: list[str]) -> None:
    """A config that redoes a step before the recipe's download (text-first: metaclip's t) changes what that
    download should have fetched, and `run` never downloads: the steps after it would refuse the old download,
    but only after the steps before it were redone. Refuse here, before any work, with the command that redoes
    both (`clipcurate ingest --config FILE` curates again and downloads what is kept)."""
    if before is None or not args.config:
        return
    changed = {c[0] for c in config_mod.changes(before, cfg)
               if not _speed_only(c[0], c[1]) and c[:2] != ("run", "stages")}
    if not changed:
        return
    steps = recipe.of_config(cfg)
    redo = config_mod.redone_by(changed, _run_stages(run_dir, names, cfg))
    for d in steps:
        if d.name not in redo or d.name in names or not recipe.downloads(d):
            continue
        after = [n for n in names if (s := recipe.find(steps, n)) is not None and s.position > d.position]
        if not after:
            continue
        upto = ", ".join(redo[:redo.index(d.name) + 1])
        name = shards.shard_name(run_dir)
        raise StageError(f"{after[0]}: this config redoes {upto}, and `run` does not download: give it to "
                         f"`clipcurate {d.stage} --run {name} --config {args.config}` first (it redoes the steps "
                         f"before the download and fetches what they keep), then `clipcurate run --run {name}`; "
                         "nothing was done")
