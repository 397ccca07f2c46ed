"""Striped, cache-line-padded counters and per-pattern executor statistics.

:class:`Counters` is a block of named 64-bit counters. Every writer thread adds
into its own cache-line-padded slot (a relaxed load and store, no lock), and a
read sums the slots, so concurrent writers never share a cache line and the
totals are exact once they finish. The block lives in private memory, in POSIX
shared memory (``shared=True``) or in a file (``shared="/path"``); other
processes, forked or spawned, attach to it by name and count into the same
totals. A worker thread that adds in a loop can take its own
:class:`CounterWriter` (``counters.writer()``), which skips the thread-slot
lookup. :class:`PatternStats` records, per workflow control-flow pattern
(1..43), executions and elapsed ticks (total, min, max) the same way.

What a read during writes means: each counter read while others add lies
between its value when the read began and when it ended; the counters of one
snapshot are not read at a single instant. See docs/counters.md.

Not for: gauges that go up and down under many writers at high rate (a
striped counter can, but a read is then only a bracket), or histograms.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import mmap
import os
import secrets
import shlex
import stat
import sys
import weakref
from collections.abc import Callable, Sequence
from numbers import Integral
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np


from . import _fast, segments
from ._core import check, check_as, ffi, last_error, lib
from .errors import (
    CounterBlockClosedError,
    CounterIncrementError,
    CounterIndexError,
    CounterNameError,
    CounterOverflowError,
    CounterWriterError,
    SharedBlockError,
    SharedBlockExistsError,
    SharedBlockNotFoundError,
    SharedBlockPermissionError,
    did_you_mean,
)
from .patterns import builtin_patterns

try:  # POSIX shared memory without multiprocessing's resource tracker
    import _posixshmem
except ImportError:  # pragma: no cover - non-POSIX platforms
    _posixshmem = None

__all__ = ["Counters", "CounterWriter", "PatternStats", "PATTERNS", "pattern_names", "hot_ops"]

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
#: The mode a new shared block gets (exactly: the umask does not apply): owner only.
DEFAULT_MODE = 0o600
# The statuses with an exception of their own (_core.check_as), made once, not per call.
_BAD_INDEX = {lib.KNHK_ERR_INVALID: CounterIndexError}
F = TypeVar("F", bound=Callable[..., Any])


def pattern_names() -> dict[int, str]:
    """Workflow control-flow pattern ids (1..43) and their names, from the WCP list
    (read by :func:`knhk_memory.patterns.builtin_patterns`)."""
    return {p.number: p.name for p in builtin_patterns()}


PATTERNS: dict[int, str] = pattern_names()


# ---------------------------------------------------------------- memory


class _Mapping:
    """The memory a block lives in, and who removes its name."""

    def __init__(self, mm: mmap.mmap, name: str | None, kind: str, unlink_pid: int | None) -> None:
        self.mm = mm
        self.name = name
        self.kind = kind  # "private", "shm" or "file"
        self.unlink_pid = unlink_pid  # the creating process unlinks; its forked children do not
        self.buf = ffi.from_buffer(mm)

    def release(self, handle: Any) -> None:
        lib.knhk_counters_close(handle)
        ffi.release(self.buf)
        self.mm.close()
        if self.unlink_pid == os.getpid():
            self.unlink()

    def unlink(self) -> None:
        self.unlink_pid = None
        if self.name is None:  # private memory: nothing to remove
            return
        with contextlib.suppress(FileNotFoundError):
            if self.kind == "shm":
                _posixshmem.shm_unlink("/" + self.name)
            elif self.kind == "file":
                os.unlink(self.name)


def _is_path(name: str) -> bool:
    return os.sep in name or name.startswith(".")


def _where(name: str) -> str:
    """The file a block lives in: the path, or /dev/shm/NAME for a shared-memory name."""
    return os.path.abspath(name) if _is_path(name) else f"/dev/shm/{name}"


def _owner_of(name: str) -> str:
    """Who owns the block ``name``, for a refused open."""
    try:
        st = os.stat(_where(name))
    except OSError:
        return "it belongs to another user or its mode does not let this one in"
    if st.st_uid != os.geteuid():
        return (f"it belongs to another user, {segments.owner_text(st.st_uid)}, with mode "
                f"0o{stat.S_IMODE(st.st_mode):o}; this user is {segments.owner_text(os.geteuid())}")
    return f"it is this user's, but its mode 0o{stat.S_IMODE(st.st_mode):o} does not let this user in"


def _open_fd(name: str, flags: int, mode: int = DEFAULT_MODE) -> tuple[int, str]:
    if "\0" in name:
        raise SharedBlockError(f"shared block name {name!r} contains a NUL character")
    try:
        if _is_path(name):
            return os.open(name, flags | os.O_CLOEXEC, mode), "file"
        if _posixshmem is None:  # pragma: no cover
            raise SharedBlockError("POSIX shared memory is not available here; give a file path instead")
        if not name or "/" in name or len(name) > 200:
            raise SharedBlockError(f"shared block name {name!r} must be 1..200 characters without '/'")
        return _posixshmem.shm_open("/" + name, flags, mode), "shm"
    except PermissionError as exc:
        raise SharedBlockPermissionError(
            f"cannot open the shared block {name!r} ({_where(name)}): {exc.strerror}; {_owner_of(name)} "
            f"(blocks are created with mode 0o{DEFAULT_MODE:o}, owner only, unless [counters] mode says "
            "otherwise)") from None
    except IsADirectoryError:
        raise SharedBlockError(f"{name!r} is a directory, not a counter block") from None


def _taken(name: str, where: str, seg: segments.Segment | None, error: str = "") -> str:
    """Why a new block cannot have ``name``: who has it, and what to do (issue 22)."""
    head = f"a shared block named {name!r} already exists at {where}"
    if seg is None:
        if error:
            return f"{head}; it cannot be inspected ({error}). Choose another name, or remove it if it is unused"
        return f"{head}: another process made or removed it at the same moment; start again"
    if not seg.ours:
        made = (f", created by pid {seg.creator_pid}, which is "
                f"{'still running' if seg.creator_alive else 'no longer running'}") if seg.creator_pid else ""
        return (f"{head} and belongs to another user, {segments.owner_text(seg.uid)}{made}: this user "
                f"({segments.owner_text(os.geteuid())}) can neither use nor remove it. Choose another name "
                f"([counters] shared_name / [metrics] shared_name), or ask {segments.user_name(seg.uid)} or root "
                f"to remove it (rm {shlex.quote(where)})")
    if seg.kind is None:
        return (f"{head} and is not a knhk block ({seg.why}). Choose another name, or remove it if nothing uses "
                f"it (rm {shlex.quote(where)})")
    cls = {"metrics": "Metrics", "patterns": "PatternStats"}.get(seg.kind, "Counters")
    if seg.creator_alive:
        return (f"{head}; it was created by pid {seg.creator_pid}, which is still running: another engine (or "
                f"this one) uses the name. If that engine is yours to share, attach to it with "
                f"{cls}.attach({name!r}); otherwise choose another name")
    if seg.mapped_by:
        return (f"{head}; it was created by pid {seg.creator_pid}, which is no longer running, but pid(s) "
                f"{', '.join(map(str, seg.mapped_by))} still map it (workers of that engine?); it is kept while "
                f"they use it. Stop them, or choose another name")
    return (f"{head}; its creator is not recorded (a block of an older build). If no process uses it, remove it "
            f"(rm {shlex.quote(where)}, or knhk-memory shm gc) and start again; if one does, attach to it with "
            f"{cls}.attach({name!r}) or choose another name")


def _create_mapping(size: int, shared: bool | str | os.PathLike[str], mode: int = DEFAULT_MODE) -> _Mapping:
    if shared is False or shared is None:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return _Mapping(mm, None, "private", None)
    if shared is not True and not isinstance(shared, (str, os.PathLike)):
        raise TypeError(f"shared must be False, True, a shared-memory name (str) or a file path, got {shared!r}")
    name = f"knhk_counters_{os.getpid()}_{secrets.token_hex(6)}" if shared is True else os.fspath(shared)
    if not isinstance(name, str) or not name:
        raise TypeError(f"shared must be False, True, a shared-memory name (str) or a file path, got {shared!r}")
    if _is_path(name):
        if os.path.isdir(name):
            raise SharedBlockError(f"{name!r} is a directory: a file-backed counter block needs a file path "
                                   f"in it (e.g. {os.path.join(name, 'counters.knhk')!r}) or a shared-memory name")
        parent = os.path.dirname(os.path.abspath(name))
        if not os.path.isdir(parent):
            raise SharedBlockNotFoundError(f"cannot create the counter block {name!r}: the directory {parent!r} "
                                           "does not exist")
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777 or not mode & 0o600 == 0o600:
        raise ValueError(f"mode must be a permission mode with owner read and write, 0o600..0o777, got {mode!r}")
    for attempt in (1, 2):
        try:
            fd, kind = _open_fd(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
            break
        except FileExistsError:
            # A leftover of a killed creator (own, knhk, creator gone, mapped by no
            # process) is removed and the name taken again; anything else is refused.
            where, error = _where(name), ""
            try:
                _removed, present = segments.reclaim_for_create(where)
            except OSError as exc:
                present, error = None, exc.strerror or str(exc)
            if present is None and not error and attempt == 1:
                continue
            raise SharedBlockExistsError(_taken(name, where, present, error)) from None
    try:
        os.fchmod(fd, mode)  # exactly the mode asked for: the umask does not apply
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name) if kind == "file" else _posixshmem.shm_unlink("/" + name)
        raise
    os.close(fd)
    made = _Mapping(mm, name, kind, os.getpid())
    _CREATED.add(made)
    return made


#: Named blocks this process created and has not unlinked: their names are removed at
#: exit even when the blocks were never closed (a handle kept by a cycle, a global, a
#: traceback), so a normal exit leaves nothing in /dev/shm (issue 22).
_CREATED: weakref.WeakSet[_Mapping] = weakref.WeakSet()


@atexit.register
def _unlink_at_exit() -> None:
    pid = os.getpid()
    for m in list(_CREATED):
        if m.unlink_pid == pid:
            with contextlib.suppress(OSError):
                m.unlink()


def _attach_mapping(name: str | os.PathLike[str]) -> _Mapping:
    given = name
    if not isinstance(name, (str, os.PathLike)) or not isinstance(name := os.fspath(name), str) or not name:
        raise TypeError(f"attach needs a shared-memory name (str) or a file path, got {given!r}")
    try:
        fd, kind = _open_fd(name, os.O_RDWR)
    except FileNotFoundError:
        what = "file" if _is_path(name) else "shared-memory block"
        raise SharedBlockNotFoundError(f"no counter block to attach to: {what} {name!r} does not exist "
                                       "(was it created, and is its creator still running?)") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise SharedBlockError(f"{name!r} is empty: not a knhk counter block")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        raise SharedBlockError(f"cannot map the shared block {name!r} ({_where(name)}): {exc}") from None
    finally:
        os.close(fd)
    return _Mapping(mm, name, kind, None)


# ---------------------------------------------------------------- the block


class _SharedHandle:
    """What every block over a :class:`_Mapping` (counters, pattern statistics, metrics)
    says of its memory, and its lifecycle: the subclass sets ``_mapping`` and ``_h``
    (None once closed) and defines ``close()`` and the classmethod ``attach(name)``."""

    _mapping: _Mapping
    _h: Any = None

    @property
    def name(self) -> str | None:
        """The shared-memory name or file path other processes attach with (None if private)."""
        return self._mapping.name

    @property
    def shared(self) -> bool:
        return self._mapping.kind != "private"

    @property
    def closed(self) -> bool:
        return self._h is None

    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def unlink(self) -> None:
        """Remove the block's name now (attached processes keep their mapping)."""
        self._mapping.unlink()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if not self.shared:
            raise TypeError(f"a private {type(self).__name__} block cannot be sent to another process; "
                            f"create it with shared=True")
        return (type(self).attach, (self.name,))  # type: ignore[attr-defined]


