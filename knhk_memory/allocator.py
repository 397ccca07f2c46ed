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
import operator
import os
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from . import _fast
from ._core import check, check_as, ffi, lib
from ._forksafe import renew_in_child
from .errors import BackendUnavailableError, BlockFreedError

__all__ = [
    "BackendName", "BackendSetting", "BACKENDS", "DEBIAN_PACKAGES", "STATIC_TLS_TUNABLE", "AllocStats",
    "NativeStats", "Backend", "Block",
    "get_backend", "available_backends", "resolve_backend", "select_backend", "selected_backend",
    "numpy_handler", "install_numpy_handler", "apply_numpy_handler", "numpy_routing_enabled", "set_numpy_routing",
]

# A backend's name; what ``[allocator] backend`` accepts besides: ``auto``.
BackendName = Literal["system", "jemalloc", "mimalloc"]
BackendSetting = Literal["auto", "system", "jemalloc", "mimalloc"]

BACKENDS: tuple[BackendName, ...] = ("system", "jemalloc", "mimalloc")
AUTO_ORDER: tuple[BackendName, ...] = ("mimalloc", "jemalloc", "system")
DEBIAN_PACKAGES = {"jemalloc": "libjemalloc2", "mimalloc": "libmimalloc2.0"}
SONAMES = {"jemalloc": "libjemalloc.so.2", "mimalloc": "libmimalloc.so.2"}
STATIC_TLS_TUNABLE = "glibc.rtld.optional_static_tls=16384"
_IDS = {"system": lib.KNHK_BACKEND_SYSTEM, "jemalloc": lib.KNHK_BACKEND_JEMALLOC,
        "mimalloc": lib.KNHK_BACKEND_MIMALLOC}


