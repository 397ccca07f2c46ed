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
from .config import Config, load_config
from .errors import (
    BackendUnavailableError,
    ConfigError,
    KnhkMemoryError,
    NativeError,
    SimdLevelError,
    SimdTypeError,
    SimdValueError,
)
from .host import get_plugin_manager
from . import simd

__all__ = [
    "__version__",
    "Backend", "Block", "apply_numpy_handler", "available_backends", "get_backend",
    "install_numpy_handler", "numpy_handler", "select_backend", "selected_backend",
    "Config", "load_config",
    "BackendUnavailableError", "ConfigError", "KnhkMemoryError", "NativeError",
    "SimdLevelError", "SimdTypeError", "SimdValueError", "simd",
    "get_plugin_manager",
]
