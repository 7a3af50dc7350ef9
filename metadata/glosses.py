"""Glosses from WordNet 3.0, offline: the lookup tables the klite stage enriches captions with, and the
gloss of a class name for K-LITE's zero-shot prompts.

Why here. Two users need the same "surface form -> noun lemma -> first-sense gloss" lookup: the klite stage
(captions) and the trainer's zero-shot evaluation (class names). A stage never imports another stage, and
the pipeline spine names no stage, so the lookup cannot live in stages/klite/ if the trainer is to use it.
`metadata/` is already the home of the WordNet reader (wordnet.py) and of the concept lists built from it,
and both the stages and the trainer may import it: so the tables and the class-name lookup live here, and
stages/klite/wordnet.py imports them.

Tables (built once per WordNet install, cached as Parquet under `wordnet.cache_root()/klite/`):
  surfaces  key (normalised tokens joined by one space) -> lemma: every surface form whose morphy result is
            a noun lemma (the lemmas, their inverse-rule plurals, noun.exc's irregular plurals), so a
            lookup in it equals nltk's `morphy(form, "n")`;
  lemmas    lemma -> gloss of `lemma.n.01` (WordNet's most frequent sense) and its first-hypernym chain.

Class names (`class_gloss`, `class_glosses`): the whole name is looked up as klite looks up a caption
n-gram ("golden retrievers" -> golden retriever); when the whole name is unknown, its longest known final
n-gram (the head noun: "dark red square" -> square) gives the gloss. No gloss: the plain prompt is used,
as K-LITE does for a class without knowledge. K-LITE's prompt (`klite_prompt`) is
`"{template} ; {class} , {definition}"`, the class name as given.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

import polars as pl

log = logging.getLogger("clipcurate.glosses")

CACHE_VERSION = "2"

# Python twin of the klite stage's polars token rule (see `tokens`).
_PY_TOKEN_RE = re.compile(r"'s\b|[^\W_]+(?:'[^\W_]+)*")
_PY_POSSESSIVE_RE = re.compile(r"'s\b")

# morphy's noun rules (nltk WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS["n"]), used backwards to
# list every surface form that morphy can map to a lemma.
_NOUN_RULES = [("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
               ("shes", "sh"), ("men", "man"), ("ies", "y")]


def tokens(text: str) -> list[str]:
    """Python twin of the klite stage's caption tokens (stages/klite/wordnet.py `normalise` + TOKEN_RE), for
    WordNet's lemmas (where "_" is a space) and class names."""
    t = _PY_POSSESSIVE_RE.sub(" 's", text.lower().replace("’", "'").replace("_", " "))
    return _PY_TOKEN_RE.findall(t)


