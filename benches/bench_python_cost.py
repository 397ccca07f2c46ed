"""What a Python caller pays per call, against the best Python peer doing the same job (issue 14).

Every public per-call operation on an engine's hot path, timed from Python
in loops of N calls, beside its peer in the same run. Two ways to run it:

- with the other benches (``bash scripts/dev.sh bench``): one pytest-benchmark
  group per comparison, the peer marked, so scripts/perf_report.py shows the
  ratios in docs/performance.md;
- as a script, for the goals table: rounds interleave every case in a new
  random order each round (a slow phase of the shared machine hits all of
  them alike), each figure is the median over rounds of (loop time - empty
  loop time) / N, and each ratio is the median of the per-round ratios::

      .venv/bin/python benches/bench_python_cost.py --rounds 9 --out benches/results/python_cost.md

  scripts/perf_report.py includes that file in docs/performance.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

N = 20_000


def _setup() -> dict[str, Any]:
    from knhk_memory.allocator import get_backend
    from knhk_memory.arena import Arena
    from knhk_memory.counters import Counters
    from knhk_memory.once import Lazy, OnceLock
    from knhk_memory.registry import PatternRegistry
    from knhk_memory.store import WorkflowStore, WorkflowStoreWriter

    env: dict[str, Any] = {}
    env["counters"] = Counters(["a", "b"])
    env["writer"] = env["counters"].writer()

    class Obj:
        n = 0

    env["obj"], env["lock"] = Obj(), threading.Lock()
    env["arena"] = Arena(1 << 20)
    env["mimalloc"] = get_backend("mimalloc")
    cell: OnceLock[dict[str, int]] = OnceLock()
    cell.set({"a": 1})
    env["cell"] = cell
    lazy = Lazy(lambda: {"a": 1})
    lazy.get()
    env["lazy"] = lazy

    class Holder:
        @functools.cached_property
        def table(self) -> dict[str, int]:
            return {"a": 1}

    holder = Holder()
    holder.table  # noqa: B018
    env["holder"] = holder
    reg = PatternRegistry()
    reg[1]
    env["registry"], env["plain"] = reg, {p.number: p for p in reg}
    tmp = tempfile.mkdtemp(prefix="knhk-bench-cost-")
    path = Path(tmp) / "s.kst"
    keys = [f"workflow/{i:06d}" for i in range(100_000)]
    value = b"x" * 600
    with WorkflowStoreWriter(path) as w:
        for k in keys:
            w.add(k, value)
    env["store"] = WorkflowStore(path)
    env["dict"] = dict.fromkeys(keys, value)
    env["keys"] = [keys[i] for i in random.Random(7).sample(range(len(keys)), N)]
    # The same reads over 1,000 records: everything in cache, so the figures are the
    # per-call work alone (at 100k x 600 B each get waits on DRAM for its record).
    hot_path = Path(tmp) / "hot.kst"
    with WorkflowStoreWriter(hot_path) as w:
        for k in keys[:1000]:
            w.add(k, value)
    env["hot_store"] = WorkflowStore(hot_path)
    env["hot_dict"] = dict.fromkeys(keys[:1000], value)
    env["hot_keys"] = [keys[i] for i in random.Random(7).choices(range(1000), k=N)]
    try:
        import lmdb

        db = lmdb.open(str(Path(tmp) / "lmdb"), map_size=1 << 30, writemap=True)
        with db.begin(write=True) as txn:
            for k in keys:
                txn.put(k.encode(), value)
        env["lmdb"] = db
        env["lmdb_keys"] = [k.encode() for k in env["keys"]]
    except ImportError:
        env["lmdb"] = None
    return env


def cases(env: dict[str, Any]) -> dict[str, Callable[[], None]]:
    """name -> a loop of N calls."""
    R = range(N)
    c, w, o, lock = env["counters"], env["writer"], env["obj"], env["lock"]
    arena, m, cell, lazy, holder = env["arena"], env["mimalloc"], env["cell"], env["lazy"], env["holder"]
    reg, plain, store, d, keys = env["registry"], env["plain"], env["store"], env["dict"], env["keys"]
    hot_store, hot_dict, hot_keys = env["hot_store"], env["hot_dict"], env["hot_keys"]
    u8 = np.uint8

    def empty() -> None:
        for _ in R:
            pass

    def counter_add() -> None:
        add = c.add
        for _ in R:
            add("a", 1)

    def writer_add() -> None:
        add = w.add
        for _ in R:
            add("a", 1)

    def locked_add() -> None:
        for _ in R:
            with lock:
                o.n += 1

    def plain_add() -> None:
        for _ in R:
            o.n += 1

    def method_floor() -> None:
        # The least a method call with the same arguments costs: a bound C method
        # (METH_FASTCALL, as Counters.add) that finds nothing in an empty dict.
        get = {}.get
        for _ in R:
            get("a", 1)

    def arena_alloc() -> None:
        for _ in R:
            arena.alloc(64)

    def arena_array() -> None:
        for _ in R:
            arena.array(64, u8)

    def np_empty() -> None:
        for _ in R:
            np.empty(64, u8)

    def malloc_free() -> None:
        for _ in R:
            m.malloc(64).free()

    def bytearray_64() -> None:
        for _ in R:
            bytearray(64)

    def once_get() -> None:
        for _ in R:
            cell.get()

    def lazy_get() -> None:
        for _ in R:
            lazy.get()

    def cached_property() -> None:
        for _ in R:
            holder.table  # noqa: B018

    def registry_lookup() -> None:
        for _ in R:
            reg[4]

    def dict_lookup() -> None:
        for _ in R:
            plain[4]

    def store_get() -> None:
        get = store.get
        for k in keys:
            get(k)

    def dict_get() -> None:
        get = d.get
        for k in keys:
            get(k)

    def store_getitem() -> None:
        for k in keys:
            store[k]

    def dict_getitem() -> None:
        for k in keys:
            d[k]

    def store_contains() -> None:
        for k in keys:
            k in store  # noqa: B015

    def dict_contains() -> None:
        for k in keys:
            k in d  # noqa: B015

    def store_get_bytes() -> None:
        get_bytes = store.get_bytes
        for k in keys:
            get_bytes(k)

    def store_get_copy() -> None:  # the zero-copy get, then the copy a bytes-only decoder needs
        get = store.get
        for k in keys:
            bytes(get(k))

    def store_get_hot() -> None:
        get = hot_store.get
        for k in hot_keys:
            get(k)

    def dict_get_hot() -> None:
        get = hot_dict.get
        for k in hot_keys:
            get(k)

    out = {f.__name__: f for f in (
        empty, counter_add, writer_add, locked_add, plain_add, method_floor, arena_alloc, arena_array, np_empty,
        malloc_free, bytearray_64, once_get, lazy_get, cached_property, registry_lookup, dict_lookup, store_get,
        dict_get, store_getitem, dict_getitem, store_contains, dict_contains, store_get_bytes, store_get_copy,
        store_get_hot, dict_get_hot)}
    if env["lmdb"] is not None:
        db, lkeys = env["lmdb"], env["lmdb_keys"]

        def lmdb_get() -> None:
            with db.begin(buffers=True) as txn:
                get = txn.get
                for k in lkeys:
                    get(k)

        out["lmdb_get"] = lmdb_get
    return out


# (operation, peer, goal: the largest accepted ratio operation / peer)
GOALS: list[tuple[str, str, float]] = [
    ("counter_add", "locked_add", 0.5), ("counter_add", "plain_add", 1.5),
    ("writer_add", "locked_add", 0.5), ("writer_add", "plain_add", 1.5),
    ("arena_alloc", "np_empty", 1.0), ("arena_array", "np_empty", 1.0),
    ("malloc_free", "bytearray_64", 1.5),
    ("store_get", "lmdb_get", 0.35), ("store_get", "dict_get", 1.2),
    ("store_getitem", "dict_getitem", 1.2), ("store_contains", "dict_contains", 1.2),
    ("store_get_bytes", "store_get_copy", 1.0), ("store_get_hot", "dict_get_hot", 1.2),
    ("registry_lookup", "dict_lookup", 1.0),
    ("once_get", "cached_property", 1.0), ("lazy_get", "cached_property", 1.0),
]


# (operation, peer): context for a goal no method call can meet, printed without a goal:
# the floor of any method call against the bytecode `o.n += 1`, and the counter against it.
CONTEXT: list[tuple[str, str]] = [("method_floor", "plain_add"), ("counter_add", "method_floor")]


def interleaved(rounds: int) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    env = _setup()
    fns = cases(env)
    per_round: dict[str, list[float]] = {k: [] for k in fns}
    rng = random.Random(1)
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        times = {}
        for name in order:
            t0 = time.perf_counter_ns()
            fns[name]()
            times[name] = time.perf_counter_ns() - t0
        for name, t in times.items():
            per_round[name].append(max(t - times["empty"], 0) / N)
    ns = {k: statistics.median(v) for k, v in per_round.items()}
    ratios = {(op, peer): statistics.median(a / b for a, b in zip(per_round[op], per_round[peer]) if b > 0)
              for op, peer in [(a, b) for a, b, _ in GOALS] + CONTEXT if op in per_round and peer in per_round}
    return ns, ratios


def import_cost(runs: int = 15) -> dict[str, dict[str, float]]:
    """What each import adds to a bare interpreter start, in ms, two ways, with the
    bytecode cached as an installed package has it (PYTHONDONTWRITEBYTECODE is dropped and
    one warm-up run writes the .pyc files; with it set and no .pyc, every start compiles
    the package from source, which measures the compiler):

    - ``importtime``: the module's cumulative time in ``python -X importtime -c "import M"``
      (the issue's method), the minimum over runs -- what the import costs when no other
      job takes the CPU from it;
    - ``wall``: the median wall time of ``python -c "import M"`` minus that of
      ``python -c pass`` (``bare``), which also counts teardown, and the machine's noise.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", "import knhk_memory.store, knhk_memory.counters"], check=True, env=env)

    def once(code: str, module: str | None) -> tuple[float, float]:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=True, env=env,
                             capture_output=True, text=True)
        wall = (time.perf_counter() - t0) * 1e3
        cumulative = 0.0
        for line in out.stderr.splitlines():
            parts = line.split("|")
            if module is not None and len(parts) == 3 and parts[2].strip() == module and \
                    not parts[2].startswith("  "):
                cumulative = int(parts[1]) / 1e3
        return wall, cumulative

    codes = {"bare": None, "json": "json", "knhk_memory": "knhk_memory", "knhk_memory.store": "knhk_memory.store",
             "knhk_memory.counters": "knhk_memory.counters"}
    walls: dict[str, list[float]] = {k: [] for k in codes}
    cums: dict[str, list[float]] = {k: [] for k in codes}
    for _ in range(runs):
        for k, module in codes.items():
            wall, cum = once("pass" if module is None else f"import {module}", module)
            walls[k].append(wall)
            cums[k].append(cum)
    bare = statistics.median(walls["bare"])
    out = {k: {"wall": statistics.median(walls[k]) - bare, "importtime": min(cums[k])} for k in codes if k != "bare"}
    return {"bare": {"wall": bare, "importtime": 0.0}, **out}


