"""docs/config-reference.md is made from the code (pipeline/config_reference.py): it lists every key of every
section with the default the code uses. Regenerate it after changing a Config:
    .venv/bin/python -m pipeline.config_reference > docs/config-reference.md"""

from __future__ import annotations

from pathlib import Path

from pipeline import config as config_mod
from pipeline.config_reference import field_comments, reference

ROOT = Path(__file__).resolve().parents[1]


def test_the_reference_in_docs_is_the_one_the_code_makes():
    assert (ROOT / "docs" / "config-reference.md").read_text() == reference(), \
        "docs/config-reference.md is out of date: .venv/bin/python -m pipeline.config_reference > docs/config-reference.md"


def test_every_key_is_listed_with_its_default():
    text = reference()
    for section, values in config_mod.resolve({}).items():
        assert f"## [{section}]" in text
        for key in values:
            assert f"| `{key}` |" in text, (section, key)
    assert '| `per_host_concurrency` | `2` |' in text and '| `respect_robots` | `true` |' in text


def test_field_comments_hand_case():
    import dataclasses

    @dataclasses.dataclass
    class Demo:
        # above a
        a: int = 1  # at a
        # goes on with a's comment
        b: str = "x"
        # above c
        c: list = dataclasses.field(default_factory=list)

    assert field_comments(Demo) == {"a": "above a at a goes on with a's comment", "b": "", "c": "above c"}
