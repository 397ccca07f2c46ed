"""The reference host on Dask against the same host on local processes (pytest-benchmark;
not part of the test run). Needs the [dask] extra.

    bash scripts/dev.sh bench -k distributed      # pytest-benchmark groups, for docs/performance.md
    .venv/bin/python benches/bench_distributed.py  # the figures of docs/distributed.md, as a table

Compared in the same run, on the demo's store (3,000 workflows), 40,000 cases, seed 1:
- ``--workers 2`` (multiprocessing, shared memory; the peer) against ``--cluster local:2``
  (a LocalCluster of 2 one-thread worker processes), end to end: what a user waits for,
  cluster start and worker setup included;
- the same cases on an already running LocalCluster(2), for batch sizes from 20,000 cases
  down to 50: the run time, Dask's overhead per batch and its share of a batch's work;
- the same run with one worker SIGKILLed after half the batches, against none;
- the store shipped by content to a fresh LocalCluster(2) (one node): bytes fetched per node.

Dask's fixed cost per batch is measured apart, with batches of zero cases (the whole task
path: submit, schedule, the worker's session and lock, the counter snapshots, the result
back to the client); the batch size at which it falls under 10% of a batch's work is
``10 * cost / (work seconds per case)``.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

from knhk_memory.config import load_config
from knhk_memory.distributed import connect
from knhk_memory.refhost import demo as demo_mod

CASES = 40_000
SWEEP = [20_000, 5000, 1000, 250, 50]
EMPTY_BATCHES = 200


@pytest.fixture(scope="module")
def store():
    path = demo_mod.default_store_path()
    demo_mod.ensure_store(path)
    return str(path)


@pytest.fixture(scope="module")
def running():
    client, local = connect("local:2", timeout=60)
    client.wait_for_workers(2, timeout=60)
    yield client.scheduler.address
    client.close()
    local.close()


def run(store: str, **kw) -> dict:
    r = demo_mod.run_demo(load_config(mapping={}), cases=kw.pop("cases", CASES), store=store, seed=1,
                          progress=False, budgets=False, **kw)
    assert r["ok"], [c for c in r["checks"] if not c["ok"]]
    return r


@pytest.mark.parametrize("how", ["workers", "cluster"])
def test_end_to_end(benchmark, store, how):
    benchmark.group = f"distributed: {CASES:,} cases on 2 workers, end to end"
    benchmark.extra_info.update(label="--workers 2 (multiprocessing)" if how == "workers" else "--cluster local:2",
                                peer=how == "workers", ops=CASES)
    kw = {"workers": 2} if how == "workers" else {"cluster": "local:2"}
    r = benchmark.pedantic(run, args=(store,), kwargs=kw, rounds=3, iterations=1)
    benchmark.extra_info["run_seconds"] = r["seconds"]


@pytest.mark.parametrize("batch_cases", [None, *SWEEP])
def test_running_cluster_batch_sizes(benchmark, store, running, batch_cases):
    benchmark.group = f"distributed: {CASES:,} cases on a running LocalCluster(2), by batch size"
    if batch_cases is None:
        benchmark.extra_info.update(label="--workers 2 (multiprocessing)", peer=True, ops=CASES)
        benchmark.pedantic(run, args=(store,), kwargs={"workers": 2}, rounds=3, iterations=1)
        return
    benchmark.extra_info.update(label=f"--cluster, batches of {batch_cases:,}", ops=CASES)
    r = benchmark.pedantic(run, args=(store,), kwargs={"cluster": running, "batch_cases": batch_cases},
                           rounds=3, iterations=1)
    c = r["cluster"]
    benchmark.extra_info.update(batches=c["batches"], overhead_per_batch_s=c["overhead_per_batch_seconds"])


# ---------------------------------------------------------------- the table for docs/distributed.md

def _noop(i: int) -> int:
    return i


def _empty_batch_cost(address: str) -> tuple[float, float]:
    """Seconds of cluster time per batch of zero cases (Dask's fixed cost per batch, our
    task path included), and per no-op task (Dask's own round trip), same submit pattern."""
    from distributed import Client, wait

    from knhk_memory.distributed import KnhkWorkerPlugin, StoreArtifact, register, unregister
    from knhk_memory.refhost import Engine
    from knhk_memory.refhost.cluster import run_batch

    client = Client(address, timeout=30)
    plugin = KnhkWorkerPlugin(load_config(mapping={}), StoreArtifact.from_path(demo_mod.default_store_path()),
                              host=Engine)
    register(client, plugin)
    try:
        costs, noops = [], []
        nworkers = len(client.scheduler_info()["workers"])
        empty = np.zeros(0, dtype=np.int64)
        for _ in range(3):  # interleaved: empty batches, then no-op tasks
            t0 = time.perf_counter()
            futs = [client.submit(run_batch, plugin.name, i, empty, 1, [], pure=False) for i in range(EMPTY_BATCHES)]
            wait(futs)
            for f in futs:
                f.result()
            costs.append((time.perf_counter() - t0) * nworkers / EMPTY_BATCHES)
            del futs
            t0 = time.perf_counter()
            futs = [client.submit(_noop, i, pure=False) for i in range(EMPTY_BATCHES)]
            wait(futs)
            noops.append((time.perf_counter() - t0) * nworkers / EMPTY_BATCHES)
            del futs
        return statistics.median(costs), statistics.median(noops)
    finally:
        unregister(client, plugin)
        client.close()


def _kill_after_half(batches: int):
    state: dict = {"seen": 0}

    def on_result(result, client):
        state["seen"] += 1
        if state["seen"] == batches // 2 and "killed" not in state:
            pids = client.run(os.getpid)
            victim = next(w for w in sorted(pids) if w != result["worker"])
            state["killed"] = victim
            os.kill(pids[victim], signal.SIGKILL)
    return on_result, state


def main() -> None:
    store = str(demo_mod.default_store_path())
    demo_mod.ensure_store(Path(store))
    rows = []

    def timed(**kw):
        t0 = time.perf_counter()
        r = run(store, **kw)
        r["_total"] = time.perf_counter() - t0
        return r

    # interleaved: workers, cluster, workers, cluster, ...
    pairs = [(timed(workers=2), timed(cluster="local:2")) for _ in range(3)]
    w = sorted((p[0] for p in pairs), key=lambda r: r["_total"])[1]
    c = sorted((p[1] for p in pairs), key=lambda r: r["_total"])[1]
    print(f"end to end, {CASES:,} cases, median of 3 interleaved:")
    print(f"  --workers 2        total {w['_total']:.2f} s, run {w['seconds']:.2f} s, "
          f"{CASES / w['seconds']:,.0f} cases/s")
    cl = c["cluster"]
    print(f"  --cluster local:2  total {c['_total']:.2f} s (start {cl['start_seconds']:.2f} s, setup "
          f"{cl['setup_seconds']:.2f} s), run {c['seconds']:.2f} s, {CASES / c['seconds']:,.0f} cases/s, "
          f"{cl['batches']} batches")
    print(f"  throughput ratio cluster/workers: run {w['seconds'] / c['seconds']:.2f}x, "
          f"end to end {w['_total'] / c['_total']:.2f}x")

    client, local = connect("local:2", timeout=60)
    client.wait_for_workers(2, timeout=60)
    address = client.scheduler.address
    try:
        cost, noop = _empty_batch_cost(address)
        print(f"Dask's fixed cost per batch (batches of 0 cases, {EMPTY_BATCHES} x 3): {cost * 1000:.2f} ms; "
              f"a no-op task: {noop * 1000:.2f} ms (worker-time per task)")
        print(f"batch size sweep on a running LocalCluster(2), {CASES:,} cases, median of 3 interleaved rounds:")
        print(f"  {'batch cases':>11} {'batches':>7} {'run s':>7} {'cases/s':>9} {'busy s':>7} "
              f"{'overhead/batch ms':>17} {'work/batch ms':>13} {'fixed cost / work':>17}")
        # interleaved rounds (every size once per round), so a neighbour's burst hits all sizes alike
        runs: dict[int, list[dict]] = {b: [] for b in SWEEP}
        for _ in range(3):
            for b in SWEEP:
                runs[b].append(timed(cluster=address, batch_cases=b))
        per_case = statistics.median(r["cluster"]["busy_seconds"] / CASES for rs in runs.values() for r in rs)
        for b in SWEEP:
            r = sorted(runs[b], key=lambda r: r["seconds"])[1]
            x = r["cluster"]
            work = x["busy_seconds"] / x["batches"]
            rows.append((b, x["batches"], r["seconds"], CASES / r["seconds"], x["busy_seconds"],
                         x["overhead_per_batch_seconds"] * 1000, work * 1000, cost / work))
            print(f"  {b:>11,} {x['batches']:>7} {r['seconds']:>7.2f} {CASES / r['seconds']:>9,.0f} "
                  f"{x['busy_seconds']:>7.2f} {x['overhead_per_batch_seconds'] * 1000:>17.1f} {work * 1000:>13.1f} "
                  f"{cost / work:>16.1%}")
        print(f"work per case {per_case * 1e6:.1f} us (median over the sweep); Dask's fixed cost falls under 10% of "
              f"a batch's work from {10 * cost / per_case:,.0f} cases per batch")
    finally:
        client.close()
        local.close()

    print("one worker SIGKILLed after half the batches vs none (--cluster local:2, batches of 2,000, "
          "median of 3 interleaved):")
    none, killed = [], []
    batches = -(-CASES // 2000)
    for _ in range(3):
        none.append(timed(cluster="local:2", batch_cases=2000))
        hook, state = _kill_after_half(batches)
        r = timed(cluster="local:2", batch_cases=2000, on_result=hook)
        assert state.get("killed") in r["cluster"]["workers_lost"], state
        killed.append(r)
    n = sorted(none, key=lambda r: r["seconds"])[1]
    k = sorted(killed, key=lambda r: r["seconds"])[1]
    print(f"  none:   run {n['seconds']:.2f} s, total {n['_total']:.2f} s")
    print(f"  killed: run {k['seconds']:.2f} s, total {k['_total']:.2f} s; every check passed, counters "
          f"{'equal' if k['counters'] == n['counters'] else 'DIFFER'}")
    for r in killed:
        [node] = r["cluster"]["nodes"]
        print(f"    node block: {node['block_counters']['cases_started']:,} cases started, "
              f"{node['merged_counters']['cases_started']:,} in merged batches, "
              f"{node['unreported_counters']['cases_started']:,} in runs whose results died with the worker")

    saved = os.environ.get("KNHK_MEMORY_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KNHK_MEMORY_CACHE"] = cache  # a fresh node cache: the workers must fetch the store
        try:
            r = timed(cluster="local:2", ship_store="content", cases=2000)
            again = timed(cluster="local:2", ship_store="content", cases=2000)
        finally:
            if saved is None:
                del os.environ["KNHK_MEMORY_CACHE"]
            else:
                os.environ["KNHK_MEMORY_CACHE"] = saved
    x = r["cluster"]
    per_node = [n["store_bytes_fetched"] for n in x["nodes"]]
    print(f"store shipped by content to local:2 (one node, two workers): store {x['store_size']:,} bytes, "
          f"fetched {per_node} bytes per node, worker setup {x['setup_seconds']:.2f} s; "
          f"again with the node cache warm: {again['cluster']['store_bytes_fetched']:,} bytes fetched, setup "
          f"{again['cluster']['setup_seconds']:.2f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
