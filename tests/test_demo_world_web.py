"""The web-noise demo world (issue #16: `make_world(..., noise="web")`, `clipcurate demo-world --noise web`), and
the default world it must leave byte for byte as it was."""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from pathlib import Path

import PIL
import polars as pl
import pyarrow as pa
import pytest

from pipeline.cli import main as cli_main
from tests.test_demo_world import _digest  # the one file-digest walk of a world
from demo.world import (KINDS, SHAPES, SHARES, WEB_ONLY_KINDS, WEB_SHARES, _generator_key, _up_to_date,
                                 demo_config, kind_counts, make_world)

WEB_N, SEED = 600, 0

# ---- the default world before the web mode existed ---------------------------------------------------------
# Recorded from pipeline/demo_world.py at commit c4ee857 (the module before this change) with make_world(out,
# n=300, seed=0), under the encoders below (JPEG and Parquet bytes depend on their versions).
RECORDED_WITH = {"pillow": "12.3.0", "pyarrow": "25.0.1"}
DEFAULT_300_ROWS = 300
DEFAULT_300_COUNTS = {"clean": 165, "boilerplate": 15, "many_texts": 25, "mismatched": 24, "exact_duplicate": 9,
                      "near_duplicate": 9, "too_short": 9, "too_long": 8, "rare_token": 3, "small_image": 9,
                      "odd_aspect": 6, "non_english": 3, "eval_copy": 6, "http_404": 6, "not_image": 3}
DEFAULT_300_FILES = 267  # files in the world, world.json and config.toml aside
# sha256 over the "path digest" lines of every one of them, sorted by path
DEFAULT_300_ALL = "e3a2e53ffe1021927e815e27d0f4bab461abba2b4f17b01f9f071bdbdc484bf7"
DEFAULT_300_DIGESTS = {  # every file but the served images, one by one
    "eval/classification.parquet": "396782fea86fca0c36bf0e5d8361db018696b83524f486e14a48f0d4dedb01e5",
    "eval/classnames.txt": "3d0647ef57e63a4a5f53e1d303bdc58ef4b7a2b62c905d4a4b97a6e04c3a442e",
    "eval/colours.parquet": "c80575e14ac765ea00edd3ed52bed86eb1bc93dce6e64ca12272f85f1db742cf",
    "eval/retrieval.parquet": "576679e98dc7f5b877da8af5978acfb1d6a75e29e6c108f4649da475bd0a0c6a",
    "hq.parquet": "05214a0278f4a0c4c0812c2a21ec513fc9fe4ad65fa63485b3e69172576bcb47",
    "truth.parquet": "3141f8dba11f8d8a509a34aab8c74db98336974636f8352e5e79881ee118c8be",
    "urls.parquet": "4fcf746af5d31fd0fa689293cb009de361d6ff032b8048a4f773362b9f78d8a1",
}
# demo_config(300, Path("/w/eval/classification.parquet")) as the old module wrote it
DEFAULT_300_CONFIG = """# Demo config, written by `clipcurate demo-world` for a pool of 300 URL rows.
# The papers' thresholds assume web-scale pools; here they are scaled to the pool (DESIGN.md, "Small pools").
[run]
seed = 0

[ingest]
shard_size = 100   # 3 shards, so the stages have several to spread over workers
processes = 2
threads = 16
allow_private_hosts = ["demo.clipcurate.invalid:80"]   # the world is served on loopback: the one internal server to fetch from

[align]
max_texts_per_image = 20   # ALIGN: 1,000 at 1.8B pairs
max_images_per_text = 10   # ALIGN's value works here too: boilerplate repeats far more often
eval_images = "/w/eval/classification.parquet"

[metaclip]
t = 10   # MetaCLIP: 20,000 at 400M pairs; here n/100, about the 25th percentile of the demo's entry counts

[dfn]
keep_fraction = 0.8   # the pool is already curated twice by here; DFN papers keep 10-30% of raw pools

[emit]
samples_per_shard = 1000

[train]
steps = 300        # the tiny model (64 px ViT) on CPU: ~3 steps/s at batch 64 on 2 cores
batch_size = 64
workers = 1
save_every = 100
log_every = 10
eval_sets = ["/w/eval/classification.parquet", "/w/eval/colours.parquet",
             "/w/eval/retrieval.parquet"]
"""


def _combined(digests: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(digests.items())).encode()).hexdigest()


@pytest.fixture(scope="module")
def default_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    return out, make_world(out, n=300, seed=SEED)


@pytest.fixture(scope="module")
def web_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("web")
    return out, make_world(out, n=WEB_N, seed=SEED, noise="web")


