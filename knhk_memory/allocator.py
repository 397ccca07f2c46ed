"""Allocator backends (system, jemalloc, mimalloc) and numpy's data routed through them.

A :class:`Backend` wraps one C backend table. Libraries are loaded once per
process and never unloaded, so every :class:`Block` stays valid however often
the selected backend changes: a block is always freed by the backend that
allocated it.

numpy routing uses NumPy's data-memory handler API (NEP 49). numpy keeps the
current handler in a context variable, so it applies to the calling thread's
context only: new threads start with numpy's default. Call
:func:`apply_numpy_handler` at the start of a worker thread (or pass it as a
``ThreadPoolExecutor`` initializer) to route that thread too.

jemalloc needs static TLS space that a running Python rarely has left
(glibc reports "cannot allocate memory in static TLS block"). A process
started with ``GLIBC_TUNABLES=glibc.rtld.optional_static_tls=16384`` (or with
jemalloc in ``LD_PRELOAD``) loads it; the ``knhk-memory`` CLI restarts itself
that way, a library user gets a :class:`BackendUnavailableError` saying so.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ._core import check, ffi, last_error, lib
from .errors import BackendUnavailableError, KnhkMemoryError

__all__ = [
    "BACKENDS", "DEBIAN_PACKAGES", "STATIC_TLS_TUNABLE", "AllocStats", "NativeStats", "Backend", "Block",
    "get_backend", "available_backends", "resolve_backend", "select_backend", "selected_backend",
    "numpy_handler", "install_numpy_handler", "apply_numpy_handler", "numpy_routing_enabled", "set_numpy_routing",
]

BACKENDS = ("system", "jemalloc", "mimalloc")
AUTO_ORDER = ("mimalloc", "jemalloc", "system")
DEBIAN_PACKAGES = {"jemalloc": "libjemalloc2", "mimalloc": "libmimalloc2.0"}
SONAMES = {"jemalloc": "libjemalloc.so.2", "mimalloc": "libmimalloc.so.2"}
STATIC_TLS_TUNABLE = "glibc.rtld.optional_static_tls=16384"
_IDS = {"system": lib.KNHK_BACKEND_SYSTEM, "jemalloc": lib.KNHK_BACKEND_JEMALLOC,
        "mimalloc": lib.KNHK_BACKEND_MIMALLOC}


def library_override(name: str) -> str | None:
    """The shared object named by ``KNHK_MEMORY_<NAME>_LIBRARY``, if set.

    It must be an absolute path to a regular file (a relative one would be
    resolved against whatever the working directory happens to be, or searched
    for by the dynamic loader); anything else raises
    :class:`~knhk_memory.errors.BackendUnavailableError` naming the variable,
    the value and what is accepted.
    """
    var = f"KNHK_MEMORY_{name.upper()}_LIBRARY"
    value = os.environ.get(var)
    if not value:
        return None
    problem = None
    if not os.path.isabs(value):
        problem = "a relative path (it would depend on the working directory)"
    else:
        try:
            st = os.stat(value)
        except FileNotFoundError:
            return value  # the loader says it is not installed, with the package to install
        except OSError as exc:
            problem = f"not usable ({exc.strerror})"
        else:
            if not stat.S_ISREG(st.st_mode):
                problem = "not a regular file"
    if problem is not None:
        raise BackendUnavailableError(f"{name} backend: {var}={value!r} is {problem}; it must be the absolute "
                                      f"path of the {name} shared object, e.g. /usr/lib/x86_64-linux-gnu/"
                                      f"{SONAMES[name]}, or unset")
    return value


@dataclass(frozen=True)
class AllocStats:
    """Counts kept by knhk for one backend, in usable bytes (see knhk.h)."""

    allocations: int
    frees: int
    reallocations: int
    live_bytes: int
    peak_live_bytes: int
    bytes_allocated: int

    @property
    def live_blocks(self) -> int:
        return self.allocations - self.frees

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class NativeStats:
    """The allocator's own figures; None where the allocator has no such figure."""

    allocated: int | None
    active: int | None
    resident: int | None
    mapped: int | None
    peak_resident: int | None

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


