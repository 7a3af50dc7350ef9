"""A shard's embeddings under a model, computed once: found in the run's embedding store, or computed and stored.

The embed and dfn stages both call `shard_vectors` (a stage never imports another): embed to fill the store,
dfn to score from it, computing only what the store lacks. A vector is reused only when the store holds it for
the row's uid *and* it was computed from the same input: each stored row records a 64-bit hash of its source
(the text for text vectors; the image reference, which names the store file and, for tar members, offset, size
and CRC, for image vectors), so a caption or image that changed behind a uid is embedded again, never scored
with another input's vector.

Scores are always computed from vectors as stored (L2-normalised in float32, then float16:
pipeline.embeddings.as_stored), also when no store is at hand: a score read from the store equals the score of
the pass that wrote it, bit for bit, so a cut made from stored vectors keeps exactly the rows of a direct one.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from pipeline import embeddings
from pipeline.hashing import hash64_strings
from pipeline.images import REF_COL

log = logging.getLogger("clipcurate.embed")

KINDS = ("text", "image")
NO_INPUT = np.uint64(0x9E3779B97F4A7C15)  # xor-ed into a stored row's source hash: "this row had no image bytes"


class ShardVectors(NamedTuple):
    """One kind of vector for a shard's rows, in row order: float16 as stored (zeros where not `found`), `found`
    (the row has a vector: for images, bytes that decoded), `present` (the row has an input: for images, bytes,
    decodable or not), how many rows were computed now (the rest came from the store), and the store file's
    {"size", "xxh3"} record when this call wrote it (None: nothing written)."""

    vectors: np.ndarray
    found: np.ndarray
    present: np.ndarray
    computed: int
    record: dict | None


def sources(table: pa.Table, kind: str) -> np.ndarray | None:
    """What each row's `kind` vector is computed from, hashed: the text, or the image reference (None: the rows
    carry no reference, e.g. a table built in memory with its bytes; such vectors are not stored)."""
    if kind == "text":
        return hash64_strings(table.column("text"), "embed:text")
    if REF_COL not in table.column_names:
        return None
    return hash64_strings(table.column(REF_COL), "embed:image")


def shard_vectors(scorer, store: embeddings.EmbeddingStore | None, table: pa.Table, ctx, kind: str) -> ShardVectors:
    """`kind` vectors of `table`'s rows: from the store where it holds them (this shard's file first, then any
    file, for rows resharded since), the rest computed with `scorer` and added to this shard's file (rows it
    already held for other uids are kept). Without a store (`store` None) every row is computed. `scorer` may be
    a function that loads the model: it is called only when a row must be embedded, so a new cut on stored
    vectors never loads the network."""
    n = table.num_rows
    src = sources(table, kind)
    storable = store is not None and src is not None and bool(ctx.shard)
    if store is None or not store.dims:
        scorer = _loaded(scorer)
    vectors = np.zeros((n, scorer_dims(scorer, store)), np.float16)
    found = np.zeros(n, bool)
    have = np.zeros(n, bool)  # the store answered for the row (a vector, bytes that do not decode, or no bytes)
    present = np.ones(n, bool)  # the row has an input (for images: bytes, decodable or not)
    uids = table.column("uid")
    if storable and n:
        _from_store(store, ctx.shard, kind, uids, src, vectors, found, have, present)
    todo = np.flatnonzero(~have)
    if len(todo) == 0:
        return ShardVectors(vectors, found, present, 0, None)
    t0 = time.perf_counter()
    scorer = _loaded(scorer)
    part = table.take(pa.array(todo))
    if kind == "text":
        raw = scorer.encode_texts(part.column("text").to_pylist())
        ok = had = np.ones(len(todo), bool)
    else:
        raw, ok, had = _encode_images(scorer, part, ctx)
    vectors[todo] = embeddings.as_stored(raw, ok)
    found[todo] = ok
    present[todo] = had
    log.info("embed: %s %d %s vectors in %.1fs (%d from the store)", ctx.shard or "table", len(todo), kind,
             time.perf_counter() - t0, n - len(todo))
    record = None
    if storable:  # a row without bytes is stored too (no vector, its source marked): a rerun need not load the model
        marked = np.where(present, src, src ^ NO_INPUT)
        record = _add_to_store(store, ctx.shard, kind, uids, vectors, found, marked)
    return ShardVectors(vectors, found, present, len(todo), record)


def _loaded(scorer):
    return scorer() if callable(scorer) and not hasattr(scorer, "encode_texts") else scorer


def scorer_dims(scorer, store) -> int:
    if store is not None and store.dims:
        return store.dims
    return scorer.dims


def _from_store(store, shard: str, kind: str, uids, src: np.ndarray, vectors, found, have, present) -> None:
    """Fill in what the store holds for these rows, when it was computed from the same source (or recorded as
    having none: the source hash with NO_INPUT flipped in)."""
    if store.has(shard, kind):
        got = store.lookup(shard, kind, uids)
        same, none = got.listed & (got.source == src), got.listed & (got.source == (src ^ NO_INPUT))
        hit = same | none
        vectors[hit], found[hit], have[hit] = got.vectors[hit], got.found[hit], True
        present[none] = False
    rest = np.flatnonzero(~have)
    if len(rest) and any(stem != embeddings.shard_stem(shard) for stem in store.files(kind)):
        got = store.lookup_any(uids.take(pa.array(rest)), kind)
        same, none = got.listed & (got.source == src[rest]), got.listed & (got.source == (src[rest] ^ NO_INPUT))
        at = rest[same | none]
        vectors[at], found[at], have[at] = got.vectors[same | none], got.found[same | none], True
        present[rest[none]] = False


def _encode_images(scorer, part: pa.Table, ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image vectors of `part`'s rows: chunks of rows read through the run's image reader (in the scorer's
    DataLoader workers when it has some), decoded, embedded. Rows without bytes have no vector."""
    cols = [c for c in ("uid", REF_COL, "image") if c in part.column_names]
    slim = part.select(cols)

    def read(lo: int, hi: int) -> list:
        blobs = ctx.pixels(slim.slice(lo, hi - lo))
        return [None] * (hi - lo) if blobs is None else blobs.to_pylist()

    return scorer.encode_images(read, slim.num_rows)


