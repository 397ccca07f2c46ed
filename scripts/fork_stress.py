"""Fork from a thread while other threads initialise every knhk service; count hangs.

Each try is a fresh *trial* process (forked from this driver, which has not
initialised anything yet, so every once-cell of the trial starts empty). The
trial starts worker threads that each initialise the services in a random
order (the C calls release the GIL, so a worker can sit inside a 20 ms
measurement or a dlopen), and after a random delay one randomly chosen thread
(a worker or the main thread) forks. The forked child must then use every
service within the timeout; a child that does not finish is a hang.

Two modes (both by default):

- ``c``: the C core alone, through the cffi module loaded without the Python
  package, so the CPU-feature and SIMD cells (which importing ``knhk_memory``
  fills) start empty too. Services: CPU features, SIMD dispatch, tick-counter
  calibration, ``knhk_counters_ticks_per_second`` (20 ms), the three allocator
  backends and their statistics slots, and a counter block (thread-exit key,
  handle registry).
- ``py``: the Python package: ``PatternStats.ticks_per_second()``,
  ``get_backend`` for every backend (its load lock), ``Counters`` adds, an
  ``OnceLock`` with a slow initialiser, an ``Arena`` and a numpy scope on it,
  a ``GlobalResourceRegistry`` resource with a slow factory, and a
  ``WorkflowStore`` read through its decode cache.

Usage: ``python scripts/fork_stress.py [--tries 200] [--timeout 10] [--mode c|py|both] [--seed N]``.
Prints one JSON object per mode: tries, hangs, failures (child exited non-zero)
and the seconds taken. tests/test_fork_safety.py runs it (docs/reliability.md).
Exit status 1 if any try hung or failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HANG, FAILED = 3, 4
_STORE: str | None = None  # py mode: a store file the trials open
_KEEP: list[Any] = []  # c mode: block memory that must stay mapped until the trial exits


# ---------------------------------------------------------------- services


def c_services() -> tuple[list[tuple[str, Callable[[], Any]]], Callable[[], None]]:
    """(name, call) pairs that initialise each C service, and a check for the child."""
    import importlib.machinery
    import importlib.util
    import mmap

    spec = importlib.util.find_spec("knhk_memory")  # finds, does not import, the package
    assert spec is not None and spec.submodule_search_locations
    pkg = spec.submodule_search_locations[0]
    so = next(os.path.join(pkg, f) for f in os.listdir(pkg) if f.startswith("_native") and f.endswith(".so"))
    loader = importlib.machinery.ExtensionFileLoader("_native", so)
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("_native", loader))
    loader.exec_module(mod)
    ffi, lib = mod.ffi, mod.lib
    # What a C host that forks does (the package registers the same hooks).
    os.register_at_fork(before=lib.knhk_fork_prepare, after_in_parent=lib.knhk_fork_parent,
                        after_in_child=lib.knhk_fork_child)

    def backend(i: int) -> Callable[[], Any]:
        def load() -> Any:
            out = ffi.new("knhk_backend **")
            err = ffi.new("char[256]")
            status = lib.knhk_backend_load(i, ffi.NULL, out, err, len(err))
            if status == lib.KNHK_OK:  # the statistics slot (its thread-exit key is a once-cell)
                p = lib.knhk_malloc(out[0], 64)
                lib.knhk_free(out[0], p)
            return status
        return load

    mem = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # the child's own copy
    buf = ffi.from_buffer(mem)
    names = b"a\0b\0"
    size = lib.knhk_counters_layout_size(lib.KNHK_COUNTERS_FLAVOR_SUM, 2, len(names))
    assert lib.knhk_counters_format(buf, size, lib.KNHK_COUNTERS_FLAVOR_SUM, 2, names, len(names)) == 0
    handle = ffi.new("knhk_counters **")
    assert lib.knhk_counters_open(buf, size, handle) == 0
    c = handle[0]

    # The block's memory outlives the trial: the handle is never closed, and a worker
    # thread's exit destructor (which gives its slot back in the block) can run after
    # join() has returned and trial() has dropped its locals. Unmapping the block under
    # an open handle is the caller's error in the C API (Counters closes the handle
    # first); here it crashed 2 trials in 3,600 under load with SIGSEGV.
    _KEEP.append((mem, buf))
    keep = (mem, buf)

    def counters() -> int:
        assert keep and lib.knhk_counters_add(c, 0, 1) == 0
        return 0

    tc = ffi.new("knhk_tick_counter *")
    services = [
        ("cpu_features", lambda: lib.knhk_cpu_features()),
        ("simd_init", lambda: lib.knhk_simd_init()),
        ("ticks_counter", lambda: lib.knhk_ticks_counter(tc)),
        ("ticks_per_second", lambda: lib.knhk_counters_ticks_per_second()),
        ("counters", counters),
    ] + [(f"backend_{i}", backend(i)) for i in range(lib.KNHK_BACKEND_COUNT)]

    def check() -> None:
        # The child: every service answers, and the counter block still counts.
        before = lib.knhk_counters_get(c, 0)
        for _, call in services:
            call()
        after = lib.knhk_counters_get(c, 0)
        assert after == before + 1, (before, after)
        assert lib.knhk_simd_init() == 0
        assert lib.knhk_counters_ticks_per_second() > 0

    return services, check


def py_services() -> tuple[list[tuple[str, Callable[[], Any]]], Callable[[], None]]:
    import numpy as np

    import knhk_memory as km

    # The modules first, as an engine has them once it is configured (the
    # memory plugin imports every capability): `import knhk_memory` loads its
    # submodules on first use (PEP 562), and a fork while another thread is
    # inside an import leaves the child waiting on CPython's per-module import
    # lock forever -- CPython's hazard, for any module imported lazily in a
    # thread, not a knhk lock (docs/reliability.md). This stress test is about
    # knhk's own initialisers and locks.
    for name in ("allocator", "arena", "counters", "once", "registry", "store", "simd"):
        importlib.import_module(f"knhk_memory.{name}")

    counters = km.Counters(["a"])
    cell: km.OnceLock[int] = km.OnceLock()

    def slow_init() -> int:
        time.sleep(0.005)
        return 7

    def backend(name: str) -> Callable[[], Any]:
        def load() -> Any:
            try:
                return km.get_backend(name)
            except km.BackendUnavailableError as exc:
                return exc
        return load

    def arena() -> None:
        with km.Arena() as a:
            a.alloc(100)
            with a.scope():
                np.zeros(10)  # through numpy's handler contextvar: the arena scope's handler

    resources = km.GlobalResourceRegistry(close_at_exit=False)
    resources.register("slow", lambda: time.sleep(0.005) or 1)
    store = km.open_store(_STORE) if _STORE else None

    def store_get() -> Any:
        return store.get_decoded("k") if store is not None else None

    services = [
        ("PatternStats.ticks_per_second", km.PatternStats.ticks_per_second),
        ("Counters.add", lambda: counters.add("a")),
        ("OnceLock", lambda: cell.get_or_init(slow_init)),
        ("Arena", arena),
        ("GlobalResourceRegistry.get", lambda: resources.get("slow")),
        ("WorkflowStore.get_decoded", store_get),
    ] + [(f"get_backend({n})", backend(n)) for n in km.allocator.BACKENDS]

    def check() -> None:
        before = counters.get("a")
        for _, call in services:
            call()
        assert counters.get("a") == before + 1
        assert cell.get_or_init(slow_init) == 7
        assert km.PatternStats.ticks_per_second() > 0

    return services, check


# ---------------------------------------------------------------- one try


def wait_child(pid: int, timeout: float) -> int | None:
    """The exit status of pid, or None if it did not end within timeout seconds (it is killed)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.002)


