"""Block pools: fixed-size blocks from one region, in O(1), with a hard capacity.

Three kinds over the C core (native/pool.c), one Python shape:

- :class:`FixedPool`: an intrusive free list, no atomics, owned by the thread
  that made it. Deterministic O(1) ``alloc``/``free`` for real-time paths
  (case and token records churned at high rates).
- :class:`LockFreePool`: any thread; a Treiber stack with a generation-tagged
  head (ABA-safe), head and counters on their own cache lines.
- :class:`ThreadLocalPool`: any thread; a bounded cache of blocks per thread,
  refilled from and returned to a shared lock-free list; a block freed by
  another thread goes back to its owner's remote-free list with one CAS;
  caches go back to the shared list when their thread exits.

Blocks are addressed by integer address (``alloc() -> int``), like a C
pointer: ``view(addr)`` is a zero-copy memoryview of the block,
``index(addr)`` its number, and ``records(dtype)`` a numpy array over every
block (one record per block) for code that keeps structured records in the
pool. No pool ever grows: when every block is in use, ``alloc()`` raises
:class:`PoolExhaustedError` naming the capacity and the config key that sets
it.

Every call is checked, in release builds as much as debug ones (the C core
does it with a compare or two): freeing a block twice
(:class:`PoolDoubleFreeError`), an address that is not a block start of this
pool (:class:`PoolForeignPointerError`), use after ``close()``
(:class:`PoolClosedError`), use in a child process after ``fork()``
(:class:`PoolForkedError`), a FixedPool from another thread
(:class:`PoolThreadError`), a free-list link overwritten by a write to a
freed block (:class:`PoolCorruptError`). The region stays mapped until the
pool object and every view made from it are gone, so a view never dangles,
even after ``close()``.

Blocks come in size classes 2^k and 3 * 2^k (k >= 3) at least ``block_size``
and a multiple of ``align``: ``stride`` is the class (8, 16, 24, 32, 48, 64,
96, ...), at most a third of it padding for blocks above 16 bytes. What this
module is not: a general allocator (one block size per pool; see
:mod:`knhk_memory.allocator` and :mod:`knhk_memory.arena`).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from . import _fast
from ._core import ffi, lib, raise_status
from .errors import (
    PoolClosedError,
    PoolCorruptError,
    PoolDoubleFreeError,
    PoolError,
    PoolExhaustedError,
    PoolForeignPointerError,
    PoolForkedError,
    PoolThreadError,
)
from .numa import Placement, placement_spec, resolve

__all__ = ["FixedPool", "LockFreePool", "ThreadLocalPool", "PoolStats", "size_class", "model_check",
           "hot_ops", "py_hot_ops", "KINDS", "MAX_BLOCK", "MAX_CAPACITY", "MAX_BYTES", "DEFAULT_CACHE_SIZE"]

MIN_BLOCK = int(lib.KNHK_POOL_MIN_BLOCK)
MAX_BLOCK = int(lib.KNHK_POOL_MAX_BLOCK)
MAX_CAPACITY = int(lib.KNHK_POOL_MAX_CAPACITY)
MAX_BYTES = int(lib.KNHK_POOL_MAX_BYTES)
MAX_ALIGN = int(lib.KNHK_MAX_ALIGN)
MAX_CACHE = int(lib.KNHK_TLPOOL_MAX_CACHE)
DEFAULT_CACHE_SIZE = 64

_OK = int(lib.KNHK_POOL_OK)
_EXHAUSTED = int(lib.KNHK_POOL_EXHAUSTED)
_ERRORS: dict[int, type[PoolError]] = {
    int(lib.KNHK_POOL_DOUBLE_FREE): PoolDoubleFreeError,
    int(lib.KNHK_POOL_FOREIGN): PoolForeignPointerError,
    int(lib.KNHK_POOL_CLOSED): PoolClosedError,
    int(lib.KNHK_POOL_FORKED): PoolForkedError,
    int(lib.KNHK_POOL_WRONG_THREAD): PoolThreadError,
    int(lib.KNHK_POOL_CORRUPT): PoolCorruptError,
}
_ADVICE = {
    PoolDoubleFreeError: "free each block once, with an address alloc() returned",
    PoolForeignPointerError: "free only addresses this pool's alloc() returned",
    PoolClosedError: "create a new pool",
    PoolForkedError: "make pools after fork(), in the process that uses them (or use the spawn start method)",
    PoolThreadError: "use LockFreePool or ThreadLocalPool to share blocks between threads",
    PoolCorruptError: "a block was written to after it was freed; find the stale reference",
}


@dataclass(frozen=True)
class PoolStats:
    """A pool's geometry and figures (``knhk_pool_stats`` in native/knhk.h).

    Sizes in bytes, counts in blocks. ``in_use`` is exact; ``high_water`` is
    the most blocks in use at once (ThreadLocalPool: the most blocks out of
    the shared list at once, per-thread caches included); ``failed`` counts
    allocations refused because the pool was full, ``bad_frees`` frees refused
    (double, foreign, after close, after fork); ``cached`` the blocks in
    per-thread caches and ``remote_frees`` the frees handed to another
    thread's cache (ThreadLocalPool only).
    """

    kind: str
    name: str | None
    block_size: int
    stride: int
    align: int
    capacity: int
    region_bytes: int
    in_use: int
    high_water: int
    allocations: int
    frees: int
    failed: int
    bad_frees: int
    cached: int
    remote_frees: int
    numa: str | int | None
    closed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int_arg(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def size_class(block_size: int, align: int = 8) -> int:
    """The stride a pool uses for ``block_size`` bytes aligned to ``align``: the smallest of
    2^k and 3 * 2^k (k >= 3) that holds the block and is a multiple of ``align``."""
    bs, al = _check_geometry(block_size, 1, align)[:3:2]
    return int(lib.knhk_pool_size_class(bs, al))


def _check_geometry(block_size: Any, capacity: Any, align: Any) -> tuple[int, int, int]:
    bs = _int_arg(block_size, "block_size")
    if not 1 <= bs <= MAX_BLOCK:
        raise ValueError(f"block_size must be from 1 to {MAX_BLOCK} bytes, got {bs}")
    cap = _int_arg(capacity, "capacity")
    if not 1 <= cap <= MAX_CAPACITY:
        raise ValueError(f"capacity must be from 1 to {MAX_CAPACITY} blocks, got {cap}")
    al = _int_arg(align, "align")
    if al <= 0 or al > MAX_ALIGN or al & (al - 1):
        raise ValueError(f"align must be a power of two from 1 to {MAX_ALIGN}, got {al}")
    stride = int(lib.knhk_pool_size_class(bs, al))
    if cap * stride > MAX_BYTES:
        raise ValueError(f"capacity {cap} x {stride}-byte blocks (the size class of {bs} bytes) is "
                         f"{cap * stride} bytes, beyond the limit of {MAX_BYTES} bytes (1 TiB)")
    return bs, cap, al


class _Region:
    """Owns the C pool: destroyed when the last view of its memory is gone."""

    __slots__ = ("raw", "destroy")

    def __init__(self, raw: Any, destroy: Any) -> None:
        self.raw, self.destroy = raw, destroy

    def __call__(self, _cdata: Any) -> None:
        raw, self.raw = self.raw, None
        if raw is not None:
            self.destroy(raw)


class _Pool:
    """What the three pools share; see the module docstring."""

    kind = ""
    _c: ClassVar[dict[str, Any]] = {}

    # No __slots__: alloc and free are replaced per instance by the C builtins (native/cpython/pool_py.c).
    _fast_kind = 0

    def _setup(self, block_size: Any, capacity: Any, align: Any, numa: Any, node: Any, name: str | None,
               config_key: str | None, create: Any) -> None:
        self._raw = None
        bs, cap, al = _check_geometry(block_size, capacity, align)
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name must be a non-empty string or None, got {name!r}")
        self.placement: Placement | None = resolve(numa, node)
        spec, keep = placement_spec(self.placement)
        out = ffi.new(f"{self._c['type']} **")
        status = create(bs, cap, al, spec, out)
        del keep
        if status != lib.KNHK_OK:
            if status == lib.KNHK_ERR_NOMEM:
                raise MemoryError(f"{self.kind}: {ffi.string(lib.knhk_last_error()).decode()}")
            from .errors import NumaError
            exc = NumaError if self.placement is not None and status == lib.KNHK_ERR_UNAVAILABLE else PoolError
            raise_status(status, f"creating a {self.kind}", exc)
        raw = out[0]
        self.block_size, self.capacity, self.align = bs, cap, al
        self.name, self.config_key = name, config_key
        stats = ffi.new("knhk_pool_stats *")
        self._c["stats"](raw, stats)
        self.stride = int(stats.stride)
        base = self._c["base"](raw)
        self._base = int(ffi.cast("uintptr_t", base))
        # The region's memory, owned by a cdata whose destructor destroys the
        # pool: every view holds it, so the memory outlives close() and the
        # pool object as long as any view does.
        self._mem = ffi.gc(ffi.cast("char *", base), _Region(raw, self._c["destroy"]))
        self._view = memoryview(ffi.buffer(self._mem, int(stats.region_bytes)))
        self._raw = raw
        self._cpool = raw  # kept after close(): stats() reads the final figures from it
        self._problem = ffi.new("int *")
        self._alloc = self._c["alloc"]
        self._free = self._c["free"]
        # The per-call path: METH_FASTCALL builtins (native/cpython/pool_py.c), which keep
        # this object (and so the C pool) alive.
        self.alloc, self.free = _make_fast(  # type: ignore[method-assign,assignment]
            self._fast_kind, int(ffi.cast("uintptr_t", raw)), self)

    # -- errors
    def _label(self) -> str:
        return f"{self.kind} {self.name!r}" if self.name else self.kind

    def _raise(self, problem: int, what: str, addr: int | None = None) -> Any:
        if problem == _EXHAUSTED:
            key = self.config_key or (f"pools.{self.name}.capacity" if self.name else "pools.<name>.capacity")
            raise PoolExhaustedError(
                f"{self._label()} is exhausted: all {self.capacity} blocks of {self.block_size} bytes are in use "
                f"(capacity {self.capacity}); free blocks, or raise the capacity (config key {key}, or "
                f"capacity= when making the pool)")
        exc = _ERRORS.get(problem, PoolError)
        detail = ffi.string(lib.knhk_last_error()).decode("utf-8", "replace")
        where = f" of address {addr:#x}" if addr is not None else ""
        raise exc(f"{self._label()}: {what}{where} refused: {detail}; {_ADVICE.get(exc, '')}".rstrip("; "))

    def _usable(self, what: str) -> Any:
        raw = self._raw
        if raw is None:
            raise PoolClosedError(f"cannot {what}: {self._label()} is closed; {_ADVICE[PoolClosedError]}")
        return raw

    # -- blocks
    def alloc(self) -> int:
        """The address (int) of a free block of ``block_size`` bytes (contents undefined).

        Raises :class:`PoolExhaustedError` when every block is in use, and the
        errors of the module docstring. O(1)."""
        raw = self._raw
        if raw is None:
            raw = self._usable("alloc")
        addr = self._alloc(raw, self._problem)
        if not addr:
            self._raise(self._problem[0], "alloc")
        return addr

    def free(self, addr: int) -> None:
        """Give the block at ``addr`` back. O(1). Raises :class:`PoolDoubleFreeError`,
        :class:`PoolForeignPointerError`, :class:`PoolClosedError`, ... (see the module)."""
        raw = self._raw
        if raw is None:
            raw = self._usable("free")
        if type(addr) is not int:
            addr = self._addr_arg(addr)
        if not 0 <= addr < 1 << 64:
            raise PoolForeignPointerError(f"{self._label()}: free of {addr!r} refused: not an address "
                                          f"(0..2**64-1); {_ADVICE[PoolForeignPointerError]}")
        r = self._free(raw, addr)
        if r:
            self._raise(r, "free", addr)

    def _slow_free(self, addr: Any) -> None:
        """free() of something that is not an int in 0..2**64-1 (the builtin hands it here)."""
        a = self._addr_arg(addr)
        if not 0 <= a < 1 << 64:
            raise PoolForeignPointerError(f"{self._label()}: free of {a!r} refused: not an address "
                                          f"(0..2**64-1); {_ADVICE[PoolForeignPointerError]}")
        _Pool.free(self, a)

    @staticmethod
    def _addr_arg(addr: Any) -> int:
        if isinstance(addr, bool) or not isinstance(addr, (int, np.integer)):
            raise TypeError(f"a block address must be an int (from alloc()), got {type(addr).__name__} {addr!r}")
        return int(addr)

    def index(self, addr: int) -> int:
        """The block number (0..capacity-1) of the block at ``addr``."""
        a = self._addr_arg(addr)
        off = a - self._base
        if off < 0 or off >= self.capacity * self.stride or off % self.stride:
            raise PoolForeignPointerError(f"{self._label()}: {a:#x} is not the start of one of its blocks "
                                          f"(base {self._base:#x}, {self.capacity} blocks of stride {self.stride})")
        return off // self.stride

    def address(self, index: int) -> int:
        """The address of block number ``index``."""
        i = _int_arg(index, "index")
        if not 0 <= i < self.capacity:
            raise IndexError(f"block index {i} is out of range 0..{self.capacity - 1}")
        return self._base + i * self.stride

    def view(self, addr: int) -> memoryview:
        """A writable, zero-copy memoryview of the ``block_size`` bytes of the block at ``addr``.

        It keeps the pool's memory mapped while it lives (after ``close()`` too)."""
        off = self.index(addr) * self.stride
        return self._view[off:off + self.block_size]

    def records(self, dtype: Any) -> np.ndarray:
        """A numpy array of ``capacity`` records of ``dtype``, record i in block i (zero-copy,
        strides = ``stride``). ``dtype.itemsize`` must fit in ``block_size``."""
        try:
            dt = np.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"dtype {dtype!r} is not a numpy dtype ({exc})") from None
        if dt.hasobject:
            raise TypeError(f"dtype {dt} holds Python objects, which cannot live in a pool")
        if not 0 < dt.itemsize <= self.block_size:
            raise ValueError(f"dtype {dt} has {dt.itemsize} bytes per record; a block of this pool holds "
                             f"1 to {self.block_size}")
        return np.ndarray((self.capacity,), dtype=dt, buffer=self._view, strides=(self.stride,))

    # -- life cycle
    @property
    def closed(self) -> bool:
        return self._raw is None

    def close(self) -> None:
        """Stop serving blocks. Idempotent; from any thread.

        Views and record arrays already handed out stay valid until they are dropped
        (each keeps the pool's region mapped; the C pool is destroyed with the last of
        them). A call another thread makes meanwhile completes or raises
        :class:`PoolClosedError`: the closed flag is an atomic the C core checks on
        every call, and the pool's memory outlives every call (issue 22)."""
        raw = self._raw
        if raw is None:
            return
        self._c["close"](raw)
        self._raw = None

    def stats(self) -> PoolStats:
        """The pool's figures; after close(), the final ones (``closed`` True): a call that
        was running when close() came is counted once it returns."""
        out = ffi.new("knhk_pool_stats *")
        self._c["stats"](self._cpool, out)
        return PoolStats(self.kind, self.name, int(out.block_size), int(out.stride), int(out.align),
                         int(out.capacity), int(out.region_bytes), int(out.in_use), int(out.high_water),
                         int(out.allocations), int(out.frees), int(out.failed), int(out.bad_frees),
                         int(out.cached), int(out.remote_frees),
                         self.placement.describe() if self.placement is not None else None, bool(out.closed))

    @property
    def cdata(self) -> Any:
        """The C pool pointer for other parts of the C core."""
        return self._usable("hand out the pool pointer")

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._raw is None else f"capacity={self.capacity}"
        label = f" {self.name!r}" if self.name else ""
        return f"<{self.kind}{label} block_size={self.block_size} stride={self.stride} {state}>"


