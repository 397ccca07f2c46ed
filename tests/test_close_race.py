"""close() from one thread while others use the object (issue 22, item 1), for every object
that hands out views or pointers except the WorkflowStore (tests/test_store*.py): arenas,
the pools, MmapVec, allocator blocks, counter and pattern blocks with their writers, and
the metrics block with its families, children and exposition.

Each case runs the one harness (tests/close_race.py): reader threads loop on an operation
while the main thread closes; every reader must stop on the object's named closed error
(message containing "closed"), every value read before must be right, and nothing may
hang or crash. Which rule each object follows for memory already handed out (kept mapped
until the last view goes, or close refused while views live) is in its docstring and in
docs/reliability.md; the cases below check those views after the close too.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest

from knhk_memory._core import ffi, lib
from knhk_memory.allocator import get_backend
from knhk_memory.arena import Arena, ThreadLocalArena
from knhk_memory.counters import Counters, PatternStats
from knhk_memory.errors import (
    ArenaClosedError,
    BlockFreedError,
    CounterBlockClosedError,
    PoolClosedError,
    StoreClosedError,
)
from knhk_memory.metrics import Metrics, PatternHistograms, generate
from knhk_memory.mmapvec import MmapVec
from knhk_memory.pools import FixedPool, LockFreePool, ThreadLocalPool

from .close_race import close_race

# Rounds per case: 30 in CI (the module runs in ~15 s); KNHK_CLOSE_RACE_ROUNDS=300 for the long
# run of docs/reliability.md.
ROUNDS = int(os.environ.get("KNHK_CLOSE_RACE_ROUNDS", "30"))


# ---------------------------------------------------------------- arenas
#
# An Arena belongs to the thread that made it, so the reader (one thread) makes it on its
# first call and the main thread closes it: the close another thread makes while the owner
# allocates, resets or reads statistics.

class _Owned:
    """An object made by the first reader call, on the reader's thread."""

    def __init__(self, make):
        self._make = make
        self.obj = None
        self.views: list = []

    def get(self):
        if self.obj is None:
            self.obj = self._make()
        return self.obj


def _arena_case(op, *, readers=1):
    def open_obj():
        return _Owned(lambda: Arena(4096, max_chunk_size=1 << 16))

    def close(h):
        while h.obj is None:  # the harness closes after the first read: never spins
            pass
        h.obj.close()

    return open_obj, op, close


def _keep_and_check(h, view, stamp):
    """Every view handed out keeps its bytes, also after the close (checked on every call)."""
    view[:8] = stamp.to_bytes(8, "little")
    h.views.append((view, stamp))
    if len(h.views) > 64:
        h.views.pop(0)
    return all(int.from_bytes(bytes(v[:8]), "little") == s for v, s in h.views)


def _arena_alloc(h):
    a = h.get()
    ok = _keep_and_check(h, h.views[-1][0], h.views[-1][1]) if h.views else True  # old views still readable
    return ok and _keep_and_check(h, a.alloc(64), len(h.views) + 1)


def _arena_alloc_slow(h):
    a = h.get()
    return _keep_and_check(h, a.alloc(np.int64(48), 64), len(h.views) + 7)  # numpy int: the cffi path


def _arena_array(h):
    arr = h.get().array((4, 4), "float64")
    arr[...] = 3.0
    h.views.append((arr, 0))
    if len(h.views) > 64:
        h.views.pop(0)
    return all(float(x.sum()) == 48.0 for x, _ in h.views)


def _arena_reset(h):
    a = h.get()
    a.alloc(128)
    a.reset()
    return True


def _arena_stats(h):
    a = h.get()
    a.alloc(32)
    s = a.stats()
    return s.allocations >= 1 and s.live_blocks >= 0


def _arena_scope(h):
    a = h.get()
    with a.scope():
        x = np.ones(256)
    return float(x.sum()) == 256.0