def _machine() -> str:
    """The CPU model and count (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def table(rounds: int) -> str:
    ns, ratios = interleaved(rounds)
    imp = import_cost()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    intro = (f"`benches/bench_python_cost.py --rounds {rounds}`: {_machine()}, Python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d')}, load average {load:.1f} at the end. Rounds interleave every case in a "
             f"new order; ns per call = median over rounds of (loop - empty loop) / {N}; ratio = median of the "
             "per-round ratios.")
    lines = ["## The Python-facing cost (issue 14 goals)", "", intro, "",
             "| operation | ns/call | peer | peer ns/call | ratio | goal | met |", "|---|---:|---|---:|---:|---:|---|"]
    for op, peer, goal in GOALS:
        if (op, peer) not in ratios:
            lines.append(f"| {op} | {ns.get(op, float('nan')):.1f} | {peer} | - | - | <= {goal} | peer not installed |")
            continue
        r = ratios[(op, peer)]
        lines.append(f"| {op} | {ns[op]:.1f} | {peer} | {ns[peer]:.1f} | {r:.2f}x | <= {goal}x | "
                     f"{'yes' if r <= goal else 'no'} |")
    for op, peer in CONTEXT:
        if (op, peer) in ratios:
            lines.append(f"| {op} | {ns[op]:.1f} | {peer} | {ns[peer]:.1f} | {ratios[(op, peer)]:.2f}x | - | "
                         "context |")
    head = ("| import | ms, `-X importtime` (min) | ms over a bare start (wall, median) | goal | "
            "vs `import json` (importtime) |")
    lines += ["", head, "|---|---:|---:|---:|---:|"]
    goals = {"knhk_memory": 15.0, "knhk_memory.store": 8.0}
    for k in ("knhk_memory", "knhk_memory.store", "knhk_memory.counters"):
        g = goals.get(k)
        it, wall, jit = imp[k]["importtime"], imp[k]["wall"], imp["json"]["importtime"]
        ratio = f"{it / jit:.1f}x" if jit > 0 else "-"
        lines.append(f"| `import {k}` | {it:.1f} | {wall:.1f} | {f'<= {g}' if g else '-'} | {ratio} |")
    lines.append(f"\nBare interpreter start: {imp['bare']['wall']:.1f} ms (wall, median); `import json`: "
                 f"{imp['json']['importtime']:.1f} ms (importtime).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- pytest-benchmark

_PEER_OF = {op: peer for op, peer, _ in GOALS}
_ENV: dict[str, Any] = {}


def _case(name: str) -> Callable[[], None]:
    if not _ENV:
        _ENV.update(_setup())
    return cases(_ENV)[name]


def _bench(op: str, peer: str):
    def bench(benchmark: Any, which: str) -> None:
        name = op if which == "op" else peer
        fn = _case(name)
        if name == "lmdb_get" and _ENV.get("lmdb") is None:
            import pytest

            pytest.skip("lmdb is not installed (the bench extra)")
        benchmark.group = f"per call from Python: {op} vs {peer}"
        benchmark.extra_info.update(label=name, peer=which == "peer", ops=N)
        benchmark.pedantic(fn, rounds=30, iterations=1, warmup_rounds=2)
    return bench


def _register() -> None:
    import pytest

    for op, peer, _ in GOALS:
        fn = _bench(op, peer)
        globals()[f"test_{op}_vs_{peer}"] = pytest.mark.parametrize("which", ["peer", "op"])(fn)


try:
    _register()
except ImportError:  # run as a script without pytest
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", type=Path, help="write the markdown table here (default: print it)")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = ap.parse_args(argv)
    if args.json:
        ns, ratios = interleaved(args.rounds)
        print(json.dumps({"ns": ns, "ratios": {f"{a}/{b}": r for (a, b), r in ratios.items()}}, indent=2))
        return 0
    text = table(args.rounds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
