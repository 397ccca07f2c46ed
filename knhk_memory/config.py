"""Configuration: where it is found, what it may say, and how it is checked.

The file is TOML, read with :mod:`tomllib`. Lookup order (first found wins):

1. an explicit path (``load_config(path)``, the CLI's ``--config``);
2. the file named by the environment variable ``KNHK_MEMORY_CONFIG``;
3. ``./knhk.toml``;
4. the ``[tool.knhk-memory]`` table of ``./pyproject.toml``;
5. the built-in defaults.

Every section and key is declared once, in :data:`SCHEMA`. A file is checked
whole before anything uses it: an unknown section or key, a wrong type or a
value out of range is a :class:`ConfigError` that names the file, the key,
the value given and what is accepted. This module only reads and checks;
applying a configuration (loading a backend, installing a numpy handler) is
the plugin's job.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import store_options
from .errors import ConfigError, did_you_mean

ENV_VAR = "KNHK_MEMORY_CONFIG"
PYPROJECT_TABLE = "knhk-memory"

__all__ = ["Config", "Field", "SCHEMA", "BACKEND_OPTIONS", "ENV_VAR", "load_config", "find_config_file"]


@dataclass(frozen=True)
class Field:
    """One key of a section: its type, default, and an optional check.

    ``check(value)`` returns None when the value is fine, else a sentence
    saying what is accepted.
    """

    type: type
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple[Any, ...] | None = None
    # For a value that is itself a table (``[pools.<name>]``): its keys, each
    # checked like a section's, with errors naming the full dotted key.
    table: Mapping[str, Field] | None = None

    def validate(self, value: Any) -> str | None:
        if not _is_type(value, self.type):
            return f"expected {_type_name(self.type)}, got {_describe(value)}"
        if self.choices is not None and value not in self.choices:
            hint = _nearest(str(value), [str(c) for c in self.choices])
            accepted = ", ".join(repr(c) for c in self.choices)
            return f"{value!r} is not one of {accepted}{hint}"
        if self.check is not None:
            return self.check(value)
        return None


def _is_type(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(t: type) -> str:
    return {bool: "a boolean (true or false)", int: "an integer", float: "a number",
            str: "a string", dict: "a table", list: "an array"}.get(t, t.__name__)


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "table",
            list: "array"}.get(type(value), type(value).__name__)
    return f"the {kind} {value!r}"


def _nearest(word: str, candidates: list[str]) -> str:
    return did_you_mean(word, candidates)


def positive_int(limit: int | None = None) -> Callable[[Any], str | None]:
    def check(v: int) -> str | None:
        if v <= 0:
            return f"must be a positive integer, got {v}"
        if limit is not None and v > limit:
            return f"must be at most {limit}, got {v}"
        return None
    return check


class OpenKeys(Mapping[str, Field]):
    """The fields of a section whose keys are named at run time (``[budgets]``
    takes one key per hot-path operation, and plugins add operations): every
    key is checked by one :class:`Field`, and the section has no defaults.
    Whether a key names something real is checked by the section's user."""

    def __init__(self, field: Field) -> None:
        self.field = field

    def __getitem__(self, key: str) -> Field:
        if not isinstance(key, str):
            raise KeyError(key)
        return self.field

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0
class NamedTables(OpenKeys):
    """A section of named sub-tables (``[pools.cases]``, ``[pools.tokens]``): any name, each
    table checked against one set of fields; ``default_tables`` are present unless overridden
    (a file's ``[pools.cases]`` replaces the default ``cases`` table, keys it omits at their
    field defaults)."""

    def __init__(self, field: Field, default_tables: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__(field)
        self.default_tables = {k: dict(v) for k, v in default_tables.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.default_tables)

    def __len__(self) -> int:
        return len(self.default_tables)


def _numa_value(v: Any) -> str | None:
    if v in ("", "local", "interleave") or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1024):
        return None
    return (f"must be \"local\", \"interleave\", a node number (an integer from 0 to 1023) or \"\" (the "
            f"kernel's default placement), got {_describe(v)}")


