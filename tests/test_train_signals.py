"""Training stopped by Ctrl-C (SIGINT, to the whole process group as a terminal sends it, DataLoader workers
included) or SIGTERM saves the step it was in, exits with that signal's status and one line, and `--resume`
goes on from that step (trainer/train.py: `_stop_requests`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from tests.test_trainer import synthetic_world  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(batch_size=16, log_every=1, save_every=1000, keep_checkpoints=1, warmup=5, device="cpu")


@pytest.fixture(scope="module")
def hq(tmp_path_factory):
    return synthetic_world(tmp_path_factory.mktemp("w"), n=96)["hq"]


def _logged_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.strip()]


@pytest.mark.parametrize("signum, workers, to_group", [(signal.SIGTERM, 0, False), (signal.SIGINT, 1, True)])
def test_a_signal_saves_the_current_step_and_resume_goes_on_from_it(hq, tmp_path, signum, workers, to_group):
    from trainer.config import TrainConfig
    from trainer.train import checkpoints, train

    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in {**SETTINGS, "workers": workers}.items()))
    runs = tmp_path / "runs"
    train_dir = runs / "r" / "train"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--runs-dir", str(runs), "train", "--run", "r", "--config", str(cfg),
         "--data", hq, "--steps", "100000", "--no-eval"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while len(_logged_steps(train_dir / "metrics.jsonl")) < 3:  # a few steps made, none checkpointed yet
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training made no 3 steps in 180 s"
            time.sleep(0.2)
        if to_group:
            os.killpg(proc.pid, signum)  # a terminal's Ctrl-C: the trainer and its DataLoader worker
        else:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signum, (proc.returncode, err[-3000:])
    steps = _logged_steps(train_dir / "metrics.jsonl")
    last = steps[-1]
    assert last >= 3 and steps == list(range(1, last + 1))
    # the checkpoint of the step the signal came in (save_every = 1000: without the signal's, there is none)
    assert [s for s, _ in checkpoints(str(train_dir))] == [last]
    lines = [l for l in err.splitlines() if l.startswith("clipcurate:")]
    assert lines == [f"clipcurate: training stopped by {signal.Signals(signum).name} at step {last} (checkpoint "
                     f"{train_dir / 'checkpoints' / f'step-{last:06d}.pt'}); rerun the same command with --resume "
                     "to go on from it"], err[-3000:]
    assert "Traceback" not in err
    s = train(TrainConfig(**{**SETTINGS, "workers": 0, "steps": last + 2}), hq, str(train_dir), resume=True,
              progress=False)
    assert s["resumed_from"] == last and s["steps"] == last + 2
    assert _logged_steps(train_dir / "metrics.jsonl") == list(range(1, last + 3))
