"""align's fingerprint follows the installed wordfreq (issue 35): wordfreq has no __version__, so reading one
fell back to a constant and an upgrade never redid the stage. The version comes from the package's metadata."""

from __future__ import annotations

import importlib.metadata

from stages.align import AlignStage


def test_the_wordfreq_part_is_the_installed_version_and_follows_it(monkeypatch):
    parts = AlignStage({"eval_images": ""}).fingerprint_parts()
    assert parts["wordfreq"] == importlib.metadata.version("wordfreq")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "9.9.9" if name == "wordfreq" else real(name))
    after = AlignStage({"eval_images": ""}).fingerprint_parts()
    assert after["wordfreq"] == "9.9.9"
    assert {k: v for k, v in after.items() if k != "wordfreq"} == {k: v for k, v in parts.items() if k != "wordfreq"}
