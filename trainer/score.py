"""Batched image-text cosine under a CLIP model: what the dfn stage (and its benchmark) calls.

A DataLoader decodes images and tokenises texts (in worker processes when `num_workers` > 0, with pinned
memory on CUDA); the model runs under inference mode, with bf16/fp16 autocast on a GPU. Rows whose image
is missing or cannot be decoded get NaN (the stage turns NaN into a null score).
"""

from __future__ import annotations

import numpy as np

from trainer import models
from trainer.data import decode_image


class _PairsForScoring:
    def __init__(self, images, texts, preprocess, tokenizer, size: int):
        self.images, self.texts = images, texts
        self.preprocess, self.tokenizer, self.size = preprocess, tokenizer, size

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i):
        import torch

        ok = True
        try:
            x = self.preprocess(decode_image(self.images[i], self.size))
        except Exception:  # truncated or not an image: scored NaN, never a crash
            x, ok = torch.zeros(3, self.size, self.size), False
        return x, self.tokenizer([self.texts[i] or ""])[0], ok


class Scorer:
    """Loads a checkpoint once; `score(images, texts)` -> float32 cosines (NaN: no / bad image)."""

    def __init__(self, checkpoint: str, model_name: str = "", device: str = "auto", precision: str = "auto",
                 batch_size: int = 256, num_workers: int = 0):
        self.device = models.pick_device(device)
        self.precision = models.pick_precision(precision, self.device)
        self.model, self.preprocess, self.tokenizer, self.model_name = models.load(checkpoint, model_name, self.device)
        self.size = models.image_size(self.model)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)

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
        ds = _PairsForScoring([images[i] for i in idx], [texts[i] for i in idx], self.preprocess, self.tokenizer, self.size)
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
        for x, tok, ok in loader:
            s = self.forward(x.to(self.device, non_blocking=cuda), tok.to(self.device, non_blocking=cuda)).cpu().numpy()
            s[~ok.numpy().astype(bool)] = np.nan
            out[idx[pos : pos + len(s)]] = s
            pos += len(s)
        return out
