"""The Stage contract: what the runner calls on a stage. (Finding a stage by name is pipeline/registry.py; the
errors are pipeline/errors.py; rules and rejection reasons pipeline/rules.py; per-row random numbers and
fingerprints pipeline/hashing.py.)

A stage is a class in `stages/<name>.py` exposed as `STAGE`. The runner knows stages only through this
contract: `collect(table, ctx)` (optional, per shard) -> `merge` (pool-wide, associative) -> `apply(table,
stats, ctx)` (per shard). `ctx` is the runner's frozen per-shard context (pipeline/context.py): folders, the
shard's name, the image reader, the notes sink and the pass-1 cache. Before a command writes anything in a run,
`preflight(ctx)` says what the step lacks (a model, a concept list, an eval set), one line per need with its
fix: a missing need refuses the command with nothing done (pipeline/preflight.py). An instance holds its config and what
`setup` loaded, never per-call state: instances are cached per process and may serve several threads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pyarrow as pa

from pipeline import codec, shards
from pipeline.context import ShardContext
from pipeline.errors import StageError


class Stage:
    """Base class. Subclasses set `name`, a `Config` dataclass, `requires`, and override what they need."""

    name: ClassVar[str] = "stage"
    requires: ClassVar[dict[str, pa.DataType]] = {"uid": pa.string(), "text": pa.string()}
    # The runner never puts image bytes in a stage's table: rows carry `image_ref` (pipeline.images), and a
    # stage that needs pixels reads them with `pixels(table)` through the run's image reader (context).
    needs_pixels: ClassVar[bool] = False
    # A stage that declares `needs_pixels` and also runs on a text-only pool (a URL list: no image store), its
    # image rules skipped with a notice (align) or its rows passed on without images (emit). The preflight asks
    # an image store only of a stage that needs pixels and is not this (dfn: it scores images).
    pixels_optional: ClassVar[bool] = False
    # Libraries the stage imports lazily that a Dask worker of ours imports in the background as it starts
    # (pipeline/worker_init.py), so a worker's first shard does not pay for them. Only ones cheap to hold for a
    # worker's life: not torch, nor a spaCy model.
    worker_imports: ClassVar[tuple[str, ...]] = ()
    # A stage that turns a URL list into the run's image store (ingest) runs by its own command, which downloads
    # first; `clipcurate run` never runs it.
    downloads: ClassVar[bool] = False

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, config: Any = None, seed: int = 0):
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            config = self.Config(**config)
        self.config = config
        self.seed = int(seed)
        self._ready = False

    # ---- hooks -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load heavy resources (automata, WordNet, models). Called once per process, lazily."""

    def preflight(self, ctx: ShardContext) -> list[str]:
        """What this step lacks to run, asked before a command writes anything in the run (pipeline/preflight.py):
        one line per missing need, saying what is missing and the exact fix (the command to run, the setting to
        change), without the stage's name (the runner prefixes the step's). Cheap: look, never load (no model,
        no WordNet reader, no automaton), so that a run refused for a missing network is refused at once and
        before any step folder exists. `ctx`: the stage folder's context (run and stage folders, no shard), as
        `fingerprint_parts` gets. The spine checks what it can itself (a writable runs folder, an image store for
        a stage that needs pixels). Default: nothing missing."""
        return []

    def scale_notes(self, pool_rows: int) -> list[str]:
        """Lines a command prints before it runs this step, about settings made for web scale that do nothing (or
        too much) on a pool of `pool_rows` rows (the rows of what the command's first step reads: an upper bound
        on what reaches this step). Web-scale defaults fail silently on a small pool; a user who reads these
        lines before the work knows which setting to change. Default: none."""
        return []

    def rows_in(self, table, kept, rejected) -> int:
        """The shard's rows in, for the funnel, which must read rows in = kept + rejected. Default: the rows
        read; a stage whose input row stands for several (ingest: a URL with its captions) counts those."""
        return table.num_rows

    @classmethod
    def step_config(cls, section: dict, run_config: dict) -> dict:
        """The config a step of this stage runs with: its own section, which a stage may complete from the run's
        other sections (embed's empty network keys mean [dfn]'s, so one section names the model of both). The
        runner and the preflight call it; the completed values are part of the step's fingerprint."""
        return section

    def fingerprint_parts(self, ctx: ShardContext | None = None) -> dict:
        """What, besides config and inputs, changes this stage's output (e.g. a concept list's sha256). `ctx`:
        the stage folder's context (no shard), for parts that live in the run (dfn's default model)."""
        return {}

    # Config keys that change how fast the stage runs, never what it writes (thread counts): left out of its
    # fingerprint, so tuning them on a finished run redoes nothing. A key belongs here only when a test shows
    # identical output across its values.
    speed_keys: frozenset[str] = frozenset()

    @property
    def has_stats(self) -> bool:
        return type(self).collect is not Stage.collect

    def collect(self, table: pa.Table, ctx: ShardContext | None = None) -> Any:
        """Small per-shard statistics for pool-wide rules (pass 1). Default: none. The runner has set aside
        the rows its reader marked unusable (text that is not UTF-8, a uid that is not 32 lowercase hex
        characters, text over `[run] max_text_bytes`): collect never sees them, nor does apply."""
        return None

    def merge(self, partials: list) -> Any:
        """Combine partials (or merged partials: it must be associative) into one."""
        raise NotImplementedError

    # ---- partitioned statistics (optional) -------------------------------------------------------
    # For pool-wide statistics that grow with the pool (align: one row per distinct image-text pair and
    # per LSH band key), one merged whole would have to fit in one worker, and every apply would load all
    # of it. A stage that defines `split` gets a shuffle instead (stats_pass.py): each shard's partial is cut
    # by key hash into partitions; each partition is merged alone (memory ~ pool / partitions); from each
    # merged partition, `answer` picks what one shard's apply needs (the keys that shard holds), and
    # apply gets `join_answers` of its shard's answers. The same design as datatrove's MinHash dedup.
    @property
    def shuffles_stats(self) -> bool:
        return type(self).split is not Stage.split

    def split(self, partial: Any, n: int) -> list:
        """The partial cut into `n` pieces by key hash: every key lives in exactly one piece, the same one
        in every shard. Pool-wide scalars (row counts) go to piece 0 only, so that they sum right."""
        raise NotImplementedError

    def answer(self, merged: Any, piece: Any) -> Any:
        """From one merged partition, what apply on the shard whose piece this is needs."""
        raise NotImplementedError

    def join_answers(self, answers: list) -> Any:
        """One shard's answers from every partition, joined into the `stats` its apply gets."""
        raise NotImplementedError

    # ---- a survey before the statistics (optional) ----------------------------------------------------
    # Statistics whose shuffle key needs something pool-wide first: semdedup shuffles rows by k-means cluster, and
    # the centroids come from a pool-wide sample. A stage that defines `survey` gets a pass before collect: each
    # shard's `survey` partial, merged associatively (`merge_survey`, tree-reduced), then `conclude_survey` once
    # in the driver (the k-means); the result is saved in the stage folder beside the statistics (redone with
    # them) and reaches collect and apply as `ctx.survey`.
    @property
    def has_survey(self) -> bool:
        return type(self).survey is not Stage.survey

    def survey(self, table: pa.Table, ctx: ShardContext | None = None) -> Any:
        """A small per-shard partial of what collect needs pool-wide (a sample), or None."""
        return None

    def merge_survey(self, partials: list) -> Any:
        """Combine survey partials (or merged ones: it must be associative)."""
        raise NotImplementedError

    def conclude_survey(self, merged: Any, ctx: ShardContext) -> Any:
        """The survey's result from the merged partials, once, in the driver (`ctx`: the stage folder's). Data
        only (pipeline.codec). Default: the merged partials."""
        return merged

    def save_stats(self, stats: Any, folder: str) -> None:
        """Persist merged statistics in the stage folder. Default: `pipeline.codec` (arrays, frames, JSON; never
        a pickle); stages may write Parquet."""
        try:
            data = codec.encode(stats)
        except TypeError as e:
            raise StageError(f"{self.name}: its statistics must be data: arrays, frames, dict/list/tuple, numbers, "
                             f"str, or @data_record dataclasses ({e}); or override save_stats/load_stats") from None
        shards.write_bytes(data, shards.join(folder, "stats.data"))

    def apply_key(self, stats: Any) -> Any:
        """What every apply reads of the saved statistics (`load_stats`' value), as plain data (lists, numbers,
        str: no arrays), when that is less than all of them: a shard whose input and key are unchanged is not
        redone when the statistics changed only elsewhere (resume per shard, pipeline/resume.py). Default None:
        the statistics whole (the digests of their files). Not for a stage that shuffles its statistics: its
        key per shard is the digest of that shard's answers."""
        return None

    def load_stats(self, folder: str) -> Any:
        path = shards.join(folder, "stats.data")
        try:
            return codec.decode(shards.read_bytes(path))
        except codec.CodecError as e:
            raise StageError(f"{self.name}: statistics {path}: {e}; rerun the stage") from None

    def apply(self, table: pa.Table, stats: Any, ctx: ShardContext | None = None) -> tuple[pa.Table, pa.Table]:
        """Return (kept, rejected); rejected carries a `reason` string column. Without a runner, `ctx` may be
        left out (`ShardContext.detached`)."""
        raise NotImplementedError

    def output_name(self, input_name: str) -> str:
        return input_name

    def finalize(self, stage_dir: str, run_dir: str, summaries: list[dict], done: list | None = None) -> dict | None:
        """After every shard is applied: pool-wide outputs (e.g. an index of emitted files). `done`: the
        results of `finalize_work`'s items, in item order, when the stage has any.

        Must be idempotent; returns a small dict stored in the manifest under "finalize".
        """
        return None

    # ---- parallel work after apply (optional) -------------------------------------------------------
    # Output that is not one-per-input-shard (emit's resharded training set) is still one task per unit of
    # output: `finalize_items` plans small JSON-able items in the driver, the runner runs `finalize_item` on
    # each through the executor (workers, in parallel), and `finalize` gets their results.
    def finalize_items(self, stage_dir: str, run_dir: str, summaries: list[dict]) -> list:
        return []

    def finalize_item(self, item, ctx: ShardContext) -> object:
        """One item of `finalize_items`, on a worker; `ctx` names the stage folder (no shard)."""
        raise NotImplementedError

    def report(self, stage_dir: str, out_dir: str) -> dict:
        """Figures and tables for the run report, made from the stage folder (manifest, stats, shards).

        Returns {"figures": [(title, png_path)], "tables": [pipeline.report.Table]}. Default: none.
        """
        return {"figures": [], "tables": []}

    # ---- helpers for subclasses ----------------------------------------------------------------
    def ensure_ready(self) -> "Stage":
        if not self._ready:
            self.setup()
            self._ready = True
        return self

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def detached(self) -> ShardContext:
        """The context of a call made without a runner: no run folder, no pass-1 cache, in-memory pixels."""
        return ShardContext.detached(self)
