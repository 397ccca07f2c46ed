"""Arenas: bump allocation for batches of short-lived buffers, and numpy arrays inside them.

An :class:`Arena` takes memory from an allocator backend in chunks and hands
it out by moving a pointer; ``reset()`` makes all of it available again for
the next batch and ``close()`` returns it. A batch of a thousand buffers costs
a handful of backend calls, and a repeat batch none.

``with arena.scope():`` makes numpy allocate array data from the arena (a NEP
49 handler in the calling thread's context), without any change to the code
that makes the arrays. Arrays may outlive the scope: every block handed out is
counted, and

- ``reset()`` never waits for live blocks and never recycles memory an array
  still uses: a chunk holding a live block is *pinned* (set aside, untouched)
  and comes back once its last block is freed; every other chunk is reused.
  A straggler array pins its own chunk, not the arena (``stats()`` shows
  ``pinned_chunks`` and ``pinned_bytes``);
- ``close()`` never fails for live blocks: the arena stops allocating and
  returns its memory to the backend when the last block is freed. Memoryviews
  and arrays already handed out stay valid (each holds its block, and so the
  arena's memory) however the close and the owner's calls interleave.

``close()`` may come from any thread (an engine shutting down). A call the
owner is making meanwhile either completes or raises :class:`ArenaClosedError`,
never touches freed memory: the owner marks each call into the core as in
flight, and a close from another thread waits for that call to return before it
drops the arena (issue 22; tests/test_close_race.py).

An arena belongs to the thread that created it: allocation, ``reset()``,
``scope()`` and ``stats()`` from another thread raise :class:`ArenaThreadError`
(freeing a block, i.e. dropping an array, works from any thread). Use
:class:`ThreadLocalArena` for one arena per thread.

What this module is not: a general-purpose allocator. Blocks are not reused
individually (except the most recent one, so temporaries made and dropped in a
loop reuse the same bytes); the memory comes back at ``reset()``, chunk by
chunk (see native/arena.c).
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from . import _fast
from ._core import check, check_as, ffi, lib
from ._forksafe import renew_in_child
from .allocator import Backend, BackendName, _HandlerToken, _index_arg, get_backend, selected_backend
from .errors import ArenaClosedError, ArenaThreadError
from .numa import check_placement, placement_spec
from .numa import resolve as resolve_placement

__all__ = ["Arena", "ArenaStats", "ThreadLocalArena", "DEFAULT_CHUNK_SIZE", "DEFAULT_MAX_CHUNK_SIZE",
           "huge_pages_available", "hot_ops"]

DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_MAX_CHUNK_SIZE = 16 * 1024 * 1024
MIN_CHUNK = int(lib.KNHK_ARENA_MIN_CHUNK)
MAX_CHUNK = int(lib.KNHK_ARENA_MAX_CHUNK)
MAX_REQUEST = int(lib.KNHK_ARENA_MAX_REQUEST)
MAX_ALIGN = int(lib.KNHK_MAX_ALIGN)
_get_ident = threading.get_ident


@dataclass(frozen=True)
class ArenaStats:
    """An arena's figures (see ``knhk_arena_stats`` in native/knhk.h).

    ``backend_calls`` counts every chunk allocation and free the arena made on
    its backend; ``huge_page_chunks`` the chunks the kernel accepted the
    ``MADV_HUGEPAGE`` hint for.
    """

    allocations: int
    reallocations: int
    bytes_requested: int
    bytes_reserved: int
    bytes_used: int
    high_water: int
    chunks: int
    backend_calls: int
    live_blocks: int
    resets: int
    huge_page_chunks: int
    next_chunk_size: int
    pinned_chunks: int = 0
    pinned_bytes: int = 0
    closed: bool = False

    def as_dict(self) -> dict[str, int | bool]:
        return asdict(self)


_STAT_FIELDS = ("allocations", "reallocations", "bytes_requested", "bytes_reserved", "bytes_used", "high_water",
                "chunks", "backend_calls", "live_blocks", "resets", "huge_page_chunks", "next_chunk_size",
                "pinned_chunks", "pinned_bytes")


def huge_pages_available() -> bool:
    """Whether the kernel offers transparent huge pages (``madvise`` or ``always`` mode)."""
    return bool(lib.knhk_arena_huge_pages_available())


def _chunk_arg(value: Any, what: str) -> int:
    n = _index_arg(value, what)
    if not MIN_CHUNK <= n <= MAX_CHUNK:
        raise ValueError(f"{what} must be from {MIN_CHUNK} to {MAX_CHUNK} bytes, got {n}")
    return n


def _size_arg(nbytes: Any) -> int:
    n = _index_arg(nbytes, "nbytes")
    if n <= 0:
        raise ValueError(f"nbytes must be a positive number of bytes, got {n}")
    if n > MAX_REQUEST:
        raise ValueError(f"nbytes {n} is beyond what an arena serves (at most {MAX_REQUEST} bytes, 16 TiB)")
    return n


def _align_arg(align: Any) -> int:
    a = _index_arg(align, "align")
    if a <= 0 or a > MAX_ALIGN or a & (a - 1):
        raise ValueError(f"align must be a power of two from 1 to {MAX_ALIGN}, got {a}")
    return a


def _backend_arg(backend: Backend | BackendName | None) -> Backend:
    if backend is None:
        return selected_backend()
    if isinstance(backend, str):
        return get_backend(backend)
    if isinstance(backend, Backend):
        return backend
    raise TypeError(f"backend must be a Backend, a backend name or None, got {type(backend).__name__}")


class Arena(_fast.ArenaBase):
    """A bump allocator over chunks from a backend (default: the selected backend).

    :param chunk_size: The first chunk's size in bytes; each new chunk doubles
        it, up to ``max_chunk_size``. From 4 KiB to 1 TiB.
    :param max_chunk_size: The growth cap (default: 16 MiB, or ``chunk_size`` if larger).
    :param huge_pages: Hint ``MADV_HUGEPAGE`` on chunks of 2 MiB or more.
    :param backend: A :class:`Backend`, its name, or None for the selected one.
    :param numa: ``"local"``, ``"interleave"`` or a node number: the NUMA placement of every chunk
        (whole pages, moved if the allocator had touched them; :mod:`knhk_memory.numa`). ``node=N``
        is the same as ``numa=N``. Checked against the machine's nodes and the kernel at creation
        (:class:`~knhk_memory.errors.NumaError`); later refusals are counted in :meth:`numa_counts`.
    """

    __slots__ = ("backend", "chunk_size", "max_chunk_size", "huge_pages", "placement", "_ptr", "_raw", "_free",
                 "_owner", "_status", "_final", "_busy", "_pid", "__weakref__")

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, *, max_chunk_size: int | None = None,
                 huge_pages: bool = True, backend: Backend | BackendName | None = None,
                 numa: str | int | None = None, node: int | None = None) -> None:
        self._raw: Any = None
        self._busy = False  # the owner is inside a call into the core (close() waits for it)
        cs = _chunk_arg(chunk_size, "chunk_size")
        mcs = max(DEFAULT_MAX_CHUNK_SIZE, cs) if max_chunk_size is None else _chunk_arg(max_chunk_size,
                                                                                        "max_chunk_size")
        if mcs < cs:
            raise ValueError(f"max_chunk_size ({mcs}) must be at least chunk_size ({cs})")
        if not isinstance(huge_pages, bool):
            raise TypeError(f"huge_pages must be a bool, got {type(huge_pages).__name__} {huge_pages!r}")
        self.backend = _backend_arg(backend)
        self.placement = resolve_placement(numa, node)
        if self.placement is not None:
            check_placement(self.placement)  # the kernel accepts it: a refusal is an error here, not a count later
        self.chunk_size, self.max_chunk_size, self.huge_pages = cs, mcs, huge_pages
        out = ffi.new("knhk_arena **")
        check(lib.knhk_arena_create(self.backend.cdata, cs, mcs, int(huge_pages), out), "creating an arena")
        self._raw = out[0]
        # The owner's reference, dropped by close() or when the Arena is collected.
        self._ptr = ffi.gc(out[0], lib.knhk_arena_close)
        # alloc() and array() are C methods of the base class
        # (native/cpython/arena_py.c) for the common call; they fall back to
        # _alloc_slow and _array_slow below for everything else.
        self._fast_bind(int(ffi.cast("uintptr_t", out[0])))
        self._free = functools.partial(lib.knhk_arena_block_free, self._raw)
        self._owner = threading.get_ident()
        self._pid = os.getpid()
        self._status = ffi.new("int *")
        self._final: ArenaStats | None = None
        if self.placement is not None:
            spec, keep = placement_spec(self.placement)
            status = lib.knhk_arena_set_numa(self._raw, spec)
            del keep
            check(status, "setting the arena's NUMA placement")

    def numa_counts(self) -> tuple[int, int]:
        """``(placed, refused)``: chunks put under the NUMA placement, and chunks the kernel refused."""
        placed, refused = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        self._busy = True
        try:
            status = lib.knhk_arena_numa_counts(self._usable("read NUMA counts"), placed, refused)
        finally:
            self._busy = False
        check(status, "arena NUMA counts")
        return int(placed[0]), int(refused[0])

    # -- state checks
    @property
    def closed(self) -> bool:
        return self._raw is None

    def _usable(self, what: str) -> Any:
        raw = self._raw
        if raw is None:
            raise ArenaClosedError(f"cannot {what}: the arena is closed; create a new Arena")
        if threading.get_ident() != self._owner:
            raise ArenaThreadError(f"cannot {what} from thread {threading.get_ident()}: the arena belongs to "
                                   f"thread {self._owner}, which created it; use one arena per thread "
                                   "(ThreadLocalArena)")
        return raw

    def _failed(self, what: str) -> None:
        check_as(self._status[0], what=what, special={lib.KNHK_ERR_NOMEM: lambda d: MemoryError(f"{what}: {d}")})

    # -- allocation
    def _alloc_slow(self, nbytes: int, align: int = 16) -> memoryview:
        """``alloc`` for what the C method does not take: checks, converts
        (numpy integers), allocates through cffi, or raises."""
        # In flight from before the closed check until the core returns (see close()).
        self._busy = True
        try:
            raw = self._raw
            if raw is None or _get_ident() != self._owner:
                raw = self._usable("allocate")
            # Checked inline for the common case: this is the per-buffer path.
            n = nbytes if type(nbytes) is int and 0 < nbytes <= MAX_REQUEST else _size_arg(nbytes)
            a = 16 if type(align) is int and align == 16 else _align_arg(align)
            ptr = lib.knhk_arena_block_alloc(raw, n, a, self._status)
        finally:
            self._busy = False
        if ptr == ffi.NULL:
            self._failed(f"arena allocation of {n} bytes aligned to {a}")
        return memoryview(ffi.buffer(ffi.gc(ptr, self._free), n))

    def _array_slow(self, shape: int | tuple[int, ...], dtype: Any = None, *, align: int | None = None) -> Any:
        """``array`` for what the C method does not take (dtype None is numpy's
        default, float64): checks, converts or raises; a dtype that passes is
        remembered so the next call with it takes the C method."""
        import numpy as np

        self._usable("allocate an array")
        try:
            dt = np.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"dtype {dtype!r} is not a numpy dtype ({exc})") from None
        if dt.hasobject:
            raise TypeError(f"dtype {dt} holds Python objects, which cannot live in an arena; "
                            "use a numeric, boolean, string or structured dtype without objects")
        if dt.itemsize == 0:
            raise TypeError(f"dtype {dt} has no size; give a sized dtype such as 'S8' or 'U4'")
        dims = _shape_arg(shape)
        count = math.prod(dims)
        nbytes = count * dt.itemsize
        if nbytes > MAX_REQUEST:
            raise ValueError(f"shape {dims} of {dt} needs {nbytes} bytes, beyond what an arena serves "
                             f"(at most {MAX_REQUEST} bytes)")
        a = max(16, dt.alignment) if align is None else _align_arg(align)
        if align is None and (dtype is None or isinstance(dtype, str | type | np.dtype)):
            self._fast_cache_dtype(dtype, dt)
        buf = self._alloc_slow(max(nbytes, 1), a)
        return np.frombuffer(buf, dtype=dt, count=count).reshape(dims)

    @contextlib.contextmanager
    def scope(self) -> Iterator[Arena]:
        """``with arena.scope():`` numpy array data made inside comes from the arena.

        Only the calling thread's context is affected; the previous handler is
        back afterwards. Arrays keep working after the scope (see the module)."""
        self._busy = True
        try:
            raw = self._usable("open a numpy scope")
            # The scope takes its own reference on the arena: a close() from now on
            # sends the scope's allocations to the previous handler (native/arena_scope.c).
            pushed = _fast.numpy_arena_handler_push(int(ffi.cast("uintptr_t", raw)))
        finally:
            self._busy = False
        if isinstance(pushed, int):  # the core refused the arena: its status
            self._status[0] = pushed
            self._failed("installing the arena's numpy data handler")
        previous, scope = pushed  # type: ignore[misc]
        handler = _HandlerToken(previous)
        try:
            yield self
        finally:
            # End the scope first: a task or copied context made inside it keeps
            # numpy's handler (numpy holds it in a contextvar), and from now on
            # that handler allocates through the handler current before the
            # scope, never into this arena (native/arena_scope.c).
            _fast.numpy_arena_scope_end(scope)
            handler.restore()

    # -- batches
    def reset(self) -> None:
        """Make the arena's memory available for the next batch, keeping its chunks.

        Blocks or arrays still alive keep their bytes: the chunks holding them
        are pinned (``stats().pinned_chunks``/``pinned_bytes``) until their last
        block is freed, then reused; everything else is reused at once. Spare
        chunks beyond twice the batch's peak go back to the backend.
        Raises :class:`ArenaClosedError` and :class:`ArenaThreadError`."""
        self._busy = True
        try:
            status = lib.knhk_arena_reset(self._usable("reset"))
        finally:
            self._busy = False
        check(status, "resetting the arena")

    def close(self) -> None:
        """Stop allocating and give the owner's hold on the memory up. Idempotent; from any thread.

        Memory goes back to the backend now, or when the last live block is freed:
        memoryviews and arrays handed out stay valid. From another thread, close()
        waits for the call the owner is making into the core (if any) to return;
        the owner's next call raises :class:`ArenaClosedError`."""
        if self._raw is None:
            return
        owner = threading.get_ident() == self._owner
        if owner:
            self._final = self.stats()
        # Unbind first (under the GIL): the C fast paths check it on every call.
        self._fast_bind(None)
        self._raw = None
        # Then wait out a call the owner began before it could see the unbinding: it
        # set _busy before reading _raw, so either it saw None or we see it busy.
        # (A forked child has no such call: the thread making it stayed in the parent.)
        while self._busy and not owner and os.getpid() == self._pid:
            time.sleep(1e-5)
        ffi.release(self._ptr)

    def stats(self) -> ArenaStats:
        """The arena's figures; after close(), the figures as they were at close()."""
        if self._raw is None and self._final is not None:
            return replace(self._final, closed=True)
        out = ffi.new("knhk_arena_stats *")
        self._busy = True
        try:
            status = lib.knhk_arena_stats_get(self._usable("read statistics"), out)
        finally:
            self._busy = False
        check(status, "arena statistics")
        return ArenaStats(*(getattr(out, f) for f in _STAT_FIELDS))

    @property
    def cdata(self) -> Any:
        """The ``knhk_arena *`` for other parts of the C core (owner thread only)."""
        return self._usable("hand out the arena pointer")

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._raw is None:
            return f"<Arena {self.backend.name} closed>"
        return f"<Arena {self.backend.name} chunk_size={self.chunk_size} max_chunk_size={self.max_chunk_size}>"


