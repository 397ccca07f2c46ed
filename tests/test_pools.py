"""FixedPool, LockFreePool, ThreadLocalPool: geometry, errors, stress, fork, model check (issue 19)."""

from __future__ import annotations

import gc
import os
import threading
import weakref

import numpy as np
import pytest

from knhk_memory import pools
from knhk_memory.errors import (
    NumaError,
    PoolClosedError,
    PoolCorruptError,
    PoolDoubleFreeError,
    PoolError,
    PoolExhaustedError,
    PoolForeignPointerError,
    PoolThreadError,
)
from knhk_memory.pools import FixedPool, LockFreePool, ThreadLocalPool, model_check, size_class

KINDS = [FixedPool, LockFreePool, ThreadLocalPool]


# ---------------------------------------------------------------- geometry

@pytest.mark.parametrize(("size", "align", "stride"), [
    (1, 8, 8), (8, 8, 8), (9, 8, 16), (17, 8, 24), (24, 8, 24), (25, 8, 32), (33, 8, 48), (64, 8, 64),
    (65, 8, 96), (72, 8, 96), (100, 8, 128), (129, 8, 192), (24, 16, 32), (48, 32, 64), (64, 128, 128),
    (5000, 4096, 8192), (1 << 30, 8, 1 << 30),
])
def test_size_classes(size: int, align: int, stride: int) -> None:
    assert size_class(size, align) == stride
    assert stride >= size and stride % align == 0
    # at most a third of the block is padding once blocks are above 16 bytes (8, 16, 24, 32, 48, ...)
    assert stride - size <= stride // 3 or size <= 16 or align > 8  # (a large align can force more)


@pytest.mark.parametrize("cls", KINDS)
@pytest.mark.parametrize(("kwargs", "exc", "message"), [
    ({"block_size": 0}, ValueError, "block_size must be from 1 to 1073741824 bytes, got 0"),
    ({"block_size": -8}, ValueError, "block_size must be from 1 to 1073741824 bytes, got -8"),
    ({"block_size": (1 << 30) + 1}, ValueError, "block_size must be from 1 to 1073741824 bytes, got 1073741825"),
    ({"block_size": 8.0}, TypeError, "block_size must be an int, got float 8.0"),
    ({"block_size": True}, TypeError, "block_size must be an int, got bool True"),
    ({"capacity": 0}, ValueError, "capacity must be from 1 to 4294967294 blocks, got 0"),
    ({"capacity": -1}, ValueError, "capacity must be from 1 to 4294967294 blocks, got -1"),
    ({"capacity": 1 << 33}, ValueError, "capacity must be from 1 to 4294967294 blocks, got 8589934592"),
    ({"capacity": "10"}, TypeError, "capacity must be an int, got str '10'"),
    ({"align": 3}, ValueError, "align must be a power of two from 1 to 4096, got 3"),
    ({"align": 0}, ValueError, "align must be a power of two from 1 to 4096, got 0"),
    ({"align": -8}, ValueError, "align must be a power of two from 1 to 4096, got -8"),
    ({"align": 8192}, ValueError, "align must be a power of two from 1 to 4096, got 8192"),
    ({"block_size": 1 << 20, "capacity": 1 << 21}, ValueError,
     ("capacity 2097152 x 1048576-byte blocks (the size class of 1048576 bytes) is 2199023255552 bytes, beyond "
      "the limit of 1099511627776 bytes (1 TiB)")),
    ({"name": ""}, TypeError, "name must be a non-empty string or None, got ''"),
    ({"numa": "far"}, ValueError, "numa must be 'local', 'interleave' or a node number, got 'far'"),
    ({"node": 4000}, NumaError, "node=4000: no such node online; online nodes: 0"),
    ({"numa": 1.5}, TypeError, "numa must be 'local', 'interleave' or a node number (int), got float 1.5"),
])
def test_bad_geometry(cls: type, kwargs: dict, exc: type, message: str) -> None:
    args = {"block_size": 64, "capacity": 16, **kwargs}
    with pytest.raises(exc) as info:
        cls(args.pop("block_size"), args.pop("capacity"), **args)
    assert message in str(info.value)


def test_thread_local_cache_size_checked() -> None:
    for bad in (0, 1, 65537):
        with pytest.raises(ValueError, match=f"cache_size must be from 2 to 65536 blocks, got {bad}"):
            ThreadLocalPool(64, 16, cache_size=bad)
    with pytest.raises(TypeError, match=r"cache_size must be an int, got float 2\.0"):
        ThreadLocalPool(64, 16, cache_size=2.0)


def test_large_capacity_costs_no_memory_until_used() -> None:
    # 2**32 - 2 blocks of 64 bytes: 256 GiB of address space, pages touched only when used.
    with FixedPool(64, pools.MAX_CAPACITY) as p:
        a = p.alloc()
        p.free(a)
        assert p.stats().region_bytes >= pools.MAX_CAPACITY * 64


