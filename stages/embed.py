"""embed: the run's CLIP model embeds every row's text and image once, into the run's embedding store.

DESIGN principle 4, "a model looks at each pair once": DFN's cut, and every later model-based rule, read these
vectors instead of running the model again, so a new `keep_fraction` or threshold costs no forward pass.

Network  `[embed] model`, `pretrained`, `checkpoint`, as dfn's keys (an open_clip name or hf-hub:ORG/NAME with a
         pretrained tag or weights file; or an open_clip checkpoint, ours from dfn-train included). All three
         empty (the default): the run's dfn network, read from the run's saved config, so one `[dfn]` section
         names the model of both steps and dfn finds the vectors embed stored.
Store    runs/NAME/embeddings/<model-id>/<shard>.{text,image}.arrow (pipeline/embeddings.py): float16,
         L2-normalised, by uid; the model's identity (name, tag, weights digest, preprocessing) in the manifest.
         The metadata rows never carry vectors. Each shard's done-marker records the store files it vouches for,
         so a resume redoes a shard whose vectors were removed or changed (and `--verify` checks their digests).
Kinds    `kinds = ["text", "image"]`. Text vectors need no pixels: a step before the download (a text-first
         recipe's `embed@text`, on the URL list) stores text vectors, and the step after it adds image vectors
         (texts already stored are not embedded again). Rows without image references are embedded as text only.
Rows     every row is kept: embed decides nothing. A row whose image is missing or does not decode is stored
         without an image vector (valid = False); dfn names it (`no_image` / `bad_image`).
Speed    a chunk of `batch_size` rows is read through the run's image reader and decoded in DataLoader worker
         processes (`num_workers`; -1 = 4 on CUDA, 0 on CPU where the model needs the cores), moved through
         pinned memory with bf16/fp16 autocast on a GPU. bench/bench_embed.py measures it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pyarrow as pa

from pipeline import embeddings, shards
from pipeline.config import ConfigError, check_ranges
from pipeline.context import ShardContext
from pipeline.errors import StageError
from pipeline.rules import split_by_reason
from pipeline.stage import Stage

log = logging.getLogger("clipcurate.embed")

KINDS = ("text", "image")


class EmbedStage(Stage):
    name = "embed"
    requires = {"uid": pa.string(), "text": pa.string()}
    needs_pixels = True
    pixels_optional = True  # rows without images (a URL list) are embedded as text only
    speed_keys = frozenset({"batch_size", "num_workers"})

    @dataclasses.dataclass
    class Config:
        model: str = ""  # open_clip model name or hf-hub:ORG/NAME; all three empty: the run's [dfn] network
        pretrained: str = ""  # an open_clip tag ("openai") or a weights file, with `model`
        checkpoint: str = ""  # an open_clip checkpoint (ours from dfn-train, or any with `model`)
        kinds: list = dataclasses.field(default_factory=lambda: ["text", "image"])
        batch_size: int = 256
        device: str = "auto"  # auto = cuda when present, else cpu
        precision: str = "auto"  # auto = bf16/fp16 autocast on GPU, fp32 on CPU
        num_workers: int = -1  # decode workers; -1 = 4 on CUDA, 0 on CPU

        def __post_init__(self):
            check_ranges("embed", self, batch_size=(1, None), num_workers=(-1, None))
            if not isinstance(self.kinds, list) or not self.kinds or any(k not in KINDS for k in self.kinds):
                raise ConfigError(f"config [embed] kinds = {self.kinds!r}: give a list of \"text\" and/or \"image\"")

    def __init__(self, config: Any = None, seed: int = 0):
        super().__init__(config, seed)
        from trainer.embed import RunVectors

        self._scorers: dict[tuple, Any] = {}  # what setup would load, by network: the run's network is per run
        c = self.config
        self._identity = RunVectors("embed", c.model, c.pretrained, c.checkpoint)  # fingerprints (digests memoised)

    # ---- the network ---------------------------------------------------------------------------------
    NETWORK_KEYS = ("model", "pretrained", "checkpoint")

    @classmethod
    def step_config(cls, section: dict, run_config: dict) -> dict:
        """All three network keys empty: [dfn]'s, so dfn finds the vectors this step stored."""
        if any(section.get(k) for k in cls.NETWORK_KEYS):
            return section
        dfn = run_config.get("dfn") or {}
        return {**section, **{k: str(dfn.get(k) or "") for k in cls.NETWORK_KEYS}}

    def network(self, ctx: ShardContext | None = None):
        """The network this step embeds with (its config, completed by `step_config`)."""
        from trainer.embed import Network

        c = self.config
        return Network(c.model, c.pretrained, c.checkpoint)

    def fingerprint_parts(self, ctx: ShardContext | None = None) -> dict:
        return {"network": self._identity.fingerprint(ctx)}

    def preflight(self, ctx: ShardContext) -> list[str]:
        """The network must load offline (a checkpoint that exists, or a pretrained network in the cache)."""
        from trainer.models import network_problem

        net = self.network(ctx)
        problem = network_problem(net.model, net.pretrained, net.checkpoint_path(ctx.run_dir))
        return [problem] if problem else []

    def scorer(self, ctx: ShardContext):
        net = self.network(ctx)
        c = self.config
        key = (net, net.checkpoint_path(ctx.run_dir), net.stamp(ctx.run_dir))  # new weights: loaded again
        if key not in self._scorers:
            path = net.checkpoint_path(ctx.run_dir)
            if not net.pretrained_network() and (not path or not shards.exists(path)):
                raise StageError(f"embed: no network to embed with: {net.describe(ctx.run_dir)} does not exist; set "
                                 "[embed] model/pretrained (e.g. model = \"hf-hub:apple/DFN-public\") or [dfn]'s, or "
                                 "train one with `clipcurate dfn-train --hq HQ.parquet --run NAME`")
            try:
                scorer = net.scorer(ctx.run_dir, c.device, c.precision, c.batch_size, c.num_workers)
            except ValueError as e:
                raise StageError(f"embed: {e}") from None
            self._scorers = {key: scorer}  # one network per process at a time: models are large
            log.info("embed: %s (%s) on %s, %s", net.describe(ctx.run_dir), scorer.model_name, scorer.device,
                     scorer.precision)
        return self._scorers[key]

    # ---- contract --------------------------------------------------------------------------------------
    def apply(self, table: pa.Table, stats, ctx: ShardContext | None = None) -> tuple[pa.Table, pa.Table]:
        from pipeline.images import REF_COL
        from trainer.embed import shard_vectors

        ctx = ctx or self.detached()
        store = self.network(ctx).stored(ctx.run_dir) if ctx.run_dir else None  # found without loading
        if store is None:
            store = embeddings.EmbeddingStore(ctx.run_dir, self.scorer(ctx).identity) if ctx.run_dir else None

        def scorer():
            return self.scorer(ctx)

        for kind in KINDS:
            if kind not in self.config.kinds:
                continue
            if kind == "image" and REF_COL not in table.column_names and "image" not in table.column_names:
                ctx.note("embed: the rows name no images (a URL list before the download): text vectors only")
                continue
            got = shard_vectors(scorer, store, table, ctx, kind)
            if store is not None and ctx.shard:
                path = store.path(ctx.shard, kind)  # (not there: every row came from other shards' files)
                ctx.wrote(path, got.record or (shards.file_record(path) if store.has(ctx.shard, kind) else None))
            if kind == "image" and table.num_rows and not got.found.all():
                ctx.note("embed: rows without a usable image are stored without an image vector (dfn names them)")
        if store is not None:
            ctx.note(f"embed: vectors in embeddings/{store.model_id}/")
        return split_by_reason(table, pa.nulls(table.num_rows, pa.string()))


STAGE = EmbedStage
