"""The memory plugin: hands a workflow engine its configured memory services.

Registered in the ``knhk.plugins`` entry-point group under the name
``memory``. State lives in ``config.stash[STASH_KEY]``, one
:class:`MemoryServices` per configured engine; this module keeps none.
Process-wide settings (selected backend, numpy routing, SIMD level) are not
set here: each engine claims them from :mod:`knhk_memory.process`, their one
owner, and releases the claim in ``knhk_unconfigure``.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from knhk_memory import allocator, arena, counters, launcher, numa, pools, process, registry, simd
from knhk_memory import store as store_module
from knhk_memory.allocator import Backend, resolve_backend
from knhk_memory.arena import Arena
from knhk_memory.config import Config
from knhk_memory.counters import Counters, PatternStats
from knhk_memory.errors import (
    AlreadyConfiguredError,
    BackendUnavailableError,
    ConfigError,
    KnhkMemoryError,
    NumaError,
    ProcessStateError,
    StoreError,
)
from knhk_memory.hookspecs import hookimpl
from knhk_memory.hotpath import HotOp, PyHotOp, with_default_budgets
from knhk_memory.metrics import Metrics
from knhk_memory.registry import GlobalResourceRegistry, PatternRegistry
from knhk_memory.store import WorkflowStore

STASH_KEY = "knhk_memory.memory"

# The capabilities' hot paths, held to budgets through knhk_hot_ops; their
# default budgets and the measurements behind them are in knhk_memory/data/budgets.toml.
BUILTIN_HOT_OPS: Sequence[Callable[[], list[Any]]] = (
    allocator.hot_ops, allocator.py_hot_ops, registry.hot_ops, counters.hot_ops, arena.hot_ops,
    store_module.hot_ops, simd.hot_ops, pools.hot_ops, pools.py_hot_ops,
)


def builtin_hot_ops() -> list[HotOp | PyHotOp]:
    """The built-in operations as the capabilities declare them (no budgets yet)."""
    return [op for provider in BUILTIN_HOT_OPS for op in provider()]


class MemoryServices:
    """What the plugin set up for one configuration, and how to undo it."""

    def __init__(self, config: Config) -> None:
        # Resolve everything first: nothing is applied if any of it fails.
        name = config.allocator.backend
        if name == "auto" and config.allocator.scope == "process":
            # auto in a process whose malloc is already a backend's means that
            # backend: loading another one beside it would serve nothing.
            name = launcher.malloc_backend_name() or name
        try:
            self.backend, self.auto_skipped = resolve_backend(name)
        except BackendUnavailableError as exc:
            raise config.error("allocator.backend", str(exc)) from None
        # scope = "process" is checked against what the process really runs
        # with; a mismatch refuses the configuration, it never falls back.
        self.scope = config.allocator.scope
        if self.scope == "process":
            launcher.check_process_scope(config, self.backend.name, self.backend.path)
        self.purger = Purger(self.backend, config.allocator.purge_interval_s)
        self.numpy = bool(config.allocator.numpy)
        self.simd_level: simd.SimdSetting = config.simd.level
        if self.simd_level != "auto" and self.simd_level not in simd.supported_levels():
            missing = (f"this build has no {self.simd_level} kernels (built with KNHK_PORTABLE=1: portable C only)"
                       if simd.PORTABLE_BUILD else f"this CPU does not support the {self.simd_level} level")
            raise config.error("simd.level", f"{missing}; supported: {', '.join(simd.supported_levels())}, or auto")
        self._config = config
        self._claim: process.Claim | None = None
        self.arena_settings = {"chunk_size": config.arena.chunk_size,
                               "max_chunk_size": config.arena.max_chunk_size,
                               "huge_pages": config.arena.huge_pages}
        if self.arena_settings["max_chunk_size"] < self.arena_settings["chunk_size"]:
            raise config.error("arena.max_chunk_size", f"must be at least arena.chunk_size "
                               f"({config.arena.chunk_size}), got {config.arena.max_chunk_size}")
        arena_numa = config.arena.numa
        if arena_numa != "":
            self._placement(config, "arena.numa", arena_numa)
            self.arena_settings["numa"] = arena_numa
        self.pool_specs = self._pool_specs(config)
        self._pools: dict[str, Any] = {}
        self._pool_lock = threading.Lock()
        self._arenas: weakref.WeakValueDictionary[int, Arena] = weakref.WeakValueDictionary()
        self._arena_names: dict[int, str] = {}
        self._arena_lock = threading.Lock()
        self.arenas_made = 0
        # Both registries cost nothing until used: the pattern table loads on
        # first lookup, resources are created on first get.
        self.patterns = PatternRegistry()
        self.resources = GlobalResourceRegistry(close_at_exit=bool(config.registry.close_at_exit))
        self.counters, self.pattern_stats = self._make_counters(config)
        # The metrics block is made on the first knhk_metrics call (a shared one
        # is a shared-memory segment: none is made for engines that never ask).
        self._metrics: Metrics | None = None
        self._metrics_lock = threading.Lock()
        # Opened last, so a bad store path fails before anything is applied;
        # what was made before it is released.
        self.store: WorkflowStore | None = None
        if config.store.path:
            try:
                self.store = WorkflowStore(config.store.path, cache_size=config.store.cache_size,
                                           mmap_threshold=config.store.mmap_threshold,
                                           prefetch=config.store.prefetch,
                                           max_value_bytes=config.store.max_value_bytes)
            except StoreError as exc:
                self.counters.close()
                if self.pattern_stats is not None:
                    self.pattern_stats.close()
                raise config.error("store.path", str(exc)) from None

    @staticmethod
    def _placement(config: Config, key: str, value: Any) -> None:
        """Check a NUMA placement against this machine's nodes and the kernel, naming the key."""
        try:
            placement = numa.resolve(value, what=key.rsplit(".", 1)[-1])
            if placement is not None:
                numa.check_placement(placement)
        except (NumaError, ValueError, TypeError) as exc:
            raise ConfigError(str(exc), source=config.source, key=key, value=value) from None

    def _pool_specs(self, config: Config) -> dict[str, dict[str, Any]]:
        specs = {}
        for name, t in config.pools.items():
            key = f"pools.{name}"
            try:
                pools._check_geometry(t["block_size"], t["capacity"], t["align"])
            except (ValueError, TypeError) as exc:
                raise ConfigError(str(exc), source=config.source, key=f"{key}.capacity",
                                  value=t["capacity"]) from None
            if t["cache_size"] != 64 and t["kind"] != "threadlocal":
                raise ConfigError(f"cache_size applies to kind 'threadlocal' only; this pool is kind {t['kind']!r}",
                                  source=config.source, key=f"{key}.cache_size", value=t["cache_size"])
            if t["numa"] != "":
                self._placement(config, f"{key}.numa", t["numa"])
            specs[name] = dict(t)
        return specs

    def pool(self, name: str) -> Any:
        """The pool ``[pools.<name>]`` configures (made on the first call), or None."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"pool name must be a non-empty string, got {name!r}")
        with self._pool_lock:
            p = self._pools.get(name)
            if p is not None:
                return p
            spec = self.pool_specs.get(name)
            if spec is None:
                return None
            kwargs: dict[str, Any] = {"align": spec["align"], "numa": spec["numa"] if spec["numa"] != "" else None,
                                      "name": name, "config_key": f"pools.{name}.capacity"}
            if spec["kind"] == "threadlocal":
                kwargs["cache_size"] = spec["cache_size"]
            p = self._pools[name] = pools.KINDS[spec["kind"]](spec["block_size"], spec["capacity"], **kwargs)
            return p

    def pool_stats(self) -> dict[str, Any]:
        with self._pool_lock:
            made = dict(self._pools)
        out: dict[str, Any] = {}
        for name, spec in self.pool_specs.items():
            p = made.get(name)
            out[name] = {"settings": dict(spec), "made": p is not None,
                         **({"stats": p.stats().as_dict()} if p is not None else {})}
        return out

    @staticmethod
    def _make_counters(config: Config) -> tuple[Counters, PatternStats | None]:
        cfg = config.counters
        shared: bool | str = (cfg.shared_name or True) if cfg.shared else False
        try:
            counters = Counters(cfg.names, shared=shared, mode=cfg.mode)
        except (KnhkMemoryError, ValueError, TypeError, OSError) as exc:
            raise config.error("counters.shared_name" if cfg.shared else "counters.names", str(exc)) from None
        if not cfg.pattern_stats:
            return counters, None
        try:
            patterns = PatternStats(shared=(cfg.shared_name + ".patterns" if cfg.shared_name else True)
                                    if cfg.shared else False, mode=cfg.mode)
        except (KnhkMemoryError, OSError) as exc:
            counters.close()
            raise config.error("counters.shared_name", str(exc)) from None
        return counters, patterns

    def metrics(self) -> Metrics:
        """The metrics block ``[metrics]`` describes, made on first use."""
        with self._metrics_lock:
            if self._metrics is None:
                cfg = self._config.metrics
                try:
                    self._metrics = Metrics.from_config(self._config)
                except (KnhkMemoryError, OSError) as exc:
                    raise self._config.error("metrics.shared_name" if cfg.shared or cfg.shared_name
                                             else "metrics.max_cells", str(exc)) from None
            return self._metrics

    def new_arena(self, name: str) -> Arena:
        """An arena for one case or batch, with the configured settings and backend."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"arena name must be a non-empty string, got {name!r}")
        arena = Arena(backend=self.backend, **self.arena_settings)
        with self._arena_lock:
            self.arenas_made += 1
            key = self.arenas_made
            self._arenas[key] = arena
            self._arena_names[key] = name
            # forget names of arenas that are gone
            for k in [k for k in self._arena_names if k not in self._arenas]:
                del self._arena_names[k]
        return arena

    def arena_stats(self) -> dict[str, Any]:
        with self._arena_lock:
            alive = [(self._arena_names.get(k, "?"), a) for k, a in self._arenas.items()]
        open_names = sorted(name for name, a in alive if not a.closed)
        return {"settings": dict(self.arena_settings), "made": self.arenas_made, "open": open_names}

    def apply(self) -> None:
        """Claim the process-wide settings (see :mod:`knhk_memory.process`): the
        first engine applies them, an engine asking for the same shares them,
        one asking for different ones gets a ConfigError naming the key."""
        settings = process.ProcessSettings(self.backend, self.numpy, self.simd_level)
        try:
            self._claim = process.claim(settings, f"the engine configured from {self._config.source}")
        except ProcessStateError as exc:
            raise self._config.error(exc.key or "allocator.backend", str(exc)) from None
        # The process keeps its allocator; commands the engine starts from now
        # on do not inherit the launcher's preload (unless it ran with --inherit).
        launcher.strip_launcher_environment()
        self.purger.start()

    def close(self) -> None:
        self.purger.stop()
        try:
            # Resources first, newest first: they may still use the allocator.
            self.resources.close()
        finally:
            claim, self._claim = self._claim, None
            try:
                if claim is not None:
                    claim.release()  # the last engine out puts back what was there before the first
            finally:
                self._close_blocks()

    def _close_blocks(self) -> None:
        self.counters.close()
        if self.pattern_stats is not None:
            self.pattern_stats.close()
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            metrics.close()
        store, self.store = self.store, None
        if store is not None:
            store.close()
        with self._pool_lock:
            made, self._pools = self._pools, {}
        for p in made.values():
            p.close()

    def stats(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "numpy": self.numpy,
            "counts": self.backend.stats().as_dict(),
            "native": self.backend.native_stats().as_dict(),
            "scope": self.scope,
            "process": launcher.process_stats(),
            "purge": self.purger.stats(),
        }

    def release_unused(self) -> dict[str, Any]:
        """Give the backend's unused memory back to the OS now (see Backend.release_unused);
        returns the process's RSS before and after, in bytes."""
        return self.purger.purge_now()

    def counter_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shared_name": self.counters.name, "values": self.counters.snapshot()}
        if self.pattern_stats is not None:
            out["patterns"] = self.pattern_stats.as_dict()
        return out


