"""heads: user-supplied classifier heads (aesthetic, NSFW, watermark...) over the run's stored embeddings.

Config    one `[heads.NAME]` table per head (NAME: a letter, then letters, digits or `_`, at most 40):
              path = "aesthetic.safetensors"   the head's weights (required; a path the user gives)
              on = "image"                     its input: "image", "text" or "pair" (default "image")
              threshold = 5.0                  the cut (leave it out: the head only scores, drops nothing)
              drop = "below"                   with a threshold: "above" drops output > threshold, "below" drops
                                               output < threshold (no default: say which)
              activation = "sigmoid"           optional: "none" | "sigmoid" on the output (default: the file's
                                               metadata, else "none")
              hidden = "relu"                  optional: "relu" | "none" between layers (default: the file's
                                               metadata, else "relu")
          `[heads] model / pretrained / checkpoint`: the network whose vectors the heads read; all empty (the
          default): the run's embedding network ([embed]'s, else [dfn]'s: trainer.embed.run_network_config), so the
          heads read the vectors embed stored. `device`, `precision`, `batch_size`, `num_workers`: for embedding the
          rows the store lacks (as embed's). A bad head table is a one-line ConfigError naming `[heads.NAME]`.
Head      a linear layer or a small MLP in safetensors, read with safetensors' numpy loader and applied in numpy
          batches (no torch): `layers.<i>.weight` [out, in] / `layers.<i>.bias` [out], ReLU between layers unless
          `hidden = "none"`, one output value (trainer/heads.py has the format; `clipcurate train-head` writes one).
Input     the row's stored vectors as stored (L2-normalised float16, computed in float32): the image vector, the
          text vector, or for `on = "pair"` their concatenation [image, text] (2 x dims wide). A head whose input
          width is not that is a one-line StageError naming the head, its file, the width it takes and the
          width given.
Output    a float32 column `head_NAME` per head, on kept and rejected rows alike; null where the head was not
          applied: a row without an image vector (no bytes, bytes that do not decode) for an "image" or "pair"
          head. Such a row is kept by that head (it cannot judge it: dfn's `no_image` / align's rules name it).
Reasons   `head:NAME`: the head's output is past its threshold on the `drop` side (NaN never is). A row that
          several heads drop names the first head in name order.
Cost      no model pass for rows the embedding store holds (DESIGN principle 4): found by uid in
          runs/NAME/embeddings/<model-id>/ (trainer.embed.RunVectors); rows it lacks are embedded with the
          network and stored, as embed would. A new threshold reruns only numpy over stored vectors.
Identity  the step's fingerprint holds each head file's sha256 (a new file behind the same path redoes the step)
          and the network's identity; the preflight checks each file's header (exists, a chain of linear layers
          ending in 1 value, and its input width against the store's vectors when the store exists).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from pipeline import shards
from pipeline.config import ConfigError, check_ranges
from pipeline.context import ShardContext
from pipeline.errors import StageError
from pipeline.rules import Facts, Rule, judge, split_by_reason
from pipeline.stage import Stage

log = logging.getLogger("clipcurate.heads")

INPUTS = ("image", "text", "pair")
DROPS = ("above", "below")
HEAD_KEYS = ("path", "on", "threshold", "drop", "activation", "hidden")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")  # becomes a column name and a reason: kept plain


class HeadFacts(Facts):
    """What the heads' rules read: per head, (its outputs, which rows it scored)."""

    FIELDS = ("outputs",)


@dataclasses.dataclass(frozen=True)
class HeadThreshold(Rule):
    """`head:NAME`: a head's output above (or below) its threshold; rows the head could not score (no vector)
    are never dropped by it."""
    name: str
    head: str
    threshold: float
    drop: str  # "above" | "below"
    needs = ("outputs",)

    def mask(self, f) -> np.ndarray:
        out, applied = f.outputs[self.head]
        with np.errstate(invalid="ignore"):
            return applied & ((out > self.threshold) if self.drop == "above" else (out < self.threshold))