# ---------------------------------------------------------------- blocks and errors, every kind

@pytest.mark.parametrize("cls", KINDS)
def test_alloc_free_roundtrip_and_stats(cls: type) -> None:
    with cls(72, 10, name="cases") as p:
        addrs = [p.alloc() for _ in range(10)]
        assert len(set(addrs)) == 10
        assert sorted(p.index(a) for a in addrs) == list(range(10))
        assert all(a % 8 == 0 for a in addrs)
        with pytest.raises(PoolExhaustedError) as info:
            p.alloc()
        msg = str(info.value)
        assert f"{cls.__name__} 'cases' is exhausted: all 10 blocks of 72 bytes are in use (capacity 10)" in msg
        assert "config key pools.cases.capacity" in msg
        for a in addrs:
            p.free(a)
        st = p.stats()
        assert (st.in_use, st.high_water, st.allocations, st.frees, st.failed) == (0, 10, 10, 10, 1)
        assert (st.block_size, st.stride, st.capacity, st.kind, st.name) == (72, 96, 10, cls.__name__, "cases")


@pytest.mark.parametrize("cls", KINDS)
def test_double_free_and_foreign_pointer(cls: type) -> None:
    with cls(64, 8) as p, cls(64, 8) as other:
        a = p.alloc()
        p.free(a)
        with pytest.raises(PoolDoubleFreeError, match="the block is not allocated"):
            p.free(a)
        b = p.alloc()
        with pytest.raises(PoolForeignPointerError, match="not the start of a block of this pool"):
            p.free(b + 8)
        with pytest.raises(PoolForeignPointerError, match="not the start of a block of this pool"):
            p.free(other.alloc())
        with pytest.raises(PoolForeignPointerError, match="not the start of a block"):
            p.free(8)
        with pytest.raises(PoolForeignPointerError, match=r"free of -1 refused: not an address \(0..2\*\*64-1\)"):
            p.free(-1)
        with pytest.raises(PoolForeignPointerError, match="not an address"):
            p.free(1 << 64)
        with pytest.raises(TypeError, match="a block address must be an int"):
            p.free("0x1000")
        with pytest.raises(TypeError, match="alloc\\(\\) takes no arguments"):
            p.alloc(1)
        assert p.stats().bad_frees == 4  # -1 and 2**64 are refused in Python, before the C pool
        assert p.stats().in_use == 1
        p.free(b)


@pytest.mark.parametrize("cls", KINDS)
def test_free_after_close_and_views_outlive_the_pool(cls: type) -> None:
    p = cls(64, 4)
    a = p.alloc()
    view = p.view(a)
    view[:5] = b"hello"
    records = p.records(np.dtype([("id", "<u8"), ("x", "<f8")]))
    p.close()
    p.close()  # idempotent
    with pytest.raises(PoolClosedError, match="the pool is closed"):
        p.free(a)
    with pytest.raises(PoolClosedError, match="the pool is closed"):
        p.alloc()
    assert p.stats().closed and p.stats().in_use == 1
    ref = weakref.ref(p)
    del p
    gc.collect()
    assert ref() is None
    # The memory stays mapped while views exist: no dangling view.
    assert bytes(view[:5]) == b"hello"
    records[0]["x"] = 2.5
    assert records[0]["x"] == 2.5


def test_records_view_and_dtype_errors() -> None:
    with FixedPool(40, 6) as p:
        dt = np.dtype([("case", "<u8"), ("state", "<u4"), ("ticks", "<u8", 3)], align=False)
        r = p.records(dt)
        assert r.shape == (6,) and r.strides == (p.stride,)
        a = p.alloc()
        r[p.index(a)]["case"] = 77
        assert int.from_bytes(bytes(p.view(a)[:8]), "little") == 77
        with pytest.raises(ValueError, match=r"dtype .* has 48 bytes per record; a block of this pool holds 1 to 40"):
            p.records(np.dtype(("u8", 6)))
        with pytest.raises(TypeError, match="holds Python objects"):
            p.records(object)
        with pytest.raises(TypeError, match="is not a numpy dtype"):
            p.records("nonsense-dtype")
        with pytest.raises(IndexError, match=r"block index 6 is out of range 0\.\.5"):
            p.address(6)
        with pytest.raises(PoolForeignPointerError, match="is not the start of one of its blocks"):
            p.index(a + 1)


