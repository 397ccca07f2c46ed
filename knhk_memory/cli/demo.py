"""``knhk-memory demo``: run cases on the reference host and check the results."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from ..refhost.demo import DEFAULT_CASES, DEFAULT_SEED, MAX_CASES, default_event_log_path, format_summary, run_demo
from . import port_arg

__all__ = ["add_demo_command"]


def _positive(name: str, limit: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {v}")
        if limit is not None and v > limit:
            raise argparse.ArgumentTypeError(f"{name} must be at most {limit:,}, got {v:,}")
        return v
    return parse


def _seed(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got {text!r}") from None
    if not 0 <= v < 1 << 64:
        raise argparse.ArgumentTypeError(f"--seed must be in 0..2**64-1, got {v}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cluster-timeout must be a number of seconds, got {text!r}") from None
    if not 0 < v <= 3600:
        raise argparse.ArgumentTypeError(f"--cluster-timeout must be in (0, 3600] seconds, got {text}")
    return v


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt, so the
    run unwinds: the worker pool is terminated and the shared blocks are closed and
    unlinked (issue 22: a plain SIGTERM used to leave them in /dev/shm)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: Any) -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # once: a second signal must not cut the cleanup
        signal.signal(s, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Stopped(signum)


def _cmd_demo(args: argparse.Namespace) -> int:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _stop)
    try:
        return _run(args)
    except _Stopped as exc:
        return 128 + exc.signum


def _run(args: argparse.Namespace) -> int:
    from ..config import load_config

    config = load_config(args.config)
    scrape: list[str] = []
    served: list[bool] = []

    def hook(sources: list[Any], result: dict[str, Any]) -> None:
        from ..metrics import generate, make_server

        if args.metrics_serve is None:
            scrape.append(generate(*sources, openmetrics=args.openmetrics))
            return
        _print(result, args.json)
        served.append(True)
        server = make_server(sources, args.metrics_bind, args.metrics_serve)
        host, port = server.server_address[:2]
        print(f"serving metrics on http://{host}:{port}/metrics (Ctrl-C to stop)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP (_stop): the end of serving, not an error
            pass
        finally:
            server.server_close()

    want = args.metrics or args.metrics_serve is not None
    result = run_demo(config, cases=args.cases, workers=args.workers, store=args.store, seed=args.seed,
                      progress=args.progress, budgets=args.budgets, build=args.build, cluster=args.cluster,
                      batch_cases=args.batch_cases, ship_store=args.ship_store, cluster_timeout=args.cluster_timeout,
                      metrics_hook=hook if want else None,
                      event_log=_event_log(args))
    if not served:
        _print(result, args.json)
    if scrape:
        sys.stdout.write("\n" + scrape[0])
    return 0 if result["ok"] else 1


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        result = {k: v for k, v in result.items() if k != "_budget_table"}
        print(json.dumps(result, indent=2, sort_keys=True), flush=True)
    else:
        print(format_summary(result), flush=True)


def add_demo_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="run cases on the reference host and check the results",
                       description="Build (once) a store of generated workflow definitions, run cases of them "
                                   "on the reference host over the memory plugin, check every result and print "
                                   "a summary. Exit status: 0 all checks passed, 1 a check failed, 2 a usage or "
                                   "configuration error.")
    p.add_argument("--cases", type=_positive("--cases", MAX_CASES), default=DEFAULT_CASES, metavar="N",
                   help=f"cases to run (default {DEFAULT_CASES:,})")
    p.add_argument("--workers", type=_positive("--workers"), default=None, metavar="N",
                   help="worker processes sharing the store and the counters (default 1: this process); not with "
                        "--cluster")
    p.add_argument("--cluster", metavar="SPEC", help="run the cases as Dask tasks: local[:N] (a LocalCluster of N "
                   "one-thread worker processes on 127.0.0.1; default N: one per CPU) or tcp://HOST:PORT (a running "
                   "scheduler). Needs the [dask] extra; see docs/distributed.md")
    p.add_argument("--batch-cases", type=_positive("--batch-cases"), default=None, metavar="N",
                   help="with --cluster: cases per Dask task (default: two tasks per worker, at most 5,000 "
                        "cases each)")
    p.add_argument("--ship-store", choices=("path", "content"), default=None,
                   help="with --cluster: workers open the store by path (a shared filesystem; default for local) "
                        "or get its bytes and keep them in their cache (default for tcp://)")
    p.add_argument("--cluster-timeout", type=_seconds, default=None, metavar="S",
                   help="with --cluster: seconds to wait for the scheduler (default 10)")
    p.add_argument("--store", metavar="PATH", help="an existing workflow store to run (default: [store] path, "
                   "else a store of generated definitions built once in the cache directory)")
    p.add_argument("--build", action="store_true", help="build the generated definitions at --store PATH "
                   "(or [store] path) when no file is there; the directory must exist")
    p.add_argument("--seed", type=_seed, default=DEFAULT_SEED, metavar="N",
                   help=f"seed of the cases' workflows and paths (default {DEFAULT_SEED})")
    lg = p.add_mutually_exclusive_group()
    lg.add_argument("--event-log", metavar="PATH", default=None,
                    help="write every event to PATH, a persistent MmapVec (emptied first; with --workers N, "
                         "PATH.w0 ... PATH.wN-1), and check that it reopens with the run's tallies (default: "
                         "demo-events.kvec in the cache directory)")
    lg.add_argument("--no-event-log", dest="event_log", action="store_const", const="",
                    help="run without the persistent event log")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-budgets", dest="budgets", action="store_false",
                   help="skip measuring the hot-path budget table")
    pg = p.add_mutually_exclusive_group()
    pg.add_argument("--progress", dest="progress", action="store_true", default=None,
                    help="always show the progress bar (default: on a terminal)")
    pg.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--metrics", action="store_true",
                   help="record metrics too (labelled counters, per-pattern latency histograms) and print a "
                        "scrape of them, the counters, allocator and arena figures after the summary")
    p.add_argument("--metrics-serve", type=port_arg("--metrics-serve"), metavar="PORT",
                   help="after the run, serve that scrape over HTTP on PORT (0: any free port) until interrupted")
    p.add_argument("--metrics-bind", default="127.0.0.1", metavar="ADDR",
                   help="address --metrics-serve listens on (default 127.0.0.1)")
    p.add_argument("--openmetrics", action="store_true", help="print the --metrics scrape as OpenMetrics 1.0")
    p.set_defaults(func=_cmd_demo)


def _event_log(args: argparse.Namespace) -> str | None:
    """The event log file: --event-log, none with --no-event-log, else the cache
    directory's (but none with --cluster: Dask workers may be on other machines)."""
    if args.event_log is None:
        return None if args.cluster else str(default_event_log_path())
    return args.event_log or None