class FixedPool(_Pool):
    """``capacity`` blocks of ``block_size`` bytes from one region; O(1) alloc and free from an
    intrusive free list; never grows.

    :param block_size: Bytes per block, 1 to 2**30 (served from the size class, see :func:`size_class`).
    :param capacity: Blocks, 1 to 2**32 - 2; the region (capacity x stride) at most 1 TiB. Pages
        are touched only when their blocks are first handed out.
    :param align: Block alignment, a power of two up to 4096 (default 8).
    :param numa: ``"local"``, ``"interleave"`` or a node number: where the region's pages go
        (:mod:`knhk_memory.numa`); ``node=N`` is the same as ``numa=N``.
    :param name: Reported in errors and statistics (the ``[pools.<name>]`` config section).

    The pool belongs to the thread that made it: a call from another thread raises
    :class:`PoolThreadError` (checked in C, release builds included). Not fork-safe by design:
    in a forked child every call raises :class:`PoolForkedError`.
    """

    kind = "FixedPool"
    _c: ClassVar[dict[str, Any]] = {
          "type": "knhk_pool", "create": lib.knhk_pool_create, "destroy": lib.knhk_pool_destroy,
          "close": lib.knhk_pool_close, "alloc": lib.knhk_pool_alloc_addr, "free": lib.knhk_pool_free_addr,
          "stats": lib.knhk_pool_stats_get, "base": lib.knhk_pool_base}

    def __init__(self, block_size: int, capacity: int, *, align: int = 8, numa: str | int | None = None,
                 node: int | None = None, name: str | None = None, config_key: str | None = None) -> None:
        self._setup(block_size, capacity, align, numa, node, name, config_key, lib.knhk_pool_create)

    def alloc_many(self, n: int) -> np.ndarray:
        """``n`` block addresses (uint64 array) in one C call; all or none: raises
        :class:`PoolExhaustedError` (and frees what it took) when fewer than n are free."""
        raw = self._usable("alloc")
        n = _int_arg(n, "n")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out = np.empty(n, dtype=np.uint64)
        got = lib.knhk_pool_alloc_many(raw, ffi.from_buffer("uint64_t[]", out), n, self._problem)
        if got != n:
            problem = self._problem[0]
            lib.knhk_pool_free_many(raw, ffi.from_buffer("uint64_t[]", out), got, ffi.NULL)
            self._raise(problem, f"alloc_many({n})")
        return out

    def free_many(self, addrs: Any) -> None:
        """Free every address of ``addrs`` (a uint64 array or a sequence of ints) in one C call.
        Stops at the first bad one and raises its error; the ones before it are freed."""
        raw = self._usable("free")
        a = np.ascontiguousarray(addrs, dtype=np.uint64)
        if a.ndim != 1:
            raise ValueError(f"addrs must be 1-D, got shape {a.shape}")
        done = lib.knhk_pool_free_many(raw, ffi.from_buffer("uint64_t[]", a), a.size, self._problem)
        if done != a.size:
            self._raise(self._problem[0], f"free_many (after {done} of {a.size} were freed)", int(a[done]))

    def alloc_indices(self, n: int) -> np.ndarray:
        """As :meth:`alloc_many`, but block numbers (int64, 0..capacity-1): the rows of
        :meth:`records` the new blocks are."""
        raw = self._usable("alloc")
        n = _int_arg(n, "n")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out = np.empty(n, dtype=np.int64)
        buf = ffi.from_buffer("int64_t[]", out)
        got = lib.knhk_pool_alloc_many_index(raw, buf, n, self._problem)
        if got != n:
            problem = self._problem[0]
            lib.knhk_pool_free_many_index(raw, buf, got, ffi.NULL)
            self._raise(problem, f"alloc_indices({n})")
        return out

    def free_indices(self, indices: Any) -> None:
        """As :meth:`free_many`, by block number; a number outside 0..capacity-1 is a
        :class:`PoolForeignPointerError`."""
        raw = self._usable("free")
        a = np.ascontiguousarray(indices, dtype=np.int64)
        if a.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {a.shape}")
        done = lib.knhk_pool_free_many_index(raw, ffi.from_buffer("int64_t[]", a), a.size, self._problem)
        if done != a.size:
            self._raise(self._problem[0], f"free_indices (after {done} of {a.size} were freed) of block "
                        f"number {int(a[done])}")

    def is_allocated(self, index: int) -> bool:
        """Whether block number ``index`` is handed out."""
        i = _int_arg(index, "index")
        r = lib.knhk_pool_is_allocated(self._usable("read block state"), i) if 0 <= i < self.capacity else -1
        if r < 0:
            raise IndexError(f"block index {i} is out of range 0..{self.capacity - 1}")
        return bool(r)


