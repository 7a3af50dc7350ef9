"""klite's `matches` (morphy alone, with each match's head position) and the skip study of
bench/bench_klite_pos.py (can a rule learned from spaCy's tags skip the tagger?): its scoring of a rule, on hand
pools with a stand-in tagger, so the study's figures mean what its docstring says."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import polars as pl
import pytest

from stages.klite import KLiteStage
from tests.test_klite import needs_wordnet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """bench/bench_klite_pos.py as a module; its thread settings (set at import for its own process) undone."""
    env = dict(os.environ)
    spec = importlib.util.spec_from_file_location("bench_klite_pos", ROOT / "bench" / "bench_klite_pos.py")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    finally:
        os.environ.clear()
        os.environ.update(env)
    return mod


@pytest.fixture(scope="module")
def stage():
    return KLiteStage({"pos_tagger": "none"}).ensure_ready()


NOT_NOUNS = {"running", "fast", "wears", "playing", "golden", "runs"}


def fake_tag(token_lists):
    """Stands in for spaCy: every token a noun except NOT_NOUNS."""
    return [[w.lower() not in NOT_NOUNS for w in ws] for ws in token_lists]


def named(stage, m: pl.DataFrame) -> set[tuple]:
    c = m.join(stage._lemmas.select("lemma_id", "concept"), on="lemma_id")
    return set(zip(c["row"].to_list(), c["concept"].to_list(), c["last"].to_list()))


@needs_wordnet
def test_matches_give_each_match_its_head_position(stage):
    toks, m = stage.matches(pl.Series("text", ["golden retrievers playing", None, "a man wears a hat"], dtype=pl.String))
    assert toks.to_list()[0] == ["golden", "retrievers", "playing"] and toks.to_list()[1] is None
    got = named(stage, m)
    # exploded order: golden 0, retrievers 1, playing 2, a 3, man 4, wears 5, a 6, hat 7
    assert {(0, "golden retriever", 1), (0, "retriever", 1), (2, "man", 4), (2, "hat", 7)} <= got
    assert all(last in (0, 1, 2) for row, _, last in got if row == 0)
    assert any(last == 5 for row, _, last in got if row == 2)  # "wears" matches a noun lemma by morphy alone
    assert not any(row == 1 for row, _, _ in got)


def _frames(bench, stage, texts):
    d, m = bench.study_tokens(stage, fake_tag, pl.Series("text", texts, dtype=pl.String))
    ref = bench._choice(m.join(d.select(last="pos", noun="noun"), on="last"), stage, pl.col("noun"))
    return d, m, ref


@needs_wordnet
def test_study_scores_a_rule_end_to_end(bench, stage):
    texts = ["a man wears a hat", "a man with a hat", "a hat", "the of and"]
    d, m, ref = _frames(bench, stage, texts)
    assert d.filter(pl.col("tok") == "wears")["noun"].to_list() == [False]
    heads = d.filter("head")
    exact = heads.select("pos", dec="noun")
    none = heads.select("pos", dec=pl.lit(None, pl.Boolean))
    r = bench.evaluate_rule(d, m, exact, stage, ref, len(texts))
    assert r == {"caption": {"share_tagged": 0.0, "agreement": 1.0}, "walk": {"share_tagged": 0.0, "agreement": 1.0}}
    r = bench.evaluate_rule(d, m, none, stage, ref, len(texts))
    assert r["caption"] == {"share_tagged": 0.75, "agreement": 1.0}  # 3 of 4 captions have a match: all tagged
    assert r["walk"] == {"share_tagged": 0.75, "agreement": 1.0}
    # one wrong decision: "wears" called a noun; wear (count 1) then beats man (count 2) in caption 0
    wrong = exact.with_columns(dec=pl.when(pl.col("pos").is_in(d.filter(pl.col("tok") == "wears")["pos"].implode()))
                               .then(True).otherwise(pl.col("dec")))
    r = bench.evaluate_rule(d, m, wrong, stage, ref, len(texts))
    assert r["caption"] == {"share_tagged": 0.0, "agreement": 0.75}
    assert r["walk"]["agreement"] == 0.75


@needs_wordnet
def test_study_walk_tags_only_what_the_choice_reads(bench, stage):
    """The walk stops at the first decided noun in choice order: an undecided head after it costs nothing."""
    texts = ["a man wears a hat", "a man with a hat", "a hat"]
    d, m, ref = _frames(bench, stage, texts)
    heads = d.filter("head")
    # man (count 2) comes before hat (3) in caption 0: leave hat undecided there
    hat0 = d.filter((pl.col("tok") == "hat") & (pl.col("row") == 0))["pos"].implode()
    dec = heads.select("pos", dec=pl.when(pl.col("pos").is_in(hat0)).then(None).otherwise(pl.col("noun")))
    r = bench.evaluate_rule(d, m, dec, stage, ref, len(texts))
    assert r["walk"] == {"share_tagged": 0.0, "agreement": 1.0}
    assert r["caption"] == {"share_tagged": round(1 / 3, 4), "agreement": 1.0}  # the pool counts read hat's flag


@needs_wordnet
def test_classifier_fits_the_tags_deterministically(bench, stage):
    texts = ["a man running fast", "a dog running fast", "a man wears a hat", "a hat", "fast food"] * 3
    d, m, _ = _frames(bench, stage, texts)
    f = bench.study_features(d)
    assert f["pos"].n_unique() == d["head"].sum() and f.filter(pl.col("feat") == "b").height == d["head"].sum()
    w1, w2 = bench.fit_classifier(f, d), bench.fit_classifier(f, d)
    assert w1.equals(w2)
    s = bench.classifier_scores(d, w1).join(d.select("pos", "tok", "noun"), on="pos")
    assert ((s["score"] > 0) == s["noun"]).all()
