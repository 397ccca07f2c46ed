"""``knhk-memory demo``: the reference host runs a batch of cases and checks the results.

With no arguments it builds (once, in the cache directory) a store of
generated workflow definitions, runs :data:`DEFAULT_CASES` cases on the
memory plugin as the config file sets it up, checks the results and prints a
summary with the hot-path budget table. ``--workers N`` runs the cases in N
spawned processes that share the store file and count into one shared
counter block. The exit status is 0 when every check passes, 1 when one
fails, 2 for a usage or configuration error.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import segments
from ..config import CACHE_ENV, Config, cache_dir, validate
from ..errors import CheckFailedError, ClusterError, HostError
from ..launcher import launched_environment
from .engine import Engine, RunTally, tally_event_log
from .executors import CASE_END, CASE_START, TASK
from .reference import run_case
from .workflows import SUPPORTED_PATTERNS, case_seed_one, generate_definitions, workflow_choice_one

__all__ = ["DEFAULT_CASES", "DEFAULT_WORKFLOWS", "DEFAULT_SEED", "cache_dir", "default_store_path",
           "default_event_log_path", "event_log_paths", "ensure_store", "measure_store", "run_demo", "format_summary",
           "main_check", "metric_sources"]

DEFAULT_CASES = 100_000
DEFAULT_WORKFLOWS = 3000
DEFAULT_SEED = 1
GENERATOR_SEED = 2026
STORE_FORMAT = "v1"
SAMPLE_CASES = 256
# A case costs ~100 bytes of working arrays and ~0.5-1 us; a hundred million
# is ~10 GB and minutes. Beyond that a run is a mistake (10**12 was once typed).
MAX_CASES = 100_000_000


# ---------------------------------------------------------------- the store

def default_event_log_path() -> Path:
    """Where the demo writes its event log unless told otherwise (``--event-log``, ``--no-event-log``);
    the cache directory is made if missing."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HostError(f"cannot create the directory {d} for the demo's event log ({exc.strerror}); pass "
                        f"--event-log PATH or --no-event-log, or set {CACHE_ENV}") from None
    return d / "demo-events.kvec"


def default_store_path() -> Path:
    return cache_dir() / f"demo-workflows-{STORE_FORMAT}-{DEFAULT_WORKFLOWS}-{GENERATOR_SEED}.knhk"


def ensure_store(path: Path, count: int = DEFAULT_WORKFLOWS, *, build: bool = True,
                 make_dirs: bool = False) -> dict[str, Any]:
    """Build the generated definitions at ``path`` unless a store is there.

    ``build=False``: a missing store is a :class:`HostError` (a path the user
    named must already hold a store). ``make_dirs``: create missing parent
    directories (only for the cache directory, which is ours); otherwise a
    missing directory is a :class:`HostError`. The file appears whole or not
    at all (the writer renames it into place).
    """
    from ..store import WorkflowStoreWriter

    try:
        exists = os.path.lexists(path)
    except OSError as exc:  # pragma: no cover - lexists swallows most errors
        raise HostError(f"cannot check the demo store {path}: {exc.strerror}") from None
    if exists:
        return {"path": str(path), "built": False, "build_seconds": 0.0}
    if not os.access(path.parent if str(path.parent) else ".", os.X_OK) and path.parent.exists():
        raise HostError(f"the directory {path.parent} cannot be searched (permission denied); pass --store "
                        f"PATH or set {CACHE_ENV}")
    if not build:
        raise HostError(f"no store at {path}; pass --build to build the generated definitions there, or "
                        "name an existing store")
    if make_dirs:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HostError(f"cannot create the directory {path.parent} for the demo store ({exc.strerror}); "
                            f"pass --store PATH or set {CACHE_ENV}") from None
    elif not path.parent.is_dir():
        raise HostError(f"the directory {path.parent} does not exist; the demo does not create directories "
                        "for a store path you name")
    t0 = time.perf_counter()
    with WorkflowStoreWriter(path) as w:
        for wf in generate_definitions(count, GENERATOR_SEED):
            w.add(wf.id, wf.encode())
    return {"path": str(path), "built": True, "build_seconds": time.perf_counter() - t0}


def measure_store(path: Path, lookups: int = 2000, repeats: int = 15) -> dict[str, Any]:
    """Median open time and median per-lookup time of the store, and a full verify."""
    from ..store import WorkflowStore

    opens = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        s = WorkflowStore(path)
        opens.append(time.perf_counter_ns() - t0)
        s.close()
    with WorkflowStore(path) as s:
        keys = [k for _, k in zip(range(lookups), s.keys())]
        rng = np.random.default_rng(7)
        probe = [keys[i] for i in rng.integers(0, len(keys), size=lookups)] if keys else []
        per = []
        get = s.get
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            for k in probe:
                get(k)
            per.append((time.perf_counter_ns() - t0) / max(1, len(probe)))
        start = time.perf_counter()
        records = s.verify()
        verify_s = time.perf_counter() - start
        info = s.stats()
    return {"open_ns": statistics.median(opens), "lookup_ns": statistics.median(per), "verified_records": records,
            "verify_seconds": verify_s, "keys": info["keys"], "file_size": info["file_size"],
            "access": info["access"]}


