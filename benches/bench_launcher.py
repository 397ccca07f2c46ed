"""The backend as the whole process's allocator (``knhk-memory run``), against glibc + pymalloc.

Each workload runs in a fresh process, started four ways:

- ``glibc + pymalloc``: plainly, CPython's defaults (the peer);
- ``glibc + malloc``: ``knhk-memory run`` with ``backend = "system"`` (PYTHONMALLOC=malloc only);
- ``jemalloc``, ``mimalloc``: ``knhk-memory run`` with that backend preloaded, PYTHONMALLOC=malloc,
  the library's default options;
- ``jemalloc bg 1s``: the same with ``jemalloc = { background_thread = true, dirty_decay_ms = 1000 }``.

Workloads (the child half of this file, ``python bench_launcher.py child NAME``):

- ``frag``: a long-running engine's case state. THREADS threads each build ROUNDS rounds of CASES
  cases (a dict of variables, strings of 8 B to 4 KiB, lists, a history of tuples), keep about
  2 % of them for the whole run (the long-lived fraction) and drop the rest. Reported: peak RSS
  (VmHWM), final RSS once the threads are done and the garbage collected, and final RSS after one
  ``release_unused()`` (malloc_trim, jemalloc purge, mi_collect), in bytes.
- ``refhost``: the reference host's pure-Python one-case interpreter
  (``knhk_memory.refhost.reference.run_case``) over the demo's generated workflows; cases/s.

``python benches/bench_launcher.py [--rounds N]`` runs every start-up way in turn, N times,
interleaved, and prints medians and ratios against the peer (the figures in docs/allocators.md).
Under pytest-benchmark (``bash scripts/dev.sh bench -k launcher``) each way is one benchmark whose
time is the child's whole run; the RSS figures and the throughput go in ``extra_info``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

THREADS = 4
ROUNDS = 6
CASES = 4000
KEEP_EVERY = 200  # one case in 200 lives to the end of the run
IDLE_S = 1.5  # the engine idles before the final figure: time for decay-based purging
REF_WORKFLOWS = 300
REF_CASES = 40000
REF_REPS = 8

# way -> (backend, extra [allocator] lines); None: started plainly.
LAUNCHES: dict[str, tuple[str, str] | None] = {
    "glibc+pymalloc": None,
    "glibc+malloc": ("system", ""),
    "jemalloc": ("jemalloc", ""),
    "jemalloc bg 1s": ("jemalloc", "jemalloc = { background_thread = true, dirty_decay_ms = 1000 }\n"),
    "mimalloc": ("mimalloc", ""),
}
WAYS = tuple(LAUNCHES)
PEER = "glibc+pymalloc"
EXPECTED = {"glibc+pymalloc": ("system", "pymalloc"), "glibc+malloc": ("system", "malloc")}


# ---------------------------------------------------------------- the children

def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _case(rng: random.Random, n: int) -> dict:
    size = rng.choice((8, 24, 64, 200, 700, 1500, 4096))
    return {
        "id": n,
        "name": f"case-{n}-" + "x" * rng.randrange(1, size),
        "vars": {f"v{i}": (i * n if i % 3 == 0 else "s" * rng.randrange(8, 512) if i % 3 == 1 else [i] * (i % 7))
                 for i in range(rng.randrange(5, 20))},
        "history": [(t, "task", t * 0.5) for t in range(rng.randrange(2, 20))],
        "blob": bytes(rng.randrange(1, size + 1)),
    }


def child_frag() -> dict:
    # knhk_memory is loaded only after the figures are taken: the workload is
    # a pure-Python engine's, and the memory of knhk's imports (numpy, in some
    # versions) would blur what the allocators do with it.
    import ctypes

    start = _rss()["VmRSS"]
    kept: list[list[dict]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            work(t)
        except BaseException as exc:  # reported by the parent, not lost in a thread
            errors.append(exc)

    def work(t: int) -> None:
        rng = random.Random(2026 + t)
        for r in range(ROUNDS):
            live = [_case(rng, r * CASES + i) for i in range(CASES)]
            kept[t].extend(live[::KEEP_EVERY])
            # the engine touches the state, then the round's cases end
            for c in live:
                c["vars"]["done"] = True
            del live

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    gc.collect()
    time.sleep(IDLE_S)
    final = _rss()
    # The calls Backend.release_unused() makes, through the process's own symbols.
    backend = json.loads(os.environ.get("KNHK_MEMORY_RUN", '{"backend": "system"}'))["backend"]
    libc = ctypes.CDLL(None)
    if backend == "jemalloc":
        rc = libc.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
        assert rc == 0, rc
    elif backend == "mimalloc":
        libc.mi_collect(ctypes.c_bool(True))
    else:
        libc.malloc_trim(ctypes.c_size_t(0))
    after = _rss()
    assert sum(len(k) for k in kept) == THREADS * ROUNDS * CASES // KEEP_EVERY
    return {"seconds": seconds, "start_rss": start, "peak_rss": final["VmHWM"], "final_rss": final["VmRSS"],
            "released_rss": after["VmRSS"], **_identity()}


def child_refhost() -> dict:
    from knhk_memory.refhost.reference import run_case
    from knhk_memory.refhost.workflows import case_seed_one, generate_definitions, workflow_choice_one

    workflows = generate_definitions(REF_WORKFLOWS, seed=2026)
    seed = 7
    per_rep = REF_CASES // REF_REPS
    times, events = [], 0
    for rep in range(REF_REPS):
        t0 = time.perf_counter()
        for case in range(rep * per_rep, (rep + 1) * per_rep):
            wi = workflow_choice_one(case_seed_one(seed, case), len(workflows))
            events += len(run_case(workflows[wi], seed, case, wi))
        times.append(time.perf_counter() - t0)
    # The median repetition: a neighbour's burst on a shared machine lands in a few of them only.
    seconds = statistics.median(times)
    return {"seconds": sum(times), "cases_per_second": per_rep / seconds, "events": events, **_identity()}


def _identity() -> dict:
    from knhk_memory import launcher as process

    return {"malloc_backend": process.malloc_backend_name(), "python_allocator": process.python_allocator()}


# ---------------------------------------------------------------- the parent

def _configs(tmp: Path) -> dict[str, Path | None]:
    out: dict[str, Path | None] = {}
    for i, (way, launch) in enumerate(LAUNCHES.items()):
        if launch is None:
            out[way] = None
            continue
        path = tmp / f"way{i}.toml"
        path.write_text(f'[allocator]\nbackend = "{launch[0]}"\nscope = "process"\n{launch[1]}')
        out[way] = path
    return out


def run_child(way: str, config: Path | None, workload: str) -> dict:
    me = os.path.abspath(__file__)
    cmd = [sys.executable, me, "child", workload]
    if config is not None:
        cmd = [sys.executable, "-m", "knhk_memory", "run", "--config", str(config), "--", *cmd]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONMALLOC", "KNHK_MEMORY_RUN")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{way} {workload} failed ({r.returncode}): {r.stderr[-2000:]}")
    result = json.loads(r.stdout)
    launch = LAUNCHES[way]
    want = EXPECTED.get(way) or (launch[0] if launch else "system", "malloc")
    got = (result["malloc_backend"], result["python_allocator"])
    if got != want:
        raise RuntimeError(f"{way}: the child ran with {got}, expected {want}")
    return result


def measure(rounds: int, workloads: tuple[str, ...] = ("frag", "refhost")) -> dict:
    """Every way, ``rounds`` times, interleaved; per workload and way, the list of child results."""
    results: dict[str, dict[str, list[dict]]] = {w: {way: [] for way in WAYS} for w in workloads}
    with tempfile.TemporaryDirectory() as tmp:
        configs = _configs(Path(tmp))
        for _ in range(rounds):
            for workload in workloads:
                for way in WAYS:
                    results[workload][way].append(run_child(way, configs[way], workload))
    return results


def summarise(results: dict) -> str:
    lines = []
    if "frag" in results:
        frag = results["frag"]
        med = {way: {k: statistics.median(r[k] for r in runs) for k in ("peak_rss", "final_rss", "released_rss",
                                                                        "seconds")}
               for way, runs in frag.items()}
        peer = med[PEER]
        lines += [(f"fragmentation workload: {THREADS} threads x {ROUNDS} rounds x {CASES} cases, 1 in "
                   f"{KEEP_EVERY} kept; medians of {len(frag[PEER])} runs"),
                  "", "| started as | peak RSS | final RSS | final RSS after release_unused() | time |",
                  "|---|---|---|---|---|"]
        for way in WAYS:
            m = med[way]
            lines.append(f"| {way} | {m['peak_rss'] / 2**20:.0f} MiB ({m['peak_rss'] / peer['peak_rss']:.2f}x) | "
                         f"{m['final_rss'] / 2**20:.0f} MiB ({m['final_rss'] / peer['final_rss']:.2f}x) | "
                         f"{m['released_rss'] / 2**20:.0f} MiB ({m['released_rss'] / peer['final_rss']:.2f}x) | "
                         f"{m['seconds']:.2f} s ({peer['seconds'] / m['seconds']:.2f}x) |")
        lines.append("")
    if "refhost" in results:
        ref = results["refhost"]
        med = {way: statistics.median(r["cases_per_second"] for r in runs) for way, runs in ref.items()}
        lines += [(f"reference interpreter: {REF_CASES} cases of {REF_WORKFLOWS} demo workflows in {REF_REPS} "
                   f"repetitions; median repetition, median of {len(ref[PEER])} runs"), "",
                  "| started as | cases/s | vs glibc + pymalloc |", "|---|---|---|"]
        for way in WAYS:
            lines.append(f"| {way} | {med[way]:,.0f} | {med[way] / med[PEER]:.2f}x |")
    return "\n".join(lines)


# ---------------------------------------------------------------- pytest-benchmark

# Only under pytest: a child must not pay for importing it (its RSS is measured).
if "pytest" in sys.modules:
    import pytest

    @pytest.fixture(scope="module")
    def configs(tmp_path_factory):
        return _configs(tmp_path_factory.mktemp("launcher"))

    @pytest.mark.parametrize("way", WAYS)
    def test_fragmentation(benchmark, configs, way):
        benchmark.group = "launcher: fragmentation workload (whole child run)"
        benchmark.extra_info.update(label=way, peer=way == PEER, ops=1)
        runs: list[dict] = []
        benchmark.pedantic(lambda: runs.append(run_child(way, configs[way], "frag")), rounds=3, iterations=1)
        for key in ("peak_rss", "final_rss", "released_rss"):
            benchmark.extra_info[key] = statistics.median(r[key] for r in runs)

    @pytest.mark.parametrize("way", WAYS)
    def test_reference_interpreter(benchmark, configs, way):
        benchmark.group = "launcher: reference interpreter (whole child run)"
        benchmark.extra_info.update(label=way, peer=way == PEER, ops=REF_CASES)
        runs: list[dict] = []
        benchmark.pedantic(lambda: runs.append(run_child(way, configs[way], "refhost")), rounds=3, iterations=1)
        benchmark.extra_info["cases_per_second"] = statistics.median(r["cases_per_second"] for r in runs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        print(json.dumps({"frag": child_frag, "refhost": child_refhost}[argv[1]]()))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("frag", "refhost"))
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    args = parser.parse_args(argv)
    results = measure(args.rounds, (args.only,) if args.only else ("frag", "refhost"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(summarise(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
