"""`[train]` section of the run config (pipeline/config.py validates a file against these defaults)."""

from __future__ import annotations

import dataclasses

from pipeline.config import check_ranges

DFN_MODEL_DIR = "dfn_model"  # runs/NAME/dfn_model/model.pt: where `dfn-train` writes, where dfn looks by default

DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
]


@dataclasses.dataclass
class TrainConfig:
    model: str = "clipcurate-tiny"  # a tiny config of trainer/models.py, or any open_clip model name
    data: str = ""  # training set: Parquet file/folder or WebDataset tars; "" = the run's emit folder
    steps: int = 1000  # optimizer steps (the schedule is in steps; epochs follow from the set size)
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1  # not on gains, biases, embeddings' scale (open_clip's rule)
    warmup: int = 50
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 0.0  # max grad norm; 0 = off
    klite_prob: float = 0.5  # per sample: use `text_klite` (when present) with this probability
    augment: bool = True  # open_clip's training transform (random resized crop), seeded per sample
    seed: int = 0
    device: str = "auto"  # auto = cuda when present, else cpu
    precision: str = "auto"  # auto = amp_bf16 / amp_fp16 on GPU, fp32 on CPU; or fp32, amp_bf16, amp_fp16
    workers: int = 2  # DataLoader worker processes (decode + transform); 0 = in the training process
    save_every: int = 250  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2  # older step checkpoints are deleted (each holds the optimizer: ~100 MB tiny)
    log_every: int = 10  # metrics.jsonl line every N steps (and the last step)
    eval_sets: list = dataclasses.field(default_factory=list)  # Parquet eval sets run after training: a path,
    # or a table {path = "...", klite = true} (K-LITE prompts for that set)
    klite_eval: bool = False  # zero-shot classification also with K-LITE's knowledge prompts (sets that do not say)
    templates: list = dataclasses.field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    eval_batch_size: int = 256

    def __post_init__(self):
        check_ranges("train", self, steps=(0, None), batch_size=(1, None), lr=(0, None), weight_decay=(0, None),
                     warmup=(0, None), grad_clip=(0, None), klite_prob=(0, 1), workers=(0, None),
                     save_every=(1, None), keep_checkpoints=(1, None), log_every=(1, None), eval_batch_size=(1, None))
