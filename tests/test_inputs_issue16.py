"""Issue 16, input 7: names, sizes and buffers given in the wrong shape.

(``Counters("abc")`` is in tests/test_counters_exact.py.)
"""

from __future__ import annotations

import array

import numpy as np
import pytest

from knhk_memory import Arena, ThreadLocalArena, get_backend, simd
from knhk_memory.errors import SimdTypeError, SimdValueError

# ---------------------------------------------------------------- sizes: any operator.index integer


def test_issue_input_arena_alloc_numpy_int64():
    # Before: refused ("nbytes must be an int, got int64 64").
    with Arena() as a:
        buf = a.alloc(np.int64(64), np.int32(32))
        assert len(buf) == 64
        arr = a.array(np.int64(4), "float64", align=np.uint8(64))
        assert arr.shape == (4,)
        del buf, arr
    with Arena(chunk_size=np.int64(65536), max_chunk_size=np.uint32(1 << 20)) as a:
        assert a.chunk_size == 65536
    tla = ThreadLocalArena()
    assert len(tla.alloc(np.int16(10))) == 10
    tla.close()


def test_backend_sizes_take_numpy_integers():
    b = get_backend("system")
    block = b.malloc(np.int64(100))
    assert block.size >= 100
    block.free()


@pytest.mark.parametrize("value,shown", [(True, "bool True"), (np.bool_(True), r"bool (True|np\.True_)"),
                                         (1.5, "float 1.5"), ("64", "str '64'")])
def test_sizes_refuse_non_integers_by_name(value, shown):
    with Arena() as a, pytest.raises(TypeError, match=rf"nbytes must be an int, got {shown}"):
        a.alloc(value)


# ---------------------------------------------------------------- byte scans


def test_issue_input_find_on_int64_is_raw_bytes_documented():
    # The behaviour is kept and documented (module docstring, docs/simd.md):
    # positions are byte offsets, exactly bytes(a).find.
    a = np.array([1, 2, 3], dtype=np.int64)
    needle = np.int64(3).tobytes()
    assert simd.find(a, needle) == bytes(a).find(needle) == 16
    assert simd.count(a, b"\0") == bytes(a).count(b"\0")
    assert simd.find(array.array("i", [7, 8]), b"\x08") == 4
    assert "byte offsets" in simd.__doc__  # (find itself is the C fast path's builtin)
    # The id scans are element-wise and refuse a signed dtype, by name:
    with pytest.raises(SimdTypeError, match=r"dtype int64 is not supported; accepted: uint8, uint16, uint32, uint64"):
        simd.count_eq(a, 3)


def test_issue_input_non_contiguous_memoryview_needle():
    # Before: SimdTypeError (from memoryview.cast), the wrong type.
    needle = memoryview(b"abcdef")[::2]
    with pytest.raises(SimdValueError, match=(r"the needle must be one C-contiguous buffer \(this one has shape "
                                              r"\(3,\), strides \(2,\) \(bytes between elements\), itemsize 1\); "
                                              r"pass bytes\(x\)")):
        simd.find(b"xxace", needle)
    with pytest.raises(SimdValueError, match=r"the needle must be one C-contiguous buffer"):
        simd.Needle(needle)
    with pytest.raises(SimdValueError, match=r"the needle must be one C-contiguous buffer"):
        simd.count(b"abc", np.arange(10, dtype=np.uint8)[::3])


def test_non_contiguous_haystack_names_its_strides():
    hay = np.arange(20, dtype=np.uint8).reshape(4, 5)[:, :2]
    with pytest.raises(SimdValueError, match=r"the haystack must be one C-contiguous buffer \(this one has shape "
                                             r"\(4, 2\), strides \(5, 1\)"):
        simd.find(hay, b"\x05")
    with pytest.raises(SimdValueError, match=r"strides \(5, 1\)"):
        simd.find_many(hay, [b"\x05"])
