"""Labelled counter families and histograms shared by every worker, and their
exposition in the Prometheus text format 0.0.4 and OpenMetrics 1.0.

A :class:`Metrics` block is one piece of memory (private, POSIX shared memory
or a file, as :class:`~knhk_memory.counters.Counters`) holding a table of
metric families and their label sets, and the striped cells they count into
(an embedded counter block: one cache-line-padded slot per writer thread,
exact across threads and processes, slots of dead processes taken back with
their counts). A label set first used in one process is visible to every
process attached to the block: the table is in the block, inserted into with
a compare-and-swap on the entry's state word (native/metrics.c documents the
protocol).

::

    m = Metrics(shared=True, max_label_sets=1024)
    done = m.counter("tasks_completed", "Tasks completed, by task type.", labels=("task_type",))
    user = done.labels(task_type="UserTask")   # bind once
    user.add()                                 # a builtin: ~ the cost of Counters.add
    lat = m.histogram("task_seconds", "Task latency.", labels=("task_type",),
                      buckets=(0.001, 0.01, 0.1, 1.0))
    lat.labels("UserTask").observe(0.004)
    print(generate(m))                         # the text Prometheus scrapes

Histograms have fixed buckets with Prometheus ``le`` semantics (an
observation ``v`` counts in the first bucket whose upper bound is ``>= v``;
buckets are made cumulative on export, the last is ``+Inf``). The count is the
sum of the buckets, so a scrape never shows a count that disagrees with the
buckets, even if a writer died between its two adds. The sum is kept as a
signed 64-bit integer of ``sum_resolution`` units (default 1e-9: nanoseconds
for observations in seconds), so it adds exactly and in any order.

Bounds: at most ``max_label_sets`` label sets per block (``[metrics]
max_label_sets``), ``max_cells`` cells (a counter set takes one, a histogram
set one per bucket plus one), 256 families; past one,
:class:`~knhk_memory.errors.LabelSetLimitError` names the bound and the key.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

from . import _fast, segments
from ._core import check, ffi, last_error, lib
from .counters import Counters, PatternStats, _attach_mapping, _create_mapping, _SharedHandle
from .errors import (
    CounterBlockClosedError,
    CounterIncrementError,
    HistogramBucketsError,
    KnhkMemoryError,
    LabelSetLimitError,
    LabelValueError,
    MetricDefinitionError,
    MetricNameError,
    SharedBlockError,
    SharedBlockNotFoundError,
)

__all__ = [
    "Metrics", "CounterFamily", "HistogramFamily", "CounterChild", "HistogramChild", "MetricFamily", "Sample",
    "CountersSource", "PatternStatsSource", "GaugeSource", "generate", "make_server", "prometheus_collector",
    "DEFAULT_BUCKETS", "CONTENT_TYPE_PROMETHEUS", "CONTENT_TYPE_OPENMETRICS", "PatternHistograms", "PATTERN_BUCKETS",
]

CONTENT_TYPE_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
#: prometheus_client's default buckets (seconds).
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_I64_MAX = 2**63 - 1
_FULL_KEYS = {
    lib.KNHK_METRICS_FULL_SETS: ("label sets", "[metrics] max_label_sets"),
    lib.KNHK_METRICS_FULL_CELLS: ("cells", "[metrics] max_cells"),
    lib.KNHK_METRICS_FULL_BYTES: ("bytes of label values", "[metrics] max_label_sets (256 bytes per set)"),
    lib.KNHK_METRICS_FULL_FAMILIES: ("families", ""),
    lib.KNHK_METRICS_FULL_TABLE: ("table entries", "[metrics] max_label_sets"),
}


def _check_metric_name(name: object) -> str:
    if not isinstance(name, str) or not _METRIC_NAME.match(name):
        raise MetricNameError(f"metric name {name!r} is not accepted: names match [a-zA-Z_:][a-zA-Z0-9_:]*")
    return name


def _check_label_names(labels: object, reserved: tuple[str, ...] = ()) -> tuple[str, ...]:
    if isinstance(labels, str) or not isinstance(labels, Iterable):
        raise MetricNameError(f"labels must be a sequence of label names, got {labels!r}")
    out = tuple(labels)
    for n in out:
        if not isinstance(n, str) or not _LABEL_NAME.match(n):
            raise MetricNameError(f"label name {n!r} is not accepted: label names match [a-zA-Z_][a-zA-Z0-9_]*")
        if n.startswith("__"):
            raise MetricNameError(f"label name {n!r} is reserved: names starting with '__' are Prometheus' own")
        if n in reserved:
            raise MetricNameError(f"label name {n!r} is reserved in this family type (reserved: "
                                  f"{', '.join(reserved)})")
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise MetricNameError(f"label names must be unique; repeated: {', '.join(map(repr, dupes))}")
    return out


def _check_buckets(buckets: object) -> tuple[float, ...]:
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Iterable):
        raise HistogramBucketsError(f"buckets must be a sequence of numbers, got {buckets!r}")
    raw = list(buckets)
    out: list[float] = []
    for i, b in enumerate(raw):
        if isinstance(b, bool) or not isinstance(b, Real):
            raise HistogramBucketsError(f"bucket {i} is {b!r}, not a number")
        f = float(b)
        if math.isnan(f):
            raise HistogramBucketsError(f"bucket {i} is NaN; bucket bounds are finite numbers (+Inf is implied)")
        if f == math.inf and i == len(raw) - 1:
            break  # an explicit +Inf last: implied anyway
        if math.isinf(f):
            raise HistogramBucketsError(f"bucket {i} is {f}; bucket bounds are finite (the +Inf bucket is implied, "
                                        f"and may only be given last)")
        if out and f <= out[-1]:
            word = "repeats" if f == out[-1] else "is below"
            raise HistogramBucketsError(f"buckets must be strictly increasing: bucket {i} ({f!r}) {word} bucket "
                                        f"{i - 1} ({out[-1]!r}); given {raw!r}")
        out.append(f)
    if len(out) > 1024:
        raise HistogramBucketsError(f"{len(out)} buckets; at most 1024 are accepted")
    return tuple(out)


def _label_value(name: str, value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Integral) and not isinstance(value, bool):
        return str(int(value))
    raise LabelValueError(f"label {name!r} value {value!r} is a {type(value).__name__}; label values are strings "
                          f"(or ints, written in decimal)")


# ---------------------------------------------------------------- the block


class _MetricsMapping:
    """The memory of a metrics block; releases with the handle."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner  # counters._Mapping: mm, name, kind, unlink_pid, buf

    def release(self, handle: Any) -> None:
        lib.knhk_metrics_close(handle)
        ffi.release(self.inner.buf)
        self.inner.mm.close()
        if self.inner.unlink_pid == os.getpid():
            self.inner.unlink()


