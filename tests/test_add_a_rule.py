"""Adding a rule is one class, one list entry and its config field (pipeline/rules.py): a rule written here, in a
test file, added to align's list by a subclass, runs in a real run, is reported with its reason in the funnel
and the manifest, and is part of the step's fingerprint (changing its config field redoes the step). A rule
over a fact that no provider computes yet adds one `@provides` method; facts are computed when a rule that is on
first reads them, once."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli_main
from pipeline.rules import Facts, Rule, judge, provides
from stages.align import AlignStage
from stages.align.lookups import PoolFacts

STEP = "tests.test_add_a_rule:AlignWithLongCaptions"


@dataclasses.dataclass(frozen=True)
class LongCaption(Rule):
    """More words than `max_caption_words` (a stricter cousin of too_many_words, for the test)."""
    max_caption_words: int
    name = "long_caption"
    needs = ("nwords",)

    def mask(self, f) -> np.ndarray:
        return f.nwords > self.max_caption_words


class AlignWithLongCaptions(AlignStage):
    name = "alignlong"

    @dataclasses.dataclass
    class Config(AlignStage.Config):
        max_caption_words: int = 4  # the rule's config field

    def _all_rules(self) -> list:
        return super()._all_rules() + [LongCaption(self.config.max_caption_words)]  # the list entry


def _pool(folder) -> None:
    folder.mkdir(parents=True)
    texts = ["a red bus", "two dogs play in the park today", "a cat", "green trees along a quiet road near home"]
    pq.write_table(pa.table({"url": [f"http://x.org/{i}.jpg" for i in range(4)], "text": texts}),
                   folder / "part-00000.parquet")


def _run(tmp_path, capsys, limit: int) -> tuple[dict, str]:
    cfg = tmp_path / f"c{limit}.toml"
    cfg.write_text(f'["{STEP}"]\nmax_caption_words = {limit}\nmin_words = 1\n')
    capsys.readouterr()
    assert cli_main(["--runs-dir", str(tmp_path / "runs"), "run", STEP, "--run", "r", "--input", str(tmp_path / "pool"),
                     "--config", str(cfg), "--workers", "0"]) == 0
    out = capsys.readouterr()
    man = json.loads((tmp_path / "runs" / "r" / "90_alignlong" / "_manifest.json").read_text())
    return man, out.out + out.err


def test_a_rule_added_from_a_test_file_runs_is_reported_and_fingerprinted(tmp_path, capsys):
    _pool(tmp_path / "pool")
    man, out = _run(tmp_path, capsys, 4)
    assert man["reasons"] == {"long_caption": 2}  # the two captions of more than 4 words
    assert "long_caption" in out  # the funnel names it
    again, out = _run(tmp_path, capsys, 4)
    assert again["fingerprint"] == man["fingerprint"]  # the same config: up to date
    wider, _ = _run(tmp_path, capsys, 7)
    assert wider["fingerprint"] != man["fingerprint"] and wider["reasons"] == {"long_caption": 1}


# ---- a rule over a fact no provider had: one `@provides` method more -----------------------------------------
class CaptionFacts(PoolFacts):
    @provides("chars")
    def _chars(self):
        _, table, _, _ = self.source
        return pc.utf8_length(table.column("text")).to_numpy(zero_copy_only=False)


@dataclasses.dataclass(frozen=True)
class ShortCaption(Rule):
    min_chars: int
    name = "short_caption"
    needs = ("chars",)

    def mask(self, f) -> np.ndarray:
        return f.chars < self.min_chars


class AlignWithShortCaptions(AlignStage):
    name = "alignshort"
    facts_class = CaptionFacts  # the provider

    @dataclasses.dataclass
    class Config(AlignStage.Config):
        min_chars: int = 6

    def _all_rules(self) -> list:
        return super()._all_rules() + [ShortCaption(self.config.min_chars)]


def test_a_rule_over_a_new_fact_adds_one_provider(tmp_path, capsys):
    _pool(tmp_path / "pool")
    step = "tests.test_add_a_rule:AlignWithShortCaptions"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'["{step}"]\nmin_chars = 6\nmin_words = 1\n')
    assert cli_main(["--runs-dir", str(tmp_path / "runs"), "run", step, "--run", "r", "--input", str(tmp_path / "pool"),
                     "--config", str(cfg), "--workers", "0"]) == 0
    man = json.loads((tmp_path / "runs" / "r" / "90_alignshort" / "_manifest.json").read_text())
    assert man["reasons"] == {"short_caption": 1}  # "a cat"


# ---- pipeline.rules.Facts, by hand ------------------------------------------------------------------------------
class CountingFacts(Facts):
    FIELDS = ("a", "b")
    calls: list = []

    @provides("double", "triple")
    def _multiples(self):
        CountingFacts.calls.append("multiples")
        return self.a * 2, self.a * 3

    @provides("b_plus")
    def _b_plus(self):
        CountingFacts.calls.append("b_plus")
        return None if self.b is None else self.b + 1


def test_facts_are_computed_once_by_their_provider_and_given_facts_win():
    CountingFacts.calls.clear()
    f = CountingFacts(3, a=np.array([1, 2, 3]))
    assert f.b is None  # a field neither given nor provided: no data
    assert list(f.triple) == [3, 6, 9] and list(f.double) == [2, 4, 6] and f.double is f.double
    assert CountingFacts.calls == ["multiples"]  # one call for both facts, kept after
    g = CountingFacts(3, a=np.array([1, 2, 3]), double=np.array([0, 0, 0]))
    assert list(g.double) == [0, 0, 0] and list(g.triple) == [3, 6, 9]  # given wins over its provider
    with pytest.raises(TypeError, match="unknown facts"):
        CountingFacts(1, misspelt=1)
    with pytest.raises(AttributeError):
        _ = f.nothing


@dataclasses.dataclass(frozen=True)
class Odd(Rule):
    name, needs = "odd", ("b_plus",)
    enabled: bool = True

    @property
    def on(self) -> bool:
        return self.enabled

    def mask(self, f) -> np.ndarray:
        return f.b_plus % 2 == 1


def test_judge_reads_only_the_facts_of_the_rules_that_are_on():
    CountingFacts.calls.clear()
    reason, skipped = judge([Odd(enabled=False)], CountingFacts(3, a=np.zeros(3), b=np.array([0, 1, 2])), 3)
    assert reason.null_count == 3 and skipped == [] and CountingFacts.calls == []  # off: never computed
    reason, skipped = judge([Odd()], CountingFacts(3, a=np.zeros(3), b=np.array([0, 1, 2])), 3)
    assert reason.to_pylist() == ["odd", None, "odd"] and CountingFacts.calls == ["b_plus"]
    reason, skipped = judge([Odd()], CountingFacts(3, a=np.zeros(3)), 3)  # provider says: no data
    assert reason.null_count == 3 and skipped == ["odd"]