def _valid_size(nbytes: Any, what: str = "nbytes") -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"{what} must be an int, got {type(nbytes).__name__} {nbytes!r}")
    if nbytes < 0:
        raise ValueError(f"{what} must be >= 0, got {nbytes}")
    if nbytes > sys.maxsize:
        raise ValueError(f"{what} must be at most {sys.maxsize} (sys.maxsize), got {nbytes}")
    return nbytes


def _valid_align(align: Any) -> int:
    if isinstance(align, bool) or not isinstance(align, int):
        raise TypeError(f"align must be an int, got {type(align).__name__} {align!r}")
    if not (lib.KNHK_MIN_ALIGN <= align <= lib.KNHK_MAX_ALIGN) or align & (align - 1):
        raise ValueError(f"align must be a power of two from {lib.KNHK_MIN_ALIGN} to "
                         f"{lib.KNHK_MAX_ALIGN}, got {align}")
    return align


class Backend:
    """One allocator backend. Obtain it with :func:`get_backend`; never build it."""

    __slots__ = ("name", "id", "_ptr", "path", "version", "__weakref__")

    def __init__(self, name: str, ptr: Any) -> None:
        self.name = name
        self.id = _IDS[name]
        self._ptr = ptr
        self.path = ffi.string(lib.knhk_backend_path(ptr)).decode()
        self.version = ffi.string(lib.knhk_backend_version(ptr)).decode()

    def __repr__(self) -> str:
        return f"<Backend {self.name} {self.version} from {self.path}>"

    # -- allocation: every Block owns its memory and frees it through this backend
    def malloc(self, nbytes: int) -> Block:
        """A block of ``nbytes`` (uninitialised), aligned to 16."""
        n = _valid_size(nbytes)
        return Block._adopt(self, lib.knhk_malloc(self._ptr, n), n, lib.KNHK_DEFAULT_ALIGN)

    def calloc(self, count: int, size: int) -> Block:
        """A zeroed block of ``count * size`` bytes."""
        c, s = _valid_size(count, "count"), _valid_size(size, "size")
        if c and s > sys.maxsize // c:
            raise ValueError(f"count * size overflows: {c} * {s} > {sys.maxsize}")
        return Block._adopt(self, lib.knhk_calloc(self._ptr, c, s), c * s, lib.KNHK_DEFAULT_ALIGN)

    def aligned(self, nbytes: int, align: int) -> Block:
        """A block of ``nbytes`` aligned to ``align`` (a power of two, 8..4096)."""
        n, a = _valid_size(nbytes), _valid_align(align)
        status = ffi.new("int *")
        ptr = lib.knhk_aligned_alloc(self._ptr, a, n, status)
        if ptr == ffi.NULL and status[0] != lib.KNHK_ERR_NOMEM:
            check(status[0], f"{self.name}: aligned allocation of {n} bytes at {a}")
        return Block._adopt(self, ptr, n, max(a, lib.KNHK_DEFAULT_ALIGN))

    def stats(self) -> AllocStats:
        out = ffi.new("knhk_alloc_stats *")
        lib.knhk_backend_stats(self._ptr, out)
        return AllocStats(out.allocations, out.frees, out.reallocations, out.live_bytes,
                          out.peak_live_bytes, out.bytes_allocated)

    def native_stats(self) -> NativeStats:
        """The allocator's own figures (jemalloc ``stats.*`` after an ``epoch`` write,
        mimalloc ``mi_process_info``, glibc ``mallinfo2``)."""
        out = ffi.new("knhk_native_stats *")
        check(lib.knhk_backend_native_stats(self._ptr, out), f"{self.name}: native statistics")
        vals = [getattr(out, f) for f in ("allocated", "active", "resident", "mapped", "peak_resident")]
        return NativeStats(*(None if v < 0 else v for v in vals))

    def release_unused(self) -> None:
        """Give unused memory back to the OS (malloc_trim, jemalloc purge, mi_collect)."""
        check(lib.knhk_backend_release_unused(self._ptr), f"{self.name}: release_unused")

    def numpy_handler_name(self) -> str:
        """The name numpy reports (``get_handler_name``) for arrays allocated here."""
        return ffi.string(lib.knhk_numpy_handler_name(self._ptr)).decode()

    @property
    def cdata(self) -> Any:
        """The ``const knhk_backend *`` for other parts of the C core."""
        return self._ptr