def _shape_arg(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, bool):
        raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}")
    dims: tuple[int, ...]
    try:
        dims = (operator.index(shape),)
    except TypeError:
        try:
            dims = tuple(shape)
        except TypeError:
            raise TypeError(f"shape must be an int or a tuple of ints, got {type(shape).__name__} "
                            f"{shape!r}") from None
        for d in dims:
            if isinstance(d, bool):
                raise TypeError(f"shape must hold ints, got {d!r} in {shape!r}") from None
            try:
                operator.index(d)
            except TypeError:
                raise TypeError(f"shape must hold ints, got {type(d).__name__} {d!r} in {shape!r}") from None
        dims = tuple(operator.index(d) for d in dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape dimensions must be >= 0, got {dims}")
    if len(dims) > 64:
        raise ValueError(f"shape has {len(dims)} dimensions; numpy accepts at most 64")
    return dims


class ThreadLocalArena:
    """One :class:`Arena` per thread, made on the thread's first use, closed when the thread ends.

    Takes the :class:`Arena` parameters. ``arena`` is the calling thread's
    arena; ``alloc``, ``array``, ``scope``, ``reset`` and ``stats`` act on it.
    A scope in one thread never affects another: numpy keeps its handler per context.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, *, max_chunk_size: int | None = None,
                 huge_pages: bool = True, backend: Backend | BackendName | None = None,
                 numa: str | int | None = None, node: int | None = None) -> None:
        # Check the parameters once, here, rather than in each thread.
        probe = Arena(chunk_size, max_chunk_size=max_chunk_size, huge_pages=huge_pages, backend=backend,
                      numa=numa, node=node)
        probe.close()
        self._kwargs: dict[str, Any] = {"chunk_size": chunk_size, "max_chunk_size": max_chunk_size,
                                        "huge_pages": huge_pages, "backend": probe.backend, "numa": numa,
                                        "node": node}
        self._local = threading.local()
        self._lock = threading.Lock()
        renew_in_child(self, "_lock")
        self._closed = False
        self.created = 0  # arenas made so far, one per thread that used this

    @property
    def arena(self) -> Arena:
        a = getattr(self._local, "arena", None)
        if a is not None and not a.closed and not self._closed:
            return a
        if self._closed:
            if a is not None:  # closed from another thread: this thread's arena goes now, on its owner
                del self._local.arena
                a.close()
            raise ArenaClosedError("cannot use a closed ThreadLocalArena; create a new one")
        # The thread-local slot is the only strong reference: when the thread
        # ends, CPython drops it and the Arena closes (deferred while blocks live).
        a = self._local.arena = Arena(**self._kwargs)
        with self._lock:
            self.created += 1
        return a

    def alloc(self, nbytes: int, align: int = 16) -> memoryview:
        return self.arena.alloc(nbytes, align)

    def array(self, shape: int | tuple[int, ...], dtype: Any = "float64", *, align: int | None = None) -> Any:
        return self.arena.array(shape, dtype, align=align)

    def scope(self) -> contextlib.AbstractContextManager[Arena]:
        return self.arena.scope()

    def reset(self) -> None:
        self.arena.reset()

    def stats(self) -> ArenaStats:
        return self.arena.stats()

    def close(self) -> None:
        """Close the calling thread's arena and refuse every later use, from any thread: another
        thread's arena closes at that thread's next use (which raises :class:`ArenaClosedError`)
        or when the thread ends (an arena is its thread's alone). Arrays handed out stay valid."""
        self._closed = True
        a = getattr(self._local, "arena", None)
        if a is not None:
            a.close()
            del self._local.arena


# ---------------------------------------------------------------- hot paths

def hot_ops() -> list[Any]:
    """The arena's hot paths for the tick harness (see knhk_memory.hotpath)."""
    from .hotpath import HotOp

    def setup() -> tuple[Any, Any]:
        arena = Arena(DEFAULT_CHUNK_SIZE)
        return ffi.cast("void *", arena.cdata), arena.close

    return [HotOp(
        name="arena_alloc",
        description="one 64-byte, 16-aligned bump allocation from an arena with room "
                    "(a reset per 64 KiB chunk, amortised over ~1000 allocations)",
        fn=ffi.addressof(lib, "knhk_arena_hotop_alloc"),
        setup=setup,
    )]
