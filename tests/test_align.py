"""align: hand-computed pools per rule, a straightforward reference implementation, invariance to
sharding / order / workers, the demo world's noise labels, and the real caption sets."""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import config as config_mod
from pipeline import shards
from pipeline.runner import run_pipeline
from pipeline.schema import compute_uid
from pipeline.hashing import hash64_strings
from stages.align import (
    REASONS,
    AlignStage,
    HammingIndex,
    MinHasher,
    dhash64,
    inspect_image,
    shingles,
    tokenize,
    normalise_text,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is absent")


# ---- helpers ---------------------------------------------------------------------------------------
def png(colour=(10, 20, 30), size=(16, 16), pattern: int | None = None) -> bytes:
    """A small PNG; `pattern` draws seeded noise (distinct perceptual hashes)."""
    if pattern is None:
        arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array(colour, np.uint8)
    else:
        arr = (np.random.default_rng(pattern).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


def make_table(texts, images=None, urls=None, sizes=None) -> pa.Table:
    n = len(texts)
    urls = urls or [f"http://example.invalid/{i}.jpg" for i in range(n)]
    cols = {"uid": compute_uid(urls, texts), "url": urls, "text": pa.array(texts, pa.string())}
    if images is not None:
        cols["image"] = pa.array(images, pa.binary())
        sizes = sizes or [(400, 400)] * n
        cols["orig_width"] = pa.array([s[0] for s in sizes], pa.int32())
        cols["orig_height"] = pa.array([s[1] for s in sizes], pa.int32())
    return pa.table(cols)


def write_pool(table: pa.Table, folder, n_shards=1, order=None) -> str:
    if order is not None:
        table = table.take(pa.array(order))
    bounds = np.linspace(0, table.num_rows, n_shards + 1).astype(int)
    for i in range(n_shards):
        shards.write_shard(table.slice(bounds[i], bounds[i + 1] - bounds[i]), os.path.join(str(folder), f"part-{i:05d}.parquet"))
    return str(folder)


def run_align(tmp_path, table, cfg=None, n_shards=1, order=None, workers=0, name="run", per_partition=8):
    inp = write_pool(table, tmp_path / f"in-{name}", n_shards, order)
    config = config_mod.resolve({"align": cfg or {}, "run": {"stats_shards_per_partition": per_partition}})
    res = run_pipeline(["align"], str(tmp_path / name), config, input_dir=inp, workers=workers)
    return res[0]


def outcome(stage_dir) -> dict[str, str | None]:
    """uid -> reason (None = kept)."""
    out = {}
    for p in sorted(glob.glob(os.path.join(stage_dir, "part-*.parquet"))):
        for u in pq.read_table(p, columns=["uid"]).column("uid").to_pylist():
            out[u] = None
    for p in sorted(glob.glob(os.path.join(stage_dir, "rejected", "part-*.parquet"))):
        t = pq.read_table(p, columns=["uid", "reason"])
        out.update(zip(t.column("uid").to_pylist(), t.column("reason").to_pylist()))
    return out


def by_text(table: pa.Table, res) -> dict[str, list]:
    o = outcome(res.folder)
    d = defaultdict(list)
    for u, t in zip(table.column("uid").to_pylist(), table.column("text").to_pylist()):
        d[t].append(o[u])
    return d


# ---- building blocks against references ---------------------------------------------------------------
def _ref_hash64(s: str, salt: str = "") -> int:
    """The same hash written byte by byte in plain Python."""
    M = (1 << 64) - 1

    def mix(x):
        z = (x + 0x9E3779B97F4A7C15) & M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    b = s.encode()
    salt_v = int.from_bytes(hashlib.blake2b(("hash64:" + salt).encode(), digest_size=8).digest(), "little")
    h = mix(len(b) ^ salt_v)
    for i in range(0, len(b), 8):
        h = mix(h ^ int.from_bytes(b[i : i + 8], "little"))
    return h


def test_hash64_strings_matches_plain_python_and_ignores_chunking():
    texts = ["", "a", "abcdefgh", "abcdefghi", "héllo wörld " * 7, "x" * 65, "日本語のテキスト"]
    got = hash64_strings(pa.array(texts), "t")
    assert [int(x) for x in got] == [_ref_hash64(s, "t") for s in texts]
    chunked = pa.chunked_array([pa.array(texts[:3]), pa.array(texts[3:])])
    assert (hash64_strings(chunked, "t") == got).all()
    assert (hash64_strings(pa.array(texts).slice(2), "t") == got[2:]).all()
    assert hash64_strings(pa.array(["a"]), "x")[0] != hash64_strings(pa.array(["a"]), "y")[0]
    assert int(hash64_strings(pa.array([None, ""]))[0]) == int(hash64_strings(pa.array([""]))[0])


def test_normalisation_and_tokens():
    import polars as pl

    s = pl.Series(["  A  Dog\tRUNS\n", "ＦＵＬＬ width", "don't stop e-mail", "1920x1080", None])
    norm = normalise_text(s).to_list()
    assert norm == ["a dog runs", "full width", "don't stop e-mail", "1920x1080", ""]
    assert tokenize(normalise_text(s)).to_list() == [
        ["a", "dog", "runs"], ["full", "width"], ["don't", "stop", "e", "mail"], ["1920x1080"], []
    ]


def test_minhash_equals_datasketch_update():
    import polars as pl
    from datasketch import MinHash

    caps = ["a dog runs on the beach", "two cats", "a dog runs on the sand today", "x"]
    for k in (1, 2, 3):
        toks = tokenize(pl.Series(caps))
        rows, sh = shingles(toks, k)
        mh = MinHasher(64, 1, 0.8)
        ids, sig = mh.signatures(rows, sh, len(caps))
        assert list(ids) == [0, 1, 2, 3]
        for i, c in enumerate(caps):
            w = c.split()
            grams = {" ".join(w[j : j + k]) for j in range(max(1, len(w) - k + 1))}
            m = MinHash(num_perm=64, seed=1)
            for g in grams:
                m.update(g.encode())
            assert (sig[i] == m.hashvalues).all(), (k, c)


def test_hamming_index_equals_brute_force():
    rng = np.random.default_rng(0)
    ev = rng.integers(0, 2**63, 300, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 300, dtype=np.uint64)
    q = rng.integers(0, 2**63, 400, dtype=np.uint64)
    # plant near copies: flip d random bits of an eval hash, d in 0..9
    for i in range(200):
        h = int(ev[rng.integers(0, 300)])
        for b in rng.choice(64, size=int(rng.integers(0, 10)), replace=False):
            h ^= 1 << int(b)
        q[i] = h
    for k in (0, 3, 6, 10):
        brute = np.array([min(bin(int(x) ^ int(e)).count("1") for e in ev) <= k for x in q])
        assert (HammingIndex(ev, k).near(q) == brute).all(), k
    assert not HammingIndex(np.zeros(0, np.uint64), 6).near(q).any()


def test_inspect_image_never_raises():
    good = png(size=(40, 30), pattern=1)
    ok, w, h, ph = inspect_image(good, 10**8)
    assert ok and (w, h) == (40, 30) and ph == dhash64(Image.open(io.BytesIO(good)))
    assert inspect_image(None, 10**8)[0] is False
    assert inspect_image(b"not an image", 10**8)[0] is False
    assert inspect_image(good[: len(good) // 2], 10**8)[0] is False  # truncated
    assert inspect_image(good, 40 * 30 - 1)[0] is False  # over the pixel limit: refused before decoding


# ---- one rule at a time, hand-computed ----------------------------------------------------------------
def test_image_size_and_aspect_boundaries(tmp_path):
    sizes = {"s199 a b c": (199, 400), "s200 a b c": (200, 400), "a3 a b c": (600, 200), "a301 a b c": (602, 200),
             "tall a b c": (200, 601)}
    texts = list(sizes)
    t = make_table(texts, [png(pattern=i) for i in range(len(texts))], sizes=[sizes[x] for x in texts])
    got = {k: v[0] for k, v in by_text(t, run_align(tmp_path, t, {"min_token_count": 0})).items()}
    assert got == {"s199 a b c": "image_too_small", "s200 a b c": None, "a3 a b c": None,
                   "a301 a b c": "aspect_ratio", "tall a b c": "aspect_ratio"}


def test_text_shared_by_10_vs_11_images_with_case_and_whitespace(tmp_path):
    texts, images = [], []
    for i in range(10):  # "click to enlarge" on 10 distinct images, in various spellings
        texts.append(["Click to enlarge", "click  to enlarge ", "CLICK TO ENLARGE"][i % 3])
        images.append(png(pattern=100 + i))
    for i in range(11):
        texts.append(["View full size", "view full\tsize"][i % 2])
        images.append(png(pattern=200 + i))
    # the same text on the same image again does not count as another image
    texts.append("view full size")
    images.append(png(pattern=200))
    t = make_table(texts, images)
    got = by_text(t, run_align(tmp_path, t, {"min_token_count": 0}))
    assert all(r is None for k in ("Click to enlarge", "CLICK TO ENLARGE") for r in got[k])
    assert got["click  to enlarge "] == [None, None, None]
    assert set(got["View full size"] + got["view full\tsize"]) == {"text_many_images"}
    assert got["view full size"] == ["text_many_images"]


def test_image_with_1000_vs_1001_texts(tmp_path):
    a, b = png((200, 0, 0)), png((0, 0, 200))
    texts = [f"photo number {i} here" for i in range(1000)] + [f"picture number {i} here" for i in range(1001)]
    t = make_table(texts, [a] * 1000 + [b] * 1001)
    res = run_align(tmp_path, t, {"min_token_count": 0, "near_dup_threshold": 1.0})
    o = outcome(res.folder)
    reasons = [o[u] for u in t.column("uid").to_pylist()]
    assert "image_many_texts" not in reasons[:1000]
    assert set(reasons[1000:]) == {"image_many_texts"}
    assert res.manifest["reasons"]["image_many_texts"] == 1001


def test_word_count_boundaries(tmp_path):
    w = "word"
    texts = ["two words", "three words here", " ".join([w] * 20), " ".join([w] * 21), "don't stop now", "e-mail me"]
    t = make_table(texts, [png(pattern=i) for i in range(len(texts))])
    got = {k: v[0] for k, v in by_text(t, run_align(tmp_path, t, {"min_token_count": 0})).items()}
    assert got == {"two words": "too_few_words", "three words here": None, texts[2]: None, texts[3]: "too_many_words",
                   "don't stop now": None, "e-mail me": None}


def test_rare_token_needs_both_pool_rarity_and_reference_rarity(tmp_path):
    texts = [
        "a dog on qzxvbnm",      # qzxvbnm: once in the pool, unknown to wordfreq -> rare
        "a dog near a beech",    # beech: once in the pool, but a real word (Zipf > 1.5) -> kept
        "a cat on plokijuh",     # plokijuh: twice in the pool -> not rare with min_token_count 2
        "a bird on plokijuh",
    ]
    t = make_table(texts, [png(pattern=i) for i in range(len(texts))])
    got = {k: v[0] for k, v in by_text(t, run_align(tmp_path, t)).items()}
    assert got == {texts[0]: "rare_token", texts[1]: None, texts[2]: None, texts[3]: None}
    got3 = {k: v[0] for k, v in by_text(t, run_align(tmp_path, t, {"min_token_count": 3}, name="r3")).items()}
    assert got3[texts[2]] == got3[texts[3]] == "rare_token" and got3[texts[1]] is None
    zipf0 = {k: v[0] for k, v in by_text(t, run_align(tmp_path, t, {"min_zipf": 9.0}, name="z")).items()}
    assert zipf0[texts[1]] == "rare_token"  # beech seen once and every word counts as unknown


def test_exact_and_near_duplicates_keep_smallest_uid(tmp_path):
    img1, img2 = png(pattern=1), png(pattern=2)
    texts = ["A dog runs on the beach", "a  dog runs on the BEACH", "a dog runs on the beach!",
             "a dog runs on the beach", "a dog runs on the beach", "the sky is very blue today"]
    images = [img1, img1, img1, img2, img1, img1]
    urls = [f"http://e.invalid/{i}" for i in range(len(texts))]
    t = make_table(texts, images, urls=urls)
    o = outcome(run_align(tmp_path, t).folder)
    uids = t.column("uid").to_pylist()
    same_img = [0, 1, 2, 4]  # image 1, texts equal up to case/space/punctuation
    exact = [0, 1, 4]  # normalised text identical
    keeper = min(uids[i] for i in same_img)
    for i in same_img:
        if uids[i] == keeper:
            assert o[uids[i]] is None
        elif i in exact and keeper in [uids[j] for j in exact]:
            assert o[uids[i]] == "exact_duplicate"
        else:
            assert o[uids[i]] in ("exact_duplicate", "near_duplicate")
    ex_keep = min(uids[i] for i in exact)
    for i in exact:
        assert o[uids[i]] == (None if uids[i] == ex_keep else "exact_duplicate")
    assert o[uids[3]] is None  # same text, another image
    assert o[uids[5]] is None  # another text, same image


def test_copies_of_a_uid_keep_one_whatever_the_shards(tmp_path):
    # the very same row three times, and a copy of another uid that differs in a column (orig size): one row
    # per uid survives, the rest are exact_duplicate, and which one does not depend on shards, order or workers
    img = png(pattern=3)
    texts = ["a red kite flying high"] * 3 + ["a blue boat on a lake"] * 2 + ["a green field at dawn"]
    urls = ["http://e.invalid/k"] * 3 + ["http://e.invalid/b"] * 2 + ["http://e.invalid/g"]
    sizes = [(400, 400)] * 3 + [(400, 400), (500, 500)] + [(400, 400)]
    t = make_table(texts, [img, img, img, png(pattern=4), png(pattern=4), png(pattern=5)], urls=urls, sizes=sizes)
    kept_sizes = set()
    for i, (n_shards, order, workers) in enumerate([(1, None, 0), (3, [5, 4, 3, 2, 1, 0], 0), (2, [3, 0, 5, 1, 4, 2], 2)]):
        res = run_align(tmp_path, t, n_shards=n_shards, order=order, workers=workers, name=f"r{i}")
        assert res.manifest["rows_out"] == 3 and res.manifest["reasons"] == {"exact_duplicate": 3}
        kept = pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(os.path.join(res.folder, "part-*.parquet")))])
        assert sorted(kept.column("uid").to_pylist()) == sorted(set(t.column("uid").to_pylist()))
        boat = kept.filter(pc.equal(kept.column("text"), "a blue boat on a lake"))
        kept_sizes.add(boat.column("orig_width")[0].as_py())
    assert len(kept_sizes) == 1  # the same copy of the boat each time


def test_unreadable_images_are_a_reason_not_a_crash(tmp_path):
    good = png(size=(90, 90), pattern=7)  # 8,100 px: under the 10,000 px limit set below
    texts = ["a good image of a tree", "corrupt bytes of a tree", "truncated image of a tree", "missing image of a tree",
             "huge image of a tree"]
    images = [good, b"\x89PNG\r\n\x1a\nnope", good[:200], None, png(size=(120, 120), pattern=8)]
    t = make_table(texts, images, sizes=[(300, 300)] * 5)
    got = {k: v[0] for k, v in by_text(t, run_align(tmp_path, t, {"max_image_pixels": 100 * 100})).items()}
    assert got == {texts[0]: None, texts[1]: "image_unreadable", texts[2]: "image_unreadable",
                   texts[3]: "image_unreadable", texts[4]: "image_unreadable"}


def test_eval_decontamination_catches_resized_reencoded_copies(tmp_path):
    def photo(seed, size=(256, 192)):
        rng = np.random.default_rng(seed)
        small = (rng.random((6, 8, 3)) * 255).astype(np.uint8)  # smooth structure survives resizing
        return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)

    def enc(img, fmt="PNG", **kw):
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        return b.getvalue()

    ev = [photo(s) for s in range(5)]
    pq.write_table(pa.table({"image": [enc(e) for e in ev], "label": list(range(5))}), tmp_path / "eval.parquet")
    (tmp_path / "evdir" / "sub").mkdir(parents=True)
    for i, e in enumerate(ev):
        e.save(tmp_path / "evdir" / "sub" / f"{i}.png")
    texts = ["copy of eval zero", "jpeg copy of eval one", "resized copy of eval two", "a different photo here",
             "another different photo"]
    images = [enc(ev[0]), enc(ev[1].convert("RGB"), "JPEG", quality=70), enc(ev[2].resize((400, 300))),
              enc(photo(50)), enc(photo(51))]
    t = make_table(texts, images)
    for name, path in (("pq", tmp_path / "eval.parquet"), ("dir", tmp_path / "evdir")):
        res = run_align(tmp_path, t, {"eval_images": str(path), "min_token_count": 0}, name=name)
        got = {k: v[0] for k, v in by_text(t, res).items()}
        assert got == dict(zip(texts, ["eval_near_duplicate"] * 3 + [None, None])), name
    kept = pq.read_table(os.path.join(res.folder, "part-00000.parquet"))
    assert kept.schema.field("image_phash").type == pa.uint64() and kept.column("image_phash").null_count == 0
    rej = pq.read_table(os.path.join(res.folder, "rejected", "part-00000.parquet"))
    assert "image_phash" in rej.column_names and "image_hash" in rej.column_names


