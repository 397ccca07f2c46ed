"""The vector-store id kernels (find_eq with vpcompressq / nibble tables, count_eq
with lane counters) at every level, against numpy, through the resumable C call.

Output buffers are numpy arrays of exactly ``cap`` elements: the kernels store
whole vectors ahead of the last written position, so an AddressSanitizer run
checks that those stores stay inside ``out[0, cap)``.
"""

from __future__ import annotations

import numpy as np
import pytest

from knhk_memory import simd
from knhk_memory._core import ffi, lib

from .test_simd import find_many_reference

LEVELS = simd.supported_levels()
DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64]


@pytest.fixture(params=LEVELS)
def level(request):
    with simd.forced_level(request.param) as name:
        yield name


def find_eq_in_pieces(a: np.ndarray, v: int, cap: int) -> list[int]:
    """Drive knhk_simd_find_eq with a fresh exact-size buffer of `cap` per call."""
    src = ffi.from_buffer(a)
    written, nxt = ffi.new("size_t *"), ffi.new("size_t *")
    got: list[int] = []
    frm = 0
    while True:
        out = np.full(cap, -7, np.int64)
        assert lib.knhk_simd_find_eq(src, a.size, a.itemsize, v, frm, ffi.cast("int64_t *", ffi.from_buffer(out)),
                                     cap, written, nxt) == lib.KNHK_OK
        k = written[0]
        assert k <= cap
        got += out[:k].tolist()
        if k < cap:
            return got
        assert nxt[0] > frm or frm >= a.size
        frm = nxt[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_find_eq_with_every_small_capacity(level, dtype):
    rng = np.random.default_rng(np.dtype(dtype).itemsize + 20)
    for n in (0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 257, 1000):
        for a in (rng.integers(0, 3, n, dtype=dtype), np.full(n, 2, dtype), rng.integers(0, 43, n, dtype=dtype)):
            ref = np.flatnonzero(a == 2).tolist()
            for cap in (1, 2, 3, 7, 8, 9, 15, 16, 17, 33, 64, 1024):
                assert find_eq_in_pieces(a, 2, cap) == ref, (n, cap)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_find_eq_resuming_mid_array(level, dtype):
    a = np.random.default_rng(9).integers(0, 5, 5000, dtype=dtype)
    ref = np.flatnonzero(a == 4)
    src = ffi.from_buffer(a)
    written, nxt = ffi.new("size_t *"), ffi.new("size_t *")
    for frm in (0, 1, 7, 8, 15, 16, 17, 2500, 4999, 5000, 5001):
        out = np.empty(a.size, np.int64)
        lib.knhk_simd_find_eq(src, a.size, a.itemsize, 4, frm, ffi.cast("int64_t *", ffi.from_buffer(out)), a.size,
                              written, nxt)
        assert out[:written[0]].tolist() == ref[ref >= frm].tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_count_eq_lane_counters(level, dtype):
    # Every lane counting on every block, lengths around the 4-block unrolling,
    # and arrays large enough for the prefetching loop (>= 64 KiB).
    for n in (0, 1, 63, 64, 65, 255, 256, 257, 1023, 1024, 1025, 4095, 70_001, 300_000):
        a = np.full(n, 9, dtype)
        assert simd.count_eq(a, 9) == n
        assert simd.count_eq(a, 8) == 0
        a[::7] = 8
        assert simd.count_eq(a, 9) == np.count_nonzero(a == 9)
        assert simd.count_eq(a, 8) == np.count_nonzero(a == 8)


def test_find_eq_large_input_prefetch_path(level):
    a = np.random.default_rng(1).integers(0, 43, 1 << 20, dtype=np.uint32)
    assert np.array_equal(simd.find_eq(a, 7), np.flatnonzero(a == 7))
    b = a.astype(np.uint64)
    assert np.array_equal(simd.find_eq(b, 42), np.flatnonzero(b == 42))
    c = np.full(200_000, 3, np.uint32)  # every position: output grows many times
    assert np.array_equal(simd.find_eq(c, 3), np.arange(200_000))


def test_find_and_count_large_haystack_prefetch_path(level):
    # Haystacks of >= 64 KiB take the prefetching loop of find/count; matches
    # around where it hands over to the plain loop (the last 2 KiB + 128) and
    # at the very end must be found exactly as bytes.find/count find them.
    rng = np.random.default_rng(2048)
    n = 70_000
    base = bytes(rng.integers(97, 123, n, dtype=np.uint8))
    needle = b"workflow:pattern"
    m = len(needle)
    assert simd.find(base, needle) == -1
    for pos in (0, 1, n // 2, n - 2048 - 129, n - 2048 - 128, n - 2048 - 64, n - 2048, n - 2047, n - 200, n - m - 1,
                n - m):
        hay = base[:pos] + needle + base[pos + m:]
        assert simd.find(hay, needle) == hay.find(needle) == pos, pos
        assert simd.count(hay, needle) == hay.count(needle) == 1, pos
        assert simd.rfind(hay, needle) == hay.rfind(needle) == pos, pos
        assert simd.find(hay, needle, pos + 1) == -1
    every = needle * (n // m)
    assert simd.count(every, needle) == every.count(needle) == n // m
    assert simd.find(bytearray(every), needle, 5000) == bytes(every).find(needle, 5000)


def find_many_first_only(h: bytes, needles: list[bytes]) -> tuple[int, int]:
    """knhk_simd_find_many with counts = NULL: the path that stops early."""
    keep = [ffi.from_buffer("uint8_t[]", s) for s in needles]
    ptrs = ffi.new("const uint8_t *[]", max(len(keep), 1))
    for i, c in enumerate(keep):
        ptrs[i] = c
    lens = ffi.new("size_t[]", [len(s) for s in needles] or [0])
    first, which = ffi.new("int64_t *"), ffi.new("int64_t *")
    assert lib.knhk_simd_find_many(h, len(h), ptrs, lens, len(needles), first, which, ffi.NULL) == lib.KNHK_OK
    return first[0], which[0]


def test_find_many_across_chunk_boundaries(level):
    # The haystack is read in chunks; every needle searches each chunk for the
    # matches that start there. Matches straddling a boundary, runs of an
    # overlapping needle across it, needles longer than a chunk, more needles
    # than one group of 16, ties and empty needles must all come out as bytes
    # gives them, with and without counts.
    chunk = lib.KNHK_SIMD_FIND_MANY_CHUNK
    rng = np.random.default_rng(16384)
    base = bytearray(rng.integers(97, 123, 3 * chunk + 100, dtype=np.uint8).tobytes())
    long_needle = bytes(rng.integers(48, 58, chunk + 5, dtype=np.uint8))
    plants = {b"<ABCDEFGHIJKLMN>": [chunk - 8, 2 * chunk - 15, 3 * chunk - 1],
              b"#": [chunk - 1, chunk, 3 * chunk + 99],
              b"%%": [2 * chunk - 1],  # the run below makes it overlap
              long_needle: [chunk - 3]}
    for needle, starts in plants.items():
        for p in starts:
            base[p:p + len(needle)] = needle
    base[2 * chunk - 3:2 * chunk + 4] = b"%" * 7  # "%%" x3 non-overlapping, straddling
    h = bytes(base)
    needles = [b"<ABCDEFGHIJKLMN>", b"#", b"%%", long_needle, b"zz", b"not here!", b"#"]
    needles += [bytes([97 + i, 98 + i]) for i in range(12)]  # 19 needles: two groups
    got = simd.find_many(h, needles)
    first, which, counts = find_many_reference(h, needles)
    assert (got.first, got.which, got.counts.tolist()) == (first, which, counts)
    assert find_many_first_only(h, needles) == (first, which)
    for sub in (needles[:1], needles[1:3], [long_needle], [b"%%", b"#"], [b"", b"#"], [b"#", b""], needles[16:],
                [b"not here!"], []):
        for hay in (h, h[:chunk], h[:chunk + 1], h[chunk - 20:2 * chunk + 30], b""):
            f, w, c = find_many_reference(hay, sub)
            got = simd.find_many(hay, sub)
            assert (got.first, got.which, got.counts.tolist()) == (f, w, c), (sub, len(hay))
            assert find_many_first_only(hay, sub) == (f, w), (sub, len(hay))
