"""open_clip models for the trainer and the dfn stage: tiny configs, device/precision choice, checkpoints.

Tiny configs are plain open_clip model configs (the JSON open_clip keeps in `model_configs/`), written once
to the cache folder and registered with `open_clip.add_model_config`, so every open_clip function
(create_model_and_transforms, get_tokenizer) knows them by name. Any other open_clip model name works too
(e.g. ViT-B-32 on a GPU).

Pretrained networks (`load_pretrained`): an open_clip name with a tag (`ViT-L-14` + `openai`) or a weights file,
or `hf-hub:ORG/NAME`, loaded by open_clip itself from Hugging Face's cache, never downloaded while loading
(trainer/hub.py: `clipcurate fetch-model` fetches, through the egress policy). Each loaded model has a
`ModelIdentity` (name, tag, digest of the weights loaded, preprocessing): what stored embeddings are keyed by.

Checkpoints (torch.save, loadable with `weights_only=True`):
  model file   {"model_name", "state_dict", "step"}             train/model.pt, dfn_model/model.pt
  train state  the same + "optimizer", "scaler", "config", "rng", "epoch"
                                                                  train/checkpoints/step-000500.pt
`state_dict` follows open_clip's convention, so `open_clip.load_checkpoint(model, path)` reads both; a bare
open_clip state dict (a user's own checkpoint) loads here too, given `model_name`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import re
from pathlib import Path

from pipeline.config import ConfigError

DEFAULT_MODEL = "clipcurate-tiny"

# ~8 M parameters (6.3 M of them the token embedding); fast enough to encode images on a CPU (timed by hand:
# bench/README.md, "The trainer by hand").
TINY_CONFIGS: dict[str, dict] = {
    "clipcurate-tiny": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    },
    # The same text tower with a small ResNet (open_clip's ModifiedResNet, one block per stage, attention
    # pooling): a CNN's locality prior learns shapes from the few hundred clean pairs of a web-noise demo world,
    # where the 16-px-patch ViT above stays at chance on shape even trained on the truth-clean rows only
    # (bench/bench_ablate_web.py; bench/README.md, "Why the web ablation trains a small ResNet"). A dearer step
    # than the ViT's (timed by hand: bench/README.md, "The trainer by hand").
    "clipcurate-tiny-rn": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    },
    # a step up for a GPU or a patient CPU: 128 px, 6 x 256 towers
    "clipcurate-small": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 128, "layers": 6, "width": 256, "patch_size": 16, "head_width": 64},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
    },
}

_REGISTERED = False


def register_configs() -> None:
    """Make the tiny configs known to open_clip (idempotent, once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import open_clip

    blob = json.dumps(TINY_CONFIGS, sort_keys=True)
    base = os.environ.get("CLIPCURATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "clipcurate"
    )
    folder = Path(base) / "model_configs" / hashlib.sha256(blob.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    for name, cfg in TINY_CONFIGS.items():
        path = folder / f"{name}.json"
        if not path.exists():
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(cfg, indent=2))
            os.replace(tmp, path)  # atomic: parallel workers never read half a file
    open_clip.add_model_config(folder)
    _REGISTERED = True


# ---- device and precision ------------------------------------------------------------------------
def pick_device(spec: str = "auto"):
    """"auto": CUDA when present, else CPU; or any torch device string ("cuda:1", "cpu")."""
    import torch

    if spec in ("", "auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def pick_precision(spec: str, device) -> str:
    """"auto": bf16 autocast on a GPU that has it, fp16 autocast (with a grad scaler) on older GPUs, fp32 on CPU."""
    import torch

    if spec not in ("", "auto", None):
        if spec not in ("fp32", "amp_bf16", "amp_fp16"):
            raise ValueError(f"precision '{spec}': expected auto, fp32, amp_bf16 or amp_fp16")
        return spec
    if device.type == "cuda":
        return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
    return "fp32"


def autocast(device, precision: str):
    import torch

    if precision == "amp_bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "amp_fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


# ---- models --------------------------------------------------------------------------------------
def create(model_name: str = DEFAULT_MODEL, device="cpu"):
    """(model, preprocess_train, preprocess_val, tokenizer) from open_clip, random init, fp32 weights."""
    import open_clip

    register_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown model '{model_name}' (tiny: {', '.join(TINY_CONFIGS)}; or any open_clip name)")
    with _quiet_random_init(model_name):
        model, pre_train, pre_val = open_clip.create_model_and_transforms(model_name, pretrained=None, device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, pre_train, pre_val, tokenizer


class _RandomInitFilter(logging.Filter):
    """Drops open_clip's one expected warning when we create a model without pretrained weights (ours are
    loaded next from our checkpoint, or trained from scratch): "No pretrained weights loaded for model
    '<name>'. Model initialized randomly." Exactly that record of the root logger, for that model; any other
    record, open_clip's other warnings included, passes."""

    def __init__(self, model_name: str):
        super().__init__()
        self.message = f"No pretrained weights loaded for model '{model_name}'. Model initialized randomly."

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and record.levelno == logging.WARNING and record.getMessage() == self.message)


@contextlib.contextmanager
def _quiet_random_init(model_name: str):
    f = _RandomInitFilter(model_name)
    root = logging.getLogger()
    root.addFilter(f)  # open_clip logs with logging.warning(...): the root logger, whose filters run first
    try:
        yield
    finally:
        root.removeFilter(f)


def image_size(model) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(max(size) if isinstance(size, (tuple, list)) else size)


# What torch.save writes first: a zip archive (its format since torch 1.6), or a pickle (the legacy format)
TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")


def _first_sentence(e: Exception) -> str:
    """torch's errors run to several lines of advice about torch itself: their first sentence, for one line."""
    return (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:160]


def _file_head(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def read_checkpoint(path: str) -> dict:
    import torch

    from pipeline import shards

    if not shards.exists(path):  # a local path or an fsspec URI (s3://...)
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    what = "give a .pt written by `clipcurate dfn-train` or `clipcurate train`, or an open_clip checkpoint"
    try:
        raw = None if shards.is_local(path) else shards.read_bytes(path)
        head = raw[:4] if raw is not None else _file_head(path, 4)
    except OSError as e:  # a folder, no permission
        raise ValueError(f"checkpoint {path} cannot be read: {e.strerror or e}; {what}") from None
    if not head.startswith(TORCH_SAVE_MAGIC):  # torch.load would report a pickle error from the middle of the file
        raise ValueError(f"checkpoint {path} is not a PyTorch checkpoint (torch.save writes a zip archive; this file "
                         f"starts with {head!r}); {what}")
    try:
        ck = torch.load(path if raw is None else io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only: the file holds objects other than tensors and containers
        raise ValueError(f"checkpoint {path} holds Python objects other than tensors, which are never loaded "
                         f"(unpickling them could run code: {_first_sentence(e)}); save only the state dict: "
                         "torch.save({'state_dict': model.state_dict()}, path)") from None
    except Exception as e:  # a truncated or corrupt archive
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({_first_sentence(e)}); write it again, "
                         f"or {what}") from None
    if isinstance(ck, dict) and "state_dict" not in ck and ck and all(hasattr(v, "shape") for v in ck.values()):
        ck = {"state_dict": ck}  # a bare open_clip state dict
    if not isinstance(ck, dict) or not isinstance(ck.get("state_dict"), dict):
        got = (f"a {type(ck).__name__}" if not isinstance(ck, dict)
               else f"a dict without 'state_dict' (keys: {sorted(map(str, ck))[:5]})")
        raise ValueError(f"checkpoint {path} holds {got}, not a model's weights; {what}")
    sd = ck.get("state_dict", {})
    if sd and next(iter(sd)).startswith("module."):
        ck["state_dict"] = {k[len("module."):]: v for k, v in sd.items()}
    return ck


def load(path: str, model_name: str = "", device="cpu"):
    """A model from a checkpoint: (model in eval mode, preprocess_val, tokenizer, model_name)."""
    ck = read_checkpoint(path)
    name = model_name or ck.get("model_name") or DEFAULT_MODEL
    model, _, pre_val, tokenizer = create(name, device="cpu")
    missing, unexpected = model.load_state_dict(ck["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit model '{name}': {len(missing)} missing, {len(unexpected)} unexpected "
            f"keys (e.g. {(list(missing) + list(unexpected))[0]}); give the right model name"
        )
    model.to(device).eval()
    return model, pre_val, tokenizer, name


# ---- pretrained networks, and what identifies a model ---------------------------------------------
IDENTITY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,159}")  # usable as one folder name anywhere


def _slug(text: str, n: int) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:n] or "x"


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What a model's embeddings depend on: the network (name, tag, digest of the weights actually loaded) and how
    an image is prepared for it (open_clip's preprocess cfg). Equal identities embed alike; the embedding store
    keys its vectors by `.id`."""

    name: str  # "hf-hub:apple/DFN-public", "ViT-L-14", "clipcurate-tiny"
    pretrained: str  # open_clip tag ("openai"), "file" (a weights file or our checkpoint), "" (hf-hub, random)
    weights_digest: str  # xxh3_128 of the weights file(s) loaded; of the state dict for random init
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # "bicubic", "bilinear"
    resize_mode: str  # "shortest" (resize + centre crop), "longest", "squash"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelIdentity":
        d = dict(d)
        for k in ("image_size", "mean", "std"):
            d[k] = tuple(d[k])
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    @property
    def id(self) -> str:
        """`<name>.<tag>.<xxh3-64 of every field>`: readable, stable across processes and machines, one folder
        name ([A-Za-z0-9._-], 160 characters at most)."""
        import xxhash

        h = xxhash.xxh3_64_hexdigest(json.dumps(self.to_dict(), sort_keys=True).encode())
        tag = self.pretrained or ("random" if self.weights_digest.startswith("state:") else "hub")
        out = f"{_slug(self.name, 80)}.{_slug(tag, 40)}.{h}"
        if not IDENTITY_ID.fullmatch(out):
            raise ValueError(f"model identity {out!r} is not a folder name")
        return out


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> xxh3: a process digests a multi-GB file once


def weights_digest(paths: list[str]) -> str:
    """xxh3_128 of the weights file (several files: of their digests in order); local paths and fsspec URIs.
    Streamed; a large model's file takes well under a second once it is in the page cache (timed by hand:
    bench/README.md, "The trainer by hand")."""
    import xxhash

    from pipeline import shards

    digests = []
    for path in paths:
        fs, p = shards.fs_and_path(path)
        info = fs.info(p)
        key = (path, info.get("size"), str(info.get("mtime") or info.get("LastModified") or ""))
        if key not in _DIGESTS:
            h = xxhash.xxh3_128()
            with fs.open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            _DIGESTS[key] = h.hexdigest()
        digests.append(_DIGESTS[key])
    return digests[0] if len(digests) == 1 else xxhash.xxh3_128_hexdigest("\n".join(digests).encode())


def _state_digest(model) -> str:
    """xxh3_128 of a model's tensors (a randomly initialised model has no file: two such are two models)."""
    import torch
    import xxhash

    h = xxhash.xxh3_128()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "state:" + h.hexdigest()


def identity_of(model, name: str, pretrained: str, digest: str) -> ModelIdentity:
    """The identity of a created model: its preprocessing as open_clip set it on `model.visual.preprocess_cfg`."""
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", image_size(model))
    size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(x) for x in size)
    return ModelIdentity(name=name, pretrained=pretrained, weights_digest=digest, image_size=size,
                         mean=tuple(float(x) for x in cfg.get("mean", ())), std=tuple(float(x) for x in cfg.get("std", ())),
                         interpolation=str(cfg.get("interpolation", "")), resize_mode=str(cfg.get("resize_mode", "")))


def checkpoint_identity(path: str, name: str, model) -> ModelIdentity:
    """The identity of a model loaded from our checkpoint (`load`): a weights file like any other."""
    return identity_of(model, name, "file", weights_digest([path]))


@contextlib.contextmanager
def _recording_loads(into: list):
    """Notes every weights file open_clip's create_model loads (factory.load_checkpoint, its one loading call):
    the identity digests the files actually loaded, and a model that loaded none is refused (open_clip only
    logs a warning when an hf-hub model's weights are missing, and goes on with random weights)."""
    from open_clip import factory

    real = factory.load_checkpoint

    def recording(model, checkpoint_path, *args, **kw):
        into.append(str(checkpoint_path))
        return real(model, checkpoint_path, *args, **kw)

    factory.load_checkpoint = recording
    try:
        yield
    finally:
        factory.load_checkpoint = real


def load_pretrained(name: str, pretrained: str = "", device="cpu"):
    """A pretrained open_clip model, loaded by open_clip from Hugging Face's cache: (model in eval mode,
    preprocess_val, tokenizer, ModelIdentity). `name`: an open_clip model name (ViT-B-32, ViT-L-14, ours) or
    hf-hub:ORG/NAME; `pretrained`: an open_clip tag of that model, a weights file, or "" (random weights).
    Never downloads: a model missing from the cache, an unknown tag, a file that does not load are one-line
    ConfigErrors (the first names `clipcurate fetch-model`)."""
    import open_clip

    from trainer import hub

    register_configs()
    source = hub.plan(name, pretrained)
    folder = hub.cache_dir()
    if hub.cached_files(source, folder) is None:
        raise hub.missing_error(source, folder)
    loaded: list[str] = []
    kw = {"force_quick_gelu": True} if source.quick_gelu else {}  # the tag's weights were trained with QuickGELU
    quiet = _quiet_random_init(name) if source.kind == "none" else contextlib.nullcontext()
    try:
        with hub.held_offline(), _recording_loads(loaded), quiet:
            model, _, pre_val = open_clip.create_model_and_transforms(
                name, pretrained=source.pretrained or None, cache_dir=folder, device="cpu", **kw)
            tokenizer = open_clip.get_tokenizer(name, cache_dir=folder)
    except Exception as e:  # a file that is not this model's weights, a config open_clip cannot build
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"model {name}{' (' + source.pretrained + ')' if source.pretrained else ''}: open_clip "
                          f"cannot load it: {first}") from None
    if source.kind != "none" and not loaded:
        raise ConfigError(f"model {name}: open_clip loaded no weights (it would score with random ones); "
                          f"fetch them again with `{source.fetch_command}`")
    digest = weights_digest(loaded) if loaded else _state_digest(model)
    tag = {"tag": source.pretrained, "file": "file"}.get(source.kind, "")  # hf-hub: the name says it all
    model.to(device).eval()
    return model, pre_val, tokenizer, identity_of(model, name, tag, digest)