# ---- the default world is what it was ------------------------------------------------------------------------
def test_default_world_is_byte_for_byte_what_it_was(default_world):
    out, summary = default_world
    assert summary["noise"] == "default" and summary["rows"] == DEFAULT_300_ROWS
    assert {k: v for k, v in summary["counts"].items() if k not in WEB_ONLY_KINDS} == DEFAULT_300_COUNTS
    assert all(summary["counts"][k] == 0 for k in WEB_ONLY_KINDS)
    got = _digest(out)
    got.pop("world.json"), got.pop("config.toml")
    for name in ("config-text-first.toml", "config-balance-last.toml", "config-semdedup.toml"):
        got.pop(name)  # the other recipes' configs
    assert len(got) == DEFAULT_300_FILES and got == summary["files"]
    if (PIL.__version__, pa.__version__) != (RECORDED_WITH["pillow"], RECORDED_WITH["pyarrow"]):
        pytest.skip(f"digests recorded with Pillow {RECORDED_WITH['pillow']}, pyarrow {RECORDED_WITH['pyarrow']}")
    assert {k: got[k] for k in DEFAULT_300_DIGESTS} == DEFAULT_300_DIGESTS
    assert _combined(got) == DEFAULT_300_ALL


def test_digests_were_recorded_with_the_locked_encoders():
    """The byte-for-byte checks above (and test_world_semantic's) skip under other Pillow or pyarrow versions:
    `make setup` installs requirements.lock, so they run only while the lock pins the versions they were recorded
    with. A lock bump must re-record them, not turn them into a skip in every `make test`."""
    lock = (Path(__file__).resolve().parents[1] / "requirements.lock").read_text()
    pins = dict(re.findall(r"^(pillow|pyarrow)==([^\s;#]+)", lock, re.M | re.I))
    assert {k.lower(): v for k, v in pins.items()} == RECORDED_WITH


def test_default_config_text_is_unchanged(default_world):
    assert demo_config(300, Path("/w/eval/classification.parquet")) == DEFAULT_300_CONFIG
    out, summary = default_world
    assert (out / "config.toml").read_text() == demo_config(summary["rows"], (out / "eval" / "classification.parquet")
                                                            .resolve())


# ---- the web world ---------------------------------------------------------------------------------------------
def test_web_shares_match_the_composition_table(web_world):
    out, summary = web_world
    truth = pl.read_parquet(out / "truth.parquet")
    counts = {k: truth.filter(pl.col("kind") == k).height for k in KINDS}
    assert summary["noise"] == "web" and summary["counts"] == counts
    want = kind_counts(WEB_N, "web")
    for kind, share in WEB_SHARES.items():
        assert counts[kind] == want[kind], kind  # round(n * share): the table within rounding
        assert abs(counts[kind] / WEB_N - share) <= 0.5 / WEB_N + 1e-12, kind
    assert counts["many_texts"] == want["many_texts"]
    # clean is the rest (less a clean alt-text that happened to repeat its image's other one, if any)
    assert want["clean"] - 2 <= counts["clean"] <= want["clean"]
    assert sum(WEB_SHARES.values()) < 1 and set(WEB_SHARES) | {"clean", "many_texts"} == set(KINDS)


def test_truth_labels_every_row_with_a_known_kind(web_world, default_world):
    for out, _ in (web_world, default_world):
        truth = pl.read_parquet(out / "truth.parquet")
        assert truth["kind"].null_count() == 0 and set(truth["kind"].unique()) <= set(KINDS)
        assert truth.select("url", "caption").equals(pl.read_parquet(out / "urls.parquet"))
    assert set(pl.read_parquet(web_world[0] / "truth.parquet")["kind"].unique()) == set(KINDS)
    assert set(pl.read_parquet(default_world[0] / "truth.parquet")["kind"].unique()) == set(KINDS) - set(WEB_ONLY_KINDS)


def test_most_web_rows_are_weak_or_mismatched(web_world):
    out, _ = web_world
    kinds = pl.read_parquet(out / "truth.parquet")["kind"]
    assert kinds.is_in(["weak", "mismatched"]).mean() > 0.5
    # and what a good curation keeps is in the papers' 10-30% band (DataComp-1B 11%, DFN-2B 15.6%)
    assert 0.08 <= (kinds == "clean").mean() <= 0.30


def test_weak_captions_are_true_but_say_little_and_are_each_worded_afresh(web_world):
    out, _ = web_world
    weak = pl.read_parquet(out / "truth.parquet").filter(pl.col("kind") == "weak")
    plurals = {s + "s" for s in SHAPES} | {s + "es" for s in SHAPES}
    for cap, shape in zip(weak["caption"], weak["shape"]):
        words = set(re.findall(r"[a-z]+", cap.lower()))
        assert not words & (set(SHAPES) | plurals), cap  # never says what the picture is of
        assert 3 <= len(cap.split()) <= 20, cap  # align's word-count rules pass it
    # boilerplate rules (> 10 images per alt-text) cannot catch them: no caption repeats
    assert weak["caption"].n_unique() == weak.height
    assert weak["url"].n_unique() == weak.height  # one image each
    assert len(set(weak["caption"]) & set(pl.read_parquet(out / "truth.parquet").filter(
        pl.col("kind") != "weak")["caption"])) == 0


