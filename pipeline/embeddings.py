"""The embedding store: a model's image and text vectors for every row, by uid, one file per shard and kind.

    runs/<name>/embeddings/<model-id>/_manifest.json         the model's identity, dims, dtype (written once)
    runs/<name>/embeddings/<model-id>/part-00000.text.arrow   text vectors of metadata shard part-00000
    runs/<name>/embeddings/<model-id>/part-00000.image.arrow  image vectors of the same shard (may come later)

Why this shape (DESIGN principle 4, "a model looks at each pair once"):
- One file per (shard, kind), so text vectors can be written before the download (text-first recipes) and image
  vectors after it, each resumable and verifiable alone, each the unit a `_done` marker vouches for.
- The file is an uncompressed Arrow IPC file holding one record batch: `uid` fixed_size_binary(16) (the uid's
  128 bits, sorted ascending and unique), `valid` bool (False: the row has no vector, e.g. an image that could not
  be fetched or decoded; an explicit mask, one bit a row), `vector` fixed_size_list<float16>[dims] (zeros where
  not valid), and optionally `source` uint64 (what the vector was computed from, hashed, so a reader can tell a
  current vector from one of another input: trainer/embed.py). Data, never a pickle: a run folder on shared storage
  must not be a way to run code. Uncompressed because float16 embeddings do not compress, and because then a
  local file is memory-mapped (a lookup touches only the pages of the rows it takes) and a remote one is read
  by ranges (the cross-shard index asks only for the uid and valid buffers: 16 bytes and a bit a row).
  A row costs its 16-byte uid, 2 bytes a dimension and one bit (8 bytes more with `source`); a file adds its
  schema and footer (the sizes measured: bench/README.md, embed).
- Rows are found by uid with `np.searchsorted` on the sorted 16-byte keys, never by position: a row reaches its
  vector whichever stage or order produced the metadata shard, and `read_any` finds it across shard files after
  emit or any resharding renamed the shards.
- Vectors are L2-normalised here, in float32, then stored as float16 (2 bytes a dimension).

Nothing here knows a stage or imports torch: the `embed` stage computes vectors, this module keeps them.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline import shards
from pipeline.embedding_files import (DTYPE, FORMAT, MANIFEST, SUFFIX, EmbeddingFile, Lookup, arrow_buffer,
                                      file_batch, first_difference, identity_dict, one_batch, read_manifest,
                                      short_json)
from pipeline.embedding_keys import (NAME_RE, UID_BYTES, EmbeddingError, check_component, check_kind, keys_to_hex,
                                     shard_stem, uid_keys)
from pipeline.embedding_vectors import normalised_f16

# moved to embedding_vectors.py (issue 34), re-exported for their callers (the moved names they use from
# embedding_keys.py and embedding_files.py are imported above: uid_keys, keys_to_hex, shard_stem, MANIFEST ...)
from pipeline.embedding_vectors import as_stored, cosine  # noqa: F401

FOLDER = "embeddings"


# ---- the store ----------------------------------------------------------------------------------------------

class EmbeddingStore:
    """One model's vectors in one run: `runs/<name>/embeddings/<model-id>/`. `identity` is the model's identity
    (a mapping or dataclass with `id`, name, pretrained tag, weights digest, preprocessing); `dims` the vector
    width when known now (else the first write sets it). A store whose manifest names another identity for the
    same id is refused in one line, at opening and at the first write."""

    def __init__(self, run_dir: str, identity: Any, dims: int | None = None):
        self.identity = identity_dict(identity)
        self.model_id = self.identity["id"]
        self.folder = shards.join(str(run_dir), FOLDER, self.model_id)
        self.dims = None if dims is None else _check_dims(dims)
        self._manifest_ok = False
        self._index: dict[str, _UidIndex] = {}
        manifest = read_manifest(self._manifest_path(), self.model_id)
        if manifest is not None:
            self._adopt(manifest)

    @classmethod
    def open(cls, run_dir: str, model_id: str) -> "EmbeddingStore":
        """The store a run already holds for `model_id`, with the identity its manifest records."""
        check_component(model_id, "model id")
        path = shards.join(str(run_dir), FOLDER, model_id, MANIFEST)
        manifest = read_manifest(path, model_id)
        if manifest is None:
            raise EmbeddingError(f"embeddings: the run has no embeddings of model {model_id} (no {MANIFEST}"
                                 " there): run embed first")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("identity"), dict):
            raise EmbeddingError(f"embeddings: {model_id}/{MANIFEST} is not an embedding store manifest")
        if manifest["identity"].get("id") != model_id:
            raise EmbeddingError(f"embeddings: {model_id}/{MANIFEST} names model id "
                                 f"{short_json(manifest['identity'].get('id'))}, not its folder's")
        return cls(run_dir, manifest["identity"])

    # -- manifest --
    def _manifest_path(self) -> str:
        return shards.join(self.folder, MANIFEST)

    def _adopt(self, manifest: Any) -> None:
        """Check a manifest found on disk against this store's identity and dims, and take its dims."""
        if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
                or not isinstance(manifest.get("identity"), dict)):
            raise EmbeddingError(f"embeddings: {self.model_id}/{MANIFEST} is not a {FORMAT} manifest")
        if manifest["identity"] != self.identity:
            raise EmbeddingError(f"embeddings: store {self.model_id} holds another model's vectors "
                                 f"({first_difference(self.identity, manifest['identity'])}): use a new model id "
                                 "or remove that folder")
        dims = _check_dims(manifest.get("dims"))
        if manifest.get("dtype") != DTYPE:
            raise EmbeddingError(f"embeddings: store {self.model_id} holds {manifest.get('dtype')!r} vectors, "
                                 f"not {DTYPE}")
        if self.dims is not None and dims != self.dims:
            raise EmbeddingError(f"embeddings: store {self.model_id} holds {dims}-d vectors, {self.dims}-d asked")
        self.dims = dims
        self._manifest_ok = True

    def _require_manifest(self) -> None:
        """Reading needs the manifest's dims: a store nobody has written to yet has none."""
        if self._manifest_ok:
            return
        found = read_manifest(self._manifest_path(), self.model_id)
        if found is None:
            raise EmbeddingError(f"embeddings: store {self.model_id} holds no vectors yet (no {MANIFEST}): "
                                 "run embed first")
        self._adopt(found)

    def manifest(self) -> dict:
        return {"format": FORMAT, "identity": self.identity, "dims": self.dims, "dtype": DTYPE,
                "normalised": "l2 (float32, then stored as float16)",
                "files": "<shard>.<kind>.arrow: Arrow IPC file, one record batch: uid fixed_size_binary(16) sorted "
                         "unique; valid bool (False: no vector); vector fixed_size_list<float16>[dims]"}

    def _ensure_manifest(self, dims: int) -> None:
        """Write the manifest once (first write); if one appeared meanwhile, it must be ours."""
        if self.dims is None:
            self.dims = _check_dims(dims)
        elif dims != self.dims:
            raise EmbeddingError(f"embeddings: store {self.model_id} holds {self.dims}-d vectors, got {dims}-d")
        if self._manifest_ok:
            return
        found = read_manifest(self._manifest_path(), self.model_id)
        if found is None:  # missing, never unreadable: a damaged manifest is refused, not written over
            shards.write_json(self.manifest(), self._manifest_path())  # same identity -> same bytes: races agree
            found = read_manifest(self._manifest_path(), self.model_id)
        self._adopt(found)

    # -- files --
    def path(self, shard: str, kind: str) -> str:
        """Where the `kind` vectors of metadata shard `shard` (a name or path, with or without .parquet) live."""
        return shards.join(self.folder, f"{shard_stem(shard)}.{check_kind(kind)}{SUFFIX}")

    def has(self, shard: str, kind: str) -> bool:
        return shards.exists(self.path(shard, kind))

    def files(self, kind: str) -> list[str]:
        """The shard stems holding `kind` vectors, sorted (temporary and hidden names skipped)."""
        check_kind(kind)
        fs, p = shards.fs_and_path(self.folder)
        if not fs.exists(p):
            return []
        tail = f".{kind}{SUFFIX}"
        out = []
        for name in fs.ls(p, detail=False):
            base = posixpath.basename(str(name).rstrip("/"))
            if base.endswith(tail) and NAME_RE.match(base[: -len(tail)] or "."):
                out.append(base[: -len(tail)])
        return sorted(out)

    def write(self, shard: str, kind: str, uids: Any, vectors: np.ndarray, valid: np.ndarray | None = None,
              source: np.ndarray | None = None) -> dict:
        """Store the `kind` vectors of `shard`'s rows (replacing that file): `uids` 32-hex, unique; `vectors`
        [n, dims] float (L2-normalised here, in float32; float16 vectors are taken as this store's own, already
        normalised, and kept bit for bit); `valid` False where a row has no vector (its values are ignored);
        `source` an optional uint64 per row naming what the vector was computed from (a hash of the text, of the
        image reference), so a reader can tell a vector of other input from a current one. Atomic; returns the
        file's {"size", "xxh3"} record for the caller's `_done` marker."""
        path = self.path(shard, kind)
        keys = uid_keys(uids)
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys) or vectors.dtype.kind != "f":
            raise EmbeddingError(f"embeddings: {shard_stem(shard)}: vectors of shape {vectors.shape} "
                                 f"({vectors.dtype}) for {len(keys)} uids: give a float [rows, dims] array")
        valid = np.ones(len(keys), bool) if valid is None else np.asarray(valid, dtype=bool).reshape(-1)
        if len(valid) != len(keys):
            raise EmbeddingError(f"embeddings: {shard_stem(shard)}: {len(valid)} valid flags for {len(keys)} uids")
        self._ensure_manifest(int(vectors.shape[1]))
        order = np.argsort(keys, kind="stable")
        keys, valid = keys[order], valid[order]
        dup = np.flatnonzero(keys[1:] == keys[:-1])
        if len(dup):
            raise EmbeddingError(f"embeddings: {shard_stem(shard)}: uid {keys_to_hex(keys[dup[0]:dup[0] + 1])[0]} "
                                 "appears twice")
        if source is not None:
            source = np.asarray(source, dtype=np.uint64).reshape(-1)
            if len(source) != len(keys):
                raise EmbeddingError(f"embeddings: {shard_stem(shard)}: {len(source)} sources for {len(keys)} uids")
            source = source[order]
        if vectors.dtype == np.float16:  # already stored once: re-normalising would move the last bit
            half = np.where(valid[:, None], vectors[order], np.float16(0))
        else:
            half = normalised_f16(vectors, order, valid, keys, shard)
        batch = file_batch(keys, half, valid, self.dims, kind, self.model_id, source)
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)  # one batch, also when empty: a reader finds exactly one
        self._index.pop(kind, None)
        try:
            return shards.write_bytes(sink.getvalue(), path)
        except OSError as e:
            raise EmbeddingError(f"embeddings: {posixpath.basename(path)}: write failed ({e})") from None

    def verify(self, shard: str, kind: str, record: Any, digest: bool = False) -> str | None:
        """Why the file is no longer the one `record` ({"size", "xxh3"}, from `write`) describes, or None: a
        missing file, another size, or (with `digest`, reading it all) other content."""
        path = self.path(shard, kind)
        why = shards.file_mismatch(path, record, digest=digest)
        return None if why is None else f"{posixpath.basename(path)} {why}"

    def _load(self, stem: str, kind: str, vectors: bool = True) -> "EmbeddingFile":
        """A file's sorted keys and (with `vectors`) its float16 matrix and validity, checked against the manifest.
        Local files are memory-mapped; remote ones read by ranges (only uid and valid when `vectors` is False)."""
        path = shards.join(self.folder, f"{stem}.{kind}{SUFFIX}")
        name = posixpath.basename(path)
        self._require_manifest()
        opts = ipc.IpcReadOptions(included_fields=None if vectors else [0, 1])
        try:
            if shards.is_local(path):
                local = path[len("file://"):] if path.startswith("file://") else path
                batch = one_batch(ipc.open_file(pa.memory_map(local, "r"), options=opts), name)
            else:
                fs, p = shards.fs_and_path(path)
                with fs.open(p, "rb") as f:
                    batch = one_batch(ipc.open_file(pa.PythonFile(f, mode="r"), options=opts), name)
        except FileNotFoundError:
            raise EmbeddingError(f"embeddings: no {kind} vectors of shard {stem} in store {self.model_id} "
                                 f"({name} is missing): run embed first") from None
        except (pa.ArrowException, OSError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EmbeddingError(f"embeddings: {name} is not a readable embedding file ({msg[:120]})") from None
        return EmbeddingFile.from_batch(batch, name, kind, self.dims, vectors)

    def lookup(self, shard: str, kind: str, uids: Any) -> Lookup:
        """The `kind` vectors of `uids` in `shard`'s file, found by uid (any order; missing uids allowed)."""
        keys = uid_keys(uids)
        f = self._load(shard_stem(shard), check_kind(kind))
        pos, listed = f.find(keys)
        return f.take(pos, listed)

    def read(self, shard: str, kind: str, uids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float16 [n, dims], found) for `uids` in `shard`: zeros and False where the uid is not in the
        file or has no vector."""
        got = self.lookup(shard, kind, uids)
        return got.vectors, got.found

    def entries(self, shard: str, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Everything `shard`'s `kind` file holds: (16-byte keys sorted, float16 vectors [rows, dims], valid,
        source uint64 or None), e.g. to add rows to it without losing the ones it has. Empty when it is missing."""
        if not self.has(shard, kind):
            return np.empty(0, "S16"), np.zeros((0, self.dims or 0), np.float16), np.zeros(0, bool), None
        f = self._load(shard_stem(shard), check_kind(kind))
        return f.keys, f.matrix, f.valid, f.source

    def uid_index(self, kind: str) -> pa.Table:
        """The cross-shard index of `kind` vectors: (uid fixed_size_binary(16), file int32 (a position in
        `files(kind)`), row int32), one row per distinct uid, sorted by uid; a uid in several files points at one
        holding a vector, the first such in file order. Built on first use from the uid and valid columns alone
        (16 bytes and a bit a row read), held in memory (24 bytes per uid); this object's writes drop it, other
        writers' are not seen until `refresh()`."""
        return self._uid_index(check_kind(kind)).table()

    def refresh(self) -> None:
        """Forget the cross-shard indexes: the next `read_any` sees files other writers added since."""
        self._index.clear()

    def _uid_index(self, kind: str) -> "_UidIndex":
        if kind not in self._index:
            self._index[kind] = _UidIndex.build(self, kind)
        return self._index[kind]

    def read_any(self, uids: Any, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float16 [n, dims], found) for `uids` wherever they are in the store, whatever shard file holds
        them: after resharding (emit, a new split) a row still reaches its vector by uid. One file read per file
        that holds an asked uid."""
        got = self.lookup_any(uids, kind)
        return got.vectors, got.found

    def lookup_any(self, uids: Any, kind: str) -> Lookup:
        keys = uid_keys(uids)
        check_kind(kind)
        self._require_manifest()
        index = self._uid_index(kind)
        file_of, row_of, listed = index.find(keys)
        vectors = np.zeros((len(keys), self.dims), np.float16)
        found = np.zeros(len(keys), bool)
        source = np.zeros(len(keys), np.uint64)
        hits = np.flatnonzero(listed)
        hits = hits[np.argsort(file_of[hits], kind="stable")]  # grouped by file: one pass, one read per file
        files, starts = np.unique(file_of[hits], return_index=True)
        for fi, ask in zip(files, np.split(hits, starts[1:])):
            f = self._load(index.stems[fi], kind)
            rows = row_of[ask]
            vectors[ask] = f.matrix[rows]
            found[ask] = f.valid[rows]
            if f.source is not None:
                source[ask] = f.source[rows]
        vectors[~found] = 0
        return Lookup(vectors, found, listed, source)


# ---- internals ----------------------------------------------------------------------------------------------

def _check_dims(dims: Any) -> int:
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or not 0 < int(dims) <= 1 << 16:
        raise EmbeddingError(f"embeddings: vector width {str(dims)[:20]} is not a positive integer")
    return int(dims)


@dataclasses.dataclass
class _UidIndex:
    """uid -> (file, row) over every file of one kind: sorted keys, one entry per distinct uid."""

    stems: list[str]
    keys: np.ndarray   # S16 sorted unique
    file: np.ndarray   # int32
    row: np.ndarray    # int32

    @classmethod
    def build(cls, store: EmbeddingStore, kind: str) -> "_UidIndex":
        stems = store.files(kind)
        keys, file, row, has = [], [], [], []
        for i, stem in enumerate(stems):
            f = store._load(stem, kind, vectors=False)
            keys.append(f.keys)
            file.append(np.full(len(f.keys), i, np.int32))
            row.append(np.arange(len(f.keys), dtype=np.int32))
            has.append(f.valid)
        if not stems:
            return cls([], np.empty(0, "S16"), np.empty(0, np.int32), np.empty(0, np.int32))
        k, fi, r, v = (np.concatenate(x) for x in (keys, file, row, has))
        order = np.lexsort((fi, ~v, k))  # by uid, rows with a vector first, then file order
        k, fi, r = k[order], fi[order], r[order]
        first = np.ones(len(k), bool)
        first[1:] = k[1:] != k[:-1]
        return cls(stems, k[first], fi[first], r[first])

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(self.keys) == 0:
            z = np.zeros(len(keys), np.int32)
            return z, z, np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        listed = self.keys[pos] == keys
        return self.file[pos], self.row[pos], listed

    def table(self) -> pa.Table:
        uid = pa.Array.from_buffers(pa.binary(UID_BYTES), len(self.keys),
                                    [None, arrow_buffer(self.keys)])
        return pa.table({"uid": uid, "file": pa.array(self.file, pa.int32()), "row": pa.array(self.row, pa.int32())})
