"""Classifier heads over stored CLIP embeddings: the file format, applying a head in numpy, fitting a linear one.

A head is a linear layer or a small MLP over one row's stored vector(s) (LAION's aesthetic predictor and its
CLIP-based NSFW detector are of this kind). The `heads` stage applies heads (stages/heads.py); `clipcurate
train-head` fits a logistic-regression head on a run's stored vectors and labels given by uid (trainer/cli.py).

The file: safetensors (data, never a pickle), read with safetensors' numpy loader: no torch to apply a head.
  tensors   `layers.<i>.weight` [out_i, in_i] and optional `layers.<i>.bias` [out_i] (torch nn.Linear layout: y =
            x W^T + b), applied in increasing <i> (indices need not be contiguous: a torch nn.Sequential with
            Dropout between its Linear layers, such as LAION's aesthetic predictor, keeps its state-dict names);
            each layer's in_i is the previous out_i, and the last layer gives 1 value. A bare `weight` (+ `bias`)
            is one linear layer (a plain nn.Linear state dict). Float32, float16 or float64 (bfloat16: convert
            first: numpy has none); computed in float32.
  between   `hidden` = "relu" (default) or "none" (LAION's aesthetic MLP has no nonlinearity between layers).
  output    `activation` = "none" (default: the raw value, e.g. an aesthetic score 1-10) or "sigmoid" (a
            probability, e.g. a logistic-regression head).
  metadata  (safetensors' string map, optional) `hidden`, `activation` and `on` ("image" | "text" | "pair"): what
            the file was made with. A head's `[heads.NAME]` config may set `hidden` / `activation` (it wins); `on`
            given in both must agree.
  input     the row's stored vector as is (L2-normalised, float16 -> float32); for `on = "pair"` the concatenation
            [image vector, text vector] (2 x dims wide).
"""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np

from pipeline import shards
from pipeline.errors import StageError

FORMAT = "clipcurate-head/1"
HIDDEN = ("relu", "none")
ACTIVATIONS = ("none", "sigmoid")
INPUTS = ("image", "text", "pair")
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
_MAX_HEADER = 1 << 24  # a head's header names a few tensors: 16 MB is far beyond any real one
_ROWS = 1 << 15  # rows per numpy batch: memory bounded by the batch and the widest layer


class HeadError(StageError):
    """A head file that cannot be used as asked. One line."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a head file's header says, checked: its layers' (weight, bias) names in order, its input width, its
    metadata."""

    layers: tuple[tuple[str, str | None], ...]
    in_dims: int
    metadata: dict