@pytest.mark.parametrize("op", [_arena_alloc, _arena_alloc_slow, _arena_array, _arena_reset, _arena_stats,
                                _arena_scope], ids=lambda f: f.__name__)
def test_arena_close_race(op):
    open_obj, read, close = _arena_case(op)
    report = close_race(open_obj, read, close, closed_errors=(ArenaClosedError,), rounds=ROUNDS, readers=1)
    assert report.rounds == ROUNDS and report.closed_seen == ROUNDS


@pytest.mark.parametrize("closer", ["owner", "other thread"])
def test_arena_closed_inside_a_scope_sends_numpy_to_the_fallback(closer):
    """A scope whose arena closes under it (the owner, or another thread between the scope's
    checks and the allocation) allocates through the previous handler: never MemoryError."""
    a = Arena(4096, max_chunk_size=8192)
    with a.scope():
        before = np.ones(64)
        if closer == "owner":
            a.close()
        else:
            t = threading.Thread(target=a.close)
            t.start()
            t.join()
        big = np.ones(100_000)  # past any chunk: the arena's slow path, which sees the close
        small = np.ones(8)
    assert float(big.sum()) == 100_000.0 and float(small.sum()) == 8.0 and float(before.sum()) == 64.0
    with pytest.raises(ArenaClosedError, match="closed"):
        a.alloc(8)


def test_thread_local_arena_close_reaches_every_thread():
    """ThreadLocalArena.close() from the main thread: each reader thread's own arena is
    closed at its next use (on its thread, so its memory goes back), which then raises."""
    def read(tla):
        view = tla.alloc(64)
        view[:4] = b"knhk"
        return bytes(view[:4]) == b"knhk"

    report = close_race(lambda: ThreadLocalArena(4096), read, lambda t: t.close(),
                        closed_errors=(ArenaClosedError,), rounds=ROUNDS, readers=3)
    assert report.closed_seen == 3 * ROUNDS


# ---------------------------------------------------------------- pools

def _pool_cycle(pool):
    addr = pool.alloc()
    stamp = threading.get_ident() & 0xFFFFFFFF
    view = pool.view(addr)
    view[:4] = stamp.to_bytes(4, "little")
    ok = int.from_bytes(bytes(view[:4]), "little") == stamp  # no other thread holds the block
    del view
    pool.free(addr)
    return ok


def _pool_many(pool):
    addrs = pool.alloc_many(4)
    ok = len(set(addrs.tolist())) == 4
    pool.free_many(addrs)
    return ok


def _pool_stats(pool):
    pool.free(pool.alloc())  # stats() after close gives the figures at close: no error to stop on
    s = pool.stats()
    return 0 <= s.in_use <= s.capacity


@pytest.mark.parametrize("cls", [LockFreePool, ThreadLocalPool])
@pytest.mark.parametrize("op", [_pool_cycle, _pool_stats], ids=lambda f: f.__name__)
def test_shared_pool_close_race(cls, op):
    report = close_race(lambda: cls(64, 1024), op, lambda p: p.close(), closed_errors=(PoolClosedError,),
                        rounds=ROUNDS, readers=3)
    assert report.closed_seen == 3 * ROUNDS


@pytest.mark.parametrize("op", [_pool_cycle, _pool_many, _pool_stats], ids=lambda f: f.__name__)
def test_fixed_pool_close_race(op):
    """FixedPool belongs to its thread: the reader makes it, the main thread closes it."""
    def read(h):
        return op(h.get())

    def close(h):
        while h.obj is None:
            pass
        h.obj.close()

    report = close_race(lambda: _Owned(lambda: FixedPool(64, 64)), read, close,
                        closed_errors=(PoolClosedError,), rounds=ROUNDS, readers=1)
    assert report.closed_seen == ROUNDS


