"""Adding a rule is one class, one list entry and its config field (pipeline/rules.py): a rule written here, in a
test file, added to align's list by a subclass, runs in a real run, is reported with its reason in the funnel
and the manifest, and is part of the step's fingerprint (changing its config field redoes the step)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli import main as cli_main
from pipeline.rules import Rule
from stages.align import AlignStage

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
