"""Issue 30, item 2: the preflight. Before a command writes anything in a run, every step it is about to run says
what it lacks (a filtering network, a concept list, WordNet, an eval set, an image store, a writable runs
folder, dfn-train's HQ set); a missing need refuses the command in one line per need, exit 2, with nothing
written. `clipcurate check --run NAME` runs it alone and writes nothing.

All through the CLI (pipeline.cli.main in-process), on pools of a few rows built here: nothing runs a stage's
work (the refusals come first), so every test takes a second or two; the one that publishes a stand-in
pretrained model into a temporary Hugging Face cache (offline) builds it as tests/test_models_pretrained.py does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli_main
from pipeline.schema import compute_uid

FAKE_CHECKPOINT = b"PK\x03\x04" + b"\0" * 60  # how torch.save's zip begins: all the preflight looks at


# ---- fixtures -----------------------------------------------------------------------------------------------
def _pool(folder: Path, n: int = 8, images: bool = True) -> Path:
    """n rows with uid/url/text and, with `images`, an image-bytes column (the bytes are never decoded here)."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = [f"http://example.com/{i}.jpg" for i in range(n)]
    texts = [f"a red dog number {i} on grass" for i in range(n)]
    cols = {"url": urls, "text": texts}
    if images:
        cols["image"] = pa.array([b"\xff\xd8 not decoded here %d" % i for i in range(n)], pa.binary())
    t = pa.table(cols)
    pq.write_table(t.append_column("uid", compute_uid(t.column("url"), t.column("text"))), folder / "part-00000.parquet")
    return folder


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _toml(**sections) -> str:
    """[section] key = value lines from {"section": {"key": value}} (strings quoted, lists as TOML lists)."""
    import json

    out = []
    for section, keys in sections.items():
        out.append(f'["{section}"]' if "@" in section else f"[{section}]")
        out += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(out) + "\n"


def _snapshot(root: Path) -> dict:
    """Every file and folder under root: (size, mtime_ns) — what "writes nothing" compares."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}


def _without_root(snap: dict) -> dict:
    return {k: v for k, v in snap.items() if k != "."}


def _errors(err: str) -> list[str]:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert all(ln.startswith("clipcurate: error: ") for ln in lines), err
    return [ln.removeprefix("clipcurate: error: ") for ln in lines]


def _cli(runs: Path, *argv: str) -> int:
    return cli_main(["--runs-dir", str(runs), *argv])


@pytest.fixture
def setup(tmp_path):
    """A setup where every need of the default recipe is there: a concept list, an eval set, a checkpoint (its
    first bytes are a torch.save zip's: the preflight reads no more), an HQ set. Returns (runs, paths)."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "0.jpg").write_bytes(b"\xff\xd8 an eval image")
    (tmp_path / "model.pt").write_bytes(FAKE_CHECKPOINT)
    _pool(tmp_path / "hqdir")
    paths = {"entries": _write(tmp_path / "entries.txt", "dog\ncat\ngrass\n"), "eval": str(tmp_path / "eval"),
             "checkpoint": str(tmp_path / "model.pt"), "hq": str(tmp_path / "hqdir" / "part-00000.parquet"),
             "tmp": tmp_path}
    return tmp_path / "runs", paths


def _good_sections(paths: dict) -> dict:
    return {"align": {"eval_images": paths["eval"]}, "metaclip": {"entries": paths["entries"]},
            "dfn": {"checkpoint": paths["checkpoint"]}}


def _check(runs: Path, paths: dict, capsys, sections: dict, *extra: str) -> tuple[int, list[str], str]:
    cfg = _write(paths["tmp"] / "check.toml", _toml(**sections))
    code = _cli(runs, "check", "--run", "r", "--config", cfg, *extra)
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), out.err


