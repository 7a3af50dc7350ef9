"""The embedding store (pipeline/embeddings.py): vectors by uid per shard and kind, the model's identity in a
manifest, lookups by uid (within a shard and across shards after resharding), verified like every output, on a
local folder and on an S3 API (moto on loopback). Checked against a plain dict uid -> vector on random data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.s3_server import moto_s3
from pipeline import embeddings as emb
from pipeline.embeddings import EmbeddingError, EmbeddingStore, cosine
from pipeline.embedding_files import file_batch
from pipeline.shards import ShardError

IDENTITY = {"id": "ViT-B-32__openai__0123abcd", "name": "ViT-B-32", "pretrained": "openai",
            "weights_digest": "0123abcd0123abcd", "preprocessing": {"size": 224, "mean": [0.48, 0.46, 0.41]}}


def _uids(rng, n: int) -> list[str]:
    return [bytes(r).hex() for r in rng.integers(0, 256, size=(n, 16), dtype=np.uint8)]


def _unit16(v: np.ndarray) -> np.ndarray:
    """The reference: each row divided by its norm in float64, as float16."""
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    assert isinstance(e.value, ShardError)  # the CLI prints ShardErrors as one line, exit 2
    return msg


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """float16 vectors equal up to one float16 step of a unit vector's components (rounding of the norm)."""
    return a.shape == b.shape and float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max(initial=0)) <= 1e-3


# ---- round trip, lookups, normalisation -------------------------------------------------------------------

def test_round_trip_and_manifest(tmp_path):
    rng = np.random.default_rng(1)
    uids, v = _uids(rng, 300), rng.normal(size=(300, 64)).astype(np.float32)
    store = EmbeddingStore(str(tmp_path / "run"), IDENTITY)
    record = store.write("part-00000.parquet", "image", uids, v)
    path = tmp_path / "run" / "embeddings" / IDENTITY["id"] / "part-00000.image.arrow"
    assert path.is_file() and record == {"size": path.stat().st_size, "xxh3": record["xxh3"]}
    assert store.has("part-00000", "image") and not store.has("part-00000", "text")
    got, found = store.read("part-00000", "image", uids)
    assert got.dtype == np.float16 and got.shape == (300, 64) and found.all()
    assert _close(got, _unit16(v))
    manifest = json.loads((path.parent / "_manifest.json").read_text())
    assert manifest["identity"] == IDENTITY and manifest["dims"] == 64 and manifest["dtype"] == "float16"
    # reopened by id: same identity, same answers; the file is data (Arrow IPC), never a pickle
    again = EmbeddingStore.open(str(tmp_path / "run"), IDENTITY["id"])
    assert again.identity == IDENTITY and again.dims == 64
    assert np.array_equal(again.read("part-00000", "image", uids)[0], got)
    assert path.read_bytes()[:6] == b"ARROW1"
    # the same input gives the same bytes (a rerun of a shard is byte-identical)
    assert store.write("part-00000", "image", uids[::-1], v[::-1]) == record
    # a shard with no rows (all filtered out) is a file too: its rows are simply not found
    store.write("part-00001", "image", [], np.zeros((0, 64), np.float32))
    assert not store.read("part-00001", "image", uids[:3])[1].any()
    assert store.read("part-00001", "image", [])[0].shape == (0, 64)
    assert store.read_any(uids[:3], "image")[1].all()
    # a manifest copied from another model's folder is not taken for this one
    other = tmp_path / "run" / "embeddings" / "copied"
    other.mkdir()
    (other / "_manifest.json").write_bytes((path.parent / "_manifest.json").read_bytes())
    with pytest.raises(EmbeddingError) as e:
        EmbeddingStore.open(str(tmp_path / "run"), "copied")
    assert "not its folder's" in _one_line(e)
    (other / "_manifest.json").write_bytes(b"{not json")  # damaged: refused, never written over
    for make in (lambda: EmbeddingStore.open(str(tmp_path / "run"), "copied"),
                 lambda: EmbeddingStore(str(tmp_path / "run"), {**IDENTITY, "id": "copied"})):
        with pytest.raises(EmbeddingError) as e:
            make()
        assert "not readable JSON" in _one_line(e)


