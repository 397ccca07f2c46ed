"""Once-cells: ``OnceLock`` and ``Lazy``, with Rust's ``std::sync::OnceLock`` semantics.

An engine builds expensive things once (the pattern table, an allocator
backend, an open store) and reads them millions of times. These cells make the
read as cheap as an attribute access and the build exactly-once:

- ``OnceLock.get()`` never blocks; it returns None while the cell is empty or
  still being initialised.
- ``OnceLock.get_or_init(f)`` runs ``f`` once among racing threads; the
  others wait and get the same value. If ``f`` raises, the exception reaches
  its caller, the cell stays empty, and the next call retries.
- ``f`` asking for its own cell (same thread) raises :class:`ReentrantInitError`
  instead of deadlocking.
- After ``os.fork()``, a cell whose initialiser was running in another thread
  of the parent (a thread the child does not have) is reset in the child, so
  the child retries instead of hanging on the dead thread's lock.

The cells are pure Python on purpose: a call into the C core through cffi
costs ~100 ns, several times an attribute read. The C once-cell
(``knhk_once_*`` in native/knhk.h) is for the native side.

Not for: values that change (use a lock), per-thread values (``threading.local``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from . import _fast
from .errors import AlreadySetError, ReentrantInitError

T = TypeVar("T")

__all__ = ["OnceLock", "Lazy"]

# Cells whose initialiser is running, so a fork child can reset those it lost.
# _running_guard is held only for a set update, and across fork() (below), so
# the child never inherits it locked.
_running: set[OnceLock[Any]] = set()
_running_guard = threading.Lock()


def _reset_after_fork() -> None:
    global _running_guard
    _running_guard = threading.Lock()
    me = threading.get_ident()
    for cell in list(_running):
        if cell._owner != me:
            # Its initialiser ran in a thread this child does not have: the lock
            # would never be released. The forking thread's own cells stay.
            cell._lock = threading.Lock()
            cell._owner = None
            _running.discard(cell)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(before=lambda: _running_guard.acquire(),
                        after_in_parent=lambda: _running_guard.release(),
                        after_in_child=_reset_after_fork)


class OnceLock(_fast.OnceBase, Generic[T]):
    """A cell written once, then read without locking.

    ``get()`` is a C method of the base class (native/cpython/cells_py.c): a
    field read, no Python frame, no lock; the field holds None until the value
    is published.

    ``set(value)`` raises :class:`AlreadySetError` when the cell is full (Rust
    returns ``Err(value)``; the exception carries the rejected value as
    ``.args[1]``). A cell may hold None; :meth:`is_set` tells a stored None
    from an empty cell.
    """

    __slots__ = ("_lock", "_owner", "_name", "__weakref__")  # _value and _full: the C base's fields

    def __init__(self, name: str | None = None) -> None:
        self._value: T | None = None
        self._full = False
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread ident running the initialiser
        self._name = name

    # get() -> T | None: the value, or None while the cell is empty or being
    # initialised; never blocks. The base class's C method; while the cell is
    # empty it asks _get_slow.
    def _get_slow(self) -> T | None:
        return self._value

    def is_set(self) -> bool:
        return self._full

    def get_or_init(self, f: Callable[[], T]) -> T:
        """The value, running ``f()`` to make it if the cell is empty (exactly once)."""
        if self._full:
            return self._value  # type: ignore[return-value]
        return self._init_slow(f)

    def set(self, value: T) -> None:
        """Fill the empty cell with ``value``; raise :class:`AlreadySetError` if it is full.

        Waits for an initialiser running in another thread, as Rust's ``set`` does."""
        if not self._full:
            self._enter()
            try:
                if not self._full:
                    self._publish(value)
                    return
            finally:
                self._exit()
        raise AlreadySetError(f"{self._label()} already holds {self._value!r}; set({value!r}) "
                              "is accepted only on an empty cell", value)

    def _label(self) -> str:
        return f"OnceLock {self._name!r}" if self._name else "the OnceLock"

    def _enter(self) -> None:
        me = threading.get_ident()
        if self._owner == me:
            raise ReentrantInitError(
                f"re-entrant initialisation of {self._label()}: its initialiser, running in this "
                "thread, asked for the same cell (it would wait for itself); break the cycle")
        self._lock.acquire()
        self._owner = me
        with _running_guard:
            _running.add(self)

    def _exit(self) -> None:
        with _running_guard:
            _running.discard(self)
        self._owner = None
        self._lock.release()

    def _publish(self, value: T) -> None:
        # Value before flag: get_or_init's lock-free path reads the flag first.
        self._value = value
        self._full = True

    def _init_slow(self, f: Callable[[], T]) -> T:
        self._enter()
        try:
            if not self._full:  # the thread we waited for may have filled it
                self._publish(f())
        finally:
            self._exit()
        return self._value  # type: ignore[return-value]

    def __repr__(self) -> str:
        state = f"value={self._value!r}" if self._full else "empty"
        return f"<OnceLock{' ' + repr(self._name) if self._name else ''} {state}>"


class Lazy(_fast.OnceBase, Generic[T]):
    """A value computed by ``f()`` on first access of ``.value``, with OnceLock's guarantees.

    Before the first access ``value`` is a property that initialises through a
    :class:`OnceLock`; the first access stores the result in a slot and
    switches the object to a subclass whose ``value`` *is* that slot. From then
    on ``lazy.value`` is a plain slot read that CPython specialises, with no
    ``__getattr__`` hook in the way (a hook would slow every attribute read).

    >>> TABLE = Lazy(lambda: {"a": 1})
    >>> TABLE.value["a"]
    1
    """

    __slots__ = ("_cell", "_f")  # _value and _full: the C base's fields
    _cell: OnceLock[T]
    _f: Callable[[], T]

    def __init__(self, f: Callable[[], T], name: str | None = None) -> None:
        if not callable(f):
            raise TypeError(f"Lazy needs a callable taking no arguments, got {f!r}")
        object.__setattr__(self, "_f", f)
        object.__setattr__(self, "_cell", OnceLock(name or getattr(f, "__qualname__", None)))

    @property
    def value(self) -> T:
        value = self._cell.get_or_init(self._f)
        # Slot first, flag and class second: a reader that sees either finds the slot set.
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_full", True)
        object.__setattr__(self, "__class__", _ReadyLazy)
        return value

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError("a Lazy value is computed once and read-only")

    # get() -> T: the value (computing it on the first call), as ``.value``.
    # The base class's C method; before the value exists it asks _get_slow.
    def _get_slow(self) -> T:
        return self.value

    def is_set(self) -> bool:
        return self._cell.is_set()

    def __repr__(self) -> str:
        return f"<Lazy {self._cell._value!r}>" if self._cell.is_set() else f"<Lazy {self._f!r} (not computed)>"


class _ReadyLazy(Lazy[Any]):
    """A Lazy whose value is computed: ``value`` is the ``_value`` slot itself."""

    __slots__ = ()
    value = _fast.OnceBase.__dict__["_value"]
