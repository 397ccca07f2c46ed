"""``knhk-memory demo``: run cases on the reference host and check the results."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..refhost.demo import DEFAULT_CASES, DEFAULT_SEED, default_event_log_path, format_summary, run_demo

__all__ = ["add_demo_command"]


def _positive(name: str) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {v}")
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..config import load_config

    config = load_config(args.config)
    result = run_demo(config, cases=args.cases, workers=args.workers, store=args.store, seed=args.seed,
                      progress=args.progress, budgets=args.budgets,
                      event_log=(default_event_log_path() if args.event_log is None else args.event_log or None))
    if args.json:
        result.pop("_budget_table", None)
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(format_summary(result))
    return 0 if result["ok"] else 1


def add_demo_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="run cases on the reference host and check the results",
                       description="Build (once) a store of generated workflow definitions, run cases of them "
                                   "on the reference host over the memory plugin, check every result and print "
                                   "a summary. Exit status: 0 all checks passed, 1 a check failed, 2 a usage or "
                                   "configuration error.")
    p.add_argument("--cases", type=_positive("--cases"), default=DEFAULT_CASES, metavar="N",
                   help=f"cases to run (default {DEFAULT_CASES:,})")
    p.add_argument("--workers", type=_positive("--workers"), default=1, metavar="N",
                   help="worker processes sharing the store and the counters (default 1: this process)")
    p.add_argument("--store", metavar="PATH", help="workflow store to run (built there with the generated "
                   "definitions if missing; default: [store] path, else a file in the cache directory)")
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
    p.set_defaults(func=_cmd_demo)
