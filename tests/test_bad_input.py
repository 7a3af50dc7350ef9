"""Bad input (issue 8): every kind of broken shard, row, image and URL list, through the real stages.

Per-shard problems (unreadable Parquet, a missing or mistyped column) are one line naming the shard (and the
column), exit code 2. Per-row problems (a broken image, an empty / 1 MB / non-UTF-8 caption, a null image, a
null uid) never fail the run: the row is rejected with a named reason, or processed, and every other row goes
through untouched: rows in = kept + rejected, no uid lost or twice. No input file is ever modified.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import struct
import tarfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import config as config_mod
from pipeline import shards
from pipeline.cli import main as cli_main
from pipeline.runner import run_pipeline
from pipeline.schema import compute_uid

torch = pytest.importorskip("torch")

STAGES = ["align", "metaclip", "klite", "dfn", "emit"]
DIRS = {"align": "01_align", "metaclip": "02_metaclip", "klite": "03_klite", "dfn": "04_dfn", "emit": "05_emit"}
needs_wordnet = pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="WordNet not installed")


# ---- inputs ------------------------------------------------------------------------------------------
def png(seed: int = 0, size=(240, 240)) -> bytes:
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb: ~70 bytes on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


PIL_LIMIT = Image.MAX_IMAGE_PIXELS
BOMB_WARN = png_header_bomb(10_000, 10_000)  # 1e8 px: over Pillow's limit, under 2x (Pillow only warns)
BOMB_ERR = png_header_bomb(20_000, 10_000)  # 2e8 px: over 2x (Pillow raises)
GOOD = [png(i) for i in range(6)]
TRUNCATED = GOOD[0][: len(GOOD[0]) // 3]
BIG_CAPTION = ("a dog runs " * 100_000)[:1_000_000]  # 1 MB, matches the entry "dog": over [run] max_text_bytes
NOT_UTF8 = b"a photo of a dog \xff\xfe caf\xe9"

# row label -> (text: str | bytes | None, image: bytes | None)
ROWS = {
    "good0": ("a photo of a dog on the grass", GOOD[0]),
    "good1": ("a cat sleeping on a red sofa", GOOD[1]),
    "good2": ("a tall tree standing in the park", GOOD[2]),
    "good3": ("a dog and a cat in the garden", GOOD[3]),
    "empty_caption": ("", GOOD[4]),
    "null_caption": (None, GOOD[5]),
    "big_caption": (BIG_CAPTION, png(10)),
    "not_utf8": (NOT_UTF8, png(11)),
    "null_image": ("a dog without any image here", None),
    "zero_byte_image": ("a dog with zero image bytes", b""),
    "truncated_image": ("a dog with a truncated image", TRUNCATED),
    "bomb_1x": ("a dog in a huge image one", BOMB_WARN),
    "bomb_2x": ("a dog in a huge image two", BOMB_ERR),
    "garbage_image": ("a dog with garbage image bytes", b"\x89PNG\r\n\x1a\nnot really"),
}


def string_array(values: list) -> pa.Array:
    """A string column holding exactly these bytes, valid UTF-8 or not (as a non-validating writer leaves it)."""
    raw = [v.encode() if isinstance(v, str) else v for v in values]
    data = b"".join(b or b"" for b in raw)
    offsets = np.cumsum([0] + [len(b or b"") for b in raw]).astype(np.int32)
    valid = np.packbits(np.array([b is not None for b in raw]), bitorder="little")
    return pa.Array.from_buffers(pa.string(), len(raw), [pa.py_buffer(valid.tobytes()), pa.py_buffer(offsets.tobytes()),
                                                         pa.py_buffer(data)], null_count=sum(b is None for b in raw))


def pool(labels=None, text_type=pa.string()) -> tuple[pa.Table, dict[str, str]]:
    """The bad-row pool (uid computed from url + raw text bytes) and label -> uid."""
    labels = labels or list(ROWS)
    urls = [f"http://example.invalid/{k}.png" for k in labels]
    texts = [ROWS[k][0] for k in labels]
    raw = [t.encode() if isinstance(t, str) else t for t in texts]
    uids = compute_uid(pa.array(urls), string_array(texts))  # hashes the raw bytes: no decoding
    text = string_array(texts) if text_type == pa.string() else pa.array(raw, pa.binary())
    t = pa.table({
        "uid": uids, "url": urls, "text": text, "image": pa.array([ROWS[k][1] for k in labels], pa.binary()),
        "orig_width": pa.array([240] * len(labels), pa.int32()), "orig_height": pa.array([240] * len(labels), pa.int32()),
    })
    return t, dict(zip(labels, uids.to_pylist()))


def write(folder: Path, tables: list[pa.Table]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(tables):
        pq.write_table(t, folder / f"part-{i:05d}.parquet")  # plain pyarrow: no validation of string bytes
    return folder


def digests(*folders) -> dict[str, str]:
    out = {}
    for f in folders:
        paths = [Path(f)] if Path(f).is_file() else sorted(p for p in Path(f).rglob("*") if p.is_file())
        for p in paths:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextmanager
def untouched(*inputs):
    """Asserts that no input file is modified, removed or added by what runs inside."""
    before = digests(*inputs)
    yield
    assert digests(*inputs) == before


def outcome(stage_dir: Path) -> dict[str, str | None]:
    """uid -> reason (None = kept); fails on a uid seen twice."""
    out: dict[str, str | None] = {}
    for sub, reason in (("", False), ("rejected", True)):
        for p in sorted((stage_dir / sub).glob("part-*.parquet")):
            t = pq.read_table(p)
            reasons = t.column("reason").to_pylist() if reason else [None] * t.num_rows
            for u, r in zip(t.column("uid").to_pylist(), reasons):
                assert u not in out, f"uid {u} twice in {stage_dir}"
                out[u] = r
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An untrained tiny open_clip checkpoint for dfn (scores are arbitrary: these tests are about which rows
    can be scored), a 4-entry concept list, and a config for every stage sized to a 14-row pool."""
    from trainer import models

    root = tmp_path_factory.mktemp("bad_env")
    model, *_ = models.create("clipcurate-tiny")
    torch.save({"model_name": "clipcurate-tiny", "state_dict": model.state_dict(), "step": 0}, root / "dfn.pt")
    (root / "entries.txt").write_text("dog\ncat\ntree\nphoto\n")
    cfg = config_mod.resolve({
        "align": {"min_token_count": 0},
        "metaclip": {"entries": str(root / "entries.txt"), "t": 1000},
        "dfn": {"checkpoint": str(root / "dfn.pt"), "keep_fraction": 1.0, "batch_size": 8, "cache": False},
    })
    cfg_file = root / "config.toml"
    config_mod.save(cfg, str(cfg_file))
    return {"root": root, "cfg": cfg, "cfg_file": str(cfg_file)}


