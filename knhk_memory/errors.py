"""Exceptions raised by knhk_memory.

Every message names what is wrong, the value given, and what would be
accepted. All of them derive from :class:`KnhkMemoryError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def did_you_mean(word: str, candidates: Iterable[str], *, cutoff: float = 0.6,
                 template: str = " (did you mean {}?)", sep: str = " or ",
                 normalise: Callable[[str], str] | None = None) -> str:
    """The one "did you mean" suggestion of every error message: up to three of
    ``candidates`` close to ``word`` (:func:`difflib.get_close_matches`, ratio
    at least ``cutoff``), each ``repr``'d, joined by ``sep`` and put into
    ``template``; ``""`` when none is close. With ``normalise``, a word with no
    close match is compared again in normalised form (the candidates given
    back as they were spelled)."""
    import difflib  # on an error path only: not paid by `import knhk_memory`

    names = list(candidates)
    close = difflib.get_close_matches(word, names, n=3, cutoff=cutoff)
    if not close and normalise is not None:
        spelled = {normalise(c): c for c in names}
        close = [spelled[c] for c in difflib.get_close_matches(normalise(word), list(spelled), n=3, cutoff=cutoff)]
    return template.format(sep.join(repr(c) for c in close)) if close else ""


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


class HotOpError(KnhkMemoryError, ValueError):
    """A hot-path operation is malformed, or two providers give the same name."""


class UnknownOperationError(KnhkMemoryError, LookupError):
    """A budget or ``--only`` names a hot-path operation nobody provides."""
# ---------------------------------------------------------------- once-cells and registries


class _KeyMessage:
    """For errors that are also KeyError: str() is the message, not its repr."""

    args: tuple[object, ...]  # from the exception class it is mixed into

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ReentrantInitError(KnhkMemoryError, RuntimeError):
    """A once-cell's initialiser asked for the same cell (it would deadlock)."""


class AlreadySetError(KnhkMemoryError, RuntimeError):
    """``OnceLock.set`` on a cell that already holds a value."""


class UnknownPatternError(_KeyMessage, KnhkMemoryError, KeyError):
    """No workflow pattern has the number or name given."""


class RegistryFrozenError(KnhkMemoryError, RuntimeError):
    """A registry was changed after the engine started (it is frozen)."""


class DuplicateNameError(KnhkMemoryError, ValueError):
    """A name (resource, executor) is registered twice."""


class UnknownResourceError(_KeyMessage, KnhkMemoryError, KeyError):
    """``GlobalResourceRegistry.get`` of a name nobody registered."""


class ResourceFactoryError(KnhkMemoryError, RuntimeError):
    """A resource's factory raised; ``__cause__`` is its exception. The next get retries."""

    def __init__(self, message: str, *, name: str) -> None:
        self.name = name
        super().__init__(message)


class RegistryClosedError(KnhkMemoryError, RuntimeError):
    """A resource registry was used after it was closed."""

# ---------------------------------------------------------------- counters


class CounterNameError(KnhkMemoryError, KeyError):
    """A counter name the block does not have; the message lists the nearest names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CounterIndexError(KnhkMemoryError, IndexError):
    """A counter index (or pattern id) outside the block's range."""


class CounterIncrementError(KnhkMemoryError, TypeError):
    """An increment, index array or tick value that is not an integer of the accepted range."""


class CounterWriterError(KnhkMemoryError, RuntimeError):
    """A counter writer handle used by a thread that does not own it, or after it died
    (its thread exited, its block was closed, or the process forked since it was made)."""


class SharedBlockError(KnhkMemoryError, ValueError):
    """A shared counter block that is not ours: wrong magic, version, layout or names."""


class SharedBlockNotFoundError(SharedBlockError, FileNotFoundError):
    """No shared counter block exists under the name or path given."""


class SharedBlockPermissionError(SharedBlockError, PermissionError):
    """The shared block exists but this process may not open it (its mode or owner)."""


class SharedBlockExistsError(SharedBlockError, FileExistsError):
    """A block already exists under the name given; the message says who made it,
    whether that process is still running, and how to remove a leftover."""


class CounterBlockClosedError(KnhkMemoryError, ValueError):
    """A counter, pattern-statistics or metrics block (or a writer, timer or metric child of
    one) was used after its close(), from this thread or another (issue 22)."""


