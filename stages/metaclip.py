"""metaclip: MetaCLIP curation (arXiv 2309.16671): substring matching against a concept list, then balancing.

Matching gives exactly the entry-id sets of facebookresearch/MetaCLIP's `substr_matching.py` on the same
list (DESIGN.md, section "metaclip"):
  spacing(text)   " " + text + " ", each of , . ; : ? ! ` wrapped in spaces, tab/newline/CR -> space; no
                  lower-casing (case-sensitive), quotes, brackets, apostrophes and hyphens untouched.
  match           entry e matches when " " + e + " " is a substring of spacing(text), overlapping matches
                  included.
The reference spaces and matches caption by caption in Python, with one Aho-Corasick automaton. Here spacing
is one vectorised `str.replace_many` over the column (one pass equals MetaCLIP's ten sequential
`str.replace` calls, since each only inserts spaces around its own character, or replaces it by a space).
Three `matcher`s give the same sets (asserted by the tests and the benchmark), see `Matcher`:
"tokens" (the default: a token trie walked with numpy over a whole shard, `Matcher._match_tokens`; it cuts
tokens from the caption bytes without building the spaced text, `_tokens`), "pyahocorasick" (DESIGN.md's
automaton, one `automaton.iter` over the shard's joined captions) and "polars" (its built-in Aho-Corasick).
DESIGN.md names the automaton; the trie is the default because it is the fastest with the same output.
Its cost per call is proportional to the call's captions: everything sized by the entry list (trie, token
hash table, edge filter) is built once per process. bench/bench_metaclip.py, 148,730 WordNet entries,
300,000 captions per set, one core, 5 paired rounds (speedup = median of the per-round ratios to MetaCLIP's
per-caption loop), at 10k / 50k / 100k captions per call: Flickr8k train/dev/unsplit (tuned on it)
x3.21 / x3.62 / x3.50; held out, Flickr8k test x3.95 / x4.60 / x4.56, LAION 10k x3.60 / x4.55 / x5.16
(CPU-time ratios x3.29-x5.14); pyahocorasick x1.27-x1.44 and polars x0.78-x0.91 at 100k.

Balancing (MetaCLIP's balancing.py): `collect` counts, per entry, the texts matching it (numpy bincount);
`merge` sums; `apply` keeps a pair with probability 1 - prod_e (1 - p_e), p_e = t / max(count_e, t), by
drawing u_e = uniform(uid, seed, salt=e) per matched entry and keeping when any u_e < p_e (shard- and
worker-independent). Reasons: `no_entry` (no entry matched), `balanced_out` (not sampled), with
`one_text_per_image`, `other_text_of_image`, and, as in every stage, `invalid_utf8` (text bytes that are not
UTF-8, set aside before matching).

Options:
  language_col   when set and present: counts per language, and per-language t by MetaCLIP 2's rule
                 (curate.py): p = t_to_p(counts[reference_language], t) = share of matches in entries
                 below t; every other language gets t_lang = p_to_t(counts[lang], p), the count at which
                 the cumulative share of its sorted counts is nearest p. `tail_share` > 0 sets p directly
                 for every language (reference language included). A null language is its own group "".
                 Without the reference language in the pool, p comes from all languages together.
  one_text_per_image  MetaCLIP 2 picks one alt-text per image (random.choice among the texts that match an
                 entry). Here: among a pool's matching texts with the same `image_col` value, the one with
                 the smallest uniform(uid, seed, "metaclip-one-text") (pool-wide, via collect/merge of
                 (hash(image key), smallest draw)). Counts stay over all matching texts, as in MetaCLIP 2.
                 Ties (two 53-bit draws equal) keep both. The partial holds one row per matching text.
                 Image keys are polars' 64-bit hash of `image_col` (stable within a polars version).
  target_rows    > 0: t is solved for an expected kept count (MetaCLIP issues #19, #24: "what t gives N pairs?").
                 Expected kept = sum over matched rows of 1 - prod_e (1 - p_e(t)), from the pool's counts and
                 the rows' entry sets (a row with several entries is likelier kept than its entries' counts
                 say); evaluated on a uniform sample of `target_sample` matched rows (the bottom-k by
                 uniform(uid), every row in a smaller pool: exact), bisected over integer t. With languages,
                 the candidate t is the reference language's and the others follow it as above.
Matching is most of the stage's time, so `collect` leaves each shard's matches in the stage folder
(`Stage.cache_put`, `_cache/`) and `apply` takes them instead of matching again; a missing or
mismatching cache (uids, texts, concept list) means matching again, with the same result.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from metadata import concepts
from pipeline.config import ConfigError, check_ranges
from pipeline import shards
from pipeline.stage import Stage, StageError, first_reason, split_by_reason, uniform

log = logging.getLogger("clipcurate.metaclip")

OUT_COL = "metaclip_entries"
MATCHERS = ("tokens", "pyahocorasick", "polars")
DEFAULT_MATCHER = "tokens"
_SPACING_FROM = list(",.;:?!`") + ["\t", "\n", "\r"]
_SPACING_TO = [f" {c} " for c in ",.;:?!`"] + [" ", " ", " "]
_SEP = "\n"  # spacing() removes it from every caption: a safe separator between captions
_PIECE = 20_000  # the "tokens" matcher matches a call's captions in pieces of at most this many (see match)


# ---- matching ------------------------------------------------------------------------------------------
def _spaced_inner(texts) -> pl.Series:
    """spacing() without its outer padding: " " + _spaced_inner(t) + " " == spacing(t)."""
    s = texts if isinstance(texts, pl.Series) else pl.Series("text", texts, dtype=pl.String)
    return s.cast(pl.String).fill_null("").str.replace_many(_SPACING_FROM, _SPACING_TO)  # literal, one pass


def spacing(texts) -> pl.Series:
    """MetaCLIP's spacing() over a column (null -> "  ", as for an empty caption)."""
    return (" " + _spaced_inner(texts) + " ").alias("spaced")


_WS = np.frombuffer(b" \t\n\r", dtype=np.uint8)  # spacing() makes each a space, the token break
_PUNCT = np.frombuffer(b",.;:?!`", dtype=np.uint8)  # spacing() wraps each in spaces: a token of its own


