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


# ---------------------------------------------------------------- workflow store


class StoreError(KnhkMemoryError):
    """A workflow store file cannot be opened, read or written.

    ``path`` is the file, ``problem`` a short tag (``"empty"``, ``"truncated"``,
    ``"bad-magic"``, ``"newer-version"``, ``"corrupt"``, ``"missing"``, ...).
    """

    def __init__(self, message: str, *, path: object = None, problem: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The store file does not exist."""


class StorePermissionError(StoreError, PermissionError):
    """The store file (or its directory, when writing) is not accessible."""


class StoreIsADirectoryError(StoreError, IsADirectoryError):
    """The store path names a directory, not a file."""


class StoreFormatError(StoreError, ValueError):
    """The file is not a valid workflow store; the subclass says how."""


class StoreEmptyError(StoreFormatError):
    """The file has no bytes at all."""


class StoreTruncatedError(StoreFormatError):
    """The file is shorter than its header says (an interrupted copy)."""


class StoreMagicError(StoreFormatError):
    """The file does not start with the store's magic bytes: it is something else."""


class StoreVersionError(StoreFormatError):
    """The file was written by a newer format version than this reader knows."""


class StoreCorruptError(StoreFormatError):
    """A checksum or a structural check failed: flipped bits, garbage or a damaged region."""


class StoreKeyError(StoreError, KeyError):
    """A key is not in the store."""


class DuplicateKeyError(StoreError, ValueError):
    """A writer was given the same key twice without ``last_wins=True``."""


class StoreClosedError(StoreError, ValueError):
    """The store (or writer) was used after close()."""
