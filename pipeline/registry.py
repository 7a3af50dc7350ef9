"""Stages by name. Stages are found through the `clipcurate.stages` entry point (pyproject.toml:
`name = "module:Class"`), so the spine names none; a user's stage is given as "package.module:Class". One
ready instance per (stage, config, seed) per process (`get_stage`): heavy setup happens once per worker."""

from __future__ import annotations

import importlib
from typing import Any

from pipeline import plugins
from pipeline.errors import StageError
from pipeline.hashing import fingerprint
from pipeline.stage import Stage

STAGES_GROUP = "clipcurate.stages"


def stage_names() -> list[str]:
    """The registered stages' names (`clipcurate.stages`), in registration order."""
    return [name for name, _ in plugins.registered(STAGES_GROUP)]


def stage_class(name: str) -> type[Stage]:
    """A registered stage by name, or a user's stage as "package.module:ClassName"."""
    if ":" in name:  # importing the module runs its code: only a step that runs (or is read) gets here
        module_name, _, cls_name = name.partition(":")
        try:
            return _a_stage(name, getattr(importlib.import_module(module_name), cls_name))
        except (ImportError, AttributeError) as e:  # (a missing dependency of the module too)
            raise StageError(f"cannot load stage '{name}': {e} (the module must be importable from the current "
                             "folder or PYTHONPATH)") from None
    target = dict(plugins.registered(STAGES_GROUP)).get(name)
    if target is None:  # the stages a recipe step or `run` can name: not the one that downloads (its own command)
        offered = [n for n in stage_names() if not _downloads(n)]
        raise StageError(f"unknown stage '{name}' (stages: {', '.join(offered)}; or your own as module:Class)")
    cls = plugins.load(target)
    if cls is None:
        raise StageError(f"stage '{name}' is not available in this version")
    return _a_stage(name, cls)


def _a_stage(name: str, obj: Any) -> type[Stage]:
    """`obj` when it is a Stage subclass; else one line naming it (`os:system` names a function, not a stage)."""
    if isinstance(obj, type) and issubclass(obj, Stage) and obj is not Stage:
        return obj
    what = (f"class {obj.__name__}" if isinstance(obj, type) else "function" if callable(obj)
            else type(obj).__name__)
    raise StageError(f"'{name}' is not a stage: it names a {what}, not a subclass of pipeline.stage.Stage "
                     "(a step is a stage name, or module:Class of your own Stage subclass)")


def _downloads(name: str) -> bool:
    """Whether a registered stage downloads (imports it: only for the error above)."""
    try:
        return bool(stage_class(name).downloads)
    except StageError:
        return False


_INSTANCES: dict[str, Stage] = {}


def get_stage(name: str, config: dict, seed: int) -> Stage:
    """One ready instance per (stage, config, seed) per process: heavy setup happens once per worker."""
    key = fingerprint([name, config, seed])
    inst = _INSTANCES.get(key)
    if inst is None:
        inst = stage_class(name)(config, seed)
        _INSTANCES[key] = inst
    return inst.ensure_ready()
