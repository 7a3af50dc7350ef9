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
  Measured size: 16 + 2 dims bytes a row plus one bit, plus about 1.3 KB a file (1,040.3 bytes a row at 512
  dims, 1,552.3 at 768, for 10,000-row shards).
- Rows are found by uid with `np.searchsorted` on the sorted 16-byte keys, never by position: a row reaches its
  vector whichever stage or order produced the metadata shard, and `read_any` finds it across shard files after
  emit or any resharding renamed the shards.
- Vectors are L2-normalised here, in float32, then stored as float16 (2 bytes a dimension).

Nothing here knows a stage or imports torch: the `embed` stage computes vectors, this module keeps them.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline import schema, shards
from pipeline.shards import ShardError

FORMAT = "clipcurate-embeddings/1"
KINDS = ("image", "text")
DTYPE = "float16"
SUFFIX = ".arrow"
MANIFEST = "_manifest.json"
FOLDER = "embeddings"
UID_BYTES = 16

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # one path component, not hidden, no `..` alone
_HEX = np.full(256, 255, dtype=np.uint8)  # ASCII byte -> nibble (255: not lowercase hex)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint8)
_CHUNK_ROWS = 1 << 16  # float32 work arrays are made this many rows at a time (memory bounded by a chunk)
_COSINE_ROWS = 1 << 12  # small enough for the float32 copies to stay in cache (faster than 64k-row chunks here)


class EmbeddingError(ShardError):
    """An embedding store cannot be used as asked. One line (a ShardError: the CLI prints it, exit 2)."""


class Lookup(NamedTuple):
    """What a lookup found for each asked uid: `vectors` float16 [n, dims] (zeros where not found), `found` (the
    uid has a vector), `listed` (the uid is in the file, with or without a vector: `listed & ~found` is a row the
    model saw without a usable image)."""

    vectors: np.ndarray
    found: np.ndarray
    listed: np.ndarray
    source: np.ndarray | None = None  # uint64 per asked uid: what the vector was computed from (0: not recorded)


# ---- names ------------------------------------------------------------------------------------------------

def check_component(value: Any, what: str) -> str:
    """`value` as one safe path component ([A-Za-z0-9._-], not starting with `.`, `_` or `-`, at most 200
    characters): a model id or a shard stem names a folder or file, so it is checked before it touches a path."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        shown = repr(value)[:60]
        raise EmbeddingError(f"embeddings: {what} {shown} is not one path component of letters, digits, '.', '_' "
                             "or '-' (starting with a letter or digit)")
    return value


def shard_stem(shard: str) -> str:
    """The metadata shard's name without `.parquet` (a path or a bare name): the store names its files after it."""
    name = shards.shard_name(str(shard))
    if name.endswith(".parquet"):
        name = name[: -len(".parquet")]
    return check_component(name, "shard name")


def check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise EmbeddingError(f"embeddings: kind {str(kind)[:40]!r} is neither 'image' nor 'text'")
    return kind


def uid_keys(uids: Any) -> np.ndarray:
    """32-hex uids (a pyarrow string array or chunked array, or a numpy/list of str) as 16-byte keys (numpy
    `S16`, whose order is the bytes' order and the hex strings' order). Every uid is checked first (32 lowercase
    hex characters, not null); the first bad one is named in a one-line error. Vectorised: one regex per value
    (schema.valid_uids), then a table lookup per character."""
    arr = _as_string_array(uids)
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype="S16")
    ok = schema.valid_uids(arr)
    if ok.false_count:
        bad = int(np.flatnonzero(~ok.to_numpy(zero_copy_only=False))[0])
        raise EmbeddingError(f"embeddings: uid {repr(arr[bad].as_py())[:50]} (row {bad}) is not 32 lowercase hex "
                             "characters")
    fixed = arr.cast(pa.binary(32))
    chars = np.frombuffer(fixed.buffers()[1], np.uint8, count=32 * n, offset=32 * fixed.offset).reshape(n, 32)
    nib = _HEX[chars]
    raw = (nib[:, 0::2] << 4) | nib[:, 1::2]
    return np.ascontiguousarray(raw).view("S16").ravel()


def keys_to_hex(keys: np.ndarray) -> pa.Array:
    """16-byte keys back to 32-hex uid strings (vectorised), e.g. to name rows a store holds."""
    raw = np.ascontiguousarray(keys, dtype="S16").view(np.uint8).reshape(-1, UID_BYTES)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    chars = np.empty((len(raw), 32), np.uint8)
    chars[:, 0::2], chars[:, 1::2] = digits[raw >> 4], digits[raw & 15]
    return pa.array(chars.view("S32").ravel(), pa.binary(32)).cast(pa.string())


