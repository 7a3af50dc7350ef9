"""WordNet 3.0, offline: Debian's `wordnet-base` + `wordnet-sense-index` files read by nltk's reader.

nltk reads WordNet only from an `nltk_data/corpora/wordnet/` tree and refuses /usr/share/wordnet and
symlinks, and Debian ships the `lexnames` table only as a man page. So we build the tree once (copies,
plus our own `lexnames`) in a cache folder, and load the reader once per process (it takes seconds).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from pipeline.errors import StageError

WORDNET_SRC = Path(os.environ.get("CLIPCURATE_WORDNET_SRC", "/usr/share/wordnet"))
INSTALL_HINT = "sudo apt-get install -y wordnet-base wordnet-sense-index"

# WordNet 3.0's lexicographer files: number, name, syntactic category (1 noun, 2 verb, 3 adj, 4 adv).
LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body
noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive
noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity
noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition
verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion
verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl""".split()
_POS_CODE = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}

_NEEDED = ["data.noun", "index.noun", "data.verb", "index.verb", "data.adj", "index.adj", "data.adv",
           "index.adv", "index.sense", "noun.exc", "verb.exc", "adj.exc", "adv.exc"]
_OPTIONAL = ["cntlist", "cntlist.rev"]


class WordNetMissing(StageError):
    """WordNet files are not installed. str() is one line with the command to run (a StageError: the CLI shows
    it as one line without knowing this module)."""


def lexnames_text() -> str:
    lines = []
    for i, name in enumerate(LEXNAMES):
        code = 3 if name == "adj.ppl" else _POS_CODE[name.split(".")[0]]
        lines.append(f"{i:02d}\t{name}\t{code}")
    return "\n".join(lines) + "\n"


def cache_root() -> Path:
    base = os.environ.get("CLIPCURATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "clipcurate"
    )
    return Path(base)


def not_installed() -> str | None:
    """Why WordNet cannot be read (one line naming the command that installs it), or None: its files are there.
    Looks only (the preflight's check): nothing is copied or loaded."""
    missing = [f for f in _NEEDED if not (WORDNET_SRC / f).exists()]
    if missing:
        return f"WordNet is not installed ({WORDNET_SRC}/{missing[0]} missing): run '{INSTALL_HINT}'"
    return None


def prepare_nltk_data(root: Path | None = None) -> Path:
    """Build (once) nltk_data/corpora/wordnet from the Debian files. Returns the nltk_data folder."""
    why = not_installed()
    if why:
        raise WordNetMissing(why)
    root = root or cache_root() / "nltk_data"
    dest = root / "corpora" / "wordnet"
    stamp = dest / ".complete"
    if stamp.exists():
        return root
    tmp = root / "corpora" / f".wordnet-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in _NEEDED + _OPTIONAL:
        if (WORDNET_SRC / f).exists():
            shutil.copyfile(WORDNET_SRC / f, tmp / f)  # real copies: nltk refuses symlinks
    (tmp / "lexnames").write_text(lexnames_text())
    (tmp / "LICENSE").write_text("WordNet 3.0 license: https://wordnet.princeton.edu/license-and-commercial-use\n")
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(dest, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not stamp.exists():  # another process won the race only if it completed
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return root


@functools.lru_cache(maxsize=1)
def load():
    """nltk's WordNetCorpusReader over the prepared tree; once per process."""
    root = prepare_nltk_data()
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    # nltk only reads corpora under a folder on its data path (a path check since nltk 3.9)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "multilingual functions not available": no OMW, by design
        return WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)
