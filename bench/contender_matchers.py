"""metaclip's benchmark contenders: two Aho-Corasick matchers that give the same entry-id sets as the stage's
token-trie matcher (`stages.metaclip.matcher.Matcher`), kept out of the product and used only by
bench/bench_metaclip.py (timings) and tests/test_metaclip_contenders.py (the same sets as the reference).

  pyahocorasick  DESIGN.md's automaton: one automaton over all spaced entries; a shard's spaced captions are
                 joined with "\\n" (which spacing removed from every caption, and which no key holds, so no match
                 crosses two captions) and scanned by one `automaton.iter` call; end positions map back to
                 captions with `np.searchsorted`. Its iterator yields one Python tuple per hit: it has no
                 vectorised API for overlapping hits. Needs the `pyahocorasick` package (the `test` extra).
  polars         polars' Aho-Corasick, `str.extract_many(..., overlapping=True)`; hit strings -> ids by an Enum
                 cast. polars rebuilds its automaton on every call (~0.5 s for 150k entries).

Each has the stage matcher's interface: built once from the entry list, `match(texts)` -> list<int32> of sorted
unique entry ids per caption.
"""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pyarrow as pa

from stages.metaclip.matcher import entry_lists, spacing

_SEP = "\n"  # spacing() removes it from every caption: a safe separator between captions


class _Automaton:
    """The entry keys both automata search for: " " + e + " ", without keys holding \\t \\n \\r (spacing removed
    those from every caption, so they never match, and the "\\n" separator can never be part of a match)."""

    def __init__(self, entries: list[str]):
        self.n = len(entries)
        keep = [i for i, e in enumerate(entries) if not any(c in e for c in "\t\n\r")]
        self.spaced = [f" {entries[i]} " for i in keep]
        self.ids = np.asarray(keep, dtype=np.int32)

    def match(self, texts) -> pa.ListArray:
        n = len(texts)
        if n == 0 or len(self.spaced) == 0:
            return pa.array([[]] * n, type=pa.list_(pa.int32()))
        rows, ids = self._hits(spacing(texts), n)
        return entry_lists(n, rows, ids, self.n)

    def _hits(self, spaced: pl.Series, n: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class PyAhoCorasickMatcher(_Automaton):
    def __init__(self, entries: list[str]):
        super().__init__(entries)
        import ahocorasick

        a = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        for i, key in zip(self.ids.tolist(), self.spaced):  # once per process: pyahocorasick has no bulk add
            a.add_word(key, i)
        a.make_automaton()
        self.automaton = a

    def _hits(self, spaced: pl.Series, n: int) -> tuple[np.ndarray, np.ndarray]:
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(spaced.str.len_chars().to_numpy()[:-1].astype(np.int64) + 1, out=starts[1:])
        big = spaced.str.join(_SEP).item()
        # the automaton's iterator is the one per-hit Python step: pyahocorasick yields (end, id) tuples
        flat = np.fromiter(itertools.chain.from_iterable(self.automaton.iter(big)), dtype=np.int64)
        ends, ids = flat[0::2], flat[1::2]
        return np.searchsorted(starts, ends, side="right") - 1, ids


class PolarsMatcher(_Automaton):
    def __init__(self, entries: list[str]):
        super().__init__(entries)
        self.enum = pl.Enum(self.spaced)

    def _hits(self, spaced: pl.Series, n: int) -> tuple[np.ndarray, np.ndarray]:
        hits = spaced.str.extract_many(self.spaced, overlapping=True)
        offs = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(hits.list.len().to_numpy(), out=offs[1:])
        rows = np.repeat(np.arange(n), np.diff(offs))
        codes = hits.explode(empty_as_null=False).cast(self.enum).to_physical().to_numpy()
        return rows, self.ids[codes]


CONTENDERS = {"pyahocorasick": PyAhoCorasickMatcher, "polars": PolarsMatcher}
