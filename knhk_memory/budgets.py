"""Hot-path budgets: measure every named operation and hold it to its budget.

Two kinds of operation are measured:

- C hot paths (:class:`~knhk_memory.hotpath.HotOp`), timed inside C by
  ``knhk_ticks_measure`` with the machine's tick counter (rdtscp on x86_64
  with an invariant TSC, cntvct_el0 on aarch64, clock_gettime otherwise);
  budgets are in ticks per operation.
- Public Python calls (:class:`~knhk_memory.hotpath.PyHotOp`), timed with
  :func:`time.perf_counter_ns`; budgets in nanoseconds per call.

Both are timed the same way: many short batches, the cost of an empty
operation measured beside each batch and taken off, the median over batches
as the figure, and one retry before a budget is declared broken.

Operations come through the ``knhk_hot_ops`` hook of the plugin manager the
caller passes: the memory plugin gives the built-in ones (their default
budgets and the measurements behind them are in
``knhk_memory/data/budgets.toml``), engine plugins add theirs. Budgets default
to each operation's ``default_budget`` and are overridden in the
``[budgets]`` config section.

When the tick counter is not trustworthy (an x86 TSC that is not invariant,
so the harness falls back to clock_gettime and converts at a nominal rate)
verdicts are *advisory*: reported, never failing.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ._core import check, ffi, lib
from .config import Config
from .errors import ConfigError, HotOpError, UnknownOperationError, did_you_mean
from .hotpath import BudgetUnit, HotOp, PyHotOp

__all__ = [
    "COUNTERS", "TickSource", "Verdict", "OpKind", "BudgetSource",
    "CounterInfo", "Settings", "Measurement", "OpResult", "BudgetReport",
    "counter_info", "choose_counter", "use_counter", "gather_ops", "resolve_budgets",
    "measure_native", "measure_python", "check_op", "run_budgets", "format_table",
]

# The tick counters a caller may ask for (``--counter``, ``[budgets]`` runs).
TickSource = Literal["auto", "rdtscp", "rdtsc", "cntvct", "clock_gettime"]
# An operation's verdict (OpResult.status); OpResult.verdict is the same for people:
# "ok", "OVER +12%", with " (advisory)" when the counter is not trusted.
Verdict = Literal["ok", "over", "unchecked"]
OpKind = Literal["native", "python", "test"]
BudgetSource = Literal["default", "config", "marker"]

COUNTERS: dict[TickSource, int] = {
    "auto": lib.KNHK_TICKS_AUTO,
    "rdtscp": lib.KNHK_TICKS_RDTSCP,
    "rdtsc": lib.KNHK_TICKS_RDTSC_LFENCE,
    "cntvct": lib.KNHK_TICKS_CNTVCT,
    "clock_gettime": lib.KNHK_TICKS_CLOCK_GETTIME,
}
_HZ_METHODS = {
    lib.KNHK_TICKS_HZ_UNKNOWN: "unknown",
    lib.KNHK_TICKS_HZ_CPUID_15: "CPUID 0x15",
    lib.KNHK_TICKS_HZ_CPUID_16: "CPUID 0x16",
    lib.KNHK_TICKS_HZ_HYPERVISOR: "CPUID 0x40000010 (hypervisor)",
    lib.KNHK_TICKS_HZ_CALIBRATED: "calibrated against CLOCK_MONOTONIC_RAW",
    lib.KNHK_TICKS_HZ_CNTFRQ: "cntfrq_el0",
    lib.KNHK_TICKS_HZ_NANOSECONDS: "nanoseconds",
}
PY_COUNTER = "perf_counter_ns"


# ---------------------------------------------------------------- the counter

def _facts() -> dict[str, Any]:
    c = ffi.new("knhk_tick_counter *")
    check(lib.knhk_ticks_counter(c), "reading the tick counter")
    return {name: getattr(c, name) for name in dir(c)}


@dataclass(frozen=True)
class CounterInfo:
    """The counter C operations are timed with, and whether its verdicts count.

    ``tick_hz`` converts the counter's readings to *ticks*: the TSC's rate when
    the counter is clock_gettime (budgets are written in TSC ticks), else the
    counter's own rate. ``trusted`` is False when those ticks are a guess;
    verdicts are then advisory, and ``note`` says why.
    """

    name: str
    source: int
    hz: float
    hz_method: str
    tick_hz: float
    invariant_tsc: bool | None
    hypervisor: bool
    trusted: bool
    note: str
    tsc_calibrated_hz: float = 0.0

    def describe(self) -> str:
        rate = f"{self.hz / 1e9:.3f} GHz" if self.hz >= 1e8 else f"{self.hz / 1e6:.3f} MHz"
        tsc = {True: "invariant TSC", False: "TSC NOT invariant",
               None: "TSC not read: portable build" if lib.KNHK_PORTABLE_BUILD else "no TSC"}[self.invariant_tsc]
        text = f"{self.name} at {rate} ({self.hz_method}; {tsc}{', in a VM' if self.hypervisor else ''})"
        return text + (f"; {self.note}" if self.note else "")


def choose_counter(facts: dict[str, Any], requested: TickSource = "auto") -> tuple[int, bool, str]:
    """The counter to use on a machine with these ``facts`` (the fields of
    ``knhk_tick_counter``): ``(source, trusted, note)``.

    Kept apart from the C so a machine without an invariant TSC can be tested
    anywhere. An invariant TSC (or aarch64's counter) gives trusted ticks; a
    TSC that changes rate or stops in power states is not used by default:
    clock_gettime is, converted at the TSC's nominal rate, and verdicts are
    advisory because the ratio of nanoseconds to core cycles is then unknown.
    """
    if requested not in COUNTERS:
        raise ValueError(f"unknown tick counter {requested!r}; accepted: {', '.join(COUNTERS)}")
    has_tsc, invariant = bool(facts["has_tsc"]), bool(facts["invariant_tsc"])
    if requested == "auto":
        if has_tsc and invariant:
            return (lib.KNHK_TICKS_RDTSCP if facts["has_rdtscp"] else lib.KNHK_TICKS_RDTSC_LFENCE), True, ""
        if facts["has_cntvct"]:
            return lib.KNHK_TICKS_CNTVCT, True, ""
        if has_tsc:
            return lib.KNHK_TICKS_CLOCK_GETTIME, False, (
                "the TSC is not invariant (CPUID 0x80000007 EDX bit 8 clear): it may stop or change rate "
                "with power states, so the harness falls back to clock_gettime and converts nanoseconds at "
                "the TSC's nominal rate; verdicts are advisory")
        where = ("in this build (KNHK_PORTABLE=1: portable C only)" if lib.KNHK_PORTABLE_BUILD
                 else "on this machine")
        return lib.KNHK_TICKS_CLOCK_GETTIME, False, (
            f"no cycle counter {where}: clock_gettime only, and no rate to convert nanoseconds "
            "to ticks; verdicts are advisory")
    source = COUNTERS[requested]
    if source in (lib.KNHK_TICKS_RDTSCP, lib.KNHK_TICKS_RDTSC_LFENCE):
        if not invariant:
            return source, False, "the TSC is not invariant: ticks may not be cycles; verdicts are advisory"
        return source, True, ""
    if source == lib.KNHK_TICKS_CLOCK_GETTIME:
        if has_tsc and invariant and facts["tsc_hz"] > 0:
            return source, True, "chosen by request; nanoseconds converted at the invariant TSC's rate"
        return source, False, "clock_gettime with no trustworthy TSC rate to convert at; verdicts are advisory"
    return source, True, ""


def use_counter(requested: TickSource = "auto", facts: dict[str, Any] | None = None) -> CounterInfo:
    """Select the counter for C operations (process-wide) and describe it.

    ``facts`` stands in for the machine's own (tests use it to play a machine
    without an invariant TSC); the counter chosen must still exist here.
    """
    real = _facts()
    facts = real if facts is None else {**real, **facts}
    source, trusted, note = choose_counter(facts, requested)
    check(lib.knhk_ticks_select(source), f"selecting tick counter {requested!r}", HotOpError)
    now = _facts()
    if source == lib.KNHK_TICKS_CLOCK_GETTIME:
        tick_hz = float(facts["tsc_hz"]) if facts["has_tsc"] else 0.0
    else:
        tick_hz = float(now["hz"])
    invariant = None if not facts["has_tsc"] else bool(facts["invariant_tsc"])
    return CounterInfo(
        name=ffi.string(lib.knhk_ticks_source_name(source)).decode(), source=source, hz=float(now["hz"]),
        hz_method=_HZ_METHODS.get(now["hz_method"], "unknown"), tick_hz=tick_hz, invariant_tsc=invariant,
        hypervisor=bool(facts["hypervisor"]), trusted=trusted, note=note,
        tsc_calibrated_hz=float(facts["tsc_calibrated_hz"]))


def counter_info() -> CounterInfo:
    """The counter the automatic choice gives on this machine."""
    return use_counter("auto")


# ---------------------------------------------------------------- measuring

@dataclass(frozen=True)
class Settings:
    """How hard to measure. The defaults take ~5-20 ms per C operation and
    ~20-60 ms per Python call on a 2.5 GHz VM."""

    batches: int = 301
    warmup: int = 10
    batch_ns: int = 8_000         # C: one batch lasts about this long
    py_batches: int = 101
    py_batch_ns: int = 100_000    # Python: one batch lasts about this long

    def __post_init__(self) -> None:
        for name in ("batches", "py_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 3 <= v <= lib.KNHK_TICKS_MAX_BATCHES:
                raise ValueError(f"{name} must be an integer from 3 to {lib.KNHK_TICKS_MAX_BATCHES}, got {v!r}")


@dataclass(frozen=True)
class Measurement:
    """One measurement of one operation, in the counter's own units."""

    median: float
    min: float
    overhead: float
    iterations: int
    batches: int
    discarded: int = 0


