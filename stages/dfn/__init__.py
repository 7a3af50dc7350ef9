"""dfn: Data Filtering Network (arXiv 2309.17425): keep the pairs a CLIP model finds best aligned.

Score     `dfn_score` (float32) = cosine of the image and text embeddings of the filtering network, a CLIP
          model in open_clip's architecture: either any open_clip checkpoint + model name the user gives
          (`checkpoint`, `model`), or one our trainer trained on a high-quality set
          (`clipcurate dfn-train --hq HQ.parquet --run NAME`, the DFN recipe: a small CLIP trained on clean
          data filters better than a strong one trained on noise). It writes runs/NAME/dfn_model/model.pt
          and records that path as `[dfn] checkpoint` in the run's config.toml. Or a public filtering
          network, loaded by open_clip from Hugging Face's cache (trainer/models.py load_pretrained):
          `model = "hf-hub:apple/DFN-public"`, or `model = "ViT-L-14"` + `pretrained = "openai"` (a tag, or a
          weights file); `clipcurate fetch-model` puts it in the cache (a run never downloads).
Keep      with `threshold` unset: the top `keep_fraction` of the scored pairs of the whole pool. `collect`
          returns a histogram of the shard's scores over [-1, 1] in `bins` bins (20,001: width 1e-4; sparse),
          `merge` sums them, and the cut is found in the pool histogram: every bin above the boundary bin
          is kept, and in the boundary bin each row is kept with probability
          (pairs still needed) / (pairs in that bin), drawn as U(uid, seed) — so the kept count equals
          keep_fraction x scored pairs up to the binomial noise of one 1e-4-wide bin, whatever the
          sharding. With `threshold` set: keep dfn_score >= threshold.
Pixels    rows carry a reference to their image (`image_ref`); the bytes are read through the run's image reader
          (pipeline/images.py), a store file at a time, only to score.
Reasons   `no_image` (no image bytes: score null), `bad_image` (bytes that do not decode: score null),
          `dfn_low_score` (score below the cut; the score is kept in the rejected shard); and, as in every
          stage, set aside before scoring: `invalid_utf8` (text bytes that are not UTF-8), `invalid_uid`,
          `text_too_long` (over `[run] max_text_bytes`: never tokenised). A decompression bomb
          (over Pillow's 89,478,485-pixel limit, checked from the header: `pipeline.images.open_image`) is a
          `bad_image`.
Cost      the model runs once per row: the score is the cosine of the row's image and text vectors in the run's
          embedding store (runs/NAME/embeddings/<model-id>/, pipeline/embeddings.py), found by uid. A step
          `embed` earlier in the recipe fills it; without one, dfn's collect embeds what the store lacks and
          stores it (trainer/embed.py), and apply, a rerun with a new `keep_fraction` or `threshold`, or a later
          rule reads the vectors back: no second forward pass. A vector is reused only if it was computed from
          the same text / image reference; scores are cosines of the vectors as stored (float16), so a cut from
          stored vectors keeps exactly the rows of the pass that stored them.
Inference batched through a DataLoader that decodes images in `num_workers` worker processes, on CUDA when
          present (bf16/fp16 autocast, pinned memory), CPU otherwise; the model is loaded once per process.

The package: `cut` (the top-fraction cut from the pool's histogram), `report` (the keep rule, candidate
thresholds, the histogram); the stage here is the rule list and the scoring.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import ConfigError, check_ranges
from pipeline import embeddings, shards
from pipeline.images import REF_COL
from pipeline.schema import SchemaError
from pipeline.context import ShardContext
from pipeline.errors import StageError
from pipeline.hashing import uniform
from pipeline.rules import Facts, Rule, judge, split_by_reason
from pipeline.stage import Stage

from .cut import bin_lower_edge, cut_for_fraction, score_bins
from .report import stage_report

log = logging.getLogger("clipcurate.dfn")

PUBLIC_NETWORK_HINT = ('[dfn] model = "hf-hub:apple/DFN-public" (after `clipcurate fetch-model hf-hub:apple/DFN-public`; '
                       'docs/trainer-and-dfn.md "Scoring with a public filtering network")')


# ---- the rules, in order: a row not kept names the first it breaks (pipeline/rules.py) ----------------------
class CutFacts(Facts):
    """A shard's rows as the cut's rules read them (all given: apply scores every row once)."""

    FIELDS = (
        "keep",  # under the cut's rule: scored and at or above the threshold (or drawn in the boundary bin)
        "has_image",  # the row has an image
        "ok",  # the image got a finite score
    )


class NoImage(Rule):
    """No image to score: nothing can be trained on the row."""
    name, needs = "no_image", ("keep", "has_image")

    def mask(self, f) -> np.ndarray:
        return ~f.keep & ~f.has_image


class BadImage(Rule):
    """An image the model could not score (undecodable): no finite score."""
    name, needs = "bad_image", ("keep", "ok")

    def mask(self, f) -> np.ndarray:
        return ~f.keep & ~f.ok


class DfnLowScore(Rule):
    """Scored, and under the cut (the score is kept in the rejected shard)."""
    name, needs = "dfn_low_score", ("keep",)

    def mask(self, f) -> np.ndarray:
        return ~f.keep


RULES = (NoImage(), BadImage(), DfnLowScore())


class DfnStage(Stage):
    name = "dfn"
    requires = {"uid": pa.string(), "text": pa.string()}
    needs_pixels = True

    @dataclasses.dataclass
    class Config:
        checkpoint: str = ""  # open_clip checkpoint; "" = the run's dfn_model/model.pt (see dfn-train)
        model: str = ""  # open_clip model name; "" = the one recorded in the checkpoint (else clipcurate-tiny);
        #                  "hf-hub:ORG/NAME": a pretrained network from the Hugging Face cache (no checkpoint)
        pretrained: str = ""  # with `model` and no checkpoint: an open_clip tag ("openai") or a weights file
        keep_fraction: float = 0.3  # top share of the scored pool kept (DFN, DataComp: 0.1-0.3)
        threshold: float | None = None  # set: keep dfn_score >= threshold instead of a fraction
        bins: int = 20001  # histogram resolution over [-1, 1] (20,001 bins: 1e-4 wide)
        batch_size: int = 256
        device: str = "auto"  # auto = cuda when present, else cpu
        precision: str = "auto"  # auto = bf16/fp16 autocast on GPU, fp32 on CPU
        num_workers: int = -1  # DataLoader decode workers; -1 = 0 on CPU (the model uses the cores), 4 on GPU
        cache: bool = True  # no effect since the embedding store keeps the vectors (kept: older configs name it)
        score_only: bool = False  # only add dfn_score (no quality cut): for a later stage that cuts (metaclip's
        #                           min_score) so the cut and the concept balance apply together

        def __post_init__(self):
            check_ranges("dfn", self, keep_fraction=(0, 1), threshold=(-1, 1), bins=(2, None), batch_size=(1, None),
                         num_workers=(-1, None))
            hub = self.model.startswith("hf-hub:")
            if self.checkpoint and (self.pretrained or hub):
                raise ConfigError(f"config [dfn]: checkpoint = {self.checkpoint!r} and a pretrained network ("
                                  f"{'pretrained = ' + repr(self.pretrained) if self.pretrained else 'model = ' + repr(self.model)}"
                                  "): give one (clear checkpoint to score with the pretrained network)")
            if self.pretrained and not self.model:
                raise ConfigError(f"config [dfn] pretrained = {self.pretrained!r} needs model = the open_clip model "
                                  "it belongs to (e.g. model = \"ViT-L-14\", pretrained = \"openai\")")
            if self.pretrained and hub:
                raise ConfigError(f"config [dfn] model = {self.model!r} names its own weights: leave pretrained empty")

        def pretrained_network(self) -> bool:
            """A public network from the Hugging Face cache, not a checkpoint."""
            return not self.checkpoint and bool(self.pretrained or self.model.startswith("hf-hub:"))

    def __init__(self, config: Any = None, seed: int = 0):
        super().__init__(config, seed)
        self.scorer = None
        self._scorer_key: tuple = ()  # the network `scorer` was loaded for: the default checkpoint is per run
        self._digests: dict[str, str] = {}

    # ---- model -----------------------------------------------------------------------------------
    def network(self):
        from trainer.embed import Network

        c = self.config
        return Network(c.model, c.pretrained, c.checkpoint)

    def checkpoint_path(self, ctx: ShardContext | None = None) -> str:
        path = self.network().checkpoint_path(ctx.run_dir if ctx is not None else "")
        if path or self.config.pretrained_network():
            return path
        raise StageError(
            "dfn: no filtering network: set [dfn] checkpoint = PATH (any open_clip checkpoint, with [dfn] model), "
            "or train one first with `clipcurate dfn-train --hq HQ.parquet --run NAME`, or score with a public "
            f"one: {PUBLIC_NETWORK_HINT}"
        )

    def fingerprint_parts(self, ctx: ShardContext | None = None) -> dict:
        try:
            return self.network().fingerprint(ctx.run_dir if ctx is not None else "", self._file_digest)
        except ConfigError as e:
            raise StageError(f"dfn: {e}") from None

    def scale_notes(self, pool_rows: int) -> list[str]:
        """The default keep share is DFN's and DataComp's for a raw web pool, whatever the pool: said before the
        run, since a pool already curated by the steps before dfn may want to keep more."""
        c = self.config
        if c.score_only or c.threshold is not None or c.keep_fraction != self.Config.keep_fraction:
            return []
        return [f"keeps {c.keep_fraction:.0%} of the scored pairs (keep_fraction's default: the DFN/DataComp setting "
                "for raw web pools; a pool curated before dfn may want a larger share, or a threshold)"]

    def preflight(self, ctx: ShardContext) -> list[str]:
        """The filtering network, resolvable offline (trainer.models.network_problem: looked for, not loaded): a
        checkpoint that exists (by default the run's dfn_model/model.pt, which dfn-train writes), or a pretrained
        network whose files Hugging Face's cache holds (else the line names `clipcurate fetch-model ...`)."""
        from trainer.models import network_problem

        c = self.config
        if c.pretrained_network():
            why = network_problem(c.model, c.pretrained, "")
        else:
            try:
                path = self.checkpoint_path(ctx)
            except StageError as e:
                return [str(e).removeprefix("dfn: ")]
            why = network_problem(c.model, "", path, fix=(
                f"train one with `clipcurate dfn-train --hq HQ.parquet --run {shards.shard_name(ctx.run_dir) or 'NAME'}`, "
                f"or set [dfn] checkpoint, or score with a public network: {PUBLIC_NETWORK_HINT}"))
        return [why] if why else []

    def _file_digest(self, path: str) -> str:
        if path not in self._digests:
            from trainer.models import file_digest

            self._digests[path] = file_digest(path)
        return self._digests[path]

    def setup(self) -> None:
        """Nothing: the network is loaded on the first row the embedding store lacks (a new cut on stored vectors
        never loads it); the preflight has checked it loads offline."""

    def _load(self, ctx: ShardContext) -> None:
        c = self.config
        net = self.network()
        pretrained = c.pretrained_network()
        path = net.describe() if pretrained else self.checkpoint_path(ctx)
        key = (net, path, net.stamp(ctx.run_dir))  # new weights behind the same name are loaded again
        if self.scorer is not None and key == self._scorer_key:
            return
        if not pretrained and not shards.exists(path):
            raise StageError(
                f"dfn: checkpoint {path} does not exist: train one with `clipcurate dfn-train --hq HQ.parquet "
                f"--run NAME`, or set [dfn] checkpoint, or score with a public network: {PUBLIC_NETWORK_HINT}"
            )
        try:  # ConfigError too: a model missing from the cache names `clipcurate fetch-model`
            self.scorer = net.scorer(ctx.run_dir, c.device, c.precision, c.batch_size, c.num_workers)
        except ValueError as e:
            raise StageError(f"dfn: {e}") from None
        self._scorer_key = key
        log.info("dfn: %s (%s) on %s, %s", path, self.scorer.model_name, self.scorer.device, self.scorer.precision)

    # ---- scores ----------------------------------------------------------------------------------
    def score_rows(self, table: pa.Table, ctx: ShardContext | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """(float32 cosine per row, NaN where the image is missing or undecodable; whether the row names image
        bytes; how many vectors the model computed now). The cosine of the rows' stored vectors (the run's embedding store, under this network's identity):
        what the store lacks is embedded now and stored (trainer/embed.py), so collect embeds and apply, or any
        later cut, only reads. Without a run folder (a detached call) nothing is stored; the vectors are still
        rounded as stored, so the score is the same either way."""
        from trainer.embed import shard_vectors

        ctx = ctx or self.detached()
        if REF_COL not in table.column_names and ctx.pixels(table.slice(0, 0)) is None:
            raise SchemaError(f"shard {ctx.shard}: missing column 'image' (or '{REF_COL}'), "
                              "required by dfn: it scores image-text pairs")
        net = self.network()
        store = net.stored(ctx.run_dir) if ctx.run_dir else None  # found without loading the network

        def loaded():
            self._load(ctx)
            return self.scorer

        if store is None:
            scorer = loaded()
            store = embeddings.EmbeddingStore(ctx.run_dir, scorer.identity) if ctx.run_dir else None
        image = shard_vectors(loaded, store, table, ctx, "image")
        text = shard_vectors(loaded, store, table, ctx, "text")
        s = np.full(table.num_rows, np.nan, np.float32)
        both = image.found & text.found
        if both.any():
            s[both] = embeddings.cosine(image.vectors[both], text.vectors[both])
        computed = image.computed + text.computed
        if store is not None:
            ctx.note(f"dfn: embedded the rows the store lacked, into embeddings/{store.model_id}/" if computed else
                     f"dfn: scored from stored vectors (embeddings/{store.model_id}/, no model pass)")
        # dfn's done-marker does not vouch for the store files: its outputs are its shards, still right when the
        # vectors are later removed to save disk (a step `embed` owns and verifies the vectors it writes)
        return s, image.present, computed

    def scores(self, table: pa.Table, ctx: ShardContext | None = None) -> np.ndarray:
        """float32 cosine per row (NaN: no image, or one that does not decode)."""
        return self.score_rows(table, ctx)[0]

    # ---- contract --------------------------------------------------------------------------------
    def collect(self, table: pa.Table, ctx: ShardContext | None = None) -> dict:
        s, _, computed = self.score_rows(table, ctx)
        ok = np.isfinite(s)
        # sparse: the bins this shard's scores fall in, with their counts. A dense histogram is `bins` int64s
        # (160 KB) whatever the shard's size, kept per shard as its pass-1 partial (1.6 GB at 10,000 shards)
        occupied, counts = np.unique(score_bins(s[ok], self.config.bins), return_counts=True)
        return {"bins": occupied.astype(np.int32), "counts": counts.astype(np.int64), "scored": int(ok.sum()),
                "unscored": int((~ok).sum()), "embedded": int(computed)}

    def merge(self, partials: list) -> dict:
        parts = [p for p in partials if p is not None]
        hist = np.zeros(self.config.bins, np.int64)
        for p in parts:  # a shard's sparse partial, or a dense histogram (a merged one, or an older partial)
            if "hist" in p:
                hist += p["hist"]
            else:
                np.add.at(hist, p["bins"], p["counts"])
        return {
            "hist": hist,
            "scored": sum(p["scored"] for p in parts),
            "unscored": sum(p["unscored"] for p in parts),
            "embedded": sum(p.get("embedded", 0) for p in parts),
        }

    def cut(self, stats: dict) -> dict:
        """The keep rule in numbers: {"mode", "threshold", "bin", "q", "wanted"}."""
        if self.config.threshold is not None:
            return {"mode": "threshold", "threshold": float(self.config.threshold)}
        b, q, want = cut_for_fraction(stats["hist"], self.config.keep_fraction)
        return {"mode": "fraction", "bin": b, "q": q, "wanted": want,
                "threshold": bin_lower_edge(b, self.config.bins) if b < self.config.bins else 1.0}

    def save_stats(self, stats: Any, folder: str) -> None:
        super().save_stats(stats, folder)
        c = self.cut(stats)
        # embedded: vectors the model computed in this step (0: every score came from the embedding store)
        shards.write_json({"scored": stats["scored"], "unscored": stats["unscored"], "embedded":
                           stats.get("embedded", 0), "keep_fraction": self.config.keep_fraction, **c},
                          shards.join(folder, "cut.json"))

    def apply_key(self, stats) -> dict:
        """apply reads only the cut: a pool change that moves no score across it redoes no other shard."""
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self.cut(stats).items()}

    def apply(self, table: pa.Table, stats, ctx: ShardContext | None = None) -> tuple[pa.Table, pa.Table]:
        s, has_image, _ = self.score_rows(table, ctx)
        ok = np.isfinite(s)
        c = self.cut(stats)
        if self.config.score_only:  # rows without a usable image still go: nothing can be trained on them
            keep = ok
        elif c["mode"] == "threshold":
            keep = ok & (np.where(ok, s, -np.inf) >= c["threshold"])
        else:
            b = np.where(ok, score_bins(np.where(ok, s, 0.0), self.config.bins), -1)
            u = uniform(table.column("uid"), self.seed, "dfn") if table.num_rows else np.zeros(0)
            keep = ok & ((b > c["bin"]) | ((b == c["bin"]) & (u < c["q"])))
        reason, _ = judge(RULES, CutFacts(table.num_rows, keep=keep, has_image=has_image, ok=ok), table.num_rows)
        score_col = pa.array(s, type=pa.float32(), mask=~ok)
        if "dfn_score" in table.column_names:
            table = table.drop_columns(["dfn_score"])
        table = table.append_column("dfn_score", score_col)
        return split_by_reason(table, reason)

    # ---- report ----------------------------------------------------------------------------------
    def report(self, stage_dir: str, out_dir: str) -> dict:
        """Histogram of dfn_score, kept vs dropped (dfn_low_score), and the keep rule. Where no threshold was set
        (keep_fraction alone, or score_only, where nothing is cut and metaclip's min_score is chosen from this),
        also the share of the scored pool that candidate thresholds keep, counted from the scores, beside what
        DFN and DataComp keep: a threshold the user can copy. A folder with no scored row (or no cut.json) gets
        its tables and no figure."""
        return stage_report(self.config, stage_dir, out_dir)


STAGE = DfnStage
