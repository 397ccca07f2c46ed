"""Shared blocks of killed creators, shared names held by other users or live engines,
and ``knhk-memory shm list/gc`` (issue 22, items 3 and 5).

Every test uses names under its own prefix (``knhk_t22_<pid>_<hex>``), so runs in
parallel never see each other's blocks.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from knhk_memory import Counters, PatternStats, segments
from knhk_memory.errors import SharedBlockError, SharedBlockExistsError
from knhk_memory.metrics import Metrics, generate

NOBODY = 65534
MAKERS: dict[str, Callable[[str], Any]] = {
    "counters": lambda name: Counters(["a", "b"], shared=name),
    "patterns": lambda name: PatternStats(shared=name),
    "metrics": lambda name: Metrics(shared=name, max_label_sets=8, max_cells=16),
}
ATTACH = {"counters": Counters.attach, "patterns": PatternStats.attach, "metrics": Metrics.attach}


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"knhk_t22_{os.getpid()}_{secrets.token_hex(3)}_"
    yield p
    for n in os.listdir("/dev/shm"):
        if n.startswith(p):
            os.unlink(f"/dev/shm/{n}")


def _in_child(fn: Callable[[], Any], *, kill: bool = False, uid: int | None = None) -> tuple[int, Any]:
    """Run ``fn`` in a forked child (as ``uid`` if given); return (pid, its result or
    exception as text). With ``kill`` the child SIGKILLs itself after ``fn``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            try:
                out: Any = ["ok", fn()]
            except BaseException as exc:
                out = ["raised", type(exc).__name__, str(exc), isinstance(exc, (UnicodeError, PermissionError))
                       and not isinstance(exc, SharedBlockError)]
            os.write(w, json.dumps(out).encode())
            os.close(w)
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return pid, json.loads(data)


class _Holder:
    """A forked child (as ``uid`` if given) that runs ``fn`` and keeps what it returns
    alive until :meth:`stop`; ``error`` is what it raised, if anything."""

    def __init__(self, fn: Callable[[], Any], uid: int | None = None) -> None:
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(r1)
                os.close(w2)
                if uid is not None:
                    os.setgid(uid)
                    os.setuid(uid)
                try:
                    kept = fn()  # noqa: F841 - alive until the parent says stop
                    os.write(w1, b"ok")
                except BaseException as exc:
                    os.write(w1, f"{type(exc).__name__}: {exc}".encode())
                os.close(w1)
                os.read(r2, 1)  # EOF when the parent stops us (or dies)
            finally:
                os._exit(0)
        os.close(w1)
        os.close(r2)
        self._stop = w2
        data = b""
        while chunk := os.read(r1, 65536):
            data += chunk
        os.close(r1)
        self.error = "" if data == b"ok" else data.decode()
        self.running = True

    def kill(self) -> None:
        if self.running:
            os.kill(self.pid, signal.SIGKILL)
            self.stop()

    def stop(self) -> None:
        if self.running:
            os.close(self._stop)
            os.waitpid(self.pid, 0)
            self.running = False


