"""Counters against their peers, in the same run, as ratios.

- C: two threads adding to counters in their own cache lines versus two adjacent
  counters (false sharing), both with the owner's load+store and with lock-prefixed adds.
- C, one thread: the add through a writer handle versus ``knhk_counters_add`` (ticks).
- Python, one thread: ``Counters.add`` and ``CounterWriter.add`` versus ``threading.Lock`` + int,
  ``multiprocessing.Value`` (with its lock) and the ``atomics`` package.
- Two processes adding concurrently: a shared ``Counters`` versus ``multiprocessing.Value``.

Run: ``bash scripts/dev.sh bench -k counters`` (needs the ``bench`` extra).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import threading
import time

import numpy as np

from knhk_memory import Counters
from knhk_memory._core import ffi, lib

N = 100_000
REPEATS = 5


def _false_sharing_ns(padded: int, rmw: int, iterations: int = 10_000_000) -> float:
    out = ffi.new("uint64_t *")
    runs = []
    for _ in range(REPEATS):
        assert lib.knhk_counters_bench_false_sharing(iterations, padded, rmw, out) == lib.KNHK_OK
        runs.append(out[0] / iterations)
    return statistics.median(runs)


def test_false_sharing_in_c(benchmark):
    res = {(p, r): _false_sharing_ns(p, r) for p in (0, 1) for r in (0, 1)}
    benchmark.pedantic(lambda: _false_sharing_ns(1, 0, 1_000_000), rounds=1, iterations=1)
    for r, what in ((0, "load+store"), (1, "lock xadd")):
        ratio = res[(0, r)] / res[(1, r)]
        print(f"\n{what}: adjacent {res[(0, r)]:.2f} ns/add, padded {res[(1, r)]:.2f} ns/add, "
              f"padded is {ratio:.2f}x faster")
        benchmark.extra_info[f"{what} adjacent ns"] = res[(0, r)]
        benchmark.extra_info[f"{what} padded ns"] = res[(1, r)]
        benchmark.extra_info[f"{what} ratio"] = ratio


def test_hot_add_ticks(benchmark):
    """The C adds in one run, interleaved: through the thread's writer handle
    (inlined, and through the exported function) versus knhk_counters_add with
    its thread-cache lookup. Each figure is the tick harness's median (301
    batches, empty loop taken off); repeated REPEATS times, median of those."""
    from knhk_memory.budgets import measure_native
    from knhk_memory.counters import hot_ops
    from knhk_memory.hotpath import default_budgets

    ops = hot_ops()
    runs: dict[str, list[float]] = {op.name: [] for op in ops}
    for _ in range(REPEATS):
        for op in ops:
            ctx, cleanup = op.setup()
            runs[op.name].append(measure_native(op.fn, ctx).median)
            cleanup()
    med = {name: statistics.median(v) for name, v in runs.items()}
    base = med["counter_add"]
    for op in ops:
        m = med[op.name]
        print(f"\n{op.name}: median {m:.2f} ticks per add (runs {', '.join(f'{x:.2f}' for x in runs[op.name])}; "
              f"budget {default_budgets()[op.name].budget}; {m / base:.2f}x counter_add)")
        benchmark.extra_info[f"{op.name} median ticks"] = m
    print(f"\nload average {os.getloadavg()[0]:.2f}")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _per_add(fn) -> float:
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) / N * 1e9)
    return statistics.median(runs)


def test_python_single_add_vs_peers(benchmark):
    import atomics

    c = Counters(["x"])
    add = c.add
    wadd = c.writer().add

    def knhk():
        for _ in range(N):
            add(0)

    def knhk_writer():
        for _ in range(N):
            wadd(0)

    lock, box = threading.Lock(), [0]

    def locked():
        for _ in range(N):
            with lock:
                box[0] += 1

    value = mp.Value("q", 0)

    def mp_value():
        for _ in range(N):
            with value.get_lock():
                value.value += 1

    a = atomics.atomic(width=8, atype=atomics.INT)

    def atomic():
        for _ in range(N):
            a.inc()

    idx = np.zeros(N, dtype=np.int64)
    results = {"Counters.add": _per_add(knhk), "CounterWriter.add": _per_add(knhk_writer),
               "threading.Lock + int": _per_add(locked),
               "multiprocessing.Value": _per_add(mp_value), "atomics.inc": _per_add(atomic),
               "Counters.add_many (per index)": _per_add(lambda: c.add_many(idx))}
    benchmark.pedantic(knhk, rounds=1, iterations=1)
    base = results["Counters.add"]
    for name, ns in results.items():
        print(f"\n{name}: {ns:.1f} ns/add ({ns / base:.2f}x Counters.add)")
        benchmark.extra_info[name] = ns
    assert c.get("x") > 0


def _proc_counters(name, n, barrier):
    c = Counters.attach(name)
    barrier.wait()
    for _ in range(n):
        c.add(0)


def _proc_value(value, n, barrier):
    barrier.wait()
    for _ in range(n):
        with value.get_lock():
            value.value += 1


def _two_procs(target, arg) -> float:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(3)
    ps = [ctx.Process(target=target, args=(arg, N, barrier)) for _ in range(2)]
    for p in ps:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    for p in ps:
        p.join()
    return (time.perf_counter() - t0) / (2 * N) * 1e9


def test_two_processes_vs_mp_value(benchmark):
    c = Counters(["x"], shared=True)
    value = mp.Value("q", 0)
    ours = statistics.median(_two_procs(_proc_counters, c.name) for _ in range(3))
    theirs = statistics.median(_two_procs(_proc_value, value) for _ in range(3))
    assert c.get("x") == 3 * 2 * N and value.value == 3 * 2 * N
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({"Counters ns/add": ours, "mp.Value ns/add": theirs, "ratio": theirs / ours})
    print(f"\ntwo processes: Counters {ours:.1f} ns/add, multiprocessing.Value {theirs:.1f} ns/add, "
          f"Counters {theirs / ours:.2f}x faster")
    c.close()
