"""Past one machine: knhk-memory on every worker of a Dask ``distributed`` cluster.

Shared memory does not span machines, so a host whose case load outgrows one
machine runs its batches as Dask tasks. This module is the part every such
host needs; :mod:`knhk_memory.refhost.cluster` is the reference host's use of it.

- :class:`StoreArtifact`: the workflow store as an immutable artifact, named by
  its SHA-256. Shipped **by path** (workers share the client's filesystem; each
  worker hashes the file before use) or **by content**: the client stages the
  bytes on the scheduler (:func:`stage_store`, in chunks); on each node the
  first worker to take the node's lock (``<cache>/stores/.<sha256>.lock``)
  fetches them, checks their SHA-256 and writes ``<cache>/stores/<sha256>.knhk``
  atomically; the node's other workers wait on the lock and use the file. So
  the bytes cross the network once per node, and every worker hashes the file
  before use. A worker never opens a store whose checksum differs from the
  client's: :class:`~knhk_memory.errors.WorkerStoreError`, naming the worker,
  the path and both checksums.
- :class:`KnhkWorkerPlugin`: a Dask ``WorkerPlugin``. ``setup`` (on every
  worker, including workers that join later) checks that the worker's
  knhk-memory version is the client's, resolves the store, and makes a host
  session from the client's config: the knhk plugin manager configured
  (allocator backend, numpy routing, counters, arena), the store opened.
  ``teardown`` (at unregistration or worker shutdown) closes the session, which
  unconfigures the plugins. A failure is raised with the worker's address; a
  worker that cannot load the configured allocator backend raises
  :class:`~knhk_memory.errors.WorkerBackendError` and nothing falls back to
  another backend.
- Counters live per node (:class:`NodeBlocks`): the workers of one machine
  count into one shared counter block and one pattern-statistics block, named
  from the run and the node, made by the node's first worker, attached by the
  others, removed by the last to leave (a killed worker leaves its counts and
  drops out by itself). A task returns its own counter deltas with its result
  (the engine meters what it adds), and the client merges results by batch id
  with :class:`BatchResults`, so a batch re-run after its worker died is
  counted once, never twice and never zero times. The client's totals are that
  merge; the node blocks are read at the end and checked against it (equal on
  a node that lost no worker; larger by the lost runs' partial adds on one
  that did).
- :func:`connect`: ``local[:N]`` (a ``LocalCluster`` of N one-thread worker
  processes on 127.0.0.1) or ``tcp://HOST:PORT`` (a running scheduler), with a
  timeout and an error that names the address.

Needs the ``dask`` extra: ``pip install 'knhk-memory[dask]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import distributed
    from distributed import Client, LocalCluster, WorkerPlugin, get_worker
    from distributed.core import rpc
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("knhk_memory.distributed needs Dask's distributed scheduler, which is not installed: "
                      "pip install 'knhk-memory[dask]'") from _exc

from .config import Config, cache_dir, validate
from .counters import Counters, PatternStats
from .errors import (
    BackendUnavailableError,
    ClusterError,
    ConfigError,
    KnhkMemoryError,
    SharedBlockExistsError,
    SharedBlockNotFoundError,
    WorkerBackendError,
    WorkerError,
    WorkerStoreError,
    WorkerVersionError,
)

__all__ = ["StoreArtifact", "KnhkWorkerPlugin", "WorkerSession", "NodeBlocks", "BatchResults", "ClusterSpec",
           "parse_cluster", "connect", "register", "unregister", "session", "worker_state", "worker_addresses",
           "worker_figures", "stage_store", "unstage_store", "node_id", "sum_counters", "package_version",
           "file_sha256", "DEFAULT_TIMEOUT", "SHIPPING", "STAGE_CHUNK"]

DEFAULT_TIMEOUT = 10.0
SHIPPING = ("path", "content")
#: Bytes per chunk of a store staged on the scheduler (one message each).
STAGE_CHUNK = 4 << 20
#: Seconds a node's first worker may take to fetch a staged store.
FETCH_TIMEOUT = 300.0

log = logging.getLogger(__name__)

# Per process, for tests and for the report: how many sessions this worker
# process has set up and torn down, and whether it wrote a store to its cache.
_STATE = {"set_up": 0, "torn_down": 0, "open": 0, "stores_written": 0, "stores_reused": 0, "store_fetches": 0,
          "store_bytes_fetched": 0, "node_blocks_created": 0, "node_blocks_removed": 0}
_STATE_LOCK = threading.Lock()


def package_version() -> str:
    """This process's knhk-memory version (the installed distribution's)."""
    import knhk_memory

    return str(knhk_memory.__version__)


def worker_state() -> dict[str, int]:
    """This process's session figures: ``set_up``, ``torn_down``, ``open``,
    ``stores_written``, ``stores_reused``, ``store_fetches`` and
    ``store_bytes_fetched`` (store content pulled over the network, in bytes),
    ``node_blocks_created`` and ``node_blocks_removed`` (node-shared counter
    block pairs made and removed). Run it on workers with ``client.run``."""
    with _STATE_LOCK:
        return dict(_STATE)


def _count(key: str, n: int = 1) -> None:
    with _STATE_LOCK:
        _STATE[key] += n


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, as 64 lowercase hex digits."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------- the store as an artifact

@dataclass(frozen=True)
class StoreArtifact:
    """The client's workflow store, named by its SHA-256, ready to ship to workers.

    :param path: The store file on the client.
    :param sha256: SHA-256 of its bytes (64 hex digits).
    :param size: Its size in bytes.
    :param shipping: ``"path"`` (workers open ``path``, which they share with
        the client) or ``"content"`` (workers keep a copy in their node's cache
        directory, fetched once per node).
    :param content: The bytes, on the client only: an artifact pickles
        without them (to the workers it is a name, a size and a checksum).
    """

    path: str
    sha256: str
    size: int
    shipping: str = "path"
    content: bytes | None = field(default=None, repr=False, compare=False)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # The bytes never travel with the artifact (nor with a plugin holding it).
        return (StoreArtifact, (self.path, self.sha256, self.size, self.shipping))

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], *, shipping: str = "path") -> StoreArtifact:
        """Hash the store at ``path`` (and read it, for ``shipping="content"``).

        :raises ClusterError: ``shipping`` is not ``"path"`` or ``"content"``.
        :raises WorkerStoreError: the file cannot be read.
        """
        if shipping not in SHIPPING:
            raise ClusterError(f"store shipping must be one of {', '.join(SHIPPING)}, got {shipping!r}")
        p = Path(path).absolute()
        try:
            if shipping == "content":
                data = p.read_bytes()
                return cls(str(p), hashlib.sha256(data).hexdigest(), len(data), shipping, data)
            size = p.stat().st_size
            return cls(str(p), file_sha256(p), size, shipping)
        except OSError as exc:
            raise WorkerStoreError(f"cannot read the workflow store {p} on the client ({exc.strerror})",
                                   address="client") from None

    def resolve(self, *, cache: str | os.PathLike[str] | None = None, address: str = "this process",
                fetch: Callable[[], bytes] | None = None) -> Path:
        """The verified local path of the store on this worker.

        By path: hash the file at ``path`` and compare. By content: under the
        node's lock (``<cache>/stores/.<sha256>.lock``, an ``flock`` the
        node's workers take in turn), reuse ``<cache>/stores/<sha256>.knhk`` if
        it hashes right; else get the bytes (``fetch()``, or ``content`` when
        this object still holds them), check their SHA-256, write them to a
        temporary file, fsync, rename into place and hash the file again. So
        the first worker on a node fetches, the others find the file, and
        every worker hashes the file before use. ``cache`` defaults to this
        process's :func:`knhk_memory.config.cache_dir`.

        :raises WorkerStoreError: the file is missing, unreadable, or its
            SHA-256 differs from the client's; the fetched bytes do not hash to
            the client's SHA-256; there is nothing to fetch from. The message
            names ``address``, the path and both checksums.
        """
        if self.shipping == "path":
            p = Path(self.path)
            try:
                digest = file_sha256(p)
                size = p.stat().st_size
            except OSError as exc:
                raise WorkerStoreError(
                    f"worker {address}: cannot read the workflow store {p} ({exc.strerror}); the store is shipped "
                    "by path, which needs a filesystem shared with the client; ship it by content "
                    "(--ship-store content) when the workers do not share one", address=address) from None
            if digest != self.sha256:
                raise WorkerStoreError(
                    f"worker {address}: refused the workflow store {p}: its SHA-256 here is {digest} ({size:,} bytes), "
                    f"the client's is {self.sha256} ({self.size:,} bytes); a worker runs cases only against the "
                    "client's exact store", address=address)
            return p
        directory = Path(cache if cache is not None else cache_dir()) / "stores"
        target = directory / f"{self.sha256}.knhk"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with _flocked(directory / f".{self.sha256}.lock"):
                if target.is_file() and file_sha256(target) == self.sha256:
                    _count("stores_reused")
                    return target
                # missing, or damaged since it was written: fetch the bytes and (re)write the file
                for stale in directory.glob(f".{self.sha256}.*.tmp"):  # a writer killed mid-write left it
                    stale.unlink(missing_ok=True)
                data = self._content(fetch, address)
                tmp = directory / f".{self.sha256}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
                digest = file_sha256(target)
        except OSError as exc:
            raise WorkerStoreError(f"worker {address}: cannot write the shipped workflow store to {target} "
                                   f"({exc.strerror}); set KNHK_MEMORY_CACHE on the workers to a writable "
                                   "directory", address=address) from None
        if digest != self.sha256:
            raise WorkerStoreError(f"worker {address}: refused the workflow store {target}: its SHA-256 after "
                                   f"writing is {digest}, the client's is {self.sha256}", address=address)
        _count("stores_written")
        return target

    def _content(self, fetch: Callable[[], bytes] | None, address: str) -> bytes:
        if fetch is not None:
            data = fetch()
        elif self.content is not None:
            data = self.content
        else:
            raise WorkerStoreError(f"worker {address}: the workflow store {self.sha256} is not in this node's "
                                   "cache and there is nothing to fetch it from (stage_store on the client)",
                                   address=address)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise WorkerStoreError(f"worker {address}: the store content fetched for {self.sha256} is a "
                                   f"{type(data).__name__}, not bytes; refusing it", address=address)
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256:
            raise WorkerStoreError(f"worker {address}: the store content fetched for {self.sha256} hashes to "
                                   f"{digest} ({len(data):,} bytes, {self.size:,} expected); refusing it",
                                   address=address)
        return bytes(data)


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[Any]:
    """An exclusive ``flock`` on ``path`` (made if missing) for the block's duration;
    the kernel drops it if this process dies."""
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield f


def _stage_keys(sha256: str) -> list[str]:
    return ["knhk-memory", "stores", sha256]


def stage_store(client: Client, artifact: StoreArtifact, *, chunk: int = STAGE_CHUNK) -> int:
    """Put the store's bytes on the scheduler (in chunks of ``chunk`` bytes, one message
    each) for the workers that must fetch it; returns the number of chunks.

    The scheduler holds them until :func:`unstage_store`: memory there of the
    store's size for the run. Each node's first worker pulls them once
    (:meth:`KnhkWorkerPlugin.setup`).

    :raises ClusterError: ``artifact`` does not hold its content (it was not
        made with ``shipping="content"`` on this client), or ``chunk`` < 1.
    """
    if artifact.content is None:
        raise ClusterError(f"the store artifact {artifact.sha256} holds no content to stage; make it with "
                           "StoreArtifact.from_path(path, shipping='content')")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ClusterError(f"the stage chunk size must be a positive number of bytes, got {chunk!r}")
    data = artifact.content
    parts = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
    keys = _stage_keys(artifact.sha256)
    for i, part in enumerate(parts):
        client.set_metadata([*keys, "chunk", i], part)
    client.set_metadata([*keys, "chunks"], len(parts))  # last: a worker sees the count only when all are there
    return len(parts)


def unstage_store(client: Client, artifact: StoreArtifact) -> None:
    """Drop the staged bytes from the scheduler; quiet if the cluster is going away."""
    try:
        client.set_metadata(_stage_keys(artifact.sha256), None)
    except Exception as exc:
        log.debug("unstaging %s: %s", artifact.sha256, exc)


async def _pull_store(worker: Any, sha256: str, address: str) -> bytes:
    """Fetch a staged store's bytes from the scheduler, chunk by chunk."""
    keys = _stage_keys(sha256)
    n = await worker.scheduler.get_metadata(keys=[*keys, "chunks"], default=None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise WorkerStoreError(f"worker {address}: the workflow store {sha256} is not staged on the scheduler "
                               "(the client stages it with stage_store before registering the plugin)",
                               address=address)
    parts = []
    for i in range(n):
        part = await worker.scheduler.get_metadata(keys=[*keys, "chunk", i], default=None)
        if not isinstance(part, bytes):
            raise WorkerStoreError(f"worker {address}: chunk {i} of {n} of the workflow store {sha256} is "
                                   "missing on the scheduler (was the run ended?)", address=address)
        parts.append(part)
    data = b"".join(parts)
    _count("store_fetches")
    _count("store_bytes_fetched", len(data))
    return data


# ---------------------------------------------------------------- counters shared by a node's workers

def node_id(cache: str | os.PathLike[str] | None = None) -> str:
    """The node a worker belongs to: 12 hex digits of the SHA-256 of the host name,
    the kernel's boot id and the real path of its cache directory (default
    :func:`~knhk_memory.config.cache_dir`). Workers of one machine that share a
    cache directory share a node's blocks and its copy of the store; workers
    given different cache directories are different nodes, so the lock files
    that guard a node's blocks are always the same files for all its workers."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
    except OSError:
        boot = b""
    where = os.path.realpath(cache if cache is not None else cache_dir())
    return hashlib.sha256(b"\0".join([socket.gethostname().encode(), boot, os.fsencode(where)])).hexdigest()[:12]


class NodeBlocks:
    """The counter block and the pattern-statistics block the workers of one node
    share for one run, in POSIX shared memory.

    Named ``knhk_dask_<run>_<node>_c`` and ``..._p`` (``run``: the plugin's
    run id; ``node``: :func:`node_id`, the machine and the cache directory). Under the node's lock
    (``<cache>/nodes/<base>.lock``), a worker attaches to them, or makes them
    if they do not exist yet, and takes a shared ``flock`` on
    ``<base>.holders`` for as long as it uses them. :meth:`close` (under the
    lock) tries to turn that into an exclusive lock: it succeeds only for the
    last holder, which removes both names and the two files. A killed worker's
    ``flock`` goes with it, so it never keeps the blocks alive, and its counts
    stay in them (its writer slots are reclaimed: :meth:`Counters.reclaim_dead`).
    If every worker of a node dies, the blocks stay until a worker of this run
    attaches and leaves again, or ``/dev/shm`` is cleaned.

    :param run: The run id (letters, digits, ``-``, ``_``).
    :param names: The counter names (``[counters] names``).
    :param mode: Permission mode of the blocks (``[counters] mode``).
    :param cache: Where the lock files go (default :func:`~knhk_memory.config.cache_dir`).
    """

    def __init__(self, run: str, names: Sequence[str], *, mode: int = 0o600,
                 cache: str | os.PathLike[str] | None = None, node: str | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run):
            raise ClusterError(f"a run id is 1 to 64 letters, digits, '-' or '_', got {run!r}")
        root = Path(cache if cache is not None else cache_dir())
        root.mkdir(parents=True, exist_ok=True)
        self.node = node or node_id(root)
        self.base = f"knhk_dask_{run}_{self.node}"
        self.counters_name, self.patterns_name = f"{self.base}_c", f"{self.base}_p"
        self.directory = root / "nodes"
        self.created = False
        self.removed = False
        self._holders: Any = None
        self.directory.mkdir(parents=True, exist_ok=True)
        with _flocked(self.directory / f"{self.base}.lock"):
            holders = open(self.directory / f"{self.base}.holders", "a+b")  # noqa: SIM115 - held until close()
            try:
                fcntl.flock(holders.fileno(), fcntl.LOCK_SH)
                made_c, self.counters = self._attach_or_make(Counters, self.counters_name,
                                                             lambda: Counters(list(names), shared=self.counters_name,
                                                                              mode=mode))
                try:
                    made_p, self.pattern_stats = self._attach_or_make(
                        PatternStats, self.patterns_name, lambda: PatternStats(shared=self.patterns_name, mode=mode))
                except BaseException:
                    self.counters.close()
                    raise
            except BaseException:
                holders.close()
                raise
        self._holders = holders
        self.created = made_c or made_p
        if self.created:
            _count("node_blocks_created")

    @staticmethod
    def _attach_or_make(kind: Any, name: str, make: Callable[[], Any]) -> tuple[bool, Any]:
        for _ in range(3):  # a lock file removed under a waiter lets two makers race: the loser attaches
            try:
                return False, kind.attach(name)
            except SharedBlockNotFoundError:
                pass
            try:
                block = make()
            except SharedBlockExistsError:
                continue
            block.keep_name()  # removed by the node's last holder, not by whoever made it
            return True, block
        return False, kind.attach(name)

    def snapshot(self) -> dict[str, Any]:
        """The node's totals now: ``{"counters": {name: int}, "pattern_executions": [int]*44,
        "pattern_ticks": [int]*44}`` (index = WCP pattern id)."""
        execs = [0] * 44
        ticks = [0] * 44
        for p, r in self.pattern_stats.as_dict(all_patterns=True).items():
            execs[p], ticks[p] = int(r["executions"]), int(r["total_ticks"])
        return {"counters": self.counters.snapshot(), "pattern_executions": execs, "pattern_ticks": ticks}

    def close(self) -> bool:
        """Leave the blocks; the last holder on the node removes them. True if this
        call removed them. Idempotent."""
        holders, self._holders = self._holders, None
        if holders is None:
            return False
        with _flocked(self.directory / f"{self.base}.lock"):
            try:
                fcntl.flock(holders.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                last = False
            if last:
                self.counters.unlink()
                self.pattern_stats.unlink()
                for suffix in (".holders", ".lock"):
                    (self.directory / f"{self.base}{suffix}").unlink(missing_ok=True)
            self.counters.close()
            self.pattern_stats.close()
            holders.close()
        if last:
            self.removed = True
            _count("node_blocks_removed")
        return last


# ---------------------------------------------------------------- the worker plugin

class WorkerSession:
    """The default per-worker session: the knhk plugin manager configured with
    the engine's config, and the services a host asks it for. A host passes
    its own factory to :class:`KnhkWorkerPlugin` instead (the reference host
    passes :class:`knhk_memory.refhost.Engine`): it is called as
    ``factory(config, counters_from=(counters name, pattern stats name))``,
    the node's shared blocks to count into, and must offer ``close()``.

    ``counters`` and ``pattern_stats`` are the node's blocks (attached), or
    the plugin's own when ``counters_from`` is None."""

    def __init__(self, config: Config, *, counters_from: tuple[str, str] | None = None) -> None:
        from .host import get_plugin_manager

        self.config = config
        self.pm = get_plugin_manager()
        self.pm.hook.knhk_configure(config=config)
        self._attached: list[Any] = []
        try:
            self.store = self.pm.hook.knhk_workflow_store(config=config)
            if counters_from is None:
                self.counters = self.pm.hook.knhk_counters(config=config)
                self.pattern_stats = self.pm.hook.knhk_pattern_stats(config=config)
            else:
                self.counters = Counters.attach(counters_from[0])
                self._attached.append(self.counters)
                self.pattern_stats = PatternStats.attach(counters_from[1])
                self._attached.append(self.pattern_stats)
        except BaseException:
            for block in self._attached:
                block.close()
            self.pm.hook.knhk_unconfigure(config=config)
            raise
        self._open = True

    def close(self) -> None:
        """Close the attached blocks, unconfigure the plugins (closes the store and
        any counters they made). Idempotent."""
        if self._open:
            self._open = False
            for block in self._attached:
                block.close()
            self.pm.hook.knhk_unconfigure(config=self.config)