def _leave(kind: str, name: str) -> int:
    """A block of ``kind`` under ``name`` whose creator was SIGKILLed; its pid."""
    def make() -> None:
        globals()["_kept"] = MAKERS[kind](name)  # alive until the kill
    pid, out = _in_child(make, kill=True)
    assert out == ["ok", None]
    assert os.path.exists(f"/dev/shm/{name}")
    return pid


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "knhk_memory", *args], capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- leftovers of killed creators (item 3)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_next_start_with_the_same_name_reclaims_a_killed_creators_block(prefix, kind, caplog):
    name = prefix + kind
    pid = _leave(kind, name)
    seg = segments.inspect(f"/dev/shm/{name}")
    assert seg is not None and (seg.kind, seg.creator_pid, seg.creator_alive, seg.mapped_by, seg.leftover) == \
        (kind, pid, False, [], True)
    with caplog.at_level("WARNING", logger="knhk_memory"):
        block = MAKERS[kind](name)
    try:
        assert f"removed the leftover shared block /dev/shm/{name} ({kind}, " in caplog.text
        assert segments.inspect(f"/dev/shm/{name}").creator_pid == os.getpid()  # type: ignore[union-attr]
    finally:
        block.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_a_reused_pid_is_not_taken_for_the_creator(prefix):
    # The header says the creator is pid P, started at time T. Here P is a running
    # process (this one) but started at another time: a reused pid, so the creator is gone.
    name = prefix + "reused"
    _leave("counters", name)
    path = f"/dev/shm/{name}"
    with open(path, "r+b") as f:
        f.seek(segments.CREATOR_PID_AT)
        f.write(struct.pack("<I", os.getpid()))
        f.seek(segments.CREATOR_START_AT)
        f.write(struct.pack("<Q", segments.process_start_time(os.getpid()) + 1))  # type: ignore[operator]
    seg = segments.inspect(path)
    assert seg is not None and not seg.creator_alive and seg.leftover
    with Counters(["a"], shared=name) as c:
        assert c.get("a") == 0
    # The same pid with its real start time is the creator, alive: refused, never removed.
    _leave("counters", name)
    with open(path, "r+b") as f:
        f.seek(segments.CREATOR_PID_AT)
        f.write(struct.pack("<I", os.getpid()))
        f.seek(segments.CREATOR_START_AT)
        f.write(struct.pack("<Q", segments.process_start_time(os.getpid())))  # type: ignore[arg-type]
    with pytest.raises(SharedBlockExistsError, match=rf"created by pid {os.getpid()}, which is still running"):
        Counters(["a"], shared=name)
    # A block of an older build (no start time): its creator counts as alive while the pid exists.
    with open(path, "r+b") as f:
        f.seek(segments.CREATOR_START_AT)
        f.write(bytes(8))
    assert segments.inspect(path).creator_alive  # type: ignore[union-attr]
    assert os.path.exists(path)


def test_a_block_still_mapped_by_a_live_process_is_never_reclaimed(prefix):
    # The creator is dead, but a worker still maps the block: kept, and the new start is
    # refused with the worker's pid.
    name = prefix + "mapped"
    creator = _leave("counters", name)
    holder = _Holder(lambda: Counters.attach(name))
    assert holder.error == ""
    try:
        with pytest.raises(SharedBlockExistsError) as info:
            Counters(["a"], shared=name)
        assert (f"it was created by pid {creator}, which is no longer running, but pid(s) {holder.pid} still map it "
                "(workers of that engine?); it is kept while they use it") in str(info.value)
        gc = _cli("shm", "gc", "--prefix", prefix, "-v")
        assert gc.returncode == 0, gc.stderr
        assert (f"kept /dev/shm/{name} (counters): in use: its creator pid {creator} is gone, but pid(s) "
                f"{holder.pid} map it") in gc.stdout
        assert "removed 0 leftover block(s); kept 1 other knhk block(s)" in gc.stdout
        assert os.path.exists(f"/dev/shm/{name}")
    finally:
        holder.kill()
    with Counters(["a"], shared=name) as c:  # the holder is gone: now a leftover
        assert c.get("a") == 0


