"""semdedup: semantic deduplication (SemDeDup, arXiv 2303.09540) and eval decontamination on the run's stored
embeddings. Align catches exact copies, dHash near-copies of an image and MinHash near-copies of a caption; this
step catches the same scene re-shot, re-cropped or re-captioned, as the embedding sees it.

Rules, in order (the first that fires names the row's `reason`):
  eval_semantic_duplicate  the row's image is within `eval_threshold` cosine of an evaluation image
                           (`eval_images`, the same sets align's dHash rule reads); `eval_item` names it:
                           SET/path/in/set.jpg or SET/file.parquet#row (pipeline/evalsets.py)
  eval_caption_duplicate   (`eval_text_threshold` > 0) the row's caption is within that cosine of an eval item's
                           caption (a Parquet eval set's text/caption/captions column, a folder's a.txt beside
                           a.jpg); `eval_item` names the item. Off by default: web alt-text repeats generic
                           captions ("a red car"), so a caption alone is weaker evidence than an image
  semantic_duplicate       in the same k-means cluster as a kept row, with image cosine >= 1 - eps_image and, in
                           `mode = "pair"` (the default), text cosine >= 1 - eps_text; `duplicate_of` names the
                           kept row's uid (groups.py: the relation's connected components, one row kept each;
                           `group = "nearest_kept"`: dropped only next to a better-ranked copy that is kept)

How (the stage contract's passes; the runner's survey before the statistics, pipeline/stage.py):
  survey     each shard's sample of image vectors, drawn by uniform(uid) (clusters.py), merged pool-wide
  conclude   k-means (faiss, fixed seed) of the sample, once, in the driver: `clusters` centroids (0: one per
             `rows_per_cluster` rows); the eval set's images and captions embedded once with the run's network.
             Both saved in the stage folder (survey/), given to every collect and apply
  collect    each row's nearest centroid; rows (uid, cluster, vectors, dfn_score) shuffled by cluster into
             partitions as align's statistics are; eval copies are left out (never kept as a group's copy)
  merge      per partition, per cluster (a cluster over `max_cluster_rows` split again by k-means first): the
             pairwise step, blocked (groups.py), and which copy is kept (`keep`)
  apply      each shard's rejected rows, with their reasons

Vectors: the run's embedding store (trainer/embed.py RunVectors): the network is [semdedup]'s model/pretrained/
checkpoint, or when those are empty [embed]'s, else [dfn]'s, so the vectors embed (or dfn) stored are read, not
computed again; rows the store lacks are embedded and stored. Rows without an image vector (no image, or bytes
that do not decode) are not judged and pass.

A row dropped by an eval rule carries `eval_image_cosine` and `eval_text_cosine`: its image's and its caption's
cosine to the named eval item's image and nearest caption (null where the item has none), so a reader sees
whether the pair leaked or only the picture (evalmatch.py).

Result: the same for any shard split, worker count or row order (the sample is a function of the uids, the
centroids of the sample, a cluster is decided whole in one partition, in uid order).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import evalsets, shards
from pipeline.config import ConfigError, check_ranges
from pipeline.context import ShardContext
from pipeline.hashing import uid_to_u64, uniform_of_keys
from pipeline.errors import StageError
from pipeline.rules import Facts, Rule, judge, reasons, split_by_reason
from pipeline.stage import Stage

from . import clusters, groups
from .evalmatch import EvalMatch, match_eval, no_eval_captions, no_eval_match
from .report import stage_report

log = logging.getLogger("clipcurate.semdedup")


class DedupFacts(Facts):
    """A shard's rows as semdedup's rules read them (all given: apply computes both once)."""

    FIELDS = (
        "eval_hit",  # the image's nearest eval image is within eval_threshold
        "eval_text_hit",  # the caption's nearest eval caption is within eval_text_threshold (when on)
        "semantic",  # another row of its group is kept (the merge's answer)
    )


class EvalSemanticDuplicate(Rule):
    """The image's nearest evaluation image is within `eval_threshold` cosine (`eval_item` names it)."""
    name, needs = "eval_semantic_duplicate", ("eval_hit",)

    def mask(self, f) -> np.ndarray:
        return f.eval_hit


