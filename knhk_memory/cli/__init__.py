"""The ``knhk-memory`` command: one module per subcommand, each calling the library's public API.

``main(argv) -> int`` does the work, so tests call it directly.
``console_main`` is the installed script: it first makes sure the process can
load jemalloc (see :data:`knhk_memory.allocator.STATIC_TLS_TUNABLE`), by
re-executing itself once with the glibc tunable set.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence

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

class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: arguments it does not know are its own usage error.

    argparse hands a subcommand's unknown arguments back to the top-level parser,
    which then prints the top-level usage and ``knhk-memory: error: unrecognized
    arguments``. This one refuses them itself, as the README says: that
    subcommand's usage and ``knhk-memory demo: error: unrecognized arguments:
    ...``, exit 2. The innermost subcommand (``store get``) refuses first.
    """

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knhk-memory", description="knhk-memory: the memory subsystem "
                                     "of a knhk-style workflow engine.")
    config_help = ("configuration file (TOML); default: $KNHK_MEMORY_CONFIG, ./knhk.toml, "
                   "[tool.knhk-memory] in ./pyproject.toml, built-in defaults")
    parser.add_argument("--config", metavar="PATH", help=config_help)
    # --config is accepted after the command too; there it overrides.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=SubcommandParser)
    # Imported here, not at the top: console_main may re-execute the process
    # before any of them is needed.
    from .budget import add_budget_command
    from .demo import add_demo_command
    from .info import add_info_command
    from .metrics import add_metrics_command
    from .run import add_run_command
    from .shm import add_shm_command
    from .store import add_store_commands

    for add in (add_info_command, add_budget_command, add_store_commands, add_demo_command, add_run_command,
                add_metrics_command, add_shm_command):
        add(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status.

    0 success; 1 a failed check, a missing key or an output that could not be
    written whole (the message says which); 2 a usage, input or configuration
    error (``knhk-memory: error: ...``); 141 (128 + SIGPIPE) when the reader of
    standard output went away (``| head``), without a word, as a C tool killed
    by SIGPIPE would.
    """
    from ..errors import KnhkMemoryError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        return closed_pipe_exit()
    except KnhkMemoryError as exc:
        return error(str(exc))
    except UnicodeError as exc:  # a file or key name that is not text
        return error(f"{exc}")
    except MemoryError as exc:
        return error(f"out of memory{': ' + str(exc) if str(exc) else ''}", status=1)
    except OSError as exc:  # anything the commands did not name themselves: still no traceback
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return error(f"{where}{exc.strerror or exc}", status=1)
    except KeyboardInterrupt:
        return 130


def error(message: str, *, status: int = 2) -> int:
    """Print ``knhk-memory: error: MESSAGE`` to standard error; return ``status``."""
    try:
        print(f"knhk-memory: error: {message}", file=sys.stderr)
    except (OSError, ValueError):
        pass
    return status


def closed_pipe_exit() -> int:
    """Standard output's reader has gone: point the descriptor at /dev/null so
    the interpreter's final flush cannot fail again, and exit 141 quietly."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stdout (tests)
        return 141
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    return 141


def port_arg(option: str) -> Callable[[str], int]:
    """An argparse type for ``option``: a TCP port number, 0..65535 (0: any free port)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be a TCP port number, got {text!r}") from None
        if not 0 <= v <= 65535:
            raise argparse.ArgumentTypeError(f"{option} must be a port in 0..65535 (0: any free port), got {v}")
        return v
    return parse


def write_all(data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to standard output, or raise.

    A non-blocking descriptor (a pipe left O_NONBLOCK by the shell or the
    reader) takes the rest after ``poll`` says it is writable, instead of
    stopping at the pipe's 64 KiB; a write that makes no progress raises
    OSError (EPIPE: BrokenPipeError).
    """
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    sys.stdout.flush()
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            n = os.write(fd, view[done:done + (1 << 20)])
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OSError(exc.errno, f"writing standard output: {exc.strerror}; {done} of {len(view)} "
                          "bytes written, the output is incomplete") from None
        if n == 0:
            raise OSError(errno.EIO, f"standard output took 0 of {len(view) - done} bytes "
                          f"({done} of {len(view)} written)")
        done += n
