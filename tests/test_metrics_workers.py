"""Worker restarts and a worker killed mid-run (issue 17): labelled adds stay exact,
slots of dead workers are reused, and the block stays one segment."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

from knhk_memory._core import lib
from knhk_memory.metrics import Metrics, generate

prom_parser = pytest.importorskip("prometheus_client.parser")

N = 30_000  # adds per thread; benches/bench_metrics.py runs the 1,000,000
K = 7_777  # adds per thread of the worker that is killed


def _adder(name: str, n: int, hold: bool, done) -> None:
    """2 threads x n labelled adds (thread t adds to thread="t"); with hold, report
    done and wait to be killed, still owning the slots."""
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
        while True:  # killed here, by SIGKILL, threads and slots alive
            time.sleep(1)
    for th in threads:
        th.join()
    m.close()


def test_four_workers_two_threads_one_killed_and_restarted_exact():
    m = Metrics(shared=True, max_label_sets=16, max_cells=64)
    fam = m.counter("work", "Work items.", labels=("thread",))
    ctx = mp.get_context("fork")
    done = ctx.Semaphore(0)
    workers = [ctx.Process(target=_adder, args=(m.name, N, False, done)) for _ in range(3)]
    doomed = ctx.Process(target=_adder, args=(m.name, K, True, done))
    for p in [*workers, doomed]:
        p.start()
    for _ in range(8):  # every thread finished its adds (the doomed worker's included)
        assert done.acquire(timeout=120)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(30)
    assert doomed.exitcode == -signal.SIGKILL
    restarted = ctx.Process(target=_adder, args=(m.name, N, False, done))
    restarted.start()
    for p in [*workers, restarted]:
        p.join(120)
        assert p.exitcode == 0
    want = 3 * N + K + N
    assert fam.get("0") == want and fam.get("1") == want
    scraped = prom_parser.text_string_to_metric_families(generate(m))
    values = {s.labels["thread"]: s.value for f in scraped for s in f.samples}
    assert values == {"0": want, "1": want}
    m.close()


def _one_shot(name: str) -> None:
    m = Metrics.attach(name)
    m.counter("restarts", "Worker runs.", labels=("kind",)).labels("w").add(3)
    os._exit(0)  # a worker that dies without closing: its slot stays owned by a dead pid


def test_restarted_workers_reuse_slots_and_the_block_stays_one_file(tmp_path):
    path = tmp_path / "metrics.block"
    m = Metrics(shared=str(path), max_label_sets=16, max_cells=64)
    fam = m.counter("restarts", "Worker runs.", labels=("kind",))
    ctx = mp.get_context("fork")
    runs = lib.KNHK_COUNTERS_SLOTS + 16  # more workers than slots: later ones take back dead ones' slots
    for _ in range(runs):
        p = ctx.Process(target=_one_shot, args=(m.name,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
    assert fam.get("w") == 3 * runs  # nothing an exited worker added is lost
    assert m.slots_owned() <= lib.KNHK_COUNTERS_SLOTS - 1
    assert os.listdir(tmp_path) == ["metrics.block"]  # one segment, whatever the restarts
    assert m.usage()["label_sets"] == 1
    assert m.reclaim_dead() >= 1 and m.slots_owned() == 0
    m.close()


def _observer(name: str, progress) -> None:
    m = Metrics.attach(name)
    h = m.histogram("busy_seconds", "Busy.", labels=("k",), buckets=(0.1, 1.0), sum_resolution=0.25).labels("x")
    c = m.counter("ops", "Ops.", labels=("k",)).labels("x")
    i = 0
    while True:  # killed somewhere in here, maybe between the bucket add and the sum add
        h.observe(0.5)
        c.add()
        i += 1
        progress.value = i


def test_a_scrape_after_a_writer_died_mid_update_is_consistent():
    m = Metrics(shared=True, max_label_sets=8, max_cells=64)
    ctx = mp.get_context("fork")
    progress = ctx.Value("q", 0, lock=False)
    p = ctx.Process(target=_observer, args=(m.name, progress))
    p.start()
    deadline = time.monotonic() + 60
    while progress.value < 20_000 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    done = progress.value
    fams = {f.name: f for f in prom_parser.text_string_to_metric_families(generate(m))}
    s = {(x.name, x.labels.get("le")): x.value for x in fams["busy_seconds"].samples}
    count = s[("busy_seconds_count", None)]
    assert count == s[("busy_seconds_bucket", "+Inf")] == s[("busy_seconds_bucket", "1.0")]  # count is the buckets'
    assert s[("busy_seconds_bucket", "0.1")] == 0
    assert done <= count <= done + 1  # at most the one observation in flight
    assert s[("busy_seconds_sum", None)] in (count * 0.5, (count - 1) * 0.5)  # its sum may be missing, no more
    ops = fams["ops"].samples[0].value
    assert done <= ops <= done + 1 and count - 1 <= ops <= count
    m.close()