def test_alloc_many_free_many_all_or_nothing() -> None:
    with FixedPool(16, 10) as p:
        a = p.alloc_many(6)
        assert a.dtype == np.uint64 and len(set(a.tolist())) == 6
        with pytest.raises(PoolExhaustedError, match="all 10 blocks of 16 bytes are in use"):
            p.alloc_many(5)
        assert p.stats().in_use == 6  # the 4 it took were given back
        p.free_many(a[:3])
        with pytest.raises(PoolDoubleFreeError, match=r"free_many \(after 3 of 4 were freed\)"):
            p.free_many(np.concatenate([a[3:], a[:1]]))
        assert p.stats().in_use == 0
        with pytest.raises(ValueError, match="n must be >= 0, got -1"):
            p.alloc_many(-1)
        with pytest.raises(ValueError, match="addrs must be 1-D"):
            p.free_many(np.zeros((2, 2), dtype=np.uint64))


def test_fixed_pool_refuses_other_threads() -> None:
    p = FixedPool(64, 4)
    a = p.alloc()
    errors: list[BaseException] = []

    def other() -> None:
        for call in (p.alloc, lambda: p.free(a)):
            try:
                call()
            except BaseException as exc:
                errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert [type(e) for e in errors] == [PoolThreadError, PoolThreadError]
    assert "belongs to the thread that created it" in str(errors[0])
    assert "use LockFreePool or ThreadLocalPool" in str(errors[0])
    p.free(a)
    p.close()


def test_write_after_free_is_caught_not_handed_out_twice() -> None:
    with FixedPool(64, 8) as p:
        a, b = p.alloc(), p.alloc()
        stale = p.view(a)
        p.free(b)
        p.free(a)  # free list: a -> b
        stale[:4] = (b"\x07\x00\x00\x00")  # forge a's link to block 6 ... (7 = block 6 + 1)
        assert p.alloc() == a
        c = p.alloc()  # pops block 6, never handed out: allowed (it is free)
        assert p.index(c) == 6
        stale2 = p.view(c)
        p.free(c)
        stale2[:4] = (1).to_bytes(4, "little")  # link to block 0 = a, which is allocated
        assert p.alloc() == c  # c itself is free: handed out
        with pytest.raises(PoolCorruptError, match="a free-list link was overwritten"):
            p.alloc()  # the forged link names a: refused, never handed out twice
        with pytest.raises(PoolCorruptError, match="a free-list link was overwritten"):
            p.alloc()  # after a corruption the pool hands out no more blocks rather than guess
        p.free(a)
        p.free(c)


FORK_CHILD = """
import os, sys
from knhk_memory.pools import {cls}
p = {cls}(64, 8)
a = p.alloc()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    out = []
    for call in (p.alloc, lambda: p.free(a)):
        try:
            call()
            out.append("ok")
        except Exception as exc:
            out.append(type(exc).__name__ + ": " + str(exc))
    os.write(w, "\\n".join(out).encode())
    os._exit(0)
os.close(w)
data = os.read(r, 65536).decode()
os.waitpid(pid, 0)
print(data)
p.free(a)   # the parent keeps working
print("parent ok", p.stats().in_use)
"""


@pytest.mark.parametrize("cls", ["FixedPool", "LockFreePool", "ThreadLocalPool"])
def test_use_in_forked_child_is_refused(cls: str) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FORK_CHILD.format(cls=cls)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("PoolForkedError: ") and "created before a fork() and is used in the child" in lines[0]
    assert "make pools after fork()" in lines[0]
    assert lines[1].startswith("PoolForkedError: ")
    assert lines[2] == "parent ok 0"


# ---------------------------------------------------------------- concurrency

def test_lock_free_pool_stress_exact_accounting() -> None:
    with LockFreePool(64, 64) as p:
        ops = p.stress(threads=4, iterations=20_000, hold=8)
        assert ops["allocations"] == ops["frees"] == 4 * 20_000 * 8 - 0  # capacity 64 >= 4 x 8: never exhausted
        st = p.stats()
        assert (st.in_use, st.allocations, st.frees) == (0, ops["allocations"], ops["frees"])
        assert st.high_water <= 32


def test_lock_free_pool_stress_when_exhausted() -> None:
    with LockFreePool(64, 12) as p:  # 3 threads x 8 > 12: some rounds run out
        ops = p.stress(threads=3, iterations=5_000, hold=8)
        st = p.stats()
        assert ops["allocations"] == ops["frees"] == st.allocations == st.frees
        assert st.failed == ops["exhausted"] and st.in_use == 0 and 8 <= st.high_water <= 12


def test_lock_free_pool_python_threads_exact() -> None:
    p = LockFreePool(32, 256)
    n, threads = 3000, 4
    seen_twice: list[int] = []

    def work(k: int) -> None:
        held = []
        for _ in range(n):
            a = p.alloc()
            p.view(a)[:1] = bytes([k])
            held.append(a)
            if len(held) == 16:
                for b in held:
                    if p.view(b)[0] != k:
                        seen_twice.append(b)
                    p.free(b)
                held = []
        for b in held:
            p.free(b)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    st = p.stats()
    assert not seen_twice
    assert (st.allocations, st.frees, st.in_use) == (n * threads, n * threads, 0)
    p.close()