class Metrics(_SharedHandle):
    """A block of labelled counter families and histograms, exact across threads and
    processes.

    :param shared: False (private to this process; threads share it), True (POSIX
        shared memory under a fresh :attr:`name`), or a name / file path to create.
    :param max_label_sets: bound on distinct label sets in the block (all families);
        the config key ``[metrics] max_label_sets``. 1..1048576.
    :param max_cells: counters the label sets count into: one per counter label set,
        ``len(buckets) + 2`` per histogram label set. ``[metrics] max_cells``. 1..65536.
        The block takes about ``64 * 8 * max_cells`` bytes of address space (one
        slot per writer thread), of which only the pages written are backed.
    :raises ValueError: a bound out of range. :raises SharedBlockError: the name exists.

    Other processes attach with :meth:`attach` (or unpickle it: it pickles as its
    name).
    """

    def __init__(self, *, shared: bool | str | os.PathLike[str] = False, max_label_sets: int = 1024,
                 max_cells: int = 16384) -> None:
        for key, v, hi in (("max_label_sets", max_label_sets, lib.KNHK_METRICS_SETS_MAX),
                           ("max_cells", max_cells, lib.KNHK_COUNTERS_MAX)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise ValueError(f"{key} must be an integer in 1..{hi}, got {v!r}")
        size = lib.knhk_metrics_layout_size(max_label_sets, max_cells)
        inner = _create_mapping(size, shared)
        try:
            check(lib.knhk_metrics_format(inner.buf, size, max_label_sets, max_cells), "formatting the metrics block")
            if inner.name is not None:  # the creator's start time, beside the pid in the embedded counter header
                segments.stamp(inner.mm, int.from_bytes(inner.mm[64:72], "little"))
            self._open(inner)
        except BaseException:
            ffi.release(inner.buf)
            inner.mm.close()
            inner.unlink()
            raise

    @classmethod
    def attach(cls, name: str | os.PathLike[str]) -> Metrics:
        """Open the shared metrics block another process created under ``name``.

        :raises SharedBlockNotFoundError: no such block. :raises SharedBlockError: the
            memory is not a metrics block this build can read (every offset in it is
            checked against the mapped size before anything is read)."""
        try:
            inner = _attach_mapping(name)
        except SharedBlockNotFoundError as exc:
            raise SharedBlockNotFoundError(str(exc).replace("no counter block", "no metrics block")) from None
        self = cls.__new__(cls)
        try:
            self._open(inner)
        except BaseException:
            ffi.release(inner.buf)
            inner.mm.close()
            raise
        return self

    @classmethod
    def from_config(cls, config: Any, *, attach: bool = False) -> Metrics:
        """The block ``[metrics]`` describes: created (``shared_name`` or a fresh shared
        name when ``shared``; private otherwise), or attached to (``attach=True``,
        which needs ``shared_name``)."""
        sec = config.metrics
        if attach:
            if not sec.shared_name:
                raise config.error("metrics.shared_name", "attaching needs the block's name: set [metrics] "
                                   "shared_name (a shared-memory name, or a file path if it contains '/')")
            return cls.attach(sec.shared_name)
        shared: bool | str = sec.shared_name or bool(sec.shared)
        return cls(shared=shared, max_label_sets=sec.max_label_sets, max_cells=sec.max_cells)

    def _open(self, inner: Any) -> None:
        out = ffi.new("knhk_metrics **")
        if lib.knhk_metrics_open(inner.buf, len(inner.mm), out) != lib.KNHK_OK:
            where = f"{inner.name!r}" if inner.name else "the block"
            raise SharedBlockError(f"{where} is not a metrics block this build can use: {last_error()}")
        mapping = _MetricsMapping(inner)
        self._mapping = inner
        self._h = ffi.gc(out[0], mapping.release)
        self._c = lib.knhk_metrics_counters(self._h)
        self._cells = int(lib.knhk_metrics_cells(self._h))
        self._capacity = int(lib.knhk_metrics_capacity(self._h))
        self._max_sets = int(lib.knhk_metrics_max_sets(self._h))
        self._state = _fast.metrics_state(int(ffi.cast("uintptr_t", self._c)))
        self._families: dict[str, _Family] = {}
        self._decoded: dict[int, tuple[Any, ...]] = {}  # entry index -> decoded (entries never change)
        self._lock = threading.Lock()

    # -- properties

    @property
    def _handle(self) -> Any:
        h = self._h
        if h is None:
            raise CounterBlockClosedError("this Metrics block is closed")
        return h

    def _require_open(self) -> tuple[Any, Any]:
        """``(handle, cells)``: the native handle and its counter cells' pointer; raises
        :class:`CounterBlockClosedError` once the block is closed.

        ``cells`` points into the mapping the handle owns: keep the handle in a local
        for as long as ``cells`` is used, so a close() on another thread cannot unmap it
        under the call (the mapping goes when the last reference to the handle does)."""
        return self._handle, self._c

    @property
    def max_label_sets(self) -> int:
        return self._max_sets

    @property
    def max_cells(self) -> int:
        return self._cells

    def usage(self) -> dict[str, int]:
        """What the block holds now: label sets, families, label-value bytes and cells in use."""
        out = ffi.new("uint64_t[4]")
        lib.knhk_metrics_usage(self._handle, out)
        return {"label_sets": out[0], "families": out[1], "bytes": out[2], "cells": out[3]}

    def slots_owned(self) -> int:
        """Writer slots owned now (threads of every attached process that have written)."""
        _h, c = self._require_open()
        return int(lib.knhk_counters_slots_owned(c))

    def reclaim_dead(self) -> int:
        """Free the writer slots of processes that died holding them (their counts stay)."""
        _h, c = self._require_open()
        return int(lib.knhk_counters_reclaim_dead(c))

    def close(self) -> None:
        """Drop this handle: its threads' slots go back, builtins of its children take
        their slow path (and raise). The creator of a named block also unlinks it.

        From any thread: a call running meanwhile completes (it holds the handle, and
        the mapping is unmapped only when the last call using it returns); later calls
        on the block, its families and children raise :class:`CounterBlockClosedError`
        (issue 22). Nothing is handed out that points into the block: values and
        snapshots are copies."""
        if self._h is not None:
            _fast.detach_metrics(self._state)
        self._h = None

    # -- the table

    def _intern(self, kind: int, parent: int, key: bytes, payload: bytes, ncells: int,
                what: Callable[[], str]) -> tuple[int, int]:
        entry, cell = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        created, full = ffi.new("int *"), ffi.new("int *")
        st = lib.knhk_metrics_intern(self._handle, kind, parent, key, len(key), payload, len(payload), ncells,
                                     entry, cell, created, full)
        if st != lib.KNHK_OK:
            if full[0]:
                noun, key_name = _FULL_KEYS[full[0]]
                bound = {lib.KNHK_METRICS_FULL_SETS: self._max_sets, lib.KNHK_METRICS_FULL_CELLS: self._cells,
                         lib.KNHK_METRICS_FULL_FAMILIES: lib.KNHK_METRICS_FAMILIES_MAX}.get(full[0])
                detail = f"all {bound} {noun} are used" if bound is not None else last_error()
                if full[0] == lib.KNHK_METRICS_FULL_CELLS:
                    detail = f"{self.usage()['cells']} of its {bound} cells are used, {ncells} more are needed"
                if full[0] == lib.KNHK_METRICS_FULL_FAMILIES:
                    raise LabelSetLimitError(f"{what()}: the metrics block is full ({detail}); a block holds at "
                                             f"most {bound} families (a fixed bound, no config key): use labels "
                                             f"instead of one family per value")
                raise LabelSetLimitError(f"{what()}: the metrics block is full ({detail}); the bound is the config "
                                         f"key {key_name}: raise it for a new block, or use fewer distinct "
                                         f"label values")
            check(st, what())
        return int(entry[0]), int(cell[0])

    def _family(self, kind: str, name: str, documentation: str, labels: tuple[str, ...],
                buckets: tuple[float, ...] | None, resolution: float | None) -> _Family:
        if not isinstance(documentation, str):
            raise TypeError(f"documentation must be a string, got {documentation!r}")
        definition: dict[str, Any] = {"type": kind, "help": documentation, "labels": list(labels)}
        if buckets is not None:
            definition["buckets"] = list(buckets)
            definition["resolution"] = resolution
        with self._lock:
            fam = self._families.get(name)
            if fam is None:
                payload = json.dumps(definition, sort_keys=True).encode()
                entry, _ = self._intern(lib.KNHK_METRICS_KIND_FAMILY, 0, name.encode(), payload, 0,
                                        lambda: f"declaring family {name!r}")
                stored = self._entry(entry)
                if stored is None or _stored_definition(stored[4]) != definition:
                    raise MetricDefinitionError(
                        f"family {name!r} already exists in this block as "
                        f"{_describe_def(stored[4] if stored else None)}"
                        f"; declared now as {_describe_def(definition)}")
                cls = CounterFamily if kind == "counter" else HistogramFamily
                fam = cls(self, name, entry, definition)
                self._families[name] = fam
            elif fam._definition != definition:
                raise MetricDefinitionError(f"family {name!r} already exists in this block as "
                                            f"{_describe_def(fam._definition)}; declared now as "
                                            f"{_describe_def(definition)}")
            return fam

    def counter(self, name: str, documentation: str = "", labels: Sequence[str] = ()) -> CounterFamily:
        """The counter family ``name`` (declared here, or found as another process
        declared it). A trailing ``_total`` is dropped from the name (the exposition
        adds it back), as prometheus_client does.

        :raises MetricNameError: a name the exposition format cannot carry.
        :raises MetricDefinitionError: the family exists with another type, help or labels.
        """
        name = _check_metric_name(name)
        if name.endswith("_total"):
            name = name[: -len("_total")]
        return self._family("counter", name, documentation, _check_label_names(labels), None, None)  # type: ignore[return-value]

    def histogram(self, name: str, documentation: str = "", labels: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS, sum_resolution: float = 1e-9) -> HistogramFamily:
        """The histogram family ``name`` with fixed bucket upper bounds ``buckets``
        (strictly increasing finite numbers; ``+Inf`` is implied and may be given last).

        :param sum_resolution: the unit the sum is kept in (an int64 count of them):
            1e-9 keeps seconds to the nanosecond up to 292 years; 1 for integer
            observations (ticks, bytes).
        :raises HistogramBucketsError: unsorted, repeated, NaN or infinite bounds.
        :raises MetricNameError: a bad name, or the label ``le``.
        """
        name = _check_metric_name(name)
        if isinstance(sum_resolution, bool) or not isinstance(sum_resolution, Real) or \
                not (math.isfinite(float(sum_resolution)) and float(sum_resolution) > 0):
            raise HistogramBucketsError(f"sum_resolution must be a positive finite number, got {sum_resolution!r}")
        return self._family("histogram", name, documentation, _check_label_names(labels, ("le",)),  # type: ignore[return-value,unused-ignore]
                            _check_buckets(buckets), float(sum_resolution))

    def _entry(self, index: int) -> tuple[Any, ...] | None:
        """(kind, parent, cell, ncells, decoded key/definition) of a ready entry, or None
        if it is not ready or not valid."""
        got = self._decoded.get(index)
        if got is not None:
            return got
        info = ffi.new("knhk_metrics_entry_info *")
        h = self._handle  # info points into the mapping: held until the bytes are copied out
        if lib.knhk_metrics_entry_get(h, index, info) != lib.KNHK_OK:
            return None
        key = ffi.buffer(info.key, info.key_len)[:]
        payload = ffi.buffer(info.payload, info.payload_len)[:]
        del h
        try:
            if info.kind == lib.KNHK_METRICS_KIND_FAMILY:
                value: Any = json.loads(payload)
                name = key.decode("utf-8")
                if not isinstance(value, dict) or value.get("type") not in ("counter", "histogram") or \
                        not _METRIC_NAME.match(name):
                    return None
                labels = tuple(_check_label_names(value.get("labels", ())))
                if not isinstance(value.get("help"), str):
                    return None
                if value["type"] == "histogram":
                    res = value.get("resolution")
                    if isinstance(res, bool) or not isinstance(res, (int, float)) or not (0 < res < math.inf):
                        return None
                    want = len(_check_buckets(value.get("buckets", ()))) + 2
                else:
                    want = 1
                value = dict(value, name=name, labels=list(labels))
                value["_ncells"] = want
            else:
                value = tuple(json.loads(key))
                if not all(isinstance(v, str) for v in value):
                    return None
        except (ValueError, TypeError, KnhkMemoryError):
            return None  # not ours, or corrupt: skipped (and counted) by the scrape
        got = (int(info.kind), int(info.parent), int(info.cell), int(info.ncells), value)
        self._decoded[index] = got
        return got

    # -- reading

    def snapshot(self) -> tuple[list[tuple[dict[str, Any], list[tuple[tuple[str, ...], list[int]]]]], int]:
        """Every family and its label sets with their cells' values, read now:
        ``([(definition, [(label values, cell values), ...]), ...], skipped)``
        where ``skipped`` counts entries that were corrupt or not from this build."""
        h = self._handle
        buf = ffi.new("uint32_t[]", self._capacity)
        n = ffi.new("size_t *")
        check(lib.knhk_metrics_list(h, buf, self._capacity, n), "listing the metrics table")
        vals = ffi.new("int64_t[]", self._cells)
        used = ffi.new("size_t *")
        check(lib.knhk_metrics_values(h, vals, self._cells, used), "reading the metric cells")
        fams: dict[int, tuple[dict[str, Any], list[tuple[tuple[str, ...], list[int]]]]] = {}
        sets: list[tuple[int, int, int, tuple[str, ...]]] = []
        skipped = 0
        for idx in ffi.unpack(buf, n[0]):
            e = self._entry(idx)
            if e is None:
                skipped += 1
            elif e[0] == lib.KNHK_METRICS_KIND_FAMILY:
                fams[idx] = (e[4], [])
            else:
                sets.append((e[1], e[2], e[3], e[4]))
        for parent, cell, ncells, values in sets:
            fam = fams.get(parent)
            if fam is None or ncells != fam[0]["_ncells"] or len(values) != len(fam[0]["labels"]) or \
                    cell + ncells > used[0]:
                skipped += 1
                continue
            fam[1].append((values, ffi.unpack(vals + cell, ncells)))
        out = sorted(fams.values(), key=lambda f: f[0]["name"])
        for _, rows in out:  # numbers in numeric order ("9" before "10"), then text
            rows.sort(key=lambda r: tuple((0, int(v), "") if v.isascii() and v.isdigit() and len(v) < 19 else (1, 0, v)
                                          for v in r[0]))
        return out, skipped

    def collect(self) -> list[MetricFamily]:
        """The block's families as :class:`MetricFamily` (counters and histograms,
        histogram buckets cumulative), plus ``knhk_metrics_skipped_entries`` when an
        entry could not be read."""
        fams, skipped = self.snapshot()
        out: list[MetricFamily] = []
        for d, rows in fams:
            labels = d["labels"]
            samples: list[Sample] = []
            if d["type"] == "counter":
                for values, cells in rows:
                    samples.append(Sample("_total", dict(zip(labels, values)), cells[0]))
                out.append(MetricFamily(d["name"], "counter", d["help"], samples))
            else:
                bounds = d["buckets"]
                for values, cells in rows:
                    lab = dict(zip(labels, values))
                    cum = 0
                    for b, c in zip([*bounds, math.inf], cells):
                        cum += c
                        samples.append(Sample("_bucket", {**lab, "le": _float_text(b)}, cum))
                    samples.append(Sample("_count", lab, cum))
                    samples.append(Sample("_sum", lab, _sum_value(cells[-1], d["resolution"])))
                out.append(MetricFamily(d["name"], "histogram", d["help"], samples))
        if skipped:
            out.append(MetricFamily("knhk_metrics_skipped_entries", "gauge",
                                    "Entries of the metrics table that could not be read (corrupt or foreign).",
                                    [Sample("", {}, skipped)]))
        return out


def _sum_value(units: int, resolution: float) -> float:
    """units * resolution, correctly rounded when 1/resolution is an integer (1e-9 -> / 1e9)."""
    inv = 1.0 / resolution
    if inv >= 1 and abs(inv - round(inv)) <= 1e-9 * inv:
        return units / round(inv)
    return units * resolution


def _stored_definition(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("name", "_ncells")}


def _describe_def(d: Mapping[str, Any] | None) -> str:
    if d is None:
        return "an entry this build cannot read"
    text = f"a {d.get('type')} with labels {tuple(d.get('labels', ()))!r}"
    if d.get("type") == "histogram":
        text += f", buckets {tuple(d.get('buckets', ()))!r}, sum_resolution {d.get('resolution')!r}"
    return text + f" and help {d.get('help')!r}"


# ---------------------------------------------------------------- families and children


class _Family:
    _kind: str
    _child_cls: Any

    def __init__(self, block: Metrics, name: str, entry: int, definition: dict[str, Any]) -> None:
        self._block = block
        self.name = name
        self._entry = entry
        self._definition = definition
        self.documentation: str = definition["help"]
        self.label_names: tuple[str, ...] = tuple(definition["labels"])
        self._children: dict[tuple[str, ...], Any] = {}
        self._ncells = 1

    def labels(self, *values: object, **kw: object) -> Any:
        """The child of one label set, by position or by name: ``labels("UserTask")`` or
        ``labels(task_type="UserTask")``. The first use of a label set in any process
        inserts it in the block; later calls return the same child (bind it once and
        keep it: its ``add``/``observe`` is the fast path).

        :raises LabelValueError: missing, extra or non-string values.
        :raises LabelSetLimitError: a new label set past ``[metrics] max_label_sets``.
        """
        names = self.label_names
        if values and kw:
            raise LabelValueError(f"give the labels of {self.name!r} by position or by name, not both")
        if kw:
            missing = [n for n in names if n not in kw]
            extra = sorted(set(kw) - set(names))
            if missing or extra:
                raise LabelValueError(f"family {self.name!r} has labels {names!r}; "
                                      + (f"missing {missing!r}" if missing else "")
                                      + ("; " if missing and extra else "") + (f"unknown {extra!r}" if extra else ""))
            values = tuple(kw[n] for n in names)
        elif len(values) != len(names):
            raise LabelValueError(f"family {self.name!r} has {len(names)} labels {names!r}, got {len(values)} "
                                  f"values {values!r}")
        key = tuple(_label_value(n, v) for n, v in zip(names, values))
        child = self._children.get(key)
        if child is None:
            child = self._make_child(key)
        return child

    def _make_child(self, key: tuple[str, ...]) -> Any:
        blob = json.dumps(list(key), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        with self._block._lock:
            child = self._children.get(key)
            if child is None:
                entry, cell = self._block._intern(
                    lib.KNHK_METRICS_KIND_SET, self._entry, blob, b"", self._ncells,
                    lambda: f"family {self.name!r} cannot add the label set {dict(zip(self.label_names, key))!r}")
                got = self._block._entry(entry)
                if got is None or got[2:4] != (cell, self._ncells):  # only a corrupt block can get here
                    raise SharedBlockError(f"the metrics block's entry for {self.name}{list(key)!r} is corrupt "
                                           f"(it does not own the {self._ncells} cells this family needs)")
                child = self._child_cls(self, key, cell)
                self._children[key] = child
        return child

    def _default(self) -> Any:
        if self.label_names:
            raise LabelValueError(f"family {self.name!r} has labels {self.label_names!r}: use "
                                  f".labels(...) to choose a label set")
        return self.labels()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} labels={self.label_names!r}>"


class CounterChild:
    """One label set of a :class:`CounterFamily`. ``add(n=1)`` is a builtin (a
    vectorcall and one striped add); :meth:`get` reads the total over every process."""

    __slots__ = ("family", "label_values", "_cell", "add", "__weakref__")

    def __init__(self, family: CounterFamily, values: tuple[str, ...], cell: int) -> None:
        self.family = family
        self.label_values = values
        self._cell = cell
        self.add = _fast.metrics_method(0, family._block._state, cell, self._add)

    def _add(self, n: object = 1) -> None:
        """The slow path: converts or raises, then adds."""
        if isinstance(n, bool) or not isinstance(n, Integral):
            raise CounterIncrementError(f"a counter's increment must be an integer, got {type(n).__name__} {n!r}")
        v = int(n)
        if v < 0:
            raise CounterIncrementError(f"a counter never goes down: increment {v} is negative (accepted: "
                                        f"0..{_I64_MAX})")
        if v > _I64_MAX:
            raise CounterIncrementError(f"increment {v} does not fit a 64-bit counter (accepted: 0..{_I64_MAX})")
        block = self.family._block
        _h, c = block._require_open()
        check(lib.knhk_counters_add(c, self._cell, v), "adding to a counter")

    def inc(self, n: int = 1) -> None:
        """prometheus_client's spelling of :attr:`add`."""
        self.add(n)

    def get(self) -> int:
        """The total over every thread and process."""
        block = self.family._block
        _h, c = block._require_open()
        return int(lib.knhk_counters_get(c, self._cell))

    def __repr__(self) -> str:
        return f"<CounterChild {self.family.name}{dict(zip(self.family.label_names, self.label_values))!r}>"


class CounterFamily(_Family):
    """A labelled counter family: :meth:`labels` gives a child per label set. A
    family without labels adds directly (``family.add()``)."""

    _child_cls = CounterChild

    def add(self, n: int = 1) -> None:
        self._default().add(n)

    inc = add

    def get(self, *values: object, **kw: object) -> int:
        return self.labels(*values, **kw).get() if (values or kw) else self._default().get()


class HistogramChild:
    """One label set of a :class:`HistogramFamily`: ``observe(value)`` is a builtin."""

    __slots__ = ("family", "label_values", "_cell", "observe", "__weakref__")

    def __init__(self, family: HistogramFamily, values: tuple[str, ...], cell: int) -> None:
        self.family = family
        self.label_values = values
        self._cell = cell
        self.observe = _fast.metrics_method(1, family._block._state, cell, self._observe, family.buckets,
                                            family.sum_resolution)

    def _observe(self, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, Real):
            raise CounterIncrementError(f"an observation must be a number, got {type(value).__name__} {value!r}")
        v = float(value)
        units = v / self.family.sum_resolution if math.isfinite(v) else math.nan
        if not (-9.2e18 < units < 9.2e18):
            raise CounterIncrementError(
                f"observation {value!r} cannot be recorded: it must be finite and |value| / sum_resolution "
                f"({self.family.sum_resolution!r}) below 9.2e18")
        block = self.family._block
        _h, c = block._require_open()
        b = self.family.buckets
        check(lib.knhk_metrics_observe(c, self._cell, b, len(b), v, round(units)), "recording an observation")

    def observe_many(self, value: float, count: int) -> None:
        """Record ``count`` observations of ``value`` at once (one add to its bucket, one to
        the sum): what a batch that timed ``count`` executions together records."""
        if isinstance(count, bool) or not isinstance(count, Integral) or not 0 <= int(count) <= _I64_MAX:
            raise CounterIncrementError(f"count must be an integer in 0..{_I64_MAX}, got {count!r}")
        if isinstance(value, bool) or not isinstance(value, Real):
            raise CounterIncrementError(f"an observation must be a number, got {type(value).__name__} {value!r}")
        v, count = float(value), int(count)
        units = v / self.family.sum_resolution * count if math.isfinite(v) else math.nan
        if not (-9.2e18 < units < 9.2e18):
            raise CounterIncrementError(
                f"{count} observations of {value!r} cannot be recorded: the value must be finite and "
                f"|value| * count / sum_resolution ({self.family.sum_resolution!r}) below 9.2e18")
        if count == 0:
            return
        block = self.family._block
        _h, c = block._require_open()
        b = self.family.buckets
        check(lib.knhk_counters_add(c, self._cell + bisect.bisect_left(b, v), count), "recording observations")
        check(lib.knhk_counters_add(c, self._cell + len(b) + 1, round(units)), "recording observations")

    def get(self) -> dict[str, Any]:
        """``{"buckets": [(le, cumulative count), ...], "count": n, "sum": s}`` now."""
        block = self.family._block
        _h, c = block._require_open()
        cells = [int(lib.knhk_counters_get(c, self._cell + i)) for i in range(self.family._ncells)]
        cum, buckets = 0, []
        for b, c in zip([*self.family.buckets, math.inf], cells):
            cum += c
            buckets.append((b, cum))
        return {"buckets": buckets, "count": cum, "sum": _sum_value(cells[-1], self.family.sum_resolution)}

    def __repr__(self) -> str:
        return f"<HistogramChild {self.family.name}{dict(zip(self.family.label_names, self.label_values))!r}>"


class HistogramFamily(_Family):
    """A labelled histogram family with fixed buckets (see the module docstring)."""

    _child_cls = HistogramChild

    def __init__(self, block: Metrics, name: str, entry: int, definition: dict[str, Any]) -> None:
        super().__init__(block, name, entry, definition)
        self.buckets: tuple[float, ...] = tuple(definition["buckets"])
        self.sum_resolution: float = definition["resolution"]
        self._ncells = len(self.buckets) + 2

    def observe(self, value: float) -> None:
        self._default().observe(value)


# ---------------------------------------------------------------- per-pattern latency

#: Upper bounds (seconds) of :class:`PatternHistograms`: 10 ns to 10 ms, a 1-2.5-5 ladder
#: up to 10 us (a vectorised pattern execution takes nanoseconds to microseconds).
PATTERN_BUCKETS = (1e-8, 2.5e-8, 5e-8, 1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 1e-4, 1e-3, 1e-2)


class _PatternTimer:
    __slots__ = ("_h", "_pattern", "_t0")

    def __init__(self, h: PatternHistograms, pattern: int) -> None:
        self._h, self._pattern = h, pattern

    def __enter__(self) -> _PatternTimer:
        self._t0 = lib.knhk_counters_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        self._h.record(self._pattern, max(0, lib.knhk_counters_ticks() - self._t0))


class PatternHistograms:
    """Per-pattern latency histograms, next to :class:`~knhk_memory.counters.PatternStats`
    (which keeps count, total, min and max per pattern): one histogram family
    ``name{pattern="<WCP id>"}`` in a :class:`Metrics` block, shared by every worker.

    ``record(pattern, ticks, count=1)`` takes the same ticks as ``PatternStats.record``
    (the timestamp counter; converted with its measured ticks per second) and
    records ``count`` executions of that duration with two adds: what a batch that
    timed ``count`` executions together records. The sum is kept in picoseconds
    (``sum_resolution=1e-12``: up to 106 days of pattern time in all).

    :raises CounterIndexError: a pattern id outside 1..43. :raises TypeError: not an int.
    """

    def __init__(self, metrics: Metrics, name: str = "knhk_pattern_execution_seconds",
                 buckets: Sequence[float] = PATTERN_BUCKETS,
                 help: str = "Time of one pattern execution, by WCP pattern id.") -> None:
        self.family = metrics.histogram(name, help, labels=("pattern",), buckets=buckets, sum_resolution=1e-12)
        self._children: dict[int, HistogramChild] = {}
        self._per_tick = 1.0 / float(lib.knhk_counters_ticks_per_second())

    def child(self, pattern: int) -> HistogramChild:
        """The histogram of one pattern id (1..43)."""
        c = self._children.get(pattern)
        if c is None:
            p = PatternStats._pattern(pattern)
            c = self._children[p] = self.family.labels(str(p))
        return c

    def record(self, pattern: int, ticks: int, count: int = 1) -> None:
        """``count`` executions of ``pattern`` that took ``ticks`` each."""
        if isinstance(ticks, bool) or not isinstance(ticks, Integral) or ticks < 0:
            raise CounterIncrementError(f"ticks must be an integer >= 0, got {ticks!r}")
        self.child(pattern).observe_many(int(ticks) * self._per_tick, count)

    def time(self, pattern: int) -> _PatternTimer:
        """``with hists.time(2): ...`` records one execution of pattern 2."""
        self.child(pattern)
        return _PatternTimer(self, pattern)


# ---------------------------------------------------------------- other sources


@dataclass(frozen=True)
class Sample:
    """One sample: the family name plus ``suffix`` (``_total``, ``_bucket``...), labels, value."""

    suffix: str
    labels: Mapping[str, str]
    value: float


@dataclass
class MetricFamily:
    """A family ready for exposition: ``type`` is counter, gauge or histogram."""

    name: str
    type: str
    help: str
    samples: list[Sample] = field(default_factory=list)


class CountersSource:
    """A :class:`~knhk_memory.counters.Counters` block as counter families: counter
    ``x`` (or ``x_total``) becomes ``<prefix>x_total`` (names the format cannot carry
    are refused)."""

    def __init__(self, counters: Counters, prefix: str = "knhk_", help: str = "knhk-memory counter {name}.") -> None:
        self.counters = counters
        self.prefix = prefix
        self.help = help
        self._names = [_check_metric_name(prefix + n.removesuffix("_total")) for n in counters.names]

    def collect(self) -> list[MetricFamily]:
        vals = [self.counters.get(i) for i in range(len(self.counters))]
        return [MetricFamily(fam, "counter", self.help.format(name=n), [Sample("_total", {}, v)])
                for fam, n, v in zip(self._names, self.counters.names, vals)]


class PatternStatsSource:
    """A :class:`~knhk_memory.counters.PatternStats` block: per pattern, executions
    (``<prefix>pattern_executions_total``) and busy time in seconds
    (``<prefix>pattern_seconds_total``; ticks / ticks per second), labelled
    ``pattern`` (the WCP id) and ``name``."""

    def __init__(self, stats: PatternStats, prefix: str = "knhk_") -> None:
        self.stats = stats
        self.prefix = prefix

    def collect(self) -> list[MetricFamily]:
        from .counters import PATTERNS

        tps = self.stats.ticks_per_second()
        ex, secs = [], []
        for p, d in sorted(self.stats.as_dict().items()):
            lab = {"pattern": str(p), "name": PATTERNS.get(p, "")}
            ex.append(Sample("_total", lab, d["executions"]))
            secs.append(Sample("_total", lab, d["total_ticks"] / tps))
        return [MetricFamily(self.prefix + "pattern_executions", "counter", "Pattern executions, by WCP pattern.", ex),
                MetricFamily(self.prefix + "pattern_seconds", "counter",
                             "Time spent in pattern executors, by WCP pattern (ticks / ticks per second).", secs)]


class GaugeSource:
    """Gauges read by a function when scraped: ``fn()`` returns ``{labels tuple: value}``
    or a number (no labels), for values that go up and down (allocator bytes,
    arena chunks) and are per process."""

    def __init__(self, name: str, help: str, fn: Callable[[], Any], labels: Sequence[str] = ()) -> None:
        self.name = _check_metric_name(name)
        self.help = help
        self.fn = fn
        self.label_names = _check_label_names(labels)

    def collect(self) -> list[MetricFamily]:
        got = self.fn()
        if not isinstance(got, Mapping):
            got = {(): got}
        samples = []
        for key, v in got.items():
            key = (key,) if isinstance(key, str) else tuple(key)
            if len(key) != len(self.label_names):
                raise LabelValueError(f"gauge {self.name!r} has labels {self.label_names!r}, its function gave {key!r}")
            samples.append(Sample("", {n: _label_value(n, x) for n, x in zip(self.label_names, key)}, v))
        return [MetricFamily(self.name, "gauge", self.help, samples)]


# ---------------------------------------------------------------- exposition


def _float_text(v: float) -> str:
    """A float as Prometheus/OpenMetrics write it (Go's formatting, as prometheus_client's
    floatToGoString): +Inf, -Inf, NaN, or the shortest repr with Go's exponent style."""
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if v != v:
        return "NaN"
    s = repr(float(v))
    dot = s.find(".")
    if v > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


def _value_text(v: Any) -> str:
    if isinstance(v, int):
        return str(v)
    return _float_text(float(v))


def _escape_value(s: str) -> str:
    return s.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(s: str, openmetrics: bool) -> str:
    s = s.replace("\\", r"\\").replace("\n", r"\n")
    return s.replace('"', r"\"") if openmetrics else s


def _labels_text(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in labels.items()) + "}"


def _families(sources: Iterable[Any]) -> list[MetricFamily]:
    out: list[MetricFamily] = []
    seen: dict[str, int] = {}
    for src in sources:
        for fam in src.collect() if hasattr(src, "collect") else [src]:
            if fam.name in seen:
                raise MetricDefinitionError(f"two sources export the family {fam.name!r}; give one a prefix")
            seen[fam.name] = 1
            out.append(fam)
    return out


def generate(*sources: Any, openmetrics: bool = False) -> str:
    """The text a Prometheus server scrapes, from ``sources`` (a :class:`Metrics`
    block, :class:`CountersSource`, :class:`PatternStatsSource`,
    :class:`GaugeSource`, or anything with ``collect() -> [MetricFamily]``).

    ``openmetrics=False``: the Prometheus text format 0.0.4
    (:data:`CONTENT_TYPE_PROMETHEUS`), as prometheus_client's generate_latest
    writes it (a counter's TYPE and HELP lines name ``x_total``).
    ``openmetrics=True``: OpenMetrics 1.0 (:data:`CONTENT_TYPE_OPENMETRICS`),
    ending in ``# EOF``. Label values are escaped (backslash, double quote,
    newline); names were checked when declared.
    """
    lines: list[str] = []
    for fam in _families(sources):
        name = fam.name
        if not openmetrics and fam.type == "counter":
            name = fam.name + "_total"
        lines.append(f"# HELP {name} {_escape_help(fam.help, openmetrics)}")
        lines.append(f"# TYPE {name} {fam.type}")
        for s in fam.samples:
            lines.append(f"{fam.name}{s.suffix}{_labels_text(s.labels)} {_value_text(s.value)}")
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


def prometheus_collector(*sources: Any) -> Any:
    """A ``prometheus_client`` custom collector over ``sources`` (register it with
    ``prometheus_client.REGISTRY.register(...)``). Needs the ``prometheus`` extra.

    :raises ImportError: prometheus_client is not installed."""
    try:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.registry import Collector
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("prometheus_collector needs prometheus_client: pip install 'knhk-memory[prometheus]'") \
            from exc

    class KnhkCollector(Collector):
        def collect(self) -> Iterable[Any]:
            for fam in _families(sources):
                out: Any
                if fam.type == "counter":
                    out = CounterMetricFamily(fam.name, fam.help, labels=_label_keys(fam))
                    for s in fam.samples:
                        out.add_metric([s.labels[k] for k in out._labelnames], s.value)
                elif fam.type == "gauge":
                    out = GaugeMetricFamily(fam.name, fam.help, labels=_label_keys(fam))
                    for s in fam.samples:
                        out.add_metric([s.labels[k] for k in out._labelnames], s.value)
                else:
                    names = [k for k in _label_keys(fam) if k != "le"]
                    out = HistogramMetricFamily(fam.name, fam.help, labels=names)
                    groups: dict[tuple[str, ...], dict[str, Any]] = {}
                    for s in fam.samples:
                        key = tuple(s.labels[k] for k in names)
                        g = groups.setdefault(key, {"buckets": []})
                        if s.suffix == "_bucket":
                            g["buckets"].append((s.labels["le"], s.value))
                        elif s.suffix == "_sum":
                            g["sum"] = s.value
                    for key, g in groups.items():
                        out.add_metric(list(key), g["buckets"], g["sum"])
                yield out

    return KnhkCollector()


def _label_keys(fam: MetricFamily) -> list[str]:
    return list(fam.samples[0].labels) if fam.samples else []


def make_server(sources: Sequence[Any], host: str = "127.0.0.1", port: int = 0) -> Any:
    """An HTTP server (not yet serving: call ``serve_forever`` or run it in a thread)
    that answers every GET with a scrape of ``sources``: OpenMetrics when the
    request's Accept header asks for ``application/openmetrics-text``, else the
    Prometheus text format 0.0.4. ``port=0`` picks a free port
    (``server.server_address``). Binds 127.0.0.1 by default."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            om = "application/openmetrics-text" in self.headers.get("Accept", "")
            try:
                body = generate(*sources, openmetrics=om).encode("utf-8")
            except Exception as exc:  # a scrape that fails says why, and the server stays up
                msg = f"scrape failed: {type(exc).__name__}: {exc}\n".encode()
                self.send_response(500)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_OPENMETRICS if om else CONTENT_TYPE_PROMETHEUS)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server

