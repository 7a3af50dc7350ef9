"""Training data: image-text pairs from Parquet (image bytes) or WebDataset tars, in a seeded, resumable order.

Sources (`open_source(path)`):
  Parquet   a file or a folder of `*.parquet` with `image` (bytes) and `text` [+ `text_klite`, `uid`]; the
            columns are held in memory as Arrow buffers (shared copy-on-write with forked DataLoader
            workers): fine for the pools this project trains on locally (a few GB); bigger sets: use tars.
  WebDataset a `.tar` file or a folder of them with `{key}.jpg|png|webp`, `{key}.txt` [+ `{key}.klite.txt`,
            `{key}.json`], as the emit stage writes. The tars are indexed once (member offsets), then
            read by random access, so both formats give the same map-style dataset.
  An emit folder (`runs/NAME/emit`) reads its `parquet-images/` part where there is one, else its `parquet/`
            part: the metadata Parquet, whose `tar` and `member` columns name each sample's image in the
            folder's `wds/` tars (`tar` relative to the emit folder). Its images are read from those tars, a
            tar at a time, into memory as a Parquet part's `image` column is: the same pairs in the same order
            as the Parquet with the bytes that emit wrote before (the same bytes, the Parquet's rows and text).
  Parquet may be on an fsspec URL (s3://bucket/runs/NAME/emit): the columns (and an emit folder's tars, each
            read whole, once) are read into memory once, as locally. Tars given as the training data are read
            from local paths only (random access per sample would be one ranged request each on an object
            store): for a run in a bucket the emit folder's Parquet part is read, and its tars through it.
  A run's stage folder (`runs/NAME/03_klite`): its rows hold `image_ref`, not bytes; the bytes are read from
            the run's image store through pipeline.images' reader.

Order: step k's batch is a slice of a permutation of the set seeded by (seed, epoch) (`StepBatchSampler`):
the order is a pure function of (seed, step), whatever the worker count, and a resumed run starts exactly
at its step without reading the skipped samples. Per sample, the K-LITE choice and the augmentation seed are
pure functions of (uid, seed, epoch) (`pipeline.hashing.uniform`), so resume reproduces them too.
"""

from __future__ import annotations

import glob
import os
import posixpath
import tarfile
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shards
from pipeline.hashing import uniform_of_keys

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
REF_COL = "image_ref"  # pipeline.images.REF_COL: a curation stage's rows name their image in the run's store
# stages.emit's metadata Parquet: each sample's tar (relative to the emit folder) and image member in it
TAR_COL, MEMBER_COL = "tar", "member"
PARQUET_PARTS = ("parquet-images", "parquet")  # an emit folder's Parquet parts, the one with the bytes first


class DataError(ValueError):
    """Training data that cannot be read. str() is one line."""


# ---- sources -------------------------------------------------------------------------------------
class ParquetSource:
    def __init__(self, files: list[str]):
        tables = []
        for f in files:
            cols = _read_schema(f).names
            why = _columns_problem(f, cols)
            if why:
                raise DataError(why)
            by_ref = "image" not in cols and REF_COL in cols
            by_member = "image" not in cols and not by_ref
            want = [c for c in ("uid", "image", REF_COL, TAR_COL, MEMBER_COL, "text", "text_klite") if c in cols]
            t = _read_table(f, want)
            if by_ref:  # a stage's shard of a run: its pixels are in the run's image store
                t = t.append_column("image", _reader_for(f).read(t.column(REF_COL)))
            elif by_member:  # an emit folder's metadata Parquet: its pixels are in the folder's tars
                t = t.append_column("image", _member_bytes(f, t.column(TAR_COL), t.column(MEMBER_COL)))
            for c in ("uid", "text_klite"):
                if c not in t.column_names:
                    t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
            t = t.select(["uid", "image", "text", "text_klite"])
            t = t.cast(pa.schema([("uid", pa.string()), ("image", pa.large_binary()), ("text", pa.string()),
                                  ("text_klite", pa.string())]))
            tables.append(t)
        table = pa.concat_tables(tables) if tables else None
        if table is None or table.num_rows == 0:
            raise DataError("no training rows found")
        import pyarrow.compute as pc

        ok = pc.and_(pc.is_valid(table.column("image")), pc.is_valid(table.column("text")))
        self.skipped = table.num_rows - int(pc.sum(ok).as_py() or 0)
        table = table.filter(ok).combine_chunks()
        self.images = table.column("image").chunk(0) if table.num_rows else pa.array([], pa.large_binary())
        self.texts = table.column("text").to_pylist()
        self.klite = table.column("text_klite").to_pylist()
        uids = table.column("uid").to_pylist()
        self.uids = [u if u is not None else f"row{i}" for i, u in enumerate(uids)]

    def __len__(self) -> int:
        return len(self.texts)

    def get(self, i: int) -> tuple[bytes, str, str | None, str]:
        return self.images[i].as_py(), self.texts[i], self.klite[i], self.uids[i]


