"""Allocator backends: allocation, alignment, statistics, cross-backend safety, numpy routing."""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest

from knhk_memory import allocator
from knhk_memory._core import ffi, lib
from knhk_memory.allocator import Block, get_backend
from knhk_memory.errors import BackendUnavailableError, KnhkMemoryError

from .conftest import jemalloc_loadable

ALL = ["system", "mimalloc", pytest.param("jemalloc", marks=pytest.mark.jemalloc)]
ALIGNS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


@pytest.fixture(params=ALL)
def backend(request):
    if request.param == "jemalloc" and not jemalloc_loadable():
        pytest.fail("jemalloc is installed but not loadable: run the tests with "
                    "GLIBC_TUNABLES=glibc.rtld.optional_static_tls=16384 (scripts/dev.sh does)")
    return get_backend(request.param)


def delta(before, after):
    return {k: getattr(after, k) - getattr(before, k)
            for k in ("allocations", "frees", "reallocations", "live_bytes")}


def test_backends_report_their_library(backend):
    expected = {"system": "libc.so.6", "jemalloc": "libjemalloc.so.2", "mimalloc": "libmimalloc.so.2"}[backend.name]
    preloaded = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    # "system" is whatever malloc the process uses: a preloaded one (ASan, jemalloc) if any.
    assert backend.path.endswith(expected) or (backend.name == "system" and backend.path in preloaded)
    assert backend.version
    assert get_backend(backend.name) is backend


def test_malloc_write_read_free(backend):
    with backend.malloc(1000) as block:
        view = block.view()
        view[:] = bytes(range(250)) * 4
        assert bytes(view[:5]) == b"\x00\x01\x02\x03\x04"
        assert block.usable_size() >= 1000
        view.release()
    assert block.closed


def test_calloc_is_zeroed(backend):
    block = backend.calloc(100, 40)
    assert block.size == 4000
    assert bytes(block.view()) == bytes(4000)


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("size", [1, 100, 256, 512, 1000, 1024, 4096, 70000])
def test_aligned_alloc(backend, align, size):
    block = backend.aligned(size, align)
    assert block.address % align == 0
    assert block.usable_size() >= size
    block.free()


@pytest.mark.parametrize("align", [256, 512, 1024, 4096])
def test_realloc_keeps_alignment_and_contents(backend, align):
    block = backend.aligned(300, align)
    block.view()[:] = b"k" * 300
    for size in (10, 5000, 100_000, 1):
        block.realloc(size)
        assert block.address % align == 0
        assert block.size == size
        assert bytes(block.view()[: min(size, 10)]) == b"k" * min(size, 10)
    block.free()


def test_realloc_grows_and_shrinks_plain_blocks(backend):
    block = backend.malloc(16)
    block.view()[:] = b"0123456789abcdef"
    block.realloc(1 << 20)
    assert bytes(block.view()[:16]) == b"0123456789abcdef"
    block.realloc(8)
    assert bytes(block.view()) == b"01234567"
    block.free()


def test_exact_statistics(backend):
    before = backend.stats()
    blocks = [backend.malloc(n) for n in (10, 100, 1000, 10_000)]
    usable = sum(b.usable_size() for b in blocks)
    mid = backend.stats()
    assert delta(before, mid) == {"allocations": 4, "frees": 0, "reallocations": 0, "live_bytes": usable}
    assert mid.peak_live_bytes >= mid.live_bytes
    old = blocks[0].usable_size()
    blocks[0].realloc(50_000)
    grown = blocks[0].usable_size()
    after_realloc = backend.stats()
    assert delta(mid, after_realloc) == {"allocations": 0, "frees": 0, "reallocations": 1,
                                         "live_bytes": grown - old}
    for b in blocks:
        b.free()
    end = backend.stats()
    assert delta(before, end) == {"allocations": 4, "frees": 4, "reallocations": 1, "live_bytes": 0}


def test_peak_is_exact_in_one_thread(backend):
    base = backend.stats()
    blocks = [backend.malloc(1 << 16) for _ in range(8)]
    top = sum(b.usable_size() for b in blocks)
    for b in blocks:
        b.free()
    stats = backend.stats()
    assert stats.peak_live_bytes >= base.live_bytes + top
    assert stats.live_bytes == base.live_bytes