# ---- (a) a pretrained network missing from the cache: refused before any step folder -----------------------------
def test_a_run_whose_pretrained_network_is_not_in_the_cache_is_refused_before_anything_is_written(
        hf_home, setup, capsys):
    runs, paths = setup
    pool = _pool(paths["tmp"] / "pool")
    sections = _good_sections(paths)
    sections["dfn"] = {"model": "hf-hub:acme/tiny-clip"}
    cfg = _write(paths["tmp"] / "c.toml", _toml(**sections))
    # a new run: `run` (every step but the download) on a pool with images
    code = _cli(runs, "run", "--run", "r", "--input", str(pool), "--config", cfg, "--workers", "0")
    errors = _errors(capsys.readouterr().err)
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("dfn: model hf-hub:acme/tiny-clip is not in the Hugging Face "
                                                     f"cache {hf_home / 'hub'}"), errors
    assert "`clipcurate fetch-model hf-hub:acme/tiny-clip`" in errors[0]
    assert not (runs / "r").exists()  # nothing at all: no config, no lock, no step folder

    # an existing run (started with a stage of its own on the same pool): refused the same way, and nothing in
    # it changes, its config neither (this --config would have changed dfn's section)
    assert _cli(runs, "run", "tests.stages_for_tests:FirstWordStage", "--run", "r", "--input", str(pool),
                "--config", cfg, "--workers", "0") == 0
    capsys.readouterr()
    before = _snapshot(runs / "r")
    over = _write(paths["tmp"] / "over.toml", '[dfn]\nmodel = "hf-hub:acme/tiny-clip"\nkeep_fraction = 0.5\n')
    assert _cli(runs, "run", "--run", "r", "--config", over, "--workers", "0") == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith("dfn: model hf-hub:acme/tiny-clip") and "fetch-model" in errors[0]
    # every file and folder as it was (the folder's own mtime aside: the run's lock, taken before any command's
    # work, leaves it only the trace of its own `.lock`, made and removed)
    assert _without_root(_snapshot(runs / "r")) == _without_root(before)
    assert not [p.name for p in (runs / "r").iterdir() if p.name[:2].isdigit() and not p.name.startswith("90_")]

    # the control: with the model in the cache (the stand-in, published as the hub lays it out) it passes
    from tests.test_models_pretrained import publish

    publish(hf_home)
    assert _cli(runs, "check", "--run", "r") == 0, capsys.readouterr()
    assert "dfn: ok" in capsys.readouterr().out


# ---- (b) a missing dfn checkpoint; several needs at once ---------------------------------------------------------
def test_a_missing_checkpoint_and_concept_list_are_refused_at_once_one_line_each(setup, capsys):
    runs, paths = setup
    pool = _pool(paths["tmp"] / "pool")
    missing = str(paths["tmp"] / "no-such-entries.txt")
    cfg = _write(paths["tmp"] / "c.toml", _toml(metaclip={"entries": missing}))  # dfn: the run's dfn_model/model.pt
    code = _cli(runs, "run", "align,metaclip,klite,dfn,emit", "--run", "r", "--input", str(pool), "--config", cfg,
                "--workers", "0")
    errors = _errors(capsys.readouterr().err)
    assert code == 2 and len(errors) == 2, errors
    assert errors[0].startswith(f"metaclip: concept list {missing} does not exist: set [metaclip] entries"), errors
    default = runs / "r" / "dfn_model" / "model.pt"
    assert errors[1].startswith(f"dfn: checkpoint {default} does not exist"), errors
    assert "`clipcurate dfn-train --hq HQ.parquet --run r`" in errors[1]
    assert 'model = "hf-hub:apple/DFN-public"' in errors[1] and "clipcurate fetch-model" in errors[1]
    assert not (runs / "r").exists()

    # the control: with the list there and the checkpoint where dfn-train writes it, nothing is missing
    _write(Path(missing), "dog\n")
    default.parent.mkdir(parents=True)
    default.write_bytes(FAKE_CHECKPOINT)
    assert _cli(runs, "check", "--run", "r", "--config", cfg, "--input", str(pool)) == 0, capsys.readouterr()


def test_a_checkpoint_that_is_not_one_is_refused_by_the_preflight(setup, capsys):
    runs, paths = setup
    sections = _good_sections(paths)
    sections["dfn"] = {"checkpoint": _write(paths["tmp"] / "notes.pt", "not a model")}
    code, lines, _ = _check(runs, paths, capsys, sections)
    assert code == 2
    assert any(ln.startswith(f"dfn: checkpoint {paths['tmp'] / 'notes.pt'} is not a PyTorch checkpoint") for ln in lines)


# ---- (c) `clipcurate check` ----------------------------------------------------------------------------------
def test_check_on_a_good_setup_says_ok_for_every_step_and_exits_0(setup, capsys):
    runs, paths = setup
    code, lines, err = _check(runs, paths, capsys, _good_sections(paths), "--hq", paths["hq"])
    assert code == 0, (lines, err)
    assert lines == ["runs-dir: ok", "ingest: ok", "align: ok", "metaclip: ok", "klite: ok", "dfn: ok", "emit: ok",
                     "dfn-train: ok"]
    assert not runs.exists()