# ---------------------------------------------------------------- workers

def event_log_paths(path: str | os.PathLike[str], workers: int) -> list[Path]:
    """The event log file(s) of a run: ``path`` itself for one worker, else ``path.w0`` ...
    (one writer per file)."""
    p = Path(path)
    return [p] if workers == 1 else [p.with_name(f"{p.name}.w{w}") for w in range(workers)]


def _die_with_parent(parent: int) -> None:
    """Pool initializer: this worker ends when the process that started it does.

    A worker mid-batch never reads its task pipe, so it would not notice a
    parent killed with SIGKILL and would run to the end of its cases (issue
    22). Two guards: the kernel's parent-death signal (Linux prctl
    PR_SET_PDEATHSIG, SIGKILL), and a daemon thread that checks the parent's
    pid every 0.2 s -- for platforms without prctl, and for the race where
    the parent died before the prctl took effect. Ctrl-C (SIGINT to the whole
    foreground process group) is ignored here: the parent decides, and
    terminates the pool (SIGTERM) as it unwinds.
    """
    import ctypes
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.2)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="knhk-parent-watch", daemon=True).start()


def _worker(job: dict[str, Any]) -> RunTally:
    """One worker process: its own engine over the shared store, counting into the parent's blocks."""
    config = Config(validate(job["config"], job["source"]), source=job["source"], origin=job["origin"])
    log = job["event_logs"][job["worker"]] if job["event_logs"] else None
    with Engine(config, counters_from=job["counters_from"], metrics=job["metrics_from"], event_log=log) as engine:
        return engine.run(np.arange(job["cases"], dtype=np.int64), seed=job["seed"],
                          sample=frozenset(job["sample"]), partition=(job["worker"], job["workers"]))


def _run_workers(engine: Engine, config: Config, cases: int, workers: int, seed: int, sample: frozenset[int],
                 progress: Any, event_logs: list[str] | None = None) -> RunTally:
    ctx = multiprocessing.get_context("spawn")
    # Each worker takes the cases of every workers-th workflow, so no batch is split.
    base = {"config": config.as_dict(), "source": config.source, "origin": config.origin, "seed": seed,
            "counters_from": (engine.counters.name, engine.pattern_stats.name), "cases": cases,
            "metrics_from": engine.metrics.name if engine.metrics is not None else False,
            "workers": workers, "sample": sorted(sample), "event_logs": event_logs}
    jobs = [dict(base, worker=w) for w in range(workers)]
    done_idx = engine.counters.index("cases_completed")
    start = engine.counters.get(done_idx)
    tally = RunTally(arenas=0)
    t0 = time.perf_counter()
    # Under knhk-memory run the workers are the engine too: they get the
    # launcher's variables back (knhk_configure took them out of os.environ).
    with launched_environment():
        pool = ctx.Pool(workers, initializer=_die_with_parent, initargs=(os.getpid(),))
    unlink = _UnlinkWhenAttached(engine, workers)
    with pool:
        pending = pool.map_async(_worker, jobs)
        seen = 0
        while not pending.ready():
            pending.wait(0.1)
            unlink.poll()
            now = engine.counters.get(done_idx) - start  # the workers' shared counter
            if progress is not None and now > seen:
                progress(now - seen)
                seen = now
        results = pending.get()
    for r in results:
        tally.merge(r)
    if progress is not None and tally.cases > seen:
        progress(tally.cases - seen)
    tally.seconds = time.perf_counter() - t0
    return tally


#: The names Counters, PatternStats and Metrics generate for a shared block with no
#: configured name (``knhk_counters_<creator pid>_<12 hex digits>``), and the node blocks
#: of a Dask run (``knhk_dask_<run>_<node>_c`` / ``_p``, knhk_memory.distributed).
_GENERATED_NAME = re.compile(r"knhk_counters_[0-9]+_[0-9a-f]{12}|knhk_dask_[0-9a-f]+_[0-9a-f]+_[cp]")


def reclaim_generated_leftovers() -> list[str]:
    """Remove the leftover blocks with generated names: a demo (or any process) SIGKILLed
    before its workers attached leaves its blocks, as does a cluster run whose client was
    SIGKILLed (its Dask workers die with it), and no later start reuses their names.
    Only what :attr:`~knhk_memory.segments.Segment.leftover` allows: knhk blocks of
    this user whose creator (pid and start time) is gone and which no
    process maps; configured names are left to their next start or ``knhk-memory shm
    gc``. Returns the names removed (the report lists them)."""
    removed = []
    for seg in segments.list_segments("knhk_"):
        if seg.leftover and _GENERATED_NAME.fullmatch(seg.name) and segments.reclaim(seg):
            removed.append(seg.name)
    return removed


