"""``knhk-memory budget``: measure every hot path and hold it to its budget."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._core import lib
from ..budgets import COUNTERS, Settings, format_table, run_budgets

__all__ = ["add_budget_command"]


def _cmd_budget(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..host import configured, get_plugin_manager, with_memory_plugin

    config = load_config(args.config)
    only = [n for item in (args.only or []) for n in item.split(",") if n]
    settings = Settings(batches=args.batches) if args.batches else Settings()
    pm = with_memory_plugin(get_plugin_manager())
    with configured(pm, config):
        report = run_budgets(config, pm=pm, only=only, counter=args.counter, settings=settings)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_table(report))
    return 1 if report.failed else 0


def _batches_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer number of batches, got {text!r}") from None
    if not 3 <= n <= lib.KNHK_TICKS_MAX_BATCHES:
        raise argparse.ArgumentTypeError(f"must be from 3 to {lib.KNHK_TICKS_MAX_BATCHES}, got {n}")
    return n


def add_budget_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("budget", parents=[common],
                       help="measure every hot path and hold it to its budget (exit 1 when one is broken)",
                       description="Measure every hot-path operation (C ones in ticks, Python calls in "
                                   "nanoseconds) and compare with its budget from [budgets] or the default. "
                                   "Exit status: 0 all kept, 1 a budget broken, 2 a usage or config error.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="measure only this operation (repeat, or separate with commas)")
    p.add_argument("--counter", choices=list(COUNTERS), default="auto",
                   help="tick counter for C operations (default: the best this machine has)")
    p.add_argument("--batches", type=_batches_arg, metavar="N",
                   help=f"batches per C operation (default {Settings.batches})")
    p.set_defaults(func=_cmd_budget)
