"""Issue 30 acceptance: a newcomer's route through the README's "Your own crawl" section, end to end, through the
CLI, with a stand-in for the public filtering network.

The route is the README's, read from the README: its `my.toml` block is the config used here as written, its
`printf ... > cut.toml` line is run by bash, and every `clipcurate ...` command it shows is one this test runs
(the paths mapped to the test's folders). So a README key that does not exist, or a command or option that does
not, fails here. The stand-in is published as `hf-hub:apple/DFN-public` (the README's name) on a loopback
stand-in hub (tests/test_models_pretrained.py's), fetched into a temporary Hugging Face cache with
`clipcurate fetch-model`, and the run itself goes offline (HF_HUB_OFFLINE=1): no byte leaves 127.0.0.1.

The crawl is an img2dataset Parquet output made here (no download: the in-place route), with a failed download
and a too-small image among the pairs; the URL-list route downloads the same kind of pool from a loopback server
through img2dataset (one call, ~20 s).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import random
import re
import shlex
import subprocess
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
xxhash = pytest.importorskip("xxhash")

from pipeline import embeddings  # noqa: E402
from pipeline.cli import main as cli_main  # noqa: E402
from tests.test_models_pretrained import (STANDIN_CFG, STANDIN_PRE, StandInHub, _weights_bytes,  # noqa: E402
                                          publish)
from tests.test_trainer import COLOURS, SHAPES, _image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NETWORK = "hf-hub:apple/DFN-public"  # the README's network; here a 64-wide stand-in, in a temporary cache
STEPS = ["00_ingest", "01_align", "02_metaclip", "03_klite", "04_dfn", "05_emit"]
PLACES = ["on a white table", "in a small garden", "near the old house", "on the kitchen floor",
          "beside a wooden chair", "under a bright lamp", "at the beach", "in a quiet room"]


# ---- the README's section ---------------------------------------------------------------------------------
def _section() -> str:
    text = (ROOT / "README.md").read_text()
    assert "\n## Your own crawl\n" in text, "README has no '## Your own crawl' section"
    return text.split("\n## Your own crawl\n", 1)[1].split("\n## ", 1)[0]


def _blocks(section: str) -> list[tuple[str, str]]:
    """(language, dedented body) of every fenced block, list items' indented ones included."""
    out = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", section, re.S | re.M):
        indent = len(m.group(1))
        body = "\n".join(line[indent:] for line in m.group(3).splitlines())
        out.append((m.group(2), body))
    return out


def readme_toml() -> str:
    tomls = [body for lang, body in _blocks(_section()) if lang == "toml"]
    assert len(tomls) == 1, "the section shows one my.toml"
    return tomls[0]


def readme_commands() -> list[list[str]]:
    """Every `clipcurate ...` line of the section's blocks, as argv (comments dropped)."""
    return [shlex.split(line, comments=True) for lang, body in _blocks(_section()) if lang == ""
            for line in body.splitlines() if line.startswith("clipcurate ")]