def _backend_failure(exc: BaseException) -> BaseException | None:
    """The allocator backend could not be loaded: the BackendUnavailableError (as
    such or as the cause of the plugin's ConfigError about ``allocator.backend``)."""
    found: BaseException | None = None
    e: BaseException | None = exc
    for _ in range(16):
        if e is None:
            break
        if isinstance(e, BackendUnavailableError):
            return e
        if isinstance(e, ConfigError) and e.key == "allocator.backend":
            found = e
        e = e.__cause__ or e.__context__
    return found


class KnhkWorkerPlugin(WorkerPlugin):
    """Set knhk-memory up on every Dask worker, with the client's config and store.

    :param config: The engine's configuration (sent as its checked values; the
        worker validates them again). ``[store] path`` is replaced by the
        worker's verified copy; counters go to the node's shared blocks
        (:class:`NodeBlocks`, made or attached at setup).
    :param store: The :class:`StoreArtifact` to run against. Shipped by
        content, the client must :func:`stage_store` it first (the demo does).
    :param host: ``host(config, counters_from=(counters name, pattern stats
        name)) -> session`` makes the per-worker session (default
        :class:`WorkerSession`); it must be importable on the workers.
    :param cache: Cache directory for stores shipped by content and the node
        blocks' lock files (default: the worker's
        :func:`~knhk_memory.config.cache_dir`).
    :param name: The plugin's name on the cluster (default: unique per plugin);
        its last part is the run id of the node blocks.
    :param client_version: The version workers must have (default: the
        client's knhk-memory version).

    In a task, :func:`session` gives the worker's plugin; hold its ``lock``
    while using the session (a session is one engine, not thread-safe).
    The plugin pickles small: the store travels as its name and checksum.
    """

    def __init__(self, config: Config, store: StoreArtifact, *, host: Callable[..., Any] | None = None,
                 cache: str | os.PathLike[str] | None = None, name: str | None = None,
                 client_version: str | None = None) -> None:
        self.config_values = config.as_dict()
        self.config_source, self.config_origin = config.source, config.origin
        self.store = store
        self.host = host
        self.cache = None if cache is None else os.fspath(cache)
        self.run_id = uuid.uuid4().hex[:12]
        self.name = name or f"knhk-memory-{store.sha256[:12]}-{self.run_id}"
        self.client_version = client_version or package_version()
        self.session: Any = None
        self.error: WorkerError | None = None
        self.address: str | None = None
        self.store_path: str | None = None
        self.store_bytes_fetched = 0
        self.node: NodeBlocks | None = None
        self.setup_seconds = 0.0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("lock", None)  # made on the worker
        state["session"] = None
        state["node"] = None
        return state

    async def setup(self, worker: Any) -> None:
        """On each worker (Dask awaits it): check the version, resolve the store
        (fetching it if this is the node's first worker and it is shipped by
        content), attach to or make the node's blocks, make the session."""
        t0 = time.perf_counter()
        self.address = address = str(worker.address)
        self.lock = threading.Lock()
        try:
            here = package_version()
            if here != self.client_version:
                raise WorkerVersionError(
                    f"worker {address} runs knhk-memory {here}, the client {self.client_version}; refused: install "
                    f"knhk-memory {self.client_version} on every worker", address=address)
            fetch = None
            if self.store.shipping == "content":
                loop = asyncio.get_running_loop()

                def fetch() -> bytes:  # in resolve's thread, under the node's lock; the pull runs on the loop
                    pull = asyncio.run_coroutine_threadsafe(_pull_store(worker, self.store.sha256, address), loop)
                    try:
                        data = pull.result(timeout=FETCH_TIMEOUT)
                    except TimeoutError:
                        pull.cancel()
                        raise WorkerStoreError(
                            f"worker {address}: fetching the workflow store {self.store.sha256} "
                            f"({self.store.size:,} bytes) from the scheduler took over {FETCH_TIMEOUT:g} s; "
                            "share a filesystem and ship it by path (--ship-store path)", address=address) from None
                    self.store_bytes_fetched += len(data)
                    return data

            # hashing, waiting for the node's lock, fetching: off the worker's event loop
            path = await asyncio.to_thread(self.store.resolve, cache=self.cache, address=address, fetch=fetch)
            self.store_path = str(path)
            config = Config(validate(self.config_values, self.config_source), source=self.config_source,
                            origin=self.config_origin)
            config = config.replace(store={"path": str(path)}, counters={"shared": False, "shared_name": ""})
            self.node = NodeBlocks(self.run_id, config.counters.names, mode=config.counters.mode, cache=self.cache)
            self.session = (self.host or WorkerSession)(
                config, counters_from=(self.node.counters_name, self.node.patterns_name))
        except WorkerError as exc:
            self._close_node()
            self.error = exc
            raise
        except Exception as exc:
            self._close_node()
            cause = _backend_failure(exc)
            if cause is None:
                kind = "" if isinstance(exc, KnhkMemoryError) else f"{type(exc).__name__}: "
                self.error = WorkerError(f"worker {address} cannot set up knhk-memory: {kind}{exc}", address=address)
                raise self.error from None
            self.error = WorkerBackendError(
                f"worker {address} cannot load the allocator backend {self.config_values['allocator']['backend']!r} "
                f"that {self.config_source} configures: {str(cause).rstrip('.')}; the run stops (no fallback to "
                "another backend)",
                address=address)
            raise self.error from None
        self.setup_seconds = time.perf_counter() - t0
        _count("set_up")
        _count("open")

    def teardown(self, worker: Any) -> None:
        s, self.session = self.session, None
        try:
            if s is not None:
                try:
                    s.close()
                finally:
                    _count("torn_down")
                    _count("open", -1)
        finally:
            self._close_node()

    def _close_node(self) -> None:
        node, self.node = self.node, None
        if node is not None:
            node.close()


