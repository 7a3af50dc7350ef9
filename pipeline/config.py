"""One TOML file, one section per stage; defaults live in each stage's `Config` dataclass.

Unknown sections/keys and wrong types are one-line errors: a typo in a threshold must not silently fall
back to the default. The resolved config (defaults + file) is saved in the run as `config.toml`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from pipeline import recipe
from pipeline.errors import ConfigError, StageError
from pipeline.registry import stage_class, stage_names


@dataclasses.dataclass
class RunConfig:
    seed: int = 0
    # the recipe: the stages this run runs, in order (pipeline/recipe.py); a stage may repeat with a label
    stages: list = dataclasses.field(default_factory=recipe.default_recipe)
    # Stages whose pool-wide statistics grow with the pool (align) shuffle them into ceil(shards / this)
    # partitions, each merged by one task: a task's memory follows this many shards, not the pool. Results
    # do not depend on it; lower it when a merge task runs out of memory, raise it for fewer, larger tasks.
    stats_shards_per_partition: int = 8
    # Rows whose text is longer than this (UTF-8 bytes) are set aside by the shard reader as `text_too_long`,
    # before any stage's rules see them: one 10 MB caption must not cost a worker gigabytes in a tokeniser.
    # ALIGN keeps captions of at most 20 words; web captions over 4 KB are pasted pages, not captions.
    max_text_bytes: int = 4096
    speed_keys = frozenset({"stats_shards_per_partition"})  # change how fast, not what (as Stage.speed_keys)

    def __post_init__(self):
        check_ranges("run", self, stats_shards_per_partition=(1, None), max_text_bytes=(1, None))
        try:
            recipe.steps_of(self.stages, load_user_stages=False)
        except StageError as e:
            raise ConfigError(str(e)) from None


# Sections that are not shard stages but share the file.
EXTRA_SECTIONS: dict[str, type] = {"run": RunConfig}
SECTIONS_GROUP = "clipcurate.config_sections"  # entry point: other packages' sections (pipeline/plugins.py)


def _extra_section_class(name: str):
    """`[run]`, or a section another package of the project registers under the `clipcurate.config_sections`
    entry point (pyproject: the trainer's `[train]`), so the spine imports nothing outside itself."""
    if name in EXTRA_SECTIONS:
        return EXTRA_SECTIONS[name]
    from pipeline import plugins

    target = dict(plugins.registered(SECTIONS_GROUP)).get(name)
    if target is None:
        return None
    try:
        return plugins.load(target)
    except (ImportError, AttributeError):
        return None


def _registered_sections() -> list[str]:
    """Sections other packages of the project register (`clipcurate.config_sections`: the trainer's `[train]`)."""
    from pipeline import plugins

    return sorted({name for name, _ in plugins.registered(SECTIONS_GROUP)} - set(EXTRA_SECTIONS))


def section_class(name: str):
    if "@" in name:  # a labelled step of the recipe (`[align@text]`): its stage's Config
        name = name.partition("@")[0]
    if name in stage_names():
        try:
            return stage_class(name).Config
        except StageError:
            return None
    return _extra_section_class(name)


def _not_finite(value: Any) -> float | None:
    """The first float in `value` (a number, or one inside a list or table) that is nan or infinite."""
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((bad for v in items if (bad := _not_finite(v)) is not None), None)


def _check_value(section: str, key: str, value: Any, default: Any) -> Any:
    # TOML has nan and inf; no setting means them: every comparison with nan is false, so a rule given
    # `max_aspect = nan` would quietly be off. Refused for every key, typed or not (a None default too).
    bad = _not_finite(value)
    if bad is not None:
        raise ConfigError(f"config [{section}] {key} = {value!r}: {bad!r} is not a finite number")
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, list)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"config [{section}] {key} = {value!r}: expected {type(default).__name__}")
    return value


def _named_table(section: str, name: str, value: dict, held: dict) -> dict:
    """`[section.NAME]` (a sub-table, e.g. `[heads.aesthetic]`) of a section whose Config declares
    `named_tables = "FIELD"`: kept in that dict field under NAME, its numbers checked finite here (the Config
    checks the rest). Laid over what the field already holds for NAME (a run's saved config), key by key."""
    for k, v in value.items():
        _check_value(f"{section}.{name}", k, v, None)
    old = held.get(name)
    return {**(old if isinstance(old, dict) else {}), **value}


