"""OnceLock, Lazy and the C once-cell: exactly-once, retry, re-entrancy, fork."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from knhk_memory import AlreadySetError, Lazy, OnceLock, ReentrantInitError
from knhk_memory._core import ffi, lib

THREADS = 32
ROUNDS = 1000


def test_get_is_none_until_set_then_value():
    cell: OnceLock[int] = OnceLock("answer")
    assert cell.get() is None and not cell.is_set()
    cell.set(42)
    assert cell.get() == 42 and cell.is_set()
    assert cell.get_or_init(lambda: 7) == 42


def test_set_on_full_cell_raises_with_the_rejected_value():
    cell: OnceLock[int] = OnceLock("answer")
    cell.set(1)
    with pytest.raises(AlreadySetError,
                       match=r"OnceLock 'answer' already holds 1; set\(2\) is accepted only on an empty cell") as info:
        cell.set(2)
    assert info.value.args[1] == 2
    assert cell.get() == 1


def test_a_stored_none_is_set():
    cell: OnceLock[None] = OnceLock()
    assert cell.get_or_init(lambda: None) is None
    assert cell.is_set()
    with pytest.raises(AlreadySetError):
        cell.set(None)


def test_exactly_once_under_32_racing_threads_1000_rounds():
    """Each round: 32 threads released together on one fresh cell; f must run once
    and every thread must see the same object. Worker threads are reused across
    rounds (a Barrier per phase) so the test spends its time racing, not spawning."""
    cells: list[OnceLock[object]] = [OnceLock() for _ in range(ROUNDS)]
    calls = [0] * ROUNDS
    seen: list[list[object]] = [[None] * THREADS for _ in range(ROUNDS)]
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for r in range(ROUNDS):
                def f(r: int = r) -> object:
                    calls[r] += 1  # racing increments would show as a count > 1 as well
                    return object()
                start.wait()
                seen[r][t] = cells[r].get_or_init(f)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            start.abort()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: more interleavings
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    assert calls == [1] * ROUNDS
    for r in range(ROUNDS):
        assert all(v is seen[r][0] for v in seen[r]), f"round {r}: threads saw different values"


def test_waiters_get_the_value_of_a_slow_initialiser():
    cell: OnceLock[str] = OnceLock()
    entered, release = threading.Event(), threading.Event()
    results: list[str | None] = []

    def slow() -> str:
        entered.set()
        release.wait(5)
        return "built"

    first = threading.Thread(target=lambda: results.append(cell.get_or_init(slow)))
    first.start()
    assert entered.wait(5)
    assert cell.get() is None  # get never blocks, even mid-initialisation
    waiter = threading.Thread(target=lambda: results.append(cell.get_or_init(lambda: "second")))
    waiter.start()
    release.set()
    first.join(5)
    waiter.join(5)
    assert results == ["built", "built"]


def test_exception_leaves_the_cell_empty_and_the_next_call_retries():
    cell: OnceLock[int] = OnceLock()
    attempts = []

    def flaky() -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("store not reachable")
        return 5

    with pytest.raises(ConnectionError, match="store not reachable"):
        cell.get_or_init(flaky)
    assert cell.get() is None and not cell.is_set()
    assert cell.get_or_init(flaky) == 5
    assert len(attempts) == 2


def test_reentrant_initialisation_raises_instead_of_deadlocking():
    cell: OnceLock[int] = OnceLock("table")

    def f() -> int:
        return cell.get_or_init(lambda: 1) + 1

    with pytest.raises(ReentrantInitError, match=r"re-entrant initialisation of OnceLock 'table'"):
        cell.get_or_init(f)
    assert not cell.is_set()
    assert cell.get_or_init(lambda: 3) == 3  # the lock was released


def test_set_from_inside_the_initialiser_is_reentrant():
    cell: OnceLock[int] = OnceLock()
    with pytest.raises(ReentrantInitError):
        cell.get_or_init(lambda: cell.set(1))  # type: ignore[func-returns-value]


def test_nested_cells_initialise_fine():
    inner: OnceLock[int] = OnceLock()
    outer: OnceLock[int] = OnceLock()
    assert outer.get_or_init(lambda: inner.get_or_init(lambda: 2) * 10) == 20


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_does_not_hang_on_a_lock_held_by_a_parent_thread(run_python):
    # In a fresh interpreter: a thread is inside f (holding the cell's lock)
    # when the main thread forks. The child must initialise the cell itself.
    code = r'''
import os, sys, threading, warnings
warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, on purpose
from knhk_memory import OnceLock
cell = OnceLock("forked")
inside, release = threading.Event(), threading.Event()
def slow():
    inside.set(); release.wait(10); return "parent"
t = threading.Thread(target=lambda: cell.get_or_init(slow)); t.start()
inside.wait(10)
pid = os.fork()
if pid == 0:
    value = cell.get_or_init(lambda: "child")
    os._exit(0 if value == "child" else 3)
_, status = os.waitpid(pid, 0)
release.set(); t.join()
print(os.waitstatus_to_exitcode(status), cell.get())
'''
    proc = run_python(code, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "parent"]


def test_lazy_computes_once_and_reads_as_an_attribute():
    calls = []
    lazy: Lazy[list[int]] = Lazy(lambda: calls.append(1) or [1, 2])
    assert not lazy.is_set()
    assert lazy.value == [1, 2]
    assert lazy.value is lazy.get()
    assert calls == [1] and lazy.is_set()
    with pytest.raises(AttributeError, match="read-only"):
        lazy.value = [3]  # type: ignore[misc]
    with pytest.raises(AttributeError, match="has no attribute 'other'"):
        lazy.other  # type: ignore[attr-defined]  # noqa: B018
    assert isinstance(lazy, Lazy) and repr(lazy) == "<Lazy [1, 2]>"


def test_lazy_exactly_once_under_racing_threads():
    for _ in range(50):
        calls = []
        lazy = Lazy(lambda: calls.append(1) or object())
        barrier = threading.Barrier(THREADS)
        out: list[object] = []

        def read() -> None:
            barrier.wait()
            out.append(lazy.value)

        threads = [threading.Thread(target=read) for _ in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert calls == [1] and len(set(map(id, out))) == 1


def test_lazy_retries_after_an_exception_and_rejects_non_callables():
    attempts = []

    def f() -> int:
        attempts.append(1)
        if len(attempts) < 2:
            raise ValueError("first try fails")
        return 9

    lazy = Lazy(f)
    with pytest.raises(ValueError, match="first try fails"):
        lazy.value  # noqa: B018
    assert lazy.value == 9
    with pytest.raises(TypeError, match="Lazy needs a callable taking no arguments, got 5"):
        Lazy(5)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the C once-cell

def test_c_once_set_get_and_states():
    cell = ffi.new("knhk_once *")
    lib.knhk_once_init(cell)
    assert lib.knhk_once_get(cell) == ffi.NULL and lib.knhk_once_is_set(cell) == 0
    marker = ffi.new("int *", 7)
    assert lib.knhk_once_set(cell, marker) == lib.KNHK_OK
    assert lib.knhk_once_get(cell) == marker and lib.knhk_once_is_set(cell) == 1
    assert cell.state == lib.KNHK_ONCE_READY
    assert lib.knhk_once_set(cell, ffi.NULL) == lib.KNHK_ERR_STATE
    assert "already full" in ffi.string(lib.knhk_last_error()).decode()
    lib.knhk_once_hotop_read(cell, 1000)


def test_c_once_run_exactly_once_retry_and_reentrancy():
    cell = ffi.new("knhk_once *")
    payload = ffi.new("int *", 11)
    calls = []

    @ffi.callback("int(void *, void **)")
    def init(arg, value):
        calls.append(1)
        if len(calls) == 1:
            return lib.KNHK_ERR_UNAVAILABLE  # first attempt fails: the cell stays empty
        if len(calls) == 2:
            inner = ffi.new("void **")
            # re-entrant: the same cell from inside its initialiser
            assert lib.knhk_once_run(cell, init, ffi.NULL, inner) == lib.KNHK_ERR_STATE
            assert "re-entrant" in ffi.string(lib.knhk_last_error()).decode()
        value[0] = payload
        return lib.KNHK_OK

    out = ffi.new("void **")
    assert lib.knhk_once_run(cell, init, ffi.NULL, out) == lib.KNHK_ERR_UNAVAILABLE
    assert lib.knhk_once_is_set(cell) == 0
    assert lib.knhk_once_run(cell, init, ffi.NULL, out) == lib.KNHK_OK
    assert out[0] == payload and len(calls) == 2
    assert lib.knhk_once_run(cell, init, ffi.NULL, out) == lib.KNHK_OK and len(calls) == 2
    assert lib.knhk_once_run(ffi.new("knhk_once *"), ffi.NULL, ffi.NULL, out) == lib.KNHK_ERR_INVALID


def test_c_once_run_exactly_once_across_threads():
    # cffi releases the GIL around knhk_once_run, so the threads race in C.
    for _ in range(20):
        cell = ffi.new("knhk_once *")
        calls = []
        token = ffi.new("int *")

        @ffi.callback("int(void *, void **)")
        def init(arg, value):
            calls.append(1)
            value[0] = token
            return lib.KNHK_OK

        barrier = threading.Barrier(8)
        got = []

        def run() -> None:
            out = ffi.new("void **")
            barrier.wait()
            assert lib.knhk_once_run(cell, init, ffi.NULL, out) == lib.KNHK_OK
            got.append(out[0])

        threads = [threading.Thread(target=run) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert calls == [1] and got == [token] * 8


def test_internal_once_users_still_work():
    assert lib.knhk_cpu_features() == lib.knhk_cpu_features()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_c_once_fork_child_takes_over_a_cell_whose_initialiser_thread_is_gone(run_python):
    code = r'''
import os, threading, warnings
warnings.simplefilter("ignore", DeprecationWarning)
from knhk_memory._core import ffi, lib
cell = ffi.new("knhk_once *")
inside, release = threading.Event(), threading.Event()
parent_value, child_value = ffi.new("int *", 1), ffi.new("int *", 2)
@ffi.callback("int(void *, void **)")
def slow(arg, value):
    inside.set(); release.wait(10); value[0] = parent_value; return lib.KNHK_OK
@ffi.callback("int(void *, void **)")
def fast(arg, value):
    value[0] = child_value; return lib.KNHK_OK
t = threading.Thread(target=lambda: lib.knhk_once_run(cell, slow, ffi.NULL, ffi.NULL)); t.start()
inside.wait(10)
pid = os.fork()
if pid == 0:
    out = ffi.new("void **")
    rc = lib.knhk_once_run(cell, fast, ffi.NULL, out)
    os._exit(0 if rc == lib.KNHK_OK and out[0] == child_value else 3)
_, status = os.waitpid(pid, 0)
release.set(); t.join()
print(os.waitstatus_to_exitcode(status), lib.knhk_once_get(cell) == parent_value)
'''
    proc = run_python(code, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "True"]