def test_model_check_tagged_passes_every_schedule() -> None:
    for seed in range(40):
        assert model_check(seed, threads=3, ops=150, capacity=3) > 0


def test_model_check_finds_aba_without_the_tag() -> None:
    """The checker has teeth: with the generation tag off, some schedule hands a block out twice."""
    failures = []
    for seed in range(40):
        try:
            model_check(seed, threads=3, ops=150, capacity=3, untagged=True)
        except PoolError as exc:
            failures.append(str(exc))
    assert failures, "no schedule exposed the ABA problem of an untagged Treiber stack"
    assert any("handed to virtual thread" in f or "free list is corrupt" in f or "blocks lost" in f for f in failures)


def test_model_check_bad_arguments() -> None:
    with pytest.raises(PoolError, match=r"threads 1\.\.16, capacity 1\.\.4096"):
        model_check(1, threads=0)


def test_thread_local_pool_stress_cross_thread_exact() -> None:
    with ThreadLocalPool(64, 4096, cache_size=32) as p:
        ops = p.stress(threads=4, iterations=3000)
        st = p.stats()
        assert ops["allocations"] == ops["frees"] == st.allocations == st.frees
        assert st.in_use == 0 and st.cached == 0
        assert st.remote_frees > 0  # cross-thread frees happened, through the owners' remote lists


def test_thread_local_pool_cross_thread_free_and_flush_at_exit() -> None:
    p = ThreadLocalPool(64, 1000, cache_size=16)
    handed: list[int] = []
    done = threading.Event()

    def producer() -> None:
        for _ in range(40):
            handed.append(p.alloc())
        a = p.alloc()
        p.free(a)  # now the producer's cache holds blocks
        assert p.stats().cached > 0
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    t.join()
    assert done.is_set()
    # The producer exited: its cache went back to the shared list.
    assert _settled(p).cached == 0
    for a in handed:  # freed by another thread than the one that allocated them
        p.free(a)
    st = p.stats()
    assert (st.in_use, st.allocations, st.frees) == (0, 41, 41)
    p.flush()
    assert p.stats().cached == 0
    # every block can still be had
    got = [p.alloc() for _ in range(1000)]
    assert len(set(got)) == 1000
    with pytest.raises(PoolExhaustedError):
        p.alloc()
    for a in got:
        p.free(a)
    p.close()


def test_thread_local_pool_remote_free_to_live_owner() -> None:
    p = ThreadLocalPool(64, 100, cache_size=8)
    blocks: list[int] = []
    go, freed, finish = threading.Event(), threading.Event(), threading.Event()
    result: dict[str, int] = {}

    def owner() -> None:
        blocks.extend(p.alloc() for _ in range(8))
        go.set()
        freed.wait(10)
        # the owner's next allocations take its remote-free list first
        again = [p.alloc() for _ in range(8)]
        result["reused"] = len(set(again) & set(blocks))
        for a in again:
            p.free(a)
        finish.set()

    t = threading.Thread(target=owner)
    t.start()
    go.wait(10)
    for a in blocks:
        p.free(a)
    assert p.stats().remote_frees == 8
    freed.set()
    t.join()
    assert finish.is_set() and result["reused"] == 8
    assert p.stats().in_use == 0
    p.close()


def test_thread_local_more_threads_than_slots_still_works() -> None:
    # Slots are reused once threads exit, so 300 short threads in sequence all get caches.
    p = ThreadLocalPool(16, 64, cache_size=4)
    for _ in range(300):
        t = threading.Thread(target=lambda: p.free(p.alloc()))
        t.start()
        t.join()
    st = _settled(p)
    assert (st.allocations, st.frees, st.in_use, st.cached) == (300, 300, 0, 0)
    p.close()


def _settled(p: ThreadLocalPool, timeout: float = 10.0) -> pools.PoolStats:
    """Stats once exited threads have flushed: CPython's Thread.join() returns when the
    Python thread state is gone, a moment before the OS thread runs its key destructors."""
    import time

    deadline = time.monotonic() + timeout
    st = p.stats()
    while st.cached and time.monotonic() < deadline:
        time.sleep(0.001)
        st = p.stats()
    return st


def test_pools_exported_and_repr() -> None:
    import knhk_memory

    assert knhk_memory.FixedPool is FixedPool
    p = FixedPool(64, 4, name="tokens")
    assert repr(p) == "<FixedPool 'tokens' block_size=64 stride=64 capacity=4>"
    p.close()
    assert repr(p) == "<FixedPool 'tokens' block_size=64 stride=64 closed>"
    assert os.environ.get("KNHK_NO_SUCH") is None