class CounterOverflowError(KnhkMemoryError, OverflowError):
    """An add would take a thread's slot of a counter past +-2^56 (the overflow rule,
    docs/counters.md); nothing was added."""


# ---------------------------------------------------------------- metrics (issue 17)


class MetricError(KnhkMemoryError, ValueError):
    """A metric family or label set that cannot be declared or used as given."""


class MetricNameError(MetricError):
    """A metric or label name the exposition format cannot carry (metric names match
    ``[a-zA-Z_:][a-zA-Z0-9_:]*``, label names ``[a-zA-Z_][a-zA-Z0-9_]*``, not ``__*``)."""


class LabelValueError(MetricError):
    """Label values that do not match the family's label names (missing, extra, not a string)."""


class HistogramBucketsError(MetricError):
    """Histogram bucket bounds that are not strictly increasing finite numbers."""


class MetricDefinitionError(MetricError):
    """A family declared again (in this or another process) with another type, labels or buckets."""


class LabelSetLimitError(KnhkMemoryError, RuntimeError):
    """A new label set past the block's bound (``[metrics] max_label_sets``), or past its cells,
    label-value bytes or families; the message names the bound and the config key."""

# ---------------------------------------------------------------- arena

class ArenaClosedError(KnhkMemoryError, ValueError):
    """An arena (or a ThreadLocalArena) was used after close(), as with a closed file."""


class BlockFreedError(KnhkMemoryError, ValueError):
    """An allocator Block was used after free() (its close), from this thread or another."""


class ArenaBusyError(KnhkMemoryError, RuntimeError):
    """reset() was called while blocks or arrays made from the arena are still alive."""


class ArenaThreadError(KnhkMemoryError, RuntimeError):
    """An arena was used from a thread other than the one that created it."""

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


class StoreKeyEncodingError(StoreError, ValueError):
    """A key is a str with no UTF-8 form (a lone surrogate such as ``"\\ud800"``): keys are UTF-8."""


class DuplicateKeyError(StoreError, ValueError):
    """A writer was given the same key twice without ``last_wins=True``."""


class StoreClosedError(StoreError, ValueError):
    """The store (or writer) was used after close()."""


class StoreChangedError(StoreError):
    """The store file was rewritten in place or truncated under an open reader.

    The read that noticed (and every later one) raises this instead of giving
    an answer from a half-old, half-new file; :meth:`WorkflowStore.reopen`
    moves on to the file now at the path."""


class StoreDecodeError(StoreError, ValueError):
    """``get_decoded``'s decoder rejected a stored value; ``__cause__`` is its exception."""


class StoreDiskFullError(StoreError, OSError):
    """Writing a store ran out of space; the message says how much was needed and free."""


# Record layer (knhk_memory.records) and engine adapters (issue 18).


class AmbiguousKeyError(StoreKeyError):
    """An alias names several records; the message lists every one."""


class UntrustedPickleError(StoreError, PermissionError):
    """A pickled record was asked for from a store not opened with ``trust_pickle=True``."""


class AdapterBuildError(KnhkMemoryError, ValueError):
    """An engine adapter could not build a store: ``problems`` lists (input, error) pairs."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(message)


class KeyTemplateError(KnhkMemoryError, ValueError):
    """A ``store build --key`` template names an unknown field or no field."""


class EngineVersionError(StoreError, RuntimeError):
    """A store was built by another version of the engine than the one loading it."""


class UnknownProcessError(StoreKeyError):
    """An engine adapter was asked for a process id the store does not hold."""


# ---------------------------------------------------------------- pools (issue 19)


class PoolError(KnhkMemoryError):
    """A block pool (FixedPool, LockFreePool, ThreadLocalPool) refused a call."""


class PoolExhaustedError(PoolError, RuntimeError):
    """Every block of a pool is in use; the message names the capacity and the config key."""


class PoolDoubleFreeError(PoolError, ValueError):
    """A block was freed that is not allocated (freed twice, or never handed out)."""


class PoolForeignPointerError(PoolError, ValueError):
    """free() of an address that is not the start of one of this pool's blocks."""


class PoolClosedError(PoolError, ValueError):
    """A pool was used after close(), as with a closed file."""


