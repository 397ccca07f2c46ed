"""Counter writer handles: exact across threads, kept after their thread exits, misuse refused."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from knhk_memory import Counters, CounterWriter
from knhk_memory._core import ffi, last_error, lib
from knhk_memory.counters import hot_ops
from knhk_memory.errors import (
    CounterIncrementError,
    CounterIndexError,
    CounterNameError,
    CounterWriterError,
    KnhkMemoryError,
)
from knhk_memory.hotpath import default_budgets

from .test_counters import run_more_threads_than_slots

M = 20_000


def _in_thread(fn):
    """Run fn in a new thread; return its result or raise its exception."""
    box: dict[str, object] = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def _wait_slots(c: Counters, n: int) -> None:
    # An exiting thread gives its slot back in its pthread destructor, which
    # may still be running just after join returns.
    deadline = time.monotonic() + 5
    while c.slots_owned() != n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.slots_owned() == n


def test_writer_threads_exact():
    n_threads = 4
    c = Counters(["x", "y"])
    barrier = threading.Barrier(n_threads)

    def work():
        w = c.writer()
        barrier.wait()
        for _ in range(M):
            w.add(0)
            w.add("y", 2)
        c.add("x")  # the plain add of the same thread lands in the same slot

    ts = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert c.snapshot() == {"x": n_threads * (M + 1), "y": n_threads * 2 * M}
    _wait_slots(c, 0)


def test_writer_is_the_threads_slot():
    c = Counters(["x"])
    w1, w2 = c.writer(), c.writer()
    assert isinstance(w1, CounterWriter) and w1.counters is c
    assert w1._w == w2._w  # one writer per thread and block
    c.add("x")
    w1.add("x", 4)
    assert c.slots_owned() == 1 and c.get("x") == 5
    w1.add(0, -2)
    assert c.get("x") == 3


def test_counts_kept_after_thread_exit_and_dead_writer_refused():
    c = Counters(["x"])

    def work():
        w = c.writer()
        for _ in range(1000):
            w.add("x")
        return w

    w = _in_thread(work)
    _wait_slots(c, 0)  # the slot went back ...
    assert c.get("x") == 1000  # ... and the counts stayed
    with pytest.raises(CounterWriterError, match=r"dead: its thread exited"):
        w.add("x")
    # A new thread (which may get the exited thread's thread pointer) is refused too.
    with pytest.raises(CounterWriterError, match=r"dead|belongs to thread 0x"):
        _in_thread(lambda: w.add("x"))
    assert c.get("x") == 1000
    # New threads take slots again and count on.
    _in_thread(lambda: c.writer().add("x", 5))
    assert c.get("x") == 1005


def test_writer_from_another_thread_refused():
    c = Counters(["x"])
    w = c.writer()
    with pytest.raises(CounterWriterError, match=r"belongs to thread 0x[0-9a-f]+, not to the calling thread 0x"):
        _in_thread(lambda: w.add("x"))
    assert c.get("x") == 0
    w.add("x")  # still fine in its own thread
    assert c.get("x") == 1


def test_writer_after_close_refused():
    c = Counters(["x"])
    w = c.writer()
    w.add("x")
    c.close()
    with pytest.raises(KnhkMemoryError, match="block is closed; its writers are dead"):
        w.add("x")


def test_native_writer_of_a_closed_block_is_dead_not_freed():
    # In C, knhk_counters_close kills the block's writers but keeps their memory,
    # so a stale pointer is refused instead of being a use-after-free (ASan run).
    size = lib.knhk_counters_layout_size(lib.KNHK_COUNTERS_FLAVOR_SUM, 1, 2)
    mem = np.zeros(size + lib.KNHK_CACHE_LINE, dtype=np.uint8)
    p = ffi.cast("char *", mem.ctypes.data + (-mem.ctypes.data) % lib.KNHK_CACHE_LINE)
    assert lib.knhk_counters_format(p, size, lib.KNHK_COUNTERS_FLAVOR_SUM, 1, b"a\0", 2) == lib.KNHK_OK
    h = ffi.new("knhk_counters **")
    assert lib.knhk_counters_open(p, size, h) == lib.KNHK_OK
    w = ffi.new("knhk_counters_writer **")
    assert lib.knhk_counters_writer_get(h[0], w) == lib.KNHK_OK
    assert lib.knhk_counters_writer_add(w[0], 0, 7) == lib.KNHK_OK
    assert lib.knhk_counters_writer_add(w[0], 1, 1) == lib.KNHK_ERR_INVALID
    assert "counter index 1 is out of range [0, 1)" in last_error()
    assert lib.knhk_counters_get(h[0], 0) == 7
    lib.knhk_counters_close(h[0])
    assert lib.knhk_counters_writer_add(w[0], 0, 1) == lib.KNHK_ERR_STATE
    assert "counter writer is dead" in last_error()
    assert lib.knhk_counters_open(p, size, h) == lib.KNHK_OK  # the count stayed in the block
    assert lib.knhk_counters_get(h[0], 0) == 7 and lib.knhk_counters_slots_owned(h[0]) == 0
    lib.knhk_counters_close(h[0])


def test_native_writer_get_bad_arguments():
    out = ffi.new("knhk_counters_writer **")
    assert lib.knhk_counters_writer_get(ffi.NULL, out) == lib.KNHK_ERR_INVALID
    assert "must not be NULL" in last_error()
    c = Counters(["x"])
    assert lib.knhk_counters_writer_get(c._handle, ffi.NULL) == lib.KNHK_ERR_INVALID


def test_writer_on_pattern_block_refuses_sum_adds():
    from knhk_memory import PatternStats

    ps = PatternStats()
    w = ffi.new("knhk_counters_writer **")
    assert lib.knhk_counters_writer_get(ps._handle, w) == lib.KNHK_OK
    assert lib.knhk_counters_writer_add(w[0], 0, 1) == lib.KNHK_ERR_STATE
    assert "holds pattern statistics, not sum counters" in last_error()


def test_writer_bad_input():
    c = Counters(["started", "fired"])
    w = c.writer()
    with pytest.raises(CounterNameError, match=r"no counter named 'fird'; nearest: 'fired'"):
        w.add("fird")
    with pytest.raises(CounterIndexError, match=r"counter index 2 is out of range \[0, 2\)"):
        w.add(2)
    with pytest.raises(CounterIndexError, match=r"counter index -1 is out of range"):
        w.add(-1)
    with pytest.raises(TypeError, match="a counter is named by a string or an integer index, got float"):
        w.add(1.0)
    with pytest.raises(CounterIncrementError, match=r"increment must be an integer, got float 1.5"):
        w.add(0, 1.5)
    with pytest.raises(CounterIncrementError, match="does not fit a signed 64-bit counter"):
        w.add(0, 2**63)
    w.add(np.int64(1), np.int32(3))
    assert c.snapshot() == {"started": 0, "fired": 3}


def test_writer_in_forked_child_is_dead_and_child_makes_its_own():
    c = Counters(["x"], shared=True)
    w = c.writer()
    w.add("x")
    pid = os.fork()
    if pid == 0:  # child: the parent's writer is dead here; a new one counts
        code = 0
        try:
            try:
                w.add("x")
                code = 3
            except CounterWriterError as exc:
                code = 0 if "dead" in str(exc) else 4
            mine = c.writer()
            mine.add("x", 10)
            c.add("x", 100)
        except BaseException:
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    w.add("x")  # the parent's writer is still its own
    assert c.get("x") == 112
    c.close()


def test_writers_beyond_the_slots_share_the_last_slot_exactly():
    c = Counters(["x"])

    def add():
        w = c.writer()
        for _ in range(500):
            w.add(0)

    n = run_more_threads_than_slots(c, add)
    assert c.get("x") == n * 500
    _wait_slots(c, 0)


def test_writer_memory_is_reused_across_thread_generations():
    # Threads come and go; their dead writers are reused, so the count stays exact
    # and the slots all come back.
    c = Counters(["x"])
    for _ in range(5):
        ts = [threading.Thread(target=lambda: [c.writer().add(0) for _ in range(100)]) for _ in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert c.get("x") == 5 * 6 * 100
    _wait_slots(c, 0)


def test_hot_ops_run_the_real_adds():
    ops = {op.name: op for op in hot_ops()}
    assert set(ops) == {"counter_add", "counter_add_call", "counter_add_lookup"}
    assert default_budgets()["counter_add"].budget == 8
    ctx, cleanup = ops["counter_add"].setup()
    for name in ("counter_add", "counter_add_call", "counter_add_lookup"):
        ops[name].fn(ctx, 1000)
    lib.knhk_counters_hotop_writer_add(ctx, 10)
    lib.knhk_counters_hotop_writer_add_call(ctx, 10)
    lib.knhk_counters_hotop_add(ctx, 10)
    assert lib.knhk_counters_get(ffi.cast("knhk_counters *", ctx), 0) == 3030
    cleanup()
