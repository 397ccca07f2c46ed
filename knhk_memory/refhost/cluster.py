"""The reference host on a Dask cluster: ``knhk-memory demo --cluster``.

The cases ``0..cases-1`` are cut into ``K = ceil(cases / batch_cases)``
batches (at most one per workflow; by default ``batch_cases`` is
:func:`default_batch_cases`, two batches per worker, at most 5,000 cases each)
the way ``--workers`` cuts them: batch ``i`` holds the cases whose
workflow's index is ``i`` modulo ``K``, so no workflow's cases are split and
the engine runs exactly the batches a one-process run does. Batch ``i`` is one
Dask task, run by the worker's :class:`~knhk_memory.refhost.Engine` (made by
:class:`~knhk_memory.distributed.KnhkWorkerPlugin` at worker setup, over the
verified store). A case's workflow and path depend only on the seed and its
number, so the totals do not depend on where a batch runs.

The workers of one node count into one shared counter block and one
pattern-statistics block (:class:`~knhk_memory.distributed.NodeBlocks`).
Each task returns its :class:`~.engine.RunTally`, what its engine added to
those blocks during the batch (metered by the engine,
:meth:`~.engine.Engine.metered`: exact however many workers share the
blocks), and its work time. The client merges by batch id
(:class:`~knhk_memory.distributed.BatchResults`) and drops each result's
future once it has it, so a worker killed mid-run costs only its unfinished
batches, which Dask runs again elsewhere, and every case is counted exactly
once. At the end the client reads each node's blocks and compares them with
the merged batches that ran on that node (:func:`node_rows`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..config import Config
from ..distributed import (
    BatchResults,
    ClusterSpec,
    KnhkWorkerPlugin,
    StoreArtifact,
    connect,
    register,
    session,
    stage_store,
    sum_counters,
    unregister,
    unstage_store,
    worker_addresses,
    worker_figures,
)
from ..errors import ClusterError, HostError, KnhkMemoryError
from .engine import PATTERN_SLOTS, Engine, RunTally

__all__ = ["DEFAULT_BATCH_CASES", "BATCHES_PER_WORKER", "ClusterRun", "run_batch", "run_on_cluster", "batch_count",
           "default_batch_cases", "node_rows"]

DEFAULT_BATCH_CASES = 5000  # the most cases a default batch holds
BATCHES_PER_WORKER = 2  # the default split: every worker gets work, and a fast one can take a slow one's second


def default_batch_cases(cases: int, workers: int) -> int:
    """Cases per batch when ``--batch-cases`` is not given: ``cases`` cut into
    ``BATCHES_PER_WORKER`` batches per worker (so none of ``workers`` is left
    idle), at most ``DEFAULT_BATCH_CASES`` each (so a long run still makes
    batches small enough to lose cheaply), at least 1."""
    return max(1, min(DEFAULT_BATCH_CASES, -(-cases // (BATCHES_PER_WORKER * max(1, workers)))))


def batch_count(cases: int, batch_cases: int) -> int:
    """How many batches ``cases`` cases make at about ``batch_cases`` each (at least 1)."""
    return max(1, -(-cases // batch_cases))


def split_batches(cases: int, seed: int, workflows: int, k: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The case numbers of each of ``k`` batches (int64, ascending), and each case's batch.

    Batch ``i`` holds the cases among ``0..cases-1`` whose workflow index is ``i``
    modulo ``k``, so no workflow's cases are split between batches. Computed once,
    on the client; a task gets only its own case numbers."""
    from .workflows import case_seeds, workflow_choice

    numbers = np.arange(cases, dtype=np.int64)
    which = workflow_choice(case_seeds(seed, numbers), workflows) % k
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(1, k))
    return [np.ascontiguousarray(p) for p in np.split(numbers[order], bounds)], which