def test_pool_counts_exact_after_close_race():
    """Blocks handed out before the close stay counted: stats() after the race counts
    every alloc() that returned (also ones that ran while close() did), and freeing one
    after the close is refused with the named error."""
    pools: list[LockFreePool] = []
    got: list[int] = []

    def open_obj():
        pools.append(LockFreePool(32, 1 << 16))
        return pools[-1]

    def read(pool):
        if len(got) > 1000:  # stay well inside the capacity however long the close takes to come
            addr = got.pop()
            try:
                pool.free(addr)
            except PoolClosedError:
                got.append(addr)  # not freed: still in use
                raise
        got.append(pool.alloc())  # list.append and pop are atomic: no lock needed
        return True

    for seed in range(5):
        pools.clear()
        got.clear()
        close_race(open_obj, read, lambda p: p.close(), closed_errors=(PoolClosedError,), rounds=1, readers=3,
                   max_reads=300, seed=seed)
        stats = pools[0].stats()
        assert stats.closed and len(set(got)) == len(got)
        assert stats.in_use == stats.allocations - stats.frees == len(got)
        with pytest.raises(PoolClosedError, match="closed"):
            pools[0].free(got[0])


# ---------------------------------------------------------------- MmapVec

@pytest.fixture
def vec_path(tmp_path):
    return tmp_path / "v.vec"


def _vec_open(path):
    def open_obj():
        v = MmapVec(path, "i8", mode="w", capacity=64)
        v.extend(np.arange(100, dtype="i8"))
        return v
    return open_obj


def _vec_read(v):
    a = v.array()
    return a.shape[0] >= 100 and int(a[99]) == 99 and int(v[5]) == 5


def _vec_verify(v):
    v.verify()
    return True


def _vec_append(v):
    v.append(7)
    return True


@pytest.mark.parametrize("op", [_vec_read, _vec_verify, _vec_append], ids=lambda f: f.__name__)
def test_mmapvec_close_race(vec_path, op):
    report = close_race(_vec_open(vec_path), op, lambda v: v.close(), closed_errors=(StoreClosedError,),
                        rounds=ROUNDS, readers=1 if op is _vec_append else 3)  # one writer thread
    assert report.rounds == ROUNDS


def test_mmapvec_appends_race_close_lose_nothing(vec_path):
    """Every append that returned is in the file after close (the close waits for it)."""
    done = [0]

    def open_obj():
        done[0] = 0
        return MmapVec(vec_path, "i8", mode="w", capacity=16)

    def read(v):
        v.append(1)
        done[0] += 1  # one appending thread
        return True

    for seed in range(8):
        close_race(open_obj, read, lambda v: v.close(), closed_errors=(StoreClosedError,), rounds=1, readers=1,
                   seed=seed)
        with MmapVec(vec_path, mode="r") as r:
            assert len(r) == r.synced_length == done[0]
            assert int(r.array().sum()) == done[0]