class _UnlinkWhenAttached:
    """Remove the names of the run's generated blocks once every worker maps them.

    The blocks the demo makes for its workers have generated names
    (``knhk_counters_<pid>_<hex>``) that nothing outside the run attaches to.
    Once each of the ``workers`` pool processes maps all of them, their names are
    unlinked: the mappings stay valid, and a SIGKILL of the demo from then on
    leaves nothing in /dev/shm (the workers die with it; issue 22). Configured
    names (``[counters]``/``[metrics] shared_name``) stay: other tools attach to
    them. Until every worker has attached, a SIGKILL leaves the blocks, as
    leftovers the next demo start (:func:`reclaim_generated_leftovers`) or
    ``knhk-memory shm gc`` removes.
    """

    def __init__(self, engine: Engine, workers: int) -> None:
        self.workers = workers
        self.blocks = [b for b in (engine.counters, engine.pattern_stats, engine.metrics)
                       if b is not None and (b.name or "").startswith(f"knhk_counters_{os.getpid()}_")]
        self.files: list[os.stat_result] = []
        for b in self.blocks:
            try:
                self.files.append(os.stat(f"/dev/shm/{b.name}"))
            except OSError:
                self.blocks = []  # not in /dev/shm: leave the names alone
                break

    def poll(self) -> None:
        if not self.blocks:
            return
        pids = [p.pid for p in multiprocessing.active_children() if p.pid is not None]
        if len(pids) >= self.workers and sum(segments.maps_all(p, self.files) for p in pids) >= self.workers:
            for b in self.blocks:
                b.unlink()
            self.blocks = []


# ---------------------------------------------------------------- the run

