"""PatternRegistry and GlobalResourceRegistry, and their hooks through the plugin manager."""

from __future__ import annotations

import threading

import pytest

from knhk_memory import (
    DuplicateNameError,
    GlobalResourceRegistry,
    PatternRegistry,
    ReentrantInitError,
    RegistryClosedError,
    RegistryFrozenError,
    ResourceFactoryError,
    UnknownPatternError,
    UnknownResourceError,
    get_plugin_manager,
    load_config,
    start_registries,
)
from knhk_memory._core import ffi, lib
from knhk_memory.hookspecs import hookimpl
from knhk_memory.hotpath import default_budgets
from knhk_memory.registry import hot_ops

# ---------------------------------------------------------------- patterns


def test_the_43_patterns_load_lazily_with_numbers_names_groups():
    reg = PatternRegistry()
    assert not reg.loaded
    assert len(reg) == 43 and reg.loaded
    assert [p.number for p in reg] == list(range(1, 44))
    assert reg[1].name == "Sequence" and reg[1].group == "basic control-flow"
    assert reg[43].name == "Explicit Termination" and reg[43].code == "WCP-43"
    assert len(reg.groups()) == 8
    assert sum(len(reg.in_group(g)) for g in reg.groups()) == 43


def test_lookup_by_name_ignores_case_spaces_dashes_underscores():
    reg = PatternRegistry()
    assert reg["Parallel Split"] is reg[2]
    assert reg["parallel-split"] is reg.by_name("PARALLEL_SPLIT") is reg.by_number(2)
    assert 2 in reg and "sequence" in reg and 44 not in reg and "nope" not in reg


@pytest.mark.parametrize("number", [0, 44, -1, 10**9])
def test_unknown_number_names_the_valid_range(number):
    with pytest.raises(UnknownPatternError, match=rf"no workflow pattern numbered {number}; valid numbers are 1\.\.43"):
        PatternRegistry()[number]


def test_unknown_name_names_the_nearest_names_and_the_range():
    with pytest.raises(UnknownPatternError,
                       match=r"no workflow pattern named 'Paralel Splt'; nearest names: 'Parallel Split'"
                             r".*numbers 1\.\.43"):
        PatternRegistry()["Paralel Splt"]
    with pytest.raises(KeyError):  # UnknownPatternError is a KeyError
        PatternRegistry()["Deferred Choise"]


@pytest.mark.parametrize("key", [True, 2.0, None, b"Sequence"])
def test_wrong_key_types_are_type_errors(key):
    with pytest.raises(TypeError, match=r"a pattern number is an int in 1\.\.43 or a name, got"):
        PatternRegistry()[key]
    with pytest.raises(TypeError, match="a pattern name is a str, got 5"):
        PatternRegistry().by_name(5)  # type: ignore[arg-type]


def test_unknown_group():
    with pytest.raises(UnknownPatternError, match=r"no pattern group 'loops'; groups: basic control-flow"):
        PatternRegistry().in_group("loops")


def test_executors_register_lookup_duplicate_and_freeze():
    reg = PatternRegistry()
    run_seq = object()
    reg.register_executor("Sequence", run_seq)
    assert reg.executor(1) is run_seq and reg.native_lookup(1) == (1, 0, "Sequence", 1)
    with pytest.raises(DuplicateNameError, match=r"WCP-1 'Sequence' already has the executor .*replace=True"):
        reg.register_executor(1, object())
    other = object()
    reg.register_executor(1, other, replace=True)
    assert reg.executor("sequence") is other
    with pytest.raises(UnknownPatternError,
                       match=r"no executor is registered for WCP-2 'Parallel Split'; registered: \[1\]"):
        reg.executor(2)
    with pytest.raises(UnknownPatternError, match="numbered 99"):
        reg.register_executor(99, other)
    reg.freeze()
    assert reg.frozen and lib.knhk_registry_is_frozen(reg.native) == 1
    with pytest.raises(RegistryFrozenError, match=r"cannot register an executor for WCP-2 'Parallel Split': "
                                                  r"the pattern registry is frozen"):
        reg.register_executor(2, other)
    assert reg.executors() == {1: other}


