"""The [arena] config section and the knhk_arena hook, through get_plugin_manager()."""

from __future__ import annotations

import pytest

from knhk_memory import Arena, ConfigError, get_plugin_manager, load_config
from knhk_memory.plugins import memory


@pytest.fixture
def engine():
    made = []

    def start(mapping):
        config = load_config(mapping=mapping)
        pm = get_plugin_manager([memory], autoload=False)
        pm.hook.knhk_configure(config=config)
        made.append((pm, config))
        return pm, config
    yield start
    for pm, config in made:
        pm.hook.knhk_unconfigure(config=config)


def test_defaults():
    config = load_config(mapping={})
    assert (config.arena.chunk_size, config.arena.max_chunk_size, config.arena.huge_pages) == (
        65536, 16 * 1024 * 1024, True)


def test_knhk_arena_hook_hands_out_configured_arenas(engine):
    pm, config = engine({"allocator": {"backend": "system"},
                         "arena": {"chunk_size": 8192, "max_chunk_size": 32768, "huge_pages": False}})
    a = pm.hook.knhk_arena(config=config, name="case-1")
    b = pm.hook.knhk_arena(config=config, name="case-2")
    assert isinstance(a, Arena) and a is not b
    assert (a.chunk_size, a.max_chunk_size, a.huge_pages, a.backend.name) == (8192, 32768, False, "system")
    v = a.alloc(100)
    assert a.stats().bytes_reserved == 8192
    del v
    stats = pm.hook.knhk_memory_stats(config=config)
    arena_stats = next(s["arena"] for s in stats if "arena" in s)
    assert arena_stats["made"] == 2 and arena_stats["open"] == ["case-1", "case-2"]
    a.close()
    b.close()
    arena_stats = next(s["arena"] for s in pm.hook.knhk_memory_stats(config=config) if "arena" in s)
    assert arena_stats["open"] == []


def test_knhk_arena_bad_name(engine):
    pm, config = engine({})
    with pytest.raises(TypeError, match="arena name must be a non-empty string, got ''"):
        pm.hook.knhk_arena(config=config, name="")


@pytest.mark.parametrize("section, match", [
    ({"chunk_size": 100}, "arena.chunk_size: must be from 4096 to 1099511627776 bytes, got 100"),
    ({"chunk_size": "64k"}, "arena.chunk_size: expected an integer, got the string '64k'"),
    ({"max_chunk_size": 2**41}, "arena.max_chunk_size: must be from 4096"),
    ({"huge_pages": "yes"}, "arena.huge_pages: expected a boolean"),
    ({"chunksize": 4096}, "unknown key 'chunksize' in \\[arena\\].*did you mean 'chunk_size'"),
])
def test_bad_arena_config(section, match):
    with pytest.raises(ConfigError, match=match):
        load_config(mapping={"arena": section})


def test_max_below_chunk_size_applies_nothing():
    config = load_config(mapping={"arena": {"chunk_size": 65536, "max_chunk_size": 8192}})
    pm = get_plugin_manager([memory], autoload=False)
    with pytest.raises(ConfigError, match=r"arena.max_chunk_size: must be at least arena.chunk_size \(65536\), "
                                          "got 8192"):
        pm.hook.knhk_configure(config=config)
    assert memory.STASH_KEY not in config.stash
