"""metaclip: matching parity with a literal MetaCLIP reference (hand cases + real captions vs the WordNet
list), balancing probabilities, shard/worker invariance, MetaCLIP 2 options, the report."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metadata import concepts
from pipeline import config as config_mod
from pipeline import shards
from pipeline.runner import run_pipeline
from pipeline.schema import compute_uid
from pipeline.config import ConfigError
from pipeline.errors import StageError
from stages.metaclip import Matcher, MetaClipStage, balance, entry_probs, p_to_t, spacing, t_to_p

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is absent")


# ---- the reference, literally (MetaCLIP's substr_matching.py, without the automaton) -------------------
def ref_spacing(text: str) -> str:
    spaced = f" {text} "
    for punct in [",", ".", ";", ":", "?", "!", "`"]:
        spaced = spaced.replace(punct, f" {punct} ")
    for ch in ["\t", "\n", "\r"]:
        spaced = spaced.replace(ch, " ")
    return spaced


def ref_match(text: str, entries: list[str]) -> list[int]:
    spaced = ref_spacing(text)
    return [i for i, e in enumerate(entries) if (" " + e + " ") in spaced]


def ref_match_many(texts: list[str], entries: list[str]) -> list[list[int]]:
    """ref_match for many texts; the same `in` tests, skipping only entries found in no text at all
    (tested once against all spaced texts joined by "\\n", which no spaced text or entry key holds)."""
    spaced = [ref_spacing(t) for t in texts]
    joined = "\n".join(spaced)
    out: list[list[int]] = [[] for _ in texts]
    for i, e in enumerate(entries):
        key = " " + e + " "
        if "\n" in key or key not in joined:
            continue
        for j, s in enumerate(spaced):
            if key in s:
                out[j].append(i)
    return out


HAND_ENTRIES = [
    "Gas", "gas", "hot dog", "dog", "hot", "dog house", "ice cream", "ice", "cream", "New York", "York",
    "café", "naïve art", "St. Bernard", "e.g", "rock'n'roll", "(x)", "T-shirt", "shirt", "5", "55",
    " lead", "x  y", "a b", "b c", "Zürich", "東京", "tab\there",
]
E = {e: i for i, e in enumerate(HAND_ENTRIES)}
HAND_CASES = [
    ("Gas station", {"Gas"}),
    ("gas", {"gas"}),
    ("GAS and gAs", set()),  # case-sensitive
    ("a hot dog.", {"hot", "dog", "hot dog"}),  # nested
    ("hot dog house", {"hot", "dog", "hot dog", "dog house"}),  # overlapping
    ("dog,house", {"dog"}),  # list punctuation is spaced
    ("dog!dog?dog;dog:`dog`", {"dog"}),
    ("dogs hotdog", set()),  # whole tokens only
    ('"dog" (dog) [dog] dog\'s hot-dog', set()),  # quotes, brackets, apostrophes, hyphens are not spaced
    ("rock'n'roll (x) T-shirt", {"rock'n'roll", "(x)", "T-shirt"}),  # ... so such entries match as written
    ("St. Bernard e.g", set()),  # "." inside an entry can never match (the text's "." is spaced)
    ("ice\tcream", {"ice cream", "ice", "cream"}),
    ("ice\ncream\rcream", {"ice cream", "ice", "cream"}),
    ("ice  cream", {"ice", "cream"}),  # a double space breaks the multi-word entry
    ("x  y x y", {"x  y"}),
    ("a b c", {"a b", "b c"}),  # overlapping multi-word entries
    ("lead", set()),
    (" lead", {" lead"}),  # a leading space in an entry needs two spaces before the word
    (", lead", {" lead"}),  # ... which the spaced comma provides
    ("New York, York.", {"New York", "York"}),
    ("café naïve art Zürich 東京", {"café", "naïve art", "Zürich", "東京"}),
    ("CAFÉ naive art", set()),
    ("5 55 555 5.5", {"5", "55"}),
    ("tab\there", set()),  # tabs become spaces: an entry holding one never matches
    ("", set()),
]


def check_hand_cases(m) -> None:
    """A matcher (the stage's, or a benchmark contender: tests/test_metaclip_contenders.py) on HAND_CASES."""
    texts = [t for t, _ in HAND_CASES]
    got = m.match(pl.Series(texts, dtype=pl.String)).to_pylist()
    for (text, want), ids in zip(HAND_CASES, got):
        assert ids == sorted(E[w] for w in want), text
        assert ids == ref_match(text, HAND_ENTRIES), text


def test_hand_cases():
    check_hand_cases(Matcher(HAND_ENTRIES))


# Random texts and entries over a tiny alphabet, so that matches, near-misses and every separator case
# (spaced punctuation, tabs/newlines, double/leading/trailing spaces, empty texts, one caption's last word
# followed by the next caption's first) are dense; one batch, so nothing may cross between captions.
_PIECES = ["a", "b", "ab", "B", " ", "  ", ",", ".", "?", "\t", "\n", "'", "-", "é", ""]


RANDOM_ENTRIES = st.lists(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=4).map("".join),
                          min_size=1, max_size=25, unique=True)
