"""Dependencies point one way (DESIGN.md, Layout): pipeline imports nothing of ours outside itself, a stage never
imports another stage, the trainer uses pipeline's public API and no stage, and nothing of ours imports the demo
world (demo/): its command plugs into the CLI through an entry point. Read from the source (ast), so an import
inside a function counts too."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a stage is a module (stages/emit.py) or a package (stages/align/)
STAGES = {p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"} | {
    p.name for p in (ROOT / "stages").iterdir() if (p / "__init__.py").exists()}

# Known exceptions to the rules below, each with its issue (none left: ingest's command moved out of the spine).
KNOWN: set[tuple[str, str]] = set()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def _ours(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in ("pipeline", "stages", "trainer", "metadata", "demo") else None


def test_dependencies_point_one_way():
    bad = []
    for pkg in ("pipeline", "stages", "trainer", "metadata", "demo"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            own = path.relative_to(ROOT / pkg).parts[0].removesuffix(".py")  # the stage a file belongs to
            for module, names in _imports(path):
                top = _ours(module)
                if top is None or top == pkg and pkg != "stages":
                    continue
                if (rel, module) in KNOWN or (rel, top) in KNOWN:
                    continue
                if top == "demo" and pkg != "demo":
                    bad.append(f"{rel} imports {module} (nothing of ours imports the demo world)")
                elif pkg == "pipeline" and top != "pipeline":
                    bad.append(f"{rel} imports {module} (the spine imports nothing of ours outside itself)")
                elif pkg == "stages" and top == "stages" and module.split(".")[1:2] and module.split(".")[1] in STAGES \
                        and module.split(".")[1] != own:
                    bad.append(f"{rel} imports {module} (a stage never imports another stage)")
                elif pkg in ("trainer", "metadata") and top == "stages":
                    bad.append(f"{rel} imports {module} ({pkg} does not know the stages)")
                elif pkg == "trainer" and top == "pipeline" and any(n.startswith("_") for n in names):
                    bad.append(f"{rel} imports private {names} from {module} (pipeline's public API only)")
    assert not bad, "\n".join(bad)


def test_stage_packages_are_stages():
    assert {"align", "emit", "metaclip"} <= STAGES


def test_the_known_exceptions_still_exist():
    """When one of them is fixed, drop it from KNOWN (this fails until then, so the list stays true)."""
    for rel, module in KNOWN:
        assert any(m == module or m.startswith(module + ".") for m, _ in _imports(ROOT / rel)), (rel, module)


def test_commands_outside_the_spine_plug_in_through_an_entry_point():
    """pipeline/cli.py names no package outside the spine, not even as a string to import: the demo world's,
    the trainer's and metadata's commands are `clipcurate.commands` entry points (pyproject.toml)."""
    from pipeline.cli import COMMANDS, _subparsers, build_parser

    src = (ROOT / "pipeline" / "cli.py").read_text()
    for pkg in ("demo", "trainer", "metadata"):
        assert not re.search(rf"[\"']{pkg}[.:]", src), pkg
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][COMMANDS]
    assert declared["demo-world"] == "demo.cli:register"
    commands = {name for name, _ in _subparsers(build_parser())}
    assert {"demo-world", "ablate", "metadata", "train", "eval", "dfn-train"} <= commands


def test_an_install_older_than_an_entry_point_still_finds_it(monkeypatch):
    """Run from the source tree, the project's own entry points are pyproject.toml's, whatever the installed
    metadata says (an editable install is as old as its last `make setup`); another distribution's come from its
    metadata."""
    import importlib.metadata

    from pipeline import plugins

    stale = SimpleNamespace(name="demo-world", value="gone.module:register", dist=SimpleNamespace(name=plugins.PROJECT))
    other = SimpleNamespace(name="extra", value="someone.else:register", dist=SimpleNamespace(name="a-plugin"))
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [stale, other] if group == "clipcurate.commands" else [])
    plugins.registered.cache_clear()  # read once per process: read again under the patched metadata
    try:
        found = dict(plugins.registered("clipcurate.commands"))
    finally:
        plugins.registered.cache_clear()
    assert found["demo-world"] == "demo.cli:register" and found["extra"] == "someone.else:register"
    assert plugins.load("no_such_package.cli:register") is None  # a package left out of an install: skipped
    assert plugins.load("demo.cli:register").__module__ == "demo.cli"


FAKE_RECIPE = ["firstword"]


def test_the_spine_names_no_stage(monkeypatch):
    """pipeline/ finds the stages and the default recipe through entry points (`clipcurate.stages`,
    `clipcurate.recipes`): no stage module is named in its source, the registered stages are the packages in
    stages/, and with other entry points installed the spine knows those stages and that recipe only."""
    from pipeline import plugins
    from pipeline.recipe import RECIPES_GROUP, default_recipe
    from pipeline.errors import StageError
    from pipeline.registry import STAGES_GROUP, stage_class, stage_names
    from tests.stages_for_tests import FirstWordStage

    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        assert not re.search(r"[\"']stages[.:]", path.read_text()), path
    assert set(stage_names()) == STAGES
    assert default_recipe() == ["ingest", "align", "metaclip", "klite", "dfn", "emit"]
    assert [n for n in stage_names() if stage_class(n).downloads] == ["ingest"]

    fake = {STAGES_GROUP: (("firstword", "tests.stages_for_tests:FirstWordStage"),),
            RECIPES_GROUP: (("default", "tests.test_layout:FAKE_RECIPE"),)}
    monkeypatch.setattr(plugins, "registered", lambda group: fake.get(group, ()))
    assert stage_names() == ["firstword"] and stage_class("firstword") is FirstWordStage
    assert default_recipe() == ["firstword"]
    with pytest.raises(StageError, match="unknown stage 'align' \\(stages: firstword"):
        stage_class("align")


# ---- no import cycles, no private names across modules (issue 34) ---------------------------------------------
def _module_names() -> dict[str, Path]:
    mods = {}
    for pkg in ("pipeline", "stages", "trainer", "metadata", "demo"):
        for p in (ROOT / pkg).rglob("*.py"):
            rel = p.relative_to(ROOT).with_suffix("")
            mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    return mods


def _depends_on(name: str, path: Path, mods: dict) -> set[str]:
    """The modules of ours `name` imports, anywhere in it (inside functions and TYPE_CHECKING blocks too): `from
    package import submodule` depends on the submodule, `from package import name` on the package."""
    out, pkg = set(), name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module if not node.level else ".".join(
                pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in mods else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in mods and m != name}


def test_no_import_cycles():
    """A cycle hidden by an import inside a function is still a cycle: two modules that need each other are one
    module, or a third is missing (pipeline/errors.py, pipeline/layout.py, stages/ingest/config.py)."""
    import graphlib

    mods = _module_names()
    graph = {m: _depends_on(m, p, mods) for m, p in mods.items()}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_no_module_imports_another_modules_private_names():
    bad = []
    for m, p in _module_names().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or node.module and _ours(node.module)):
                bad += [f"{p.relative_to(ROOT)}: {'.' * node.level}{node.module or ''}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "\n".join(bad)


def test_what_is_imported_from_the_runner_is_the_runners_own():
    """runner.py re-exports nothing that moved out of it (executors.py, tasks.py, resume.py, stats_pass.py): every
    name any file of ours imports from pipeline.runner is defined there, not merely imported there."""
    tree = ast.parse((ROOT / "pipeline" / "runner.py").read_text())
    own = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    own |= {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    bad = []
    for pkg in ("pipeline", "stages", "trainer", "metadata", "demo", "bench", "tests"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for module, names in _imports(path):
                if module == "pipeline.runner":
                    bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n not in own]
    assert not bad, "\n".join(bad)