def _read_schema(path: str):
    if shards.is_local(path):
        return pq.read_schema(path)
    try:
        return shards.read_schema(path)
    except shards.ShardError as e:
        raise DataError(str(e)) from None


def _read_table(path: str, columns: list[str]):
    if shards.is_local(path):
        return pq.read_table(path, columns=columns)
    try:
        return shards.read_shard(path, columns)
    except shards.ShardError as e:
        raise DataError(str(e)) from None


def _columns_problem(path: str, cols: list[str]) -> str | None:
    """Why a Parquet file is not training data, judged from its column names (one line); None when it is."""
    if "text" in cols and ("image" in cols or REF_COL in cols or {TAR_COL, MEMBER_COL} <= set(cols)):
        return None
    return (f"{path}: training Parquet needs `image` (or `{REF_COL}`, or emit's `{TAR_COL}` and `{MEMBER_COL}`) "
            f"and `text` columns (has {', '.join(cols)})")


def _emit_root(path: str) -> str:
    """The emit folder a metadata Parquet file belongs to (`emit/parquet/part-*.parquet`): its `tar` values are
    relative to it."""
    if shards.is_local(path):
        return os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return posixpath.dirname(posixpath.dirname(path))


def _tar_paths(path: str, tars) -> dict[str, str]:
    """The distinct `tar` values of a metadata Parquet file, each to its path. A value is a path inside the emit
    folder (`wds/part-00000.tar`), never an absolute path or one that climbs out of it."""
    import pyarrow.compute as pc

    root = _emit_root(path)
    out = {}
    for rel in pc.unique(tars).to_pylist():
        if rel is None:
            continue
        norm = posixpath.normpath(rel)
        if posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or not norm.endswith(".tar"):
            raise DataError(f"{path}: `{TAR_COL}` value {rel[:80]!r} is not a .tar inside the emit folder")
        out[rel] = os.path.join(root, *norm.split("/")) if shards.is_local(path) else shards.join(root, norm)
    return out


def _member_bytes(path: str, tars, members) -> pa.Array:
    """The image bytes of a metadata Parquet file's rows, read from the tars they name (each tar read once, whole,
    a tar at a time): aligned with the rows, null where `member` is null (a sample without an image). A tar or a
    member that is not there is a one-line DataError: the emit folder is incomplete."""
    import pyarrow.compute as pc

    tars = tars.combine_chunks() if isinstance(tars, pa.ChunkedArray) else tars
    members = members.combine_chunks() if isinstance(members, pa.ChunkedArray) else members
    out: list = [None] * len(tars)
    want = pc.and_(pc.is_valid(tars), pc.is_valid(members))
    for rel, tar_path in _tar_paths(path, pc.filter(tars, want)).items():
        rows = np.flatnonzero(pc.and_(want, pc.equal(tars, rel)).to_numpy(zero_copy_only=False))
        data = _read_tar_bytes(path, tar_path)
        at = _tar_members(tar_path, data)
        names = pc.take(members, pa.array(rows)).to_pylist()
        for r, name in zip(rows, names):
            where = at.get(name)
            if where is None:
                raise DataError(f"{path}: member {name[:80]!r} is not in {rel} (the emit folder is incomplete: "
                                "rerun emit)")
            out[r] = data[where[0]: where[0] + where[1]]
    return pa.array(out, pa.large_binary())


def _read_tar_bytes(path: str, tar_path: str) -> bytes:
    try:
        return shards.read_bytes(tar_path)
    except (OSError, shards.ShardError) as e:
        raise DataError(f"{path} names {tar_path}, which cannot be read ({' '.join(str(e).split())[:160]}): the emit "
                        "folder's wds/ part is incomplete (rerun emit)") from None