def test_lookup_by_uid_in_any_order_with_missing_uids_against_a_dict(tmp_path):
    rng = np.random.default_rng(2)
    uids, v = _uids(rng, 1000), rng.normal(size=(1000, 32))
    valid = rng.random(1000) > 0.15
    ref = {u: x for u, x, ok in zip(uids, _unit16(v), valid) if ok}
    store = EmbeddingStore(str(tmp_path), IDENTITY)
    store.write("s", "image", pa.array(uids), v, valid)
    ask = list(rng.permutation(uids)[:600]) + _uids(rng, 200)  # shuffled, plus 200 the store never saw
    ask = list(rng.permutation(ask))
    got = store.lookup("s", "image", np.array(ask))
    assert list(got.found) == [u in ref for u in ask]
    assert list(got.listed) == [u in set(uids) for u in ask]
    for u, row, ok in zip(ask, got.vectors, got.found):
        assert _close(row, ref[u]) if ok else not row.any()
    # a pyarrow chunked array of uids gives the same answer
    chunked = pa.chunked_array([pa.array(ask[:300]), pa.array(ask[300:])])
    assert np.array_equal(store.read("s", "image", chunked)[0], got.vectors)


def test_text_first_then_image_later(tmp_path):
    """Text-first recipes embed text before the download: the image file of the same shard comes later, with
    no vector for rows whose image never arrived, and writing it leaves the text file as it was."""
    rng = np.random.default_rng(3)
    uids, t, i = _uids(rng, 50), rng.normal(size=(50, 16)), rng.normal(size=(50, 16))
    store = EmbeddingStore(str(tmp_path), IDENTITY)
    text_record = store.write("part-00007", "text", uids, t)
    assert store.files("text") == ["part-00007"] and store.files("image") == []
    with pytest.raises(EmbeddingError) as e:
        store.read("part-00007", "image", uids)
    assert "no image vectors of shard part-00007" in _one_line(e)
    downloaded = np.arange(50) % 3 != 0
    store.write("part-00007", "image", uids[::2], i[::2], downloaded[::2])  # only the survivors, some failed
    assert store.verify("part-00007", "text", text_record, digest=True) is None
    got = store.lookup("part-00007", "image", uids)
    assert list(got.listed) == [k % 2 == 0 for k in range(50)]
    assert list(got.found) == [k % 2 == 0 and k % 3 != 0 for k in range(50)]
    assert _close(got.vectors[got.found], _unit16(i)[got.found])
    assert not got.vectors[~got.found].any()
    text, found = store.read("part-00007", "text", uids)
    assert found.all() and _close(text, _unit16(t))


def test_vectors_are_l2_normalised_here(tmp_path):
    rng = np.random.default_rng(4)
    uids = _uids(rng, 40)
    v = rng.normal(size=(40, 512)) * rng.choice([1e-3, 1.0, 1e3], size=(40, 1))
    store = EmbeddingStore(str(tmp_path), IDENTITY)
    store.write("s", "text", uids, v.astype(np.float32))
    got, _ = store.read("s", "text", uids)
    norms = np.linalg.norm(got.astype(np.float64), axis=1)
    assert np.all(np.abs(norms - 1) < 2e-3)
    assert _close(got, _unit16(v))
    # a vector that cannot be normalised is refused, naming its uid, unless the row is marked as having none
    bad = v.copy()
    bad[5] = 0
    with pytest.raises(EmbeddingError) as e:
        store.write("t", "text", uids, bad)
    assert uids[5] in _one_line(e) and "zero or not finite" in str(e.value)
    bad[6, 3] = np.nan
    valid = np.ones(40, bool)
    valid[[5, 6]] = False
    store.write("t", "text", uids, bad, valid)
    assert list(np.flatnonzero(~store.read("t", "text", uids)[1])) == [5, 6]
    with pytest.raises(EmbeddingError):
        store.write("t", "text", uids, v.astype(np.int64))  # integers are not embeddings


def test_cosine_row_wise_in_float32():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(200, 64)), rng.normal(size=(200, 64))
    ref = np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    got = cosine(_unit16(a), _unit16(b))
    assert got.dtype == np.float32 and np.abs(got - ref).max() < 2e-3
    z = _unit16(a)
    z[7] = 0  # a row not found: no score, not 0
    out = cosine(z, _unit16(b))
    assert np.isnan(out[7]) and np.isfinite(np.delete(out, 7)).all()
    with pytest.raises(EmbeddingError):
        cosine(a, b[:, :3])


