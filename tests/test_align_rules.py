"""align's rules as units, without the runner: each rule's mask on a hand-made RowFeatures against masks worked
out by hand (edges included: each rule's comparison is strict on one side), then `judge`, which names the first
rule a row breaks. The rules on real pools, against a plain-Python reference: tests/test_align.py."""

from __future__ import annotations


import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from stages.align import REASONS, AlignStage, HammingIndex, RowFeatures
from stages.align.features import judged_size
from stages.align.rules import (AspectRatio, EvalNearDuplicate, ExactDuplicate, ImageManyTexts, ImageTooSmall,
                                ImageUnreadable, Language, NearDuplicate, RareToken, TextManyImages, TooFewWords,
                                TooManyWords)
from pipeline.rules import judge

MAX = np.iinfo(np.uint64).max


def u64(*v) -> np.ndarray:
    return np.array(v, dtype=np.uint64)


def i64(*v) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def b(*v) -> np.ndarray:
    return np.array(v, dtype=bool)


def check(rule, f: RowFeatures, expected: list[bool]) -> None:
    assert rule.on and rule.has_data(f)
    got = rule.mask(f)
    assert got.dtype == bool and got.tolist() == expected


# ---- images -----------------------------------------------------------------------------------------------
def test_image_unreadable_is_every_row_whose_image_did_not_decode():
    check(ImageUnreadable(), RowFeatures(4, decoded=b(True, False, True, False)), [False, True, False, True])
    assert not ImageUnreadable().has_data(RowFeatures(4))  # no image bytes in the pool: no data
    assert ImageUnreadable.quiet  # ... and that is said nowhere: the rule only exists in pools with images


def test_image_too_small_judges_the_shorter_side_of_known_sizes():
    f = RowFeatures(6, width=i64(0, 199, 200, 500, 300, 150), height=i64(300, 300, 199, 200, 0, 150))
    # unknown width; 199 < 200; 199 < 200 (height); 200 is enough; unknown height; both sides short
    check(ImageTooSmall(200), f, [False, True, True, False, False, True])
    check(ImageTooSmall(0), f, [False] * 6)


def test_aspect_ratio_is_strictly_more_than_max_aspect():
    f = RowFeatures(6, width=i64(300, 301, 100, 0, 90, 100), height=i64(100, 100, 300, 500, 300, 0))
    # 3:1 exactly is allowed; 301:100 is not; 1:3 allowed; unknown width; 300:90 > 3; unknown height
    check(AspectRatio(3.0), f, [False, True, False, False, True, False])
    check(AspectRatio(1.0), f, [True, True, True, False, True, False])


# ---- pool-wide counts ---------------------------------------------------------------------------------------
def test_image_many_texts_counts_only_rows_with_an_image_identity():
    f = RowFeatures(4, id_ok=b(True, True, False, True), texts_per_image=u64(3, 4, 9, 0))
    check(ImageManyTexts(3), f, [False, True, False, False])
    assert not ImageManyTexts(3).has_data(RowFeatures(4, id_ok=b(True, True, False, True)))


def test_text_many_images_counts_only_rows_with_an_image_identity():
    f = RowFeatures(3, id_ok=b(True, True, False), images_per_text=u64(2, 3, 5))
    check(TextManyImages(2), f, [False, True, False])


# ---- text -------------------------------------------------------------------------------------------------
def test_word_counts_bound_both_ways():
    f = RowFeatures(4, nwords=i64(0, 2, 3, 4))
    check(TooFewWords(3), f, [True, True, False, False])
    check(TooManyWords(3), f, [False, False, False, True])
    check(TooFewWords(0), f, [False] * 4)


def test_rare_token_needs_a_pool_rare_word_that_the_vocabulary_does_not_know():
    zipf_of = {"cat": 4.0, "qzx": 0.0, "the": 7.0, "zzz": 0.0, "fjord": 1.5}
    asked = []

    def zipf(words):
        asked.extend(words)
        return np.array([zipf_of[w] for w in words])

    words = pl.Series(["cat", "fjord", "qzx", "the", "zzz"])
    # row 0: cat the (cat rare in the pool, but a known word); row 1: qzx (rare and unknown); row 2: the zzz
    # (zzz unknown, but seen twice: not rare); row 3: no words; row 4: fjord (rare, Zipf 1.5 is not < 1.5);
    # row 5: the qzx the
    f = RowFeatures(6, words=words, word_count=u64(1, 1, 1, 9, 2),
                    token_row=i64(0, 0, 1, 2, 2, 4, 5, 5, 5), token_word=i64(0, 3, 2, 3, 4, 1, 3, 2, 3))
    check(RareToken(2, 1.5, zipf), f, [False, True, False, False, False, True])
    assert sorted(asked) == ["cat", "fjord", "qzx"]  # the vocabulary is asked about pool-rare words only, once
    asked.clear()
    check(RareToken(3, 1.5, zipf), f, [False, True, True, False, False, True])  # zzz (2 < 3) is rare now
    check(RareToken(0, 1.5, zipf), f, [False] * 6)
    assert asked == ["cat", "fjord", "qzx", "zzz"]


def test_rare_token_on_a_shard_without_words():
    f = RowFeatures(3, words=pl.Series([], dtype=pl.String), word_count=u64(), token_row=i64(), token_word=i64())
    check(RareToken(2, 1.5, lambda w: pytest.fail("asked about no word")), f, [False] * 3)