def trial(mode: str, seed: int, timeout: float) -> int:
    """Runs in a fresh trial process; returns its exit code."""
    import faulthandler

    faulthandler.enable(all_threads=True)  # a crash names its thread and Python frame, on stderr
    rng = random.Random(seed)
    services, check = c_services() if mode == "c" else py_services()
    workers = rng.randint(1, 3)
    forker = rng.randrange(workers + 1)  # workers + 1: the main thread
    fork_at = rng.uniform(0, 0.03)
    result: list[int] = []
    start = threading.Barrier(workers + 1)

    def do_fork() -> None:
        pid = os.fork()
        if pid == 0:
            import faulthandler

            faulthandler.dump_traceback_later(max(timeout - 1, 0.5), exit=False)  # where a hang is, on stderr
            try:
                check()
            except BaseException:
                import traceback

                traceback.print_exc()
                os._exit(FAILED)
            os._exit(0)
        code = wait_child(pid, timeout)
        if code not in (None, 0):
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            print(f"forked child (seed {seed}) ended with {how}", file=sys.stderr, flush=True)
        result.append(HANG if code is None else (0 if code == 0 else FAILED))

    def worker(k: int) -> None:
        order = services[:]
        rng_k = random.Random(seed * 31 + k)
        rng_k.shuffle(order)
        start.wait()
        t0 = time.monotonic()
        forked = False
        for _, call in order:
            if k == forker and not forked and time.monotonic() - t0 >= fork_at:
                do_fork()
                forked = True
            call()
        if k == forker and not forked:
            do_fork()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    start.wait()
    if forker == workers:
        time.sleep(fork_at)
        do_fork()
    for t in threads:
        t.join(timeout)
    if not result or any(t.is_alive() for t in threads):
        return HANG
    return result[0]


def run(mode: str, tries: int, timeout: float, seed: int) -> dict[str, Any]:
    if mode == "py":
        import tempfile

        import knhk_memory

        global _STORE
        # A store file, written once here; each trial opens it (its cache lock is one of the locks).
        _STORE = os.path.join(tempfile.mkdtemp(prefix="knhk_fork_stress_"), "s.kstore")
        with knhk_memory.WorkflowStoreWriter(_STORE) as w:
            w.add("k", b'{"v": 1}')
    t0 = time.monotonic()
    hangs = failures = 0
    for i in range(tries):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = FAILED
            try:
                code = trial(mode, seed + i, timeout)
            finally:
                os._exit(code)
        code = wait_child(pid, 2 * timeout + 5)
        if code is None or code == HANG:
            hangs += 1
            print(f"try {i} (seed {seed + i}) hung", file=sys.stderr)
        elif code != 0:
            failures += 1
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            print(f"try {i} (seed {seed + i}) failed: the trial ended with {how}", file=sys.stderr)
    if mode == "py" and _STORE:
        import shutil

        shutil.rmtree(os.path.dirname(_STORE), ignore_errors=True)
    return {"mode": mode, "tries": tries, "hangs": hangs, "failures": failures,
            "seconds": round(time.monotonic() - t0, 1), "seed": seed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tries", type=int, default=200, help="tries per mode (default 200)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds a forked child may take (default 10)")
    ap.add_argument("--mode", choices=("c", "py", "both"), default="both")
    ap.add_argument("--seed", type=int, default=None, help="first seed (default: random, printed)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    modes = ("c", "py") if args.mode == "both" else (args.mode,)
    bad = False
    for mode in modes:
        # The c mode must run before the package is imported (py mode imports it).
        report = run(mode, args.tries, args.timeout, seed)
        print(json.dumps(report), flush=True)
        bad |= bool(report["hangs"] or report["failures"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
