"""The overflow rule (issue 16, input 3), read-and-reset (input 4) and names (input 7)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from knhk_memory import Counters
from knhk_memory._core import lib
from knhk_memory.errors import CounterOverflowError

LIMIT = 2**56
assert LIMIT == lib.KNHK_COUNTERS_SLOT_LIMIT


# ---------------------------------------------------------------- overflow


def test_issue_input_add_max_int64_then_one():
    # Before: 2**63-1 then 1 wrapped silently to -2**63.
    c = Counters(["events"])
    with pytest.raises(CounterOverflowError, match=r"adding to a counter \(counter 'events'\): adding "
                                                   r"9223372036854775807 to counter 0 would take this thread's slot "
                                                   r"from 0 past \+-72057594037927936 .*nothing was added"):
        c.add("events", 2**63 - 1)
    assert c.get("events") == 0
    c.add("events", LIMIT)  # the edge itself is accepted
    with pytest.raises(CounterOverflowError, match=r"from 72057594037927936 past"):
        c.add("events", 1)
    assert c.get("events") == LIMIT
    assert isinstance(CounterOverflowError("x"), OverflowError)


def test_negative_edge():
    c = Counters(["g"])
    c.add("g", -LIMIT)
    with pytest.raises(CounterOverflowError, match=r"adding -1 .* from -72057594037927936 past"):
        c.add("g", -1)
    with pytest.raises(CounterOverflowError):
        c.add("g", -(2**63))
    assert c.get("g") == -LIMIT
    c.add("g", 2**63 - 1 - LIMIT + LIMIT - (2**63 - 1))  # 0: fine anywhere
    c.add("g", 2 * LIMIT)
    assert c.get("g") == LIMIT


def test_issue_input_add_many_2_to_the_62_twice_changes_nothing():
    # Before: add_many(..., n=2**62) twice wrapped the same way.
    c = Counters(["a", "b"])
    with pytest.raises(CounterOverflowError, match=r"adding to counters: adding 4611686018427387904"):
        c.add_many(np.array([0, 1]), n=2**62)
    assert c.snapshot() == {"a": 0, "b": 0}
    c.add_many(np.array([1]), n=2**55)
    # The batch's third add of counter 0 would pass the limit: the first two are undone.
    with pytest.raises(CounterOverflowError):
        c.add_many(np.array([0, 1, 0, 0]), n=2**55)
    assert c.snapshot() == {"a": 0, "b": 2**55}
    c.add_many(np.array([0, 0]), n=2**55)  # exactly the limit
    assert c.get("a") == LIMIT


def test_writer_add_overflow():
    c = Counters(["a"])
    w = c.writer()
    w.add("a", LIMIT)
    with pytest.raises(CounterOverflowError, match=r"adding through a counter writer \(counter 'a'\)"):
        w.add("a", 1)
    assert c.get("a") == LIMIT


def test_sums_over_slots_beyond_one_slot_stay_exact():
    # Several threads each at the slot limit: the total (and a reset baseline
    # of it) is exact in int64, no read wraps.
    c = Counters(["a"])
    c.add("a", 0)  # the main thread claims its slot first
    gate = threading.Barrier(8)

    def fill() -> None:
        gate.wait()  # all alive at once: eight different slots
        c.add("a", LIMIT)
        gate.wait()

    threads = [threading.Thread(target=fill) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c.add("a", LIMIT)
    assert c.get("a") == 9 * LIMIT
    assert c.get_and_reset() == {"a": 9 * LIMIT}
    c.add("a", -2 * LIMIT)  # the main thread's slot goes to -LIMIT
    assert c.get("a") == -2 * LIMIT
    assert int(c.values()[0]) == -2 * LIMIT


def _wait_thread_gone(native_id: int | None, timeout_s: float = 10.0) -> None:
    task = Path(f"/proc/self/task/{native_id}")
    end = time.monotonic() + timeout_s
    while task.exists():
        assert time.monotonic() < end, f"thread {native_id} still running {timeout_s}s after join()"
        time.sleep(0.001)


def test_a_slot_keeps_its_count_for_its_next_owner():
    # The limit is per slot, across the threads that owned it in turn: a
    # thread that exits leaves its count in its slot (nothing is lost), and
    # the next thread to take the slot continues from it.
    c = Counters(["a"])
    t = threading.Thread(target=c.add, args=("a", LIMIT))
    t.start()
    t.join()
    # join() returns when Python is done with the thread; the slot goes back in the
    # thread's pthread-key destructor, which runs after that, just before the OS thread
    # ends. Wait for the OS thread itself, or the next thread may find the slot still
    # owned and take another (seen under ASan, which slows thread exit down).
    _wait_thread_gone(t.native_id)
    errors: list[BaseException] = []

    def again() -> None:
        try:
            c.add("a", 1)
        except CounterOverflowError as exc:
            errors.append(exc)

    t = threading.Thread(target=again)
    t.start()
    t.join()
    assert len(errors) == 1 and "from 72057594037927936 past" in str(errors[0])
    assert c.get("a") == LIMIT


def test_shared_slot_refuses_without_changing(monkeypatch):
    # Threads beyond the 63 owned slots share the last slot (atomic adds): the rule holds there too.
    c = Counters(["a"])
    gate = threading.Barrier(70)
    errors: list[BaseException] = []

    def one() -> None:
        c.add("a", 1)
        gate.wait()  # all 70 alive at once, so at least 7 share the last slot
        try:
            c.add("a", LIMIT)
        except CounterOverflowError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(70)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = 70 - len(errors)
    assert c.get("a") == 70 + accepted * LIMIT
    assert errors  # the sharers: the first one's add took the shared slot to the limit


# ---------------------------------------------------------------- read and reset


def test_get_and_reset_returns_and_rebases():
    c = Counters(["a", "b"])
    c.add("a", 5)
    c.add("b", -2)
    assert c.get_and_reset() == {"a": 5, "b": -2}
    assert c.snapshot() == {"a": 0, "b": 0}
    c.add("a")
    assert c.get_and_reset() == {"a": 1, "b": 0}


def test_issue_input_exporter_loses_nothing_with_concurrent_adders():
    # Before: get() then reset() lost 0 to 2.4M of 4M adds. Adders run in
    # threads (the C calls release the GIL); two exporters read-and-reset at
    # once: added == everything returned + what remains, exactly.
    c = Counters(["events", "other"])
    per, adders = 20_000, 4
    stop = threading.Event()
    returned = [0, 0]

    def add() -> None:
        w = c.writer()
        idx = np.zeros(100, dtype=np.int64)
        for _ in range(per // 200):
            for _ in range(100):
                w.add("events")
            c.add_many(idx)

    def export(k: int) -> None:
        while not stop.is_set():
            returned[k] += c.get_and_reset()["events"]

    ex = [threading.Thread(target=export, args=(k,)) for k in range(2)]
    ad = [threading.Thread(target=add) for _ in range(adders)]
    for t in ex + ad:
        t.start()
    for t in ad:
        t.join()
    stop.set()
    for t in ex:
        t.join()
    assert sum(returned) + c.get("events") == adders * per
    assert c.get("other") == 0


def _proc_adder(block: Counters, n: int) -> None:
    idx = np.zeros(1000, dtype=np.int64)
    for _ in range(n // 1000):
        block.add_many(idx)


def test_exporter_exact_across_processes():
    c = Counters(["events"], shared=True)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_proc_adder, args=(c, 200_000)) for _ in range(3)]
    for p in procs:
        p.start()
    returned = 0
    while any(p.is_alive() for p in procs):
        returned += c.get_and_reset()["events"]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert returned + c.get("events") == 3 * 200_000
    c.close()


# ---------------------------------------------------------------- names (input 7)


def test_issue_input_a_str_of_names_is_refused():
    # Before: Counters("abc") made three counters 'a', 'b', 'c'.
    with pytest.raises(TypeError, match=r"counter names must be a list or tuple of str, got str 'abc' "
                                        r"\(did you mean \['abc'\]\?\)"):
        Counters("abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"counter names must be a list or tuple of str, got bytes b'ab'"):
        Counters(b"ab")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"counter names must be a list or tuple of str, got set"):
        Counters({"a", "b"})  # type: ignore[arg-type]  # unordered: indices would vary
    with pytest.raises(TypeError, match=r"counter names must be non-empty strings without NUL, got 1"):
        Counters(["a", 1])  # type: ignore[list-item]
    assert Counters(("a", "b")).names == ("a", "b")


def test_counter_exactness_script_threads_x_processes():
    # The script docs/reliability.md quotes, sized down: 2 processes x 2 threads.
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "counter_exactness.py"), "--runs", "2",
                           "--processes", "2", "--threads", "2", "--adds", "50000", "--exporters", "get_and_reset"],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["added_per_run"] == 200_000 and report["lost_per_run"] == [0, 0]
