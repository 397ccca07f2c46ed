"""The plugin contract: entry point, hooks, host factory. Every hook is documented and tested."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pluggy
import pytest

from knhk_memory import get_plugin_manager, hookspecs, load_config
from knhk_memory.host import DISABLE_AUTOLOAD_ENV

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("knhk_"))


def test_every_hook_is_prefixed_typed_and_has_a_docstring():
    assert HOOKS
    for name in HOOKS:
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and ":param config:" in fn.__doc__, name
        assert "config" in inspect.signature(fn).parameters, name
        assert inspect.signature(fn).return_annotation is not inspect.Signature.empty, name


def test_every_hook_is_documented_in_docs():
    text = (ROOT / "docs" / "hooks.md").read_text()
    assert [h for h in HOOKS if f"## {h}" not in text] == []


def test_every_hook_is_tested():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.name != "test_plugin.py")
    tests += (ROOT / "tests" / "test_plugin.py").read_text().split("\n# ---- hook tests\n")[1]
    assert [h for h in HOOKS if not re.search(rf"hook\.{h}\(", tests)] == []


def test_memory_plugin_is_found_through_the_entry_point():
    pm = get_plugin_manager()
    plugin = pm.get_plugin("memory")
    assert plugin is not None and plugin.__name__ == "knhk_memory.plugins.memory"
    assert ("memory", plugin) in pm.list_name_plugin()
    dist = dict(pm.list_plugin_distinfo())
    assert dist[plugin].project_name == "knhk-memory"


def test_autoload_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    assert get_plugin_manager().get_plugin("memory") is None
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV)
    assert get_plugin_manager(autoload=False).get_plugin("memory") is None
    from knhk_memory.plugins import memory

    pm = get_plugin_manager([memory], autoload=False)
    assert pm.is_registered(memory)


def test_misspelled_hook_is_an_error():
    class Typo:
        @hookspecs.hookimpl
        def knhk_alocator(self, config):
            return None

    with pytest.raises(pluggy.PluginValidationError, match="knhk_alocator"):
        get_plugin_manager([Typo()], autoload=False)


# ---- hook tests

@pytest.fixture
def engine():
    pm = get_plugin_manager()
    config = load_config(mapping={"allocator": {"backend": "mimalloc", "numpy": True}})
    pm.hook.knhk_configure(config=config)
    yield pm, config
    pm.hook.knhk_unconfigure(config=config)


def test_knhk_configure_selects_backend_and_routes_numpy(engine):
    from knhk_memory import allocator

    assert allocator.selected_backend().name == "mimalloc"
    assert np._core.multiarray.get_handler_name(np.ones(4)) == "knhk_memory.mimalloc"


def test_knhk_allocator_returns_the_configured_backend(engine):
    pm, config = engine
    assert pm.hook.knhk_allocator(config=config).name == "mimalloc"


def test_knhk_memory_stats_reports_the_allocator(engine):
    pm, config = engine
    (stats,) = [s for s in pm.hook.knhk_memory_stats(config=config) if s]
    assert stats["allocator"]["backend"] == "mimalloc"
    assert stats["allocator"]["counts"]["allocations"] >= 1


def test_knhk_unconfigure_restores_numpy():
    pm = get_plugin_manager()
    config = load_config(mapping={"allocator": {"backend": "system", "numpy": True}})
    pm.hook.knhk_configure(config=config)
    assert np._core.multiarray.get_handler_name() == "knhk_memory.system"
    pm.hook.knhk_unconfigure(config=config)
    assert np._core.multiarray.get_handler_name() == "default_allocator"
    with pytest.raises(RuntimeError, match="memory plugin is not configured"):
        pm.hook.knhk_allocator(config=config)


def test_knhk_hot_ops_collects_plugin_hot_paths():
    from knhk_memory.hotpath import PyHotOp

    class EnginePlugin:
        @hookspecs.hookimpl
        def knhk_hot_ops(self, config):
            return [PyHotOp("engine_noop", "a no-op call", setup=lambda: ((lambda: None), (lambda: None)),
                            default_budget=10_000)]

    pm = get_plugin_manager([EnginePlugin()])
    config = load_config(mapping={})
    ops = [op for group in pm.hook.knhk_hot_ops(config=config) if group for op in group]
    names = [op.name for op in ops]
    # The memory plugin (autoloaded last, so called first) gives the built-in ones through the same hook.
    assert names[-1] == "engine_noop" and names[0] == "backend_malloc_free"
    assert "store_probe" in names and "count_eq_4k" in names