def run_cli(tmp_path, stage: str, inp: Path, env, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(["--runs-dir", str(tmp_path / "runs"), "run", stage, "--run", "r", "--input", str(inp),
                     "--config", env["cfg_file"], "--workers", "0"])
    return code, capsys.readouterr().err.strip()


# ---- per-shard problems: one line naming the shard (and column) -----------------------------------------
def _good_table(n=3, **replace) -> pa.Table:
    t, _ = pool(["good0", "good1", "good2"][:n])
    for name, col in replace.items():
        if col is None:
            t = t.drop_columns([name])
        else:
            t = t.set_column(t.column_names.index(name), name, col)
    return t


def _parquet_bytes(t: pa.Table) -> bytes:
    b = io.BytesIO()
    pq.write_table(t, b)
    return b.getvalue()


SHARD_CASES = {
    # case: (bytes of part-00001.parquet, words the error must hold)
    "corrupt": (lambda: b"PAR1" + os.urandom(300), ["not a readable Parquet file"]),
    "truncated": (lambda: _parquet_bytes(_good_table())[:-40], ["not a readable Parquet file"]),
    "zero_byte_file": (lambda: b"", ["not a readable Parquet file", "0 bytes"]),
    "missing_text": (lambda: _parquet_bytes(_good_table(text=None)), ["missing column 'text'"]),
    "text_int": (lambda: _parquet_bytes(_good_table(text=pa.array([1, 2, 3]))), ["column 'text'", "int64", "expected string"]),
    "text_list": (lambda: _parquet_bytes(_good_table(text=pa.array([["a"], ["b"], ["c"]]))), ["column 'text'", "list"]),
    "uid_int": (lambda: _parquet_bytes(_good_table(uid=pa.array([1, 2, 3]))), ["column 'uid'", "int64"]),
    "image_string": (lambda: _parquet_bytes(_good_table(image=pa.array(["a", "b", "c"]))), ["column 'image'", "string", "expected binary"]),
    "width_string": (lambda: _parquet_bytes(_good_table(orig_width=pa.array(["240", "x", "240"]))), ["column 'orig_width'", "string"]),
    "width_float": (lambda: _parquet_bytes(_good_table(orig_width=pa.array([240.5, 240.0, 240.0]))), ["column 'orig_width'", "double"]),
}


# every stage for the commonest breakages; the rest (checked by the same reader) on align and dfn
SHARD_RUNS = [(c, s) for c in SHARD_CASES for s in
              (STAGES if c in ("corrupt", "truncated", "missing_text", "text_int") else ["align", "dfn"])]


@needs_wordnet
@pytest.mark.parametrize("case,stage", SHARD_RUNS)
def test_broken_shard_is_one_line_naming_it(tmp_path, capsys, env, stage, case):
    make, words = SHARD_CASES[case]
    inp = write(tmp_path / "in", [_good_table()])
    (inp / "part-00001.parquet").write_bytes(make())
    with untouched(inp):
        code, err = run_cli(tmp_path, stage, inp, env, capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("clipcurate: error: "), err
    assert "part-00001.parquet" in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert "ShardFailed" not in err and "Error:" not in err.removeprefix("clipcurate: error: "), err  # a foreseen error


def test_missing_image_column_in_dfn_names_shard_and_column(tmp_path, capsys, env):
    inp = write(tmp_path / "in", [_good_table(), _good_table(image=None)])
    code, err = run_cli(tmp_path, "dfn", inp, env, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "part-00001.parquet" in err and "missing column 'image'" in err and "dfn" in err


def test_missing_uid_is_computed_from_url_and_text(tmp_path, env):
    t = _good_table()
    inp = write(tmp_path / "in", [t.drop_columns(["uid"]), t.drop_columns(["uid", "url"]).slice(0, 1)])
    with untouched(inp):
        res = run_pipeline(["align"], str(tmp_path / "run"), env["cfg"], input_dir=str(inp), workers=0)
    got = outcome(Path(res[0].folder))
    want = set(compute_uid(t.column("url"), t.column("text")).to_pylist())
    want |= set(compute_uid(pa.nulls(1, pa.string()), t.column("text").slice(0, 1)).to_pylist())
    assert set(got) == want and res[0].manifest["rows_in"] == 4


@needs_wordnet
def test_empty_shards_pass_through_every_stage(tmp_path, env):
    t = _good_table()
    empty_text_only = pa.table({"uid": pa.array([], pa.string()), "text": pa.array([], pa.string()),
                                "image": pa.array([], pa.binary())})
    inp = write(tmp_path / "in", [t, t.slice(0, 0), empty_text_only])
    with untouched(inp):
        res = run_pipeline(STAGES, str(tmp_path / "run"), env["cfg"], input_dir=str(inp), workers=0)
    for r in res:
        per = {s["shard"]: (s["rows_in"], s["rows_out"] + s["rejected"]) for s in r.manifest["shards"]}
        assert per["part-00001.parquet"] == per["part-00002.parquet"] == (0, 0), (r.stage, per)
        assert per["part-00000.parquet"][0] == per["part-00000.parquet"][1]
    emit = tmp_path / "run" / "emit"
    sizes = shards.read_json(str(emit / "wds" / "sizes.json"))
    assert sizes == {"part-00000.tar": 3}  # emit reshards: the empty shards add no rows and no shard
    assert sum(sizes.values()) == res[-1].manifest["rows_out"] == 3


# ---- per-row problems: a reason, never a failed run --------------------------------------------------
EXPECT = {
    # stage -> label -> reason (None = kept); labels not listed: kept
    "align": {"empty_caption": "too_few_words", "null_caption": "too_few_words", "big_caption": "text_too_long",
              "not_utf8": "invalid_utf8", **{k: "image_unreadable" for k in
              ("null_image", "zero_byte_image", "truncated_image", "bomb_1x", "bomb_2x", "garbage_image")}},
    "metaclip": {"empty_caption": "no_entry", "null_caption": "no_entry", "not_utf8": "invalid_utf8",
                 "big_caption": "text_too_long"},
    "klite": {"not_utf8": "invalid_utf8", "big_caption": "text_too_long"},
    "dfn": {"not_utf8": "invalid_utf8", "big_caption": "text_too_long", "null_image": "no_image",
            **{k: "bad_image" for k in ("zero_byte_image", "truncated_image", "bomb_1x", "bomb_2x", "garbage_image")}},
    "emit": {"not_utf8": "invalid_utf8", "big_caption": "text_too_long"},
}


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory):
    """The bad-row pool over 3 shards, as a string column (bytes unchecked) and as a binary column."""
    root = tmp_path_factory.mktemp("bad_rows")
    t, uid_of = pool()
    order = list(ROWS)
    folders = {}
    for kind, tt in (("string", t), ("binary", pool(text_type=pa.binary())[0])):
        folders[kind] = write(root / kind, [tt.slice(0, 5), tt.slice(5, 5), tt.slice(10)])
    return folders, uid_of, order


@needs_wordnet
@pytest.mark.parametrize("stage", STAGES)
def test_bad_rows_get_a_reason_and_every_other_row_goes_through(tmp_path, env, bad_rows, stage):
    folders, uid_of, _ = bad_rows
    with untouched(folders["string"]):
        res = run_pipeline([stage], str(tmp_path / "run"), env["cfg"], input_dir=str(folders["string"]), workers=0)[0]
    got = outcome(Path(res.folder))
    assert set(got) == set(uid_of.values()), "a row lost or invented"
    want = {uid_of[k]: EXPECT[stage].get(k) for k in uid_of}
    assert got == want
    m = res.manifest
    assert m["rows_in"] == len(ROWS) == m["rows_out"] + m["rejected"]
    # a rejected shard holding the non-UTF-8 row is readable (its text lossy-decoded) and names the reason
    rej = pa.concat_tables([pq.read_table(p) for p in sorted((Path(res.folder) / "rejected").glob("part-*.parquet"))],
                           promote_options="default")
    bad = rej.filter(pa.compute.equal(rej.column("uid"), uid_of["not_utf8"]))
    assert bad.column("text").to_pylist() == [NOT_UTF8.decode("utf-8", "replace")]
    assert any("not valid UTF-8" in n for n in m["notes"])
    # the 1 MB caption was set aside by the reader, its text cut to [run] max_text_bytes (the input keeps it whole)
    big = rej.filter(pa.compute.equal(rej.column("uid"), uid_of["big_caption"]))
    assert big.column("text").to_pylist() == [BIG_CAPTION[:4096]]
    assert any("max_text_bytes = 4096 bytes" in n for n in m["notes"])
    if stage == "emit":
        _check_emitted(tmp_path / "run" / "emit", uid_of)


def _check_emitted(emit: Path, uid_of: dict[str, str]) -> None:
    members = {}
    for tar in sorted((emit / "wds").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                members[m.name] = tf.extractfile(m).read()
    kept = {k: u for k, u in uid_of.items() if k not in ("not_utf8", "big_caption")}
    assert {n.split(".")[0] for n in members} == set(kept.values())
    assert members[f"{uid_of['empty_caption']}.txt"] == members[f"{uid_of['null_caption']}.txt"] == b""
    assert f"{uid_of['null_image']}.jpg" not in members  # no image bytes: no image member
    assert members[f"{uid_of['zero_byte_image']}.jpg"] == b""  # bytes as stored


def test_text_stored_as_bytes_is_read_as_utf8_and_bad_rows_rejected(tmp_path, env, bad_rows):
    folders, uid_of, _ = bad_rows
    with untouched(folders["binary"]):
        res = run_pipeline(["align"], str(tmp_path / "run"), env["cfg"], input_dir=str(folders["binary"]), workers=0)[0]
    assert outcome(Path(res.folder)) == {uid_of[k]: EXPECT["align"].get(k) for k in uid_of}


@needs_wordnet
def test_whole_pipeline_over_bad_rows_loses_nothing_and_modifies_no_input(tmp_path, env, bad_rows):
    """align -> metaclip -> klite -> dfn -> emit, plus an eval set of image files (one bomb, one truncated):
    every input row ends kept or rejected exactly once, and every input file keeps its bytes."""
    folders, uid_of, _ = bad_rows
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "a.png").write_bytes(GOOD[0])
    (eval_dir / "bomb.png").write_bytes(BOMB_WARN)
    (eval_dir / "cut.png").write_bytes(TRUNCATED)
    (eval_dir / "empty.png").write_bytes(b"")
    cfg = {**env["cfg"], "align": {**env["cfg"]["align"], "eval_images": str(eval_dir)}}
    with untouched(folders["string"], eval_dir, env["root"] / "entries.txt", env["root"] / "dfn.pt"):
        res = run_pipeline(STAGES, str(tmp_path / "run"), cfg, input_dir=str(folders["string"]), workers=0)
    seen: dict[str, str | None] = {}
    for r in res:
        for u, why in outcome(Path(r.folder)).items():
            if why is not None:
                assert u not in seen, "rejected twice"
                seen[u] = f"{r.stage}:{why}"
    final = {u for u, why in outcome(Path(res[-1].folder)).items() if why is None}
    assert not final & set(seen)
    assert final | set(seen) == set(uid_of.values())
    # good0's image is in the eval set: decontamination caught it, the unreadable eval images were skipped
    assert seen[uid_of["good0"]] == "align:eval_near_duplicate"
    assert seen[uid_of["bomb_1x"]] == "align:image_unreadable"


# ---- every image decoder refuses bombs and broken bytes --------------------------------------------------
def test_decoders_refuse_bombs_before_decoding():
    from pipeline.report.figures import thumb as _thumb
    from stages.align import inspect_image
    from trainer.data import ImageTooLarge, decode_image

    assert BOMB_WARN and 1 < 10_000 * 10_000 / PIL_LIMIT < 2  # the case Pillow itself only warns about
    for bomb in (BOMB_WARN, BOMB_ERR):
        with pytest.raises(ImageTooLarge):
            decode_image(bomb, 64)
        assert inspect_image(bomb, PIL_LIMIT)[0] is False
        assert _thumb(bomb) is None
    for broken in (b"", TRUNCATED, b"\x89PNG\r\n\x1a\nnot really"):
        with pytest.raises(Exception):
            decode_image(broken, 64)
        assert _thumb(broken) is None
    assert decode_image(GOOD[1], 64).size == (240, 240) and _thumb(GOOD[1]).startswith("data:image/jpeg")


def test_trainer_reader_skips_null_images_and_never_crashes_on_broken_ones(tmp_path, bad_rows):
    from trainer.data import ParquetSource, PairDataset

    folders, uid_of, _ = bad_rows
    t = pa.concat_tables([pq.read_table(p).set_column(2, "text", pq.read_table(p).column("text").cast(pa.string()))
                          for p in sorted(folders["binary"].glob("*.parquet"))
                          if p.name != "part-00001.parquet"])  # part-00001 holds the non-UTF-8 caption
    pq.write_table(t, tmp_path / "train.parquet")
    src = ParquetSource([str(tmp_path / "train.parquet")])
    nulls = sum(v is None for v in t.column("image").to_pylist())
    assert src.skipped == nulls and len(src) == t.num_rows - nulls
    ds = PairDataset(src, transform=lambda img: np.asarray(img).shape, tokenizer=lambda texts: [len(texts[0])],
                     decode_size=64)
    shapes = {src.uids[i]: ds[i][0] for i in range(len(src))}
    assert shapes[uid_of["good3"]] == (240, 240, 3)
    for k in ("bomb_1x", "bomb_2x", "garbage_image", "truncated_image", "zero_byte_image"):
        if uid_of[k] in shapes:
            assert shapes[uid_of[k]] == (32, 32, 3), k  # the documented stand-in, never a decoded bomb


# ---- URL lists --------------------------------------------------------------------------------------------
BAD_URLS = [
    ("ftp://example.invalid/a.jpg", "an ftp url", "blocked_scheme"),  # the egress policy: http(s) only
    ("file:///etc/passwd", "a local file", "blocked_scheme"),
    ("javascript:alert(1)", "a script", "blocked_scheme"),
    ("data:image/png;base64,iVBORw0KGgo=", "a data url", "blocked_scheme"),
    ("http://", "no host", "invalid_url"),
    ("http://exa mple.invalid/x.jpg", "a space in the host", "invalid_url"),
    ("//example.invalid/x.jpg", "no scheme", "invalid_url"),
    ("", "an empty url", "invalid_url"),
]


@pytest.mark.parametrize("fmt", ["tsv", "csv", "parquet"])
def test_url_list_malformed_urls_schemes_and_non_utf8_rows_are_rejected(tmp_path, capsys, fmt):
    rows = [(u.encode(), c.encode(), r) for u, c, r in BAD_URLS]
    rows.append((b"http://example.invalid/ok.jpg", b"a caf\xe9 in latin-1", "invalid_utf8"))
    path = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"url": string_array([u for u, _, _ in rows]),
                                 "caption": string_array([c for _, c, _ in rows])}), path)
    else:
        sep, q = (b"\t", b"") if fmt == "tsv" else (b",", b'"')
        path.write_bytes(b"url" + sep + b"caption\n" + b"".join(q + u + q + sep + q + c + q + b"\n" for u, c, _ in rows))
    runs = tmp_path / "runs"
    with untouched(path):
        code = cli_main(["--runs-dir", str(runs), "ingest", str(path), "--run", "r", "--workers", "0"])
    err = capsys.readouterr().err
    # nothing downloadable: an error (one line), with every row kept in rejected/ with its reason
    assert code == 2 and "ingest: no URL downloaded" in err and len(err.strip().splitlines()) == 1, err
    stage = runs / "r" / "00_ingest"
    rej = pa.concat_tables([pq.read_table(p) for p in sorted((stage / "rejected").glob("*.parquet"))])
    got = {t: r.split(":")[0] for t, r in zip(rej.column("text").to_pylist(), rej.column("reason").to_pylist())}
    want = {c.decode("utf-8", "replace"): r for _, c, r in rows}
    assert got == want
    m = shards.read_json(str(stage / "_manifest.json"))
    assert m["rows_in"] == len(rows) == m["rejected"] and m["rows_out"] == 0
    assert not list(stage.glob("_img2dataset/0*.parquet"))  # nothing was downloaded


@pytest.mark.parametrize("content", [b"", b"PAR1garbage", b"url\tcaption\n"])
def test_unreadable_or_empty_url_list_is_one_line(tmp_path, capsys, content):
    path = tmp_path / ("urls.parquet" if content.startswith(b"PAR1") or not content else "urls.tsv")
    path.write_bytes(content)
    with untouched(path):
        code = cli_main(["--runs-dir", str(tmp_path / "runs"), "ingest", str(path), "--run", "r", "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and path.name in err, err