class LockFreePool(_Pool):
    """A :class:`FixedPool` that any thread may use: the free list is a Treiber stack with a
    32-bit generation tag beside the 32-bit block number in its 64-bit head (ABA-safe), links
    kept beside the blocks. Parameters as :class:`FixedPool`."""

    kind = "LockFreePool"
    _c: ClassVar[dict[str, Any]] = {
          "type": "knhk_lfpool", "create": lib.knhk_lfpool_create, "destroy": lib.knhk_lfpool_destroy,
          "close": lib.knhk_lfpool_close, "alloc": lib.knhk_lfpool_alloc_addr, "free": lib.knhk_lfpool_free_addr,
          "stats": lib.knhk_lfpool_stats_get, "base": lib.knhk_lfpool_base}
    _fast_kind = 1

    def __init__(self, block_size: int, capacity: int, *, align: int = 8, numa: str | int | None = None,
                 node: int | None = None, name: str | None = None, config_key: str | None = None) -> None:
        self._setup(block_size, capacity, align, numa, node, name, config_key, lib.knhk_lfpool_create)

    def stress(self, threads: int = 2, iterations: int = 10_000, hold: int = 8) -> dict[str, int]:
        """Run the C stress check: ``threads`` pthreads each take ``hold`` blocks, stamp, check and
        free them ``iterations`` times. Returns the operation counts; raises :class:`PoolError`
        when a block was held by two threads at once or the counts do not add up."""
        ops = ffi.new("uint64_t[3]")
        status = lib.knhk_lfpool_stress(self._usable("stress"), threads, iterations, hold, ops)
        if status != lib.KNHK_OK:
            raise_status(status, "LockFreePool stress check", PoolError)
        return {"allocations": int(ops[0]), "frees": int(ops[1]), "exhausted": int(ops[2])}


