"""The pool and NUMA C calls directly (pointer forms, every exported function; run under ASan too)."""

from __future__ import annotations

import pytest

from knhk_memory._core import ffi, lib


def _err() -> str:
    return ffi.string(lib.knhk_last_error()).decode()


def test_size_class_rejects_bad_arguments() -> None:
    assert lib.knhk_pool_size_class(0, 8) == 0 and "block_size must be from 1" in _err()
    assert lib.knhk_pool_size_class(64, 3) == 0 and "power of two" in _err()
    assert lib.knhk_pool_size_class(64, 8) == 64


def test_fixed_pool_pointer_calls() -> None:
    out = ffi.new("knhk_pool **")
    assert lib.knhk_pool_create(24, 5, 8, ffi.NULL, out) == lib.KNHK_OK
    p = out[0]
    problem = ffi.new("int *")
    blocks = [lib.knhk_pool_alloc(p, problem) for _ in range(5)]
    assert problem[0] == lib.KNHK_POOL_OK
    assert lib.knhk_pool_alloc(p, ffi.NULL) == ffi.NULL
    assert [lib.knhk_pool_index(p, b) for b in blocks] == [0, 1, 2, 3, 4]
    assert lib.knhk_pool_index(p, ffi.cast("char *", blocks[0]) + 1) == -1
    assert lib.knhk_pool_is_allocated(p, 4) == 1 and lib.knhk_pool_is_allocated(p, 5) == -1
    assert lib.knhk_pool_free(p, blocks[4]) == lib.KNHK_POOL_OK
    assert lib.knhk_pool_is_allocated(p, 4) == 0
    assert lib.knhk_pool_free(p, blocks[4]) == lib.KNHK_POOL_DOUBLE_FREE
    assert lib.knhk_pool_free(p, ffi.NULL) == lib.KNHK_POOL_FOREIGN
    assert lib.knhk_pool_base(p) == blocks[0]
    addrs = ffi.new("uint64_t[4]")
    assert lib.knhk_pool_free_many(p, ffi.new("uint64_t[]", [int(ffi.cast("uintptr_t", b)) for b in blocks[:4]]),
                                   4, problem) == 4
    assert lib.knhk_pool_alloc_many(p, addrs, 4, problem) == 4
    a = lib.knhk_pool_alloc_addr(p, problem)
    assert a and lib.knhk_pool_free_addr(p, a) == lib.KNHK_POOL_OK
    st = ffi.new("knhk_pool_stats *")
    lib.knhk_pool_stats_get(p, st)
    assert (st.in_use, st.high_water, st.stride, st.failed, st.bad_frees) == (4, 5, 24, 1, 2)
    lib.knhk_pool_close(p)
    assert lib.knhk_pool_alloc(p, problem) == ffi.NULL and problem[0] == lib.KNHK_POOL_CLOSED
    lib.knhk_pool_destroy(p)
    assert lib.knhk_pool_create(24, 0, 8, ffi.NULL, out) == lib.KNHK_ERR_INVALID and out[0] == ffi.NULL
    assert "capacity must be from 1" in _err()


def test_lock_free_pool_pointer_calls() -> None:
    out = ffi.new("knhk_lfpool **")
    assert lib.knhk_lfpool_create(64, 3, 64, ffi.NULL, out) == lib.KNHK_OK
    p = out[0]
    b = lib.knhk_lfpool_alloc(p, ffi.NULL)
    assert int(ffi.cast("uintptr_t", b)) % 64 == 0
    assert lib.knhk_lfpool_index(p, b) == 0 and lib.knhk_lfpool_base(p) == b
    assert lib.knhk_lfpool_free(p, b) == lib.KNHK_POOL_OK
    assert lib.knhk_lfpool_free(p, b) == lib.KNHK_POOL_DOUBLE_FREE
    a = lib.knhk_lfpool_alloc_addr(p, ffi.NULL)
    assert lib.knhk_lfpool_free_addr(p, a + 64 * 7) == lib.KNHK_POOL_FOREIGN
    assert lib.knhk_lfpool_free_addr(p, a) == lib.KNHK_POOL_OK
    ops = ffi.new("uint64_t[3]")
    assert lib.knhk_lfpool_stress(p, 2, 1000, 2, ops) == lib.KNHK_OK
    assert lib.knhk_lfpool_stress(p, 0, 1, 1, ops) == lib.KNHK_ERR_INVALID
    st = ffi.new("knhk_pool_stats *")
    lib.knhk_lfpool_stats_get(p, st)
    assert st.in_use == 0 and st.allocations == st.frees
    lib.knhk_lfpool_close(p)
    lib.knhk_lfpool_destroy(p)
    steps = ffi.new("uint64_t *")
    assert lib.knhk_lfpool_model_check(3, 2, 50, 2, 0, steps) == lib.KNHK_OK and steps[0] > 0


