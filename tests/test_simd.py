"""knhk_memory.simd: every kernel at every level against the Python/numpy reference.

Haystacks and id arrays live in numpy arrays of their exact length (numpy
mallocs exactly nbytes), so an AddressSanitizer run catches any read past the
end; see docs/development.md for the ASan command.
"""

from __future__ import annotations

import mmap
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knhk_memory import simd
from knhk_memory._core import ffi, lib
from knhk_memory.errors import KnhkMemoryError, SimdLevelError, SimdTypeError, SimdValueError
from knhk_memory.hotpath import default_budgets

LEVELS = simd.supported_levels()
ID_DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64]
# Lengths 0..300 are covered by the sweeps; these sit around the vector widths.
EDGE_LENGTHS = sorted({n + d for n in (16, 32, 64, 128, 256, 512, 1024) for d in (-2, -1, 0, 1, 2)})


@pytest.fixture(params=LEVELS)
def level(request):
    with simd.forced_level(request.param) as name:
        yield name


def exact(data: bytes) -> np.ndarray:
    """A uint8 array whose allocation is exactly len(data) bytes."""
    return np.frombuffer(data, np.uint8).copy()


def ref_find_all(h: bytes, s: bytes, start=None, end=None, overlapping=False) -> list[int]:
    lo, hi, _ = slice(start, end).indices(len(h))
    if start is not None and start > len(h):
        return []
    out, pos = [], lo
    while True:
        p = h.find(s, pos, hi)
        if p < 0:
            return out
        out.append(p)
        pos = p + (1 if overlapping or not s else len(s))
        if pos > hi:
            return out


# ---------------------------------------------------------------- levels and dispatch

def test_all_levels_run_here():
    assert LEVELS[0] == "scalar"
    assert simd.level() in LEVELS
    # The machine these tests were written on has AVX2 and AVX-512BW: every level is exercised.
    if lib.knhk_cpu_features() & lib.KNHK_CPU_AVX512BW:
        assert LEVELS == ["scalar", "avx2", "avx512"]


DOWNCLOCK = bool(lib.knhk_cpu_features() & lib.KNHK_CPU_AVX512_DOWNCLOCK)


def test_auto_picks_the_best_level():
    # The highest level, except avx512 on a core that lowers its clock for
    # 512-bit instructions (Skylake-SP, Cascade Lake, Cooper Lake).
    want = "avx2" if DOWNCLOCK and LEVELS[-1] == "avx512" else LEVELS[-1]
    assert LEVELS[lib.knhk_simd_auto_level()] == want
    with simd.forced_level("auto") as name:
        assert name == want
    name, why = simd.auto_level()
    assert name == want
    if want == LEVELS[-1]:
        assert why is None
    else:
        assert why == ("avx512 passed over: 512-bit instructions lower this CPU's clock, which slows the code "
                       "around every call; KNHK_SIMD=avx512 uses it")


def test_downclock_flag_names_only_those_cores():
    bits = lib.knhk_cpu_features()
    if bits & lib.KNHK_CPU_AVX512_DOWNCLOCK:
        assert bits & lib.KNHK_CPU_AVX512F  # only AVX-512 cores can have it
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if sys.platform == "linux" else []
    model = next((ln for ln in cpuinfo if ln.startswith("model\t")), "")
    vendor = next((ln for ln in cpuinfo if ln.startswith("vendor_id")), "")
    if "GenuineIntel" in vendor and model.split(":")[-1].strip() == "85" and bits & lib.KNHK_CPU_AVX512F:
        assert bits & lib.KNHK_CPU_AVX512_DOWNCLOCK  # family 6 model 0x55 is Skylake-SP/Cascade/Cooper Lake


@pytest.mark.parametrize("env", ["", "auto", "AUTO"])
def test_env_auto_is_the_auto_level_and_avx512_can_still_be_forced(run_python, env):
    r = run_python("from knhk_memory import simd; print(simd.level(), simd.auto_level()[0])", env={"KNHK_SIMD": env})
    assert r.returncode == 0, r.stderr
    level, auto = r.stdout.split()
    assert level == auto == LEVELS[lib.knhk_simd_auto_level()]
    if "avx512" in LEVELS:
        r = run_python("from knhk_memory import simd; print(simd.level())", env={"KNHK_SIMD": "avx512"})
        assert r.stdout.split() == ["avx512"], r.stderr