def library_override(name: str) -> str | None:
    """The shared object named by ``KNHK_MEMORY_<NAME>_LIBRARY``, if set.

    Loading a library runs its code in this process, so the file is checked
    before anything loads it. It must be an absolute path (a relative one would
    be resolved against whatever the working directory happens to be, or
    searched for by the dynamic loader) to an existing regular file, owned by
    root or by this process's user, not writable by group or others, in a
    directory no other user may write to (a world-writable one, /tmp say, lets
    anyone replace it). Anything else raises
    :class:`~knhk_memory.errors.BackendUnavailableError` naming the variable,
    the value, what is wrong and what is accepted.
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
            problem = "a file that does not exist"
        except OSError as exc:
            problem = f"not usable ({exc.strerror})"
        else:
            real = os.path.realpath(value)
            me = os.getuid()
            if not stat.S_ISREG(st.st_mode):
                problem = "not a regular file"
            elif st.st_uid not in (0, me):
                problem = f"owned by uid {st.st_uid}, neither root nor this user (uid {me}): it may not be trusted"
            elif st.st_mode & 0o022:
                who = "group and others" if st.st_mode & 0o002 else "its group"
                problem = (f"writable by {who} (mode {stat.S_IMODE(st.st_mode):o}): they could replace the code "
                           "loaded here")
            else:
                try:
                    dst = os.stat(os.path.dirname(real))
                except OSError as exc:
                    problem = f"in a directory that cannot be checked ({exc.strerror})"
                else:
                    if dst.st_mode & 0o002:
                        problem = (f"in the world-writable directory {os.path.dirname(real)}: any user could put "
                                   "a library there")
                    elif dst.st_uid not in (0, me):
                        problem = (f"in the directory {os.path.dirname(real)}, owned by uid {dst.st_uid}, "
                                   "neither root nor this user")
    if problem is not None:
        raise BackendUnavailableError(f"{name} backend: {var}={value!r} is {problem}; it must be the absolute "
                                      f"path of the {name} shared object, e.g. /usr/lib/x86_64-linux-gnu/"
                                      f"{SONAMES[name]} (Debian package {DEBIAN_PACKAGES[name]}), or unset")
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
    """The allocator's own figures, in bytes; None where the allocator has no such figure.

    ``allocated``: handed out to the program (jemalloc ``stats.allocated``,
    glibc ``uordblks + hblkhd``); ``active``: in pages holding live blocks
    (jemalloc); ``resident``: resident in RAM (jemalloc ``stats.resident``,
    mimalloc's RSS); ``mapped``: mapped or committed (jemalloc, mimalloc
    commit, glibc ``arena + hblkhd``); ``peak_resident`` (mimalloc);
    ``metadata`` and ``retained`` (jemalloc ``stats.metadata``,
    ``stats.retained``: address space kept but already given back);
    ``free_bytes``: free inside glibc's heaps, not given back (``fordblks``,
    what ``malloc_trim`` can return).
    """

    allocated: int | None
    active: int | None
    resident: int | None
    mapped: int | None
    peak_resident: int | None
    metadata: int | None = None
    retained: int | None = None
    free_bytes: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


def _index_arg(value: Any, what: str) -> int:
    """An integer argument: int or any type with __index__ (numpy integers), never bool."""
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r} (a bool is not a size)")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r} (accepted: int, numpy "
                        "integers, any type with __index__)") from None


def _valid_size(nbytes: Any, what: str = "nbytes") -> int:
    nbytes = _index_arg(nbytes, what)
    if nbytes < 0:
        raise ValueError(f"{what} must be >= 0, got {nbytes}")
    if nbytes > sys.maxsize:
        raise ValueError(f"{what} must be at most {sys.maxsize} (sys.maxsize), got {nbytes}")
    return nbytes


def _valid_align(align: Any) -> int:
    align = _index_arg(align, "align")
    if not (lib.KNHK_MIN_ALIGN <= align <= lib.KNHK_MAX_ALIGN) or align & (align - 1):
        raise ValueError(f"align must be a power of two from {lib.KNHK_MIN_ALIGN} to "
                         f"{lib.KNHK_MAX_ALIGN}, got {align}")
    return align


class Backend(_fast.BackendBase):
    """One allocator backend. Obtain it with :func:`get_backend`; never build it.

    ``malloc(nbytes)`` (a :class:`Block` of ``nbytes``, uninitialised, aligned to
    16) is a C method of the base class (native/cpython/block_py.c) for an int
    size; anything else goes to :meth:`_malloc_slow`, which checks or raises.
    """

    __slots__ = ("name", "id", "_ptr", "path", "version", "__weakref__")

    def __init__(self, name: BackendName, ptr: Any) -> None:
        self.name: BackendName = name
        self.id = _IDS[name]
        self._ptr = ptr
        self.path = ffi.string(lib.knhk_backend_path(ptr)).decode()
        self.version = ffi.string(lib.knhk_backend_version(ptr)).decode()
        self._fast_bind(int(ffi.cast("uintptr_t", ptr)), Block)

    def __repr__(self) -> str:
        return f"<Backend {self.name} {self.version} from {self.path}>"

    # -- allocation: every Block owns its memory and frees it through this backend
    def _malloc_slow(self, nbytes: int) -> Block:
        """``malloc`` for what the C method does not take: checks, or raises."""
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
        vals = [getattr(out, f) for f in ("allocated", "active", "resident", "mapped", "peak_resident", "metadata",
                                          "retained", "free_bytes")]
        return NativeStats(*(None if v < 0 else v for v in vals))

    def release_unused(self) -> None:
        """Give unused memory back to the OS (malloc_trim, jemalloc purge, mi_collect)."""
        check(lib.knhk_backend_release_unused(self._ptr), f"{self.name}: release_unused")

    def numpy_handler_name(self) -> str:
        """The name numpy reports (``get_handler_name``) for arrays allocated here."""
        return f"knhk_memory.{self.name}"

    @property
    def cdata(self) -> Any:
        """The ``const knhk_backend *`` for other parts of the C core."""
        return self._ptr


class Block(_fast.BlockBase):
    """Memory from one backend, freed by that backend.

    ``view()`` gives a writable memoryview (the block exports its memory through
    the buffer protocol and counts the views). The memory lives until the block
    is freed or collected; ``free()`` and ``realloc()`` refuse with BufferError
    while views are alive rather than invalidate them, so a view never dangles.
    ``free()`` (idempotent) is a C method of the base class
    (native/cpython/block_py.c).

    ``free()`` is the block's close, and may come from another thread: every other
    call then completes or raises :class:`~knhk_memory.errors.BlockFreedError` (the
    checks and the memory accesses run in C under the GIL, as free() does), and a
    free() while another thread holds a view is refused (issue 22).
    """

    __slots__ = ()

    @classmethod
    def _adopt(cls, backend: Backend, ptr: Any, size: int, align: int) -> Block:
        if ptr == ffi.NULL:
            raise MemoryError(f"{backend.name}: allocation of {size} bytes failed")
        block: Block = backend._adopt(int(ffi.cast("uintptr_t", ptr)), size, align)
        return block

    @property
    def size(self) -> int:
        """The size requested (the usable size may be larger: :meth:`usable_size`)."""
        self._alive()
        return self._size

    @property
    def address(self) -> int:
        addr = self._address  # read once: free() on another thread may come between two reads
        if addr is None:
            self._alive()
        return addr  # type: ignore[return-value]

    @property
    def closed(self) -> bool:
        return self._address is None

    def usable_size(self) -> int:
        n = self._usable_size()  # the freed check and the call together, in C
        if n is None:
            self._alive()
        return n  # type: ignore[return-value]

    def view(self) -> memoryview:
        """A writable, zero-copy view of the block's ``size`` bytes; raises
        :class:`~knhk_memory.errors.BlockFreedError` once the block is freed."""
        try:
            return memoryview(self)  # the buffer export refuses a freed block (in C, under the GIL)
        except BufferError:
            self._alive()
            raise

    def realloc(self, nbytes: int, align: int | None = None) -> None:
        """Resize in place or move; contents up to the smaller size are kept.

        ``align`` keeps a larger alignment (default: the block's own)."""
        n = _valid_size(nbytes)
        a = self._align if align is None else max(_valid_align(align), lib.KNHK_DEFAULT_ALIGN)
        self._no_views("realloc")
        try:
            moved = self._realloc(n, a if a > lib.KNHK_DEFAULT_ALIGN else 0, a)
        except BufferError:  # freed or viewed from another thread since the check above
            self._no_views("realloc")
            raise
        if not moved:
            raise MemoryError(f"{self.backend.name}: realloc to {n} bytes failed; the block is unchanged")

    def __enter__(self) -> Block:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        addr = self._address
        if addr is None:
            return f"<Block {self.backend.name} freed>"
        return f"<Block {self.backend.name} {self._size} bytes at {addr:#x}>"

    def _alive(self) -> None:
        if self._address is None:
            raise BlockFreedError(f"this {self.backend.name} block is closed: it has been freed; allocate a new one")

    def _no_views(self, what: str) -> None:
        self._alive()
        extra = self._exports
        if extra > 0:
            raise BufferError(f"cannot {what} a {self.backend.name} block of {self._size} bytes while "
                              f"{extra} view(s) of it are alive; release the memoryviews first")


# ---------------------------------------------------------------- loading and selection

_backends: dict[str, Backend] = {}
_load_lock = threading.Lock()
renew_in_child(sys.modules[__name__], "_load_lock")  # held across a dlopen: see _forksafe


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


def get_backend(name: BackendName) -> Backend:
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
        check_as(lib.knhk_backend_load(_IDS[name], library, out, err, len(err)),
                 lambda detail: _load_error(name, ffi.string(err).decode("utf-8", "replace") or detail))
        backend = _backends[name] = Backend(name, out[0])
        return backend


def available_backends() -> dict[BackendName, Backend | BackendUnavailableError]:
    """Every backend, loaded, or the error that says why it cannot be."""
    result: dict[BackendName, Backend | BackendUnavailableError] = {}
    for name in BACKENDS:
        try:
            result[name] = get_backend(name)
        except BackendUnavailableError as exc:
            result[name] = exc
    return result


def resolve_backend(name: BackendSetting) -> tuple[Backend, list[str]]:
    """The backend for a configured name. ``auto`` tries mimalloc, jemalloc,
    system in turn; the list says why each skipped one was skipped."""
    if name != "auto":
        return get_backend(name), []
    skipped: list[str] = []
    for candidate in AUTO_ORDER:
        try:
            return get_backend(candidate), skipped
        except BackendUnavailableError as exc:
            skipped.append(str(exc))
    raise AssertionError("the system backend is always available")  # pragma: no cover


_selected: Backend | None = None


def select_backend(backend: Backend | BackendName) -> Backend:
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
    """The previous numpy handler (numpy's ``mem_handler`` capsule), held until
    it is restored; dropping the token without restoring leaves the new one."""

    __slots__ = ("_previous",)

    def __init__(self, previous: object) -> None:
        self._previous: object | None = previous

    def restore(self) -> None:
        previous, self._previous = self._previous, None
        if previous is not None:
            _fast.numpy_handler_set(previous)


def install_numpy_handler(backend: Backend | BackendName | None = None) -> _HandlerToken:
    """Route numpy's array data through ``backend`` (default: the selected one)
    in the calling thread's context. ``.restore()`` on the result undoes it."""
    b = selected_backend() if backend is None else get_backend(backend) if isinstance(backend, str) else backend
    return _HandlerToken(_fast.numpy_handler_push(int(ffi.cast("uintptr_t", b._ptr))))


@contextlib.contextmanager
def numpy_handler(backend: Backend | BackendName | None = None) -> Iterator[Backend]:
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
    from numpy._core.multiarray import get_handler_name

    if _numpy_routing:
        # For the thread's life: the token is dropped, which releases (does not
        # restore) the handler it replaced.
        install_numpy_handler(selected_backend())
    return str(get_handler_name())


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
                malloc_free),
        PyHotOp("py_get_backend", "get_backend(name) of an already loaded backend", lookup),
        PyHotOp("py_backend_stats", "Backend.stats(): sum the per-thread statistics slots", stats),
    ]
