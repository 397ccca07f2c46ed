"""Threads x processes adding to one shared Counters block while an exporter reads and resets it.

Each run: ``--processes`` forked processes, each with ``--threads`` threads,
each thread adding ``--adds`` events (``CounterWriter.add`` one at a time for
the first 1000, then ``add_many`` in batches of 1000 indices) to counter
"events". Meanwhile the parent exports in a loop. Two exporters are measured,
in separate runs:

- ``get_and_reset``: the atomic read-and-reset (docs/counters.md);
- ``get+reset``: ``get()`` then ``reset()``, what an exporter had before (the
  adds landing between the two are lost).

After the adders finish: lost = added - (sum exported + what remains). For
``get_and_reset`` it must be 0 in every run.

Usage: ``python scripts/counter_exactness.py [--runs 5] [--processes 2] [--threads 2] [--adds 1000000]``;
prints one JSON object per exporter. docs/reliability.md quotes it;
tests/test_counters_exact.py runs the same check smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

import numpy as np

from knhk_memory import Counters


def _adder(block: Counters, adds: int) -> None:
    w = block.writer()
    first = min(adds, 1000)
    for _ in range(first):
        w.add("events")
    rest = adds - first
    idx = np.zeros(1000, dtype=np.int64)
    for _ in range(rest // 1000):
        block.add_many(idx)
    if rest % 1000:
        block.add_many(idx[: rest % 1000])


def _process(name: str, threads: int, adds: int) -> None:
    block = Counters.attach(name)
    ts = [threading.Thread(target=_adder, args=(block, adds)) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    block.close()


def one_run(exporter: str, processes: int, threads: int, adds: int) -> dict[str, int]:
    block = Counters(["events"], shared=True)
    pids = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _process(block.name, threads, adds)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    exported = reads = 0
    alive = set(pids)
    while alive:
        if exporter == "get_and_reset":
            exported += block.get_and_reset()["events"]
        else:
            exported += block.get("events")
            block.reset()
        reads += 1
        for pid in list(alive):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                if os.waitstatus_to_exitcode(status) != 0:
                    raise RuntimeError(f"adder process {pid} failed")
                alive.discard(pid)
    remaining = block.get("events")
    block.close()
    added = processes * threads * adds
    return {"added": added, "exported": exported, "remaining": remaining, "lost": added - exported - remaining,
            "exports": reads}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adds", type=int, default=1_000_000, help="adds per thread")
    ap.add_argument("--exporters", default="get_and_reset,get+reset")
    args = ap.parse_args(argv)
    bad = False
    for exporter in args.exporters.split(","):
        t0 = time.monotonic()
        runs = [one_run(exporter, args.processes, args.threads, args.adds) for _ in range(args.runs)]
        report: dict[str, Any] = {
            "exporter": exporter, "runs": args.runs, "processes": args.processes, "threads": args.threads,
            "adds_per_thread": args.adds, "added_per_run": runs[0]["added"],
            "lost_per_run": [r["lost"] for r in runs], "exports_per_run": [r["exports"] for r in runs],
            "seconds": round(time.monotonic() - t0, 1),
        }
        print(json.dumps(report), flush=True)
        bad |= exporter == "get_and_reset" and any(r["lost"] for r in runs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