def _add_to_store(store, shard: str, kind: str, uids, vectors, found, src) -> dict:
    """This shard's file with these rows, plus the rows it already held for uids not in this table."""
    uids = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
    keys = embeddings.uid_keys(uids)
    _, first = np.unique(keys, return_index=True)  # a pool may repeat a uid: its first row speaks for it
    if len(first) < len(keys):
        first = np.sort(first)
        uids, keys = uids.take(pa.array(first)), keys[first]
        vectors, found, src = vectors[first], found[first], src[first]
    old_keys, old_vec, old_valid, old_src = store.entries(shard, kind)
    keep = ~np.isin(old_keys, keys) if len(old_keys) else np.zeros(0, bool)
    if keep.any():
        all_uids = pa.concat_arrays([embeddings.keys_to_hex(old_keys[keep]), uids.cast(pa.string())])
        vectors = np.concatenate([old_vec[keep], vectors])
        found = np.concatenate([old_valid[keep], found])
        src = np.concatenate([old_src[keep] if old_src is not None else np.zeros(int(keep.sum()), np.uint64), src])
        uids = all_uids
    return store.write(shard, kind, uids, vectors, found, src)


# ---- which network ------------------------------------------------------------------------------------------

class Network(NamedTuple):
    """A filtering / embedding network as a config names it: an open_clip checkpoint (ours from dfn-train, or any
    open_clip one with `model`), or a pretrained network from Hugging Face's cache (`model` = an open_clip name or
    hf-hub:ORG/NAME, `pretrained` = a tag or weights file). All empty: the run's own dfn-train network."""

    model: str = ""
    pretrained: str = ""
    checkpoint: str = ""

    def pretrained_network(self) -> bool:
        return not self.checkpoint and bool(self.pretrained or self.model.startswith("hf-hub:"))

    def checkpoint_path(self, run_dir: str) -> str:
        """The checkpoint scored with ("" when there is none to name: no run folder and none configured)."""
        from pipeline import shards
        from trainer.config import DFN_MODEL_DIR

        if self.checkpoint or not run_dir:
            return self.checkpoint
        return shards.join(run_dir, DFN_MODEL_DIR, "model.pt")

    def describe(self, run_dir: str = "") -> str:
        if self.pretrained_network():
            return f"{self.model}" + (f" ({self.pretrained})" if self.pretrained else "")
        return self.checkpoint_path(run_dir) or "(no checkpoint)"

    def fingerprint(self, run_dir: str, digest_file) -> dict:
        """What identifies the weights, for a step's fingerprint: a pretrained network's name, tag and cached
        weights' digest (none yet: not fetched), or the checkpoint's digest (its path while it does not exist).
        `digest_file(path)` digests a checkpoint (the caller keeps its own memo). ConfigError as models.plan's."""
        from pipeline import shards
        from trainer.models import pretrained_digest

        if self.pretrained_network():
            digest = pretrained_digest(self.model, self.pretrained)
            return {"model": self.model, "pretrained": self.pretrained, **({"weights_xxh3": digest} if digest else {})}
        path = self.checkpoint_path(run_dir)
        if not path:
            return {}
        if not shards.exists(path):
            return {"checkpoint": path}
        return {"checkpoint_sha256": digest_file(path)}

    def weights_files(self, run_dir: str) -> list[str]:
        """The files the weights are read from (none: not fetched, or random weights); no loading."""
        if not self.pretrained_network():
            path = self.checkpoint_path(run_dir)
            return [path] if path else []
        from trainer import hub
        from trainer.models import register_configs

        register_configs()
        try:
            return list(hub.cached_files(hub.plan(self.model, self.pretrained)) or [])
        except ValueError:
            return []

    def stamp(self, run_dir: str) -> tuple:
        """(path, size, mtime) of each weights file: a process keeps a loaded model while this is unchanged, so
        new weights behind the same name (a new fetch, a retrained checkpoint) are loaded, not ignored."""
        from pipeline import shards

        out = []
        for path in self.weights_files(run_dir):
            try:
                fs, p = shards.fs_and_path(path)
                info = fs.info(p)
                out.append((path, info.get("size"), str(info.get("mtime") or info.get("LastModified") or "")))
            except (OSError, FileNotFoundError):
                out.append((path, None, ""))
        return tuple(out)

    def stored(self, run_dir: str) -> embeddings.EmbeddingStore | None:
        """The run's embedding store of this network, found without loading it: the manifest whose identity
        names the same weights (digest of the files, memoised per process by path, size and mtime) and tag.
        None when there is none yet, or the weights are random (their digest needs the model)."""
        from pipeline import shards
        from trainer.models import weights_digest

        files = self.weights_files(run_dir)
        if not run_dir or not files or not all(shards.exists(f) for f in files):
            return None
        digest = weights_digest(files[-1:])  # the weights file, as models.load_pretrained / checkpoint_identity
        folder = shards.join(run_dir, embeddings.FOLDER)
        fs, p = shards.fs_and_path(folder)
        if not fs.exists(p):
            return None
        for entry in sorted(fs.ls(p, detail=False)):
            model_id = str(entry).rstrip("/").rsplit("/", 1)[-1]
            try:
                store = embeddings.EmbeddingStore.open(run_dir, model_id)
            except embeddings.EmbeddingError:
                continue
            ident = store.identity
            if ident.get("weights_digest") == digest and (not self.pretrained_network() or ident.get("name") == self.model):
                return store
        return None

    def scorer(self, run_dir: str, device: str, precision: str, batch_size: int, num_workers: int):
        """The loaded model (trainer.score.Scorer). ValueError (ConfigError too) in one line: a checkpoint that
        does not load, a pretrained network missing from the cache (naming `clipcurate fetch-model`)."""
        from trainer.models import pick_device
        from trainer.score import Scorer

        if num_workers < 0:
            num_workers = 4 if pick_device(device).type == "cuda" else 0
        if self.pretrained_network():
            return Scorer("", self.model, device, precision, batch_size, num_workers, pretrained=self.pretrained)
        return Scorer(self.checkpoint_path(run_dir), self.model, device, precision, batch_size, num_workers)