# ---- duplicates and decontamination ---------------------------------------------------------------------------
def test_exact_duplicate_is_a_repeated_pair_with_a_smaller_uid_or_a_copy_of_the_uid_kept_elsewhere():
    f = RowFeatures(5, uid=u64(5, 5, 3, 7, 9), id_ok=b(True, False, True, True, True),
                    pair_uid_min=u64(3, 1, 3, MAX, 8), other_copy_kept=b(False, False, False, True, False))
    # smaller uid has the pair; no identity: no pair; the row itself is the smallest; another copy of its uid
    # is kept; 8 < 9
    check(ExactDuplicate(), f, [True, False, False, True, True])


def test_near_duplicate_is_a_shared_band_with_a_smaller_uid():
    f = RowFeatures(4, uid=u64(5, 5, 5, 0), band_uid_min=u64(4, 5, MAX, MAX))
    check(NearDuplicate(), f, [True, False, False, False])
    assert not NearDuplicate().has_data(RowFeatures(4, uid=u64(5, 5, 5, 0)))


def test_eval_near_duplicate_within_k_bits_of_a_decoded_image_and_off_without_an_eval_set():
    index = HammingIndex(u64(0, 0xFF00), k=2)
    f = RowFeatures(5, decoded=b(True, True, True, False, True), phash=u64(0b11, 0b111, 0xFF07, 0b11, 0xFF03))
    # 2 bits from 0; 3 bits from 0; 3 bits from 0xFF00; close but not decoded; 2 bits from 0xFF00
    check(EvalNearDuplicate(index), f, [True, False, False, False, True])
    assert not EvalNearDuplicate(None).on


def test_language_flags_non_empty_captions_in_another_language_and_is_off_unless_set():
    lang = {"a dog": "en", "ein Hund": "de"}
    f = RowFeatures(4, captions=["a dog", "", None, "ein Hund"])
    check(Language("en", lambda t: lang[t]), f, [False, False, False, True])
    check(Language("de", lambda t: lang[t]), f, [True, False, False, False])
    assert not Language("", lambda t: pytest.fail("off")).on


# ---- the first broken rule ------------------------------------------------------------------------------------
def test_judge_names_the_first_rule_broken_in_list_order_and_lists_the_skipped():
    # row 0 breaks both the size and the word rule, row 1 only the word rule, row 2 none
    f = RowFeatures(3, width=i64(10, 500, 500), height=i64(10, 500, 500), nwords=i64(1, 1, 5), uid=u64(1, 2, 3))
    rules = [ImageUnreadable(), ImageTooSmall(200), TooFewWords(3), NearDuplicate(), EvalNearDuplicate(None)]
    reason, skipped = judge(rules, f, f.n)
    assert reason.to_pylist() == ["image_too_small", "too_few_words", None]
    # decoded and band_uid_min are None: ImageUnreadable is quiet, NearDuplicate said; the eval rule is off
    assert skipped == ["near_duplicate"]
    reason, _ = judge([TooFewWords(3), ImageTooSmall(200)], f, f.n)
    assert reason.to_pylist() == ["too_few_words", "too_few_words", None]
    assert isinstance(reason, pa.Array) and reason.type == pa.string()


def test_an_off_rule_names_no_row_even_when_its_data_would_break_it():
    f = RowFeatures(2, decoded=b(True, True), phash=u64(0, 0), captions=["ein Hund", "a dog"])
    reason, skipped = judge([EvalNearDuplicate(None), Language("", lambda t: "de")], f, f.n)
    assert reason.to_pylist() == [None, None] and skipped == []


def test_the_stage_asks_its_rules_in_reasons_order_with_its_config():
    stage = AlignStage({"min_side": 64, "max_aspect": 2.5, "min_words": 2, "max_words": 9, "max_texts_per_image": 7,
                        "max_images_per_text": 4, "min_token_count": 3, "min_zipf": 2.0, "language": "en"})
    rules = stage.rules()
    assert [r.name for r in rules] == REASONS
    by = {r.name: r for r in rules}
    assert by["image_too_small"].min_side == 64 and by["aspect_ratio"].max_aspect == 2.5
    assert by["too_few_words"].min_words == 2 and by["too_many_words"].max_words == 9
    assert by["image_many_texts"].max_texts == 7 and by["text_many_images"].max_images == 4
    assert by["rare_token"].min_count == 3 and by["rare_token"].min_zipf == 2.0
    assert by["language"].on and not by["eval_near_duplicate"].on
    assert not AlignStage().rules()[-1].on  # language: off by default


# ---- the size the size rules judge ----------------------------------------------------------------------------
def test_judged_size_prefers_the_recorded_size_then_the_decoded_one_and_zeroes_unreadable_images():
    t = pa.table({"orig_width": pa.array([300, None, -1, 300], pa.int32()),
                  "orig_height": pa.array([200, 100, 50, 200], pa.int32())})
    W, H = judged_size(t, b(True, True, True, False), i64(1, 2, 3, 4), i64(5, 6, 7, 8))
    # recorded; width missing: decoded size; a negative width is missing too; unreadable
    assert W.tolist() == [300, 2, 3, 0] and H.tolist() == [200, 6, 7, 0]
    W, H = judged_size(t, None, i64(0, 0, 0, 0), i64(0, 0, 0, 0))  # no pixels: a missing size is unknown
    assert W.tolist() == [300, 0, 0, 300] and H.tolist() == [200, 0, 0, 200]
    t2 = pa.table({"width": pa.array([40]), "height": pa.array([30])})  # ingest's width/height when no orig_*
    assert [x.tolist() for x in judged_size(t2, None, i64(0), i64(0))] == [[40], [30]]
    assert judged_size(pa.table({"x": [1]}), None, i64(0), i64(0)) == (None, None)
    assert [x.tolist() for x in judged_size(pa.table({"x": [1, 2]}), b(True, False), i64(9, 9), i64(4, 4))] == [[9, 0], [4, 0]]

