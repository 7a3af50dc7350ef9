"""Issue 30, item 1: any open_clip model with pretrained weights, loaded by open_clip itself from Hugging Face's cache.

A stand-in model is published into a temporary HF cache exactly as open_clip's hub models are
(`$HF_HOME/hub/models--ORG--NAME/{refs/main, snapshots/<rev>/{open_clip_config.json, weights}}`) and loaded by
its `hf-hub:` name with HF_HUB_OFFLINE=1. No test sends a byte off loopback: `fetch-model` is pointed at a
loopback stand-in hub (HF_ENDPOINT), and the egress policy decides whether it may be reached.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import random
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
xxhash = pytest.importorskip("xxhash")

from pipeline import egress  # noqa: E402
from pipeline.cli import main as cli_main  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.schema import compute_uid  # noqa: E402
from trainer import models  # noqa: E402
from tests.test_trainer import COLOURS, SHAPES, _image  # noqa: E402

# a 64-wide, 2-layer ViT (and text tower): loads in a fraction of a second; 13.7 MB of weights (the token
# embedding: open_clip's tokenizer needs all 49,408 rows)
STANDIN_CFG = {"embed_dim": 64,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
STANDIN_PRE = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "shortest"}
REV_A, REV_B = "a" * 40, "b" * 40


def _weights_bytes(seed: int, safetensors: bool = False) -> bytes:
    torch.manual_seed(seed)
    sd = open_clip.model.CLIP(**STANDIN_CFG).state_dict()
    if safetensors:
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in sd.items()})
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def publish(home: Path, repo: str = "acme/tiny-clip", rev: str = REV_A, seed: int = 0, safetensors: bool = False,
            config: bool = True) -> Path:
    """The stand-in, laid out in the HF cache as huggingface_hub lays out a downloaded open_clip model; refs/main
    names `rev`. Returns the weights file."""
    org, name = repo.split("/")
    top = home / "hub" / f"models--{org}--{name}"
    snap = top / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    (top / "refs").mkdir(exist_ok=True)
    (top / "refs" / "main").write_text(rev)
    if config:
        (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": STANDIN_CFG, "preprocess_cfg": STANDIN_PRE}))
    weights = snap / ("open_clip_model.safetensors" if safetensors else "open_clip_pytorch_model.bin")
    weights.write_bytes(_weights_bytes(seed, safetensors))
    return weights


def _xxh3(path: Path) -> str:
    return xxhash.xxh3_128_hexdigest(path.read_bytes())


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub online (for fetch-model), whatever the environment the tests run in says."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---- loading by hf-hub name, offline ------------------------------------------------------------------------
def test_load_by_hf_hub_name_offline_with_its_identity(hf_home):
    weights = publish(hf_home)
    model, pre, tok, ident = models.load_pretrained("hf-hub:acme/tiny-clip")
    with torch.inference_mode():
        fi = model.encode_image(torch.zeros(2, 3, 32, 32), normalize=True)
        ft = model.encode_text(tok(["a red circle", "a blue square"]), normalize=True)
    assert fi.shape == ft.shape == (2, 64) and torch.isfinite(fi).all() and torch.isfinite(ft).all()
    # the weights are the published ones, loaded by open_clip (not a random init)
    sd = torch.load(weights, weights_only=True)
    assert torch.equal(model.state_dict()["visual.conv1.weight"], sd["visual.conv1.weight"])
    assert ident.name == "hf-hub:acme/tiny-clip" and ident.pretrained == ""
    assert ident.weights_digest == _xxh3(weights)
    assert (ident.image_size, ident.mean, ident.std) == ((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert (ident.interpolation, ident.resize_mode) == ("bicubic", "shortest")
    assert models.IDENTITY_ID.fullmatch(ident.id) and ident.id.startswith("hf-hub_acme_tiny-clip.hub.")
    assert models.ModelIdentity.from_dict(json.loads(json.dumps(ident.to_dict()))) == ident
    assert models.pretrained_digest("hf-hub:acme/tiny-clip") == ident.weights_digest  # the cache, no load


def test_identity_follows_the_weights_and_prefers_safetensors(hf_home):
    publish(hf_home)
    first = models.load_pretrained("hf-hub:acme/tiny-clip")[3]
    # a new revision of the repo (refs/main moves, as a download of an updated model does): other weights
    weights = publish(hf_home, rev=REV_B, seed=1)
    second = models.load_pretrained("hf-hub:acme/tiny-clip")[3]
    assert second.weights_digest == _xxh3(weights) != first.weights_digest and second.id != first.id
    # both files in one snapshot: open_clip loads the .safetensors one, and that is what is digested
    safe = publish(hf_home, rev=REV_B, seed=2, safetensors=True)
    model, _, _, third = models.load_pretrained("hf-hub:acme/tiny-clip")
    assert third.weights_digest == _xxh3(safe) != second.weights_digest
    from safetensors.torch import load_file

    assert torch.equal(model.state_dict()["logit_scale"], load_file(safe)["logit_scale"])


def test_hf_hub_model_without_weights_in_the_cache_is_refused_not_random(hf_home):
    """open_clip only warns when an hf-hub model's weights are missing and builds it with random weights:
    the loader refuses instead, naming fetch-model."""
    weights = publish(hf_home)
    weights.unlink()
    with pytest.raises(ConfigError, match="clipcurate fetch-model hf-hub:acme/tiny-clip"):
        models.load_pretrained("hf-hub:acme/tiny-clip")


# ---- one-line errors ------------------------------------------------------------------------------------------
def test_missing_model_is_one_line_naming_fetch_model(hf_home):
    with pytest.raises(ConfigError) as e:
        models.load_pretrained("hf-hub:acme/absent")
    msg = str(e.value)
    assert "\n" not in msg and "`clipcurate fetch-model hf-hub:acme/absent`" in msg and str(hf_home) in msg
    with pytest.raises(ConfigError, match=r"`clipcurate fetch-model ViT-L-14 --pretrained openai`"):
        models.load_pretrained("ViT-L-14", "openai")
    assert models.pretrained_digest("hf-hub:acme/absent") is None


def test_fetch_model_offline_with_a_missing_model_is_one_line(hf_home, capsys):
    code = cli_main(["fetch-model", "hf-hub:acme/absent"])
    _one_line_error(code, capsys.readouterr().err, "HF_HUB_OFFLINE=1", "`clipcurate fetch-model hf-hub:acme/absent`")
    # a model already in the cache needs no network: fetch-model offline says so
    weights = publish(hf_home)
    assert cli_main(["fetch-model", "hf-hub:acme/tiny-clip"]) == 0
    out = capsys.readouterr().out
    assert "already in the cache" in out and _xxh3(weights) in out and 'model = "hf-hub:acme/tiny-clip"' in out


def test_a_tag_the_model_does_not_have_lists_its_tags(hf_home, capsys):
    with pytest.raises(ConfigError) as e:
        models.load_pretrained("ViT-B-32", "no_such_tag")
    msg = str(e.value)
    assert "\n" not in msg and "no pretrained tag 'no_such_tag'" in msg
    for tag in open_clip.list_pretrained_tags_by_model("ViT-B-32"):
        assert tag in msg
    with pytest.raises(ConfigError, match="its tags: none"):
        models.load_pretrained("clipcurate-tiny", "openai")
    with pytest.raises(ConfigError, match="does not exist"):
        models.load_pretrained("clipcurate-tiny", str(hf_home / "missing.pt"))
    with pytest.raises(ConfigError, match="unknown model 'ViT-Q-99'"):
        models.load_pretrained("ViT-Q-99")
    code = cli_main(["fetch-model", "ViT-L-14", "--pretrained", "nope"])
    _one_line_error(code, capsys.readouterr().err, "ViT-L-14 has no pretrained tag 'nope'", "datacomp_xl_s13b_b90k")


def test_a_tag_resolves_through_the_hf_cache_with_its_preprocessing(hf_home, tmp_path, monkeypatch):
    """A model named by open_clip tag: open_clip's `hf_hub` entry names the repo; the tag's QuickGELU and
    preprocessing are what the model gets (a stand-in model config and tag, registered as open_clip's are)."""
    from open_clip import pretrained as oc_pretrained

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "standin-clip.json").write_text(json.dumps(STANDIN_CFG))
    open_clip.add_model_config(cfg_dir)
    monkeypatch.setitem(oc_pretrained._PRETRAINED, "standin-clip", {"demo": {
        "url": "", "hf_hub": "acme/standin-demo/", "quick_gelu": True, "mean": (0.1, 0.2, 0.3),
        "std": (0.4, 0.5, 0.6), "interpolation": "bilinear", "resize_mode": "shortest"}})
    with pytest.raises(ConfigError, match="`clipcurate fetch-model standin-clip --pretrained demo`"):
        models.load_pretrained("standin-clip", "demo")
    weights = publish(hf_home, repo="acme/standin-demo", config=False)
    model, _, _, ident = models.load_pretrained("standin-clip", "demo")
    assert ident.pretrained == "demo" and ident.weights_digest == _xxh3(weights)
    assert ident.mean == (0.1, 0.2, 0.3) and ident.interpolation == "bilinear"
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"  # as the tag was trained
    assert ident.id.startswith("standin-clip.demo.")
    with pytest.raises(ConfigError, match="its tags: demo"):
        models.load_pretrained("standin-clip", "other")


