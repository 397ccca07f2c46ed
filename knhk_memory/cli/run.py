"""``knhk-memory run [--config F] [--inherit] -- CMD ARGS...``: start CMD with the configured backend
as its process allocator (see :mod:`knhk_memory.launcher` and docs/allocators.md).

The launcher replaces itself with CMD (``execvpe``): CMD gets the launcher's
pid, its signals and its exit status. Exit statuses of its own: 2 for a
configuration or a missing backend library, 127 for a command that is not
found, 126 for one that cannot be executed, as a shell does.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["add_run_command", "run_command"]


def run_command(command: list[str], config_path: str | None, inherit: bool, *, dry_run: bool = False,
                environ: dict[str, str] | None = None) -> int:
    """Exec ``command`` under the launch environment; returns only on failure
    (or with ``dry_run``, after printing the variables it would set)."""
    from ..config import load_config
    from ..errors import BackendUnavailableError
    from ..launcher import launch_environment
    from . import REEXEC_GUARD

    if not command:
        print("knhk-memory run: error: no command given; usage: knhk-memory run [--config F] [--inherit] -- "
              "CMD ARGS...", file=sys.stderr)
        return 2
    config = load_config(config_path)
    base = dict(os.environ if environ is None else environ)
    # The CLI's own restart (console_main) set these for this process only.
    if base.pop(REEXEC_GUARD, None) is not None:
        base["GLIBC_TUNABLES"] = _without_our_tunable(base.get("GLIBC_TUNABLES", ""))
        if not base["GLIBC_TUNABLES"]:
            del base["GLIBC_TUNABLES"]
    try:
        plan = launch_environment(config, base, inherit=inherit, config_path=config_path)
    except BackendUnavailableError as exc:
        raise config.error("allocator.backend", f"cannot start {command[0]!r}: {exc}") from None
    if dry_run:
        for var in plan.changed:
            print(f"{var}={plan.env[var]}")
        print(" ".join(command))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, plan.env)
    except FileNotFoundError:
        print(f"knhk-memory run: {command[0]}: command not found", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"knhk-memory run: {command[0]}: Permission denied", file=sys.stderr)
        return 126
    except OSError as exc:
        print(f"knhk-memory run: {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 126
    return 0  # pragma: no cover - execvpe does not return


def _without_our_tunable(tunables: str) -> str:
    from ..allocator import STATIC_TLS_TUNABLE

    return ":".join(t for t in tunables.split(":") if t and t != STATIC_TLS_TUNABLE)


def _cmd_run(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    return run_command(command, args.config, args.inherit, dry_run=args.dry_run)


def add_run_command(sub: Any, common: argparse.ArgumentParser) -> None:
    run = sub.add_parser(
        "run", parents=[common],
        help="start a command with the configured backend as its whole process's allocator",
        description="Start CMD with the configured allocator backend preloaded (LD_PRELOAD), CPython's objects "
                    "allocated with malloc (PYTHONMALLOC=malloc), the backend's options from [allocator.<backend>] "
                    "and, for jemalloc, the static-TLS tunable. The knhk plugin takes the preload out of the "
                    "environment at knhk_configure, so the engine's subprocesses do not inherit it, unless "
                    "--inherit is given.")
    run.add_argument("--inherit", action="store_true",
                     help="let the command's children inherit the preload and the other variables")
    run.add_argument("--dry-run", action="store_true",
                     help="print the variables that would be set and the command, and do not run it")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...",
                     help="the command to run and its arguments, after --")
    run.set_defaults(func=_cmd_run)
