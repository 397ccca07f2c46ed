"""The backend as the whole process's allocator (issue 21): [allocator] scope, the launcher
(`knhk-memory run`), the configure-time check, process-wide figures, release_unused and the
periodic purge. Launched commands are small Python snippets: each takes well under a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from knhk_memory import ConfigError, get_plugin_manager, load_config
from knhk_memory import launcher as process
from knhk_memory.errors import BackendUnavailableError

BACKENDS = ("system", "jemalloc", "mimalloc")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("KNHK_MEMORY_CONFIG", process.MARKER, "LD_PRELOAD", "MALLOC_CONF", "KNHK_MEMORY_REEXECED"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def write_config(path: Path, backend: str, scope: str = "process", extra: str = "") -> Path:
    path.write_text(f'[allocator]\nbackend = "{backend}"\nscope = "{scope}"\n{extra}')
    return path


# Loaded in this process, whatever os.environ says now (a configure may have
# taken LD_PRELOAD out of it). Under AddressSanitizer the sanitizer's malloc
# serves the process and its children cannot start without its preload: this
# module is about which allocator serves the process, so it has nothing to say.
_UNDER_SANITIZER = "libasan" in Path("/proc/self/maps").read_text()
pytestmark = pytest.mark.skipif(_UNDER_SANITIZER, reason="AddressSanitizer's malloc serves the process")


def launch(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 60,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", process.MARKER)}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "knhk_memory", "run", *args], capture_output=True, text=True,
                          env=full, timeout=timeout, cwd=cwd)


# ---------------------------------------------------------------- configuration

def test_scope_and_options_defaults():
    cfg = load_config(mapping={})
    assert cfg.allocator.scope == "arrays"
    assert cfg.allocator.purge_interval_s == 0.0
    assert cfg.allocator.jemalloc == {} and cfg.allocator.mimalloc == {} and cfg.allocator.system == {}


@pytest.mark.parametrize("table, key, message", [
    ({"scope": "everything"}, "allocator.scope", "'everything' is not one of 'arrays', 'process'"),
    ({"scope": "proces"}, "allocator.scope", "(did you mean 'process'?)"),
    ({"scope": 1}, "allocator.scope", "expected a string, got the integer 1"),
    ({"jemalloc": {"dirty_decay": 5}}, "allocator.jemalloc",
     ("unknown jemalloc option 'dirty_decay'; accepted options: background_thread, max_background_threads, "
      "dirty_decay_ms")),
    ({"jemalloc": {"dirty_decay": 5}}, "allocator.jemalloc", "(did you mean 'dirty_decay_ms'"),
    ({"jemalloc": {"background_thread": "yes"}}, "allocator.jemalloc",
     "option 'background_thread': expected a boolean (true or false), got the string 'yes'"),
    ({"jemalloc": {"dirty_decay_ms": -2}}, "allocator.jemalloc",
     "option 'dirty_decay_ms': must be -1 (never purge) or a number of milliseconds >= 0, got -2"),
    ({"jemalloc": {"thp": "sometimes"}}, "allocator.jemalloc",
     "option 'thp': 'sometimes' is not one of 'default', 'always', 'never'"),
    ({"mimalloc": {"purge_dely": 10}}, "allocator.mimalloc",
     "unknown mimalloc option 'purge_dely'; accepted options: purge_delay, eager_commit"),
    ({"mimalloc": {"purge_delay": -5}}, "allocator.mimalloc",
     "option 'purge_delay': must be -1 (never purge) or a number of milliseconds >= 0, got -5"),
    ({"system": {"arena_max": 0}}, "allocator.system", "option 'arena_max': must be from 1 to 1048576, got 0"),
    ({"system": {"dirty_decay_ms": 1}}, "allocator.system",
     "unknown system option 'dirty_decay_ms'; accepted options: arena_max, trim_threshold, mmap_threshold, top_pad"),
    ({"jemalloc": 5}, "allocator.jemalloc", "expected a table, got the integer 5"),
    ({"purge_interval_s": -1}, "allocator.purge_interval_s",
     "must be 0 (off) or from 0.01 to 86400 seconds, got -1"),
    ({"purge_interval_s": 0.001}, "allocator.purge_interval_s", "got 0.001"),
    ({"purge_interval_s": True}, "allocator.purge_interval_s", "expected a number, got the boolean True"),
])
def test_bad_allocator_values_name_key_value_and_accepted(isolated, table, key, message):
    lines = "".join(f"{k} = {json.dumps(v) if not isinstance(v, dict) else _inline(v)}\n" for k, v in table.items())
    path = isolated / "knhk.toml"
    path.write_text("[allocator]\n" + lines)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert message in str(info.value)
    assert str(info.value).startswith(f"{path}: {key}: ")


def _inline(d: dict) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + " }"


# ---------------------------------------------------------------- the launcher's environment

def test_launch_environment_jemalloc_with_options_keeps_what_was_there(isolated):
    cfg = load_config(write_config(isolated / "k.toml", "jemalloc",
                                   extra="jemalloc = { dirty_decay_ms = 1000, background_thread = true }\n"))
    base = {"LD_PRELOAD": "/x/libother.so", "MALLOC_CONF": "narenas:2", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
            "PATH": "/bin"}
    plan = process.launch_environment(cfg, base, config_path=str(isolated / "k.toml"))
    lib = process.find_library("jemalloc")
    assert plan.backend == "jemalloc" and plan.library == lib
    env = plan.env
    assert env["LD_PRELOAD"] == f"{lib}:/x/libother.so"
    assert env["PYTHONMALLOC"] == "malloc"
    assert env["MALLOC_CONF"] == "narenas:2,dirty_decay_ms:1000,background_thread:true"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.rtld.optional_static_tls=16384"
    assert env["KNHK_MEMORY_CONFIG"] == str(isolated / "k.toml")
    assert env["PATH"] == "/bin"
    marker = process.launch_marker(env)
    assert marker["backend"] == "jemalloc" and marker["inherit"] is False
    assert marker["saved"] == {"LD_PRELOAD": "/x/libother.so", "MALLOC_CONF": "narenas:2",
                               "GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PYTHONMALLOC": None,
                               "KNHK_MEMORY_CONFIG": None}
    # Stripping puts back exactly what was there.
    assert process.strip_launcher_environment(env) is True
    assert env == base


def test_launch_environment_mimalloc_and_system_options(isolated):
    cfg = load_config(write_config(isolated / "m.toml", "mimalloc",
                                   extra="mimalloc = { purge_delay = 0, show_errors = true }\n"))
    env = process.launch_environment(cfg, {}).env
    assert env["MIMALLOC_PURGE_DELAY"] == "0" and env["MIMALLOC_RESET_DELAY"] == "0"
    assert env["MIMALLOC_SHOW_ERRORS"] == "1"
    assert "GLIBC_TUNABLES" not in env and "MALLOC_CONF" not in env
    cfg = load_config(write_config(isolated / "s.toml", "system", extra="system = { arena_max = 2 }\n"))
    plan = process.launch_environment(cfg, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=8"})
    assert plan.library is None and "LD_PRELOAD" not in plan.env
    assert plan.env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    assert plan.env["PYTHONMALLOC"] == "malloc"
    with pytest.raises(ValueError, match="unknown jemalloc option 'bogus'; accepted options: background_thread"):
        process.backend_options_env("jemalloc", {"bogus": 1}, {})


def test_a_malformed_marker_is_ignored_not_trusted():
    for raw in ("", "not json", "[1]", '{"backend": 1, "saved": {}}', '{"backend": "x", "saved": {"A": 1}}',
                '{"backend": "x", "saved": {"PATH": null}}', '{"backend": "x", "saved": {"LD_PRELOAD": 5}}'):
        env = {process.MARKER: raw, "LD_PRELOAD": "/x.so"}
        assert process.launch_marker(env) is None
        assert process.strip_launcher_environment(env) is False
        assert env["LD_PRELOAD"] == "/x.so"


def test_find_library_missing_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(process, "_search_dirs", lambda: ["/nonexistent"])
    monkeypatch.setattr(process, "_ldconfig_lookup", lambda soname: None)
    with pytest.raises(BackendUnavailableError) as info:
        process.find_library("mimalloc")
    assert str(info.value) == ("mimalloc backend: libmimalloc.so.2 is not installed (not in /nonexistent nor in "
                               "ldconfig's cache). Install the Debian package libmimalloc2.0: "
                               "apt-get install libmimalloc2.0")
    # auto falls to system when neither library is there
    assert process.resolve_launch_backend("auto") == ("system", None)
    monkeypatch.setenv("KNHK_MEMORY_JEMALLOC_LIBRARY", "/nope/libjemalloc.so.2")
    with pytest.raises(BackendUnavailableError, match=r"KNHK_MEMORY_JEMALLOC_LIBRARY='/nope/libjemalloc.so.2' is a "
                       r"file that does not exist.*Debian package libjemalloc2"):
        process.find_library("jemalloc")
    with pytest.raises(ValueError, match="only jemalloc and mimalloc have a library to preload, got 'system'"):
        process.find_library("system")


# ---------------------------------------------------------------- the launcher itself

CHILD = textwrap.dedent("""
    import json, os, subprocess, sys
    from knhk_memory import get_plugin_manager, load_config, launcher as process
    before = {v: os.environ.get(v) for v in ("LD_PRELOAD", "PYTHONMALLOC", process.MARKER)}
    pm = get_plugin_manager()
    config = load_config()
    pm.hook.knhk_configure(config=config)
    stats = {}
    for part in pm.hook.knhk_memory_stats(config=config):
        stats.update(part)
    grandchild = subprocess.run(["sh", "-c", 'echo "${LD_PRELOAD}|${PYTHONMALLOC}"'], capture_output=True,
                                text=True).stdout.strip()
    pm.hook.knhk_unconfigure(config=config)
    print(json.dumps({"before": before, "process": stats["allocator"]["process"], "grandchild": grandchild,
                      "scope": stats["allocator"]["scope"]}))