def test_set_level_returns_previous_and_forced_level_restores():
    before = simd.level()
    with simd.forced_level("scalar"):
        assert simd.level() == "scalar"
        assert simd.set_level("scalar") == "scalar"
    assert simd.level() == before


def test_unknown_level_is_an_error():
    with pytest.raises(SimdLevelError, match=r"unknown SIMD level 'sse9'; accepted: auto, scalar, avx2, avx512"):
        simd.set_level("sse9")
    with pytest.raises(SimdTypeError, match=r"a SIMD level is a string, got int 2"):
        simd.set_level(2)


def test_c_level_calls():
    assert lib.knhk_simd_init() == lib.KNHK_OK
    assert ffi.string(lib.knhk_simd_level_name(lib.KNHK_SIMD_AVX512)) == b"avx512"
    assert ffi.string(lib.knhk_simd_level_name(99)) == b"unknown"
    assert lib.knhk_simd_level_supported(lib.KNHK_SIMD_SCALAR) == 1
    assert lib.knhk_simd_level_supported(-1) == 0
    assert lib.knhk_simd_set_level(7) == lib.KNHK_ERR_INVALID
    assert "SIMD level 7 is out of range" in ffi.string(lib.knhk_last_error()).decode()
    assert lib.knhk_simd_level() in range(lib.KNHK_SIMD_LEVELS)


@pytest.mark.parametrize("name", LEVELS)
def test_env_var_forces_level(run_python, name):
    r = run_python("from knhk_memory import simd; print(simd.level(), simd.find(b'xxab', b'ab'))",
                   env={"KNHK_SIMD": name})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [name, "2"]


def test_env_var_unknown_level_is_an_error_not_a_fallback(run_python):
    code = ("from knhk_memory import simd\n"
            "try:\n    simd.find(b'ab', b'a')\nexcept simd.SimdLevelError as e:\n    print('ERR', e)\n"
            "simd.set_level('scalar'); print(simd.find(b'ab', b'b'))")
    code = code.replace("simd.SimdLevelError", "__import__('knhk_memory.errors').errors.SimdLevelError")
    r = run_python(code, env={"KNHK_SIMD": "avx1024"})
    assert r.returncode == 0, r.stderr
    assert "ERR KNHK_SIMD=avx1024 is not a SIMD level; accepted: auto, scalar, avx2, avx512" in r.stdout
    assert r.stdout.strip().endswith("1")


def test_env_var_unavailable_level_is_an_error(run_python):
    missing = [n for n in ("avx2", "avx512") if n not in LEVELS]
    if not missing:
        pytest.skip("this CPU supports every level; the unavailable path needs an older CPU")
    r = run_python("from knhk_memory import simd\nsimd.level()", env={"KNHK_SIMD": missing[0]})
    if simd.PORTABLE_BUILD:  # the CPU may have the level; the build has no kernels for it
        assert f"KNHK_SIMD={missing[0]}: this build has no {missing[0]} kernels (built with KNHK_PORTABLE=1" in r.stderr
    else:
        assert f"KNHK_SIMD={missing[0]}: this CPU (or OS) does not support the {missing[0]} level" in r.stderr


def test_info_shows_the_level(capsys):
    from knhk_memory.cli import main

    with simd.forced_level("scalar"):
        assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "simd:     scalar" in out
    auto, why = simd.auto_level()
    assert (f"          auto is {auto}: {why}" in out) == (why is not None)


# ---------------------------------------------------------------- byte patterns: adversarial sweeps

NEEDLES = [b"a", b"ab", b"aab", b"abc", b"aaaaaaab", b"abcdefghijklmnop", b"aaaaaaaaaaaaaaab",
           bytes(range(40)), b"\x00", b"\xff\x00"]