class Purger:
    """Calls ``backend.release_unused()`` every ``interval`` seconds from a daemon
    thread (``[allocator] purge_interval_s``; 0: no thread). Started by
    ``knhk_configure``, stopped and joined by ``knhk_unconfigure``."""

    def __init__(self, backend: Backend, interval: float) -> None:
        self.backend = backend
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.purges = 0
        self.seconds = 0.0
        self.last_error: str | None = None

    def start(self) -> None:
        if self.interval <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="knhk-memory-purge", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.purge_now()
            except KnhkMemoryError as exc:  # reported in stats(); the next round tries again
                self.last_error = str(exc)

    def purge_now(self) -> dict[str, Any]:
        with self._lock:
            before = launcher.rss_bytes()
            t0 = time.perf_counter()
            self.backend.release_unused()
            took = time.perf_counter() - t0
            self.purges += 1
            self.seconds += took
        after = launcher.rss_bytes()
        return {"backend": self.backend.name, "rss_before_bytes": before, "rss_after_bytes": after,
                "seconds": took}

    def stats(self) -> dict[str, Any]:
        thread = self._thread
        return {"interval_s": self.interval, "running": thread is not None and thread.is_alive(),
                "purges": self.purges, "seconds": self.seconds, "last_error": self.last_error}


def services(config: Config) -> MemoryServices:
    try:
        return config.stash[STASH_KEY]
    except KeyError:
        raise RuntimeError("the memory plugin is not configured: the engine must call "
                           "pm.hook.knhk_configure(config=config) first") from None


