"""Named hot-path operations, the contract between capabilities and tick budgets.

Each capability module exposes ``hot_ops() -> list[HotOp]``: its real hot
paths as C functions of type ``knhk_hotop_fn`` (``void (*)(void *ctx,
uint64_t iterations)``) plus a way to build the state they run on. The tick
harness (knhk_memory.budgets) times them; this module only describes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HotOp:
    """One hot-path operation.

    ``fn`` is the C function (``ffi.addressof(lib, "knhk_..._hotop_...")``).
    ``setup()`` returns ``(ctx, cleanup)``: the ``void *`` the function runs on
    (with whatever keeps it alive referenced from ``cleanup``) and a callable
    that releases it. ``default_budget`` is in ticks per operation.
    """

    name: str
    description: str
    fn: Any
    setup: Callable[[], tuple[Any, Callable[[], None]]]
    default_budget: int
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
    default_budget: int
    budget_reason: str = ""