MISSING = {
    "concept list": (lambda p: {"metaclip": {"entries": str(p["tmp"] / "gone.txt")}}, (),
                     lambda p: f"metaclip: concept list {p['tmp'] / 'gone.txt'} does not exist"),
    "eval set": (lambda p: {"align": {"eval_images": str(p["tmp"] / "no-eval")}}, (),
                 lambda p: f"align: eval set {p['tmp'] / 'no-eval'} ([align] eval_images) does not exist"),
    "empty eval set": (lambda p: {"align": {"eval_images": str(p["tmp"] / "empty-eval")}}, (),
                       lambda p: f"align: eval set {p['tmp'] / 'empty-eval'} ([align] eval_images) is empty"),
    "HQ set": (lambda p: {}, ("--hq", "HQDIR/missing.parquet"),
               lambda p: f"dfn-train: HQ set: training data {p['tmp'] / 'missing.parquet'} does not exist"),
    "HQ set without images": (lambda p: {}, ("--hq", "HQDIR/textonly/part-00000.parquet"),
                              lambda p: f"dfn-train: HQ set: {p['tmp'] / 'textonly' / 'part-00000.parquet'}: training "
                                        "Parquet needs `image`"),
}


@pytest.mark.parametrize("need", list(MISSING))
def test_check_names_each_missing_need_in_its_steps_line_and_exits_2(setup, capsys, need):
    runs, paths = setup
    (paths["tmp"] / "empty-eval").mkdir()
    _pool(paths["tmp"] / "textonly", images=False)
    change, extra, line = MISSING[need]
    sections = {**_good_sections(paths), **change(paths)}
    extra = tuple(a.replace("HQDIR", str(paths["tmp"])) for a in extra)
    code, lines, err = _check(runs, paths, capsys, sections, *extra)
    assert code == 2
    bad = [ln for ln in lines if not ln.endswith(": ok")]
    assert len(bad) == 1 and bad[0].startswith(line(paths)), lines
    assert err.strip() == "clipcurate: error: check: 1 problem (above): the run would be refused until they are fixed"
    assert not runs.exists()


def test_check_asks_an_image_store_of_a_step_that_reads_pixels(setup, capsys):
    """dfn scores images: on a recipe without a download, a text-only --input is refused for it, and for it only
    (align and emit also run on a text-only pool); a pool with image bytes passes; and a pixel step placed before
    the recipe's download (text-first) reads the URL list, which has no images."""
    runs, paths = setup
    text_only, with_images = _pool(paths["tmp"] / "t", images=False), _pool(paths["tmp"] / "i")
    sections = {"run": {"stages": ["align", "dfn", "emit"]}, **_good_sections(paths)}
    code, lines, _ = _check(runs, paths, capsys, sections, "--input", str(text_only))
    assert code == 2
    assert lines == ["runs-dir: ok", "input: ok", "align: ok",
                     f"dfn: it reads pixels, but --input {text_only} holds no images (no image-bytes column, no "
                     "image_ref): give a pool with image bytes (an img2dataset Parquet output, or a run's stage folder)",
                     "emit: ok"], lines
    assert _check(runs, paths, capsys, sections, "--input", str(with_images))[0] == 0
    code, lines, _ = _check(runs, paths, capsys, sections)  # no --input, no store recorded
    assert code == 2 and lines[2].startswith("dfn: it reads pixels, but this run has no image store"), lines

    early = {"run": {"stages": ["dfn@early", "ingest", "align", "emit"]}, "dfn@early": {"checkpoint": paths["checkpoint"]},
             "align": {"eval_images": paths["eval"]}}
    code, lines, _ = _check(runs, paths, capsys, early)
    assert code == 2 and lines[1].startswith("dfn@early: it reads pixels, but comes before ingest in the recipe"), lines
    # the default recipe: the download comes first, so every later step has the store it makes
    assert _check(runs, paths, capsys, _good_sections(paths))[0] == 0


def test_check_and_run_say_when_wordnet_is_missing(setup, capsys, monkeypatch):
    from metadata import wordnet

    runs, paths = setup
    monkeypatch.setattr(wordnet, "WORDNET_SRC", paths["tmp"] / "no-wordnet")
    sections = _good_sections(paths)
    sections["metaclip"] = {}  # WordNet's list
    code, lines, _ = _check(runs, paths, capsys, sections)
    assert code == 2
    bad = [ln for ln in lines if not ln.endswith(": ok")]
    assert [ln.split(":")[0] for ln in bad] == ["metaclip", "klite"], lines
    assert all(f"WordNet is not installed ({paths['tmp'] / 'no-wordnet'}/" in ln and
               "apt-get install -y wordnet-base wordnet-sense-index" in ln for ln in bad), bad


