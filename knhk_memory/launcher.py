"""The backend as the allocator of the whole process, not only of what knhk allocates.

With ``[allocator] scope = "process"`` the engine process is started by
``knhk-memory run``: the backend's library is preloaded (``LD_PRELOAD``), so
its ``malloc`` is the process's, and CPython is told to take its objects from
``malloc`` (``PYTHONMALLOC=malloc``) instead of pymalloc's own arenas, which
it maps directly and no allocator ever sees. This module

* builds the launcher's environment (:func:`launch_environment`) and finds
  the backend's library without loading it (:func:`find_library`);
* checks, from inside a process, that it really was started that way
  (:func:`check_process_scope`, from the library that owns ``malloc`` and
  CPython's object allocator, never from the environment alone);
* takes the launcher's variables out of ``os.environ`` once the check passed
  (:func:`strip_launcher_environment`), so the engine's own subprocesses do
  not inherit the preload unless the launcher was asked to (``--inherit``),
  and can put them back for workers that should (:func:`launched_environment`);
* reports where the process's memory goes (:func:`process_stats`).

It does not exec anything: the ``run`` command of the CLI does.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sysconfig
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._core import check, ffi, lib
from .allocator import DEBIAN_PACKAGES, SONAMES, STATIC_TLS_TUNABLE, BackendName, get_backend, library_override
from .config import BACKEND_OPTIONS, Config
from .errors import BackendUnavailableError, ProcessInspectError

__all__ = [
    "MARKER", "LaunchPlan", "find_library", "resolve_launch_backend", "launch_environment", "backend_options_env",
    "malloc_owner", "python_allocator", "launch_marker", "check_process_scope", "strip_launcher_environment",
    "launched_environment", "process_stats", "inspect_process", "rss_bytes", "malloc_backend_name",
]

MARKER = "KNHK_MEMORY_RUN"
"""Environment variable the launcher sets: JSON with the backend, its library,
whether children inherit the launch, and the launcher's variables' previous values."""

_AUTO_ORDER = ("mimalloc", "jemalloc")
_LAUNCHER_VARIABLES = frozenset({"LD_PRELOAD", "PYTHONMALLOC", "GLIBC_TUNABLES", "MALLOC_CONF", "KNHK_MEMORY_CONFIG"})


# ---------------------------------------------------------------- finding the library

def _search_dirs() -> list[str]:
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for base in ("/usr/local/lib", "/lib", "/usr/lib"):
        if multiarch:
            dirs.append(f"{base}/{multiarch}")
        dirs.append(base)
    return dirs


def _ldconfig_lookup(soname: str) -> str | None:
    for exe in ("/sbin/ldconfig", "/usr/sbin/ldconfig"):
        if not os.path.exists(exe):
            continue
        try:
            out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            name, _, rest = line.strip().partition(" ")
            if name == soname and "=>" in rest:
                path = rest.split("=>", 1)[1].strip()
                if os.path.isfile(path):
                    return path
        return None
    return None


def find_library(name: str) -> str:
    """The path of backend ``name``'s shared object, found without loading it.

    ``KNHK_MEMORY_<NAME>_LIBRARY`` wins when set; otherwise the soname
    (``libjemalloc.so.2``, ``libmimalloc.so.2``) is looked for in
    ``LD_LIBRARY_PATH``, the standard library directories and ``ldconfig -p``.
    Raises ValueError for a name that is not jemalloc or mimalloc (system has
    no library to preload) and :class:`BackendUnavailableError` naming the
    Debian package when the file is not there.
    """
    if name not in SONAMES:
        raise ValueError(f"only jemalloc and mimalloc have a library to preload, got {name!r}")
    package = DEBIAN_PACKAGES[name]
    override = library_override(name)  # an existing, trusted regular file, or it raises
    if override is not None:
        return os.path.abspath(override)
    soname = SONAMES[name]
    dirs = _search_dirs()
    for d in dirs:
        candidate = os.path.join(d, soname)
        if os.path.isfile(candidate):
            return candidate
    found = _ldconfig_lookup(soname)
    if found is not None:
        return found
    raise BackendUnavailableError(
        f"{name} backend: {soname} is not installed (not in {', '.join(dirs)} nor in ldconfig's cache). "
        f"Install the Debian package {package}: apt-get install {package}")


def resolve_launch_backend(configured: str) -> tuple[str, str | None]:
    """The backend the launcher preloads for a configured name, and its library
    (None for system). ``auto`` is the first of mimalloc, jemalloc whose library
    is installed, else system, as :func:`knhk_memory.allocator.resolve_backend`."""
    if configured == "system":
        return "system", None
    if configured != "auto":
        return configured, find_library(configured)
    for name in _AUTO_ORDER:
        try:
            return name, find_library(name)
        except BackendUnavailableError:
            continue
    return "system", None


# ---------------------------------------------------------------- the launcher's environment

def _flag(value: Any, true: str, false: str) -> str:
    return (true if value else false) if isinstance(value, bool) else str(value)


def backend_options_env(name: str, options: Mapping[str, Any], base: Mapping[str, str]) -> dict[str, str]:
    """The variables that pass ``options`` (checked by the config) to backend
    ``name``, merged with what ``base`` already holds:

    * jemalloc: ``MALLOC_CONF`` pairs after any already there (jemalloc reads
      the string left to right, so the configured value wins);
    * mimalloc: one ``MIMALLOC_<NAME>`` each; ``purge_delay`` is also set as
      ``MIMALLOC_RESET_DELAY``, its name before mimalloc 2.1 (Debian 12 ships 2.0.9);
    * system: ``glibc.malloc.<name>=<value>`` entries in ``GLIBC_TUNABLES``.
    """
    for key in options:
        if key not in BACKEND_OPTIONS[name]:
            raise ValueError(f"unknown {name} option {key!r}; accepted options: {', '.join(BACKEND_OPTIONS[name])}")
    env: dict[str, str] = {}
    if not options:
        return env
    if name == "jemalloc":
        pairs = ",".join(f"{k}:{_flag(v, 'true', 'false')}" for k, v in options.items())
        old = base.get("MALLOC_CONF", "")
        env["MALLOC_CONF"] = f"{old},{pairs}" if old else pairs
    elif name == "mimalloc":
        for k, v in options.items():
            env[f"MIMALLOC_{k.upper()}"] = _flag(v, "1", "0")
            if k == "purge_delay":
                env["MIMALLOC_RESET_DELAY"] = str(v)
    else:
        entries = [f"glibc.malloc.{k}={v}" for k, v in options.items()]
        env["GLIBC_TUNABLES"] = _add_tunables(base.get("GLIBC_TUNABLES", ""), entries)
    return env


def _add_tunables(current: str, entries: list[str]) -> str:
    names = {e.split("=", 1)[0] for e in entries}
    kept = [t for t in current.split(":") if t and t.split("=", 1)[0] not in names]
    return ":".join(kept + entries)


@dataclass(frozen=True)
class LaunchPlan:
    """What ``knhk-memory run`` gives the command: the backend, its library
    (None for system) and the complete environment."""

    backend: str
    library: str | None
    env: dict[str, str]
    changed: tuple[str, ...]


def launch_environment(config: Config, base: Mapping[str, str] | None = None, *, inherit: bool = False,
                       config_path: str | None = None) -> LaunchPlan:
    """The environment that starts a command with the configured backend as its
    process allocator (whatever ``[allocator] scope`` says: the launcher is the
    way to get ``"process"``).

    Sets ``LD_PRELOAD`` (the library first, any earlier entries kept after it),
    ``PYTHONMALLOC=malloc``, for jemalloc the static-TLS tunable
    (:data:`knhk_memory.allocator.STATIC_TLS_TUNABLE`), the backend's options
    from ``[allocator.<backend>]``, ``KNHK_MEMORY_CONFIG`` when ``config_path``
    is given, and :data:`MARKER`. Raises :class:`BackendUnavailableError`
    (naming the Debian package) when the library is missing.
    """
    base = dict(os.environ if base is None else base)
    name, library = resolve_launch_backend(config.allocator.backend)
    changes: dict[str, str] = {"PYTHONMALLOC": "malloc"}
    if library is not None:
        old = base.get("LD_PRELOAD", "")
        rest = [p for p in old.replace(" ", ":").split(":") if p and p != library]
        changes["LD_PRELOAD"] = ":".join([library, *rest])
    if name == "jemalloc":
        changes["GLIBC_TUNABLES"] = _add_tunables(base.get("GLIBC_TUNABLES", ""), [STATIC_TLS_TUNABLE])
    merged_base = {**base, **changes}
    changes.update(backend_options_env(name, config.allocator[name], merged_base))
    if config_path is not None:
        changes["KNHK_MEMORY_CONFIG"] = os.path.abspath(config_path)
    saved = {var: base.get(var) for var in changes}
    marker = {"backend": name, "library": library, "inherit": bool(inherit), "saved": saved,
              "launcher_pid": os.getpid()}
    changes[MARKER] = json.dumps(marker, sort_keys=True)
    return LaunchPlan(name, library, {**base, **changes}, tuple(sorted(changes)))


def launch_marker(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The launcher's marker in ``environ`` (default ``os.environ``), decoded;
    None when absent or not ours (a malformed value is ignored, not trusted)."""
    raw = (os.environ if environ is None else environ).get(MARKER)
    if not raw:
        return None
    try:
        marker = json.loads(raw)
    except ValueError:
        return None
    if not (isinstance(marker, dict) and isinstance(marker.get("backend"), str)
            and isinstance(marker.get("saved"), dict)
            and all(isinstance(k, str) and _launcher_variable(k) and (v is None or isinstance(v, str))
                    for k, v in marker["saved"].items())):
        return None
    return marker