def test_first_broken_rule_is_named(tmp_path):
    # tiny AND one word AND on 11 images: named image_too_small; then text_many_images beats word count
    texts = ["x"] * 11 + ["hi"] * 11
    images = [png(pattern=i) for i in range(22)]
    sizes = [(50, 50)] + [(400, 400)] * 21
    t = make_table(texts, images, sizes=sizes)
    got = by_text(t, run_align(tmp_path, t))
    assert got["x"][0] == "image_too_small" and set(got["x"][1:]) == {"text_many_images"}
    assert set(got["hi"]) == {"text_many_images"}


def test_text_only_pool_runs_text_rules_and_says_what_was_skipped(tmp_path):
    texts = ["alt img"] * 11 + ["a dog runs on the grass", "a dog runs on the grass", "one", "a cat qzxvbnm sleeping"]
    urls = [f"http://e.invalid/{i}" for i in range(11)] + ["http://e.invalid/d"] * 2 + ["http://e.invalid/o", "http://e.invalid/c"]
    t = make_table(texts, urls=urls)
    res = run_align(tmp_path, t)
    got = by_text(t, res)
    assert set(got["alt img"]) == {"text_many_images"}
    # same url, same text, same uid: one copy kept, the other an exact_duplicate
    dog = compute_uid(["http://e.invalid/d"], ["a dog runs on the grass"])[0].as_py()
    kept_uids = pq.read_table(os.path.join(res.folder, "part-00000.parquet")).column("uid").to_pylist()
    assert kept_uids.count(dog) == 1 and res.manifest["reasons"]["exact_duplicate"] == 1
    assert got["one"] == ["too_few_words"] and got["a cat qzxvbnm sleeping"] == ["rare_token"]
    notes = " ".join(res.manifest["notes"])
    assert "skipped" in notes and "image_too_small" in notes and "aspect_ratio" in notes and "url stands in" in notes
    # no url either: duplicate and image-count rules are skipped too
    t2 = t.drop_columns(["url"])
    res2 = run_align(tmp_path, t2, name="nourl")
    assert "text_many_images" in " ".join(res2.manifest["notes"])
    assert res2.manifest["reasons"].get("text_many_images", 0) == 0
    kept = pq.read_table(os.path.join(res2.folder, "part-00000.parquet"))
    assert kept.schema.field("image_phash").type == pa.uint64()