def test_native_table_matches_and_refuses_bad_input():
    reg = PatternRegistry()
    for p in reg:
        assert reg.native_lookup(p.number)[2] == p.name
    for bad in (0, 44, 2**32 - 1):
        assert lib.knhk_registry_lookup(reg.native, bad) == ffi.NULL
    assert lib.knhk_registry_count(reg.native) == 43
    assert lib.knhk_registry_put(reg.native, 3, 0, b"again") == lib.KNHK_ERR_STATE
    assert "already taken by 'Synchronization'" in ffi.string(lib.knhk_last_error()).decode()
    assert lib.knhk_registry_put(reg.native, 44, 0, b"x") == lib.KNHK_ERR_INVALID
    assert lib.knhk_registry_put(reg.native, 0, 0, b"x") == lib.KNHK_ERR_INVALID
    assert lib.knhk_registry_put(reg.native, 5, 0, ffi.NULL) == lib.KNHK_ERR_INVALID
    assert lib.knhk_registry_set_executor(reg.native, 44, 1) == lib.KNHK_ERR_INVALID
    lib.knhk_registry_freeze(reg.native)
    assert lib.knhk_registry_set_executor(reg.native, 1, 1) == lib.KNHK_ERR_STATE
    assert "frozen" in ffi.string(lib.knhk_last_error()).decode()
    status = ffi.new("int *")
    for bad in (0, lib.KNHK_REGISTRY_MAX_ID + 1):
        assert lib.knhk_registry_new(bad, status) == ffi.NULL and status[0] == lib.KNHK_ERR_INVALID
    lib.knhk_registry_free(ffi.NULL)


def test_custom_table_and_bad_tables():
    reg = PatternRegistry("id\tname\tgroup\n1\tA\tg\n5\tB\th\n")
    assert [p.name for p in reg] == ["A", "B"] and reg[5].group == "h"
    with pytest.raises(UnknownPatternError, match=r"valid numbers are 1\.\.5"):
        reg[3]
    with pytest.raises(ValueError, match="the header must be 'id<TAB>name<TAB>group'"):
        len(PatternRegistry("number,name\n"))
    with pytest.raises(ValueError, match=r"<table_text>:2: expected 'number<TAB>name<TAB>group'"):
        len(PatternRegistry("id\tname\tgroup\nx\ty\n"))


