"""A CLIP model's image and text embeddings, batched: what the embed and dfn stages (and their benchmarks) call.

`Scorer.encode_images` reads a group of rows' bytes through the run's image reader, then decodes and preprocesses
them in DataLoader worker processes when `num_workers` > 0, with pinned memory on CUDA; `encode_texts` tokenises
in batches. The model runs under inference mode, with bf16/fp16 autocast on a GPU. A row whose image is missing or cannot be decoded has no vector (ok False).
`score` is the bare cosine loop the benchmarks compare against.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import numpy as np

from trainer import models
from trainer.data import FastEvalTransform, decode_image


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_MMAP_THRESHOLD = 128 * 1024  # glibc's default; setting MALLOC_TRIM_THRESHOLD_ freezes it there
GLIBC_TRIM_THRESHOLD = 128 * 1024  # glibc's default
TENSOR_MMAP_THRESHOLD = 64 << 20
TENSOR_TRIM_THRESHOLD = 256 << 20


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


@contextlib.contextmanager
def heap_for_tensors(libc=None):
    """Let torch reuse heap memory for its activations while scoring, then give it back.

    A Dask nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536 (so freed memory returns to the OS at
    once). That also freezes glibc's mmap threshold at 128 KiB, so every activation tensor of a forward pass is
    a fresh mmap: page faults and zeroing on each batch make scoring markedly slower than in a plain process, and
    inside this context it runs as fast as there (bench/results/image_path.json; bench/README.md, image path). Only
    acts where that variable is set; on exit the nanny's setting is restored and the heap trimmed, so the worker's
    memory goes back to what Dask expects."""
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    libc = libc if libc is not None else (_glibc() if trim is not None else None)
    if trim is None or libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, TENSOR_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, TENSOR_TRIM_THRESHOLD)
    try:
        yield
    finally:
        try:
            restored = int(trim)
        except ValueError:
            restored = GLIBC_TRIM_THRESHOLD
        libc.mallopt(M_TRIM_THRESHOLD, restored)
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD)
        libc.malloc_trim(0)


class _PairsForScoring:
    """(image, token ids, decoded ok): the image as uint8 HWC when `fast` (normalised later, per batch)."""

    def __init__(self, images, texts, preprocess, tokenizer, size: int, fast: FastEvalTransform | None):
        self.images, self.texts = images, texts
        self.preprocess, self.tokenizer, self.size, self.fast = preprocess, tokenizer, size, fast

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i):
        import torch

        ok = True
        try:
            img = decode_image(self.images[i], self.size)
            x = torch.from_numpy(self.fast(img).copy()) if self.fast else self.preprocess(img)
        except Exception:  # truncated or not an image: scored NaN, never a crash
            ok = False
            x = (torch.zeros(self.fast.crop[0], self.fast.crop[1], 3, dtype=torch.uint8) if self.fast
                 else torch.zeros(3, self.size, self.size))
        return x, self.tokenizer([self.texts[i] or ""])[0], ok


READ_GROUP_ROWS = 4096  # rows whose bytes the main process holds at once: ~100 MB of 256-px JPEGs


class _Images:
    """(image, decoded ok) per row of a list of bytes, decoded and preprocessed in the DataLoader's worker
    processes. The bytes are read in the main process (through the run's image reader, a group of rows at a
    time): a worker forked from a process whose Arrow/polars thread pools were busy must not use them again
    (it deadlocks), and decoding, the costly part, is what the workers are for."""

    def __init__(self, blobs: list, preprocess, size: int, fast):
        self.blobs, self.preprocess, self.size, self.fast = blobs, preprocess, size, fast

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i):
        import torch

        try:
            img = decode_image(self.blobs[i], self.size)
            return (torch.from_numpy(self.fast(img).copy()) if self.fast else self.preprocess(img)), True
        except Exception:  # truncated or not an image: no vector, never a crash
            return (torch.zeros(self.fast.crop[0], self.fast.crop[1], 3, dtype=torch.uint8) if self.fast
                    else torch.zeros(3, self.size, self.size)), False


class Scorer:
    """Loads a model once; `score(images, texts)` -> float32 cosines (NaN: no / bad image). The model: a checkpoint
    (ours, or any open_clip one with `model_name`), or with `checkpoint` empty a pretrained open_clip network
    from Hugging Face's cache (`model_name` + `pretrained`: models.load_pretrained)."""

    def __init__(self, checkpoint: str, model_name: str = "", device: str = "auto", precision: str = "auto",
                 batch_size: int = 256, num_workers: int = 0, pretrained: str = ""):
        self.device = models.pick_device(device)
        self.precision = models.pick_precision(precision, self.device)
        self.checkpoint = checkpoint
        self._identity = None
        if checkpoint:
            self.model, self.preprocess, self.tokenizer, self.model_name = models.load(checkpoint, model_name, self.device)
        else:
            self.model, self.preprocess, self.tokenizer, self._identity = models.load_pretrained(
                model_name, pretrained, self.device)
            self.model_name = model_name
        self.size = models.image_size(self.model)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.fast = FastEvalTransform.from_compose(self.preprocess)

    @property
    def identity(self) -> "models.ModelIdentity":
        """The model's identity (a checkpoint's is digested on first use)."""
        if self._identity is None:
            self._identity = models.checkpoint_identity(self.checkpoint, self.model_name, self.model)
        return self._identity

    @functools.cached_property
    def dims(self) -> int:
        """Width of the model's embeddings (one text forward pass, once)."""
        import torch

        with torch.inference_mode():
            return int(self.model.encode_text(self.tokenizer([""]).to(self.device)).shape[-1])

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 text embeddings [n, dims], `batch_size` texts at a time (tokenised in this
        process: tokenising costs a fraction of a text forward pass)."""
        import torch

        parts = []
        with torch.inference_mode(), models.autocast(self.device, self.precision), heap_for_tensors():
            for lo in range(0, len(texts), self.batch_size):
                tok = self.tokenizer([t or "" for t in texts[lo:lo + self.batch_size]]).to(self.device)
                parts.append(self.model.encode_text(tok, normalize=True).float().cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, self.dims), np.float32)

    def encode_images(self, read, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(L2-normalised float32 image embeddings [n, dims], ok [n] (decoded), present [n] (had bytes)) for rows
        0..n-1 whose bytes `read(lo, hi)` returns (a list: bytes, or None for a row without an image). Bytes are
        read here READ_GROUP_ROWS rows at a time (memory bounded by a group), decoded in `num_workers` DataLoader
        workers (0: here), and moved through pinned memory on CUDA."""
        import torch

        dims = self.dims
        out = np.zeros((n, dims), np.float32)
        ok = np.zeros(n, bool)
        present = np.zeros(n, bool)
        cuda = self.device.type == "cuda"
        with torch.inference_mode(), models.autocast(self.device, self.precision), heap_for_tensors():
            for lo in range(0, n, READ_GROUP_ROWS):
                blobs = read(lo, min(n, lo + READ_GROUP_ROWS))
                at = lo + np.array([i for i, b in enumerate(blobs) if b is not None], dtype=np.int64)
                if len(at) == 0:
                    continue
                present[at] = True
                data = _Images([blobs[i - lo] for i in at], self.preprocess, self.size, self.fast)
                workers = min(self.num_workers, -(-len(at) // self.batch_size))
                loader = torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=False,
                                                     num_workers=workers, pin_memory=cuda,
                                                     prefetch_factor=4 if workers else None)
                pos = 0
                for x, good in loader:
                    x = x.to(self.device, non_blocking=cuda)
                    if self.fast is not None:
                        x = self.fast.normalize(x)
                    rows = at[pos:pos + len(x)]
                    out[rows] = self.model.encode_image(x, normalize=True).float().cpu().numpy()
                    ok[rows] = good.numpy().astype(bool)
                    pos += len(x)
        out[~ok] = 0
        return out, ok, present

    def forward(self, x, tokens):
        """Cosine per pair for a ready batch (the bare model cost the benchmark compares against)."""
        import torch

        with torch.inference_mode(), models.autocast(self.device, self.precision):
            fi = self.model.encode_image(x, normalize=True)
            ft = self.model.encode_text(tokens, normalize=True)
            return (fi.float() * ft.float()).sum(dim=-1)

    def score(self, images: list, texts: list[str]) -> np.ndarray:
        import torch

        out = np.full(len(texts), np.nan, dtype=np.float32)
        idx = np.array([i for i, b in enumerate(images) if b is not None], dtype=np.int64)
        if len(idx) == 0:
            return out
        ds = _PairsForScoring([images[i] for i in idx], [texts[i] for i in idx], self.preprocess, self.tokenizer,
                              self.size, self.fast)
        cuda = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=cuda,
            prefetch_factor=4 if self.num_workers else None,
        )
        pos = 0
        with heap_for_tensors():
            for x, tok, ok in loader:
                x = x.to(self.device, non_blocking=cuda)
                if self.fast is not None:
                    x = self.fast.normalize(x)
                s = self.forward(x, tok.to(self.device, non_blocking=cuda)).cpu().numpy()
                s[~ok.numpy().astype(bool)] = np.nan
                out[idx[pos : pos + len(s)]] = s
                pos += len(s)
        return out
