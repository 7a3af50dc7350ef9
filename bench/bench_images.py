"""Image benchmark: align -> metaclip -> klite -> dfn -> emit on a pool of real JPEGs, 2 workers, the code before
and after a change side by side in one run (issue 15: image bytes written once). Writes bench/results/images.json.

    .venv/bin/python bench/bench_images.py [--n 50000] [--rounds 2] [--before 94af3ef] [--after PATH|REV]
    .venv/bin/python bench/bench_images.py --quick          # n=2,000, 4 shards, 1 round: a smoke run

The pool (built once, cached under --cache, default bench/.cache): `--n` distinct JPEGs, 256 px on the short
side, made from the 239 COCO images of ../shared/data/coco_mini_images (random crop 60-100% per side with both
sides >= 200 px and aspect <= 3, colour/brightness/contrast x0.75-1.25, mirror half the time, JPEG q88-90);
every image's sha256 is checked distinct. Captions are real: 25% one of the COCO image's own 5 captions, the
rest Flickr8k + LAION-10k captions drawn without replacement (so most pairs are mismatched, as in a web pool);
urls are synthetic and unique; uid = pipeline.schema.compute_uid(url, text). Shards of `--shard-rows` rows
(default 5,000: 10 shards, 5 per worker, so neither worker idles at a stage's end, as in a crawl of thousands of
shards; with 5 shards of 10,000 one worker had 3 and the other idled through the last, a tail that the bare
baselines, which split their rows evenly, do not have; a cached pool of other shard sizes is re-cut, not
rebuilt: row i depends on (seed, i) only) in the project's row schema (uid, url, text, image, width, height, orig_width, orig_height); `orig_*` is the
crop's size before the resize. A text-only copy (uid, url, text) of the same rows gives metaclip and klite
their text-only speed on the same captions. The filtering network for dfn is `clipcurate-tiny` trained by
`clipcurate dfn-train` (the "before" tree) for `--dfn-steps` steps on the pool's own-caption COCO pairs.

Per round, per side ("before" = a git revision exported to the cache, "after" = this tree or --after; the order
alternates between rounds): a fresh `dask scheduler` + 2 single-threaded `dask worker` processes on loopback with
PYTHONPATH = that tree (the environment the runner gives a LocalCluster's workers), then ONE command,
`clipcurate --runs-dir D run align,metaclip,klite,dfn,emit --run R --input POOL --config CFG --scheduler ADDR`.
While it runs, each stage's `_manifest.json` appearing marks the stage's end: each worker's VmHWM (peak RSS) and
/proc/self/io counters are read then, and VmHWM reset (clear_refs) for the next stage. So a stage's peak can
include the first milliseconds of the next one. Then the same on the text-only copy (align,metaclip,klite).
Each side has its own bare baselines next to the stage they are compared with (this VM's speed drifts by tens of
percent within minutes): dhash just before the image run, open_clip just after it. Each runs in 2 processes in
parallel (one per core, OMP_NUM_THREADS=1 as Dask's nanny sets it) on the same JPEGs (the pool's first rows),
timed without imports, model load and the Parquet read (recorded next to it); the total is the sum of the two
processes' rates:
  dhash   Pillow open + draft("RGB", (128, 128)) + load + 9x8 LANCZOS grey dHash: a Pillow decode and dHash
          as one would write it (in draft mode at >= 128 px, as align decodes): the goal's baseline
  dhash_grey  the same loop with draft("L"): straight to grey, as align decodes since f797f15 (1.17-1.42x
          faster, bench/results/image_path.json); reported next to the goal's ratio, with no goal of its own
  clip    bench_dfn's bare open_clip loop: PIL open (full decode) + open_clip's preprocess per image, stack,
          open_clip tokenizer, encode_image/encode_text normalised, cosine; batches of 256, the dfn checkpoint
Each run gets its own CLIPCURATE_CACHE (a hard-linked copy of a warm one: WordNet tables, concept list, model
configs; never dfn scores, so dfn scores every pair in every run).

Reported per side (medians over rounds, every round kept):
  bytes written per stage: (a) the sum of the workers' and the driver's /proc io write_bytes between stage ends
    (what reached the page cache, temporaries removed later included), (b) the stage folder's size on disk after
    the run (NN_stage with rejected/ and stats; emit = NN_emit + runs/R/emit; dfn + its score cache); the run's
    total against 1.1 x (pool + emitted set), the emitted set being runs/R/emit.
  rows/s per stage: rows_in / the runner's stage time (manifest timings: collect + merge + apply + finalize),
    and metaclip, klite image vs text-only (goal >= 50%); align's rows/s per worker vs the bare dhash rate per
    core (goal >= 80%); dfn's rows/s vs the bare open_clip loop on 2 processes (goal >= 90%).
  peak RSS per worker per stage; the whole run's images/s: pool rows / the command's wall time (process start,
    imports and all), and pool rows / the sum of the stage times.
GPU: with CUDA, dfn's Scorer and the trainer are also timed on it (images/s); else "not available" is recorded.
The machine is a shared 2-core VM: the load average is recorded next to every measurement. With --after the
same code as --before, the two sides show this VM's noise (measured: 1.46x in whole-run wall time, load 4-8).

What the "after" code must keep for this bench: `clipcurate --runs-dir D run STAGES --run R --input FOLDER --config
CFG` (and `--scheduler ADDR`; without it the bench falls back to `--workers 2` and reads the workers' peaks from
/proc), a plain Parquet folder in the row schema as --input, the config keys written by `write_config`, one
`runs/R/NN_<stage>/_manifest.json` per stage (stage, rows_in, rows_out, timings in *_s) written when the stage is
done, the emitted set under runs/R/emit, and CLIPCURATE_CACHE for its caches. Writes anywhere else are still
counted by the io readings (and by the on-disk figure when under runs/R).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _procs import stop_groups

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
COCO = DATA / "coco_mini_images" / "coco_mini_images.parquet"
FLICKR = DATA / "flickr8k_captions" / "flickr8k_captions.parquet"
LAION = DATA / "laion_sample_10k" / "laion_sample_10k.parquet"

BUILD_VERSION = 1  # bump when the pool recipe changes: the cache key includes it
DEFAULT_BEFORE = "94af3ef"
STAGES = ["align", "metaclip", "klite", "dfn", "emit"]
TEXT_STAGES = ["align", "metaclip", "klite"]
COCO_CAPTION_SHARE = 0.25
GOALS = {"bytes_vs_pool_plus_emitted": 1.1, "metaclip_image_vs_text": 0.5, "klite_image_vs_text": 0.5,
         "align_vs_bare_dhash_per_core": 0.8, "dfn_vs_bare_open_clip": 0.9}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def folder_bytes(path: str | Path) -> int:
    p = Path(path)
    if not p.exists():
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


# ---- the pool ----------------------------------------------------------------------------------
_SOURCES: list | None = None


def _init_sources(coco_path: str) -> None:
    """Decode the COCO images once per build process."""
    global _SOURCES
    import pyarrow.parquet as pq
    from PIL import Image

    t = pq.read_table(coco_path, columns=["image"])
    _SOURCES = [Image.open(io.BytesIO(b)).convert("RGB") for b in t.column("image").to_pylist()]


def _variant(src, rng) -> tuple[bytes, int, int, int, int]:
    """(jpeg, width, height, crop width, crop height): crop, colour, mirror, 256 px short side, q88-90."""
    from PIL import Image, ImageEnhance, ImageOps

    w, h = src.size
    fw, fh = rng.uniform(0.6, 1.0, 2)
    cw, ch = max(200, round(w * fw)), max(200, round(h * fh))
    cw, ch = min(cw, w, 3 * ch), min(ch, h, 3 * cw)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = src.crop((x0, y0, x0 + cw, y0 + ch))
    for enh, f in zip((ImageEnhance.Color, ImageEnhance.Brightness, ImageEnhance.Contrast), rng.uniform(0.75, 1.25, 3)):
        img = enh(img).enhance(float(f))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    s = 256 / min(cw, ch)
    img = img.resize((max(256, round(cw * s)), max(256, round(ch * s))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(88, 91)))
    return buf.getvalue(), img.size[0], img.size[1], cw, ch


def _build_shard(job: dict) -> dict:
    """One pool shard (runs in a build process). Deterministic: row i's image is drawn from rng([seed, i])."""
    import numpy as np
    import pyarrow as pa

    sys.path.insert(0, str(ROOT))
    from pipeline import shards
    from pipeline.schema import compute_uid

    rows = range(job["start"], job["start"] + len(job["src"]))
    jpeg, w, h, ow, oh = [], [], [], [], []
    for i, s in zip(rows, job["src"]):
        b, a, c, d, e = _variant(_SOURCES[s], np.random.default_rng([job["seed"], i]))
        jpeg.append(b), w.append(a), h.append(c), ow.append(d), oh.append(e)
    url = pa.array(job["url"], pa.string())
    text = pa.array(job["text"], pa.string())
    t = pa.table({"uid": compute_uid(url, text), "url": url, "text": text, "image": pa.array(jpeg, pa.binary()),
                  "width": pa.array(w, pa.int32()), "height": pa.array(h, pa.int32()),
                  "orig_width": pa.array(ow, pa.int32()), "orig_height": pa.array(oh, pa.int32())})
    shards.write_shard(t, job["path"])
    shards.write_shard(t.select(["uid", "url", "text"]), job["text_path"])
    own = [k for k, c in enumerate(job["own_caption"]) if c]
    return {"path": job["path"], "sha256": [hashlib.sha256(b).digest() for b in jpeg],
            "jpeg_bytes": sum(map(len, jpeg)), "own_caption_rows": own}