def pretrained_digest(name: str, pretrained: str = "") -> str | None:
    """The weights digest `load_pretrained(name, pretrained)` will report, read from the cache without loading
    (for fingerprints); None when the cache lacks the model, "" for random weights. ConfigError as plan's."""
    from trainer import hub

    register_configs()
    files = hub.cached_files(hub.plan(name, pretrained))
    return None if files is None else (weights_digest(files[-1:]) if files else "")


# What to do about a checkpoint that is not there, as network_problem says it by default (dfn says it its own way)
CHECKPOINT_FIX = ("train one with `clipcurate dfn-train --hq HQ.parquet --run NAME`, or score with a public network: "
                  'model = "hf-hub:apple/DFN-public" (after `clipcurate fetch-model hf-hub:apple/DFN-public`)')


def network_problem(model: str, pretrained: str, checkpoint_path: str, fix: str = CHECKPOINT_FIX) -> str | None:
    """Why a network cannot be loaded offline, in one line with its fix; None when, as far as looking can tell,
    it will load. The preflight's check (pipeline/preflight.py) for every stage that loads a network (dfn,
    embed): it looks, never loads. `checkpoint_path` set: that checkpoint (our `.pt` or an open_clip one) must
    exist and start as torch.save writes (`fix` says what to do when it does not exist). Else `model` +
    `pretrained` name a pretrained network (hub.plan: a known model, an existing tag or weights file) whose
    files Hugging Face's cache must hold (the line names `clipcurate fetch-model ...`); open_clip is imported
    for its model list, nothing is loaded or digested."""
    if checkpoint_path:
        return checkpoint_problem(checkpoint_path, fix)
    from trainer import hub

    try:
        source = hub_source(model) if not pretrained else None
        if source is None:
            register_configs()
            source = hub.plan(model, pretrained)
    except ConfigError as e:
        return str(e)
    if hub.cached_files(source) is None:
        return str(hub.missing_error(source))
    return None


