"""The ``knhk-memory`` command: one module per subcommand, each calling the library's public API.

``main(argv) -> int`` does the work, so tests call it directly.
``console_main`` is the installed script: it first makes sure the process can
load jemalloc (see :data:`knhk_memory.allocator.STATIC_TLS_TUNABLE`), by
re-executing itself once with the glibc tunable set.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

REEXEC_GUARD = "KNHK_MEMORY_REEXECED"


def console_main() -> None:
    _ensure_static_tls()
    sys.exit(main())


def _ensure_static_tls() -> None:
    """Restart once with room in static TLS for jemalloc, unless there already is."""
    from ..allocator import STATIC_TLS_TUNABLE

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.rtld.optional_static_tls" in tunables or os.environ.get(REEXEC_GUARD):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{STATIC_TLS_TUNABLE}" if tunables else STATIC_TLS_TUNABLE
    env[REEXEC_GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "knhk_memory", *sys.argv[1:]], env)
    except OSError as exc:  # pragma: no cover - exec of our own interpreter failing
        print(f"knhk-memory: could not restart with GLIBC_TUNABLES set ({exc}); "
              "jemalloc may not load", file=sys.stderr)


# ---------------------------------------------------------------- entry

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knhk-memory", description="knhk-memory: the memory subsystem "
                                     "of a knhk-style workflow engine.")
    config_help = ("configuration file (TOML); default: $KNHK_MEMORY_CONFIG, ./knhk.toml, "
                   "[tool.knhk-memory] in ./pyproject.toml, built-in defaults")
    parser.add_argument("--config", metavar="PATH", help=config_help)
    # --config is accepted after the command too; there it overrides.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Imported here, not at the top: console_main may re-execute the process
    # before any of them is needed.
    from .budget import add_budget_command
    from .demo import add_demo_command
    from .info import add_info_command
    from .run import add_run_command
    from .store import add_store_commands

    for add in (add_info_command, add_budget_command, add_store_commands, add_demo_command, add_run_command):
        add(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import KnhkMemoryError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KnhkMemoryError as exc:
        print(f"knhk-memory: error: {exc}", file=sys.stderr)
        return 2