# ---- the run's vectors, for a model-based rule (semdedup, heads) -----------------------------------------------
NETWORK_KEYS = ("model", "pretrained", "checkpoint")


def run_network_config(section: dict, run_config: dict) -> dict:
    """A model-based step's network keys, all empty: the run's embedding network ([embed]'s when it names one,
    else [dfn]'s, as embed itself), so every such step reads the vectors embed stored. For `Stage.step_config`."""
    if any(section.get(k) for k in NETWORK_KEYS):
        return section
    for source in ("embed", "dfn"):
        other = run_config.get(source) or {}
        if any(other.get(k) for k in NETWORK_KEYS):
            return {**section, **{k: str(other.get(k) or "") for k in NETWORK_KEYS}}
    return section


class RunVectors:
    """The run's vectors of one network, for a stage whose rules read embeddings (semdedup, heads): the store found
    without loading the network, the network loaded (once per process and weights) only for rows the store
    lacks, which are then embedded and stored as embed would. A stage holds one; it keeps only what setup would
    load (the scorer), never per-call state."""

    def __init__(self, step: str, model: str = "", pretrained: str = "", checkpoint: str = "", device: str = "auto",
                 precision: str = "auto", batch_size: int = 256, num_workers: int = -1):
        self.step = step
        self.network = Network(model, pretrained, checkpoint)
        self.runtime = (device, precision, batch_size, num_workers)
        self._scorer = None
        self._key: tuple = ()
        self._digests: dict[str, str] = {}

    def fingerprint(self, ctx) -> dict:
        from pipeline.config import ConfigError
        from pipeline.errors import StageError

        try:
            return self.network.fingerprint(ctx.run_dir if ctx is not None else "", self._file_digest)
        except ConfigError as e:
            raise StageError(f"{self.step}: {e}") from None

    def _file_digest(self, path: str) -> str:
        if path not in self._digests:
            from trainer.models import file_digest

            self._digests[path] = file_digest(path)
        return self._digests[path]

    def preflight(self, ctx) -> list[str]:
        """The network loads offline (looked for, not loaded), unless every row's vectors are stored already."""
        from trainer.models import network_problem

        net = self.network
        problem = network_problem(net.model, net.pretrained, net.checkpoint_path(ctx.run_dir))
        return [problem] if problem else []

    def scorer(self, ctx):
        from pipeline import shards
        from pipeline.errors import StageError

        net, run_dir = self.network, ctx.run_dir if ctx is not None else ""
        key = (net, net.checkpoint_path(run_dir), net.stamp(run_dir))  # new weights behind a name: loaded again
        if self._scorer is None or key != self._key:
            path = net.checkpoint_path(run_dir)
            if not net.pretrained_network() and (not path or not shards.exists(path)):
                raise StageError(f"{self.step}: no network to embed with: {net.describe(run_dir)} does not exist; set "
                                 f"[{self.step}] model/pretrained or [embed]'s or [dfn]'s (e.g. model = "
                                 "\"hf-hub:apple/DFN-public\"), or run embed first")
            try:
                self._scorer = net.scorer(run_dir, *self.runtime)
            except ValueError as e:
                raise StageError(f"{self.step}: {e}") from None
            self._key = key
            log.info("%s: %s (%s) on %s", self.step, net.describe(run_dir), self._scorer.model_name,
                     self._scorer.device)
        return self._scorer

    def store(self, ctx) -> embeddings.EmbeddingStore | None:
        """The run's store of this network (None without a run folder: vectors are computed, not stored)."""
        if ctx is None or not ctx.run_dir:
            return None
        found = self.network.stored(ctx.run_dir)
        return found if found is not None else embeddings.EmbeddingStore(ctx.run_dir, self.scorer(ctx).identity)

    def vectors(self, table: pa.Table, ctx, kind: str, store: embeddings.EmbeddingStore | None = None) -> ShardVectors:
        """`kind` vectors of the rows (float16 as stored; `found` False where there is none)."""
        store = store if store is not None else self.store(ctx)
        return shard_vectors(lambda: self.scorer(ctx), store, table, ctx, kind)