def test_web_concepts_have_a_steeper_head(web_world, default_world):
    def head_share(out):
        t = pl.read_parquet(out / "truth.parquet").filter(pl.col("kind").is_in(["clean", "weak", "mismatched"]))
        return (t["shape"] == SHAPES[0]).mean()

    assert head_share(web_world[0]) > head_share(default_world[0]) + 0.05


def test_eval_and_hq_sets_are_the_default_worlds(web_world, default_world):
    """Drawn before anything the noise mode changes: the same bytes for the same seed (HQ: same size too,
    max(300, n // 3) rows, 300 for both n here)."""
    web, dflt = _digest(web_world[0]), _digest(default_world[0])
    held_out = [k for k in dflt if k.startswith("eval" + os.sep) or k == "hq.parquet"]
    assert len(held_out) == 5
    assert {k: web[k] for k in held_out} == {k: dflt[k] for k in held_out}
    pool = set(pl.read_parquet(web_world[0] / "urls.parquet")["url"])
    assert not pool & set(pl.read_parquet(web_world[0] / "hq.parquet")["url"])


def test_web_world_is_deterministic_and_seeded(web_world, tmp_path):
    out, summary = web_world
    again = make_world(tmp_path / "again", n=WEB_N, seed=SEED, noise="web")
    a, b = _digest(out), _digest(tmp_path / "again")
    for name in ("config.toml", "config-text-first.toml", "config-balance-last.toml", "config-semdedup.toml"):
        assert a.pop(name) and b.pop(name)  # each holds the world's absolute eval path
    assert a.pop("world.json") and b.pop("world.json")
    assert a == b and again["files"] == summary["files"] and again["counts"] == summary["counts"]
    # a second call on the same folder leaves it untouched; asked for a default world, it would rewrite it
    assert make_world(tmp_path / "again", n=WEB_N, seed=SEED, noise="web").get("unchanged")
    assert _up_to_date(tmp_path / "again", _generator_key(WEB_N, SEED, "web")) is not None
    assert _up_to_date(tmp_path / "again", _generator_key(WEB_N, SEED, "default")) is None


def test_web_config_asks_dfn_for_the_papers_share(web_world):
    out, summary = web_world
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["dfn"]["keep_fraction"] == 0.3
    path = Path("/w/eval/classification.parquet")
    web_text, default_text = demo_config(300, path, "web"), demo_config(300, path)
    diff = [(a, b) for a, b in zip(web_text.splitlines(), default_text.splitlines()) if a != b]
    assert len(diff) == 1 and diff[0][0].startswith("keep_fraction = 0.3")


def test_bad_noise_and_too_small_web_world_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="noise must be one of default, web"):
        make_world(tmp_path / "w", n=600, noise="bogus")
    with pytest.raises(ValueError, match="n >= 500"):
        make_world(tmp_path / "w", n=300, noise="web")
    with pytest.raises(ValueError, match="noise must be one of"):
        demo_config(300, tmp_path, "bogus")


@pytest.mark.parametrize("argv, needle", [
    (["--noise", "bogus"], "argument --noise: invalid choice: 'bogus' (choose from"),
    (["--noise", "web", "--n", "300"], "give at least 500"),
])
def test_cli_noise_mistakes_are_one_line(tmp_path, capsys, argv, needle):
    try:
        code = cli_main(["demo-world", str(tmp_path / "w")] + argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and needle in lines[0], err
    assert not (tmp_path / "w").exists()


def test_cli_help_documents_noise(capsys):
    with pytest.raises(SystemExit):
        cli_main(["demo-world", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--noise {default,web}" in out and "as noisy as a raw crawl" in out


def test_cli_writes_a_web_world(tmp_path, capsys):
    assert cli_main(["demo-world", str(tmp_path / "w"), "--n", "500", "--noise", "web"]) == 0
    out = capsys.readouterr().out
    assert "(noise: web)" in out and re.search(r"^\s+weak: \d+$", out, re.M)
    assert tomllib.loads((tmp_path / "w" / "config.toml").read_text())["dfn"]["keep_fraction"] == 0.3


def test_shares_tables_are_what_the_docstring_says():
    import demo.composition as dw

    doc = dw.__doc__
    for kind, share in WEB_SHARES.items():
        row = re.search(rf"^\s+{kind}\s+([0-9.]+)\s", doc, re.M)
        assert row and float(row.group(1)) == share, kind
    assert sum(SHARES.values()) < sum(WEB_SHARES.values())
