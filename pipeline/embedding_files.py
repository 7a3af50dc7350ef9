"""One file of the embedding store, as bytes: the Arrow record batch a shard's vectors are written as, and the
checks a file read back must pass before a lookup trusts it (sorted unique uids, the manifest's width, one dense
float16 matrix); and the manifest, read so that a damaged one is refused, never written over. The store
(pipeline/embeddings.py) decides which file and when; this module is what a file holds."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline import shards
from pipeline.embedding_keys import UID_BYTES, EmbeddingError, check_component

FORMAT = "clipcurate-embeddings/1"
DTYPE = "float16"
SUFFIX = ".arrow"
MANIFEST = "_manifest.json"


class Lookup(NamedTuple):
    """What a lookup found for each asked uid: `vectors` float16 [n, dims] (zeros where not found), `found` (the
    uid has a vector), `listed` (the uid is in the file, with or without a vector: `listed & ~found` is a row the
    model saw without a usable image)."""

    vectors: np.ndarray
    found: np.ndarray
    listed: np.ndarray
    source: np.ndarray | None = None  # uint64 per asked uid: what the vector was computed from (0: not recorded)


# ---- the manifest ------------------------------------------------------------------------------------------

def identity_dict(identity: Any) -> dict:
    """A model identity (a mapping with `id`, or an object with `.id`, e.g. a dataclass) as a JSON-normal dict."""
    if dataclasses.is_dataclass(identity) and not isinstance(identity, type):
        d = dataclasses.asdict(identity)
        d["id"] = getattr(identity, "id")
    elif isinstance(identity, Mapping):
        d = dict(identity)
    else:
        raise EmbeddingError("embeddings: a model identity must be a mapping or a dataclass with an id")
    if "id" not in d:
        raise EmbeddingError("embeddings: the model identity has no id (the store's folder name)")
    check_component(d["id"], "model id")
    return json.loads(shards.json_bytes(d))


def read_manifest(path: str, model_id: str) -> Any | None:
    """The manifest's JSON, or None when there is none. One that exists but is not JSON is an error: writing a new
    one over it would vouch for vectors of unknown origin."""
    if not shards.exists(path):
        return None
    found = shards.read_json(path)
    if found is None:
        raise EmbeddingError(f"embeddings: {model_id}/{MANIFEST} is not readable JSON: remove the store's folder "
                             "to embed again")
    return found


def first_difference(a: dict, b: dict) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: {short_json(a.get(k))} here, {short_json(b.get(k))} in the store"
    return "identical"


def short_json(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


# ---- a file ------------------------------------------------------------------------------------------------

def file_batch(keys: np.ndarray, half: np.ndarray, valid: np.ndarray, dims: int, kind: str,
               model_id: str, source: np.ndarray | None = None) -> pa.RecordBatch:
    """The file's one record batch: sorted 16-byte uids, the validity mask, the float16 matrix, and (when given)
    each row's source hash."""
    n = len(keys)
    uid = pa.Array.from_buffers(pa.binary(UID_BYTES), n, [None, arrow_buffer(keys)])
    values = pa.Array.from_buffers(pa.float16(), n * dims, [None, arrow_buffer(half)])
    vector = pa.FixedSizeListArray.from_arrays(values, dims)
    meta = {b"format": FORMAT.encode(), b"kind": kind.encode(), b"dims": str(dims).encode(),
            b"model_id": model_id.encode()}
    fields = [pa.field("uid", pa.binary(UID_BYTES), nullable=False), pa.field("valid", pa.bool_(), nullable=False),
              pa.field("vector", pa.list_(pa.float16(), dims), nullable=False)]
    arrays = [uid, pa.array(valid, pa.bool_()), vector]
    if source is not None:
        fields.append(pa.field("source", pa.uint64(), nullable=False))
        arrays.append(pa.array(source, pa.uint64()))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=meta))