def run_batch(plugin_name: str, batch_id: int, case_numbers: np.ndarray, seed: int,
              sample: list[int]) -> dict[str, Any]:
    """The task: run batch ``batch_id`` (the cases ``case_numbers``, int64) on this worker's engine.

    Returns ``{"batch", "worker", "pid", "node", "tally", "counters",
    "pattern_executions", "pattern_ticks", "seconds", "pool"}``: counters and pattern
    figures are what this batch added to its node's shared blocks (metered by
    the engine; the node's other workers add to the same blocks meanwhile);
    ``seconds`` is the batch's work time; ``pool`` the worker's case-record
    pool figures after the batch (``PoolStats.as_dict()``); ``arena_live_blocks``
    the blocks its batch arena still holds after the batch (0: all returned).
    """
    plugin = session(plugin_name)
    with plugin.lock:
        engine: Engine = plugin.session
        engine.bind_thread()
        start = time.perf_counter()
        with engine.metered() as meter:
            tally = engine.run(case_numbers, seed=seed, sample=frozenset(sample))
        seconds = time.perf_counter() - start
        pool = engine.case_pool.stats().as_dict()
        arena_live = engine.arena.stats().live_blocks
    return {"batch": batch_id, "worker": plugin.address, "pid": os.getpid(),
            "node": plugin.node.node if plugin.node is not None else None, "tally": tally,
            "counters": meter.counter_dict(), "pattern_executions": meter.pattern_executions,
            "pattern_ticks": meter.pattern_ticks, "seconds": seconds, "pool": pool,
            "arena_live_blocks": arena_live}


class ClusterRun:
    """What :func:`run_on_cluster` returns: the merged tally and the cluster's figures."""

    def __init__(self, tally: RunTally, counters: dict[str, int], pattern_executions: np.ndarray,
                 pattern_ticks: np.ndarray, report: dict[str, Any]) -> None:
        self.tally = tally
        self.counters = counters
        self.pattern_executions = pattern_executions
        self.pattern_ticks = pattern_ticks
        self.report = report


def run_on_cluster(config: Config, store_path: str | os.PathLike[str], *, cases: int, seed: int,
                   sample: frozenset[int], cluster: ClusterSpec | str, batch_cases: int | None = None,
                   ship_store: str | None = None, timeout: float = 10.0,
                   progress: Callable[[int], None] | None = None,
                   on_result: Callable[[dict[str, Any], Any], None] | None = None) -> ClusterRun:
    """Run cases ``0..cases-1`` as Dask tasks on ``cluster`` and merge the results by batch id.

    :param config: The engine's config; workers get its values.
    :param store_path: The store on the client; shipped by ``ship_store``
        (``"path"`` or ``"content"``; default ``"path"`` for ``local:N``,
        ``"content"`` for ``tcp://``).
    :param batch_cases: Cases per task; None: :func:`default_batch_cases` of the
        workers the cluster has once the plugin is registered.
    :param timeout: Seconds to wait for the scheduler.
    :param progress: Called with each merged batch's case count.
    :param on_result: Called with ``(result, client)`` after each merged batch
        (tests use it to kill a worker mid-run).
    :raises ClusterError: an unreachable scheduler, a worker that refused the
        plugin (:class:`~knhk_memory.errors.WorkerError` and subclasses), a
        batch that failed.
    """
    from ..distributed import parse_cluster

    if batch_cases is not None and (isinstance(batch_cases, bool) or not isinstance(batch_cases, int)
                                    or batch_cases < 1):
        raise HostError(f"--batch-cases must be a positive integer, got {batch_cases!r}")
    spec = parse_cluster(cluster) if isinstance(cluster, str) else cluster
    if ship_store is None:
        ship_store = "path" if spec.kind == "local" else "content"
    artifact = StoreArtifact.from_path(store_path, shipping=ship_store)
    from ..store import WorkflowStore

    with WorkflowStore(store_path) as st:
        workflows = len(st)
    if not workflows:
        raise HostError(f"the workflow store {store_path} holds no definitions")
    t_start = time.perf_counter()
    client, local = connect(spec, timeout=timeout)
    start_seconds = time.perf_counter() - t_start
    plugin = KnhkWorkerPlugin(config, artifact, host=Engine)
    registered = staged = False
    try:
        t0 = time.perf_counter()
        if artifact.shipping == "content":  # on the scheduler, for each node's first worker to fetch
            stage_store(client, artifact)
            staged = True
        register(client, plugin, timeout=timeout)
        registered = True
        setup_seconds = time.perf_counter() - t0
        workers_at_start = sorted(worker_addresses(client))
        if batch_cases is None:
            batch_cases = default_batch_cases(cases, len(workers_at_start))
        k = min(batch_count(cases, batch_cases), workflows)  # a workflow's cases are never split
        parts, which = split_batches(cases, seed, workflows, k)
        sampled: dict[int, list[int]] = {}
        for c in sorted(c for c in sample if 0 <= c < cases):
            sampled.setdefault(int(which[c]), []).append(c)
        results = BatchResults(range(k))
        dropped: list[dict[str, Any]] = []  # repeated results: not merged, but their adds are in a node block
        t0 = time.perf_counter()
        futures = []
        for i, part in enumerate(parts):
            mine = sampled.get(i, [])
            futures.append(client.submit(run_batch, plugin.name, i, part, seed, mine,
                                         key=f"{plugin.name}-batch-{i}", pure=False))
        from distributed import as_completed

        try:
            for fut in as_completed(futures):
                try:
                    r = fut.result()
                except KnhkMemoryError:
                    raise
                except Exception as exc:
                    raise ClusterError(f"batch {fut.key} failed: {type(exc).__name__}: {exc}") from None
                fut.release()  # the client has it: losing its worker now costs nothing
                if results.add(r["batch"], r):
                    if progress is not None:
                        progress(int(r["tally"].cases))
                    if on_result is not None:
                        on_result(r, client)
                else:
                    dropped.append(r)
        except BaseException:
            client.cancel(futures)
            raise
        wall = time.perf_counter() - t0
        if not results.complete():  # pragma: no cover - as_completed yields every future
            raise ClusterError(f"batches {results.missing()[:10]} never reported")
        workers_at_end = sorted(worker_addresses(client))
        live = worker_figures(client, plugin.name)
    finally:
        if registered:
            unregister(client, plugin)
        if staged:
            unstage_store(client, artifact)
        client.close()
        if local is not None:
            local.close()
    return _merge(results, dropped, k, wall, spec, artifact, batch_cases, start_seconds, setup_seconds,
                  workers_at_start, workers_at_end, live)


