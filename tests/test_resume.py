"""Resume by content, not by clock: a second `make demo` (the same CLI calls on a world already written)
trains nothing, scores nothing and evaluates nothing again. The demo world is not rewritten when it is already
there as it would be written; and a data file rewritten with the same bytes (a new mtime) is the same data."""

from __future__ import annotations

import glob
import os
import re
import time
from pathlib import Path

from pipeline.cli import main as cli_main
from trainer.config import TrainConfig
from trainer.train import run_fingerprint


def _demo_calls(world: Path, runs: Path, cfg: Path) -> list[list[str]]:
    """The Makefile's demo target, call for call (a small world, a short training)."""
    common = ["--runs-dir", str(runs)]
    return [
        ["demo-world", str(world), "--n", "240"],
        common + ["ingest", str(world / "urls.parquet"), "--run", "demo", "--config", str(cfg), "--workers", "0"],
        common + ["dfn-train", "--run", "demo", "--hq", str(world / "hq.parquet"), "--resume"],
        common + ["run", "align,metaclip,klite,dfn,emit", "--run", "demo", "--workers", "0"],
        common + ["train", "--run", "demo", "--resume"],
        common + ["report", "--run", "demo"],
    ]


def _stamps(root: Path) -> dict[str, int]:
    """mtime of every file that training, scoring or a stage writes (the report aside: it is redrawn)."""
    # the records of each call are rewritten by design: stage manifests (timings), emit's summary.json (shards
    # written by this call), the saved config (the overlay), the digest caches
    keep = [p for p in glob.glob(str(root / "**" / "*"), recursive=True)
            if os.path.isfile(p) and "/report/" not in p
            and not p.endswith(("_digests.json", "config.toml", "_manifest.json", "emit/summary.json"))]
    return {p: os.stat(p).st_mtime_ns for p in keep}


def test_second_make_demo_trains_and_scores_nothing(tmp_path, capsys, caplog):
    world, runs = tmp_path / "world", tmp_path / "runs"
    cfg = tmp_path / "demo.toml"
    t0 = time.perf_counter()
    assert cli_main(["demo-world", str(world), "--n", "240"]) == 0
    text = (world / "config.toml").read_text()
    text = re.sub(r"steps = \d+", "steps = 6", text)
    text = re.sub(r"save_every = \d+", "save_every = 3", text)
    text = re.sub(r"workers = \d+", "workers = 0", text)
    cfg.write_text(text.replace("batch_size = 64", "batch_size = 16"))
    calls = {}
    for argv in _demo_calls(world, runs, cfg):
        t1 = time.perf_counter()
        assert cli_main(argv) == 0, argv
        calls[argv[0] if argv[0] != "--runs-dir" else argv[2]] = round(time.perf_counter() - t1, 1)
    first = time.perf_counter() - t0
    capsys.readouterr()
    before = _stamps(tmp_path)
    assert any(p.endswith("dfn_model/model.pt") for p in before) and any(p.endswith("train/model.pt") for p in before)

    caplog.clear()
    t0 = time.perf_counter()
    with caplog.at_level("INFO", logger="clipcurate"):
        for argv in _demo_calls(world, runs, cfg):
            assert cli_main(argv) == 0, argv
    second = time.perf_counter() - t0
    out = capsys.readouterr().out
    print(f"first sequence {first:.1f} s {calls}, second {second:.1f} s")
    assert "not rewritten" in out  # the demo world
    assert out.count("nothing to train: already at step 6") == 2  # dfn-train and train
    assert "recorded results" in out and "starting afresh" not in caplog.text
    for stage in ("ingest", "align", "metaclip", "klite", "dfn", "emit"):
        assert re.search(rf"{stage}: \d+ shards up to date, skipped", caplog.text), stage
    after = _stamps(tmp_path)
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, changed  # world, download, shards, models, checkpoints, emitted set, eval results
    assert set(after) == set(before)


def test_training_data_rewritten_with_the_same_bytes_is_the_same_data(tmp_path):
    data = tmp_path / "d.parquet"
    data.write_bytes(b"PAR1 pretend parquet bytes PAR1")
    cfg = TrainConfig()
    digests = str(tmp_path / "digests.json")
    fp = run_fingerprint(cfg, str(data), digests)
    raw = data.read_bytes()
    data.unlink()
    data.write_bytes(raw)  # the same bytes again: a new mtime (a regenerated world)
    os.utime(data, ns=(time.time_ns() + 10**10,) * 2)
    assert run_fingerprint(cfg, str(data), digests) == fp
    data.write_bytes(raw.replace(b"pretend", b"changed"))  # same size, other bytes
    assert run_fingerprint(cfg, str(data), digests) != fp
