"""The engine's build-once registries: workflow patterns and global resources.

- :class:`PatternRegistry`: the 43 workflow control-flow patterns (Russell, ter
  Hofstede, van der Aalst, Mulyar 2006) with their canonical numbers, names and
  groups, loaded from package data on first use; lookup by number or name;
  executors attached by plugins (hook ``knhk_register_executors``); frozen
  when the engine starts. A C table of the same records serves native lookups
  (``knhk_registry_*``, hot op ``registry_lookup``).
- :class:`GlobalResourceRegistry`: named factories, each resource created once
  on first :meth:`~GlobalResourceRegistry.get` and closed in reverse order of
  creation at engine shutdown, or at interpreter exit if the engine did not.

Both are built on :class:`knhk_memory.once.OnceLock`. Not for: per-workflow
state (it belongs to the workflow), or values that change after start.
"""

from __future__ import annotations

import atexit
import functools
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _fast
from ._core import check, ffi, lib
from .errors import (
    DuplicateNameError,
    RegistryClosedError,
    RegistryFrozenError,
    ResourceFactoryError,
    UnknownPatternError,
    UnknownResourceError,
    did_you_mean,
)
from .once import OnceLock
from .patterns import Pattern, builtin_patterns, read_table

if TYPE_CHECKING:
    import pluggy

    from .config import Config

__all__ = ["Pattern", "PatternRegistry", "GlobalResourceRegistry", "start_registries"]

def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip()).casefold()


class _Table:
    """The loaded patterns, the name index and the C table."""

    __slots__ = ("by_number", "by_name", "patterns", "groups", "native")

    def __init__(self, patterns: list[Pattern]) -> None:
        self.patterns = tuple(sorted(patterns, key=lambda p: p.number))
        self.by_number = {p.number: p for p in self.patterns}
        self.by_name = {_normalise(p.name): p for p in self.patterns}
        self.groups = tuple(dict.fromkeys(p.group for p in self.patterns))
        status = ffi.new("int *")
        ptr = lib.knhk_registry_new(max(self.by_number), status)
        if ptr == ffi.NULL:
            check(status[0], "building the native pattern table")
        self.native = ffi.gc(ptr, lib.knhk_registry_free)
        for p in self.patterns:
            check(lib.knhk_registry_put(self.native, p.number, self.groups.index(p.group),
                                        p.name.encode()), f"adding pattern {p.number} to the native table")


