"""SpiffWorkflow on a workflow store: build once, load every process spec fast, count tasks.

SpiffWorkflow (https://github.com/sartography/SpiffWorkflow, 3.x) parses BPMN
and DMN XML into process specs (``BpmnProcessSpec``), from which a host
makes ``BpmnWorkflow`` instances. Parsing is slow (about 5 ms a process for
the models in :mod:`knhk_memory.adapters.spiff_models`) and its JSON
serializer is not much faster to restore from. This adapter:

- :func:`build_spiff_store` (``knhk-memory store build --spiff SOURCE -o
  specs.kst``): parses every ``.bpmn`` / ``.dmn`` file under SOURCE with
  SpiffWorkflow's own parser once, resolves every call activity and
  subprocess by process id, and stores each spec as a record (pickle protocol
  5 by default, the fastest form measured; or SpiffWorkflow's serializer
  JSON with ``codec="json"``), keyed ``{relpath}#{id}`` with the bare process
  id as an alias, with its metadata: the SpiffWorkflow version, the parser,
  its subprocess ids and its task-spec types.
- :class:`SpiffLoader`: ``loader.workflow(process_id)`` gives a
  ``BpmnWorkflow`` ready to run, behaving as one made from the parsed XML.
- :class:`TaskMetrics`: task counts, latency histograms and workflow-pattern
  counts per task-spec type in a :class:`knhk_memory.metrics.Metrics` block
  (labelled families, exact across processes with ``shared=True``, exported
  in the Prometheus text format), fed through SpiffWorkflow's own ``do_engine_steps(
  will_complete_task, did_complete_task)`` callbacks: no monkeypatching.

Trust: a pickled spec is code. :class:`SpiffLoader` refuses pickled records
unless given ``trust_pickle=True``; give it only for stores your own build
made. A ``codec="json"`` store needs no trust and restores about 2x slower.

SpiffWorkflow is imported when a function here needs it; install it with
``pip install knhk-memory[spiff]``.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from ..errors import AdapterBuildError, EngineVersionError, StoreCorruptError, UnknownProcessError, did_you_mean

__all__ = ["build_spiff_store", "SpiffLoader", "TaskMetrics", "spiff_version", "INDEX_KEY", "BUNDLE_KEY",
           "DEFAULT_KEY"]

INDEX_KEY = "spiff/index"
BUNDLE_KEY = "spiff/all-specs"
DEFAULT_KEY = "{relpath}#{id}"
SPEC_CONTENT_TYPE = {"pickle5": "application/vnd.spiffworkflow.spec+pickle",
                     "json": "application/vnd.spiffworkflow.spec+json"}
ADAPTER_LAYOUT = 1


def spiff_version() -> str:
    """The installed SpiffWorkflow's version (``SpiffWorkflow.version``; cheaper
    to import than ``importlib.metadata``, which a cold start would pay for)."""
    try:
        from SpiffWorkflow.version import __version__
    except ImportError:
        raise ImportError("SpiffWorkflow is not installed; pip install 'knhk-memory[spiff]'") from None
    return str(__version__)


def _spec_reducer() -> Any:
    """A ``reducer_override`` for spec pickles: an ``Event`` (six on every task
    spec) with no subscribers pickles as the call ``Event()``, which makes the
    same object. Measured on the generated models: pickles 25% smaller and
    1.7x faster to load than pickle's default form of the same specs."""
    from SpiffWorkflow.util.event import Event

    def reduce(obj: Any) -> Any:
        if type(obj) is Event and obj.lock is None and obj.weak_subscribers is None \
                and obj.hard_subscribers is None:
            return (Event, ())
        return NotImplemented

    return reduce


def _parser() -> Any:
    from SpiffWorkflow.spiff.parser.process import SpiffBpmnParser

    return SpiffBpmnParser()


def _serializer() -> Any:
    from SpiffWorkflow.bpmn.serializer import BpmnWorkflowSerializer
    from SpiffWorkflow.spiff.serializer.config import SPIFF_CONFIG

    return BpmnWorkflowSerializer(BpmnWorkflowSerializer.configure(SPIFF_CONFIG))


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


# ---------------------------------------------------------------- build