def resolve(raw: dict) -> dict[str, dict]:
    """Defaults for every known section, overridden by `raw`; validated."""
    out: dict[str, dict] = {}
    names = ["run"] + stage_names() + _registered_sections() + recipe.labelled_sections(raw)
    for section in list(raw):
        if ":" in section:  # a user stage ("module:Class"): its own Config validates it when built
            out[section] = {k: _check_value(section, k, v, None) for k, v in dict(raw[section]).items()}
            continue
        if section not in names:
            raise ConfigError(f"config: unknown section [{section}] (known: {', '.join(names)})")
    for section in names:
        cls = section_class(section)
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"config: [{section}] must be a table")
        if cls is None:
            if given:
                out[section] = dict(given)  # stage not installed: keep what the user wrote
            continue
        defaults = dataclasses.asdict(cls())
        tables = getattr(cls, "named_tables", None)  # a dict field that takes the section's [section.NAME] tables
        for key, value in given.items():
            if key not in defaults and tables in defaults and isinstance(value, dict):
                defaults[tables] = {**defaults[tables], key: _named_table(section, key, value, defaults[tables])}
                continue
            if key not in defaults:
                raise ConfigError(
                    f"config [{section}]: unknown key '{key}' (known: {', '.join(sorted(defaults))})"
                )
            defaults[key] = _check_value(section, key, value, defaults[key])
        try:
            cls(**defaults)  # the section's own range checks (__post_init__: one-line ConfigError)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config [{section}]: {e}") from None
        out[section] = defaults
    return out


def _read_raw(path: str | Path) -> dict:
    """A TOML file as written (no defaults filled in)."""
    from pipeline import shards

    if not shards.exists(str(path)):
        raise ConfigError(f"config file {path} does not exist")
    fs, p = shards.fs_and_path(str(path))
    if fs.isdir(p):
        raise ConfigError(f"config file {path} is a folder, not a TOML file")
    try:
        with fs.open(p, "rb") as f:
            raw = tomllib.loads(f.read().decode("utf-8", "replace"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML ({e})") from None
    return raw


def load(path: str | Path | None) -> dict[str, dict]:
    if path is None:
        return resolve({})
    return resolve(_read_raw(path))


def overlay(base: dict, over: dict) -> dict:
    """`over` laid on `base`, key by key within each section: what `over` does not name keeps its value."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, values in over.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def _drop_none(obj):
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj


def save(config: dict, path: str | Path) -> None:
    from pipeline import shards

    shards.write_bytes(tomli_w.dumps(_drop_none(config)).encode(), str(path))


def saved_path(run_dir: str | Path) -> str:
    from pipeline import shards

    return shards.join(str(run_dir), "config.toml")


def for_run(run_dir: str | Path, config_path: str | None, fresh: bool = False) -> dict[str, dict]:
    """The run's config: its saved config.toml with `config_path` laid over it (keys the file does not name
    keep their saved values), so `--config t50.toml` holding only `[metaclip] t = 50` changes t and nothing
    else. `fresh`: defaults + the file, ignoring what the run saved (an explicit choice, never the default).
    A run with nothing saved starts from the defaults."""
    from pipeline import shards

    saved = saved_path(run_dir)
    base = _read_raw(saved) if (not fresh and shards.exists(saved)) else {}
    if config_path is None:
        return resolve(base)
    return resolve(overlay(base, _read_raw(config_path)))


def saved_config(run_dir: str | Path) -> dict[str, dict] | None:
    """The run's resolved saved config, or None for a run that has none yet."""
    from pipeline import shards

    saved = saved_path(run_dir)
    return resolve(_read_raw(saved)) if shards.exists(saved) else None


def changes(old: dict[str, dict], new: dict[str, dict]) -> list[tuple[str, str, Any, Any]]:
    """(section, key, old value, new value) for every key whose resolved value differs, in file order."""
    out = []
    for section in list(old) + [s for s in new if s not in old]:
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                out.append((section, key, a.get(key), b.get(key)))
    return out


def redone_by(changed_sections: set[str], stage_names: list[str]) -> list[str]:
    """Which of a run's stages (in recipe order) a config change redoes: a changed stage and every stage after
    it (their inputs change with it); `[run]` (the seed) redoes them all."""
    if "run" in changed_sections:
        return list(stage_names)
    for i, name in enumerate(stage_names):
        if name in changed_sections:
            return list(stage_names[i:])
    return []


def check_ranges(section: str, config: Any, **bounds: tuple[float | None, float | None]) -> None:
    """One-line ConfigError for a value outside [lo, hi] (None = unbounded): `min_words = -5` is a typo the
    run must not silently take. Called from a section's `__post_init__`."""
    for key, (lo, hi) in bounds.items():
        v = getattr(config, key)
        if v is None:
            continue
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if hi is None:
                want = f"must be at least {lo}"
            elif lo is None:
                want = f"must be at most {hi}"
            else:
                want = f"must be between {lo} and {hi}"
            raise ConfigError(f"config [{section}] {key} = {v!r}: {want}")