def _range(lo: int, hi: int, unit: str) -> Callable[[Any], str | None]:
    def check(v: int) -> str | None:
        return None if lo <= v <= hi else f"must be from {lo} to {hi} {unit}, got {v}"
    return check


def _pow2_align(v: int) -> str | None:
    if v <= 0 or v > 4096 or v & (v - 1):
        return f"must be a power of two from 1 to 4096, got {v}"
    return None


POOL_KINDS = ("fixed", "lockfree", "threadlocal")
POOL_FIELDS: dict[str, Field] = {
    "kind": Field(str, "fixed", "fixed (FixedPool: one owner thread, no atomics), lockfree (LockFreePool: "
                  "any thread, a tagged Treiber stack) or threadlocal (ThreadLocalPool: per-thread caches).",
                  choices=POOL_KINDS),
    "block_size": Field(int, 32, "Bytes per block, 1 to 2**30 (served from the size class: 8, 16, 24, 32, "
                        "48, 64, 96, ...).", check=_range(1, 1 << 30, "bytes")),
    "capacity": Field(int, 4096, "Blocks, 1 to 2**32 - 2; the pool never grows past it (a full pool "
                      "raises PoolExhaustedError naming this key).", check=_range(1, 4294967294, "blocks")),
    "align": Field(int, 8, "Block alignment in bytes, a power of two from 1 to 4096.", check=_pow2_align),
    "cache_size": Field(int, 64, "Blocks each thread's cache holds (threadlocal only), 2 to 65536.",
                        check=_range(2, 65536, "blocks")),
    "numa": Field(object, "", "NUMA placement of the pool's region: \"local\", \"interleave\", a node "
                  "number, or \"\" for the kernel's default.", check=_numa_value),
}
DEFAULT_POOLS = {"cases": {k: f.default for k, f in POOL_FIELDS.items()}}


def _counter_names(v: list[Any]) -> str | None:
    bad = [n for n in v if not isinstance(n, str) or not n or "\0" in n]
    if bad:
        return f"every name must be a non-empty string, got {bad[0]!r}"
    if not v:
        return "must name at least one counter"
    dupes = sorted({n for n in v if v.count(n) > 1})
    if dupes:
        return f"names must be unique; repeated: {', '.join(map(repr, dupes))}"
    return None


def _block_mode(v: int) -> str | None:
    if not 0o600 <= v <= 0o777 or v & 0o600 != 0o600:
        return f"must be a permission mode with owner read and write, 0o600..0o777, got {v:#o}"
    return None


def _chunk_bytes(v: int) -> str | None:
    if not 4096 <= v <= 1 << 40:
        return f"must be from 4096 to {1 << 40} bytes, got {v}"
    return None


