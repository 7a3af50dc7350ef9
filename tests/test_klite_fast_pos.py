"""klite's fast part-of-speech path ("auto"/"spacy") against the reference (`pos_tagger = "every"`, every caption
through `nlp.pipe`): the same candidates on real captions, the tagged answers on the hand cases, only the
captions with a matched n-gram tagged, each distinct token list tagged once, and shard/worker invariance."""

from __future__ import annotations


import polars as pl
import pyarrow as pa
import pytest

from pipeline import config as config_mod
from pipeline import errors
from pipeline.config import ConfigError
from pipeline.runner import run_pipeline
from pipeline.schema import compute_uid
from stages import klite as klite_mod
from stages.klite import KLiteStage
from stages.klite import tagger as tagger_mod
# one pool writer and reader, one set of skip marks, for both modules
from tests.test_klite import (SHARED_DATA, _read_run, _write_pool, needs_data, needs_tagger,
                              needs_wordnet)

HAND = [
    "running fast", "a man running fast", "a man wears a hat", "golden retrievers playing", "fast food",
    "A dog runs", "a dog runs", "A dog runs", "", None, "!!! ???", "the of and", "123 456",
    "Getting Ready http://www.example.com/gallery/photo/41206", "Kittens Outdoors in Natural Light Stock Photos",
    "İSTANBUL’S Bridge at night", "A man's T-Shirt,", "The child plays with a dog's bowl",
]


@pytest.fixture(scope="module")
def every():
    return KLiteStage({"pos_tagger": "every"}).ensure_ready()


@pytest.fixture(scope="module")
def fast():
    return KLiteStage({"pos_tagger": "spacy"}).ensure_ready()


def table_of(texts) -> pa.Table:
    urls = [f"http://example.invalid/{i}.jpg" for i in range(len(texts))]
    return pa.table({"uid": compute_uid(urls, [t or "" for t in texts]), "url": urls, "text": pa.array(texts, pa.string())})


def outputs(stage, texts) -> list[tuple]:
    stats = stage.merge([stage.collect(table_of(texts))])
    kept, _ = stage.apply(table_of(texts), stats)
    return list(zip(kept.column("klite_concept").to_pylist(), kept.column("text_klite").to_pylist()))


def cands(stage, texts) -> pl.DataFrame:
    return stage.candidates(pl.Series("text", texts, dtype=pl.String)).sort(["row", "lemma_id"])


def concepts(stage, texts) -> list[set[str]]:
    c = cands(stage, texts).join(stage._lemmas.select("lemma_id", "concept"), on="lemma_id")
    return [set(c.filter(pl.col("row") == i)["concept"].to_list()) for i in range(len(texts))]


# ---- the hand cases: the tag still changes the choice ----------------------------------------------
@needs_wordnet
@needs_tagger
def test_hand_cases_get_the_tagged_answer(every, fast):
    texts = HAND[:5]
    want = [set(), {"man"}, {"man", "hat"}, {"golden retriever", "retriever"}, {"fast food", "food"}]
    assert concepts(fast, texts) == want  # running/VBG fast/RB, wears/VBZ, golden/JJ, fast/JJ food/NN
    assert concepts(every, texts) == want
    assert outputs(fast, ["running fast"]) == [(None, "running fast")]
    assert outputs(fast, HAND) == outputs(every, HAND)
    assert cands(fast, HAND).equals(cands(every, HAND))


# ---- real captions: 100% agreement (candidates, hence pool counts and choices) ----------------------
def _real_texts() -> list[str]:
    f = pl.read_parquet(SHARED_DATA / "flickr8k_captions" / "flickr8k_captions.parquet")["caption"]
    l_ = pl.read_parquet(SHARED_DATA / "laion_sample_10k" / "laion_sample_10k.parquet")["text"].cast(pl.String)
    return f.sample(1500, seed=7).to_list() + l_.sample(1500, seed=7).to_list() + l_.head(200).to_list()


@needs_data
@needs_wordnet
@needs_tagger
def test_agrees_with_every_on_real_captions(every, fast):
    texts = _real_texts()
    assert len(texts) == 3200  # never quietly a smaller corpus
    a, b = cands(every, texts), cands(fast, texts)
    assert len(a) > 3 * len(texts)
    assert a.equals(b)  # the same candidates: the same pool counts, the same choice (the rest is shared code)


