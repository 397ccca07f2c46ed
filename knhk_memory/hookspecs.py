"""The hooks a knhk-style workflow engine calls on its plugins.

Every hook carries the ``knhk_`` prefix; a host built with
:func:`knhk_memory.host.get_plugin_manager` calls ``check_pending()``, so a
misspelled hook in a plugin is an error, not a silent no-op. Each hook takes
the engine's :class:`~knhk_memory.config.Config`; plugins keep their state in
``config.stash``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .allocator import Backend
    from .config import Config

PROJECT = "knhk"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -------------------------------------------------------------------------
# Engine lifecycle
# -------------------------------------------------------------------------


@hookspec
def knhk_configure(config: Config) -> None:
    """Apply the engine's configuration; called once, after every plugin is registered.

    :param config: The checked configuration (:func:`knhk_memory.load_config`).

    A plugin checks everything it needs before it changes anything, and raises
    :class:`~knhk_memory.ConfigError` naming the key when it cannot apply it.
    """


@hookspec
def knhk_unconfigure(config: Config) -> None:
    """Undo :func:`knhk_configure` at engine shutdown, in reverse registration order.

    :param config: The configuration given to :func:`knhk_configure`.
    """


# -------------------------------------------------------------------------
# Allocator
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def knhk_allocator(config: Config) -> Backend | None:
    """Return the allocator backend the engine should use.

    :param config: The engine's configuration.

    Stops at first non-None result, see :ref:`firstresult`.
    """


# -------------------------------------------------------------------------
# SIMD scans
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def knhk_simd_level(config: Config) -> str | None:
    """Return the SIMD level the engine's scans run at (``"scalar"``, ``"avx2"``, ``"avx512"``).

    :param config: The engine's configuration (``[simd] level`` chooses it).

    Stops at first non-None result, see :ref:`firstresult`.
    """


# -------------------------------------------------------------------------
# Reporting
# -------------------------------------------------------------------------


@hookspec
def knhk_memory_stats(config: Config) -> dict[str, Any] | None:
    """Return a plugin's memory figures, keyed by service (``{"allocator": {...}}``).

    :param config: The engine's configuration.

    The engine merges the dicts of all plugins; each value is JSON-serialisable.
    """
