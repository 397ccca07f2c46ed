"""``knhk-memory metrics``: print or serve a scrape of an engine's shared metrics.

Attaches to the metrics block ``[metrics] shared_name`` names (and, when
``[counters] shared_name`` is set and exists, to the counter block and its
``.patterns`` block), prints one scrape in the Prometheus text format (or
OpenMetrics with ``--openmetrics``), or with ``--serve PORT`` answers scrapes
on ``--bind`` (default 127.0.0.1) until interrupted: a side-car endpoint that
needs no code in the engine's workers.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from . import port_arg

__all__ = ["add_metrics_command", "sources_from_config"]


def sources_from_config(config: Any) -> tuple[list[Any], list[Any]]:
    """The sources a scrape of ``config``'s engine reads, and the blocks to close after."""
    from ..counters import Counters, PatternStats
    from ..errors import SharedBlockNotFoundError
    from ..metrics import CountersSource, Metrics, PatternStatsSource

    block = Metrics.from_config(config, attach=True)
    sources: list[Any] = [block]
    opened: list[Any] = [block]
    name = config.counters.shared_name
    if name:
        try:
            counters = Counters.attach(name)
        except SharedBlockNotFoundError:
            counters = None
        if counters is not None:
            opened.append(counters)
            sources.append(CountersSource(counters))
            if config.counters.pattern_stats:
                try:
                    stats = PatternStats.attach(name + ".patterns")
                except SharedBlockNotFoundError:
                    stats = None
                if stats is not None:
                    opened.append(stats)
                    sources.append(PatternStatsSource(stats))
    return sources, opened


def _cmd_metrics(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..metrics import generate, make_server

    config = load_config(args.config)
    sources, opened = sources_from_config(config)
    try:
        if args.serve is None:
            sys.stdout.write(generate(*sources, openmetrics=args.openmetrics))
            return 0
        server = make_server(sources, args.bind, args.serve)
        host, port = server.server_address[:2]
        print(f"serving metrics on http://{host}:{port}/metrics (Ctrl-C to stop)", flush=True)

        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0
    finally:
        for b in opened:
            b.close()


def add_metrics_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("metrics", parents=[common], help="print or serve a scrape of the engine's shared metrics",
                       description="Attach to the metrics block named by [metrics] shared_name (and the counter "
                                   "blocks named by [counters] shared_name, when they exist) and print one scrape "
                                   "in the Prometheus text format 0.0.4, or serve scrapes over HTTP.")
    p.add_argument("--openmetrics", action="store_true", help="print OpenMetrics 1.0 instead (ends with # EOF)")
    p.add_argument("--serve", type=port_arg("--serve"), metavar="PORT",
                   help="serve scrapes on PORT until interrupted (0: any free port, printed); the format follows "
                        "the scraper's Accept header")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="address to serve on (default 127.0.0.1: this machine only)")
    p.set_defaults(func=_cmd_metrics)
