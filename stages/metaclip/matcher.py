"""metaclip's matcher: which entries of the concept list each caption holds, as MetaCLIP's substr_matching.py.

Matching gives exactly the entry-id sets of facebookresearch/MetaCLIP's `substr_matching.py` on the same list
(DESIGN.md, section "metaclip"):
  spacing(text)   " " + text + " ", each of , . ; : ? ! ` wrapped in spaces, tab/newline/CR -> space; no
                  lower-casing (case-sensitive), quotes, brackets, apostrophes and hyphens untouched.
  match           entry e matches when " " + e + " " is a substring of spacing(text), overlapping matches
                  included.
The reference spaces and matches caption by caption in Python, with one Aho-Corasick automaton. Here spacing
is one vectorised `str.replace_many` over the column (one pass equals MetaCLIP's ten sequential `str.replace`
calls, since each only inserts spaces around its own character, or replaces it by a space), and matching is a
token trie walked with numpy over a whole shard (`Matcher._match_tokens`), on tokens cut from the caption bytes
without building the spaced text (`_tokens`). DESIGN.md names the automaton; the trie gives the same sets and
is the fastest. Two automata, pyahocorasick's and polars' `extract_many`, were its contenders: they live in
bench/contender_matchers.py, where bench/bench_metaclip.py times them and tests/test_metaclip_contenders.py
checks they still agree.
Its cost per call is proportional to the call's captions: everything sized by the entry list (trie, token hash
table, edge filter) is built once per process. bench/bench_metaclip.py times it against MetaCLIP's per-caption
loop and the contenders, on the captions it was tuned on and on held-out ones (bench/results/metaclip.json;
bench/README.md, metaclip matching): faster than the reference at every call size, and than both contenders.
What the comments below say was timed by hand has its figures in the same place.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import StageError

MATCHERS = ("tokens",)  # `[metaclip] matcher`: the token trie is the one matcher of the stage
DEFAULT_MATCHER = "tokens"
_SPACING_FROM = list(",.;:?!`") + ["\t", "\n", "\r"]
_SPACING_TO = [f" {c} " for c in ",.;:?!`"] + [" ", " ", " "]
_PIECE = 20_000  # the matcher matches a call's captions in pieces of at most this many (see Matcher.match)


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
    buffer, no string copied per token. Timed by hand faster than polars' replace_many + Arrow's split_pattern,
    which built and then re-split a spaced copy (bench/README.md, metaclip matching).
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
    # polars' filter: timed by hand far faster than numpy's boolean indexing on a large uint8 array
    # (bench/README.md, metaclip matching)
    kept = pl.Series(data).filter(pl.Series(~ws)).to_numpy()
    flat = pa.LargeStringArray.from_buffers(len(bounds) - 1, pa.py_buffer(bounds), pa.py_buffer(kept))
    return lens, flat


def entry_lists(n: int, rows: np.ndarray, ids: np.ndarray, n_entries: int) -> pa.ListArray:
    """Sorted unique entry ids per row as list<int32>, from unordered (row, id) pairs."""
    # stable sort (timsort/radix in numpy): the hits arrive as a few runs already in row order (one per
    # token depth), which it merges faster than the default quicksort sorts them (timed by hand:
    # bench/README.md, metaclip matching)
    key = np.sort(rows.astype(np.int64) * np.int64(n_entries) + ids.astype(np.int64), kind="stable")
    # np.unique: far slower (timed by hand: bench/README.md, metaclip matching)
    key = key[np.r_[True, key[1:] != key[:-1]]] if len(key) else key
    r = key // n_entries
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(r, minlength=n), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array((key % n_entries).astype(np.int32)),
                                    type=pa.list_(pa.int32()))


class Matcher:
    """Entry list -> matcher state, built once; `match(texts)` -> list<int32> of sorted unique entry ids.

    The same matches as MetaCLIP's automaton, found on tokens instead of characters (see `_match_tokens`).
    """

    def __init__(self, entries: list[str]):
        self.n = len(entries)
        # keys holding \t \n \r can never match (spacing removed those from every caption): left out
        keep = [i for i, e in enumerate(entries) if not any(c in e for c in "\t\n\r")]
        self.ids = np.asarray(keep, dtype=np.int32)
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
        for seq, eid in zip(seqs, ids.tolist()):  # Python loop: build only, once per process
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
        # pandas' Index is a hash table with a vectorised lookup (khash): timed by hand faster than
        # numpy.searchsorted (bench/README.md, metaclip matching)
        self.edge_index = pd.Index(keys)
        # ... and before it, a one-hash Bloom filter over the edge keys (a bool per slot, >= 16 slots per
        # key: ~6% of the slots set), read by direct indexing: most walks die at depth 2 (on WordNet, most of the
        # (node, token) pairs tried there are no edge), and the filter drops nearly all of those for the cost
        # of one gather, so pandas hashes only what may be an edge (shares measured by hand: bench/README.md,
        # metaclip matching)
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

        Casting to a `pl.Enum` of the tokens (what this did before) rebuilds polars' category hash map on every
        call: a large share of a small call (timed by hand: bench/README.md, metaclip matching). Here the hash table
        is built once; per call, only the call's distinct tokens are looked up (`_token_ids`). A found token is
        compared, as a string, with the vocabulary token of that id (one vectorised `==`), so a hash collision with
        an unknown token can never make a false match: the lookup is exact. A seed under which two vocabulary tokens
        collide is skipped at build time. The hashes are only ever compared within this process (polars' hash is
        stable within a polars version; each worker builds its own).
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
        string; only the distinct strings (a few % of the tokens) are hashed, looked up and compared with the
        vocabulary, and the codes then index that small table. Timed by hand faster than hashing and checking
        every token (bench/README.md, metaclip matching).
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
        the padded text spares two empty tokens per caption (a visible share of the tokens,
        counted by hand: bench/README.md, metaclip matching).
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
        if n == 0 or len(self.ids) == 0:
            return pa.array([[]] * n, type=pa.list_(pa.int32()))
        # in pieces of _PIECE captions: a 100k-caption call's working arrays (1.4M tokens, 8 bytes each) are
        # above glibc's mmap threshold, so every call page-faults them in afresh (far fewer faults in pieces).
        # Timed by hand, pieces of about this size were the fastest, by a few %: noise on a loaded 2-core VM,
        # but larger pieces fault more and smaller ones weigh each piece's fixed cost (bench/README.md,
        # metaclip matching).
        s = texts if isinstance(texts, pl.Series) else pl.Series("text", texts, dtype=pl.String)
        pieces = []
        for i in range(0, n, _PIECE):
            piece = s.slice(i, _PIECE)
            rows, ids = self._match_tokens(piece)
            pieces.append(entry_lists(len(piece), rows, ids, self.n))
        return pieces[0] if len(pieces) == 1 else pa.concat_arrays(pieces)