# ---- our own checkpoints -------------------------------------------------------------------------------------
def _own_checkpoint(path: Path, seed: int = 3) -> Path:
    torch.manual_seed(seed)
    m, _, _, _ = models.create("clipcurate-tiny")
    torch.save({"model_name": "clipcurate-tiny", "state_dict": m.state_dict(), "step": 7}, path)
    return path


def test_our_own_checkpoint_still_loads(hf_home, tmp_path):
    from stages.dfn import DfnStage
    from trainer.score import Scorer

    ck = _own_checkpoint(tmp_path / "model.pt")
    model, _, _, name = models.load(str(ck))
    assert name == "clipcurate-tiny"
    sc = Scorer(str(ck), device="cpu")
    assert sc.identity.pretrained == "file" and sc.identity.weights_digest == _xxh3(ck)
    assert sc.identity.name == "clipcurate-tiny" and sc.identity.image_size == (64, 64)
    # the same file as `pretrained` weights, loaded by open_clip: the same model, the same identity
    m2, _, _, ident = models.load_pretrained("clipcurate-tiny", str(ck))
    assert torch.equal(m2.state_dict()["visual.conv1.weight"], model.state_dict()["visual.conv1.weight"])
    assert ident == sc.identity
    # dfn's checkpoint route is as it was: its fingerprint is the file's sha256
    assert set(DfnStage({"checkpoint": str(ck)}).fingerprint_parts()) == {"checkpoint_sha256"}


