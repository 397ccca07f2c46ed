"""Kill ``knhk-memory demo --workers N`` mid-run and count what it leaves behind.

Each round starts the demo in a session of its own, waits until its N worker
processes exist and every one of them maps all of the run's shared blocks, and
until the demo has unlinked the blocks' generated names (it does once every
worker maps them), then sends the signal: SIGKILL and SIGTERM to the demo
process (``kill -9 PID``, ``kill PID``), SIGINT to its process group (what
Ctrl-C at a terminal does). With ``--early`` it signals as soon as the blocks
exist, before the workers attach. Then, within ``--timeout`` seconds:

- processes left: every process of the demo's session still running (zombies
  count as gone), after the demo itself was reaped. Goal 0.
- segments left: /dev/shm entries named ``knhk_counters_<demo pid>_*`` (the
  generated names of the run's counter, pattern and metrics blocks). Goal 0.
  A SIGKILL in the early window (before every worker attached) leaves them, as
  nothing in a SIGKILLed process runs; the round then runs ``knhk-memory shm gc
  --prefix knhk_counters_<demo pid>_`` and counts what it removed and what is
  left (goal: all removed, 0 left).

Usage: ``python scripts/demo_kill.py [--rounds 10] [--signals KILL,TERM,INT] [--workers 2] [--metrics] [--early]``;
prints one JSON object per signal. docs/reliability.md quotes it;
tests/test_demo_signals.py runs one round of each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT, "HUP": signal.SIGHUP}


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2:].split()
    return rest[0].decode(), int(rest[1]), int(rest[3])


def session_processes(sid: int) -> list[int]:
    """Running (not zombie) processes of session ``sid``."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            st = _stat(int(p))
            if st is not None and st[2] == sid and st[0] != "Z":
                out.append(int(p))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _segments(pid: int) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"knhk_counters_{pid}_"))


def _mapped(pid: int, demo: int) -> set[str]:
    """Names of the demo's generated blocks that process ``pid`` maps (unlinked ones too)."""
    prefix = f"/dev/shm/knhk_counters_{demo}_"
    out = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith(prefix):
                    out.add(parts[5].strip().removesuffix(" (deleted)")[len("/dev/shm/"):])
    except OSError:
        pass
    return out


def one_round(sig: str, workers: int = 2, metrics: bool = False, cases: int = 20_000_000,
              timeout: float = 30.0, start_timeout: float = 120.0, early: bool = False) -> dict[str, Any]:
    """Start the demo, wait for its workers and for the demo to unlink its blocks'
    names once they are attached (``early``: only until its blocks exist, before
    the workers attach), send ``sig``; what is left."""
    cmd = [sys.executable, "-m", "knhk_memory", "demo", "--workers", str(workers), "--cases", str(cases),
           "--no-budgets", "--no-event-log", "--no-progress"] + (["--metrics"] if metrics else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    pid = proc.pid
    want_segments = 3 if metrics else 2
    deadline = time.monotonic() + start_timeout
    worker_pids: list[int] = []
    try:
        seen: set[str] = set()
        while True:  # the workers exist, each maps every block, and the demo has unlinked their names
            if proc.poll() is not None:
                raise RuntimeError(f"the demo exited early ({proc.returncode}): "
                                   f"{proc.stderr.read().decode(errors='replace')[-2000:]}")  # type: ignore[union-attr]
            seen.update(_segments(pid))
            if early and len(seen) >= want_segments:
                worker_pids = [p for p in session_processes(pid) if p != pid]
                break
            worker_pids = [p for p in session_processes(pid)
                           if p != pid and "spawn_main" in _cmdline(p) and "resource_tracker" not in _cmdline(p)]
            maps = [_mapped(w, pid) for w in worker_pids]
            attached = len(worker_pids) == workers and all(len(m) == want_segments for m in maps)
            if attached:
                seen.update(*maps)
                if not _segments(pid):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the demo's {workers} workers mapping {want_segments} blocks, names unlinked, "
                                   f"did not appear in {start_timeout} s: workers {worker_pids}, maps {maps}, "
                                   f"names {_segments(pid)}")
            time.sleep(0.02)
        unlinked_before_signal = not _segments(pid)
        t0 = time.monotonic()
        if sig == "INT":
            os.killpg(pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        else:
            os.kill(pid, SIGNALS[sig])
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        left = session_processes(pid)
        while left and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
            left = session_processes(pid)
        seconds = time.monotonic() - t0
        segs_left = _segments(pid)
        removed: list[str] = []
        if sig == "KILL" and segs_left:
            gc = subprocess.run([sys.executable, "-m", "knhk_memory", "shm", "gc", "--prefix",
                                 f"knhk_counters_{pid}_", "--json"], capture_output=True, text=True, timeout=60)
            removed = sorted(s["name"] for s in json.loads(gc.stdout)["removed"])
        return {"signal": sig, "demo_pid": pid, "returncode": rc, "workers": worker_pids,
                "segments_seen": sorted(seen), "unlinked_before_signal": unlinked_before_signal,
                "processes_left": [(p, _cmdline(p)) for p in left],
                "seconds_to_exit": round(seconds, 3), "segments_left_after_signal": segs_left,
                "removed_by_gc": removed, "segments_left_after_gc": _segments(pid),
                "stderr_tail": proc.stderr.read().decode(errors="replace")[-600:] if rc is not None else ""}  # type: ignore[union-attr]
    finally:
        for p in session_processes(pid):  # never leave a stray demo behind, whatever happened
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--signals", default="KILL,TERM,INT")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--metrics", action="store_true")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--verbose", action="store_true", help="print every round too")
    ap.add_argument("--early", action="store_true", help="signal as soon as the blocks exist, before the workers "
                    "attach (the window in which a SIGKILL leaves blocks for shm gc)")
    a = ap.parse_args()
    for sig in a.signals.split(","):
        rounds = [one_round(sig, a.workers, a.metrics, timeout=a.timeout, early=a.early) for _ in range(a.rounds)]
        if a.verbose:
            for r in rounds:
                print(json.dumps(r))
        print(json.dumps({
            "signal": sig, "rounds": len(rounds), "workers": a.workers, "metrics": a.metrics, "early": a.early,
            "rounds_unlinked_before_signal": sum(r["unlinked_before_signal"] for r in rounds),
            "rounds_with_processes_left": sum(bool(r["processes_left"]) for r in rounds),
            "processes_left": sum(len(r["processes_left"]) for r in rounds),
            "segments_seen": sum(len(r["segments_seen"]) for r in rounds),
            "segments_left_after_signal": sum(len(r["segments_left_after_signal"]) for r in rounds),
            "removed_by_gc": sum(len(r["removed_by_gc"]) for r in rounds),
            "segments_left_after_gc": sum(len(r["segments_left_after_gc"]) for r in rounds),
            "max_seconds_to_exit": max(r["seconds_to_exit"] for r in rounds),
            "returncodes": sorted({r["returncode"] for r in rounds}, key=str),
        }), flush=True)


if __name__ == "__main__":
    main()
