"""One way to write a rule, for every stage that rejects rows.

A rule is a small class: its `name` is the reason a row that breaks it is rejected with, `needs` names the facts
its vectorised `mask(facts)` reads (attributes of the object the stage keeps its facts in: a `Facts` below, as
align's `RowFeatures`, or any object with those attributes), and `mask` is True where a row breaks it. A fact that is None means
the pool has no data for it (a text-only pool has no pixels): the rule is skipped, and said so unless `quiet`.
A configuration turns a rule off through `on`. A stage keeps its rules in one ordered list; `judge` names, per
row, the first rule the row breaks, and the stage's reasons are the list's names (`reasons`), so adding a rule
is one class, one list entry and the config field it reads (the pattern of datatrove's filters, vectorised).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class Rule:
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    quiet: ClassVar[bool] = False  # skipped without a note (a rule that exists only in some pools, by design)

    @property
    def on(self) -> bool:
        """False when the configuration turns the rule off."""
        return True

    def has_data(self, facts) -> bool:
        return all(getattr(facts, k) is not None for k in self.needs)

    def mask(self, facts) -> np.ndarray:
        raise NotImplementedError


def provides(*names: str) -> Callable:
    """Marks a `Facts` method as the provider of the facts `names`: it returns their values, one per name (a
    provider may compute several at once: a lookup's values and their index)."""
    def mark(fn: Callable) -> Callable:
        fn.provides = names
        return fn
    return mark


class Facts:
    """What a stage's rules read, by name. A fact given when the object is made is that value; a fact not given
    is computed by its provider (`@provides`) the first time a rule (or anyone) reads it, and kept; a fact with
    neither is None: no data in this pool, and a rule that needs it is skipped. So the rules pay for the facts
    the rules that are on read, no more, and a rule over a new fact adds one provider method, not a line in a
    function that computes every fact. `FIELDS` names the facts that may be given (a misspelt name is an error)."""

    FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, n: int | None = None, **given: Any):
        unknown = set(given) - set(self.FIELDS) - set(self._providers())
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown facts {sorted(unknown)}")
        self.n = n
        self.__dict__.update(given)

    @classmethod
    def _providers(cls) -> dict[str, Callable]:
        got = cls.__dict__.get("_provider_map")
        if got is None:
            got = {}
            for klass in reversed(cls.__mro__):  # a subclass's provider wins
                for fn in vars(klass).values():
                    for name in getattr(fn, "provides", ()):
                        got[name] = fn
            cls._provider_map = got
        return got

    def __getattr__(self, name: str) -> Any:  # only for a fact not set yet
        if name.startswith("__"):
            raise AttributeError(name)
        fn = self._providers().get(name)
        if fn is None:
            if name in self.FIELDS:
                return None
            raise AttributeError(f"{type(self).__name__} has no fact {name!r}")
        values = fn(self)
        for k, v in zip(fn.provides, values if len(fn.provides) > 1 else (values,)):
            self.__dict__.setdefault(k, v)  # a fact given when made wins
        return self.__dict__[name]


def reasons(rules) -> list[str]:
    """The reasons a list of rules (classes or instances) gives, in its order."""
    return [r.name for r in rules]


def judge(rules: Sequence[Rule], facts, n: int) -> tuple[pa.Array, list[str]]:
    """(reason per row: the name of the first rule it breaks, in list order, else null; the names of the rules
    that are on but have no data in this pool, quiet ones left out)."""
    masks, skipped = [], []
    for r in rules:
        m = None
        if r.on and r.has_data(facts):
            m = r.mask(facts)
        elif r.on and not r.quiet:
            skipped.append(r.name)
        masks.append((r.name, m))
    return first_reason(n, masks), skipped


def first_reason(n: int, rules: list[tuple[str, np.ndarray | None]]) -> pa.Array:
    """Reason per row = name of the first rule (in list order) whose boolean mask is True; else null."""
    names = np.array([r for r, _ in rules] + [None], dtype=object)
    idx = np.full(n, len(rules), dtype=np.int64)
    for i in range(len(rules) - 1, -1, -1):
        mask = rules[i][1]
        if mask is not None:
            idx[np.asarray(mask, dtype=bool)] = i
    return pa.array(names[idx], type=pa.string())


def split_by_reason(table: pa.Table, reason: pa.Array | np.ndarray | list) -> tuple[pa.Table, pa.Table]:
    """Rows whose reason is null are kept; the others go to `rejected` with their `reason` column."""
    reason = pa.array(reason, type=pa.string()) if not isinstance(reason, (pa.Array, pa.ChunkedArray)) else reason
    keep = pc.is_null(reason)
    kept = table.filter(keep)
    rejected = table.filter(pc.invert(keep)).append_column("reason", pc.filter(reason, pc.invert(keep)))
    return kept, rejected


__all__ = ["Rule", "Facts", "provides", "reasons", "judge", "first_reason", "split_by_reason"]