def _launcher_variable(name: str) -> bool:
    # Only what launch_environment sets may be put back: a marker naming PATH
    # or HOME is not ours, and stripping must never touch those.
    return name in _LAUNCHER_VARIABLES or (name.startswith("MIMALLOC_") and name[9:].isidentifier())


# ---------------------------------------------------------------- what the process really uses

def malloc_owner() -> str:
    """The path of the shared object whose ``malloc`` this process calls (a
    preloaded allocator, else libc), as the dynamic loader recorded it."""
    buf = ffi.new("char[4096]")
    check(lib.knhk_process_malloc_owner(buf, len(buf)), "finding the library that defines malloc")
    return ffi.string(buf).decode("utf-8", "replace")


class _Allocator(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("malloc", ctypes.c_void_p), ("calloc", ctypes.c_void_p),
                ("realloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]


def python_allocator() -> str:
    """Which allocator CPython's object domain uses: ``"malloc"``
    (``PYTHONMALLOC=malloc``), ``"pymalloc"`` (the default), their ``_debug``
    forms (``-X dev``, a debug build), or ``"unknown"`` (another hook, such as
    tracemalloc, is installed over it). Read from ``PyMem_GetAllocator``, so it
    is what the interpreter does, not what the environment says."""
    get = ctypes.pythonapi.PyMem_GetAllocator
    get.argtypes = [ctypes.c_int, ctypes.POINTER(_Allocator)]
    get.restype = None
    raw, obj = _Allocator(), _Allocator()
    get(0, ctypes.byref(raw))  # PYMEM_DOMAIN_RAW
    get(2, ctypes.byref(obj))  # PYMEM_DOMAIN_OBJ
    if obj.malloc == raw.malloc and obj.ctx == raw.ctx:
        return "malloc"
    if raw.ctx and obj.ctx:
        # The debug hooks wrap each domain: ctx points to {char api_id; PyMemAllocatorEx alloc}
        # (Objects/obmalloc.c, debug_alloc_api_t); raw's api_id is 'r', obj's 'o'.
        if ctypes.c_char.from_address(raw.ctx).value == b"r" and ctypes.c_char.from_address(obj.ctx).value == b"o":
            offset = ctypes.sizeof(ctypes.c_void_p)
            inner_raw = _Allocator.from_address(raw.ctx + offset)
            inner_obj = _Allocator.from_address(obj.ctx + offset)
            if inner_obj.malloc == inner_raw.malloc and inner_obj.ctx == inner_raw.ctx:
                return "malloc_debug"
            return "pymalloc_debug" if not inner_obj.ctx else "unknown"
        return "unknown"
    return "pymalloc" if not obj.ctx else "unknown"


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _is_libc(path: str) -> bool:
    return Path(path).name.startswith(("libc.so", "libc-"))


def malloc_backend_name(owner: str | None = None) -> BackendName | None:
    """Which knhk backend's library serves the process's malloc: ``"system"``
    for libc, ``"jemalloc"`` or ``"mimalloc"`` when that library (as knhk would
    load it) is the owner, None for anything else (tcmalloc, say)."""
    owner = malloc_owner() if owner is None else owner
    if _is_libc(owner):
        return "system"
    names: tuple[BackendName, ...] = ("jemalloc", "mimalloc")
    for name in names:
        soname = SONAMES[name]
        override = library_override(name)
        if ((override and _same_file(owner, override)) or Path(owner).name == soname
                or Path(os.path.realpath(owner)).name.startswith(soname)):
            return name
    return None


def _start_hint(config: Config) -> str:
    source = config.source
    if source.endswith(" [tool.knhk-memory]"):
        source = source[: -len(" [tool.knhk-memory]")]
    path = source if not source.startswith("<") else None
    if config.origin == "$KNHK_MEMORY_CONFIG":
        path = None  # the launcher passes the environment on
    option = f"--config {path} " if path else ""
    return f"knhk-memory run {option}-- CMD ARGS..."


def check_process_scope(config: Config, backend_name: str, backend_path: str) -> None:
    """Raise a :class:`ConfigError` on ``allocator.scope`` unless this process
    runs with ``backend_name`` (loaded from ``backend_path``) as its malloc and
    CPython's objects allocated by malloc. The message says what was found and
    how to start the process; nothing falls back."""
    problems = []
    try:
        owner = malloc_owner()
    except Exception as exc:  # the loader cannot say: that is a mismatch too, said plainly
        owner = f"<unknown: {exc}>"
    ok = _is_libc(owner) if backend_name == "system" else _same_file(owner, backend_path)
    if not ok:
        problems.append(f"malloc comes from {owner}, not from the {backend_name} backend's "
                        f"{'libc' if backend_name == 'system' else backend_path}")
    py = python_allocator()
    if py not in ("malloc", "malloc_debug"):
        problems.append(f"CPython allocates its objects with {py}, not malloc (PYTHONMALLOC=malloc was not set "
                        "when the interpreter started)")
    if not problems:
        return
    marker = launch_marker()
    launched = (f" The process was started by knhk-memory run with backend {marker['backend']}; the config "
                f"names {config.allocator.backend}." if marker is not None else "")
    raise config.error("allocator.scope",
                       f'scope = "process" needs the engine process started by the launcher: '
                       f"{'; '.join(problems)}.{launched} Start it with: {_start_hint(config)} "
                       f'(or set scope = "arrays")')


# ---------------------------------------------------------------- children

_stripped: dict[str, str] = {}


def strip_launcher_environment(environ: Any = None) -> bool:
    """Put back the variables the launcher changed (``LD_PRELOAD``,
    ``PYTHONMALLOC``, ``MALLOC_CONF``, ...) to what they were before it ran,
    and drop the marker, unless the launch was made with ``--inherit``.

    The running process keeps its allocator (the loader and CPython read those
    variables once, at start); commands it starts afterwards no longer inherit
    them. Returns whether anything was changed. The plugin calls it at
    ``knhk_configure``; :func:`launched_environment` puts the launch back for
    workers that should run under the backend too.
    """
    env = os.environ if environ is None else environ
    marker = launch_marker(env)
    if marker is None or marker.get("inherit"):
        return False
    launched = {var: env[var] for var in marker["saved"] if var in env}
    launched[MARKER] = env[MARKER]
    for var, old in marker["saved"].items():
        if old is None:
            env.pop(var, None)
        else:
            env[var] = old
    env.pop(MARKER, None)
    if environ is None:
        _stripped.clear()
        _stripped.update(launched)
    return True


@contextlib.contextmanager
def launched_environment() -> Iterator[dict[str, str]]:
    """``with launched_environment():`` processes started inside (a spawn
    pool's workers, a subprocess) get the launcher's variables back, so they
    run under the backend as this process does. Outside a launch it changes
    nothing. The environment is process-wide: start the children from one thread."""
    changes = dict(_stripped)
    before = {var: os.environ.get(var) for var in changes}
    os.environ.update(changes)
    try:
        yield changes
    finally:
        for var, old in before.items():
            if old is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = old


# ---------------------------------------------------------------- where the memory goes

def _proc_status() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def rss_bytes() -> int | None:
    """The process's resident set size in bytes (``VmRSS``), None where /proc has none."""
    return _proc_status().get("VmRSS")


def process_stats() -> dict[str, Any]:
    """Process-wide figures, in bytes: RSS and peak RSS (``/proc/self/status``),
    the library that serves malloc, the backend it is (or None), CPython's
    object allocator, and that allocator's own figures (jemalloc
    ``stats.allocated/active/resident/mapped`` after an ``epoch`` refresh,
    mimalloc ``mi_process_info``, glibc ``mallinfo2``; None where it has none)."""
    status = _proc_status()
    try:
        owner: str | None = malloc_owner()
    except Exception:
        owner = None
    name = malloc_backend_name(owner) if owner else None
    malloc_stats = None
    if name is not None:
        try:
            # Already in the process (it serves malloc): this loads nothing new.
            malloc_stats = get_backend(name).native_stats().as_dict()
        except BackendUnavailableError:
            malloc_stats = None
    return {
        "rss_bytes": status.get("VmRSS"),
        "peak_rss_bytes": status.get("VmHWM"),
        "anon_rss_bytes": status.get("RssAnon"),
        "malloc_library": owner,
        "malloc_backend": name,
        "python_allocator": python_allocator(),
        "malloc_stats": malloc_stats,
        "launched": launch_marker() is not None or bool(_stripped),
    }



def inspect_process(pid: int) -> dict[str, Any]:
    """What can be read of another process from outside, in bytes: RSS and peak
    RSS, the allocator libraries it has mapped (jemalloc, mimalloc), whether
    knhk-memory run started it (its initial environment holds the marker) and
    the PYTHONMALLOC it started with. Its allocator's own figures are only in
    its ``knhk_memory_stats``. Raises ValueError for a pid that is not a
    positive integer, :class:`ProcessInspectError` when /proc cannot say."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"pid must be a positive integer, got {pid!r}")
    base = Path(f"/proc/{pid}")
    try:
        status = base.joinpath("status").read_text(errors="replace")
        maps = base.joinpath("maps").read_text(errors="replace")
    except FileNotFoundError:
        raise ProcessInspectError(f"no process with pid {pid} (nothing in /proc/{pid})") from None
    except PermissionError:
        raise ProcessInspectError(f"process {pid}: /proc/{pid}/maps is not readable (permission denied: "
                                  "another user's process, or a restricted /proc); run as its user") from None
    fields = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Name", "VmRSS", "VmHWM"):
            fields[key] = rest.strip()
    libraries = sorted({line.split()[-1] for line in maps.splitlines()
                        if len(line.split()) >= 6 and any(Path(line.split()[-1]).name.startswith(soname)
                                                           for soname in SONAMES.values())})
    env: dict[str, str] = {}
    try:
        for item in base.joinpath("environ").read_bytes().split(b"\0"):
            raw_key, sep, raw_value = item.partition(b"=")
            if sep and raw_key in (MARKER.encode(), b"PYTHONMALLOC", b"LD_PRELOAD"):
                env[raw_key.decode()] = raw_value.decode("utf-8", "replace")
    except OSError:
        env = {}
    marker = launch_marker(env)

    def kib(v: str | None) -> int | None:
        return int(v.split()[0]) * 1024 if v else None

    return {"pid": pid, "name": fields.get("Name"), "rss_bytes": kib(fields.get("VmRSS")),
            "peak_rss_bytes": kib(fields.get("VmHWM")), "allocator_libraries": libraries,
            "launched_backend": marker["backend"] if marker else None,
            "initial_pythonmalloc": env.get("PYTHONMALLOC")}
