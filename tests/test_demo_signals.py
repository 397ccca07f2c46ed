"""``knhk-memory demo --workers 2`` killed mid-run leaves no process and no segment
behind (issue 22, item 3): SIGKILL, SIGTERM and Ctrl-C (SIGINT to the process group).

One round each of scripts/demo_kill.py (docs/reliability.md runs more). The demo
runs in a session of its own; its generated block names carry its pid, so runs in
parallel never count each other's segments.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import demo_kill  # noqa: E402 - the script's round, one definition

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists() or not Path("/dev/shm").is_dir(),
                                reason="needs Linux /proc and /dev/shm")


def test_issue_input_kill_9_of_the_multi_worker_demo():
    # Before: both workers kept running (~40% CPU each) and both segments stayed.
    r = demo_kill.one_round("KILL", workers=2, metrics=True)
    assert r["returncode"] == -signal.SIGKILL
    assert len(r["workers"]) == 2 and len(r["segments_seen"]) == 3  # counters, pattern stats, metrics
    assert r["unlinked_before_signal"]  # every worker mapped the blocks, so the demo unlinked their names
    assert r["processes_left"] == []  # the workers die with their parent, by themselves
    assert r["segments_left_after_signal"] == []


def test_kill_9_before_the_workers_attach_leaves_blocks_that_shm_gc_removes():
    # The demo is killed as soon as its blocks exist: the workers (still starting)
    # exit by themselves; a SIGKILLed process cannot remove its blocks, so
    # `knhk-memory shm gc` does: exactly them (their creator is gone, nothing maps them).
    r = demo_kill.one_round("KILL", workers=2, metrics=True, early=True)
    assert r["returncode"] == -signal.SIGKILL
    assert r["processes_left"] == []
    assert len(r["segments_seen"]) == 3 and r["segments_left_after_signal"] == r["segments_seen"]
    assert r["removed_by_gc"] == r["segments_seen"]
    assert r["segments_left_after_gc"] == []


@pytest.mark.parametrize("sig,status", [("TERM", 128 + signal.SIGTERM), ("INT", 130), ("HUP", 128 + signal.SIGHUP)])
def test_sigterm_sighup_and_ctrl_c_leave_nothing_behind(sig, status):
    r = demo_kill.one_round(sig, workers=2)
    assert r["returncode"] == status, r["stderr_tail"]
    assert len(r["workers"]) == 2 and len(r["segments_seen"]) == 2
    assert r["processes_left"] == []
    assert r["segments_left_after_signal"] == []
    assert "Traceback" not in r["stderr_tail"]
