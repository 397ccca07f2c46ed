"""Named hot-path operations, the contract between capabilities and tick budgets.

Each capability module exposes ``hot_ops() -> list[HotOp]``: its real hot
paths as C functions of type ``knhk_hotop_fn`` (``void (*)(void *ctx,
uint64_t iterations)``) plus a way to build the state they run on. The memory
plugin hands them to the tick harness (knhk_memory.budgets) through the
``knhk_hot_ops`` hook, with their default budgets from one data file,
``knhk_memory/data/budgets.toml`` (:func:`default_budgets`); this module only
describes operations and reads that file.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, Literal

from .errors import HotOpError

__all__ = [
    "BUDGETS_FILE",
    "BudgetUnit",
    "DefaultBudget",
    "HotOp",
    "PyHotOp",
    "default_budgets",
    "parse_default_budgets",
    "with_default_budgets",
]

# The unit of a budget: ticks per operation (C hot paths), nanoseconds per call (Python calls).
BudgetUnit = Literal["ticks", "ns"]
BUDGETS_FILE = "data/budgets.toml"  # inside the knhk_memory package


@dataclass(frozen=True)
class HotOp:
    """One hot-path operation.

    ``fn`` is the C function (``ffi.addressof(lib, "knhk_..._hotop_...")``).
    ``setup()`` returns ``(ctx, cleanup)``: the ``void *`` the function runs on
    (with whatever keeps it alive referenced from ``cleanup``) and a callable
    that releases it. ``default_budget`` is in ticks per operation (the
    built-in operations leave it 0: theirs come from ``budgets.toml``).
    """

    name: str
    description: str
    fn: Any
    setup: Callable[[], tuple[Any, Callable[[], None]]]
    default_budget: int = 0
    budget_reason: str = ""


@dataclass(frozen=True)
class PyHotOp:
    """One public Python call held to a budget in nanoseconds.

    ``setup()`` returns ``(call, cleanup)``: a callable taking no arguments
    that makes the real call once (``lambda: counters.add(3)``), and a
    callable that releases whatever it ran on. The harness times
    ``call()`` with :func:`time.perf_counter_ns` in batches and takes off the
    cost of calling an empty callable the same way, so ``default_budget``
    (nanoseconds per call) covers the call itself.
    """

    name: str
    description: str
    setup: Callable[[], tuple[Callable[[], Any], Callable[[], None]]]
    default_budget: int = 0
    budget_reason: str = ""


@dataclass(frozen=True)
class DefaultBudget:
    """One built-in operation's default budget, its unit, and the measurement behind it."""

    budget: int
    unit: BudgetUnit
    reason: str


def _file_error(key: str, message: str) -> HotOpError:
    return HotOpError(f"knhk_memory/{BUDGETS_FILE}: [{key}]: {message}")


def parse_default_budgets(text: str) -> dict[str, DefaultBudget]:
    """``{operation: DefaultBudget}`` from the TOML ``text`` of a budgets file:
    one table per operation with ``budget`` (a positive integer), ``unit``
    (``"ticks"`` or ``"ns"``) and ``reason`` (a non-empty string), nothing else.
    A malformed file is a :class:`HotOpError` naming the table."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HotOpError(f"knhk_memory/{BUDGETS_FILE} is not valid TOML: {exc}") from None
    out: dict[str, DefaultBudget] = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise _file_error(name, f"expected a table of budget, unit and reason, got {table!r}")
        extra = sorted(set(table) - {"budget", "unit", "reason"})
        missing = [k for k in ("budget", "unit", "reason") if k not in table]
        if extra or missing:
            raise _file_error(name, "expected the keys budget, unit and reason"
                              + (f"; unknown: {', '.join(extra)}" if extra else "")
                              + (f"; missing: {', '.join(missing)}" if missing else ""))
        budget, unit, reason = table["budget"], table["unit"], table["reason"]
        if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
            raise _file_error(name, f"budget must be a positive integer, got {budget!r}")
        if unit not in ("ticks", "ns"):
            raise _file_error(name, f"unit must be 'ticks' or 'ns', got {unit!r}")
        if not isinstance(reason, str) or not reason.strip():
            raise _file_error(name, f"reason must say what was measured, got {reason!r}")
        out[name] = DefaultBudget(budget, unit, reason)
    return out


@functools.cache
def default_budgets() -> dict[str, DefaultBudget]:
    """The built-in operations' default budgets, read once from ``knhk_memory/data/budgets.toml``."""
    text = resources.files("knhk_memory").joinpath(BUDGETS_FILE).read_text(encoding="utf-8")
    return parse_default_budgets(text)


def with_default_budgets(ops: Iterable[HotOp | PyHotOp],
                         budgets: dict[str, DefaultBudget] | None = None) -> list[HotOp | PyHotOp]:
    """``ops`` with ``default_budget`` and ``budget_reason`` filled in from
    ``budgets`` (default: :func:`default_budgets`). An operation without an
    entry, or whose entry has the wrong unit (ticks for a C operation, ns for a
    Python call), is a :class:`HotOpError`."""
    table = default_budgets() if budgets is None else budgets
    out: list[HotOp | PyHotOp] = []
    for op in ops:
        entry = table.get(op.name)
        if entry is None:
            raise HotOpError(f"built-in hot-path operation {op.name!r} has no default budget in "
                             f"knhk_memory/{BUDGETS_FILE}; add a [{op.name}] table with budget, unit and reason")
        unit = "ticks" if isinstance(op, HotOp) else "ns"
        if entry.unit != unit:
            raise _file_error(op.name, f"unit is {entry.unit!r}, but the operation is "
                                       f"{'a C hot path (ticks)' if unit == 'ticks' else 'a Python call (ns)'}")
        out.append(replace(op, default_budget=entry.budget, budget_reason=entry.reason))
    return out