""")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inherit", [False, True])
def test_run_makes_the_backend_the_process_allocator_and_children_do_not_inherit(isolated, backend, inherit):
    cfg = write_config(isolated / "k.toml", backend, extra="jemalloc = { dirty_decay_ms = 500 }\n")
    r = launch(["--config", str(cfg), *(["--inherit"] if inherit else []), "--", sys.executable, "-c", CHILD])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    proc = out["process"]
    assert out["scope"] == "process"
    assert proc["malloc_backend"] == backend
    assert proc["python_allocator"] == "malloc"
    assert proc["launched"] is True
    assert out["before"]["PYTHONMALLOC"] == "malloc"
    if backend == "system":
        assert out["before"]["LD_PRELOAD"] is None
        assert proc["malloc_stats"]["allocated"] > 0  # mallinfo2
    else:
        assert out["before"]["LD_PRELOAD"] == process.find_library(backend)
        assert proc["malloc_library"] == process.find_library(backend)
        assert proc["malloc_stats"]["resident"] > 0
    if backend == "jemalloc":
        assert proc["malloc_stats"]["allocated"] > 0 and proc["malloc_stats"]["mapped"] > 0
    preload = process.find_library(backend) if backend != "system" else ""
    assert out["grandchild"] == (f"{preload}|malloc" if inherit else "|")


FORK_POOL = textwrap.dedent("""
    import json, multiprocessing, os, subprocess, sys
    from knhk_memory import get_plugin_manager, load_config, launcher as process

    def work(n):
        # Python objects of mixed sizes made and dropped in the forked worker.
        data = [{"k": str(i) * (i % 50), "v": list(range(i % 30))} for i in range(2000 + n)]
        total = sum(len(d["k"]) + len(d["v"]) for d in data)
        return n, total, process.malloc_backend_name(), process.python_allocator(), os.getpid()

    if __name__ == "__main__":
        pm = get_plugin_manager()
        config = load_config()
        pm.hook.knhk_configure(config=config)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.map(work, range(8))
        sub = subprocess.run([sys.executable, "-c", "from knhk_memory import launcher as process; "
                              "print(process.malloc_backend_name(), process.python_allocator())"],
                             capture_output=True, text=True)
        with process.launched_environment():
            sub_launched = subprocess.run([sys.executable, "-c", "from knhk_memory import launcher as process; "
                                           "print(process.malloc_backend_name(), process.python_allocator())"],
                                          capture_output=True, text=True)
        pm.hook.knhk_unconfigure(config=config)
        print(json.dumps({"results": results, "sub": sub.stdout.split(), "sub_launched": sub_launched.stdout.split(),
                          "parent": os.getpid()}))