def session(name: str) -> KnhkWorkerPlugin:
    """In a task: this worker's :class:`KnhkWorkerPlugin` named ``name``, set up.

    :raises WorkerError: the worker has no such plugin, or its setup failed
        (the setup error, with the worker's address)."""
    worker = get_worker()
    plugin = worker.plugins.get(name)
    if not isinstance(plugin, KnhkWorkerPlugin):
        raise WorkerError(f"worker {worker.address} has no knhk-memory plugin {name!r}; register it first "
                          "(knhk_memory.distributed.register)", address=str(worker.address))
    if plugin.error is not None:
        raise plugin.error
    if plugin.session is None:
        raise WorkerError(f"worker {worker.address}: the knhk-memory plugin {name!r} is not set up (torn down?)",
                          address=str(worker.address))
    return plugin


def _plugin_figures(name: str, dask_worker: Any = None) -> dict[str, Any]:
    """Run on each worker by :func:`worker_figures` (``client.run`` passes ``dask_worker``)."""
    worker = dask_worker
    plugin = worker.plugins.get(name)
    out: dict[str, Any] = {"pid": os.getpid(), "state": worker_state(), "host": socket.gethostname()}
    if plugin is not None and plugin.session is not None:
        out.update(store=plugin.store_path, setup_seconds=plugin.setup_seconds,
                   store_bytes_fetched=plugin.store_bytes_fetched)
        if plugin.node is not None:
            out.update(node=plugin.node.node, node_blocks=plugin.node.counters_name,
                       node_created=plugin.node.created, **plugin.node.snapshot())
    return out