class PoolForkedError(PoolError, RuntimeError):
    """A pool made before fork() was used in the child (its blocks are the parent's)."""


class PoolThreadError(PoolError, RuntimeError):
    """A FixedPool was used from a thread other than the one that created it."""


class PoolCorruptError(PoolError, RuntimeError):
    """A freed block was written to and its free-list link no longer makes sense."""


class NumaError(KnhkMemoryError, OSError):
    """A NUMA placement was refused by the kernel, or names a node this machine lacks."""


# ---------------------------------------------------------------- memory-mapped vectors (issue 19)


class StoreDtypeError(StoreFormatError):
    """An MmapVec file holds records of another dtype than the one asked for."""


class StoreLockedError(StoreError, BlockingIOError):
    """Another MmapVec (in this or another process) has the file open for writing."""


class StoreNotRegularError(StoreError, ValueError):
    """The path names a directory, device, FIFO or socket, not a regular file."""


class StoreFullError(StoreError, OSError):
    """The file could not grow (disk full, file size limit); its length is unchanged."""


class StoreReadOnlyError(StoreError, ValueError):
    """A write to an MmapVec opened read-only."""


# ---------------------------------------------------------------- simd

class SimdLevelError(KnhkMemoryError, RuntimeError):
    """A SIMD level was asked for (``KNHK_SIMD``, :func:`knhk_memory.simd.set_level`,
    ``[simd] level``) that is unknown or that this CPU lacks."""


class SimdTypeError(KnhkMemoryError, TypeError):
    """An input to a SIMD scan has the wrong type or dtype."""


class SimdValueError(KnhkMemoryError, ValueError):
    """An input to a SIMD scan has an acceptable type but a bad value or layout."""


# ---------------------------------------------------------------- process-wide state

class ProcessStateError(KnhkMemoryError, RuntimeError):
    """An engine asked for process-wide settings (allocator backend, numpy
    routing, SIMD level) that differ from those another engine in the process
    holds (:mod:`knhk_memory.process`). ``key`` is the config key of the first
    setting that differs."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.key = key
        super().__init__(message)


class AlreadyConfiguredError(KnhkMemoryError, RuntimeError):
    """``knhk_configure`` was called again on a configuration that is still
    configured (call ``knhk_unconfigure`` first)."""


# ---------------------------------------------------------------- the process allocator


class ProcessInspectError(KnhkMemoryError, LookupError):
    """Another process's memory cannot be read: no such process, not ours, or no /proc."""


# ---------------------------------------------------------------- reference host

class WorkflowDefinitionError(KnhkMemoryError, ValueError):
    """A workflow definition is malformed; ``workflow`` is its id (or store key)."""

    def __init__(self, message: str, *, workflow: str | None = None) -> None:
        self.workflow = workflow
        super().__init__(message)


class HostError(KnhkMemoryError, RuntimeError):
    """The reference host cannot run as asked: a missing service, a counter it
    needs, an empty store, a bad run parameter."""


class CheckFailedError(KnhkMemoryError, RuntimeError):
    """A run's results did not check out; ``failures`` lists every failed check."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = list(failures)
        super().__init__(f"{len(self.failures)} check(s) failed: " + "; ".join(self.failures))


# ---------------------------------------------------------------- distributed (Dask)

class ClusterError(KnhkMemoryError, RuntimeError):
    """A run on a Dask cluster cannot start or cannot go on: a bad ``--cluster``
    value, a scheduler that does not answer, a plugin the workers refused."""


class WorkerError(ClusterError):
    """One Dask worker failed to set up or to run knhk-memory; ``address`` is the worker's."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        # address has a default so the exception unpickles (Dask ships it to the client)
        self.address = address
        super().__init__(message)


class WorkerVersionError(WorkerError):
    """A worker's knhk-memory version differs from the client's."""


class WorkerStoreError(WorkerError):
    """A worker's copy of the workflow store is missing or its checksum differs from the client's."""


class WorkerBackendError(WorkerError):
    """A worker cannot load the allocator backend the configuration names."""


# Every exception class defined above; knhk_memory re-exports them all.
__all__ = sorted(name for name, obj in list(globals().items())
                 if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == __name__)
