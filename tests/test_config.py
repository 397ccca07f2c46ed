"""Configuration lookup order and every config error."""

from __future__ import annotations

import os

import pytest

from knhk_memory import ConfigError, get_plugin_manager, load_config
from knhk_memory.config import ENV_VAR


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    return tmp_path


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_when_nothing_is_there():
    config = load_config()
    assert config.origin == "defaults" and config.source == "<defaults>"
    assert config.allocator.backend == "auto" and config.allocator.numpy is False


def test_lookup_order(isolated, monkeypatch):
    write(isolated / "pyproject.toml", '[tool.knhk-memory.allocator]\nbackend = "system"\n')
    config = load_config()
    assert config.allocator.backend == "system"
    assert config.origin == "./pyproject.toml [tool.knhk-memory]"
    write(isolated / "knhk.toml", '[allocator]\nbackend = "mimalloc"\n')
    assert load_config().allocator.backend == "mimalloc"
    assert load_config().origin == "./knhk.toml"
    env_file = write(isolated / "env.toml", '[allocator]\nnumpy = true\n')
    monkeypatch.setenv(ENV_VAR, str(env_file))
    config = load_config()
    assert config.origin == f"${ENV_VAR}" and config.allocator.numpy is True
    explicit = write(isolated / "explicit.toml", '[allocator]\nbackend = "jemalloc"\n')
    config = load_config(explicit)
    assert config.origin == "explicit path" and config.allocator.backend == "jemalloc"
    assert config.source == str(explicit)


def test_pyproject_without_our_table_falls_to_defaults(isolated):
    write(isolated / "pyproject.toml", '[project]\nname = "x"\n')
    assert load_config().origin == "defaults"


def test_mapping():
    config = load_config(mapping={"allocator": {"backend": "system"}})
    assert config.source == "<argument>" and config.allocator.backend == "system"
    with pytest.raises(TypeError, match="either a path or a mapping"):
        load_config("x.toml", mapping={})


def test_sections_are_read_only():
    config = load_config()
    with pytest.raises(AttributeError, match="read-only"):
        config.allocator.backend = "system"
    with pytest.raises(AttributeError, match=r"config has no section \[nope\]"):
        _ = config.nope
    with pytest.raises(AttributeError, match=r"section \[allocator\] has no key 'nope'"):
        _ = config.allocator.nope


@pytest.mark.parametrize("text,match", [
    ('[alocator]\nbackend = "system"\n',
     r"knhk.toml: alocator: unknown section \[alocator\]; accepted sections: allocator.*did you mean 'allocator'"),
    ('[allocator]\nbakend = "system"\n',
     (r"knhk.toml: allocator.bakend: unknown key 'bakend' in \[allocator\]; accepted keys: backend, numpy, scope, "
      r"purge_interval_s, jemalloc, mimalloc, system \(did you mean 'backend'\?\)")),
    ('[allocator]\nbackend = "jemaloc"\n',
     (r"knhk.toml: allocator.backend: 'jemaloc' is not one of 'auto', 'system', 'jemalloc', 'mimalloc'"
      r" \(did you mean 'jemalloc'")),
    ('[allocator]\nbackend = 3\n',
     r"knhk.toml: allocator.backend: expected a string, got the integer 3"),
    ('[allocator]\nnumpy = "yes"\n',
     r"knhk.toml: allocator.numpy: expected a boolean \(true or false\), got the string 'yes'"),
    ('allocator = 5\n', r"knhk.toml: allocator: \[allocator\] must be a table, got the integer 5"),
    ('[allocator\nbackend = 1', r"knhk.toml: not valid TOML: "),
])
def test_config_errors(isolated, text, match):
    write(isolated / "knhk.toml", text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config()
    assert info.value.source.endswith("knhk.toml")


def test_error_carries_key_and_value(isolated):
    write(isolated / "knhk.toml", '[allocator]\nbackend = "tcmalloc"\n')
    with pytest.raises(ConfigError) as info:
        load_config()
    assert (info.value.key, info.value.value) == ("allocator.backend", "tcmalloc")


def test_file_errors(isolated, monkeypatch):
    with pytest.raises(ConfigError, match=r"missing.toml: config file not found"):
        load_config(isolated / "missing.toml")
    monkeypatch.setenv(ENV_VAR, str(isolated / "gone.toml"))
    with pytest.raises(ConfigError, match=r"gone.toml: config file not found"):
        load_config()
    monkeypatch.delenv(ENV_VAR)
    (isolated / "adir").mkdir()
    with pytest.raises(ConfigError, match=r"adir: is a directory, not a TOML file"):
        load_config(isolated / "adir")
    (isolated / "bin.toml").write_bytes(b"\xff\xfe[allocator]")
    with pytest.raises(ConfigError, match=r"bin.toml: config file is not UTF-8 text"):
        load_config(isolated / "bin.toml")


def test_unreadable_file(isolated, monkeypatch):
    path = write(isolated / "secret.toml", "")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the read fail as it would for a user
        def deny(p):
            raise PermissionError(13, "Permission denied", str(p))
        monkeypatch.setattr("knhk_memory.config._open_nonblocking", deny)
    with pytest.raises(ConfigError, match=r"secret.toml: config file is not readable \(permission denied\)"):
        load_config(path)


def test_missing_backend_library_is_a_config_error_naming_the_package(isolated, run_python):
    write(isolated / "knhk.toml", '[allocator]\nbackend = "mimalloc"\nnumpy = true\n')
    r = run_python(
        "import numpy\nfrom knhk_memory import get_plugin_manager, load_config, ConfigError\n"
        "pm = get_plugin_manager(); c = load_config()\n"
        "try:\n    pm.hook.knhk_configure(config=c)\nexcept ConfigError as e:\n    print(e)\n"
        "print(numpy._core.multiarray.get_handler_name())\n",
        env={"KNHK_MEMORY_MIMALLOC_LIBRARY": "/nonexistent/libmimalloc.so.2"}, cwd=isolated)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()
    assert first.startswith(f"{isolated / 'knhk.toml'}: allocator.backend: mimalloc backend:")
    assert "is a file that does not exist" in first and "libmimalloc2.0" in first
    assert second == "default_allocator"  # nothing half-applied


def test_bad_config_applies_nothing():
    from knhk_memory import allocator

    before = allocator.selected_backend()
    pm = get_plugin_manager()
    config = load_config(mapping={"allocator": {"backend": "system", "numpy": True}})
    object.__setattr__(config, "values", {"allocator": {"backend": "nonexistent", "numpy": True}})
    with pytest.raises(ValueError, match="unknown allocator backend 'nonexistent'"):
        pm.hook.knhk_configure(config=config)
    assert allocator.selected_backend() is before
    assert "knhk_memory.memory" not in config.stash