class _Block(_SharedHandle):
    """A formatted counter block and its native handle."""

    _flavor: int
    _h: Any = None

    def __init__(self, names: Sequence[str], shared: bool | str | os.PathLike[str],
                 mode: int = DEFAULT_MODE) -> None:
        blob = b"".join(n.encode("utf-8") + b"\0" for n in names)
        size = lib.knhk_counters_layout_size(self._flavor, len(names), len(blob))
        if size == 0:
            raise ValueError(f"{len(names)} counters with {len(blob)} bytes of names is out of range: "
                             f"1..{lib.KNHK_COUNTERS_MAX} counters, names up to {lib.KNHK_COUNTERS_NAMES_MAX} bytes")
        mapping = _create_mapping(size, shared, mode)
        try:
            check(lib.knhk_counters_format(mapping.buf, size, self._flavor, len(names), blob, len(blob)),
                  "formatting the counter block")
            if mapping.name is not None:  # who made it, for gc and the next start (knhk_memory.segments)
                segments.stamp(mapping.mm)
            self._open(mapping)
        except BaseException:
            ffi.release(mapping.buf)
            mapping.mm.close()
            mapping.unlink()
            raise

    @classmethod
    def attach(cls, name: str | os.PathLike[str]) -> Any:
        """Open a shared block by name (each kind narrows the type; __reduce__ needs it here)."""
        return cls._attach(name)

    @classmethod
    def _attach(cls, name: str | os.PathLike[str]) -> Any:
        mapping = _attach_mapping(name)
        self = cls.__new__(cls)
        try:
            self._open(mapping)
        except BaseException:
            ffi.release(mapping.buf)
            mapping.mm.close()
            raise
        return self

    def _open(self, mapping: _Mapping) -> None:
        out = ffi.new("knhk_counters **")
        where = f"{mapping.name!r}" if mapping.name else "the block"
        check_as(lib.knhk_counters_open(mapping.buf, len(mapping.mm), out),
                 lambda d: SharedBlockError(f"{where} is not a counter block this build can use: {d}"))
        raw = out[0]
        flavor = lib.knhk_counters_flavor(raw)
        if flavor != self._flavor:
            lib.knhk_counters_close(raw)
            kinds = {lib.KNHK_COUNTERS_FLAVOR_SUM: "Counters", lib.KNHK_COUNTERS_FLAVOR_PATTERNS: "PatternStats"}
            raise SharedBlockError(f"{mapping.name!r} holds {kinds.get(flavor, flavor)}, not "
                                   f"{type(self).__name__}; attach with {kinds.get(flavor, '?')}.attach")
        # The handle owns the mapping: both go when the last reference does, so
        # a call running in another thread keeps them alive until it returns.
        self._h = ffi.gc(raw, mapping.release)
        self._mapping = mapping
        size = ffi.new("size_t *")
        blob = ffi.buffer(lib.knhk_counters_names(raw, size), size[0])[:]
        where = f"{mapping.name!r}" if mapping.name else "the block"
        try:
            names = tuple(n.decode("utf-8") for n in blob.split(b"\0")[:-1])
        except UnicodeDecodeError as exc:
            self._h = None
            raise SharedBlockError(f"{where} has a counter name that is not UTF-8 ({exc.reason} at byte "
                                   f"{exc.start} of {exc.object!r}): not a block a knhk process made") from None
        bad = [n for n in names if not n] or sorted({n for n in names if names.count(n) > 1})
        if bad and self._flavor == lib.KNHK_COUNTERS_FLAVOR_SUM:
            self._h = None
            raise SharedBlockError(f"{where} has empty or repeated counter names ({bad[:5]!r}): not a block a "
                                   "knhk process made")
        self._names: tuple[str, ...] = names

    @property
    def _handle(self) -> Any:
        h = self._h
        if h is None:
            raise CounterBlockClosedError(f"this {type(self).__name__} block is closed")
        return h

    def slots_owned(self) -> int:
        """Writer slots owned now, by threads of every attached process."""
        return int(lib.knhk_counters_slots_owned(self._handle))

    def reclaim_dead(self) -> int:
        """Free the slots of processes that died holding them (their counts stay). Done
        automatically when a writer finds no free slot."""
        return int(lib.knhk_counters_reclaim_dead(self._handle))

    def reset(self) -> None:
        """Start every counter again from zero. Adds running meanwhile land before or
        after the reset, none is lost (pattern min/max: see docs/counters.md)."""
        lib.knhk_counters_reset(self._handle)

    def close(self) -> None:
        """Drop this handle: its threads' slots go back to the block, and the mapping is
        unmapped once no call is using it. The creator of a named block also unlinks
        the name (processes already attached keep counting).

        From any thread: a call running meanwhile completes (it holds the handle; the C
        builtins run under the GIL, which close() holds while it detaches them), and every
        later call on the block, its writers and timers raises
        :class:`~knhk_memory.errors.CounterBlockClosedError` (issue 22)."""
        state = self.__dict__.pop("_fast_state", None)
        if state is not None:  # before the handle goes: the builtins take their slow paths
            _fast.detach_counters(state)
        self._h = None

    def keep_name(self) -> None:
        """Leave the name in place when this handle closes, also in the process that
        created the block: whoever decides that the last user is gone removes it
        with :meth:`unlink` (knhk_memory.distributed's node-shared blocks)."""
        self._mapping.unlink_pid = None



