"""[pools] and [arena] numa in the config, the knhk_pool hook, pools in knhk_memory_stats (issue 19)."""

from __future__ import annotations

import json

import pytest

from knhk_memory import get_plugin_manager, load_config
from knhk_memory.config import DEFAULT_POOLS
from knhk_memory.errors import ConfigError, PoolExhaustedError
from knhk_memory.pools import FixedPool, LockFreePool, ThreadLocalPool


@pytest.fixture
def engine():
    made = []

    def configure(mapping: dict):
        pm = get_plugin_manager()
        config = load_config(mapping=mapping)
        pm.hook.knhk_configure(config=config)
        made.append((pm, config))
        return pm, config

    yield configure
    for pm, config in made:
        pm.hook.knhk_unconfigure(config=config)


def test_default_config_has_the_cases_pool() -> None:
    config = load_config(mapping={})
    assert dict(config.pools) == DEFAULT_POOLS
    assert config.get("pools.cases.capacity") == 4096
    assert config.arena.numa == ""


def test_named_pools_through_the_hook(engine) -> None:
    pm, config = engine({"pools": {
        "tokens": {"kind": "threadlocal", "block_size": 48, "capacity": 1000, "cache_size": 16},
        "shared": {"kind": "lockfree", "block_size": 64, "capacity": 10, "align": 64, "numa": "interleave"},
        "cases": {"capacity": 2},
    }})
    tokens = pm.hook.knhk_pool(config=config, name="tokens")
    shared = pm.hook.knhk_pool(config=config, name="shared")
    cases = pm.hook.knhk_pool(config=config, name="cases")
    assert isinstance(tokens, ThreadLocalPool) and tokens.cache_size == 16 and tokens.stride == 48
    assert isinstance(shared, LockFreePool) and shared.align == 64 and shared.stats().numa == "interleave"
    assert isinstance(cases, FixedPool) and cases.block_size == 32 and cases.capacity == 2
    assert pm.hook.knhk_pool(config=config, name="tokens") is tokens  # made once
    assert pm.hook.knhk_pool(config=config, name="nope") is None
    cases.alloc(), cases.alloc()
    with pytest.raises(PoolExhaustedError, match=r"FixedPool 'cases' is exhausted: all 2 blocks of 32 bytes are in "
                                                 r"use \(capacity 2\).*config key pools\.cases\.capacity"):
        cases.alloc()
    stats = {}
    for part in pm.hook.knhk_memory_stats(config=config):
        stats.update(part or {})
    json.dumps(stats)  # serialisable
    assert stats["pools"]["cases"]["stats"]["in_use"] == 2 and stats["pools"]["cases"]["stats"]["failed"] == 1
    assert stats["pools"]["tokens"]["made"] and stats["pools"]["tokens"]["settings"]["kind"] == "threadlocal"
    pm.hook.knhk_unconfigure(config=config)
    assert cases.closed and tokens.closed and shared.closed


def test_pools_not_made_until_asked(engine) -> None:
    pm, config = engine({})
    stats = {}
    for part in pm.hook.knhk_memory_stats(config=config):
        stats.update(part or {})
    assert stats["pools"]["cases"]["made"] is False
    with pytest.raises(TypeError, match="pool name must be a non-empty string, got ''"):
        pm.hook.knhk_pool(config=config, name="")


def test_arena_numa_from_config(engine) -> None:
    pm, config = engine({"arena": {"numa": 0}})
    arena = pm.hook.knhk_arena(config=config, name="batch")
    arena.alloc(100_000)
    assert arena.numa_counts() == (1, 0)
    arena.close()


@pytest.mark.parametrize(("mapping", "key", "message"), [
    ({"pools": {"x": {"kind": "slab"}}}, "pools.x.kind", "'slab' is not one of 'fixed', 'lockfree', 'threadlocal'"),
    ({"pools": {"x": {"block_size": 0}}}, "pools.x.block_size", "must be from 1 to 1073741824 bytes, got 0"),
    ({"pools": {"x": {"block_size": -3}}}, "pools.x.block_size", "must be from 1 to 1073741824 bytes, got -3"),
    ({"pools": {"x": {"capacity": 0}}}, "pools.x.capacity", "must be from 1 to 4294967294 blocks, got 0"),
    ({"pools": {"x": {"capacity": 1 << 40}}}, "pools.x.capacity", "must be from 1 to 4294967294 blocks"),
    ({"pools": {"x": {"capacity": "many"}}}, "pools.x.capacity", "expected an integer, got the string 'many'"),
    ({"pools": {"x": {"align": 24}}}, "pools.x.align", "must be a power of two from 1 to 4096, got 24"),
    ({"pools": {"x": {"align": 0}}}, "pools.x.align", "must be a power of two from 1 to 4096, got 0"),
    ({"pools": {"x": {"cache_size": 1}}}, "pools.x.cache_size", "must be from 2 to 65536 blocks, got 1"),
    ({"pools": {"x": {"numa": "far"}}}, "pools.x.numa", "must be \"local\", \"interleave\", a node number"),
    ({"pools": {"x": {"numa": -1}}}, "pools.x.numa", "got the integer -1"),
    ({"pools": {"x": {"capcity": 5}}}, "pools.x.capcity", ("unknown key 'capcity' in [pools.x]; accepted keys: "
                                                           "kind, block_size, capacity, align, cache_size, numa "
                                                           "(did you mean 'capacity'?)")),
    ({"pools": {"x": 5}}, "pools.x", "expected a table, got the integer 5"),
    ({"arena": {"numa": 1.5}}, "arena.numa", "got the number 1.5"),
])
def test_config_errors_name_key_value_and_accepted(mapping: dict, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(mapping=mapping)
    assert info.value.key == key
    assert f"<argument>: {key}: " in str(info.value) and message in str(info.value)


@pytest.mark.parametrize(("mapping", "key", "message"), [
    ({"pools": {"big": {"block_size": 1 << 20, "capacity": 1 << 21}}}, "pools.big.capacity",
     "beyond the limit of 1099511627776 bytes (1 TiB)"),
    ({"pools": {"f": {"kind": "fixed", "cache_size": 8}}}, "pools.f.cache_size",
     "cache_size applies to kind 'threadlocal' only; this pool is kind 'fixed'"),
    ({"pools": {"n": {"numa": 7}}}, "pools.n.numa", "numa=7: no such node online; online nodes: 0"),
    ({"arena": {"numa": 9}}, "arena.numa", "numa=9: no such node online; online nodes: 0"),
])
def test_plugin_checks_what_the_schema_cannot(mapping: dict, key: str, message: str) -> None:
    pm = get_plugin_manager()
    config = load_config(mapping=mapping)
    with pytest.raises(ConfigError) as info:
        pm.hook.knhk_configure(config=config)
    assert info.value.key == key and message in str(info.value)
    assert "knhk_memory.memory" not in config.stash  # nothing applied