def build_spiff_store(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
                      key_template: str = DEFAULT_KEY, skip_invalid: bool = False,
                      codec: str = "pickle5", allow_empty: bool = False) -> dict[str, Any]:
    """Parse every ``.bpmn`` and ``.dmn`` file under ``source`` (hidden entries
    skipped) with SpiffWorkflow's ``SpiffBpmnParser`` and write ``output``.

    :param key_template: the record key of a spec; fields as in
        :func:`knhk_memory.records.template_fields`, ``{id}`` being the process
        id (default ``{relpath}#{id}``, e.g. ``orders/a.bpmn#order_1``). The
        bare process id is always an alias.
    :param skip_invalid: build from what parses; the summary's ``skipped``
        lists ``(input, error)``. Without it, any problem builds nothing.
    :param allow_empty: write a store with no process when everything was
        skipped; without it that is an :class:`AdapterBuildError` and ``output``
        is left as it was.
    :param codec: ``"pickle5"`` (fastest to restore; the store is code) or
        ``"json"`` (SpiffWorkflow's ``BpmnWorkflowSerializer`` dict).
    :returns: ``{"processes", "specs", "files", "skipped", "output", "file_size",
        "spiff_version", "codec"}``.
    :raises AdapterBuildError: a file SpiffWorkflow cannot parse, a process it
        cannot build (a missing called process, say) or a spec that cannot be
        serialized, each named with SpiffWorkflow's error (all listed in the
        message and in ``.problems``), unless ``skip_invalid``.
    """
    from pathlib import Path  # not at the top: a loader's cold start does not need it

    from ..errors import StoreError, StoreNotFoundError
    from ..records import Encoded, check_template, decode, encode, template_fields
    from ..store import WorkflowStoreWriter
    from .spiff_patterns import process_patterns

    if codec not in SPEC_CONTENT_TYPE:
        raise ValueError(f"codec must be one of {', '.join(SPEC_CONTENT_TYPE)}, got {codec!r}")
    check_template(key_template, have_id=True)
    src = Path(source)
    if not src.exists():
        raise StoreNotFoundError("source directory does not exist", path=src, problem="missing")
    if not src.is_dir():
        raise StoreError("source must be a directory of .bpmn/.dmn files", path=src, problem="not-a-directory")
    version = spiff_version()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in filenames
                     if not f.startswith(".") and f.lower().endswith((".bpmn", ".dmn")))
    files.sort(key=lambda p: p.relative_to(src).as_posix())
    if not files:
        raise AdapterBuildError(f"no .bpmn or .dmn files under {src} (hidden files and directories are "
                                "skipped); nothing was written", [(str(src), "no .bpmn or .dmn files")])

    def rel(p: Any) -> str:
        try:
            return Path(p).resolve().relative_to(src.resolve()).as_posix()
        except (ValueError, TypeError):
            return str(p)

    problems: list[tuple[str, str]] = []
    parser = _parser()
    for f in files:
        before = set(parser.process_parsers)
        try:
            if f.suffix.lower() == ".dmn":
                parser.add_dmn_file(str(f))
            else:
                parser.add_bpmn_file(str(f))
        except Exception as exc:  # SpiffWorkflow raises many kinds; each is named, none is swallowed
            problems.append((rel(f), _error_text(exc)))
            for pid in set(parser.process_parsers) - before:  # a half-added file leaves nothing behind
                del parser.process_parsers[pid]

    specs: dict[str, Any] = {}        # spec name -> spec object
    needs: dict[str, list[str]] = {}  # executable process id -> every subprocess spec it needs
    bad: set[str] = set()
    for pid in sorted(parser.get_process_ids()):
        pp = parser.get_process_parser(pid)
        try:
            spec = parser.get_spec(pid)
            subs = parser.get_subprocess_specs(pid)
        except Exception as exc:
            problems.append((f"{rel(pp.filename)}#{pid}", _error_text(exc)))
            bad.add(pid)
            continue
        specs[pid] = spec
        specs.update(subs)
        needs[pid] = sorted(subs)

    encoded: dict[str, Any] = {}
    serializer = _serializer() if codec == "json" else None
    reducer = _spec_reducer()
    for name, spec in specs.items():
        try:
            if serializer is not None:
                encoded[name] = serializer.to_dict(spec)
                encode(encoded[name], "json")
            else:
                data = Encoded(encode(spec, "pickle5", reducer_override=reducer, optimize=True))
                decode(data, "pickle5")  # a spec must come back from its bytes
                encoded[name] = data
        except Exception as exc:
            pp = parser.get_process_parser(name)
            where = rel(pp.filename) if pp is not None and pp.filename else "?"
            problems.append((f"{where}#{name}", f"cannot serialize the spec: {_error_text(exc)}"))
            bad.add(name)
    # A process whose own spec or any subprocess spec failed cannot run: skip it too.
    for pid, subs in list(needs.items()):
        broken = [s for s in subs if s in bad]
        if broken and pid not in bad:
            problems.append((f"{rel(parser.get_process_parser(pid).filename)}#{pid}",
                             f"needs {', '.join(map(repr, broken))}, which could not be built"))
            bad.add(pid)
    if problems and not skip_invalid:
        lines = "\n".join(f"  {where}: {err}" for where, err in problems)
        raise AdapterBuildError(f"{len(problems)} problem(s) building {output} from {src} with SpiffWorkflow "
                                f"{version}; nothing was written (--skip-invalid builds the rest):\n{lines}",
                                problems)
    keep = {n for n in specs if n not in bad}
    executable = sorted(p for p in needs if p in keep)
    if not executable and not allow_empty:
        lines = "\n".join(f"  {where}: {err}" for where, err in problems)
        raise AdapterBuildError(f"every process under {src} was skipped ({len(problems)} problem(s) with "
                                f"SpiffWorkflow {version}); nothing was written ({output} is left as it was; "
                                f"--allow-empty writes an empty store):\n{lines}", problems)
    used = set(executable)
    for p in executable:
        used.update(needs[p])
    keys: dict[str, str] = {}
    by_key: dict[str, str] = {}
    for name in sorted(used):
        pp = parser.get_process_parser(name)
        filename = Path(pp.filename) if pp is not None and pp.filename else src / "unknown"
        key = key_template.format_map(template_fields(filename.resolve(), src.resolve(), name))
        if key in by_key or key in (INDEX_KEY, BUNDLE_KEY):
            other = by_key.get(key, "the adapter's index")
            raise AdapterBuildError(f"--key {key_template!r} gives the key {key!r} to both {other!r} and "
                                    f"{name!r}; add {{id}} or {{relpath}} to the template",
                                    [(key, f"{other} and {name}")])
        keys[name] = key
        by_key[key] = name
    producer = f"SpiffWorkflow {version}"
    task_types: set[str] = set()
    with WorkflowStoreWriter(output) as w:
        for name in sorted(used):
            spec = specs[name]
            types = sorted({ts.__class__.__name__ for ts in spec.task_specs.values()})
            task_types.update(types)
            pp = parser.get_process_parser(name)
            meta = {"engine": "SpiffWorkflow", "parser": "spiff", "process_id": name,
                    "executable": name in needs, "subprocesses": needs.get(name, []),
                    "file": rel(pp.filename) if pp is not None and pp.filename else None,
                    "task_types": types,
                    # WCP ids of the task specs that are more than a step in sequence (WCP-1)
                    "patterns": {n: list(ids) for n, ids in sorted(process_patterns(spec).items()) if ids != (1,)}}
            value = encoded[name]
            w.add(keys[name], value, codec=codec, content_type=SPEC_CONTENT_TYPE[codec], meta=meta,
                  aliases=[name], producer=producer)
        index = {"layout": ADAPTER_LAYOUT, "engine": "SpiffWorkflow", "spiff_version": version,
                 "parser": "spiff", "codec": codec, "processes": {p: keys[p] for p in executable},
                 "specs": keys, "task_types": sorted(task_types)}
        if codec == "pickle5":
            # Every spec again, in one pickle: what SpiffLoader.load_all restores from (one memo,
            # each class looked up once: 16% faster than a pickle a spec, measured; see docs).
            bundle = encode({name: specs[name] for name in sorted(used)}, "pickle5", reducer_override=reducer,
                            optimize=True)
            w.add(BUNDLE_KEY, Encoded(bundle), codec="pickle5", content_type="application/vnd.spiffworkflow.specs"
                  "+pickle", meta={"specs": len(used)}, producer=producer)
            index["bundle"] = BUNDLE_KEY
        w.add(INDEX_KEY, index, codec="json", content_type="application/vnd.knhk.spiff-index+json",
              producer=producer)
    return {"processes": len(executable), "specs": len(used), "files": len(files),
            "skipped": problems, "output": str(output), "file_size": Path(output).stat().st_size,
            "spiff_version": version, "codec": codec}


