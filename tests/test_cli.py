"""The knhk-memory command: info, text and JSON, and the jemalloc restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from knhk_memory.cli import main

from .conftest import jemalloc_loadable


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KNHK_MEMORY_CONFIG", raising=False)
    return tmp_path


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("knhk-memory ")
    for line in ("config:   <defaults>", "backends:", "  system    glibc", "selected: mimalloc (configured: auto)",
                 "numpy:    not routed", "cpu:      ", "plugins:  memory"):
        assert line in out
    from knhk_memory import simd

    # A KNHK_PORTABLE=1 build says so (tests/test_portable.py checks the line); the normal one does not.
    assert ("build:    portable C only (KNHK_PORTABLE=1)" in out) == simd.PORTABLE_BUILD
    assert ("cpu:      features not detected" in out) == simd.PORTABLE_BUILD


@pytest.mark.parametrize("backend", ["system", "mimalloc", pytest.param("jemalloc", marks=pytest.mark.jemalloc)])
def test_info_json_reports_the_configured_backend_and_numpy(isolated, capsys, backend):
    if backend == "jemalloc" and not jemalloc_loadable():
        pytest.fail("jemalloc not loadable: run with the static TLS tunable")
    (isolated / "knhk.toml").write_text(f'[allocator]\nbackend = "{backend}"\nnumpy = true\n')
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["selected_backend"]["name"] == backend
    assert info["numpy"]["new_array_handler"] == f"knhk_memory.{backend}"
    assert info["config"]["origin"] == "./knhk.toml"
    assert info["backends"][backend]["available"] is True
    assert "memory" in info["plugins"]


def test_config_option_before_and_after_the_command(isolated, capsys):
    cfg = isolated / "c.toml"
    cfg.write_text('[allocator]\nbackend = "system"\n')
    assert main(["--config", str(cfg), "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selected_backend"]["name"] == "system"
    assert main(["info", "--json", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["origin"] == "explicit path"


def test_bad_config_is_exit_2_with_the_message(isolated, capsys):
    (isolated / "knhk.toml").write_text('[allocator]\nbackend = "tcmalloc"\n')
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert "knhk-memory: error: " in err and "allocator.backend: 'tcmalloc' is not one of" in err


def test_installed_command_restarts_itself_so_jemalloc_loads(isolated):
    """The console script, started without the glibc tunable, still loads jemalloc."""
    exe = Path(sys.executable).with_name("knhk-memory")
    (isolated / "knhk.toml").write_text('[allocator]\nbackend = "jemalloc"\nnumpy = true\n')
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("GLIBC_TUNABLES", "KNHK_MEMORY_REEXECED")}
    r = subprocess.run([str(exe), "info", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["selected_backend"]["name"] == "jemalloc"
    assert info["numpy"]["new_array_handler"] == "knhk_memory.jemalloc"
