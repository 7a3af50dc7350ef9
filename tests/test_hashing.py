"""pipeline.hashing, the one home of the version-stable hashes: each against a plain-Python reference."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import xxhash

from pipeline import hashing
from pipeline.schema import compute_uid

MASK = (1 << 64) - 1


def ref_mix(x: int) -> int:
    """SplitMix64's finaliser on Python ints (Steele, Lea, Flood 2014)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def ref_h64(v) -> int:
    if isinstance(v, int):
        return v & MASK
    return int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little")


def ref_uniform(uid: str, seed, salt) -> float:
    if len(uid) == 32 and all(c in "0123456789abcdef" for c in uid.lower()):
        key = int(uid[:16], 16) ^ ref_mix(int(uid[16:], 16))
    else:
        key = ref_h64(uid)
    x = ref_mix(key ^ ref_mix(ref_h64(salt) ^ ref_mix(ref_h64(seed))))
    return (x >> 11) / 2.0**53


def test_uniform_equals_the_reference_and_is_defined_once():
    uids = pa.array(compute_uid([f"http://e.invalid/{i}" for i in range(50)], [f"t {i}" for i in range(50)])).to_pylist()
    uids += ["row7", ""]
    for seed, salt in [(0, 0), (3, "aug:5"), (2**64 - 1, "metaclip")]:
        got = hashing.uniform(uids, seed, salt)
        assert got.tolist() == [ref_uniform(u, seed, salt) for u in uids]
        assert (0 <= got).all() and (got < 1).all()
    ids = np.arange(len(uids), dtype=np.int64)  # per-row integer salts (metaclip's entry ids)
    assert hashing.uniform(uids, 1, ids).tolist() == [ref_uniform(u, 1, int(i)) for u, i in zip(uids, ids)]
    from stages.dfn import uniform as dfn_uniform
    from stages.metaclip.balance import uniform as metaclip_uniform

    assert dfn_uniform is hashing.uniform and metaclip_uniform is hashing.uniform  # one function, not a copy


def test_mix_blake64_and_content64_against_references():
    xs = np.array([0, 1, 2**63, MASK, 0x0123456789ABCDEF], dtype=np.uint64)
    assert [int(v) for v in hashing.mix64(xs)] == [ref_mix(int(x)) for x in xs]
    assert hashing.blake64(b"abc") == int.from_bytes(hashlib.blake2b(b"abc", digest_size=8).digest(), "little")
    # XXH3-64 (seed 0) of the spec's test vectors (github.com/Cyan4973/xxHash, sanity_test_vectors.h)
    assert hashing.content64(b"") == 0x2D06800538D394C2
    assert hashing.content64(b"abc") == xxhash.xxh3_64_intdigest(b"abc") != hashing.content64(b"abd")
    assert int(hashing.combine64(np.array([5], np.uint64), np.array([7], np.uint64))[0]) == ref_mix(ref_mix(5) ^ 7)


def test_the_kept_copy_of_a_uid_is_the_smallest_content_key_then_the_first_position():
    """One rule for ingest and align (hand-computed): 5 rows of one uid, content keys 7 7 3 3 9."""
    from pipeline.hashing import other_copy_kept

    ck = np.array([7, 7, 3, 3, 9], dtype=np.uint64)
    pos = np.array([10, 11, 13, 12, 14], dtype=np.uint64)
    ck_min = np.full(5, 3, dtype=np.uint64)
    pos_min = np.array([10, 10, 12, 12, 14], dtype=np.uint64)  # per (uid x content key)
    assert other_copy_kept(ck, ck_min, pos, pos_min).tolist() == [True, True, True, False, True]