# ---------------------------------------------------------------- load


class SpiffLoader:
    """Process specs from a store built by :func:`build_spiff_store`, ready to run.

    :param store: a store path, or an open :class:`~knhk_memory.store.WorkflowStore`.
    :param trust_pickle: allow pickled specs (the default build). A pickle runs
        code when loaded: pass True only for stores your own build made.
    :param cache_size: restored specs kept (LRU); specs are shared by the
        workflows made from them, as SpiffWorkflow shares a parsed spec.
    :param script_engine: handed to every ``BpmnWorkflow`` (None: SpiffWorkflow's default).

    :raises EngineVersionError: the store was built by another SpiffWorkflow
        version than the one installed (both named); nothing is restored.
    :raises StoreCorruptError: the store has no SpiffWorkflow index (not built
        by ``--spiff``) or an index this adapter does not know.
    """

    def __init__(self, store: Any, *, trust_pickle: bool = False, cache_size: int = 4096,
                 script_engine: Any = None) -> None:
        from ..records import check_trust_pickle, decode, get_object
        from ..store import WorkflowStore

        trust_pickle = check_trust_pickle(trust_pickle, "SpiffLoader")
        self._owns = not isinstance(store, WorkflowStore)
        self.store = WorkflowStore(store) if self._owns else store
        self.trust_pickle = trust_pickle
        self.cache_size = cache_size
        self.script_engine = script_engine
        self._decode = decode
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        raw = self.store.get(INDEX_KEY)
        if raw is None:
            raise StoreCorruptError(f"no {INDEX_KEY!r} record: not a store built by "
                                    "`knhk-memory store build --spiff`", path=self.store.path, problem="not-spiff")
        index = get_object(self.store, INDEX_KEY, trust_pickle=False)
        if not isinstance(index, dict) or index.get("layout") != ADAPTER_LAYOUT:
            got = index.get("layout") if isinstance(index, dict) else index
            raise StoreCorruptError(f"the SpiffWorkflow index has layout {got!r}; "
                                    f"this adapter reads layout {ADAPTER_LAYOUT}", path=self.store.path,
                                    problem="bad-index")
        mine = spiff_version()
        if index.get("spiff_version") != mine:
            raise EngineVersionError(
                f"built by SpiffWorkflow {index.get('spiff_version')}, but this process has SpiffWorkflow {mine}; "
                "specs restored across versions may behave differently. Rebuild it: "
                "knhk-memory store build --spiff SOURCE -o STORE", path=self.store.path, problem="engine-version")
        self.index = index
        self.codec = index.get("codec")
        if self.codec not in SPEC_CONTENT_TYPE:
            raise StoreCorruptError(f"the SpiffWorkflow index names codec {self.codec!r}; this adapter reads "
                                    f"{', '.join(SPEC_CONTENT_TYPE)}", path=self.store.path, problem="bad-index")
        if self.codec == "pickle5" and not trust_pickle:
            from ..errors import UntrustedPickleError

            raise UntrustedPickleError(
                f"the specs are pickles (built by SpiffWorkflow {index.get('spiff_version')}); "
                "loading them runs code from the file. Pass trust_pickle=True only if your own build made it, or "
                "build it with --codec json", path=self.store.path, problem="untrusted-pickle")
        self._processes: dict[str, str] = dict(index["processes"])
        self._specs: dict[str, str] = dict(index["specs"])
        self._needs: dict[str, list[str]] = {}
        from SpiffWorkflow.bpmn.workflow import BpmnWorkflow

        self._workflow_class = BpmnWorkflow
        self._serializer: Any = None

    # -- what is in the store

    def process_ids(self) -> list[str]:
        """Every executable process id, sorted."""
        return sorted(self._processes)

    def task_types(self) -> list[str]:
        """Every task-spec class name used by the stored specs (for :class:`TaskMetrics`)."""
        return list(self.index["task_types"])

    def key(self, process_id: str) -> str:
        """The store key of a process (``{relpath}#{id}`` by default)."""
        return self._key(process_id, self._processes)

    @staticmethod
    def _check_id(name: Any, table: dict[str, str]) -> None:
        if not isinstance(name, str):
            raise TypeError(f"a process id is a str (e.g. {min(table) if table else 'order_1'!r}), got "
                            f"{type(name).__name__} {name!r}")

    def _key(self, name: str, table: dict[str, str]) -> str:
        self._check_id(name, table)
        try:
            return table[name]
        except KeyError:
            hint = did_you_mean(str(name), table, cutoff=0.5, template="; nearest: {}", sep=", ")
            raise UnknownProcessError(f"no process {name!r} in the store ({len(table)} processes){hint}",
                                      path=self.store.path, problem="unknown-process") from None

    # -- specs and workflows

    def spec(self, name: str) -> Any:
        """The ``BpmnProcessSpec`` of a process or subprocess id (restored once, then cached).

        :raises TypeError: ``name`` is not a str.
        :raises UnknownProcessError: no such id (the nearest ids named)."""
        self._check_id(name, self._specs)
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None:
                self._cache.move_to_end(name)
                return hit
        key = self._key(name, self._specs)
        value = self.store.get(key)
        if value is None:
            raise StoreCorruptError(f"the SpiffWorkflow index names {key!r} for {name!r}, but the store has no "
                                    "such record", path=self.store.path, problem="corrupt")
        try:
            obj = self._decode(value, str(self.codec), what=f"record {key!r}")
        except StoreCorruptError as exc:
            raise StoreCorruptError(str(exc), path=self.store.path, problem=exc.problem) from None
        except Exception as exc:  # a pickle that will not load: a class gone from this SpiffWorkflow, bad bytes
            raise StoreCorruptError(f"spec {name!r} ({key!r}) does not restore: {type(exc).__name__}: {exc}",
                                    path=self.store.path, problem="corrupt") from None
        if self.codec == "json":  # SpiffWorkflow's serializer dict
            if self._serializer is None:
                self._serializer = _serializer()
            obj = self._serializer.from_dict(obj)
        with self._lock:
            self._cache[name] = obj
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return obj

    def subprocess_specs(self, process_id: str) -> dict[str, Any]:
        """``{id: spec}`` of every call activity and subprocess ``process_id`` needs (transitively).

        :raises TypeError: ``process_id`` is not a str.
        :raises UnknownProcessError: no such process (the nearest ids named)."""
        self._check_id(process_id, self._processes)
        needs = self._needs.get(process_id)
        if needs is None:
            meta = self.store.meta(self.key(process_id)).meta
            needs = self._needs[process_id] = list(meta.get("subprocesses", []))
        return {n: self.spec(n) for n in needs}

    def workflow(self, process_id: str, **kwargs: Any) -> Any:
        """A new ``BpmnWorkflow`` of ``process_id``, ready to run.

        :raises TypeError: ``process_id`` is not a str.
        :raises UnknownProcessError: (a KeyError) no such process; the message
            names the nearest ids.
        """
        try:
            known = process_id in self._processes
        except TypeError:
            known = False
        if not known:
            self._key(process_id, self._processes)  # raises UnknownProcessError
        spec = self.spec(process_id)
        if self.script_engine is not None:
            kwargs.setdefault("script_engine", self.script_engine)
        return self._workflow_class(spec, self.subprocess_specs(process_id), **kwargs)

    def load_all(self) -> int:
        """Restore every spec now (a host that wants no first-call latency); returns how many.

        A pickle5 store also holds every spec in one pickle (``spiff/all-specs``),
        restored in one go when the cache can hold them all; otherwise, and for
        JSON stores, spec by spec.

        :raises StoreCorruptError: the all-specs record does not restore to the
            specs the index names.
        """
        bundle = self.index.get("bundle")
        if bundle is not None and self.codec == "pickle5" and self.cache_size >= len(self._specs):
            value = self.store.get(bundle)
            if value is None:
                raise StoreCorruptError(f"the SpiffWorkflow index names {bundle!r}, but the store has no such record",
                                        path=self.store.path, problem="corrupt")
            try:
                specs = self._decode(value, "pickle5", what=f"record {bundle!r}")
            except StoreCorruptError as exc:
                raise StoreCorruptError(str(exc), path=self.store.path, problem=exc.problem) from None
            except Exception as exc:
                raise StoreCorruptError(f"{bundle!r} does not restore: {type(exc).__name__}: {exc}",
                                        path=self.store.path, problem="corrupt") from None
            if not isinstance(specs, dict) or set(specs) != set(self._specs):
                got = sorted(specs)[:5] if isinstance(specs, dict) else type(specs).__name__
                raise StoreCorruptError(f"{bundle!r} does not hold the {len(self._specs)} specs the index names "
                                        f"(got {got!r})", path=self.store.path, problem="corrupt")
            with self._lock:
                for name in self._specs:
                    if name not in self._cache:
                        self._cache[name] = specs[name]
            return len(self._specs)
        paused = gc.isenabled()  # see knhk_memory.records.decode: many objects, no garbage
        if paused:
            gc.disable()
        try:
            for name in self._specs:
                self.spec(name)
        finally:
            if paused:
                gc.enable()
        return len(self._specs)

    def close(self) -> None:
        """Close the store if this loader opened it."""
        if self._owns:
            self.store.close()

    def __enter__(self) -> SpiffLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- metrics