def worker_addresses(client: Client) -> list[str]:
    """The addresses of every worker the scheduler knows now."""
    try:
        info = client.scheduler_info(n_workers=-1)  # some releases return 5 workers unless told
    except TypeError:  # releases before the n_workers argument return them all
        info = client.scheduler_info()
    return list(info["workers"])


def worker_figures(client: Client, name: str) -> dict[str, dict[str, Any]]:
    """``{worker address: {pid, host, state, store, setup_seconds, store_bytes_fetched, node,
    node_blocks, node_created, counters, pattern_executions, pattern_ticks}}`` for every
    live worker: ``counters`` and the pattern figures are its node's shared blocks, as they
    stand (the same for every worker of a node)."""
    return client.run(_plugin_figures, name)


# ---------------------------------------------------------------- merging

class BatchResults:
    """Results merged by batch id: each id once, whatever arrived.

    A batch whose worker died is re-run by Dask; if both runs ever report,
    the second is kept out (``duplicates`` counts it), so every case is
    counted exactly once. ``missing()`` lists ids with no result yet.
    """

    def __init__(self, ids: Iterable[int]) -> None:
        self.expected = set(ids)
        self.results: dict[int, Any] = {}
        self.duplicates = 0

    def add(self, batch_id: int, result: Any) -> bool:
        """Keep ``result`` for ``batch_id``; False (and not kept) if it is a repeat.

        :raises ClusterError: ``batch_id`` is not one of the run's batches."""
        if batch_id not in self.expected:
            raise ClusterError(f"a result for batch {batch_id!r}, which this run never submitted")
        if batch_id in self.results:
            self.duplicates += 1
            return False
        self.results[batch_id] = result
        return True

    def missing(self) -> list[int]:
        return sorted(self.expected - self.results.keys())

    def complete(self) -> bool:
        return not self.missing()

    def __len__(self) -> int:
        return len(self.results)


