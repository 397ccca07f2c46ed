"""The one place that loads the compiled core and turns C status codes into exceptions.

Everything else imports ``ffi`` and ``lib`` from here, never from ``_native``
directly, so a missing build is reported once, with what to do about it.
"""

from __future__ import annotations

import os
from typing import NoReturn

from .errors import KnhkMemoryError, NativeError

try:
    from ._native import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "knhk_memory's C core (knhk_memory._native) is not built: "
        f"{exc}. Install the package with `pip install .` (or run "
        "`bash scripts/dev.sh test`, which builds it)."
    ) from exc

__all__ = ["ffi", "lib", "check", "raise_status", "last_error"]

if hasattr(os, "register_at_fork"):  # POSIX
    # A fork waits for the core's own dlopen() calls (native/fork.c): a child
    # forked mid-dlopen would have an inconsistent dynamic loader.
    os.register_at_fork(before=lambda: lib.knhk_fork_prepare(), after_in_parent=lambda: lib.knhk_fork_parent(),
                        after_in_child=lambda: lib.knhk_fork_child())


def last_error() -> str:
    """The calling thread's last message from the C core, or ''."""
    return ffi.string(lib.knhk_last_error()).decode("utf-8", "replace")


def raise_status(status: int, what: str, exc_type: type[KnhkMemoryError] = NativeError) -> NoReturn:
    name = ffi.string(lib.knhk_status_name(status)).decode()
    detail = last_error()
    raise exc_type(f"{what}: {name} (status {status})" + (f": {detail}" if detail else ""))


def check(status: int, what: str, exc_type: type[KnhkMemoryError] = NativeError) -> None:
    """Raise ``exc_type`` unless ``status`` is KNHK_OK."""
    if status != lib.KNHK_OK:
        raise_status(status, what, exc_type)
