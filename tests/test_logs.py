"""Quiet, true logs: open_clip's expected "initialized randomly" warning is silenced where we create a model
without pretrained weights (ours follow from a checkpoint or from training), and nothing else is."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from trainer import models

EXPECTED = "No pretrained weights loaded for model '{}'. Model initialized randomly."


def test_creating_a_model_prints_no_random_init_warning(caplog):
    caplog.set_level(logging.WARNING)
    models.create(models.DEFAULT_MODEL)
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_no_warning_on_stderr_of_a_fresh_process():
    # a Dask worker or a CLI call: no logging configured, Python's last-resort handler prints root warnings
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    code = "from trainer import models; models.create(models.DEFAULT_MODEL); import logging; logging.warning('real one')"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "No pretrained weights" not in p.stderr and "initialized randomly" not in p.stderr
    assert "real one" in p.stderr  # the filter is gone once the model exists


def test_other_warnings_still_reach_the_user(caplog, monkeypatch):
    import open_clip

    real = open_clip.create_model_and_transforms

    def noisy(name, **kw):
        logging.warning(EXPECTED.format(name))  # the expected one: silenced
        logging.warning(EXPECTED.format("another-model"))  # not about this model: passes
        logging.warning(f"Model {name} initialized partially.")  # open_clip's other warnings: pass
        logging.getLogger("open_clip").warning(EXPECTED.format(name))  # not the root logger's record: passes
        logging.error(EXPECTED.format(name))  # not a warning: passes
        return real(name, **kw)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", noisy)
    caplog.set_level(logging.WARNING)
    models.create(models.DEFAULT_MODEL)
    got = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    name = models.DEFAULT_MODEL
    assert ("root", logging.WARNING, EXPECTED.format(name)) not in got
    assert ("root", logging.WARNING, EXPECTED.format("another-model")) in got
    assert ("root", logging.WARNING, f"Model {name} initialized partially.") in got
    assert ("open_clip", logging.WARNING, EXPECTED.format(name)) in got
    assert ("root", logging.ERROR, EXPECTED.format(name)) in got
    assert not logging.getLogger().filters  # removed after the call
