"""knhk-memory: the memory subsystem of a knhk-style workflow engine.

A C core (built with cffi) under a thin typed Python layer, handed to the
engine through pluggy hooks (see :mod:`knhk_memory.hookspecs`).
"""

from __future__ import annotations

from . import errors
from ._version import __version__
from .errors import *  # noqa: F403 - every exception class, see errors.__all__

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (~2 ms of every import); type checkers read True
if TYPE_CHECKING:
    from typing import Any

# Everything else is imported on first use (PEP 562): `import knhk_memory`
# costs a few milliseconds and imports neither numpy nor pluggy; the name
# tells which submodule to load. `import knhk_memory.store` (or .counters)
# likewise loads only what the store (or the counters) need.
_LAZY: dict[str, str] = {
    "Backend": "allocator", "Block": "allocator", "apply_numpy_handler": "allocator",
    "available_backends": "allocator", "get_backend": "allocator", "install_numpy_handler": "allocator",
    "numpy_handler": "allocator", "select_backend": "allocator", "selected_backend": "allocator",
    "BudgetReport": "budgets", "run_budgets": "budgets",
    "Config": "config", "load_config": "config",
    "HotOp": "hotpath", "PyHotOp": "hotpath",
    "CounterWriter": "counters", "Counters": "counters", "PatternStats": "counters",
    "Arena": "arena", "ArenaStats": "arena", "ThreadLocalArena": "arena",
    "FixedPool": "pools", "LockFreePool": "pools", "ThreadLocalPool": "pools", "PoolStats": "pools",
    "MmapVec": "mmapvec",
    "get_plugin_manager": "host",
    "Lazy": "once", "OnceLock": "once",
    "GlobalResourceRegistry": "registry", "Pattern": "registry", "PatternRegistry": "registry",
    "start_registries": "registry",
    "WorkflowStore": "store", "WorkflowStoreWriter": "store", "open_store": "store",
}


def __getattr__(name: str) -> Any:
    import importlib

    value: Any
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif not name.startswith("__"):
        # A submodule, as `import knhk_memory` used to bind them all (knhk_memory.allocator, ...).
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from . import simd
    from .allocator import (
        Backend,
        Block,
        apply_numpy_handler,
        available_backends,
        get_backend,
        install_numpy_handler,
        numpy_handler,
        select_backend,
        selected_backend,
    )
    from .arena import Arena, ArenaStats, ThreadLocalArena
    from .budgets import BudgetReport, run_budgets
    from .config import Config, load_config
    from .counters import Counters, CounterWriter, PatternStats
    from .host import get_plugin_manager
    from .hotpath import HotOp, PyHotOp
    from .mmapvec import MmapVec
    from .once import Lazy, OnceLock
    from .pools import FixedPool, LockFreePool, PoolStats, ThreadLocalPool
    from .registry import GlobalResourceRegistry, Pattern, PatternRegistry, start_registries
    from .store import WorkflowStore, WorkflowStoreWriter, open_store

__all__ = [
    "__version__",
    "Backend", "Block", "apply_numpy_handler", "available_backends", "get_backend",
    "install_numpy_handler", "numpy_handler", "select_backend", "selected_backend",
    "Config", "load_config",
    "Counters", "CounterWriter", "PatternStats",
    "get_plugin_manager",
    "BudgetReport", "HotOp", "PyHotOp", "run_budgets",
    "OnceLock", "Lazy", "Pattern", "PatternRegistry", "GlobalResourceRegistry", "start_registries",
    "Arena", "ArenaStats", "ThreadLocalArena",
    "FixedPool", "LockFreePool", "ThreadLocalPool", "PoolStats", "MmapVec",
    "WorkflowStore", "WorkflowStoreWriter", "open_store",
    "simd",
]
__all__ += errors.__all__