RANDOM_TEXTS = st.lists(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=RANDOM_ENTRIES, texts=RANDOM_TEXTS)
def test_matcher_equals_the_reference_on_random_texts(entries, texts):
    want = [ref_match(t, entries) for t in texts]
    assert Matcher(entries).match(pl.Series(texts, dtype=pl.String)).to_pylist() == want


def test_spacing_matches_reference():
    texts = ["a,b.c;d:e?f!g`h\ti\nj\rk", "  ", "", "x", "\"quoted\" (b) it's a-b", "é,ü"]
    assert spacing(pl.Series(texts)).to_list() == [ref_spacing(t) for t in texts]


def test_null_text_matches_nothing():
    m = Matcher(["dog"])
    assert m.match(pl.Series(["dog", None], dtype=pl.String)).to_pylist() == [[0], []]


# Entries made of spaced punctuation, multi-byte characters next to every separator, entries that are
# substrings (token-wise and character-wise) of other entries: the token matcher cuts captions into tokens
# on UTF-8 bytes, so each byte-level edge is checked against the literal reference.
PUNCT_ENTRIES = [",", "dog ,", ", dog", "? !", "dog", "dogs", "og", "do", "hot dog", "hot dog house", "dog house",
                 "été", "東京", "東", "京", "é", "ü ,", "a  b", "", " ", "x ", " x", "naïve", "naïve art", "`"]
PUNCT_TEXTS = [
    "dog, dog ,dog", ",dog", "dog,", "?!", "? !", "?  !", "dog?!dog", "hot dog house dog house",
    "été,東京.東 京", "東京", "é", "éé", "ü,", "ü ,", "a  b", "a b", "a\tb", "a\t\tb", "a\r\nb", " x ", "x",
    "naïve art, naïve", "``", "`dog`", "", " ", "  ", ",", "\n", "\r", "\t", "dogs og do",
    "東京\t東京\n東京\r東京", "été" * 50 + " dog",
]


def check_punctuation_unicode_and_nested_entries(m) -> None:
    got = m.match(pl.Series(PUNCT_TEXTS, dtype=pl.String)).to_pylist()
    for text, ids in zip(PUNCT_TEXTS, got):
        assert ids == ref_match(text, PUNCT_ENTRIES), text


def test_punctuation_unicode_and_nested_entries_match_the_reference():
    check_punctuation_unicode_and_nested_entries(Matcher(PUNCT_ENTRIES))


def check_slices_chunks_nulls_and_empty_columns(m) -> None:
    """What a shard's text column can be: a slice of a bigger column, several Arrow chunks, nulls anywhere,
    only empty strings, only nulls. A null caption is matched as an empty one (spacing gives "  ", which
    the entry "" matches, as in the reference). `m` was built from PUNCT_ENTRIES."""
    texts = PUNCT_TEXTS + [None] + PUNCT_TEXTS[::-1]
    chunked = pl.concat([pl.Series(texts[:7], dtype=pl.String), pl.Series(texts[7:20], dtype=pl.String),
                         pl.Series(texts[20:], dtype=pl.String)], rechunk=False)
    assert chunked.n_chunks() == 3
    for lo, hi in [(0, len(texts)), (3, 25), (6, 8), (19, 21), (len(texts) - 1, len(texts))]:
        got = m.match(chunked.slice(lo, hi - lo)).to_pylist()
        assert got == [ref_match(t or "", PUNCT_ENTRIES) for t in texts[lo:hi]], (lo, hi)
    assert m.match(pl.Series(["", "", ""], dtype=pl.String)).to_pylist() == [ref_match("", PUNCT_ENTRIES)] * 3
    assert m.match(pl.Series([None, None], dtype=pl.String)).to_pylist() == [ref_match("", PUNCT_ENTRIES)] * 2
    table = pa.table({"text": pa.chunked_array([["dog, dog", None], ["東京 dog"]])})  # the stage's input
    assert m.match(pl.from_arrow(table.column("text"))).to_pylist() == [
        ref_match(t, PUNCT_ENTRIES) for t in ["dog, dog", "", "東京 dog"]]


def test_slices_chunks_nulls_and_empty_columns_match_the_reference():
    check_slices_chunks_nulls_and_empty_columns(Matcher(PUNCT_ENTRIES))


@pytest.mark.parametrize("piece", [1, 4, 7])
def test_tokens_matcher_in_pieces_equals_the_reference(piece, monkeypatch):
    """The token matcher cuts a big call into pieces of `_PIECE` captions: the rows must line up across
    pieces (a piece boundary anywhere, null and empty captions included)."""
    from stages.metaclip import matcher as matcher_mod

    monkeypatch.setattr(matcher_mod, "_PIECE", piece)
    m = Matcher(PUNCT_ENTRIES)
    texts = PUNCT_TEXTS + [None, ""] + PUNCT_TEXTS[::-1]
    got = m.match(pl.Series(texts, dtype=pl.String))
    assert got.type == pa.list_(pa.int32())
    assert got.to_pylist() == [ref_match(t or "", PUNCT_ENTRIES) for t in texts]