def test_shm_gc_removes_only_this_users_leftover_knhk_blocks_and_lists_them(prefix):
    dead = {k: _leave(k, prefix + "dead_" + k) for k in MAKERS}
    live = Counters(["a"], shared=prefix + "live")
    foreign = prefix + "foreign"
    _leave("counters", foreign)
    os.chown(f"/dev/shm/{foreign}", NOBODY, NOBODY)
    with open(f"/dev/shm/{prefix}junk", "wb") as f:  # not a knhk block
        f.write(b"KNHCNTR0" + bytes(200))
    os.symlink(f"/dev/shm/{prefix}dead_counters", f"/dev/shm/{prefix}link")
    try:
        listed = _cli("shm", "list", "--prefix", prefix, "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert set(rows) == {prefix + "dead_" + k for k in MAKERS} | {prefix + "live", foreign}
        assert [rows[prefix + "dead_" + k]["kind"] for k in MAKERS] == list(MAKERS)
        assert rows[prefix + "live"]["state"] == f"in use: its creator, pid {os.getpid()}, is running"
        assert rows[foreign]["state"] == "belongs to nobody (uid 65534)" and not rows[foreign]["leftover"]

        dry = _cli("shm", "gc", "--dry-run", "--prefix", prefix)
        assert dry.returncode == 0, dry.stderr
        for k, pid in dead.items():
            assert f"would remove /dev/shm/{prefix}dead_{k} ({k}, " in dry.stdout
            assert f"created by pid {pid}, gone)" in dry.stdout
        assert dry.stdout.splitlines()[-1] == "would remove 3 leftover block(s); kept 2 other knhk block(s)"
        assert all(os.path.exists(f"/dev/shm/{prefix}dead_{k}") for k in MAKERS)

        gc = _cli("shm", "gc", "--prefix", prefix)
        assert gc.returncode == 0, gc.stderr
        assert gc.stdout.count("\nremoved /dev/shm/") + gc.stdout.startswith("removed /dev/shm/") == 3
        assert gc.stdout.splitlines()[-1] == "removed 3 leftover block(s); kept 2 other knhk block(s)"
        left = sorted(n[len(prefix):] for n in os.listdir("/dev/shm") if n.startswith(prefix))
        assert left == ["foreign", "junk", "link", "live"]
        assert live.get("a") == 0  # untouched, still usable
        again = _cli("shm", "gc", "--prefix", prefix)
        assert again.stdout.splitlines()[-1] == "removed 0 leftover block(s); kept 2 other knhk block(s)"
    finally:
        live.close()


# ---------------------------------------------------------------- names held by others (item 5)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_issue_input_fixed_name_another_user_created_first(prefix, kind):
    # Another local user (nobody) made the block first and is still running: the
    # engine cannot take the name, and the message names the owner and the path and
    # does not suggest attaching.
    name = prefix + kind
    other = _Holder(lambda: MAKERS[kind](name), uid=NOBODY)
    assert other.error == ""
    try:
        with pytest.raises(SharedBlockExistsError) as info:
            MAKERS[kind](name)
        msg = str(info.value)
        assert msg.startswith(f"a shared block named {name!r} already exists at /dev/shm/{name} and belongs to "
                              f"another user, nobody (uid 65534), created by pid {other.pid}, which is still running: "
                              "this user (root (uid 0)) can neither use nor remove it. Choose another name")
        assert "attach" not in msg
        # Its creator killed: still nobody's, so still refused (never removed for another user).
        other.kill()
        with pytest.raises(SharedBlockExistsError, match=r"belongs to another user, nobody \(uid 65534\), created "
                                                         r"by pid \d+, which is no longer running"):
            MAKERS[kind](name)
        assert os.path.exists(f"/dev/shm/{name}")
    finally:
        other.kill()


@pytest.mark.parametrize("kind", list(MAKERS))
def test_issue_input_another_users_block_is_a_named_error_on_attach_and_create(prefix, kind):
    # root's block (mode 0o600) seen from user nobody: attach and create raise named
    # errors naming the owner and the path, never a raw PermissionError.
    name = prefix + kind
    block = MAKERS[kind](name)
    try:
        _, out = _in_child(lambda: ATTACH[kind](name) and None, uid=NOBODY)
        assert out[:2] == ["raised", "SharedBlockPermissionError"] and out[3] is False
        assert out[2] == (f"cannot open the shared block {name!r} (/dev/shm/{name}): Permission denied; it belongs "
                          "to another user, root (uid 0), with mode 0o600; this user is nobody (uid 65534) (blocks "
                          "are created with mode 0o600, owner only, unless [counters] mode says otherwise)")
        _, out = _in_child(lambda: MAKERS[kind](name) and None, uid=NOBODY)
        assert out[:2] == ["raised", "SharedBlockExistsError"] and out[3] is False
        assert out[2].startswith(f"a shared block named {name!r} already exists at /dev/shm/{name} and belongs to "
                                 "another user, root (uid 0): this user (nobody (uid 65534)) can neither use nor "
                                 "remove it")
    finally:
        block.close()


def test_issue_input_configured_name_of_another_user_through_the_plugin(prefix):
    from knhk_memory import ConfigError, get_plugin_manager, load_config

    name = prefix + "engine"
    mapping = {"counters": {"shared": True, "shared_name": name, "pattern_stats": False}}
    _leave("counters", name)
    os.chown(f"/dev/shm/{name}", NOBODY, NOBODY)
    pm, config = get_plugin_manager(autoload=True), load_config(mapping=mapping)
    with pytest.raises(ConfigError, match=rf"counters.shared_name: a shared block named '{name}' already exists at "
                                          rf"/dev/shm/{name} and belongs to another user, nobody \(uid 65534\)"):
        pm.hook.knhk_configure(config=config)


def test_a_file_that_is_not_a_knhk_block_is_named_and_kept(prefix):
    name = prefix + "other"
    with open(f"/dev/shm/{name}", "wb") as f:
        f.write(b"not ours" * 100)
    with pytest.raises(SharedBlockExistsError, match=rf"already exists at /dev/shm/{name} and is not a knhk block "
                                                     r"\(no knhk header\)\. Choose another name, or remove it"):
        Counters(["a"], shared=name)
    assert os.path.exists(f"/dev/shm/{name}")


def test_metrics_block_with_names_that_are_not_utf8_never_raises_unicode_errors(prefix):
    # A writer of the block puts bytes that are not UTF-8 into a family name and a
    # label value: attach, scrape and use raise no UnicodeDecodeError; the entries are
    # skipped (and counted) by the scrape.
    name = prefix + "m"
    m = Metrics(shared=name, max_label_sets=8, max_cells=16)
    m.counter("jobs_total", "Jobs.", labels=("kind",)).labels("fast").add(2)
    path = f"/dev/shm/{name}"
    with open(path, "r+b") as f:
        raw = f.read()
        for needle in (b'jobs{"help"', b'["fast"]'):  # the family's key, the label set's key
            f.seek(raw.index(needle) + 2)
            f.write(b"\xff")
    other = Metrics.attach(name)
    try:
        assert "jobs" not in generate(other)
        fams, skipped = other.snapshot()
        assert fams == [] and skipped == 2
        other.counter("jobs_total", "Jobs.", labels=("kind",)).labels("fast").add(1)  # a fresh entry, no error
        assert other.counter("jobs_total", "Jobs.", labels=("kind",)).get("fast") == 1
    finally:
        other.close()
        m.close()


def test_a_creator_that_exits_without_closing_leaves_no_segment():
    # Blocks never closed, held by a daemon thread still running at exit (so never
    # collected: before, their names stayed in /dev/shm), are unlinked at a normal
    # exit; a forked child's exit does not unlink its parent's blocks.
    code = ("import os, sys\nfrom knhk_memory import Counters, PatternStats\nfrom knhk_memory.metrics import Metrics\n"
            "keep = [Counters(['a'], shared=True), PatternStats(shared=True), Metrics(shared=True, max_cells=8)]\n"
            "import threading, time\n"
            "threading.Thread(target=lambda k=keep: time.sleep(60), daemon=True).start()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n    sys.exit(0)\n"
            "os.waitpid(pid, 0)\n"
            "print(os.getpid(), all(os.path.exists('/dev/shm/' + b.name) for b in keep[:3]), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid, after_child = out.stdout.split()
    assert after_child == "True"
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"knhk_counters_{pid}_")] == []