# Options passed to each backend when it is the process allocator (``knhk-memory
# run``): name -> (type, check or choices). jemalloc takes them as MALLOC_CONF
# pairs (jemalloc(3) "TUNING"), mimalloc as MIMALLOC_<NAME> variables
# (mimalloc's docs/environment options), glibc as glibc.malloc.* tunables
# (glibc manual, "Memory Allocation Tunables").
_DECAY = "must be -1 (never purge) or a number of milliseconds >= 0"
BACKEND_OPTIONS: dict[str, dict[str, tuple[type, Any]]] = {
    "jemalloc": {
        "background_thread": (bool, None),
        "max_background_threads": (int, lambda v: None if v >= 1 else "must be >= 1"),
        "dirty_decay_ms": (int, lambda v: None if v >= -1 else _DECAY),
        "muzzy_decay_ms": (int, lambda v: None if v >= -1 else _DECAY),
        "narenas": (int, lambda v: None if 1 <= v <= 4096 else "must be from 1 to 4096"),
        "tcache": (bool, None),
        "lg_tcache_max": (int, lambda v: None if 0 <= v <= 23 else "must be from 0 to 23"),
        "percpu_arena": (str, ("disabled", "percpu", "phycpu")),
        "thp": (str, ("default", "always", "never")),
        "metadata_thp": (str, ("disabled", "auto", "always")),
        "retain": (bool, None),
        "oversize_threshold": (int, lambda v: None if v >= 0 else "must be a number of bytes >= 0"),
    },
    "mimalloc": {
        "purge_delay": (int, lambda v: None if v >= -1 else _DECAY),
        "eager_commit": (bool, None),
        "eager_commit_delay": (int, lambda v: None if v >= 0 else "must be >= 0"),
        "large_os_pages": (bool, None),
        "reserve_huge_os_pages": (int, lambda v: None if v >= 0 else "must be a number of 1 GiB pages >= 0"),
        "use_numa_nodes": (int, lambda v: None if v >= 0 else "must be >= 0"),
        "show_stats": (bool, None),
        "show_errors": (bool, None),
        "verbose": (bool, None),
    },
    "system": {
        "arena_max": (int, lambda v: None if 1 <= v <= 1 << 20 else "must be from 1 to 1048576"),
        "trim_threshold": (int, lambda v: None if v >= 0 else "must be a number of bytes >= 0"),
        "mmap_threshold": (int, lambda v: None if 0 <= v <= 1 << 25 else
                           "must be a number of bytes from 0 to 33554432 (32 MiB, glibc's cap)"),
        "top_pad": (int, lambda v: None if v >= 0 else "must be a number of bytes >= 0"),
    },
}


def _backend_options(backend: str) -> Callable[[Any], str | None]:
    accepted = BACKEND_OPTIONS[backend]

    def check(table: dict[str, Any]) -> str | None:
        for name, value in table.items():
            if name not in accepted:
                return (f"unknown {backend} option {name!r}; accepted options: {', '.join(accepted)}"
                        f"{_nearest(name, list(accepted))}")
            kind, rule = accepted[name]
            if not _is_type(value, kind):
                return f"option {name!r}: expected {_type_name(kind)}, got {_describe(value)}"
            if isinstance(rule, tuple):
                if value not in rule:
                    return (f"option {name!r}: {value!r} is not one of {', '.join(map(repr, rule))}"
                            f"{_nearest(str(value), list(rule))}")
            elif rule is not None:
                problem = rule(value)
                if problem is not None:
                    return f"option {name!r}: {problem}, got {value!r}"
        return None
    return check


def _purge_interval(v: float) -> str | None:
    if v != 0 and not 0.01 <= v <= 86400:
        return f"must be 0 (off) or from 0.01 to 86400 seconds, got {v}"
    return None


