"""Benchmarks of knhk_memory.simd against the obvious peers, in the same run.

Peers: ``bytes.find`` / ``bytes.count`` and StringZilla (``pip install
'knhk-memory[bench]'``) for byte patterns; numpy (``count_nonzero(a == v)``,
``flatnonzero(a == v)``, ``bincount``) for id scans. Inputs: 64 MiB (memory
bound) and small (call-overhead bound).

Two ways to run:

- ``bash scripts/dev.sh bench`` (pytest-benchmark; one benchmark per case and
  implementation, grouped so the peers sit side by side);
- ``python benches/bench_simd.py`` prints the table written in docs/simd.md:
  median of repeated runs, GB/s, and the ratio to each peer (> 1: we are faster).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from knhk_memory import simd

try:
    import stringzilla as sz
except ImportError:  # pragma: no cover - the bench extra is not installed
    sz = None

MIB = 1 << 20
BIG = 64 * MIB
NEEDLE = b"workflow:pattern"  # 16 bytes
assert len(NEEDLE) == 16


def text_haystack(n: int, plant_every: int | None) -> bytes:
    """Lowercase-and-space text (the byte mix of an event log), the needle planted
    every ``plant_every`` bytes or not at all."""
    rng = np.random.default_rng(16)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      ", np.uint8)
    buf = alphabet[rng.integers(0, len(alphabet), n)].copy()
    if plant_every:
        for p in range(plant_every - 16, n - 16, plant_every):
            buf[p:p + 16] = np.frombuffer(NEEDLE, np.uint8)
    return buf.tobytes()


def id_column(n: int, dtype: Any) -> np.ndarray:
    return np.random.default_rng(43).integers(0, 43, n, dtype=dtype)


# ---------------------------------------------------------------- cases: (group, nbytes, {impl: fn})

def cases() -> list[tuple[str, int, dict[str, Callable[[], Any]]]]:
    miss = text_haystack(BIG, None)
    hits = text_haystack(BIG, MIB)
    small = text_haystack(256, None)[:-16] + NEEDLE
    out: list[tuple[str, int, dict[str, Callable[[], Any]]]] = []

    def ours(fn: Callable[[], Any]) -> dict[str, Callable[[], Any]]:
        # The level is set by the caller before timing (see _level_of).
        return {f"knhk[{lv}]": fn for lv in simd.supported_levels()}

    def peers_find(h: bytes) -> dict[str, Callable[[], Any]]:
        d: dict[str, Callable[[], Any]] = {"bytes.find": lambda: h.find(NEEDLE)}
        if sz is not None:
            s = sz.Str(h)
            d["stringzilla"] = lambda: s.find(NEEDLE)
        return d

    def peers_count(h: bytes) -> dict[str, Callable[[], Any]]:
        d: dict[str, Callable[[], Any]] = {"bytes.count": lambda: h.count(NEEDLE)}
        if sz is not None:
            s = sz.Str(h)
            d["stringzilla"] = lambda: s.count(NEEDLE)
        return d

    def prepared(h: bytes) -> dict[str, Callable[[], Any]]:
        nd = simd.Needle(NEEDLE)  # at the best level (cases() runs at auto)
        return {f"knhk Needle[{nd.level}]": lambda: nd.find(h)}

    out.append(("find 16 B needle, 64 MiB, absent", BIG, {**ours(lambda: simd.find(miss, NEEDLE)), **peers_find(miss)}))
    out.append(("count 16 B needle, 64 MiB, 64 hits", BIG,
                {**ours(lambda: simd.count(hits, NEEDLE)), **peers_count(hits)}))
    # 1 MiB stays in L2 once read: the kernels' own speed, not DRAM's.
    cached, cached_hits = miss[:MIB], hits[:MIB]
    out.append(("find 16 B needle, 1 MiB in cache, absent", MIB,
                {**ours(lambda: simd.find(cached, NEEDLE)), **peers_find(cached)}))
    out.append(("count 16 B needle, 1 MiB in cache, 1 hit", MIB,
                {**ours(lambda: simd.count(cached_hits, NEEDLE)), **peers_count(cached_hits)}))
    many = [NEEDLE, b"case:done", b"zzzq", b"task:fired|"]
    out.append(("find_many 4 needles (first + counts), 64 MiB", BIG,
                {**ours(lambda: simd.find_many(hits, many)),
                 "bytes.find + bytes.count per needle": lambda: (
                     min((p, j) for j, p in enumerate(hits.find(s) for s in many) if p >= 0),
                     [hits.count(s) for s in many])}))
    out.append(("find 16 B needle, 256 B, at the end", 256,
                {**ours(lambda: simd.find(small, NEEDLE)), **prepared(small), **peers_find(small)}))
    window = small[-64:]
    out.append(("find 16 B needle, 64 B window, at the end", 64,
                {**ours(lambda: simd.find(window, NEEDLE)), **prepared(window), **peers_find(window)}))
    out.append(("count 16 B needle, 256 B, 1 hit", 256,
                {**ours(lambda: simd.count(small, NEEDLE)), **peers_count(small)}))

    u32 = id_column(BIG // 4, np.uint32)
    u8 = id_column(BIG, np.uint8)
    out.append(("count_eq uint32, 64 MiB", BIG,
                {**ours(lambda: simd.count_eq(u32, 7)),
                 "numpy count_nonzero(a == v)": lambda: np.count_nonzero(u32 == 7)}))
    out.append(("count_eq uint8, 64 MiB", BIG,
                {**ours(lambda: simd.count_eq(u8, 7)),
                 "numpy count_nonzero(a == v)": lambda: np.count_nonzero(u8 == 7)}))
    out.append(("find_eq uint32, 64 MiB (1/43 match)", BIG,
                {**ours(lambda: simd.find_eq(u32, 7)), "numpy flatnonzero(a == v)": lambda: np.flatnonzero(u32 == 7)}))
    out.append(("histogram 43 ids, uint8, 64 MiB", BIG,
                {**ours(lambda: simd.histogram(u8, 43)), "numpy bincount": lambda: np.bincount(u8, minlength=43)}))
    out.append(("histogram 43 ids, uint32, 64 MiB", BIG,
                {**ours(lambda: simd.histogram(u32, 43)), "numpy bincount": lambda: np.bincount(u32, minlength=43)}))
    small32 = id_column(1024, np.uint32)
    out.append(("count_eq uint32, 4 KiB", 4096,
                {**ours(lambda: simd.count_eq(small32, 7)),
                 "numpy count_nonzero(a == v)": lambda: np.count_nonzero(small32 == 7)}))
    # Small calls: one engine batch of 4096 ids, where the Python call is most
    # of the time (the METH_FASTCALL id scans of native/simd_py.c).
    batch32 = id_column(4096, np.uint32)
    batch8 = id_column(4096, np.uint8)
    out.append(("count_eq uint32, 4096 ids", batch32.nbytes,
                {**ours(lambda: simd.count_eq(batch32, 7)),
                 "numpy count_nonzero(a == v)": lambda: np.count_nonzero(batch32 == 7)}))
    out.append(("find_eq uint32, 4096 ids (1/43 match)", batch32.nbytes,
                {**ours(lambda: simd.find_eq(batch32, 7)),
                 "numpy flatnonzero(a == v)": lambda: np.flatnonzero(batch32 == 7)}))
    out.append(("histogram 43 ids, uint8, 4096 ids", batch8.nbytes,
                {**ours(lambda: simd.histogram(batch8, 43)),
                 "numpy bincount": lambda: np.bincount(batch8, minlength=43)}))
    out.append(("mask_eq uint32, 4096 ids", batch32.nbytes,
                {**ours(lambda: simd.mask_eq(batch32, 7)), "numpy a == v": lambda: batch32 == 7}))
    out.append(("reduce uint32, 4096 ids", batch32.nbytes,
                {**ours(lambda: simd.reduce(batch32)), "numpy a.max()": lambda: batch32.max(),
                 "numpy (a.min(), a.max(), a.sum())": lambda: (batch32.min(), batch32.max(), batch32.sum())}))

    # The whole program: a call, then interpreted work. On a core that lowers
    # its clock after 512-bit instructions (Skylake-SP, Cascade Lake) the
    # interpreter runs slower after an avx512 call than after an avx2 one;
    # this is why auto picks avx2 there (docs/simd.md). The peer does the
    # interpreted work alone.
    def interpreted_work() -> int:
        total = 0
        for i in range(300):
            total += i
        return total

    out.append(("count_eq on 4096 ids + 300 interpreted additions", batch32.nbytes,
                {**ours(lambda: (simd.count_eq(batch32, 7), interpreted_work())),
                 "the additions alone": interpreted_work}))
    return out


def _level_of(name: str) -> str:
    return name[5:-1] if name.startswith("knhk[") else simd.supported_levels()[-1]


# ---------------------------------------------------------------- pytest-benchmark

_CASES: list[Any] | None = None


def _all_cases() -> list[Any]:
    global _CASES
    if _CASES is None:
        _CASES = cases()
    return _CASES


GROUPS = ["find64M", "count64M", "find1M", "count1M", "find_many64M", "find256", "find64", "count256", "count_eq_u32",
          "count_eq_u8", "find_eq_u32", "hist_u8", "hist_u32", "count_eq_4k", "count_eq_u32_4096", "find_eq_u32_4096",
          "hist_u8_4096", "mask_eq_u32_4096", "reduce_u32_4096", "call_then_python"]


def _ids() -> list[tuple[int, str]]:
    # Names only; the data is built lazily, once, when the first benchmark runs.
    impls = [f"knhk-{lv}" for lv in simd.supported_levels()] + ["needle", "peer", "peer2"]
    return [(g, i) for g in range(len(GROUPS)) for i in impls]


@pytest.mark.parametrize("case,impl", _ids(), ids=[f"{GROUPS[g]}-{i}" for g, i in _ids()])
def test_simd(benchmark, case, impl):
    group, _, impls = _all_cases()[case]
    peers = [k for k in impls if not k.startswith("knhk")]
    needles = [k for k in impls if k.startswith("knhk Needle")]
    name = (peers[0] if impl == "peer" and peers else peers[1] if impl == "peer2" and len(peers) > 1
            else needles[0] if impl == "needle" and needles
            else f"knhk[{impl[5:]}]" if impl.startswith("knhk-") else impl)
    if name not in impls:
        pytest.skip(f"no {impl} for {group}")
    benchmark.group = group
    benchmark.name = name
    # The first peer (bytes.find, numpy, ...) is what every knhk bar is a ratio to.
    benchmark.extra_info.update(label=name, peer=impl == "peer")
    with simd.forced_level(_level_of(name)):
        iterations = 1 if "64 MiB" in group else 50 if "MiB" in group else 1000
        benchmark.pedantic(impls[name], rounds=5, iterations=iterations, warmup_rounds=1)


# ---------------------------------------------------------------- table for docs/simd.md

def interleaved_seconds(impls: dict[str, Callable[[], Any]], nbytes: int) -> dict[str, list[float]]:
    """Per implementation, the wall time of one call in each of several rounds.
    A round times every implementation once, one after another, so a change
    in the machine's speed (other tenants, clock) hits all of them alike and
    the ratio within a round stays fair. Small inputs are timed in batches."""
    inner = 1 if nbytes >= 16 * MIB else 20 if nbytes >= MIB else 2000
    rounds = 11 if nbytes >= MIB else 15
    samples: dict[str, list[float]] = {name: [] for name in impls}
    for name, fn in impls.items():  # warm-up: first-touch, caches, lazy set-up
        with simd.forced_level(_level_of(name)):
            fn()
    for _ in range(rounds):
        for name, fn in impls.items():
            with simd.forced_level(_level_of(name)):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - t0) / inner)
    return samples


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> int:
    best = simd.supported_levels()[-1]
    print(f"simd levels: {', '.join(simd.supported_levels())}; stringzilla "
          f"{getattr(sz, '__version__', 'not installed')}; numpy {np.__version__}")
    print("Each row: median of interleaved rounds; the speed-up is the median of the per-round ratios "
          "(their range in brackets).")
    print("| case | implementation | median | GB/s | knhk[" + best + "] speed-up |")
    print("|---|---|---:|---:|---:|")
    for group, nbytes, impls in cases():
        samples = interleaved_seconds(impls, nbytes)
        ours = samples[f"knhk[{best}]"]
        for name, ts in samples.items():
            t = _median(ts)
            unit = f"{t * 1e3:.2f} ms" if t >= 1e-3 else f"{t * 1e9:.0f} ns"
            ratios = sorted(p / o for p, o in zip(ts, ours))
            ratio = "" if name == f"knhk[{best}]" else f"{_median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"
            print(f"| {group} | {name} | {unit} | {nbytes / t / 1e9:.2f} | {ratio} |")
        sys.stdout.flush()
    from knhk_memory._core import ffi, lib

    def search_64(lv: str, fn: str, batch: int, reps: int) -> float:
        # search_64's window, through its needle prepared at lv, or through
        # knhk_simd_find (not prepared) at the active level
        ctx, cleanup = simd._search64_setup(lv)
        try:
            return float(lib.knhk_simd_median_ticks(ffi.addressof(lib, fn), ctx, batch, reps))
        finally:
            cleanup()

    for op in ("search_64", "search_64 dispatched", "count_eq_4k"):
        for lv in simd.supported_levels():
            with simd.forced_level(lv):
                ticks = sorted((search_64(lv, "knhk_simd_hotop_search_64_dispatch", 10000, 101)
                                if op.endswith("dispatched")
                                else search_64(lv, "knhk_simd_hotop_search_64", 10000, 101) if op == "search_64"
                                else simd.median_ticks(op, batch=10000, reps=101)) for _ in range(5))
            print(f"hot op {op} at {lv}: median {ticks[2]:.1f} ticks (medians of 5 runs: "
                  f"{', '.join(f'{x:.1f}' for x in ticks)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