def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise CounterIncrementError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    v = int(value)
    if not _I64_MIN <= v <= _I64_MAX:
        raise CounterIncrementError(f"{what} {v} does not fit a signed 64-bit counter "
                                    f"(accepted: {_I64_MIN}..{_I64_MAX})")
    return v


def _refused(status: int, what: str, name: str | None = None) -> None:
    """Raise the error for a refused add: the overflow rule, a dead or foreign writer, or other."""
    if status == lib.KNHK_ERR_OVERFLOW:
        who = f" (counter {name!r})" if name is not None else ""
        raise CounterOverflowError(f"{what}{who}: {last_error()}")
    if status == lib.KNHK_ERR_STATE:
        raise CounterWriterError(last_error())
    check(status, what)


def _int_array(values: Any, what: str, dtype: Any = None) -> np.ndarray:
    import numpy as np

    dtype = np.int64 if dtype is None else dtype
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=dtype)
    if arr.dtype.kind not in "iu":
        raise CounterIncrementError(f"{what} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if dtype is np.int64 and arr.dtype.kind == "u" and int(arr.max()) > _I64_MAX:
        raise CounterIndexError(f"{what} holds {int(arr.max())}, out of range")
    if dtype is np.uint64 and arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise CounterIncrementError(f"{what} holds the negative value {int(arr.min())}; ticks are >= 0")
    return np.ascontiguousarray(arr, dtype=dtype)


class Counters(_Block):
    """Named 64-bit counters, exact across threads and processes.

    ``Counters(["started", "fired"])`` is private to this process (threads
    share it). ``shared=True`` puts it in POSIX shared memory under a fresh
    name (:attr:`name`); ``shared="name"`` or ``shared="/path/file"`` chooses
    it. Another process attaches with ``Counters.attach(name)``; a shared
    block is picklable (it pickles as its name), so it can go to a spawned
    worker as an argument.
    """

    _flavor = lib.KNHK_COUNTERS_FLAVOR_SUM

    def __init__(self, names: Sequence[str], shared: bool | str | os.PathLike[str] = False, *,
                 mode: int = DEFAULT_MODE) -> None:
        if isinstance(names, (str, bytes, bytearray)) or not isinstance(names, (list, tuple)):
            hint = f" (did you mean [{names!r}]?)" if isinstance(names, str) else ""
            raise TypeError(f"counter names must be a list or tuple of str, got {type(names).__name__} "
                            f"{names!r}{hint}")
        names = list(names)
        for n in names:
            if not isinstance(n, str) or not n or "\0" in n:
                raise TypeError(f"counter names must be non-empty strings without NUL, got {n!r}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"counter names must be unique; repeated: {', '.join(map(repr, dupes))}")
        super().__init__(names, shared, mode)

    @classmethod
    def attach(cls, name: str | os.PathLike[str]) -> Counters:
        """Open the shared block another process created under ``name`` (a
        shared-memory name or a file path)."""
        return cls._attach(name)

    def _open(self, mapping: _Mapping) -> None:
        super()._open(mapping)
        # Interned: a caller's literal name is then the very key object, and the lookup in
        # the fast path ends on the identity check instead of a string compare.
        self._index = {sys.intern(n): i for i, n in enumerate(self._names)}
        self._count = len(self._names)
        # add and get as METH_FASTCALL builtins (native/cpython/counters_py.c):
        # a known name or an in-range int index and an int increment are one
        # vectorcall; everything else goes to the methods below, which convert
        # or raise. They shadow the methods on this instance.
        self._fast_state = _fast.counters_state(int(ffi.cast("uintptr_t", self._h)), self._index, self._count)
        self.add = _fast.counters_method(0, self._fast_state, self._add)  # type: ignore[method-assign]
        self.get = _fast.counters_method(1, self._fast_state, self._get)  # type: ignore[method-assign]

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def __len__(self) -> int:
        return len(self._names)

    def index(self, key: str | int) -> int:
        """The index of a counter given by name or index."""
        if isinstance(key, str):
            try:
                return self._index[key]
            except KeyError:
                hint = did_you_mean(key, self._names, cutoff=0.5, template="; nearest: {}", sep=", ")
                shown = ", ".join(map(repr, self._names[:8])) + (", ..." if len(self._names) > 8 else "")
                raise CounterNameError(f"no counter named {key!r}{hint} (counters: {shown})") from None
        if isinstance(key, bool) or not isinstance(key, Integral):
            raise TypeError(f"a counter is named by a string or an integer index, got {type(key).__name__} {key!r}")
        if not 0 <= key < len(self._names):
            raise CounterIndexError(f"counter index {key} is out of range [0, {len(self._names)})")
        return int(key)

    def add(self, key: str | int, n: int = 1) -> None:
        """Add ``n`` (an integer; negative subtracts) to one counter.

        From any thread: C finds the thread's slot through a thread-local
        cache. A worker thread that adds in a loop is a little faster with its
        own :meth:`writer`. (On an open block this is a C builtin with the same
        arguments, errors and messages; see ``_open``.)"""
        self._add(key, n)

    def _add(self, key: str | int, n: int = 1) -> None:
        # The common cases (a known name or a valid int index, a plain int n)
        # take no function call before the C one: this is the hot path.
        if key.__class__ is str:
            i = self._index.get(key)
            if i is None:
                i = self.index(key)
        elif key.__class__ is int and 0 <= key < self._count:
            i = key
        else:
            i = self.index(key)
        if n.__class__ is not int or not _I64_MIN <= n <= _I64_MAX:
            n = _as_int(n, "increment")
        h = self._h
        if h is None:
            raise CounterBlockClosedError("this Counters block is closed")
        status = lib.knhk_counters_add(h, i, n)
        if status:
            _refused(status, "adding to a counter", self._names[i])

    def writer(self) -> CounterWriter:
        """The calling thread's writer handle (see :class:`CounterWriter`): it adds
        to this thread's own slot without a thread-local lookup. Asking again from
        the same thread gives a handle on the same slot."""
        out = ffi.new("knhk_counters_writer **")
        check(lib.knhk_counters_writer_get(self._handle, out), "making a counter writer")
        return CounterWriter(self, out[0])

    def add_many(self, keys: Any, n: int = 1) -> None:
        """Add ``n`` to the counter of every index in ``keys`` (an integer array of shape
        ``(k,)``, or a sequence of names), in one C call. Every index is checked before
        anything is added: a bad one raises and changes nothing.

        :raises ValueError: ``keys`` has more than one dimension (it is never flattened).
        :raises CounterIndexError: an index out of range."""
        import numpy as np

        step = _as_int(n, "increment")
        arr = np.asarray(keys) if not isinstance(keys, np.ndarray) else keys
        if arr.ndim > 1:
            raise ValueError(f"counter indices must be one-dimensional, shape (k,); got shape {arr.shape}")
        if arr.dtype.kind in "UO" and arr.size:
            arr = np.fromiter((self.index(k) for k in arr.reshape(-1)), dtype=np.int64, count=arr.size)
        idx = _int_array(arr, "counter indices")
        if idx.size == 0:
            return
        status = lib.knhk_counters_add_indices(self._handle, ffi.from_buffer("int64_t[]", idx), idx.size, step)
        if status == lib.KNHK_ERR_INVALID:
            raise CounterIndexError(last_error())
        if status:
            _refused(status, "adding to counters")

    def get(self, key: str | int) -> int:
        """One counter's value: exact when no add is running, else see the module docstring."""
        return self._get(key)

    def _get(self, key: str | int) -> int:
        return int(lib.knhk_counters_get(self._handle, self.index(key)))

    def __getitem__(self, key: str | int) -> int:
        return self.get(key)

    def values(self) -> np.ndarray:
        """Every counter's value as an int64 array, in :attr:`names` order."""
        import numpy as np

        out = np.empty(len(self._names), dtype=np.int64)
        check(lib.knhk_counters_snapshot(self._handle, ffi.from_buffer("int64_t[]", out), out.size),
              "reading the counters")
        return out

    def snapshot(self) -> dict[str, int]:
        """``{name: value}`` for every counter."""
        return dict(zip(self._names, (int(v) for v in self.values())))

    def get_and_reset(self) -> dict[str, int]:
        """``{name: value}`` for every counter, each counter starting again from zero
        at exactly the value returned: what an exporter calls instead of
        ``snapshot()`` then ``reset()`` (which loses every add landing between
        the two).

        An add running meanwhile lands either in the value returned or in the
        next one, never in neither and never in both, also with several
        exporters (threads or processes) calling this at once: each slot is read
        once, atomically, and the counter's baseline moves to that sum with a
        compare-and-swap (docs/counters.md, "Reading and resetting"). Counters
        are not re-based at one instant: one counter at a time.
        """
        n = len(self._names)
        out = ffi.new("int64_t[]", n)
        status = lib.knhk_counters_get_and_reset(self._handle, out, n)
        if status:
            check(status, "reading and resetting the counters")
        return dict(zip(self._names, ffi.unpack(out, n)))

    def __repr__(self) -> str:
        if self.closed:
            return f"<Counters closed, {len(self._names)} counters>"
        where = f" shared {self.name!r}" if self.shared else ""
        return f"<Counters{where} {self.snapshot()}>"


class CounterWriter:
    """One thread's writer handle on a :class:`Counters` block, from
    :meth:`Counters.writer`.

    Its :meth:`add` goes straight to the thread's own cache-line-padded slot
    (an ownership check and a load+add+store in C; no thread-local lookup, no
    lock). It belongs to the thread that made it:

    - from another thread, :meth:`add` raises :class:`CounterWriterError` and
      adds nothing (make one writer per thread);
    - once its thread has exited, it is dead: the thread's counts stay in the
      block and its slot goes back, and :meth:`add` raises
      :class:`CounterWriterError` from any thread;
    - in a forked child, the parent's writers are dead; the child makes its own;
    - after the block is closed (from any thread), :meth:`add` raises :class:`CounterBlockClosedError`.
    """

    __slots__ = ("_block", "_h", "_w", "_index", "_count", "add", "__weakref__")

    #: ``add(key, n=1)``: add ``n`` (an integer; negative subtracts) to one
    #: counter, as :meth:`Counters.add`. A C builtin (native/cpython/counters_py.c)
    #: falling back to :meth:`_add` for anything but the common call.
    add: Callable[..., None]

    def __init__(self, block: Counters, w: Any) -> None:
        self._block = block
        self._h = block._handle  # keeps the native handle (and so w) alive
        self._w = w
        self._index = block._index
        self._count = block._count
        state = block.__dict__.get("_fast_state")  # gone once close() (on any thread) has begun
        if state is None:
            raise CounterBlockClosedError("this Counters block is closed; its writers are dead")
        self.add = _fast.counters_method(2, state, self._add, int(ffi.cast("uintptr_t", w)))

    def _add(self, key: str | int, n: int = 1) -> None:
        """Add ``n`` (an integer; negative subtracts) to one counter, as :meth:`Counters.add`."""
        if key.__class__ is str:
            i = self._index.get(key)
            if i is None:
                i = self._block.index(key)
        elif key.__class__ is int and 0 <= key < self._count:
            i = key
        else:
            i = self._block.index(key)
        if n.__class__ is not int or not _I64_MIN <= n <= _I64_MAX:
            n = _as_int(n, "increment")
        if self._block._h is None:
            raise CounterBlockClosedError("this Counters block is closed; its writers are dead")
        status = lib.knhk_counters_writer_add(self._w, i, n)
        if status:
            _refused(status, "adding through a counter writer", self._block._names[i])

    @property
    def counters(self) -> Counters:
        return self._block

    def __repr__(self) -> str:
        return f"<CounterWriter of {self._block!r}>"


class _Timer:
    """``with stats.time(pid):`` -- two C calls: read the TSC, then record."""

    __slots__ = ("_h", "_pattern", "_start")

    def __init__(self, h: Any, pattern: int) -> None:
        self._h = h
        self._pattern = pattern

    def __enter__(self) -> _Timer:
        self._start = lib.knhk_counters_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        lib.knhk_counters_pattern_stop(self._h, self._pattern, self._start)


class PatternStats(_Block):
    """Per-pattern executor statistics: executions and elapsed ticks (total, min,
    max) for each workflow control-flow pattern id 1..43 (:data:`PATTERNS`).

    Ticks are the CPU timestamp counter (``rdtsc`` on x86_64); see
    :meth:`ticks_per_second`. ``shared`` and :meth:`attach` work as for
    :class:`Counters`.
    """

    _flavor = lib.KNHK_COUNTERS_FLAVOR_PATTERNS

    def __init__(self, shared: bool | str | os.PathLike[str] = False, *, mode: int = DEFAULT_MODE) -> None:
        super().__init__([PATTERNS[p] for p in range(1, lib.KNHK_PATTERN_COUNT + 1)], shared, mode)

    @classmethod
    def attach(cls, name: str | os.PathLike[str]) -> PatternStats:
        return cls._attach(name)

    @staticmethod
    def _pattern(pattern: object) -> int:
        if isinstance(pattern, bool) or not isinstance(pattern, Integral):
            raise TypeError(f"a pattern id is an integer 1..{lib.KNHK_PATTERN_COUNT}, got "
                            f"{type(pattern).__name__} {pattern!r}")
        number = int(pattern)
        if not 1 <= number <= lib.KNHK_PATTERN_COUNT:
            raise CounterIndexError(f"pattern id {number} is out of range [1, {lib.KNHK_PATTERN_COUNT}]")
        return number

    @staticmethod
    def ticks() -> int:
        """The timestamp counter now."""
        return int(lib.knhk_counters_ticks())

    @staticmethod
    def ticks_per_second() -> float:
        return float(lib.knhk_counters_ticks_per_second())

    def time(self, pattern: int) -> _Timer:
        """``with stats.time(2): ...`` records one execution of pattern 2."""
        return _Timer(self._handle, self._pattern(pattern))

    def timed(self, pattern: int) -> Callable[[F], F]:
        """Decorator: every call of the function is one execution of ``pattern``."""
        pid = self._pattern(pattern)

        def wrap(fn: F) -> F:
            @functools.wraps(fn)
            def inner(*args: Any, **kwargs: Any) -> Any:
                h = self._handle
                start = lib.knhk_counters_ticks()
                try:
                    return fn(*args, **kwargs)
                finally:
                    lib.knhk_counters_pattern_stop(h, pid, start)
            return inner  # type: ignore[return-value]
        return wrap

    def _open(self, mapping: _Mapping) -> None:
        super()._open(mapping)
        # record as a METH_FASTCALL builtin (native/cpython/counters_py.c): exact
        # ints the core accepts are one vectorcall; the rest goes to _record.
        self._fast_state = _fast.counters_state(int(ffi.cast("uintptr_t", self._h)), {}, 0)
        self.record = _fast.counters_method(3, self._fast_state, self._record)  # type: ignore[method-assign]

    def record(self, pattern: int, ticks: int) -> None:
        """Record one execution of ``pattern`` (1..43) that took ``ticks`` (0..2**63-1).
        (On an open block a C builtin with the same errors; see ``_open``.)"""
        self._record(pattern, ticks)

    def _record(self, pattern: int, ticks: int) -> None:
        t = _as_int(ticks, "ticks")
        if t < 0:
            raise CounterIncrementError(f"ticks must be >= 0, got {t}")
        check(lib.knhk_counters_pattern_record(self._handle, self._pattern(pattern), t), "recording a pattern")

    def record_many(self, patterns: Any, ticks: Any) -> None:
        """Record ``len(patterns)`` executions in one C call: ``patterns[i]`` took
        ``ticks[i]``. All ids are checked first."""
        p = _int_array(patterns, "pattern ids")
        import numpy as np

        t = _int_array(ticks, "ticks", np.uint64)
        if p.shape != t.shape:
            raise ValueError(f"patterns and ticks differ in length: {p.size} and {t.size}")
        if p.size == 0:
            return
        check_as(lib.knhk_counters_pattern_record_many(self._handle, ffi.from_buffer("int64_t[]", p),
                                                       ffi.from_buffer("uint64_t[]", t), p.size),
                 what="recording patterns", special=_BAD_INDEX)

    def _raw(self) -> np.ndarray:
        import numpy as np

        out = np.empty((lib.KNHK_PATTERN_COUNT, 4), dtype=np.uint64)
        check(lib.knhk_counters_pattern_snapshot(self._handle, ffi.from_buffer("uint64_t[]", out), out.size),
              "reading pattern statistics")
        return out

    def as_dict(self, *, all_patterns: bool = False) -> dict[int, dict[str, Any]]:
        """``{pattern_id: {name, executions, total_ticks, min_ticks, max_ticks, mean_ticks}}``
        for every pattern executed (every pattern with ``all_patterns``)."""
        out: dict[int, dict[str, Any]] = {}
        for i, (n, total, lo, hi) in enumerate(self._raw().tolist()):
            if n or all_patterns:
                out[i + 1] = {"name": self._names[i], "executions": n, "total_ticks": total,
                              "min_ticks": lo, "max_ticks": hi, "mean_ticks": total / n if n else 0.0}
        return out

    def table(self) -> str:
        """A readable table of the executed patterns, with mean time in microseconds."""
        rows = self.as_dict()
        per_us = self.ticks_per_second() / 1e6
        head = (f"{'id':>3}  {'pattern':<36} {'execs':>10} {'total ticks':>14} {'min':>10} {'mean':>10} "
                f"{'max':>10} {'mean us':>9}")
        lines = [head, "-" * len(head)]
        for pid, r in rows.items():
            lines.append(f"{pid:>3}  {r['name'][:36]:<36} {r['executions']:>10} {r['total_ticks']:>14} "
                         f"{r['min_ticks']:>10} {r['mean_ticks']:>10.0f} {r['max_ticks']:>10} "
                         f"{r['mean_ticks'] / per_us:>9.3f}")
        if not rows:
            lines.append("(no pattern executed)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        if self.closed:
            return "<PatternStats closed>"
        return f"<PatternStats {sum(r['executions'] for r in self.as_dict().values())} executions>"


# ---------------------------------------------------------------- hot paths


def hot_ops() -> list[Any]:
    """The counters' hot path for the tick harness (see knhk_memory.hotpath)."""
    from .hotpath import HotOp

    def setup() -> tuple[Any, Callable[[], None]]:
        c = Counters(["hot"])
        return ffi.cast("void *", c._handle), c.close

    return [
        HotOp(
            name="counter_add",
            description="one add by 1 through the thread's writer handle (fetched once per batch) on a "
                        "private block: the ownership check and load+add+store of knhk_counters_writer_add, "
                        "inlined as in a caller inside the library",
            fn=ffi.addressof(lib, "knhk_counters_hotop_writer_add"),
            setup=setup,
        ),
        HotOp(
            name="counter_add_call",
            description="the same add through the exported knhk_counters_writer_add, called through a "
                        "function pointer as a caller in another shared object calls it",
            fn=ffi.addressof(lib, "knhk_counters_hotop_writer_add_call"),
            setup=setup,
        ),
        HotOp(
            name="counter_add_lookup",
            description="one knhk_counters_add by 1 on a private block: the thread-cache lookup "
                        "(__tls_get_addr) on every add, then the same load+add+store",
            fn=ffi.addressof(lib, "knhk_counters_hotop_add"),
            setup=setup,
        ),
    ]


# The C fast paths (native/cpython/counters_py.c) hand every unusual call to these
# methods, so Python's own argument errors name them: they should name what the caller
# called ("Counters.add() got an unexpected keyword argument 'name'", not "_add()").
for _cls, _slow, _public in ((Counters, "_add", "add"), (Counters, "_get", "get"),
                             (CounterWriter, "_add", "add"), (PatternStats, "_record", "record")):
    getattr(_cls, _slow).__qualname__ = f"{_cls.__name__}.{_public}"
del _cls, _slow, _public