def _sample(cases: int) -> frozenset[int]:
    step = max(1, cases // SAMPLE_CASES)
    return frozenset(range(0, cases, step))


def _check(checks: list[dict[str, Any]], name: str, ok: bool, detail: str) -> None:
    checks.append({"check": name, "ok": bool(ok), "detail": detail})


def run_demo(config: Config, *, cases: int = DEFAULT_CASES, workers: int | None = None, store: str | None = None,
             seed: int = DEFAULT_SEED, progress: bool | None = None, budgets: bool = True,
             build: bool = False, cluster: str | None = None, batch_cases: int | None = None,
             ship_store: str | None = None, cluster_timeout: float | None = None, on_result: Any = None,
             metrics_hook: Callable[[list[Any], dict[str, Any]], None] | None = None,
             event_log: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run the demo and return its results (what ``--json`` prints). Raises
    :class:`HostError` for bad parameters; failed checks are in the result.

    ``store`` (or ``[store] path``) must name an existing store unless
    ``build`` (then the generated definitions are built there, in an existing
    directory); without either, the store lives in :func:`cache_dir`.
    ``cluster`` (``local[:N]`` or ``tcp://HOST:PORT``) runs the cases as Dask
    tasks of ``batch_cases`` cases each (see :mod:`.cluster`); the result then
    has a ``"cluster"`` entry with per-worker figures. Raises
    :class:`~knhk_memory.errors.ClusterError` (or a ``WorkerError``) when the
    cluster cannot run them.

    ``metrics_hook(sources, result)``: the engine records metrics too
    (:class:`~knhk_memory.metrics.Metrics`, shared with the ``workers``), and the
    hook is called with the sources to export (:func:`metric_sources`) and the
    result while the engine is still open (to print or serve a scrape). Not with
    ``cluster``: Dask workers may be on other machines, outside the shared block.

    ``event_log``: write every event to that MmapVec file (with workers, one
    file per worker: ``event_log_paths``), reopen it after the run and check
    its tallies against the run's."""
    if isinstance(cases, bool) or not isinstance(cases, int) or not 1 <= cases <= MAX_CASES:
        raise HostError(f"--cases must be an integer from 1 to {MAX_CASES:,}, got {cases!r}")
    cpus = os.cpu_count() or 1
    if cluster is not None and workers is not None:
        raise HostError(f"--cluster and --workers are exclusive: --workers {workers} runs local processes that "
                        f"share memory, --cluster {cluster} runs Dask workers (local:N sets how many); give one")
    if workers is None:  # not given: this process alone (or, with --cluster, the Dask workers)
        workers = 1
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 8 * cpus:
        raise HostError(f"--workers must be an integer from 1 to {8 * cpus} (8 per CPU), got {workers!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise HostError(f"--seed must be an integer in 0..2**64-1, got {seed!r}")
    if cluster is not None and metrics_hook is not None:
        raise HostError(f"--metrics records into a shared-memory block the workers of this machine attach to; "
                        f"the --cluster {cluster} workers may run elsewhere: use --workers N with --metrics")
    given = [opt for opt, value in (("--batch-cases", batch_cases), ("--ship-store", ship_store),
                                    ("--cluster-timeout", cluster_timeout)) if value is not None]
    if cluster is None and given:
        raise HostError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --cluster runs "
                        "only; add --cluster local:N "
                        "or --cluster tcp://HOST:PORT")
    if cluster_timeout is None:
        cluster_timeout = 10.0
    leftovers = reclaim_generated_leftovers()
    spec = None
    if cluster is not None:
        try:
            from ..distributed import parse_cluster
        except ImportError as exc:
            raise ClusterError(f"--cluster {cluster} needs Dask's distributed scheduler, which is not installed "
                               f"({exc.__cause__ or exc}): pip install 'knhk-memory[dask]'") from None
        spec = parse_cluster(cluster)
    if store is not None:
        store_path, store_from = Path(store), "--store"
    elif config.store.path:
        store_path, store_from = Path(config.store.path), f"[store] path in {config.source}"
    else:
        store_path, store_from = default_store_path(), "the cache directory"
    try:
        is_dir = store_path.is_dir()
    except OSError as exc:
        raise HostError(f"{store_path} (from {store_from}) cannot be checked: {exc.strerror}") from None
    if is_dir:
        raise HostError(f"{store_path} (from {store_from}) is a directory; give a store file path")
    ours = store_from == "the cache directory"
    built = ensure_store(store_path, build=build or ours, make_dirs=ours)
    store_figures = measure_store(store_path)
    config = config.replace(store={"path": str(store_path)})
    if workers > 1:
        config = config.replace(counters={"shared": True, "shared_name": ""})
    sample = _sample(cases)
    if metrics_hook is not None and workers > 1 and not config.metrics.shared_name:
        config = config.replace(metrics={"shared": True})
    logs = None
    if event_log is not None and cluster is not None:
        raise HostError("--event-log cannot be used with --cluster: the Dask workers may be on other machines; "
                        "drop --event-log (or pass --no-event-log)")
    if event_log is not None:
        logs = [str(p) for p in event_log_paths(event_log, workers)]
        for lp in logs:
            if Path(lp).is_dir():
                raise HostError(f"--event-log {lp} is a directory; give a file path")
    with Engine(config, metrics=metrics_hook is not None,
                event_log=logs[0] if logs and workers == 1 else None) as engine:
        before_counters = engine.counters.snapshot()
        before_patterns = engine.pattern_stats.as_dict()
        bar = _progress_bar(cases, progress)
        step = bar.update if bar is not None else None
        try:
            crun = None
            if spec is not None:
                from .cluster import run_on_cluster

                crun = run_on_cluster(config, store_path, cases=cases, seed=seed, sample=sample, cluster=spec,
                                      batch_cases=batch_cases,
                                      ship_store=ship_store, timeout=cluster_timeout, progress=step,
                                      on_result=on_result)
                tally = crun.tally
            elif workers == 1:
                tally = engine.run(np.arange(cases, dtype=np.int64), seed=seed, progress=step, sample=sample)
            else:
                tally = _run_workers(engine, config, cases, workers, seed, sample, step, logs)
        finally:
            if bar is not None:
                bar.close()
        if crun is None:
            counters = {k: v - before_counters.get(k, 0) for k, v in engine.counters.snapshot().items()}
            patterns = {p: d["executions"] - before_patterns.get(p, {}).get("executions", 0)
                        for p, d in engine.pattern_stats.as_dict(all_patterns=True).items()}
            pattern_rows = engine.pattern_stats.as_dict()
        else:  # merged on the client from the batches' own deltas, by batch id
            counters = {n: crun.counters.get(n, 0) for n in engine.counters.snapshot()}
            pe, pt = crun.pattern_executions, crun.pattern_ticks
            patterns = {p: int(pe[p]) for p in range(1, 44)}
            pattern_rows = {p: {"mean_ticks": int(pt[p]) / int(pe[p])} for p in range(1, 44) if pe[p]}
        names = {p.number: p.name for p in (engine.patterns.by_number(n) for n in SUPPORTED_PATTERNS)}
        # The case records' pools: this process's, or (--cluster) the Dask workers' own, one per
        # worker, as their batches reported them (the client's pool takes no record in a cluster run).
        checks = _checks(engine, tally, counters, patterns, cases, seed,
                         pools=None if crun is None else crun.report["case_pools"],
                         arena_live_blocks=None if crun is None else crun.report["arena_live_blocks"])
        if crun is not None:
            _cluster_checks(checks, crun)
        if engine.metrics is not None:
            _metrics_checks(engine, checks, cases, patterns, workers)
        stats: dict[str, Any] = {}
        for part in engine.pm.hook.knhk_memory_stats(config=engine.config):
            stats.update(part or {})
        backend = engine.pm.hook.knhk_allocator(config=engine.config)
        simd_level = engine.pm.hook.knhk_simd_level(config=engine.config)
        report = _budgets(engine) if budgets else None
        log_figures = _check_event_log(checks, logs, tally) if logs else None
        per_pattern = []
        for p in SUPPORTED_PATTERNS:
            row = pattern_rows.get(p, {})
            per_pattern.append({"id": p, "name": names[p], "executions": int(tally.executions[p]),
                                "mean_ticks": row.get("mean_ticks", 0.0)})
        result = {
            "ok": all(c["ok"] for c in checks),
            "checks": checks,
            "leftovers_reclaimed": leftovers,
            "cases": cases, "workers": workers if crun is None else crun.report["workers"], "seed": seed,
            "cluster": crun.report if crun is not None else None,
            "seconds": tally.seconds, "cases_per_second": cases / tally.seconds if tally.seconds else 0.0,
            "events": int(tally.events.sum()), "tasks": int(tally.events[TASK]), "batches": tally.batches,
            "workflows_run": tally.workflows,
            "patterns": per_pattern,
            "counters": counters,
            "arena": _arena_figures(tally),
            "case_records": {"records": tally.case_records,
                             "pool": stats.get("pools", {}).get("cases", {}).get("stats") if crun is None else None,
                             "worker_pools": crun.report["case_pools"] if crun is not None else None},
            "event_log": log_figures,
            "event_log_note": ("none: the Dask workers may be on other machines, so a --cluster run writes no "
                               "event log and its check does not apply") if crun is not None else None,
            "store": {**built, "from": store_from, **store_figures},
            "allocator": {"backend": backend.name, "configured": config.allocator.backend,
                          "numpy_routed": bool(config.allocator.numpy),
                          "counts": stats.get("allocator", {}).get("counts")},
            "simd_level": simd_level,
            "config": {"source": config.source, "origin": config.origin},
            "budgets": report.as_dict() if report is not None else None,
            "_budget_table": _table(report) if report is not None else None,
        }
        if metrics_hook is not None:
            metrics_hook(metric_sources(engine), result)
    return result


def metric_sources(engine: Engine) -> list[Any]:
    """What the reference host exports: its metrics block (per-pattern latency
    histograms, cases per worker), its counters and pattern statistics (shared by
    every worker), and this process's allocator figures and its batch arena's
    figures as they are when this is called (gauges)."""
    from ..metrics import CountersSource, GaugeSource, PatternStatsSource

    out: list[Any] = [engine.metrics, CountersSource(engine.counters), PatternStatsSource(engine.pattern_stats)]

    def alloc(field: str) -> Any:
        def read() -> dict[tuple[str], int]:
            backend = engine.pm.hook.knhk_allocator(config=engine.config)
            return {(backend.name,): getattr(backend.stats(), field)}
        return read

    for field, what in (("live_bytes", "Bytes live in blocks of the allocator backend (this process)."),
                        ("peak_live_bytes", "Peak of live_bytes (this process)."),
                        ("allocations", "Allocations made through the backend (this process)."),
                        ("frees", "Frees made through the backend (this process).")):
        out.append(GaugeSource(f"knhk_allocator_{field}", what, alloc(field), labels=("backend",)))

    # An arena is its thread's alone: its figures are read here, in the engine's
    # thread, as they are at the end of the run (a server thread may not read them).
    arena_stats = engine.arena.stats()

    def arena(field: str) -> Any:
        return lambda: getattr(arena_stats, field)

    for field, what in (("bytes_reserved", "Bytes the batch arena holds in chunks (this process)."),
                        ("high_water", "Most bytes the batch arena has had in use (this process)."),
                        ("chunks", "Chunks the batch arena holds (this process)."),
                        ("backend_calls", "Chunk allocations and frees the arena made on its backend."),
                        ("resets", "Times the batch arena was reset (one per batch scope).")):
        out.append(GaugeSource(f"knhk_arena_{field}", what, arena(field)))
    return out


def _metrics_checks(engine: Engine, checks: list[dict[str, Any]], cases: int, patterns: dict[int, int],
                    workers: int) -> None:
    assert engine.metrics is not None
    fams, skipped = engine.metrics.snapshot()
    by = {d["name"]: rows for d, rows in fams}
    done = sum(cells[0] for _, cells in by.get("knhk_refhost_cases_completed", []))
    _check(checks, "labelled cases-completed counters add up to the cases run",
           done == cases and skipped == 0,
           f"{done} over {len(by.get('knhk_refhost_cases_completed', []))} worker label set(s) of {workers}; "
           f"cases {cases}; unreadable entries {skipped}")
    hist = {int(v[0]): sum(cells[:-1]) for v, cells in by.get("knhk_pattern_execution_seconds", [])}
    bad = [f"WCP-{p}: histogram {hist.get(p, 0)}, statistics {n}" for p, n in patterns.items()
           if n and hist.get(p, 0) != n]
    _check(checks, "per-pattern latency histograms count every pattern execution", not bad,
           "; ".join(bad) or f"{sum(hist.values())} executions in {len(hist)} pattern histograms")


def _cluster_checks(checks: list[dict[str, Any]], crun: Any) -> None:
    r = crun.report
    _check(checks, "every batch merged exactly once, by id",
           r["batches"] == r["batches_expected"],
           f"{r['batches']} of {r['batches_expected']} batches merged; {r['duplicates_dropped']} repeated results "
           "dropped; "
           f"workers lost mid-run: {', '.join(r['workers_lost']) or 'none'}")
    # A node's shared blocks hold every add its workers made: the merged batches, the repeats
    # dropped, and (only on a node that lost a worker) the adds of runs whose results died with it.
    bad, parts = [], []
    for n in r["nodes"]:
        un = n["unreported_counters"]
        if n["lost_workers"]:
            ok = n["never_negative"] and un.get("cases_completed", 0) <= un.get("cases_started", 0)
            parts.append(f"node {n['node']} ({len(n['workers'])} live worker(s), lost "
                         f"{', '.join(n['lost_workers'])}): block = merged + dropped + "
                         f"{un.get('cases_started', 0):,} cases started by runs whose results were lost")
        else:
            ok = n["exact"]
            repeats = " + dropped repeats" if any(n["dropped_counters"].values()) else ""
            parts.append(f"node {n['node']} ({len(n['workers'])} worker(s)): block = merged "
                         f"{n['merged_batches']} batch(es){repeats}" + (", exactly" if ok else ""))
        if not ok:
            bad.append(f"node {n['node']}: unreported {un}")
    for node in r.get("nodes_unread", []):
        parts.append(f"node {node}: not read (no live worker of it at the end; its blocks stay in /dev/shm)")
    _check(checks, "each node's shared counters equal its merged batches (plus the lost runs on a node that "
           "lost a worker)", not bad and bool(r["nodes"]), "; ".join(bad or parts or ["no node blocks were read"]))


def _check_event_log(checks: list[dict[str, Any]], logs: list[str], tally: RunTally) -> dict[str, Any]:
    """Reopen the event log(s) the run wrote and check their tallies against the run's."""
    t0 = time.perf_counter()
    got = tally_event_log(logs)
    seconds = time.perf_counter() - t0
    want = {"events": int(tally.events.sum()), "tasks": int(tally.events[TASK]),
            "cases_started": int(tally.events[CASE_START]), "cases_completed": int(tally.events[CASE_END]),
            # the in-memory SIMD tally of the same events: this check is about the file keeping them
            # (whether the executors' own counts agree is the pattern statistics check)
            "executions": {p: int(tally.events[p]) for p in range(1, 44) if tally.events[p]}}
    diff = [k for k in want if got[k] != want[k]]
    _check(checks, "the event log reopens with the run's tallies",
           not diff and got["distinct_cases"] == tally.cases,
           f"{got['events']:,} events in {len(logs)} file(s) reopened and verified in {seconds * 1000:.0f} ms; "
           + (f"differ: {', '.join(diff)}" if diff else
              f"events, tasks, cases started/completed and executions of {len(got['executions'])} patterns agree"))
    sizes = sum(Path(p).stat().st_size for p in logs)
    return {"paths": logs, "events": got["events"], "bytes": sizes, "reopen_seconds": seconds}


def _arena_figures(t: RunTally) -> dict[str, Any]:
    # Without the arena each array of a batch would be one malloc and one free.
    without = 2 * t.arena_allocations
    return {"allocations": t.arena_allocations, "backend_calls": t.arena_backend_calls,
            "backend_calls_without_arena": without, "saved": without - t.arena_backend_calls,
            "bytes": t.arena_bytes, "arenas": t.arenas}


def _checks(engine: Engine, tally: RunTally, counters: dict[str, int], patterns: dict[int, int], cases: int,
            seed: int, pools: dict[str, Any] | None = None,
            arena_live_blocks: int | None = None) -> list[dict[str, Any]]:
    """The checks of every run. ``pools``: a cluster run's case-record pools, the Dask
    workers' together (``cluster.report["case_pools"]``); ``arena_live_blocks``: the
    blocks the workers' batch arenas held after their batches (``cluster.report``);
    None: this process's pool and arena."""
    checks: list[dict[str, Any]] = []
    ev = tally.events
    _check(checks, "every case reached its end state",
           tally.cases == cases and tally.completed == cases and int(ev[CASE_START]) == cases
           and int(ev[CASE_END]) == cases,
           f"{cases} cases run; {tally.completed} completed every block; log: {int(ev[CASE_START])} starts, "
           f"{int(ev[CASE_END])} ends")
    _check(checks, "case counters equal the cases run",
           counters.get("cases_started") == cases and counters.get("cases_completed") == cases,
           f"cases_started {counters.get('cases_started')}, cases_completed {counters.get('cases_completed')}, "
           f"cases {cases}")
    _check(checks, "tasks_fired equals the task events in the log",
           counters.get("tasks_fired") == int(ev[TASK]),
           f"tasks_fired {counters.get('tasks_fired')}, task events {int(ev[TASK])}")
    bad = []
    for p in range(1, 44):
        a, b, c = patterns.get(p, 0), int(ev[p]), int(tally.executions[p])
        if not a == b == c:
            bad.append(f"WCP-{p}: statistics {a}, log {b}, executors {c}")
    executed = sum(int(ev[p]) for p in range(1, 44))
    _check(checks, "pattern statistics equal the pattern events in the log",
           not bad, "; ".join(bad) if bad else f"{executed} executions of {sum(1 for p in range(1, 44) if ev[p])} "
           "patterns agree three ways (statistics, SIMD tally of the log, executors)")
    _check(checks, "no case errors", counters.get("errors", 0) == 0, f"errors {counters.get('errors', 0)}")
    mismatched = []
    keys = engine.workflows.keys
    for case, events in sorted(tally.samples.items()):
        wi = workflow_choice_one(case_seed_one(seed, case), len(keys))
        want = run_case(engine.workflows.get(keys[wi]), seed, case, wi)
        if events != want:
            mismatched.append(case)
    _check(checks, "sampled cases match the one-case reference interpreter, event for event",
           not mismatched and len(tally.samples) == len(_sample(cases)),
           f"{len(tally.samples)} cases compared" + (f"; differ: {mismatched[:10]}" if mismatched else ""))
    in_use = engine.case_pool.stats().in_use if pools is None else pools["in_use"]
    where = "" if pools is None else f" (in the {pools['pools']} Dask workers' pools)"
    _check(checks, "every case had a record in the cases pool, agreeing with the log, and all were returned",
           tally.case_records == cases and tally.record_mismatches == 0 and in_use == 0,
           f"{tally.case_records} records taken, {tally.record_mismatches} batches disagreed, "
           f"{in_use} still in use{where}")
    live = engine.arena.stats().live_blocks if arena_live_blocks is None else arena_live_blocks
    whose = "" if arena_live_blocks is None else " (the Dask workers' arenas, after each batch)"
    _check(checks, "batch memory all returned to the arena",
           live == 0 and tally.arena_backend_calls < max(1, tally.arena_allocations),
           f"live blocks {live}{whose}; "
           f"{tally.arena_allocations} arena allocations took {tally.arena_backend_calls} backend calls")
    return checks


def _budgets(engine: Engine) -> Any:
    from ..budgets import Settings, run_budgets

    return run_budgets(engine.config, pm=engine.pm, settings=Settings(batches=101, py_batches=31))


def _table(report: Any) -> str:
    from ..budgets import format_table

    return format_table(report)


def _progress_bar(total: int, enabled: bool | None) -> Any:
    if enabled is False:
        return None
    from tqdm import tqdm

    # enabled=None: only on a terminal (tqdm's disable=None)
    return tqdm(total=total, desc="cases", unit="case", unit_scale=True, file=sys.stderr,
                disable=None if enabled is None else False, leave=False)


# ---------------------------------------------------------------- output

def _ns(v: float) -> str:
    return f"{v / 1000:.1f} us" if v >= 1000 else f"{v:.0f} ns"


def format_summary(r: dict[str, Any]) -> str:
    out = []
    st, al = r["store"], r["allocator"]
    out.append(f"knhk-memory demo: {r['cases']:,} cases, {r['workers']} worker(s), seed {r['seed']}")
    out.append(f"config:     {r['config']['source']}")
    out.append(f"allocator:  {al['backend']} (configured: {al['configured']}; numpy "
               f"{'routed through it' if al['numpy_routed'] else 'not routed'}); simd level {r['simd_level']}")
    built = f"built in {st['build_seconds']:.2f} s" if st["built"] else "reused"
    out.append(f"store:      {st['path']} ({st['keys']:,} definitions, {st['file_size']:,} bytes, {st['access']}, "
               f"{built}; from {st['from']})")
    out.append(f"            open {_ns(st['open_ns'])} (median of 15), lookup {_ns(st['lookup_ns'])} (median), "
               f"{st['verified_records']:,} records verified in {st['verify_seconds'] * 1000:.1f} ms")
    out.append(f"throughput: {r['cases']:,} cases in {r['seconds']:.2f} s = {r['cases_per_second']:,.0f} cases/s; "
               f"{r['events']:,} events, {r['tasks']:,} tasks, {r['batches']:,} batches over "
               f"{r['workflows_run']:,} workflows")
    a = r["arena"]
    out.append(f"arena:      {a['allocations']:,} batch arrays served with {a['backend_calls']:,} backend calls "
               f"(without the arena: {a['backend_calls_without_arena']:,}; saved {a['saved']:,})")
    cr = r.get("case_records") or {}
    pool = cr.get("pool") or {}
    wp = cr.get("worker_pools") or {}
    if pool:
        out.append(f"cases pool: {cr['records']:,} case records through a FixedPool of {pool['capacity']:,} x "
                   f"{pool['stride']} bytes (high-water {pool['high_water']:,}, failed {pool['failed']})")
    elif wp:
        out.append(f"cases pool: {cr['records']:,} case records through the Dask workers' {wp['pools']} FixedPool(s) "
                   f"of {wp['capacity']:,} x {wp['stride']} bytes (high-water {wp['high_water']:,} in one worker, "
                   f"failed {wp['failed']}, {wp['in_use']} in use after the last batches)")
    el = r.get("event_log")
    if el:
        out.append(f"event log:  {', '.join(el['paths'])} ({el['events']:,} events, {el['bytes']:,} bytes, synced; "
                   f"reopened in {el['reopen_seconds'] * 1000:.0f} ms)")
    elif r.get("event_log_note"):
        out.append(f"event log:  {r['event_log_note']}")
    cl = r.get("cluster")
    if cl:
        out.append(f"cluster:    {cl['cluster']}: {cl['workers']} worker(s), {cl['batches']:,} batches of up to "
                   f"{cl['batch_cases']:,} cases; store shipped by {cl['store_shipping']} "
                   f"(sha256 {cl['store_sha256'][:16]}..., {cl['store_size']:,} bytes)")
        out.append(f"            start {cl['start_seconds']:.2f} s, worker setup {cl['setup_seconds']:.2f} s, "
                   f"run {cl['wall_seconds']:.2f} s (busy {cl['busy_seconds']:.2f} s); overhead "
                   f"{cl['overhead_per_batch_seconds'] * 1000:.1f} ms per batch; workers lost: "
                   f"{', '.join(cl['workers_lost']) or 'none'}")
        for w in cl["per_worker"]:
            state = "" if w["alive_at_end"] else "  (lost)"
            out.append(f"  worker {w['address']:<24} pid {w['pid']!s:>7}  {w['batches']:>5,} batches "
                       f"{w['cases']:>10,} cases  busy {w['busy_seconds']:>7.2f} s  "
                       f"{w['cases_per_second']:>10,.0f} cases/s{state}")
        for n in cl["nodes"]:
            un = n["unreported_counters"].get("cases_started", 0)
            out.append(f"  node {n['node']} ({n['host']}): {len(n['workers'])} worker(s) sharing {n['blocks']}; "
                       f"{n['block_counters'].get('cases_started', 0):,} cases started in the block, "
                       f"{n['merged_counters'].get('cases_started', 0):,} in its merged batches"
                       + (f", {un:,} in runs whose results were lost" if un else "")
                       + f"; store fetched: {n['store_bytes_fetched']:,} bytes")
    out.append("pattern executions:")
    width = max((len(p["name"]) for p in r["patterns"]), default=0)
    for p in r["patterns"]:
        out.append(f"  WCP-{p['id']:<3} {p['name']:<{width}} {p['executions']:>12,}   "
                   f"mean {p['mean_ticks']:>8.1f} ticks")
    c = r["counters"]
    out.append("counters:   " + ", ".join(f"{k} {v:,}" for k, v in c.items()))
    if r.get("leftovers_reclaimed"):
        out.append(f"reclaimed at start: {len(r['leftovers_reclaimed'])} leftover shared block(s) of killed "
                   f"processes ({', '.join(r['leftovers_reclaimed'])})")
    out.append("checks:")
    for ch in r["checks"]:
        out.append(f"  [{'ok' if ch['ok'] else 'FAILED'}] {ch['check']}: {ch['detail']}")
    if r.get("_budget_table"):
        out.append("hot-path budgets (reported, not part of the checks; `knhk-memory budget` enforces them):")
        out.append(r["_budget_table"])
    npass = sum(ch["ok"] for ch in r["checks"])
    out.append(f"{npass} of {len(r['checks'])} checks passed" + ("" if r["ok"] else " -- DEMO FAILED"))
    return "\n".join(out)


def main_check(result: dict[str, Any]) -> None:
    """Raise :class:`CheckFailedError` if any check of a demo result failed."""
    failed = [f"{c['check']}: {c['detail']}" for c in result["checks"] if not c["ok"]]
    if failed:
        raise CheckFailedError(failed)

