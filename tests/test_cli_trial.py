"""CLI fixes from the new-user trial (notes/trial-findings.md items 2, 8 and 12): the store
subcommands' decompression cap, a subcommand's own usage for unknown options, and messages."""

from __future__ import annotations

import os

import pytest

from knhk_memory import WorkflowStoreWriter
from knhk_memory.cli import main

pytestmark = pytest.mark.usefixtures("isolated")

BIG = 3 * 1024 * 1024  # past a 1 MiB cap, small enough to stay fast


def err_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture
def huge(isolated):
    path = isolated / "huge.kst"
    with WorkflowStoreWriter(path, compress=3) as w:
        w.add("small", b"hello")
        w.add("big", os.urandom(1024) * (BIG // 1024))
    return path


# ---------------------------------------------------------------- item 2: the cap from the config or the option

def test_store_get_past_the_cap_names_the_option_and_the_config_key(huge, capsys):
    assert main(["store", "get", str(huge), "big", "--max-value-bytes", "1048576"]) == 2
    err = err_of(capsys)
    assert f"would decompress to {BIG:,} bytes, past the cap of 1,048,576" in err
    assert "--max-value-bytes N" in err and "[store] max_value_bytes" in err and "--config PATH" in err
    # where this run's cap came from, and the key as given (a second trial: b'big', and the config named)
    assert "the value of key 'big' would decompress" in err and "the cap here is --max-value-bytes 1048576" in err


@pytest.mark.parametrize("where", ["top", "sub", "env", "cwd"])
def test_store_get_honours_the_configs_cap(huge, isolated, capfdbinary, monkeypatch, where):
    small = isolated / "small.toml"
    small.write_text("[store]\nmax_value_bytes = 1048576\n")
    args = ["store", "get", str(huge), "big"]
    if where == "top":
        args = ["--config", str(small), *args]
    elif where == "sub":
        args = [*args, "--config", str(small)]
    elif where == "env":
        monkeypatch.setenv("KNHK_MEMORY_CONFIG", str(small))
    else:
        (isolated / "knhk.toml").write_text(small.read_text())
    assert main(args) == 2
    assert "past the cap of 1,048,576" in capfdbinary.readouterr().err.decode()
    # ... and the option overrides the config
    assert main([*args, "--max-value-bytes", str(BIG)]) == 0
    assert len(capfdbinary.readouterr().out) == BIG


@pytest.mark.parametrize("value, message", [
    ("0", "must be a number of bytes from 1 to 1,099,511,627,776, got 0"),
    ("x", "must be a number of bytes from 1 to 1,099,511,627,776, got 'x'"),
])
def test_bad_max_value_bytes_is_a_usage_error(huge, capsys, value, message):
    with pytest.raises(SystemExit) as info:
        main(["store", "get", str(huge), "big", "--max-value-bytes", value])
    assert info.value.code == 2
    err = err_of(capsys)
    assert f"knhk-memory store get: error: argument --max-value-bytes: {message}" in err


def test_store_list_long_lists_a_value_past_the_cap_without_decompressing(huge, capsys):
    assert main(["store", "list", "-l", str(huge), "--max-value-bytes", "1024"]) == 0
    assert capsys.readouterr().out.splitlines() == ["5\tsmall", f"{BIG}\tbig"]


def test_store_list_escapes_control_bytes_of_keys(isolated, capsys):
    path = isolated / "typed.kst"
    with WorkflowStoreWriter(path) as w:
        w.add("invoice-v1", {"a": 1}, codec="json", aliases=["invoice"])
        w.add("a\nb", b"x")
    assert main(["store", "list", "--all", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\0" not in out and "a\\x0ab" in out.splitlines()
    assert any(line.startswith("\\x00knhk/") for line in out.splitlines())


# ---------------------------------------------------------------- item 12: store get of an alias, build summary

def test_store_get_resolves_an_alias_and_names_the_nearest(isolated, capfdbinary):
    path = isolated / "typed.kst"
    with WorkflowStoreWriter(path) as w:
        w.add("invoice-v1", {"a": 1}, codec="json", aliases=["invoice"])
        w.add("x", 1, codec="json", aliases=["dup"])
        w.add("y", 2, codec="json", aliases=["dup"])
    assert main(["store", "get", str(path), "invoice"]) == 0
    assert capfdbinary.readouterr().out == b'{"a":1}'
    assert main(["store", "get", str(path), "invoic"]) == 1
    err = capfdbinary.readouterr().err.decode()
    assert "typed.kst: key 'invoic' not found (neither a key nor an alias; nearest: 'invoice'" in err
    assert main(["store", "get", str(path), "dup"]) == 2
    assert "'dup' is an alias of 2 records: 'x', 'y'" in capfdbinary.readouterr().err.decode()


def test_build_summary_counts_in_words(isolated, capsys):
    src = isolated / "defs"
    src.mkdir()
    (src / "a.json").write_text("{}")
    assert main(["store", "build", str(src), "-o", str(isolated / "one.kst")]) == 0
    assert ": 1 key from 1 file, " in capsys.readouterr().out


# ---------------------------------------------------------------- item 8: a subcommand's own usage

@pytest.mark.parametrize("args, prog, extra", [
    (["demo", "--bogus"], "knhk-memory demo", "--bogus"),
    (["store", "stats", "f.kst", "--deep"], "knhk-memory store stats", "--deep"),
    (["store", "get", "f.kst", "k", "x"], "knhk-memory store get", "x"),
    (["store", "list", "-z", "f.kst"], "knhk-memory store list", "-z"),
    (["store", "build", "d", "-o", "o.kst", "--nope"], "knhk-memory store build", "--nope"),
    (["store", "verify", "f.kst", "--x"], "knhk-memory store verify", "--x"),
    (["metrics", "--y"], "knhk-memory metrics", "--y"),
    (["shm", "list", "--x"], "knhk-memory shm list", "--x"),
    (["shm", "gc", "--x"], "knhk-memory shm gc", "--x"),
    (["run", "--bogus", "--", "true"], "knhk-memory run", "--bogus"),
    (["info", "--z"], "knhk-memory info", "--z"),
    (["budget", "--z"], "knhk-memory budget", "--z"),
])
def test_unknown_option_gets_the_subcommands_usage(capsys, args, prog, extra):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = err_of(capsys)
    assert err.startswith(f"usage: {prog} ")
    assert f"{prog}: error: unrecognized arguments: {extra}\n" in err


def test_run_passes_everything_after_the_double_dash(capsys):
    assert main(["run", "--dry-run", "--", "true", "--bogus", "-x"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "true --bogus -x"


def test_store_get_does_not_write_binary_to_a_terminal(tmp_path):
    """A second trial: a spec pickle went raw to the terminal. With a terminal on stdout a
    binary value is refused (exit 2, the way out named); text still shows; a pipe gets
    the bytes."""
    import os
    import pty
    import subprocess
    import sys

    from knhk_memory.store import WorkflowStoreWriter

    p = tmp_path / "b.kst"
    with WorkflowStoreWriter(p) as w:
        w.add("bin", b"\x80\x05\x95\x00binary")
        w.add("txt", "plain text ✓\n".encode())

    def on_a_terminal(key: str) -> tuple[int, bytes]:
        leader, follower = pty.openpty()
        try:
            proc = subprocess.run([sys.executable, "-m", "knhk_memory", "store", "get", str(p), key],
                                  stdout=follower, stderr=subprocess.PIPE, timeout=60)
            os.close(follower)
            out = b""
            try:
                while chunk := os.read(leader, 4096):
                    out += chunk
            except OSError:  # EIO: the terminal's other end is closed
                pass
            return proc.returncode, out + proc.stderr
        finally:
            os.close(leader)

    code, out = on_a_terminal("bin")
    assert code == 2 and b"is binary (10 bytes" in out and b"redirect it (> FILE) or pipe it" in out
    code, out = on_a_terminal("txt")
    assert code == 0 and "plain text ✓".encode() in out
    piped = subprocess.run([sys.executable, "-m", "knhk_memory", "store", "get", str(p), "bin"],
                           capture_output=True, timeout=60)
    assert piped.returncode == 0 and piped.stdout == b"\x80\x05\x95\x00binary"
