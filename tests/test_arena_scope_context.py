"""An arena scope's numpy handler must not leak into tasks, copied contexts or
threads started inside the scope (issue 16, input 5)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from knhk_memory import Arena
from knhk_memory._core import ffi, lib


@pytest.fixture(autouse=True)
def _collect():
    # Copied contexts hold the scope's handler, and through it the arena:
    # free them here, not in a later test that counts backend frees.
    yield
    gc.collect()


def _allocations(a: Arena) -> int:
    return a.stats().allocations


def test_issue_input_asyncio_task_made_in_the_scope_after_the_arena_closed():
    # Before: the task kept allocating into the arena after the scope, and once
    # the arena was closed numpy raised a bare "MemoryError: Unable to allocate 78.1 KiB".
    arena = Arena()
    go = asyncio.Event

    async def main() -> list[float]:
        started = go()
        release = go()

        async def worker() -> float:
            started.set()
            await release.wait()
            x = np.ones(10_000)  # 78.1 KiB
            return float(x.sum())

        with arena.scope():
            inside = np.zeros(100)  # from the arena
            task = asyncio.create_task(worker())
            await started.wait()
        n = _allocations(arena)
        arena.close()
        release.set()
        result = await task
        assert _allocations(arena) == n  # nothing went to the arena after the scope
        del inside
        return [result]

    assert asyncio.run(main()) == [10_000.0]


def test_task_running_after_the_scope_does_not_allocate_in_the_open_arena():
    arena = Arena()

    async def main() -> None:
        hold = asyncio.Event()

        async def worker() -> np.ndarray:
            await hold.wait()
            return np.arange(5000)

        with arena.scope():
            task = asyncio.create_task(worker())
            await asyncio.sleep(0)
        before = _allocations(arena)
        hold.set()
        arr = await task
        assert _allocations(arena) == before
        assert int(arr.sum()) == 5000 * 4999 // 2
        arena.reset()  # possible: no array of the task lives in the arena

    asyncio.run(main())
    arena.close()


def test_copy_context_inside_the_scope_run_after_it():
    arena = Arena()
    with arena.scope():
        ctx = contextvars.copy_context()
        np.empty(10)
    before = _allocations(arena)
    arr = ctx.run(np.full, 1000, 7.0)
    assert _allocations(arena) == before
    arena.close()
    arr2 = ctx.run(np.full, 1000, 3.0)  # after close: allocates as if there were no scope
    assert float(arr.sum() + arr2.sum()) == 10_000.0


def test_copied_context_in_another_thread_during_the_scope():
    # loop.run_in_executor copies the context into a pool thread: the arena
    # (single-thread) is never touched from there, while the scope is open.
    arena = Arena()
    with arena.scope(), ThreadPoolExecutor(1) as pool:
        before = _allocations(arena)
        ctx = contextvars.copy_context()
        arr = pool.submit(ctx.run, np.zeros, 4096).result()
        assert _allocations(arena) == before
        mine = np.zeros(16)
        assert _allocations(arena) == before + 1  # the owner thread still gets the arena
    assert float(arr.sum()) == 0.0 and arr.shape == (4096,)
    del mine
    arena.close()


def test_run_in_executor_inside_the_scope():
    arena = Arena()

    async def main() -> float:
        loop = asyncio.get_running_loop()
        with arena.scope():
            before = _allocations(arena)
            arr = await loop.run_in_executor(None, np.ones, 2048)
            assert _allocations(arena) == before
        return float(arr.sum())

    assert asyncio.run(main()) == 2048.0
    arena.close()


def test_an_arena_array_grown_after_the_scope_moves_out():
    arena = Arena()
    with arena.scope():
        ctx = contextvars.copy_context()
        arr = ctx.run(np.arange, 10.0)  # inside the scope, this thread: from the arena
    assert _allocations(arena) >= 1
    ctx.run(arr.resize, (100_000,), refcheck=False)  # realloc through the scope's handler, after it
    assert float(arr[:10].sum()) == 45.0 and float(arr[10:].sum()) == 0.0
    arena.close()
    del arr


def test_scope_counts_its_fallbacks_in_c():
    from knhk_memory import _fast

    arena = Arena()
    previous, scope = _fast.numpy_arena_handler_push(int(ffi.cast("uintptr_t", arena._usable("test"))))
    ctx = contextvars.copy_context()
    lib.knhk_arena_scope_end(ffi.NULL)  # a no-op
    assert _fast.numpy_arena_scope_fallbacks(scope) == 0
    try:
        t = threading.Thread(target=ctx.run, args=(np.zeros, 100))
        t.start()
        t.join()
        assert _fast.numpy_arena_scope_fallbacks(scope) == 1
        assert lib.knhk_arena_scope_fallbacks(ffi.cast("knhk_arena_scope *", scope)) == 1
    finally:
        _fast.numpy_arena_scope_end(scope)
        _fast.numpy_handler_set(previous)
    arena.close()


def test_scope_api_in_c_refuses_what_it_cannot_serve():
    arena = Arena()
    out = ffi.new("knhk_arena_scope **")
    fallback = ffi.new("knhk_fallback_allocator *")  # no functions: refused
    assert lib.knhk_arena_scope_open(arena._usable("test"), fallback, ffi.NULL, ffi.NULL, out) == lib.KNHK_ERR_INVALID
    assert out[0] == ffi.NULL
    assert "fallback with all four functions" in ffi.string(lib.knhk_last_error()).decode()
    lib.knhk_arena_scope_release(ffi.NULL)  # a no-op
    arena.close()


def test_scope_in_c_serves_the_arena_in_its_thread_and_the_fallback_elsewhere():
    from knhk_memory import get_backend

    b = get_backend("system").cdata
    calls: list[str] = []

    @ffi.callback("void *(void *, size_t)")
    def fb_malloc(ctx, n):
        calls.append("malloc")
        return lib.knhk_malloc(b, n)

    @ffi.callback("void *(void *, size_t, size_t)")
    def fb_calloc(ctx, n, s):
        calls.append("calloc")
        return lib.knhk_calloc(b, n, s)

    @ffi.callback("void *(void *, void *, size_t)")
    def fb_realloc(ctx, p, n):
        calls.append("realloc")
        return lib.knhk_realloc(b, p, n, 0)

    @ffi.callback("void (void *, void *, size_t)")
    def fb_free(ctx, p, n):
        calls.append("free")
        lib.knhk_free(b, p)

    fallback = ffi.new("knhk_fallback_allocator *", {"ctx": ffi.NULL, "malloc": fb_malloc, "calloc": fb_calloc,
                                                     "realloc": fb_realloc, "free": fb_free})
    arena = Arena()
    out = ffi.new("knhk_arena_scope **")
    assert lib.knhk_arena_scope_open(arena._usable("test"), fallback, ffi.NULL, ffi.NULL, out) == lib.KNHK_OK
    s = out[0]
    lib.knhk_arena_scope_retain(s)  # a second holder (the numpy capsule, in the module)
    p = lib.knhk_arena_scope_alloc(s, 64, 1)
    assert ffi.buffer(p, 64)[:] == bytes(64) and arena.stats().live_blocks == 1
    p = lib.knhk_arena_scope_realloc(s, p, 128)  # in the arena's thread: stays in the arena
    assert calls == [] and arena.stats().live_blocks == 1
    got = {}
    t = threading.Thread(target=lambda: got.update(q=lib.knhk_arena_scope_alloc(s, 32, 0)))
    t.start()
    t.join()
    assert calls == ["malloc"]  # another thread: the fallback
    lib.knhk_arena_scope_free(s, got["q"])
    assert calls == ["malloc", "free"]
    lib.knhk_arena_scope_end(s)  # the caller's reference; the scope is closed
    q = lib.knhk_arena_scope_alloc(s, 16, 1)  # after the scope: the fallback
    q = lib.knhk_arena_scope_realloc(s, q, 64)
    assert calls == ["malloc", "free", "calloc", "realloc"]
    assert lib.knhk_arena_scope_fallbacks(s) == 2
    lib.knhk_arena_scope_free(s, q)
    lib.knhk_arena_scope_free(s, p)
    assert arena.stats().live_blocks == 0
    lib.knhk_arena_scope_release(s)  # the last reference: the scope goes, and its arena reference
    arena.close()


@pytest.mark.parametrize("n", [1, 3])
def test_nested_scopes_still_allocate_in_the_arena(n):
    arena = Arena()
    before = _allocations(arena)
    with arena.scope():
        for _ in range(n):
            with arena.scope():
                keep = np.zeros(8)
        more = np.zeros(8)
    assert _allocations(arena) == before + n + 1
    del keep, more
    arena.close()