# The schema: one entry per section. Later capabilities add their sections here.
SCHEMA: dict[str, Mapping[str, Field]] = {
    "allocator": {
        "backend": Field(str, "auto", "Allocator backend: system, jemalloc, mimalloc, or auto "
                         "(first available of mimalloc, jemalloc, system).",
                         choices=("auto", "system", "jemalloc", "mimalloc")),
        "numpy": Field(bool, False, "Route numpy's array data through the backend (NEP 49 handler)."),
        "scope": Field(str, "arrays", "What the backend serves: arrays (the memory knhk asks for: numpy data "
                       "with numpy = true, arenas, blocks) or process (every allocation of the engine "
                       "process, Python objects included; start it with knhk-memory run).",
                       choices=("arrays", "process")),
        "purge_interval_s": Field(float, 0.0, "Seconds between calls of the backend's release_unused() "
                                  "(malloc_trim, jemalloc purge, mi_collect) from a daemon thread; "
                                  "0: never.", check=_purge_interval),
        "jemalloc": Field(dict, {}, "jemalloc options for scope = process, as MALLOC_CONF pairs: "
                          + ", ".join(BACKEND_OPTIONS["jemalloc"]) + ".", check=_backend_options("jemalloc")),
        "mimalloc": Field(dict, {}, "mimalloc options for scope = process, as MIMALLOC_<NAME> variables: "
                          + ", ".join(BACKEND_OPTIONS["mimalloc"]) + ".", check=_backend_options("mimalloc")),
        "system": Field(dict, {}, "glibc malloc options for scope = process, as glibc.malloc.* tunables: "
                        + ", ".join(BACKEND_OPTIONS["system"]) + ".", check=_backend_options("system")),
    },
    # One key per hot-path operation: ticks for C operations, nanoseconds for
    # Python calls (py_*). Unknown names are refused by knhk_memory.budgets.
    "budgets": OpenKeys(Field(int, None, "Budget of one hot-path operation: ticks per operation for "
                              "C operations, nanoseconds per call for Python ones (py_*).",
                              check=positive_int())),
    "registry": {
        "freeze_on_start": Field(bool, True, "Freeze the pattern registry once plugins have registered "
                                 "their executors (start_registries); later changes raise."),
        "close_at_exit": Field(bool, True, "Close the global resources at interpreter exit if the engine "
                               "did not (knhk_unconfigure does it otherwise)."),
    },
    "counters": {
        "names": Field(list, ["cases_started", "cases_completed", "tasks_fired", "retries", "errors"],
                       "Names of the engine's counters (unique, non-empty strings).", check=_counter_names),
        "shared": Field(bool, False, "Put the counters and pattern statistics in shared memory, so "
                        "worker processes attach to them by name."),
        "shared_name": Field(str, "", "Shared-memory name (or a file path, if it contains '/') for the "
                             "counter block; empty: a fresh name. The pattern block adds '.patterns'."),
        "pattern_stats": Field(bool, True, "Keep per-pattern executor statistics (knhk_pattern_stats)."),
        "mode": Field(int, 0o600, "Permission mode of shared blocks, set exactly (the umask does not apply); "
                      "0o600 (owner only) to 0o777, owner read and write required. Whoever may write the "
                      "block may change every count (docs/counters.md).", check=_block_mode),
    },
    "arena": {
        "chunk_size": Field(int, 65536, "First chunk of each arena, in bytes (4096 to 2**40); later chunks "
                            "double up to max_chunk_size.", check=lambda v: _chunk_bytes(v)),
        "max_chunk_size": Field(int, 16 * 1024 * 1024, "Growth cap for arena chunks, in bytes (at least "
                                "chunk_size, at most 2**40).", check=lambda v: _chunk_bytes(v)),
        "huge_pages": Field(bool, True, "Hint madvise(MADV_HUGEPAGE) on arena chunks of 2 MiB or more."),
        "numa": Field(object, "", "NUMA placement of arena chunks: \"local\", \"interleave\", a node number, "
                      "or \"\" for the kernel's default.", check=_numa_value),
    },
    # One table per named pool ([pools.cases], [pools.tokens], ...), handed out
    # by the knhk_pool hook; the reference host keeps its case records in "cases".
    "pools": NamedTables(Field(dict, None, "A named block pool (knhk_pool hook).", table=POOL_FIELDS),
                         DEFAULT_POOLS),
    "store": {
        "path": Field(str, "", "Workflow store file the plugin opens and hands to the engine through "
                      "knhk_workflow_store (relative paths are relative to the working directory); "
                      "empty: no store."),
        # The ranges and messages are the WorkflowStore constructor's (knhk_memory.store_options).
        "cache_size": Field(int, 1024, "Entries of get_decoded's LRU cache of decoded definitions (0: off).",
                            check=lambda v: store_options.range_problem("cache_size", v)),
        "mmap_threshold": Field(int, 65536, "Files smaller than this many bytes are read into memory "
                                "instead of mapped.", check=lambda v: store_options.range_problem("mmap_threshold", v)),
        "prefetch": Field(bool, False, "Advise the kernel to read the whole file ahead at open "
                          "(MADV_WILLNEED)."),
        "max_value_bytes": Field(int, 64 * 1024 * 1024, "Largest size in bytes a compressed value may "
                                 "decompress to: a frame claiming more is a store error, checked before "
                                 "anything is allocated.",
                                 check=lambda v: store_options.range_problem("max_value_bytes", v)),
    },
    "metrics": {
        "shared": Field(bool, False, "Put the metrics block (labelled counter families and histograms, "
                        "knhk_memory.metrics) in shared memory, so worker processes and `knhk-memory metrics` "
                        "attach to it by name."),
        "shared_name": Field(str, "", "Shared-memory name (or a file path, if it contains '/') of the metrics "
                             "block; empty: a fresh name. `knhk-memory metrics` needs it."),
        "max_label_sets": Field(int, 1024, "Bound on distinct label sets in the metrics block (all families); "
                                "a new one past it raises LabelSetLimitError. 1 to 1048576.",
                                check=positive_int(1 << 20)),
        "max_cells": Field(int, 16384, "Counters the label sets count into: 1 per counter label set, buckets + 2 "
                           "per histogram label set. 1 to 65536 (the block reserves 512 bytes of address space "
                           "per cell, backed only where written).", check=positive_int(65536)),
    },
    "simd": {
        "level": Field(str, "auto", "SIMD level of knhk_memory.simd's kernels: auto (the best this CPU "
                       "supports, avx2 rather than avx512 on cores that lower their clock for 512-bit "
                       "code, or what the KNHK_SIMD environment variable forces), scalar, avx2, avx512. "
                       "A level the CPU lacks is an error.",
                       choices=("auto", "scalar", "avx2", "avx512")),
    },
}


