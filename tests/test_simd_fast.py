"""The METH_FASTCALL find/count (native/simd_py.c): same results and errors as
the Python path for every argument kind, at every level."""

from __future__ import annotations

import gc
import mmap
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from knhk_memory import simd
from knhk_memory.errors import SimdTypeError, SimdValueError

LEVELS = simd.supported_levels()
BOUNDS = [(None, None), (0, None), (3, None), (-5, None), (None, -2), (2, 40), (10**30, None), (None, 10**30),
          (-(10**30), None), (True, None), (50, 3), (None, None)]


@pytest.fixture(params=LEVELS)
def level(request):
    with simd.forced_level(request.param) as name:
        yield name


def test_module_find_and_count_are_builtins():
    assert isinstance(simd.find, types.BuiltinFunctionType) and simd.find.__name__ == "find"
    assert isinstance(simd.count, types.BuiltinFunctionType) and simd.count.__name__ == "count"
    assert "as bytes.find" in simd.find.__doc__ and "overlapping=True" in simd.count.__doc__
    nd = simd.Needle(b"ab")
    assert isinstance(nd.find, types.BuiltinFunctionType) and isinstance(nd.count, types.BuiltinFunctionType)


def test_every_buffer_kind_and_bound(level, tmp_path):
    data = b"ab..abab.a.ab...........................................ab.."  # 60 bytes
    path = tmp_path / "d.bin"
    path.write_bytes(data)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        bufs = [data, bytearray(data), memoryview(data), mm, np.frombuffer(data, np.uint8).copy(),
                memoryview(bytearray(data))[1:], np.frombuffer(data, np.uint32)]
        for buf in bufs:
            ref = bytes(buf)
            for s in (b"ab", b"", b"a", b"zz", ref[-8:]):
                nd = simd.Needle(s)
                for start, end in BOUNDS:
                    want_f, want_c = ref.find(s, start, end), ref.count(s, start, end)
                    assert simd.find(buf, s, start, end) == want_f, (type(buf), s, start, end)
                    assert simd.count(buf, s, start, end) == want_c, (type(buf), s, start, end)
                    assert nd.find(buf, start, end) == want_f and nd.count(buf, start, end) == want_c


def test_other_arguments_take_the_python_path(level):
    h = b"abcabcab"
    assert simd.find(h, ord("c")) == 2 and simd.count(h, bytearray(b"ab")) == 3
    assert simd.count(h, b"abcab", overlapping=True) == 2 and simd.count(h, b"abcab") == 1
    assert simd.find(h, b"c", np.int64(3)) == 5
    assert simd.Needle(b"abcab").count(h, overlapping=True) == 2
    assert simd.Needle(b"c").find(h, np.int64(3)) == 5
    with pytest.raises(SimdTypeError, match=r"not str; encode it first"):
        simd.find("abc", b"a")
    with pytest.raises(SimdTypeError, match=r"not str; encode it first"):
        simd.Needle(b"a").count("abc")
    with pytest.raises(SimdTypeError, match=r"start must be an integer or None .* got str 'x'"):
        simd.find(h, b"a", "x")
    with pytest.raises(SimdValueError, match=r"one C-contiguous buffer"):
        simd.find(np.zeros((4, 4), np.uint8)[:, 0], b"a")
    with pytest.raises(TypeError):
        simd.find(h)
    with pytest.raises(TypeError):
        simd.Needle(b"a").find()


def test_large_scans_release_the_gil(level):
    h = b"." * (1 << 20) + b"needle"
    nd = simd.Needle(b"needle")
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda i: (simd.find(h, b"needle"), nd.count(h), simd.count(bytearray(h), b"needle")),
                          range(8)))
    assert got == [(1 << 20, 1, 1)] * 8


def test_needle_methods_keep_the_needle_alive():
    find = simd.Needle(b"xy").find
    gc.collect()
    assert find(b"..xy") == 2


def test_factories_reject_bad_arguments():
    with pytest.raises(TypeError, match=r"make_scan\(kind: 0 \(find\) or 1 \(count\), slow: callable\)"):
        simd._fast.make_scan(2, print)
    with pytest.raises(TypeError, match=r"make_needle_method\(kind: 0 or 1, needle_address: int"):
        simd._fast.make_needle_method(0, "x", None, print)
    with pytest.raises(ValueError, match=r"NULL needle"):
        simd._fast.make_needle_method(0, 0, None, print)