def measure_native(fn: Any, ctx: Any, settings: Settings = Settings()) -> Measurement:
    """Time ``fn(ctx, n)`` (a ``knhk_hotop_fn``) in C: per operation, counter units."""
    params = ffi.new("knhk_ticks_params *", {"iterations": 0, "batch_ns": settings.batch_ns,
                                            "batches": settings.batches, "warmup": settings.warmup})
    out = ffi.new("knhk_ticks_result *")
    check(lib.knhk_ticks_measure(fn, ctx, params, out), "timing a hot-path operation", HotOpError)
    return Measurement(out.median, out.min, out.overhead, out.iterations, out.batches, out.discarded)


def _empty() -> None:
    pass


def _time_calls(call: Callable[[], Any], n: int, clock: Callable[[], int] = time.perf_counter_ns) -> int:
    rng = range(n)
    t0 = clock()
    for _ in rng:
        call()
    return clock() - t0


def measure_python(call: Callable[[], Any], settings: Settings = Settings()) -> Measurement:
    """Time ``call()`` with perf_counter_ns: nanoseconds per call, the cost of
    calling an empty function taken off. The cyclic GC is paused meanwhile
    (as :mod:`timeit` does), so a collection triggered elsewhere is not billed here."""
    n = 1
    while True:  # grow the batch until it lasts py_batch_ns
        if min(_time_calls(call, n) for _ in range(3)) >= settings.py_batch_ns or n >= 1 << 22:
            break
        n *= 2
    ops: list[float] = []
    empties: list[float] = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(min(settings.warmup, 3)):
            _time_calls(_empty, n)
            _time_calls(call, n)
        for _ in range(settings.py_batches):
            empties.append(_time_calls(_empty, n) / n)
            ops.append(_time_calls(call, n) / n)
    finally:
        if was_enabled:
            gc.enable()
    overhead = statistics.median(empties)
    # both less the same overhead, so min <= median
    return Measurement(max(0.0, statistics.median(ops) - overhead), max(0.0, min(ops) - overhead),
                       overhead, n, len(ops))


