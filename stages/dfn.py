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
          returns a histogram of the shard's scores over [-1, 1] in `bins` bins (20,001: width 1e-4),
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
Cost      scoring is the expensive part, so `collect` stores each shard's scores in a cache
          (`$CLIPCURATE_CACHE/dfn_scores/`, keyed by the model file's digest, precision and a hash of the
          shard's uids and image references with the referenced store files' size and mtime) and `apply` reads them back instead of scoring twice. A cache miss
          (another machine of a Dask cluster, `cache = false`) rescoring gives the same numbers on the same
          device type.
Inference batched through a DataLoader that decodes images in `num_workers` worker processes, on CUDA when
          present (bf16/fp16 autocast, pinned memory), CPU otherwise; the model is loaded once per process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError, check_ranges
from pipeline import shards
from pipeline.images import REF_COL
from pipeline.schema import SchemaError
from pipeline.context import ShardContext
from pipeline.stage import Stage, StageError, split_by_reason, uniform

from trainer.config import DFN_MODEL_DIR  # runs/NAME/dfn_model/model.pt: where dfn-train writes

log = logging.getLogger("clipcurate.dfn")

PUBLIC_NETWORK_HINT = ('[dfn] model = "hf-hub:apple/DFN-public" (after `clipcurate fetch-model hf-hub:apple/DFN-public`; '
                       'README "Scoring with a public filtering network")')


def score_bins(scores: np.ndarray, bins: int) -> np.ndarray:
    """Bin index of each (finite) cosine in [-1, 1]: bins of width 2 / (bins - 1) centred on -1 .. 1."""
    x = np.clip(np.asarray(scores, dtype=np.float64), -1.0, 1.0)
    return np.clip(np.rint((x + 1.0) * ((bins - 1) / 2.0)), 0, bins - 1).astype(np.int64)


def bin_lower_edge(b: int, bins: int) -> float:
    return max(-1.0, (b - 0.5) * 2.0 / (bins - 1) - 1.0)