def test_thread_local_pool_pointer_calls() -> None:
    out = ffi.new("knhk_tlpool **")
    assert lib.knhk_tlpool_create(64, 100, 8, 1, ffi.NULL, out) == lib.KNHK_ERR_INVALID
    assert "cache_size must be from 2" in _err()
    assert lib.knhk_tlpool_create(64, 100, 8, 8, ffi.NULL, out) == lib.KNHK_OK
    p = out[0]
    b = lib.knhk_tlpool_alloc(p, ffi.NULL)
    assert lib.knhk_tlpool_index(p, b) >= 0 and lib.knhk_tlpool_base(p) != ffi.NULL
    assert lib.knhk_tlpool_free(p, b) == lib.KNHK_POOL_OK
    assert lib.knhk_tlpool_free(p, b) == lib.KNHK_POOL_DOUBLE_FREE
    a = lib.knhk_tlpool_alloc_addr(p, ffi.NULL)
    assert lib.knhk_tlpool_free_addr(p, a) == lib.KNHK_POOL_OK
    ops = ffi.new("uint64_t[3]")
    assert lib.knhk_tlpool_stress(p, 3, 500, ops) == lib.KNHK_OK
    lib.knhk_tlpool_flush(p)
    st = ffi.new("knhk_pool_stats *")
    lib.knhk_tlpool_stats_get(p, st)
    assert st.in_use == 0 and st.cached == 0
    lib.knhk_tlpool_close(p)
    lib.knhk_tlpool_destroy(p)


@pytest.mark.parametrize("kind", [lib.KNHK_POOL_BENCH_MUTEX, lib.KNHK_POOL_BENCH_FIXED, lib.KNHK_POOL_BENCH_LOCKFREE,
                                  lib.KNHK_POOL_BENCH_THREADLOCAL, lib.KNHK_POOL_BENCH_BACKEND])
def test_bench_kinds_run(kind: int) -> None:
    from knhk_memory.allocator import get_backend

    seconds = ffi.new("double *")
    threads = 1 if kind == lib.KNHK_POOL_BENCH_FIXED else 2
    backend = get_backend("system").cdata if kind == lib.KNHK_POOL_BENCH_BACKEND else ffi.NULL
    assert lib.knhk_pool_bench(kind, backend, threads, 200, 64, 256, seconds) == lib.KNHK_OK
    assert seconds[0] > 0
    assert lib.knhk_pool_bench(kind, backend, 0, 200, 64, 256, seconds) == lib.KNHK_ERR_INVALID


def test_numa_calls_on_this_machine() -> None:
    import mmap

    mode = ffi.new("int *")
    assert lib.knhk_numa_thread_policy(mode) == lib.KNHK_OK
    m = mmap.mmap(-1, 1 << 16)
    buf = ffi.from_buffer(m)
    mask = ffi.new("uint64_t[1]", [1])
    # node 0 exists on every Linux machine (a kernel without NUMA reports ENOSYS: refused, never a crash)
    st = lib.knhk_numa_mbind(buf, 1 << 16, lib.KNHK_NUMA_BIND, mask, 1)
    assert st in (lib.KNHK_OK, lib.KNHK_ERR_UNAVAILABLE), _err()
    m[0] = 1
    node = ffi.new("int *")
    assert lib.knhk_numa_node_of(buf, node) in (lib.KNHK_OK, lib.KNHK_ERR_UNAVAILABLE)
    assert lib.knhk_numa_mbind(buf, 1 << 16, 9, mask, 1) == lib.KNHK_ERR_INVALID and "NUMA mode must be" in _err()
    assert lib.knhk_numa_mbind(buf, 1 << 16, lib.KNHK_NUMA_BIND, ffi.NULL, 0) == lib.KNHK_ERR_INVALID
    assert "needs at least one node" in _err()
    assert lib.knhk_numa_mbind(ffi.cast("char *", buf) + 1, 4096, lib.KNHK_NUMA_LOCAL, ffi.NULL, 0) \
        == lib.KNHK_ERR_INVALID and "page-aligned" in _err()
    assert lib.knhk_numa_set_thread_policy(lib.KNHK_NUMA_LOCAL, mask, 1) == lib.KNHK_ERR_INVALID
    assert "takes no nodes" in _err()
    assert lib.knhk_numa_mbind(buf, 1 << 16, lib.KNHK_NUMA_BIND, mask, 17) == lib.KNHK_ERR_INVALID
    assert "beyond the 1024-node limit" in _err()
    del buf
    m.close()


def test_pool_fast_path_argument_errors() -> None:
    from knhk_memory import _fast
    from knhk_memory.pools import FixedPool

    with FixedPool(8, 2) as p:
        with pytest.raises(ValueError, match="make_pool_fast: kind must be 0, 1 or 2, got 7"):
            _fast.make_pool_fast(7, int(ffi.cast("uintptr_t", p.cdata)), p)
        with pytest.raises(TypeError, match="make_pool_fast"):
            _fast.make_pool_fast("x", 1, p)


def test_latency_helper() -> None:
    import numpy as np

    from knhk_memory.allocator import get_backend

    out = np.zeros(64 * 2, dtype=np.uint64)
    buf = ffi.from_buffer("uint64_t[]", out)
    for kind, backend in ((lib.KNHK_POOL_BENCH_FIXED, ffi.NULL), (lib.KNHK_POOL_BENCH_EMPTY, ffi.NULL),
                          (lib.KNHK_POOL_BENCH_BACKEND, get_backend("system").cdata)):
        out[:] = 0
        assert lib.knhk_pool_latency(kind, backend, 64, 64, 2, buf) == lib.KNHK_OK
        assert out.sum() > 0  # ticks per allocation, timer included
    assert lib.knhk_pool_latency(lib.KNHK_POOL_BENCH_BACKEND, ffi.NULL, 64, 64, 2, buf) == lib.KNHK_ERR_INVALID
    assert lib.knhk_pool_latency(lib.KNHK_POOL_BENCH_MUTEX, ffi.NULL, 64, 64, 2, buf) == lib.KNHK_ERR_INVALID
