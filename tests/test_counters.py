"""Counters and pattern statistics: exact across threads and processes, bad input refused."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import re
import threading
import time

import numpy as np
import pytest

from knhk_memory import Counters, PatternStats
from knhk_memory._core import ffi, lib
from knhk_memory.counters import PATTERNS, hot_ops
from knhk_memory.errors import (
    CounterIncrementError,
    CounterIndexError,
    CounterNameError,
    KnhkMemoryError,
    SharedBlockError,
    SharedBlockNotFoundError,
)
from knhk_memory.hotpath import default_budgets

M = 20_000


@pytest.fixture
def shared():
    c = Counters(["started", "fired", "retries", "errors"], shared=True)
    yield c
    c.close()


# ---------------------------------------------------------------- basics


def test_add_get_snapshot_reset():
    c = Counters(["a", "b", "c"])
    c.add("a")
    c.add(1, 5)
    c.add("c", -2)
    assert c.get("a") == 1 and c["b"] == 5 and c.get(2) == -2
    assert c.snapshot() == {"a": 1, "b": 5, "c": -2}
    assert c.values().tolist() == [1, 5, -2]
    c.reset()
    assert c.snapshot() == {"a": 0, "b": 0, "c": 0}
    c.add("b")
    assert c.snapshot() == {"a": 0, "b": 1, "c": 0}
    assert c.names == ("a", "b", "c") and len(c) == 3


def test_batch_add_equals_single_adds():
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 4, size=100_000)
    batch, single = Counters(list("wxyz")), Counters(list("wxyz"))
    batch.add_many(idx)
    for i in idx[:5000].tolist():
        single.add(i)
    single.add_many(idx[5000:].astype(np.uint32))
    assert batch.snapshot() == single.snapshot()
    assert batch.values().tolist() == np.bincount(idx, minlength=4).tolist()
    batch.add_many(["w", "w", "z"], n=10)
    assert batch.get("w") - single.get("w") == 20 and batch.get("z") - single.get("z") == 10
    batch.add_many(np.array([], dtype=np.int64))


# ---------------------------------------------------------------- bad input


def test_unknown_name_lists_nearest():
    c = Counters(["cases_started", "cases_finished", "tasks_fired"])
    with pytest.raises(CounterNameError, match=r"no counter named 'cases_start'; nearest: 'cases_started'"):
        c.add("cases_start")
    with pytest.raises(KeyError, match="counters: 'cases_started'"):
        c.get("nope")


def test_index_out_of_range():
    c = Counters(["a", "b"])
    with pytest.raises(CounterIndexError, match=r"counter index 2 is out of range \[0, 2\)"):
        c.add(2)
    with pytest.raises(IndexError, match=r"counter index -1 is out of range"):
        c.get(-1)
    with pytest.raises(CounterIndexError, match=r"counter index 9 \(at position 2\) is out of range \[0, 2\)"):
        c.add_many(np.array([0, 1, 9, 0]))
    with pytest.raises(CounterIndexError, match="out of range"):
        c.add_many(np.array([2**64 - 1], dtype=np.uint64))
    with pytest.raises(CounterIndexError, match=r"-3 \(at position 0\)"):
        c.add_many([-3])
    assert c.snapshot() == {"a": 0, "b": 0}  # nothing was added by the refused batches


def test_non_integer_increments():
    c = Counters(["a"])
    for bad in (1.5, "1", None, True):
        with pytest.raises(CounterIncrementError, match=r"increment must be an integer, got"):
            c.add("a", bad)
    with pytest.raises(TypeError, match="does not fit a signed 64-bit counter"):
        c.add("a", 2**63)
    with pytest.raises(CounterIncrementError, match="must be an integer array, got dtype float64"):
        c.add_many(np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="a counter is named by a string or an integer index, got float"):
        c.add(0.0)
    assert c.get("a") == 0


def test_bad_names():
    with pytest.raises(ValueError, match="repeated: 'a'"):
        Counters(["a", "b", "a"])
    with pytest.raises(TypeError, match="non-empty strings"):
        Counters(["a", ""])
    with pytest.raises(ValueError, match=r"0 counters .* out of range"):
        Counters([])


def test_closed_block_refuses():
    c = Counters(["a"])
    c.close()
    assert c.closed
    with pytest.raises(KnhkMemoryError, match="block is closed"):
        c.add("a")


def test_attach_missing_block():
    with pytest.raises(SharedBlockNotFoundError, match="shared-memory block 'knhk_no_such_block' does not exist"):
        Counters.attach("knhk_no_such_block")
    with pytest.raises(FileNotFoundError, match=r"file '/nonexistent/x.ctr' does not exist"):
        Counters.attach("/nonexistent/x.ctr")


def test_attach_foreign_block(tmp_path):
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(os.urandom(8192))
    with pytest.raises(SharedBlockError, match="not a knhk counter block: magic is 0x"):
        Counters.attach(str(foreign))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(SharedBlockError, match="is empty: not a knhk counter block"):
        Counters.attach(str(empty))
    # A real block with one byte of its names changed: the checksum catches it.
    path = tmp_path / "c.ctr"
    c = Counters(["alpha", "beta"], shared=str(path))
    data = bytearray(path.read_bytes())
    data[data.index(b"alpha")] = ord("A")
    bad = tmp_path / "bad.ctr"
    bad.write_bytes(bytes(data))
    with pytest.raises(SharedBlockError, match="checksum does not match"):
        Counters.attach(str(bad))
    with pytest.raises(SharedBlockError, match="holds Counters, not PatternStats"):
        PatternStats.attach(str(path))
    with pytest.raises(SharedBlockError, match="already exists"):
        Counters(["alpha"], shared=str(path))
    c.close()


def test_private_block_does_not_pickle():
    with pytest.raises(TypeError, match="private Counters block cannot be sent"):
        pickle.dumps(Counters(["a"]))


# ---------------------------------------------------------------- threads


def test_threads_exact():
    n_threads = 4
    c = Counters(["x", "y"])
    barrier = threading.Barrier(n_threads)

    def work():
        barrier.wait()
        for _ in range(M):
            c.add(0)
        c.add_many(np.ones(M, dtype=np.int64))

    ts = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert c.snapshot() == {"x": n_threads * M, "y": n_threads * M}
    # Exiting threads give their slots back (in their pthread destructors, which
    # may still be running just after join returns).
    deadline = time.monotonic() + 5
    while c.slots_owned() > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.slots_owned() == 0


def run_more_threads_than_slots(c, add) -> int:
    """Run ``add()`` in more threads than a block has writer slots, all alive at
    once; checks every owned slot is taken before any thread leaves (an exiting
    thread hands its slot back). Returns the number of threads."""
    n = lib.KNHK_COUNTERS_SLOTS + 8
    start, stop, leave = (threading.Barrier(n + 1) for _ in range(3))

    def work():
        start.wait()  # all alive at once, so the slots run out
        add()
        stop.wait()
        leave.wait()  # stay until the slot count is checked

    ts = [threading.Thread(target=work) for _ in range(n)]
    for t in ts:
        t.start()
    start.wait()
    stop.wait()
    assert c.slots_owned() == lib.KNHK_COUNTERS_SLOTS - 1
    leave.wait()
    for t in ts:
        t.join()
    return n


def test_more_threads_than_slots_share_the_last_slot_exactly():
    c = Counters(["x"])
    n = run_more_threads_than_slots(c, lambda: c.add_many(np.zeros(1000, dtype=np.int64)))
    assert c.get("x") == n * 1000


# ---------------------------------------------------------------- processes


def _worker(counters, m):
    for _ in range(m):
        counters.add("fired")
    counters.add_many(np.full(m, 2))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_processes_exact(shared, method):
    p_count = 3
    ctx = mp.get_context(method)
    procs = [ctx.Process(target=_worker, args=(shared, M)) for _ in range(p_count)]
    for p in procs:
        p.start()
    for _ in range(M):
        shared.add("fired")
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert shared.get("fired") == (p_count + 1) * M
    assert shared.get("retries") == p_count * M


def test_attach_by_name_in_another_process(shared, run_python):
    shared.add("errors", 3)
    code = ("from knhk_memory import Counters\n"
            f"c = Counters.attach({shared.name!r})\n"
            "c.add('errors', 4)\n"
            "print(c.snapshot()['errors'])\n")
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "7"
    assert shared.get("errors") == 7


def test_dead_process_keeps_its_counts_and_its_slot_comes_back(shared):
    pid = os.fork()
    if pid == 0:  # child: count, then die without releasing anything
        shared.add("started", 11)
        os._exit(0)
    os.waitpid(pid, 0)
    assert shared.get("started") == 11
    owned = shared.slots_owned()
    assert shared.reclaim_dead() == 1
    assert shared.slots_owned() == owned - 1
    shared.add("started")  # the slot may now be reused: the counts stay summed
    assert shared.get("started") == 12


def test_file_backed_block(tmp_path):
    path = str(tmp_path / "counts.ctr")
    with Counters(["a", "b"], shared=path) as c:
        c.add("b", 2)
        other = Counters.attach(path)
        other.add("b")
        assert c.get("b") == 3 and other.name == path
        other.close()
    assert not os.path.exists(path)  # the creator unlinks


# ---------------------------------------------------------------- pattern statistics


def test_pattern_stats_record_and_read():
    s = PatternStats()
    s.record(1, 100)
    s.record(1, 40)
    s.record_many(np.array([2, 2, 43]), np.array([5, 7, 9]))
    d = s.as_dict()
    assert set(d) == {1, 2, 43}
    assert d[1] == {"name": PATTERNS[1], "executions": 2, "total_ticks": 140, "min_ticks": 40,
                    "max_ticks": 100, "mean_ticks": 70.0}
    assert (d[2]["executions"], d[2]["min_ticks"], d[2]["max_ticks"]) == (2, 5, 7)
    assert len(s.as_dict(all_patterns=True)) == 43
    table = s.table()
    assert "Sequence" in table and "Parallel Split" in table
    s.reset()
    assert s.as_dict() == {}
    s.record(3, 1)
    assert s.as_dict()[3]["min_ticks"] == 1


def test_pattern_timer_and_decorator():
    s = PatternStats()
    with s.time(4):
        sum(range(1000))

    @s.timed(5)
    def step(x):
        return x + 1

    assert [step(i) for i in range(3)] == [1, 2, 3]
    d = s.as_dict()
    assert d[4]["executions"] == 1 and d[4]["total_ticks"] > 0
    assert d[5]["executions"] == 3 and d[5]["min_ticks"] <= d[5]["max_ticks"]
    assert PatternStats.ticks_per_second() > 1e6
    assert lib.knhk_counters_ticks() >= PatternStats.ticks() - 10**12


def test_pattern_bad_input():
    s = PatternStats()
    with pytest.raises(CounterIndexError, match=r"pattern id 44 is out of range \[1, 43\]"):
        s.record(44, 1)
    with pytest.raises(CounterIndexError, match=r"pattern id 0 is out of range"):
        s.time(0)
    with pytest.raises(TypeError, match=r"a pattern id is an integer 1..43, got str"):
        s.timed("1")
    with pytest.raises(CounterIndexError, match=r"pattern id 99 \(at position 1\)"):
        s.record_many([1, 99], [1, 1])
    with pytest.raises(CounterIncrementError, match="ticks must be >= 0, got -1"):
        s.record(1, -1)
    with pytest.raises(CounterIncrementError, match="negative value -5"):
        s.record_many([1], [-5])
    with pytest.raises(ValueError, match="differ in length: 2 and 1"):
        s.record_many([1, 2], [1])
    assert s.as_dict() == {}


def test_pattern_stats_threads_exact():
    s = PatternStats()
    pids = np.arange(1, 44).repeat(100)

    def work():
        s.record_many(pids, np.ones_like(pids))

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    d = s.as_dict()
    assert all(d[p]["executions"] == 400 and d[p]["total_ticks"] == 400 for p in range(1, 44))


# ---------------------------------------------------------------- native surface


def test_native_calls_directly():
    c = Counters(["a", "b"])
    h = c._handle
    assert lib.knhk_counters_count(h) == 2
    assert lib.knhk_counters_flavor(h) == lib.KNHK_COUNTERS_FLAVOR_SUM
    assert lib.knhk_counters_add(h, 5, 1) == lib.KNHK_ERR_INVALID
    assert lib.knhk_counters_get(h, 5) == 0
    assert lib.knhk_counters_pattern_record(h, 1, 1) == lib.KNHK_ERR_STATE
    assert lib.knhk_counters_layout_size(lib.KNHK_COUNTERS_FLAVOR_SUM, 0, 1) == 0
    assert lib.knhk_counters_layout_size(9, 1, 2) == 0
    buf = ffi.new("int64_t[1]")
    assert lib.knhk_counters_snapshot(h, buf, 1) == lib.KNHK_ERR_INVALID
    # Formatting refuses bad names and too little memory; opening refuses zeroes.
    size = lib.knhk_counters_layout_size(lib.KNHK_COUNTERS_FLAVOR_SUM, 2, 4)
    mem = np.zeros(size + lib.KNHK_CACHE_LINE, dtype=np.uint8)
    off = (-mem.ctypes.data) % lib.KNHK_CACHE_LINE
    p = ffi.cast("char *", mem.ctypes.data + off)
    assert lib.knhk_counters_format(p, size, lib.KNHK_COUNTERS_FLAVOR_SUM, 2, b"a\0b", 3) == lib.KNHK_ERR_INVALID
    assert lib.knhk_counters_format(p, size - 1, lib.KNHK_COUNTERS_FLAVOR_SUM, 2, b"a\0b\0", 4) == lib.KNHK_ERR_INVALID
    out = ffi.new("knhk_counters **")
    assert lib.knhk_counters_open(p, size, out) == lib.KNHK_ERR_INVALID
    assert lib.knhk_counters_format(p, size, lib.KNHK_COUNTERS_FLAVOR_SUM, 2, b"a\0b\0", 4) == lib.KNHK_OK
    assert lib.knhk_counters_format(p, size, lib.KNHK_COUNTERS_FLAVOR_SUM, 2, b"a\0b\0", 4) == lib.KNHK_ERR_STATE
    assert lib.knhk_counters_open(p, size - 1, out) == lib.KNHK_ERR_INVALID
    assert lib.knhk_counters_open(p, size, out) == lib.KNHK_OK
    assert lib.knhk_counters_add_indices(out[0], ffi.new("int64_t[]", [1, 1]), 2, 3) == lib.KNHK_OK
    assert lib.knhk_counters_get(out[0], 1) == 6
    lib.knhk_counters_close(out[0])
    ps = PatternStats()
    raw = ffi.new("uint64_t[4]")
    assert lib.knhk_counters_pattern_snapshot(ps._handle, raw, 4) == lib.KNHK_ERR_INVALID
    assert lib.knhk_counters_pattern_record_many(ps._handle, ffi.new("int64_t[]", [1]), ffi.new("uint64_t[]", [5]),
                                                 1) == lib.KNHK_OK
    assert lib.knhk_counters_pattern_stop(ps._handle, 1, lib.knhk_counters_ticks()) == lib.KNHK_OK
    assert ps.as_dict()[1]["executions"] == 2


def test_hot_op_runs_the_real_add():
    op = hot_ops()[0]
    assert op.name == "counter_add" and default_budgets()[op.name].budget == 8
    ctx, cleanup = op.setup()
    op.fn(ctx, 1000)
    lib.knhk_counters_hotop_add(ctx, 24)
    assert lib.knhk_counters_get(ffi.cast("knhk_counters *", ctx), 0) == 1024
    cleanup()


def test_false_sharing_bench_is_exact():
    elapsed = ffi.new("uint64_t *")
    for padded in (0, 1):
        for rmw in (0, 1):
            assert lib.knhk_counters_bench_false_sharing(10_000, padded, rmw, elapsed) == lib.KNHK_OK
            assert elapsed[0] > 0


# ---------------------------------------------------------------- config, hooks, plugin


def _engine(mapping):
    from knhk_memory import get_plugin_manager, load_config

    pm = get_plugin_manager(autoload=True)
    config = load_config(mapping=mapping)
    pm.hook.knhk_configure(config=config)
    return pm, config


def test_hooks_hand_out_configured_counters():
    pm, config = _engine({"counters": {"names": ["started", "done"]}})
    try:
        counters = pm.hook.knhk_counters(config=config)
        stats = pm.hook.knhk_pattern_stats(config=config)
        assert isinstance(counters, Counters) and counters.names == ("started", "done")
        assert not counters.shared
        counters.add("started", 2)
        stats.record(1, 10)
        merged = {}
        for part in pm.hook.knhk_memory_stats(config=config):
            merged.update(part)
        assert merged["counters"]["values"] == {"started": 2, "done": 0}
        assert merged["counters"]["patterns"][1]["executions"] == 1
    finally:
        pm.hook.knhk_unconfigure(config=config)
    assert counters.closed and stats.closed


def test_hooks_shared_counters_and_no_pattern_stats(tmp_path):
    path = str(tmp_path / "engine.ctr")
    pm, config = _engine({"counters": {"shared": True, "shared_name": path, "pattern_stats": False}})
    try:
        counters = pm.hook.knhk_counters(config=config)
        assert counters.name == path
        Counters.attach(path).add("errors", 5)
        assert counters.get("errors") == 5
        assert pm.hook.knhk_pattern_stats(config=config) is None
    finally:
        pm.hook.knhk_unconfigure(config=config)


def test_config_rejects_bad_counter_settings(tmp_path):
    from knhk_memory import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"counters.names: names must be unique; repeated: 'a'"):
        load_config(mapping={"counters": {"names": ["a", "a"]}})
    with pytest.raises(ConfigError, match=r"counters.names: every name must be a non-empty string, got 3"):
        load_config(mapping={"counters": {"names": ["a", 3]}})
    with pytest.raises(ConfigError, match=r"counters.shared: expected a boolean"):
        load_config(mapping={"counters": {"shared": "yes"}})
    path = tmp_path / "taken.ctr"
    path.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"counters.shared_name: a shared block named .* already exists"):
        _engine({"counters": {"shared": True, "shared_name": str(path)}})


@pytest.mark.parametrize("bad", [5, 1.5, b"x", ""])
def test_shared_of_a_wrong_type_names_what_is_accepted(bad):
    # A second new-user trial: os.fspath's bare "expected str, bytes or os.PathLike object".
    with pytest.raises(TypeError, match=r"shared must be False, True, a shared-memory name \(str\) or a file path, "
                                        rf"got {re.escape(repr(bad))}"):
        Counters(["a"], shared=bad)
    with pytest.raises(TypeError, match=rf"attach needs a shared-memory name \(str\) or a file path, got "
                                        rf"{re.escape(repr(bad))}"):
        Counters.attach(bad)


def test_shared_path_in_a_missing_directory_or_a_directory_is_named(tmp_path):
    from knhk_memory.errors import SharedBlockError, SharedBlockNotFoundError

    missing = tmp_path / "nope" / "c.knhk"
    want = (f"cannot create the counter block {re.escape(repr(str(missing)))}: the directory "
            f"{re.escape(repr(str(missing.parent)))} does not exist")
    with pytest.raises(SharedBlockNotFoundError, match=want):
        Counters(["a"], shared=str(missing))
    # a directory: named, and never "rm" suggested for it (the trial got "remove it (rm /tmp)")
    with pytest.raises(SharedBlockError, match=rf"{re.escape(repr(str(tmp_path)))} is a directory: a file-backed "
                                               r"counter block needs a file path in it") as info:
        Counters(["a"], shared=str(tmp_path))
    assert "rm " not in str(info.value)


def test_add_many_refuses_more_than_one_dimension_and_adds_nothing():
    # A second trial: a 2-D array was silently flattened.
    c = Counters(["a", "b"])
    with pytest.raises(ValueError, match=r"counter indices must be one-dimensional, shape \(k,\); got shape \(1, 2\)"):
        c.add_many(np.array([[0, 1]]))
    assert c.get("a") == c.get("b") == 0
    c.add_many(np.array([0, 1, 1]))
    assert (c.get("a"), c.get("b")) == (1, 2)
