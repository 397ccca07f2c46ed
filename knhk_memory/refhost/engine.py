"""The reference host: a small workflow engine that runs cases on the memory plugin.

It is the example an engine author reads, not the product. What it does with
each memory service:

- the plugin manager comes from :func:`knhk_memory.get_plugin_manager`, which
  loads the ``knhk.plugins`` entry points (the memory plugin among them); the
  host's own plugin registers its pattern executors in
  ``knhk_register_executors``, and :func:`knhk_memory.start_registries` freezes
  the pattern registry;
- workflow definitions come from the memory-mapped workflow store
  (``knhk_workflow_store``), read zero-copy and compiled once into the
  ``compiled_workflows`` resource of the global resource registry;
- each batch of cases (the cases of one workflow, up to ``batch_size``) runs
  inside an arena scope (``knhk_arena``): every numpy array of the batch, its
  event log included, comes from the arena, which is reset after the batch;
- cases started and completed, and tasks fired, go to the cache-aligned
  counters (``knhk_counters``), pattern executions and their ticks to the
  per-pattern statistics (``knhk_pattern_stats``);
- the batch's event log is tallied by the SIMD kernels
  (:func:`knhk_memory.simd.histogram`, :func:`~knhk_memory.simd.count_eq`);
- each case of a batch has a fixed-size record (:data:`CASE_RECORD`: case
  number, workflow, blocks completed, events, done) in the ``cases``
  :class:`~knhk_memory.pools.FixedPool` (``knhk_pool``, ``[pools.cases]``),
  taken in one C call at the start of the batch and given back at its end;
- with ``event_log=PATH`` every event goes to a persistent
  :class:`~knhk_memory.mmapvec.MmapVec` of :data:`EVENT_RECORD` (synced at the
  end of each run), which :func:`tally_event_log` reads back;
- the allocator backend is whatever ``[allocator]`` in the config file says.

In several processes (see :mod:`.demo`), each worker runs an Engine that
attaches to the parent's shared counter blocks (``counters_from``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import simd
from ..config import Config, load_config
from ..counters import Counters, PatternStats
from ..errors import HostError, StoreError, StoreKeyError
from ..hookspecs import hookimpl
from ..host import get_plugin_manager
from ..metrics import Metrics, PatternHistograms
from ..mmapvec import MmapVec
from ..registry import start_registries
from .executors import CASE_END, CASE_START, EVENT_KINDS, EXECUTORS, TASK, BlockEvents
from .workflows import Workflow, case_seeds, decision, parse_workflow, workflow_choice

__all__ = ["Engine", "HostPlugin", "RunTally", "CountMeter", "REQUIRED_COUNTERS", "DEFAULT_BATCH_SIZE", "CASE_RECORD",
           "EVENT_RECORD", "CASE_POOL", "tally_event_log"]

REQUIRED_COUNTERS = ("cases_started", "cases_completed", "tasks_fired", "errors")
DEFAULT_BATCH_SIZE = 4096
PATTERN_SLOTS = 44  # index = pattern id, 0 unused
# A case's record in the ``cases`` pool while its batch runs (24 bytes: a 32-byte size class).
CASE_RECORD = np.dtype([("case", "<u8"), ("workflow", "<u4"), ("blocks", "<u4"), ("events", "<u4"),
                        ("done", "u1")], align=True)
# One event of the persistent log: the kind (see .executors), its task or detail, the case number.
EVENT_RECORD = np.dtype([("kind", "u1"), ("task", "<u4"), ("case", "<u8")])
CASE_POOL = "cases"


class HostPlugin:
    """The host's built-in plugin: registers one executor per supported pattern."""

    @hookimpl
    def knhk_register_executors(self, config: Config, registry: Any) -> None:
        for number, cls in EXECUTORS.items():
            registry.register_executor(number, cls())