def test_statistics_are_exact_across_threads(backend):
    """8 threads x 2000 alloc/free pairs: every count lands, nothing lost at thread exit."""
    before = backend.stats()
    barrier = threading.Barrier(8)

    def work():
        barrier.wait()
        for _ in range(2000):
            p = lib.knhk_malloc(backend.cdata, 48)
            lib.knhk_free(backend.cdata, p)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = backend.stats()
    assert delta(before, after) == {"allocations": 16000, "frees": 16000, "reallocations": 0, "live_bytes": 0}


def test_more_threads_than_stat_slots_stay_exact():
    """Threads beyond the 63 owned slots share the overflow slot (atomic adds)."""
    backend = get_backend("system")
    before = backend.stats()
    hold = threading.Barrier(80)
    blocks: list[object] = [None] * 80

    def work(i):
        blocks[i] = lib.knhk_malloc(backend.cdata, 32)
        hold.wait()  # all 80 alive at once: slots cannot be recycled in between
        lib.knhk_free(backend.cdata, blocks[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(80)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = backend.stats()
    assert delta(before, after) == {"allocations": 80, "frees": 80, "reallocations": 0, "live_bytes": 0}


def test_cross_backend_blocks_survive_switching():
    """Blocks from one backend stay valid and are freed by it after the selection changes."""
    names = ["system", "mimalloc"] + (["jemalloc"] if jemalloc_loadable() else [])
    previous = allocator.selected_backend()
    try:
        blocks = []
        for name in names:
            allocator.select_backend(name)
            blk = allocator.selected_backend().malloc(4096)
            blk.view()[:4] = name[:4].encode().ljust(4, b"_")
            blocks.append(blk)
        allocator.select_backend("system")
        befores = {n: get_backend(n).stats() for n in names}
        for name, blk in zip(names, blocks):
            assert blk.backend.name == name
            assert bytes(blk.view()[:4]) == name[:4].encode().ljust(4, b"_")
            blk.free()
        for n in names:
            assert get_backend(n).stats().frees - befores[n].frees == 1
    finally:
        allocator.select_backend(previous)


def test_block_memory_outlives_dropped_block_while_a_view_is_alive(backend):
    block = backend.malloc(64)
    view = block.view()
    view[:] = b"x" * 64
    before = backend.stats()
    del block
    gc.collect()
    assert bytes(view) == b"x" * 64  # the view keeps the memory
    assert backend.stats().frees == before.frees
    view.release()
    del view
    gc.collect()
    assert backend.stats().frees == before.frees + 1


# ---------------------------------------------------------------- bad input

def test_free_with_live_view_refuses(backend):
    block = backend.malloc(64)
    view = block.view()
    with pytest.raises(BufferError, match=r"cannot free a \w+ block of 64 bytes while 1 view\(s\)"):
        block.free()
    with pytest.raises(BufferError, match="cannot realloc"):
        block.realloc(128)
    view.release()
    del view
    block.free()
    block.free()  # idempotent


def test_use_after_free_is_an_error(backend):
    block = backend.malloc(8)
    block.free()
    with pytest.raises(KnhkMemoryError, match="has been freed"):
        block.view()
    with pytest.raises(KnhkMemoryError, match="has been freed"):
        block.realloc(16)


@pytest.mark.parametrize("align", [0, 1, 2, 4, 3, 24, 100, 8192, -16])
def test_bad_alignment(backend, align):
    with pytest.raises(ValueError, match=rf"align must be a power of two from 8 to 4096, got {align}"):
        backend.aligned(64, align)


def test_bad_alignment_in_c_is_reported():
    b = get_backend("system")
    status = ffi.new("int *")
    assert lib.knhk_aligned_alloc(b.cdata, 24, 10, status) == ffi.NULL
    assert status[0] == lib.KNHK_ERR_INVALID
    assert lib.knhk_realloc(b.cdata, ffi.NULL, 10, 24) == ffi.NULL


@pytest.mark.parametrize("size,exc,msg", [
    (-1, ValueError, "nbytes must be >= 0, got -1"),
    (1.5, TypeError, "nbytes must be an int, got float 1.5"),
    ("10", TypeError, "nbytes must be an int, got str '10'"),
    (True, TypeError, "nbytes must be an int, got bool True"),
    (1 << 70, ValueError, "nbytes must be at most"),
])
def test_bad_sizes(backend, size, exc, msg):
    with pytest.raises(exc, match=msg):
        backend.malloc(size)


def test_absurd_size_is_memory_error_not_crash(backend):
    with pytest.raises(MemoryError, match=f"{backend.name}: allocation of"):
        backend.malloc(1 << 62)


def test_calloc_overflow(backend):
    with pytest.raises(ValueError, match="count \\* size overflows"):
        backend.calloc(1 << 40, 1 << 40)
    assert lib.knhk_calloc(backend.cdata, 1 << 62, 1 << 62) == ffi.NULL


def test_zero_size_gives_a_unique_block(backend):
    a, b = backend.malloc(0), backend.malloc(0)
    assert a.address != b.address
    assert a.size == 0 and bytes(a.view()) == b""


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown allocator backend 'tcmalloc'; accepted: system, jemalloc, mimalloc"):
        get_backend("tcmalloc")


def test_blocks_cannot_be_built_directly():
    with pytest.raises(TypeError, match="Blocks come from"):
        Block()


def test_native_stats_and_release_unused(backend):
    if backend.name == "system" and os.environ.get("LD_PRELOAD"):
        pytest.skip("mallinfo2 describes glibc's malloc, which the preloaded allocator replaces")
    stats = backend.native_stats()
    assert any(v is not None and v > 0 for v in stats.as_dict().values())
    # Which figures each allocator has (None: it has no such figure).
    have = {k for k, v in stats.as_dict().items() if v is not None}
    assert have == {"system": {"allocated", "mapped", "free_bytes"},
                    "jemalloc": {"allocated", "active", "resident", "mapped", "metadata", "retained"},
                    "mimalloc": {"resident", "mapped", "peak_resident"}}[backend.name]
    if backend.name == "jemalloc":
        # jemalloc(3): active >= allocated; resident and mapped >= active.
        assert stats.allocated <= stats.active <= min(stats.resident, stats.mapped)
        assert stats.metadata > 0
    if backend.name == "system":
        assert 0 <= stats.free_bytes <= stats.mapped
    backend.release_unused()


def test_auto_prefers_mimalloc():
    backend, skipped = allocator.resolve_backend("auto")
    assert backend.name == "mimalloc" and skipped == []


# ---------------------------------------------------------------- loading errors (fresh processes)

def test_an_override_naming_a_missing_file_says_so(run_python):
    r = run_python(
        "from knhk_memory.allocator import get_backend\n"
        "try:\n    get_backend('mimalloc')\nexcept Exception as e:\n    print(type(e).__name__, e)\n",
        env={"KNHK_MEMORY_MIMALLOC_LIBRARY": "/nonexistent/libmimalloc.so.2"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("BackendUnavailableError mimalloc backend: KNHK_MEMORY_MIMALLOC_LIBRARY="
                               "'/nonexistent/libmimalloc.so.2' is a file that does not exist; it must be the "
                               "absolute path of the mimalloc shared object")
    assert "(Debian package libmimalloc2.0)" in r.stdout and "not installed" not in r.stdout


def test_auto_skips_an_unloadable_backend_and_says_why(run_python):
    r = run_python(
        "from knhk_memory.allocator import resolve_backend\n"
        "b, skipped = resolve_backend('auto')\nprint(b.name)\nprint(skipped[0])\n",
        env={"KNHK_MEMORY_MIMALLOC_LIBRARY": "/nonexistent/libmimalloc.so.2"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] in ("jemalloc", "system")
    assert "libmimalloc2.0" in lines[1]


def test_jemalloc_without_static_tls_says_what_to_do(run_python):
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("a sanitizer run cannot start a child without its preload")
    env = {"GLIBC_TUNABLES": "", "LD_PRELOAD": ""}
    r = run_python(
        "import numpy\nfrom knhk_memory.allocator import get_backend\n"
        "try:\n    get_backend('jemalloc')\n    print('loaded')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n", env=env)
    assert r.returncode == 0, r.stderr
    if r.stdout.strip() == "loaded":
        pytest.skip("this process had static TLS room for jemalloc even without the tunable")
    assert r.stdout.startswith("BackendUnavailableError jemalloc backend:")
    assert "GLIBC_TUNABLES=glibc.rtld.optional_static_tls=16384" in r.stdout
    assert "LD_PRELOAD=" in r.stdout


# ---------------------------------------------------------------- numpy routing

def handler_name(arr=None):
    f = np._core.multiarray.get_handler_name
    return f() if arr is None else f(arr)


def test_numpy_handler_routes_and_restores(backend):
    default = handler_name()
    before = backend.stats()
    with allocator.numpy_handler(backend) as b:
        assert b is backend
        arr = np.arange(10_000, dtype=np.int64)
        assert handler_name(arr) == f"knhk_memory.{backend.name}"
        assert handler_name() == f"knhk_memory.{backend.name}"
        arr[:] = 7
        assert int(arr.sum()) == 70_000
    assert handler_name() == default
    assert handler_name(np.ones(10)) == default
    mid = backend.stats()
    assert mid.allocations - before.allocations >= 1
    assert mid.live_bytes - before.live_bytes >= 80_000
    del arr  # freed by its own handler after the scope ended
    gc.collect()
    after = backend.stats()
    assert after.live_bytes == before.live_bytes
    assert after.allocations - before.allocations == after.frees - before.frees


def test_numpy_realloc_goes_through_the_backend(backend):
    before = backend.stats()
    with allocator.numpy_handler(backend):
        arr = np.zeros(100)
        arr.resize(100_000, refcheck=False)
        arr[-1] = 3.0
    assert handler_name(arr) == f"knhk_memory.{backend.name}"
    assert backend.stats().reallocations - before.reallocations >= 1
    del arr
    gc.collect()
    assert backend.stats().live_bytes == before.live_bytes


def test_numpy_handler_is_per_thread_and_apply_numpy_handler_routes_a_worker():
    seen = {}
    allocator.set_numpy_routing(True)
    previous = allocator.selected_backend()
    allocator.select_backend("mimalloc")
    try:
        with allocator.numpy_handler("mimalloc"):
            def worker():
                seen["before"] = handler_name()
                seen["applied"] = allocator.apply_numpy_handler()
                seen["array"] = handler_name(np.ones(8))

            t = threading.Thread(target=worker)
            t.start()
            t.join()
    finally:
        allocator.set_numpy_routing(False)
        allocator.select_backend(previous)
    assert seen == {"before": "default_allocator", "applied": "knhk_memory.mimalloc",
                    "array": "knhk_memory.mimalloc"}


def test_apply_numpy_handler_without_routing_leaves_default():
    allocator.set_numpy_routing(False)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("h", allocator.apply_numpy_handler()))
    t.start()
    t.join()
    assert out["h"] == "default_allocator"


def test_nested_handlers_unwind_in_order():
    with allocator.numpy_handler("system"):
        with allocator.numpy_handler("mimalloc"):
            assert handler_name() == "knhk_memory.mimalloc"
        assert handler_name() == "knhk_memory.system"
    assert handler_name() == "default_allocator"


def test_handler_push_and_set_in_the_fast_module():
    from knhk_memory import _fast

    b = get_backend("system")
    address = int(ffi.cast("uintptr_t", b.cdata))
    previous = _fast.numpy_handler_push(address)
    assert handler_name() == "knhk_memory.system"
    _fast.numpy_handler_push(address)  # its result dropped without restoring: still routed
    assert handler_name() == "knhk_memory.system"
    replaced = _fast.numpy_handler_set(previous)
    assert handler_name() == "default_allocator"
    _fast.numpy_handler_set(replaced)
    assert handler_name() == "knhk_memory.system"
    _fast.numpy_handler_set(previous)
    with pytest.raises(TypeError, match=r"numpy_handler_set\(handler: the capsule a push returned\)"):
        _fast.numpy_handler_set(None)
    with pytest.raises(TypeError, match="numpy_handler_push: expected an int address, got str"):
        _fast.numpy_handler_push("x")
    with pytest.raises(ValueError, match="numpy_handler_push: NULL address"):
        _fast.numpy_handler_push(0)


def test_hot_op_runs():
    (op,) = allocator.hot_ops()
    before = allocator.selected_backend().stats()
    ctx, cleanup = op.setup()
    op.fn(ctx, 1000)
    cleanup()
    after = allocator.selected_backend().stats()
    assert after.allocations - before.allocations == 1000
    assert after.frees - before.frees == 1000


def test_unavailable_error_type():
    assert issubclass(BackendUnavailableError, KnhkMemoryError)