def test_find_every_alignment_and_length(level):
    # A match at every position of every haystack length 0..300, in a haystack
    # made of the needle's own prefixes (the false-positive-heavy case).
    for s in NEEDLES:
        filler = (s[:-1] or b"z") * (400 // max(len(s), 1) + 2)
        for n in range(0, 301, 7 if len(s) > 3 else 3):
            base = filler[:n]
            h = exact(base)
            assert simd.find(h, s) == base.find(s)
            assert simd.rfind(h, s) == base.rfind(s)
            assert simd.count(h, s) == base.count(s)
            for p in range(0, n - len(s) + 1, 5):
                hb = base[:p] + s + base[p + len(s):]
                h = exact(hb)
                assert simd.find(h, s) == hb.find(s), (s, n, p)
                assert simd.rfind(h, s) == hb.rfind(s), (s, n, p)


def test_matches_at_start_end_and_vector_edges(level):
    rng = random.Random(7)
    for n in list(range(300)) + EDGE_LENGTHS:
        body = bytes(rng.randrange(1, 200) for _ in range(n))
        for s in (b"\xfe", b"\xfe\xfd", b"\xfe" * 16, bytes(range(250, 256)) + b"\xfe" * 10):
            for hb in (s + body, body + s, s + body + s):
                h = exact(hb)
                assert simd.find(h, s) == hb.find(s)
                assert simd.rfind(h, s) == hb.rfind(s)
                assert simd.count(h, s) == hb.count(s)


def test_repeated_needle_prefixes_count_and_find_all(level):
    for s in (b"aa", b"aaa", b"abab", b"aba", b"a" * 17, b"ab" * 20):
        for n in (0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 300, 1000):
            hb = (b"ab" * n)[:n] if b"b" in s else b"a" * n
            h = exact(hb)
            assert simd.count(h, s) == hb.count(s)
            assert simd.find_all(h, s).tolist() == ref_find_all(hb, s)
            assert simd.find_all(h, s, overlapping=True).tolist() == ref_find_all(hb, s, overlapping=True)
            assert simd.count(h, s, overlapping=True) == len(ref_find_all(hb, s, overlapping=True))


def test_find_all_grows_past_its_first_buffer(level):
    hb = b"xy" * 5000
    got = simd.find_all(exact(hb), b"x")
    assert got.dtype == np.int64 and got.tolist() == list(range(0, 10000, 2))
    assert simd.find_all(exact(hb), b"").tolist() == list(range(10001))


def test_random_64k_against_bytes(level):
    rng = np.random.default_rng(3)
    hb = rng.integers(0, 4, 65536, dtype=np.uint8).tobytes()  # 4-letter alphabet: many partial hits
    h = exact(hb)
    for m in (1, 2, 3, 5, 8, 9, 16, 31, 33):
        for _ in range(3):
            p = int(rng.integers(0, len(hb) - m))
            s = hb[p:p + m]
            assert simd.find(h, s) == hb.find(s)
            assert simd.rfind(h, s) == hb.rfind(s)
            assert simd.count(h, s) == hb.count(s)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.binary(max_size=300).map(lambda b: bytes(x % 3 for x in b)),
       s=st.binary(max_size=12).map(lambda b: bytes(x % 3 for x in b)),
       start=st.none() | st.integers(-320, 320), end=st.none() | st.integers(-320, 320))
def test_property_byte_ops_equal_bytes_methods(level, h, s, start, end):
    buf = exact(h)
    assert simd.find(buf, s, start, end) == h.find(s, start, end)
    assert simd.rfind(buf, s, start, end) == h.rfind(s, start, end)
    assert simd.count(buf, s, start, end) == h.count(s, start, end)
    assert simd.find_all(buf, s, start, end).tolist() == ref_find_all(h, s, start, end)


# ---------------------------------------------------------------- byte patterns: semantics and inputs

def test_bytes_find_edge_semantics(level):
    h = b"abcabc"
    cases = [(b"", None, None), (b"", 6, None), (b"", 7, None), (b"", -100, None), (b"abcabcd", None, None),
             (b"c", -1, None), (b"c", 3, 2), (b"a", 100, None), (b"bc", None, -1), (b"bc", None, -100)]
    for s, start, end in cases:
        assert simd.find(h, s, start, end) == h.find(s, start, end), (s, start, end)
        assert simd.rfind(h, s, start, end) == h.rfind(s, start, end), (s, start, end)
        assert simd.count(h, s, start, end) == h.count(s, start, end), (s, start, end)
    assert simd.find(b"", b"") == 0 and simd.count(b"", b"") == 1 and simd.rfind(b"", b"") == 0
    assert simd.find(b"", b"a") == -1 and simd.count(b"", b"a") == 0
    assert simd.find(h, ord("c")) == 2  # an int needle is one byte, as for bytes.find