def _tar_members(tar_path: str, data: bytes) -> dict[str, tuple[int, int]]:
    """(offset, size) of every file member of a tar held in memory, by name: one header scan."""
    import io

    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            return {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}
    except tarfile.TarError as e:
        raise DataError(f"{tar_path}: not a readable tar ({e})") from None


def _reader_for(path: str):
    """The image reader of the run a stage's shard belongs to (runs/NAME/NN_stage/part-*.parquet)."""
    from pipeline.images import store_of_folder

    folder = os.path.dirname(os.path.abspath(path)) if shards.is_local(path) else posixpath.dirname(path)
    store = store_of_folder(folder)
    if store is None:
        raise DataError(f"{path}: its rows name their images ({REF_COL}) but no image store is recorded for its run")
    return store.reader()


class TarSource:
    """WebDataset tars read by random access: (tar, offset, size) per member, found by one header scan."""

    def __init__(self, files: list[str]):
        self.files = list(files)
        self.samples: list[tuple[int, tuple, tuple, tuple | None, str]] = []
        self.skipped = 0
        for fi, f in enumerate(self.files):
            groups: dict[str, dict[str, tuple[int, int]]] = {}
            order: list[str] = []
            with tarfile.open(f, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    key, _, ext = base.partition(".")
                    d = os.path.dirname(m.name)
                    key = f"{d}/{key}" if d else key
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext.lower()] = (m.offset_data, m.size)
            for key in order:
                g = groups[key]
                img = next((g[e] for e in IMAGE_EXTS if e in g), None)
                if img is None or "txt" not in g:
                    self.skipped += 1
                    continue
                self.samples.append((fi, img, g["txt"], g.get("klite.txt"), key.rsplit("/", 1)[-1]))
        if not self.samples:
            raise DataError("no training samples (image + txt) found in the tars")
        self.uids = [s[4] for s in self.samples]
        self._handles: dict[int, object] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, fi: int, where: tuple[int, int]) -> bytes:
        if self._pid != os.getpid():  # fresh handles in each DataLoader worker
            self._handles, self._pid = {}, os.getpid()
        fh = self._handles.get(fi)
        if fh is None:
            fh = self._handles[fi] = open(self.files[fi], "rb")
        fh.seek(where[0])
        return fh.read(where[1])

    def get(self, i: int):
        fi, img, txt, klite, key = self.samples[i]
        text = self._read(fi, txt).decode("utf-8")
        kl = self._read(fi, klite).decode("utf-8") if klite else None
        return self._read(fi, img), text, kl, key

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"], d["_pid"] = {}, None
        return d


def _files(path: str, ext: str) -> list[str]:
    # names starting with "_" or "." are bookkeeping, not data (Spark's _SUCCESS/_metadata; a stage folder's
    # _urls.parquet; temporaries of atomic writes)
    return sorted(p for p in glob.glob(os.path.join(path, f"*.{ext}")) if not os.path.basename(p)[:1] in "_.")


def open_source(path: str):
    """A Parquet or tar source for a file or a folder (an emit folder: its Parquet part, PARQUET_PARTS)."""
    kind, files = locate(path)
    return ParquetSource(files) if kind == "parquet" else TarSource(files)


def locate(path: str) -> tuple[str, list[str]]:
    """("parquet" | "tar", the files) `open_source(path)` reads: a file, or a folder's own files, else its
    parquet-images/, parquet/ (then wds/) part; a one-line DataError when there are none. Names only: no file is
    opened."""
    if not path:
        raise DataError("no training data given")
    if not shards.is_local(path):
        return "parquet", _locate_remote(path)
    if os.path.isfile(path):
        if path.endswith(".parquet"):
            return "parquet", [path]
        if path.endswith(".tar"):
            return "tar", [path]
        raise DataError(f"{path}: expected a .parquet or .tar file, or a folder of them")
    if not os.path.isdir(path):
        raise DataError(f"training data {path} does not exist")
    for sub in ("", *PARQUET_PARTS, "wds"):
        folder = os.path.join(path, sub) if sub else path
        pqs, tars = _files(folder, "parquet"), _files(folder, "tar")
        if pqs:
            return "parquet", pqs
        if tars:
            return "tar", tars
    raise DataError(f"{path}: no .parquet or .tar files in it (or in {'/, '.join(PARQUET_PARTS)}/, wds/)")