def sum_counters(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Counter deltas summed name by name (exact integers)."""
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + int(v)
    return out


# ---------------------------------------------------------------- connecting

@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` value: ``kind`` is ``"local"`` (``workers`` processes)
    or ``"tcp"`` (``address`` of a running scheduler)."""

    kind: str
    workers: int = 0
    address: str = ""

    def __str__(self) -> str:
        return f"local:{self.workers}" if self.kind == "local" else self.address


_TCP = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]+):(?P<port>[0-9]{1,5})")


def parse_cluster(text: str) -> ClusterSpec:
    """``local`` (one worker per CPU), ``local:N`` (N from 1 to 8 per CPU) or ``tcp://HOST:PORT``.

    :raises ClusterError: anything else, naming the value and the accepted forms."""
    cpus = os.cpu_count() or 1
    accepted = f"accepted: local, local:N (N from 1 to {8 * cpus}) or tcp://HOST:PORT (a running Dask scheduler)"
    if not isinstance(text, str):
        raise ClusterError(f"--cluster must be a string, got {text!r}; {accepted}")
    if text == "local":
        return ClusterSpec("local", workers=cpus)
    if text.startswith("local:"):
        n = text[len("local:"):]
        if not n.isdigit() or not 1 <= int(n) <= 8 * cpus:
            raise ClusterError(f"--cluster {text!r}: the worker count must be an integer from 1 to {8 * cpus}, "
                               f"got {n!r}; {accepted}")
        return ClusterSpec("local", workers=int(n))
    m = _TCP.fullmatch(text)
    if m is None:
        raise ClusterError(f"--cluster must be local, local:N or tcp://HOST:PORT, got {text!r}; {accepted}")
    if not 1 <= int(m["port"]) <= 65535:
        raise ClusterError(f"--cluster {text!r}: the port must be from 1 to 65535, got {m['port']}")
    return ClusterSpec("tcp", address=text)


