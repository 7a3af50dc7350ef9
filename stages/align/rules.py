"""align's rules (pipeline/rules.py's idiom): each a small class with its `name` (the rejection reason), the
`RowFeatures` fields it `needs`, and a vectorised `mask(f)`, True where a row breaks it. `RULES` is their order:
a rejected row names the first one it breaks, and `REASONS` is derived from it. What each rule means: the
table in this package's docstring."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from pipeline.rules import Rule, reasons

from .features import RowFeatures


# ---- the reference vocabularies two rules ask --------------------------------------------------------
class ZipfVocabulary:
    """wordfreq's Zipf frequency per word (`language`'s vocabulary), cached: rare_token asks it only about the
    shard's distinct pool-rare words, a Python call each."""

    def __init__(self, language: str):
        self.language = language
        self._seen: dict[str, float] = {}

    def __call__(self, words: list[str]) -> np.ndarray:
        import wordfreq

        out = np.empty(len(words), dtype=np.float64)
        for i, w in enumerate(words):
            z = self._seen.get(w)
            if z is None:
                z = self._seen[w] = wordfreq.zipf_frequency(w, self.language)
            out[i] = z
        return out


class LanguageId:
    """py3langid's language code for one caption (its classifier takes one text at a time); the model loads on
    first use, so a run without the language rule never loads it."""

    def __init__(self):
        self._model = None

    def __call__(self, text: str) -> str:
        if self._model is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._model = LanguageIdentifier.from_pickled_model(MODEL_FILE)
        return self._model.classify(text)[0]


# ---- images -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageUnreadable(Rule):
    """Our own rule, first, so that a bad image never crashes a worker nor reaches the size rules."""
    name = "image_unreadable"
    needs = ("decoded",)
    quiet = True  # only pools that hold images have it

    def mask(self, f: RowFeatures) -> np.ndarray:
        return ~f.decoded


def _known(f: RowFeatures) -> np.ndarray:
    return (f.width > 0) & (f.height > 0)


@dataclasses.dataclass(frozen=True)
class ImageTooSmall(Rule):
    min_side: int
    name = "image_too_small"
    needs = ("width", "height")

    def mask(self, f: RowFeatures) -> np.ndarray:
        return _known(f) & (np.minimum(f.width, f.height) < self.min_side)


@dataclasses.dataclass(frozen=True)
class AspectRatio(Rule):
    max_aspect: float
    name = "aspect_ratio"
    needs = ("width", "height")

    def mask(self, f: RowFeatures) -> np.ndarray:
        lo, hi = np.minimum(f.width, f.height), np.maximum(f.width, f.height)
        with np.errstate(divide="ignore", invalid="ignore"):
            return _known(f) & (hi > self.max_aspect * lo)


# ---- pool-wide counts by image identity (content hash, or url in text-only pools) --------------------
@dataclasses.dataclass(frozen=True)
class ImageManyTexts(Rule):
    """Boilerplate alt-text generators: one image with very many distinct captions."""
    max_texts: int
    name = "image_many_texts"
    needs = ("id_ok", "texts_per_image")

    def mask(self, f: RowFeatures) -> np.ndarray:
        return f.id_ok & (f.texts_per_image > self.max_texts)


@dataclasses.dataclass(frozen=True)
class TextManyImages(Rule):
    """Generic alt-texts ("image", "photo") shared by many images."""
    max_images: int
    name = "text_many_images"
    needs = ("id_ok", "images_per_text")

    def mask(self, f: RowFeatures) -> np.ndarray:
        return f.id_ok & (f.images_per_text > self.max_images)


# ---- text ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TooFewWords(Rule):
    min_words: int
    name = "too_few_words"
    needs = ("nwords",)

    def mask(self, f: RowFeatures) -> np.ndarray:
        return f.nwords < self.min_words


@dataclasses.dataclass(frozen=True)
class TooManyWords(Rule):
    max_words: int
    name = "too_many_words"
    needs = ("nwords",)

    def mask(self, f: RowFeatures) -> np.ndarray:
        return f.nwords > self.max_words


@dataclasses.dataclass(frozen=True)
class RareToken(Rule):
    """A word seen < min_count times in the pool AND unknown to the reference vocabulary (`zipf`: words ->
    Zipf frequencies). The vocabulary is asked only about the pool-rare words, once per distinct word."""
    min_count: int
    min_zipf: float
    zipf: Callable[[list[str]], np.ndarray]
    name = "rare_token"
    needs = ("words", "word_count", "token_row", "token_word")

    def mask(self, f: RowFeatures) -> np.ndarray:
        rare = np.zeros(len(f.words), dtype=bool)
        cand = np.flatnonzero(f.word_count < self.min_count)
        if len(cand):
            rare[cand] = self.zipf(f.words.gather(cand).to_list()) < self.min_zipf
        return np.bincount(f.token_row, weights=rare[f.token_word], minlength=f.n) > 0


# ---- duplicates and decontamination -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExactDuplicate(Rule):
    """Same image and same normalised text as a row with a smaller uid, or another copy of the row's uid is
    the one kept. Every row has a uid: on in every pool."""
    name = "exact_duplicate"
    needs = ("uid", "id_ok", "pair_uid_min", "other_copy_kept")

    def mask(self, f: RowFeatures) -> np.ndarray:
        return f.other_copy_kept | (f.id_ok & (f.pair_uid_min < f.uid))


@dataclasses.dataclass(frozen=True)
class NearDuplicate(Rule):
    """Shares a MinHash-LSH band with a caption of the same image that has a smaller uid."""
    name = "near_duplicate"
    needs = ("uid", "band_uid_min")

    def mask(self, f: RowFeatures) -> np.ndarray:
        return f.band_uid_min < f.uid


@dataclasses.dataclass(frozen=True)
class EvalNearDuplicate(Rule):
    """A decoded image within the index's Hamming distance of an evaluation image; off without an eval set."""
    index: object | None  # images.HammingIndex
    name = "eval_near_duplicate"
    needs = ("decoded", "phash")

    @property
    def on(self) -> bool:
        return self.index is not None

    def mask(self, f: RowFeatures) -> np.ndarray:
        return f.decoded & self.index.near(f.phash)


@dataclasses.dataclass(frozen=True)
class Language(Rule):
    """A non-empty caption `classify` (text -> language code) assigns to another language than `want`;
    off when `want` is ""."""
    want: str
    classify: Callable[[str], str]
    name = "language"
    needs = ("captions",)

    @property
    def on(self) -> bool:
        return bool(self.want)

    def mask(self, f: RowFeatures) -> np.ndarray:
        return np.array([bool(t) and self.classify(t) != self.want for t in f.captions], dtype=bool)


# the order a rejected row names the first rule it breaks in (the stage builds them from its config: _all_rules)
RULES = (ImageUnreadable, ImageTooSmall, AspectRatio, ImageManyTexts, TextManyImages, TooFewWords, TooManyWords,
         RareToken, ExactDuplicate, NearDuplicate, EvalNearDuplicate, Language)
REASONS = reasons(RULES)