# ---------------------------------------------------------------- gathering

def gather_ops(config: Config | None, pm: Any) -> list[HotOp | PyHotOp]:
    """Every operation the plugins registered with ``pm`` return from
    ``knhk_hot_ops``: the memory plugin's built-in ones and the engine's own.

    Every operation must be a HotOp or PyHotOp with a positive integer
    default budget, and names must be unique."""
    if pm is None or not hasattr(pm, "hook"):
        raise TypeError(f"the budgets need the engine's plugin manager (knhk_memory.get_plugin_manager()), "
                        f"got {pm!r}; the built-in hot paths come from the memory plugin's knhk_hot_ops")
    ops: list[HotOp | PyHotOp] = []
    for plugin_ops in pm.hook.knhk_hot_ops(config=config):
        ops.extend(plugin_ops or ())
    seen: set[str] = set()
    for op in ops:
        if not isinstance(op, (HotOp, PyHotOp)):
            raise HotOpError(f"a hot-path operation must be a knhk_memory.hotpath.HotOp or PyHotOp, "
                             f"got {type(op).__name__} {op!r}")
        b = op.default_budget
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise HotOpError(f"hot-path operation {op.name!r}: default_budget must be a positive integer, got {b!r}")
        if op.name in seen:
            raise HotOpError(f"two providers give a hot-path operation named {op.name!r}; names must be unique")
        seen.add(op.name)
    return ops