def connect(spec: ClusterSpec | str, *, timeout: float = DEFAULT_TIMEOUT) -> tuple[Client, LocalCluster | None]:
    """A client for ``spec``, and the ``LocalCluster`` it started (None for ``tcp://``).

    ``local:N`` starts N worker processes (``processes=True``,
    ``threads_per_worker=1``) listening on 127.0.0.1 only (the HTTP endpoint too, on a free port).
    ``timeout`` (seconds) bounds the connection to a scheduler.

    :raises ClusterError: the scheduler does not answer within ``timeout``, or
        the local cluster cannot start; the message names the address.
    """
    if isinstance(spec, str):
        spec = parse_cluster(spec)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise ClusterError(f"the cluster timeout must be a number of seconds in (0, 3600], got {timeout!r}")
    if spec.kind == "local":
        try:
            cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL)
        except Exception as exc:  # pragma: no cover - a broken machine
            raise ClusterError(f"cannot start a local Dask cluster of {spec.workers} worker processes: "
                               f"{type(exc).__name__}: {exc}") from None
        try:
            return Client(cluster, timeout=timeout), cluster
        except BaseException:
            cluster.close()
            raise
    _probe_scheduler(spec.address, timeout)
    try:
        return Client(spec.address, timeout=timeout), None
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {spec.address} within {timeout:g} s ({exc}); "
                           "start one there (`dask scheduler`), check the address, or use --cluster local:N") from None


