"""runner.py split by job (#34): executors.py, tasks.py, resume.py, stats_pass.py. What must not move with it: the
fingerprint a step's output is made from (a run made before the split resumes as up to date after it), and what
a task says about where it works when its worker dies."""

from __future__ import annotations

import pickle

import pytest

from pipeline import config as config_mod
from pipeline import executors, resume, shards, tasks
from pipeline.runner import run_stage
from tests.stages_for_tests import make_pool

STAGE = "tests.stages_for_tests:FirstWordStage"
# The manifest's fingerprint of the step below, computed by the runner before the split (HEAD 89f35ec, the same
# script): a change here means every existing run redoes every step.
FINGERPRINT_BEFORE_THE_SPLIT = "303691f89e8feb00"


def test_a_steps_fingerprint_is_the_one_the_runner_made_before_the_split(tmp_path):
    """Upstream shards identified by their upstream fingerprints (no file bytes, so no pyarrow version, in it)."""
    run = tmp_path / "runs" / "r"
    up = str(run / "01_up")
    for i, p in enumerate(make_pool(40, 2, up)):
        shards.write_json({"fingerprint": f"up{i}"}, resume.done_path(up, shards.shard_name(p)))
    res = run_stage(STAGE, str(run), up, config_mod.resolve({}), executors.InProcessExecutor(), upstream_is_stage=True)
    assert res.manifest["fingerprint"] == FINGERPRINT_BEFORE_THE_SPLIT
    assert res.manifest["rows_out"] == 14
    markers = [resume.read_done(res.folder, s["shard"]) for s in res.manifest["shards"]]
    # each shard's marker carries the shard's own fingerprint (#32: resume per shard), all different
    assert all(resume.FILES_KEY in m for m in markers)
    assert len({m["fingerprint"] for m in markers} | {FINGERPRINT_BEFORE_THE_SPLIT}) == len(markers) + 1


def test_a_run_whose_markers_carry_the_steps_fingerprint_resumes_as_up_to_date(tmp_path):
    """Markers written before shards had their own fingerprints carry the step's: such a shard was made from
    exactly these inputs and this config, so it is trusted, not redone (nor is anything after it)."""
    run = tmp_path / "runs" / "r"
    up = str(run / "01_up")
    for i, p in enumerate(make_pool(40, 2, up)):
        shards.write_json({"fingerprint": f"up{i}"}, resume.done_path(up, shards.shard_name(p)))
    cfg = config_mod.resolve({})
    res = run_stage(STAGE, str(run), up, cfg, executors.InProcessExecutor(), upstream_is_stage=True)
    for s in res.manifest["shards"]:  # as an older clipcurate wrote them
        m = resume.read_done(res.folder, s["shard"])
        shards.write_json({**m, "fingerprint": res.manifest["fingerprint"]}, resume.done_path(res.folder, s["shard"]))
    stamps = {p: shards.file_identity(p) for p in shards.list_shards(res.folder)}
    again = run_stage(STAGE, str(run), up, cfg, executors.InProcessExecutor(), upstream_is_stage=True)
    assert again.manifest["fingerprint"] == FINGERPRINT_BEFORE_THE_SPLIT
    assert {p: shards.file_identity(p) for p in shards.list_shards(res.folder)} == stamps  # nothing rewritten


def _tasks() -> dict[str, object]:
    step = tasks.WorkerStep("firstword", {"keep": 0.5}, 0, "/runs/r/01_firstword")
    return {
        "shard part-00003.parquet": tasks.ShardTask(step, "/pool/part-00003.parquet"),
        "shard part-00004.parquet": tasks.SplitTask(step, "/pool/part-00004.parquet", partitions=4),
        "shard part-00005.parquet": tasks.ApplyTask(step, "/pool/part-00005.parquet", fp="ab", partitions=2),
        "statistics partition 7": tasks.PartitionTask(step, 7, ["part-00000.parquet"]),
        "finalize item part-00001": tasks.FinalizeTask(step, {"name": "part-00001", "slices": []}, verify=True),
    }


def test_tasks_travel_by_pickle_and_say_where_they_work():
    for where, task in _tasks().items():
        back = pickle.loads(pickle.dumps(task))
        assert back == task and back.where == where
    merge = pickle.loads(pickle.dumps(tasks.MergeWith(_tasks()["statistics partition 7"].step, "merge_survey")))
    assert merge.hook == "merge_survey"


def test_a_task_whose_worker_died_is_named_in_one_line():
    distributed = pytest.importorskip("distributed")
    from pipeline.errors import StageError

    for where, task in [*_tasks().items(), ("merge task", None)]:
        with pytest.raises(StageError) as e, executors._worker_deaths("align apply", task):
            raise distributed.KilledWorker("task-key-0123", None, 3)
        assert str(e.value).startswith(f"align apply: {where}: the Dask worker running it died on every try")
        assert "\n" not in str(e.value)


def test_executors_give_a_task_one_item():
    """In-process, as on Dask: `fn(item)`, the task's dataclass whole (not spread over positional arguments)."""
    ex = executors.InProcessExecutor()
    items = [(1, 2), (3, 4)]
    assert dict(ex.map(lambda item: item, items, "echo")) == {0: (1, 2), 1: (3, 4)}
    assert ex.collect_values(sum, items, "sum") == [3, 7]


def _tagged_sum(parts: list) -> tuple:
    """A merge whose output differs from its inputs' form: ("merged", total)."""
    return ("merged", sum(p[1] if isinstance(p, tuple) else p for p in parts))


@pytest.mark.parametrize("on_dask", [False, True])
def test_tree_reduce_merges_at_least_once(on_dask, dask_cluster):
    """A one-shard pool's statistics are a merge's output too (dfn's collect is sparse, its statistics dense)."""
    ex = executors.DaskExecutor(scheduler=dask_cluster.scheduler.address) if on_dask else executors.InProcessExecutor()
    try:
        assert ex.tree_reduce(_tagged_sum, [5]) == ("merged", 5)
        n = executors.MERGE_FAN_IN * 2 + 1  # two rounds
        assert ex.tree_reduce(_tagged_sum, list(range(n))) == ("merged", sum(range(n)))
    finally:
        ex.close()