class EvalCaptionDuplicate(Rule):
    """The caption's nearest eval caption is within `eval_text_threshold` cosine (`eval_item` names its item)."""
    name, needs = "eval_caption_duplicate", ("eval_text_hit",)

    def mask(self, f) -> np.ndarray:
        return f.eval_text_hit


class SemanticDuplicate(Rule):
    """Another row of its group is the one kept (`duplicate_of` names it): the merge's answer for this uid."""
    name, needs = "semantic_duplicate", ("semantic",)

    def mask(self, f) -> np.ndarray:
        return f.semantic


RULES = (EvalSemanticDuplicate(), EvalCaptionDuplicate(), SemanticDuplicate())
REASONS = tuple(reasons(RULES))
SAMPLE_SALT = "semdedup:sample"


class SemDedupStage(Stage):
    name = "semdedup"
    requires = {"uid": pa.string(), "text": pa.string()}
    needs_pixels = True  # rows the store lacks are embedded from their images
    speed_keys = frozenset({"batch_size", "num_workers"})

    @dataclasses.dataclass
    class Config:
        model: str = ""  # all three empty: the run's embedding network ([embed]'s, else [dfn]'s)
        pretrained: str = ""
        checkpoint: str = ""
        mode: str = "pair"  # "pair": image and text both close; "image": the image alone (NeMo Curator's rule)
        eps_image: float = 0.05  # duplicates: image cosine >= 1 - eps_image
        eps_text: float = 0.10  # ... and (pair mode) text cosine >= 1 - eps_text
        keep: str = "highest_score"  # or "hard" (least typical: NeMo's default) or "easy" (most typical)
        group: str = "component"  # or "nearest_kept": dropped only next to a kept better-ranked copy (groups.py)
        clusters: int = 0  # k-means clusters; 0: one per `rows_per_cluster` rows of the pool, at least one
        rows_per_cluster: int = 10000
        sample_per_cluster: int = 100  # k-means sample: ~this many rows per default-sized cluster ...
        min_sample: int = 20000  # ... and never fewer rows than this (all of a smaller pool)
        kmeans_iterations: int = 20
        max_cluster_rows: int = 20000  # a bigger cluster is split by k-means again before its pairwise step
        eval_images: str = ""  # eval set (folder of images, or Parquet with image bytes); "" = off
        eval_threshold: float = 0.95  # a row whose image is this close (cosine) to an eval image is rejected
        eval_text_threshold: float = 0.0  # 0 = off; else a row whose caption is this close to an eval caption
        batch_size: int = 256
        device: str = "auto"
        precision: str = "auto"
        num_workers: int = -1

        def __post_init__(self):
            check_ranges("semdedup", self, eps_image=(0, 2), eps_text=(0, 2), clusters=(0, None),
                         rows_per_cluster=(1, None), sample_per_cluster=(1, None), min_sample=(1, None),
                         kmeans_iterations=(1, None), max_cluster_rows=(2, None), eval_threshold=(-1, 1),
                         eval_text_threshold=(0, 1),
                         batch_size=(1, None), num_workers=(-1, None))
            if self.mode not in groups.MODES:
                raise ConfigError(f"config [semdedup] mode = {self.mode!r}: give one of {', '.join(groups.MODES)}")
            if self.group not in groups.GROUPINGS:
                raise ConfigError(f"config [semdedup] group = {self.group!r}: give one of "
                                  f"{', '.join(groups.GROUPINGS)}")
            if self.keep not in groups.KEEP_RULES:
                raise ConfigError(f"config [semdedup] keep = {self.keep!r}: give one of "
                                  f"{', '.join(groups.KEEP_RULES)}")

    def __init__(self, config: Any = None, seed: int = 0):
        super().__init__(config, seed)
        from trainer.embed import RunVectors

        c = self.config
        self.vectors = RunVectors("semdedup", c.model, c.pretrained, c.checkpoint, c.device, c.precision,
                                  c.batch_size, c.num_workers)

    @classmethod
    def step_config(cls, section: dict, run_config: dict) -> dict:
        from trainer.embed import run_network_config

        return run_network_config(section, run_config)

    def fingerprint_parts(self, ctx: ShardContext | None = None) -> dict:
        import faiss

        parts = {"network": self.vectors.fingerprint(ctx), "faiss": faiss.__version__, "rule": "components-1",
                 "eval": "image-and-caption-1"}
        if self.config.eval_images and shards.exists(self.config.eval_images):
            parts["eval_files"] = [(rel or evalsets.set_name(self.config.eval_images), size)
                             for rel, size in evalsets.eval_files(self.config.eval_images)]
        return parts

    def preflight(self, ctx: ShardContext) -> list[str]:
        out = list(self.vectors.preflight(ctx))
        c = self.config
        if c.eval_images:
            what = ("does not exist" if not shards.exists(c.eval_images)
                    else "is empty" if not evalsets.eval_files(c.eval_images) else None)
            if what:
                out.append(f"eval set {c.eval_images} ([semdedup] eval_images) {what}: give a folder of images or a "
                           "Parquet file/folder with image bytes (a demo world writes eval/), or set "
                           "eval_images = \"\" to run without embedding decontamination")
        return out

    # ---- survey: the k-means sample, the centroids, the eval set's vectors ----------------------------------
    @property
    def sample_rate(self) -> float:
        return min(1.0, self.config.sample_per_cluster / self.config.rows_per_cluster)

    def _image_vectors(self, table: pa.Table, ctx: ShardContext):
        return self.vectors.vectors(table, ctx, "image")

    def survey(self, table: pa.Table, ctx: ShardContext | None = None) -> dict:
        ctx = ctx or self.detached()
        img = self._image_vectors(table, ctx)
        keys = uid_to_u64(table.column("uid").filter(pa.array(img.found)))
        draw = uniform_of_keys(keys, self.seed, SAMPLE_SALT)
        at = clusters.sample_rows(draw, self.sample_rate, self.config.min_sample)
        return {"rows": int(img.found.sum()), "keys": keys[at], "draw": draw[at],
                "vectors": img.vectors[img.found][at]}

    def merge_survey(self, partials: list) -> dict:
        return clusters.merge_samples(partials, self.sample_rate, self.config.min_sample)

    def conclude_survey(self, merged: dict, ctx: ShardContext) -> dict:
        c = self.config
        k = c.clusters or clusters.default_clusters(merged["rows"], c.rows_per_cluster)
        centroids = clusters.kmeans(merged["vectors"], k, c.kmeans_iterations, self.seed)
        log.info("semdedup: %d clusters of %d rows' image vectors (k-means on a sample of %d)", len(centroids),
                 merged["rows"], len(merged["vectors"]))
        out = {"rows": int(merged["rows"]), "sample": len(merged["vectors"]), "asked": int(k),
               "centroids": centroids, "eval_names": [], "eval_vectors": np.zeros((0, centroids.shape[1]), np.float16),
               "eval_unreadable": 0, **no_eval_captions(centroids.shape[1])}
        if c.eval_images:
            out.update(self._embed_eval_set(ctx, centroids.shape[1]))
        return out

    def _embed_eval_set(self, ctx: ShardContext, dims: int) -> dict:
        """The eval set's images and captions, embedded once with the run's network (vectors as stored: float16
        unit rows). Captions keep the index of their item's image (-1: the item's image does not decode)."""
        from pipeline.embeddings import as_stored

        try:
            items = evalsets.read_eval_items(self.config.eval_images)
        except evalsets.EvalSetError as e:
            raise StageError(f"semdedup: {e}") from None
        n = len(items.names)
        if n == 0:
            return {}
        scorer = self.vectors.scorer(ctx)
        raw, ok, _ = scorer.encode_images(lambda lo, hi: items.blobs[lo:hi], n)
        vecs = as_stored(raw, ok)
        if dims and vecs.shape[1] != dims:  # (dims 0: the pool has no image vector to compare with)
            raise StageError(f"semdedup: the eval set's vectors have {vecs.shape[1]} dims, the pool's {dims}: the "
                             "store holds another network's vectors")
        image_at = np.cumsum(ok) - 1  # item -> its row among the decoded images
        owner = [i for i, caps in enumerate(items.captions) for _ in caps]
        texts = [c for caps in items.captions for c in caps]
        text_vecs = as_stored(scorer.encode_texts(texts)) if texts else np.zeros((0, vecs.shape[1]), np.float16)
        log.info("semdedup: eval set %s: %d images embedded (%d do not decode), %d captions of %d items",
                 self.config.eval_images, int(ok.sum()), int((~ok).sum()), len(texts), len(set(owner)))
        return {"eval_names": [items.names[i] for i in np.flatnonzero(ok)], "eval_vectors": vecs[ok],
                "eval_unreadable": int((~ok).sum()),
                "eval_text_names": [items.names[i] for i in owner], "eval_text_vectors": text_vecs,
                "eval_text_image": np.array([image_at[i] if ok[i] else -1 for i in owner], np.int64)}

    def eval_matches(self, img, read_text, survey: dict | None) -> EvalMatch:
        """Which rows an eval rule drops, the eval item each names and the two cosines it reports (evalmatch.py:
        `read_text` gives the shard's caption vectors where they are compared, None: never)."""
        return match_eval(img, read_text, survey, self.config.eval_threshold, self.config.eval_text_threshold)

    # ---- collect: rows shuffled by cluster --------------------------------------------------------------------
    def collect(self, table: pa.Table, ctx: ShardContext | None = None) -> dict:
        ctx = ctx or self.detached()
        survey = ctx.survey
        if survey is None:
            raise StageError("semdedup: no survey (centroids): run it through the runner (`clipcurate run`)")
        img = self._image_vectors(table, ctx)
        pair = self.config.mode == "pair"
        txt = self.vectors.vectors(table, ctx, "text") if pair else None
        # the caption rule may read captions; the cosines a dropped row reports are apply's, not read here
        reader = (lambda: txt) if pair else (
            (lambda: self.vectors.vectors(table, ctx, "text")) if self.config.eval_text_threshold > 0 else None)
        m = self.eval_matches(img, reader, survey)
        use = img.found & ~m.image_hit & ~m.text_hit
        label, typical = clusters.assign(img.vectors[use], survey["centroids"])
        take = pa.array(np.flatnonzero(use))
        out = {"uid": table.column("uid").take(take).to_numpy().astype(object), "cluster": label,
               "typicality": typical, "score": self._scores(table)[use], "image": img.vectors[use]}
        if pair:
            out["text"] = txt.vectors[use]
        return out

    @staticmethod
    def _scores(table: pa.Table) -> np.ndarray:
        if "dfn_score" not in table.column_names:
            return np.full(table.num_rows, np.nan, np.float32)
        col = pc.cast(table.column("dfn_score"), pa.float32()).combine_chunks()
        return np.asarray(col.fill_null(float("nan")).to_numpy(zero_copy_only=False), np.float32)

    def split(self, partial: dict, n: int) -> list:
        part = partial["cluster"].astype(np.int64) % n
        return [{k: v[part == p] for k, v in partial.items()} for p in range(n)]

    def merge(self, pieces: list) -> dict:
        """One partition's clusters, decided: every cluster is whole here (split by cluster)."""
        pieces = [p for p in pieces if p is not None and len(p["uid"])]
        if not pieces:
            return _decided([], [], [], [], [], 0)
        rows = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
        order = np.argsort(rows["uid"].astype(str), kind="stable")  # uid order: any shard split gives the same
        rows = {k: v[order] for k, v in rows.items()}
        c = self.config
        text_all = rows.get("text") if c.mode == "pair" else None
        by_cluster = np.argsort(rows["cluster"], kind="stable")
        bounds = np.flatnonzero(np.diff(rows["cluster"][by_cluster])) + 1
        dropped, kept, cos, sizes, lost, split = [], [], [], [], [], 0
        for idx in np.split(by_cluster, bounds):  # one cluster at a time (rows in uid order)
            sub = clusters.split_large(rows["image"][idx], c.max_cluster_rows, self.seed, c.kmeans_iterations)
            split += int(sub.max() > 0)
            n_lost = 0
            for s in np.unique(sub):
                at = idx[sub == s]
                rank = groups.keep_rank(c.keep, np.arange(len(at)), rows["score"][at], rows["typicality"][at])
                decide = groups.decide if c.group == "component" else groups.decide_nearest_kept
                d = decide(rows["image"][at], None if text_all is None else text_all[at], rank, c.eps_image,
                           c.eps_text)
                dropped.append(at[d.dropped])
                kept.append(at[d.kept])
                cos.append(d.image_cosine)
                n_lost += len(d.dropped)
            sizes.append(len(idx))
            lost.append(n_lost)
        d_at, k_at = np.concatenate(dropped), np.concatenate(kept)
        return _decided(rows["uid"][d_at], rows["uid"][k_at], np.concatenate(cos), sizes, lost, split)

    def answer(self, merged: dict, piece: dict) -> dict:
        mine = np.isin(merged["uid"].astype(str), piece["uid"].astype(str)) if len(piece["uid"]) else \
            np.zeros(len(merged["uid"]), bool)
        return {k: merged[k][mine] for k in ("uid", "duplicate_of", "image_cosine")}

    def join_answers(self, answers: list) -> dict:
        answers = [a for a in answers if a is not None]
        if not answers:
            return {"uid": np.zeros(0, object), "duplicate_of": np.zeros(0, object),
                    "image_cosine": np.zeros(0, np.float32)}
        return {k: np.concatenate([a[k] for a in answers]) for k in answers[0]}

    # ---- apply ----------------------------------------------------------------------------------------------
    def apply(self, table: pa.Table, stats, ctx: ShardContext | None = None) -> tuple[pa.Table, pa.Table]:
        ctx = ctx or self.detached()
        n = table.num_rows
        m = no_eval_match(n)
        survey = ctx.survey
        if survey is not None and len(survey.get("eval_names") or []) + len(survey.get("eval_text_names") or []):
            m = self.eval_matches(self._image_vectors(table, ctx), lambda: self.vectors.vectors(table, ctx, "text"),
                                  survey)
        semantic, dup_of = _looked_up(table.column("uid"), stats)
        facts = DedupFacts(n, eval_hit=m.image_hit, eval_text_hit=m.text_hit, semantic=semantic)
        reason, _ = judge(RULES, facts, n)
        kept, rejected = split_by_reason(table, reason)
        # every rejected shard has these columns (empty ones too): the shards of a folder share one schema
        gone = np.flatnonzero(m.image_hit | m.text_hit | semantic)
        by_eval = m.image_hit[gone] | m.text_hit[gone]
        named = np.where(by_eval, None, dup_of[gone])
        rejected = rejected.append_column("duplicate_of", pa.array(named, pa.string()))
        rejected = rejected.append_column("eval_item", pa.array(m.item[gone], pa.string()))
        for name, cos in (("eval_image_cosine", m.image_cosine), ("eval_text_cosine", m.text_cosine)):
            rejected = rejected.append_column(name, pa.array(cos[gone], pa.float32(), from_pandas=True))
        if survey is not None:
            ctx.note(f"semdedup: {len(survey['centroids'])} k-means clusters of the image vectors (sample of "
                     f"{survey['sample']} rows), {self.config.mode} mode")
        return kept, rejected

    # ---- report -----------------------------------------------------------------------------------------------
    def report(self, stage_dir: str, out_dir: str) -> dict:
        """What the step judged and dropped, its clusters, and eval decontamination beside align's dHash rule."""
        return stage_report(self.config, stage_dir, out_dir, self.load_stats)


def _looked_up(uids: pa.ChunkedArray, stats: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(dropped, the kept uid it duplicates: None elsewhere) for each of the shard's rows, from its answers."""
    u = uids.to_numpy(zero_copy_only=False).astype(str)
    hit = np.zeros(len(u), bool)
    dup = np.full(len(u), None, dtype=object)
    if stats is None or not len(stats["uid"]) or not len(u):
        return hit, dup
    dropped = stats["uid"].astype(str)
    order = np.argsort(dropped)
    pos = np.minimum(np.searchsorted(dropped[order], u), len(order) - 1)
    hit = dropped[order][pos] == u
    dup[hit] = stats["duplicate_of"][order][pos[hit]]
    return hit, dup


def _decided(dropped, kept, cos, sizes, lost, split: int) -> dict:
    return {"uid": np.asarray(dropped, dtype=object), "duplicate_of": np.asarray(kept, dtype=object),
            "image_cosine": np.asarray(cos, np.float32), "cluster_rows": np.asarray(sizes, np.int64),
            "cluster_dropped": np.asarray(lost, np.int64), "split_clusters": int(split)}


STAGE = SemDedupStage
