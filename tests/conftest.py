"""Shared fixtures. Tests that need jemalloc run in a process started with the
static-TLS tunable (scripts/dev.sh sets it); elsewhere they are skipped with
the reason, never silently passed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A test in its own working directory, with no config from the environment and its
    own cache directory (the demo's store and event log land there). Test modules that
    need another setup define their own `isolated`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KNHK_MEMORY_CONFIG", raising=False)
    monkeypatch.setenv("KNHK_MEMORY_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def run_python():
    """Run Python code in a fresh interpreter; returns CompletedProcess."""

    def run(code: str, *, env: dict[str, str] | None = None, timeout: float = 60,
            cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=full_env, timeout=timeout, cwd=cwd)

    return run


def jemalloc_loadable() -> bool:
    from knhk_memory.allocator import get_backend
    from knhk_memory.errors import BackendUnavailableError

    try:
        get_backend("jemalloc")
    except BackendUnavailableError:
        return False
    return True