def _tokens(texts) -> tuple[np.ndarray, pa.Array]:
    """(tokens per caption, all tokens) of `_spaced_inner(t).split(" ")` for every caption t, in order,
    without building the spaced strings: numpy over the column's UTF-8 bytes, then one filter.

    The token list of T = _spaced_inner(t) is t cut at every break: one break per space, tab, newline or
    CR (spacing makes each a space), and two per , . ; : ? ! ` (the mark becomes a token of its own); empty
    pieces kept. These are ASCII bytes, never part of a multi-byte UTF-8 character, so this works on bytes.
    With the whitespace bytes taken out of the column's data buffer, every token is a contiguous run of
    what is left, and the breaks are offsets into it: the tokens are an Arrow string array over that
    buffer, no string copied per token. 1.4x faster than polars' replace_many + Arrow's split_pattern at
    100k Flickr8k captions (34 vs 48 ms, one core), which built and then re-split a spaced copy.
    """
    s = texts if isinstance(texts, pl.Series) else pl.Series("text", texts, dtype=pl.String)
    arr = s.cast(pl.String).fill_null("").to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != pa.large_string():
        arr = arr.cast(pa.large_string())
    n = len(arr)
    _, obuf, dbuf = arr.buffers()
    off = np.frombuffer(obuf, dtype=np.int64)[arr.offset: arr.offset + n + 1]
    data = (np.frombuffer(dbuf, dtype=np.uint8)[off[0]: off[-1]] if dbuf is not None and n
            else np.zeros(0, dtype=np.uint8))
    off = off - off[0]
    ws = data == _WS[0]
    for c in _WS[1:]:
        ws |= data == c
    brk = ws.copy()
    for c in _PUNCT:
        brk |= data == c
    ev = np.flatnonzero(brk)  # byte position of every whitespace byte or mark, in order
    ev_ws = ws[ev]
    at = ev - (np.cumsum(ev_ws) - ev_ws)  # its position once the whitespace bytes are out
    per = 2 - ev_ws.astype(np.int64)  # breaks it makes: whitespace 1, a mark 2 (before and after it)
    breaks = np.repeat(at, per)
    upto = np.cumsum(per)
    breaks[upto[~ev_ws] - 1] += 1  # the break after a mark
    ws_at = ev[ev_ws]
    starts = off[:-1] - np.searchsorted(ws_at, off[:-1])  # each caption's start once whitespace is out
    # token boundaries: every caption start and every break, as one sorted run (ties are equal values)
    bounds = np.sort(np.concatenate([starts, breaks, [len(data) - len(ws_at)]]), kind="stable")
    lens = np.diff(np.concatenate([[0], upto])[np.searchsorted(ev, off)]) + 1  # breaks + 1 per caption
    # polars' filter: ~20x numpy's boolean indexing on a 5 MB uint8 array
    kept = pl.Series(data).filter(pl.Series(~ws)).to_numpy()
    flat = pa.LargeStringArray.from_buffers(len(bounds) - 1, pa.py_buffer(bounds), pa.py_buffer(kept))
    return lens, flat


def _lists(n: int, rows: np.ndarray, ids: np.ndarray, n_entries: int) -> pa.ListArray:
    """Sorted unique entry ids per row as list<int32>, from unordered (row, id) pairs."""
    # stable sort (timsort/radix in numpy): the hits arrive as a few runs already in row order (one per
    # token depth), which it merges ~4x faster than the default quicksort sorts them
    key = np.sort(rows.astype(np.int64) * np.int64(n_entries) + ids.astype(np.int64), kind="stable")
    key = key[np.r_[True, key[1:] != key[:-1]]] if len(key) else key  # np.unique: ~50x slower in numpy 2.4
    r = key // n_entries
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(r, minlength=n), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array((key % n_entries).astype(np.int32)),
                                    type=pa.list_(pa.int32()))