# ---- what the fast path skips -------------------------------------------------------------------------
@needs_wordnet
@needs_tagger
def test_only_captions_with_a_match_are_tagged(fast, monkeypatch):
    seen = []
    real = fast._tagger
    monkeypatch.setattr(fast, "_tagger", lambda lists: seen.extend(lists) or real(lists))
    texts = ["the of and", "A dog runs", "", None, "123 456", "!!!", "a hat"]
    assert [c for c in concepts(fast, texts)] == [set(), {"dog"}, set(), set(), set(), set(), {"hat"}]
    assert seen == [["A", "dog", "runs"], ["a", "hat"]]
    seen.clear()
    assert fast.candidates(pl.Series("text", ["of the", None], dtype=pl.String)).is_empty()
    assert seen == []  # no match anywhere: the tagger is not called


class _FakeTok:
    def __init__(self, i):
        self.tag_ = ("NN", "VBZ")[i % 2]


class _FakeNlp:
    """Stands in for spaCy: records the documents `pipe` gets, tags token i as NN (even i) or VBZ (odd i)."""

    vocab = None

    def __init__(self, log):
        self.log, self.model = log, self

    def get_pipe(self, name):
        return self

    def walk(self):
        return []

    def pipe(self, docs, batch_size):
        docs = list(docs)
        self.log.append([tuple(d) for d in docs])
        return [[_FakeTok(i) for i in range(len(d))] for d in docs]


def test_fast_tagger_tags_each_distinct_token_list_once():
    log = []
    tag = tagger_mod._fast_tagger(_FakeNlp(log), lambda vocab, words: words)
    lists = [["a", "dog"], ["b"], ["a", "dog"], [], None, ["c", "d", "e"], ["b"]]
    got = tag(lists)
    assert got == [[True, False], [True], [True, False], [], [], [True, False, True], [True]]
    assert log == [[("a", "dog"), ("b",), (), ("c", "d", "e")]]  # each distinct list once, in first-seen order


# ---- config --------------------------------------------------------------------------------------------
def test_every_mode_config_and_fingerprint(monkeypatch):
    with pytest.raises(ConfigError, match=r"must be auto, spacy, every or none"):
        KLiteStage({"pos_tagger": "all"}).ensure_ready()
    assert KLiteStage({"pos_tagger": "every"}).fingerprint_parts()["tagger"] == \
        KLiteStage({"pos_tagger": "spacy"}).fingerprint_parts()["tagger"]  # same tags: same output
    monkeypatch.setattr(tagger_mod, "_installed_model", lambda: None)
    monkeypatch.setattr(tagger_mod, "_TAGGERS", {})
    with pytest.raises(errors.StageError, match=r'pos_tagger = "every" but no spaCy English model'):
        klite_mod.load_tagger("every")


# ---- through the runner: every on one shard == the fast path on four shards and two workers -------------


@needs_wordnet
@needs_tagger
def test_fast_path_is_invariant_to_shards_and_workers_and_equals_every(tmp_path):
    if SHARED_DATA.exists():
        texts = pl.read_parquet(SHARED_DATA / "flickr8k_captions" / "flickr8k_captions.parquet")["caption"].tail(1200).to_list()
    else:
        texts = [HAND[i % 5] + f" near the dog #{i}" for i in range(1200)]
    texts += HAND[:8] * 3  # repeated captions across shards
    _write_pool(tmp_path / "one", texts, 1)
    _write_pool(tmp_path / "four", texts, 4)
    ref = config_mod.resolve({"klite": {"pos_tagger": "every", "hypernyms": True}})
    cfg = config_mod.resolve({"klite": {"hypernyms": True}})
    run_pipeline(["klite"], str(tmp_path / "every"), ref, input_dir=str(tmp_path / "one"), workers=0)
    run_pipeline(["klite"], str(tmp_path / "f1"), cfg, input_dir=str(tmp_path / "one"), workers=0)
    run_pipeline(["klite"], str(tmp_path / "f4w"), cfg, input_dir=str(tmp_path / "four"), workers=2)
    a, b, c = (_read_run(tmp_path / r) for r in ("every", "f1", "f4w"))
    assert a.num_rows == len(texts)
    assert a.equals(b) and b.equals(c)
    assert a.column("klite_concept").null_count < len(texts) // 5