def _merge(results: BatchResults, dropped: list[dict[str, Any]], k: int, wall: float, spec: ClusterSpec,
           artifact: StoreArtifact, batch_cases: int, start_seconds: float, setup_seconds: float, at_start: list[str],
           at_end: list[str], live: dict[str, dict[str, Any]]) -> ClusterRun:
    tally = RunTally(arenas=0)
    execs = np.zeros(PATTERN_SLOTS, dtype=np.int64)
    ticks = np.zeros(PATTERN_SLOTS, dtype=np.int64)
    per: dict[str, dict[str, Any]] = {}
    for i in sorted(results.results):
        r = results.results[i]
        tally.merge(r["tally"])
        execs += r["pattern_executions"]
        ticks += r["pattern_ticks"]
        w = per.setdefault(r["worker"], {"address": r["worker"], "pid": r["pid"], "node": r["node"], "batches": 0,
                                         "cases": 0, "busy_seconds": 0.0, "counters": {}, "pool": None})
        w["pool"] = _later_pool(w["pool"], r.get("pool"))
        w["arena_live_blocks"] = max(w.get("arena_live_blocks", 0), r.get("arena_live_blocks", 0))
        w["batches"] += 1
        w["cases"] += int(r["tally"].cases)
        w["busy_seconds"] += r["seconds"]
        w["counters"] = sum_counters([w["counters"], r["counters"]])
    counters = sum_counters(r["counters"] for r in results.results.values())
    tally.seconds = wall
    busy = sum(r["seconds"] for r in results.results.values())
    lost = sorted(set(at_start) - set(at_end))
    rows = []
    for addr in sorted(set(per) | set(live)):
        fig = live.get(addr, {})
        w = per.get(addr, {"address": addr, "pid": fig.get("pid"), "node": fig.get("node"), "batches": 0,
                           "cases": 0, "busy_seconds": 0.0, "counters": {}, "pool": None})
        w["alive_at_end"] = bool(fig)
        w["store_bytes_fetched"] = fig.get("store_bytes_fetched")
        w["cases_per_second"] = w["cases"] / w["busy_seconds"] if w["busy_seconds"] else 0.0
        rows.append(w)
    n_batches = len(results.results)
    nworkers = max(1, len(at_start))
    report = {
        "cluster": str(spec), "kind": spec.kind, "workers": len(at_start), "workers_lost": lost,
        "batches": n_batches, "batches_expected": k, "batch_cases": batch_cases,
        "duplicates_dropped": results.duplicates,
        "store_shipping": artifact.shipping, "store_sha256": artifact.sha256, "store_size": artifact.size,
        "store_bytes_fetched": sum(w["store_bytes_fetched"] or 0 for w in rows),
        "start_seconds": start_seconds, "setup_seconds": setup_seconds, "wall_seconds": wall,
        "busy_seconds": busy,
        # the cluster's time not spent running batches, per batch: scheduling, transfer, idle tails
        "overhead_per_batch_seconds": max(0.0, wall * nworkers - busy) / max(1, n_batches),
        "per_worker": rows,
        "case_pools": _pool_totals(rows),
        # the most blocks any batch left in its worker's arena, summed over the workers (0: all returned)
        "arena_live_blocks": sum(w.get("arena_live_blocks", 0) for w in rows),
        "nodes": node_rows(results, dropped, live, lost, per),
    }
    read = {n["node"] for n in report["nodes"]}
    # nodes that ran merged batches but had no live worker at the end: their blocks could not be read
    report["nodes_unread"] = sorted({r["node"] for r in results.results.values()} - read - {None})
    return ClusterRun(tally, counters, execs, ticks, report)


