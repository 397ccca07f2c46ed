"""close() and reopen() from one thread while others read a WorkflowStore (issue 22, item 1).

Every read path, on a plain and a compressed store, through tests/close_race.py: readers get
StoreClosedError ("closed") or a right answer, never a signal, a wrong answer or a hang. Before
the fix a compressed get, get_bytes, verify() and iteration unmapped the file under a reader
that had released the GIL (SIGSEGV within a few rounds). The stores are mapped (mmap_threshold=0),
so a premature unmap would fault.
"""

from __future__ import annotations

import os
import threading

import pytest

from knhk_memory.errors import StoreClosedError
from knhk_memory.store import WorkflowStore, WorkflowStoreWriter
from tests.close_race import close_race

N = 64
ROUNDS = int(os.environ.get("KNHK_CLOSE_RACE_ROUNDS", "30"))


def value(i: int) -> bytes:
    return (f"value {i:04d} " * (3 + i % 7)).encode()


@pytest.fixture(scope="module", params=[None, 3], ids=["plain", "zstd"])
def path(request, tmp_path_factory):
    p = tmp_path_factory.mktemp("race") / "s.kst"
    with WorkflowStoreWriter(p, compress=request.param) as w:
        for i in range(N):
            if i % 8 == 0:  # some typed records: get_object, meta, aliases go through records.py
                w.add(f"k{i:04d}", {"i": i}, codec="json", aliases=[f"alias{i:04d}"])
            else:
                w.add(f"k{i:04d}", value(i))
    return p


def expected(i: int) -> bytes:
    return b'{"i":%d}' % i if i % 8 == 0 else value(i)  # codec="json" writes compact JSON


class Reader:
    """read(store) -> (i, answer) for key i (a new key each call); check() compares."""

    def __init__(self) -> None:
        self.local = threading.local()

    def next_i(self) -> int:
        i = getattr(self.local, "i", 0)
        self.local.i = i + 1
        return i % N


def keyed(fn):
    r = Reader()

    def read(s):
        i = r.next_i()
        return i, fn(s, i)

    return read


def same(pair) -> bool:
    i, got = pair
    return got is not None and bytes(got) == expected(i)


def key(i: int) -> str:
    return f"k{i:04d}"


# name -> (read, check)
PATHS = {
    "get": (keyed(lambda s, i: s.get(key(i))), same),
    "get_bytes": (keyed(lambda s, i: s.get_bytes(key(i))), same),
    "getitem": (keyed(lambda s, i: s[key(i).encode()]), same),
    "contains": (keyed(lambda s, i: key(i) in s and "absent" not in s), lambda p: p[1] is True),
    "get_raw": (keyed(lambda s, i: s.get_raw(key(i))), lambda p: p[1] is not None),
    "get_decoded": (keyed(lambda s, i: s.get_decoded(key(i), bytes)), same),
    "get_object": (keyed(lambda s, i: s.get_object(f"alias{i - i % 8:04d}")), lambda p: p[1] == {"i": p[0] - p[0] % 8}),
    "meta": (keyed(lambda s, i: s.meta(key(i)).codec), lambda p: p[1] == ("json" if p[0] % 8 == 0 else "raw")),
    "items": (lambda s: [(k, bytes(v)) for k, v in s.items()],
              lambda got: got == [(key(i).encode(), expected(i)) for i in range(N)] or len(got) > N),
    "keys": (lambda s: list(s), lambda got: len(got) > N and [k for k in got if k.startswith(b"k")] ==
             [key(i).encode() for i in range(N)]),
    "verify": (lambda s: s.verify(), lambda n: n > N),
    "len_stats": (lambda s: (len(s), s.stats(deep=True)["keys"]), lambda p: p[0] == p[1] > N),
    "changed": (lambda s: s.changed(), lambda c: c is False),
}


@pytest.mark.parametrize("name", list(PATHS))
def test_close_racing_readers(path, name):
    read, check = PATHS[name]
    report = close_race(lambda: WorkflowStore(path, mmap_threshold=0, cache_size=8), read, lambda s: s.close(),
                        closed_errors=(StoreClosedError,), check=check, rounds=ROUNDS, readers=3, max_reads=40)
    assert report.rounds == ROUNDS and report.closed_seen == 3 * ROUNDS


@pytest.mark.parametrize("name", ["get", "get_bytes", "getitem", "items", "verify", "get_object"])
def test_reopen_racing_readers(path, name):
    """A reopen (twice) before the close: readers answer from one file or the other, never a mix."""
    read, check = PATHS[name]

    def reopen_then_close(s):
        s.reopen()
        s.reopen()
        s.close()

    report = close_race(lambda: WorkflowStore(path, mmap_threshold=0), read, reopen_then_close,
                        closed_errors=(StoreClosedError,), check=check, rounds=ROUNDS // 2, readers=3, max_reads=40)
    assert report.rounds == ROUNDS // 2


def test_an_iteration_begun_before_close_stops_with_the_closed_error(path):
    s = WorkflowStore(path, mmap_threshold=0)
    it = s.items()
    first = next(it)
    assert first[0] == b"k0000"
    s.close()
    with pytest.raises(StoreClosedError, match="the store is closed"):
        next(it)
    assert bytes(first[1]) == expected(0) or s.closed  # the view handed out is still readable
    assert bytes(first[1]) == expected(0)


def test_an_iteration_begun_before_a_reopen_lists_the_file_it_began_on(path, tmp_path):
    s = WorkflowStore(path, mmap_threshold=0)
    it = s.keys()
    assert next(it) == b"k0000"
    s.reopen()
    rest = list(it)
    assert len(rest) == len(s) - 1
    s.close()


def test_close_unmaps_the_file_once_no_view_is_left(path):
    """Nothing the store keeps (the decode cache, the typed-record layer's note) holds the
    mapping after close: with no view handed out, close unmaps it."""
    import mmap
    import weakref

    s = WorkflowStore(path, mmap_threshold=0)
    assert s.get_object("alias0008") == {"i": 8} and s.get_decoded("k0001", bytes) == expected(1)
    mapped = weakref.ref(s._map)
    assert isinstance(mapped(), mmap.mmap)
    s.close()
    assert mapped() is None
    s = WorkflowStore(path, mmap_threshold=0)
    s.get_object("alias0008")
    first = weakref.ref(s._map)
    s.reopen()
    assert first() is None and s.get_object("alias0016") == {"i": 16}
    s.close()


@pytest.mark.parametrize("compress", [None, 3], ids=["plain", "zstd"])
def test_close_racing_copies_of_a_large_value(tmp_path, compress):
    """A value over 1 MiB is copied (or decompressed) with the GIL released: the longest
    window for a close on another thread."""
    big = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB
    p = tmp_path / "big.kst"
    with WorkflowStoreWriter(p, compress=compress) as w:
        w.add("big", big)
        w.add("small", b"s")
    report = close_race(lambda: WorkflowStore(p, mmap_threshold=0), lambda s: s.get_bytes("big"),
                        lambda s: s.close(), closed_errors=(StoreClosedError,), check=lambda v: v == big,
                        rounds=max(ROUNDS // 3, 5), readers=3, max_reads=6)
    assert report.reads > 0
