"""The memory plugin: hands a workflow engine its configured memory services.

Registered in the ``knhk.plugins`` entry-point group under the name
``memory``. State lives in ``config.stash[STASH_KEY]``, one
:class:`MemoryServices` per configured engine; this module keeps none.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from knhk_memory.allocator import (
    Backend,
    install_numpy_handler,
    resolve_backend,
    select_backend,
    set_numpy_routing,
)
from knhk_memory import numa, pools, simd
from knhk_memory.arena import Arena
from knhk_memory.config import Config
from knhk_memory.counters import Counters, PatternStats
from knhk_memory.errors import (
    BackendUnavailableError,
    ConfigError,
    KnhkMemoryError,
    NumaError,
    SimdLevelError,
    StoreError,
)
from knhk_memory.hookspecs import hookimpl
from knhk_memory.registry import GlobalResourceRegistry, PatternRegistry
from knhk_memory.store import WorkflowStore

STASH_KEY = "knhk_memory.memory"


class MemoryServices:
    """What the plugin set up for one configuration, and how to undo it."""

    def __init__(self, config: Config) -> None:
        # Resolve everything first: nothing is applied if any of it fails.
        name = config.allocator.backend
        try:
            self.backend, self.auto_skipped = resolve_backend(name)
        except BackendUnavailableError as exc:
            raise config.error("allocator.backend", str(exc)) from None
        self.numpy = bool(config.allocator.numpy)
        self._numpy_token: Any = None
        self.simd_level = config.simd.level
        if self.simd_level != "auto" and self.simd_level not in simd.supported_levels():
            missing = (f"this build has no {self.simd_level} kernels (built with KNHK_PORTABLE=1: portable C only)"
                       if simd.PORTABLE_BUILD else f"this CPU does not support the {self.simd_level} level")
            raise config.error("simd.level", f"{missing}; supported: {', '.join(simd.supported_levels())}, or auto")
        self._simd_previous: str | None = None
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
        # Opened last, so a bad store path fails before anything is applied;
        # what was made before it is released.
        self.store: WorkflowStore | None = None
        if config.store.path:
            try:
                self.store = WorkflowStore(config.store.path, cache_size=config.store.cache_size,
                                           mmap_threshold=config.store.mmap_threshold,
                                           prefetch=config.store.prefetch)
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
            counters = Counters(cfg.names, shared=shared)
        except (KnhkMemoryError, ValueError, TypeError, OSError) as exc:
            raise config.error("counters.shared_name" if cfg.shared else "counters.names", str(exc)) from None
        if not cfg.pattern_stats:
            return counters, None
        try:
            patterns = PatternStats(shared=(cfg.shared_name + ".patterns" if cfg.shared_name else True)
                                    if cfg.shared else False)
        except (KnhkMemoryError, OSError) as exc:
            counters.close()
            raise config.error("counters.shared_name", str(exc)) from None
        return counters, patterns

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
        select_backend(self.backend)
        if self.numpy:
            self._numpy_token = install_numpy_handler(self.backend)
        set_numpy_routing(self.numpy)
        if self.simd_level != "auto":
            self._simd_previous = simd.set_level(self.simd_level)

    def close(self) -> None:
        previous, self._simd_previous = self._simd_previous, None
        if previous is not None:
            try:
                simd.set_level(previous)
            except SimdLevelError:  # the process started with a bad KNHK_SIMD; leave ours
                pass
        try:
            # Resources first, newest first: they may still use the allocator.
            self.resources.close()
        finally:
            token, self._numpy_token = self._numpy_token, None
            if token is not None:
                token.restore()
            set_numpy_routing(False)
            self.counters.close()
            if self.pattern_stats is not None:
                self.pattern_stats.close()
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
        }

    def counter_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shared_name": self.counters.name, "values": self.counters.snapshot()}
        if self.pattern_stats is not None:
            out["patterns"] = self.pattern_stats.as_dict()
        return out


def services(config: Config) -> MemoryServices:
    try:
        return config.stash[STASH_KEY]
    except KeyError:
        raise RuntimeError("the memory plugin is not configured: the engine must call "
                           "pm.hook.knhk_configure(config=config) first") from None


@hookimpl
def knhk_configure(config: Config) -> None:
    svc = MemoryServices(config)
    svc.apply()
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
    return out


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
def knhk_workflow_store(config: Config) -> WorkflowStore | None:
    return services(config).store


@hookimpl
def knhk_simd_level(config: Config) -> str:
    services(config)
    return simd.level()