# ---- size ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [512, 768])
def test_bytes_per_row_is_16_plus_2d_plus_one_bit(tmp_path, dims):
    """Exactly: size(n) = fixed + 16 n (uid) + pad8(ceil(n / 8)) (valid bits) + pad8(2 dims n) (float16), the
    fixed part (schema, footer, magic) about 1.3 KB a file. Measured for ViT-B-32's and ViT-L-14's widths."""
    rng = np.random.default_rng(dims)
    store = EmbeddingStore(str(tmp_path), {**IDENTITY, "id": f"m{dims}"})

    def pad8(x: int) -> int:
        return -(-x // 8) * 8

    def size(n: int) -> int:
        valid = rng.random(n) > 0.5
        return store.write("s", "image", _uids(rng, n), rng.normal(size=(n, dims)), valid)["size"]

    fixed = size(1) - 16 - 8 - pad8(2 * dims)
    assert 1000 < fixed < 1600
    for n in (2, 7, 9, 64, 1000, 4097):
        assert size(n) == fixed + 16 * n + pad8(-(-n // 8)) + pad8(2 * dims * n)


# ---- refusals (one line) -----------------------------------------------------------------------------------

def test_identity_mismatch_is_one_line(tmp_path):
    rng = np.random.default_rng(6)
    uids = _uids(rng, 5)
    EmbeddingStore(str(tmp_path), IDENTITY).write("s", "text", uids, rng.normal(size=(5, 8)))
    other = {**IDENTITY, "weights_digest": "ffffffffffffffff"}
    with pytest.raises(EmbeddingError) as e:
        EmbeddingStore(str(tmp_path), other)
    msg = _one_line(e)
    assert "another model" in msg and "weights_digest" in msg and IDENTITY["id"] in msg
    with pytest.raises(EmbeddingError) as e:
        EmbeddingStore(str(tmp_path), IDENTITY, dims=16)  # same model, another width: not this store
    assert "8-d" in _one_line(e)
    with pytest.raises(EmbeddingError) as e:
        EmbeddingStore(str(tmp_path), IDENTITY).write("t", "text", uids, rng.normal(size=(5, 9)))
    assert "9-d" in _one_line(e)
    with pytest.raises(EmbeddingError) as e:
        EmbeddingStore.open(str(tmp_path), "ViT-L-14__openai__99")
    assert "run embed first" in _one_line(e)
    # the manifest is written once: the first writer's bytes stay
    manifest = tmp_path / "embeddings" / IDENTITY["id"] / "_manifest.json"
    before = manifest.read_bytes()
    EmbeddingStore(str(tmp_path), IDENTITY).write("u", "image", uids, rng.normal(size=(5, 8)))
    assert manifest.read_bytes() == before


@pytest.mark.parametrize("bad", ["A" * 32, "a" * 31, "a" * 33, "g" * 32, "../" + "a" * 29, None, "a" * 31 + "\n",
                                 "é" + "a" * 31])
def test_bad_uid_refused_before_it_names_anything(tmp_path, bad):
    rng = np.random.default_rng(7)
    uids = _uids(rng, 4) + [bad]
    store = EmbeddingStore(str(tmp_path), IDENTITY)
    with pytest.raises(EmbeddingError) as e:
        store.write("s", "text", uids, rng.normal(size=(5, 8)))
    assert "row 4" in _one_line(e) and "32 lowercase hex" in str(e.value)
    assert not list((tmp_path / "embeddings").rglob("*.arrow"))  # nothing written
    store.write("s", "text", uids[:4], rng.normal(size=(4, 8)))
    with pytest.raises(EmbeddingError):
        store.read("s", "text", uids)
    with pytest.raises(EmbeddingError):
        store.read_any(uids, "text")


def test_duplicate_uid_and_bad_names_refused(tmp_path):
    rng = np.random.default_rng(8)
    uids = _uids(rng, 4)
    store = EmbeddingStore(str(tmp_path), IDENTITY)
    with pytest.raises(EmbeddingError) as e:
        store.write("s", "text", uids + [uids[2]], rng.normal(size=(5, 8)))
    assert uids[2] in _one_line(e) and "twice" in str(e.value)
    for model_id in ["../x", "a/b", ".hidden", "_manifest", "", "x" * 201, "a b", "s3://b/k"]:
        with pytest.raises(EmbeddingError) as e:
            EmbeddingStore(str(tmp_path), {**IDENTITY, "id": model_id})
        assert "model id" in _one_line(e)
    for shard in ["..", ".tmp-x", "_done", "a b", "part\n1"]:
        with pytest.raises(EmbeddingError) as e:
            store.write(shard, "text", uids, rng.normal(size=(4, 8)))
        assert "shard name" in _one_line(e)
    with pytest.raises(EmbeddingError) as e:
        store.write("s", "audio", uids, rng.normal(size=(4, 8)))
    assert "neither 'image' nor 'text'" in _one_line(e)
    with pytest.raises(EmbeddingError):
        EmbeddingStore(str(tmp_path), {"name": "no id"})
    assert not list(tmp_path.rglob("*.arrow"))


# ---- across shards ---------------------------------------------------------------------------------------

def test_read_any_after_resharding_against_a_dict(tmp_path):
    """Embedded under the ingest shards' names; the metadata is then resharded (rows shuffled into other shard
    names, as emit does): every row still reaches its vector by uid, whatever file holds it."""
    rng = np.random.default_rng(9)
    store = EmbeddingStore(str(tmp_path), IDENTITY)
    ref: dict[str, np.ndarray | None] = {}
    for k in range(5):
        uids, v = _uids(rng, 400), rng.normal(size=(400, 24))
        valid = rng.random(400) > 0.1
        store.write(f"part-{k:05d}.parquet", "image", uids, v, valid)
        ref.update({u: (x if ok else None) for u, x, ok in zip(uids, _unit16(v), valid)})
    everyone = np.array(list(ref))
    resharded = np.array_split(rng.permutation(everyone), 3)  # new shards, new names, new orders
    for new_shard in resharded:
        ask = np.concatenate([new_shard, _uids(rng, 20)])
        got = store.lookup_any(ask, "image")
        assert list(got.listed) == [u in ref for u in ask]
        assert list(got.found) == [ref.get(u) is not None for u in ask]
        for u, row, ok in zip(ask, got.vectors, got.found):
            assert _close(row, ref[u]) if ok else not row.any()
    index = store.uid_index("image")
    assert index.num_rows == len(ref) and index.schema.names == ["uid", "file", "row"]
    assert index.column("uid").type == pa.binary(16)


def test_read_any_prefers_a_file_with_the_vector_and_sees_new_writes(tmp_path):
    rng = np.random.default_rng(10)
    store = EmbeddingStore(str(tmp_path), IDENTITY)
    uids, v = _uids(rng, 10), rng.normal(size=(10, 8))
    store.write("a", "image", uids, v, np.zeros(10, bool))  # first in file order: no image there
    assert not store.read_any(uids, "image")[1].any()
    store.write("b", "image", uids[:4], v[:4])  # the retried download: the index is rebuilt after a write
    got, found = store.read_any(uids, "image")
    assert list(found) == [True] * 4 + [False] * 6 and _close(got[:4], _unit16(v[:4]))
    other = EmbeddingStore(str(tmp_path), IDENTITY)  # another writer's files are seen after refresh()
    other.write("c", "image", uids[4:6], v[4:6])
    assert store.read_any(uids, "image")[1].sum() == 4
    store.refresh()
    assert store.read_any(uids, "image")[1].sum() == 6
    assert not store.read_any(uids, "text")[1].any()  # kinds are indexed apart


# ---- verified like every other output ------------------------------------------------------------------------

def test_truncated_or_altered_file_detected_by_verify(tmp_path):
    rng = np.random.default_rng(11)
    store = EmbeddingStore(str(tmp_path), IDENTITY)
    uids = _uids(rng, 100)
    record = store.write("part-00003", "text", uids, rng.normal(size=(100, 32)))
    assert store.verify("part-00003", "text", record, digest=True) is None
    path = Path(store.path("part-00003", "text"))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    why = store.verify("part-00003", "text", record)
    assert why.startswith("part-00003.text.arrow") and "size differs" in why
    with pytest.raises(EmbeddingError) as e:
        store.read("part-00003", "text", uids)
    assert "not a readable embedding file" in _one_line(e)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # a bit flip inside the vectors: same size, other content
    path.write_bytes(bytes(flipped))
    assert store.verify("part-00003", "text", record) is None
    assert "digest differs" in store.verify("part-00003", "text", record, digest=True)
    path.unlink()
    assert "is missing" in store.verify("part-00003", "text", record)
    assert "no size recorded" in store.verify("part-00003", "text", {"xxh3": "x"})


def test_a_file_not_written_by_the_store_is_refused(tmp_path):
    """Unsorted uids would make searchsorted answer wrongly in silence; a file of the other kind or another
    width must not be read as this one."""
    rng = np.random.default_rng(12)
    store = EmbeddingStore(str(tmp_path), IDENTITY)
    uids = _uids(rng, 20)
    store.write("s", "text", uids, rng.normal(size=(20, 8)))
    good = Path(store.path("s", "text"))
    Path(store.path("s", "image")).write_bytes(good.read_bytes())  # a text file under the image name
    with pytest.raises(EmbeddingError) as e:
        store.read("s", "image", uids)
    assert "not a image embedding file" in _one_line(e)
    keys = np.sort(emb.uid_keys(uids))[::-1]  # descending: not ours
    batch = file_batch(keys, np.zeros((20, 8), np.float16), np.ones(20, bool), 8, "text", IDENTITY["id"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as w:
        w.write_batch(batch)
    good.write_bytes(sink.getvalue().to_pybytes())
    with pytest.raises(EmbeddingError) as e:
        store.read("s", "text", uids)
    assert "not sorted" in _one_line(e)
    Path(store.path("s", "text")).write_bytes(b"import os; os.system('x')")  # not Arrow: refused, never run
    with pytest.raises(EmbeddingError):
        store.read_any(uids, "text")


def test_uid_keys_round_trip_and_order():
    rng = np.random.default_rng(13)
    uids = _uids(rng, 500) + ["0" * 32, "f" * 32, "0" * 31 + "1"]
    keys = emb.uid_keys(uids)
    assert keys.dtype == np.dtype("S16") and emb.keys_to_hex(keys).to_pylist() == uids
    assert list(np.argsort(keys, kind="stable")) == sorted(range(len(uids)), key=uids.__getitem__)
    sliced = pa.array(uids).slice(3, 10)  # an array with an offset into its buffers
    assert emb.keys_to_hex(emb.uid_keys(sliced)).to_pylist() == uids[3:13]


# ---- on an S3 API (moto on loopback) -----------------------------------------------------------------------



@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A fresh moto server on 127.0.0.1; fsspec's s3 settings point there (tests/s3_server.py)."""
    with moto_s3(tmp_path_factory.mktemp("moto"), "vectors") as fs:
        yield fs


def test_round_trip_on_s3(s3):
    rng = np.random.default_rng(14)
    run = "s3://vectors/runs/r"
    store = EmbeddingStore(run, IDENTITY)
    ref = {}
    records = {}
    for k in range(3):
        uids, v = _uids(rng, 200), rng.normal(size=(200, 48))
        valid = rng.random(200) > 0.2
        records[k] = store.write(f"part-{k:05d}", "image", uids, v, valid)
        ref.update({u: (x if ok else None) for u, x, ok in zip(uids, _unit16(v), valid)})
    key = f"vectors/runs/r/embeddings/{IDENTITY['id']}"
    assert sorted(os.path.basename(p) for p in s3.ls(key)) == [
        "_manifest.json", "part-00000.image.arrow", "part-00001.image.arrow", "part-00002.image.arrow"]
    assert not any(os.path.basename(p).startswith(".tmp-") for p in s3.ls(key))
    reopened = EmbeddingStore.open(run, IDENTITY["id"])
    assert reopened.files("image") == ["part-00000", "part-00001", "part-00002"] and reopened.dims == 48
    ask = np.array(rng.permutation(list(ref))[:300].tolist() + _uids(rng, 10))
    got = reopened.lookup_any(ask, "image")
    assert list(got.found) == [ref.get(u) is not None for u in ask]
    for u, row, ok in zip(ask, got.vectors, got.found):
        assert _close(row, ref[u]) if ok else not row.any()
    first = list(ref)[:200]
    vec, found = reopened.read("part-00000", "image", first)
    assert list(found) == [ref[u] is not None for u in first]
    assert reopened.verify("part-00001", "image", records[1], digest=True) is None
    s3.pipe_file(f"{key}/part-00001.image.arrow", s3.cat_file(f"{key}/part-00001.image.arrow")[:-10])
    assert "size differs" in reopened.verify("part-00001", "image", records[1])
    with pytest.raises(EmbeddingError):
        EmbeddingStore(run, {**IDENTITY, "preprocessing": {"size": 336}})
