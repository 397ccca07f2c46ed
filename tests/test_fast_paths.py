"""The METH_FASTCALL builtins of knhk_memory._fast against the Python paths
they stand in for: same results, same exception types and messages, for
every kind of argument (issue 14: "tests run every bad-input case through
both paths")."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from knhk_memory import _fast
from knhk_memory.counters import Counters
from knhk_memory.errors import KnhkMemoryError

BAD_ADDS = [
    (("nope",), {}),                      # unknown name: CounterNameError with nearest names
    (("alpah",), {}),
    ((5,), {}),                           # index out of range
    ((-1,), {}),
    ((True,), {}),                        # bool is not an index
    ((1.0,), {}),                         # float key
    ((None,), {}),
    (("alpha", 1.5), {}),                 # float increment
    (("alpha", "1"), {}),
    (("alpha", 2**63), {}),               # does not fit int64
    (("alpha", -(2**63) - 1), {}),
    (("alpha", True), {}),
    ((), {}),                             # arity
    (("alpha", 1, 2), {}),
    (("alpha",), {"m": 1}),               # unknown keyword
]


def outcome(fn, args, kwargs):
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - the point is to compare any exception
        return (type(exc), str(exc))


@pytest.fixture
def block():
    c = Counters(["alpha", "beta", "gamma"])
    yield c
    c.close()


def test_counter_add_is_a_builtin_on_an_open_block(block):
    assert type(block.add).__name__ == "builtin_function_or_method"
    assert type(block.writer().add).__name__ == "builtin_function_or_method"


@pytest.mark.parametrize(("args", "kwargs"), BAD_ADDS)
def test_counter_add_errors_match_the_python_path(block, args, kwargs):
    fast = outcome(block.add, args, kwargs)
    slow = outcome(block._add, args, kwargs)
    assert fast[0] is not str and fast == slow
    assert fast[0] != "ok"
    assert block.values().tolist() == [0, 0, 0]  # a refused add changes nothing


@pytest.mark.parametrize(("args", "kwargs"), BAD_ADDS)
def test_writer_add_errors_match_the_python_path(block, args, kwargs):
    w = block.writer()
    assert outcome(w.add, args, kwargs) == outcome(w._add, args, kwargs)
    assert block.values().tolist() == [0, 0, 0]


@pytest.mark.parametrize("key", ["nope", 3, -1, True, 1.0, None])
def test_counter_get_errors_match_the_python_path(block, key):
    assert outcome(block.get, (key,), {}) == outcome(block._get, (key,), {})
    assert outcome(block.__getitem__, (key,), {})[0] is outcome(block._get, (key,), {})[0]


def test_counter_fast_and_slow_adds_agree_on_every_accepted_form(block):
    w = block.writer()
    forms = [("alpha",), ("alpha", 5), ("beta", -2), (2, 7), (np.int64(1), np.int32(3)), ("gamma", np.uint8(4)),
             ("alpha", 2**63 - 1), ("alpha", -(2**63) + 1)]
    for fn in (block.add, block._add, w.add, w._add):
        for args in forms:
            fn(*args)
    # every form four times, through both paths of both handles
    assert block.get("alpha") == 4 * (1 + 5 + (2**63 - 1) + (-(2**63) + 1))
    assert block.get("beta") == 4 * (-2 + 3)  # np.int64(1) names beta
    assert block.get("gamma") == 4 * (7 + 4)
    assert block.get(0) == block._get("alpha") == block["alpha"]


def test_closed_block_refuses_through_both_paths(block):
    w = block.writer()
    add, get = block.add, block.get  # builtins held across the close
    block.close()
    for fn in (add, block.add, block._add):
        with pytest.raises(KnhkMemoryError, match="this Counters block is closed"):
            fn("alpha", 1)
    with pytest.raises(KnhkMemoryError, match="this Counters block is closed"):
        get("alpha")
    with pytest.raises(KnhkMemoryError, match="its writers are dead"):
        w.add("alpha")


def test_writer_from_another_thread_refused_and_nothing_added(block):
    w = block.writer()
    seen = []

    def other():
        seen.append(outcome(w.add, ("alpha", 1), {}))
        seen.append(outcome(w._add, ("alpha", 1), {}))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen[0] == seen[1] and seen[0][0].__name__ == "CounterWriterError"
    assert block.get("alpha") == 0


def test_fast_adds_are_exact_across_threads(block):
    n, threads = 20_000, 4

    def work():
        w = block.writer()
        for i in range(n):
            block.add("alpha")
            w.add(1, 2)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert block.get("alpha") == n * threads and block.get("beta") == 2 * n * threads


def test_factory_refuses_bad_arguments():
    with pytest.raises(TypeError, match=r"counters_method\(kind: 0 add, 1 get or 2 writer add, state, slow"):
        _fast.counters_method(3, None, print)
    with pytest.raises(TypeError, match=r"counters_state\(handle_address, index: dict, count: int\)"):
        _fast.counters_state(1, [], 1)
    with pytest.raises(TypeError, match=r"detach_counters\(state\)"):
        _fast.detach_counters(object())