class PatternRegistry(_fast.LookupBase):
    """The workflow control-flow patterns, their executors, built on first use.

    ``registry[7]`` and ``registry["Structured Synchronizing Merge"]`` return a
    :class:`Pattern`; names match ignoring case, spaces, ``-`` and ``_``. An
    unknown number or name raises :class:`UnknownPatternError` (a KeyError)
    naming the valid range and the nearest names.

    ``table_text`` replaces the built-in table (same TSV layout: ``id``,
    ``name``, ``group``), for tests and engines with extra patterns.
    """

    def __init__(self, table_text: str | None = None) -> None:
        self._text = table_text
        self._table: OnceLock[_Table] = OnceLock("pattern table")
        self._by_number: dict[int, Pattern] = {}  # the loaded index, once loaded
        self._executors: dict[int, Any] = {}
        self._write_lock = threading.Lock()
        self._frozen = False

    # ---- loading

    def _load(self) -> _Table:
        if self._text is not None:
            return _Table(read_table(self._text, "<table_text>"))
        return _Table(list(builtin_patterns()))

    @property
    def _t(self) -> _Table:
        t = self._table.get()
        return t if t is not None else self._table.get_or_init(self._load)

    @property
    def loaded(self) -> bool:
        return self._table.is_set()

    # ---- lookup

    def by_number(self, number: int) -> Pattern:
        """The pattern numbered ``number`` (WCP-``number``)."""
        # Fast path: an exact int found in the loaded index (empty until the
        # first lookup loads it). True and 2.0 hash like 1 and 2, hence the
        # class check before the lookup, not after.
        if number.__class__ is int:
            try:  # zero-cost on 3.11+ when nothing is raised
                return self._by_number[number]
            except KeyError:
                pass
        return self._by_number_slow(number)

    def _by_number_slow(self, number: object) -> Pattern:
        t = self._t
        self._by_number = t.by_number
        if isinstance(number, int) and not isinstance(number, bool) and number in t.by_number:
            return t.by_number[number]
        raise self._unknown_number(number)

    def by_name(self, name: str) -> Pattern:
        """The pattern called ``name`` (case, spaces, ``-`` and ``_`` ignored)."""
        if not isinstance(name, str):
            raise TypeError(f"a pattern name is a str, got {name!r}")
        t = self._t
        try:
            return t.by_name[_normalise(name)]
        except KeyError:
            pass
        hint = did_you_mean(name, [p.name for p in t.patterns], cutoff=0.5, template="; nearest names: {}",
                            sep=", ", normalise=_normalise)
        raise UnknownPatternError(f"no workflow pattern named {name!r}{hint} "
                                  f"(numbers {self._range(t)} also work)")

    # registry[key]: the base class's C subscript finds an exact int in the
    # loaded index (native/cpython/cells_py.c); every other key comes here.
    def _getitem_slow(self, key: int | str) -> Pattern:
        if key.__class__ is int:
            return self._by_number_slow(key)
        if isinstance(key, str):
            return self.by_name(key)
        return self._by_number_slow(key)

    def _range(self, t: _Table) -> str:
        return f"{t.patterns[0].number}..{t.patterns[-1].number}"

    def _unknown_number(self, number: object) -> Exception:
        t = self._t
        if isinstance(number, bool) or not isinstance(number, int):
            return TypeError(f"a pattern number is an int in {self._range(t)} or a name, got {number!r}")
        return UnknownPatternError(f"no workflow pattern numbered {number}; valid numbers are "
                                   f"{self._range(t)} (e.g. 1 {t.patterns[0].name!r}, "
                                   f"{t.patterns[-1].number} {t.patterns[-1].name!r})")

    def __contains__(self, key: object) -> bool:
        try:
            self[key]
        except (KeyError, TypeError):
            return False
        return True

    def __iter__(self) -> Iterator[Pattern]:
        return iter(self._t.patterns)

    def __len__(self) -> int:
        return len(self._t.patterns)

    def groups(self) -> tuple[str, ...]:
        """The pattern groups, in table order."""
        return self._t.groups

    def in_group(self, group: str) -> tuple[Pattern, ...]:
        t = self._t
        if group not in t.groups:
            raise UnknownPatternError(f"no pattern group {group!r}; groups: {', '.join(t.groups)}")
        return tuple(p for p in t.patterns if p.group == group)

    @property
    def native(self) -> Any:
        """The C table (``knhk_registry *``), alive as long as this registry."""
        return self._t.native

    def native_lookup(self, number: int) -> tuple[int, int, str, int] | None:
        """Look ``number`` up in the C table: ``(id, group index, name, executor handle)``."""
        p = lib.knhk_registry_lookup(self.native, number)
        if p == ffi.NULL:
            return None
        return (p.id, p.group, ffi.string(p.name).decode(), p.executor)

    # ---- executors

    def register_executor(self, pattern: int | str, executor: Any, *, replace: bool = False) -> None:
        """Attach the object that runs ``pattern`` (by number or name).

        Raises :class:`RegistryFrozenError` once the engine has started, and
        :class:`DuplicateNameError` if the pattern has an executor (unless ``replace``)."""
        p = self[pattern]
        with self._write_lock:
            if self._frozen:
                raise RegistryFrozenError(
                    f"cannot register an executor for WCP-{p.number} {p.name!r}: the pattern registry is "
                    "frozen (the engine has started); register in the knhk_register_executors hook")
            old = self._executors.get(p.number)
            if old is not None and not replace:
                raise DuplicateNameError(
                    f"WCP-{p.number} {p.name!r} already has the executor {old!r}; "
                    f"pass replace=True to register {executor!r} instead")
            self._executors[p.number] = executor
            # The C table carries a handle, not the object: non-zero (the pattern's
            # number, the key of self._executors) says an executor is attached.
            check(lib.knhk_registry_set_executor(self.native, p.number, p.number),
                  f"attaching the executor of pattern {p.number}")

    def executor(self, pattern: int | str) -> Any:
        """The executor of ``pattern``; KeyError (UnknownPatternError) if none is registered."""
        p = self[pattern]
        try:
            return self._executors[p.number]
        except KeyError:
            raise UnknownPatternError(f"no executor is registered for WCP-{p.number} {p.name!r}; "
                                      f"registered: {sorted(self._executors) or 'none'}") from None

    def executors(self) -> dict[int, Any]:
        return dict(self._executors)

    def freeze(self) -> None:
        """Refuse changes from now on (called when the engine starts). Loads the table."""
        with self._write_lock:
            lib.knhk_registry_freeze(self.native)
            self._frozen = True

    @property
    def frozen(self) -> bool:
        return self._frozen

    def __repr__(self) -> str:
        if not self.loaded:
            return "<PatternRegistry (not loaded)>"
        frozen = ", frozen" if self._frozen else ""
        return f"<PatternRegistry {len(self)} patterns, {len(self._executors)} executors{frozen}>"