def _locate_remote(path: str) -> list[str]:
    """The Parquet files of a file or folder (an emit folder: its Parquet part) on an fsspec URL."""
    fs, p = shards.fs_and_path(path)
    if fs.isfile(p):
        if path.endswith(".parquet"):
            return [path]
        raise DataError(f"{path}: expected a .parquet file or a folder of them (tars are read from local paths only)")
    if not fs.isdir(p):
        raise DataError(f"training data {path} does not exist")
    for sub in ("", *PARQUET_PARTS):
        folder = shards.join(path, sub) if sub else path
        fs, fp = shards.fs_and_path(folder)
        names = sorted(shards.shard_name(g) for g in fs.glob(posixpath.join(fp, "*.parquet")))
        files = [shards.join(folder, n) for n in names if n[:1] not in "_."]
        if files:
            return files
    raise DataError(f"{path}: no .parquet files in it (or in {'/, '.join(PARQUET_PARTS)}/); tars are read from local "
                    "paths only")


def source_problem(path: str) -> str | None:
    """Why `open_source(path)` would refuse a training set, judged from its file names, Parquet footers and an emit
    metadata Parquet's `tar` names (the set may be gigabytes: nothing else is read), in one line; None when it
    looks readable. dfn-train's preflight of --hq, before anything is written."""
    try:
        kind, files = locate(path)
        for f in files:
            if kind == "tar":
                if shards.is_local(f) and not os.access(f, os.R_OK):
                    return f"{f} cannot be read (permission denied)"
                continue
            cols = _read_schema(f).names
            why = _columns_problem(f, cols)
            if why:
                return why
            if "image" not in cols and REF_COL in cols:
                _reader_for(f)  # references need their run's image store
            elif "image" not in cols:  # emit's metadata Parquet: its tars must be there (their names: one column)
                for tar_path in _tar_paths(f, _read_table(f, [TAR_COL]).column(TAR_COL)).values():
                    if not shards.exists(tar_path):
                        return f"{f} names {tar_path}, which does not exist: the emit folder's wds/ part is incomplete"
    except DataError as e:
        return str(e)
    except (OSError, pa.ArrowException) as e:
        return f"{path} cannot be read: {' '.join(str(e).split())[:200]}"
    return None


# ---- decoding ------------------------------------------------------------------------------------
# The bomb-refusing opener lives in pipeline.images (align, dfn and the report use it too); re-exported here.
from pipeline.images import MAX_IMAGE_PIXELS, ImageTooLarge, open_image  # noqa: E402,F401


def decode_image(data: bytes, size: int | None = None):
    """RGB PIL image. With `size`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    both sides >= size (PIL's draft mode): several times faster for a 64 px model, and the resize that
    follows is the model's own transform either way."""
    img = open_image(data)
    if size and img.format == "JPEG":
        img.draft("RGB", (size, size))
    img.load()
    return img.convert("RGB")