class ThreadLocalPool(_Pool):
    """Any thread; per-thread caches of up to ``cache_size`` blocks (2..65536, default 64) over a
    shared lock-free list. The owner's alloc and free touch only its cache; a block freed by
    another thread goes onto its owner's remote-free list (one CAS, no lock); a thread's cache
    goes back to the shared list when the thread exits (or at :meth:`flush`). Other parameters
    as :class:`FixedPool`. Up to 256 threads get a cache; more use the shared list directly.

    The exit flush runs in a pthread key destructor, when the OS thread ends: CPython's
    ``Thread.join()`` returns a moment before that, so ``stats().cached`` may still count the
    thread's blocks just after a join. ``high_water`` counts blocks out of the shared list
    (cached ones included): the memory the pool's users kept busy."""

    kind = "ThreadLocalPool"
    _c: ClassVar[dict[str, Any]] = {
          "type": "knhk_tlpool", "destroy": lib.knhk_tlpool_destroy, "close": lib.knhk_tlpool_close,
          "alloc": lib.knhk_tlpool_alloc_addr, "free": lib.knhk_tlpool_free_addr,
          "stats": lib.knhk_tlpool_stats_get, "base": lib.knhk_tlpool_base}
    _fast_kind = 2

    def __init__(self, block_size: int, capacity: int, *, cache_size: int = DEFAULT_CACHE_SIZE, align: int = 8,
                 numa: str | int | None = None, node: int | None = None, name: str | None = None,
                 config_key: str | None = None) -> None:
        cs = _int_arg(cache_size, "cache_size")
        if not 2 <= cs <= MAX_CACHE:
            raise ValueError(f"cache_size must be from 2 to {MAX_CACHE} blocks, got {cs}")
        self.cache_size = cs

        def create(bs: int, cap: int, al: int, spec: Any, out: Any) -> int:
            return lib.knhk_tlpool_create(bs, cap, al, cs, spec, out)

        self._setup(block_size, capacity, align, numa, node, name, config_key, create)

    def flush(self) -> None:
        """Return the calling thread's cached blocks to the shared list now."""
        lib.knhk_tlpool_flush(self._usable("flush"))

    def stress(self, threads: int = 2, iterations: int = 10_000) -> dict[str, int]:
        """The C stress check with cross-thread frees (half of every other round's blocks are
        freed by the next thread). Returns the counts; raises :class:`PoolError` on a fault."""
        ops = ffi.new("uint64_t[3]")
        status = lib.knhk_tlpool_stress(self._usable("stress"), threads, iterations, ops)
        if status != lib.KNHK_OK:
            raise_status(status, "ThreadLocalPool stress check", PoolError)
        return {"allocations": int(ops[0]), "frees": int(ops[1])}