@dataclass
class RunTally:
    """What a run did, summed over batches (and over workers, with :meth:`merge`).

    ``events`` counts the event log's kinds (index = kind, see
    :mod:`.executors`); ``executions`` the pattern executions the executors
    reported (index = pattern id). Both are kept apart from the counters so
    the three can be checked against each other.
    """

    cases: int = 0
    completed: int = 0
    batches: int = 0
    workflows: int = 0
    events: np.ndarray = field(default_factory=lambda: np.zeros(EVENT_KINDS, dtype=np.int64))
    executions: np.ndarray = field(default_factory=lambda: np.zeros(PATTERN_SLOTS, dtype=np.int64))
    seconds: float = 0.0
    arena_allocations: int = 0
    arena_backend_calls: int = 0
    arena_bytes: int = 0
    arenas: int = 1
    case_records: int = 0       # records taken from the cases pool (one per case run)
    record_mismatches: int = 0  # batches whose records disagreed with the log (a check, never expected)
    samples: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    def merge(self, other: RunTally) -> None:
        self.cases += other.cases
        self.completed += other.completed
        self.batches += other.batches
        self.workflows += other.workflows
        self.events += other.events
        self.executions += other.executions
        self.seconds = max(self.seconds, other.seconds)
        self.arena_allocations += other.arena_allocations
        self.arena_backend_calls += other.arena_backend_calls
        self.arena_bytes += other.arena_bytes
        self.arenas += other.arenas
        self.case_records += other.case_records
        self.record_mismatches += other.record_mismatches
        self.samples.update(other.samples)

    def as_dict(self) -> dict[str, Any]:
        return {"cases": self.cases, "completed": self.completed, "batches": self.batches,
                "workflows": self.workflows, "seconds": self.seconds,
                "events": {int(k): int(v) for k, v in enumerate(self.events) if v},
                "executions": {int(p): int(v) for p, v in enumerate(self.executions) if v},
                "arena": {"allocations": self.arena_allocations, "backend_calls": self.arena_backend_calls,
                          "bytes": self.arena_bytes, "arenas": self.arenas},
                "case_records": self.case_records}


class CountMeter:
    """What one engine added to its counters and pattern statistics while an
    :meth:`Engine.metered` block ran, exact, whoever else counts into the same
    blocks (a block shared by the workers of a Dask node, or by ``--workers``
    processes).

    ``counters``: int64, one per counter name (:attr:`names` order);
    ``pattern_executions`` and ``pattern_ticks``: int64, index = WCP pattern id
    (1..43), executions and their total ticks as recorded in the pattern
    statistics block.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.counters = np.zeros(len(self.names), dtype=np.int64)
        self.pattern_executions = np.zeros(PATTERN_SLOTS, dtype=np.int64)
        self.pattern_ticks = np.zeros(PATTERN_SLOTS, dtype=np.int64)

    def counter_dict(self) -> dict[str, int]:
        """``{counter name: amount added}`` for every counter."""
        return {n: int(v) for n, v in zip(self.names, self.counters)}


class _CompiledWorkflows:
    """The ``compiled_workflows`` resource: definitions read from the store, checked once."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.keys = sorted(k.decode() for k in store.keys())  # noqa: SIM118 - a WorkflowStore has no __iter__
        self._cache: dict[str, Workflow] = {}

    def get(self, key: str) -> Workflow:
        wf = self._cache.get(key)
        if wf is None:
            try:
                view = self.store[key]
            except StoreKeyError:
                raise HostError(f"workflow {key!r} is not in the store {self.store.path}") from None
            wf = self._cache[key] = parse_workflow(view, key)
        return wf

    def close(self) -> None:
        self._cache.clear()


