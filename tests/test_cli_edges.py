"""Issue 15, the command line and config: every bad input a new user types is
`knhk-memory: error: ...` and exit 2, a closed pipe is a quiet exit, a short
write is exit 1 with a message; never a traceback."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from knhk_memory import ConfigError, WorkflowStore, WorkflowStoreWriter, load_config
from knhk_memory.cli import main
from knhk_memory.errors import BackendUnavailableError, StoreError

EXE = [sys.executable, "-m", "knhk_memory"]


# Every test in a fresh working directory and cache (the `isolated` fixture, tests/conftest.py).
pytestmark = pytest.mark.usefixtures("isolated")


def run(*args: str, cwd: Path, stdin=None, stdout=subprocess.PIPE, env: dict | None = None, timeout: float = 60):
    full = dict(os.environ, **(env or {}))
    return subprocess.run([*EXE, *args], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, stdin=stdin,
                          env=full, timeout=timeout)


def source(tmp: Path, n: int = 3) -> Path:
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    for i in range(n):
        (src / f"a{i}.json").write_text(f'{{"id": "wf-{i}"}}')
    return src


def err_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------- issue 15 #8: store build arguments

@pytest.mark.parametrize("args, message", [
    (["--zstd", "0"], "argument --zstd: must be a zstd level from 1 to 22, got 0"),
    (["--zstd", "99"], "argument --zstd: must be a zstd level from 1 to 22, got 99"),
    (["--zstd", "x"], "argument --zstd: must be an integer zstd level from 1 to 22, got 'x'"),
    (["--key-regex", "("], "argument --key-regex: '(' is not a valid regular expression: missing ), "),
    (["--key-regex", "id"], "argument --key-regex: 'id' has no group"),
])
def test_build_bad_arguments_are_usage_errors(isolated, capsys, args, message):
    src = source(isolated)
    with pytest.raises(SystemExit) as info:
        main(["store", "build", str(src), "-o", str(isolated / "o.kst"), *args])
    assert info.value.code == 2
    err = err_of(capsys)
    assert "knhk-memory store build: error: " in err and message in err


def test_build_non_utf8_file_name(isolated):
    src = source(isolated)
    with open(os.fsencode(src) + b"/bad\xff.json", "wb") as f:
        f.write(b"{}")
    r = run("store", "build", "src", "-o", "o.kst", cwd=isolated)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.startswith("knhk-memory: error: ") and "Traceback" not in err
    assert "bad\\xff.json: the file name is not UTF-8 text (b'bad\\xff.json')" in err
    assert "--key-regex / --key-field" in err
    assert not (isolated / "o.kst").exists()


def test_build_duplicate_keys_name_both_files_in_cli_words(isolated, capsys):
    src = source(isolated)
    (src / "a0.yaml").write_text("id: x")
    assert main(["store", "build", str(src), "-o", "o.kst"]) == 2
    err = err_of(capsys)
    assert f"key 'a0' comes from two files: {src / 'a0.json'} and {src / 'a0.yaml'}" in err
    assert "pass --last-wins" in err
    assert main(["store", "build", str(src), "-o", "o.kst", "--last-wins"]) == 0
    assert bytes(WorkflowStore("o.kst")["a0"]) == b"id: x"


# ---------------------------------------------------------------- #12 empty source, #4 output among the inputs

def test_empty_source_is_an_error_unless_allowed(isolated, capsys):
    (isolated / "empty").mkdir()
    (isolated / "empty" / ".hidden").write_text("x")
    assert main(["store", "build", "empty", "-o", "o.kst"]) == 2
    assert "empty: source directory holds no definition files" in err_of(capsys)
    assert not (isolated / "o.kst").exists()
    assert main(["store", "build", "empty", "-o", "o.kst", "--allow-empty"]) == 0
    assert len(WorkflowStore("o.kst")) == 0


def test_build_never_replaces_one_of_its_inputs(isolated, capsys):
    src = source(isolated)
    before = (src / "a1.json").read_bytes()
    assert main(["store", "build", "src", "-o", "src/a1.json"]) == 2
    assert "src/a1.json: the output is a file under SOURCE (src)" in err_of(capsys)
    assert (src / "a1.json").read_bytes() == before


def test_output_inside_source_is_not_packed_into_the_next_build(isolated, capsys):
    source(isolated)
    for _ in range(3):
        assert main(["store", "build", "src", "-o", "src/flows.kst"]) == 0
        capsys.readouterr()
        with WorkflowStore("src/flows.kst") as s:
            assert sorted(s.keys()) == [b"a0", b"a1", b"a2"]


# ---------------------------------------------------------------- #9 pipes

def test_closed_pipe_is_a_quiet_exit_for_every_command(isolated):
    """Every subcommand that prints, its stdout closed at once (`| head -0`)."""
    src = source(isolated, 4000)  # enough output to fill a pipe
    assert run("store", "build", "src", "-o", "o.kst", cwd=isolated).returncode == 0
    cases = [["store", "list", "o.kst"], ["store", "list", "-l", "o.kst"], ["store", "stats", "o.kst"],
             ["store", "stats", "--json", "o.kst"], ["store", "verify", "o.kst"], ["store", "get", "o.kst", "a1"],
             ["info"], ["info", "--json"], ["store", "build", "src", "-o", "o2.kst"],
             ["budget", "--only", "store_probe", "--batches", "3"],
             ["budget", "--only", "store_probe", "--batches", "3", "--json"],
             ["run", "--dry-run", "--", "true"], ["info", "--memory", str(os.getpid())],
             ["demo", "--cases", "200", "--no-budgets", "--no-progress"]]
    for args in cases:
        r_fd, w_fd = os.pipe()
        os.close(r_fd)  # the reader is gone before the first write
        try:
            r = run(*args, cwd=isolated, stdout=w_fd)
        finally:
            os.close(w_fd)
        assert r.returncode == 141, (args, r.stderr)
        assert r.stderr == b"", (args, r.stderr)
    del src


def test_get_into_a_nonblocking_pipe_writes_everything(isolated):
    big = os.urandom(8 << 20)
    with WorkflowStoreWriter(isolated / "big.kst") as w:
        w.add("big", big)
    sink = isolated / "sink"
    reader = subprocess.Popen(["sh", "-c", f"sleep 0.3; cat > '{sink}'"], stdin=subprocess.PIPE)
    fd = reader.stdin.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    r = run("store", "get", "big.kst", "big", cwd=isolated, stdout=fd)
    reader.stdin.close()
    reader.wait()
    out = sink.read_bytes()
    assert r.returncode == 0, r.stderr
    assert len(out) == len(big) and out == big


def test_short_write_is_exit_1_with_a_message(isolated):
    with WorkflowStoreWriter(isolated / "v.kst") as w:
        w.add("k", b"x" * 100_000)
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with open("/dev/full", "wb") as full:
        r = run("store", "get", "v.kst", "k", cwd=isolated, stdout=full)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "Traceback" not in err
    assert err.startswith("knhk-memory: error: writing standard output: No space left on device; 0 of 100000 bytes "
                          "written, the output is incomplete")


# ---------------------------------------------------------------- #10 config files that are not files

def test_knhk_toml_that_is_not_a_file_is_an_error(isolated, capsys):
    (isolated / "knhk.toml").mkdir()
    assert main(["info"]) == 2
    assert f"{isolated / 'knhk.toml'}: is a directory, not a TOML file" in err_of(capsys)
    (isolated / "knhk.toml").rmdir()
    (isolated / "knhk.toml").symlink_to(isolated / "gone.toml")
    assert main(["info"]) == 2
    assert "knhk.toml: config file is a symlink to a missing file" in err_of(capsys)
    (isolated / "knhk.toml").unlink()
    (isolated / "knhk.toml").symlink_to("loop2")
    (isolated / "loop2").symlink_to("knhk.toml")
    assert main(["info"]) == 2
    assert "knhk.toml: config file cannot be read: too many levels of symbolic links (a symlink loop)" in err_of(capsys)
    assert main(["info", "--config", "loop2"]) == 2
    assert "loop2: config file cannot be read: too many levels of symbolic links" in err_of(capsys)


def test_broken_pyproject_mentioning_us_is_an_error(isolated, capsys):
    (isolated / "pyproject.toml").write_text('[project]\nname = "x"\nbroken = \n[tool.knhk-memory.allocator]\n'
                                             'backend = "system"\n')
    assert main(["info"]) == 2
    err = err_of(capsys)
    assert "pyproject.toml: not valid TOML: " in err and "the file has a [tool.knhk-memory] table" in err
    # someone else's broken pyproject: not ours, the defaults
    (isolated / "pyproject.toml").write_text('[project]\nbroken = \n')
    assert load_config().origin == "defaults"


def test_too_long_config_name(isolated, capsys):
    assert main(["info", "--config", "x" * 5000]) == 2
    assert "config file cannot be read: the file name is too long (5000 bytes)" in err_of(capsys)


def test_fifo_config_and_store_are_refused_before_open(isolated, capsys):
    fifo = isolated / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"fifo: is a FIFO \(named pipe\), not a regular file"):
        load_config(fifo)
    assert main(["info", "--config", str(fifo)]) == 2
    assert "is a FIFO (named pipe), not a regular file" in err_of(capsys)
    with pytest.raises(StoreError, match=r"fifo: is a FIFO \(named pipe\), not a store file") as info:
        WorkflowStore(fifo)
    assert info.value.problem == "not-a-file"
    assert main(["store", "verify", str(fifo)]) == 2
    assert "is a FIFO (named pipe), not a store file" in err_of(capsys)
    with pytest.raises(StoreError, match=r"null: is a character device, not a store file"):
        WorkflowStore("/dev/null") if False else WorkflowStore(_link(isolated / "null", "/dev/null"))


def _link(path: Path, target: str) -> Path:
    path.symlink_to(target)
    return path


# ---------------------------------------------------------------- #11 demo paths and sizes

def test_demo_store_path_is_never_created_without_build(isolated, capsys):
    assert main(["demo", "--no-budgets", "--no-progress", "--store", str(isolated / "typo" / "dir" / "f.kst")]) == 2
    err = err_of(capsys)
    assert f"no store at {isolated / 'typo' / 'dir' / 'f.kst'}; pass --build" in err
    assert not (isolated / "typo").exists()
    assert main(["demo", "--no-budgets", "--no-progress", "--build", "--store",
                 str(isolated / "typo" / "dir" / "f.kst")]) == 2
    assert f"the directory {isolated / 'typo' / 'dir'} does not exist; the demo does not create" in err_of(capsys)
    assert not (isolated / "typo").exists()


def test_demo_cases_too_big(isolated, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--cases", str(10**12)])
    assert info.value.code == 2
    assert "--cases must be at most 100,000,000, got 1,000,000,000,000" in err_of(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
def test_demo_unreadable_cache_dir(isolated, capsys):  # pragma: no cover - CI runs as a user
    cache = isolated / "cache"
    cache.mkdir()
    cache.chmod(0)
    try:
        assert main(["demo", "--no-budgets", "--no-progress", "--cases", "10"]) == 2
        assert "cannot be searched (permission denied)" in err_of(capsys)
    finally:
        cache.chmod(0o755)


def test_demo_unsearchable_cache_dir_whoever_runs_it(isolated, capsys, monkeypatch):
    """As root the permission bits do not bite: make access() say what it says to a user."""
    import knhk_memory.refhost.demo as demo_mod

    (isolated / "cache").mkdir()
    monkeypatch.setattr(demo_mod.os, "access", lambda path, mode: False)
    assert main(["demo", "--no-budgets", "--no-progress", "--cases", "10"]) == 2
    want = f"the directory {isolated / 'cache'} cannot be searched (permission denied); pass --store PATH or set "
    assert want + "KNHK_MEMORY_CACHE" in err_of(capsys)


def test_demo_unwritable_cache_dir_as_root_too(isolated, capsys, monkeypatch):
    """Whoever runs it: an OSError from the cache directory is a message, not a traceback."""
    monkeypatch.setenv("KNHK_MEMORY_CACHE", "/proc/self/knhk-cache")  # mkdir fails even for root
    assert main(["demo", "--no-budgets", "--no-progress", "--cases", "10", "--no-event-log"]) == 2
    assert "cannot create the directory /proc/self/knhk-cache for the demo store" in err_of(capsys)
    assert main(["demo", "--no-budgets", "--no-progress", "--cases", "10"]) == 2  # the event log's default too
    assert "cannot create the directory /proc/self/knhk-cache for the demo's event log" in err_of(capsys)


# ---------------------------------------------------------------- #16 library overrides

@pytest.mark.parametrize("value, problem", [("libmimalloc.so.2", "a relative path"), ("/tmp", "not a regular file")])
def test_library_override_must_be_an_absolute_regular_file(run_python, value, problem):
    r = run_python("from knhk_memory.allocator import get_backend\n"
                   "try:\n    get_backend('mimalloc')\nexcept Exception as e:\n    print(type(e).__name__, e)\n",
                   env={"KNHK_MEMORY_MIMALLOC_LIBRARY": value})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"BackendUnavailableError mimalloc backend: KNHK_MEMORY_MIMALLOC_LIBRARY={value!r} "
                               f"is {problem}")
    assert "it must be the absolute path of the mimalloc shared object" in r.stdout
    assert BackendUnavailableError  # the class tested by name above


def test_info_shows_which_library_file_was_loaded(isolated):
    from knhk_memory.allocator import get_backend

    path = get_backend("mimalloc").path
    r = run("info", "--json", cwd=isolated, env={"KNHK_MEMORY_MIMALLOC_LIBRARY": os.path.realpath(path)})
    assert r.returncode == 0, r.stderr
    import json

    b = json.loads(r.stdout)["backends"]["mimalloc"]
    assert b["loaded_from"] == "$KNHK_MEMORY_MIMALLOC_LIBRARY" and os.path.realpath(b["path"]) == os.path.realpath(path)
    r = run("info", cwd=isolated, env={"KNHK_MEMORY_MIMALLOC_LIBRARY": os.path.realpath(path)})
    assert "(from $KNHK_MEMORY_MIMALLOC_LIBRARY)" in r.stdout.decode()


def test_every_subcommand_with_bad_arguments_is_exit_2_without_traceback(isolated):
    """One pass over every subcommand with arguments a user gets wrong."""
    (isolated / "junk.kst").write_bytes(b"junk" * 100)
    cases = [["store"], ["store", "build"], ["store", "build", "nowhere", "-o", "o.kst"],
             ["store", "get", "missing.kst", "k"], ["store", "get", "junk.kst", "k"], ["store", "list", "junk.kst"],
             ["store", "verify", "."], ["store", "stats", "missing.kst"], ["info", "--config", "missing.toml"],
             ["budget", "--batches", "1"], ["budget", "--only", "no_such_op", "--batches", "3"],
             ["demo", "--cases", "0"], ["demo", "--workers", "x"], ["demo", "--store", "junk.kst", "--no-budgets"],
             ["run"], ["run", "--"], ["info", "--memory", "x"], ["info", "--memory", "999999999"],
             ["nonsense"], []]
    for args in cases:
        r = run(*args, cwd=isolated)
        err = r.stderr.decode()
        assert r.returncode == 2, (args, err)
        assert "Traceback" not in err and "error: " in err, (args, err)


def test_store_files_honour_the_umask_and_keep_a_replaced_mode(isolated):
    old = os.umask(0o022)
    try:
        with WorkflowStoreWriter(isolated / "a.kst") as w:
            w.add("k", b"v")
        assert stat.S_IMODE((isolated / "a.kst").stat().st_mode) == 0o644
        os.umask(0o077)
        with WorkflowStoreWriter(isolated / "b.kst") as w:
            w.add("k", b"v")
        assert stat.S_IMODE((isolated / "b.kst").stat().st_mode) == 0o600
        (isolated / "a.kst").chmod(0o640)
        with WorkflowStoreWriter(isolated / "a.kst") as w:  # a rebuild keeps the mode it replaces
            w.add("k", b"v2")
        assert stat.S_IMODE((isolated / "a.kst").stat().st_mode) == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("setup, problem", [
    ("world_writable_dir", "in the world-writable directory"),
    ("group_writable_file", "writable by its group (mode 664)"),
    ("other_writable_file", "writable by group and others (mode 666)"),
    ("foreign_owner", "owned by uid 4242, neither root nor this user"),
])
def test_library_override_refuses_untrusted_files_before_loading_them(tmp_path, run_python, setup, problem):
    """Issue 22, item 6: a library is code; it is checked before anything loads it (its
    constructor would run even if the load were refused afterwards)."""
    d = tmp_path / "libs"
    d.mkdir(mode=0o755)
    lib_file = d / "libmimalloc.so.2"
    # A library whose constructor would leave a mark, to show nothing loaded it.
    mark = tmp_path / "constructor-ran"
    src = tmp_path / "evil.c"
    src.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void ran(void) {{ '
                   f'FILE *f = fopen("{mark}", "w"); if (f) fclose(f); }}\n')
    import shutil
    import subprocess

    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build the probe library")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib_file), str(src)], check=True)
    lib_file.chmod(0o644)
    if setup == "world_writable_dir":
        d.chmod(0o777)
    elif setup == "group_writable_file":
        lib_file.chmod(0o664)
    elif setup == "other_writable_file":
        lib_file.chmod(0o666)
    elif setup == "foreign_owner":
        if os.getuid() != 0:
            pytest.skip("only root can give a file to another user")
        os.chown(lib_file, 4242, 4242)
    r = run_python("from knhk_memory.allocator import get_backend\n"
                   "try:\n    get_backend('mimalloc')\nexcept Exception as e:\n    print(type(e).__name__, e)\n",
                   env={"KNHK_MEMORY_MIMALLOC_LIBRARY": str(lib_file)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"BackendUnavailableError mimalloc backend: KNHK_MEMORY_MIMALLOC_LIBRARY="
                               f"{str(lib_file)!r} is "), r.stdout
    assert problem in r.stdout
    assert not mark.exists()  # refused before the loader ran its constructor