def test_pattern_registry_loads_once_under_racing_threads():
    reg = PatternRegistry()
    barrier = threading.Barrier(16)
    tables = []

    def read() -> None:
        barrier.wait()
        tables.append(reg.native)

    threads = [threading.Thread(target=read) for _ in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len({id(t) for t in tables}) == 1


def test_hot_ops_run():
    ops = {op.name: op for op in hot_ops()}
    assert set(ops) == {"once_read", "registry_lookup"}
    for op in ops.values():
        ctx, cleanup = op.setup()
        op.fn(ctx, 10_000)
        cleanup()
        assert default_budgets()[op.name].budget == 8
    reg = PatternRegistry()  # keep it alive: it owns the C table
    lib.knhk_registry_hotop_lookup(ffi.cast("void *", reg.native), 100)


# ---------------------------------------------------------------- resources


class Conn:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def close(self) -> None:
        self.log.append(self.name)


def test_resources_created_once_and_closed_in_reverse_creation_order():
    log: list[str] = []
    made: list[str] = []
    res = GlobalResourceRegistry(close_at_exit=False)

    def factory(name: str):
        def make() -> Conn:
            made.append(name)
            if name == "store":
                res.get("allocator")  # a dependency: created first, so closed last
            return Conn(name, log)
        return make

    for name in ("allocator", "store", "cache"):
        res.register(name, factory(name))
    assert res.get("cache") is res.get("cache")
    res.get("store")
    assert made == ["cache", "store", "allocator"]
    assert res.created() == ["cache", "allocator", "store"]
    res.close()
    assert log == ["store", "allocator", "cache"]
    res.close()  # idempotent
    assert log == ["store", "allocator", "cache"]
    with pytest.raises(RegistryClosedError, match="cannot create resource 'cache2'"):
        res._resources["cache2"] = res._resources["cache"].__class__(
            "cache2", lambda: 1, lambda v: None, type(res._resources["cache"].cell)())
        res.get("cache2")
    with pytest.raises(RegistryClosedError, match="cannot register resource 'late': the registry is closed"):
        res.register("late", lambda: 1)


def test_resource_created_exactly_once_under_32_threads():
    res = GlobalResourceRegistry(close_at_exit=False)
    calls = []
    res.register("pool", lambda: calls.append(1) or object(), close=lambda v: None)
    barrier = threading.Barrier(32)
    got = []

    def get() -> None:
        barrier.wait()
        got.append(res.get("pool"))

    threads = [threading.Thread(target=get) for _ in range(32)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert calls == [1] and len({id(g) for g in got}) == 1


def test_failing_factory_is_reported_by_name_and_retried():
    attempts = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("disk not mounted")
        return "store"

    res = GlobalResourceRegistry(close_at_exit=False)
    res.register("workflow-store", flaky, close=lambda v: None)
    with pytest.raises(ResourceFactoryError,
                       match=r"the factory of resource 'workflow-store' raised OSError: disk not mounted") as info:
        res.get("workflow-store")
    assert info.value.name == "workflow-store" and isinstance(info.value.__cause__, OSError)
    assert res.created() == []
    assert res.get("workflow-store") == "store" and len(attempts) == 2


def test_duplicate_unknown_and_bad_registrations():
    res = GlobalResourceRegistry(close_at_exit=False)
    res.register("store", lambda: 1)
    with pytest.raises(DuplicateNameError, match="resource 'store' is already registered"):
        res.register("store", lambda: 2)
    with pytest.raises(UnknownResourceError,
                       match=r"no resource named 'stor'; did you mean 'store'\? \(registered: 'store'\)"):
        res.get("stor")
    with pytest.raises(TypeError, match="a resource name is a non-empty str, got ''"):
        res.register("", lambda: 1)
    with pytest.raises(TypeError, match="the factory of resource 'x' must be callable, got 3"):
        res.register("x", 3)  # type: ignore[arg-type]
    assert "store" in res and res.names() == ["store"]


def test_reentrant_resource_factory_raises():
    res = GlobalResourceRegistry(close_at_exit=False)
    res.register("loop", lambda: res.get("loop"))
    with pytest.raises(ResourceFactoryError, match="resource 'loop' raised ReentrantInitError") as info:
        res.get("loop")
    assert isinstance(info.value.__cause__, ReentrantInitError)


def test_close_reports_failing_closers_after_closing_all():
    log: list[str] = []
    res = GlobalResourceRegistry(close_at_exit=False)

    def bad(_: object) -> None:
        raise RuntimeError("flush failed")

    res.register("a", lambda: Conn("a", log))
    res.register("b", lambda: 0, close=bad)
    res.get("a")
    res.get("b")
    with pytest.raises(RegistryClosedError, match=r"closing resources failed for 'b' \(RuntimeError: flush failed\)"):
        res.close()
    assert log == ["a"]


def test_resources_closed_at_interpreter_exit(run_python):
    code = r'''
from knhk_memory import GlobalResourceRegistry
import atexit
res = GlobalResourceRegistry()
res.register("first", lambda: "1", close=lambda v: print("closed first", flush=True))
res.register("second", lambda: "2", close=lambda v: print("closed second", flush=True))
res.get("first"); res.get("second")
'''
    proc = run_python(code, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["closed second", "closed first"]


# ---------------------------------------------------------------- hooks


class ExecutorPlugin:
    def __init__(self) -> None:
        self.run_sequence = object()

    @hookimpl
    def knhk_register_executors(self, config, registry):
        registry.register_executor("Sequence", self.run_sequence)


def test_hooks_hand_both_registries_and_freeze_after_executors(tmp_path):
    from knhk_memory.plugins import memory

    plugin = ExecutorPlugin()
    pm = get_plugin_manager([memory, plugin], autoload=False)
    config = load_config(mapping={"allocator": {"backend": "system"}})
    pm.hook.knhk_configure(config=config)
    try:
        patterns = pm.hook.knhk_pattern_registry(config=config)
        resources = pm.hook.knhk_resource_registry(config=config)
        assert isinstance(patterns, PatternRegistry) and isinstance(resources, GlobalResourceRegistry)
        log: list[str] = []
        resources.register("store", lambda: Conn("store", log))
        got_p, got_r = start_registries(pm, config)
        assert got_p is patterns and got_r is resources
        assert patterns.frozen and patterns.executor(1) is plugin.run_sequence
        with pytest.raises(RegistryFrozenError):
            patterns.register_executor(2, object())
        resources.get("store")
    finally:
        pm.hook.knhk_unconfigure(config=config)
    assert log == ["store"] and resources.closed


def test_freeze_on_start_can_be_switched_off_and_config_is_checked():
    from knhk_memory.errors import ConfigError
    from knhk_memory.plugins import memory

    pm = get_plugin_manager([memory], autoload=False)
    config = load_config(mapping={"allocator": {"backend": "system"},
                                  "registry": {"freeze_on_start": False, "close_at_exit": False}})
    pm.hook.knhk_configure(config=config)
    try:
        patterns, _ = start_registries(pm, config)
        assert not patterns.frozen
    finally:
        pm.hook.knhk_unconfigure(config=config)
    with pytest.raises(ConfigError, match=r"registry.freeze_on_start: expected a boolean"):
        load_config(mapping={"registry": {"freeze_on_start": "yes"}})


def test_start_registries_without_the_memory_plugin():
    pm = get_plugin_manager([], autoload=False)
    with pytest.raises(RuntimeError, match="no plugin answered knhk_pattern_registry"):
        start_registries(pm, load_config(mapping={}))


def test_knhk_register_executors_called_directly_registers_on_an_unfrozen_registry():
    plugin = ExecutorPlugin()
    pm = get_plugin_manager([plugin], autoload=False)
    config = load_config(mapping={})
    registry = PatternRegistry()
    pm.hook.knhk_register_executors(config=config, registry=registry)
    assert registry.executor("Sequence") is plugin.run_sequence
    assert not registry.frozen