def cut_for_fraction(hist: np.ndarray, fraction: float) -> tuple[int, float, int]:
    """(boundary bin, keep probability inside it, rows wanted) for keeping the top `fraction` of `hist`."""
    n = int(hist.sum())
    want = int(round(min(max(fraction, 0.0), 1.0) * n))
    if want <= 0:
        return len(hist), 0.0, 0  # nothing kept: boundary above every bin
    above = np.concatenate([np.cumsum(hist[::-1])[::-1][1:], [0]])  # rows in bins strictly above b
    b = int(np.flatnonzero((above < want) & (above + hist >= want)).max())
    q = (want - int(above[b])) / int(hist[b])
    return b, float(q), want


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
        cache: bool = True  # keep collect's scores for apply (no second scoring pass)
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
        self._scorer_path = ""  # the checkpoint `scorer` was loaded from: the default one is per run
        self._model_digest = ""  # what identifies its weights in the score cache's key
        self._digests: dict[str, str] = {}
        self._mem_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # ---- model -----------------------------------------------------------------------------------
    def checkpoint_path(self, ctx: ShardContext | None = None) -> str:
        if self.config.checkpoint:
            return self.config.checkpoint
        run_dir = ctx.run_dir if ctx is not None else ""
        if run_dir:
            return shards.join(run_dir, DFN_MODEL_DIR, "model.pt")
        raise StageError(
            "dfn: no filtering network: set [dfn] checkpoint = PATH (any open_clip checkpoint, with [dfn] model), "
            "or train one first with `clipcurate dfn-train --hq HQ.parquet --run NAME`, or score with a public "
            f"one: {PUBLIC_NETWORK_HINT}"
        )

    def fingerprint_parts(self, ctx: ShardContext | None = None) -> dict:
        if self.config.pretrained_network():  # the weights in the cache (None: not fetched yet)
            from trainer.models import pretrained_digest

            c = self.config
            try:
                digest = pretrained_digest(c.model, c.pretrained)
            except ConfigError as e:
                raise StageError(f"dfn: {e}") from None
            return {"model": c.model, "pretrained": c.pretrained, **({"weights_xxh3": digest} if digest else {})}
        try:
            path = self.checkpoint_path(ctx)
        except StageError:
            return {}
        if not shards.exists(path):
            return {"checkpoint": path}
        return {"checkpoint_sha256": self._file_digest(path)}

    def _file_digest(self, path: str) -> str:
        if path not in self._digests:
            from trainer.models import file_digest

            self._digests[path] = file_digest(path)
        return self._digests[path]

    def setup(self) -> None:
        if self.config.checkpoint or self.config.pretrained_network():  # else known once the runner names the run
            self._load(self.detached())

    def _load(self, ctx: ShardContext) -> None:
        c = self.config
        pretrained = c.pretrained_network()
        path = f"{c.model} ({c.pretrained})" if pretrained else self.checkpoint_path(ctx)
        if self.scorer is not None and path == self._scorer_path:
            return
        if not pretrained and not shards.exists(path):
            raise StageError(
                f"dfn: checkpoint {path} does not exist: train one with `clipcurate dfn-train --hq HQ.parquet "
                f"--run NAME`, or set [dfn] checkpoint, or score with a public network: {PUBLIC_NETWORK_HINT}"
            )
        from trainer.models import pick_device
        from trainer.score import Scorer

        workers = c.num_workers
        if workers < 0:
            workers = 4 if pick_device(c.device).type == "cuda" else 0
        try:
            self.scorer = Scorer("" if pretrained else path, c.model, c.device, c.precision, c.batch_size, workers,
                                 pretrained=c.pretrained)
        except ValueError as e:  # ConfigError too: a model missing from the cache names `clipcurate fetch-model`
            raise StageError(f"dfn: {e}") from None
        self._scorer_path = path
        # the score cache's key: a pretrained network's identity (its weights' digest and preprocessing)
        self._model_digest = self.scorer.identity.id if pretrained else self._file_digest(path)
        log.info("dfn: %s (%s) on %s, %s", path, self.scorer.model_name, self.scorer.device, self.scorer.precision)

    # ---- scores ----------------------------------------------------------------------------------
    def _cache_key(self, table: pa.Table, ctx: ShardContext) -> str:
        """Model, precision, device, and per row its uid and what names its image: the reference plus the
        identity (size, mtime) of the store files referenced, so a cache hit reads no pixels at all; or the
        bytes themselves for a table that holds them."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self._model_digest}|{self.scorer.precision}|{self.scorer.device.type}|{self.scorer.model_name}".encode())
        h.update("\0".join(u or "" for u in table.column("uid").to_pylist()).encode())
        if REF_COL in table.column_names:  # a text-only shard has neither: score_rows says so
            refs = table.column(REF_COL)
            h.update(b"refs\0" + "\0".join(r or "" for r in refs.to_pylist()).encode())
            reader = ctx.images
            if reader is not None and refs.null_count < len(refs):
                h.update(reader.identity(refs).encode())
            return h.hexdigest()
        blobs = ctx.pixels(table)
        for img in blobs.to_pylist() if blobs is not None else [None] * table.num_rows:
            h.update(len(img).to_bytes(8, "little") if img is not None else b"\xff" * 8)
            if img is not None:
                h.update(img)
        return h.hexdigest()

    def _cache_path(self, key: str) -> str:
        from metadata.wordnet import cache_root

        return str(cache_root() / "dfn_scores" / f"{key}.npz")

    def score_rows(self, table: pa.Table, ctx: ShardContext | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(float32 cosine per row, NaN where the image is missing or undecodable; whether the row has image
        bytes). The pixels are read through the run's image reader, once per shard: collect scores, apply
        finds the scores in the cache."""
        ctx = ctx or self.detached()
        self._load(ctx)
        key = self._cache_key(table, ctx) if self.config.cache else None
        if key is not None:
            if key in self._mem_cache:
                return self._mem_cache[key]
            path = self._cache_path(key)
            if os.path.exists(path):
                try:
                    with np.load(path) as z:
                        s, has = z["scores"], z["has_image"]
                    if s.shape == has.shape == (table.num_rows,):
                        return s, has
                except (OSError, ValueError, KeyError):
                    pass
        blobs = ctx.pixels(table)
        if blobs is None:
            raise SchemaError(f"shard {ctx.shard}: missing column 'image' (or '{REF_COL}'), "
                              "required by dfn: it scores image-text pairs")
        has = pc.is_valid(blobs).to_numpy(zero_copy_only=False)
        s = self.scorer.score(blobs.to_pylist(), table.column("text").to_pylist())
        if key is not None:
            path = self._cache_path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                np.savez(f, scores=s, has_image=has)
            os.replace(tmp, path)
            self._mem_cache = {key: (s, has)}  # one shard: collect then apply in the same process
        return s, has

    def scores(self, table: pa.Table, ctx: ShardContext | None = None) -> np.ndarray:
        """float32 cosine per row (NaN: no image, or one that does not decode)."""
        return self.score_rows(table, ctx)[0]

    # ---- contract --------------------------------------------------------------------------------
    def collect(self, table: pa.Table, ctx: ShardContext | None = None) -> dict:
        s, _ = self.score_rows(table, ctx)
        ok = np.isfinite(s)
        hist = np.bincount(score_bins(s[ok], self.config.bins), minlength=self.config.bins).astype(np.int64)
        return {"hist": hist, "scored": int(ok.sum()), "unscored": int((~ok).sum())}

    def merge(self, partials: list) -> dict:
        parts = [p for p in partials if p is not None]
        return {
            "hist": np.sum([p["hist"] for p in parts], axis=0) if parts else np.zeros(self.config.bins, np.int64),
            "scored": sum(p["scored"] for p in parts),
            "unscored": sum(p["unscored"] for p in parts),
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
        shards.write_json({"scored": stats["scored"], "unscored": stats["unscored"], "keep_fraction":
                           self.config.keep_fraction, **c}, shards.join(folder, "cut.json"))

    def apply(self, table: pa.Table, stats, ctx: ShardContext | None = None) -> tuple[pa.Table, pa.Table]:
        s, has_image = self.score_rows(table, ctx)
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
        no_image = ~has_image
        reason = np.where(keep, None, np.where(no_image, "no_image", np.where(ok, "dfn_low_score", "bad_image")))
        score_col = pa.array(s, type=pa.float32(), mask=~ok)
        if "dfn_score" in table.column_names:
            table = table.drop_columns(["dfn_score"])
        table = table.append_column("dfn_score", score_col)
        return split_by_reason(table, pa.array(reason.tolist(), type=pa.string()))

    # ---- report ----------------------------------------------------------------------------------
    def report(self, stage_dir: str, out_dir: str) -> dict:
        """Histogram of dfn_score, kept vs dropped (dfn_low_score), and the cut."""

        def scores_in(folder: str, reason: str | None) -> np.ndarray:
            vals = []
            for p in shards.list_shards(folder) if shards.exists(folder) else []:
                cols = ["dfn_score"] + (["reason"] if reason else [])
                t = shards.read_shard(p, columns=cols)
                if reason:
                    t = t.filter(pc.equal(t.column("reason"), reason))
                vals.append(t.column("dfn_score").to_numpy(zero_copy_only=False))
            v = np.concatenate(vals).astype(np.float64) if vals else np.zeros(0)
            return v[np.isfinite(v)]

        kept = scores_in(stage_dir, None)
        dropped = scores_in(shards.join(stage_dir, "rejected"), "dfn_low_score")
        cut = shards.read_json(shards.join(stage_dir, "stats", "cut.json")) or {}
        total = len(kept) + len(dropped)
        from pipeline.report import Table

        table = Table("dfn keep rule", ["scored", "kept", "dropped (dfn_low_score)", "kept share", "threshold", "mode"],
                      [[total, len(kept), len(dropped), f"{100.0 * len(kept) / total if total else 0:.2f}%",
                        f"{cut.get('threshold', float('nan')):.4f}", cut.get("mode", "")]])
        figures = []
        if total:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            os.makedirs(out_dir, exist_ok=True)
            both = np.concatenate([kept, dropped])
            lo, hi = float(both.min()), float(both.max())
            edges = np.linspace(lo, hi if hi > lo else lo + 1e-3, 61)
            fig, ax = plt.subplots(figsize=(6.5, 3.4), dpi=100)
            ax.hist(dropped, bins=edges, color="#c44e52", alpha=0.8, label=f"dropped ({len(dropped)})")
            ax.hist(kept, bins=edges, color="#4c72b0", alpha=0.8, label=f"kept ({len(kept)})")
            if "threshold" in cut:
                ax.axvline(cut["threshold"], color="k", lw=1, ls="--", label=f"cut {cut['threshold']:.4f}")
            ax.set_xlabel("dfn_score (image-text cosine)")
            ax.set_ylabel("pairs")
            ax.set_title("dfn: score histogram, kept vs dropped")
            ax.legend(fontsize=8)
            fig.tight_layout()
            png = os.path.join(out_dir, "dfn_scores.png")
            fig.savefig(png)
            plt.close(fig)
            figures.append(("dfn score histogram (kept vs dropped)", png))
        return {"figures": figures, "tables": [table]}


STAGE = DfnStage
