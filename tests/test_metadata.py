"""metadata: concept lists (WordNet builder order and cache, loaders, uniqueness, mining, CLI)."""

from __future__ import annotations

import json
import math
import string
import time
from types import SimpleNamespace

import polars as pl
import pytest

from metadata import concepts


class FakeLemma:
    def __init__(self, name):
        self._name = name

    def name(self):
        return self._name


class FakeWordNet:
    """all_synsets(pos) -> synsets with lemmas, as nltk's reader (order per data file)."""

    DATA = {"n": [["dog", "domestic_dog"], ["Gas", "gas"], ["."]], "v": [["dog", "chase"]],
            "a": [["hot"], ["&"]], "r": [["ice_cream"], ["5"]]}

    def all_synsets(self, pos):
        for lemmas in self.DATA[pos]:
            yield SimpleNamespace(lemmas=lambda lemmas=lemmas: [FakeLemma(x) for x in lemmas])


def test_wordnet_builder_order_by_hand():
    got = concepts.build_wordnet_entries(FakeWordNet())
    assert got[:100] == [str(i) for i in range(100)]
    # nouns, verbs, adjectives, adverbs; underscores -> spaces; cased variants kept; punctuation and repeats
    # ("dog" again, "5" among the digits) dropped
    assert got[100:] == ["dog", "domestic dog", "Gas", "gas", "chase", "hot", "ice cream"]


def _wordnet_entries_or_skip() -> list[str]:
    """The WordNet list; a skip that says why only when WordNet's files are not installed (WordNetMissing). Any
    other error is a failure: a broken builder must not read as a missing resource."""
    from metadata.wordnet import WordNetMissing

    try:
        return concepts.wordnet_entries()
    except WordNetMissing as e:
        pytest.skip(f"WordNet is not installed here, nothing to check: {e}")


def test_wordnet_list_cached():
    entries = _wordnet_entries_or_skip()
    assert len(entries) >= 100_000 and len(set(entries)) == len(entries)
    assert entries[:100] == [str(i) for i in range(100)]
    assert entries[100:103] == ["entity", "physical entity", "abstraction"]  # data.noun's first synsets
    assert {"ice cream", "dog", "Einstein", "hot dog"} <= set(entries)
    assert not any("_" in e for e in entries)
    assert not set(string.punctuation) & set(entries)
    assert concepts.wordnet_cache_path().exists()
    t0 = time.perf_counter()
    assert concepts.wordnet_entries() == entries
    assert time.perf_counter() - t0 < 2.0  # from the cache: no nltk reader


def test_load_json_and_lines(tmp_path):
    j = tmp_path / "metadata.json"
    j.write_text(json.dumps(["dog", " spaced ", "Dog", "dog", ""]))
    with pytest.warns(UserWarning, match="1 repeated entries dropped"):
        assert concepts.load_entries(j) == ["dog", " spaced ", "Dog"]  # JSON kept verbatim
    t = tmp_path / "list.txt"
    t.write_text("dog\n  hot dog  \n\nice cream\r\n")
    assert concepts.load_entries(t) == ["dog", "hot dog", "ice cream"]
    with pytest.raises(concepts.ConceptListError):
        concepts.load_entries(tmp_path / "missing.txt")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(concepts.ConceptListError):
        concepts.load_entries(bad)


def test_save_roundtrip_and_sha(tmp_path):
    e = ["a b", "café", "x"]
    concepts.save_entries(e, tmp_path / "e.txt")
    concepts.save_entries(e + ["two\nlines"], tmp_path / "e.json")
    assert concepts.load_entries(tmp_path / "e.txt") == e
    assert concepts.load_entries(tmp_path / "e.json") == e + ["two\nlines"]
    with pytest.raises(concepts.ConceptListError):
        concepts.save_entries(["two\nlines"], tmp_path / "bad.txt")
    assert concepts.entries_sha256(e) != concepts.entries_sha256(list(reversed(e)))
    assert len(concepts.entries_sha256(e)) == 64


def test_mine_ngrams_by_hand():
    texts = ["New York is big.", "New York at night", "a dog in New York", "a dog", "the dog, the cat"]
    got = concepts.mine_ngrams(texts, min_count=3, min_bigram_count=2, min_pmi=1.0)
    rows = {r["entry"]: r for r in got.iter_rows(named=True)}
    # tokens (spacing then split): 5 + 4 + 5 + 2 + 5 = 21; New 3, York 3, dog 3, a 2, the 2, "." 1, "," 1
    assert {e for e, r in rows.items() if r["kind"] == "unigram"} == {"New", "York", "dog"}
    assert rows["New"]["count"] == 3
    # bigrams seen >= 2 times: New York (3), a dog (2); "the dog"/"dog ," once
    assert {e for e, r in rows.items() if r["kind"] == "bigram"} == {"New York", "a dog"}
    assert rows["New York"]["pmi"] == pytest.approx(math.log2(3 * 21 / (3 * 3)))
    assert rows["a dog"]["pmi"] == pytest.approx(math.log2(2 * 21 / (2 * 3)))
    assert got["entry"].to_list()[:3] == ["New", "York", "dog"]  # unigrams first, by count then text
    assert concepts.mine_ngrams(texts, min_count=3, min_bigram_count=3, min_pmi=1.0)["entry"].to_list() == [
        "New", "York", "dog", "New York"]
    assert "New York" not in concepts.mine_ngrams(texts, min_count=3, min_bigram_count=2, min_pmi=2.9)["entry"].to_list()


def test_extend_keeps_base_ids():
    assert concepts.extend(["a", "b"], ["b", "c", "", "c", "d"]) == ["a", "b", "c", "d"]


def test_only_a_missing_wordnet_skips(monkeypatch):
    """The skip helper above: WordNetMissing is a skip with its reason; any other error fails the test."""
    from metadata.wordnet import WordNetMissing

    def missing():
        raise WordNetMissing("WordNet is not installed (/x/data.noun missing)")

    monkeypatch.setattr(concepts, "wordnet_entries", missing)
    with pytest.raises(pytest.skip.Exception, match="data.noun missing"):
        _wordnet_entries_or_skip()
    monkeypatch.setattr(concepts, "wordnet_entries", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _wordnet_entries_or_skip()


def test_cli_mine(tmp_path):
    from pipeline.cli import main

    corpus = tmp_path / "c.parquet"
    pl.DataFrame({"caption": ["New York at night", "New York in rain", "a dog in New York"]}).write_parquet(corpus)
    base = tmp_path / "base.txt"
    base.write_text("dog\nYork\n")
    out = tmp_path / "out.txt"
    table = tmp_path / "mined.csv"
    rc = main(["metadata", "mine", str(corpus), str(out), "--base", str(base), "--min-count", "3",
               "--min-bigram-count", "3", "--min-pmi", "0", "--table", str(table)])
    assert rc == 0
    assert concepts.load_entries(out) == ["dog", "York", "New", "New York"]
    assert pl.read_csv(table).height == 3
    assert main(["metadata", "mine", str(tmp_path / "nope.parquet"), str(out)]) == 2  # one-line error


def test_cli_wordnet(tmp_path):
    from pipeline.cli import main

    entries = _wordnet_entries_or_skip()
    wn_out = tmp_path / "wn.txt"
    assert main(["metadata", "wordnet", str(wn_out)]) == 0
    assert concepts.load_entries(wn_out) == entries
