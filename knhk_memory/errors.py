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


# ---------------------------------------------------------------- counters


class CounterNameError(KnhkMemoryError, KeyError):
    """A counter name the block does not have; the message lists the nearest names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CounterIndexError(KnhkMemoryError, IndexError):
    """A counter index (or pattern id) outside the block's range."""


class CounterIncrementError(KnhkMemoryError, TypeError):
    """An increment, index array or tick value that is not an integer of the accepted range."""


class SharedBlockError(KnhkMemoryError, ValueError):
    """A shared counter block that is not ours: wrong magic, version, layout or names."""


class SharedBlockNotFoundError(SharedBlockError, FileNotFoundError):
    """No shared counter block exists under the name or path given."""
