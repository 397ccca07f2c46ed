"""The host side of the plugin contract: the plugin manager factory.

A workflow engine calls :func:`get_plugin_manager` once; nothing here runs at
import time, and there is no global plugin manager.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "knhk.plugins"
DISABLE_AUTOLOAD_ENV = "KNHK_DISABLE_PLUGIN_AUTOLOAD"

__all__ = ["DISABLE_AUTOLOAD_ENV", "ENTRY_POINT_GROUP", "configured", "get_plugin_manager"]


def get_plugin_manager(plugins: Iterable[Any] = (), *, autoload: bool | None = None) -> pluggy.PluginManager:
    """A plugin manager with the ``knhk_`` hooks, ready for an engine.

    :param plugins: The host's built-in plugins (modules or objects), registered
        first, under their own names.
    :param autoload: Load the ``knhk.plugins`` entry points (the memory plugin is
        one, named ``memory``). Default: yes, unless the environment variable
        ``KNHK_DISABLE_PLUGIN_AUTOLOAD`` is set to a non-empty value.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in plugins:
        pm.register(plugin)
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if autoload:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.check_pending()
    return pm


def with_memory_plugin(pm: pluggy.PluginManager) -> pluggy.PluginManager:
    """``pm`` with the memory plugin registered under its entry-point name,
    ``memory``, unless it already is (autoloading switched off). For hosts whose
    own job needs the built-in services, such as ``knhk-memory budget``."""
    if pm.get_plugin("memory") is not None:
        return pm
    # Found through its entry point, as autoloading would: the host layer names no plugin module.
    found = entry_points(group=ENTRY_POINT_GROUP, name="memory")
    if not found:
        raise RuntimeError(f"no 'memory' entry point in the {ENTRY_POINT_GROUP!r} group: "
                           "knhk-memory is not installed (pip install knhk-memory)")
    plugin = next(iter(found)).load()
    if not pm.is_registered(plugin):
        pm.register(plugin, name="memory")
    return pm


class configured:
    """``with configured(pm, config):`` configures the engine's plugins for a
    measurement and unconfigures them after. ``knhk_unconfigure`` puts back the
    process-wide state (selected backend, numpy routing, SIMD level) the first
    configure found, so there is nothing else to restore here."""

    def __init__(self, pm: Any, config: Any) -> None:
        self.pm, self.config = pm, config

    def __enter__(self) -> configured:
        self.pm.hook.knhk_configure(config=self.config)
        return self

    def __exit__(self, *exc: object) -> None:
        self.pm.hook.knhk_unconfigure(config=self.config)