class Engine:
    """A workflow engine over the memory plugin.

    :param config: A :class:`~knhk_memory.Config`, a config file path, or None
        for the usual lookup (:func:`knhk_memory.load_config`).
    :param store: A workflow store path that overrides ``[store] path``.
    :param plugins: Extra plugins to register beside the entry points.
    :param counters_from: ``(counters name, pattern stats name)`` of shared
        blocks another process made: this engine counts into those.
    :param metrics: False: no metrics block; True: the plugin's
        (``knhk_metrics``, made as ``[metrics]`` says); a name: attach to the one
        another process made. The engine records per-pattern latency
        histograms (``knhk_pattern_execution_seconds{pattern}``) and cases
        completed per worker (``knhk_refhost_cases_completed_total{worker}``).
    :param batch_size: Most cases run as one batch.
    :param arena_scopes: Run each batch in an arena scope (the point of the
        host); False runs batches on the ordinary allocator, for comparisons.
    :param event_log: A file to write every event to (an :class:`MmapVec` of
        :data:`EVENT_RECORD`, emptied first, synced after each :meth:`run`);
        None: no log.
    """

    def __init__(self, config: Config | str | os.PathLike[str] | None = None, *,
                 store: str | os.PathLike[str] | None = None, plugins: Sequence[Any] = (),
                 counters_from: tuple[str, str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 arena_scopes: bool = True, metrics: bool | str = False,
                 event_log: str | os.PathLike[str] | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise HostError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.arena_scopes = bool(arena_scopes)
        if not isinstance(config, Config):
            config = load_config(config)
        if store is not None:
            config = config.replace(store={"path": os.fspath(store)})
        if counters_from is not None:  # count into another process's blocks, make none here
            config = config.replace(counters={"shared": False})
        if not config.store.path:
            raise HostError(f"no workflow store: set [store] path in {config.source} or pass store=PATH")
        missing = [n for n in REQUIRED_COUNTERS if n not in config.counters.names]
        if missing:
            raise HostError(f"the reference host counts into the counters {', '.join(REQUIRED_COUNTERS)}; "
                            f"[counters] names in {config.source} is {config.counters.names!r}, which lacks "
                            f"{', '.join(missing)}")
        if not config.counters.pattern_stats:
            raise HostError(f"the reference host records per-pattern statistics; [counters] pattern_stats "
                            f"is false in {config.source}; set it to true")
        self.config = config
        self.host_plugin = HostPlugin()
        self.pm = get_plugin_manager([self.host_plugin, *plugins])
        self.pm.hook.knhk_configure(config=config)
        self._configured = True
        self._attached: list[Any] = []
        self._meter: CountMeter | None = None
        self.event_log: MmapVec | None = None
        try:
            self.patterns, self.resources = start_registries(self.pm, config)
            self.store = self.pm.hook.knhk_workflow_store(config=config)
            if counters_from is None:
                self.counters: Counters = self.pm.hook.knhk_counters(config=config)
                self.pattern_stats: PatternStats = self.pm.hook.knhk_pattern_stats(config=config)
            else:
                self.counters = Counters.attach(counters_from[0])
                self._attached.append(self.counters)
                self.pattern_stats = PatternStats.attach(counters_from[1])
                self._attached.append(self.pattern_stats)
            self._idx = {n: self.counters.index(n) for n in REQUIRED_COUNTERS}
            self.resources.register("compiled_workflows", lambda: _CompiledWorkflows(self.store))
            self.workflows: _CompiledWorkflows = self.resources.get("compiled_workflows")
            if not self.workflows.keys:
                raise HostError(f"the workflow store {self.store.path} holds no definitions")
            self.arena = self.pm.hook.knhk_arena(config=config, name="reference-host batches")
            self._arena_thread = threading.get_ident()
            self.case_pool = self._case_pool(config)
            recs = self.case_pool.records(CASE_RECORD)
            # one view per field, made once: the batch fills them by block number
            self._rec = {name: recs[name] for name in CASE_RECORD.names or ()}
            if event_log is not None:
                self.event_log = MmapVec(event_log, EVENT_RECORD, mode="w", capacity=1 << 16)
            self.executors = {p: self.patterns.executor(p) for p in EXECUTORS}
            self.metrics: Metrics | None = None
            self._done_child: Any = None
            if metrics is True:  # the memory plugin's block; it closes it in knhk_unconfigure
                self.metrics = self.pm.hook.knhk_metrics(config=config)
            elif isinstance(metrics, str):
                self.metrics = Metrics.attach(metrics)
                self._attached.append(self.metrics)
            elif metrics is not False:
                raise HostError(f"metrics must be False, True or a metrics block name, got {metrics!r}")
            if self.metrics is not None:
                self._lat = PatternHistograms(self.metrics, help="Time of one pattern execution (a block's "
                                              "time shared evenly among its executions), by WCP pattern id.")
                self._cases_done = self.metrics.counter(
                    "knhk_refhost_cases_completed", "Cases run to their end, by worker.", labels=("worker",))
        except BaseException:
            self.close()
            raise

    def bind_thread(self) -> None:
        """Move the engine's batch arena to the calling thread, and apply the
        configured numpy routing in it. An arena belongs to the thread that
        made it; a host whose batches run on another thread than the one that
        built the engine (a Dask worker's task thread) calls this first.
        Not thread-safe: one thread runs the engine at a time."""
        from ..allocator import apply_numpy_handler

        me = threading.get_ident()
        if self._arena_thread == me:
            return
        old = self.arena
        self.arena = self.pm.hook.knhk_arena(config=self.config, name="reference-host batches")
        self._arena_thread = me
        old.close()  # allowed from any thread; a batch ran in it only on its own thread
        # The case records' FixedPool is its thread's alone too: one of the same
        # shape and placement (`describe()` gives the config form back) for this thread.
        old_pool = self.case_pool
        if old_pool.kind == "FixedPool":
            self.case_pool = type(old_pool)(
                old_pool.block_size, old_pool.capacity, align=old_pool.align, name=old_pool.name,
                config_key=old_pool.config_key,
                numa=old_pool.placement.describe() if old_pool.placement is not None else None)
            recs = self.case_pool.records(CASE_RECORD)
            self._rec = {name: recs[name] for name in CASE_RECORD.names or ()}
            self._own_case_pool = True
        apply_numpy_handler()

    def _case_pool(self, config: Config) -> Any:
        pool = self.pm.hook.knhk_pool(config=config, name=CASE_POOL)
        if pool is None:
            raise HostError(f"no [pools.{CASE_POOL}] pool: the reference host keeps its case records there; "
                            f"add a [pools.{CASE_POOL}] table to {config.source}")
        key = f"pools.{CASE_POOL}"
        if pool.block_size < CASE_RECORD.itemsize:
            raise HostError(f"{key}.block_size in {config.source} is {pool.block_size}; a case record needs "
                            f"{CASE_RECORD.itemsize} bytes (set it to {CASE_RECORD.itemsize} or more)")
        if pool.capacity < self.batch_size:
            raise HostError(f"{key}.capacity in {config.source} is {pool.capacity}; a batch of "
                            f"{self.batch_size} cases needs that many records (raise it, or lower batch_size)")
        return pool

    # ---------------------------------------------------------------- running

    def run(self, case_numbers: np.ndarray | Sequence[int] | range, *, seed: int = 1,
            progress: Callable[[int], None] | None = None, sample: set[int] | frozenset[int] = frozenset(),
            partition: tuple[int, int] = (0, 1)) -> RunTally:
        """Run the given cases (numbered; each number picks its workflow and
        path from ``seed``) in batches, one workflow per batch. ``progress(n)``
        is called after each batch with its size. The events of the cases in
        ``sample`` are kept in the tally, for checking against
        :func:`.reference.run_case`. ``partition=(w, n)`` runs only the cases
        whose workflow's index is w modulo n: n workers, each with its own
        share of the workflows, run every case once and split no batch."""
        cases = np.asarray(case_numbers, dtype=np.int64)
        if cases.ndim != 1:
            raise HostError(f"case numbers must be a 1-D sequence, got shape {cases.shape}")
        if cases.size and int(cases.min()) < 0:
            raise HostError(f"case numbers must be >= 0, got {int(cases.min())}")
        w, n = partition
        if not (isinstance(w, int) and isinstance(n, int) and 0 <= w < n):
            raise HostError(f"partition must be (w, n) with 0 <= w < n, got {partition!r}")
        self._done_child = self._cases_done.labels(str(w)) if self.metrics is not None else None
        tally = RunTally()
        t0 = time.perf_counter()
        start_stats = self.arena.stats()
        keys = self.workflows.keys
        choice = workflow_choice(case_seeds(seed, cases), len(keys))
        if n > 1:
            mine = choice % n == w
            cases, choice = cases[mine], choice[mine]
        order = np.argsort(choice, kind="stable")
        by_wf, cases = choice[order], cases[order]
        bounds = np.flatnonzero(np.diff(by_wf)) + 1
        starts = np.concatenate([[0], bounds]).tolist()
        ends = np.concatenate([bounds, [cases.size]]).tolist() if cases.size else []
        for lo, hi in zip(starts, ends):
            wf_index = int(by_wf[lo])
            wf = self.workflows.get(keys[wf_index])
            tally.workflows += 1
            for b in range(lo, hi, self.batch_size):
                chunk = cases[b:min(hi, b + self.batch_size)]
                self._run_batch(wf, wf_index, chunk, seed, tally, sample)
                if progress is not None:
                    progress(int(chunk.size))
        if self.event_log is not None:
            self.event_log.sync()  # part of the run: its events are durable when it returns
        tally.seconds = time.perf_counter() - t0
        end_stats = self.arena.stats()
        tally.arena_allocations = end_stats.allocations - start_stats.allocations
        tally.arena_backend_calls = end_stats.backend_calls - start_stats.backend_calls
        tally.arena_bytes = end_stats.bytes_requested - start_stats.bytes_requested
        tally.arenas = 1
        return tally

    def _run_batch(self, wf: Workflow, wf_index: int, case_numbers: np.ndarray, seed: int, tally: RunTally,
                   sample: set[int] | frozenset[int]) -> None:
        if not self.arena_scopes:
            self._batch(wf, wf_index, case_numbers, seed, tally, sample)
            return
        try:
            with self.arena.scope():
                self._batch(wf, wf_index, case_numbers, seed, tally, sample)
        except BaseException:
            self._count(self._idx["errors"], 1)
            raise
        finally:
            self._reset_arena()

    def _count(self, index: int, n: int) -> None:
        self.counters.add(index, n)
        m = self._meter
        if m is not None:  # after the add: what the block did not take is not metered
            m.counters[index] += n

    @contextlib.contextmanager
    def metered(self) -> Iterator[CountMeter]:
        """``with engine.metered() as m: engine.run(...)``: ``m`` (a
        :class:`CountMeter`) gets exactly what this engine adds to its counters
        and pattern statistics inside the block. The blocks may be shared with
        other processes (``counters_from``), so their own before/after values
        would include the others' adds; the meter does not.

        :raises HostError: a metered block is already open on this engine."""
        if self._meter is not None:
            raise HostError("this engine is already inside a metered() block; they do not nest")
        m = self._meter = CountMeter(self.counters.names)
        try:
            yield m
        finally:
            self._meter = None

    def _reset_arena(self) -> None:
        # A batch array something still holds (a traceback, a caller's
        # reference) pins only its own chunk; the rest is reused.
        self.arena.reset()

    def _batch(self, wf: Workflow, wf_index: int, case_numbers: np.ndarray, seed: int, tally: RunTally,
               sample: set[int] | frozenset[int]) -> None:
        rows = int(case_numbers.size)
        pool = self.case_pool
        if hasattr(pool, "alloc_indices"):  # a FixedPool: the block numbers in one C call
            slots = pool.alloc_indices(rows)
        else:  # a lockfree or threadlocal [pools.cases]
            slots = np.array([pool.index(pool.alloc()) for _ in range(rows)], dtype=np.int64)
        try:
            self._batch_with_records(wf, wf_index, case_numbers, seed, tally, sample, slots)
        finally:
            if hasattr(pool, "free_indices"):
                pool.free_indices(slots)
            else:
                for i in slots.tolist():
                    pool.free(pool.address(i))

    def _batch_with_records(self, wf: Workflow, wf_index: int, case_numbers: np.ndarray, seed: int,
                            tally: RunTally, sample: set[int] | frozenset[int], slots: np.ndarray) -> None:
        rows = int(case_numbers.size)
        rec = self._rec
        rec["case"][slots] = case_numbers
        rec["workflow"][slots] = wf_index
        seeds = case_seeds(seed, case_numbers)
        capacity = rows * _events_per_case(wf)
        kinds = np.empty(capacity, dtype=np.uint8)
        tasks = np.empty(capacity, dtype=np.uint32)
        where = np.empty(capacity, dtype=np.uint32)
        row = np.arange(rows, dtype=np.uint32)
        kinds[:rows] = CASE_START
        tasks[:rows] = wf_index
        where[:rows] = row
        pos = rows
        self._count(self._idx["cases_started"], rows)
        position = np.zeros(rows, dtype=np.uint32)
        executions = tally.executions
        ticks = self.pattern_stats.ticks
        recorded: list[tuple[int, int, int]] = []  # (pattern, executions, ticks each)
        tasks_fired = 0
        for i, block in enumerate(wf.blocks):
            h = decision(seeds, i)
            t0 = ticks()
            if i:  # the hand-over from the previous block: WCP-1
                kinds[pos:pos + rows] = 1
                tasks[pos:pos + rows] = block.first_task
                where[pos:pos + rows] = row
                pos += rows
            if block.kind == "split":
                active, detail = self.executors[block.split].activate(block, h)
                ev: BlockEvents = self.executors[block.join].complete(block, h, active, detail)
            else:
                ev = self.executors[block.patterns[0]].run(block, h)
            n = ev.kind.size
            kinds[pos:pos + n] = ev.kind
            tasks[pos:pos + n] = ev.task
            where[pos:pos + n] = ev.case
            pos += n
            elapsed = ticks() - t0
            execs = dict(ev.executions)
            if i:
                execs[1] = execs.get(1, 0) + rows
            # the block's ticks, shared evenly among its executions
            share = elapsed // max(1, sum(execs.values()))
            for p, c in execs.items():
                executions[p] += c
                if c:
                    recorded.append((p, c, share))
            tasks_fired += ev.tasks
            position += 1
        self._record(recorded)
        self._count(self._idx["tasks_fired"], tasks_fired)
        done = simd.count_eq(position, len(wf.blocks))
        kinds[pos:pos + rows] = CASE_END
        tasks[pos:pos + rows] = position
        where[pos:pos + rows] = row
        pos += rows
        log = kinds[:pos]
        tally.events += simd.histogram(log, EVENT_KINDS)
        # The cases' records: blocks completed, events logged, done. Read back, they must
        # still name this batch's cases (no block was handed out twice) and agree with the log.
        rec["blocks"][slots] = position
        rec["events"][slots] = np.bincount(where[:pos], minlength=rows)
        done_flags = position == len(wf.blocks)
        rec["done"][slots] = done_flags
        if not np.array_equal(rec["case"][slots], case_numbers) or int(rec["done"][slots].sum()) != done:
            tally.record_mismatches += 1
        tally.case_records += rows
        if self.event_log is not None:
            self.event_log.extend_columns(kind=log, task=tasks[:pos], case=case_numbers[where[:pos]])
        tally.completed += done
        self._count(self._idx["cases_completed"], done)
        if self._done_child is not None:
            self._done_child.add(done)
        tally.cases += rows
        tally.batches += 1
        if sample:
            self._keep_samples(case_numbers, kinds[:pos], tasks[:pos], where[:pos], sample, tally)

    def _record(self, recorded: list[tuple[int, int, int]]) -> None:
        """The batch's pattern executions, in one C call."""
        if not recorded:
            return
        p, c, t = (np.array(col, dtype=np.int64) for col in zip(*recorded))
        self.pattern_stats.record_many(np.repeat(p, c), np.repeat(t, c).astype(np.uint64))
        m = self._meter
        if m is not None:
            np.add.at(m.pattern_executions, p, c)
            np.add.at(m.pattern_ticks, p, c * t)
        if self.metrics is not None:
            for pattern, count, ticks in recorded:
                self._lat.record(pattern, ticks, count)

    @staticmethod
    def _keep_samples(case_numbers: np.ndarray, kinds: np.ndarray, tasks: np.ndarray, where: np.ndarray,
                      sample: set[int] | frozenset[int], tally: RunTally) -> None:
        rows = [r for r, c in enumerate(case_numbers.tolist()) if c in sample]
        if not rows:
            return
        # the log is block-major; a stable sort by row gives each case's events in order
        keep = np.isin(where, np.asarray(rows, dtype=np.uint32))
        w, k, t = where[keep], kinds[keep], tasks[keep]
        order = np.argsort(w, kind="stable")
        w, k, t = w[order].tolist(), k[order].tolist(), t[order].tolist()
        numbers = case_numbers.tolist()
        for row, kind, task in zip(w, k, t):
            tally.samples.setdefault(numbers[row], []).append((kind, task))

    # ---------------------------------------------------------------- shutting down

    def close(self) -> None:
        """Sync and close the event log, close attached blocks, then unconfigure the
        plugins (which closes the store, the counters it made, the pools and the
        resources). Idempotent."""
        log, self.event_log = getattr(self, "event_log", None), None
        if log is not None:
            log.close()
        for block in self._attached:
            block.close()
        self._attached = []
        if getattr(self, "_own_case_pool", False):  # bind_thread's pool (the plugin closes its own)
            self.case_pool.close()
            self._own_case_pool = False
        if self._configured:
            self._configured = False
            arena = getattr(self, "arena", None)
            if arena is not None and not arena.closed:
                arena.close()
            self.pm.hook.knhk_unconfigure(config=self.config)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tally_event_log(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Reopen event log file(s) written by :class:`Engine` (read-only, checksum verified) and tally
    them as a run reports itself: events, tasks, cases started and completed, executions per
    pattern. Raises :class:`~knhk_memory.errors.StoreError` (naming the file) for a damaged log."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    events = np.zeros(EVENT_KINDS, dtype=np.int64)
    cases: set[int] = set()
    records = 0
    for path in paths:
        with MmapVec(path, mode="r") as log:
            if log.dtype != EVENT_RECORD:
                raise StoreError(f"holds {log.dtype} records, not reference-host events ({EVENT_RECORD})",
                                 path=path, problem="dtype")
            log.verify()
            arr = log.array()
            records += len(arr)
            events += np.bincount(np.ascontiguousarray(arr["kind"]), minlength=EVENT_KINDS)[:EVENT_KINDS]
            starts = arr["case"][arr["kind"] == CASE_START]
            cases.update(np.unique(starts).tolist())
    return {"events": records, "tasks": int(events[TASK]), "cases_started": int(events[CASE_START]),
            "cases_completed": int(events[CASE_END]), "distinct_cases": len(cases),
            "executions": {p: int(events[p]) for p in range(1, 44) if events[p]}}


def _events_per_case(wf: Workflow) -> int:
    """The most events one case of ``wf`` can log (start, end, hand-overs, blocks)."""
    n = 2 + len(wf.blocks) - 1
    for b in wf.blocks:
        if b.kind == "sequence":
            n += 2 * b.tasks - 1
        elif b.kind == "cycle":
            n += b.max_iterations * (2 * b.body - 1) + b.max_iterations - 1
        elif b.kind == "instances":
            n += b.instances + 1
        elif b.join == 8:
            n += 1 + 3 * b.branches
        else:
            n += b.branches + 3
    return n
