"""A run's recipe: which stages it runs, in which order (`[run] stages` in the config).

A step is a stage name (`align`), a user's stage (`mypkg.rules:MyStage`), or either with a label
(`align@text`) so that one stage can appear more than once: MetaCLIP balances alt-texts before anything is
downloaded, and ALIGN's text rules need no image, so a text-first recipe runs align on the URL list and again,
with its image rules, after the download. A labelled step has its own config section (`[align@text]`, defaults
from the stage's Config, not from `[align]`: what a step does is written in one place).

Each step's folder is named by its position in the recipe (`03_klite`, `04_align-image`): two runs of one
stage never share a folder, and the default recipe keeps the names runs have always had. Steps run in recipe
order, each reading the output of the nearest earlier step that has run (or the run's input).
"""

from __future__ import annotations

import dataclasses
import re

from pipeline import shards
from pipeline.errors import StageError
from pipeline.registry import stage_class, stage_names

CUSTOM_POSITION = 90  # a user's stage run outside the recipe: after every step (its folder: 90_<name>)

# a stage name or module.path:Class, then an optional @label (lower case: it names a folder and a section)
_STEP = re.compile(r"^(?P<stage>[A-Za-z_][\w.]*(?::[A-Za-z_]\w*)?)(?:@(?P<label>[a-z0-9][a-z0-9_-]*))?$")


RECIPES_GROUP = "clipcurate.recipes"  # entry point `default` (pyproject.toml): the project names its recipe there


def default_recipe() -> list[str]:
    """The recipe a run follows when its config names none: the `default` of `clipcurate.recipes` (the
    project's: ingest, align, metaclip, klite, dfn, emit)."""
    from pipeline import plugins

    target = dict(plugins.registered(RECIPES_GROUP)).get("default")
    names = plugins.load(target) if target else None
    if not names:
        raise StageError("no default recipe is installed (entry point clipcurate.recipes: default): give the "
                         "stages in the config, [run] stages = [...]")
    return list(names)


@dataclasses.dataclass(frozen=True)
class Step:
    stage: str  # what runs: a built-in stage's name, or "module:Class"
    label: str = ""
    position: int = 0

    @property
    def name(self) -> str:
        """The step as the recipe writes it; also its config section."""
        return f"{self.stage}@{self.label}" if self.label else self.stage

    @property
    def folder(self) -> str:
        base = stage_class(self.stage).name if ":" in self.stage else self.stage
        return f"{self.position:02d}_{base}" + (f"-{self.label}" if self.label else "")


def parse_step(text: str, position: int) -> Step:
    m = _STEP.match(str(text).strip())
    if not m:
        raise StageError(f"recipe: '{text}' is not a step (a stage name, or module:Class, with an optional "
                         "@label of lower-case letters, digits, - or _)")
    return Step(m["stage"], m["label"] or "", position)


def steps_of(names: list[str], load_user_stages: bool = False) -> list[Step]:
    """The recipe's steps, checked: known stages, each step once (a repeated stage needs a label).

    Nothing is imported: a stage name is checked against the registry's names, and a user's `module:Class` only
    for its form. Importing a module runs its code, so a step's module is imported only where its class is
    needed: when the step runs, when a later step reads its output (its folder is named by its class), when the
    report draws it. A step the command does not run is not imported (`load_user_stages` imports every user step
    now: the CLI first puts the current folder on the path)."""
    if not isinstance(names, list) or not names:
        raise StageError("config [run] stages: give a list of stage names, e.g. [\"align\", \"metaclip\"]")
    steps = [parse_step(n, i) for i, n in enumerate(names)]
    registered = set(stage_names())
    seen: set[str] = set()
    for s in steps:
        if (load_user_stages and ":" in s.stage) or (":" not in s.stage and s.stage not in registered):
            stage_class(s.stage)  # unknown stage: one line naming the known ones
        if s.name in seen:
            raise StageError(f"config [run] stages: '{s.name}' appears twice; give one of them a label, "
                             f"e.g. '{s.stage}@second'")
        seen.add(s.name)
    return steps


def of_config(config: dict) -> list[Step]:
    """The steps of the recipe `config` names (the default recipe when it names none); none of them imported."""
    return steps_of(list((config.get("run") or {}).get("stages") or default_recipe()))


def downloads(step: Step) -> bool:
    """Whether a step is the recipe's download, without importing a user's step: only a registered stage can be
    (`clipcurate ingest` runs the recipe's registered download step; `run` runs none), so a module:Class is not."""
    return ":" not in step.stage and bool(stage_class(step.stage).downloads)


def output_exists(run_dir: str, step: Step) -> bool:
    """Whether `step` has a folder in the run, without importing a user's step that is not run: its folder is
    named by its class's `name`, so for a `module:Class` step any folder at its position counts."""
    if ":" not in step.stage:
        return shards.exists(shards.join(run_dir, step.folder))
    fs, p = shards.fs_and_path(run_dir)
    return bool(fs.glob(p.rstrip("/") + f"/{step.position:02d}_*"))


def labelled_sections(config_or_raw: dict) -> list[str]:
    """Config sections of the recipe's labelled steps (`align@text`): validated like their stage's section."""
    names = (config_or_raw.get("run") or {}).get("stages") or []
    out = []
    for i, n in enumerate(names if isinstance(names, list) else []):
        try:
            s = parse_step(n, i)
        except StageError:
            continue
        if s.label:
            out.append(s.name)
    return out


def find(steps: list[Step], name: str) -> Step | None:
    """The step a command-line name means: `align@text` exactly, or a plain stage name that appears once."""
    exact = [s for s in steps if s.name == name]
    if exact:
        return exact[0]
    same_stage = [s for s in steps if s.stage == name]
    if len(same_stage) == 1:
        return same_stage[0]
    if len(same_stage) > 1:
        raise StageError(f"'{name}' appears {len(same_stage)} times in this run's recipe "
                         f"({', '.join(s.name for s in same_stage)}): name the step")
    return None


def _with_step(names: list[str], stage: str) -> str:
    """The recipe with `stage` added where the registered stages' order puts it (before the first step whose stage is
    registered after it; last otherwise), as a TOML array: the line a refusal offers."""
    import json

    order = {name: i for i, name in enumerate(stage_names())}
    at = next((i for i, n in enumerate(names) if order.get(parse_step(n, 0).stage, -1) > order.get(stage, 1 << 30)),
              len(names))
    return json.dumps(names[:at] + [stage] + names[at:])


def plan(names: list[str], steps: list[Step]) -> list[Step]:
    """The steps to run for command-line `names`, in recipe order. A user's stage that the recipe does not list
    runs after every recipe step, in the order given (its folder: 90_<name>, as before recipes)."""
    chosen: list[Step] = []
    extra: list[Step] = []
    for n in names:
        s = find(steps, n)
        if s is None:
            parsed = parse_step(n, CUSTOM_POSITION)
            if ":" not in parsed.stage:
                stage_class(parsed.stage)  # unknown stage: one line
                raise StageError(f"'{n}' is not in this run's recipe ([run] stages = "
                                 f"[{', '.join(repr(x.name) for x in steps)}]); to add it, give `--config FILE` with "
                                 f"[run] stages = {_with_step([x.name for x in steps], parsed.stage)}")
            s = parsed
            extra.append(s)
        elif s not in chosen:
            chosen.append(s)
    return sorted(chosen, key=lambda s: s.position) + extra

