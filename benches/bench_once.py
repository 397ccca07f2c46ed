"""Read cost of OnceLock / Lazy after init, against Python's own ways to hold a built-once value,
and registry lookup by number against a plain dict lookup.

Each benchmark performs N reads in a loop (one pytest-benchmark call is ~1 us
of overhead, more than the read); `loop_only` measures the empty loop, so
per-read cost = (median - loop_only median) / N. Run:

    .venv/bin/python -m pytest benches/bench_once.py -p no:cacheprovider --benchmark-only \
        --benchmark-json=/tmp/once1.json   # repeat: once2.json, once3.json
    .venv/bin/python benches/bench_once.py /tmp/once1.json /tmp/once2.json /tmp/once3.json
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from knhk_memory import Lazy, OnceLock, PatternRegistry

N = 10_000
R = range(N)

MODULE_GLOBAL = {"table": 1}

cell: OnceLock[dict] = OnceLock()
cell.get_or_init(lambda: {"table": 1})
lazy: Lazy[dict] = Lazy(lambda: {"table": 1})
lazy.value  # noqa: B018


class Holder:
    @functools.cached_property
    def table(self) -> dict:
        return {"table": 1}


holder = Holder()
holder.table  # noqa: B018


@functools.cache
def cached_table() -> dict:
    return {"table": 1}


cached_table()

registry = PatternRegistry()
registry.by_number(1)
plain = {p.number: p for p in registry}


def loop_only() -> None:
    for _ in R:
        pass


def read_global() -> None:
    for _ in R:
        MODULE_GLOBAL  # noqa: B018


def read_cached_property() -> None:
    h = holder
    for _ in R:
        h.table  # noqa: B018


def read_lru_cache() -> None:
    f = cached_table
    for _ in R:
        f()


def read_oncelock_get() -> None:
    c = cell
    for _ in R:
        c.get()


def read_oncelock_get_or_init() -> None:
    c = cell
    for _ in R:
        c.get_or_init(dict)


def read_lazy_value() -> None:
    z = lazy
    for _ in R:
        z.value  # noqa: B018


def lookup_dict() -> None:
    d = plain
    for i in R:
        d[(i % 43) + 1]


def lookup_registry_by_number() -> None:
    by_number = registry.by_number
    for i in R:
        by_number((i % 43) + 1)


def lookup_registry_getitem() -> None:
    reg = registry
    for i in R:
        reg[(i % 43) + 1]


def lookup_index_only() -> None:
    for i in R:
        (i % 43) + 1


CASES = [loop_only, read_global, read_cached_property, read_lru_cache, read_oncelock_get,
         read_oncelock_get_or_init, read_lazy_value, lookup_index_only, lookup_dict,
         lookup_registry_by_number, lookup_registry_getitem]


# Two comparisons for docs/performance.md: reading a once-initialised value
# (peer: functools.cached_property) and looking a pattern up (peer: a dict).
_GROUPS = {
    "read_global": "once: read an initialised value", "read_cached_property": "once: read an initialised value",
    "read_lru_cache": "once: read an initialised value", "read_oncelock_get": "once: read an initialised value",
    "read_oncelock_get_or_init": "once: read an initialised value",
    "read_lazy_value": "once: read an initialised value",
    "lookup_dict": "registry: look a pattern up by number",
    "lookup_registry_by_number": "registry: look a pattern up by number",
    "lookup_registry_getitem": "registry: look a pattern up by number",
}
_PEERS = {"read_cached_property", "lookup_dict"}


def _make(fn):
    def bench(benchmark):
        if fn.__name__ in _GROUPS:
            benchmark.group = _GROUPS[fn.__name__]
            benchmark.extra_info.update(label=fn.__name__, peer=fn.__name__ in _PEERS, ops=len(R))
        benchmark.pedantic(fn, rounds=200, iterations=1, warmup_rounds=10)
    bench.__name__ = f"test_{fn.__name__}"
    return bench


for _fn in CASES:
    globals()[f"test_{_fn.__name__}"] = _make(_fn)


HOT_N = 1_000_000


def _hot(name: str):
    from knhk_memory.registry import hot_ops

    op = next(o for o in hot_ops() if o.name == name)
    ctx, cleanup = op.setup()

    def run() -> None:
        op.fn(ctx, HOT_N)
    run._keep = (ctx, cleanup)  # type: ignore[attr-defined]
    return run


def test_c_once_read(benchmark):
    benchmark.pedantic(_hot("once_read"), rounds=50, iterations=1, warmup_rounds=3)


def test_c_registry_lookup(benchmark):
    benchmark.pedantic(_hot("registry_lookup"), rounds=50, iterations=1, warmup_rounds=3)


def report(*paths: str) -> None:
    """Per case: the fastest round of each run (neighbours on a shared VM only ever
    add time), then the median of those over the runs given."""
    import statistics

    runs = [{b["name"].removeprefix("test_"): b["stats"]["min"] for b in json.loads(Path(p).read_text())["benchmarks"]}
            for p in paths]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    per = {k: (v - med["loop_only"]) / N * 1e9 for k, v in med.items()}
    idx = {k: (v - med["lookup_index_only"]) / N * 1e9 for k, v in med.items()}
    print(f"{'read after init':28s} {'ns/read':>8s} {'vs cached_property':>19s}")
    for k in ("read_global", "read_cached_property", "read_lru_cache", "read_oncelock_get",
              "read_oncelock_get_or_init", "read_lazy_value"):
        print(f"{k:28s} {per[k]:8.1f} {per[k] / per['read_cached_property']:18.2f}x")
    print(f"{'lookup by number':28s} {'ns/lookup':>8s} {'vs dict':>19s}")
    for k in ("lookup_dict", "lookup_registry_by_number", "lookup_registry_getitem"):
        print(f"{k:28s} {idx[k]:8.1f} {idx[k] / idx['lookup_dict']:18.2f}x")
    for k in ("c_once_read", "c_registry_lookup"):
        print(f"{k:28s} {med[k] / HOT_N * 1e9:8.2f} ns/op (C hot op, loop included)")


if __name__ == "__main__":
    report(*sys.argv[1:])