def _captions(n: int, seed: int):
    """(source image index, caption, own caption?) per row: 25% a COCO image's own caption, the rest Flickr8k +
    LAION-10k captions without replacement (cycled, with a suffix, past the ~50k there are)."""
    import numpy as np
    import pyarrow.parquet as pq

    coco = pq.read_table(COCO, columns=["width", "height", "captions"])
    ok = [i for i, (w, h) in enumerate(zip(coco.column("width").to_pylist(), coco.column("height").to_pylist()))
          if min(w, h) >= 200]  # every crop keeps both sides >= 200 px (align's min_side)
    caps = coco.column("captions").to_pylist()
    other = [t for t in pq.read_table(FLICKR, columns=["caption"]).column("caption").to_pylist() if t] + \
            [t for t in pq.read_table(LAION, columns=["text"]).column("text").to_pylist() if t]
    rng = np.random.default_rng(seed)
    src = rng.choice(ok, n)
    own = rng.random(n) < COCO_CAPTION_SHARE
    order = rng.permutation(len(other))
    texts, k = [], 0
    for i in range(n):
        if own[i]:
            c = caps[src[i]]
            texts.append(c[int(rng.integers(len(c)))])
        else:
            j = order[k % len(order)]
            texts.append(other[j] if k < len(order) else f"{other[j]} ({k // len(order)})")
            k += 1
    return [int(s) for s in src], texts, own.tolist()


def pool_name(n: int, shard_rows: int, seed: int) -> str:
    return f"pool-n{n}-r{shard_rows}-s{seed}-v{BUILD_VERSION}"