def test_mmapvec_closed_by_several_threads_at_once(vec_path):
    """Threads closing one vector at the same moment: every close returns, the records are
    synced once, and the file lock is released once (the next writer opens it). Before the
    close lock, the second close found the mapping gone mid-way (AttributeError) and two
    closes could close one descriptor twice."""
    for rnd in range(40):
        v = MmapVec(vec_path, "i8", mode="w", capacity=16)
        v.extend(np.arange(rnd + 1, dtype="i8"))
        gate = threading.Barrier(4)
        errors: list[BaseException] = []

        def closer(v: MmapVec, gate: threading.Barrier, errors: list[BaseException]) -> None:
            gate.wait()
            try:
                v.close()
            except BaseException as exc:  # the test reports every kind
                errors.append(exc)

        threads = [threading.Thread(target=closer, args=(v, gate, errors)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not errors and v.closed, (rnd, errors)
        with MmapVec(vec_path, mode="r") as r:
            assert len(r) == r.synced_length == rnd + 1


class _PausingVec(MmapVec):
    """An MmapVec whose next growth stops before it maps the larger file, until released."""

    pause: tuple[threading.Event, threading.Event] | None = None

    def _map(self, size):
        p, self.pause = self.pause, None
        if p is not None:
            entered, release = p
            entered.set()
            release.wait(10)
        super()._map(size)


def test_mmapvec_growth_during_a_close_gives_no_room_back(vec_path):
    """An append that grows the file while close() waits for it must not leave room behind:
    the writer's next append (fast path: one compare with the room) would otherwise write
    past the close's sync and be lost. It raises StoreClosedError; the file has every
    append that returned."""
    v = _PausingVec(vec_path, "i8", mode="w", capacity=16)
    v.extend(np.arange(16, dtype="i8"))  # full: the next append grows
    entered, release = threading.Event(), threading.Event()
    v.pause = (entered, release)
    outcome: list[object] = []

    def writer():
        v.append(16)  # grows, pausing in _map
        outcome.append("first")
        try:
            v.append(17)
            outcome.append("second")
        except StoreClosedError as exc:
            outcome.append(exc)

    w = threading.Thread(target=writer)
    w.start()
    assert entered.wait(10)
    closer = threading.Thread(target=v.close)
    closer.start()
    while not v._closing:  # close() has refused new writes and waits for the append
        threading.Event().wait(1e-4)
    release.set()
    w.join(10)
    closer.join(10)
    assert outcome[0] == "first"
    assert isinstance(outcome[1], StoreClosedError) and "closed" in str(outcome[1])
    with MmapVec(vec_path, mode="r") as r:
        assert r.array().tolist() == list(range(17))


# ---------------------------------------------------------------- allocator blocks

def _free(block):
    """Block.free() refuses while a view is alive (BufferError): retry until the readers'
    momentary views are gone, as a caller that owns the block would."""
    while True:
        try:
            block.free()
            return
        except BufferError:
            threading.Event().wait(1e-5)


def _block_open():
    b = get_backend("system").malloc(256)
    b.view()[:] = bytes(range(256))
    return b


def _block_view(b):
    v = b.view()
    try:
        return bytes(v[:4]) == b"\x00\x01\x02\x03"
    finally:
        v.release()


def _block_meta(b):
    return b.size == 256 and b.usable_size() >= 256 and b.address > 0


def test_block_usable_size_is_the_cores():
    """usable_size() runs knhk_usable_size in C under the GIL (so free() cannot come
    between the check and the call): the same figure as the core's function."""
    b = get_backend("system").malloc(100)
    assert b.usable_size() == lib.knhk_usable_size(b.backend.cdata, ffi.cast("void *", b.address)) >= 100
    b.free()
    with pytest.raises(BlockFreedError, match="closed: it has been freed"):
        b.usable_size()


@pytest.mark.parametrize("op", [_block_view, _block_meta], ids=lambda f: f.__name__)
def test_block_free_race(op):
    report = close_race(_block_open, op, _free, closed_errors=(BlockFreedError,), rounds=ROUNDS, readers=2)
    assert report.closed_seen == 2 * ROUNDS


# ---------------------------------------------------------------- counter blocks

def _counters_open(shared):
    return lambda: Counters(["a", "b", "c"], shared=shared)


def _counters_add_get(c):
    c.add("a")
    c.add(1, 2)
    return c.get("a") >= 1 and c["b"] >= 2


def _counters_bulk(c):
    c.add_many(np.array([0, 1, 2]))
    v = c.values()
    return v.shape == (3,) and int(v.min()) >= 1 and set(c.snapshot()) == {"a", "b", "c"}


def _counters_slow(c):
    c.add(np.int64(1), np.int64(3))  # the Python paths
    return c.get(np.int64(1)) >= 3


def _counters_admin(c):
    c.get_and_reset()
    c.reset()
    return c.slots_owned() >= 0 and c.reclaim_dead() >= 0


def _counters_writer(c):
    c.writer().add("c", 5)
    return True


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shm"])
@pytest.mark.parametrize("op", [_counters_add_get, _counters_bulk, _counters_slow, _counters_admin,
                                _counters_writer], ids=lambda f: f.__name__)
def test_counters_close_race(shared, op):
    report = close_race(_counters_open(shared), op, lambda c: c.close(),
                        closed_errors=(CounterBlockClosedError,), rounds=ROUNDS // 2 if shared else ROUNDS,
                        readers=3)
    assert report.closed_seen == report.rounds * 3


def test_counter_writer_made_before_close():
    """A writer made before the close: its add raises the named error afterwards."""
    def open_obj():
        return [Counters(["x"]), {}]

    def read(state):
        c, writers = state
        w = writers.get(threading.get_ident())
        if w is None:
            w = writers[threading.get_ident()] = c.writer()
        w.add("x")
        w.add(np.int64(0), 1)  # the slow path too
        return True

    close_race(open_obj, read, lambda s: s[0].close(), closed_errors=(CounterBlockClosedError,), rounds=ROUNDS)


def _patterns_record(p):
    p.record(2, 100)
    p.record(np.int64(3), 50)
    with p.time(4):
        pass
    return p.as_dict()[2]["executions"] >= 1


def _patterns_bulk(p):
    p.record_many([1, 2], [10, 20])
    return "pattern" in p.table()


@pytest.mark.parametrize("op", [_patterns_record, _patterns_bulk], ids=lambda f: f.__name__)
def test_pattern_stats_close_race(op):
    report = close_race(PatternStats, op, lambda p: p.close(), closed_errors=(CounterBlockClosedError,),
                        rounds=ROUNDS, readers=3)
    assert report.closed_seen == 3 * ROUNDS


# ---------------------------------------------------------------- metrics

def _metrics_open(shared=False):
    def open_obj():
        m = Metrics(shared=shared, max_label_sets=64, max_cells=1024)
        m.counter("jobs", "Jobs.", labels=("kind",)).labels("a").add(1)
        m.histogram("lat", "Latency.", buckets=(0.1, 1.0)).observe(0.5)
        return m
    return open_obj


def _metrics_child(m):
    fam = m.counter("jobs", "Jobs.", labels=("kind",))
    child = fam.labels("a")
    child.add()
    child.add(np.int64(2))  # the slow path
    return child.get() >= 3


def _metrics_histogram(m):
    h = m.histogram("lat", "Latency.", buckets=(0.1, 1.0)).labels()
    h.observe(0.05)
    h.observe(np.float32(0.5))
    h.observe_many(2.0, 3)
    got = h.get()
    return got["count"] >= 5 and math.isfinite(got["sum"])


def _metrics_new_sets(m):
    fam = m.counter("jobs", "Jobs.", labels=("kind",))
    for k in ("b", "c", "d"):
        fam.labels(k).add()
    return m.usage()["label_sets"] >= 3


def _metrics_scrape(m):
    text = generate(m)
    fams, skipped = m.snapshot()
    return "jobs_total" in text and skipped == 0 and len(fams) == 2 and m.slots_owned() >= 0


def _metrics_patterns(m):
    ph = PatternHistograms(m)
    ph.record(2, 1000)
    with ph.time(3):
        pass
    return ph.child(2).get()["count"] >= 1


@pytest.mark.parametrize("op", [_metrics_child, _metrics_histogram, _metrics_new_sets, _metrics_scrape,
                                _metrics_patterns], ids=lambda f: f.__name__)
def test_metrics_close_race(op):
    report = close_race(_metrics_open(), op, lambda m: m.close(), closed_errors=(CounterBlockClosedError,),
                        rounds=ROUNDS, readers=3)
    assert report.closed_seen == 3 * ROUNDS


def test_shared_metrics_close_race():
    report = close_race(_metrics_open(shared=True), _metrics_scrape, lambda m: m.close(),
                        closed_errors=(CounterBlockClosedError,), rounds=ROUNDS // 2, readers=3)
    assert report.closed_seen == 3 * (ROUNDS // 2)