def test_config_is_validated_and_report_shows_funnel(tmp_path):
    with pytest.raises(config_mod.ConfigError):
        config_mod.resolve({"align": {"max_word": 3}})
    with pytest.raises(Exception):
        AlignStage({"min_words": 5, "max_words": 4})
    t = make_table(["one", "a nice red apple", "alt img"], [png(pattern=i) for i in range(3)])
    res = run_align(tmp_path, t)
    rep = AlignStage().report(res.folder, str(tmp_path / "report"))
    funnel = rep["tables"][0]
    assert funnel.header == ["rule", "dropped", "share of input", "remaining"]
    assert [r[0] for r in funnel.rows[:-1]] == REASONS
    md = funnel.markdown()
    assert "| too_few_words | 2 |" in md and funnel.rows[-1][0] == "kept" and funnel.rows[-1][-1] == 1
    assert rep["figures"] and os.path.exists(rep["figures"][0][1])


# ---- reference implementation and invariance -----------------------------------------------------------
def _random_pool(n=360, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    vocab = "a the dog cat red blue small big runs sits on in near beach park house car tree water sky".split()
    junk = ["qzxvbnm", "plokijuh", "wxyzzy", "brrrmf"]
    imgs = [png(pattern=int(i)) for i in range(40)]
    sizes = [(400, 300)] * 34 + [(150, 300), (300, 150), (1000, 200), (200, 1000), (300, 300), (250, 250)]
    texts, images, urls, sz = [], [], [], []
    base = []
    for i in range(n):
        r = rng.random()
        k = int(rng.integers(0, 40))
        if r < 0.15 and base:  # a near or exact copy of an earlier caption on the same image
            t0, k = base[int(rng.integers(0, len(base)))]
            t = rng.choice([t0, t0.upper(), t0 + ".", t0.replace(" ", "  "), " ".join(t0.split()[:-1] + ["tree"])])
        elif r < 0.22:
            t = str(rng.choice(["alt img", "image", "click here to see more"]))
        else:
            words = list(rng.choice(vocab, size=int(rng.integers(1, 24))))
            if rng.random() < 0.1:
                words.append(str(rng.choice(junk)) + str(int(rng.integers(0, 3))))
            t = " ".join(words)
            base.append((t, k))
        texts.append(str(t))
        images.append(imgs[k])
        sz.append(sizes[k])
        urls.append(f"http://e.invalid/{i % 300}")
    return make_table(texts, images, urls=urls, sizes=sz)


def reference(table: pa.Table, cfg: AlignStage.Config) -> dict[str, str | None]:
    """Each rule written out plainly over Python lists (datasketch's own MinHash/LSH for candidates)."""
    import wordfreq
    from datasketch import MinHash, MinHashLSH

    uids = table.column("uid").to_pylist()
    texts = table.column("text").to_pylist()
    imgs = table.column("image").to_pylist()
    W, H = table.column("orig_width").to_pylist(), table.column("orig_height").to_pylist()
    norm = [re.sub(r"\s+", " ", unicodedata.normalize("NFKC", t).lower()).strip() for t in texts]
    toks = [re.findall(r"\w+(?:['’]\w+)*", x) for x in norm]
    img_id = [hashlib.sha256(b).hexdigest() for b in imgs]
    texts_of, imgs_of = defaultdict(set), defaultdict(set)
    for i in range(len(uids)):
        texts_of[img_id[i]].add(norm[i])
        imgs_of[norm[i]].add(img_id[i])
    tok_n = Counter(w for ts in toks for w in ts)
    first_uid = {}
    for i in range(len(uids)):
        key = (img_id[i], norm[i])
        first_uid[key] = min(first_uid.get(key, uids[i]), uids[i])
    lsh_by_img, mh = {}, {}
    for i in range(len(uids)):
        if cfg.min_words <= len(toks[i]) <= cfg.max_words:
            m = MinHash(num_perm=cfg.num_perm, seed=cfg.minhash_seed)
            for w in set(toks[i]):
                m.update(w.encode())
            mh[i] = m
            lsh = lsh_by_img.setdefault(img_id[i], MinHashLSH(threshold=cfg.near_dup_threshold, num_perm=cfg.num_perm))
            lsh.insert(i, m)
    out = {}
    for i, u in enumerate(uids):
        lo, hi = min(W[i], H[i]), max(W[i], H[i])
        exact = first_uid[(img_id[i], norm[i])] < u
        near = (not exact) and i in mh and any(uids[j] < u for j in lsh_by_img[img_id[i]].query(mh[i]))
        rules = [
            ("image_too_small", lo < cfg.min_side),
            ("aspect_ratio", hi > cfg.max_aspect * lo),
            ("image_many_texts", len(texts_of[img_id[i]]) > cfg.max_texts_per_image),
            ("text_many_images", len(imgs_of[norm[i]]) > cfg.max_images_per_text),
            ("too_few_words", len(toks[i]) < cfg.min_words),
            ("too_many_words", len(toks[i]) > cfg.max_words),
            ("rare_token", any(tok_n[w] < cfg.min_token_count and wordfreq.zipf_frequency(w, "en") < cfg.min_zipf for w in toks[i])),
            ("exact_duplicate", exact),
            ("near_duplicate", near),
        ]
        out[u] = next((name for name, broken in rules if broken), None)
    return out


POOL_CFG = {"max_images_per_text": 5, "max_texts_per_image": 12}


def test_matches_reference_and_is_independent_of_shards_order_and_workers(tmp_path):
    """One shard (one statistics partition), then 7 shards in 4 partitions in-process, then 5 shards in 5
    partitions on 2 Dask workers: the pool-wide rules see the same pool whatever the shuffle."""
    t = _random_pool()
    cfg = AlignStage.Config(**POOL_CFG)
    ref = reference(t, cfg)
    base = run_align(tmp_path, t, POOL_CFG, n_shards=1, name="one")
    got = outcome(base.folder)
    assert got == ref
    reasons = Counter(ref.values())
    for r in ("image_too_small", "aspect_ratio", "image_many_texts", "text_many_images", "too_few_words",
              "too_many_words", "rare_token", "exact_duplicate", "near_duplicate"):
        assert reasons[r] > 0, r  # the pool exercises every rule
    assert base.manifest["stats_partitions"] == 1
    perm = np.random.default_rng(1).permutation(t.num_rows)
    seven = run_align(tmp_path, t, POOL_CFG, n_shards=7, order=perm, name="seven", per_partition=2)
    assert seven.manifest["stats_partitions"] == 4 and outcome(seven.folder) == got
    dask = run_align(tmp_path, t, POOL_CFG, n_shards=5, workers=2, name="dask", per_partition=1)
    assert dask.manifest["stats_partitions"] == 5 and outcome(dask.folder) == got
    assert not (Path(dask.folder) / "_shuffle").exists()  # pieces and answers do not outlive the stage
    # byte-identical rerun
    again = run_align(tmp_path, t, POOL_CFG, n_shards=5, workers=0, name="again", per_partition=1)
    for p in sorted(glob.glob(os.path.join(dask.folder, "**", "*.parquet"), recursive=True)):
        q = p.replace(dask.folder, again.folder)
        assert Path(p).read_bytes() == Path(q).read_bytes(), p


def test_shuffled_statistics_are_reused_while_needed_and_recomputed_once_gone(tmp_path, monkeypatch):
    """A run that fails in apply keeps the answers: its rerun reuses them (no pass 1). Once every shard is done
    they are removed; a rerun with every shard done runs no pass 1; one with a shard's output lost shuffles
    again. Every run gives the rows of an unbroken run, and leaves no temporary in stats/ or _shuffle/."""
    t = _random_pool(n=160, seed=2)
    want = outcome(run_align(tmp_path, t, POOL_CFG, n_shards=4, name="ref", per_partition=2).folder)
    inp = write_pool(t, tmp_path / "in", 4)
    config = config_mod.resolve({"align": POOL_CFG, "run": {"stats_shards_per_partition": 2}})
    folder = tmp_path / "r" / "01_align"

    def run():
        return run_pipeline(["align"], str(tmp_path / "r"), config, input_dir=inp, workers=0)[0]

    real_apply = AlignStage.apply

    def apply_failing_on_shard_2(self, table, stats, ctx=None):
        if ctx.shard == "part-00002.parquet":
            raise OSError("disk went away")
        return real_apply(self, table, stats, ctx)

    monkeypatch.setattr(AlignStage, "apply", apply_failing_on_shard_2)
    with pytest.raises(Exception, match="disk went away"):
        run()
    assert len(list((folder / "_shuffle" / "answers").glob("p*.bundle"))) == 2
    (folder / "stats" / "p0001" / ".tmp-0f-token_counts.parquet").write_bytes(b"half")  # a killed writer's
    monkeypatch.setattr(AlignStage, "apply", real_apply)
    res = run()
    assert "collect_s" not in res.manifest["timings"] and outcome(folder) == want  # answers reused
    assert not (folder / "_shuffle").exists() and not list(folder.rglob(".tmp-*"))
    assert sorted(p.name for p in (folder / "stats").iterdir()) == ["p0000", "p0001"]
    assert shards.read_json(str(folder / "stats" / "p0000" / "meta.json"))["rows"] == 160  # pool-wide, in p0000
    again = run()
    assert "collect_s" not in again.manifest["timings"] and outcome(folder) == want
    (folder / "part-00002.parquet").unlink()
    third = run()
    assert "collect_s" in third.manifest["timings"] and outcome(folder) == want
    assert 0 < third.manifest["stats_answer_bytes"]["mean"] <= third.manifest["stats_answer_bytes"]["max"]
    assert not (folder / "_shuffle").exists()


def test_language_rule_is_optional(tmp_path):
    pytest.importorskip("py3langid")
    texts = ["a black dog is running through the green grass", "un chien noir court dans l'herbe verte",
             "ein schwarzer Hund rennt durch das grüne Gras", "two children are playing football in the park"]
    t = make_table(texts, [png(pattern=i) for i in range(4)])
    off = {k: v[0] for k, v in by_text(t, run_align(tmp_path, t, {"min_token_count": 0}, name="off")).items()}
    assert set(off.values()) == {None}
    on = {k: v[0] for k, v in by_text(t, run_align(tmp_path, t, {"min_token_count": 0, "language": "en"}, name="on")).items()}
    assert on == dict(zip(texts, [None, "language", "language", None]))


# ---- real captions ------------------------------------------------------------------------------------
def _real(name: str) -> pa.Table:
    import polars as pl

    if name == "flickr":
        df = pl.read_parquet(SHARED_DATA / "flickr8k_captions" / "flickr8k_captions.parquet")
        url, text = ("flickr8k/" + df["image"]).to_arrow(), df["caption"].to_arrow()
    else:
        df = pl.read_parquet(SHARED_DATA / "laion_sample_10k" / "laion_sample_10k.parquet")
        url, text = df["url"].to_arrow(), df["text"].to_arrow()
    return pa.table({"uid": compute_uid(url, text), "url": url, "text": text})


def _shares(table: pa.Table) -> dict[str, float]:
    st = AlignStage().ensure_ready()
    _, rej = st.apply(table, st.merge([st.collect(table)]))
    c = Counter(rej.column("reason").to_pylist())
    return {r: c[r] / table.num_rows for r in REASONS}


@needs_data
def test_real_captions_flickr_survives_text_rules_laion_does_not():
    fl, la = _shares(_real("flickr")), _shares(_real("laion"))
    text_rules = ("too_few_words", "too_many_words", "rare_token")
    assert 1 - sum(fl[r] for r in text_rules) >= 0.95  # clean human captions
    assert fl["rare_token"] < 0.03  # DESIGN: ~1.6% of Flickr8k
    assert 0.15 < la["rare_token"] < 0.40  # raw alt-text: typos, codes, junk (~28% here)


# ---- the demo world's ground truth ----------------------------------------------------------------
def test_demo_world_noise_is_found_and_clean_pairs_kept(demo_ingested):
    """Precision/recall per noise kind against the demo world's labels (the pipeline never reads them)."""
    import polars as pl

    from pipeline.cli import main as cli_main

    world, runs, run = demo_ingested
    assert cli_main(["--runs-dir", str(runs), "run", "align", "--run", run, "--workers", "0"]) == 0
    stage = runs / run / "01_align"
    kept = pl.concat([pl.read_parquet(p, columns=["uid"]) for p in glob.glob(str(stage / "part-*.parquet"))])
    rej = pl.concat([pl.read_parquet(p, columns=["uid", "reason"]) for p in glob.glob(str(stage / "rejected" / "*.parquet"))])
    truth = pl.read_parquet(world / "truth.parquet")
    out = truth.join(pl.concat([kept.with_columns(reason=pl.lit(None, pl.String)), rej]), on="uid", how="inner")
    ingested = truth.filter(~pl.col("kind").is_in(["http_404", "not_image"]))
    assert out.height == ingested.height  # every ingested row is either kept or rejected with a reason

    def recall(kind, reasons=None):
        rows = out.filter(pl.col("kind") == kind)
        hit = rows.filter(pl.col("reason").is_not_null() if reasons is None else pl.col("reason").is_in(reasons))
        return hit.height / rows.height

    assert recall("boilerplate", ["text_many_images"]) >= 0.95
    assert recall("small_image", ["image_too_small"]) >= 0.95
    assert recall("odd_aspect", ["aspect_ratio"]) >= 0.95
    assert recall("eval_copy", ["eval_near_duplicate"]) >= 0.95
    assert recall("many_texts", ["image_many_texts"]) >= 0.95
    assert recall("too_long", ["too_many_words"]) >= 0.95
    assert recall("too_short") >= 0.95  # too_few_words, or text_many_images for a short string many images share
    assert recall("rare_token", ["rare_token"]) >= 0.95

    # duplicates: of each (original, copy) pair exactly one survives
    pairs = out.filter(pl.col("dup_group").is_not_null()).group_by("dup_group").agg(
        survivors=pl.col("reason").is_null().sum(), kinds=pl.col("kind"), reasons=pl.col("reason"))
    exact = pairs.filter(pl.col("kinds").list.contains("exact_duplicate"))
    near = pairs.filter(pl.col("kinds").list.contains("near_duplicate"))
    assert (exact["survivors"] == 1).mean() >= 0.95 and (near["survivors"] == 1).mean() >= 0.95
    assert exact["reasons"].list.drop_nulls().list.first().is_in(["exact_duplicate"]).mean() >= 0.95

    # clean pairs kept (a duplicate pair counts as kept when one of the two survives)
    clean = out.filter((pl.col("kind") == "clean") & pl.col("dup_group").is_null())
    assert clean["reason"].is_null().mean() >= 0.95
    # and the rules barely touch well-formed captions that merely describe another image (not their job)
    assert out.filter(pl.col("kind") == "mismatched")["reason"].is_null().mean() >= 0.9


def test_apply_takes_collects_band_keys_and_gives_the_same_result_without_them(tmp_path, monkeypatch):
    """MinHash runs once per shard (collect); apply reads the keys from the stage folder, leaves no cache,
    and recomputing them (no cache) gives the same outcome."""
    import stages.align as align_mod

    base = ["a dog runs on the beach", "a dog runs on the beach today", "the sky is very blue today",
            "red apples on a wooden table", "red apples on the wooden table", "a cat sleeps on a warm sofa"]
    texts = [f"{t} {w}" for t in base for w in ("", "now", "again")] * 3
    urls = [f"http://e.invalid/{i % 7}" for i in range(len(texts))]
    t = make_table(texts, urls=urls)
    calls = []
    real = align_mod.AlignStage._bands
    monkeypatch.setattr(align_mod.AlignStage, "_bands", lambda self, f, m: calls.append(int(m.sum())) or real(self, f, m))
    res = run_align(tmp_path, t, n_shards=3)
    assert len(calls) == 3  # collect only
    assert not list((Path(res.folder) / "_cache").glob("*"))
    with_cache = outcome(res.folder)
    assert "near_duplicate" in with_cache.values() or "exact_duplicate" in with_cache.values()

    monkeypatch.setattr(align_mod.AlignStage, "_cache_bands", lambda self, *a: None)  # no cache written
    calls.clear()
    res2 = run_align(tmp_path, t, n_shards=3, name="nocache")
    assert len(calls) == 6  # collect and apply each compute them
    assert outcome(res2.folder) == with_cache


def test_image_facts_are_the_same_on_one_thread_and_many(monkeypatch):
    """The threaded image pass writes each row's facts exactly as the plain loop does: None rows, corrupt and
    truncated bytes, bombs, and good images spread over several chunks (chunk made small to cross many)."""
    import stages.align as align_mod

    monkeypatch.setattr(align_mod, "IMAGE_CHUNK", 7)
    good = [png(size=(20 + i % 9, 30), pattern=i) for i in range(60)]
    blobs = [None if i % 11 == 0 else b"junk" if i % 13 == 0 else b[: len(b) // 2] if i % 17 == 0 else b
             for i, b in enumerate(good)]
    table = make_table([f"t {i}" for i in range(len(blobs))], blobs)
    facts = {}
    for threads in (1, 3):
        stage = AlignStage({"decode_threads": threads, "max_image_pixels": 20 * 30 + 100})
        facts[threads] = stage._inspect_images(table, stage.detached())
    for k in AlignStage.IMAGE_FACTS:
        assert np.array_equal(facts[1][k], facts[3][k]), k
    f = facts[3]
    assert not f["has_bytes"][0] and f["has_bytes"][1] and not f["decoded"][13] and not f["decoded"][17]
    intact = [b is not None and b == good[i] for i, b in enumerate(blobs)]
    within = [(20 + i % 9) * 30 <= 20 * 30 + 100 for i in range(len(blobs))]  # 24 px wide and up: a bomb
    assert f["decoded"].tolist() == [a and b for a, b in zip(intact, within)]
    assert f["width"][2] == 22 and f["height"][2] == 30
    assert f["phash"][1] == dhash64(Image.open(io.BytesIO(blobs[1])))


def test_decode_threads_is_a_speed_key_changing_it_redoes_nothing(tmp_path):
    t = make_table([f"a photo of thing {i}" for i in range(12)], [png(size=(240, 240), pattern=i) for i in range(12)])
    inp = write_pool(t, tmp_path / "in", 2)

    def run(threads):
        config = config_mod.resolve({"align": {"min_token_count": 0, "decode_threads": threads}})
        folder = run_pipeline(["align"], str(tmp_path / "run"), config, input_dir=inp)[0].folder
        return sorted(p.stat().st_mtime_ns for p in (Path(folder) / "_done").glob("*"))

    done = run(1)
    assert len(done) == 2 and run(4) == done
    assert run(1) == done
    with pytest.raises(config_mod.ConfigError, match="decode_threads"):
        config_mod.resolve({"align": {"decode_threads": -1}})