def test_token_lookup_is_exact_under_a_hash_collision():
    """The token matcher finds tokens by a 64-bit hash, then compares the strings: forge a collision (the
    entry token's hash made equal to an unknown token's) and the unknown token must still match nothing."""
    m = Matcher(["dog", "hot dog"])
    assert m.match(pl.Series(["cat", "dog", "hot dog"])).to_pylist() == [[], [0], [0, 1]]
    forged = m.vocab.hash(seed=m.hash_seed).to_numpy().copy()
    forged[m.vocab.to_list().index("dog")] = pl.Series(["cat"]).hash(seed=m.hash_seed).to_numpy()[0]
    m.token_index = pd.Index(forged)
    # "cat" now hashes to the id of "dog", and "dog" to nothing: the string check keeps "cat" unmatched
    assert m.match(pl.Series(["cat", "hot cat", "dog"])).to_pylist() == [[], [], []]


def test_edge_filter_only_skips_lookups():
    """The Bloom filter in front of the trie's edge table may only skip lookups that would fail: with every
    slot set (no filtering at all) the matches are the same."""
    entries = ["hot dog", "hot dog house", "dog house", "a b c d", "b c", "c d e"]
    texts = ["hot dog house", "a b c d e", "b c d", "hot hot dog", "dog house hot dog"]
    m = Matcher(entries)
    want = [ref_match(t, entries) for t in texts]
    assert m.match(pl.Series(texts)).to_pylist() == want
    m.edge_maybe[:] = True
    assert m.match(pl.Series(texts)).to_pylist() == want


def wordnet_parity_set() -> tuple[list[str], list[str], list[list[int]]]:
    """(WordNet entries, 2,500 real captions, the reference's matches): skips, saying why, only where WordNet's
    files are not installed (WordNetMissing); any other error fails: a broken builder is not a missing resource."""
    from metadata.wordnet import WordNetMissing

    try:
        entries = concepts.wordnet_entries()
    except WordNetMissing as e:
        pytest.skip(f"WordNet is not installed here, nothing to check: {e}")
    assert len(entries) >= 100_000
    flickr = pl.read_parquet(SHARED_DATA / "flickr8k_captions" / "flickr8k_captions.parquet")["caption"]
    laion = pl.read_parquet(SHARED_DATA / "laion_sample_10k" / "laion_sample_10k.parquet")["text"]
    texts = flickr.gather(np.arange(0, len(flickr), 27)[:1200]).to_list() + laion.head(1300).to_list()
    assert len(texts) >= 2000
    want = ref_match_many(texts, entries)
    assert sum(map(len, want)) > 5 * len(texts)  # plenty of hits, multi-word ones included
    assert any(" " in entries[i] for ids in want for i in ids)
    return entries, texts, want


def check_parity(m, texts: list[str], want: list[list[int]]) -> None:
    got = m.match(pl.Series(texts, dtype=pl.String)).to_pylist()
    bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not bad, bad[:3]


@needs_data
def test_parity_real_captions_wordnet():
    entries, texts, want = wordnet_parity_set()
    check_parity(Matcher(entries), texts, want)


# ---- MetaCLIP 2 helpers, by hand ----------------------------------------------------------------------
def test_t_to_p_and_p_to_t_by_hand():
    c = np.array([1, 2, 3, 4, 10])  # total 20
    assert t_to_p(c, 4) == pytest.approx(6 / 20)  # counts below 4: 1+2+3
    assert t_to_p(c, 100) == 1.0
    # sorted cumulative shares: .05 .15 .30 .50 1.0 -> nearest to 0.3 is index 2 -> count 3
    assert p_to_t(c, 0.3) == 3
    assert p_to_t(c, 0.45) == 4
    assert list(entry_probs(np.array([0, 5, 20, 40]), 20)) == [1.0, 1.0, 1.0, 0.5]


