"""The memory plugin: hands a workflow engine its configured memory services.

Registered in the ``knhk.plugins`` entry-point group under the name
``memory``. State lives in ``config.stash[STASH_KEY]``, one
:class:`MemoryServices` per configured engine; this module keeps none.
"""

from __future__ import annotations

from typing import Any

from knhk_memory.allocator import (
    Backend,
    install_numpy_handler,
    resolve_backend,
    select_backend,
    set_numpy_routing,
)
from knhk_memory.config import Config
from knhk_memory.errors import BackendUnavailableError, StoreError
from knhk_memory.hookspecs import hookimpl
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
        # Opened here, last, so a bad store path fails before anything is applied.
        self.store: WorkflowStore | None = None
        if config.store.path:
            try:
                self.store = WorkflowStore(config.store.path, cache_size=config.store.cache_size,
                                           mmap_threshold=config.store.mmap_threshold,
                                           prefetch=config.store.prefetch)
            except StoreError as exc:
                raise config.error("store.path", str(exc)) from None

    def apply(self) -> None:
        select_backend(self.backend)
        if self.numpy:
            self._numpy_token = install_numpy_handler(self.backend)
        set_numpy_routing(self.numpy)

    def close(self) -> None:
        token, self._numpy_token = self._numpy_token, None
        if token is not None:
            token.restore()
        set_numpy_routing(False)
        store, self.store = self.store, None
        if store is not None:
            store.close()

    def stats(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "numpy": self.numpy,
            "counts": self.backend.stats().as_dict(),
            "native": self.backend.native_stats().as_dict(),
        }


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
def knhk_workflow_store(config: Config) -> WorkflowStore | None:
    return services(config).store


@hookimpl
def knhk_memory_stats(config: Config) -> dict[str, Any]:
    svc = services(config)
    out: dict[str, Any] = {"allocator": svc.stats()}
    if svc.store is not None:
        out["store"] = svc.store.stats()
    return out
