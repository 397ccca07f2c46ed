"""The one place that loads the compiled core and turns C status codes into exceptions.

Everything else imports ``ffi`` and ``lib`` from here, never from ``_native``
directly, so a missing build is reported once, with what to do about it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from .errors import KnhkMemoryError, NativeError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (~2 ms of every import); type checkers read True
if TYPE_CHECKING:
    from typing import NoReturn

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


ErrorFactory = Callable[[str], BaseException]


def check_as(status: int, error: ErrorFactory | None = None, *, what: str = "",
             exc_type: type[KnhkMemoryError] = NativeError,
             special: Mapping[int, ErrorFactory] | None = None) -> None:
    """Raise unless ``status`` is KNHK_OK: the one way a C status becomes an exception.

    ``special[status](detail)`` when the status has an exception of its own
    (``{lib.KNHK_ERR_NOMEM: lambda d: MemoryError(...)}``), else
    ``error(detail)`` for a message the caller words, else the standard
    message of :func:`check` (``what``, ``exc_type``). ``detail`` is the
    calling thread's last message from the C core (:func:`last_error`), read
    before any factory runs.
    """
    if status == lib.KNHK_OK:
        return
    make = special.get(status, error) if special else error
    if make is None:
        raise_status(status, what, exc_type)
    raise make(last_error())


__all__ += ["check_as", "ErrorFactory"]


def check_core_version(core: str, package: str) -> None:
    """Raise ImportError unless the compiled C core's version (``knhk_version()``)
    is the package's (``knhk_memory/_version.py``): a core left over from
    another build would be called with the wrong layouts."""
    if core != package:
        raise ImportError(
            f"knhk_memory's compiled C core is version {core!r} but the Python package is {package!r}: the "
            "build is stale. Rebuild it with `pip install .` (or `bash scripts/dev.sh setup`; in a source "
            "tree, `python setup.py build_ext --inplace`).")


def _check_loaded_core() -> None:
    from ._version import __version__

    check_core_version(ffi.string(lib.knhk_version()).decode("utf-8", "replace"), __version__)


_check_loaded_core()
__all__ += ["check_core_version"]