# ---- dfn with a pretrained network ---------------------------------------------------------------------------
def _pool(n: int = 24, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sh, co = rng.choice(SHAPES), rng.choice(list(COLOURS))
        rows.append({"url": f"http://example.com/{i}.jpg", "text": f"a {co} {sh}", "image": _image(sh, co, rng, 48)})
    t = pa.Table.from_pylist(rows)
    return t.append_column("uid", compute_uid(t.column("url"), t.column("text")))


def test_dfn_config_takes_model_and_pretrained(hf_home):
    from stages.dfn import DfnStage

    for bad, needle in [({"checkpoint": "m.pt", "model": "ViT-L-14", "pretrained": "openai"}, "give one"),
                        ({"checkpoint": "m.pt", "model": "hf-hub:apple/DFN-public"}, "give one"),
                        ({"pretrained": "openai"}, "needs model"),
                        ({"model": "hf-hub:apple/DFN-public", "pretrained": "openai"}, "leave pretrained empty")]:
        with pytest.raises(ConfigError, match=needle):
            DfnStage(bad)
    assert DfnStage({"model": "hf-hub:apple/DFN-public"}).config.pretrained_network()
    assert DfnStage({"model": "ViT-L-14", "pretrained": "openai"}).config.pretrained_network()
    assert not DfnStage({"model": "clipcurate-tiny"}).config.pretrained_network()  # the run's dfn-train network
    assert not DfnStage({}).config.pretrained_network()
    # without any network, the one line names the public one too (the route issue 30's user did not have)
    from pipeline.errors import StageError

    t = pa.table({"uid": ["u"], "text": ["a"], "image": pa.array([b"x"], pa.binary())})
    with pytest.raises(StageError, match=r'dfn-train.*model = "hf-hub:apple/DFN-public".*fetch-model'):
        DfnStage({"checkpoint": str(hf_home / "none.pt")}).collect(t)


def test_dfn_scores_with_the_stand_in_hf_hub_model(hf_home):
    from stages.dfn import DfnStage

    weights = publish(hf_home)
    pool = _pool(24)
    tables = [pool.slice(0, 10), pool.slice(10)]
    stage = DfnStage({"model": "hf-hub:acme/tiny-clip", "keep_fraction": 0.5, "batch_size": 8})
    stats = stage.merge([stage.collect(t) for t in tables])
    outs = [stage.apply(t, stats) for t in tables]
    assert stats["scored"] == 24 and stage.scorer.identity.weights_digest == _xxh3(weights)
    s = np.concatenate([np.concatenate([k.column("dfn_score").to_numpy(), r.column("dfn_score").to_numpy()])
                        for k, r in outs])
    assert len(s) == 24 and np.isfinite(s).all() and (np.abs(s) <= 1.0001).all() and s.std() > 0
    assert abs(sum(k.num_rows for k, _ in outs) - 12) <= 1
    assert stage.fingerprint_parts() == {"model": "hf-hub:acme/tiny-clip", "pretrained": "",
                                         "weights_xxh3": _xxh3(weights)}


def test_dfn_through_the_cli_with_a_pretrained_network(hf_home, tmp_path, capsys):
    """`clipcurate run dfn` with `[dfn] model = "hf-hub:..."`: a missing model is one line naming fetch-model;
    once it is in the cache the same command scores every row."""
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    pq.write_table(_pool(16), pool_dir / "part-00000.parquet")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[dfn]\nmodel = "hf-hub:acme/tiny-clip"\nkeep_fraction = 0.5\nbatch_size = 8\n')
    argv = ["--runs-dir", str(tmp_path / "runs"), "run", "dfn", "--run", "x", "--input", str(pool_dir),
            "--config", str(cfg), "--workers", "0"]
    _one_line_error(cli_main(argv), capsys.readouterr().err, "dfn:", "`clipcurate fetch-model hf-hub:acme/tiny-clip`")
    publish(hf_home)
    assert cli_main(argv) == 0, capsys.readouterr().err
    out = [p for p in (tmp_path / "runs" / "x").glob("*_dfn/part-*.parquet")]
    kept = pa.concat_tables([pq.read_table(p) for p in out])
    assert 7 <= kept.num_rows <= 9 and np.isfinite(kept.column("dfn_score").to_numpy()).all()


# ---- fetch-model, through the egress policy ------------------------------------------------------------------
class StandInHub:
    """A loopback stand-in for the Hugging Face hub: HEAD and GET of /ORG/NAME/resolve/REV/FILE with the headers
    huggingface_hub reads (X-Repo-Commit, ETag, Content-Length), a 302 to another address for a file in
    `redirect` (an LFS file's CDN hop, X-Linked-Etag/-Size), 404 + X-Error-Code for what it lacks. Records
    every request."""

    def __init__(self, files: dict[str, bytes] | None = None, redirect: dict[str, str] | None = None):
        self.files, self.redirect, self.requests = files or {}, redirect or {}, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, headers: dict, body: bytes = b"") -> None:
                self.send_response(code)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def _answer(self) -> None:
                hub.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                key = "/".join(parts[:2] + parts[4:]) if len(parts) >= 5 and parts[2] == "resolve" else self.path
                commit = {"X-Repo-Commit": "c" * 40}
                data = hub.files.get(key)
                etag = f'"{hashlib.sha256(data or b"").hexdigest()}"'
                if key in hub.redirect:
                    return self._send(302, {**commit, "Location": hub.redirect[key], "X-Linked-Etag": etag,
                                            "X-Linked-Size": str(len(data or b""))})
                if data is not None:
                    return self._send(200, {**commit, "ETag": etag}, data)
                known = any(k.startswith("/".join(parts[:2]) + "/") for k in hub.files)
                self._send(404, {**commit, "X-Error-Code": "EntryNotFound"} if known else {"X-Error-Code": "RepoNotFound"})

            do_GET = do_HEAD = _answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    config = json.dumps({"model_cfg": STANDIN_CFG, "preprocess_cfg": STANDIN_PRE}).encode()
    h = StandInHub({"acme/tiny-clip/open_clip_config.json": config,
                    "acme/tiny-clip/open_clip_pytorch_model.bin": _weights_bytes(0)})
    yield h
    h.close()


