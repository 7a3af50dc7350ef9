"""metaclip's benchmark contenders (bench/contender_matchers.py: pyahocorasick's automaton and polars'
`extract_many`) give the entry-id sets of MetaCLIP's reference, and so of the stage's token-trie matcher, on the
same cases as tests/test_metaclip.py. bench/bench_metaclip.py times them against the same reference; these tests
keep its comparison honest. The pyahocorasick contender is skipped when the package is absent (it is in the
`test` extra only)."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings

from bench.contender_matchers import CONTENDERS
from stages.metaclip import Matcher
from tests.test_metaclip import (HAND_ENTRIES, PUNCT_ENTRIES, RANDOM_ENTRIES, RANDOM_TEXTS, check_hand_cases,
                                 check_parity, check_punctuation_unicode_and_nested_entries,
                                 check_slices_chunks_nulls_and_empty_columns, needs_data, ref_match,
                                 wordnet_parity_set)

try:
    import ahocorasick  # noqa: F401

    _NO_AHOCORASICK = False
except ImportError:
    _NO_AHOCORASICK = True
NAMES = [pytest.param(name, marks=pytest.mark.skipif(name == "pyahocorasick" and _NO_AHOCORASICK,
                                                      reason="pyahocorasick is not installed (the test extra)"))
         for name in CONTENDERS]


@pytest.mark.parametrize("name", NAMES)
def test_hand_cases(name):
    check_hand_cases(CONTENDERS[name](HAND_ENTRIES))


@pytest.mark.parametrize("name", NAMES)
def test_punctuation_unicode_and_nested_entries_match_the_reference(name):
    check_punctuation_unicode_and_nested_entries(CONTENDERS[name](PUNCT_ENTRIES))


@pytest.mark.parametrize("name", NAMES)
def test_slices_chunks_nulls_and_empty_columns_match_the_reference(name):
    check_slices_chunks_nulls_and_empty_columns(CONTENDERS[name](PUNCT_ENTRIES))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=RANDOM_ENTRIES, texts=RANDOM_TEXTS)
def test_every_contender_equals_the_reference_and_the_stage_on_random_texts(entries, texts):
    want = [ref_match(t, entries) for t in texts]
    series = pl.Series(texts, dtype=pl.String)
    assert Matcher(entries).match(series).to_pylist() == want
    for name, cls in CONTENDERS.items():
        if name == "pyahocorasick" and _NO_AHOCORASICK:
            continue
        assert cls(entries).match(series).to_pylist() == want, name


@pytest.fixture(scope="module")
def wordnet_parity():
    return wordnet_parity_set()


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_parity_real_captions_wordnet(name, wordnet_parity):
    entries, texts, want = wordnet_parity
    check_parity(CONTENDERS[name](entries), texts, want)
