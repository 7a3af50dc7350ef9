"""Zero-shot evaluation of a CLIP checkpoint on held-out Parquet sets.

Two kinds, told apart by columns:
  classification  `image` + `label` (class name, string) [+ `label_id`]: class names -> prompt templates ->
                  mean normalised text embedding per class (open_clip's build_zero_shot_classifier);
                  top-1 / top-5 accuracy of image-to-class cosine. Class order: `classnames.txt` next to the
                  Parquet file when present (line i = label_id i), else by label_id, else sorted names.
  retrieval       `image` + `captions` (list<string>): recall@1/5/10 image->text (any of its captions in the
                  top k) and text->image (its image in the top k), as in CLIP's Flickr/COCO protocol.
The metric functions take embeddings, so they are checked by hand on tiny fixed cases in the tests.

K-LITE prompts (arXiv 2204.09222, K-LITE's other half). With `klite` on for a classification set, the set is
scored twice with the same image embeddings: with the plain templates (the top-level figures, unchanged) and
with K-LITE's knowledge prompts `"{template} ; {class} , {definition}"` (under `klite`), each class name's
definition being its WordNet gloss (metadata.glosses.class_gloss: the lookup the klite stage uses for
captions). A class WordNet does not know keeps its plain prompts. Retrieval sets have no class names: `klite`
does not apply to them. An eval set is a path, or a table `{path = "...", klite = true}` in `[train] eval_sets`;
`[train] klite_eval` (or `clipcurate eval --klite`) turns it on for the sets that do not say.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq

from trainer import models
from trainer.config import DEFAULT_TEMPLATES


class EvalError(ValueError):
    """An eval set that cannot be used. str() is one line."""


# ---- metrics on embeddings (pure) ---------------------------------------------------------------
def topk_accuracy(logits, labels, ks=(1, 5)) -> dict[str, float]:
    """logits [N, C], labels [N] -> {"top1": .., "top5": ..} (k capped at C)."""
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    out = {}
    order = logits.argsort(dim=1, descending=True)
    for k in ks:
        kk = min(k, logits.shape[1])
        hit = (order[:, :kk] == labels[:, None]).any(dim=1)
        out[f"top{k}"] = float(hit.float().mean()) if len(labels) else 0.0
    return out


def per_class_top1(logits, labels, names: list[str]) -> dict[str, float]:
    """{class name: top-1 accuracy on its images} for the classes that have images (head vs tail, per class)."""
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    hit = (logits.argmax(dim=1) == labels).float() if len(labels) else torch.zeros(0)
    return {names[c]: float(hit[labels == c].mean()) for c in range(len(names)) if bool((labels == c).any())}


def retrieval_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10)) -> dict[str, float]:
    """image_emb [I, D], text_emb [T, D] (normalised), text_to_image [T] = index of each text's image.

    image->text R@k: share of images with at least one of their texts among their k nearest texts;
    text->image R@k: share of texts whose image is among their k nearest images.
    """
    import torch

    img = torch.as_tensor(image_emb, dtype=torch.float32)
    txt = torch.as_tensor(text_emb, dtype=torch.float32)
    t2i = torch.as_tensor(text_to_image, dtype=torch.long)
    sim = img @ txt.T  # [I, T]
    out = {}
    pos = torch.zeros_like(sim, dtype=torch.bool)
    pos[t2i, torch.arange(len(t2i))] = True
    i_order = sim.argsort(dim=1, descending=True)  # texts per image
    t_order = sim.T.argsort(dim=1, descending=True)  # images per text
    for k in ks:
        ki, kt = min(k, sim.shape[1]), min(k, sim.shape[0])
        out[f"image_to_text_R@{k}"] = float(pos.gather(1, i_order[:, :ki]).any(dim=1).float().mean())
        out[f"text_to_image_R@{k}"] = float((t_order[:, :kt] == t2i[:, None]).any(dim=1).float().mean())
    return out


# ---- embedding -------------------------------------------------------------------------------------
def embed_images(model, preprocess, images: list[bytes], device, precision="fp32", batch_size=256):
    import torch

    from trainer.data import decode_image

    feats = []
    for i in range(0, len(images), batch_size):
        size = models.image_size(model)
        x = torch.stack([preprocess(decode_image(b, size)) for b in images[i : i + batch_size]]).to(device)
        with torch.inference_mode(), models.autocast(device, precision):
            feats.append(model.encode_image(x, normalize=True).float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 1)


def embed_texts(model, tokenizer, texts: list[str], device, precision="fp32", batch_size=256):
    import torch

    feats = []
    for i in range(0, len(texts), batch_size):
        tok = tokenizer(texts[i : i + batch_size]).to(device)
        with torch.inference_mode(), models.autocast(device, precision):
            feats.append(model.encode_text(tok, normalize=True).float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 1)


def class_prompts(classnames: list[str], templates: list[str], glosses: dict | None = None) -> list[list[str]]:
    """Per class, its prompts: `template.format(class)`, or K-LITE's `"{template} ; {class} , {gloss}"` when
    `glosses` gives the class a gloss."""
    from metadata.glosses import klite_prompt

    if glosses is None:
        return [[t.format(c) for t in templates] for c in classnames]
    return [[klite_prompt(t, c, glosses.get(c)) for t in templates] for c in classnames]


def class_embeddings(model, tokenizer, classnames: list[str], templates: list[str], device, precision="fp32",
                     glosses: dict | None = None):
    """[C, D]: per class, the normalised mean of its normalised prompt embeddings (K-LITE prompts when
    `glosses` is given: see class_prompts)."""
    import torch

    texts = [p for ps in class_prompts(classnames, templates, glosses) for p in ps]
    e = embed_texts(model, tokenizer, texts, device, precision).reshape(len(classnames), len(templates), -1)
    e = e.mean(dim=1)
    return e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)


def classnames_for(path: str, table) -> tuple[list[str], np.ndarray]:
    """(class names, label index per row)."""
    labels = table.column("label").to_pylist()
    side = os.path.join(os.path.dirname(os.path.abspath(path)), "classnames.txt")
    if os.path.exists(side):
        names = [l.strip() for l in open(side, encoding="utf-8") if l.strip()]
        if set(labels) <= set(names):
            index = {n: i for i, n in enumerate(names)}
            return names, np.array([index[l] for l in labels])
    if "label_id" in table.column_names:
        ids = table.column("label_id").to_pylist()
        pairs = sorted(set(zip(ids, labels)))
        if len({i for i, _ in pairs}) == len(pairs):
            names = [n for _, n in pairs]
            index = {n: i for i, n in enumerate(names)}
            return names, np.array([index[l] for l in labels])
    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    return names, np.array([index[l] for l in labels])


def kind_of(path: str) -> str:
    cols = pq.read_schema(path).names
    if "image" not in cols:
        raise EvalError(f"{path}: an eval set needs an `image` column (has {', '.join(cols)})")
    if "label" in cols:
        return "classification"
    if "captions" in cols:
        return "retrieval"
    raise EvalError(f"{path}: needs `label` (classification) or `captions` (retrieval) next to `image`")


def eval_specs(sets, klite: bool = False) -> list[tuple[str, bool]]:
    """[(path, klite)] from `[train] eval_sets` entries: a path (klite = the default given), or a table
    {path = "...", klite = true|false}."""
    out = []
    for e in sets or []:
        if isinstance(e, str):
            out.append((e, bool(klite)))
        elif isinstance(e, dict) and isinstance(e.get("path"), str) and set(e) <= {"path", "klite"} \
                and isinstance(e.get("klite", klite), bool):
            out.append((e["path"], bool(e.get("klite", klite))))
        else:
            raise EvalError(f"eval set {e!r}: give a path, or a table {{path = \"...\", klite = true|false}}")
    return out


def glosses_for(names: list[str]) -> dict:
    """{class: WordNet gloss or None}; EvalError (one line) when WordNet is not installed."""
    from metadata.glosses import class_glosses
    from metadata.wordnet import WordNetMissing

    try:
        return class_glosses(names)
    except WordNetMissing as e:
        raise EvalError(f"K-LITE prompts need WordNet: {e}") from None


def evaluate_model(model, preprocess, tokenizer, path: str, device, precision="fp32", templates=None,
                   batch_size: int = 256, klite: bool = False) -> dict:
    """One eval set. With `klite` (classification only), also `klite`: the same figures with K-LITE's
    knowledge prompts, plus `classes_with_gloss` and one example prompt."""
    kind = kind_of(path)
    if kind == "classification":
        t = pq.read_table(path, columns=[c for c in ("image", "label", "label_id") if c in pq.read_schema(path).names])
        names, y = classnames_for(path, t)
        temps = list(templates or DEFAULT_TEMPLATES)
        img = embed_images(model, preprocess, t.column("image").to_pylist(), device, precision, batch_size)
        cls = class_embeddings(model, tokenizer, names, temps, device, precision)
        res = topk_accuracy(img @ cls.T, y)
        out = {"kind": kind, "data": path, "images": len(y), "classes": len(names), **res,
               "per_class_top1": per_class_top1(img @ cls.T, y, names)}
        if klite:
            glosses = glosses_for(names)
            kcls = class_embeddings(model, tokenizer, names, temps, device, precision, glosses=glosses)
            with_gloss = [n for n in names if glosses.get(n)]
            example = class_prompts(with_gloss[:1], temps[:1], glosses)[0][0] if with_gloss else None
            out["klite"] = {**topk_accuracy(img @ kcls.T, y), "classes_with_gloss": len(with_gloss),
                            "prompt_example": example}
        return out
    t = pq.read_table(path, columns=["image", "captions"])
    caps = t.column("captions").to_pylist()
    texts, t2i = [], []
    for i, cs in enumerate(caps):
        for c in cs or []:
            texts.append(c)
            t2i.append(i)
    img = embed_images(model, preprocess, t.column("image").to_pylist(), device, precision, batch_size)
    txt = embed_texts(model, tokenizer, texts, device, precision, batch_size)
    res = retrieval_recall(img, txt, t2i)
    return {"kind": kind, "data": path, "images": len(caps), "texts": len(texts), **res}


def evaluate(checkpoint: str, paths: list, model_name: str = "", device: str = "auto", precision: str = "auto",
             templates=None, batch_size: int = 256, klite: bool = False) -> dict:
    """`paths`: eval set entries (see eval_specs); `klite`: K-LITE prompts too, for the entries that do not say."""
    specs = eval_specs(paths, klite)
    dev = models.pick_device(device)
    prec = models.pick_precision(precision, dev)
    model, pre_val, tokenizer, name = models.load(checkpoint, model_name, dev)
    results = {}
    for p, k in specs:
        results[os.path.splitext(os.path.basename(p))[0]] = evaluate_model(
            model, pre_val, tokenizer, p, dev, prec, templates, batch_size, klite=k
        )
    return {"checkpoint": checkpoint, "model": name, "results": results}