@hookimpl
def knhk_configure(config: Config) -> None:
    if STASH_KEY in config.stash:
        raise AlreadyConfiguredError(
            f"the memory plugin is already configured for this config (from {config.source}): "
            "knhk_configure was called twice; call knhk_unconfigure first, or configure a copy "
            "(config.replace()) for a second engine")
    svc = MemoryServices(config)
    try:
        svc.apply()
    except BaseException:
        svc.close()  # the counters and store it opened; nothing process-wide was applied
        raise
    config.stash[STASH_KEY] = svc


@hookimpl
def knhk_unconfigure(config: Config) -> None:
    svc = config.stash.pop(STASH_KEY, None)
    if svc is not None:
        svc.close()


@hookimpl
def knhk_allocator(config: Config) -> Backend:
    return services(config).backend


@hookimpl
def knhk_arena(config: Config, name: str) -> Arena:
    return services(config).new_arena(name)


@hookimpl
def knhk_pool(config: Config, name: str) -> Any:
    return services(config).pool(name)


@hookimpl
def knhk_memory_stats(config: Config) -> dict[str, Any]:
    svc = services(config)
    out: dict[str, Any] = {"allocator": svc.stats(), "counters": svc.counter_stats(), "arena": svc.arena_stats(),
                           "pools": svc.pool_stats()}
    if svc.store is not None:
        out["store"] = svc.store.stats()
    if svc._metrics is not None and not svc._metrics.closed:
        out["metrics"] = {"shared_name": svc._metrics.name, **svc._metrics.usage(),
                          "max_label_sets": svc._metrics.max_label_sets, "max_cells": svc._metrics.max_cells}
    return out


@hookimpl
def knhk_release_unused(config: Config) -> dict[str, Any]:
    return services(config).release_unused()


@hookimpl
def knhk_pattern_registry(config: Config) -> PatternRegistry:
    return services(config).patterns


@hookimpl
def knhk_resource_registry(config: Config) -> GlobalResourceRegistry:
    return services(config).resources


@hookimpl
def knhk_counters(config: Config) -> Counters:
    return services(config).counters


@hookimpl
def knhk_pattern_stats(config: Config) -> PatternStats | None:
    return services(config).pattern_stats


@hookimpl
def knhk_metrics(config: Config) -> Metrics:
    return services(config).metrics()


@hookimpl
def knhk_workflow_store(config: Config) -> WorkflowStore | None:
    return services(config).store


@hookimpl
def knhk_simd_level(config: Config) -> simd.SimdLevel:
    services(config)
    return simd.level()


@hookimpl
def knhk_hot_ops(config: Config) -> list[HotOp | PyHotOp]:
    # Needs no configured services: the engine is configured before any setup() runs.
    return with_default_budgets(builtin_hot_ops())