class Section(Mapping[str, Any]):
    """A read-only section: ``config.allocator.backend`` or ``config.allocator["backend"]``."""

    __slots__ = ("_name", "_values")

    def __init__(self, name: str, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"config section [{self._name}] has no key {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("configuration sections are read-only")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Section({self._name!r}, {self._values!r})"


@dataclass(frozen=True)
class Config:
    """A checked configuration.

    ``source`` says where it came from (a path, ``"<defaults>"`` or
    ``"<argument>"``); ``origin`` how it was found (``"explicit path"``,
    ``"$KNHK_MEMORY_CONFIG"``, ``"./knhk.toml"``, ``"./pyproject.toml [tool.knhk-memory]"``,
    ``"defaults"``, ``"mapping"``). ``stash`` holds plugin state keyed by
    plugin, as pytest's ``config.stash`` does.
    """

    values: Mapping[str, Mapping[str, Any]]
    source: str = "<defaults>"
    origin: str = "defaults"
    stash: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __getattr__(self, name: str) -> Section:
        values = self.__dict__.get("values")
        if values is not None and name in values:
            return Section(name, dict(values[name]))
        raise AttributeError(f"config has no section [{name}]; sections: {', '.join(SCHEMA)}")

    def get(self, dotted: str) -> Any:
        """The value at a dotted key: ``"arena.chunk_size"``, ``"pools.cases.capacity"``."""
        section, _, rest = dotted.partition(".")
        value: Any = self.values[section]
        for part in rest.split(".") if rest else ():
            value = value[part]
        return value

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dict(v) for s, v in self.values.items()}

    def replace(self, **sections: Mapping[str, Any]) -> Config:
        """A copy with some keys changed, checked as a file would be:
        ``config.replace(store={"path": "wf.knhk"})``. The source and origin
        stay; a host that overrides keys (a command-line option, say) says so."""
        data = self.as_dict()
        for name, changes in sections.items():
            if not isinstance(changes, Mapping):
                raise ConfigError(f"[{name}] changes must be a table, got {_describe(changes)}",
                                  source=self.source, key=name, value=changes)
            data.setdefault(name, {}).update(changes)
        return Config(validate(data, self.source), source=self.source, origin=self.origin)

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError about ``key`` (dotted) of this configuration."""
        return ConfigError(message, source=self.source, key=key, value=self.get(key))


def defaults() -> dict[str, dict[str, Any]]:
    # Copies, so no configuration shares a mutable default with another.
    out: dict[str, dict[str, Any]] = {}
    for s, fields in SCHEMA.items():
        if isinstance(fields, NamedTables):
            out[s] = {k: dict(v) for k, v in fields.default_tables.items()}
        else:
            out[s] = {k: dict(f.default) if isinstance(f.default, dict) else f.default for k, f in fields.items()}
    return out


def _validate_table(value: Mapping[str, Any], table: Mapping[str, Field], dotted: str,
                    source: str) -> dict[str, Any]:
    merged = {k: f.default for k, f in table.items()}
    for key, v in value.items():
        sub = f"{dotted}.{key}"
        if key not in table:
            raise ConfigError(f"unknown key {key!r} in [{dotted}]; accepted keys: {', '.join(table)}"
                              f"{_nearest(key, list(table))}", source=source, key=sub, value=v)
        problem = table[key].validate(v)
        if problem is not None:
            raise ConfigError(problem, source=source, key=sub, value=v)
        merged[key] = v
    return merged


def validate(data: Mapping[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Check ``data`` against :data:`SCHEMA`; return it merged over the defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table of sections, got {_describe(data)}", source=source)
    merged = defaults()
    for section, table in data.items():
        if section not in SCHEMA:
            raise ConfigError(
                f"unknown section [{section}]; accepted sections: {', '.join(SCHEMA)}"
                f"{_nearest(section, list(SCHEMA))}", source=source, key=section)
        if not isinstance(table, Mapping):
            raise ConfigError(f"[{section}] must be a table, got {_describe(table)}",
                              source=source, key=section, value=table)
        fields = SCHEMA[section]
        for key, value in table.items():
            dotted = f"{section}.{key}"
            if key not in fields:
                raise ConfigError(
                    f"unknown key {key!r} in [{section}]; accepted keys: {', '.join(fields)}"
                    f"{_nearest(key, list(fields))}", source=source, key=dotted, value=value)
            problem = fields[key].validate(value)
            if problem is not None:
                raise ConfigError(problem, source=source, key=dotted, value=value)
            table = fields[key].table
            if table is not None:
                value = _validate_table(value, table, dotted, source)
            merged[section][key] = value
    return merged


CACHE_ENV = "KNHK_MEMORY_CACHE"


def cache_dir() -> Path:
    """Where knhk-memory keeps files it can rebuild or fetch again (the demo's store,
    stores fetched by Dask workers): ``$KNHK_MEMORY_CACHE``, else
    ``$XDG_CACHE_HOME/knhk-memory``, else ``~/.cache/knhk-memory``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "knhk-memory"


