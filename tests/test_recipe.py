"""Recipes: `[run] stages` sets which stages a run runs and in which order; a stage may repeat with a label."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from pipeline import config as config_mod
from pipeline import recipe
from pipeline.cli import main as cli_main
from pipeline.errors import StageError
from tests.stages_for_tests import make_pool

FW = "tests.stages_for_tests:FirstWordStage"


def test_steps_are_parsed_and_named_by_position():
    steps = recipe.steps_of(["align@text", "metaclip", "klite", "align", "emit"])
    assert [s.name for s in steps] == ["align@text", "metaclip", "klite", "align", "emit"]
    assert [s.folder for s in steps] == ["00_align-text", "01_metaclip", "02_klite", "03_align", "04_emit"]
    assert steps[0].stage == "align" and steps[0].label == "text"
    # the default recipe keeps the folder names runs have always had
    assert [s.folder for s in recipe.steps_of(recipe.default_recipe())] == [
        "00_ingest", "01_align", "02_metaclip", "03_klite", "04_dfn", "05_emit"]
    # a user's stage takes its class's name, at its place in the recipe
    assert recipe.steps_of([FW, f"{FW}@again"])[1].folder == "01_firstword-again"


@pytest.mark.parametrize("stages, message", [
    (["align", "align"], "'align' appears twice; give one of them a label"),
    (["alig"], "unknown stage 'alig'"),
    (["align@Text"], "is not a step"),
    (["align@"], "is not a step"),
    ([], "give a list of stage names"),
])
def test_bad_recipes_are_one_line_config_errors(stages, message):
    with pytest.raises(config_mod.ConfigError, match=message) as e:
        config_mod.resolve({"run": {"stages": stages}})
    assert "\n" not in str(e.value)


def test_a_labelled_step_has_its_own_section_validated_as_its_stage():
    cfg = config_mod.resolve({"run": {"stages": ["align@text", "metaclip", "align"]},
                              "align@text": {"min_words": 2}})
    assert cfg["align@text"]["min_words"] == 2 and cfg["align"]["min_words"] == 3  # defaults, not [align]'s
    with pytest.raises(config_mod.ConfigError, match=r"\[align@text\]: unknown key 'min_wrods'"):
        config_mod.resolve({"run": {"stages": ["align@text", "align"]}, "align@text": {"min_wrods": 2}})
    with pytest.raises(config_mod.ConfigError, match=r"unknown section \[align@image\]"):
        config_mod.resolve({"align@image": {}})  # a section for a step the recipe does not have


def test_plan_follows_the_recipe_order_and_names_repeated_stages():
    steps = recipe.steps_of(["metaclip", "align@text", "klite", "align"])
    assert [s.name for s in recipe.plan(["align", "metaclip"], steps)] == ["metaclip", "align"]
    assert [s.name for s in recipe.plan(["klite", "align@text"], steps)] == ["align@text", "klite"]
    with pytest.raises(StageError, match="'emit' is not in this run's recipe"):
        recipe.plan(["emit"], steps)
    # the refusal offers the line that adds the step, where the registered stages' order puts it
    with pytest.raises(StageError) as e:
        recipe.plan(["dfn"], recipe.steps_of(["ingest", "align", "metaclip", "emit"]))
    assert str(e.value).endswith('[run] stages = ["ingest", "align", "metaclip", "dfn", "emit"]')
    with pytest.raises(StageError) as e:
        recipe.plan(["emit"], steps)
    assert str(e.value).endswith('[run] stages = ["metaclip", "align@text", "klite", "align", "emit"]')
    one = recipe.steps_of(["align@text", "metaclip"])
    assert recipe.plan(["align"], one)[0].name == "align@text"  # a stage that appears once: its step
    two = recipe.steps_of(["align@text", "metaclip", "align@image"])
    with pytest.raises(StageError, match="appears 2 times in this run's recipe"):
        recipe.plan(["align"], two)
    # a user's stage outside the recipe runs after it, in its pre-recipe folder
    assert [s.folder for s in recipe.plan([FW, "metaclip"], one)] == ["01_metaclip", "90_firstword"]


def _kept(folder) -> list[str]:
    uids = []
    for f in sorted(os.listdir(folder)):
        if f.endswith(".parquet"):
            uids += pq.read_table(os.path.join(folder, f), columns=["uid"]).column("uid").to_pylist()
    return sorted(uids)


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_recipe_with_a_repeated_stage_runs_in_order_resumes_and_reports(tmp_path, caplog):
    """firstword twice (the second with other settings), align between: each step reads the one before it,
    has its own folder, fingerprint and manifest; a rerun redoes nothing; a change to the first step's section
    redoes every step after it."""
    pool = tmp_path / "pool"
    make_pool(400, 3, pool)
    runs = tmp_path / "runs"
    cfg = _write(tmp_path / "recipe.toml", f'''
[run]
stages = ["{FW}@first", "align", "{FW}"]
["{FW}@first"]
keep = 0.8
["{FW}"]
keep = 0.6
''')
    argv = ["--runs-dir", str(runs), "run", "--run", "r", "--input", str(pool), "--config", cfg, "--workers", "0"]
    assert cli_main(argv) == 0
    run = runs / "r"
    folders = sorted(d.name for d in run.iterdir() if d.is_dir() and d.name[:2].isdigit())
    assert folders == ["00_firstword-first", "01_align", "02_firstword"]
    man = {d: json.loads((run / d / "_manifest.json").read_text()) for d in folders}
    assert [man[d]["stage"] for d in folders] == [f"{FW}@first", "align", FW]
    # each step read the step before it
    assert man["01_align"]["rows_in"] == man["00_firstword-first"]["rows_out"]
    assert man["02_firstword"]["rows_in"] == man["01_align"]["rows_out"]
    assert man["00_firstword-first"]["config"]["keep"] == 0.8 and man["02_firstword"]["config"]["keep"] == 0.6
    kept = _kept(run / "02_firstword")
    assert 0 < len(kept) < man["01_align"]["rows_out"]

    # rerun: every shard of every step is up to date
    caplog.clear()
    with caplog.at_level("INFO", logger="clipcurate"):
        assert cli_main(argv) == 0
    assert caplog.text.count("shards up to date, skipped") == 3
    assert _kept(run / "02_firstword") == kept

    # one step by name, with its label
    caplog.clear()
    with caplog.at_level("INFO", logger="clipcurate"):
        assert cli_main(["--runs-dir", str(runs), "run", f"{FW}@first", "--run", "r", "--workers", "0"]) == 0
    assert caplog.text.count("shards up to date, skipped") == 1  # that step only

    # a change to the first step redoes it and everything after it
    cfg2 = _write(tmp_path / "keep.toml", f'["{FW}@first"]\nkeep = 0.7\n')
    caplog.clear()
    with caplog.at_level("INFO", logger="clipcurate"):
        assert cli_main(["--runs-dir", str(runs), "run", "--run", "r", "--config", cfg2, "--workers", "0"]) == 0
    assert "shards up to date, skipped" not in caplog.text
    man2 = json.loads((run / "00_firstword-first" / "_manifest.json").read_text())
    assert man2["config"]["keep"] == 0.7 and man2["rows_out"] < man["00_firstword-first"]["rows_out"]

    # the report follows the recipe
    from pipeline.layout import stage_folders

    assert [n for n, _ in stage_folders(str(run))] == [f"{FW}@first", "align", FW]


def test_a_recipe_in_another_order_than_the_default(tmp_path):
    """metaclip before align: the order is the recipe's, not the code's; same rows as a reference run of the
    two stages one after the other by hand."""
    pool = tmp_path / "pool"
    make_pool(300, 2, pool)
    runs = tmp_path / "runs"
    cfg = _write(tmp_path / "r.toml", '[run]\nstages = ["metaclip", "align"]\n[metaclip]\nt = 5\n')
    assert cli_main(["--runs-dir", str(runs), "run", "align,metaclip", "--run", "r", "--input", str(pool),
                     "--config", cfg, "--workers", "0"]) == 0
    run = runs / "r"
    assert (run / "00_metaclip" / "_manifest.json").exists() and (run / "01_align" / "_manifest.json").exists()
    # reference: metaclip alone on the pool, then align alone on its output
    ref = tmp_path / "ref"
    cfg_m = _write(tmp_path / "m.toml", '[metaclip]\nt = 5\n')
    assert cli_main(["--runs-dir", str(ref), "run", "metaclip", "--run", "m", "--input", str(pool),
                     "--config", cfg_m, "--workers", "0"]) == 0
    assert cli_main(["--runs-dir", str(ref), "run", "align", "--run", "a", "--input",
                     str(ref / "m" / "02_metaclip"), "--workers", "0"]) == 0
    assert _kept(run / "01_align") == _kept(ref / "a" / "01_align")


def test_a_users_stage_in_the_saved_recipe_is_found_when_a_config_changes(tmp_path, monkeypatch):
    """The recipe names module:Class; a later `run STAGE --config` (which reads the recipe to say what a change
    redoes) finds the module from the current folder, as the first run did."""
    mod = tmp_path / "work"
    mod.mkdir()
    (mod / "mystage_rc.py").write_text("from tests.stages_for_tests import FirstWordStage as My\n")
    monkeypatch.chdir(mod)
    pool = tmp_path / "pool"
    make_pool(120, 2, pool)
    runs = tmp_path / "runs"
    cfg = _write(tmp_path / "r.toml", '[run]\nstages = ["align", "mystage_rc:My"]\n')
    base = ["--runs-dir", str(runs)]
    assert cli_main(base + ["run", "--run", "r", "--input", str(pool), "--config", cfg, "--workers", "0"]) == 0
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in (str(mod), "")])
    __import__("sys").modules.pop("mystage_rc", None)
    seed = _write(tmp_path / "seed.toml", "[run]\nseed = 1\n")
    assert cli_main(base + ["run", "align", "--run", "r", "--config", seed, "--workers", "0"]) == 0


@pytest.mark.parametrize("name", ["text-first", "balance-last", "semdedup"])
def test_the_shipped_recipes_are_valid_configs_and_the_demo_world_writes_the_same_recipe(name, tmp_path):
    """stages/recipes/<name>.toml resolves as a config, and a demo world's config-<name>.toml has the same steps
    and the same switches (rules, score_only, score_col), only with the world's scaled thresholds."""
    import tomllib
    from pathlib import Path

    from demo.config import demo_config

    shipped = tomllib.loads((Path(__file__).resolve().parents[1] / "stages" / "recipes" / f"{name}.toml").read_text())
    cfg = config_mod.resolve(shipped)
    demo = config_mod.resolve(tomllib.loads(demo_config(3000, tmp_path / "eval.parquet", "default", name)))
    assert cfg["run"]["stages"] == demo["run"]["stages"] == shipped["run"]["stages"]
    for section, keys in shipped.items():
        for key in keys:
            if key in ("min_score",):  # a score depends on the scoring model: the demo measures its own
                continue
            assert demo[section][key] == cfg[section][key], (section, key)
    steps = recipe.steps_of(cfg["run"]["stages"])
    assert sum(1 for s in steps if s.stage == "ingest") == 1