def test_the_demo_start_reclaims_generated_name_leftovers_only():
    """A process SIGKILLed with a generated-name block (what an early-killed demo leaves)
    leaves a leftover no later start would reuse; the demo's start removes it and names it.
    A leftover under another name, and a live process's generated-name block, stay."""
    from knhk_memory.refhost.demo import reclaim_generated_leftovers

    pid, _ = _in_child(lambda: Counters(["a"], shared=True).name, kill=True)
    mine = segments.list_segments(f"knhk_counters_{pid}_")
    assert len(mine) == 1 and mine[0].leftover
    other = f"knhk_t22_{os.getpid()}_{secrets.token_hex(3)}_named"
    _in_child(lambda: Counters(["a"], shared=other).name, kill=True)
    node = f"knhk_dask_{secrets.token_hex(6)}_{secrets.token_hex(6)}_c"  # a killed cluster run's node block
    _in_child(lambda: Counters(["a"], shared=node).name, kill=True)
    live = Counters(["a"], shared=True)
    try:
        removed = reclaim_generated_leftovers()
        assert mine[0].name in removed and node in removed
        assert live.name not in removed and other not in removed
        assert not os.path.exists(mine[0].path)
        assert os.path.exists(f"/dev/shm/{other}") and os.path.exists(f"/dev/shm/{live.name}")
    finally:
        live.close()
        if os.path.exists(f"/dev/shm/{live.name}"):
            live.unlink()
        if os.path.exists(f"/dev/shm/{other}"):
            os.unlink(f"/dev/shm/{other}")


@pytest.mark.parametrize("action", ["list", "gc"])
def test_shm_dir_that_is_missing_or_not_a_directory_is_a_user_error(action, tmp_path, capsys):
    # A second trial: `shm list --dir /nonexist` printed "0 knhk block(s)" with exit 0.
    from knhk_memory.cli import main

    assert main(["shm", action, "--dir", str(tmp_path / "nope")]) == 2
    assert f"knhk-memory: error: --dir {tmp_path / 'nope'}: does not exist" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert main(["shm", action, "--dir", str(tmp_path / "f")]) == 2
    assert f"--dir {tmp_path / 'f'}: is not a directory" in capsys.readouterr().err
