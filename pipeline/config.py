"""One TOML file, one section per stage; defaults live in each stage's `Config` dataclass.

Unknown sections/keys and wrong types are one-line errors: a typo in a threshold must not silently fall
back to the default. The resolved config (defaults + file) is saved in the run as `config.toml`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from pipeline.stage import STAGE_ORDER, StageError, stage_class


class ConfigError(ValueError):
    """Bad config file. str() is one line."""


@dataclasses.dataclass
class RunConfig:
    seed: int = 0
    # Stages whose pool-wide statistics grow with the pool (align) shuffle them into ceil(shards / this)
    # partitions, each merged by one task: a task's memory follows this many shards, not the pool. Results
    # do not depend on it; lower it when a merge task runs out of memory, raise it for fewer, larger tasks.
    stats_shards_per_partition: int = 8

    def __post_init__(self):
        if self.stats_shards_per_partition < 1:
            raise ConfigError(f"config [run] stats_shards_per_partition = {self.stats_shards_per_partition}: "
                              "must be at least 1")


# Sections that are not shard stages but share the file.
EXTRA_SECTIONS: dict[str, type] = {"run": RunConfig}


def _extra_section_class(name: str):
    if name in EXTRA_SECTIONS:
        return EXTRA_SECTIONS[name]
    if name == "train":
        try:
            from trainer.config import TrainConfig
        except ModuleNotFoundError:
            return None
        return TrainConfig
    return None


def section_class(name: str):
    if name in STAGE_ORDER:
        try:
            return stage_class(name).Config
        except StageError:
            return None
    return _extra_section_class(name)


def _check_value(section: str, key: str, value: Any, default: Any) -> Any:
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


def resolve(raw: dict) -> dict[str, dict]:
    """Defaults for every known section, overridden by `raw`; validated."""
    out: dict[str, dict] = {}
    names = ["run"] + STAGE_ORDER + ["train"]
    for section in list(raw):
        if ":" in section:  # a user stage ("module:Class"): its own Config validates it when built
            out[section] = dict(raw[section])
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
        for key, value in given.items():
            if key not in defaults:
                raise ConfigError(
                    f"config [{section}]: unknown key '{key}' (known: {', '.join(sorted(defaults))})"
                )
            defaults[key] = _check_value(section, key, value, defaults[key])
        if section == "run":
            RunConfig(**defaults)  # its own range checks (one-line ConfigError)
        out[section] = defaults
    return out


def load(path: str | Path | None) -> dict[str, dict]:
    if path is None:
        return resolve({})
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML ({e})") from None
    return resolve(raw)


def _drop_none(obj):
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj


def save(config: dict, path: str | Path) -> None:
    from pipeline import shards

    shards.write_bytes(tomli_w.dumps(_drop_none(config)).encode(), str(path))


def for_run(run_dir: str | Path, config_path: str | None) -> dict[str, dict]:
    """--config wins; else a run's saved config (so a plain rerun resumes as before); else defaults."""
    saved = Path(run_dir) / "config.toml"
    if config_path is None and saved.exists():
        return load(saved)
    cfg = load(config_path)
    return cfg