class Matcher:
    """Entry list -> matcher state, built once; `match(texts)` -> list<int32> of sorted unique entry ids.

    Backends (identical output, asserted by the tests and the benchmark):
      tokens         the same matches found on tokens instead of characters (see `_match_tokens`).
      pyahocorasick  one automaton over all spaced entries; a shard's spaced captions are joined with "\n"
                     (which spacing removed from every caption, and which no key holds, so no match
                     crosses two captions) and scanned by one `automaton.iter` call; end positions map back
                     to captions with `np.searchsorted`. Its iterator yields one Python tuple per hit: it
                     has no vectorised API for overlapping hits.
      polars         polars' Aho-Corasick, `str.extract_many(..., overlapping=True)`; hit strings -> ids by
                     an Enum cast. polars rebuilds its automaton on every call (~0.5 s for 150k entries).
    """

    def __init__(self, entries: list[str], backend: str = DEFAULT_MATCHER):
        if backend not in MATCHERS:
            raise StageError(f"metaclip: matcher must be one of {', '.join(MATCHERS)}, not '{backend}'")
        self.backend = backend
        self.n = len(entries)
        # keys holding \t \n \r can never match (spacing removed those from every caption): left out, so
        # that the "\n" separator can never be part of a match
        keep = [i for i, e in enumerate(entries) if not any(c in e for c in "\t\n\r")]
        self.spaced = [f" {entries[i]} " for i in keep]
        self.ids = np.asarray(keep, dtype=np.int32)
        if backend == "pyahocorasick":
            import ahocorasick

            a = ahocorasick.Automaton(ahocorasick.STORE_INTS)
            for i, key in zip(keep, self.spaced):  # once per process: pyahocorasick has no bulk add
                a.add_word(key, i)
            a.make_automaton()
            self.automaton = a
        elif backend == "polars":
            self.enum = pl.Enum(self.spaced)
        else:
            self._build_trie([entries[i] for i in keep], self.ids)

    def _build_trie(self, entries: list[str], ids: np.ndarray) -> None:
        """A trie over entries split on " " (token ids: see `_build_vocab`); once per process."""
        vocab: dict[str, int] = {}
        seqs = [[vocab.setdefault(t, len(vocab)) for t in e.split(" ")] for e in entries]
        self._build_vocab(list(vocab))
        V = len(vocab)  # token id V stands for "in no entry"
        W = V + 1  # edge key = node * W + token: token V can never be part of an edge's key
        edges: dict[int, int] = {}  # node * W + token -> child node (root = 0)
        terminal = [-1]
        for seq, eid in zip(seqs, ids.tolist()):  # Python loop: build only, ~0.5 s for 150k entries
            node = 0
            for tok in seq:
                key = node * W + tok
                child = edges.get(key)
                if child is None:
                    child = edges[key] = len(terminal)
                    terminal.append(-1)
                node = child
            terminal[node] = eid
        keys = np.fromiter(edges.keys(), dtype=np.int64, count=len(edges))
        kids = np.fromiter(edges.values(), dtype=np.int64, count=len(edges))
        self.V, self.W, self.edge_child = V, W, kids
        # pandas' Index is a hash table with a vectorised lookup (khash): ~8x numpy.searchsorted on 160k keys
        self.edge_index = pd.Index(keys)
        # ... and before it, a one-hash Bloom filter over the edge keys (a bool per slot, >= 16 slots per
        # key: ~6% of the slots set), read by direct indexing: most walks die at depth 2 (on WordNet, 85% of
        # the (node, token) pairs tried there are no edge), and the filter drops ~94% of those for the cost
        # of one gather, so pandas hashes only what may be an edge
        slots = 1 << max(16, (16 * max(len(keys), 1) - 1).bit_length())
        self.edge_mask = slots - 1
        self.edge_maybe = np.zeros(slots, dtype=bool)
        self.edge_maybe[keys & self.edge_mask] = True
        self.terminal = np.asarray(terminal, dtype=np.int64)
        self.has_child = np.zeros(len(terminal), dtype=bool)
        self.has_child[keys // W] = True
        # depth 1 by direct indexing over token ids, the busiest step; index V stands for "no such token"
        root = keys < W
        self.first_node = np.full(V + 1, -1, dtype=np.int64)
        self.first_node[keys[root]] = kids[root]
        known = self.first_node >= 0
        self.first_entry = np.where(known, self.terminal[self.first_node], -1)
        self.first_goes_on = known & self.has_child[self.first_node]

    def _build_vocab(self, tokens: list[str]) -> None:
        """Token -> id lookup, built once: polars' 64-bit string hash of each token in a pandas Index.

        Casting to a `pl.Enum` of the tokens (what this did before) rebuilds polars' category hash map on
        every call: ~7.5 ms a call for 98k WordNet tokens, 30% of a 10k-caption call. Here the hash table is
        built once; per call, only the call's distinct tokens are looked up (`_token_ids`). A found token is
        compared, as a string, with the vocabulary token of that id (one vectorised `==`), so a hash
        collision with an unknown token can never make a false match: the lookup is exact. A seed under
        which two vocabulary tokens collide is skipped at build time. The hashes are only ever compared
        within this process (polars' hash is stable within a polars version; each worker builds its own).
        """
        self.vocab = pl.Series("token", tokens, dtype=pl.String)
        for seed in range(16):
            index = pd.Index(self.vocab.hash(seed=seed).to_numpy())
            if index.is_unique:
                break
        else:  # 16 seeds, each with a 64-bit collision among the vocabulary: not expected to ever happen
            raise StageError("metaclip: could not hash the entry tokens without a collision")
        self.hash_seed, self.token_index = seed, index

    def _token_ids(self, tokens: pa.Array) -> np.ndarray:
        """Token id per token (a string array without nulls); self.V for a token that is in no entry.

        Arrow's `dictionary_encode` (one hash pass, in C++) gives each token the code of its distinct
        string; only the distinct strings (a few % of the tokens: 9k distinct among 1.37M tokens in 100k
        Flickr8k captions) are hashed, looked up and compared with the vocabulary, and the codes then
        index that small table. 1.4x faster at 100k captions than hashing and checking every token.
        """
        enc = pc.dictionary_encode(tokens)
        distinct = pl.Series(enc.dictionary)
        j = self.token_index.get_indexer(distinct.hash(seed=self.hash_seed).to_numpy())
        miss = j < 0
        j[miss] = 0
        same = (self.vocab.gather(j) == distinct).to_numpy()  # exact: a hash collision is no match
        j[miss | ~same] = self.V
        return j[enc.indices.to_numpy()]

    def _match_tokens(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """(row, entry) hits via the token trie.

        " " + e + " " is a substring of spacing(text) = " " + T + " " (T = `_spaced_inner(text)`) exactly
        when e.split(" ") occurs as a contiguous run of T.split(" "): spaces are the only token breaks,
        e's own spaces must fall on them, and the padding supplies the spaces around T's first and last
        pieces. Empty pieces (double spaces) are tokens like any other, so entries with leading, trailing
        or double spaces match as in the reference. Captions are split without building T (`_tokens`)
        and the tokens become ids (unknown -> V, `_token_ids`); then every start position walks
        the trie at once, one vectorised numpy step per token depth (edges looked up in a hash table,
        pandas' Index, behind a Bloom filter), never past its caption's last token. Splitting T rather than
        the padded text spares two empty tokens per caption (~13% of the tokens).
        """
        lens, flat = _tokens(texts)
        tid = self._token_ids(flat)
        W = self.W
        goes_on = np.ones(len(tid), dtype=bool)  # False on each caption's last token: no walk crosses it
        goes_on[np.cumsum(lens) - 1] = False
        # depth 1 over the whole token array (no index arrays yet): one-token entries, and where walks go on
        e1 = self.first_entry[tid]
        h = np.flatnonzero(e1 >= 0)
        hit_pos, hit_entry = [h], [e1[h]]
        start = np.flatnonzero(self.first_goes_on[tid] & goes_on)
        node = self.first_node[tid[start]]
        depth = 1  # tokens consumed by every walk still going; none has reached its caption's last token
        while len(start):
            key = node * W + tid[start + depth]  # in bounds: the walk's last token was not its caption's last
            ok = self.edge_maybe[key & self.edge_mask]
            start, key = start[ok], key[ok]
            j = self.edge_index.get_indexer(key)
            ok = j >= 0
            start, node = start[ok], self.edge_child[j[ok]]
            term = self.terminal[node]
            h = term >= 0
            hit_pos.append(start[h])
            hit_entry.append(term[h])
            go = self.has_child[node] & goes_on[start + depth]  # leaves, and caption ends, stop here
            start, node = start[go], node[go]
            depth += 1
        rows = np.repeat(np.arange(len(lens)), lens)
        hp = np.concatenate(hit_pos)
        return rows[hp], np.concatenate(hit_entry)

    def match(self, texts) -> pa.ListArray:
        n = len(texts)
        if n == 0 or len(self.spaced) == 0:
            return pa.array([[]] * n, type=pa.list_(pa.int32()))
        if self.backend == "tokens":
            # in pieces of _PIECE captions: a 100k-caption call's working arrays (1.4M tokens, 8 bytes each)
            # are above glibc's mmap threshold, so every call page-faults them in afresh (5.6k minor faults
            # per 100k Flickr8k captions; ~800 in 16k pieces). 300k captions in 100k calls, one core, CPU
            # time, 7 interleaved rounds, median: 376 ms whole, 359 in 16,384-caption pieces, 350 in 20,000,
            # 373 in 25,000, 429 in 33,334 (a loaded 2-core VM: differences of a few % are noise; 8,192
            # pieces are slower again, each piece's fixed cost, ~0.6 ms, weighing).
            s = texts if isinstance(texts, pl.Series) else pl.Series("text", texts, dtype=pl.String)
            pieces = []
            for i in range(0, n, _PIECE):
                piece = s.slice(i, _PIECE)
                rows, ids = self._match_tokens(piece)
                pieces.append(_lists(len(piece), rows, ids, self.n))
            return pieces[0] if len(pieces) == 1 else pa.concat_arrays(pieces)
        inner = _spaced_inner(texts)
        spaced = (" " + inner + " ").alias("spaced")
        if self.backend == "polars":
            hits = spaced.str.extract_many(self.spaced, overlapping=True)
            offs = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(hits.list.len().to_numpy(), out=offs[1:])
            rows = np.repeat(np.arange(n), np.diff(offs))
            codes = hits.explode(empty_as_null=False).cast(self.enum).to_physical().to_numpy()
            return _lists(n, rows, self.ids[codes], self.n)
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(spaced.str.len_chars().to_numpy()[:-1].astype(np.int64) + 1, out=starts[1:])
        big = spaced.str.join(_SEP).item()
        # the automaton's iterator is the one per-hit Python step: pyahocorasick yields (end, id) tuples
        flat = np.fromiter(itertools.chain.from_iterable(self.automaton.iter(big)), dtype=np.int64)
        ends, ids = flat[0::2], flat[1::2]
        rows = np.searchsorted(starts, ends, side="right") - 1
        return _lists(n, rows, ids, self.n)


# ---- MetaCLIP 2's tail share <-> threshold ----------------------------------------------------------------
def t_to_p(counts: np.ndarray, t: int) -> float:
    """Share of all matches that fall in tail entries (count < t)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return float(counts[counts < t].sum() / total) if total else 0.0


def p_to_t(counts: np.ndarray, p: float) -> int:
    """The count at which the cumulative share of the ascending counts is nearest p (first on ties)."""
    c = np.sort(np.asarray(counts, dtype=np.int64))
    if c.sum() == 0:
        return 1
    share = np.cumsum(c) / c.sum()
    return max(int(c[int(np.abs(share - p).argmin())]), 1)


def entry_probs(counts: np.ndarray, t: int) -> np.ndarray:
    """p_e = t / max(count_e, t): 1 for tail entries, t / count for head entries."""
    return t / np.maximum(np.asarray(counts, dtype=np.float64), float(t))


# ---- the stage -----------------------------------------------------------------------------------------------
class MetaClipStage(Stage):
    """Adds `metaclip_entries`; keeps each pair with MetaCLIP's balancing probability."""

    name = "metaclip"
    requires = {"uid": pa.string(), "text": pa.string()}

    @dataclasses.dataclass
    class Config:
        entries: str = ""  # concept list: "" = WordNet (built and cached); a .json list or one-a-line file
        t: int = 20000  # head/tail threshold (MetaCLIP: 20k for 400M pairs; scale it for small pools)
        matcher: str = DEFAULT_MATCHER  # or "pyahocorasick" / "polars" (Aho-Corasick automata): same output, slower
        language_col: str = ""  # column with a language code: per-language counts and t (MetaCLIP 2)
        tail_share: float = 0.0  # > 0: every language's t from this tail share; 0: from t on reference_language
        reference_language: str = "en"  # the language `t` applies to (MetaCLIP 2: English)
        one_text_per_image: bool = False  # keep one matching alt-text per image (MetaCLIP 2)
        image_col: str = "url"  # what identifies an image for one_text_per_image
        target_rows: int = 0  # > 0: solve t so that the expected kept count is this (t is then not used)
        target_sample: int = 200_000  # matched rows (a uniform sample by uid) the solver evaluates; all when fewer
        score_col: str = ""  # e.g. "dfn_score" (dfn with score_only): balance among the rows at or above min_score
        min_score: float | None = None  # rows below it (or unscored) are `low_score`, and are not counted

        def __post_init__(self):
            check_ranges("metaclip", self, t=(1, None), tail_share=(0, 1), target_rows=(0, None),
                         target_sample=(1, None))
            if self.tail_share >= 1:  # a share of the matches, below all of them
                raise ConfigError(f"config [metaclip] tail_share = {self.tail_share!r}: must be at least 0 and below 1")
            if bool(self.score_col) != (self.min_score is not None):
                raise ConfigError("config [metaclip] score_col and min_score go together: the column holding a "
                                  "quality score (e.g. \"dfn_score\") and the cut to balance above")
            if self.target_rows and self.tail_share:
                raise ConfigError("config [metaclip] target_rows and tail_share both set: tail_share fixes every "
                                  "language's t, so there is no t left to solve (set one of them)")

    def __init__(self, config: Any = None, seed: int = 0):
        super().__init__(config, seed)
        c = self.config  # t and tail_share are range-checked by Config (config [metaclip] ...)
        if c.matcher not in MATCHERS:
            raise StageError(f"metaclip: matcher must be one of {', '.join(MATCHERS)}, not '{c.matcher}'")
        self._entries: list[str] | None = None
        self.matcher: Matcher | None = None

    # -- resources ------------------------------------------------------------------------------------------
    @property
    def entries(self) -> list[str]:
        if self._entries is None:
            try:
                self._entries = concepts.resolve_entries(self.config.entries)
            except concepts.ConceptListError as e:
                raise StageError(f"metaclip: {e}") from None
        return self._entries

    def setup(self) -> None:
        """The matcher, built once per worker process (the runner keeps one ready instance per process)."""
        self.matcher = Matcher(self.entries, self.config.matcher)

    @functools.cached_property
    def entries_sha256(self) -> str:
        """The list's identity: in the fingerprint, and the key of the pass-1 match cache."""
        return concepts.entries_sha256(self.entries)

    def fingerprint_parts(self) -> dict:
        return {"entries_sha256": self.entries_sha256}

    def match(self, table: pa.Table) -> pa.ListArray:
        self.ensure_ready()
        return self.matcher.match(pl.from_arrow(table.column("text")))

    # -- pass 1 ---------------------------------------------------------------------------------------------
    def _languages(self, table: pa.Table) -> pl.Series | None:
        col = self.config.language_col
        if not col:
            return None
        if col not in table.column_names:
            self.notes.append(f"language column '{col}' absent: one t for all texts")
            return None
        return pl.from_arrow(table.column(col)).cast(pl.String).fill_null("")

    def _choice_draw(self, uids) -> np.ndarray:
        return uniform(pl.from_arrow(uids), self.seed, "metaclip-one-text")

    def _image_keys(self, table: pa.Table) -> np.ndarray:
        col = self.config.image_col
        if col not in table.column_names:
            raise StageError(f"metaclip: one_text_per_image needs the image column '{col}' (set image_col)")
        s = pl.from_arrow(table.column(col))
        return s.hash(seed=0).to_numpy().astype(np.uint64)

    def _below_cut(self, table: pa.Table) -> np.ndarray | None:
        """Rows under the quality cut (`score_col` < `min_score`, or no score), or None without a cut."""
        c = self.config
        if not c.score_col:
            return None
        if c.score_col not in table.column_names:
            raise StageError(f"metaclip: score_col '{c.score_col}' is not a column of the shard (run the scorer "
                             "first, e.g. dfn with score_only = true)")
        v = pc.fill_null(pc.cast(table.column(c.score_col), pa.float64()), float("-inf")).to_numpy(zero_copy_only=False)
        return ~(v >= float(c.min_score))

    def collect(self, table: pa.Table) -> dict:
        """{"langs": {lang: (entry ids, counts)}, "images": (key hash, smallest draw) or None}. Under a quality
        cut (`score_col`/`min_score`) only the rows above it are counted, sampled and offered to an image."""
        lists = self.match(table)
        self.cache_put("matches", table, {OUT_COL: lists}, self.entries_sha256)
        below = self._below_cut(table)
        if below is not None and below.any():  # the rows under the cut match nothing, for the pool's statistics
            lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
            n_all = np.diff(lists.offsets.to_numpy()) * ~below
            kept_values = lists.values.to_numpy()[np.repeat(~below, np.diff(lists.offsets.to_numpy()))]
            lists = _lists_from(n_all, kept_values)
        n_per_row = np.diff(lists.offsets.to_numpy())
        ids = lists.values.to_numpy()
        langs = self._languages(table)
        out: dict = {"n": len(self.entries), "langs": {}, "images": None}
        if langs is None:
            out["langs"][""] = _sparse(np.bincount(ids, minlength=len(self.entries)))
        else:
            row_lang = np.repeat(langs.to_numpy(), n_per_row)
            for lang in np.unique(langs.to_numpy()):
                out["langs"][str(lang)] = _sparse(np.bincount(ids[row_lang == lang], minlength=len(self.entries)))
        if self.config.one_text_per_image:
            m = n_per_row > 0
            out["images"] = _min_by_key(self._image_keys(table)[m], self._choice_draw(table.column("uid"))[m])
        if self.config.target_rows:
            out["sample"] = self._target_sample(table, lists, n_per_row, langs)
        return out

    def _target_sample(self, table: pa.Table, lists: pa.ListArray, n_per_row: np.ndarray, langs) -> dict:
        """The shard's matched rows with the `target_sample` smallest draws of uniform(uid, seed, salt): merged
        pool-wide, the bottom-k of all matched rows, a uniform sample of fixed size (all of them in a smaller
        pool). Each row carries its entry ids (and language, image choice) for the t solver."""
        c = self.config
        matched = np.flatnonzero(n_per_row > 0)
        draw = uniform(pl.from_arrow(pc.take(table.column("uid"), pa.array(matched))), self.seed,
                       "metaclip-target-sample") if len(matched) else np.zeros(0)
        if len(matched) > c.target_sample:
            keep = np.sort(np.argpartition(draw, c.target_sample - 1)[: c.target_sample])
            matched, draw = matched[keep], draw[keep]
        sub = pc.take(lists, pa.array(matched))
        return {
            "matched_rows": int((n_per_row > 0).sum()),
            "draw": draw,
            "lengths": n_per_row[matched].astype(np.int64),
            "ids": sub.flatten().to_numpy().astype(np.int32),
            "lang": langs.to_numpy()[matched] if langs is not None else None,
            "image": (self._image_keys(table)[matched], self._choice_draw(table.column("uid"))[matched])
            if c.one_text_per_image else None,
        }

    def merge(self, partials: list) -> dict:
        n = partials[0]["n"]
        langs: dict[str, np.ndarray] = {}
        for part in partials:
            for lang, (ids, cnt) in part["langs"].items():
                dense = langs.setdefault(lang, np.zeros(n, dtype=np.int64))
                dense[ids] += cnt  # ids are unique within a partial
        images = [p["images"] for p in partials if p["images"] is not None]
        merged_images = None
        if images:
            merged_images = _min_by_key(np.concatenate([k for k, _ in images]), np.concatenate([d for _, d in images]))
        out = {"n": n, "langs": {k: _sparse(v) for k, v in sorted(langs.items())}, "images": merged_images}
        samples = [p["sample"] for p in partials if p.get("sample") is not None]
        if samples:
            out["sample"] = _merge_samples(samples, self.config.target_sample)
        return out

    # -- stats on disk ----------------------------------------------------------------------------------------
    def thresholds(self, langs: dict[str, np.ndarray], t: int | None = None) -> tuple[dict[str, int], float | None]:
        """t per language (MetaCLIP 2), and the tail share used (None with one language). `t` (the solver's
        candidate) stands in for the configured t."""
        c = self.config
        t = int(c.t if t is None else t)
        if not c.language_col or list(langs) == [""]:  # no language information: one t
            return {"": t}, None
        if c.tail_share > 0:
            p = float(c.tail_share)
            return {k: p_to_t(v, p) for k, v in langs.items()}, p
        ref = langs.get(c.reference_language)
        p = t_to_p(ref if ref is not None else sum(langs.values()), t)
        return {k: (t if k == c.reference_language else p_to_t(v, p)) for k, v in langs.items()}, p

    def save_stats(self, stats: dict, folder: str) -> None:
        n = stats["n"]
        langs = {k: _dense(v, n) for k, v in stats["langs"].items()}
        total = sum(langs.values()) if langs else np.zeros(n, dtype=np.int64)
        target = None
        if self.config.target_rows and stats.get("sample") is not None:
            t_solved, expected = self.solve_t(stats["sample"], langs, stats.get("images"))
            target = {"target_rows": int(self.config.target_rows), "t": t_solved, "expected_kept": expected,
                      "sample_rows": int(len(stats["sample"]["draw"])),
                      "matched_rows": int(stats["sample"]["matched_rows"])}
            ts, p = self.thresholds(langs, t_solved)
        else:
            ts, p = self.thresholds(langs)
        shards.write_shard(
            pa.table({"entry": pa.array(np.arange(n, dtype=np.int32)), "text": pa.array(self.entries, pa.string()),
                      "count": pa.array(np.asarray(total, dtype=np.int64))}),
            shards.join(folder, "entry_counts.parquet"),
        )
        if self.config.language_col:
            parts = [pl.DataFrame({"language": lang, "entry": np.flatnonzero(v).astype(np.int32),
                                   "count": v[np.flatnonzero(v)].astype(np.int64)})
                     for lang, v in sorted(langs.items())]
            by_lang = pl.concat(parts) if parts else pl.DataFrame(
                schema={"language": pl.String, "entry": pl.Int32, "count": pl.Int64})
            shards.write_shard(by_lang.to_arrow(), shards.join(folder, "entry_counts_by_language.parquet"))
        if stats["images"] is not None:
            keys, draws = stats["images"]
            shards.write_shard(pa.table({"image_key": pa.array(keys, pa.uint64()), "draw": pa.array(draws)}),
                               shards.join(folder, "image_choice.parquet"))
        shards.write_json({"t": ts, "tail_share": p, "entries": n,
                           "entries_sha256": concepts.entries_sha256(self.entries), "target": target},
                          shards.join(folder, "thresholds.json"))

    # -- t for a target size (MetaCLIP issues #19, #24) ---------------------------------------------------------
    def expected_kept(self, sample: dict, langs: dict[str, np.ndarray], images, t: int) -> float:
        """Expected kept rows of the pool at `t`: sum over the sampled rows of 1 - prod_e (1 - p_e), scaled by
        matched rows / sampled rows (exact when the sample is every matched row). A row that is not its image's
        chosen text (one_text_per_image) counts 0, as apply drops it."""
        return self._expected(self._sample_parts(sample, images), langs, t)

    def _sample_parts(self, sample: dict, images) -> dict:
        """What the expectation needs of the sample and does not depend on t (computed once per solve)."""
        n_rows = len(sample["draw"])
        row = np.repeat(np.arange(n_rows), sample["lengths"])
        chosen = None
        if sample.get("image") is not None and images is not None:
            chosen = _is_chosen_text(sample["image"][0], sample["image"][1], images)
        return {"n_rows": n_rows, "row": row, "ids": sample["ids"].astype(np.int64), "chosen": chosen,
                "row_lang": None if sample["lang"] is None else np.asarray(sample["lang"])[row],
                "matched_rows": sample["matched_rows"]}

    def _expected(self, parts: dict, langs: dict[str, np.ndarray], t: int) -> float:
        if parts["n_rows"] == 0:
            return 0.0
        ts, _ = self.thresholds(langs, t)
        row_lang = None if list(ts) == [""] else parts["row_lang"]
        p = _match_probs(parts["ids"], row_lang, langs, ts, t, len(self.entries))
        with np.errstate(divide="ignore"):
            log_miss = np.bincount(parts["row"], weights=np.log1p(-p), minlength=parts["n_rows"])  # -inf: p = 1
        keep = 1.0 - np.exp(log_miss)
        if parts["chosen"] is not None:
            keep = keep * parts["chosen"]
        return float(keep.sum() * parts["matched_rows"] / parts["n_rows"])

    def solve_t(self, sample: dict, langs: dict[str, np.ndarray], images) -> tuple[int, float]:
        """(t, expected kept): the t whose expected kept count is nearest `target_rows`. The expectation rises
        with t (every p_e does), so a bisection over integer t in [1, largest count] finds it; past the
        largest count every pair is kept, and a target above that keeps everything."""
        parts = self._sample_parts(sample, images)
        kept = functools.cache(lambda t: self._expected(parts, langs, t))
        target = float(self.config.target_rows)
        hi = max(1, max((int(v.max()) for v in langs.values() if len(v)), default=1))
        if self.config.language_col and len(langs) > 1:
            hi = max(hi, int(sum(langs.values()).max()))  # a reference t above every count
        if kept(hi) <= target:
            return hi, kept(hi)
        lo = 1
        if kept(lo) >= target:
            return lo, kept(lo)
        while hi - lo > 1:  # invariant: K(lo) < target <= K(hi)
            mid = (lo + hi) // 2
            if kept(mid) < target:
                lo = mid
            else:
                hi = mid
        return (lo, kept(lo)) if target - kept(lo) < kept(hi) - target else (hi, kept(hi))

    def load_stats(self, folder: str) -> dict:
        counts = shards.read_shard(shards.join(folder, "entry_counts.parquet"))
        n = counts.num_rows
        langs: dict[str, Any]
        by_lang = shards.join(folder, "entry_counts_by_language.parquet")
        if self.config.language_col and shards.exists(by_lang):
            df = pl.from_arrow(shards.read_shard(by_lang))
            langs = {str(k[0]): (g["entry"].to_numpy(), g["count"].to_numpy()) for k, g in df.group_by("language")}
        else:
            langs = {"": _sparse(counts.column("count").to_numpy())}
        images = None
        img = shards.join(folder, "image_choice.parquet")
        if shards.exists(img):
            t = shards.read_shard(img)
            images = (t.column("image_key").to_numpy(), t.column("draw").to_numpy())
        th = shards.read_json(shards.join(folder, "thresholds.json")) or {}
        solved = th.get("t") if th.get("target") else None  # the solver's t per language (target_rows)
        return {"n": n, "langs": langs, "images": images, "t": solved}

    # -- pass 2 ---------------------------------------------------------------------------------------------
    def apply(self, table: pa.Table, stats: dict) -> tuple[pa.Table, pa.Table]:
        cached = self.cache_take("matches", table, self.entries_sha256)
        # (Parquet names a list's child "element": cast back to list<item: int32>, the type match() returns)
        lists = self.match(table) if cached is None else cached.column(OUT_COL).combine_chunks().cast(pa.list_(pa.int32()))
        n = table.num_rows
        n_per_row = np.diff(lists.offsets.to_numpy())
        ids = lists.values.to_numpy().astype(np.int64)
        row = np.repeat(np.arange(n), n_per_row)
        langs_dense = {k: _dense(v, stats["n"]) for k, v in stats["langs"].items()}
        ts = stats.get("t") or self.thresholds(langs_dense)[0]
        lang_col = self._languages(table)
        row_lang = None if lang_col is None else np.repeat(lang_col.to_numpy(), n_per_row)
        p = _match_probs(ids, row_lang, langs_dense, ts, self.config.t, stats["n"])
        uid_rep = pl.from_arrow(pc.take(table.column("uid"), pa.array(row)))
        u = uniform(uid_rep, self.seed, salt=ids)
        sampled = np.bincount(row, weights=(u < p), minlength=n) > 0
        no_entry = n_per_row == 0
        other_text = None
        if self.config.one_text_per_image and stats.get("images") is not None:
            chosen = _is_chosen_text(self._image_keys(table), self._choice_draw(table.column("uid")), stats["images"])
            other_text = (~no_entry) & ~chosen
        reason = first_reason(n, [("low_score", self._below_cut(table)), ("no_entry", no_entry),
                                  ("other_text_of_image", other_text), ("balanced_out", ~sampled)])
        out = table.append_column(OUT_COL, lists) if OUT_COL not in table.column_names else table.set_column(
            table.column_names.index(OUT_COL), OUT_COL, lists)
        return split_by_reason(out, reason)

    # -- report -----------------------------------------------------------------------------------------------
    def report(self, stage_dir: str, out_dir: str) -> dict:
        """Entry counts before/after balancing (after = expected kept matches min(count, t) per entry),
        cumulative share of matches by rank, top entries and the tail share; CSV of every matched entry."""
        return _report(self, stage_dir, out_dir)


def _match_probs(ids: np.ndarray, row_lang: np.ndarray | None, langs: dict[str, np.ndarray], ts: dict, t: int,
                 n: int) -> np.ndarray:
    """p_e of each (row, entry) match: its entry's keep probability among the counts of the row's language (all
    counts summed when rows have no language), at that language's t. One home for apply and the t solver."""
    p = np.empty(len(ids), dtype=np.float64)
    if row_lang is None:
        counts = sum(langs.values()) if langs else np.zeros(n, dtype=np.int64)
        p[:] = entry_probs(counts, ts.get("", t))[ids]
        return p
    for lang in np.unique(row_lang):
        m = row_lang == lang
        p[m] = entry_probs(langs.get(str(lang), np.zeros(n, dtype=np.int64)), ts.get(str(lang), t))[ids[m]]
    return p


def _is_chosen_text(keys: np.ndarray, draws: np.ndarray, images: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Whether each row is its image's chosen text (one_text_per_image): its draw is the image's best one."""
    best = pl.DataFrame({"k": np.asarray(keys, dtype=np.uint64), "d": draws}).join(
        pl.DataFrame({"k": np.asarray(images[0], dtype=np.uint64), "best": images[1]}), on="k", how="left",
        maintain_order="left")
    return best["d"].to_numpy() == best["best"].fill_null(-1.0).to_numpy()


def _sparse(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(dense)
    return idx.astype(np.int32), np.asarray(dense)[idx].astype(np.int64)


def _dense(sparse, n: int) -> np.ndarray:
    ids, cnt = sparse
    out = np.zeros(n, dtype=np.int64)
    out[np.asarray(ids, dtype=np.int64)] = cnt
    return out


def _lists_from(n_per_row: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """list<int32> with n_per_row[i] of `values` (in order) in row i."""
    offsets = np.zeros(len(n_per_row) + 1, dtype=np.int32)
    np.cumsum(n_per_row, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values.astype(np.int32), pa.int32()))


def _merge_samples(samples: list[dict], k: int) -> dict:
    """Bottom-k (by draw) of several bottom-k samples: the bottom-k of their union."""
    draw = np.concatenate([s["draw"] for s in samples])
    lengths = np.concatenate([s["lengths"] for s in samples])
    ids = np.concatenate([s["ids"] for s in samples])
    order = np.argsort(draw, kind="stable")[:k]
    order.sort()  # the rows keep their order, so each one's entry ids stay a contiguous run
    chosen = np.zeros(len(draw), dtype=bool)
    chosen[order] = True
    out = {"matched_rows": sum(s["matched_rows"] for s in samples), "draw": draw[order], "lengths": lengths[order],
           "ids": ids[np.repeat(chosen, lengths)], "lang": None, "image": None}
    if samples[0]["lang"] is not None:
        out["lang"] = np.concatenate([np.asarray(s["lang"]) for s in samples])[order]
    if samples[0]["image"] is not None:
        out["image"] = (np.concatenate([s["image"][0] for s in samples])[order],
                        np.concatenate([s["image"][1] for s in samples])[order])
    return out


def _min_by_key(keys: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    df = pl.DataFrame({"k": keys.astype(np.uint64), "d": draws}).group_by("k").agg(pl.col("d").min()).sort("k")
    return df["k"].to_numpy(), df["d"].to_numpy()


def _report(stage: MetaClipStage, stage_dir: str, out_dir: str) -> dict:
    stats_dir = shards.join(stage_dir, "stats")
    path = shards.join(stats_dir, "entry_counts.parquet")
    if not shards.exists(path):
        return {"figures": [], "tables": []}
    df = pl.from_arrow(shards.read_shard(path))
    th = shards.read_json(shards.join(stats_dir, "thresholds.json")) or {}
    ts = th.get("t", {"": stage.config.t})
    t = int(ts.get("", ts.get(stage.config.reference_language, stage.config.t)))
    per_lang = len(ts) > 1 or "" not in ts
    df = df.filter(pl.col("count") > 0).with_columns(
        (pl.lit(float(t)) / pl.max_horizontal("count", pl.lit(t)).cast(pl.Float64)).alias("p"),
        pl.min_horizontal("count", pl.lit(t)).alias("expected_after"))
    df = df.sort(["count", "entry"], descending=[True, False]).with_row_index("rank", offset=1)
    total = int(df["count"].sum()) if df.height else 0
    total_after = int(df["expected_after"].sum()) if df.height else 0
    head = df.filter(pl.col("count") >= t)
    tail_share = 1.0 - (int(head["count"].sum()) / total) if total else 0.0
    os.makedirs(out_dir, exist_ok=True)
    csv = os.path.join(out_dir, "metaclip_entry_counts.csv")
    df.select("rank", "entry", "text", "count", "p", "expected_after").write_csv(csv)
    tables = []
    target = th.get("target")
    if target:
        actual = (shards.read_json(shards.join(stage_dir, "_manifest.json")) or {}).get("rows_out")
        off = f" ({100 * (actual - target['expected_kept']) / max(target['expected_kept'], 1):+.2f}%)" if actual is not None else ""
        tables.append(("t for a target size", "\n".join([
            "| target_rows | t solved | expected kept | actual kept | sample (matched rows) |",
            "|---:|---:|---:|---:|---|",
            f"| {target['target_rows']} | {target['t']} | {target['expected_kept']:.1f} | "
            f"{actual if actual is not None else '(not run)'}{off} | {target['sample_rows']} of {target['matched_rows']} |",
        ])))
    tables += [
        ("entry counts: head and tail", "\n".join([
            "| t | matched entries | head entries (count >= t) | matches | tail share of matches (count < t) "
            "| expected matches after balancing |", "|---:|---:|---:|---:|---:|---:|",
            f"| {t}{' (per language: ' + ', '.join(f'{k or chr(34)*2}={v}' for k, v in sorted(ts.items())) + ')' if per_lang else ''} "
            f"| {df.height} | {head.height} | {total} | {100 * tail_share:.2f}% | {total_after} |",
        ])),
        (f"top entries (before: matched texts; after: expected kept min(count, t); all in {os.path.basename(csv)})",
         "\n".join(["| rank | entry | text | before | after | share before |", "|---:|---:|---|---:|---:|---:|"] + [
             f"| {r} | {e} | {x.replace('|', '&#124;')} | {c} | {a} | {100 * c / total:.2f}% |"
             for r, e, x, c, a in df.head(20).select("rank", "entry", "text", "count", "expected_after").iter_rows()
         ])),
    ]
    figures = []
    if df.height:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rank = df["rank"].to_numpy()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.loglog(rank, df["count"].to_numpy(), label="before: texts matching the entry", color="#4c72b0")
        ax.loglog(rank, df["expected_after"].to_numpy(), label="after: expected kept, min(count, t)", color="#dd8452")
        ax.axhline(t, color="grey", ls="--", lw=1, label=f"t = {t}")
        ax.set_xlabel("entry rank (by count before balancing)")
        ax.set_ylabel("matches")
        ax.set_title(f"metaclip: {df.height} matched entries, {head.height} above t; tail share {100 * tail_share:.1f}%")
        ax.legend()
        fig.tight_layout()
        png1 = os.path.join(out_dir, "metaclip_entry_counts.png")
        fig.savefig(png1, dpi=100)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.semilogx(rank, np.cumsum(df["count"].to_numpy()) / max(total, 1), label="before", color="#4c72b0")
        ax.semilogx(rank, np.cumsum(df["expected_after"].to_numpy()) / max(total_after, 1), label="after (expected)",
                    color="#dd8452")
        if head.height:
            ax.axvline(head.height, color="grey", ls="--", lw=1, label=f"last entry with count >= t ({head.height})")
        ax.set_xlabel("entry rank")
        ax.set_ylabel("cumulative share of matches")
        ax.set_ylim(0, 1.02)
        ax.legend()
        fig.tight_layout()
        png2 = os.path.join(out_dir, "metaclip_cumulative_share.png")
        fig.savefig(png2, dpi=100)
        plt.close(fig)
        figures = [("entry counts before and after balancing (log-log)", png1),
                   ("cumulative share of matches by entry rank", png2)]
    return {"figures": figures, "tables": tables, "csv": csv}


STAGE = MetaClipStage