def _probe_scheduler(address: str, timeout: float) -> None:
    """Ask ``address`` who it is (Dask's ``identity`` call) under one overall deadline.

    ``Client(address, timeout=...)`` bounds the TCP connect, not what follows: a port
    that accepts and never answers as a Dask scheduler (a silent listener, the
    dashboard's HTTP port, a worker) kept it waiting forever. The probe runs in a
    thread with its own event loop (the caller may be inside one), so the deadline
    holds whatever the other end does.

    :raises ClusterError: no answer within ``timeout`` seconds, or the answer is not
        a scheduler's; the message names the address.
    """
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: the host name {host!r} does not "
                           f"resolve ({exc}); check the address, or use --cluster local:N") from None
    out: list[Any] = []

    async def ask() -> Any:
        async with rpc(address, timeout=timeout) as r:
            return await r.identity()

    def run() -> None:
        try:
            out.append(asyncio.run(asyncio.wait_for(ask(), timeout)))
        except BaseException as exc:  # reported below, in the caller's thread
            out.append(exc)

    t = threading.Thread(target=run, name="knhk-dask-probe", daemon=True)
    t.start()
    t.join(timeout + 5)  # wait_for ends it at `timeout`; the margin covers the loop's own teardown
    answer = out[0] if out else TimeoutError()
    hint = "start one there (`dask scheduler`), check the address, or use --cluster local:N"
    if isinstance(answer, (TimeoutError, asyncio.TimeoutError)):
        raise ClusterError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s (no Dask "
                           f"scheduler answered there: nothing listens, or something that is not one accepted "
                           f"the connection and stayed silent); {hint}")
    if isinstance(answer, BaseException):
        raise ClusterError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s "
                           f"({type(answer).__name__}: {answer}); {hint}")
    kind = answer.get("type") if isinstance(answer, dict) else None
    if kind != "Scheduler":
        raise ClusterError(f"{address} answered as a Dask {kind or type(answer).__name__}, not a scheduler; "
                           f"give the scheduler's address (`dask scheduler` prints it), {hint.split(', ', 1)[1]}")


