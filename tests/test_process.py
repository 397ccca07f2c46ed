"""Process-wide state has one owner (knhk_memory.process): configure twice,
configure/unconfigure/configure, two engines with the same and with different
settings, and exact restoration of what was there before the first configure."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
from numpy._core.multiarray import get_handler_name

from knhk_memory import allocator, get_plugin_manager, load_config, process, simd
from knhk_memory.errors import (
    AlreadyConfiguredError,
    BackendUnavailableError,
    ConfigError,
    ProcessStateError,
    SimdLevelError,
)
from knhk_memory.host import configured
from knhk_memory.plugins import memory


def other_backend() -> str:
    """A loadable backend other than system (mimalloc or jemalloc), or skip."""
    for name in ("mimalloc", "jemalloc"):
        try:
            allocator.get_backend(name)
            return name
        except BackendUnavailableError:
            continue
    pytest.skip("neither mimalloc nor jemalloc is loadable here")


def other_level() -> str:
    """A SIMD level other than the one in force, or skip (a portable build has scalar only)."""
    for name in simd.supported_levels():
        if name != simd.level():
            return name
    pytest.skip("one SIMD level only (KNHK_PORTABLE=1 build)")


def state() -> tuple[str, bool, str, str]:
    return (allocator.selected_backend().name, allocator.numpy_routing_enabled(), simd.level(),
            get_handler_name())


@pytest.fixture
def pm():
    return get_plugin_manager([memory], autoload=False)


@pytest.fixture(autouse=True)
def _nothing_held_before_or_after():
    assert process.holders() == []
    before = state()
    yield
    assert process.holders() == []
    assert state() == before


def routed(backend: str, level: str) -> object:
    return load_config(mapping={"allocator": {"backend": backend, "numpy": True}, "simd": {"level": level}})


def test_configure_applies_and_unconfigure_restores_exactly(pm):
    name, level = other_backend(), other_level()
    before = state()
    assert before[1:] == (False, before[2], "default_allocator")
    config = routed(name, level)
    pm.hook.knhk_configure(config=config)
    assert state() == (name, True, level, f"knhk_memory.{name}")
    assert process.holders() == ["the engine configured from <argument>"]
    assert process.in_force() == {"backend": name, "numpy_routing": True, "simd_level": level,
                                  "holders": ["the engine configured from <argument>"]}
    pm.hook.knhk_unconfigure(config=config)
    assert state() == before


def test_a_state_set_by_hand_before_configure_comes_back(pm):
    # Not the defaults: what a program set itself before it built an engine.
    name, level = other_backend(), other_level()
    start = state()
    previous_level = simd.set_level(level)
    allocator.select_backend(name)
    token = allocator.install_numpy_handler(name)
    allocator.set_numpy_routing(True)
    try:
        mine = state()
        config = load_config(mapping={"allocator": {"backend": "system"}, "simd": {"level": "scalar"}})
        pm.hook.knhk_configure(config=config)
        assert state() == ("system", False, "scalar", f"knhk_memory.{name}")  # numpy=false installs no handler
        pm.hook.knhk_unconfigure(config=config)
        assert state() == mine
    finally:
        allocator.set_numpy_routing(False)
        token.restore()
        allocator.select_backend("system")
        simd.set_level(previous_level)
    assert state() == start


def test_configure_twice_on_the_same_config_is_refused_and_changes_nothing(pm):
    name = other_backend()
    before = state()
    config = routed(name, "auto")
    pm.hook.knhk_configure(config=config)
    applied = state()
    svc = memory.services(config)
    with pytest.raises(AlreadyConfiguredError, match=re.escape(
            "the memory plugin is already configured for this config (from <argument>): knhk_configure was "
            "called twice; call knhk_unconfigure first, or configure a copy (config.replace()) for a second "
            "engine")):
        pm.hook.knhk_configure(config=config)
    assert memory.services(config) is svc and state() == applied
    assert process.holders() == ["the engine configured from <argument>"]
    # One unconfigure undoes the one configure that took.
    pm.hook.knhk_unconfigure(config=config)
    assert state() == before
    pm.hook.knhk_unconfigure(config=config)  # a second unconfigure does nothing
    assert state() == before


def test_configure_unconfigure_configure(pm):
    name, level = other_backend(), other_level()
    before = state()
    config = routed(name, level)
    for _ in range(3):
        pm.hook.knhk_configure(config=config)
        assert state() == (name, True, level, f"knhk_memory.{name}")
        counters = pm.hook.knhk_counters(config=config)
        counters.add("cases_started")
        pm.hook.knhk_unconfigure(config=config)
        assert state() == before and counters.closed
    with pytest.raises(RuntimeError, match="the memory plugin is not configured"):
        pm.hook.knhk_allocator(config=config)


def test_two_engines_with_the_same_settings_share_them(pm):
    name, level = other_backend(), other_level()
    before = state()
    first = routed(name, level)
    second = routed(name, level).replace(counters={"names": ["tasks_fired"]})  # engine-owned settings may differ
    pm.hook.knhk_configure(config=first)
    pm.hook.knhk_configure(config=second)
    assert len(process.holders()) == 2
    assert pm.hook.knhk_allocator(config=first) is pm.hook.knhk_allocator(config=second)
    assert pm.hook.knhk_counters(config=first) is not pm.hook.knhk_counters(config=second)
    # The first to leave keeps the settings for the other; the last puts back what was there.
    pm.hook.knhk_unconfigure(config=first)
    assert state() == (name, True, level, f"knhk_memory.{name}")
    assert pm.hook.knhk_simd_level(config=second) == level
    pm.hook.knhk_unconfigure(config=second)
    assert state() == before


def test_auto_shares_whatever_level_is_in_force(pm):
    level = other_level()
    first = load_config(mapping={"simd": {"level": level}})
    pm.hook.knhk_configure(config=first)
    second = load_config(mapping={"simd": {"level": "auto"}})
    pm.hook.knhk_configure(config=second)
    assert pm.hook.knhk_simd_level(config=second) == level
    pm.hook.knhk_unconfigure(config=first)
    pm.hook.knhk_unconfigure(config=second)


def test_a_second_engine_asking_for_other_settings_is_refused(pm, tmp_path):
    name, level = other_backend(), other_level()
    path = tmp_path / "first.toml"
    path.write_text(f'[allocator]\nbackend = "{name}"\nnumpy = true\n[simd]\nlevel = "{level}"\n')
    first = load_config(path)
    pm.hook.knhk_configure(config=first)
    applied = state()
    second = load_config(mapping={"allocator": {"backend": "system", "numpy": True}, "simd": {"level": level}})
    with pytest.raises(ConfigError, match=re.escape(
            f"<argument>: allocator.backend: allocator backend 'system' asked, {name!r} held: this process's "
            f"allocator, numpy routing and SIMD level are held by the engine configured from {path}; engines "
            "in one process must ask for the same settings (or `auto` for the SIMD level), or configure after "
            "the holder's knhk_unconfigure")) as info:
        pm.hook.knhk_configure(config=second)
    assert info.value.key == "allocator.backend" and info.value.value == "system"
    # Every difference is named, the first one's key on the error.
    third = load_config(mapping={"allocator": {"backend": name, "numpy": False}, "simd": {"level": "scalar"}})
    if level != "scalar":
        with pytest.raises(ConfigError, match=re.escape(
                f"allocator.numpy: numpy routing false asked, true held; SIMD level 'scalar' asked, {level!r} held: ")):
            pm.hook.knhk_configure(config=third)
    # Nothing was applied, nothing of the refused engines is left open.
    assert state() == applied and process.holders() == [f"the engine configured from {path}"]
    assert memory.STASH_KEY not in second.stash and memory.STASH_KEY not in third.stash
    pm.hook.knhk_unconfigure(config=second)  # never configured: nothing to undo
    assert state() == applied
    pm.hook.knhk_unconfigure(config=first)
    # Once the holder has gone, the other settings are free to take.
    pm.hook.knhk_configure(config=second)
    assert state()[:2] == ("system", True)
    pm.hook.knhk_unconfigure(config=second)


def test_configured_context_restores_without_touching_allocator_privates(pm):
    name = other_backend()
    before = state()
    with configured(pm, routed(name, "auto")):
        assert state()[:2] == (name, True)
    assert state() == before


def test_claims_are_counted_and_released_once():
    backend = allocator.get_backend("system")
    a = process.claim(process.ProcessSettings(backend), "a")
    b = process.claim(process.ProcessSettings(backend), "b")
    with pytest.raises(ProcessStateError,
                       match=r"numpy routing true asked, false held: .* held by a and 1 more;") as info:
        process.claim(process.ProcessSettings(backend, numpy=True), "c")
    assert info.value.key == "allocator.numpy"
    a.release()
    a.release()  # twice: no effect on b's hold
    assert process.holders() == ["b"] and a.released and not b.released
    b.release()
    assert process.holders() == []


def test_a_claim_that_cannot_be_applied_changes_nothing():
    before = state()
    with pytest.raises(SimdLevelError, match="unknown SIMD level 'sse9'"):
        bad: Any = "sse9"
        process.claim(process.ProcessSettings(allocator.get_backend("system"), True, bad), "bad")
    assert state() == before and process.holders() == []


def test_claims_from_many_threads_count_exactly():
    backend = allocator.get_backend("system")
    claims: list[process.Claim] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(200):
            c = process.claim(process.ProcessSettings(backend), "thread")
            with lock:
                claims.append(c)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(process.holders()) == 800
    for c in claims:
        c.release()
    assert process.holders() == []