class Block:
    """Memory from one backend, freed by that backend.

    ``view()`` gives a writable memoryview. The memory lives until the block
    *and* every view of it are gone, so a view never dangles; ``free()`` and
    ``realloc()`` refuse while views are alive rather than invalidate them.
    """

    __slots__ = ("backend", "_ptr", "_size", "_align")

    def __init__(self) -> None:
        raise TypeError("Blocks come from Backend.malloc/calloc/aligned")

    @classmethod
    def _adopt(cls, backend: Backend, ptr: Any, size: int, align: int) -> Block:
        if ptr == ffi.NULL:
            raise MemoryError(f"{backend.name}: allocation of {size} bytes failed")
        self = object.__new__(cls)
        self.backend = backend
        self._ptr = ffi.gc(ptr, _freer(backend), size=size)
        self._size = size
        self._align = align
        return self

    @property
    def size(self) -> int:
        """The size requested (the usable size may be larger: :meth:`usable_size`)."""
        self._alive()
        return self._size

    @property
    def address(self) -> int:
        self._alive()
        return int(ffi.cast("uintptr_t", self._ptr))

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def usable_size(self) -> int:
        self._alive()
        return lib.knhk_usable_size(self.backend._ptr, self._ptr)

    def view(self) -> memoryview:
        """A writable, zero-copy view of the block's ``size`` bytes."""
        self._alive()
        return memoryview(ffi.buffer(self._ptr, self._size))

    def realloc(self, nbytes: int, align: int | None = None) -> None:
        """Resize in place or move; contents up to the smaller size are kept.

        ``align`` keeps a larger alignment (default: the block's own)."""
        n = _valid_size(nbytes)
        a = self._align if align is None else max(_valid_align(align), lib.KNHK_DEFAULT_ALIGN)
        self._no_views("realloc")
        new = lib.knhk_realloc(self.backend._ptr, self._ptr, n, a if a > lib.KNHK_DEFAULT_ALIGN else 0)
        if new == ffi.NULL:
            raise MemoryError(f"{self.backend.name}: realloc to {n} bytes failed; the block is unchanged")
        # The C call already moved or resized the memory: detach the old
        # destructor before adopting the new pointer.
        ffi.gc(self._ptr, None)
        self._ptr = ffi.gc(new, _freer(self.backend), size=n)
        self._size, self._align = n, a

    def free(self) -> None:
        """Free now (otherwise the block is freed when it is collected). Idempotent."""
        if self._ptr is None:
            return
        self._no_views("free")
        ptr, self._ptr = self._ptr, None
        ffi.release(ptr)

    def __enter__(self) -> Block:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        if self._ptr is None:
            return f"<Block {self.backend.name} freed>"
        return f"<Block {self.backend.name} {self._size} bytes at {self.address:#x}>"

    def _alive(self) -> None:
        if self._ptr is None:
            raise KnhkMemoryError(f"this {self.backend.name} block has been freed")

    def _no_views(self, what: str) -> None:
        self._alive()
        # ffi.buffer objects hold the gc'd pointer; the block itself holds one
        # reference and getrefcount's argument another.
        extra = sys.getrefcount(self._ptr) - 2
        if extra > 0:
            raise BufferError(f"cannot {what} a {self.backend.name} block of {self._size} bytes while "
                              f"{extra} view(s) of it are alive; release the memoryviews first")


def _freer(backend: Backend) -> Any:
    b = backend._ptr
    return lambda p: lib.knhk_free(b, p)


# ---------------------------------------------------------------- loading and selection

_backends: dict[str, Backend] = {}
_load_lock = threading.Lock()