# ---- pools ------------------------------------------------------------------------------------------
def _write_pool(folder: Path, texts: list[str], n_shards: int, extra: dict | None = None, urls=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    urls = urls or [f"http://example.invalid/{i}.jpg" for i in range(len(texts))]
    cols = {"uid": compute_uid(urls, texts), "url": urls, "text": texts, **(extra or {})}
    table = pa.table(cols)
    bounds = np.linspace(0, len(texts), n_shards + 1).astype(int)
    for i in range(n_shards):
        shards.write_shard(table.slice(bounds[i], bounds[i + 1] - bounds[i]), str(folder / f"part-{i:05d}.parquet"))
    return folder


def _read(stage_dir: Path, rejected: bool = False) -> pl.DataFrame:
    d = stage_dir / "rejected" if rejected else stage_dir
    return pl.concat([pl.read_parquet(p) for p in sorted(d.glob("part-*.parquet"))]).sort("uid")


def _entries_file(tmp_path: Path, entries: list[str]) -> str:
    p = tmp_path / "entries.txt"
    p.write_text("\n".join(entries) + "\n")
    return str(p)


SINGLE = {"cat": 6000, "dog": 1500, "bird": 300, "fish": 60}


def _single_entry_pool() -> list[str]:
    texts = []
    for w, k in SINGLE.items():
        texts += [f"a {w} number {i}" for i in range(k)]
    texts += [f"nothing here {i}" for i in range(40)]
    return texts


def test_balancing_single_entry_pool(tmp_path):
    """Texts that match one entry each: expected kept = min(count, t) <= t; measured within binomial error."""
    t = 500
    entries = _entries_file(tmp_path, list(SINGLE))
    pool = _write_pool(tmp_path / "in", _single_entry_pool(), 3)
    cfg = config_mod.resolve({"metaclip": {"entries": entries, "t": t}})
    (res,) = run_pipeline(["metaclip"], str(tmp_path / "run"), cfg, input_dir=str(pool), workers=0)
    counts = pl.read_parquet(Path(res.folder) / "stats" / "entry_counts.parquet")
    assert counts["text"].to_list() == list(SINGLE)
    assert counts["count"].to_list() == list(SINGLE.values())
    kept = _read(Path(res.folder))
    rej = _read(Path(res.folder), rejected=True)
    assert rej.filter(pl.col("reason") == "no_entry").height == 40
    assert set(rej["reason"]) == {"no_entry", "balanced_out"}
    assert kept["metaclip_entries"].dtype == pl.List(pl.Int32)
    for i, (w, c) in enumerate(SINGLE.items()):
        p = t / max(c, t)
        assert c * p <= t  # expected kept count
        k = kept.filter(pl.col("metaclip_entries").list.contains(i)).height
        sd = math.sqrt(c * p * (1 - p))
        assert abs(k - c * p) <= 4.5 * sd + 1e-9, (w, k, c * p)
    assert res.manifest["reasons"]["balanced_out"] == rej.filter(pl.col("reason") == "balanced_out").height


def test_balancing_multi_entry_probability(tmp_path):
    """A text with several entries is kept with 1 - prod(1 - p_e): check against a binomial."""
    entries = ["cat", "dog", "bird"]
    texts = [f"cat {i}" for i in range(4000)] + [f"dog {i}" for i in range(1000)] + [f"cat dog {i}" for i in range(3000)]
    texts += [f"cat dog bird {i}" for i in range(200)]
    pool = _write_pool(tmp_path / "in", texts, 2)
    t = 800
    cfg = config_mod.resolve({"metaclip": {"entries": _entries_file(tmp_path, entries), "t": t}})
    (res,) = run_pipeline(["metaclip"], str(tmp_path / "run"), cfg, input_dir=str(pool), workers=0)
    counts = dict(zip(*pl.read_parquet(Path(res.folder) / "stats" / "entry_counts.parquet").select("text", "count")))
    assert counts == {"cat": 7200, "dog": 4200, "bird": 200}
    p = {e: t / max(c, t) for e, c in counts.items()}
    kept = _read(Path(res.folder))
    groups = {"cat": (4000, p["cat"]), "dog": (1000, p["dog"]),
              "cat dog": (3000, 1 - (1 - p["cat"]) * (1 - p["dog"])), "cat dog bird": (200, 1.0)}
    for prefix, (n, q) in groups.items():
        k = kept.filter(pl.col("text").str.replace(r" \d+$", "") == prefix).height
        assert abs(k - n * q) <= 4.5 * math.sqrt(n * q * (1 - q)) + 1e-9, (prefix, k, n * q)


def test_invariance_shards_and_workers(tmp_path):
    texts = [t for t in _single_entry_pool()] + [f"cat and dog {i}" for i in range(500)]
    entries = _entries_file(tmp_path, list(SINGLE))
    cfg = config_mod.resolve({"metaclip": {"entries": entries, "t": 400}})
    outs = []
    for n_shards, workers in [(1, 0), (4, 0), (4, 2)]:
        pool = _write_pool(tmp_path / f"in{n_shards}", texts, n_shards)
        (res,) = run_pipeline(["metaclip"], str(tmp_path / f"run{n_shards}_{workers}"), cfg, input_dir=str(pool),
                              workers=workers)
        outs.append((_read(Path(res.folder)), _read(Path(res.folder), rejected=True)))
    for kept, rej in outs[1:]:
        assert kept.equals(outs[0][0])
        assert rej.equals(outs[0][1])
    assert 0 < outs[0][0].height < len(texts)


def test_null_text_and_uid_from_text(tmp_path):
    pool = tmp_path / "in"
    pool.mkdir()
    pq.write_table(pa.table({"text": ["a dog", None, "nothing"]}), pool / "part-00000.parquet")
    cfg = config_mod.resolve({"metaclip": {"entries": _entries_file(tmp_path, ["dog"]), "t": 10}})
    (res,) = run_pipeline(["metaclip"], str(tmp_path / "run"), cfg, input_dir=str(pool), workers=0)
    assert res.manifest["rows_out"] == 1 and res.manifest["reasons"] == {"no_entry": 2}


def test_per_language_t(tmp_path):
    """MetaCLIP 2: t applies to the reference language; others get t from its tail share."""
    entries = ["cat", "dog", "Katze", "Hund", "x"]
    en = [f"cat {i}" for i in range(900)] + [f"dog {i}" for i in range(100)]
    de = [f"Katze {i}" for i in range(300)] + [f"Hund {i}" for i in range(60)] + [f"x {i}" for i in range(40)]
    texts = en + de
    lang = ["en"] * len(en) + ["de"] * len(de)
    pool = _write_pool(tmp_path / "in", texts, 2, extra={"lang": lang})
    cfg = config_mod.resolve({"metaclip": {"entries": _entries_file(tmp_path, entries), "t": 200, "language_col": "lang"}})
    (res,) = run_pipeline(["metaclip"], str(tmp_path / "run"), cfg, input_dir=str(pool), workers=0)
    th = shards.read_json(str(Path(res.folder) / "stats" / "thresholds.json"))
    p = 100 / 1000  # en: only "dog" (100) is below t = 200
    assert th["tail_share"] == pytest.approx(p)
    # de sorted counts 40, 60, 300 (total 400): cumulative .10 .25 1.0 -> nearest to 0.1 is 40
    assert th["t"] == {"de": 40, "en": 200}
    by_lang = pl.read_parquet(Path(res.folder) / "stats" / "entry_counts_by_language.parquet")
    assert by_lang.filter(pl.col("language") == "de").sort("entry")["count"].to_list() == [300, 60, 40]
    kept = _read(Path(res.folder))
    k_katze = kept.filter(pl.col("text").str.starts_with("Katze")).height
    q = 40 / 300
    assert abs(k_katze - 300 * q) <= 4.5 * math.sqrt(300 * q * (1 - q))
    assert kept.filter(pl.col("text").str.starts_with("x ")).height == 40  # tail entry: all kept
    # tail_share given: every language from it
    cfg2 = config_mod.resolve({"metaclip": {"entries": _entries_file(tmp_path, entries), "t": 200,
                                             "language_col": "lang", "tail_share": 0.25}})
    (res2,) = run_pipeline(["metaclip"], str(tmp_path / "run2"), cfg2, input_dir=str(pool), workers=0)
    th2 = shards.read_json(str(Path(res2.folder) / "stats" / "thresholds.json"))
    # en sorted 100, 900 -> .1, 1.0 -> 100; de -> .25 exactly at 60
    assert th2["t"] == {"de": 60, "en": 100}


def test_one_text_per_image(tmp_path):
    texts, urls = [], []
    for img in range(300):
        for k in range(3):
            texts.append(f"dog {img} {k}" if k < 2 else f"nothing {img}")
            urls.append(f"http://example.invalid/{img}.jpg")
    pool = _write_pool(tmp_path / "in", texts, 3, urls=urls)
    cfg = config_mod.resolve({"metaclip": {"entries": _entries_file(tmp_path, ["dog"]), "t": 10**6,
                                           "one_text_per_image": True}})
    outs = []
    for workers in (0, 2):
        (res,) = run_pipeline(["metaclip"], str(tmp_path / f"run{workers}"), cfg, input_dir=str(pool), workers=workers)
        outs.append(_read(Path(res.folder)))
        assert res.manifest["reasons"] == {"no_entry": 300, "other_text_of_image": 300}
    kept = outs[0]
    assert kept.height == 300 and kept["url"].n_unique() == 300
    assert outs[1].equals(kept)
    # the counts stay over every matching text (MetaCLIP 2)
    assert pl.read_parquet(Path(res.folder) / "stats" / "entry_counts.parquet")["count"].to_list() == [600]
    # the saved image keys are the ones apply computes from the urls (one per image)
    saved = pl.read_parquet(Path(res.folder) / "stats" / "image_choice.parquet")["image_key"].to_list()
    assert sorted(saved) == sorted(set(balance.image_keys(pa.table({"url": urls}), "url").tolist()))


def test_image_keys_are_the_version_stable_hash():
    """one_text_per_image's image keys are saved (image_choice.parquet) and compared by later processes, maybe
    under another polars: they are pipeline.hashing's (row_content_key of the image column's value), pinned here,
    never polars' hash. A null image is not the empty string; any column type has keys."""
    from pipeline.hashing import row_content_key

    col = pa.array(["http://example.invalid/0.jpg", "", None, "http://example.invalid/0.jpg"])
    keys = balance.image_keys(pa.table({"url": col}), "url")
    assert keys.dtype == np.uint64
    assert keys.tolist() == [7821035016242520208, 4924465410787830146, 16857188639596273356, 7821035016242520208]
    assert keys.tolist() == row_content_key(pa.table({"image": col})).tolist()
    assert balance.image_keys(pa.table({"id": pa.array([7, None, 7])}), "id").tolist() == [
        6893616107955520828, 16857188639596273356, 6893616107955520828]
    with pytest.raises(StageError, match="needs the image column 'url'"):
        balance.image_keys(pa.table({"x": [1]}), "url")


def test_entries_identity_and_errors(tmp_path):
    a = _entries_file(tmp_path, ["cat", "dog"])
    b = tmp_path / "b.json"
    b.write_text('["dog", "cat"]')
    fa = MetaClipStage({"entries": a}).fingerprint_parts()
    fb = MetaClipStage({"entries": str(b)}).fingerprint_parts()
    assert fa["entries_sha256"] != fb["entries_sha256"]
    assert fa["entries_sha256"] == concepts.entries_sha256(["cat", "dog"])
    with pytest.raises(StageError):
        MetaClipStage({"entries": str(tmp_path / "missing.txt")}).fingerprint_parts()
    with pytest.raises(ConfigError, match=r"config \[metaclip\] t = 0: must be at least 1"):
        MetaClipStage({"t": 0})


@pytest.mark.parametrize("value", ["pyahocorasick", "polars", "regex", ""])
def test_matcher_other_than_tokens_is_a_one_line_config_error(tmp_path, value):
    """The Aho-Corasick contenders left the stage for the benchmark (bench/contender_matchers.py): `[metaclip]
    matcher` takes only "tokens", and any other value stops the config read with one line."""
    assert config_mod.resolve({"metaclip": {"matcher": "tokens"}})["metaclip"]["matcher"] == "tokens"
    path = tmp_path / "c.toml"
    path.write_text(f'[metaclip]\nmatcher = "{value}"\n')
    with pytest.raises(ConfigError) as e:
        config_mod.load(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"config [metaclip] matcher = {value!r}: must be 'tokens'"), msg
    with pytest.raises(ConfigError, match="bench/contender_matchers.py"):
        MetaClipStage({"matcher": value})


def test_setup_once_per_process(tmp_path):
    from pipeline.registry import get_stage

    cfg = {"entries": _entries_file(tmp_path, ["dog"]), "t": 5}
    full = config_mod.resolve({"metaclip": cfg})["metaclip"]
    s1 = get_stage("metaclip", full, 0)
    s2 = get_stage("metaclip", full, 0)
    assert s1 is s2 and s1.matcher is s2.matcher


def test_report(tmp_path):
    entries = _entries_file(tmp_path, list(SINGLE))
    pool = _write_pool(tmp_path / "in", _single_entry_pool(), 2)
    cfg = config_mod.resolve({"metaclip": {"entries": entries, "t": 500}})
    run_dir = tmp_path / "run"
    (res,) = run_pipeline(["metaclip"], str(run_dir), cfg, input_dir=str(pool), workers=0)
    out = MetaClipStage(cfg["metaclip"]).report(res.folder, str(run_dir / "report"))
    assert len(out["figures"]) == 2 and all(os.path.getsize(p) > 1000 for _, p in out["figures"])
    head_tail, top = out["tables"]
    # tail share = (300 + 60) / 7860; head entries: cat, dog
    assert head_tail.rows[0][4] == f"{100 * 360 / 7860:.2f}%"
    assert top.rows[0][:5] == [1, 0, "cat", 6000, 500] and "| 1 | 0 | cat | 6000 | 500 |" in top.markdown()
    csv = pl.read_csv(out["csv"])
    assert csv["expected_after"].to_list() == [500, 500, 300, 60]
    assert csv["p"].to_list() == pytest.approx([500 / 6000, 500 / 1500, 1.0, 1.0])
    from pipeline.report import histograms

    assert "metaclip" in histograms(str(run_dir))


def test_apply_reuses_collect_matches_and_a_bad_cache_is_ignored(tmp_path, monkeypatch):
    """Pass 2 takes pass 1's matches from the stage folder (each shard matched once), leaves no cache
    behind, and a cache that does not fit the shard (other texts, other concept list) is recomputed."""
    from stages import metaclip as mc

    entries = _entries_file(tmp_path, list(SINGLE))
    pool = _write_pool(tmp_path / "in", _single_entry_pool(), 3)
    cfg = config_mod.resolve({"metaclip": {"entries": entries, "t": 500}})
    calls = []
    real = mc.Matcher.match
    monkeypatch.setattr(mc.Matcher, "match", lambda self, texts: calls.append(len(texts)) or real(self, texts))
    (res,) = run_pipeline(["metaclip"], str(tmp_path / "run"), cfg, input_dir=str(pool), workers=0)
    assert len(calls) == 3  # one match per shard, in collect
    assert not list((Path(res.folder) / "_cache").glob("*"))
    ref = (_read(Path(res.folder)), _read(Path(res.folder), rejected=True))

    # Bad caches: shard 0's has another shard's rows, shard 1's another concept list's key.
    st = mc.MetaClipStage({"entries": entries, "t": 500})
    tables = {p.name: pq.read_table(p) for p in sorted((tmp_path / "in").glob("part-*.parquet"))}
    names = sorted(tables)
    from pipeline.context import ShardContext

    ctx0 = ShardContext(stage="metaclip", stage_dir=res.folder, shard=names[0])
    ctx0.cache_put("matches", tables[names[1]], {mc.OUT_COL: st.match(tables[names[1]])}, st.entries_sha256)
    ctx1 = ShardContext(stage="metaclip", stage_dir=res.folder, shard=names[1])
    wrong = pa.array([[0]] * tables[names[1]].num_rows, pa.list_(pa.int32()))
    ctx1.cache_put("matches", tables[names[1]], {mc.OUT_COL: wrong}, "another list")
    for name in names:  # redo apply only: drop the done markers, keep the stats
        (Path(res.folder) / "_done" / f"{name}.json").unlink()
    calls.clear()
    (res2,) = run_pipeline(["metaclip"], str(tmp_path / "run"), cfg, input_dir=str(pool), workers=0)
    assert len(calls) == 3  # no cache for shard 2, two refused: all matched again
    assert _read(Path(res2.folder)).equals(ref[0]) and _read(Path(res2.folder), rejected=True).equals(ref[1])
    assert not list((Path(res.folder) / "_cache").glob("*"))


# ---- t for a target size ---------------------------------------------------------------------------------
def _target_pool() -> tuple[list[str], list[str]]:
    """Skewed counts and rows with one, two and three entries."""
    entries = ["cat", "dog", "bird", "fish", "owl"]
    rng = np.random.default_rng(3)
    weights = np.array([60, 25, 8, 5, 2], dtype=float)
    texts = []
    for i in range(1500):
        k = int(rng.choice([1, 1, 1, 2, 3]))
        words = rng.choice(entries, size=k, replace=False, p=weights / weights.sum())
        texts.append(" ".join(words) + f" number {i}")
    texts += [f"nothing at all {i}" for i in range(50)]
    return entries, texts


def _ref_expected(entry_sets: list[list[int]], counts: dict[int, int], t: int) -> float:
    """Expected kept rows at t, straight from the definition: 1 - prod_e (1 - min(1, t / count_e)) per row."""
    total = 0.0
    for es in entry_sets:
        if es:
            miss = 1.0
            for e in es:
                miss *= 1.0 - min(1.0, t / counts[e])
            total += 1.0 - miss
    return total


def test_target_rows_solves_t_against_brute_force(tmp_path):
    entries, texts = _target_pool()
    sets = ref_match_many(texts, entries)
    counts = {e: sum(e in s for s in sets) for e in range(len(entries))}
    target = 500
    ref = {t: _ref_expected(sets, counts, t) for t in range(1, max(counts.values()) + 1)}
    best = min(ref, key=lambda t: (abs(ref[t] - target), -t))
    pool = _write_pool(tmp_path / "in", texts, 3)
    got = {}
    for name, extra in [("all", {}), ("sampled", {"target_sample": 600})]:
        cfg = config_mod.resolve({"metaclip": {"entries": _entries_file(tmp_path, entries), "t": 7,
                                               "target_rows": target, **extra}})
        (res,) = run_pipeline(["metaclip"], str(tmp_path / name), cfg, input_dir=str(pool), workers=0)
        th = shards.read_json(str(Path(res.folder) / "stats" / "thresholds.json"))
        got[name] = (th, res.manifest["rows_out"])
    th, kept = got["all"]
    out = MetaClipStage(cfg["metaclip"]).report(str(tmp_path / "all" / "02_metaclip"), str(tmp_path / "report"))
    solved = out["tables"][0]
    assert solved.title == "t for a target size"
    assert f"| {target} | {best} | {ref[best]:.1f} | {kept} (" in solved.markdown()
    assert th["target"]["sample_rows"] == th["target"]["matched_rows"] == 1500  # every row: exact
    assert th["t"] == {"": best} and th["target"]["t"] == best
    assert th["target"]["expected_kept"] == pytest.approx(ref[best], rel=1e-9)
    assert abs(ref[best] - target) <= abs(ref[best + 1] - target) and abs(ref[best] - target) <= abs(ref[best - 1] - target)
    sd = math.sqrt(sum((1 - m) * m for m in [0.5] * 1500))  # a bound on the kept count's spread
    assert abs(kept - ref[best]) <= 4 * sd
    th_s, _ = got["sampled"]  # 600 of 1,500 rows: an estimate, near the exact t
    assert th_s["target"]["sample_rows"] == 600 and abs(ref[th_s["target"]["t"]] - target) / target < 0.1


def test_target_rows_t_does_not_depend_on_shards(tmp_path):
    entries, texts = _target_pool()
    ts = []
    for n_shards, sample in [(1, 700), (5, 700), (5, 100_000)]:
        pool = _write_pool(tmp_path / f"in{n_shards}-{sample}", texts, n_shards)
        cfg = config_mod.resolve({"metaclip": {"entries": _entries_file(tmp_path, entries), "target_rows": 400,
                                               "target_sample": sample}})
        (res,) = run_pipeline(["metaclip"], str(tmp_path / f"r{n_shards}-{sample}"), cfg, input_dir=str(pool))
        ts.append(shards.read_json(str(Path(res.folder) / "stats" / "thresholds.json"))["target"])
    assert ts[0] == ts[1]  # the same 700-row sample whatever the shards
    assert ts[2]["sample_rows"] == 1500


def test_target_rows_config_errors():
    with pytest.raises(ConfigError, match="target_rows and tail_share both set"):
        config_mod.resolve({"metaclip": {"target_rows": 10, "tail_share": 0.3}})
    with pytest.raises(ConfigError, match="target_rows = -1"):
        config_mod.resolve({"metaclip": {"target_rows": -1}})


def test_target_rows_with_languages_matches_brute_force(tmp_path):
    """With a language column, the candidate t is the reference language's and the others follow it
    (MetaCLIP 2); the expected count at the solved t equals the definition summed row by row."""
    entries, texts = _target_pool()
    langs = ["en" if i % 3 else "de" for i in range(len(texts))]
    sets = ref_match_many(texts, entries)
    pool = _write_pool(tmp_path / "in", texts, 2, extra={"lang": langs})
    cfg = config_mod.resolve({"metaclip": {"entries": _entries_file(tmp_path, entries), "language_col": "lang",
                                           "target_rows": 450}})
    (res,) = run_pipeline(["metaclip"], str(tmp_path / "run"), cfg, input_dir=str(pool), workers=0)
    th = shards.read_json(str(Path(res.folder) / "stats" / "thresholds.json"))
    ts = th["t"]
    assert ts["en"] == th["target"]["t"] and set(ts) == {"en", "de"}
    counts = {lang: {e: sum(e in s for s, l in zip(sets, langs) if l == lang) for e in range(len(entries))}
              for lang in ("en", "de")}
    brute = 0.0
    for s, lang in zip(sets, langs):
        if s:
            miss = 1.0
            for e in s:
                miss *= 1.0 - min(1.0, ts[lang] / counts[lang][e])
            brute += 1.0 - miss
    assert th["target"]["expected_kept"] == pytest.approx(brute, rel=1e-9)
    assert abs(brute - 450) < 0.1 * 450


# ---- balance among the pairs above a quality cut (balance-last) --------------------------------------------
def test_balancing_above_a_score_cut_counts_only_the_rows_above_it(tmp_path):
    """Rows under `min_score` (or unscored) are `low_score` and are not counted: the entry counts, hence
    the balance, are those of the rows above the cut (hand-computed)."""
    texts = [f"a cat number {i}" for i in range(600)] + [f"a dog number {i}" for i in range(400)]
    scores = [0.9 if i % 3 else 0.1 for i in range(600)] + [0.9 if i % 4 == 0 else 0.1 for i in range(400)]
    scores[5] = None  # unscored: under any cut
    pool = _write_pool(tmp_path / "in", texts, 3, extra={"dfn_score": pa.array(scores, pa.float32())})
    cfg = config_mod.resolve({"metaclip": {"entries": _entries_file(tmp_path, ["cat", "dog"]), "t": 100,
                                           "score_col": "dfn_score", "min_score": 0.5}})
    (res,) = run_pipeline(["metaclip"], str(tmp_path / "run"), cfg, input_dir=str(pool), workers=0)
    counts = dict(zip(*pl.read_parquet(Path(res.folder) / "stats" / "entry_counts.parquet").select("text", "count")))
    above_cat = sum(1 for i in range(600) if i % 3 and i != 5)
    above_dog = sum(1 for i in range(400) if i % 4 == 0)
    assert counts == {"cat": above_cat, "dog": above_dog} == {"cat": 399, "dog": 100}
    rej = _read(Path(res.folder), rejected=True)
    assert rej.filter(pl.col("reason") == "low_score").height == 1000 - above_cat - above_dog
    kept = _read(Path(res.folder))
    assert (kept["dfn_score"] >= 0.5).all()
    k_cat = kept.filter(pl.col("text").str.contains("cat")).height
    p = 100 / 399
    assert abs(k_cat - 399 * p) <= 4.5 * math.sqrt(399 * p * (1 - p))
    assert kept.filter(pl.col("text").str.contains("dog")).height == 100  # 100 <= t: all kept


def test_score_cut_config_and_missing_column_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="score_col and min_score go together"):
        config_mod.resolve({"metaclip": {"score_col": "dfn_score"}})
    pool = _write_pool(tmp_path / "in", ["a cat"], 1)
    cfg = config_mod.resolve({"metaclip": {"entries": _entries_file(tmp_path, ["cat"]), "score_col": "dfn_score",
                                           "min_score": 0.2}})
    with pytest.raises(StageError, match="score_col 'dfn_score' is not a column of the shard"):
        run_pipeline(["metaclip"], str(tmp_path / "run"), cfg, input_dir=str(pool), workers=0)


def test_apply_key_names_only_what_apply_reads():
    """Resume per shard: a shard of metaclip is redone when the counts it reads change. p_e = 1 for an entry at
    or under t whatever its count, so the key holds t, the entries above it with their counts, and the largest
    count when nothing is capped (apply's note names it)."""
    stage = MetaClipStage({"t": 10})

    def key(counts):
        return stage.apply_key({"n": 3, "langs": {"": (np.array([0, 1, 2]), np.array(counts))}, "images": None})

    base = key([3, 50, 7])
    assert base["over"]["*"] == [[1], [50]] and base["largest"] is None  # entry 1 is capped
    assert key([4, 50, 9]) == base  # tail counts moved: nothing apply reads changed
    assert key([3, 51, 7]) != base  # a capped entry's count: its p_e changed
    assert key([3, 7, 7]) != key([3, 8, 7])  # nothing capped: the note's largest count changed
    assert key([3, 50, 11]) != base  # a tail entry crossed t
