"""Stale step folders: a run's `NN_name` folders that no step of its current recipe writes or reads.

A step's folder is named by its position in the recipe (pipeline/recipe.py, `Step.folder`), so a recipe that
gains, loses or reorders a step leaves the old folders (`02_metaclip ... 05_emit`) beside the new ones
(`03_metaclip ... 06_emit`). Nothing reads them any more, but they look like steps: `report` lists them in its
summary and leaves them out of its funnel, and `clipcurate clean --run NAME --stale` removes them.

What counts as stale (`find`):
- A folder `NN_*` (NN < 90) that is not the folder of any step of the recipe in the run's saved config. A user's
  `module:Class` step is named by its class (`02_nostock`), so its class is imported to name it; where it does not
  import, the folders at its position are not judged (kept, and said so): a folder is never called stale on a
  guess.
- A `90_<name>` folder (a user's stage run outside the recipe, pipeline/recipe.py CUSTOM_POSITION) is the output of
  a command the user ran on purpose: `run module:Class` still writes and reads it, and no recipe step redoes it, so
  it is not stale. Unless the recipe now has a step of that same stage (its manifest's `stage` names one): `run
  module:Class` then means the recipe's step and writes its folder, and the 90_ folder is an older output nothing
  reads again (the issue's case: a custom stage tried outside the recipe, then added to `[run] stages`).
- A folder is a step's only when the runner could have made it: a link, an empty folder, or one holding what
  the runner writes (`_manifest.json`, `_done/`, shards, `rejected/`, ...). A user's own `00_notes` is not touched.
- A stale folder the run still depends on is kept, with why: the run's image store lives in it (a download
  whose step moved in the recipe), the run's recorded `--input` is in it, or a current step's manifest names it
  as its input, its upstream or its training set.

Removal (`remove`) never follows a link out of the run: a linked folder is unlinked, its target left as it is;
a real folder is removed with shutil.rmtree, which unlinks the links inside it without following them.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import shutil

from pipeline import shards
from pipeline.recipe import CUSTOM_POSITION
from pipeline.errors import StageError

STEP_FOLDER = re.compile(r"^(?P<position>[0-9]{2})_.+$")  # what Step.folder makes: NN_<stage>[-<label>]
# what the runner writes in a step's folder (DESIGN.md, "A run on disk"): one of them marks a folder as a step's
STEP_MARKS = ("_manifest.json", "_done", "_stats.json", "rejected", "stats", "_shuffle")


@dataclasses.dataclass
class StaleFolders:
    """`stale`: folder names `remove` may remove. `kept`: stale by name, but the run depends on them: name -> why.
    `unjudged`: notes on folders not judged (a user's step that does not import). `recipe`: None when the run has
    no saved config (nothing is judged then)."""

    stale: list[str] = dataclasses.field(default_factory=list)
    kept: dict[str, str] = dataclasses.field(default_factory=dict)
    unjudged: list[str] = dataclasses.field(default_factory=list)
    recipe: list[str] | None = None

    def describe(self, run: str) -> str:
        """One line for the report's summary: the stale folders, what `clean` does with them."""
        if self.recipe is None:
            return "not judged: the run has no saved config (config.toml), so its recipe is not known"
        parts = []
        if self.stale:
            parts.append(f"{', '.join(self.stale)}: no step of the recipe writes or reads "
                         f"{'it' if len(self.stale) == 1 else 'them'} now "
                         f"(clipcurate clean --run {run} --stale removes {'it' if len(self.stale) == 1 else 'them'})")
        for name, why in self.kept.items():
            parts.append(f"{name}: not a step of the recipe now, but {why}: clean keeps it")
        parts += self.unjudged
        return "; ".join(parts) if parts else "none"


def find(run_dir: str, config: dict | None = None, dependencies: bool = True) -> StaleFolders:
    """The run's stale step folders, judged against `config`'s recipe (default: the run's saved config).
    `dependencies=False`: what the run still reads is not looked for (every manifest read), so every stale folder
    is in `stale` (the report's funnel only needs to know which folders are not this recipe's)."""
    from pipeline import config as config_mod
    from pipeline import recipe

    if config is None:
        config = config_mod.saved_config(run_dir)
        if config is None:
            return StaleFolders()
    steps = recipe.of_config(config)
    current, unjudged_at = set(), {}
    for step in steps:
        try:
            current.add(step.folder)
        except StageError as e:  # a user's module:Class that does not import: its folder's name is not known
            unjudged_at[f"{step.position:02d}"] = (step.name, str(e))
    out = StaleFolders(recipe=[s.name for s in steps])
    in_use = _in_use(run_dir, steps, current) if dependencies else []
    for name in _step_folders(run_dir):
        if name in current:
            continue
        position = STEP_FOLDER.match(name)["position"]
        if position in unjudged_at:
            step, why = unjudged_at[position]
            out.unjudged.append(f"{name}: not judged ({step} does not import: {why.rstrip('.')})")
            continue
        if int(position) == CUSTOM_POSITION and not _superseded(run_dir, name, steps):
            continue  # a user's stage run outside the recipe: `run module:Class` still writes and reads it
        why = _depended_on(shards.join(run_dir, name), in_use)
        if why:
            out.kept[name] = why
        else:
            out.stale.append(name)
    return out


def _step_folders(run_dir: str) -> list[str]:
    """The run's entries named like a step's folder that a step could have made, sorted."""
    if shards.is_local(run_dir):
        root = _local(run_dir)
        if not os.path.isdir(root):
            return []
        return sorted(n for n in os.listdir(root) if STEP_FOLDER.match(n) and _made_by_a_step(os.path.join(root, n)))
    fs, p = shards.fs_and_path(run_dir)
    names = [posixpath.basename(x.rstrip("/")) for x in fs.glob(p.rstrip("/") + "/[0-9][0-9]_*")]
    return sorted(n for n in names if STEP_FOLDER.match(n) and fs.isdir(p.rstrip("/") + "/" + n)
                  and any(fs.exists(p.rstrip("/") + f"/{n}/{m}") for m in STEP_MARKS))


def _local(path: str) -> str:
    return path[len("file://"):] if str(path).startswith("file://") else str(path)


def _made_by_a_step(path: str) -> bool:
    """A link (removing it loses nothing: it is unlinked, not followed), an empty folder, or a folder holding what
    the runner writes. Not a file, not a user's own folder of notes."""
    if os.path.islink(path):
        return True
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return not names or any(m in names for m in STEP_MARKS) or any(n.endswith(".parquet") for n in names)


def _superseded(run_dir: str, name: str, steps: list) -> bool:
    """A 90_ folder whose stage the recipe now runs as a step (its manifest's `stage`): `run module:Class` means
    that step now. Read only from a real folder (a linked one is not followed: kept)."""
    path = shards.join(run_dir, name)
    if shards.is_local(run_dir) and os.path.islink(_local(path)):
        return False
    stage = (shards.read_json(shards.join(path, "_manifest.json")) or {}).get("stage")
    return bool(stage) and any(stage in (s.name, s.stage) for s in steps)


def _in_use(run_dir: str, steps: list, current: set[str]) -> list[tuple[str, str]]:
    """(path, why) of what the run reads: its image store, its recorded --input, and what each current step's
    manifest says it was made from or wrote outside its folder."""
    from pipeline import images

    out = []
    store = images.ImageStore.load(run_dir)
    if store is not None:
        out.append((store.root, "the run's image store is in it (image_store.json)"))
    source = (shards.read_json(shards.join(run_dir, "source.json")) or {}).get("input")
    if source:
        out.append((source, "the run's recorded --input is in it (source.json)"))
    for folder in sorted(current):
        m = shards.read_json(shards.join(run_dir, folder, "_manifest.json")) or {}
        if m.get("input"):
            out.append((m["input"], f"{folder} was made from it"))
        upstream = m.get("upstream")
        if isinstance(upstream, dict) and upstream.get("folder"):
            out.append((shards.join(run_dir, upstream["folder"]), f"{folder} was downloaded from it"))
        fin = m.get("finalize")
        if isinstance(fin, dict) and isinstance(fin.get("folder"), str):
            out.append((fin["folder"], f"{folder}'s training set is in it"))
    return out


def _depended_on(folder: str, in_use: list[tuple[str, str]]) -> str | None:
    """Why the run still depends on `folder` (a path it reads is the folder or under it), or None."""
    from pipeline.images import within

    for path, why in in_use:
        if isinstance(path, str) and path and within(_local(path) if shards.is_local(path) else path,
                                                     _local(folder) if shards.is_local(folder) else folder):
            return why
    return None


def remove(run_dir: str, name: str) -> str:
    """Remove the stale folder `name` of the run; returns what was done, for the line the CLI prints. A link is
    unlinked (its target is not touched); a real folder is removed with what is in it, links unlinked, never
    followed."""
    if not STEP_FOLDER.match(name) or "/" in name or os.sep in name:
        raise StageError(f"clean: {name!r} is not a step folder's name")  # never reached from find(): a guard
    path = shards.join(run_dir, name)
    if not shards.is_local(run_dir):
        fs, p = shards.fs_and_path(path)
        fs.rm(p, recursive=True)
        return f"removed {path}"
    local = _local(path)
    if os.path.islink(local):
        target = os.readlink(local)
        os.unlink(local)
        return f"removed {path} (a link to {target}: unlinked, its target left as it is)"
    shutil.rmtree(local)  # Python >= 3.11: fd-based where the platform allows; links inside are unlinked
    return f"removed {path}"