def _load_error(name: str, message: str) -> BackendUnavailableError:
    lib_name = library_override(name) or SONAMES[name]
    if "static TLS" in message:
        return BackendUnavailableError(
            f"{name} backend: {lib_name} cannot be loaded into this running process: {message}. "
            f"glibc has no static TLS space left for it once Python is running. Start the process with "
            f"GLIBC_TUNABLES={STATIC_TLS_TUNABLE} in its environment (or LD_PRELOAD={lib_name}); "
            "the knhk-memory command does this by itself.")
    if "cannot open shared object file" in message or "No such file" in message:
        return BackendUnavailableError(
            f"{name} backend: {lib_name} is not installed ({message}). Install the Debian package "
            f"{DEBIAN_PACKAGES[name]}: apt-get install {DEBIAN_PACKAGES[name]}")
    return BackendUnavailableError(f"{name} backend: {lib_name} cannot be used: {message}")


def get_backend(name: str) -> Backend:
    """The backend called ``name``, loading its library on first use.

    Raises ValueError for an unknown name and BackendUnavailableError, saying
    what to install or how to start the process, when it cannot be loaded.
    """
    if name not in _IDS:
        raise ValueError(f"unknown allocator backend {name!r}; accepted: {', '.join(BACKENDS)}")
    backend = _backends.get(name)
    if backend is not None:
        return backend
    with _load_lock:
        if name in _backends:
            return _backends[name]
        out = ffi.new("knhk_backend **")
        err = ffi.new("char[1024]")
        override = library_override(name)
        library = ffi.new("char[]", override.encode()) if override else ffi.NULL
        status = lib.knhk_backend_load(_IDS[name], library, out, err, len(err))
        if status != lib.KNHK_OK:
            raise _load_error(name, ffi.string(err).decode("utf-8", "replace") or last_error())
        backend = _backends[name] = Backend(name, out[0])
        return backend


def available_backends() -> dict[str, Backend | BackendUnavailableError]:
    """Every backend, loaded, or the error that says why it cannot be."""
    result: dict[str, Backend | BackendUnavailableError] = {}
    for name in BACKENDS:
        try:
            result[name] = get_backend(name)
        except BackendUnavailableError as exc:
            result[name] = exc
    return result


def resolve_backend(name: str) -> tuple[Backend, list[str]]:
    """The backend for a configured name. ``auto`` tries mimalloc, jemalloc,
    system in turn; the list says why each skipped one was skipped."""
    if name != "auto":
        return get_backend(name), []
    skipped = []
    for candidate in AUTO_ORDER:
        try:
            return get_backend(candidate), skipped
        except BackendUnavailableError as exc:
            skipped.append(str(exc))
    raise AssertionError("the system backend is always available")  # pragma: no cover


_selected: Backend | None = None


def select_backend(backend: Backend | str) -> Backend:
    """Make ``backend`` the process's selected backend (arenas and
    :func:`apply_numpy_handler` use it). Blocks from the previous one stay valid."""
    global _selected
    _selected = get_backend(backend) if isinstance(backend, str) else backend
    return _selected


def selected_backend() -> Backend:
    """The selected backend; ``system`` until something selects another."""
    return _selected if _selected is not None else get_backend("system")


# ---------------------------------------------------------------- numpy (NEP 49)

