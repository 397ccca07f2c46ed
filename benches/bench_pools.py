"""Pool and MmapVec benchmarks (pytest-benchmark; not part of the test run).

    bash scripts/dev.sh bench -k pools          # pytest-benchmark tables (docs/performance.md)
    .venv/bin/python benches/bench_pools.py     # the figures of docs/pools.md, with ratios

Compared in the same run (every peer beside the thing measured, as ratios):
- Python: FixedPool / LockFreePool / ThreadLocalPool ``free(alloc())`` versus
  ``bytearray(64)`` (the peer: what Python code makes a 64-byte buffer with);
- C: one FixedPool alloc+free pair versus mimalloc's ``mi_malloc``/``mi_free``
  of 64 bytes through the existing backend (and glibc malloc), ticks per pair;
- C, 2 threads, 8 allocations then 8 frees per round: a mutex-guarded free
  list (the peer), LockFreePool, ThreadLocalPool and mimalloc;
- the "deterministic" claim: p99.9 / median latency of single allocations,
  FixedPool versus glibc malloc and mimalloc (rdtscp around each call);
- MmapVec ``append`` of small records versus ``numpy.memmap`` with manual
  growth (the peer: remap at double the size when full), a Python list and
  LMDB (``lmdb``, when installed: one put per record, one transaction per
  1000); bulk ``extend`` the same way; reopen time against length.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from knhk_memory import FixedPool, LockFreePool, MmapVec, ThreadLocalPool
from knhk_memory._core import ffi, lib
from knhk_memory.allocator import get_backend

RECORD = np.dtype([("kind", "u1"), ("task", "<u4"), ("case", "<u8")])  # 13 bytes, the host's event


def _backend(name: str):
    try:
        return get_backend(name)
    except Exception:
        return None


# ---------------------------------------------------------------- Python alloc/free

@pytest.mark.parametrize("kind", ["bytearray", "FixedPool", "LockFreePool", "ThreadLocalPool"])
def test_py_alloc_free(benchmark, kind):
    benchmark.group = "pools: one 64 B block from Python (alloc + free)"
    benchmark.extra_info.update(label="bytearray(64)" if kind == "bytearray" else f"{kind} free(alloc())",
                                peer=kind == "bytearray")
    if kind == "bytearray":
        benchmark(lambda: bytearray(64))  # a lambda as the pools have: the same call overhead on both sides
        return
    pool = {"FixedPool": FixedPool, "LockFreePool": LockFreePool, "ThreadLocalPool": ThreadLocalPool}[kind](64, 1024)
    alloc, free = pool.alloc, pool.free
    benchmark(lambda: free(alloc()))
    pool.close()


# ---------------------------------------------------------------- C alloc/free pair

@pytest.mark.parametrize("kind", ["mimalloc", "system", "FixedPool"])
def test_c_alloc_free(benchmark, kind):
    benchmark.group = "pools: C alloc+free pair, 64 B"
    benchmark.extra_info.update(label=kind if kind == "FixedPool" else f"{kind} malloc+free",
                                peer=kind == "mimalloc", ops=10_000)
    if kind == "FixedPool":
        pool = FixedPool(64, 1024)
        benchmark(lib.knhk_pool_hotop_alloc_free, pool.cdata, 10_000)
        pool.close()
        return
    b = _backend(kind)
    if b is None:
        pytest.skip(f"{kind} is not installed")
    benchmark(lib.knhk_backend_hotop_malloc_free, b.cdata, 10_000)


# ---------------------------------------------------------------- two threads

KINDS = {"mutex": lib.KNHK_POOL_BENCH_MUTEX, "LockFreePool": lib.KNHK_POOL_BENCH_LOCKFREE,
         "ThreadLocalPool": lib.KNHK_POOL_BENCH_THREADLOCAL, "mimalloc": lib.KNHK_POOL_BENCH_BACKEND}


def two_threads(kind: str, iterations: int = 50_000, threads: int = 2) -> float:
    """Seconds for `threads` threads x `iterations` rounds of 8 allocs then 8 frees of 64 B."""
    b = _backend("mimalloc") if kind == "mimalloc" else None
    seconds = ffi.new("double *")
    st = lib.knhk_pool_bench(KINDS[kind], b.cdata if b is not None else ffi.NULL, threads, iterations, 64, 4096,
                             seconds)
    if st != lib.KNHK_OK:
        raise RuntimeError(ffi.string(lib.knhk_last_error()).decode())
    return seconds[0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_threads(benchmark, kind):
    benchmark.group = "pools: 2 threads, 8 allocs then 8 frees of 64 B"
    benchmark.extra_info.update(label=kind + (" (mutex-guarded free list)" if kind == "mutex" else ""),
                                peer=kind == "mutex", ops=2 * 20_000 * 16)
    if kind == "mimalloc" and _backend("mimalloc") is None:
        pytest.skip("mimalloc is not installed")
    benchmark(two_threads, kind, 20_000)


# ---------------------------------------------------------------- latency distribution

def latency(kind: str, n: int = 4096, rounds: int = 64) -> np.ndarray:
    """Ticks of each single allocation (timer included), n per round from a fresh pool/heap state."""
    code = {"FixedPool": lib.KNHK_POOL_BENCH_FIXED, "empty": lib.KNHK_POOL_BENCH_EMPTY}.get(
        kind, lib.KNHK_POOL_BENCH_BACKEND)
    b = _backend(kind) if code == lib.KNHK_POOL_BENCH_BACKEND else None
    out = np.zeros(n * rounds, dtype=np.uint64)
    st = lib.knhk_pool_latency(code, b.cdata if b is not None else ffi.NULL, 64, n, rounds,
                               ffi.from_buffer("uint64_t[]", out))
    if st != lib.KNHK_OK:
        raise RuntimeError(ffi.string(lib.knhk_last_error()).decode())
    return out


def latency_figures() -> dict[str, dict[str, float]]:
    timer = float(np.median(latency("empty")))
    out = {}
    for kind in ("FixedPool", "system", "mimalloc"):
        if kind != "FixedPool" and _backend(kind) is None:
            continue
        t = latency(kind).astype(np.float64)
        med, p99, p999 = np.percentile(t, [50, 99, 99.9])
        out[kind] = {"median": med, "p99": p99, "p99.9": p999, "max": float(t.max()), "timer": timer,
                     "p99.9/median": p999 / med, "p99.9/median (timer off)": (p999 - timer) / max(med - timer, 1.0)}
    return out


def test_latency_runs():
    f = latency_figures()
    assert f["FixedPool"]["median"] > 0


# ---------------------------------------------------------------- MmapVec appends

class MemmapGrowing:
    """The peer: numpy.memmap, remapped at double the size when full (what code does without MmapVec)."""

    def __init__(self, path: Path, dtype: np.dtype, capacity: int = 1024) -> None:
        self.path, self.dtype, self.cap, self.n = path, dtype, capacity, 0
        with open(path, "wb") as f:
            f.truncate(capacity * dtype.itemsize)
        self.mm = np.memmap(path, dtype=dtype, mode="r+", shape=(capacity,))

    def _grow(self, need: int) -> None:
        while self.cap < need:
            self.cap *= 2
        self.mm.flush()
        del self.mm
        with open(self.path, "r+b") as f:
            f.truncate(self.cap * self.dtype.itemsize)
        self.mm = np.memmap(self.path, dtype=self.dtype, mode="r+", shape=(self.cap,))

    def append(self, rec) -> None:
        n = self.n
        if n >= self.cap:
            self._grow(n + 1)
        self.mm[n] = rec
        self.n = n + 1

    def extend(self, arr: np.ndarray) -> None:
        n, k = self.n, len(arr)
        if n + k > self.cap:
            self._grow(n + k)
        self.mm[n:n + k] = arr
        self.n = n + k

    def sync(self) -> None:
        self.mm.flush()


class LmdbLog:
    """LMDB as an append log: key = big-endian record number, MDB_APPEND puts, a commit per 1000."""

    def __init__(self, path: Path) -> None:
        import lmdb

        self.env = lmdb.open(str(path), map_size=1 << 32, sync=False, metasync=False, lock=False)
        self.txn = self.env.begin(write=True)
        self.n = 0

    def append(self, rec: bytes) -> None:
        self.txn.put(self.n.to_bytes(8, "big"), rec, append=True)
        self.n += 1
        if self.n % 1000 == 0:
            self.txn.commit()
            self.txn = self.env.begin(write=True)

    def sync(self) -> None:
        self.txn.commit()
        self.env.sync(True)
        self.env.close()


def append_run(kind: str, n: int, tmp: Path) -> float:
    """Seconds to append n records one by one (then sync) with `kind`."""
    rec = (3, 7, 11)
    path = tmp / f"{kind}-{n}"
    if kind == "MmapVec":
        v = MmapVec(path, RECORD, mode="w")
        t0 = time.perf_counter()
        app = v.append
        for _ in range(n):
            app(rec)
        v.sync()
        dt = time.perf_counter() - t0
        v.close()
    elif kind == "numpy.memmap":
        m = MemmapGrowing(path, RECORD)
        t0 = time.perf_counter()
        app = m.append
        for _ in range(n):
            app(rec)
        m.sync()
        dt = time.perf_counter() - t0
        del m
    elif kind == "list":
        t0 = time.perf_counter()
        out: list = []
        app = out.append
        for _ in range(n):
            app(rec)
        dt = time.perf_counter() - t0
    else:  # lmdb
        raw = np.array([rec], dtype=RECORD).tobytes()
        db = LmdbLog(path)
        t0 = time.perf_counter()
        app = db.append
        for _ in range(n):
            app(raw)
        db.sync()
        dt = time.perf_counter() - t0
    for p in tmp.glob(f"{kind}-{n}*"):
        if p.is_dir():
            for q in p.iterdir():
                q.unlink()
            p.rmdir()
        else:
            p.unlink()
    return dt


def extend_run(kind: str, n: int, tmp: Path, chunk: int = 65536) -> float:
    """Seconds to append n records in chunks of `chunk` (then sync)."""
    block = np.zeros(chunk, dtype=RECORD)
    block["task"] = np.arange(chunk)
    path = tmp / f"x-{kind}-{n}"
    t0 = time.perf_counter()
    if kind == "MmapVec":
        v = MmapVec(path, RECORD, mode="w")
        for _ in range(n // chunk):
            v.extend(block)
        v.sync()
        dt = time.perf_counter() - t0
        v.close()
    else:
        m = MemmapGrowing(path, RECORD)
        for _ in range(n // chunk):
            m.extend(block)
        m.sync()
        dt = time.perf_counter() - t0
        del m
    path.unlink()
    return dt


def _have_lmdb() -> bool:
    try:
        import lmdb  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("kind", ["numpy.memmap", "MmapVec", "list", "lmdb"])
def test_append(benchmark, kind, tmp_path):
    benchmark.group = "mmapvec: append 100,000 13-byte records one by one (+ sync)"
    benchmark.extra_info.update(label=kind + (" with manual growth" if kind == "numpy.memmap" else ""),
                                peer=kind == "numpy.memmap", ops=100_000)
    if kind == "lmdb" and not _have_lmdb():
        pytest.skip("lmdb is not installed")
    benchmark(append_run, kind, 100_000, tmp_path)


@pytest.mark.parametrize("kind", ["numpy.memmap", "MmapVec"])
def test_extend(benchmark, kind, tmp_path):
    benchmark.group = "mmapvec: extend 1M 13-byte records in 64k chunks (+ sync)"
    benchmark.extra_info.update(label=kind, peer=kind == "numpy.memmap", ops=1 << 20)
    benchmark(extend_run, kind, 1 << 20, tmp_path)


def reopen_seconds(n: int, tmp: Path, repeats: int = 21) -> float:
    path = tmp / f"reopen-{n}"
    with MmapVec(path, RECORD, mode="w") as v:
        block = np.zeros(min(n, 1 << 20), dtype=RECORD)
        left = n
        while left:
            k = min(left, len(block))
            v.extend(block[:k])
            left -= k
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = MmapVec(path, mode="r")
        times.append(time.perf_counter() - t0)
        r.close()
    path.unlink()
    return statistics.median(times)


# ---------------------------------------------------------------- the docs figures

def _per_call(fn, n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - t0) / n


def main() -> int:
    rounds = 7
    print(f"machine: {os.cpu_count()} CPUs; numpy {np.__version__}; python {sys.version.split()[0]}")
    # Python alloc/free, interleaved
    pools = {k: c(64, 1024) for k, c in (("FixedPool", FixedPool), ("LockFreePool", LockFreePool),
                                          ("ThreadLocalPool", ThreadLocalPool))}
    calls = {"bytearray(64)": lambda: bytearray(64)}
    for k, p in pools.items():
        calls[k] = (lambda a, f: lambda: f(a()))(p.alloc, p.free)
    res = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            res[k].append(_per_call(fn, 200_000))
    base = statistics.median(res["bytearray(64)"])
    print("Python, one 64 B block (ns, median of 7 interleaved rounds of 200k; ratio to bytearray(64)):")
    for k, v in res.items():
        m = statistics.median(v)
        print(f"  {k:<16} {m:7.1f} ns   {m / base:5.2f}x")
    # C pair, ticks
    from knhk_memory.budgets import Settings, measure_native

    s = Settings(batches=101)
    fixed = FixedPool(64, 1024)
    c = {"FixedPool alloc+free": [], "mimalloc malloc+free": [], "system malloc+free": []}
    for _ in range(5):
        c["FixedPool alloc+free"].append(measure_native(ffi.addressof(lib, "knhk_pool_hotop_alloc_free"),
                                                        fixed.cdata, s).median)
        for name in ("mimalloc", "system"):
            b = _backend(name)
            if b is not None:
                c[f"{name} malloc+free"].append(measure_native(ffi.addressof(lib, "knhk_backend_hotop_malloc_free"),
                                                               ffi.cast("void *", b.cdata), s).median)
    f = statistics.median(c["FixedPool alloc+free"])
    print("C, one 64 B alloc+free pair (ticks, median of 5 interleaved harness runs):")
    for k, v in c.items():
        if v:
            m = statistics.median(v)
            print(f"  {k:<22} {m:6.1f} ticks   FixedPool is {m / f:4.1f}x faster")
    # two threads
    t = {k: [] for k in KINDS}
    for _ in range(5):
        for k in KINDS:
            if k == "mimalloc" and _backend("mimalloc") is None:
                continue
            t[k].append(two_threads(k, 100_000))
    mutex = statistics.median(t["mutex"])
    ops = 2 * 100_000 * 16
    print("C, 2 threads x 100k rounds of 8 allocs + 8 frees of 64 B (median of 5 interleaved):")
    for k, v in t.items():
        if v:
            m = statistics.median(v)
            print(f"  {k:<16} {m * 1e3:7.1f} ms  {ops / m / 1e6:7.1f} M ops/s  {mutex / m:5.2f}x the mutex pool")
    # latency
    print("single-allocation latency, ticks (rdtscp before and after each call; 64 rounds x 4096 allocations):")
    for k, v in latency_figures().items():
        print(f"  {k:<10} median {v['median']:6.0f}  p99 {v['p99']:6.0f}  p99.9 {v['p99.9']:7.0f}  max "
              f"{v['max']:9.0f}  p99.9/median {v['p99.9/median']:5.2f} (timer {v['timer']:.0f} ticks; with it "
              f"taken off {v['p99.9/median (timer off)']:5.2f})")
    # appends
    with tempfile.TemporaryDirectory(prefix="knhk-bench-pools-") as d:
        tmp = Path(d)
        n = int(os.environ.get("KNHK_BENCH_APPENDS", "10000000"))
        kinds = ["numpy.memmap", "MmapVec", "list"] + (["lmdb"] if _have_lmdb() else [])
        a = {k: [] for k in kinds}
        for _ in range(3):
            for k in kinds:
                a[k].append(append_run(k, n, tmp))
        peer = statistics.median(a["numpy.memmap"])
        print(f"append {n:,} 13-byte records one by one, then sync (s, median of 3 interleaved; ratio "
              f"memmap / x, above 1 is faster than numpy.memmap with manual growth):")
        for k, v in a.items():
            m = statistics.median(v)
            print(f"  {k:<14} {m:7.2f} s  {m / n * 1e9:6.0f} ns/record  {peer / m:5.2f}x")
        e = {k: [] for k in ("numpy.memmap", "MmapVec")}
        for _ in range(3):
            for k in e:
                e[k].append(extend_run(k, n, tmp))
        peer = statistics.median(e["numpy.memmap"])
        print(f"extend {n:,} records in chunks of 65,536, then sync:")
        for k, v in e.items():
            m = statistics.median(v)
            print(f"  {k:<14} {m:7.3f} s  {m / n * 1e9:6.1f} ns/record  {peer / m:5.2f}x")
        print("reopen (open + header checks + map), median of 21:")
        for size in (1_000, 100_000, 10_000_000):
            print(f"  {size:>12,} records  {reopen_seconds(size, tmp) * 1e6:7.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