# ---- the dataset ---------------------------------------------------------------------------------
class PairDataset:
    """Map-style dataset indexed by (row, epoch): returns (image tensor, token ids)."""

    def __init__(self, source, transform, tokenizer, seed: int = 0, klite_prob: float = 0.5, seeded_transform: bool = True,
                 decode_size: int | None = None):
        self.source = source
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.klite_prob = float(klite_prob)
        self.seeded_transform = seeded_transform
        self._epoch_draws = None
        self.decode_size = decode_size
        # the uids' 64-bit keys, folded here in the parent: DataLoader workers are forked, and polars (which
        # pipeline.hashing.uid_to_u64 uses) deadlocks in a child forked after the parent used its thread pool
        from pipeline.hashing import uid_to_u64

        self._keys = uid_to_u64(list(source.uids)) if len(source) else np.zeros(0, np.uint64)

    def __len__(self) -> int:
        return len(self.source)

    def _draws(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-row uniforms for this epoch (K-LITE choice, augmentation seed), vectorised over the set."""
        if self._epoch_draws is None or self._epoch_draws[0] != epoch:
            k = self._keys
            self._epoch_draws = (epoch, uniform_of_keys(k, self.seed, f"klite:{epoch}"),
                                 uniform_of_keys(k, self.seed, f"aug:{epoch}"))
        return self._epoch_draws[1], self._epoch_draws[2]

    def __getitem__(self, key):
        import torch

        i, epoch = key if isinstance(key, tuple) else (key, 0)
        i = int(i)
        u_klite, u_aug = self._draws(epoch)
        img_bytes, text, klite, _ = self.source.get(i)
        if klite is not None and u_klite[i] < self.klite_prob:
            text = klite
        try:
            img = decode_image(img_bytes, self.decode_size)
        except Exception:  # an undecodable image in a training set: a black image, never a crash mid-run
            from PIL import Image

            img = Image.new("RGB", (32, 32))
        if self.seeded_transform:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(u_aug[i] * (1 << 62)))
                x = self.transform(img)
        else:
            x = self.transform(img)
        tokens = self.tokenizer([text])[0]
        return x, tokens


class StepBatchSampler:
    """Batches for optimizer steps start+1 .. total: step k (1-based) takes rows
    perm(epoch)[j*B:(j+1)*B] with (epoch, j) = divmod(k-1, steps_per_epoch); drop_last within an epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int):
        if n < batch_size:
            raise DataError(f"{n} training pairs is fewer than one batch ({batch_size}): lower batch_size")
        self.n, self.bs, self.seed = n, batch_size, seed
        self.start, self.total = start_step, total_steps
        self.per_epoch = n // batch_size

    def perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def epoch_of(self, step: int) -> int:
        return (step - 1) // self.per_epoch

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached = (None, None)
        for k in range(self.start + 1, self.total + 1):
            epoch, j = divmod(k - 1, self.per_epoch)
            if cached[0] != epoch:
                cached = (epoch, self.perm(epoch))
            rows = cached[1][j * self.bs : (j + 1) * self.bs]
            yield [(int(r), epoch) for r in rows]


class FastEvalTransform:
    """open_clip's eval transform (Resize shortest side to S, bicubic; CenterCrop S; ToTensor; Normalize), split
    in two: a uint8 S x S x 3 array per image (Pillow, in the DataLoader workers), and one batched
    normalisation on the device. Same pixels as the torchvision pipeline (its PIL backend calls the same
    Pillow resize), timed by hand cheaper per image on the CPU (bench/README.md, "The trainer by hand"), and 4x
    fewer bytes through pinned memory to a GPU.
    `from_compose` returns None for any other transform (the caller then uses it as it is)."""

    def __init__(self, size: int, crop: tuple[int, int], mean, std, interpolation):
        self.size, self.crop = size, crop
        self.mean, self.std, self.interpolation = tuple(mean), tuple(std), interpolation

    @classmethod
    def from_compose(cls, compose):
        from PIL import Image
        from torchvision import transforms as T
        from torchvision.transforms import InterpolationMode

        steps = list(getattr(compose, "transforms", []))
        modes = [t for t in steps if type(t).__name__ == "MaybeConvertMode"]
        if any(getattr(t, "mode", "RGB") != "RGB" for t in modes):
            return None
        steps = [t for t in steps if t not in modes]  # __call__ converts to RGB after the crop, as it does
        if len(steps) != 4:
            return None
        rs, cc, tt, nm = steps
        if not (isinstance(rs, T.Resize) and isinstance(cc, T.CenterCrop) and isinstance(tt, T.ToTensor)
                and isinstance(nm, T.Normalize)):
            return None
        size = rs.size if isinstance(rs.size, int) else (rs.size[0] if len(rs.size) == 1 else None)
        if size is None or rs.max_size is not None:
            return None
        interp = {InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.BILINEAR: Image.BILINEAR}.get(rs.interpolation)
        if interp is None:
            return None
        crop = tuple(cc.size) if len(cc.size) == 2 else (cc.size[0], cc.size[0])
        if crop[0] > size or crop[1] > size:
            return None
        return cls(size, crop, nm.mean, nm.std, interp)

    def __call__(self, img) -> np.ndarray:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), self.interpolation)
        ch, cw = self.crop
        top, left = int(round((new_h - ch) / 2.0)), int(round((new_w - cw) / 2.0))
        if (top, left, ch, cw) != (0, 0, new_h, new_w):
            img = img.crop((left, top, left + cw, top + ch))
        if img.mode != "RGB":  # after the crop, where open_clip's MaybeConvertMode does it
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)

    def normalize(self, batch):
        """uint8 [B, H, W, 3] tensor (on the model's device) -> normalised float [B, 3, H, W]."""
        import torch

        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)