class HeadSpec(NamedTuple):
    """One `[heads.NAME]` table, checked."""

    name: str
    path: str
    on: str = "image"
    threshold: float | None = None
    drop: str = ""
    activation: str = ""
    hidden: str = ""

    @property
    def column(self) -> str:
        return f"head_{self.name}"

    @property
    def reason(self) -> str:
        return f"head:{self.name}"

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("image", "text") if self.on == "pair" else (self.on,)


def head_spec(name: Any, table: Any) -> HeadSpec:
    """`[heads.NAME]` as a HeadSpec; ConfigError in one line naming the table."""
    where = f"config [heads.{name}]"
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"config [heads.{str(name)[:40]}]: a head's name is a letter, then letters, digits or "
                          "'_' (at most 40): it names the column head_NAME and the reason head:NAME")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table (path = \"....safetensors\", on, threshold, drop)")
    unknown = sorted(set(table) - set(HEAD_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(HEAD_KEYS)})")
    path = table.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: path = \"....safetensors\" is missing (the head's weights file)")
    on = table.get("on", "image")
    if on not in INPUTS:
        raise ConfigError(f"{where} on = {on!r:.40}: give \"image\", \"text\" or \"pair\"")
    threshold = table.get("threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ConfigError(f"{where} threshold = {threshold!r:.40}: give a finite number")
        threshold = float(threshold)
    drop = table.get("drop", "")
    if threshold is not None and drop not in DROPS:
        raise ConfigError(f"{where} drop = {drop!r:.40}: with a threshold, give drop = \"above\" (drop output > "
                          "threshold) or \"below\" (drop output < threshold)")
    if threshold is None and drop:
        raise ConfigError(f"{where} drop = {drop!r:.40} without a threshold: give threshold = the cut")
    for key, allowed in (("activation", ("none", "sigmoid")), ("hidden", ("relu", "none"))):
        v = table.get(key, "")
        if v != "" and v not in allowed:
            raise ConfigError(f"{where} {key} = {v!r:.40}: give {' or '.join(repr(a) for a in allowed)}")
    return HeadSpec(name, path, on, threshold, drop, table.get("activation", ""), table.get("hidden", ""))


class HeadsStage(Stage):
    name = "heads"
    requires = {"uid": pa.string(), "text": pa.string()}
    needs_pixels = True  # only for rows the embedding store lacks (embedded now, as embed would)
    pixels_optional = True  # text heads run on a URL list; image heads leave its rows unjudged (null output)
    speed_keys = frozenset({"batch_size", "num_workers"})

    @dataclasses.dataclass
    class Config:
        heads: dict = dataclasses.field(default_factory=dict)  # NAME -> its [heads.NAME] table
        model: str = ""  # the network whose vectors the heads read; all three empty: the run's embedding network
        pretrained: str = ""
        checkpoint: str = ""
        device: str = "auto"  # for rows the store lacks: auto = cuda when present, else cpu
        precision: str = "auto"
        batch_size: int = 256
        num_workers: int = -1
        # pipeline/config.py: the section's sub-tables `[heads.NAME]` go into the `heads` field
        named_tables = "heads"

        def __post_init__(self):
            check_ranges("heads", self, batch_size=(1, None), num_workers=(-1, None))
            if not isinstance(self.heads, dict):
                raise ConfigError("config [heads] heads: give one [heads.NAME] table per head")
            self.specs()

        def specs(self) -> list[HeadSpec]:
            """The heads, checked, in name order (the order their reasons take precedence in)."""
            return [head_spec(name, self.heads[name]) for name in sorted(self.heads)]

    def __init__(self, config: Any = None, seed: int = 0):
        super().__init__(config, seed)
        from trainer.embed import RunVectors

        c = self.config
        self.run_vectors = RunVectors("heads", c.model, c.pretrained, c.checkpoint, c.device, c.precision,
                                      c.batch_size, c.num_workers)
        self._loaded: dict[tuple, Any] = {}  # what setup would load: heads by (path, size, mtime)

    @classmethod
    def step_config(cls, section: dict, run_config: dict) -> dict:
        """Empty network keys: the run's embedding network, so the heads read the vectors embed stored."""
        from trainer.embed import run_network_config

        return run_network_config(section, run_config)

    # ---- the heads -------------------------------------------------------------------------------------
    def specs(self) -> list[HeadSpec]:
        return self.config.specs()

    def head(self, spec: HeadSpec):
        """The loaded head (trainer.heads.Head), kept while its file is unchanged."""
        from pipeline import shards
        from trainer import heads as head_files

        fs, p = shards.fs_and_path(spec.path)
        try:
            info = fs.info(p)
        except (FileNotFoundError, OSError):
            raise StageError(f"heads: head '{spec.name}': {spec.path} does not exist") from None
        key = (spec, info.get("size"), str(info.get("mtime") or info.get("LastModified") or ""))
        if key not in self._loaded:
            head, layout = head_files.load(spec.path, f"heads: head '{spec.name}'", spec.hidden, spec.activation)
            said = layout.metadata.get("on")
            if said and said != spec.on:
                raise StageError(f"heads: head '{spec.name}': {spec.path} was made for on = \"{said}\", "
                                 f"[heads.{spec.name}] says on = \"{spec.on}\"")
            self._loaded[key] = head
        return self._loaded[key]

    def fingerprint_parts(self, ctx: ShardContext | None = None) -> dict:
        from pipeline import shards
        from trainer.models import file_digest

        files = {}
        for spec in self.specs():
            files[spec.name] = {"sha256": file_digest(spec.path)} if shards.exists(spec.path) else {"path": spec.path}
        return {"heads": files, "network": self.run_vectors.fingerprint(ctx)}

    def preflight(self, ctx: ShardContext) -> list[str]:
        """Each head file exists and is a head (its header only), of the store's width when the store exists;
        the network loads offline (trainer.embed.RunVectors.preflight)."""
        from trainer import heads as head_files

        specs = self.specs()
        if not specs:
            return ["no heads configured: add a [heads.NAME] table with path = \"....safetensors\", on, threshold "
                    "and drop (docs/semdedup-and-heads.md \"Heads over embeddings\")"]
        store = self.run_vectors.network.stored(ctx.run_dir) if ctx.run_dir else None
        problems = []
        for spec in specs:
            try:
                layout = head_files.read_layout(spec.path, f"head '{spec.name}'")
            except StageError as e:
                problems.append(str(e))
                continue
            if store is not None and store.dims and layout.in_dims != _width(spec.on, store.dims):
                problems.append(_mismatch(spec, layout.in_dims, store.dims).removeprefix("heads: "))
        return problems + self.run_vectors.preflight(ctx)

    # ---- contract --------------------------------------------------------------------------------------
    def apply(self, table: pa.Table, stats, ctx: ShardContext | None = None) -> tuple[pa.Table, pa.Table]:
        ctx = ctx or self.detached()
        specs = self.specs()
        if not specs:
            raise StageError("heads: no heads configured: add a [heads.NAME] table with path = \"....safetensors\"")
        n = table.num_rows
        loaded = [(spec, self.head(spec)) for spec in specs]
        vectors = self._vectors(table, ctx, {k for spec in specs for k in spec.kinds}) if n else {}
        rules, outputs = [], {}
        for spec, head in loaded:
            out, applied = self._score(spec, head, vectors, n)
            col = pa.array(out, pa.float32(), mask=~applied)
            if spec.column in table.column_names:  # a second heads step: its own output
                table = table.set_column(table.column_names.index(spec.column), spec.column, col)
            else:
                table = table.append_column(spec.column, col)
            outputs[spec.name] = (out, applied)
            if spec.threshold is not None:
                rules.append(HeadThreshold(spec.reason, spec.name, spec.threshold, spec.drop))
            if n and not applied.all():
                ctx.note(f"heads: rows without an {'image vector' if spec.on != 'text' else 'text vector'} are kept "
                         f"unjudged by head '{spec.name}' (head_{spec.name} null)")
        return split_by_reason(table, judge(rules, HeadFacts(n, outputs=outputs), n)[0])

    # ---- report -----------------------------------------------------------------------------------------------
    def report(self, stage_dir: str, out_dir: str) -> dict:
        """Per head: what it reads, its rule, the rows it judged and dropped, and its output's quantiles over
        the kept and the dropped rows (where a threshold sits against what the head gives this pool)."""
        from pipeline.report import Table

        man = shards.read_json(shards.join(stage_dir, "_manifest.json")) or {}
        reasons = man.get("reasons", {})
        kept, gone = _outputs(stage_dir), _outputs(shards.join(stage_dir, "rejected"))
        q = [0.1, 0.5, 0.9]
        rows = []
        for spec in self.specs():
            k, d = kept.get(spec.column, np.zeros(0)), gone.get(spec.column, np.zeros(0))
            both = np.concatenate([k, d])
            rule = (f"drop {spec.drop} {spec.threshold:g}" if spec.threshold is not None else "score only")
            rows.append([spec.name, spec.on, rule, len(both), reasons.get(spec.reason, 0)]
                        + [f"{np.quantile(both, x):.3f}" if len(both) else "" for x in q])
        return {"figures": [], "tables": [Table(
            "heads: each head's rule, rows judged and dropped, and its output over the rows it judged",
            ["head", "on", "rule", "judged", "dropped", "output 10%", "50%", "90%"], rows)]}

    def _vectors(self, table: pa.Table, ctx: ShardContext, kinds: set[str]) -> dict:
        """The rows' stored vectors of each kind the heads read (one store lookup per kind)."""
        from pipeline.images import REF_COL

        store = self.run_vectors.store(ctx)
        out = {}
        for kind in sorted(kinds):
            if kind == "image" and REF_COL not in table.column_names and "image" not in table.column_names:
                out[kind] = None  # a URL list: no images to judge
                continue
            got = self.run_vectors.vectors(table, ctx, kind, store)
            out[kind] = (got.vectors, got.found)
        return out

    def _score(self, spec: HeadSpec, head, vectors: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32 output per row, NaN where not applied; whether the head was applied to the row)."""
        out = np.full(n, np.nan, np.float32)
        parts = [vectors.get(k) for k in spec.kinds]
        if n == 0 or any(p is None for p in parts):
            return out, np.zeros(n, bool)
        dims = parts[0][0].shape[1]
        if head.in_dims != _width(spec.on, dims):
            raise StageError(_mismatch(spec, head.in_dims, dims))
        applied = np.logical_and.reduce([found for _, found in parts])
        if applied.any():
            x = np.concatenate([v[applied] for v, _ in parts], axis=1) if len(parts) > 1 else parts[0][0][applied]
            out[applied] = head(x)
        return out, applied


def _outputs(folder: str) -> dict[str, np.ndarray]:
    """Each `head_*` column's non-null values (float64) over a folder's shards; {} for a folder that does not exist."""
    vals: dict[str, list] = {}
    for p in shards.list_shards(folder) if shards.exists(folder) else []:
        cols = [c for c in shards.read_schema(p).names if c.startswith("head_")]
        if cols:
            t = shards.read_shard(p, columns=cols)
            for c in cols:
                v = t.column(c).drop_null()
                vals.setdefault(c, []).append(np.asarray(v.to_numpy(zero_copy_only=False), np.float64))
    return {c: np.concatenate(v) for c, v in vals.items()}


def _width(on: str, dims: int) -> int:
    return 2 * dims if on == "pair" else dims


def _mismatch(spec: HeadSpec, takes: int, dims: int) -> str:
    given = (f"{2 * dims} ([image, text], {dims} each)" if spec.on == "pair" else f"{dims}")
    return (f"heads: head '{spec.name}' ({spec.path}) takes {takes}-d input, the run's {spec.on} vectors give "
            f"{given}: a head made for another network's embeddings")


STAGE = HeadsStage
