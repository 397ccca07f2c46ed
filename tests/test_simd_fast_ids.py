"""The METH_FASTCALL id scans (native/simd_py.c): count_eq, find_eq, mask_eq,
isin, histogram, reduce and column_min/max/sum give the same results as the
Python functions they fall back to (simd._<name>_py) and as numpy, at every
level, and every call they do not take goes to the Python path, which raises
the same errors as before."""

from __future__ import annotations

import gc
import inspect
import sys
import tracemalloc
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knhk_memory import simd
from knhk_memory.errors import SimdTypeError, SimdValueError

LEVELS = simd.supported_levels()
ID_DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64]
NAMES = ["count_eq", "find_eq", "mask_eq", "isin", "histogram", "reduce", "column_min", "column_max", "column_sum"]
# Around the stack buffer of find_eq's first positions (256), the GIL release
# (64 KiB) and the batch size an engine uses (4096).
AROUND = [255, 256, 257, 511, 512, 513, 4095, 4096, 4097, 5000, 16383, 16384, 16385, 70000]


@pytest.fixture(params=LEVELS)
def level(request):
    with simd.forced_level(request.param) as name:
        yield name


def slow(name: str):
    return getattr(simd, f"_{name}_py")


def ids_array(rng: np.random.Generator, n: int, dtype, hi: int = 43) -> np.ndarray:
    """Ids mostly below hi, a few at the dtype's maximum (the widest compare)."""
    a = rng.integers(0, hi, n, dtype=dtype)
    if n:
        a[rng.integers(0, n, max(1, n // 50))] = np.iinfo(dtype).max
    return a


def check_all(a: np.ndarray, values: list[int]) -> None:
    """Fast path == Python path == numpy for every scan on a, at the active level."""
    for v in values:
        for fn in (simd.count_eq, slow("count_eq")):
            assert fn(a, v) == np.count_nonzero(a == v), (a.dtype, a.shape, v)
        want = np.flatnonzero(a == v)
        for fn in (simd.find_eq, slow("find_eq")):
            got = fn(a, v)
            assert got.dtype == np.int64 and got.flags.owndata and got.flags.c_contiguous
            assert np.array_equal(got, want), (a.dtype, a.shape, v)
        for fn in (simd.mask_eq, slow("mask_eq")):
            got = fn(a, v)
            assert got.dtype == np.bool_ and got.shape == a.shape and np.array_equal(got, a == v)
    sets = [values[:3], [values[0]], [], [*values, -1, 1 << 70]]
    for ids in sets:
        for fn in (simd.isin, slow("isin")):
            got = fn(a, ids)
            assert got.shape == a.shape and np.array_equal(got, np.isin(a, [x for x in ids if x >= 0])), ids
    small = a[a < 43] if a.ndim else a.reshape(-1)[a.reshape(-1) < 43]
    for fn in (simd.histogram, slow("histogram")):
        got = fn(a, 43, out_of_range="ignore")
        assert got.dtype == np.int64 and got.flags.owndata
        assert np.array_equal(got, np.bincount(small.ravel(), minlength=43))
        got = fn(a, nbins=44, out_of_range="ignore")
        assert np.array_equal(got, np.bincount(small.ravel(), minlength=44))
    if a.size:
        for fn in (simd.reduce, slow("reduce")):
            r = fn(a)
            assert isinstance(r, simd.Reduction)
            assert r == (int(a.min()), int(a.max()), int(a.sum(dtype=np.uint64)))
        assert simd.column_min(a) == slow("column_min")(a) == int(a.min())
        assert simd.column_max(a) == slow("column_max")(a) == int(a.max())
    assert simd.column_sum(a) == slow("column_sum")(a) == int(a.sum(dtype=np.uint64))


# ---------------------------------------------------------------- what they are


def test_id_scans_are_builtins_with_the_python_docs():
    for name in NAMES:
        fast, py = getattr(simd, name), slow(name)
        assert isinstance(fast, types.BuiltinFunctionType) and fast.__name__ == name, name
        assert inspect.getdoc(fast) == inspect.getdoc(py), name
        assert list(inspect.signature(fast).parameters) == list(inspect.signature(py).parameters), name
        assert fast.__module__ == "knhk_memory.simd"


def spied(name: str, extra=None):
    """The fast builtin of `name` over a slow path that records its calls."""
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return slow(name)(*args, **kwargs)

    args = (name, spy) if extra is None else (name, spy, extra)
    return simd._fast.make_id_scan(*args), calls


def test_the_common_calls_take_the_fast_path_and_the_rest_fall_back():
    a = np.arange(100, dtype=np.uint32) % 43
    fast = {name: spied(name, simd.Reduction if name == "reduce" else None) for name in NAMES}

    def fell_back(name, *args, **kwargs):
        fn, calls = fast[name]
        before = len(calls)
        try:
            fn(*args, **kwargs)
        except (SimdTypeError, SimdValueError, TypeError):
            pass
        return len(calls) > before

    def taken(name, *args, **kwargs):
        return not fell_back(name, *args, **kwargs)

    for v in (7, np.uint32(7), np.int64(7), np.uint8(7), 0, 2**32 - 1):
        assert taken("count_eq", a, v) and taken("find_eq", a, v) and taken("mask_eq", a, v)
    assert taken("isin", a, [1, 2, 3]) and taken("isin", a, (1, np.uint16(2))) and taken("isin", a, [])
    assert taken("isin", a, [1, 1, 2, -1, 1 << 40])  # repeated and out-of-range ids are handled in C
    assert taken("isin", np.zeros(3, np.uint64), [2**64, 2**63, -(2**70), 1 << 200])
    assert taken("histogram", a, 43) and taken("histogram", a) and taken("histogram", a, None)
    assert taken("histogram", a, 43, out_of_range="ignore") and taken("histogram", a, nbins=43, out_of_range="raise")
    assert taken("histogram", a, out_of_range="ignore", nbins=50) and taken("histogram", a, 40, out_of_range="ignore")
    assert taken("histogram", a, 1 << 20) and taken("histogram", a[:0]) and taken("histogram", a[:0], 3)
    for name in ("reduce", "column_min", "column_max", "column_sum"):
        assert taken(name, a) and taken(name, a.reshape(10, 10)) and taken(name, np.array(5, np.uint64))
    assert taken("column_sum", a[:0]) and taken("count_eq", a[:0], 1) and taken("find_eq", a[:0], 1)
    assert taken("count_eq", np.full(3, 2**64 - 1, np.uint64), 2**64 - 1)
    assert taken("find_eq", np.zeros(1 << 21, np.uint8), 1)

    # Everything else goes to the Python function, which converts or raises.
    for v in (True, np.bool_(True), 7.0, "7", None, np.timedelta64(7), -1, 2**32, 2**64, -(2**70)):
        for name in ("count_eq", "find_eq", "mask_eq"):
            assert fell_back(name, a, v), (name, v)
    sub = type("Sub", (np.ndarray,), {})
    for bad in (a.astype(np.int32), a.astype(">u4"), a[::2], a.reshape(10, 10).T, list(range(5)), a.view(sub),
                np.ma.masked_array(a)):
        for name in NAMES:
            assert fell_back(name, bad, 7) if name in ("count_eq", "find_eq", "mask_eq") else \
                fell_back(name, bad, [7]) if name == "isin" else fell_back(name, bad), (name, type(bad))
    assert fell_back("count_eq", a=a, v=7) and fell_back("find_eq", a, v=7) and fell_back("reduce", a=a)
    assert fell_back("count_eq", a) and fell_back("count_eq", a, 1, 2)
    assert fell_back("isin", a, np.array([1, 2])) and fell_back("isin", a, range(3)) and fell_back("isin", a, {1})
    assert fell_back("isin", a, list(range(257))) and fell_back("isin", a, [1, True]) and fell_back("isin", a, [1.0])
    assert fell_back("histogram", a, np.int64(43)) and fell_back("histogram", a, (1 << 20) + 1)
    assert fell_back("histogram", a, 0) and fell_back("histogram", a, True) and fell_back("histogram", a, 4.0)
    assert fell_back("histogram", a, 43, out_of_range="clip") and fell_back("histogram", a, 43, bins=3)
    assert fell_back("histogram", a, 10)  # ids >= nbins: the Python path raises, naming the largest
    assert fell_back("histogram", a, 43, nbins=43) and fell_back("histogram", a, 43, 1)
    assert fell_back("reduce", a[:0]) and fell_back("column_min", a[:0]) and fell_back("column_max", a[:0])
    assert fell_back("find_eq", np.zeros((1 << 21) + 1, np.uint8), 1)  # _collect's geometric growth


# ---------------------------------------------------------------- results


def test_every_dtype_and_size_at_every_level(level):
    rng = np.random.default_rng(7)
    for dtype in ID_DTYPES:
        top = int(np.iinfo(dtype).max)
        for n in list(range(301)) + AROUND:
            a = ids_array(rng, n, dtype)
            values = [7, 0, 42, top] if n > 300 or n % 7 == 0 else [7]
            if n <= 300 and n % 7:
                for v in values:  # the cheap part of check_all, for every size
                    assert simd.count_eq(a, v) == slow("count_eq")(a, v) == np.count_nonzero(a == v)
                    assert np.array_equal(simd.find_eq(a, v), np.flatnonzero(a == v))
                    assert np.array_equal(simd.mask_eq(a, v), a == v)
                if n:
                    assert simd.reduce(a) == slow("reduce")(a)
                assert np.array_equal(simd.histogram(a, 43, out_of_range="ignore"),
                                      slow("histogram")(a, 43, out_of_range="ignore"))
            else:
                check_all(a, values)


def test_find_eq_counts_around_the_stack_buffer(level):
    """Results of 0..600 positions, the 256th match at every kind of place, and
    everything matching: the stack part and the grown part join exactly."""
    for dtype in ID_DTYPES:
        for n in (255, 256, 257, 300, 4096, 70000):
            for hits in sorted({0, 1, 255, 256, 257, min(n, 600), n}):
                if hits > n:
                    continue
                a = np.zeros(n, dtype)
                a[np.linspace(0, n - 1, hits).astype(np.int64)] = 5
                want = np.flatnonzero(a == 5)
                got = simd.find_eq(a, 5)
                assert np.array_equal(got, want) and got.flags.owndata, (dtype, n, hits)
                assert got.base is None and got.nbytes == want.nbytes


def test_shapes_and_zero_d(level):
    rng = np.random.default_rng(11)
    for dtype in ID_DTYPES:
        for shape in [(), (1,), (0,), (0, 5), (5, 0), (3, 4), (64, 64), (2, 3, 700)]:
            a = ids_array(rng, int(np.prod(shape)), dtype).reshape(shape)
            check_all(a, [7, 0, int(np.iinfo(dtype).max)])
    a = np.array(7, np.uint16)
    assert simd.count_eq(a, 7) == 1 and simd.find_eq(a, 7).tolist() == [0]
    assert simd.mask_eq(a, 7).shape == () and bool(simd.mask_eq(a, 7))
    assert simd.isin(a, [7]).shape == () and simd.histogram(a).tolist() == [0] * 7 + [1]
    assert simd.reduce(a) == (7, 7, 7)
    assert simd.histogram(np.zeros((0, 3), np.uint8)).tolist() == []


def test_read_only_and_offset_views(level):
    rng = np.random.default_rng(3)
    base = ids_array(rng, 5000, np.uint32)
    ro = base.copy()
    ro.flags.writeable = False
    check_all(ro, [7, 42])
    check_all(base[1:], [7, 42])  # a view: contiguous, unaligned start in its parent
    check_all(np.frombuffer(base.tobytes(), np.uint32), [7])  # read-only, not owning
    # Other unsigned spellings of the same widths.
    for code in ("B", "H", "I", "L", "Q", "=u4", "<u8"):
        a = ids_array(rng, 300, np.dtype(code))
        check_all(a, [7])
    # Misaligned (offset by one byte): refused by both paths (reading it as
    # uint32_t in C would be undefined behaviour), with the same error.
    raw = np.zeros(4 * 301, np.uint8)
    mis = np.frombuffer(raw.data, np.uint32, count=300, offset=1)
    assert not mis.flags.aligned
    for name in ("count_eq", "find_eq", "mask_eq"):
        for fn in (getattr(simd, name), getattr(simd, f"_{name}_py")):
            with pytest.raises(SimdValueError, match=rf"{name}: the array's data is not aligned to its 4-byte "
                                                     r"elements \(address % 4 = \d\); pass numpy.require\(a, "
                                                     r"requirements='A'\), which copies"):
                fn(mis, 7)
    assert simd.count_eq(np.require(mis, requirements="A"), 0) == 300


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(ID_DTYPES), data=st.data())
def test_fast_equals_python_path_on_any_ids(dtype, data):
    top = int(np.iinfo(dtype).max)
    values = data.draw(st.lists(st.one_of(st.integers(0, 50), st.sampled_from([top, top - 1])), max_size=400))
    a = np.asarray(values, dtype=dtype)
    v = data.draw(st.one_of(st.integers(0, 50), st.integers(-(1 << 65), 1 << 65), st.just(top)))
    ids = data.draw(st.lists(st.integers(-5, top), max_size=20))
    for name, args in (("count_eq", (a, v)), ("mask_eq", (a, v)), ("find_eq", (a, v)), ("isin", (a, ids)),
                       ("histogram", (a, 51)), ("column_sum", (a,))):
        outcomes = []
        for fn in (getattr(simd, name), slow(name)):
            try:
                r = fn(*args)
                outcomes.append(("ok", r.tolist() if isinstance(r, np.ndarray) else r))
            except (SimdTypeError, SimdValueError) as e:
                outcomes.append((type(e), str(e)))
        assert outcomes[0] == outcomes[1], (name, args)


# ---------------------------------------------------------------- fallbacks and errors


def outcome(fn, *args, **kwargs):
    try:
        r = fn(*args, **kwargs)
    except Exception as e:  # compared, not swallowed
        return ("raise", type(e), str(e))
    return ("ok", r.dtype.str, r.shape, r.tolist()) if isinstance(r, np.ndarray) else ("ok", r)


def test_every_fallback_matches_the_python_path(level):
    u8 = np.array([1, 2, 3, 255], np.uint8)
    u64 = np.array([0, 2**63, 2**64 - 1], np.uint64)
    arrays = [u8, u64, np.zeros(4, np.int32), np.zeros(4, np.int64), np.zeros(4), np.zeros(4, np.bool_),
              np.zeros(4, ">u4"), np.zeros(4, ">u2"), np.zeros(10, np.uint32)[::2], np.zeros((4, 4), np.uint8).T,
              [1, 2, 3], (1, 2), "abc", b"abc", None, 5, np.zeros(4, np.uint32).view(type("S", (np.ndarray,), {})),
              np.ma.masked_array(np.zeros(4, np.uint32)), np.zeros(3, "u4,u4")]
    ids = [True, False, np.bool_(True), "1", b"1", 1.0, np.float32(1), None, [1], -1, -(2**70), 256, 2**32, 2**63,
           2**64 - 1, 2**64, 2**200, np.int8(-1), np.uint64(2**64 - 1), np.timedelta64(1), 1 + 0j]
    for a in arrays:
        for v in ids:
            for name in ("count_eq", "find_eq", "mask_eq"):
                assert outcome(getattr(simd, name), a, v) == outcome(slow(name), a, v), (name, a, v)
        for name in ("reduce", "column_min", "column_max", "column_sum"):
            assert outcome(getattr(simd, name), a) == outcome(slow(name), a), (name, a)
        for s in ([1, 2], [], [True], [1, "x"], [1, 2**64, -3], 5, "ab", b"ab", {1, 2}, range(300),
                  list(range(300)), [0] * 300, np.array([1, 255]), (np.uint8(1), 2.0)):
            assert outcome(simd.isin, a, s) == outcome(slow("isin"), a, s), (a, s)
        for nb in (None, 0, -1, 1, 2, 256, 4.0, True, np.int64(3), "3", 2**20, 2**20 + 1, 2**70):
            for kw in ({}, {"out_of_range": "raise"}, {"out_of_range": "ignore"}, {"out_of_range": "clip"},
                       {"out_of_range": b"raise"}, {"out_of_range": None}):
                if nb in (2**20, 2**20 + 1) and not (isinstance(a, np.ndarray) and a.dtype == np.uint8):
                    continue  # 8 MiB of counts per case: the uint8 arrays are enough
                assert outcome(simd.histogram, a, nb, **kw) == outcome(slow("histogram"), a, nb, **kw), (a, nb, kw)


def test_fallback_errors_say_what_they_said():
    a = np.zeros(4, np.uint8)
    with pytest.raises(SimdTypeError, match=r"count_eq: the id must be an integer, got bool True"):
        simd.count_eq(a, True)
    with pytest.raises(SimdTypeError, match=r"find_eq: the id must be an integer, got bool np.True_"):
        simd.find_eq(a, np.bool_(True))
    with pytest.raises(SimdTypeError, match=r"mask_eq: the id must be an integer, got str '1'"):
        simd.mask_eq(a, "1")
    with pytest.raises(SimdTypeError, match=r"count_eq: expected a numpy array of uint8, uint16, uint32, uint64, "
                                             r"got list"):
        simd.count_eq([1, 2], 1)
    with pytest.raises(SimdTypeError, match=r"find_eq: dtype int64 is not supported; .* a\.view\(numpy\.uint64\)"):
        simd.find_eq(np.zeros(4, np.int64), 1)
    with pytest.raises(SimdTypeError, match=r"reduce: dtype >u4 is not supported; accepted: .* in native byte order"):
        simd.reduce(np.zeros(4, ">u4"))
    with pytest.raises(SimdValueError, match=r"mask_eq: the array is not C-contiguous \(shape \(5,\), strides"):
        simd.mask_eq(np.zeros(10, np.uint32)[::2], 0)
    with pytest.raises(SimdValueError, match=r"histogram: 1 ids are >= nbins=4 \(largest 9\)"):
        simd.histogram(np.array([1, 9], np.uint16), 4)
    with pytest.raises(SimdValueError, match=r"histogram: out_of_range='clip'; accepted: 'raise', 'ignore'"):
        simd.histogram(a, 4, out_of_range="clip")
    with pytest.raises(SimdTypeError, match=r"histogram: nbins must be an integer, got bool True"):
        simd.histogram(a, True)
    with pytest.raises(SimdValueError, match=r"histogram: nbins must be at least 1, got 0"):
        simd.histogram(a, nbins=0)
    with pytest.raises(SimdValueError, match=r"column_min: |reduce: the array is empty \(shape \(0, 3\)\)"):
        simd.column_min(np.zeros((0, 3), np.uint32))
    with pytest.raises(SimdValueError, match=r"isin: 300 distinct ids given; at most 256 are accepted"):
        simd.isin(a.astype(np.uint16), list(range(300)))
    with pytest.raises(TypeError, match=r"count_eq\(\) missing 1 required positional argument: 'v'"):
        simd.count_eq(a)
    with pytest.raises(TypeError, match=r"histogram\(\) got an unexpected keyword argument 'bins'"):
        simd.histogram(a, bins=4)
    with pytest.raises(TypeError, match=r"histogram\(\) got multiple values for argument 'nbins'"):
        simd.histogram(a, 4, nbins=4)
    # Out of range: no match, as numpy compares it.
    assert simd.count_eq(a, 256) == 0 and simd.count_eq(a, -1) == 0 and simd.find_eq(a, 2**64).size == 0
    assert simd.mask_eq(a.reshape(2, 2), -5).shape == (2, 2) and not simd.mask_eq(a, 300).any()
    assert simd.count_eq(a=a, v=0) == 4 and simd.histogram(a, nbins=1).tolist() == [4]


def test_a_refused_level_raises_through_the_python_path(run_python):
    code = ("import numpy as np\nfrom knhk_memory import simd\nfrom knhk_memory.errors import SimdLevelError\n"
            "a = np.zeros(8, np.uint32)\n"
            "for call in (lambda: simd.count_eq(a, 0), lambda: simd.find_eq(a, 0), lambda: simd.mask_eq(a, 0),\n"
            "             lambda: simd.isin(a, [0]), lambda: simd.histogram(a, 4), lambda: simd.reduce(a),\n"
            "             lambda: simd.column_sum(a)):\n"
            "    try:\n        call()\n        print('NO ERROR')\n"
            "    except SimdLevelError as e:\n        print('ERR', e)\n"
            "simd.set_level('scalar')\nprint('OK', simd.count_eq(a, 0), simd.reduce(a))\n")
    r = run_python(code, env={"KNHK_SIMD": "avx1024"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 8 and all(ln.startswith("ERR KNHK_SIMD=avx1024 is not a SIMD level") for ln in lines[:7])
    assert lines[7] == "OK 8 Reduction(min=0, max=0, sum=0)"


# ---------------------------------------------------------------- references, memory, threads


def every_call(a, a64, h, v):
    """Fast calls, fallbacks and raising calls of every id scan, once each."""
    simd.count_eq(a, v), simd.find_eq(a, v), simd.mask_eq(a, v), simd.isin(a, [v, 3, 2**70])
    simd.histogram(h, 64), simd.histogram(h), simd.histogram(h, nbins=64, out_of_range="ignore")
    simd.reduce(a), simd.column_min(a), simd.column_max(a), simd.column_sum(a), simd.column_sum(a[:0])
    simd.count_eq(a, -1), simd.find_eq(a, 2**40), simd.mask_eq(a, np.uint64(v)), simd.count_eq(a64, 2**64)
    simd.find_eq(a64, 2**63 + 1), simd.isin(a64, [2**64, 2**63]), simd.find_eq(a, np.int8(3))
    for bad in (lambda: simd.count_eq(a, True), lambda: simd.find_eq(a[::2], v), lambda: simd.histogram(h, 2),
                lambda: simd.isin(a, [1, True]), lambda: simd.reduce(a[:0]), lambda: simd.mask_eq(a, "x"),
                lambda: simd.histogram(h, 4, out_of_range="clip"), lambda: simd.histogram(h, x=1)):
        try:
            bad()
        except (SimdTypeError, SimdValueError, TypeError):
            pass
        else:  # pragma: no cover - each of these raises
            raise AssertionError("no error")


def test_no_reference_or_memory_leaks():
    v = int("1000003")  # an int object of its own (no cached small int), and in the data
    a = (np.arange(4096, dtype=np.uint32) * 7) % 60
    a[::97] = v
    a64 = np.arange(100, dtype=np.uint64)
    h = (np.arange(4096) % 60).astype(np.uint8)
    funcs = [getattr(simd, n) for n in NAMES] + [slow(n) for n in NAMES] + [simd.Reduction]
    objs = (a, a64, h, v, *funcs)
    every_call(a, a64, h, v)
    gc.collect()
    before = [sys.getrefcount(x) for x in objs]
    for _ in range(300):
        every_call(a, a64, h, v)
    gc.collect()
    assert [sys.getrefcount(x) for x in objs] == before
    tracemalloc.start()
    try:
        for _ in range(200):
            every_call(a, a64, h, v)
        gc.collect()
        first, _ = tracemalloc.get_traced_memory()
        for _ in range(2000):
            every_call(a, a64, h, v)
        gc.collect()
        last, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert last - first < 64 * 1024, (first, last)  # 2000 rounds of ~25 arrays each would be megabytes


def test_cleared_internal_errors_leave_no_exception_set():
    """Ids C converts and gives up on (2**64 and beyond for uint64, a bool in
    the middle of an isin list) must not leave an error behind: the next
    operation would then fail with SystemError."""
    a64 = np.array([1, 2**64 - 1], np.uint64)
    for _ in range(3):
        assert simd.count_eq(a64, 2**64) == 0 and simd.count_eq(a64, 2**64 - 1) == 1
        assert simd.find_eq(a64, 2**100).size == 0 and not simd.mask_eq(a64, -(2**100)).any()
        assert simd.isin(a64, [2**64, 2**64 - 1, -1]).tolist() == [False, True]
        with pytest.raises(SimdTypeError, match=r"isin: the id must be an integer, got bool True"):
            simd.isin(a64, [1, 2**64, True, 3])
        assert sys.exc_info() == (None, None, None)
        assert simd.histogram(np.array([1, 2], np.uint8), 3).tolist() == [0, 1, 1]
        with pytest.raises(ValueError, match="Maximum allowed dimension exceeded"):
            simd.histogram(a64)  # nbins = 2**64: numpy refuses the allocation, as before
        with pytest.raises(ValueError, match="Maximum allowed dimension exceeded"):
            simd.histogram(a64, 2**70)
        assert [x for x in range(3)] == [0, 1, 2]  # noqa: C416 - Python code still runs after the cleared errors


def test_large_scans_release_the_gil_and_agree(level):
    a = (np.arange(1 << 18, dtype=np.uint32) * 13) % 43  # 1 MiB
    want = (np.count_nonzero(a == 5), np.flatnonzero(a == 5).tolist(), simd._histogram_py(a, 43).tolist(),
            tuple(simd._reduce_py(a)))

    def work(_):
        return (simd.count_eq(a, 5), simd.find_eq(a, 5).tolist(), simd.histogram(a, 43).tolist(),
                tuple(simd.reduce(a)))

    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(work, range(8))) == [want] * 8
    assert np.array_equal(simd.mask_eq(a, 5), a == 5) and np.array_equal(simd.isin(a, [5, 6]), np.isin(a, [5, 6]))


def test_factory_rejects_bad_arguments():
    msg = r"make_id_scan\(name: count_eq, find_eq, .*slow: callable, result_type: for reduce, a NamedTuple class\)"
    for args in (("nope", print), ("count_eq", 5), ("reduce", print), ("reduce", print, dict),
                 ("reduce", print, type("T", (tuple,), {})), (b"count_eq", print), ("count_eq",)):
        with pytest.raises(TypeError, match=msg):
            simd._fast.make_id_scan(*args)
    fn = simd._fast.make_id_scan("reduce", slow("reduce"), type("T", (tuple,), {"__slots__": ()}))
    r = fn(np.array([4, 2], np.uint8))
    assert type(r).__name__ == "T" and r == (2, 4, 6)
