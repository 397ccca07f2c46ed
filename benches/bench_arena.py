"""Arena benchmarks (pytest-benchmark; not part of the test run).

    bash scripts/dev.sh bench -k arena          # pytest-benchmark tables
    .venv/bin/python benches/bench_arena.py     # the figures of docs/arena.md, with ratios

Compared in the same run:
- a batch of 1000 numpy arrays of 256 B inside an arena scope versus outside
  (numpy's default allocator, and the selected backend's NEP 49 handler, whose
  statistics count the backend calls): backend calls and time per batch;
- C level: one arena allocation versus one backend malloc+free pair, in TSC
  ticks per operation (rdtsc around the hot-op functions, median of samples);
- ``Arena.alloc(64)`` versus ``bytearray(64)`` and ``numpy.empty(64)``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from knhk_memory import Arena, numpy_handler, selected_backend
from knhk_memory._core import ffi, lib

BATCH = 1000


# ---------------------------------------------------------------- a TSC timer for hot ops

_TIMER_SRC = r"""
#include <stdint.h>
#include <x86intrin.h>
typedef void (*hotop)(void *, uint64_t);
/* Ticks for `iterations` calls of fn, serialised with lfence on both sides. */
uint64_t time_hotop(void *fn, void *ctx, uint64_t iterations) {
    _mm_lfence();
    uint64_t t0 = __rdtsc();
    _mm_lfence();
    ((hotop)fn)(ctx, iterations);
    _mm_lfence();
    uint64_t t1 = __rdtsc();
    _mm_lfence();
    return t1 - t0;
}
"""


def _timer():
    from cffi import FFI

    build = Path(tempfile.gettempdir()) / "knhk_bench_timer"
    build.mkdir(exist_ok=True)
    sys.path.insert(0, str(build))
    try:
        import _knhk_tick  # type: ignore[import-not-found]
    except ImportError:
        tb = FFI()
        tb.cdef("uint64_t time_hotop(void *fn, void *ctx, uint64_t iterations);")
        tb.set_source("_knhk_tick", _TIMER_SRC, extra_compile_args=["-O2"])
        tb.compile(tmpdir=str(build))
        import _knhk_tick  # type: ignore[import-not-found]
    return _knhk_tick


def ticks_per_op(fn, ctx, iterations: int = 1000, samples: int = 301) -> float:
    """Median TSC ticks per operation over `samples` batches of `iterations`."""
    timer = _timer()
    f = ffi.cast("void *", fn)
    fn_t = timer.ffi.cast("void *", int(ffi.cast("uintptr_t", f)))
    ctx_t = timer.ffi.cast("void *", int(ffi.cast("uintptr_t", ctx)))
    timer.lib.time_hotop(fn_t, ctx_t, iterations * 10)  # warm up
    return statistics.median(timer.lib.time_hotop(fn_t, ctx_t, iterations) / iterations for _ in range(samples))


def hot_op_ticks() -> dict[str, float]:
    arena = Arena()
    backend = selected_backend()
    out = {
        "arena_alloc": ticks_per_op(ffi.addressof(lib, "knhk_arena_hotop_alloc"), ffi.cast("void *", arena.cdata)),
        "backend_malloc_free": ticks_per_op(ffi.addressof(lib, "knhk_backend_hotop_malloc_free"),
                                            ffi.cast("void *", backend.cdata)),
    }
    arena.close()
    return out


# ---------------------------------------------------------------- the batch

def make_batch() -> list:
    return [np.empty(32) for _ in range(BATCH)]  # 32 float64 = 256 B each


def batch_default() -> None:
    arrays = make_batch()
    del arrays


def batch_backend_handler() -> None:
    with numpy_handler():
        arrays = make_batch()
    del arrays


def batch_arena(arena: Arena) -> None:
    with arena.scope():
        arrays = make_batch()
    del arrays
    arena.reset()


def backend_calls_per_batch(rounds: int = 20) -> dict[str, float]:
    """Backend calls per batch: the arena's own count in scope, the backend's
    allocations + frees outside (through its handler, so they are counted)."""
    backend = selected_backend()
    arena = Arena(backend=backend)
    batch_arena(arena)  # the first batch takes (and consolidates) its chunk
    first = arena.stats().backend_calls
    before = arena.stats().backend_calls
    for _ in range(rounds):
        batch_arena(arena)
    inside = (arena.stats().backend_calls - before) / rounds
    arena.close()
    s0 = backend.stats()
    for _ in range(rounds):
        batch_backend_handler()
    s1 = backend.stats()
    outside = ((s1.allocations - s0.allocations) + (s1.frees - s0.frees)) / rounds
    return {"first_batch_in_scope": first, "in_scope": inside, "outside": outside}


def median_time(fn, repeat: int = 31, number: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(number):
            fn()
        times.append((time.perf_counter_ns() - t0) / number)
    return statistics.median(times)


# ---------------------------------------------------------------- pytest-benchmark

@pytest.mark.benchmark(group="numpy batch of 1000 x 256 B")
def test_batch_numpy_default(benchmark):
    benchmark.extra_info.update(label="numpy default allocator", peer=True, ops=1000)
    benchmark(batch_default)


@pytest.mark.benchmark(group="numpy batch of 1000 x 256 B")
def test_batch_backend_handler(benchmark):
    benchmark.extra_info.update(label="backend NEP 49 handler", ops=1000)
    benchmark(batch_backend_handler)


@pytest.mark.benchmark(group="numpy batch of 1000 x 256 B")
def test_batch_arena_scope(benchmark):
    benchmark.extra_info.update(label="arena scope", ops=1000)
    arena = Arena()
    benchmark(batch_arena, arena)
    arena.close()


@pytest.mark.benchmark(group="one 64-byte buffer from Python")
def test_alloc_arena(benchmark):
    benchmark.extra_info.update(label="Arena.alloc(64)")
    arena = Arena()
    benchmark(arena.alloc, 64)
    arena.close()


@pytest.mark.benchmark(group="one 64-byte buffer from Python")
def test_alloc_bytearray(benchmark):
    benchmark.extra_info.update(label="bytearray(64)", peer=True)
    benchmark(bytearray, 64)


@pytest.mark.benchmark(group="one 64-byte buffer from Python")
def test_alloc_numpy_empty(benchmark):
    benchmark.extra_info.update(label="numpy.empty(64)")
    benchmark(np.empty, 64, np.uint8)


def test_backend_calls_and_ticks():
    calls = backend_calls_per_batch(5)
    assert calls["in_scope"] == 0
    ticks = hot_op_ticks()
    assert ticks["arena_alloc"] < ticks["backend_malloc_free"]


# ---------------------------------------------------------------- the docs figures

def main() -> int:
    backend = selected_backend()
    print(f"backend: {backend.name} {backend.version}; numpy {np.__version__}")
    calls = backend_calls_per_batch()
    reduction = 100 * (1 - calls["in_scope"] / calls["outside"])
    print(f"backend calls per batch: in scope {calls['in_scope']:.1f} (first batch {calls['first_batch_in_scope']}), "
          f"outside {calls['outside']:.1f}: {reduction:.1f}% fewer")
    arena = Arena()
    t_default = median_time(batch_default)
    t_handler = median_time(batch_backend_handler)
    t_arena = median_time(lambda: batch_arena(arena))
    arena.close()
    print(f"time per batch (median): numpy default {t_default / 1e3:.1f} us, backend handler "
          f"{t_handler / 1e3:.1f} us, arena scope {t_arena / 1e3:.1f} us; arena / default = "
          f"{t_arena / t_default:.2f}, arena / handler = {t_arena / t_handler:.2f}")
    runs = [hot_op_ticks() for _ in range(5)]
    a = statistics.median(r["arena_alloc"] for r in runs)
    m = statistics.median(r["backend_malloc_free"] for r in runs)
    print(f"C ticks per op (median of 5 runs x 301 samples x 1000 ops): arena_alloc {a:.2f}, "
          f"{backend.name} malloc+free {m:.2f}; ratio {m / a:.1f}x")
    arena = Arena()
    n = 200_000

    def per_call(fn) -> float:
        return statistics.median(_loop(fn, n) for _ in range(7)) / n

    t_alloc = per_call(lambda: arena.alloc(64))
    t_bytearray = per_call(lambda: bytearray(64))
    t_empty = per_call(lambda: np.empty(64, np.uint8))
    arena.close()
    print(f"one 64-byte buffer from Python (ns, median): Arena.alloc {t_alloc:.0f}, bytearray {t_bytearray:.0f}, "
          f"numpy.empty {t_empty:.0f}; alloc / bytearray = {t_alloc / t_bytearray:.2f}, "
          f"alloc / numpy.empty = {t_alloc / t_empty:.2f}")
    return 0


def _loop(fn, n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return time.perf_counter_ns() - t0


if __name__ == "__main__":
    raise SystemExit(main())