def test_every_buffer_kind_without_copying(tmp_path):
    data = b"..event:start..event:stop.."
    path = tmp_path / "log.bin"
    path.write_bytes(data)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        for buf in (data, bytearray(data), memoryview(data), mm, exact(data),
                    np.frombuffer(data, np.uint8), memoryview(bytearray(data))[2:]):
            ref = bytes(buf)
            assert simd.find(buf, b"event:stop") == ref.find(b"event:stop")
            assert simd.count(buf, b"event") == ref.count(b"event")
            assert simd.find_many(buf, [b"stop", b"start"]).first == ref.find(b"start")


def test_bad_haystacks_and_needles():
    with pytest.raises(SimdTypeError, match=r"a bytes-like haystack is required .* not str; encode it first"):
        simd.find("text", b"t")
    with pytest.raises(SimdTypeError, match=r"a bytes-like haystack is required .* not list"):
        simd.find([1, 2], b"t")
    with pytest.raises(SimdValueError, match=r"the haystack must be one C-contiguous buffer .* pass bytes\(x\)"):
        simd.find(memoryview(b"abcdef")[::2], b"a")
    with pytest.raises(SimdValueError, match=r"the haystack must be one C-contiguous buffer"):
        simd.count(np.zeros(10, np.uint8)[::2], b"a")
    with pytest.raises(SimdTypeError, match=r"the needle must be bytes-like or an int in range\(0, 256\), not str"):
        simd.find(b"abc", "a")
    with pytest.raises(SimdTypeError, match=r"the needle must be bytes-like .* not float"):
        simd.find(b"abc", 1.5)
    with pytest.raises(SimdValueError, match=r"must be in range\(0, 256\), got 256"):
        simd.find(b"abc", 256)
    with pytest.raises(SimdTypeError, match=r"start must be an integer or None \(as for bytes.find\), got str '1'"):
        simd.find(b"abc", b"a", "1")
    with pytest.raises(SimdTypeError, match=r"end must be an integer or None"):
        simd.rfind(b"abc", b"a", 0, 2.0)
    with pytest.raises(SimdTypeError, match=r"needles must be a sequence of needles"):
        simd.find_many(b"abc", b"ab")
    assert issubclass(SimdTypeError, TypeError) and issubclass(SimdValueError, ValueError)
    assert issubclass(SimdLevelError, KnhkMemoryError)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.binary(max_size=200).map(lambda b: bytes(x % 3 for x in b)),
       needles=st.lists(st.binary(max_size=5).map(lambda b: bytes(x % 3 for x in b)), max_size=6))
def test_property_find_many(level, h, needles):
    got = simd.find_many(exact(h), needles)
    assert (got.first, got.which, got.counts.tolist()) == find_many_reference(h, needles)


def find_many_reference(h: bytes, needles: list[bytes]) -> tuple[int, int, list[int]]:
    """find_many through bytes: (first, which, counts)."""
    positions = [(h.find(s), j) for j, s in enumerate(needles) if h.find(s) >= 0]
    first, which = min(positions) if positions else (-1, -1)
    return first, which, [h.count(s) for s in needles]


# ---------------------------------------------------------------- id scans

def id_arrays(dtype, rng):
    info = np.iinfo(dtype)
    for n in list(range(0, 300, 1)) + EDGE_LENGTHS:
        yield rng.integers(0, 43, n, dtype=dtype)
    yield rng.integers(0, int(info.max), 777, dtype=dtype, endpoint=True)
    yield np.full(1000, info.max, dtype)


@pytest.mark.parametrize("dtype", ID_DTYPES, ids=lambda d: np.dtype(d).name)
def test_id_scans_match_numpy(level, dtype):
    rng = np.random.default_rng(np.dtype(dtype).itemsize)
    maxv = int(np.iinfo(dtype).max)
    for a in id_arrays(dtype, rng):
        for v in (0, 7, 42, maxv):
            assert simd.count_eq(a, v) == np.count_nonzero(a == v)
            assert np.array_equal(simd.find_eq(a, v), np.flatnonzero(a == v))
            assert np.array_equal(simd.mask_eq(a, v), a == v)
        ids = [3, 7, 42, maxv]
        assert np.array_equal(simd.isin(a, ids), np.isin(a, ids))
        assert np.array_equal(simd.histogram(a, 43, out_of_range="ignore"),
                              np.bincount(a[a < 43].astype(np.int64), minlength=43))
        if a.size:
            r = simd.reduce(a)
            assert (r.min, r.max) == (int(a.min()), int(a.max()))
            assert r.sum == int(a.sum(dtype=np.uint64))


