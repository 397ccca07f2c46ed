"""Exceptions raised by knhk_memory.

Every message names what is wrong, the value given, and what would be
accepted. All of them derive from :class:`KnhkMemoryError`.
"""

from __future__ import annotations


class KnhkMemoryError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(KnhkMemoryError, ValueError):
    """A configuration file or value is wrong.

    ``source`` is the file (or ``"<defaults>"``, ``"<argument>"``), ``key`` the
    dotted key (``"allocator.backend"``), ``value`` what was given.
    """

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None,
                 value: object = None) -> None:
        self.source = source
        self.key = key
        self.value = value
        prefix = "".join(f"{part}: " for part in (source, key) if part is not None)
        super().__init__(prefix + message)


class BackendUnavailableError(KnhkMemoryError, RuntimeError):
    """An allocator backend's library is missing or cannot be loaded here."""


class NativeError(KnhkMemoryError, RuntimeError):
    """A call into the C core failed; the message carries the C status."""


# ---------------------------------------------------------------- simd

class SimdLevelError(KnhkMemoryError, RuntimeError):
    """A SIMD level was asked for (``KNHK_SIMD``, :func:`knhk_memory.simd.set_level`,
    ``[simd] level``) that is unknown or that this CPU lacks."""


class SimdTypeError(KnhkMemoryError, TypeError):
    """An input to a SIMD scan has the wrong type or dtype."""


class SimdValueError(KnhkMemoryError, ValueError):
    """An input to a SIMD scan has an acceptable type but a bad value or layout."""
