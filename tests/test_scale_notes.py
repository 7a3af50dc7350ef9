"""Web-scale defaults on a small pool say so before the run (issue "Your own crawl's first hour", item 2): MetaCLIP's
t = 20,000 caps no entry of a pool of a few thousand rows, and dfn's keep share is the raw-web-pool setting. The
lines come before any work, and metaclip's funnel names the largest count when balancing did nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli import main as cli_main
from stages.dfn import DfnStage
from stages.metaclip import MetaClipStage
from stages.metaclip.balance import largest_over_t


def _pool(folder: Path, n: int = 240) -> Path:
    """Captions naming `dog` (2 of 3 rows) or `cat`: the largest entry count is that of `dog`, 160."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"url": f"http://example.com/{i}.jpg", "text": f"a {'dog' if i % 3 else 'cat'} number {i} sits"}
            for i in range(n)]
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(rows[k::2]), folder / f"part-{k:05d}.parquet")
    return folder


def _entries(tmp_path: Path) -> Path:
    p = tmp_path / "entries.txt"
    p.write_text("dog\ncat\n")
    return p


def test_largest_over_t_hand_cases():
    counts = {"": np.array([0, 160, 80])}
    assert largest_over_t(counts, {"": 200}) == (160, False)
    assert largest_over_t(counts, {"": 160}) == (160, False)  # kept when count <= t: MetaCLIP's rule
    assert largest_over_t(counts, {"": 159}) == (160, True)
    # one t for several languages: the summed counts decide (as match_probs uses them)
    langs = {"en": np.array([0, 100, 10]), "de": np.array([0, 70, 10])}
    assert largest_over_t(langs, {"": 150}) == (170, True)
    # a t per language: each language's counts against its own t
    assert largest_over_t(langs, {"en": 100, "de": 70}) == (100, False)
    assert largest_over_t(langs, {"en": 100, "de": 69}) == (100, True)
    assert largest_over_t({}, {"": 5}) == (0, False)


def test_metaclip_scale_note_only_when_t_exceeds_the_pool():
    assert MetaClipStage({"t": 20000}).scale_notes(500) == [
        "t = 20000 caps no entry of this pool: it has 500 rows, fewer than t (MetaCLIP's t is for 400M pairs); "
        "set [metaclip] target_rows (the rows to keep) or a smaller t"]
    assert MetaClipStage({"t": 20000}).scale_notes(20000) == []
    assert MetaClipStage({"t": 20000, "target_rows": 100}).scale_notes(500) == []
    assert MetaClipStage({"t": 20000, "tail_share": 0.1}).scale_notes(500) == []


def test_dfn_scale_note_only_for_the_default_keep_share():
    assert DfnStage().scale_notes(500) == [
        "keeps 30% of the scored pairs (keep_fraction's default: the DFN/DataComp setting for raw web pools; a pool "
        "curated before dfn may want a larger share, or a threshold)"]
    assert DfnStage({"keep_fraction": 0.5}).scale_notes(500) == []
    assert DfnStage({"threshold": 0.2}).scale_notes(500) == []
    assert DfnStage({"score_only": True}).scale_notes(500) == []


def test_run_says_it_before_the_work_and_the_funnel_names_the_largest_count(tmp_path, capsys):
    pool, runs = _pool(tmp_path / "pool"), tmp_path / "runs"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[metaclip]\nentries = "{_entries(tmp_path)}"\n')
    base = ["--runs-dir", str(runs), "run", "metaclip", "--run", "r", "--input", str(pool), "--workers", "0",
            "--config", str(cfg)]
    assert cli_main(base) == 0
    out = capsys.readouterr().out.splitlines()
    before = "metaclip: t = 20000 caps no entry of this pool: it has 240 rows, fewer than t"
    at = [i for i, line in enumerate(out) if line.startswith(before)]
    funnel = [i for i, line in enumerate(out) if line.strip().startswith("metaclip:") and " in " in line]
    assert len(at) == 1 and funnel and at[0] < funnel[0], out
    assert ("note: t = 20000 caps no entry of this pool (largest count 160): every matched pair is kept; set "
            "[metaclip] target_rows (the rows to keep) or a smaller t") in [line.strip() for line in out]
    kept = sum(pq.read_metadata(f).num_rows for f in (runs / "r").glob("[0-9][0-9]_metaclip/part-*.parquet"))
    assert kept == 240  # nothing was capped: the note is true

    # a t the pool reaches: neither line, and balancing caps `dog`
    small = tmp_path / "t100.toml"
    small.write_text("[metaclip]\nt = 100\n")
    assert cli_main(["--runs-dir", str(runs), "run", "metaclip", "--run", "r", "--workers", "0",
                     "--config", str(small)]) == 0
    out = capsys.readouterr().out
    assert "caps no entry" not in out
    kept = sum(pq.read_metadata(f).num_rows for f in (runs / "r").glob("[0-9][0-9]_metaclip/part-*.parquet"))
    assert kept < 240


def test_emit_scale_note_only_for_the_default_shard_size_on_a_pool_of_one_shard():
    from stages.emit import EmitStage

    assert EmitStage().scale_notes(3000) == [
        "samples_per_shard = 10000 writes this pool (3000 rows at most) as one shard; open_clip_train's WebDataset "
        "loader wants a shard per data-loader worker: set [emit] samples_per_shard"]
    assert EmitStage().scale_notes(10001) == []
    assert EmitStage({"samples_per_shard": 500}).scale_notes(3000) == []