""")


@pytest.mark.parametrize("backend", BACKENDS)
def test_forking_pool_and_subprocesses_under_the_launcher(isolated, backend):
    cfg = write_config(isolated / "k.toml", backend)
    script = isolated / "pool.py"
    script.write_text(FORK_POOL)
    r = launch(["--config", str(cfg), "--", sys.executable, str(script)], cwd=isolated)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = [[n, sum(len(str(i) * (i % 50)) + i % 30 for i in range(2000 + n)), backend, "malloc"]
                for n in range(8)]
    assert [row[:4] for row in out["results"]] == expected
    assert all(row[4] != out["parent"] for row in out["results"])  # really other processes
    assert out["sub"] == ["system", "pymalloc"]  # the preload was not inherited
    assert out["sub_launched"] == [backend, "malloc"]  # ... unless the engine asks for it


def test_run_passes_the_exit_status_and_arguments_through(isolated):
    r = launch(["--", "sh", "-c", 'printf "%s," "$@"; exit 7', "sh", "a b", "--config", "-x"])
    assert r.returncode == 7
    assert r.stdout == "a b,--config,-x,"


def test_run_a_command_that_does_not_exist_exits_127(isolated):
    r = launch(["--", "knhk-no-such-command", "arg"])
    assert r.returncode == 127
    assert r.stderr.strip() == "knhk-memory run: knhk-no-such-command: command not found"
    r = launch(["--", str(isolated / "missing" / "prog")])
    assert r.returncode == 127
    assert "command not found" in r.stderr


def test_run_a_command_that_is_not_executable_exits_126(isolated):
    prog = isolated / "prog"
    prog.write_text("#!/bin/sh\necho hi\n")
    prog.chmod(0o644)
    r = launch(["--", str(prog)])
    assert r.returncode == 126
    assert r.stderr.strip() == f"knhk-memory run: {prog}: Permission denied"


def test_run_without_a_command_is_a_usage_error(isolated):
    r = launch([])
    assert r.returncode == 2
    assert "no command given; usage: knhk-memory run [--config F] [--inherit] -- CMD ARGS..." in r.stderr


@pytest.mark.parametrize("backend, package", [("jemalloc", "libjemalloc2"), ("mimalloc", "libmimalloc2.0")])
def test_run_with_the_backend_library_missing_exits_2_naming_the_debian_package(isolated, backend, package):
    cfg = write_config(isolated / "k.toml", backend)
    r = launch(["--config", str(cfg), "--", "true"],
               env={f"KNHK_MEMORY_{backend.upper()}_LIBRARY": "/nonexistent/lib.so"})
    assert r.returncode == 2
    assert r.stderr.startswith(f"knhk-memory: error: {cfg}: allocator.backend: cannot start 'true': {backend} backend: "
                               f"KNHK_MEMORY_{backend.upper()}_LIBRARY='/nonexistent/lib.so' is a file that does "
                               "not exist")
    assert f"(Debian package {package}), or unset" in r.stderr


def test_run_with_a_bad_config_exits_2(isolated):
    cfg = isolated / "k.toml"
    cfg.write_text('[allocator]\njemalloc = { dirty_decay = 1 }\n')
    r = launch(["--config", str(cfg), "--", "true"])
    assert r.returncode == 2
    assert "allocator.jemalloc: unknown jemalloc option 'dirty_decay'" in r.stderr


def test_dry_run_prints_the_variables(isolated, capsys):
    from knhk_memory.cli import main

    cfg = write_config(isolated / "k.toml", "mimalloc", extra="mimalloc = { purge_delay = 0 }\n")
    assert main(["run", "--config", str(cfg), "--dry-run", "--", "python3", "-V"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"LD_PRELOAD={process.find_library('mimalloc')}" in out
    assert "PYTHONMALLOC=malloc" in out and "MIMALLOC_PURGE_DELAY=0" in out
    assert out[-1] == "python3 -V"


# ---------------------------------------------------------------- the configure-time check

def test_scope_process_in_a_process_not_started_by_the_launcher_is_refused(isolated):
    cfg = load_config(write_config(isolated / "k.toml", "mimalloc"))
    pm = get_plugin_manager()
    with pytest.raises(ConfigError) as info:
        pm.hook.knhk_configure(config=cfg)
    msg = str(info.value)
    assert info.value.key == "allocator.scope"
    assert msg.startswith(f"{isolated / 'k.toml'}: allocator.scope: scope = \"process\" needs the engine process "
                          "started by the launcher: malloc comes from ")
    assert f"not from the mimalloc backend's {process.find_library('mimalloc')}" in msg
    assert "CPython allocates its objects with pymalloc, not malloc (PYTHONMALLOC=malloc was not set" in msg
    assert f"Start it with: knhk-memory run --config {isolated / 'k.toml'} -- CMD ARGS..." in msg
    # nothing applied: the plugin holds no services
    with pytest.raises(RuntimeError, match="not configured"):
        pm.hook.knhk_allocator(config=cfg)


def test_scope_process_mismatches_are_named(isolated, run_python):
    # Started by the launcher with jemalloc, configured for mimalloc.
    cfg = write_config(isolated / "k.toml", "jemalloc")
    other = write_config(isolated / "other.toml", "mimalloc")
    code = ("from knhk_memory import get_plugin_manager, load_config\n"
            f"get_plugin_manager().hook.knhk_configure(config=load_config({str(other)!r}))")
    r = launch(["--config", str(cfg), "--", sys.executable, "-c", code])
    assert r.returncode == 1
    assert ("allocator.scope: scope = \"process\" needs the engine process started by the launcher: malloc comes "
            f"from {process.find_library('jemalloc')}, not from the mimalloc backend's") in r.stderr
    assert "The process was started by knhk-memory run with backend jemalloc; the config names mimalloc." in r.stderr
    # The preload without PYTHONMALLOC=malloc: only the Python half is wrong.
    r = run_python(code, env={"LD_PRELOAD": process.find_library("mimalloc")})
    assert r.returncode == 1
    assert "malloc comes from" not in r.stderr
    assert "CPython allocates its objects with pymalloc, not malloc" in r.stderr


def test_scope_process_by_hand_is_accepted_and_system_needs_libc(isolated, run_python):
    cfg = write_config(isolated / "k.toml", "system")
    code = ("from knhk_memory import get_plugin_manager, load_config\n"
            f"c = load_config({str(cfg)!r}); pm = get_plugin_manager(); pm.hook.knhk_configure(config=c); print('ok')")
    assert run_python(code, env={"PYTHONMALLOC": "malloc"}).stdout.strip() == "ok"
    r = run_python(code, env={"PYTHONMALLOC": "malloc", "LD_PRELOAD": process.find_library("jemalloc")})
    assert r.returncode == 1
    assert f"malloc comes from {process.find_library('jemalloc')}, not from the system backend's libc" in r.stderr
    r = run_python(code, env={"PYTHONMALLOC": "malloc_debug"})
    assert r.stdout.strip() == "ok"


def test_python_allocator_reads_the_interpreter(run_python):
    import tracemalloc

    if os.environ.get("PYTHONMALLOC") not in (None, "", "pymalloc"):
        pytest.fail(f"the test run itself must use pymalloc, it has PYTHONMALLOC={os.environ['PYTHONMALLOC']}")
    assert process.python_allocator() == "pymalloc"
    tracemalloc.start()
    try:
        assert process.python_allocator() == "unknown"  # tracemalloc's hooks hide what is below
    finally:
        tracemalloc.stop()
    assert process.python_allocator() == "pymalloc"
    # Each setting needs a fresh interpreter: PYTHONMALLOC is read at start-up.
    code = "from knhk_memory import launcher as process; print(process.python_allocator())"
    for setting in ("malloc", "pymalloc_debug", "malloc_debug"):
        assert run_python(code, env={"PYTHONMALLOC": setting}).stdout.strip() == setting


# ---------------------------------------------------------------- figures, release_unused, periodic purge

def test_memory_stats_report_the_process(isolated):
    cfg = load_config(mapping={"allocator": {"backend": "system"}})
    pm = get_plugin_manager()
    pm.hook.knhk_configure(config=cfg)
    try:
        stats = {}
        for part in pm.hook.knhk_memory_stats(config=cfg):
            stats.update(part)
        proc = stats["allocator"]["process"]
        assert stats["allocator"]["scope"] == "arrays"
        assert proc["malloc_backend"] == "system" and proc["python_allocator"] == "pymalloc"
        assert proc["rss_bytes"] > 0 and proc["peak_rss_bytes"] >= proc["rss_bytes"]
        assert proc["malloc_stats"]["allocated"] > 0
        assert proc["launched"] is False
        assert stats["allocator"]["purge"] == {"interval_s": 0.0, "running": False, "purges": 0, "seconds": 0.0,
                                               "last_error": None}
        json.dumps(stats)
    finally:
        pm.hook.knhk_unconfigure(config=cfg)


@pytest.mark.parametrize("backend", ["system", "mimalloc"])
def test_release_unused_hook(isolated, backend):
    cfg = load_config(mapping={"allocator": {"backend": backend}})
    pm = get_plugin_manager()
    pm.hook.knhk_configure(config=cfg)
    try:
        [done] = pm.hook.knhk_release_unused(config=cfg)
        assert done["backend"] == backend
        assert done["rss_before_bytes"] > 0 and done["rss_after_bytes"] > 0 and done["seconds"] >= 0
    finally:
        pm.hook.knhk_unconfigure(config=cfg)


def test_periodic_purge_runs_and_stops_at_unconfigure(isolated):
    cfg = load_config(mapping={"allocator": {"backend": "system", "purge_interval_s": 0.01}})
    pm = get_plugin_manager()
    pm.hook.knhk_configure(config=cfg)
    try:
        deadline = time.monotonic() + 10
        while True:
            stats = {}
            for part in pm.hook.knhk_memory_stats(config=cfg):
                stats.update(part)
            if stats["allocator"]["purge"]["purges"] >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        purge = stats["allocator"]["purge"]
        assert purge["running"] is True and purge["purges"] >= 3 and purge["last_error"] is None
        assert [t.name for t in threading.enumerate()].count("knhk-memory-purge") == 1
    finally:
        pm.hook.knhk_unconfigure(config=cfg)
    assert "knhk-memory-purge" not in [t.name for t in threading.enumerate()]


def test_malloc_owner_c_call_checks_its_buffer_and_truncates():
    from knhk_memory._core import ffi, lib

    assert lib.knhk_process_malloc_owner(ffi.NULL, 16) == lib.KNHK_ERR_INVALID
    buf = ffi.new("char[4]")
    assert lib.knhk_process_malloc_owner(buf, 0) == lib.KNHK_ERR_INVALID
    assert lib.knhk_process_malloc_owner(buf, 4) == lib.KNHK_OK
    assert ffi.string(buf) == process.malloc_owner().encode()[:3]


# ---------------------------------------------------------------- knhk-memory info --memory PID

def test_info_memory_of_a_launched_process(isolated, capsys):
    from knhk_memory.cli import main

    cfg = write_config(isolated / "k.toml", "jemalloc")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", process.MARKER)}
    child = subprocess.Popen([sys.executable, "-m", "knhk_memory", "run", "--config", str(cfg), "--", sys.executable,
                              "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert main(["info", "--memory", str(child.pid), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["pid"] == child.pid  # the launcher exec'd: same pid
        [mapped] = info["allocator_libraries"]
        assert os.path.samefile(mapped, process.find_library("jemalloc"))
        assert info["launched_backend"] == "jemalloc" and info["initial_pythonmalloc"] == "malloc"
        assert info["rss_bytes"] > 0 and info["peak_rss_bytes"] >= info["rss_bytes"]
        assert main(["info", "--memory", str(child.pid)]) == 0
        text = capsys.readouterr().out
        assert "started by knhk-memory run with jemalloc; PYTHONMALLOC at start: malloc" in text
    finally:
        child.stdin.close()
        assert child.wait(timeout=30) == 0


def test_info_memory_bad_pids(capsys):
    from knhk_memory.cli import main

    assert main(["info", "--memory", "0"]) == 2
    assert capsys.readouterr().err.strip() == "knhk-memory info: error: --memory: pid must be a positive integer, got 0"
    assert main(["info", "--memory", "999999999"]) == 2
    assert capsys.readouterr().err.strip() == ("knhk-memory: error: no process with pid 999999999 "
                                               "(nothing in /proc/999999999)")
    with pytest.raises(SystemExit) as info:
        main(["info", "--memory", "x"])
    assert info.value.code == 2
    assert "argument --memory: invalid int value: 'x'" in capsys.readouterr().err
    from knhk_memory.errors import ProcessInspectError
    with pytest.raises(ValueError, match="pid must be a positive integer, got True"):
        process.inspect_process(True)
    assert issubclass(ProcessInspectError, LookupError)


def test_auto_in_a_launched_process_is_the_preloaded_backend(isolated, run_python):
    cfg = isolated / "k.toml"
    cfg.write_text('[allocator]\nbackend = "auto"\nscope = "process"\n')
    code = ("from knhk_memory import get_plugin_manager, load_config\n"
            "c = load_config(); pm = get_plugin_manager(); pm.hook.knhk_configure(config=c)\n"
            "print(pm.hook.knhk_allocator(config=c).name)")
    r = run_python(code, env={"LD_PRELOAD": process.find_library("jemalloc"), "PYTHONMALLOC": "malloc",
                              "KNHK_MEMORY_CONFIG": str(cfg)})
    assert r.stdout.strip() == "jemalloc", r.stderr
    r = launch(["--config", str(cfg), "--", sys.executable, "-c", code])
    assert r.stdout.strip() == process.resolve_launch_backend("auto")[0] == "mimalloc", r.stderr


def test_the_demo_with_spawn_workers_under_the_launcher(isolated):
    # The workers configure scope = "process" too: they pass the check only
    # because the demo starts them inside launched_environment().
    cfg = write_config(isolated / "k.toml", "jemalloc")
    r = launch(["--config", str(cfg), "--", sys.executable, "-m", "knhk_memory", "demo", "--cases", "300",
                "--workers", "2", "--json"], env={"KNHK_MEMORY_CACHE": str(isolated / "cache")}, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["ok"] is True and out["workers"] == 2 and out["cases"] == 300


def test_a_failing_purge_is_reported_and_retried():
    from knhk_memory.errors import NativeError
    from knhk_memory.plugins.memory import Purger

    class Flaky:
        name = "flaky"
        calls = 0

        def release_unused(self):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise NativeError("flaky: release_unused: no")

    purger = Purger(Flaky(), 0.01)
    purger.start()
    deadline = time.monotonic() + 10
    while purger.stats()["purges"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    purger.stop()
    stats = purger.stats()
    assert stats["last_error"] == "flaky: release_unused: no"
    assert stats["purges"] >= 2 and stats["running"] is False
