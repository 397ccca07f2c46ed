"""One test pattern for every object that hands out views or pointers (issue 22, item 1):
reader threads use the object in a loop while the main thread closes it.

Each round opens a fresh object, starts ``readers`` threads that call ``read(obj)`` until
it raises one of ``closed_errors``, waits until they have made a random number of reads
(1 to ``max_reads``) and a random further pause, then calls ``close(obj)`` on the main
thread. The switch interval is 10 us during the run, so threads interleave inside Python
code too, not only where C code releases the GIL. A round passes when

- every reader stops, within ``join_timeout_s`` seconds, on one of ``closed_errors``
  (the named "closed" error; a close that fences readers instead of failing them is fine:
  the reader then sees the closed error on its next call),
- every value read before that passed ``check(value)`` (a wrong answer fails the round),
- no other exception was raised, and ``close`` itself returned.

A signal (SIGSEGV, SIGBUS) kills the test process: the run fails, never passes by luck.
The random spins come from a seeded generator, so a failing round can be replayed.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class CloseRaceReport:
    """What a run of :func:`close_race` saw: ``rounds`` rounds, ``reads`` successful reads
    in all, and ``closed_seen`` readers stopped by the named closed error (every reader of
    every round that passed)."""

    rounds: int = 0
    reads: int = 0
    closed_seen: int = 0


def close_race(open_obj: Callable[[], Any], read: Callable[[Any], Any],
               close: Callable[[Any], None], *, closed_errors: tuple[type[BaseException], ...],
               check: Callable[[Any], bool] | None = None, rounds: int = 100, readers: int = 3,
               max_reads: int = 200, seed: int = 22, join_timeout_s: float = 20.0,
               closed_message: str | None = "closed") -> CloseRaceReport:
    """Run the race ``rounds`` times and return the report; raises AssertionError naming
    the round, the reader and the exception on the first failing round.

    ``closed_message``: a substring every closed error's message must contain (the error is
    named, not a bare ValueError from deep inside), or None to skip that check.
    """
    rng = random.Random(seed)
    report = CloseRaceReport()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for rnd in range(rounds):
            _round(rnd, rng, report, open_obj, read, close, closed_errors, check, readers,
                   max_reads, join_timeout_s, closed_message)
    finally:
        sys.setswitchinterval(interval)
    return report


def _round(rnd: int, rng: random.Random, report: CloseRaceReport, open_obj: Callable[[], Any],
           read: Callable[[Any], Any], close: Callable[[Any], None],
           closed_errors: tuple[type[BaseException], ...], check: Callable[[Any], bool] | None,
           readers: int, max_reads: int, join_timeout_s: float,
           closed_message: str | None) -> None:
    obj = open_obj()
    start = threading.Barrier(readers + 1)
    stop = threading.Event()
    outcomes: list[str | None] = [None] * readers
    counts = [0] * readers

    def reader(i: int) -> None:
        start.wait()
        n = 0
        try:
            while not stop.is_set():
                value = read(obj)
                if check is not None and not check(value):
                    outcomes[i] = f"wrong answer {value!r:.200}"
                    return
                n += 1
                counts[i] = n
            outcomes[i] = "stopped"
        except closed_errors as exc:
            if closed_message is not None and closed_message not in str(exc):
                outcomes[i] = f"closed error without {closed_message!r}: {exc!r}"
            else:
                outcomes[i] = "closed"
        except BaseException as exc:  # the harness reports every kind
            outcomes[i] = f"unexpected {type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(readers)]
    for t in threads:
        t.start()
    start.wait()
    target = rng.randrange(1, max_reads + 1)
    while sum(counts) < target and any(o is None for o in outcomes):
        time.sleep(0)
    time.sleep(rng.random() * 2e-4)
    try:
        close(obj)
    except BaseException as exc:
        stop.set()
        raise AssertionError(f"round {rnd}: close raised {type(exc).__name__}: {exc}") from exc
    # Readers still inside a call must come out with the closed error; readers between
    # calls see it on their next call. `stop` only ends readers that never got there.
    for t in threads:
        t.join(join_timeout_s)
    stop.set()
    hung = [i for i, t in enumerate(threads) if t.is_alive()]
    if hung:
        raise AssertionError(f"round {rnd}: readers {hung} still running "
                             f"{join_timeout_s}s after close (a hang)")
    for i, outcome in enumerate(outcomes):
        if outcome == "closed":
            report.closed_seen += 1
        else:
            raise AssertionError(f"round {rnd}, reader {i}: {outcome}")
    report.reads += sum(counts)
    report.rounds += 1