def _make_unwritable(folder: Path):
    """chmod for a user; root ignores permissions, so there the folder is made immutable (chattr +i), when the
    filesystem allows it. Returns the undo, or skips."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root on a filesystem without chattr +i: no folder is unwritable to root")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_an_unwritable_runs_folder_is_refused_and_nothing_is_written(setup, capsys):
    runs, paths = setup
    runs.mkdir()
    undo = _make_unwritable(runs)
    try:
        code, lines, _ = _check(runs, paths, capsys, _good_sections(paths))
        assert code == 2
        assert lines[0].startswith(f"runs-dir: cannot write in {runs} (permission denied): the run folder "
                                   f"{runs / 'r'} cannot be written; give another --runs-dir"), lines
        assert all(ln.endswith(": ok") for ln in lines[1:]), lines
        pool = _pool(paths["tmp"] / "pool")  # `run` is refused too (by the run's lock, which comes first), in one line
        assert _cli(runs, "run", "align", "--run", "r", "--input", str(pool), "--workers", "0") == 2
        errors = _errors(capsys.readouterr().err)
        assert len(errors) == 1 and f"cannot make the run folder {runs / 'r'}" in errors[0], errors
        assert list(runs.iterdir()) == []
    finally:
        undo()


# ---- (d) check writes nothing ----------------------------------------------------------------------------------
def test_check_writes_nothing_in_a_new_or_an_existing_run(setup, capsys):
    runs, paths = setup
    cfg = _write(paths["tmp"] / "good.toml", _toml(**_good_sections(paths)))
    bad = _write(paths["tmp"] / "bad.toml", _toml(metaclip={"entries": str(paths["tmp"] / "gone.txt")}))
    for config, code in ((cfg, 0), (bad, 2)):  # a run that does not exist: not made, nor the runs folder
        assert _cli(runs, "check", "--run", "new", "--config", config) == code
        assert not runs.exists()
    pool = _pool(paths["tmp"] / "pool")
    assert _cli(runs, "run", "tests.stages_for_tests:FirstWordStage", "--run", "r", "--input", str(pool),
                "--config", cfg, "--workers", "0") == 0
    before = _snapshot(runs)
    for config, code in ((None, 0), (bad, 2)):  # its config is not rewritten, no lock is taken
        assert _cli(runs, "check", "--run", "r", *(["--config", config] if config else [])) == code, capsys.readouterr()
        assert _snapshot(runs) == before
    assert "metaclip: concept list" in capsys.readouterr().out


# ---- the other commands that write a run: ingest, dfn-train --------------------------------------------------------
def test_ingest_refuses_a_text_first_recipe_with_a_missing_concept_list_before_the_url_list_is_written(setup, capsys):
    runs, paths = setup
    urls = _write(paths["tmp"] / "urls.csv", "url,caption\nhttp://example.com/1.jpg,a red dog\n")
    cfg = _write(paths["tmp"] / "tf.toml", _toml(run={"stages": ["align@text", "metaclip", "ingest", "align", "emit"]},
                                                 metaclip={"entries": str(paths["tmp"] / "gone.txt")}))
    assert _cli(runs, "ingest", urls, "--run", "tf", "--config", cfg, "--workers", "0") == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(f"metaclip: concept list {paths['tmp'] / 'gone.txt'} does not "
                                                     "exist"), errors
    assert not (runs / "tf").exists()  # no url_list/, no config, no 00_align-text
    assert _cli(runs, "ingest", str(paths["tmp"] / "nope.csv"), "--run", "x", "--workers", "0") == 2
    errors = _errors(capsys.readouterr().err)
    assert errors == [f"ingest: {paths['tmp'] / 'nope.csv'} does not exist: give a URL list (Parquet/CSV/TSV with url "
                      "and caption columns) or an img2dataset output folder"], errors
    assert not (runs / "x").exists()


def test_dfn_train_refuses_a_missing_hq_set_before_anything_is_written(setup, capsys):
    runs, paths = setup
    missing = paths["tmp"] / "hq.parquet"
    assert _cli(runs, "dfn-train", "--run", "r", "--hq", str(missing)) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(f"dfn-train: HQ set: training data {missing} does not exist; "
                                                     "give --hq the high-quality pairs"), errors
    assert not (runs / "r").exists()


def test_the_hub_source_without_open_clip_is_hub_plans():
    """network_problem reads an hf-hub: model's cache without importing open_clip (8-12 s here): the files it
    looks for must be the ones hub.plan names, for as long as open_clip's layout is what it is now."""
    pytest.importorskip("open_clip")
    from trainer import hub, models

    for name in ("hf-hub:apple/DFN-public", "hf-hub:acme/tiny-clip"):
        assert models.hub_source(name) == hub.plan(name)
    assert models.hub_source("hf-hub:not a repo") is None and models.hub_source("ViT-B-32") is None