KINDS: dict[str, type[FixedPool] | type[LockFreePool] | type[ThreadLocalPool]] = {
    "fixed": FixedPool, "lockfree": LockFreePool, "threadlocal": ThreadLocalPool}


def model_check(seed: int, *, threads: int = 3, ops: int = 200, capacity: int = 3, untagged: bool = False) -> int:
    """Run the Treiber stack's push and pop under one randomised schedule (``seed``): ``threads``
    virtual threads, one running at a time, switching at every shared-memory step. Returns the
    steps taken; raises :class:`PoolError` naming the fault (a block handed out twice, a lost
    block). ``untagged=True`` checks a variant without the ABA tag, which must fail for some seed."""
    steps = ffi.new("uint64_t *")
    status = lib.knhk_lfpool_model_check(seed, threads, ops, capacity, int(untagged), steps)
    if status != lib.KNHK_OK:
        raise_status(status, "Treiber stack model check", PoolError)
    return int(steps[0])


# ---------------------------------------------------------------- hot paths

def hot_ops() -> list[Any]:
    """The FixedPool's C hot path for the tick harness (see knhk_memory.hotpath)."""
    from .hotpath import HotOp

    def setup() -> tuple[Any, Any]:
        pool = FixedPool(64, 1024)
        return ffi.cast("void *", pool.cdata), pool.close

    return [HotOp(
        name="pool_alloc_free",
        description="one FixedPool alloc + free pair of a 64-byte block (pop and push of the intrusive "
                    "free list with the release-build checks: owner, closed, fork generation, range, "
                    "stride, state byte)",
        fn=ffi.addressof(lib, "knhk_pool_hotop_alloc_free"),
        setup=setup,
    )]


def py_hot_ops() -> list[Any]:
    """The FixedPool's Python call pair, held to a budget in nanoseconds."""
    from .hotpath import PyHotOp

    def setup() -> tuple[Any, Any]:
        pool = FixedPool(64, 1024)
        alloc, free = pool.alloc, pool.free

        def call() -> None:
            free(alloc())

        return call, pool.close

    return [PyHotOp(
        name="py_pool_alloc_free",
        description="FixedPool.alloc() + FixedPool.free(addr) from Python (two METH_FASTCALL builtins)",
        setup=setup,
    )]


_ = threading  # threads are the C core's; the module needs no lock of its own

_make_fast = _fast.make_pool_fast
