"""A small stage that exercises every part of the contract: pool-wide counts, randomness, reasons."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.hashing import uniform
from pipeline.rules import first_reason, split_by_reason
from pipeline.stage import Stage


class FirstWordStage(Stage):
    """Drops texts whose first word is rare in the pool (< min_count), then keeps a random `keep` share."""

    name = "firstword"

    @dataclasses.dataclass
    class Config:
        min_count: int = 2
        keep: float = 0.5
        sleep_per_shard: float = 0.0  # lets a test kill the run in the middle of a stage

    collected: list = []  # the shards collect ran on, in this process (in-process tests of kept partials)

    def collect(self, table, ctx=None):
        if ctx is not None:
            FirstWordStage.collected.append(ctx.shard)
        words = pl.from_arrow(table.column("text")).str.split(" ").list.first()
        return Counter(words.drop_nulls().to_list())

    def merge(self, partials):
        total = Counter()
        for p in partials:
            total.update(p)
        return total

    def apply(self, table, stats, ctx=None):
        if self.config.sleep_per_shard:
            time.sleep(self.config.sleep_per_shard)
        first = pl.from_arrow(table.column("text")).str.split(" ").list.first().to_list()
        rare = np.array([stats.get(w, 0) < self.config.min_count for w in first], dtype=bool)
        u = uniform(table.column("uid").to_pylist(), self.seed, "firstword")
        unlucky = u >= self.config.keep
        reason = first_reason(table.num_rows, [("rare_first_word", rare), ("sampled_out", unlucky)])
        return split_by_reason(table, reason)


def make_pool(n: int, shards_n: int, folder, seed: int = 0, prefix: str = "part-") -> list[str]:
    """n text rows split over `shards_n` Parquet shards (contiguous blocks)."""
    from pipeline import shards
    from pipeline.schema import compute_uid

    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(40)]
    weights = 1.0 / np.arange(1, 41)
    weights /= weights.sum()
    texts = [" ".join(rng.choice(vocab, size=4, p=weights)) + f" #{i}" for i in range(n)]
    urls = [f"http://example.invalid/{i}.jpg" for i in range(n)]
    table = pa.table({"uid": compute_uid(urls, texts), "url": urls, "text": texts})
    bounds = np.linspace(0, n, shards_n + 1).astype(int)
    paths = []
    os.makedirs(folder, exist_ok=True)
    for i in range(shards_n):
        p = os.path.join(str(folder), f"{prefix}{i:05d}.parquet")
        shards.write_shard(table.slice(bounds[i], bounds[i + 1] - bounds[i]), p)
        paths.append(p)
    return paths


class NotingStage(FirstWordStage):
    """FirstWordStage that leaves a note per shard through its context and reports a table of its own: the
    report's data path end to end, with text that HTML must escape."""

    name = "noting"

    def apply(self, table, stats, ctx=None):
        ctx = ctx or self.detached()
        ctx.note(f"saw <{ctx.shard}> & kept what it could")
        return super().apply(table, stats, ctx)

    def report(self, stage_dir, out_dir):
        from pipeline.report import Table

        return {"figures": [], "tables": [Table("first words", ["word", "note"], [["w0", "<script>x</script>"]])]}


class KeepShareStage(Stage):
    """No statistics: keeps a random `keep` share of the rows (by uid), the rest `sampled_out`."""

    name = "keepshare"

    @dataclasses.dataclass
    class Config:
        keep: float = 0.7

    def apply(self, table, stats, ctx=None):
        unlucky = uniform(table.column("uid").to_pylist(), self.seed, "keepshare") >= self.config.keep
        return split_by_reason(table, first_reason(table.num_rows, [("sampled_out", unlucky)]))


class ShuffledFirstWordStage(Stage):
    """FirstWordStage's rule (a first word seen fewer than `min_count` times in the pool is rare) with its counts
    shuffled by word (Stage.split): each shard's apply reads only the counts of its own first words."""

    name = "shuffledfirstword"

    @dataclasses.dataclass
    class Config:
        min_count: int = 2

    @staticmethod
    def _first(table) -> list:
        return pl.from_arrow(table.column("text")).str.split(" ").list.first().to_list()

    collected: list = []  # as FirstWordStage's

    def collect(self, table, ctx=None):
        if ctx is not None:
            ShuffledFirstWordStage.collected.append(ctx.shard)
        return dict(sorted(Counter(w for w in self._first(table) if w is not None).items()))

    def split(self, partial, n):
        from pipeline.hashing import hash64_value

        pieces = [{} for _ in range(n)]
        for w, c in partial.items():
            pieces[int(hash64_value(w) % np.uint64(n))][w] = c
        return pieces

    def merge(self, partials):
        total = Counter()
        for p in partials:
            total.update(p)
        return dict(sorted(total.items()))

    def answer(self, merged, piece):
        return {w: merged[w] for w in sorted(piece)}

    def join_answers(self, answers):
        return self.merge(answers)

    def apply(self, table, stats, ctx=None):
        rare = np.array([stats.get(w, 0) < self.config.min_count for w in self._first(table)], dtype=bool)
        return split_by_reason(table, first_reason(table.num_rows, [("rare_first_word", rare)]))