#: Latency bucket upper bounds of ``spiff_task_duration_seconds``, in seconds:
#: 1 us x 4^k up to ~1.05 s (then +Inf). A script task takes tens of
#: microseconds, a business rule or a subprocess start milliseconds.
BOUNDS_S = tuple(1e-6 * 4 ** k for k in range(11))
#: Families :class:`TaskMetrics` declares (``prefix`` + these).
FAMILIES = ("tasks_completed", "task_duration_seconds", "task_patterns")
_BIND_LIMIT = 65536  # task specs whose bound children are kept (a host that parses anew keeps making new ones)


class TaskMetrics:
    """Task counts, latency histograms and workflow-pattern counts per task-spec
    type, in a :class:`knhk_memory.metrics.Metrics` block (exact across threads
    and processes; exported in the Prometheus / OpenMetrics text format).

    Families (``prefix`` default ``spiff_``), label ``task_type`` the task
    spec's class name (``ScriptTask``, ``ExclusiveGateway``, ``UserTask``...):

    - ``spiff_tasks_completed_total{task_type}``: tasks completed (counter);
    - ``spiff_task_duration_seconds{task_type}``: the wall time of
      ``task.run()`` (histogram, buckets :data:`BOUNDS_S`, sum kept to the ns);
    - ``spiff_task_patterns_total{task_type,pattern,name}``: the workflow
      control-flow patterns (WCP id and name) those tasks carried out, as
      :func:`knhk_memory.adapters.spiff_patterns.task_spec_patterns` maps each
      task spec (a parallel gateway that splits counts under 2 Parallel Split,
      one that joins under 3 Synchronization).

    With ``pattern_stats`` (a :class:`knhk_memory.counters.PatternStats`) every
    task is also recorded there under each of its patterns, with its latency
    in ticks, so the engine-wide pattern statistics see BPMN gateways, loops
    and events as the patterns they are rather than all as WCP-1.

    Fed by SpiffWorkflow's own ``do_engine_steps(will_complete_task,
    did_complete_task)`` callbacks (nothing is patched) and :meth:`run_task`
    for the manual tasks the host completes.

    :param metrics: the block to count in; None makes one (``shared=True``: in
        POSIX shared memory, so worker processes can attach).
    :param shared: passed to :class:`~knhk_memory.metrics.Metrics` when this
        object makes the block.
    :param pattern_stats: a ``PatternStats`` to record into as well, or None.
    :param prefix: the family name prefix.
    :raises MetricDefinitionError: the block already has one of these families
        with another definition.
    :raises LabelSetLimitError: (when a task completes) a new task type or
        (type, pattern) pair past the block's ``max_label_sets``.

    Send it to a worker process as an argument (a shared one pickles as the
    block's name) or attach there with :meth:`attach`.
    """

    def __init__(self, metrics: Any = None, *, shared: bool | str = False, pattern_stats: Any = None,
                 prefix: str = "spiff_") -> None:
        from ..counters import PATTERNS
        from ..metrics import Metrics, generate
        from . import spiff_patterns

        self._generate = generate

        self._pnames = PATTERNS  # imported here, not in the callbacks: threads run those (fork hazard)
        self._sp = spiff_patterns
        self._owns = metrics is None
        self.metrics = Metrics(shared=shared) if metrics is None else metrics
        self.prefix = prefix
        self.pattern_stats = pattern_stats
        self.completed = self.metrics.counter(prefix + "tasks_completed",
                                              "Tasks SpiffWorkflow completed, by task-spec type.",
                                              labels=("task_type",))
        self.duration = self.metrics.histogram(prefix + "task_duration_seconds",
                                               "Wall time of task.run(), by task-spec type.",
                                               labels=("task_type",), buckets=BOUNDS_S)
        self.patterns = self.metrics.counter(prefix + "task_patterns",
                                             "Workflow control-flow patterns carried out by completed tasks "
                                             "(WCP id and name, Russell et al. 2006), by task-spec type.",
                                             labels=("task_type", "pattern", "name"))
        self._bound: dict[Any, tuple[Any, ...]] = {}
        self._spec_patterns: dict[int, tuple[Any, dict[str, tuple[int, ...]]]] = {}
        self._started: dict[int, int] = {}
        self._clock = time.perf_counter_ns
        self._ticks_per_ns = 0.0
        if pattern_stats is not None:
            self._ticks_per_ns = pattern_stats.ticks_per_second() / 1e9
        self._lock = threading.Lock()

    @classmethod
    def for_loader(cls, loader: SpiffLoader, *, shared: bool | str = False, pattern_stats: Any = None) -> TaskMetrics:
        """A new block with a (zero) series for every task-spec type in the
        loader's store, so a scrape shows them before their first task."""
        tm = cls(shared=shared, pattern_stats=pattern_stats)
        for t in loader.task_types():
            tm.completed.labels(t)
            tm.duration.labels(t)
        return tm

    @classmethod
    def attach(cls, name: str, *, pattern_stats: Any = None, prefix: str = "spiff_") -> TaskMetrics:
        """Count into the shared block another process made (its ``metrics.name``)."""
        from ..metrics import Metrics

        return cls(Metrics.attach(name), pattern_stats=pattern_stats, prefix=prefix)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if not self.metrics.shared:
            raise TypeError("a TaskMetrics over a private block cannot go to another process; make it with "
                            "shared=True")
        return (_attach_task_metrics, (self.metrics.name, self.pattern_stats, self.prefix))

    def close(self) -> None:
        """Close the block if this object made it (its creator also removes a shared block's name)."""
        if self._owns:
            self.metrics.close()

    def __enter__(self) -> TaskMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- binding a task spec to its series

    def _spec_table(self, wf_spec: Any) -> dict[str, tuple[int, ...]]:
        got = self._spec_patterns.get(id(wf_spec))
        if got is None or got[0] is not wf_spec:
            got = self._spec_patterns[id(wf_spec)] = (wf_spec, self._sp.process_patterns(wf_spec))
        return got[1]

    def _bind(self, ts: Any) -> tuple[Any, ...]:
        """(completed.add, duration.observe, pattern adds, pattern ids) of one task spec."""
        names = self._pnames
        with self._lock:
            wf_spec: Any = getattr(ts, "_wf_spec", None)
            spec_name: Any = getattr(ts, "name", None)
            pats: tuple[int, ...] | None = None
            if wf_spec is not None and getattr(wf_spec, "task_specs", {}).get(spec_name) is ts:
                pats = self._spec_table(wf_spec).get(spec_name)
            if pats is None:
                pats = self._sp.task_spec_patterns(ts) if hasattr(ts, "_inputs") else self._sp.SEQUENCE
            t = ts.__class__.__name__
            b = (self.completed.labels(t).add, self.duration.labels(t).observe,
                 tuple(self.patterns.labels(t, str(p), names[p]).add for p in pats), pats)
            if len(self._bound) >= _BIND_LIMIT:
                self._bound.clear()
                self._spec_patterns.clear()
            self._bound[ts] = b
            return b

    # -- the callbacks

    def will_complete_task(self, task: Any) -> None:
        """``will_complete_task`` callback of ``BpmnWorkflow.do_engine_steps``."""
        self._started[id(task)] = self._clock()

    def did_complete_task(self, task: Any) -> None:
        """``did_complete_task`` callback: counts the task, its latency and its patterns."""
        t0 = self._started.pop(id(task), None)
        if t0 is None:
            return
        self._record(task.task_spec, self._clock() - t0)

    def _record(self, ts: Any, ns: int) -> None:
        b = self._bound.get(ts)
        if b is None:
            b = self._bind(ts)
        b[0]()
        b[1](ns * 1e-9)
        for add in b[2]:
            add()
        ps = self.pattern_stats
        if ps is not None:
            ticks = int(ns * self._ticks_per_ns)
            for p in b[3]:
                ps.record(p, ticks)

    def record(self, task_type: str, ns: int, patterns: Iterable[int] = (1,)) -> None:
        """Count one task of ``task_type`` that took ``ns`` nanoseconds and carried
        out ``patterns`` (WCP ids; a host's own tasks, or tests)."""
        names = self._pnames
        pats = tuple(patterns)
        for p in pats:
            if isinstance(p, bool) or p not in names:
                raise ValueError(f"pattern ids are 1..43 (knhk_memory.counters.PATTERNS), got {p!r}")
        self.completed.labels(task_type).add()
        self.duration.labels(task_type).observe(ns * 1e-9)
        for p in pats:
            self.patterns.labels(task_type, str(p), names[p]).add()
            if self.pattern_stats is not None:
                self.pattern_stats.record(p, int(ns * self._ticks_per_ns))

    def run_task(self, task: Any) -> Any:
        """``task.run()`` (a READY manual task the host completes), counted and timed."""
        t0 = self._clock()
        out = task.run()
        self._record(task.task_spec, self._clock() - t0)
        return out

    def do_engine_steps(self, workflow: Any) -> None:
        """``workflow.do_engine_steps(...)`` with this object's callbacks."""
        workflow.do_engine_steps(self.will_complete_task, self.did_complete_task)

    # -- reading

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """What every process has counted so far, by task type: ``{type: {"count":
        tasks, "seconds": total latency, "buckets": {upper bound (s) or inf:
        cumulative count}, "patterns": {WCP id: tasks}}}`` for every type with a
        task."""
        fams, _ = self.metrics.snapshot()
        rows = {d["name"]: r for d, r in fams}
        out: dict[str, dict[str, Any]] = {}
        for (t,), cells in rows.get(self.prefix + "task_duration_seconds", []):
            n = sum(cells[:-1])
            if not n:
                continue
            running, buckets = 0, {}
            for b, c in zip((*BOUNDS_S, float("inf")), cells[:-1]):
                running += c
                buckets[b] = running
            out[t] = {"count": n, "seconds": cells[-1] / 1e9, "buckets": buckets, "patterns": {}}
        for (t, p, _name), cells in rows.get(self.prefix + "task_patterns", []):
            if t in out and cells[0]:
                out[t]["patterns"][int(p)] = cells[0]
        return out

    def exposition(self, *, openmetrics: bool = False) -> str:
        """The block in the Prometheus text format 0.0.4 (or OpenMetrics 1.0)."""
        return str(self._generate(self.metrics, openmetrics=openmetrics))


