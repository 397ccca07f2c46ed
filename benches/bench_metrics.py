"""Labelled metrics against prometheus_client's multiprocess mode, in the same run, as ratios.

- Increment from Python: a bound labelled child's ``add()`` versus a bound
  ``prometheus_client`` Counter child's ``inc()`` in multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR`` set before prometheus_client is imported: a
  subprocess), interleaved rounds, medians. Goal: <= 0.5x.
- Scrape with 8 live workers: a knhk block that saw 1,000 worker restarts (each
  a process that counts and exits) versus one that saw none, timed in the same
  interleaved rounds (goal: within 1.2x), and versus ``MultiProcessCollector`` +
  ``generate_latest`` over the files of the same workers (goal: >= 20x faster).
- Exactness: 4 processes x 2 threads x 1,000,000 labelled adds, one worker
  SIGKILLed after its adds and restarted: totals exact.

Run: ``bash scripts/dev.sh bench -k metrics``, or ``python benches/bench_metrics.py``
to print the figures only.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

N = 200_000  # adds per timed round
ROUNDS = 7
WORKERS = 8
RESTARTS = 1000
SCRAPES = 40
FAMILY_SETS = 10  # label sets per family: a counter family and a histogram family
EXACT_N = 1_000_000
HERE = Path(__file__).resolve().parent


def _in_subprocess(fn: str) -> dict:
    """Run ``fn`` of this module in a fresh interpreter with PROMETHEUS_MULTIPROC_DIR set
    (prometheus_client reads it at import), and return the JSON it prints last."""
    with tempfile.TemporaryDirectory() as prom_dir:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": prom_dir, "KNHK_MEMORY_REEXECED": "1"}
        code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_metrics as b; b.{fn}()"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"{fn} failed:\n{r.stderr}")
        return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- increments


def _increments() -> None:
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    import prometheus_client

    from knhk_memory import Counters
    from knhk_memory.metrics import Metrics

    m = Metrics(shared=True)
    child = m.counter("tasks_completed", "Tasks.", labels=("task_type",)).labels(task_type="UserTask")
    registry = prometheus_client.CollectorRegistry()
    pc = prometheus_client.Counter("tasks_completed", "Tasks.", ["task_type"], registry=registry)
    pchild = pc.labels(task_type="UserTask")
    plain = Counters(["x"])

    def knhk() -> None:
        add = child.add
        for _ in range(N):
            add()

    def prom() -> None:
        inc = pchild.inc
        for _ in range(N):
            inc()

    def counters_add() -> None:
        add = plain.add
        for _ in range(N):
            add(0)

    runs: dict[str, list[float]] = {"knhk child.add": [], "prometheus_client inc (multiprocess)": [],
                                    "Counters.add (unlabelled)": []}
    for _ in range(ROUNDS):  # interleaved
        for name, fn in (("knhk child.add", knhk), ("prometheus_client inc (multiprocess)", prom),
                         ("Counters.add (unlabelled)", counters_add)):
            t0 = time.perf_counter()
            fn()
            runs[name].append((time.perf_counter() - t0) / N * 1e9)
    assert child.get() == ROUNDS * N
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({"ns": med, "runs": runs}))
    m.close()


# ---------------------------------------------------------------- scrapes


def _worker(name: str, k: int, hold, release, prom: bool = True) -> None:
    """One worker: counts into the knhk block (and prometheus_client's files when
    ``prom``), then waits (hold) or exits."""
    import bench_metrics_state as st

    from knhk_memory.metrics import Metrics

    m = Metrics.attach(name)
    c = m.counter("tasks_completed", "Tasks.", labels=("task_type",))
    h = m.histogram("task_seconds", "Task time.", labels=("task_type",), buckets=(0.001, 0.01, 0.1, 1.0))
    for i in range(FAMILY_SETS):
        c.labels(f"T{i}").add(k + 1)
        h.labels(f"T{i}").observe(0.005 * (i + 1))
        if prom:
            st.pc.labels(f"T{i}").inc(k + 1)
            st.ph.labels(f"T{i}").observe(0.005 * (i + 1))
    if hold is not None:
        hold.release()
        release.wait()
    os._exit(0)  # as a killed or recycled worker: no clean-up


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _scrapes() -> None:
    """Two knhk blocks, each with 8 live workers: ``fresh`` never saw a restart,
    ``restarted`` saw 1,000; prometheus_client's directory holds the files of the same
    8 + 1,000 workers. The three scrapes are timed interleaved, in the same rounds
    (prometheus_client's before the restarts too, for reference)."""
    prom_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    import types

    import prometheus_client
    from prometheus_client import multiprocess

    from knhk_memory.metrics import Metrics, generate

    st = types.ModuleType("bench_metrics_state")
    st.pc = prometheus_client.Counter("tasks_completed", "Tasks.", ["task_type"], registry=None)
    st.ph = prometheus_client.Histogram("task_seconds", "Task time.", ["task_type"], registry=None,
                                        buckets=(0.001, 0.01, 0.1, 1.0))
    sys.modules["bench_metrics_state"] = st
    fresh, restarted = Metrics(shared=True), Metrics(shared=True)
    reg = prometheus_client.CollectorRegistry()
    multiprocess.MultiProcessCollector(reg)
    ctx = mp.get_context("fork")
    hold, release = ctx.Semaphore(0), ctx.Event()
    live = [ctx.Process(target=_worker, args=(fresh.name, k, hold, release)) for k in range(WORKERS)]
    live += [ctx.Process(target=_worker, args=(restarted.name, k, hold, release, False)) for k in range(WORKERS)]
    for p in live:
        p.start()
    for _ in live:
        hold.acquire()
    prom_before = statistics.median(_time(lambda: prometheus_client.generate_latest(reg)) for _ in range(SCRAPES))
    files_before = len(os.listdir(prom_dir))
    t0 = time.perf_counter()
    for k in range(RESTARTS):
        p = ctx.Process(target=_worker, args=(restarted.name, k, None, None))
        p.start()
        p.join()
    restart_s = time.perf_counter() - t0
    files_after = len(os.listdir(prom_dir))
    runs: dict[str, list[float]] = {"fresh": [], "restarted": [], "prom": []}
    scrape = {"fresh": lambda: generate(fresh), "restarted": lambda: generate(restarted),
              "prom": lambda: prometheus_client.generate_latest(reg)}
    for i in range(SCRAPES):  # interleaved; prometheus_client's scrape (2,016 files) leaves the caches cold, so
        # each knhk block comes right after it in half the rounds
        for name in ("prom", "fresh", "restarted") if i % 2 else ("prom", "restarted", "fresh"):
            runs[name].append(_time(scrape[name]))
    med = {k: statistics.median(v) * 1e3 for k, v in runs.items()}
    release.set()
    for p in live:
        p.join()
    fams, skipped = restarted.snapshot()
    total = sum(cells[0] for d, rows in fams if d["name"] == "tasks_completed" for _, cells in rows)
    want = FAMILY_SETS * (sum(k + 1 for k in range(WORKERS)) + sum(k + 1 for k in range(RESTARTS)))
    print(json.dumps({"before": {"knhk_ms": med["fresh"], "prometheus_client_ms": prom_before * 1e3},
                      "after": {"knhk_ms": med["restarted"], "prometheus_client_ms": med["prom"]},
                      "prometheus_files_before": files_before, "prometheus_files_after": files_after,
                      "restart_seconds": restart_s, "knhk_total_exact": total == want,
                      "knhk_slots_owned": restarted.slots_owned(),
                      "knhk_label_sets": restarted.usage()["label_sets"], "skipped": skipped}))
    fresh.close()
    restarted.close()


# ---------------------------------------------------------------- exactness


def _adder(name: str, n: int, hold: bool, done) -> None:
    from knhk_memory.metrics import Metrics

    m = Metrics.attach(name)
    fam = m.counter("work", "Work items.", labels=("thread",))

    def run(t: int) -> None:
        child = fam.labels(thread=str(t))
        for _ in range(n):
            child.add()
        done.release()

    threads = [threading.Thread(target=run, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    if hold:
        while True:
            time.sleep(1)
    for th in threads:
        th.join()
    m.close()


def exactness(n: int = EXACT_N) -> dict:
    from knhk_memory.metrics import Metrics

    m = Metrics(shared=True, max_label_sets=16, max_cells=64)
    fam = m.counter("work", "Work items.", labels=("thread",))
    ctx = mp.get_context("fork")
    done = ctx.Semaphore(0)
    killed_n = n // 2 + 12_345
    t0 = time.perf_counter()
    ps = [ctx.Process(target=_adder, args=(m.name, n, False, done)) for _ in range(3)]
    doomed = ctx.Process(target=_adder, args=(m.name, killed_n, True, done))
    for p in [*ps, doomed]:
        p.start()
    for _ in range(8):
        done.acquire()
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join()
    again = ctx.Process(target=_adder, args=(m.name, n, False, done))
    again.start()
    for p in [*ps, again]:
        p.join()
    seconds = time.perf_counter() - t0
    want = 4 * n + killed_n
    got = [fam.get("0"), fam.get("1")]
    m.close()
    return {"adds": 2 * (4 * n + killed_n), "expected_per_label": want, "got": got, "exact": got == [want, want],
            "seconds": seconds}


# ---------------------------------------------------------------- pytest-benchmark entry points


def test_labelled_add_vs_prometheus_client(benchmark):
    r = _in_subprocess("_increments")
    ns = r["ns"]
    ratio = ns["knhk child.add"] / ns["prometheus_client inc (multiprocess)"]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({**{f"{k} ns": v for k, v in ns.items()}, "ratio": ratio})
    for k, v in ns.items():
        print(f"\n{k}: {v:.1f} ns/add")
    print(f"\nknhk child.add / prometheus_client inc = {ratio:.3f}x (goal <= 0.5x)")


def test_scrape_after_restarts(benchmark):
    r = _in_subprocess("_scrapes")
    growth = r["after"]["knhk_ms"] / r["before"]["knhk_ms"]
    speedup = r["after"]["prometheus_client_ms"] / r["after"]["knhk_ms"]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({"growth": growth, "speedup after restarts": speedup, **r})
    print(f"\n{json.dumps(r)}\nknhk after/before restarts {growth:.2f}x (goal <= 1.2x); "
          f"prometheus_client / knhk after restarts {speedup:.1f}x (goal >= 20x)")
    assert r["knhk_total_exact"]


def test_exactness_kill_and_restart(benchmark):
    r = exactness()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(r)
    print(f"\n{json.dumps(r)}")
    assert r["exact"]


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    inc = _in_subprocess("_increments")
    print("increments (ns/add, medians of", ROUNDS, "interleaved rounds of", N, "):", json.dumps(inc["ns"]))
    ns = inc["ns"]
    print("ratio knhk/prometheus_client:", ns["knhk child.add"] / ns["prometheus_client inc (multiprocess)"])
    sc = _in_subprocess("_scrapes")
    print("scrapes:", json.dumps(sc))
    print("knhk after/before:", sc["after"]["knhk_ms"] / sc["before"]["knhk_ms"],
          "prometheus_client/knhk after:", sc["after"]["prometheus_client_ms"] / sc["after"]["knhk_ms"])
    print("exactness:", json.dumps(exactness()))