def recut_pool(folder: Path, n: int, seed: int, shard_rows: int) -> dict | None:
    """The same pool in shards of another size, from a cached one: row i's image and caption depend on (seed, i)
    only, so re-cutting the rows gives the pool a build would, without re-encoding 50,000 JPEGs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import shards

    sources = [p for p in sorted(folder.parent.glob(f"pool-n{n}-r*-s{seed}-v{BUILD_VERSION}"))
               if p != folder and (p / "pool.json").exists()]
    if not sources:
        return None
    src = sources[0]
    t0 = time.perf_counter()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for kind in ("images", "text"):
        (tmp / kind).mkdir(parents=True)
        k, buf = 0, None
        for f in sorted((src / kind).glob("part-*.parquet")):
            buf = pq.read_table(f) if buf is None else pa.concat_tables([buf, pq.read_table(f)])
            while buf.num_rows >= shard_rows:
                shards.write_shard(buf.slice(0, shard_rows), str(tmp / kind / f"part-{k:05d}.parquet"))
                k, buf = k + 1, buf.slice(shard_rows)
        if buf is not None and buf.num_rows:
            shards.write_shard(buf, str(tmp / kind / f"part-{k:05d}.parquet"))
    shutil.copyfile(src / "hq.parquet", tmp / "hq.parquet")
    meta = json.loads((src / "pool.json").read_text())
    meta.update(shard_rows=shard_rows, shards=len(list((tmp / "images").glob("part-*.parquet"))),
                pool_bytes=folder_bytes(tmp / "images"), text_pool_bytes=folder_bytes(tmp / "text"),
                recut_from=src.name, recut_s=round(time.perf_counter() - t0, 1))
    (tmp / "pool.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log(f"pool: re-cut {src.name} into {meta['shards']} shards of {shard_rows:,} rows in {meta['recut_s']:.0f} s")
    return meta


def build_pool(folder: Path, n: int, seed: int, shard_rows: int, procs: int) -> dict:
    """Write folder/images/part-*.parquet, folder/text/part-*.parquet, folder/hq.parquet, folder/pool.json."""
    meta_path = folder / "pool.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        log(f"pool: cached {folder} ({meta['rows']:,} rows, {meta['pool_bytes'] / 2**20:,.0f} MiB)")
        return meta
    meta = recut_pool(folder, n, seed, shard_rows)
    if meta is not None:
        return meta
    import multiprocessing as mp

    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "text").mkdir(parents=True)
    t0 = time.perf_counter()
    load0 = loadavg()
    src, texts, own = _captions(n, seed)
    jobs = []
    for k, start in enumerate(range(0, n, shard_rows)):
        end = min(n, start + shard_rows)
        jobs.append({"seed": seed, "start": start, "src": src[start:end], "text": texts[start:end],
                     "own_caption": own[start:end],
                     "url": [f"https://bench-images.invalid/{seed}/{i:09d}.jpg" for i in range(start, end)],
                     "path": str(tmp / "images" / f"part-{k:05d}.parquet"),
                     "text_path": str(tmp / "text" / f"part-{k:05d}.parquet")})
    with mp.get_context("spawn").Pool(procs, initializer=_init_sources, initargs=(str(COCO),)) as pool:
        done = []
        for r in pool.imap(_build_shard, jobs):
            done.append(r)
            log(f"pool: shard {len(done)}/{len(jobs)} ({time.perf_counter() - t0:.0f} s)")
    digests = [d for r in done for d in r["sha256"]]
    distinct = len(set(digests))
    if distinct != n:
        raise SystemExit(f"pool: {n - distinct} JPEGs are byte-identical to another; change --seed")
    # the filtering network's training set: pool pairs with their image's own COCO caption (clean pairs)
    hq = []
    for r in done:
        if r["own_caption_rows"]:
            t = pq.read_table(r["path"], columns=["uid", "url", "text", "image"])
            hq.append(t.take(pa.array(r["own_caption_rows"])))
    pq.write_table(pa.concat_tables(hq).slice(0, 3000), tmp / "hq.parquet")
    build_s = time.perf_counter() - t0
    meta = {"rows": n, "seed": seed, "shard_rows": shard_rows, "shards": len(jobs), "build_version": BUILD_VERSION,
            "distinct_jpegs_sha256": distinct, "jpeg_bytes": sum(r["jpeg_bytes"] for r in done),
            "pool_bytes": folder_bytes(tmp / "images"), "text_pool_bytes": folder_bytes(tmp / "text"),
            "own_caption_rows": int(sum(own)), "hq_pairs": pq.read_metadata(tmp / "hq.parquet").num_rows,
            "build_s": round(build_s, 1), "build_processes": procs, "loadavg_start": load0, "loadavg_end": loadavg(),
            "recipe": "COCO mini (239 images, sources with both sides >= 200 px): random crop 60-100% per side "
                      "(sides >= 200 px, aspect <= 3), Color/Brightness/Contrast x U(0.75, 1.25), mirror p=0.5, "
                      "bicubic resize to 256 px short side, JPEG q88-90; captions 25% the image's own COCO "
                      "caption, the rest Flickr8k + LAION-10k without replacement"}
    (tmp / "pool.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log(f"pool: {n:,} distinct JPEGs in {build_s:.0f} s, {meta['pool_bytes'] / 2**20:,.0f} MiB -> {folder}")
    return meta


# ---- the two source trees -----------------------------------------------------------------------
def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def resolve_tree(spec: str | None, cache: Path) -> dict:
    """None: this tree as it is on disk. An existing folder: that tree. Else a git revision of this repository,
    exported (git archive) once into the cache."""
    if spec is None or Path(spec).is_dir():
        path = Path(spec).resolve() if spec else ROOT
        try:
            commit = _git("rev-parse", "HEAD", cwd=path)
            dirty = bool(_git("status", "--porcelain", "--untracked-files=no", cwd=path))
        except (subprocess.CalledProcessError, FileNotFoundError):
            commit, dirty = None, None
        return {"path": str(path), "commit": commit, "dirty": dirty, "spec": spec or "this tree"}
    commit = _git("rev-parse", "--verify", spec + "^{commit}")
    dest = cache / "trees" / commit[:12]
    if not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        (dest / ".complete").write_text(commit + "\n")
    return {"path": str(dest), "commit": commit, "dirty": False, "spec": spec}


def tree_env(tree: str, cache_dir: str | None = None, **extra) -> dict:
    # PYTHONDONTWRITEBYTECODE (set in some shells and CI images) would make every worker compile torch and
    # open_clip again at each start (~13 s here): a user's steady state has .pyc files (make setup compiles them)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=tree, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **extra)
    if cache_dir:
        env["CLIPCURATE_CACHE"] = cache_dir
    return env


def bin_path(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


# ---- cluster and measurement --------------------------------------------------------------------
def worker_settings(tree: str) -> tuple[dict, list[str]]:
    """The Dask config and preload modules that `tree`'s runner gives its LocalCluster's workers
    (pipeline.executors.WORKER_DASK_CONFIG, WORKER_PRELOAD; pipeline.runner's in a tree older than executors.py;
    none in a tree older than them)."""
    code = ("import importlib, importlib.util as u, json; r = importlib.import_module('pipeline.executors' if "
            "u.find_spec('pipeline.executors') else 'pipeline.runner'); "
            "print(json.dumps([getattr(r, 'WORKER_DASK_CONFIG', {}), "
            "getattr(r, 'WORKER_PRELOAD', [])]))")
    out = subprocess.run([sys.executable, "-c", code], env=tree_env(tree), cwd=tree, capture_output=True, text=True,
                         check=True)
    dask_config, preload = json.loads(out.stdout.strip().splitlines()[-1])
    return dask_config, preload


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe() -> dict:
    """In a worker: peak RSS since the last reset (VmHWM), RSS now, and this process's /proc io counters."""
    import os as _os

    out = {"pid": _os.getpid()}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, v = line.split(":")
                out[k] = int(v)
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    # bench_align.reset_peak_rss's twin, on purpose: this one runs on workers whose PYTHONPATH is the tree under
    # test, not bench/, so it must travel by value (a function of __main__), not as a reference to bench_align
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_io(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


class Cluster:
    """A scheduler and `workers` single-threaded worker processes (each with a nanny) running `tree`'s code."""

    def __init__(self, tree: str, workers: int, workdir: Path, cache_dir: str):
        from distributed import Client

        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        dask_config, preload = worker_settings(tree)
        env = tree_env(tree, cache_dir, POLARS_MAX_THREADS=str(max(1, (os.cpu_count() or 1) // workers)),
                       **{"DASK_" + k.upper().replace(".", "__").replace("-", "_"): str(v)
                          for k, v in dask_config.items()})
        self.settings = {"dask_config": dask_config, "preload": preload}
        self.log = open(workdir / "cluster.log", "w")
        common = dict(env=env, cwd=str(workdir), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs = [subprocess.Popen([bin_path("dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                        str(self.port), "--no-dashboard"], **common)]
        for i in range(workers):
            self.procs.append(subprocess.Popen(
                [bin_path("dask"), "worker", self.address, "--name", f"w{i}", "--nthreads", "1", "--nworkers", "1",
                 "--memory-limit", "0", "--no-dashboard", "--local-directory", str(workdir / f"w{i}")]
                + [a for m in preload for a in ("--preload", m)], **common))
        self.client = Client(self.address, timeout="60s")
        self.client.wait_for_workers(workers, timeout=180)
        names = {a: w.get("name") for a, w in self.client.scheduler_info()["workers"].items()}
        self.names = names

    def probe(self) -> dict[str, dict]:
        return {str(self.names.get(a, a)): v for a, v in self.client.run(_probe).items()}

    def reset(self) -> None:
        self.client.run(_reset_peak)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            stop_groups(self.procs, timeout=30)
            self.log.close()


class DescendantProbe:
    """`--exec workers` (the command's own LocalCluster): its worker processes are found among the command's
    descendants (the `workers` largest python processes); VmHWM and io read from /proc, reset via clear_refs."""

    def __init__(self, pid: int, workers: int):
        self.pid, self.workers = pid, workers

    def _procs(self):
        import psutil

        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in kids:
            try:
                out.append((p.pid, p.memory_info().rss))
            except psutil.Error:
                pass
        return [pid for pid, _ in sorted(out, key=lambda x: -x[1])[: self.workers]]

    def probe(self) -> dict[str, dict]:
        out = {}
        for pid in self._procs():
            d = {"pid": pid}
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith(("VmHWM:", "VmRSS:")):
                            d[line.split(":")[0]] = int(line.split()[1]) * 1024
            except OSError:
                continue
            d.update(_proc_io(pid))
            out[f"pid{pid}"] = d
        return out

    def reset(self) -> None:
        for pid in self._procs():
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass


def _stage_seconds(m: dict) -> float:
    return float(sum(v for k, v in (m.get("timings") or {}).items() if isinstance(v, (int, float)) and k.endswith("_s")))


def run_chain(tree: dict, pool: str, run_root: Path, run_name: str, config: str, stages: list[str], cache_dir: str,
              exec_mode: str, workers: int = 2) -> dict:
    """One `clipcurate run` of `stages` on `pool`; per stage: manifest figures, workers' peaks and io deltas."""
    run_root.mkdir(parents=True, exist_ok=True)
    run_dir = run_root / run_name
    cluster = None
    cmd = [bin_path("clipcurate"), "--runs-dir", str(run_root), "run", ",".join(stages), "--run", run_name,
           "--input", pool, "--config", config]
    t_cluster = time.perf_counter()
    if exec_mode == "scheduler":
        cluster = Cluster(tree["path"], workers, run_root, cache_dir)
        cmd += ["--scheduler", cluster.address]
    else:
        cmd += ["--workers", str(workers)]
    cluster_s = time.perf_counter() - t_cluster
    log_path = run_root / f"{run_name}.log"
    out = {"command": " ".join(cmd[1:]), "exec": exec_mode, "cluster_start_s": round(cluster_s, 1), "stages": []}
    if cluster:
        out["worker_settings"] = cluster.settings
    try:
        base = cluster.probe() if cluster else {}
        if cluster:
            cluster.reset()
        load0 = loadavg()
        t0 = time.perf_counter()
        with open(log_path, "w") as lf:
            proc = subprocess.Popen(cmd, env=tree_env(tree["path"], cache_dir), cwd=str(run_root), stdout=lf,
                                    stderr=subprocess.STDOUT)
        prober = cluster or DescendantProbe(proc.pid, workers)
        seen: set[str] = set()
        last_t, last_probe, last_driver = t0, base, {}
        status, rusage, hwm_track = None, None, {}

        def stage_done(path: Path, now: float) -> None:
            nonlocal last_t, last_probe, last_driver
            snap = prober.probe()
            prober.reset()
            driver = _proc_io(proc.pid) or last_driver
            m = json.loads(path.read_text())
            per_worker = {}
            for w, v in snap.items():
                prev = last_probe.get(w, {})
                per_worker[w] = {"peak_rss_mib": round(max(v.get("VmHWM", 0), hwm_track.get(w, 0)) / 2**20),
                                 "write_bytes": v.get("write_bytes", 0) - prev.get("write_bytes", 0),
                                 "cancelled_write_bytes": v.get("cancelled_write_bytes", 0)
                                 - prev.get("cancelled_write_bytes", 0),
                                 "read_bytes": v.get("read_bytes", 0) - prev.get("read_bytes", 0)}
            hwm_track.clear()
            secs = _stage_seconds(m)
            rows = int(m.get("rows_in", 0))
            out["stages"].append({
                "stage": m.get("stage", path.parent.name), "folder": path.parent.name, "rows_in": rows,
                "rows_out": m.get("rows_out"), "rejected": m.get("rejected"), "reasons": m.get("reasons"),
                "timings": m.get("timings"), "stage_s": round(secs, 2),
                "rows_per_s": round(rows / secs, 1) if secs else None,
                "wall_since_previous_s": round(now - last_t, 2),
                "workers": per_worker,
                "peak_rss_per_worker_mib": sorted(v["peak_rss_mib"] for v in per_worker.values()),
                "workers_write_bytes": sum(v["write_bytes"] for v in per_worker.values()),
                "workers_cancelled_write_bytes": sum(v["cancelled_write_bytes"] for v in per_worker.values()),
                "driver_write_bytes": driver.get("write_bytes", 0) - last_driver.get("write_bytes", 0)
                if driver else None,
                "loadavg": loadavg(),
            })
            log(f"  {run_name}: {out['stages'][-1]['stage']} {rows:,} -> {m.get('rows_out', 0):,} in {secs:.1f} s "
                f"({rows / secs if secs else 0:,.0f} rows/s), peaks {out['stages'][-1]['peak_rss_per_worker_mib']} MiB")
            last_t, last_probe, last_driver = now, snap, driver

        def scan() -> None:
            if not run_dir.exists():
                return
            for path in sorted(run_dir.glob("*/_manifest.json")):
                if str(path) not in seen and path.stat().st_mtime >= t_start_wall:
                    seen.add(str(path))
                    stage_done(path, time.perf_counter())

        t_start_wall = time.time() - 1
        last_driver = _proc_io(proc.pid)
        while status is None:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, rusage = st, ru
                proc.returncode = os.waitstatus_to_exitcode(st)
                break
            if isinstance(prober, DescendantProbe):  # VmHWM dies with the process: keep the largest seen
                for w, v in prober.probe().items():
                    hwm_track[w] = max(hwm_track.get(w, 0), v.get("VmHWM", 0))
            scan()
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        scan()
        out.update({
            "returncode": proc.returncode, "wall_s": round(wall, 2), "loadavg_start": load0, "loadavg_end": loadavg(),
            # wait4's rusage of the command: its own writes plus those of its reaped children (with --exec workers,
            # its LocalCluster's workers); not used in the totals, which sum the per-stage readings
            "command_and_children_write_bytes": rusage.ru_oublock * 512 if rusage else None,
        })
        if proc.returncode != 0:
            out["error_tail"] = log_path.read_text()[-3000:]
            log(f"  {run_name}: FAILED (rc {proc.returncode}); log {log_path}:\n{out['error_tail'][-1500:]}")
    finally:
        if cluster:
            cluster.close()
    return out


def measure_disk(run_dir: Path, cache_dir: str, stage_rows: list[dict]) -> dict:
    """Bytes on disk after the run, per stage folder; emit includes runs/R/emit; dfn its score cache."""
    per = {}
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        per[d.name] = folder_bytes(d)
    per["<run root files>"] = sum(f.stat().st_size for f in run_dir.iterdir() if f.is_file())
    scores = folder_bytes(Path(cache_dir) / "dfn_scores")
    by_stage = {}
    for s in stage_rows:
        by_stage[s["stage"]] = per.get(s["folder"], 0)
    if "emit" in by_stage:
        by_stage["emit"] += per.get("emit", 0)
    if "dfn" in by_stage:
        by_stage["dfn"] += scores
    return {"folders": per, "dfn_score_cache": scores, "by_stage": by_stage,
            "emitted_set": per.get("emit", 0), "total": sum(per.values()) + scores}


def warm_cache(tree: dict, warm: Path, text_pool: Path, work: Path) -> None:
    """Build the WordNet tables, the concept list and the model configs once (a tiny text-only run)."""
    if (warm / ".complete").exists():
        return
    import pyarrow.parquet as pq

    log("warming the cache (WordNet tables, concept list) with a 200-row text-only run ...")
    small = work / "warm-pool"
    small.mkdir(parents=True, exist_ok=True)
    first = sorted(text_pool.glob("part-*.parquet"))[0]
    pq.write_table(pq.read_table(first).slice(0, 200), small / "part-00000.parquet")
    r = subprocess.run([bin_path("clipcurate"), "--runs-dir", str(work / "warm-runs"), "run", "align,metaclip,klite",
                        "--run", "warm", "--input", str(small), "--workers", "0"],
                       env=tree_env(tree["path"], str(warm)), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"warm-up run failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    subprocess.run([sys.executable, "-c", "from trainer import models; models.register_configs()"],
                   env=tree_env(tree["path"], str(warm)), check=True)
    (warm / ".complete").write_text("ok\n")


def fresh_cache(warm: Path, dest: Path) -> str:
    """A run's own CLIPCURATE_CACHE: hard links to the warm one (no dfn scores)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for item in warm.iterdir():
        if item.name in ("dfn_scores", ".complete"):
            continue
        if item.is_dir():
            subprocess.run(["cp", "-al", str(item), str(dest / item.name)], check=True)
        else:
            os.link(item, dest / item.name)
    return str(dest)


def train_dfn(tree: dict, pool_dir: Path, cache: Path, warm: Path, steps: int, n: int, seed: int) -> dict:
    key = f"dfn-pool-n{n}-s{seed}-v{BUILD_VERSION}-s{steps}"  # hq.parquet does not depend on the shard size
    out = cache / key
    ck = out / "dfn" / "dfn_model" / "model.pt"
    meta_path = out / "dfn.json"
    if meta_path.exists() and ck.exists():
        return json.loads(meta_path.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log(f"training the filtering network ({steps} steps on {pool_dir / 'hq.parquet'}) ...")
    t0 = time.perf_counter()
    r = subprocess.run([bin_path("clipcurate"), "--runs-dir", str(out), "dfn-train", "--run", "dfn", "--hq",
                        str(pool_dir / "hq.parquet"), "--steps", str(steps), "--workers", "0", "--device", "cpu"],
                       env=tree_env(tree["path"], str(warm)), capture_output=True, text=True)
    if r.returncode != 0 or not ck.exists():
        raise SystemExit(f"dfn-train failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    meta = {"checkpoint": str(ck), "model": "clipcurate-tiny", "steps": steps, "train_s": round(time.perf_counter() - t0, 1),
            "trained_with": tree["commit"], "log_tail": r.stdout.strip().splitlines()[-2:]}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def write_config(path: Path, n: int, dfn: dict) -> dict:
    t = max(50, n // 100)
    text = f"""# bench/bench_images.py: defaults except where said
[run]
seed = 0

[align]
eval_images = ""   # decontamination off: the pool has no evaluation copies

[metaclip]
t = {t}   # MetaCLIP: 20,000 at 400M pairs; here pool / 100 (as the demo world)

[dfn]
checkpoint = "{dfn['checkpoint']}"
model = "{dfn['model']}"
keep_fraction = 0.3
device = "cpu"

[emit]
samples_per_shard = 10000
"""
    path.write_text(text)
    return {"file": text, "metaclip_t": t}


# ---- bare baselines (child processes) -----------------------------------------------------------
def _bare_child(kind: str, spec: str, checkpoint: str, batch: int) -> None:
    """Child: read the rows, then time the bare loop over them. Prints one JSON line."""
    import pyarrow.parquet as pq

    t_begin = time.perf_counter()
    rows = []
    for part in spec.split(";"):
        path, start, count = part.rsplit(":", 2)
        t = pq.read_table(path, columns=["image", "text"]).slice(int(start), int(count))
        rows.append(t)
    import pyarrow as pa

    table = pa.concat_tables(rows)
    t_read = time.perf_counter()
    images, texts = table.column("image").to_pylist(), table.column("text").to_pylist()
    res = {"rows": len(images)}
    if kind in ("dhash", "dhash_grey"):
        import numpy as np
        from PIL import Image

        mode = "L" if kind == "dhash_grey" else "RGB"

        t0, w0 = time.perf_counter(), time.time()
        startup = w0 - __import__("psutil").Process().create_time()
        acc = 0
        for b in images:
            with Image.open(io.BytesIO(b)) as img:
                img.draft(mode, (128, 128))
                img.load()
                g = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
                acc ^= int(np.packbits((g[:, :-1] > g[:, 1:]).ravel(), bitorder="big").view(">u8")[0])
        res.update(loop_s=time.perf_counter() - t0, start=w0, end=time.time(), startup_s=round(startup, 2))
    else:
        import open_clip
        import torch
        from PIL import Image

        from trainer import models

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        models.register_configs()
        ck = models.read_checkpoint(checkpoint)
        name = ck.get("model_name") or "clipcurate-tiny"
        model, _, pre = open_clip.create_model_and_transforms(name, pretrained=None)
        model.load_state_dict(ck["state_dict"])
        model.eval()
        tok = open_clip.get_tokenizer(name)
        with torch.inference_mode():  # warm-up: one small batch
            model.encode_image(torch.stack([pre(Image.open(io.BytesIO(b))) for b in images[:8]]))
        t0, w0 = time.perf_counter(), time.time()
        startup = w0 - __import__("psutil").Process().create_time()
        for i in range(0, len(texts), batch):
            x = torch.stack([pre(Image.open(io.BytesIO(b))) for b in images[i : i + batch]])
            with torch.inference_mode():
                fi = model.encode_image(x, normalize=True)
                ft = model.encode_text(tok(texts[i : i + batch]), normalize=True)
                (fi * ft).sum(-1).numpy()
        res.update(loop_s=time.perf_counter() - t0, start=w0, end=time.time(), torch_threads=torch.get_num_threads(),
                   model=name, startup_s=round(startup, 2))
    res["read_s"] = round(t_read - t_begin, 2)
    print("BARE " + json.dumps(res), flush=True)


def bare(kind: str, pool_images: Path, rows: int, procs: int, tree: dict, checkpoint: str, batch: int) -> dict:
    """`procs` children in parallel, each on its own slice of the pool's first shards."""
    files = sorted(pool_images.glob("part-*.parquet"))
    import pyarrow.parquet as pq

    sizes = [pq.read_metadata(f).num_rows for f in files]
    per = rows // procs
    specs, fi, off = [], 0, 0
    for _ in range(procs):
        need, parts = per, []
        while need > 0 and fi < len(files):
            take = min(need, sizes[fi] - off)
            parts.append(f"{files[fi]}:{off}:{take}")
            need -= take
            off += take
            if off >= sizes[fi]:
                fi, off = fi + 1, 0
        specs.append(";".join(parts))
    env = tree_env(tree["path"], None, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    load0 = loadavg()
    children = [subprocess.Popen([sys.executable, __file__, "--_bare", kind, "--_spec", s, "--_checkpoint", checkpoint,
                                  "--_batch", str(batch)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for s in specs]
    results = []
    for c in children:
        so, se = c.communicate()
        line = next((ln for ln in so.splitlines() if ln.startswith("BARE ")), None)
        if c.returncode != 0 or line is None:
            raise SystemExit(f"bare {kind} failed:\n{se[-2000:]}")
        results.append(json.loads(line[5:]))
    n = sum(r["rows"] for r in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    per_proc = [r["rows"] / r["loop_s"] for r in results]
    # total = the sum of the per-process rates (they run at the same time, one per core); the span from the first
    # start to the last end also counts the processes' different start-up times
    return {"kind": kind, "rows": n, "processes": procs, "rows_per_s_total": round(sum(per_proc), 1),
            "rows_per_s_span": round(n / span, 1), "rows_per_s_per_process": [round(x, 1) for x in per_proc],
            "startup_s_per_process": [r.get("startup_s") for r in results],
            "read_s_per_process": [r.get("read_s") for r in results],
            "timed": "the loop only: not the imports, model load (startup_s) nor the Parquet read (read_s)",
            "rows_per_s_per_core": round(sum(per_proc) / len(per_proc), 1),
            "torch_threads": results[0].get("torch_threads"), "loadavg_start": load0, "loadavg_end": loadavg()}


# ---- GPU ----------------------------------------------------------------------------------------
GPU_CHILD = r"""
import json, os, sys, time
import torch
out = {"available": torch.cuda.is_available()}
if not out["available"]:
    out["reason"] = "torch.cuda.is_available() is False on this machine"
    print("GPU " + json.dumps(out)); sys.exit(0)
import pyarrow.parquet as pq
from trainer.score import Scorer
from trainer.config import TrainConfig
from trainer.train import train
pool, ck, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
files = sorted(f for f in os.listdir(pool) if f.endswith(".parquet"))
t = pq.read_table(os.path.join(pool, files[0]), columns=["image", "text"])
imgs, txt = t.column("image").to_pylist(), t.column("text").to_pylist()
out["device"] = torch.cuda.get_device_name(0)
sc = Scorer(ck, device="cuda", batch_size=256, num_workers=8)
sc.score(imgs[:512], txt[:512])
torch.cuda.synchronize(); t0 = time.perf_counter(); sc.score(imgs, txt); torch.cuda.synchronize()
out["dfn_scorer_images_per_s"] = round(len(imgs) / (time.perf_counter() - t0), 1)
out["dfn_scorer_rows"] = len(imgs); out["precision"] = sc.precision
cfg = TrainConfig(steps=200, batch_size=256, device="cuda", workers=8, save_every=200, keep_checkpoints=1,
                  log_every=50, warmup=20, klite_prob=0.0)
t0 = time.perf_counter(); s = train(cfg, pool, tmp, progress=False); dt = time.perf_counter() - t0
out["trainer"] = {"steps": 200, "batch_size": 256, "seconds": round(dt, 1), "images_per_s": round(200 * 256 / dt, 1),
                  "precision": s.get("precision"), "first_loss": s.get("first_loss"), "last_loss": s.get("last_loss")}
print("GPU " + json.dumps(out))
"""


def gpu_figures(tree: dict, pool_images: Path, checkpoint: str, work: Path, cache_dir: str) -> dict:
    r = subprocess.run([sys.executable, "-c", GPU_CHILD, str(pool_images), checkpoint, str(work / "gpu-train")],
                       env=tree_env(tree["path"], cache_dir), capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("GPU ")), None)
    if line is None:
        return {"available": None, "error": (r.stderr or r.stdout)[-1500:]}
    return json.loads(line[4:])


# ---- summary ------------------------------------------------------------------------------------
def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = len(xs) // 2
    return xs[k] if len(xs) % 2 else (xs[k - 1] + xs[k]) / 2


def summarise_round(img: dict, txt: dict, disk: dict, pool_meta: dict, bare_d: dict, bare_c: dict, workers: int) -> dict:
    st = {s["stage"]: s for s in img["stages"]}
    tt = {s["stage"]: s for s in txt["stages"]}
    io_by_stage = {k: (v["workers_write_bytes"] + (v["driver_write_bytes"] or 0)) for k, v in st.items()}
    io_total = sum(io_by_stage.values())
    pool_b, emitted = pool_meta["pool_bytes"], disk["emitted_set"]
    limit = GOALS["bytes_vs_pool_plus_emitted"] * (pool_b + emitted)
    rates = {k: v["rows_per_s"] for k, v in st.items()}
    text_rates = {k: v["rows_per_s"] for k, v in tt.items()}
    stage_sum = sum(v["stage_s"] for v in st.values())
    r = {
        "ok": img.get("returncode") == 0 and txt.get("returncode") == 0 and set(st) >= set(STAGES),
        "bytes": {
            "written_io_by_stage": io_by_stage, "written_io_total": io_total,
            "on_disk_by_stage": disk["by_stage"], "on_disk_total": disk["total"],
            "pool": pool_b, "emitted_set": emitted, "limit_1.1x_pool_plus_emitted": round(limit),
            "io_total_vs_pool_plus_emitted": round(io_total / (pool_b + emitted), 3) if pool_b + emitted else None,
            "disk_total_vs_pool_plus_emitted": round(disk["total"] / (pool_b + emitted), 3) if pool_b + emitted else None,
        },
        "rows_per_s": rates, "text_only_rows_per_s": text_rates,
        "rows_in": {k: v["rows_in"] for k, v in st.items()},
        "same_captions_text_only": all(tt.get(k, {}).get("rows_in") == st.get(k, {}).get("rows_in")
                                       for k in ("metaclip", "klite")),
        "text_only_rows_in": {k: v["rows_in"] for k, v in tt.items()},
        "peak_rss_per_worker_mib": {k: v["peak_rss_per_worker_mib"] for k, v in st.items()},
        "run_peak_rss_per_worker_mib": max((max(v["peak_rss_per_worker_mib"] or [0]) for v in st.values()), default=None),
        "whole_run": {"wall_s": img.get("wall_s"), "images_per_s": round(pool_meta["rows"] / img["wall_s"], 1)
                      if img.get("wall_s") else None, "stage_s_sum": round(stage_sum, 1),
                      "images_per_s_stage_time": round(pool_meta["rows"] / stage_sum, 1) if stage_sum else None},
    }
    ratio = {}
    for s in ("metaclip", "klite"):
        if rates.get(s) and text_rates.get(s):
            ratio[f"{s}_image_vs_text"] = round(rates[s] / text_rates[s], 3)
    if rates.get("align") and bare_d:
        r["align_rows_per_s_per_worker"] = round(rates["align"] / workers, 1)
        ratio["align_vs_bare_dhash_per_core"] = round(rates["align"] / workers / bare_d["rows_per_s_per_core"], 3)
        if bare_d.get("grey"):  # no goal: the same loop decoding to grey, as align does (not part of the goal)
            ratio["align_vs_bare_grey_dhash_per_core"] = round(
                rates["align"] / workers / bare_d["grey"]["rows_per_s_per_core"], 3)
    if rates.get("dfn") and bare_c:
        ratio["dfn_vs_bare_open_clip"] = round(rates["dfn"] / bare_c["rows_per_s_total"], 3)
    ratio["bytes_vs_pool_plus_emitted"] = r["bytes"]["io_total_vs_pool_plus_emitted"]
    r["ratios"] = ratio
    return r


def goals_of(ratios: dict) -> dict:
    out = {}
    for k, g in GOALS.items():
        v = ratios.get(k)
        if v is None:
            out[k] = {"goal": g, "value": None, "met": None}
        elif k == "bytes_vs_pool_plus_emitted":
            out[k] = {"goal": f"<= {g}", "value": v, "met": v <= g}
        else:
            out[k] = {"goal": f">= {g}", "value": v, "met": v >= g}
    return out


# ---- main ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="distinct JPEGs in the pool")
    ap.add_argument("--shard-rows", type=int, default=5_000,
                    help="rows per pool shard: 10 shards, 5 per worker, so no worker idles at a stage's end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="paired rounds (before and after each; order alternates)")
    ap.add_argument("--quick", action="store_true", help="smoke run: --n 2000 --shard-rows 500 --rounds 1")
    ap.add_argument("--before", default=DEFAULT_BEFORE, help="git revision (or folder) of the code before the change")
    ap.add_argument("--after", default=None, help="folder or git revision of the code after (default: this tree)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--exec", dest="exec_mode", choices=["scheduler", "workers"], default="scheduler",
                    help="scheduler: our own dask scheduler + workers (--scheduler), peaks reset per stage; "
                         "workers: the command's own LocalCluster (--workers), peaks read from /proc")
    ap.add_argument("--dfn-steps", type=int, default=50)
    ap.add_argument("--bare-dhash-rows", type=int, default=20_000)
    ap.add_argument("--bare-clip-rows", type=int, default=6_000)
    ap.add_argument("--build-procs", type=int, default=2)
    ap.add_argument("--cache", default=str(ROOT / "bench" / ".cache"), help="pool, trees, model, warm caches")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run's folder (disk: ~5x the pool before)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_bare", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_checkpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_batch", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._bare:
        _bare_child(args._bare, args._spec, args._checkpoint, args._batch)
        return 0
    if args.quick:
        args.n, args.shard_rows, args.rounds = 2000, 500, 1
        args.bare_dhash_rows, args.bare_clip_rows, args.dfn_steps = 1000, 500, 20
    args.out = args.out or str(ROOT / "bench" / "results" / ("images_quick.json" if args.quick else "images.json"))
    for p in (COCO, FLICKR, LAION):
        if not p.exists():
            print(f"images bench: {p} not found (../shared/data)")
            return 1
    t_bench = time.perf_counter()
    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    before = resolve_tree(args.before, cache)
    after = resolve_tree(args.after, cache)
    sides = {"before": before, "after": after}
    log(f"before: {before['path']} ({before['commit']}); after: {after['path']} ({after['commit']}"
        f"{', uncommitted changes' if after.get('dirty') else ''})")

    pool_dir = cache / pool_name(args.n, args.shard_rows, args.seed)
    pool_meta = build_pool(pool_dir, args.n, args.seed, args.shard_rows, args.build_procs)
    work = Path(tempfile.mkdtemp(prefix="bench-images-", dir=cache))
    warm = cache / "clipcurate-cache"
    timings = {"pool_build_s": pool_meta["build_s"]}
    try:
        t0 = time.perf_counter()
        warm_cache(before, warm, pool_dir / "text", work)
        timings["warm_cache_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        dfn = train_dfn(before, pool_dir, cache, warm, args.dfn_steps, args.n, args.seed)
        timings["dfn_train_s"] = dfn["train_s"]
        cfg_path = work / "config.toml"
        cfg = write_config(cfg_path, args.n, dfn)
        rounds = []
        fallback: dict[str, str] = {}

        def exec_of(side: str) -> str:
            return fallback.get(side, args.exec_mode)

        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            rd = {"round": r + 1, "order": order, "sides": {}}
            for side in order:
                tree = sides[side]
                name = f"r{r + 1}-{side}"
                runs = work / "runs"
                t0 = time.perf_counter()
                # each side's baselines next to the stage they are compared with (the VM's speed drifts):
                # dhash just before the run (align first), open_clip just after it (dfn last)
                bare_d = bare("dhash", pool_dir / "images", args.bare_dhash_rows, args.workers, before,
                              dfn["checkpoint"], 256)
                bare_g = bare("dhash_grey", pool_dir / "images", args.bare_dhash_rows, args.workers, before,
                              dfn["checkpoint"], 256)
                bare_d["grey"] = bare_g
                log(f"round {r + 1}: {side}: bare dhash {bare_d['rows_per_s_per_core']:,.0f} images/s per core "
                    f"({bare_g['rows_per_s_per_core']:,.0f} decoding straight to grey)")
                c_img = fresh_cache(warm, work / f"cache-{name}")
                log(f"round {r + 1}: {side}: image pool, {', '.join(STAGES)} ...")
                img = run_chain(tree, str(pool_dir / "images"), runs, name, str(cfg_path), STAGES, c_img,
                                exec_of(side), args.workers)
                if img["returncode"] != 0 and exec_of(side) == "scheduler" and \
                        "--scheduler" in img.get("error_tail", "") and "unrecognized" in img.get("error_tail", ""):
                    log(f"{side}: this tree's CLI has no --scheduler: its own LocalCluster (--exec workers) from now on")
                    fallback[side] = "workers"
                    shutil.rmtree(runs / name, ignore_errors=True)
                    c_img = fresh_cache(warm, work / f"cache-{name}")
                    img = run_chain(tree, str(pool_dir / "images"), runs, name, str(cfg_path), STAGES, c_img,
                                    exec_of(side), args.workers)
                disk = measure_disk(runs / name, c_img, img["stages"]) if (runs / name).exists() else {
                    "by_stage": {}, "total": 0, "emitted_set": 0, "folders": {}, "dfn_score_cache": 0}
                if not args.keep_runs:
                    shutil.rmtree(runs / name, ignore_errors=True)
                bare_c = bare("clip", pool_dir / "images", args.bare_clip_rows, args.workers, before,
                              dfn["checkpoint"], 256)
                log(f"round {r + 1}: {side}: bare open_clip {bare_c['rows_per_s_total']:,.0f} pairs/s on "
                    f"{args.workers} processes")
                c_txt = fresh_cache(warm, work / f"cache-{name}-text")
                log(f"round {r + 1}: {side}: text-only copy, {', '.join(TEXT_STAGES)} ...")
                txt = run_chain(tree, str(pool_dir / "text"), runs, name + "-text", str(cfg_path), TEXT_STAGES, c_txt,
                                exec_of(side), args.workers)
                shutil.rmtree(runs / (name + "-text"), ignore_errors=True)
                shutil.rmtree(c_img, ignore_errors=True)
                shutil.rmtree(c_txt, ignore_errors=True)
                summary = summarise_round(img, txt, disk, pool_meta, bare_d, bare_c, args.workers)
                rd["sides"][side] = {"summary": summary, "image_run": img, "text_only_run": txt, "disk": disk,
                                     "bare": {"dhash": bare_d, "open_clip": bare_c},
                                     "seconds": round(time.perf_counter() - t0, 1)}
                b = summary["bytes"]
                log(f"round {r + 1}: {side}: {summary['whole_run']['images_per_s']} images/s; written "
                    f"{b['written_io_total'] / 2**20:,.0f} MiB = {b['io_total_vs_pool_plus_emitted']}x (pool + emitted); "
                    f"ratios {summary['ratios']}")
            rounds.append(rd)
        log("GPU check ...")
        gpu = gpu_figures(after, pool_dir / "images", dfn["checkpoint"], work, fresh_cache(warm, work / "cache-gpu"))
    finally:
        if args.keep_runs:  # everything but the runs goes: their folder is what --keep-runs asked for
            for p in work.iterdir():
                if p.name != "runs":
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            log(f"runs kept in {work / 'runs'}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    result = {
        "bench": "images",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "shared 2-core VM: timings are noisy; see the loadavg next to each figure"},
        "trees": {k: {x: v[x] for x in ("spec", "commit", "dirty", "path")} for k, v in sides.items()},
        "pool": pool_meta, "config": cfg, "dfn_model": dfn, "workers": args.workers,
        "exec": {side: fallback.get(side, args.exec_mode) for side in sides},
        "goals": {k: (f"<= {v}" if k.startswith("bytes") else f">= {v}") for k, v in GOALS.items()},
        "setup_timings_s": timings,
        "rounds": rounds,
        "gpu": gpu,
    }
    med = {}
    for side in sides:
        sums = [rd["sides"][side]["summary"] for rd in rounds if side in rd["sides"]]
        ok = [s for s in sums if s["ok"]]
        if not ok:
            med[side] = {"ok": False}
            continue
        ratios = {k: _median([s["ratios"].get(k) for s in ok]) for k in ok[0]["ratios"]}
        med[side] = {
            "ok": True, "rounds": len(ok),
            "rows_per_s": {k: _median([s["rows_per_s"].get(k) for s in ok]) for k in ok[0]["rows_per_s"]},
            "text_only_rows_per_s": {k: _median([s["text_only_rows_per_s"].get(k) for s in ok])
                                     for k in ok[0]["text_only_rows_per_s"]},
            "rows_in": ok[0]["rows_in"],
            "bytes_written_by_stage_mib": {k: round(_median([s["bytes"]["written_io_by_stage"].get(k) for s in ok]) / 2**20, 1)
                                           for k in ok[0]["bytes"]["written_io_by_stage"]},
            "bytes_on_disk_by_stage_mib": {k: round(_median([s["bytes"]["on_disk_by_stage"].get(k) for s in ok]) / 2**20, 1)
                                           for k in ok[0]["bytes"]["on_disk_by_stage"]},
            "bytes_written_total_mib": round(_median([s["bytes"]["written_io_total"] for s in ok]) / 2**20, 1),
            "pool_mib": round(pool_meta["pool_bytes"] / 2**20, 1),
            "emitted_set_mib": round(_median([s["bytes"]["emitted_set"] for s in ok]) / 2**20, 1),
            "peak_rss_per_worker_mib": {k: max(max(s["peak_rss_per_worker_mib"][k] or [0]) for s in ok)
                                        for k in ok[0]["peak_rss_per_worker_mib"]},
            "run_peak_rss_per_worker_mib": max(s["run_peak_rss_per_worker_mib"] or 0 for s in ok),
            "whole_run_images_per_s": _median([s["whole_run"]["images_per_s"] for s in ok]),
            "whole_run_images_per_s_stage_time": _median([s["whole_run"]["images_per_s_stage_time"] for s in ok]),
            "ratios": ratios,
            "goals": goals_of(ratios),
        }
    result["median"] = med
    for side in sides:
        if med[side].get("ok"):
            got = [rd["sides"][side]["bare"] for rd in rounds if side in rd["sides"]]
            med[side]["bare"] = {
                "dhash_images_per_s_per_core": _median([b["dhash"]["rows_per_s_per_core"] for b in got]),
                "dhash_grey_images_per_s_per_core": _median([b["dhash"]["grey"]["rows_per_s_per_core"] for b in got
                                                             if b["dhash"].get("grey")]),
                "open_clip_pairs_per_s_total": _median([b["open_clip"]["rows_per_s_total"] for b in got])}
    if med.get("before", {}).get("ok") and med.get("after", {}).get("ok"):
        b, a = med["before"], med["after"]
        result["after_vs_before"] = {
            "bytes_written_total": round(a["bytes_written_total_mib"] / b["bytes_written_total_mib"], 3),
            "whole_run_images_per_s": round(a["whole_run_images_per_s"] / b["whole_run_images_per_s"], 3),
            "rows_per_s": {k: round(a["rows_per_s"][k] / b["rows_per_s"][k], 3)
                           for k in a["rows_per_s"] if b["rows_per_s"].get(k) and a["rows_per_s"].get(k)},
        }
    result["goals_met_after"] = {k: v["met"] for k, v in med.get("after", {}).get("goals", {}).items()}
    result["bench_s"] = round(time.perf_counter() - t_bench, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    for side in sides:
        m = med[side]
        if m.get("ok"):
            log(f"{side}: {m['whole_run_images_per_s']} images/s; rows/s {m['rows_per_s']}; written "
                f"{m['bytes_written_total_mib']:,} MiB (pool {m['pool_mib']:,} + emitted {m['emitted_set_mib']:,}); "
                "goals " + ", ".join(f"{k}: {v['value']} {v['met']}" for k, v in m["goals"].items()))
        else:
            log(f"{side}: failed (see rounds[].sides.{side} in {args.out})")
    log(f"GPU: {gpu}")
    log(f"wrote {args.out} ({result['bench_s']:.0f} s)")
    return 0 if all(m.get("ok") for m in med.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