def find_config_file(cwd: Path | None = None) -> tuple[Path | None, str]:
    """Where the configuration would come from, without an explicit path.

    A ``./knhk.toml`` that exists in any form (a directory, a dangling
    symlink, a symlink loop) is chosen, so reading it reports the problem
    instead of falling back to the defaults. A ``./pyproject.toml`` counts
    when it has a ``[tool.knhk-memory]`` table, or when it does not parse but
    its text mentions ``tool.knhk-memory`` (a :class:`ConfigError` then says
    why it does not parse); a broken pyproject.toml that never mentions us is
    someone else's file.
    """
    cwd = Path.cwd() if cwd is None else cwd
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env), f"${ENV_VAR}"
    if os.path.lexists(cwd / "knhk.toml"):
        return cwd / "knhk.toml", "./knhk.toml"
    pyproject = cwd / "pyproject.toml"
    origin = f"./pyproject.toml [tool.{PYPROJECT_TABLE}]"
    if not os.path.lexists(pyproject):
        return None, "defaults"
    try:
        text = _read_bytes(pyproject).decode("utf-8")
        doc = tomllib.loads(text)
    except ConfigError:
        return None, "defaults"  # not a readable regular file: not a project file we could mean
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raw = _read_bytes(pyproject)
        if re.search(rb"tool\s*\.\s*[\"']?" + re.escape(PYPROJECT_TABLE.encode()), raw):
            why = (f"not valid TOML: {exc}" if isinstance(exc, tomllib.TOMLDecodeError)
                   else f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            raise ConfigError(f"{why}; the file has a [tool.{PYPROJECT_TABLE}] table, which cannot be read "
                              "until the file parses", source=str(pyproject)) from None
        return None, "defaults"  # someone else's broken pyproject is not our config
    tool = doc.get("tool", {})
    if isinstance(tool, dict) and PYPROJECT_TABLE in tool:
        return pyproject, origin
    return None, "defaults"


def _read_bytes(path: Path) -> bytes:
    """The bytes of a regular file, refusing anything else before reading it.

    A FIFO or a device is refused on ``stat`` (opening a FIFO would block);
    the file is then opened ``O_NONBLOCK`` and checked again with ``fstat``,
    so one swapped in between is refused too. Every failure is a
    :class:`ConfigError` naming the file and what is wrong.
    """
    source = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConfigError(f"config file is a symlink to a missing file ({os.readlink(path)})",
                              source=source) from None
        raise ConfigError("config file not found", source=source) from None
    except OSError as exc:
        raise ConfigError(f"config file cannot be read: {_os_reason(exc)}", source=source) from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError("is a directory, not a TOML file", source=source)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"is a {_file_kind(st.st_mode)}, not a regular file; a config file must be a "
                          "regular TOML file", source=source)
    try:
        fd = _open_nonblocking(path)
    except PermissionError:
        raise ConfigError("config file is not readable (permission denied)", source=source) from None
    except OSError as exc:
        raise ConfigError(f"config file cannot be read: {_os_reason(exc)}", source=source) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"is a {_file_kind(st.st_mode)}, not a regular file", source=source)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"config file cannot be read: {_os_reason(exc)}", source=source) from None
    finally:
        os.close(fd)


