"""knhk-memory: the memory subsystem of a knhk-style workflow engine.

A C core (built with cffi) under a thin typed Python layer, handed to the
engine through pluggy hooks (see :mod:`knhk_memory.hookspecs`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("knhk-memory")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0+unknown"

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
from .budgets import BudgetReport, run_budgets
from .config import Config, load_config
from . import errors
from .errors import *  # noqa: F403 - every exception class, see errors.__all__
from .hotpath import HotOp, PyHotOp
from .counters import CounterWriter, Counters, PatternStats
from .arena import Arena, ArenaStats, ThreadLocalArena
from .pools import FixedPool, LockFreePool, PoolStats, ThreadLocalPool
from .mmapvec import MmapVec
from .host import get_plugin_manager
from .once import Lazy, OnceLock
from .registry import GlobalResourceRegistry, Pattern, PatternRegistry, start_registries
from . import simd
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