# ---- the WordNet tables (built once, cached as Parquet) ---------------------------------------------
def wordnet_signature() -> str:
    """Identity of the installed WordNet files; raises WordNetMissing (one line) when they are absent."""
    from metadata import wordnet

    parts = []
    for f in ("index.noun", "data.noun", "noun.exc"):
        p = Path(wordnet.WORDNET_SRC) / f
        if not p.exists():
            wordnet.prepare_nltk_data()  # raises WordNetMissing with the apt command
        st = p.stat()
        parts.append(f"{f}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256(("|".join(parts) + f"|v{CACHE_VERSION}").encode()).hexdigest()[:16]


def build_tables(wn) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(surfaces, lemmas) from an nltk WordNet reader.

    surfaces: key (normalised tokens joined by one space), lemma (WordNet key, e.g. "golden_retriever")
    lemmas:   lemma, gloss (definition of lemma.n.01), hypernyms (list of lemma names up to the root)
    """
    from metadata import wordnet

    noun_lemmas = sorted(wn.all_lemma_names("n"))
    forms = set(noun_lemmas)
    for lem in noun_lemmas:
        for old, new in _NOUN_RULES:
            if lem.endswith(new):
                forms.add(lem[: len(lem) - len(new)] + old)
    exc = Path(wordnet.WORDNET_SRC) / "noun.exc"
    for line in exc.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.split():
            forms.add(line.split()[0])
    lemma_set = set(noun_lemmas)
    best: dict[str, tuple] = {}
    for form in sorted(forms):
        lem = wn.morphy(form, "n")
        if not lem:
            continue
        toks = tokens(form)
        if not toks:
            continue
        key = " ".join(toks)
        # Several forms can normalise to one key ("t-shirt" / "t shirt"): prefer a form that is itself a
        # lemma, then one whose spelling is the key, then string order. Deterministic.
        rank = (form not in lemma_set, form.replace("_", " ") != key, form)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, lem)
    surfaces = pl.DataFrame(
        {"key": list(best), "lemma": [v[1] for v in best.values()]}, schema={"key": pl.String, "lemma": pl.String}
    ).sort("key")

    used = sorted(set(surfaces["lemma"].to_list()))
    glosses, hypers = [], []
    for lem in used:
        syn = wn.synset(f"{lem}.n.01")
        glosses.append(syn.definition() or "")
        chain, s, seen = [], syn, set()
        while True:
            parents = s.hypernyms() or s.instance_hypernyms()
            if not parents or parents[0].name() in seen:
                break
            s = parents[0]
            seen.add(s.name())
            chain.append(s.lemma_names()[0].replace("_", " "))
        hypers.append(chain)
    lemmas = pl.DataFrame(
        {"lemma": used, "gloss": glosses, "hypernyms": hypers},
        schema={"lemma": pl.String, "gloss": pl.String, "hypernyms": pl.List(pl.String)},
    )
    return surfaces, lemmas


def cached_tables() -> tuple[pl.DataFrame, pl.DataFrame]:
    """The tables from the cache folder, building them (WordNet load, ~30 s) when absent."""
    from metadata import wordnet

    sig = wordnet_signature()
    folder = wordnet.cache_root() / "klite" / f"tables-{sig}"
    if not (folder / "lemmas.parquet").exists():
        log.info("klite: building the WordNet lemma tables once (cached in %s)", folder)
        surfaces, lemmas = build_tables(wordnet.load())
        tmp = folder.parent / f".tmp-{sig}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        surfaces.write_parquet(tmp / "surfaces.parquet")
        lemmas.write_parquet(tmp / "lemmas.parquet")  # written last: its presence means complete
        try:
            os.replace(tmp, folder)
        except OSError:  # another worker finished first: its tables are the same
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "lemmas.parquet").exists():
                raise
    return pl.read_parquet(folder / "surfaces.parquet"), pl.read_parquet(folder / "lemmas.parquet")


# ---- class names -> glosses (zero-shot prompts) ------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _lookup() -> tuple[dict, dict]:
    """(surface key -> lemma, lemma -> gloss) as dicts, once per process (the tables load in well under 1 s)."""
    surfaces, lemmas = cached_tables()
    glosses = {l: g for l, g in zip(lemmas["lemma"].to_list(), lemmas["gloss"].to_list()) if g}
    return dict(zip(surfaces["key"].to_list(), surfaces["lemma"].to_list())), glosses


def class_gloss(name: str) -> tuple[str, str] | None:
    """(concept, gloss) for a class name, or None when WordNet has no noun for it.

    The whole name first ("golden retrievers" -> ("golden retriever", ...)), then its final n-grams, longest
    first (the head noun). Raises wordnet.WordNetMissing (one line) when WordNet is not installed."""
    toks = tokens(name or "")
    surf, glosses = _lookup()
    for start in range(len(toks)):
        lemma = surf.get(" ".join(toks[start:]))
        if lemma and lemma in glosses:
            return lemma.replace("_", " "), glosses[lemma]
    return None


def class_glosses(names: list[str]) -> dict[str, str | None]:
    """{class name: gloss or None} for every name."""
    out = {}
    for n in names:
        g = class_gloss(n)
        out[n] = g[1] if g else None
    return out


def klite_prompt(template: str, classname: str, gloss: str | None) -> str:
    """K-LITE's knowledge prompt: "{template} ; {class} , {definition}"; the plain template without a gloss."""
    text = template.format(classname)
    return f"{text} ; {classname} , {gloss}" if gloss else text