def readme_shell(prefix: str) -> str:
    lines = [line for lang, body in _blocks(_section()) for line in body.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"the section shows one `{prefix}` line"
    return lines[0]


# ---- the crawl ----------------------------------------------------------------------------------------------
def _pairs(n: int, seed: int) -> list[dict]:
    """Shapes on a background, captioned with the shape and its colour and a place (WordNet nouns for metaclip
    and klite): a shop's product photos. Every 4th caption names another shape: the pairs dfn should score low."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sh, co = rng.choice(SHAPES), rng.choice(list(COLOURS))
        said = rng.choice([s for s in SHAPES if s != sh]) if i % 4 == 3 else sh
        rows.append({"caption": f"a {co} {said} {rng.choice(PLACES)}", "jpg": _image(sh, co, rng, 224), "size": 224})
    return rows


def write_crawl(folder: Path, shard_rows: list[list[dict]], url) -> None:
    """An img2dataset Parquet output (the columns img2dataset writes, `*_stats.json` beside each shard). A row
    with `jpg` None is a failed download."""
    folder.mkdir(parents=True)
    for s, rows in enumerate(shard_rows):
        n = len(rows)
        ok = [r["jpg"] is not None for r in rows]
        size = [r["size"] if k else None for r, k in zip(rows, ok)]
        pq.write_table(pa.table({
            "caption": [r["caption"] for r in rows], "url": [url(s, i) for i in range(n)],
            "key": [f"{s:05d}{i:04d}" for i in range(n)],
            "status": ["success" if k else "failed_to_download" for k in ok],
            "error_message": [None if k else "HTTP Error 404: Not Found" for k in ok],
            "width": pa.array(size, pa.int32()), "height": pa.array(size, pa.int32()),
            "original_width": pa.array(size, pa.int32()), "original_height": pa.array(size, pa.int32()),
            "jpg": pa.array([r["jpg"] for r in rows], pa.binary()),
        }), folder / f"{s:05d}.parquet")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": n, "successes": sum(ok)}))


def _small_image() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, "JPEG")
    return buf.getvalue()


# ---- running the CLI ------------------------------------------------------------------------------------
class Cli:
    """`clipcurate ...` in this process (--workers 0 where a command starts workers), its stdout and stderr."""

    def __init__(self, runs: Path, capsys):
        self.runs, self.capsys = runs, capsys
        self.ran: list[list[str]] = []

    def __call__(self, *argv: str, code: int = 0) -> tuple[str, str]:
        self.capsys.readouterr()
        extra = ["--workers", "0"] if argv[0] in ("ingest", "run") else []
        got = cli_main(["--runs-dir", str(self.runs), *argv, *extra])
        out, err = self.capsys.readouterr()
        assert got == code, f"clipcurate {' '.join(argv)}: exit {got}\n{out}\n{err}"
        self.ran.append(["clipcurate", *argv])
        return out, err


class ModelPasses:
    """Rows the filtering network embedded (Scorer.encode_images / encode_texts), counted in this process."""

    def __init__(self, monkeypatch):
        from trainer.score import Scorer

        self.images = self.texts = 0
        enc_i, enc_t = Scorer.encode_images, Scorer.encode_texts

        def images(scorer, read, n):
            self.images += n
            return enc_i(scorer, read, n)

        def texts(scorer, texts):
            self.texts += len(texts)
            return enc_t(scorer, texts)

        monkeypatch.setattr(Scorer, "encode_images", images)
        monkeypatch.setattr(Scorer, "encode_texts", texts)

    def take(self) -> tuple[int, int]:
        got, (self.images, self.texts) = (self.images, self.texts), (0, 0)
        return got


@contextlib.contextmanager
def _online(monkeypatch):
    """huggingface_hub online for `fetch-model`, offline again after (whatever the environment says)."""
    from huggingface_hub import constants

    with monkeypatch.context() as m:
        m.delenv("HF_HUB_OFFLINE", raising=False)
        m.delenv("TRANSFORMERS_OFFLINE", raising=False)
        m.setattr(constants, "HF_HUB_OFFLINE", False)
        yield


# ---- what a finished run holds ------------------------------------------------------------------------------
def _table(folder: Path) -> pa.Table:
    parts = [pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))]
    return pa.concat_tables(parts, promote_options="default") if parts else pa.table({})


def _manifest(run: Path, step: str) -> dict:
    return json.loads((run / step / "_manifest.json").read_text())


def _store_files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "embeddings").rglob("*")) if p.is_file()}


def check_training_set(run: Path) -> set[str]:
    """emit's training set is dfn's kept rows, as WebDataset tars and their metadata Parquet (each sample's tar and
    member: the images are in the tars only); returns its uids."""
    kept = _table(run / "04_dfn")
    uids = set(kept.column("uid").to_pylist())
    assert uids and len(uids) == kept.num_rows
    parquet = _table(run / "emit" / "parquet")
    assert set(parquet.column("uid").to_pylist()) == uids and parquet.num_rows == len(uids)
    assert "image" not in parquet.column_names and parquet.column("member").null_count == 0
    from trainer.data import open_source

    src = open_source(str(run / "emit"))  # the trainer's reading: the images from the tars the Parquet names
    assert len(src) == len(uids) and all(src.get(i)[0][:2] == b"\xff\xd8" for i in range(len(src)))  # the JPEGs
    assert np.isfinite(parquet.column("dfn_score").to_numpy()).all()
    import tarfile

    sizes = json.loads((run / "emit" / "wds" / "sizes.json").read_text())
    tars = sorted((run / "emit" / "wds").glob("part-*.tar"))
    assert sorted(sizes) == [t.name for t in tars] and sum(sizes.values()) == len(uids)
    in_tars = set()
    for t in tars:
        with tarfile.open(t) as tf:
            names = tf.getnames()
        in_tars |= {n.split(".", 1)[0] for n in names if n.endswith(".jpg")}
        assert {n.split(".", 1)[1] for n in names} >= {"jpg", "txt", "json"}
    assert in_tars == uids
    assert len(np.load(run / "emit" / "uids.npy", allow_pickle=False)) == len(uids)
    return uids


def check_scores_are_the_stored_vectors(run: Path, weights: bytes) -> embeddings.EmbeddingStore:
    """The store under runs/NAME/embeddings/ names the stand-in (its weights' digest) and holds an image and a text
    vector for every row dfn scored; every dfn_score is the cosine of those vectors."""
    folders = [p for p in (run / "embeddings").iterdir() if p.is_dir()]
    assert len(folders) == 1
    ident = json.loads((folders[0] / "_manifest.json").read_text())["identity"]
    assert ident["name"] == NETWORK and ident["pretrained"] == ""
    assert ident["weights_digest"] == xxhash.xxh3_128_hexdigest(weights)
    store = embeddings.EmbeddingStore.open(str(run), folders[0].name)
    scored = pa.concat_tables([_table(run / "04_dfn"), _table(run / "04_dfn" / "rejected")], promote_options="default")
    uids = scored.column("uid")
    img, img_found = store.read_any(uids, "image")
    txt, txt_found = store.read_any(uids, "text")
    assert img_found.all() and txt_found.all()
    np.testing.assert_array_equal(embeddings.cosine(img, txt), scored.column("dfn_score").to_numpy())
    return store


def dfn_scores(run: Path) -> np.ndarray:
    scored = pa.concat_tables([_table(run / "04_dfn"), _table(run / "04_dfn" / "rejected")], promote_options="default")
    return scored.column("dfn_score").to_numpy()


# ---- the route --------------------------------------------------------------------------------------------
def test_the_readme_route_from_an_img2dataset_crawl_to_a_training_set(tmp_path, hf_home, monkeypatch, capsys):
    crawl = tmp_path / "crawl"
    shard0, shard1 = _pairs(70, 0), _pairs(70, 1)
    shard0[5] = {"caption": "a red circle on a white table", "jpg": None, "size": None}  # a failed download
    shard1[7] = {"caption": "a tiny red square on the kitchen floor", "jpg": _small_image(), "size": 64}  # align
    write_crawl(crawl, [shard0, shard1], lambda s, i: f"http://shop.example/{s}/{i}.jpg")
    my_toml = tmp_path / "my.toml"
    my_toml.write_text(readme_toml())
    cli = Cli(tmp_path / "runs", capsys)
    run = tmp_path / "runs" / "mycrawl"
    passes = ModelPasses(monkeypatch)

    # 3 before 1: the check names the missing network and its fetch-model command, and writes nothing
    out, err = cli("check", "--run", "mycrawl", "--config", str(my_toml), code=2)
    dfn_line = [ln for ln in out.splitlines() if ln.startswith("dfn: ")]
    assert len(dfn_line) == 1 and f"`clipcurate fetch-model {NETWORK}`" in dfn_line[0], out
    assert all(ln.endswith(": ok") for ln in out.splitlines() if not ln.startswith("dfn: ")), out
    assert not (tmp_path / "runs").exists()

    # 1: fetch-model, from a loopback stand-in hub (a private mirror, allowed as the README says)
    weights = _weights_bytes(0)
    hub = StandInHub({"apple/DFN-public/open_clip_config.json":
                      json.dumps({"model_cfg": STANDIN_CFG, "preprocess_cfg": STANDIN_PRE}).encode(),
                      "apple/DFN-public/open_clip_pytorch_model.bin": weights})
    try:
        with _online(monkeypatch):
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            out, _ = cli("fetch-model", NETWORK, "--allow-private-host", f"127.0.0.1:{hub.port}")
            assert out.startswith(f"fetched {NETWORK}")
        fetched = len(hub.requests)

        # 3: the check passes now, offline
        out, _ = cli("check", "--run", "mycrawl", "--config", str(my_toml))
        assert {ln.split(":")[0] for ln in out.splitlines()} >= {"ingest", "align", "metaclip", "klite", "dfn", "emit"}
        assert all(ln.endswith(": ok") for ln in out.splitlines()), out
        assert not (tmp_path / "runs").exists()

        # 4: ingest, the crawl used in place
        cli("ingest", str(crawl), "--run", "mycrawl", "--config", str(my_toml))
        assert json.loads((run / "image_store.json").read_text())["root"] == str(crawl)
        assert _manifest(run, "00_ingest")["reasons"] == {"failed_to_download: HTTP Error 404: Not Found": 1}

        # 5: run and report
        out, _ = cli("run", "--run", "mycrawl")
        assert sorted(p.name for p in run.iterdir() if re.fullmatch(r"\d\d_.*", p.name)) == STEPS
        m = {s: _manifest(run, s) for s in STEPS}
        assert m["01_align"]["reasons"].get("image_too_small") == 1
        scored = m["04_dfn"]["rows_in"]
        assert scored >= 100 and m["04_dfn"]["reasons"] == {"dfn_low_score": scored - m["04_dfn"]["rows_out"]}
        assert m["04_dfn"]["rows_out"] == pytest.approx(0.3 * scored, abs=1)  # the README's keep_fraction
        assert m["05_emit"]["rows_in"] == m["05_emit"]["rows_out"] == m["04_dfn"]["rows_out"]
        assert f"training set: {m['04_dfn']['rows_out']} samples" in out and str(run / "emit" / "wds") in out
        assert passes.take() == (scored, scored)  # every pair embedded once, image and text
        first = check_training_set(run)
        check_scores_are_the_stored_vectors(run, weights)
        store = _store_files(run)
        out, _ = cli("report", "--run", "mycrawl")
        report = (run / "report" / "report.md").read_text()
        assert "candidate thresholds" in report and (run / "report" / "dfn_scores.png").exists()
        assert len(hub.requests) == fetched  # the runs sent nothing to the hub

        # 6: the README's re-cut: a smaller keep_fraction redoes dfn and emit, with no model pass
        printf = readme_shell("printf ")
        subprocess.run(["bash", "-c", printf], cwd=tmp_path, check=True)
        cut_toml = tmp_path / "cut.toml"
        out, _ = cli("run", "--run", "mycrawl", "--config", str(cut_toml))
        assert "config: dfn.keep_fraction: 0.3 -> 0.2" in out and "config: this redoes dfn, emit" in out
        assert passes.take() == (0, 0) and _store_files(run) == store
        m = _manifest(run, "04_dfn")
        assert any("scored from stored vectors" in n for n in m["notes"]), m["notes"]
        assert m["rows_out"] == pytest.approx(0.2 * scored, abs=1) and m["rows_in"] == scored
        second = check_training_set(run)
        assert second < first  # the top 20% is inside the top 30%: the same scores

        # ... and a threshold (the README's other re-cut): exactly the rows scoring at or above it, no model pass
        s = np.sort(dfn_scores(run))
        gaps = np.flatnonzero(np.diff(s[len(s) // 3: 2 * len(s) // 3]) > 2e-4) + len(s) // 3
        thr = round(float(s[gaps[0]] + s[gaps[0] + 1]) / 2, 6)
        (tmp_path / "thr.toml").write_text(f"[dfn]\nthreshold = {thr}\n")
        cli("run", "--run", "mycrawl", "--config", str(tmp_path / "thr.toml"))
        assert passes.take() == (0, 0) and _store_files(run) == store
        assert _manifest(run, "04_dfn")["rows_out"] == int((s >= thr).sum()) == len(check_training_set(run))

        # back to my.toml's cut, as the README says: the first training set again, still no model pass
        assert "`clipcurate run --run mycrawl --config my.toml --fresh-config`" in _section()
        out, _ = cli("run", "--run", "mycrawl", "--config", str(my_toml), "--fresh-config")
        assert f"config: dfn.threshold: {thr} -> (unset)" in out and "config: this redoes dfn, emit" in out
        assert passes.take() == (0, 0) and _store_files(run) == store
        assert check_training_set(run) == first
    finally:
        hub.close()

    # every command the README's route shows was run here (its paths are the test's)
    for shown in readme_commands():
        paths = {"my.toml": str(my_toml), "cut.toml": str(cut_toml), "/data/crawl": str(crawl)}
        argv = [paths.get(a, a) for a in shown]
        if argv[1] == "fetch-model" and argv[2] == NETWORK:
            argv += ["--allow-private-host", f"127.0.0.1:{hub.port}"]
        if argv[1] == "fetch-model" and "--pretrained" in argv or "urls.parquet" in argv:
            continue  # DataComp's baseline (its loading: tests/test_models_pretrained.py); the URL list: below
        assert argv in cli.ran, f"the README's `{' '.join(shown)}` is not what this route ran"


class _Site:
    """The crawl's images served over HTTP on 127.0.0.1 (a loopback server: nothing leaves the machine)."""

    def __init__(self, folder: Path):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_the_readme_route_from_a_url_list(tmp_path, hf_home, capsys):
    """Step 4's other branch: a URL list, downloaded by img2dataset (from a loopback server, which the config must
    allow: `[ingest] allow_private_hosts`), then the same `run` to a training set with the published stand-in."""
    # the first route's weights: in one process, a dfn instance (cached per config by pipeline.registry.get_stage)
    # keeps the network it loaded even when the cache behind the same name holds other weights now
    # (its key names the network, not the weights; seed=1 here shows it: the stored identity keeps seed 0's digest)
    weights = publish(hf_home, repo="apple/DFN-public", seed=0)
    www = tmp_path / "www"
    www.mkdir()
    pairs = _pairs(48, 2)
    for i, p in enumerate(pairs):
        (www / f"{i}.jpg").write_bytes(p["jpg"])
    site = _Site(www)
    try:
        urls = tmp_path / "urls.parquet"
        rows = [(f"http://{site.host}/{i}.jpg", p["caption"]) for i, p in enumerate(pairs)]
        rows.append((f"http://{site.host}/missing.jpg", "a green cross in a quiet room"))
        pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), urls)
        my_toml = tmp_path / "my.toml"
        my_toml.write_text(readme_toml() + f'\n[ingest]\nallow_private_hosts = ["{site.host}"]\nprocesses = 1\n'
                           'threads = 8\n')
        cli = Cli(tmp_path / "runs", capsys)
        shown = [a for a in readme_commands() if "urls.parquet" in a]
        assert shown == [["clipcurate", "ingest", "urls.parquet", "--run", "mycrawl", "--config", "my.toml"]]
        cli("ingest", str(urls), "--run", "mycrawl", "--config", str(my_toml))
    finally:
        site.close()
    run = tmp_path / "runs" / "mycrawl"
    ingest = _manifest(run, "00_ingest")
    assert ingest["rows_out"] == 48 and sum(ingest["reasons"].values()) == 1
    assert (run / "00_ingest" / "_img2dataset").is_dir()
    cli("run", "--run", "mycrawl")
    dfn = _manifest(run, "04_dfn")
    assert dfn["rows_out"] == pytest.approx(0.3 * dfn["rows_in"], abs=1) and dfn["rows_in"] >= 40
    check_training_set(run)
    check_scores_are_the_stored_vectors(run, weights.read_bytes())