def test_find_eq_resumes_across_many_matches(level):
    a = np.zeros(300_001, np.uint16)
    a[::3] = 5
    assert np.array_equal(simd.find_eq(a, 5), np.flatnonzero(a == 5))
    assert np.array_equal(simd.find_eq(a, 0), np.flatnonzero(a == 0))


def test_multidimensional_arrays_are_scanned_flat(level):
    a = np.arange(60, dtype=np.uint32).reshape(3, 4, 5) % 7
    assert simd.count_eq(a, 3) == np.count_nonzero(a == 3)
    assert np.array_equal(simd.find_eq(a, 3), np.flatnonzero(a == 3))
    assert simd.mask_eq(a, 3).shape == a.shape and np.array_equal(simd.mask_eq(a, 3), a == 3)
    assert np.array_equal(simd.isin(a, [1, 2]), np.isin(a, [1, 2]))


def test_ids_out_of_the_dtype_range_match_nothing(level):
    a = np.arange(256, dtype=np.uint8)
    for v in (-1, 256, 1 << 70):
        assert simd.count_eq(a, v) == np.count_nonzero(a == v) == 0
        assert simd.find_eq(a, v).size == 0
        assert not simd.mask_eq(a, v).any()
    assert np.array_equal(simd.isin(a, [-5, 3, 300]), np.isin(a, [3]))
    assert not simd.isin(a, []).any()
    assert simd.count_eq(a, np.uint64(5)) == 1


def test_uint64_sum_wraps_like_numpy(level):
    a = np.full(5, np.iinfo(np.uint64).max, np.uint64)
    assert simd.column_sum(a) == int(a.sum()) == (5 * (2**64 - 1)) % 2**64
    assert simd.column_min(a) == simd.column_max(a) == 2**64 - 1
    assert simd.column_sum(np.zeros(0, np.uint32)) == 0


def test_histogram_bins_and_out_of_range(level):
    a = np.array([0, 1, 1, 42, 99, 1000], np.uint16)
    assert simd.histogram(a).tolist() == np.bincount(a).tolist()  # nbins=None: max + 1
    assert simd.histogram(np.zeros(0, np.uint8)).size == 0
    with pytest.raises(SimdValueError, match=r"histogram: 2 ids are >= nbins=43 \(largest 1000\); pass a larger "
                                             r"nbins, or out_of_range='ignore'"):
        simd.histogram(a, 43)
    assert simd.histogram(a, 43, out_of_range="ignore").tolist() == np.bincount(a[a < 43], minlength=43).tolist()
    big = np.random.default_rng(0).integers(0, 5000, 20_000, dtype=np.uint32)  # beyond the sub-table path
    assert np.array_equal(simd.histogram(big, 5000), np.bincount(big, minlength=5000))
    with pytest.raises(SimdValueError, match=r"histogram: nbins must be at least 1, got 0"):
        simd.histogram(a, 0)
    with pytest.raises(SimdTypeError, match=r"histogram: nbins must be an integer, got float 4.0"):
        simd.histogram(a, 4.0)
    with pytest.raises(SimdValueError, match=r"out_of_range='clip'; accepted: 'raise', 'ignore'"):
        simd.histogram(a, 43, out_of_range="clip")


@pytest.mark.parametrize("nbins", [1, 43, 255, 256, 300])
def test_uint8_histogram_every_length_and_bin_count(nbins):
    # The 8-bit kernel has a slot per byte value and no range check: ids past
    # nbins are counted apart, whatever the length (8-id steps plus a tail).
    rng = np.random.default_rng(nbins)
    for n in [*range(40), 255, 256, 257, 4095, 100_003]:
        a = rng.integers(0, 256, n, dtype=np.uint8)
        want = np.bincount(a, minlength=max(nbins, 256))
        assert np.array_equal(simd.histogram(a, nbins, out_of_range="ignore"), want[:nbins]), n
        bad = int(want[nbins:].sum())
        if bad:
            with pytest.raises(SimdValueError, match=rf"histogram: {bad} ids are >= nbins={nbins} "):
                simd.histogram(a, nbins)
        else:
            assert np.array_equal(simd.histogram(a, nbins), want[:nbins])