def _later_pool(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """A worker's pool figures after its last batch (the figures only grow: the one with more allocations)."""
    if a is None or b is None:
        return b if a is None else a
    return b if b["allocations"] >= a["allocations"] else a


def _pool_totals(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The workers' case-record pools together: one pool per worker, so allocations, frees,
    failed and in_use (at each worker's last batch) add up; high_water is the largest; None
    when no worker reported one."""
    pools = [w["pool"] for w in rows if w.get("pool")]
    if not pools:
        return None
    first = pools[0]
    return {"pools": len(pools), "capacity": first["capacity"], "stride": first["stride"],
            "allocations": sum(p["allocations"] for p in pools), "frees": sum(p["frees"] for p in pools),
            "in_use": sum(p["in_use"] for p in pools), "high_water": max(p["high_water"] for p in pools),
            "failed": sum(p["failed"] for p in pools)}


def node_rows(results: BatchResults, dropped: list[dict[str, Any]], live: dict[str, dict[str, Any]],
              lost: list[str], per: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per node: its shared blocks as read at the end, against the batches run there.

    ``block_*``: the node's shared counters and pattern figures (every add
    any of its workers made in this run); ``merged_*``: the sum of the merged
    batch results that ran on the node; ``dropped_*``: repeated results the
    client did not merge (their adds are in the block too); ``unreported_*`` =
    block - merged - dropped: adds of runs whose results never reached the
    client, i.e. the batches a killed worker had finished but whose results
    died with it (Dask runs them again), and the batch it was running when
    killed, as far as it got. ``exact`` says the block equals merged +
    dropped for every counter and pattern; ``lost_workers`` names the
    workers lost on this node (a lost worker that reported no batch is
    counted on every node: its node is unknown). With no lost worker,
    ``unreported`` must be zero; with one, it is what the lost runs added,
    never negative. The client's totals never include it.
    """
    by_node: dict[str, dict[str, Any]] = {}
    for addr, fig in sorted(live.items()):
        if "node" not in fig:
            continue
        n = by_node.setdefault(fig["node"], {"node": fig["node"], "host": fig.get("host"), "blocks": fig["node_blocks"],
                                             "workers": [], "block_counters": fig["counters"],
                                             "block_pattern_executions": fig["pattern_executions"],
                                             "block_pattern_ticks": fig["pattern_ticks"],
                                             "store_bytes_fetched": 0})
        n["workers"].append(addr)
        n["store_bytes_fetched"] += int(fig.get("store_bytes_fetched") or 0)
    out = []
    for node, n in sorted(by_node.items()):
        def total(rs: Iterable[dict[str, Any]], node: str = node) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
            mine = [r for r in rs if r["node"] == node]
            e = np.zeros(PATTERN_SLOTS, dtype=np.int64)
            t = np.zeros(PATTERN_SLOTS, dtype=np.int64)
            for r in mine:
                e += r["pattern_executions"]
                t += r["pattern_ticks"]
            return sum_counters(r["counters"] for r in mine), e, t

        mc, me, mt = total(results.results.values())
        dc, de, dt = total(dropped)
        block = n["block_counters"]
        names = list(block)
        unreported = {k: block[k] - mc.get(k, 0) - dc.get(k, 0) for k in names}
        ue = np.asarray(n["block_pattern_executions"], dtype=np.int64) - me - de
        ut = np.asarray(n["block_pattern_ticks"], dtype=np.int64) - mt - dt
        n.update(
            lost_workers=[a for a in lost if per.get(a, {}).get("node") in (node, None)],
            merged_counters={k: mc.get(k, 0) for k in names},
            merged_batches=sum(1 for r in results.results.values() if r["node"] == node),
            dropped_counters={k: dc.get(k, 0) for k in names},
            unreported_counters=unreported,
            unreported_pattern_executions=int(ue.sum()),
            exact=not any(unreported.values()) and not ue.any() and not ut.any(),
            never_negative=min(unreported.values(), default=0) >= 0 and int(ue.min()) >= 0 and int(ut.min()) >= 0,
        )
        for key in ("block_pattern_executions", "block_pattern_ticks"):
            n[key] = [int(v) for v in n[key]]
        out.append(n)
    return out
