"""Shared counter blocks are untrusted input on attach (issue 16, input 2), and what
creating one over a leftover says (input 6)."""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from knhk_memory import Counters, PatternStats, counters, segments
from knhk_memory.errors import SharedBlockError, SharedBlockExistsError, SharedBlockPermissionError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import shm_fuzz  # noqa: E402 - the fuzz script's checksum, one definition

NAMES_OFF, BASE_OFF, OWNERS_OFF, CHECKSUM_AT = 40, 48, 56, 80


def _block(tmp_path: Path) -> tuple[Counters, Path]:
    path = tmp_path / "block"
    c = Counters(["events", "errors"], shared=str(path))
    c.add("events", 3)
    return c, path


def _poke(path: Path, at: int, value: int, width: int = 8, *, forge: bool = False) -> None:
    buf = bytearray(path.read_bytes())
    buf[at:at + width] = value.to_bytes(width, "little")
    if forge:
        buf[CHECKSUM_AT:CHECKSUM_AT + 8] = shm_fuzz.checksum(buf).to_bytes(8, "little")
    path.write_bytes(bytes(buf))


def test_issue_input_names_off_2_to_the_40(tmp_path):
    # Before: SIGSEGV in the attaching process (the checksum read names at names_off).
    c, path = _block(tmp_path)
    _poke(path, NAMES_OFF, 2**40)
    with pytest.raises(SharedBlockError, match=r"names_off is 1099511627776, the layout of 2 counters with 14 "
                                               r"bytes of names puts it at 128"):
        Counters.attach(str(path))
    c.close()


def test_issue_input_one_high_bit_flipped_in_names_off(tmp_path):
    c, path = _block(tmp_path)
    _poke(path, NAMES_OFF, 128 | (1 << 62))
    with pytest.raises(SharedBlockError, match=r"names_off is 4611686018427388032"):
        Counters.attach(str(path))
    c.close()


@pytest.mark.parametrize("field,at", [("base_off", BASE_OFF), ("owners_off", OWNERS_OFF), ("names_off", NAMES_OFF)])
def test_offsets_are_checked_even_with_a_forged_checksum(tmp_path, field, at):
    # A deliberate writer recomputes the checksum: the offsets are still compared with the layout.
    c, path = _block(tmp_path)
    _poke(path, at, 2**63, forge=True)
    with pytest.raises(SharedBlockError, match=rf"{field} is 9223372036854775808, the layout .* puts it at \d+"):
        Counters.attach(str(path))
    c.close()


def test_forged_names_that_are_not_utf8_raise_a_named_error(tmp_path):
    # Before: a raw UnicodeDecodeError out of attach.
    c, path = _block(tmp_path)
    _poke(path, 128, 0xFF, 1, forge=True)
    with pytest.raises(SharedBlockError, match=r"has a counter name that is not UTF-8 .*not a block a knhk process"):
        Counters.attach(str(path))
    c.close()


def test_forged_repeated_names_are_refused(tmp_path):
    path = tmp_path / "block"
    c = Counters(["aa", "ab"], shared=str(path))
    _poke(path, 132, ord("a"), 1, forge=True)  # "aa\0ab\0" -> "aa\0aa\0"
    with pytest.raises(SharedBlockError, match=r"empty or repeated counter names \(\['aa'\]\)"):
        Counters.attach(str(path))
    c.close()


def test_truncated_block_is_refused(tmp_path):
    c, path = _block(tmp_path)
    os.truncate(path, 4096)
    with pytest.raises(SharedBlockError, match=r"counter block needs \d+ bytes, only 4096 are mapped"):
        Counters.attach(str(path))
    c.close()


def test_attach_without_permission_is_a_named_error(tmp_path, monkeypatch):
    c, path = _block(tmp_path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(counters.os, "open", denied)
    with pytest.raises(SharedBlockPermissionError, match=r"cannot open the shared block .*: Permission denied; it "
                                                         r"is this user's, but its mode 0o600 does not let"):
        Counters.attach(str(path))
    monkeypatch.undo()
    with pytest.raises(PermissionError):  # still a PermissionError for callers that catch that
        monkeypatch.setattr(counters.os, "open", denied)
        Counters.attach(str(path))
    c.close()


def test_fuzz_mutated_headers_in_child_processes():
    # >= 10,000 mutated blocks (header and names bytes, extreme field values,
    # half with a recomputed checksum, some truncated) in 8 child processes.
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "shm_fuzz.py"), "--blocks", "12000",
                           "--children", "8"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["mutated_blocks"] >= 10_000, report
    assert (report["signals"], report["wrong"], report["unexpected"], report["lost_children"]) == (0, 0, 0, 0), report
    assert report["refused"] > report["mutated_blocks"] // 2  # damage is refused, not waved through
    assert proc.returncode == 0


# ---------------------------------------------------------------- creating over a leftover (input 6)