def test_bad_id_arrays():
    with pytest.raises(SimdTypeError,
                       match=r"count_eq: expected a numpy array of uint8, uint16, uint32, uint64, got list"):
        simd.count_eq([1, 2, 3], 1)
    with pytest.raises(SimdTypeError, match=r"find_eq: dtype int32 is not supported; accepted: uint8, uint16, "
                                            r"uint32, uint64 in native byte order; a signed array can be viewed "
                                            r"as unsigned with a.view\(numpy.uint32\)"):
        simd.find_eq(np.zeros(4, np.int32), 1)
    with pytest.raises(SimdTypeError, match=r"dtype float64 is not supported"):
        simd.mask_eq(np.zeros(4), 1)
    with pytest.raises(SimdTypeError, match=r"dtype >u4 is not supported"):
        simd.count_eq(np.zeros(4, ">u4"), 1)
    with pytest.raises(SimdValueError, match=r"histogram: the array is not C-contiguous \(shape \(5,\), strides "
                                             r"\(8,\)\); pass numpy.ascontiguousarray\(a\)"):
        simd.histogram(np.zeros(10, np.uint32)[::2], 4)
    with pytest.raises(SimdValueError, match=r"not C-contiguous"):
        simd.count_eq(np.zeros((4, 4), np.uint8).T, 0)
    with pytest.raises(SimdTypeError, match=r"count_eq: the id must be an integer, got str '1'"):
        simd.count_eq(np.zeros(4, np.uint8), "1")
    with pytest.raises(SimdTypeError, match=r"the id must be an integer, got bool True"):
        simd.count_eq(np.zeros(4, np.uint8), True)
    with pytest.raises(SimdValueError, match=r"isin: 300 distinct ids given; at most 256 are accepted"):
        simd.isin(np.zeros(4, np.uint16), range(300))
    with pytest.raises(SimdTypeError, match=r"isin: ids must be an iterable of integers, got int"):
        simd.isin(np.zeros(4, np.uint16), 5)
    with pytest.raises(SimdValueError, match=r"reduce: the array is empty \(shape \(0,\)\)"):
        simd.column_min(np.zeros(0, np.uint8))


def test_c_calls_reject_bad_widths_and_sizes():
    a = np.arange(8, dtype=np.uint8)
    buf = ffi.from_buffer(a)
    u64 = ffi.new("uint64_t *")
    sz = ffi.new("size_t *")
    out = ffi.new("int64_t[8]")
    m = ffi.new("uint8_t[8]")
    red = ffi.new("knhk_simd_reduction *")
    assert lib.knhk_simd_count_eq(buf, 8, 3, 1, u64) == lib.KNHK_ERR_INVALID
    assert "element width 3 bytes is not supported; accepted: 1, 2, 4, 8" in ffi.string(lib.knhk_last_error()).decode()
    assert lib.knhk_simd_find_eq(buf, 8, 16, 1, 0, out, 8, sz, sz) == lib.KNHK_ERR_INVALID
    assert lib.knhk_simd_mask_eq(buf, 8, 0, 1, m) == lib.KNHK_ERR_INVALID
    assert lib.knhk_simd_isin(buf, 8, 1, ffi.new("uint64_t[1]"), 257, m) == lib.KNHK_ERR_INVALID
    assert lib.knhk_simd_histogram(buf, 8, 1, ffi.new("uint64_t[1]"), 0, u64) == lib.KNHK_ERR_INVALID
    assert lib.knhk_simd_histogram(buf, 8, 5, ffi.new("uint64_t[1]"), 1, u64) == lib.KNHK_ERR_INVALID
    assert lib.knhk_simd_reduce(buf, 0, 1, red) == lib.KNHK_ERR_INVALID
    assert lib.knhk_simd_reduce(buf, 8, 7, red) == lib.KNHK_ERR_INVALID
    assert lib.knhk_simd_find_many(buf, 8, ffi.NULL, ffi.NULL, 2, ffi.NULL, ffi.NULL, ffi.NULL) == lib.KNHK_ERR_INVALID
    # from past the end: nothing written, next is n
    assert lib.knhk_simd_find_eq(buf, 8, 1, 1, 9, out, 8, sz, ffi.NULL) == lib.KNHK_OK and sz[0] == 0
    nxt = ffi.new("size_t *")
    assert lib.knhk_simd_find_all(buf, 8, b"\x01", 1, 0, 0, out, 8, nxt) == 1


