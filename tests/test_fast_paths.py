"""The METH_FASTCALL builtins of knhk_memory._fast against the Python paths
they stand in for: same results, same exception types and messages, for
every kind of argument (issue 14: "tests run every bad-input case through
both paths")."""

from __future__ import annotations

import array
import threading

import numpy as np
import pytest

from knhk_memory import _fast
from knhk_memory._core import lib
from knhk_memory.counters import Counters
from knhk_memory.errors import KnhkMemoryError, StoreClosedError, StoreKeyEncodingError, StoreKeyError

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
    except Exception as exc:
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
    limit = lib.KNHK_COUNTERS_SLOT_LIMIT  # the overflow rule: one slot's cell stays within +-2**56
    forms = [("alpha",), ("alpha", 5), ("beta", -2), (2, 7), (np.int64(1), np.int32(3)), ("gamma", np.uint8(4)),
             ("alpha", limit // 8), ("alpha", -(limit // 8))]
    for fn in (block.add, block._add, w.add, w._add):
        for args in forms:
            fn(*args)
    # every form four times, through both paths of both handles
    assert block.get("alpha") == 4 * (1 + 5)
    assert block.get("beta") == 4 * (-2 + 3)  # np.int64(1) names beta
    assert block.get("gamma") == 4 * (7 + 4)
    assert block.get(0) == block._get("alpha") == block["alpha"]


def test_counter_name_cache_answers_like_the_index():
    """The fast path's name cache (8 ways by the name object's address): more names than
    ways, names equal but not identical to the index's, ints and big increments mixed in;
    every count equals a dict's. The cache holds its names: a name dropped by the caller
    is never confused with a new object at its address."""
    import random
    import sys

    names = [f"n{i}" for i in range(40)]
    c = Counters(names)
    expect = dict.fromkeys(names, 0)
    rng = random.Random(14)
    for _ in range(20_000):
        name = rng.choice(names)
        key = name if rng.random() < 0.5 else "".join(list(name))  # an equal, separate object
        n = rng.choice([1, 2, -1, 1 << 31, -(1 << 40)])  # one digit and several
        c.add(key, n)
        expect[name] += n
        if rng.random() < 0.05:
            c.add(names.index(name), 1)
            expect[name] += 1
    assert {k: c.get(k) for k in names} == expect
    # A fresh object each time (the cache keeps the last one per way alive).
    for i in range(1000):
        c.add("".join(["n", str(i % 40)]), 1)
    assert sum(c.get(k) for k in names) == sum(expect.values()) + 1000
    key = "".join(["n", "7"])
    before = sys.getrefcount(key)
    c.add(key, 1)
    assert sys.getrefcount(key) == before + 1  # cached
    c.close()
    del c
    import gc

    gc.collect()
    assert sys.getrefcount(key) == before  # released with the block's state


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
        for _ in range(n):
            block.add("alpha")
            w.add(1, 2)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert block.get("alpha") == n * threads and block.get("beta") == 2 * n * threads


def test_factory_refuses_bad_arguments():
    with pytest.raises(TypeError, match=r"counters_method\(kind: 0 add, 1 get, 2 writer add or 3 record, state, slow"):
        _fast.counters_method(4, None, print)
    with pytest.raises(TypeError, match=r"counters_state\(handle_address, index: dict, count: int\)"):
        _fast.counters_state(1, [], 1)
    with pytest.raises(TypeError, match=r"detach_counters\(state\)"):
        _fast.detach_counters(object())


# ---------------------------------------------------------------- arenas

BAD_ALLOCS = [
    ((0,), {}), ((-1,), {}), ((2**44 + 1,), {}), ((2**80,), {}), ((1.0,), {}), (("64",), {}), ((True,), {}),
    ((None,), {}), ((64, 3), {}), ((64, 0), {}), ((64, 8192), {}), ((64, 16.0), {}), ((64,), {"align": 3}),
    ((), {}), ((64, 16, 1), {}), ((64,), {"nope": 1}),
]


@pytest.fixture
def arena():
    from knhk_memory.arena import Arena

    a = Arena(4096)
    yield a
    a.close()


def test_arena_alloc_and_array_are_c_methods(arena):
    from knhk_memory import _fast

    assert isinstance(arena, _fast.ArenaBase)
    assert type(arena.alloc).__name__ == "builtin_function_or_method"
    view = arena.alloc(64)
    assert isinstance(view, memoryview) and view.nbytes == 64 and not view.readonly
    assert type(view.obj).__name__ == "ArenaBlock"


@pytest.mark.parametrize(("args", "kwargs"), BAD_ALLOCS)
def test_arena_alloc_errors_match_the_python_path(arena, args, kwargs):
    fast, slow = outcome(arena.alloc, args, kwargs), outcome(arena._alloc_slow, args, kwargs)
    assert fast == slow and fast[0] != "ok"
    assert arena.stats().live_blocks == 0


BAD_ARRAYS = [
    ((-1,), {}), (((2, -1),), {}), ((1.5,), {}), ((True,), {}), (((2, "3"),), {}), (("4",), {}),
    ((4, object), {}), ((4, "nope"), {}), ((4, "V0"), {}), (((2**40, 2**40),), {}), ((4, "u1"), {"align": 3}),
    ((tuple(range(1, 70)),), {}),
]


@pytest.mark.parametrize(("args", "kwargs"), BAD_ARRAYS)
def test_arena_array_errors_match_the_python_path(arena, args, kwargs):
    slow = outcome(arena._array_slow, args, kwargs)
    fast = outcome(arena.array, args, kwargs)
    assert fast == slow and fast[0] != "ok"


def test_arena_array_fast_and_slow_agree(arena):
    for args, kwargs in [((64, np.uint8), {}), ((64, "uint8"), {}), (((3, 4), np.dtype("<u4")), {}), ((5,), {}),
                         ((0, "f8"), {}), (((2, 0, 3), np.int16), {}), ((np.int64(3), "u2"), {}),
                         ((7, "f8"), {"align": 64}), ((4, [("a", "u1"), ("b", "<f8")]), {})]:
        for _ in range(2):  # the second call takes the C method once the dtype is cached
            a, b = arena.array(*args, **kwargs), arena._array_slow(*args, **kwargs)
            assert a.shape == b.shape and a.dtype == b.dtype and a.flags.c_contiguous and a.flags.writeable
            assert a.ctypes.data % max(16, a.dtype.alignment, kwargs.get("align", 1)) == 0
            a.view(np.uint8)[...] = 1
            assert (a.view(np.uint8) == 1).all()


def test_arena_blocks_live_as_long_as_their_views_and_arrays(arena):
    import gc

    view = arena.alloc(32)
    arr = arena.array(8, np.uint32)
    sub = arr[2:4]
    assert arena.stats().live_blocks == 2
    del arr
    gc.collect()
    assert arena.stats().live_blocks == 2  # sub keeps the array's block
    del sub, view
    gc.collect()
    assert arena.stats().live_blocks == 0
    arena.reset()


def test_arena_closed_and_foreign_thread_refused_by_both_paths(arena):
    seen = []

    def other():
        seen.append(outcome(arena.alloc, (64,), {}))
        seen.append(outcome(arena._alloc_slow, (64,), {}))
        seen.append(outcome(arena.array, (4, "u1"), {}))

    arena.array(4, "u1")  # cached dtype: the foreign thread reaches the C method
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen[0] == seen[1] and seen[0][0].__name__ == "ArenaThreadError"
    assert seen[2][0].__name__ == "ArenaThreadError"
    keep = arena.alloc(16)
    arena.close()
    for fn, args in ((arena.alloc, (64,)), (arena._alloc_slow, (64,)), (arena.array, (4, "u1"))):
        assert outcome(fn, args, {})[0].__name__ == "ArenaClosedError"
    keep[0] = 7  # a block made before the close stays usable until it goes
    assert keep[0] == 7


# ---------------------------------------------------------------- once-cells and the registry

def test_once_get_is_a_c_method_and_matches_the_cell_state():
    from knhk_memory.once import Lazy, OnceLock

    c: OnceLock[object] = OnceLock("c")
    assert type(c.get).__name__ == "builtin_function_or_method"
    assert c.get() is None and not c.is_set()
    c.set(None)
    assert c.get() is None and c.is_set()
    d: OnceLock[list[int]] = OnceLock()
    value = [1]
    assert d.get_or_init(lambda: value) is value and d.get() is value
    calls = []
    lz = Lazy(lambda: calls.append(1) or "v")
    assert lz.get() == "v" and lz.get() == "v" and lz.value == "v" and calls == [1]
    none = Lazy(lambda: None)
    assert none.get() is None and none.is_set() and none.get() is None


def test_once_get_from_many_threads_sees_one_value():
    from knhk_memory.once import Lazy

    made = []
    lz = Lazy(lambda: made.append(object()) or made[-1])
    seen = []
    ts = [threading.Thread(target=lambda: seen.append(lz.get())) for _ in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(made) == 1 and all(s is made[0] for s in seen)


@pytest.mark.parametrize("key", [0, 44, -1, 2**70, True, 1.0, None, "nope", "sequence", "Sequence", b"1", (1,)])
def test_registry_lookup_matches_the_python_path(key):
    from knhk_memory.registry import PatternRegistry

    r = PatternRegistry()
    r[1]  # loaded: the C subscript has its index
    assert outcome(r.__getitem__, (key,), {}) == outcome(r._getitem_slow, (key,), {})
    assert (key in r) == (outcome(r._getitem_slow, (key,), {})[0] == "ok")


def test_registry_first_lookup_loads_the_table():
    from knhk_memory.registry import PatternRegistry

    r = PatternRegistry()
    assert not r.loaded
    assert r[43].number == 43 and r.loaded
    assert r[7] is r[7] and r["sequence"] is r[1]


@pytest.mark.parametrize(("args", "kwargs"), [
    ((0, 5), {}), ((44, 5), {}), ((-1, 5), {}), ((True, 5), {}), ((1.0, 5), {}), ((1, -1), {}), ((1, 2**63), {}),
    ((1, 1.5), {}), ((1, None), {}), ((1,), {}), ((1, 2, 3), {}), ((1,), {"tick": 2}),
])
def test_pattern_record_errors_match_the_python_path(args, kwargs):
    from knhk_memory.counters import PatternStats

    p = PatternStats()
    try:
        assert type(p.record).__name__ == "builtin_function_or_method"
        fast, slow = outcome(p.record, args, kwargs), outcome(p._record, args, kwargs)
        assert fast == slow and fast[0] != "ok"
        assert p.as_dict() == PatternStats().as_dict()  # nothing recorded
    finally:
        p.close()


def test_pattern_record_fast_and_slow_agree():
    from knhk_memory.counters import PatternStats

    p = PatternStats()
    for fn in (p.record, p._record):
        fn(4, 100)
        fn(np.int64(4), np.uint32(300))
        fn(43, 2**63 - 1)
    d = p.as_dict()
    p.close()
    assert d[4]["executions"] == 4 and d[4]["total_ticks"] == 2 * (100 + 300)
    assert d[4]["min_ticks"] == 100 and d[4]["max_ticks"] == 300
    assert d[43]["executions"] == 2 and d[43]["max_ticks"] == 2**63 - 1
    assert set(d) == {4, 43}


# ---------------------------------------------------------------- the store's `in`

@pytest.mark.parametrize("compress", [None, 3])
def test_store_membership_takes_the_c_getter_and_keeps_its_answers(tmp_path, compress):
    from knhk_memory.errors import StoreClosedError
    from knhk_memory.store import WorkflowStore, WorkflowStoreWriter

    path = tmp_path / "s.kst"
    with WorkflowStoreWriter(path, compress=compress) as w:
        w.add("present", b'{"a": 1}')
    s = WorkflowStore(path)
    assert "present" in s and b"present" in s and bytearray(b"present") in s and memoryview(b"present") in s
    assert "absent" not in s and "" not in s
    for bad in (3, None, ["present"]):  # what get and [] refuse, `in` refuses too (trial finding 6)
        with pytest.raises(TypeError, match=r"a store key must be str \(stored as its UTF-8 bytes\) or bytes-like "
                                            r"\(bytes, bytearray, memoryview\), got "):
            bad in s  # noqa: B015 - the check raises
    s.close()
    with pytest.raises(StoreClosedError, match="the store is closed"):
        "present" in s  # noqa: B015 - the check raises


# ---------------------------------------------------------------- the store's get, get_bytes, [] and in

STORE_KEYS = ["present", b"present", bytearray(b"present"), memoryview(b"present"), "absent", b"absent", "",
              "pr\x00esent", "\u00e9t\u00e9", "\u00e9t\u00e9".encode(), "\ud800", "pr\udcffesent",
              "\u00e9\ud800", np.bytes_(b"present"), np.bytes_(b"absent"), 3, None, 1.5, True, ("present",),
              ["present"], object, np.str_("present"), array.array("B", b"present")]


@pytest.fixture(params=[None, 3], ids=["plain", "zstd"])
def store(tmp_path, request):
    from knhk_memory.store import WorkflowStore, WorkflowStoreWriter

    path = tmp_path / "s.kst"
    with WorkflowStoreWriter(path, compress=request.param) as w:
        w.add("present", b'{"a": 1}')
        w.add("\u00e9t\u00e9", b"summer")
        w.add("empty", b"")
    s = WorkflowStore(path, mmap_threshold=0)
    yield s
    s.close()


def both(fast, slow, *args, **kwargs):
    a, b = outcome(fast, args, kwargs), outcome(slow, args, kwargs)
    assert a == b, (args, kwargs, a, b)
    return a


@pytest.mark.parametrize("key", STORE_KEYS, ids=repr)
def test_store_reads_match_the_python_paths(store, key):
    assert type(store).get.__class__.__name__ == "method_descriptor"  # C methods on StoreBase
    both(store.get, store._get_slow, key)
    both(store.get, store._get_slow, key, "dflt")
    both(store.get_bytes, store._get_bytes_slow, key)
    both(store.get_bytes, store._get_bytes_slow, key, "dflt")
    got = both(store.__getitem__, store._getitem_slow, key)
    has = both(store.__contains__, store._contains_slow, key)
    if got[0] == "ok" or got[0] is StoreKeyError:
        assert has == ("ok", got[0] == "ok")
        if got[0] is StoreKeyError:  # the key quoted as given: a str as a str, bytes-like as bytes
            shown = repr(key) if isinstance(key, (str, bytes)) else repr(bytes(key))
            assert f"key {shown} is not in the store (3 keys)" in got[1]
    elif got[0] is StoreKeyEncodingError:  # a str with a lone surrogate has no UTF-8 form: refused, never a miss
        first = next(i for i, c in enumerate(key) if 0xD800 <= ord(c) <= 0xDFFF)
        assert has == got and got[1] == (
            f"{store.path}: key {key!r} is not valid UTF-8 text (surrogates not allowed at index {first}); "
            "keys must be valid UTF-8: give a str without lone surrogates, or the key's bytes")
    else:  # not a key type at all: `in` refuses it as get and [] do (trial finding 6), never a quiet False
        assert got[0] is TypeError and has == got
        assert got[1] == ("a store key must be str (stored as its UTF-8 bytes) or bytes-like (bytes, bytearray, "
                          f"memoryview), got {type(key).__name__} {key!r}")


def test_store_read_answers(store):
    assert store.get("present") == b'{"a": 1}' and store.get_bytes(b"present") == b'{"a": 1}'
    assert type(store.get_bytes("present")) is bytes and isinstance(store.get("present"), memoryview)
    assert store["\u00e9t\u00e9"] == b"summer" and store.get_bytes("\u00e9t\u00e9".encode()) == b"summer"
    assert store.get("empty") == b"" and store.get_bytes("empty") == b"" and "empty" in store
    assert store.get("absent") is None and store.get("absent", 7) == 7 and store.get_bytes("absent", 7) == 7
    assert store.get("present", default=1) == b'{"a": 1}' and store.get(key="absent", default=2) == 2
    with pytest.raises(StoreKeyError, match=r"key 'absent' is not in the store \(3 keys\)"):
        store["absent"]


@pytest.mark.parametrize(("args", "kwargs"), [((), {}), (("present", 1, 2), {}), (("present",), {"dflt": 1}),
                                              ((), {"default": 1}), (("present",), {"key": "x"})])
def test_store_get_call_errors_name_the_public_method(store, args, kwargs):
    for fast, slow, name in ((store.get, store._get_slow, "get"),
                             (store.get_bytes, store._get_bytes_slow, "get_bytes")):
        kind, message = both(fast, slow, *args, **kwargs)
        assert kind is TypeError and message.startswith(f"WorkflowStore.{name}()"), message


def test_store_closed_refuses_through_both_paths(store):
    store.close()
    for key in ("present", "absent", 3):
        for fast, slow in ((store.get, store._get_slow), (store.get_bytes, store._get_bytes_slow),
                           (store.__getitem__, store._getitem_slow)):
            kind, message = both(fast, slow, key)
            assert kind is StoreClosedError and "the store is closed" in message
    with pytest.raises(StoreClosedError, match="the store is closed"):
        "present" in store  # noqa: B015 - the check raises
    with pytest.raises(StoreClosedError, match="the store is closed"):
        3 in store  # noqa: B015 - closed first, as get and [] say


def test_store_get_bytes_of_a_large_value_takes_the_released_gil_path(tmp_path):
    from knhk_memory.store import WorkflowStore, WorkflowStoreWriter

    big = bytes(range(256)) * 8193  # just over 2 MiB: copied by the Python path, the GIL released
    with WorkflowStoreWriter(tmp_path / "s.kst") as w:
        w.add("big", big)
    with WorkflowStore(tmp_path / "s.kst", mmap_threshold=0) as s:
        assert s.get_bytes("big") == big and s["big"] == big


def test_argument_errors_name_the_public_method_not_its_slow_path():
    # A second trial: c.add(name="a") said "Counters._add() got an unexpected keyword argument".
    from knhk_memory.counters import PatternStats

    c = Counters(["a"])
    cases = [(lambda: c.add(name="a"), r"^Counters\.add\(\) got an unexpected keyword argument 'name'$"),
             (lambda: c.add(), r"^Counters\.add\(\) missing 1 required positional argument: 'key'$"),
             (lambda: c.get(), r"^Counters\.get\(\) missing 1 required positional argument: 'key'$"),
             (lambda: c.writer().add(x=1), r"^CounterWriter\.add\(\) got an unexpected keyword argument 'x'$"),
             (lambda: PatternStats().record(1), r"^PatternStats\.record\(\) missing 1 required positional")]
    for call, message in cases:
        with pytest.raises(TypeError, match=message):
            call()
