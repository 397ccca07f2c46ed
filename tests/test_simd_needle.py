"""Prepared needles (simd.Needle, knhk_simd_needle_*) at every level, against bytes.

Haystacks are numpy arrays of their exact length, so an AddressSanitizer run
catches a read past the end (the needle kernels load whole 32/64-byte blocks).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knhk_memory import simd
from knhk_memory._core import ffi, lib
from knhk_memory.errors import SimdLevelError, SimdTypeError, SimdValueError

from .test_simd import exact, ref_find_all

LEVELS = simd.supported_levels()


@pytest.fixture(params=LEVELS)
def level(request):
    # Needles take their level at construction; the module level is forced too
    # so the reference calls below run at the same level.
    with simd.forced_level(request.param) as name:
        yield name


# Lengths around the kernels' branches: 1..3 (probes cover the needle), 16,
# 32, 64 (one-compare verify up to 64 bytes), 65+ (word verify), and the
# window sizes where the candidate count crosses 32 and 64.
NEEDLE_LENGTHS = [1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 80]


def test_every_length_and_match_position(level):
    rng = random.Random(11)
    for m in NEEDLE_LENGTHS:
        s = bytes(rng.randrange(1, 255) for _ in range(m))
        nd = simd.Needle(s, level=level)
        assert nd.level == level and len(nd) == m and nd.needle == s
        # The needle's own prefix as filler: every candidate passes the first-byte probe.
        filler = (s[:-1] or b"z") * (300 // m + 2)
        for n in sorted({*range(140), 191, 192, 193, 255, 256, 257}):
            base = filler[:n]
            assert nd.find(exact(base)) == base.find(s), (m, n)
            for p in range(0, n - m + 1, 1 if n <= 130 else 9):
                hb = base[:p] + s + base[p + m:]
                assert nd.find(exact(hb)) == hb.find(s), (m, n, p)


def test_false_positives_on_the_probe_bytes(level):
    # Haystacks that agree with the needle at first, middle and last byte
    # everywhere but differ in between: every candidate is verified.
    for m in (4, 9, 16, 33, 64, 65):
        s = bytearray(b"a" * m)
        s[1] = ord("b")  # first, middle and last stay 'a'
        s = bytes(s)
        nd = simd.Needle(s, level=level)
        for n in (m, m + 31, m + 32, m + 63, m + 64, m + 200):
            hb = b"a" * n
            assert nd.find(exact(hb)) == -1 == hb.find(s)
            hb2 = hb[: n - m] + s
            assert nd.find(exact(hb2)) == n - m == hb2.find(s)
            assert nd.count(exact(hb2)) == hb2.count(s)


def test_count_and_find_all_with_repeats(level):
    for s in (b"aa", b"aba", b"a" * 17, b"ab" * 20, b"x" * 64):
        nd = simd.Needle(s, level=level)
        for n in (0, 1, 31, 32, 33, 63, 64, 65, 127, 128, 129, 300, 1000):
            hb = (b"ab" * n)[:n] if b"b" in s else (s[:1] * n)
            h = exact(hb)
            assert nd.count(h) == hb.count(s)
            assert nd.count(h, overlapping=True) == len(ref_find_all(hb, s, overlapping=True))
            assert nd.find_all(h).tolist() == ref_find_all(hb, s)
            assert nd.find_all(h, overlapping=True).tolist() == ref_find_all(hb, s, overlapping=True)


def test_empty_needle_and_short_haystacks(level):
    nd = simd.Needle(b"", level=level)
    for hb in (b"", b"a", b"abc"):
        assert nd.find(exact(hb)) == 0 and nd.count(exact(hb)) == len(hb) + 1
        assert nd.find_all(exact(hb)).tolist() == list(range(len(hb) + 1))
        assert nd.find(hb, 2) == hb.find(b"", 2)
    nd = simd.Needle(b"abcdef", level=level)
    assert nd.find(b"") == -1 and nd.find(b"abcde") == -1 and nd.count(b"abc") == 0
    assert nd.find_all(b"abc").tolist() == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.binary(max_size=300).map(lambda b: bytes(x % 3 for x in b)),
       s=st.binary(max_size=70).map(lambda b: bytes(x % 3 for x in b)),
       start=st.none() | st.integers(-320, 320), end=st.none() | st.integers(-320, 320))
def test_property_equal_bytes_methods(level, h, s, start, end):
    nd = simd.Needle(s, level=level)
    buf = exact(h)
    assert nd.find(buf, start, end) == h.find(s, start, end)
    assert nd.count(buf, start, end) == h.count(s, start, end)
    assert nd.find_all(buf, start, end).tolist() == ref_find_all(h, s, start, end)


def test_random_64k_against_bytes(level):
    rng = np.random.default_rng(5)
    hb = rng.integers(0, 4, 65536, dtype=np.uint8).tobytes()
    h = exact(hb)
    for m in (1, 2, 5, 8, 16, 33, 64, 65, 100):
        p = int(rng.integers(0, len(hb) - m))
        s = hb[p:p + m]
        nd = simd.Needle(s, level=level)
        assert nd.find(h) == hb.find(s)
        assert nd.count(h) == hb.count(s)
        assert nd.find(h, p + 1) == hb.find(s, p + 1)


def test_needle_keeps_its_level_and_accepts_any_buffer():
    nd = simd.Needle(b"needle", level="scalar")
    with simd.forced_level(LEVELS[-1]):
        assert nd.level == "scalar" and simd.Needle(b"x").level == LEVELS[-1]
    assert repr(nd) == "Needle(b'needle', level='scalar')"
    data = b"haystack with a needle in it"
    for buf in (data, bytearray(data), memoryview(data), exact(data), memoryview(bytearray(data))[3:]):
        assert nd.find(buf) == bytes(buf).find(b"needle")
    assert simd.Needle(ord("n")).find(data) == data.find(b"n")
    assert simd.Needle(memoryview(b"in it")).find(data) == data.find(b"in it")


def test_bad_needles_and_levels():
    with pytest.raises(SimdTypeError, match=r"the needle must be bytes-like or an int in range\(0, 256\), not str"):
        simd.Needle("text")
    with pytest.raises(SimdValueError, match=r"a needle given as an int is one byte: .* got 256"):
        simd.Needle(256)
    with pytest.raises(SimdLevelError, match=r"unknown SIMD level 'sse9'; accepted: auto, scalar, avx2, avx512"):
        simd.Needle(b"x", level="sse9")
    nd = simd.Needle(b"x")
    with pytest.raises(SimdTypeError, match=r"a bytes-like haystack is required .* not str; encode it first"):
        nd.find("text")
    with pytest.raises(SimdValueError, match=r"one C-contiguous buffer"):
        nd.count(np.zeros((4, 4), np.uint8)[:, 1])
    with pytest.raises(SimdTypeError, match=r"start must be an integer or None .* got float 1.5"):
        nd.find(b"xx", 1.5)


def test_c_api_errors_and_level_choice():
    out = ffi.new("knhk_simd_needle **")
    assert lib.knhk_simd_needle_new(b"ab", 2, 7, out) == lib.KNHK_ERR_INVALID and out[0] == ffi.NULL
    assert "SIMD level 7 is out of range" in ffi.string(lib.knhk_last_error()).decode()
    assert lib.knhk_simd_needle_new(b"ab", 2, -2, out) == lib.KNHK_ERR_INVALID
    assert lib.knhk_simd_needle_new(ffi.NULL, 2, -1, out) == lib.KNHK_ERR_INVALID
    assert "needle is NULL but m = 2" in ffi.string(lib.knhk_last_error()).decode()
    assert lib.knhk_simd_needle_new(b"ab", 2, -1, ffi.NULL) == lib.KNHK_ERR_INVALID
    for lv in range(lib.KNHK_SIMD_LEVELS):
        status = lib.knhk_simd_needle_new(b"ab", 2, lv, out)
        if not lib.knhk_simd_level_supported(lv):
            assert status == lib.KNHK_ERR_UNAVAILABLE
            continue
        nd = out[0]
        try:
            assert status == lib.KNHK_OK and nd.level == lv and nd.len == 2 and nd.mid == 1
            assert int(ffi.cast("uintptr_t", nd)) % 64 == 0
            assert bytes(nd.first) == b"a" * 64 and bytes(nd.last) == b"b" * 64
            assert bytes(nd.head) == b"ab" + bytes(62) and nd.head_mask == 3
            assert lib.knhk_simd_needle_find(nd, b"xxab", 4) == 2 == nd.find(nd, b"xxab", 4)
            assert lib.knhk_simd_needle_count(nd, b"abab", 4, 0) == 2
            buf, nxt = ffi.new("int64_t[4]"), ffi.new("size_t *")
            assert lib.knhk_simd_needle_find_all(nd, b"abab", 4, 0, 0, buf, 4, nxt) == 2
            assert list(buf[0:2]) == [0, 2]
        finally:
            lib.knhk_simd_needle_free(nd)
    lib.knhk_simd_needle_free(ffi.NULL)


def test_search_64_hot_op_prepares_its_needle_at_the_best_level():
    # Whatever auto picks (avx2 on a core that downclocks for 512-bit code).
    op = {o.name: o for o in simd.hot_ops()}["search_64"]
    ctx, cleanup = op.setup()
    try:
        best = simd.LEVELS.index(simd.supported_levels()[-1])
        assert ffi.cast("knhk_simd_search64_ctx *", ctx).prepared.level == best
    finally:
        cleanup()


def test_search_64_hot_op_uses_the_prepared_needle(level):
    ctx, cleanup = simd._search64_setup(level)
    c = ffi.cast("knhk_simd_search64_ctx *", ctx)
    try:
        assert c.prepared != ffi.NULL and c.prepared.level == simd.LEVELS.index(level)
        lib.knhk_simd_hotop_search_64(ctx, 5)
        assert c.result == 48
        c.result = 0
        lib.knhk_simd_hotop_search_64_dispatch(ctx, 5)
        assert c.result == 48
        prepared, c.prepared = c.prepared, ffi.NULL
        c.result = 0
        lib.knhk_simd_hotop_search_64(ctx, 5)  # no prepared needle: the dispatched search
        assert c.result == 48
        c.prepared = prepared
    finally:
        cleanup()
        cleanup()  # idempotent