def test_scans_release_the_gil_and_run_concurrently(level):
    from concurrent.futures import ThreadPoolExecutor

    a = np.random.default_rng(1).integers(0, 43, 1 << 20, dtype=np.uint32)
    expected = np.count_nonzero(a == 5)
    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(lambda _: simd.count_eq(a, 5), range(16))) == [expected] * 16


# ---------------------------------------------------------------- hot ops

def test_hot_ops_run_the_real_operation():
    ops = {op.name: op for op in simd.hot_ops()}
    assert set(ops) == {"search_64", "count_eq_4k"}
    ctx, cleanup = ops["search_64"].setup()
    lib.knhk_simd_hotop_search_64(ctx, 10)
    assert ffi.cast("knhk_simd_search64_ctx *", ctx).result == 48
    cleanup()
    ctx, cleanup = ops["count_eq_4k"].setup()
    lib.knhk_simd_hotop_count_eq_4k(ctx, 3)
    ids = np.random.default_rng(4096).integers(0, 43, 1024, dtype=np.uint32)
    assert ffi.cast("knhk_simd_count4k_ctx *", ctx).result == np.count_nonzero(ids == 7)
    cleanup()
    assert default_budgets()["search_64"].budget == 32 and default_budgets()["count_eq_4k"].budget == 400


def test_median_ticks_measures_in_c():
    for name in ("search_64", "count_eq_4k"):
        assert 0 < simd.median_ticks(name, batch=100, reps=11) < 1e6
    op = simd.hot_ops()[0]
    ctx, cleanup = op.setup()
    assert lib.knhk_simd_median_ticks(op.fn, ctx, 0, 0) > 0  # batch 0 and reps 0 are clamped to 1
    cleanup()
    with pytest.raises(SimdValueError, match=r"unknown hot op 'nope'; accepted: search_64, count_eq_4k"):
        simd.median_ticks("nope")


# ---------------------------------------------------------------- config, hook, plugin

def test_hook_reports_and_applies_the_configured_level():
    from knhk_memory import get_plugin_manager, load_config

    before = simd.level()
    pm = get_plugin_manager()
    config = load_config(mapping={"simd": {"level": "scalar"}})
    pm.hook.knhk_configure(config=config)
    try:
        assert pm.hook.knhk_simd_level(config=config) == "scalar"
        assert simd.level() == "scalar"
    finally:
        pm.hook.knhk_unconfigure(config=config)
    assert simd.level() == before
    auto = load_config(mapping={"simd": {"level": "auto"}})
    pm.hook.knhk_configure(config=auto)
    try:
        assert pm.hook.knhk_simd_level(config=auto) == before
    finally:
        pm.hook.knhk_unconfigure(config=auto)


def test_config_rejects_unknown_level():
    from knhk_memory import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"simd.level: 'avx' is not one of 'auto', 'scalar', 'avx2', 'avx512'"):
        load_config(mapping={"simd": {"level": "avx"}})


def test_hooks_are_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "hooks.md").read_text()
    assert "## knhk_simd_level" in doc


def test_plugin_refuses_a_level_the_cpu_lacks(monkeypatch):
    from knhk_memory import ConfigError, get_plugin_manager, load_config

    monkeypatch.setattr(simd, "supported_levels", lambda: ["scalar"])  # an old CPU
    before = simd.level()
    pm = get_plugin_manager()
    config = load_config(mapping={"simd": {"level": "avx512"}})
    missing = (r"this build has no avx512 kernels \(built with KNHK_PORTABLE=1: portable C only\)"
               if simd.PORTABLE_BUILD else "this CPU does not support the avx512 level")
    with pytest.raises(ConfigError, match=rf"simd.level: {missing}; supported: scalar, or auto"):
        pm.hook.knhk_configure(config=config)
    assert simd.level() == before