def test_issue_input_leftover_of_a_killed_creator_is_reclaimed_by_the_next_start(caplog):
    # Issue 16 made this a message naming the dead pid; issue 22: the next start with the
    # same name removes the leftover (its creator is gone, nothing maps it) and goes on.
    name = f"knhk_test_stale_{os.getpid()}"
    pid = os.fork()
    if pid == 0:
        try:
            block = Counters(["a"], shared=name)
            block.add("a", 5)
            os.kill(os.getpid(), signal.SIGKILL)  # dies without unlinking, as a crash does
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    assert os.path.exists(f"/dev/shm/{name}")
    with caplog.at_level("WARNING", logger="knhk_memory"), Counters(["a"], shared=name) as fresh:
        assert fresh.get("a") == 0  # a new block, not the leftover
    assert f"removed the leftover shared block /dev/shm/{name} (counters, " in caplog.text
    assert f"its creator, pid {pid}, is gone and no process maps it" in caplog.text
    assert not os.path.exists(f"/dev/shm/{name}")


def test_existing_block_of_a_running_creator_says_so(tmp_path):
    path = tmp_path / "b"
    with Counters(["a"], shared=str(path)):
        with pytest.raises(SharedBlockExistsError, match=rf"created by pid {os.getpid()}, which is still running.*"
                                                         rf"attach to it with Counters.attach"):
            Counters(["a"], shared=str(path))


def test_segment_mode_default_owner_only_and_configurable(tmp_path):
    old = os.umask(0o077)
    try:
        with Counters(["a"], shared=True) as c:
            assert stat.S_IMODE(os.stat(f"/dev/shm/{c.name}").st_mode) == 0o600
        with Counters(["a"], shared=str(tmp_path / "f"), mode=0o660) as c:  # exactly, whatever the umask
            assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o660
        with PatternStats(shared=True, mode=0o640) as p:
            assert stat.S_IMODE(os.stat(f"/dev/shm/{p.name}").st_mode) == 0o640
    finally:
        os.umask(old)
    with pytest.raises(ValueError, match=r"mode must be a permission mode with owner read and write, "
                                         r"0o600..0o777, got 256"):
        Counters(["a"], shared=True, mode=0o400)


def test_header_layout_constants_match_the_c_core(tmp_path):
    c, path = _block(tmp_path)
    raw = path.read_bytes()
    assert struct.unpack_from("<Q", raw, NAMES_OFF)[0] == 128
    assert struct.unpack_from("<Q", raw, CHECKSUM_AT)[0] == shm_fuzz.checksum(raw)
    assert struct.unpack_from("<I", raw, segments.CREATOR_PID_AT)[0] == os.getpid()
    assert struct.unpack_from("<Q", raw, segments.CREATOR_START_AT)[0] == segments.process_start_time(os.getpid()) > 0
    c.close()


def test_config_mode_is_checked():
    from knhk_memory.config import load_config
    from knhk_memory.errors import ConfigError

    assert load_config(mapping={"counters": {"mode": 0o640}}).counters.mode == 0o640
    with pytest.raises(ConfigError, match=r"counters.mode: must be a permission mode with owner read and write, "
                                          r"0o600..0o777, got 0o400"):
        load_config(mapping={"counters": {"mode": 0o400}})


def test_attach_names_with_nul_are_refused_by_name():
    with pytest.raises(SharedBlockError, match=r"shared block name 'a\\x00b' contains a NUL character"):
        Counters.attach("a\0b")


def test_issue_input_configured_shared_name_left_by_a_killed_creator():
    # The issue-16 case: a configured [counters] shared_name whose creator was
    # killed. Since issue 22 the restart removes the leftover and starts; a second
    # engine on the same name while the first runs is refused, naming the live pid.
    from knhk_memory import ConfigError, get_plugin_manager, load_config

    name = f"knhk_test_cfg_stale_{os.getpid()}"
    mapping = {"counters": {"shared": True, "shared_name": name, "pattern_stats": False}}
    # The first engine: configures, then is killed (no clean-up runs).
    code = (f"import os, signal\nfrom knhk_memory import get_plugin_manager, load_config\n"
            f"pm = get_plugin_manager(autoload=True)\n"
            f"config = load_config(mapping={mapping!r})\n"  # held: the plugin's state lives with it
            f"pm.hook.knhk_configure(config=config)\n"
            f"print(os.getpid(), flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert os.path.exists(f"/dev/shm/{name}")
    pm, config = get_plugin_manager(autoload=True), load_config(mapping=mapping)
    pm.hook.knhk_configure(config=config)
    try:
        pm2, config2 = get_plugin_manager(autoload=True), load_config(mapping=mapping)
        with pytest.raises(ConfigError, match=rf"counters.shared_name: a shared block named '{name}' already exists "
                                              rf"at /dev/shm/{name}; it was created by pid {os.getpid()}, which is "
                                              rf"still running: another engine \(or this one\) uses the name"):
            pm2.hook.knhk_configure(config=config2)
    finally:
        pm.hook.knhk_unconfigure(config=config)
    assert not os.path.exists(f"/dev/shm/{name}")