def test_fetch_model_refuses_a_hub_the_egress_policy_does_not_allow(hf_home, online, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    code = cli_main(["fetch-model", "hf-hub:acme/tiny-clip"])
    _one_line_error(code, capsys.readouterr().err, "refused by the egress policy", "blocked_address",
                    "127.0.0.1 is loopback")
    assert hub.requests == []  # refused before a byte was sent
    assert not (hf_home / "hub" / "models--acme--tiny-clip").exists()


def test_fetch_model_through_an_allowed_mirror_then_loads_offline(hf_home, online, hub, monkeypatch, capsys):
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    before = (_http._GLOBAL_CLIENT_FACTORY, _http._GLOBAL_ASYNC_CLIENT_FACTORY, constants.HF_HUB_DISABLE_XET)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    code = cli_main(["fetch-model", "hf-hub:acme/tiny-clip", "--allow-private-host", f"127.0.0.1:{hub.port}"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    served = xxhash.xxh3_128_hexdigest(hub.files["acme/tiny-clip/open_clip_pytorch_model.bin"])
    assert cap.out.startswith("fetched hf-hub:acme/tiny-clip") and served in cap.out
    got = {(m, p.rsplit("/", 1)[-1]) for m, p in hub.requests}
    assert ("GET", "open_clip_config.json") in got and ("GET", "open_clip_pytorch_model.bin") in got
    assert ("HEAD", "open_clip_model.safetensors") in got  # open_clip's order: the .safetensors twin first
    # huggingface_hub is left as it was found: its own client factory, Xet as configured
    assert (_http._GLOBAL_CLIENT_FACTORY, _http._GLOBAL_ASYNC_CLIENT_FACTORY, constants.HF_HUB_DISABLE_XET) == before
    # offline now: the model loads from what fetch-model put in the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    assert models.load_pretrained("hf-hub:acme/tiny-clip")[3].weights_digest == served
    assert len(hub.requests) == n  # loading sent nothing
    # a repository the mirror does not have: one line
    monkeypatch.delenv("HF_HUB_OFFLINE")
    code = cli_main(["fetch-model", "hf-hub:acme/absent", "--allow-private-host", f"127.0.0.1:{hub.port}"])
    _one_line_error(code, capsys.readouterr().err, "has no repository acme/absent")


def test_a_redirect_hop_the_policy_refuses_is_not_followed(hf_home, online, hub, monkeypatch, capsys):
    """The hub answers the weights with a 302 to a CDN; that hop (another loopback port, not allowed) is checked
    like the first request and refused: the second server receives nothing."""
    cdn = StandInHub({"blob": hub.files["acme/tiny-clip/open_clip_pytorch_model.bin"]})
    try:
        hub.redirect["acme/tiny-clip/open_clip_pytorch_model.bin"] = f"{cdn.url}/blob"
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        code = cli_main(["fetch-model", "hf-hub:acme/tiny-clip", "--allow-private-host", f"127.0.0.1:{hub.port}"])
        _one_line_error(code, capsys.readouterr().err, "refused by the egress policy", "blocked_address")
        assert cdn.requests == [] and hub.requests  # the allowed hub was asked, the refused hop never
        snap = hf_home / "hub" / "models--acme--tiny-clip" / "snapshots"
        assert not list(snap.glob("*/open_clip_pytorch_model.bin"))
    finally:
        cdn.close()


def test_a_tag_whose_weights_are_a_plain_url_goes_through_egress_urlopen(hf_home, online, tmp_path, monkeypatch,
                                                                        capsys):
    """open_clip 3.3 has no such tag (every one names an hf_hub repo), but its format allows one: fetch-model
    downloads it with egress' guarded opener into the folder open_clip's URL download looks in."""
    from open_clip import pretrained as oc_pretrained

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "standin-url.json").write_text(json.dumps(STANDIN_CFG))
    open_clip.add_model_config(cfg_dir)
    server = StandInHub({"/weights/standin-url.pt": _weights_bytes(4)})
    try:
        monkeypatch.setitem(oc_pretrained._PRETRAINED, "standin-url", {"web": {
            "url": f"{server.url}/weights/standin-url.pt", "hf_hub": "", **STANDIN_PRE}})
        code = cli_main(["fetch-model", "standin-url", "--pretrained", "web"])
        _one_line_error(code, capsys.readouterr().err, "refused by the egress policy", "blocked_address")
        assert server.requests == []
        assert cli_main(["fetch-model", "standin-url", "--pretrained", "web", "--allow-private-host",
                         f"127.0.0.1:{server.port}"]) == 0, capsys.readouterr().err
        assert server.requests == [("GET", "/weights/standin-url.pt")]
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        ident = models.load_pretrained("standin-url", "web")[3]
        assert ident.weights_digest == xxhash.xxh3_128_hexdigest(server.files["/weights/standin-url.pt"])
        assert len(server.requests) == 1  # open_clip found the file where fetch-model put it
    finally:
        server.close()


def test_the_transport_checks_the_address_it_connects_to(hub):
    """A host *name* passes the URL check; the transport resolves it (a stub resolver here: loopback, as a
    hostile DNS answer would be) and refuses to connect. With the name:port allowed, the same client reaches the
    server at the address the resolver gave: the resolver is what the connection uses."""
    import httpx2

    from pipeline.egress_httpx import guarded_client

    def resolver(host, port):
        return ["127.0.0.1"]

    url = f"http://models.example.com:{hub.port}/acme/tiny-clip/resolve/main/open_clip_config.json"
    with guarded_client(egress.EgressPolicy(), resolver=resolver) as c:
        with pytest.raises(egress.Blocked, match="resolves to 127.0.0.1: loopback"):
            c.get(url)
    assert hub.requests == []
    allowed = egress.EgressPolicy(frozenset({f"models.example.com:{hub.port}"}))
    with guarded_client(allowed, resolver=resolver) as c:
        assert c.get(url).status_code == 200
    assert len(hub.requests) == 1
    # no proxy, whatever the environment says: a proxy would make the connection itself
    with guarded_client(egress.EgressPolicy(), resolver=lambda h, p: ["10.1.2.3"]) as c:
        assert isinstance(c._transport, httpx2.HTTPTransport) and not c._mounts
        with pytest.raises(egress.Blocked, match="private"):
            c.get(f"http://models.example.com:{hub.port}/")