# ---------------------------------------------------------------- resources


def _default_close(resource: Any) -> None:
    close = getattr(resource, "close", None)
    if callable(close):
        close()


@dataclass
class _Resource:
    name: str
    factory: Callable[[], Any]
    close: Callable[[Any], None]
    cell: OnceLock[Any]


def _close_at_exit(ref: weakref.ref[GlobalResourceRegistry]) -> None:
    registry = ref()
    if registry is not None and not registry.closed:
        try:
            registry.close()
        except Exception as exc:  # at exit there is no caller left to raise to
            print(f"knhk_memory: closing resources at exit: {exc}", file=sys.stderr)


class GlobalResourceRegistry:
    """Named process-wide resources: created once on first get, closed in reverse creation order.

    ``register(name, factory, close=None)`` records a factory; ``get(name)``
    creates the resource on first use (exactly once among racing threads) and
    returns the same object after. A factory that raises is reported as
    :class:`ResourceFactoryError` naming the resource (its exception is the
    ``__cause__``) and the next ``get`` retries. ``close()`` closes what was
    created, last created first (so a resource closes before those its
    factory used), with ``close(resource)`` or else ``resource.close()``.
    With ``close_at_exit`` it also runs at interpreter exit if nobody called it.
    """

    def __init__(self, *, close_at_exit: bool = True) -> None:
        self._resources: dict[str, _Resource] = {}
        self._created: list[_Resource] = []
        self._lock = threading.Lock()
        self._closed = False
        self._atexit: Callable[[], None] | None = None
        if close_at_exit:
            self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
            atexit.register(self._atexit)

    def register(self, name: str, factory: Callable[[], Any], *,
                 close: Callable[[Any], None] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a resource name is a non-empty str, got {name!r}")
        if not callable(factory):
            raise TypeError(f"the factory of resource {name!r} must be callable, got {factory!r}")
        with self._lock:
            if self._closed:
                raise RegistryClosedError(f"cannot register resource {name!r}: the registry is closed")
            if name in self._resources:
                raise DuplicateNameError(
                    f"resource {name!r} is already registered (factory "
                    f"{self._resources[name].factory!r}); names must be unique")
            self._resources[name] = _Resource(name, factory, close or _default_close,
                                              OnceLock(f"resource {name}"))

    def get(self, name: str) -> Any:
        """The resource, created by its factory on first call."""
        try:
            res = self._resources[name]
        except (KeyError, TypeError):
            raise self._unknown(name) from None
        cell = res.cell
        if cell._full:
            return cell._value
        return cell.get_or_init(functools.partial(self._create, res))

    def _create(self, res: _Resource) -> Any:
        if self._closed:
            raise RegistryClosedError(f"cannot create resource {res.name!r}: the registry is closed")
        try:
            value = res.factory()
        except Exception as exc:
            raise ResourceFactoryError(
                f"the factory of resource {res.name!r} raised {type(exc).__name__}: {exc} "
                "(the resource stays uncreated; the next get retries)", name=res.name) from exc
        with self._lock:
            if self._closed:  # close() ran while the factory did: do not leak it
                res.close(value)
                raise RegistryClosedError(f"resource {res.name!r} was created after the registry closed")
            self._created.append(res)
        return value

    def _unknown(self, name: object) -> Exception:
        names = sorted(self._resources)
        hint = did_you_mean(str(name), names, template="; did you mean {}?")
        return UnknownResourceError(f"no resource named {name!r}{hint} (registered: "
                                    f"{', '.join(map(repr, names)) or 'none'})")

    def __contains__(self, name: object) -> bool:
        return name in self._resources

    def names(self) -> list[str]:
        return list(self._resources)

    def created(self) -> list[str]:
        """Names of the resources created so far, in creation order."""
        with self._lock:
            return [r.name for r in self._created]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close every created resource, last created first. Idempotent.

        Every resource is closed even if some closers raise; then the first
        error is raised, naming all resources that failed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            created, self._created = self._created, []
        if self._atexit is not None:
            atexit.unregister(self._atexit)
        failures: list[tuple[str, BaseException]] = []
        for res in reversed(created):
            try:
                res.close(res.cell._value)
            except Exception as exc:
                failures.append((res.name, exc))
        if failures:
            names = ", ".join(f"{n!r} ({type(e).__name__}: {e})" for n, e in failures)
            raise RegistryClosedError(f"closing resources failed for {names}") from failures[0][1]

    def __repr__(self) -> str:
        return (f"<GlobalResourceRegistry {len(self._resources)} registered, {len(self._created)} created"
                f"{', closed' if self._closed else ''}>")


# ---------------------------------------------------------------- engine start


def start_registries(pm: pluggy.PluginManager, config: Config) -> tuple[PatternRegistry, GlobalResourceRegistry]:
    """What an engine calls once its plugins are configured: fetch both registries
    through the hooks, let every plugin register its executors, then freeze the
    pattern registry (when ``config.registry.freeze_on_start``)."""
    patterns = pm.hook.knhk_pattern_registry(config=config)
    if patterns is None:
        raise RuntimeError("no plugin answered knhk_pattern_registry: is the memory plugin registered "
                           "and pm.hook.knhk_configure(config=config) called?")
    resources_ = pm.hook.knhk_resource_registry(config=config)
    pm.hook.knhk_register_executors(config=config, registry=patterns)
    if config.registry.freeze_on_start:
        patterns.freeze()
    return patterns, resources_


# ---------------------------------------------------------------- hot paths


def hot_ops() -> list[Any]:
    """The registries' hot paths for the tick harness (see knhk_memory.hotpath)."""
    from .hotpath import HotOp

    def once_setup() -> tuple[Any, Any]:
        cell = ffi.new("knhk_once *")
        lib.knhk_once_init(cell)
        check(lib.knhk_once_set(cell, ffi.cast("void *", cell)), "filling the hot-op once-cell")
        return ffi.cast("void *", cell), (lambda keep=cell: None)  # the closure keeps the cell alive

    def registry_setup() -> tuple[Any, Any]:
        reg = PatternRegistry()
        reg.freeze()
        return ffi.cast("void *", reg.native), (lambda keep=reg: None)

    return [
        HotOp(name="once_read",
              description="knhk_once_get of a full C once-cell: one acquire load and the value",
              fn=ffi.addressof(lib, "knhk_once_hotop_read"), setup=once_setup),
        HotOp(name="registry_lookup",
              description="knhk_registry_lookup by pattern number in the frozen C table (1..43 cycling)",
              fn=ffi.addressof(lib, "knhk_registry_hotop_lookup"), setup=registry_setup),
    ]