def hub_source(model: str):
    """hub.plan's Source for a well-formed `hf-hub:ORG/NAME`, without importing open_clip (seconds, with torch, on 2
    loaded cores: bench/README.md, "The trainer by hand"; the preflight of `clipcurate check` would be mostly that):
    open_clip's hub layout, its config and the weights as open_clip 3.3 looks for them, .safetensors first
    (tests/test_preflight.py checks this equals hub.plan's). None for any other name (hub.plan decides, and says
    what is wrong)."""
    from trainer import hub

    repo = model[len(hub.HUB_PREFIX):] if model.startswith(hub.HUB_PREFIX) else ""
    if not hub.REPO_ID.fullmatch(repo):
        return None
    return hub.Source(model, "", "hf-hub", repo, ((hub.CONFIG_FILE,), ("open_clip_model.safetensors", hub.WEIGHTS_FILE)))


def checkpoint_problem(path: str, fix: str = CHECKPOINT_FIX) -> str | None:
    """A checkpoint that is missing, unreadable, or not a torch.save file (its first bytes), in the words
    read_checkpoint would use; None when it looks like one. Does not import torch."""
    from pipeline import shards

    if not shards.exists(path):
        return f"checkpoint {path} does not exist: {fix}"
    if not shards.is_local(path):
        return None  # its bytes are read when it is loaded
    what = "give a .pt written by `clipcurate dfn-train` or `clipcurate train`, or an open_clip checkpoint"
    try:
        head = _file_head(path, 4)
    except OSError as e:  # a folder, no permission
        return f"checkpoint {path} cannot be read: {e.strerror or e}; {what}"
    if not head.startswith(TORCH_SAVE_MAGIC):
        return (f"checkpoint {path} is not a PyTorch checkpoint (torch.save writes a zip archive; this file starts "
                f"with {head!r}); {what}")
    return None


def file_digest(path: str) -> str:
    """sha256 of a file (checkpoints are tens of MB: well under a second), for fingerprints and caches; local
    paths and fsspec URIs."""
    from pipeline import shards

    return shards.content_digest(path)[:16]
