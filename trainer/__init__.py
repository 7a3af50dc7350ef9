"""The bundled CLIP trainer, zero-shot evaluation, and the scorer the dfn stage uses.

  config.py    `TrainConfig`: the `[train]` section of the run config
  models.py    tiny open_clip configs (registered with open_clip.add_model_config), device / precision
               choice, checkpoint files
  data.py      training pairs from Parquet (image bytes) or WebDataset tars; seeded, resumable order;
               per-sample K-LITE text choice
  train.py     the training loop (open_clip's model, tokenizer, transforms, ClipLoss, cosine schedule)
  evaluate.py  zero-shot classification (top-1/top-5) and retrieval (R@1/5/10 both ways)
  score.py     batched image-text cosine (the DFN score)
  cli.py       `clipcurate train`, `clipcurate eval`, `clipcurate dfn-train`

Wrap open_clip_train or our own loop? Our own small loop, built from open_clip's pieces
(create_model_and_transforms, get_tokenizer, ClipLoss, open_clip_train.scheduler.cosine_lr, its weight-decay
and logit-scale-clamp rules). open_clip_train.main can read our WebDataset tars as they are (`--train-data
'.../wds/part-{00000..00003}-000.tar'` with the emit stage's sizes.json), but not what this project needs:
  * Parquet shards with image bytes: its loaders are WebDataset, CSV (image paths) and synthetic only;
  * per-sample K-LITE choice between `text` and `text_klite`: its WebDataset pipeline reads one `txt` key;
  * resume to the same step and loss: it checkpoints per epoch (`--save-most-recent` too) and resumes at the
    next epoch boundary, with a shard/shuffle order that is not a function of the step;
  * a per-step checkpoint cadence, and metrics as JSON lines the report reads.
Each would mean patching its internals (args namespace, get_data, train_one_epoch), a larger and more
fragile surface than the ~200-line loop in train.py, which keeps its style (AdamW without decay on gains and
biases, warmup + cosine schedule, logit scale clamped at 100, autocast + GradScaler for fp16).
Multi-GPU (DDP) is the one thing open_clip_train has that this loop does not; use it directly on the emit
folder's tars for that.
"""