def _as_string_array(uids: Any) -> pa.Array:
    if isinstance(uids, pa.ChunkedArray):
        uids = uids.combine_chunks()
    if isinstance(uids, np.ndarray) and uids.dtype.kind == "S":
        try:
            uids = uids.astype("U")
        except UnicodeDecodeError:
            raise EmbeddingError("embeddings: a uid is not 32 lowercase hex characters (not ASCII)") from None
    if not isinstance(uids, pa.Array):
        try:
            uids = pa.array(uids, pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            raise EmbeddingError("embeddings: uids must be strings of 32 lowercase hex characters") from None
    if pa.types.is_large_string(uids.type) or pa.types.is_string_view(uids.type):
        uids = uids.cast(pa.string())
    if not pa.types.is_string(uids.type):
        raise EmbeddingError(f"embeddings: uids must be strings of 32 lowercase hex characters, not {uids.type}")
    return uids


def _identity_dict(identity: Any) -> dict:
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


def _read_manifest(path: str, model_id: str) -> Any | None:
    """The manifest's JSON, or None when there is none. One that exists but is not JSON is an error: writing a new
    one over it would vouch for vectors of unknown origin."""
    if not shards.exists(path):
        return None
    found = shards.read_json(path)
    if found is None:
        raise EmbeddingError(f"embeddings: {model_id}/{MANIFEST} is not readable JSON: remove the store's folder "
                             "to embed again")
    return found


def _first_difference(a: dict, b: dict) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: {_short(a.get(k))} here, {_short(b.get(k))} in the store"
    return "identical"


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


# ---- the store ----------------------------------------------------------------------------------------------

class EmbeddingStore:
    """One model's vectors in one run: `runs/<name>/embeddings/<model-id>/`. `identity` is the model's identity
    (a mapping or dataclass with `id`, name, pretrained tag, weights digest, preprocessing); `dims` the vector
    width when known now (else the first write sets it). A store whose manifest names another identity for the
    same id is refused in one line, at opening and at the first write."""

    def __init__(self, run_dir: str, identity: Any, dims: int | None = None):
        self.identity = _identity_dict(identity)
        self.model_id = self.identity["id"]
        self.folder = shards.join(str(run_dir), FOLDER, self.model_id)
        self.dims = None if dims is None else _check_dims(dims)
        self._manifest_ok = False
        self._index: dict[str, _UidIndex] = {}
        manifest = _read_manifest(self._manifest_path(), self.model_id)
        if manifest is not None:
            self._adopt(manifest)

    @classmethod
    def open(cls, run_dir: str, model_id: str) -> "EmbeddingStore":
        """The store a run already holds for `model_id`, with the identity its manifest records."""
        check_component(model_id, "model id")
        path = shards.join(str(run_dir), FOLDER, model_id, MANIFEST)
        manifest = _read_manifest(path, model_id)
        if manifest is None:
            raise EmbeddingError(f"embeddings: the run has no embeddings of model {model_id} (no {MANIFEST}"
                                 " there): run embed first")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("identity"), dict):
            raise EmbeddingError(f"embeddings: {model_id}/{MANIFEST} is not an embedding store manifest")
        if manifest["identity"].get("id") != model_id:
            raise EmbeddingError(f"embeddings: {model_id}/{MANIFEST} names model id "
                                 f"{_short(manifest['identity'].get('id'))}, not its folder's")
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
                                 f"({_first_difference(self.identity, manifest['identity'])}): use a new model id "
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
        found = _read_manifest(self._manifest_path(), self.model_id)
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
        found = _read_manifest(self._manifest_path(), self.model_id)
        if found is None:  # missing, never unreadable: a damaged manifest is refused, not written over
            shards.write_json(self.manifest(), self._manifest_path())  # same identity -> same bytes: races agree
            found = _read_manifest(self._manifest_path(), self.model_id)
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
            if base.endswith(tail) and _NAME_RE.match(base[: -len(tail)] or "."):
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
            half = _normalised_f16(vectors, order, valid, keys, shard)
        batch = _file_batch(keys, half, valid, self.dims, kind, self.model_id, source)
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

    def _load(self, stem: str, kind: str, vectors: bool = True) -> "_File":
        """A file's sorted keys and (with `vectors`) its float16 matrix and validity, checked against the manifest.
        Local files are memory-mapped; remote ones read by ranges (only uid and valid when `vectors` is False)."""
        path = shards.join(self.folder, f"{stem}.{kind}{SUFFIX}")
        name = posixpath.basename(path)
        self._require_manifest()
        opts = ipc.IpcReadOptions(included_fields=None if vectors else [0, 1])
        try:
            if shards.is_local(path):
                local = path[len("file://"):] if path.startswith("file://") else path
                batch = _one_batch(ipc.open_file(pa.memory_map(local, "r"), options=opts), name)
            else:
                fs, p = shards.fs_and_path(path)
                with fs.open(p, "rb") as f:
                    batch = _one_batch(ipc.open_file(pa.PythonFile(f, mode="r"), options=opts), name)
        except FileNotFoundError:
            raise EmbeddingError(f"embeddings: no {kind} vectors of shard {stem} in store {self.model_id} "
                                 f"({name} is missing): run embed first") from None
        except (pa.ArrowException, OSError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EmbeddingError(f"embeddings: {name} is not a readable embedding file ({msg[:120]})") from None
        return _File.from_batch(batch, name, kind, self.dims, vectors)

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


# ---- dot products -------------------------------------------------------------------------------------------

def as_stored(vectors: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Vectors exactly as the store would hold them (L2-normalised in float32, then float16; zeros where not
    valid), without a store: a score computed from these equals one computed from stored vectors, bit for bit."""
    vectors = np.asarray(vectors)
    n = len(vectors)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, dtype=bool).reshape(-1)
    keys = np.zeros(n, "S16")
    return _normalised_f16(vectors, np.arange(n), valid, keys, "memory")


def cosine(image_vecs: np.ndarray, text_vecs: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [n, dims] arrays, in float32 (float16 products summed in float16 lose digits).
    Divided by both norms again, so the float16 rounding of stored unit vectors does not shift scores; a row with
    a zero vector (not found) gives NaN. Computed a chunk of rows at a time: memory bounded by the chunk."""
    a, b = np.asarray(image_vecs), np.asarray(text_vecs)
    if a.shape != b.shape or a.ndim != 2:
        raise EmbeddingError(f"embeddings: cosine of shapes {a.shape} and {b.shape}: give two [rows, dims] arrays")
    out = np.empty(len(a), np.float32)
    for s in range(0, len(a), _COSINE_ROWS):
        x = a[s:s + _COSINE_ROWS].astype(np.float32)
        y = b[s:s + _COSINE_ROWS].astype(np.float32)
        dot = np.einsum("ij,ij->i", x, y)
        norm = np.sqrt(np.einsum("ij,ij->i", x, x) * np.einsum("ij,ij->i", y, y))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + _COSINE_ROWS] = np.where(norm > 0, dot / norm, np.nan)
    return out


# ---- internals ----------------------------------------------------------------------------------------------

def _check_dims(dims: Any) -> int:
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or not 0 < int(dims) <= 1 << 16:
        raise EmbeddingError(f"embeddings: vector width {str(dims)[:20]} is not a positive integer")
    return int(dims)


def _normalised_f16(vectors: np.ndarray, order: np.ndarray, valid: np.ndarray, keys: np.ndarray,
                    shard: str) -> np.ndarray:
    """The rows (in `order`) divided by their L2 norm in float32, as float16; rows not `valid` are zeros. A valid
    row that cannot be normalised (zero, inf or NaN) is an error naming its uid: it would score as anything."""
    n, d = len(order), vectors.shape[1]
    out = np.zeros((n, d), np.float16)
    for s in range(0, n, _CHUNK_ROWS):
        idx, ok = order[s:s + _CHUNK_ROWS], valid[s:s + _CHUNK_ROWS]
        x = vectors[idx].astype(np.float32, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
        bad = ok & ~(np.isfinite(norm) & (norm > 0))
        if bad.any():
            i = s + int(np.flatnonzero(bad)[0])
            raise EmbeddingError(f"embeddings: {shard_stem(shard)}: the vector of uid "
                                 f"{keys_to_hex(keys[i:i + 1])[0]} is zero or not finite")
        with np.errstate(invalid="ignore", divide="ignore"):
            unit = (x / np.where(ok, norm, 1.0)[:, None].astype(np.float32))
        out[s:s + _CHUNK_ROWS] = np.where(ok[:, None], unit, 0).astype(np.float16)
    return out


def _file_batch(keys: np.ndarray, half: np.ndarray, valid: np.ndarray, dims: int, kind: str,
                model_id: str, source: np.ndarray | None = None) -> pa.RecordBatch:
    """The file's one record batch: sorted 16-byte uids, the validity mask, the float16 matrix, and (when given)
    each row's source hash."""
    n = len(keys)
    uid = pa.Array.from_buffers(pa.binary(UID_BYTES), n, [None, _buffer(keys)])
    values = pa.Array.from_buffers(pa.float16(), n * dims, [None, _buffer(half)])
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


def _buffer(a: np.ndarray) -> pa.Buffer:
    """A numpy array's memory as an Arrow buffer, without a copy (the buffer keeps the array alive)."""
    return pa.py_buffer(np.ascontiguousarray(a).view(np.uint8).reshape(-1))


def _one_batch(reader: ipc.RecordBatchFileReader, name: str) -> pa.RecordBatch:
    if reader.num_record_batches != 1:
        raise EmbeddingError(f"embeddings: {name} holds {reader.num_record_batches} record batches, not one")
    return reader.get_batch(0)


@dataclasses.dataclass
class _File:
    """One embedding file, checked: keys sorted and unique, the vector column of the manifest's width."""

    keys: np.ndarray            # S16, sorted, unique
    matrix: np.ndarray | None   # float16 [rows, dims] (a view of the mapped file when local)
    valid: np.ndarray           # bool [rows]
    dims: int
    source: np.ndarray | None = None  # uint64 [rows], or None when the file records none

    @classmethod
    def from_batch(cls, batch: pa.RecordBatch, name: str, kind: str, dims: int, vectors: bool) -> "_File":
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
                                    [None, _buffer(self.keys)])
        return pa.table({"uid": uid, "file": pa.array(self.file, pa.int32()), "row": pa.array(self.row, pa.int32())})

