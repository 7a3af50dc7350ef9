"""K-LITE at evaluation: class-name glosses, the knowledge prompt string, class embeddings by hand, eval sets
that ask for it (config table, `[train] klite_eval`, `eval --klite`) reporting both prompt kinds, and the
ablation's extra row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metadata import wordnet

torch = pytest.importorskip("torch")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tests.test_klite import needs_wordnet  # noqa: E402  the one WordNet skip marker
from tests.test_trainer import world  # noqa: E402,F401  the trainer tests' module-scoped world fixture


def _first_gloss(lemma: str) -> str:
    return wordnet.load().synset(lemma.replace(" ", "_") + ".n.01").definition()


# ---- class name -> gloss -> prompt ------------------------------------------------------------------
def test_prompt_string_by_hand():
    from metadata.glosses import klite_prompt

    assert klite_prompt("a photo of a {}.", "cat", "feline mammal") == "a photo of a cat. ; cat , feline mammal"
    assert klite_prompt("a {}.", "golden retriever", None) == "a golden retriever."  # no gloss: the plain prompt


@needs_wordnet
def test_class_gloss_is_the_first_noun_sense_by_morphy():
    from metadata.glosses import class_gloss, class_glosses

    # WordNet 3.0, read independently through nltk's reader
    assert class_gloss("cat") == ("cat", _first_gloss("cat"))
    assert _first_gloss("cat").startswith("feline mammal usually having thick soft fur")
    assert class_gloss("Golden Retrievers") == ("golden retriever", _first_gloss("golden retriever"))  # morphy plural
    assert class_gloss("square") == ("square", "(geometry) a plane rectangle with four equal sides and four right "
                                               "angles; a four-sided regular polygon")
    assert class_gloss("dark red square") == ("square", _first_gloss("square"))  # unknown whole: the head noun
    assert class_gloss("xyzzq") is None and class_gloss("") is None
    assert class_glosses(["hexagon", "xyzzq"]) == {"hexagon": "a six-sided polygon", "xyzzq": None}


@needs_wordnet
def test_knowledge_prompt_for_a_known_class():
    from trainer.evaluate import class_prompts, glosses_for

    g = glosses_for(["triangle", "xyzzq"])
    assert class_prompts(["triangle", "xyzzq"], ["a photo of a {}.", "a {}."], g) == [
        ["a photo of a triangle. ; triangle , a three-sided polygon", "a triangle. ; triangle , a three-sided polygon"],
        ["a photo of a xyzzq.", "a xyzzq."],
    ]
    assert class_prompts(["triangle"], ["a {}."]) == [["a triangle."]]  # plain


def test_class_embeddings_with_knowledge_prompts_by_hand():
    from trainer.evaluate import class_embeddings

    vecs = {"a cat.": [1.0, 0.0], "a dog.": [0.0, 1.0],
            "a cat. ; cat , a small pet": [0.0, 1.0], "a dog.x": [9.0, 9.0]}
    keys = list(vecs)

    class FakeModel:  # "token ids" = the prompt's index in `keys`
        def encode_text(self, tokens, normalize=True):
            e = torch.tensor([vecs[keys[int(t)]] for t in tokens])
            return e / e.norm(dim=1, keepdim=True)

    tokenizer = lambda texts: torch.tensor([keys.index(t) for t in texts])  # noqa: E731
    plain = class_embeddings(FakeModel(), tokenizer, ["cat", "dog"], ["a {}."], "cpu")
    assert torch.allclose(plain, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # cat gets its knowledge prompt, dog (no gloss) keeps the plain one
    kl = class_embeddings(FakeModel(), tokenizer, ["cat", "dog"], ["a {}."], "cpu",
                          glosses={"cat": "a small pet", "dog": None})
    assert torch.allclose(kl, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


def test_eval_specs():
    from trainer.evaluate import EvalError, eval_specs

    assert eval_specs(["a.parquet", {"path": "b.parquet", "klite": True}, {"path": "c.parquet"}]) == [
        ("a.parquet", False), ("b.parquet", True), ("c.parquet", False)]
    assert eval_specs(["a.parquet", {"path": "b.parquet", "klite": False}], klite=True) == [
        ("a.parquet", True), ("b.parquet", False)]
    for bad in ({"klite": True}, {"path": "x", "klite": "yes"}, {"path": "x", "other": 1}, 3):
        with pytest.raises(EvalError):
            eval_specs([bad])


# ---- a real checkpoint: both result sets, the K-LITE one equal to a hand computation -----------------


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    from tests.test_trainer import tiny_cfg
    from trainer.train import train

    out = tmp_path_factory.mktemp("train")
    train(tiny_cfg(steps=4, save_every=4), world["hq"], str(out), progress=False)
    return str(out / "model.pt")


@needs_wordnet
def test_eval_with_klite_reports_both_and_the_klite_figures_are_right(world, checkpoint):
    from metadata.glosses import class_gloss
    from trainer import models
    from trainer.config import DEFAULT_TEMPLATES
    from trainer.data import decode_image
    from trainer.evaluate import evaluate

    sets = [{"path": world["classification"], "klite": True}, world["retrieval"]]
    res = evaluate(checkpoint, sets, device="cpu")["results"]
    plain = evaluate(checkpoint, [world["classification"]], device="cpu")["results"]["classification"]
    cls = res["classification"]
    assert "klite" not in plain and "klite" not in res["retrieval"]  # retrieval: no class prompts
    assert cls["top1"] == plain["top1"] and cls["top5"] == plain["top5"]  # the plain figures are unchanged
    names = [x for x in Path(world["classification"]).with_name("classnames.txt").read_text().split("\n") if x]
    known = [n for n in names if class_gloss(n)]
    assert cls["klite"]["classes_with_gloss"] == len(known) > 0
    assert cls["klite"]["prompt_example"] == f"{DEFAULT_TEMPLATES[0].format(known[0])} ; {known[0]} , {class_gloss(known[0])[1]}"

    # by hand: K-LITE prompts written out here, embedded, averaged, ranked
    model, pre, tok, _ = models.load(checkpoint, device="cpu")
    t = pq.read_table(world["classification"])
    with torch.no_grad():
        size = models.image_size(model)
        img = model.encode_image(torch.stack([pre(decode_image(b, size)) for b in t.column("image").to_pylist()]),
                                 normalize=True).numpy()
        cls_emb = []
        for n in names:
            g = class_gloss(n)
            prompts = [tpl.format(n) + (f" ; {n} , {g[1]}" if g else "") for tpl in DEFAULT_TEMPLATES]
            e = model.encode_text(tok(prompts), normalize=True).numpy().mean(0)
            cls_emb.append(e / np.linalg.norm(e))
    logits = img @ np.stack(cls_emb).T
    labels = np.array([names.index(x) for x in t.column("label").to_pylist()])
    order = np.argsort(-logits, axis=1)
    for k in (1, 5):
        want = float(np.mean([(order[i, :k] == labels[i]).any() for i in range(len(labels))]))
        assert cls["klite"][f"top{k}"] == pytest.approx(want, abs=1e-6)


@needs_wordnet
def test_cli_eval_klite_flag_and_config_write_both(world, checkpoint, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "ev"
    assert main(["eval", "--checkpoint", checkpoint, "--data", world["classification"], "--out", str(out),
                 "--device", "cpu", "--klite"]) == 0
    printed = capsys.readouterr().out
    assert "[plain prompts]" in printed and "[K-LITE prompts;" in printed
    saved = json.loads((out / "eval-classification.json").read_text())
    assert {"top1", "top5"} <= set(saved) and {"top1", "top5", "classes_with_gloss"} <= set(saved["klite"])
    # without the flag: plain only
    assert main(["eval", "--checkpoint", checkpoint, "--data", world["classification"], "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "klite" not in json.loads((out / "eval-classification.json").read_text())
    # per eval set in the config: the run's [train] eval_sets
    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[train]\ndevice = \"cpu\"\neval_sets = [{{path = \"{world['classification']}\", klite = true}}, "
                   f"\"{world['retrieval']}\"]\n")
    assert main(["--runs-dir", str(runs), "eval", "--run", "r", "--config", str(cfg), "--checkpoint", checkpoint]) == 0
    assert "klite" in json.loads((runs / "r" / "train" / "eval-classification.json").read_text())
    assert "klite" not in json.loads((runs / "r" / "train" / "eval-retrieval.json").read_text())


# ---- ablation: the full pipeline with K-LITE prompts is one more row ----------------------------------
def test_ablate_adds_the_klite_prompts_row_for_the_full_pipeline(tmp_path, monkeypatch):
    import trainer.evaluate
    import trainer.train
    from trainer import ablate as ablate_mod

    run = tmp_path / "run"
    for name, n in {"03_klite": 6, "04_dfn": 4}.items():
        d = run / name
        d.mkdir(parents=True)
        pq.write_table(pa.table({"uid": [f"{i:032x}" for i in range(n)]}), d / "part-00000.parquet")
        (d / "_manifest.json").write_text("{}")
    asked = []

    def fake_train(tc, data, out, resume):
        os.makedirs(out, exist_ok=True)
        return {"model_path": json.dumps([os.path.basename(data), tc.seed]), "last_loss": 1.0}

    def fake_eval(model_path, sets, klite=False, **kw):
        stage, seed = json.loads(model_path)
        asked.append((stage, klite))
        r = {"kind": "classification", "top1": 0.1 + seed / 10, "top5": 0.5}
        if klite:
            r["klite"] = {"top1": 0.2 + seed / 10, "top5": 0.6, "classes_with_gloss": 3}
        return {"results": {"shapes": r, "ret": {"kind": "retrieval", "image_to_text_R@1": 0.3, "text_to_image_R@1": 0.1,
                                                 "image_to_text_R@5": 1.0, "text_to_image_R@5": 1.0}}}

    monkeypatch.setattr(trainer.train, "train", fake_train)
    monkeypatch.setattr(trainer.evaluate, "evaluate", fake_eval)
    res = ablate_mod.ablate(str(run), {"train": {"eval_sets": ["x.parquet"], "seed": 0}}, steps=5, seeds=[0, 1])
    assert [r["variant"] for r in res["variants"]] == ["+ klite", "+ dfn", "+ dfn, K-LITE prompts"]
    assert sorted(asked) == [("03_klite", False)] * 2 + [("04_dfn", True)] * 2  # K-LITE prompts: the full pipeline
    dfn, kl = res["variants"][1], res["variants"][2]
    assert dfn["shapes top1"] == pytest.approx(0.15) and kl["shapes top1"] == pytest.approx(0.25)
    assert kl["std"]["shapes top1"] == pytest.approx(np.std([0.2, 0.3], ddof=1))
    assert kl["pairs"] == 4 and kl["prompts"] == "klite" and "ret R@1" not in kl
    assert "| + dfn, K-LITE prompts | 4 | 5 | 0.250 ± 0.071 | 0.600 ± 0.000 |  |  |" in res["table_md"]
