"""open_clip models for the trainer and the dfn stage: tiny configs, device/precision choice, checkpoints.

Tiny configs are plain open_clip model configs (the JSON open_clip keeps in `model_configs/`), written once
to the cache folder and registered with `open_clip.add_model_config`, so every open_clip function
(create_model_and_transforms, get_tokenizer) knows them by name. Any other open_clip model name works too
(e.g. ViT-B-32 on a GPU), always with `pretrained=None`: nothing is ever downloaded.

Checkpoints (torch.save, loadable with `weights_only=True`):
  model file   {"model_name", "state_dict", "step"}             train/model.pt, dfn_model/model.pt
  train state  the same + "optimizer", "scaler", "config", "rng", "epoch"
                                                                  train/checkpoints/step-000500.pt
`state_dict` follows open_clip's convention, so `open_clip.load_checkpoint(model, path)` reads both; a bare
open_clip state dict (a user's own checkpoint) loads here too, given `model_name`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from pathlib import Path

DEFAULT_MODEL = "clipcurate-tiny"

# ~8 M parameters (6.3 M of them the token embedding); ~1,000 img/s image encoding on 2 CPU cores.
TINY_CONFIGS: dict[str, dict] = {
    "clipcurate-tiny": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    },
    # The same text tower with a small ResNet (open_clip's ModifiedResNet, one block per stage, attention
    # pooling): a CNN's locality prior learns shapes from the few hundred clean pairs of a web-noise demo world,
    # where the 16-px-patch ViT above stays at chance on shape even trained on the truth-clean rows only
    # (bench_ablate_web: 0.10 top-1 over 12 shapes, ResNet 0.175, same 300 steps). ~1.6x the ViT's step time.
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


def read_checkpoint(path: str) -> dict:
    import torch

    from pipeline import shards

    if not shards.exists(path):  # a local path or an fsspec URI (s3://...)
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        data = path if shards.is_local(path) else io.BytesIO(shards.read_bytes(path))
        ck = torch.load(data, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with objects, a truncated file, not a checkpoint at all
        raise ValueError(f"checkpoint {path} cannot be read: {str(e).splitlines()[0]}") from None
    if isinstance(ck, dict) and "state_dict" not in ck and all(hasattr(v, "shape") for v in ck.values()):
        ck = {"state_dict": ck}  # a bare open_clip state dict
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


def file_digest(path: str) -> str:
    """sha256 of a file (checkpoints are tens of MB: well under a second), for fingerprints and caches; local
    paths and fsspec URIs."""
    from pipeline import shards

    return shards.content_digest(path)[:16]