class _HandlerToken:
    """The previous numpy handler, held until it is restored or dropped."""

    __slots__ = ("_token",)

    def __init__(self, token: Any) -> None:
        self._token = token

    def restore(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            check(lib.knhk_numpy_handler_restore(token), "restoring numpy's previous data handler")

    def __del__(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            lib.knhk_numpy_handler_discard(token)


def install_numpy_handler(backend: Backend | str | None = None) -> _HandlerToken:
    """Route numpy's array data through ``backend`` (default: the selected one)
    in the calling thread's context. ``.restore()`` on the result undoes it."""
    b = selected_backend() if backend is None else get_backend(backend) if isinstance(backend, str) else backend
    status = ffi.new("int *")
    token = lib.knhk_numpy_handler_push(b._ptr, status)
    if token == ffi.NULL:
        check(status[0], f"installing the {b.name} numpy data handler")
    return _HandlerToken(token)


@contextlib.contextmanager
def numpy_handler(backend: Backend | str | None = None) -> Iterator[Backend]:
    """``with numpy_handler("mimalloc"):`` arrays made inside take their data
    from that backend; the previous handler is back afterwards. Arrays keep
    the handler they were made with, so they may outlive the block."""
    b = selected_backend() if backend is None else get_backend(backend) if isinstance(backend, str) else backend
    token = install_numpy_handler(b)
    try:
        yield b
    finally:
        token.restore()


_numpy_routing = False


def set_numpy_routing(enabled: bool) -> None:
    """Record whether the configuration routes numpy (read by apply_numpy_handler)."""
    global _numpy_routing
    _numpy_routing = enabled


def numpy_routing_enabled() -> bool:
    """Whether the configuration routes numpy through the selected backend."""
    return _numpy_routing


def apply_numpy_handler() -> str:
    """The one call for a worker thread: apply the configured numpy routing in
    this thread's context. Returns the handler name now in effect.

    Use it as ``ThreadPoolExecutor(initializer=knhk_memory.apply_numpy_handler)``.
    Without configured routing it leaves numpy's default in place."""
    import numpy

    if _numpy_routing:
        # For the thread's life: the token is dropped, which releases (does not
        # restore) the handler it replaced.
        install_numpy_handler(selected_backend())
    return numpy._core.multiarray.get_handler_name()


# ---------------------------------------------------------------- hot paths

def hot_ops() -> list[Any]:
    """The allocator's hot paths for the tick harness (see knhk_memory.hotpath)."""
    from .hotpath import HotOp

    def setup() -> tuple[Any, Any]:
        backend = selected_backend()
        return ffi.cast("void *", backend.cdata), lambda: None

    return [HotOp(
        name="backend_malloc_free",
        description="one 64-byte malloc + free pair through the selected backend, with statistics",
        fn=ffi.addressof(lib, "knhk_backend_hotop_malloc_free"),
        setup=setup,
        default_budget=250,
        budget_reason="measured 100-127 ticks (median) for glibc, jemalloc and mimalloc alike on a 2-core "
                      "2.5 GHz KVM guest, statistics included; 250 leaves a noisy neighbour room while "
                      "still catching a lock, a syscall or a page fault added to the path",
    )]


def py_hot_ops() -> list[Any]:
    """The allocator's public Python calls held to nanosecond budgets."""
    from .hotpath import PyHotOp

    def malloc_free() -> tuple[Any, Any]:
        backend = selected_backend()
        return (lambda: backend.malloc(64).free()), (lambda: None)

    def lookup() -> tuple[Any, Any]:
        name = selected_backend().name
        return (lambda: get_backend(name)), (lambda: None)

    def stats() -> tuple[Any, Any]:
        backend = selected_backend()
        return backend.stats, (lambda: None)

    return [
        PyHotOp("py_malloc_free", "Backend.malloc(64) + Block.free() on the selected backend",
                malloc_free, default_budget=15000,
                budget_reason="measured 4.1-4.8 us on a 2-core 2.5 GHz VM: argument checks, ffi.gc, the Block "
                              "object, the C pair and the release; 15 us leaves a noisy neighbour room and "
                              "still catches a lock, a copy or a syscall added to the path"),
        PyHotOp("py_get_backend", "get_backend(name) of an already loaded backend", lookup,
                default_budget=1500,
                budget_reason="measured ~0.2 us: argument check and one dict lookup after the first load; "
                              "1.5 us catches a lock or a dlopen put on the fast path"),
        PyHotOp("py_backend_stats", "Backend.stats(): sum the per-thread statistics slots", stats,
                default_budget=15000,
                budget_reason="measured 3.7-4.3 us: a C walk of the used slots, six cdata reads and the "
                              "AllocStats dataclass; 15 us leaves a noisy neighbour room"),
    ]
