"""Locks a forked child gets unlocked.

``os.fork()`` copies a ``threading.Lock`` as it is: a lock that another thread
held at that moment stays locked in the child forever, since that thread does
not exist there, and the child's next ``with lock:`` hangs. Every lock of this
package that guards process-local state is registered here, and the
``after_in_child`` fork hook gives the child a new, unlocked one. (The C core's
own locks are handled by pthread_atfork in native/; see docs/reliability.md.)

Only the thread that called fork runs in the child, and it was not inside one
of these locks (fork is not called while holding them), so nothing the child
can still run is inside the critical section the old lock guarded.
"""

from __future__ import annotations

import os
import threading
import weakref

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (~2 ms of every import); type checkers read True
if TYPE_CHECKING:
    from typing import Any

__all__ = ["renew_in_child"]

_owners: list[tuple[Any, str]] = []  # (weak reference to the owner, attribute)
_guard = threading.Lock()


def renew_in_child(owner: Any, attr: str) -> None:
    """Give ``owner.attr`` (a lock) a fresh ``threading.Lock`` in every forked child.

    ``owner`` is an object or a module; it is held weakly, so registering costs
    nothing once the owner is gone.
    """
    with _guard:
        _owners.append((weakref.ref(owner), attr))


def _after_in_child() -> None:
    global _guard
    _guard = threading.Lock()
    alive = []
    for ref, attr in _owners:
        owner = ref()
        if owner is not None:
            setattr(owner, attr, threading.Lock())
            alive.append((ref, attr))
    _owners[:] = alive


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(before=lambda: _guard.acquire(), after_in_parent=lambda: _guard.release(),
                        after_in_child=_after_in_child)