def _open_nonblocking(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "too many levels of symbolic links (a symlink loop)"
    if exc.errno == errno.ENAMETOOLONG:
        return f"the file name is too long ({len(os.fsencode(exc.filename or ''))} bytes)"
    return exc.strerror or str(exc)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _read_toml(path: Path) -> dict[str, Any]:
    source = str(path)
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file is not UTF-8 text ({exc.reason} at byte {exc.start})",
                          source=source) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=source) from None


def load_config(path: str | os.PathLike[str] | None = None, *, mapping: Mapping[str, Any] | None = None,
                cwd: Path | None = None) -> Config:
    """Find, read and check the configuration. See the module docstring for the order.

    ``mapping`` gives the sections directly (for hosts that hold their own
    configuration); it cannot be combined with ``path``.
    """
    if mapping is not None:
        if path is not None:
            raise TypeError("give either a path or a mapping, not both")
        return Config(validate(mapping, "<argument>"), source="<argument>", origin="mapping")
    found: Path | None
    if path is not None:
        found, origin = Path(path), "explicit path"
    else:
        found, origin = find_config_file(cwd)
    if found is None:
        return Config(defaults(), source="<defaults>", origin="defaults")
    doc = _read_toml(found)
    if origin.startswith("./pyproject.toml") or (found.name == "pyproject.toml" and origin == "explicit path"):
        doc = doc.get("tool", {}).get(PYPROJECT_TABLE, {})
        source = f"{found} [tool.{PYPROJECT_TABLE}]"
    else:
        source = str(found)
    return Config(validate(doc, source), source=source, origin=origin)
