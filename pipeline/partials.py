"""Pass 1's partials, kept per shard.

A resume whose input changed in one shard recomputes the pool-wide statistics; kept partials make that pass
collect the changed shard alone, and merge (align reads pixels and klite tags every caption in collect: that is
work to do once). A partial is kept under its key (the step less its inputs, the shard's input identity, the
survey, the partitions) with the record of its file (size and digest), in a sidecar written after it; the sidecar goes first
when a partial is rewritten, so a kill leaves a partial without a sidecar, which is collected again.
"""

from __future__ import annotations

from pipeline import resume, shards


def partials_dir(stage_dir: str) -> str:
    return shards.join(stage_dir, "_partials")


def partial_path(stage_dir: str, shard: str, ext: str) -> str:
    return shards.join(partials_dir(stage_dir), shard + ext)


def kept_partial(stage_dir: str, shard: str, key: str, ext: str) -> bool:
    """The shard's kept partial is what collect would give now: its sidecar carries `key`, and its file is
    still there with its recorded size and digest (always the digest, not only with --verify: a partial read
    back wrong would fail the merge on every rerun, and hashing it costs little beside collect)."""
    if not key:
        return False
    side = shards.read_json(partial_path(stage_dir, shard, ".json"))
    if not isinstance(side, dict) or side.get("key") != key:
        return False
    return shards.records_mismatch(partials_dir(stage_dir), side.get(resume.FILES_KEY), digest=True) is None


def keep_partial(stage_dir: str, shard: str, key: str, write) -> None:
    """Write the partial (`write()`), then its sidecar: its key and the record of what was written."""
    shards.remove(partial_path(stage_dir, shard, ".json"))
    with shards.recording_writes() as wrote:
        write()
    shards.write_json({"key": key, resume.FILES_KEY: shards.records_under(partials_dir(stage_dir), wrote)},
                      partial_path(stage_dir, shard, ".json"))


def remove_stale_partials(stage_dir: str, shards_now: set[str]) -> None:
    """The kept partials (and their sidecars) of shards no longer in the step's input."""
    fs, folder = shards.fs_and_path(partials_dir(stage_dir))
    if not fs.exists(folder):
        return
    for info in fs.ls(folder, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]  # "<shard>.data", ".bundle" or ".json"
        if name.rsplit(".", 1)[0] not in shards_now:
            fs.rm(info["name"], recursive=True)
