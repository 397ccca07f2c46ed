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
    from .arena import Arena
    from .config import Config
    from .counters import Counters, PatternStats
    from .hotpath import HotOp, PyHotOp
    from .metrics import Metrics
    from .pools import FixedPool, LockFreePool, ThreadLocalPool
    from .registry import GlobalResourceRegistry, PatternRegistry
    from .simd import SimdLevel
    from .store import WorkflowStore

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
# Counters
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def knhk_counters(config: Config) -> Counters | None:
    """Return the engine's counters (cases started, tasks fired, retries, ...).

    :param config: The engine's configuration; ``[counters]`` names them and
        says whether they live in shared memory (``config.counters.shared``).

    Stops at first non-None result, see :ref:`firstresult`.
    """


@hookspec(firstresult=True)
def knhk_pattern_stats(config: Config) -> PatternStats | None:
    """Return the per-pattern executor statistics (executions and ticks per pattern id).

    :param config: The engine's configuration (``config.counters.pattern_stats``).

    Stops at first non-None result, see :ref:`firstresult`.
    """


@hookspec(firstresult=True)
def knhk_metrics(config: Config) -> Metrics | None:
    """Return the engine's metrics block: labelled counter families and histograms
    shared by every worker, exported in the Prometheus text format
    (:class:`knhk_memory.metrics.Metrics`, docs/metrics.md). Made on the first call.

    :param config: The engine's configuration; ``[metrics]`` sets its bounds
        (``max_label_sets``, ``max_cells``) and whether it is shared
        (``shared``, ``shared_name``).

    Stops at first non-None result, see :ref:`firstresult`.
    """


# -------------------------------------------------------------------------
# Workflow store
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def knhk_workflow_store(config: Config) -> WorkflowStore | None:
    """Return the opened workflow store named by ``[store] path``, or None when none is configured.

    :param config: The engine's configuration.

    The store stays open until :func:`knhk_unconfigure`; the engine looks
    definitions up with ``store.get(id)`` or ``store.get_decoded(id)``.

    Stops at first non-None result, see :ref:`firstresult`.
    """


# -------------------------------------------------------------------------
# Arena
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def knhk_arena(config: Config, name: str) -> Arena | None:
    """Return a new arena for one case or batch, made in and owned by the calling thread.

    :param config: The engine's configuration (its ``[arena]`` section sets the
        chunk size, growth cap and huge-page hint).
    :param name: The case or batch the arena is for, reported in the plugin's statistics.

    The engine calls ``reset()`` on the arena between batches of the same
    kind, and ``close()`` when the case is done.

    Stops at first non-None result, see :ref:`firstresult`.
    """


# -------------------------------------------------------------------------
# Pools
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def knhk_pool(config: Config, name: str) -> FixedPool | LockFreePool | ThreadLocalPool | None:
    """Return the block pool configured as ``[pools.<name>]``, or None when there is no such section.

    :param config: The engine's configuration (``[pools.<name>]`` sets the kind, block size,
        capacity, alignment, per-thread cache size and NUMA placement).
    :param name: The pool's name; the default configuration has ``cases``, which the
        reference host keeps its per-case records in.

    The pool is made on the first call and the same one returned after; it is
    closed at :func:`knhk_unconfigure`. A ``fixed`` pool belongs to the thread
    that made it (the first caller); ``lockfree`` and ``threadlocal`` pools
    serve any thread.

    Stops at first non-None result, see :ref:`firstresult`.
    """


# -------------------------------------------------------------------------
# SIMD scans
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def knhk_simd_level(config: Config) -> SimdLevel | None:
    """Return the SIMD level the engine's scans run at (``"scalar"``, ``"avx2"``, ``"avx512"``).

    :param config: The engine's configuration (``[simd] level`` chooses it).

    Stops at first non-None result, see :ref:`firstresult`.
    """


# -------------------------------------------------------------------------
# Reporting
# -------------------------------------------------------------------------


@hookspec
def knhk_release_unused(config: Config) -> dict[str, Any] | None:
    """Give memory the plugin's allocator holds but does not use back to the OS, now.

    :param config: The engine's configuration.

    Returns what was done (the memory plugin: the backend, the process's RSS
    before and after in bytes, and the seconds it took); the engine gets one
    dict per plugin. ``[allocator] purge_interval_s`` makes the memory plugin
    do the same periodically.
    """


@hookspec
def knhk_memory_stats(config: Config) -> dict[str, Any] | None:
    """Return a plugin's memory figures, keyed by service (``{"allocator": {...}}``).

    :param config: The engine's configuration.

    The engine merges the dicts of all plugins; each value is JSON-serialisable.
    """


# -------------------------------------------------------------------------
# Hot-path budgets
# -------------------------------------------------------------------------


@hookspec
def knhk_hot_ops(config: Config) -> list[HotOp | PyHotOp] | None:
    """Return a plugin's own hot paths, to be held to budgets with the built-in ones.

    :param config: The engine's configuration (operations may read their state's
        size from it; the engine is configured before ``setup()`` is called).

    Each item is a :class:`~knhk_memory.hotpath.HotOp` (a C ``knhk_hotop_fn``,
    budget in ticks) or a :class:`~knhk_memory.hotpath.PyHotOp` (a Python call,
    budget in nanoseconds). Names must be unique across all plugins; users
    override the default budgets in the ``[budgets]`` config section.
    """


# -------------------------------------------------------------------------
# Registries (build-once tables and resources)
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def knhk_pattern_registry(config: Config) -> PatternRegistry | None:
    """Return the engine's workflow pattern registry (the 43 control-flow patterns).

    :param config: The engine's configuration.

    Stops at first non-None result, see :ref:`firstresult`.
    """


@hookspec(firstresult=True)
def knhk_resource_registry(config: Config) -> GlobalResourceRegistry | None:
    """Return the engine's registry of named, created-once global resources.

    :param config: The engine's configuration.

    Stops at first non-None result, see :ref:`firstresult`.
    """


@hookspec
def knhk_register_executors(config: Config, registry: PatternRegistry) -> None:
    """Register the plugin's pattern executors with ``registry.register_executor``.

    :param config: The engine's configuration.
    :param registry: The pattern registry, not yet frozen; the engine freezes it
        when every plugin has been called (:func:`knhk_memory.registry.start_registries`).
    """