def resolve_budgets(config: Config | None, ops: Sequence[HotOp | PyHotOp]) -> dict[str, tuple[int, BudgetSource]]:
    """``{name: (budget, "default" | "config")}``. A ``[budgets]`` key that
    names no operation is a ConfigError (the types were checked on load)."""
    names = [op.name for op in ops]
    result: dict[str, tuple[int, BudgetSource]] = {op.name: (op.default_budget, "default") for op in ops}
    overrides = dict(config.values.get("budgets", {})) if config is not None else {}
    for key, value in overrides.items():
        if key not in result:
            raise ConfigError(f"unknown hot-path operation {key!r}; operations with budgets: "
                              f"{', '.join(names)}{did_you_mean(key, names)}",
                              source=config.source if config is not None else None, key=f"budgets.{key}", value=value)
        result[key] = (value, "config")
    return result


# ---------------------------------------------------------------- checking

def machine_description() -> str:
    """``"Intel(R) Xeon(R) Processor @ 2.50GHz, 2 CPUs, x86_64, Linux 6.1"``: for reports."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count() or '?'} CPUs, {platform.machine()}, {platform.system()} {platform.release()}"


@dataclass
class OpResult:
    """One operation against its budget."""

    name: str
    kind: OpKind                # "native" (ticks), "python" or "test" (nanoseconds)
    description: str
    unit: BudgetUnit            # the budget's unit: "ticks" or "ns"
    budget: int
    budget_source: BudgetSource  # "default", "config" or "marker"
    median_ns: float
    min_ns: float
    median_ticks: float | None  # None for Python calls, or when no tick rate is known
    min_ticks: float | None
    counter: str
    trusted: bool
    attempts: int
    iterations: int
    batches: int
    note: str = ""

    @property
    def value(self) -> float | None:
        """The figure held to the budget: median ticks or median nanoseconds."""
        return self.median_ticks if self.unit == "ticks" else self.median_ns

    @property
    def over(self) -> bool:
        return self.value is not None and self.value > self.budget

    @property
    def failed(self) -> bool:
        return self.over and self.trusted

    @property
    def status(self) -> Verdict:
        """``"ok"``, ``"over"`` (failing only when :attr:`trusted`) or ``"unchecked"`` (no tick rate)."""
        if self.value is None:
            return "unchecked"
        return "over" if self.over else "ok"

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "unchecked"
        if self.over:
            pct = 100.0 * (self.value - self.budget) / self.budget
            return f"OVER +{pct:.0f}%" if self.trusted else f"over +{pct:.0f}% (advisory)"
        return "ok" if self.trusted else "ok (advisory)"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(verdict=self.verdict, failed=self.failed)
        return d


def _native_result(op: HotOp, budget: int, source: BudgetSource, counter: CounterInfo, m: Measurement,
                   attempts: int) -> OpResult:
    if counter.source == lib.KNHK_TICKS_CLOCK_GETTIME:
        med_ns, min_ns = m.median, m.min
        scale = counter.tick_hz / 1e9
        med_t = med_ns * scale if scale else None
        min_t = min_ns * scale if scale else None
    else:
        med_t, min_t = m.median, m.min
        med_ns, min_ns = (m.median * 1e9 / counter.hz, m.min * 1e9 / counter.hz) if counter.hz else (0.0, 0.0)
    return OpResult(op.name, "native", op.description, "ticks", budget, source, med_ns, min_ns, med_t, min_t,
                    counter.name, counter.trusted, attempts, m.iterations, m.batches, op.budget_reason)


def check_op(op: HotOp | PyHotOp, budget: int, budget_source: BudgetSource, counter: CounterInfo,
             settings: Settings = Settings()) -> OpResult:
    """Measure ``op``; when it is over budget, measure once more and keep the
    better median (a neighbour's burst gets one excuse, a regression does not)."""
    def once() -> OpResult:
        ctx, cleanup = op.setup()
        try:
            if isinstance(op, HotOp):
                return _native_result(op, budget, budget_source, counter,
                                      measure_native(op.fn, ctx, settings), 1)
            m = measure_python(ctx, settings)
            return OpResult(op.name, "python", op.description, "ns", budget, budget_source, m.median, m.min,
                            None, None, PY_COUNTER, True, 1, m.iterations, m.batches, op.budget_reason)
        finally:
            cleanup()

    first = once()
    if not first.over:
        return first
    second = once()
    best = second if (second.value or 0) < (first.value or 0) else first
    best.attempts = 2
    return best


@dataclass
class BudgetReport:
    counter: CounterInfo
    results: list[OpResult] = field(default_factory=list)
    machine: str = field(default_factory=lambda: machine_description())

    @property
    def failed(self) -> list[OpResult]:
        return [r for r in self.results if r.failed]

    def as_dict(self) -> dict[str, Any]:
        return {"counter": asdict(self.counter), "counter_description": self.counter.describe(),
                "python_counter": PY_COUNTER, "machine": self.machine,
                "operations": [r.as_dict() for r in self.results], "ok": not self.failed}


def select_ops(ops: Sequence[HotOp | PyHotOp], only: Sequence[str] | None) -> list[HotOp | PyHotOp]:
    """The operations named in ``only`` (all when empty); an unknown name is an error."""
    if not only:
        return list(ops)
    by_name = {op.name: op for op in ops}
    for name in only:
        if name not in by_name:
            raise UnknownOperationError(f"unknown hot-path operation {name!r}; known operations: "
                                        f"{', '.join(by_name)}{did_you_mean(name, by_name)}")
    return [by_name[name] for name in dict.fromkeys(only)]


def run_budgets(config: Config | None = None, *, pm: Any, only: Sequence[str] | None = None,
                counter: TickSource = "auto", facts: dict[str, Any] | None = None,
                settings: Settings = Settings()) -> BudgetReport:
    """Gather the operations of ``pm``'s plugins (:func:`gather_ops`), check
    names, then measure every (or every ``only``) operation."""
    ops = gather_ops(config, pm)
    budgets = resolve_budgets(config, ops)
    chosen = select_ops(ops, only)
    info = use_counter(counter, facts)
    try:
        report = BudgetReport(info)
        for op in chosen:
            budget, source = budgets[op.name]
            report.results.append(check_op(op, budget, source, info, settings))
        return report
    finally:
        lib.knhk_ticks_select(lib.KNHK_TICKS_AUTO)


# ---------------------------------------------------------------- reporting

def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(report: BudgetReport) -> str:
    """The budget table: one line per operation, the counter described above it."""
    header = ("operation", "median ticks", "min ticks", "median ns", "min ns", "budget", "verdict", "counter")
    rows = [header]
    for r in report.results:
        rows.append((r.name, _fmt(r.median_ticks), _fmt(r.min_ticks), _fmt(r.median_ns), _fmt(r.min_ns),
                     f"{r.budget} {r.unit}", r.verdict + (" (2 runs)" if r.attempts > 1 else ""), r.counter))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {1, 2, 3, 4}
    lines = [f"tick counter: {report.counter.describe()}",
             f"Python calls: time.{PY_COUNTER}; machine: {report.machine}"]
    for i, row in enumerate(rows):
        cells = [c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    broken = report.failed
    unchecked = sum(r.value is None for r in report.results)
    lines.append((f"{len(broken)} of {len(report.results)} budgets broken: {', '.join(r.name for r in broken)}"
                  if broken else f"all {len(report.results)} budgets kept")
                 + (f" ({unchecked} unchecked: no tick rate on this counter)" if unchecked else ""))
    return "\n".join(lines)