def _attach_task_metrics(name: str, pattern_stats: Any, prefix: str) -> TaskMetrics:
    return TaskMetrics.attach(name, pattern_stats=pattern_stats, prefix=prefix)


# ---------------------------------------------------------------- CLI


def build_spiff_main(args: Any) -> int:
    """``knhk-memory store build --spiff``: the command over :func:`build_spiff_store`."""
    import sys

    keys = f"keys come from --key, default {DEFAULT_KEY!r}"
    why = {"--key-regex": keys, "--key-field": keys,
           "--zstd": "specs are stored uncompressed: restoring them is the cold start the adapter is for, and "
                     "decompressing would add to it",
           "--last-wins": "a process id defined twice is an error in SpiffWorkflow itself"}
    for flag, value in (("--key-regex", args.key_regex), ("--key-field", args.key_field),
                        ("--zstd", args.zstd), ("--last-wins", args.last_wins or None)):
        if value is not None:
            print(f"knhk-memory store build: error: {flag} does not apply to --spiff ({why[flag]})", file=sys.stderr)
            return 2
    try:
        summary = build_spiff_store(args.source, args.output, key_template=args.key or DEFAULT_KEY,
                                    skip_invalid=args.skip_invalid, codec=args.codec,
                                    allow_empty=bool(getattr(args, "allow_empty", False)))
    except AdapterBuildError as exc:
        print(f"knhk-memory: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"knhk-memory: {exc}", file=sys.stderr)
        return 2
    for where, err in summary["skipped"]:
        print(f"knhk-memory: skipped {where}: {err}", file=sys.stderr)
    print(f"wrote {summary['output']}: {summary['processes']} processes ({summary['specs']} specs with "
          f"subprocesses) from {summary['files']} files, SpiffWorkflow {summary['spiff_version']}, "
          f"codec {summary['codec']}, {summary['file_size']} bytes"
          + (f", {len(summary['skipped'])} skipped" if summary["skipped"] else ""))
    return 0