def arrow_buffer(a: np.ndarray) -> pa.Buffer:
    """A numpy array's memory as an Arrow buffer, without a copy (the buffer keeps the array alive)."""
    return pa.py_buffer(np.ascontiguousarray(a).view(np.uint8).reshape(-1))


def one_batch(reader: ipc.RecordBatchFileReader, name: str) -> pa.RecordBatch:
    if reader.num_record_batches != 1:
        raise EmbeddingError(f"embeddings: {name} holds {reader.num_record_batches} record batches, not one")
    return reader.get_batch(0)


@dataclasses.dataclass
class EmbeddingFile:
    """One embedding file, checked: keys sorted and unique, the vector column of the manifest's width."""

    keys: np.ndarray            # S16, sorted, unique
    matrix: np.ndarray | None   # float16 [rows, dims] (a view of the mapped file when local)
    valid: np.ndarray           # bool [rows]
    dims: int
    source: np.ndarray | None = None  # uint64 [rows], or None when the file records none

    @classmethod
    def from_batch(cls, batch: pa.RecordBatch, name: str, kind: str, dims: int, vectors: bool) -> "EmbeddingFile":
        meta = batch.schema.metadata or {}
        if meta.get(b"format") != FORMAT.encode() or meta.get(b"kind") != kind.encode():
            raise EmbeddingError(f"embeddings: {name} is not a {kind} embedding file of this store")
        if batch.schema.names[:2] != ["uid", "valid"] or batch.schema.field("uid").type != pa.binary(UID_BYTES) \
                or batch.schema.field("valid").type != pa.bool_():
            raise EmbeddingError(f"embeddings: {name}: its columns are not uid (16-byte binary) and valid (bool)")
        uid = batch.column(0)
        n = len(uid)
        if uid.null_count:
            raise EmbeddingError(f"embeddings: {name}: a uid is null")
        keys = np.frombuffer(uid.buffers()[1], "S16", count=n, offset=UID_BYTES * uid.offset)
        if n > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            raise EmbeddingError(f"embeddings: {name}: its uids are not sorted and unique (not written by this store)")
        flags = batch.column(1)
        if flags.null_count:
            raise EmbeddingError(f"embeddings: {name}: a validity flag is null")
        valid = flags.to_numpy(zero_copy_only=False)
        source = None
        if "source" in batch.schema.names:
            col = batch.column(batch.schema.get_field_index("source"))
            if col.type != pa.uint64() or col.null_count:
                raise EmbeddingError(f"embeddings: {name}: its source column is not uint64 without nulls")
            source = col.to_numpy(zero_copy_only=False)
        if not vectors:
            return cls(keys, None, valid, dims, source)
        col = batch.column(batch.schema.get_field_index("vector"))
        if col.type != pa.list_(pa.float16(), dims):
            raise EmbeddingError(f"embeddings: {name}: vectors are {col.type}, the manifest says {dims} x {DTYPE}")
        child = col.values
        if child.offset != 0 or col.offset != 0 or child.null_count or col.null_count:
            raise EmbeddingError(f"embeddings: {name}: its vector column is not one dense float16 matrix")
        matrix = np.frombuffer(child.buffers()[1], np.float16, count=n * dims).reshape(n, dims)
        return cls(keys, matrix, valid, dims, source)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, listed) for each asked key: np.searchsorted on the sorted keys."""
        if len(self.keys) == 0:
            return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return pos, self.keys[pos] == keys

    def take(self, pos: np.ndarray, listed: np.ndarray) -> Lookup:
        found = listed & self.valid[pos] if len(self.keys) else listed.copy()
        vectors = np.zeros((len(pos), self.dims), np.float16)
        if found.any():
            vectors[found] = self.matrix[pos[found]]
        source = np.zeros(len(pos), np.uint64)
        if self.source is not None and len(self.keys):
            source[listed] = self.source[pos[listed]]
        return Lookup(vectors, found, listed, source)