def register(client: Client, plugin: KnhkWorkerPlugin, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Register ``plugin`` on every worker and wait for each worker's setup.

    On a failure, unregisters it (tearing down the workers where setup
    succeeded) and raises. ``timeout`` (seconds) bounds the wait for a
    first worker.

    :raises WorkerError: a worker's setup failed (its subclass says why; the
        message names the worker's address).
    :raises ClusterError: the cluster has no workers, or the plugin could not
        reach them.
    """
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError):
        where = getattr(client.scheduler, "address", "?")
        raise ClusterError(f"the Dask scheduler at {where} has no workers (none joined within {timeout:g} s); "
                           f"start some: dask worker {where}") from None
    try:
        client.register_plugin(plugin, name=plugin.name)
    except WorkerError:
        unregister(client, plugin)
        raise
    except Exception as exc:
        unregister(client, plugin)
        raise ClusterError(f"registering the knhk-memory worker plugin failed: {type(exc).__name__}: {exc}; every "
                           f"worker needs knhk-memory {plugin.client_version} installed "
                           f"(dask {distributed.__version__} on the client)") from None


def unregister(client: Client, plugin: KnhkWorkerPlugin) -> None:
    """Tear ``plugin`` down on every worker (its sessions close); quiet if it is gone."""
    try:
        client.unregister_worker_plugin(plugin.name)
    except Exception as exc:  # the plugin was never registered, or the cluster is going away
        log.debug("unregistering %s: %s", plugin.name, exc)