def read_layout(path: str, what: str) -> Layout:
    """The head's layout from the safetensors header alone (8 bytes of length, then JSON): cheap, for a preflight.
    `what` names the head in errors (e.g. "head 'aesthetic'"). HeadError in one line for a file that is missing,
    not safetensors, or whose tensors are not a chain of linear layers ending in 1 value."""
    try:
        fs, p = shards.fs_and_path(path)
        with fs.open(p, "rb") as f:
            size = f.read(8)
            if len(size) < 8:
                raise HeadError(f"{what}: {path} is not a safetensors file (shorter than 8 bytes)")
            n = struct.unpack("<Q", size)[0]
            if n > _MAX_HEADER:
                raise HeadError(f"{what}: {path} is not a safetensors file (a {n}-byte header)")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise HeadError(f"{what}: {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HeadError(f"{what}: {path} is not a safetensors file (its header is not JSON)") from None
    except OSError as e:
        why = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise HeadError(f"{what}: {path} cannot be read ({why})") from None
    if not isinstance(header, dict):
        raise HeadError(f"{what}: {path} is not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise HeadError(f"{what}: {path} is not a safetensors file (tensor {name!r:.40} has no shape)")
        tensors[name] = (info.get("dtype"), tuple(info["shape"]))
    return Layout(*_plan(tensors, path, what), metadata={str(k): str(v) for k, v in dict(meta).items()})


def _plan(tensors: dict, path: str, what: str) -> tuple[tuple[tuple[str, str | None], ...], int]:
    """The layers in order, checked as a chain ending in one output; the input width."""
    if "weight" in tensors and not any(k.startswith("layers.") for k in tensors):
        order = [("weight", "bias" if "bias" in tensors else None)]
    else:
        idx = set()
        for k in tensors:
            parts = k.split(".")
            if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in ("weight", "bias"):
                idx.add(int(parts[1]))
            else:
                raise HeadError(f"{what}: {path}: tensor {k!r:.60} is not layers.<i>.weight / layers.<i>.bias "
                                "(trainer/heads.py: the head file format)")
        if not idx:
            raise HeadError(f"{what}: {path} holds no layers.<i>.weight tensor")
        order = []
        for i in sorted(idx):
            w, b = f"layers.{i}.weight", f"layers.{i}.bias"
            if w not in tensors:
                raise HeadError(f"{what}: {path}: {b} has no {w}")
            order.append((w, b if b in tensors else None))
    prev = None
    for w, b in order:
        dtype, shape = tensors[w]
        for name in (w, b):
            if name is not None and tensors[name][0] not in _DTYPES:
                raise HeadError(f"{what}: {path}: {name} is {tensors[name][0]}, not F32, F16 or F64 (convert it to "
                                "float32)")
        if len(shape) != 2 or min(shape) < 1:
            raise HeadError(f"{what}: {path}: {w} has shape {list(shape)}, not [out, in]")
        if prev is not None and shape[1] != prev:
            raise HeadError(f"{what}: {path}: {w} takes {shape[1]} inputs, the layer before gives {prev}")
        if b is not None and tensors[b][1] != (shape[0],):
            raise HeadError(f"{what}: {path}: {b} has shape {list(tensors[b][1])}, not [{shape[0]}]")
        prev = shape[0]
    if prev != 1:
        raise HeadError(f"{what}: {path}: the last layer gives {prev} values, not 1")
    return tuple(order), int(tensors[order[0][0]][1][1])


@dataclasses.dataclass(frozen=True)
class Head:
    """A loaded head: float32 (weight, bias) per layer, applied in numpy batches."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    hidden: str = "relu"
    activation: str = "none"

    @property
    def in_dims(self) -> int:
        return int(self.layers[0][0].shape[1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 output per row of `x` [rows, in_dims] (any float dtype), `_ROWS` rows at a time."""
        out = np.empty(len(x), np.float32)
        for s in range(0, len(x), _ROWS):
            h = np.asarray(x[s:s + _ROWS], dtype=np.float32)
            for i, (w, b) in enumerate(self.layers):
                h = h @ w.T + b
                if i < len(self.layers) - 1 and self.hidden == "relu":
                    np.maximum(h, 0, out=h)
            h = h[:, 0]
            if self.activation == "sigmoid":
                h = _sigmoid(h)
            out[s:s + _ROWS] = h
        return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)


def load(path: str, what: str, hidden: str = "", activation: str = "") -> tuple[Head, Layout]:
    """The head in `path` (HeadError in one line), with `hidden` / `activation` as given, else as the file's
    metadata says, else relu / none."""
    from safetensors.numpy import load as st_load

    layout = read_layout(path, what)
    try:
        arrays = st_load(shards.read_bytes(path))
    except Exception as e:  # safetensors raises its own error types for a damaged body
        raise HeadError(f"{what}: {path} is not a readable safetensors file ({str(e).splitlines()[0][:100]})") from None
    layers = []
    for w, b in layout.layers:
        weight = np.ascontiguousarray(arrays[w], dtype=np.float32)
        bias = np.asarray(arrays[b], np.float32) if b else np.zeros(weight.shape[0], np.float32)
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise HeadError(f"{what}: {path}: {w if not np.isfinite(weight).all() else b} holds a non-finite value")
        layers.append((weight, bias))
    hidden = hidden or layout.metadata.get("hidden", "relu")
    activation = activation or layout.metadata.get("activation", "none")
    if hidden not in HIDDEN or activation not in ACTIVATIONS:
        raise HeadError(f"{what}: {path}: metadata hidden = {hidden!r:.20} / activation = {activation!r:.20}: "
                        f"give hidden {' or '.join(HIDDEN)}, activation {' or '.join(ACTIVATIONS)}")
    return Head(tuple(layers), hidden, activation), layout


def save(path: str, layers: list[tuple[np.ndarray, np.ndarray]], metadata: dict) -> dict:
    """Write a head in this format (atomic): float32 `layers.<i>.weight` / `.bias`, metadata as strings."""
    from safetensors.numpy import save as st_save

    tensors = {}
    for i, (w, b) in enumerate(layers):
        tensors[f"layers.{i}.weight"] = np.ascontiguousarray(w, dtype=np.float32)
        tensors[f"layers.{i}.bias"] = np.ascontiguousarray(b, dtype=np.float32).reshape(-1)
    meta = {"format": FORMAT, **{str(k): str(v) for k, v in metadata.items()}}
    return shards.write_bytes(st_save(tensors, metadata=meta), path)


# ---- fitting a linear head -----------------------------------------------------------------------------------

def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 100, l2: float = 1e-3, seed: int = 0) -> tuple[np.ndarray, float]:
    """(weight [dims], bias) of a logistic regression of `y` (in [0, 1]; soft labels allowed) on `x` [rows, dims]:
    full-batch L-BFGS (torch, CPU, float64: deterministic) on standardised features with an L2 penalty `l2` on
    the standardised weights, then folded back so the head takes the stored vectors as they are. Stored vectors are
    unit length (entries ~ 1/sqrt(dims)): standardising makes the problem well conditioned."""
    import torch

    torch.manual_seed(seed)
    x64 = np.asarray(x, np.float64)
    mean, std = x64.mean(0), x64.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    xs = torch.from_numpy((x64 - mean) / std)
    yt = torch.from_numpy(np.asarray(y, np.float64))
    w = torch.zeros(xs.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max(1, int(steps)), history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    ws = w.detach().numpy() / std
    return ws, float(b.detach().numpy() - (ws * mean).sum())


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (Mann-Whitney, ties counted half); NaN when one
    class is absent."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each run of ties
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))
