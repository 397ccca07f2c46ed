"""Typed records in a workflow store: codecs, per-record metadata and aliases.

A store file holds flat ``key -> bytes`` records (docs/store.md). Real
engines need more per record: how the value is encoded (its *codec*), what it
is (a content type), who wrote it (the producer and its version), and the
other names it goes by (a BPMN process is found as ``file.bpmn#order`` and as
``order``). This module keeps all of that in ordinary records under a
reserved key prefix, so the file format and its index stay as they are and a
store without these records reads exactly as before:

=================================  ===================================================
key                                value (UTF-8 JSON)
=================================  ===================================================
``\\0knhk/manifest``                ``{"layer": 1, "producer": ..., "records": n, "aliases": n}``
``\\0knhk/m/<key>``                 ``{"codec": ..., "content_type": ..., "producer": ..., "meta": {...}}``
``\\0knhk/a/<alias>``               ``["<key>", ...]``: every record the alias names, sorted
=================================  ===================================================

Codecs (:data:`CODECS`): ``raw`` (bytes as given), ``json`` (UTF-8 JSON) and
``pickle5`` (pickle protocol 5; out-of-band buffers, e.g. numpy arrays, are
stored after the pickle and handed back as zero-copy read-only views of the
store). **A store holding pickles is code**: unpickling runs whatever the
writer put there. :meth:`~knhk_memory.store.WorkflowStore.get_object` refuses
a pickled record unless the store was opened with ``trust_pickle=True``; pass
it only for a store your own engine built.

Alias rule: a name is looked up as a key first; failing that as an alias. An
alias naming exactly one record resolves to it; an alias naming several
raises :class:`~knhk_memory.errors.AmbiguousKeyError` listing every one. An
alias equal to another record's key is refused when the store is built (the
key would always win, so the alias could never be used).

This module is imported lazily by knhk_memory.store: a plain ``get`` never
loads it.
"""

from __future__ import annotations

import gc
import json

try:  # the C module pickle.py wraps: the same dumps/loads/Pickler, without importing pickle.py,
    import _pickle as pickle  # which a reader's cold start would pay for (about 1 ms)
except ImportError:  # pragma: no cover - an interpreter without the C accelerator
    import pickle  # type: ignore[no-redef]
import struct
from collections.abc import Iterable, Mapping

from .errors import (
    AmbiguousKeyError,
    DuplicateKeyError,
    KeyTemplateError,
    StoreCorruptError,
    StoreError,
    StoreKeyError,
    StoreVersionError,
    UntrustedPickleError,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms of a reader's start)
if TYPE_CHECKING:
    from typing import Any

    from .store import WorkflowStore, WorkflowStoreWriter

__all__ = ["CODECS", "RESERVED_PREFIX", "LAYER_VERSION", "RecordMeta", "Encoded", "encode", "decode"]

RESERVED_PREFIX = b"\0knhk/"
MANIFEST_KEY = RESERVED_PREFIX + b"manifest"
META_PREFIX = RESERVED_PREFIX + b"m/"
ALIAS_PREFIX = RESERVED_PREFIX + b"a/"
LAYER_VERSION = 1
CODECS = ("raw", "json", "pickle5")
_DEFAULT_TYPES = {"raw": "application/octet-stream", "json": "application/json",
                  "pickle5": "application/x-python-pickle"}
# pickle5 value: u32 buffer count n, u64 pickle length, n x u64 buffer lengths, pickle, buffers.
_P5_HEAD = struct.Struct("<IQ")
_U64 = struct.Struct("<Q")


def _kb(key: Any, path: Any = None) -> bytes:
    if key.__class__ is bytes:
        return key
    if key.__class__ is str:
        try:
            return key.encode("utf-8")
        except UnicodeEncodeError:
            pass  # the store's rule below says what is wrong
    from .store import _key_bytes  # not at import: store imports this module

    return _key_bytes(key, path)  # the one rule for keys, and its messages


class RecordMeta(dict[str, object]):
    """A record's metadata: ``codec``, ``content_type``, ``producer`` and the
    free-form ``meta`` mapping given when it was written (a dict; ``meta`` is
    ``{}`` when none was given)."""

    @property
    def codec(self) -> str:
        return str(self.get("codec", "raw"))

    @property
    def content_type(self) -> str:
        return str(self.get("content_type", _DEFAULT_TYPES.get(self.codec, "application/octet-stream")))

    @property
    def producer(self) -> str | None:
        producer = self.get("producer")
        return None if producer is None else str(producer)

    @property
    def meta(self) -> dict[str, Any]:
        meta = self.get("meta")
        return dict(meta) if isinstance(meta, dict) else {}


# ---------------------------------------------------------------- codecs


class Encoded(bytes):
    """Bytes already encoded with the record's codec (by :func:`encode`, say with
    a ``reducer_override``): ``WorkflowStoreWriter.add(key, Encoded(data),
    codec=...)`` stores them as they are."""

    __slots__ = ()


def encode(obj: Any, codec: str, *, reducer_override: Any = None, optimize: bool = False) -> bytes:
    """``obj`` as the bytes ``codec`` stores.

    :param reducer_override: ``pickle5`` only: a ``Pickler.reducer_override``
        (return ``NotImplemented`` for objects it leaves to pickle), for a
        smaller, faster-loading form of an engine's objects.
    :param optimize: ``pickle5`` only: pass the pickle through
        ``pickletools.optimize``, which drops the memo stores no later opcode
        reads (pickle memoizes every container in case it is shared). Costs
        time once, when encoding; measured on SpiffWorkflow specs: 11% smaller,
        7% faster to load one spec a pickle, 16% for one pickle of 165 specs.
    :raises ValueError: an unknown codec.
    :raises TypeError: ``raw`` given something not bytes-like.
    Errors from ``json.dumps`` or ``pickle.dumps`` (an object they cannot
    encode) propagate as they are.
    """
    if codec == "raw":
        if not isinstance(obj, (bytes, bytearray, memoryview)):
            raise TypeError(f"codec 'raw' stores bytes-like values, got {type(obj).__name__}")
        return bytes(obj)
    if codec == "json":
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if codec == "pickle5":
        buffers: list[pickle.PickleBuffer] = []
        if reducer_override is None:
            body = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        else:
            import io

            class _Pickler(pickle.Pickler):  # the C Pickler takes the override only as a method
                def reducer_override(self, o: Any) -> Any:
                    return reducer_override(o)

            out = io.BytesIO()
            _Pickler(out, protocol=5, buffer_callback=buffers.append).dump(obj)
            body = out.getvalue()
        if optimize:
            import pickletools

            body = pickletools.optimize(body)
        raws = [b.raw() for b in buffers]
        head = _P5_HEAD.pack(len(raws), len(body)) + b"".join(_U64.pack(r.nbytes) for r in raws)
        return head + body + b"".join(bytes(r) for r in raws)
    raise ValueError(f"unknown codec {codec!r}; accepted: {', '.join(CODECS)}")


def decode(value: memoryview | bytes, codec: str, *, what: str = "value") -> Any:
    """The object ``value`` holds under ``codec`` (the inverse of :func:`encode`).

    ``pickle5`` out-of-band buffers come back as read-only views of ``value``
    (zero-copy from a mapped store); the cyclic GC is paused while unpickling
    (and put back as it was). A malformed pickle5 frame raises
    :class:`~knhk_memory.errors.StoreCorruptError`; this function does not
    check trust (see :meth:`~knhk_memory.store.WorkflowStore.get_object`).
    """
    if codec == "raw":
        return bytes(value)
    if codec == "json":
        return json.loads(bytes(value))
    if codec == "pickle5":
        view = memoryview(value)
        if len(view) < _P5_HEAD.size:
            raise StoreCorruptError(f"{what}: pickle5 frame of {len(view)} bytes is shorter than its "
                                    f"{_P5_HEAD.size}-byte header", problem="corrupt")
        n, body_len = _P5_HEAD.unpack_from(view, 0)
        pos = _P5_HEAD.size + 8 * n
        if n > len(view) // 8 or pos > len(view):
            raise StoreCorruptError(f"{what}: pickle5 frame claims {n} buffers in {len(view)} bytes",
                                    problem="corrupt")
        lengths = [_U64.unpack_from(view, _P5_HEAD.size + 8 * i)[0] for i in range(n)]
        if pos + body_len + sum(lengths) != len(view):
            raise StoreCorruptError(f"{what}: pickle5 frame lengths ({body_len} + {sum(lengths)} bytes) do "
                                    f"not match the value's {len(view) - pos} bytes", problem="corrupt")
        body = view[pos:pos + body_len]
        pos += body_len
        bufs = []
        for length in lengths:
            bufs.append(view[pos:pos + length])
            pos += length
        # Unpickling an engine's object graph makes thousands of container
        # objects, and each allocation threshold crossed runs the cyclic GC over
        # everything alive: measured 4-8x the time of the unpickling itself for
        # SpiffWorkflow specs. Nothing made here is garbage, so collection waits.
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            return pickle.loads(body, buffers=bufs)
        finally:
            if paused:
                gc.enable()
    raise StoreCorruptError(f"{what}: unknown codec {codec!r} in its metadata; this reader knows "
                            f"{', '.join(CODECS)}", problem="bad-codec")


# ---------------------------------------------------------------- writing


class LayerWriter:
    """The metadata and aliases a :class:`~knhk_memory.store.WorkflowStoreWriter`
    collects; written as records by :meth:`write` just before the index."""

    def __init__(self) -> None:
        self.meta: dict[bytes, bytes] = {}
        self.aliases: dict[bytes, set[bytes]] = {}
        self.producer: str | None = None

    def prepare(self, writer: WorkflowStoreWriter, key: bytes, value: Any, codec: str | None,
                content_type: str | None, meta: Mapping[str, Any] | None, aliases: Iterable[Any] | None,
                producer: str | None) -> tuple[bytes, Any]:
        """Encode ``value`` and validate everything before the record is added;
        returns (bytes to store, a callable that records the metadata once the
        record is in)."""
        if key.startswith(RESERVED_PREFIX):
            raise StoreError(f"key {key!r} starts with the reserved prefix {RESERVED_PREFIX!r}",
                             path=writer.path, problem="reserved-key")
        codec = "raw" if codec is None else codec
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; accepted: {', '.join(CODECS)}")
        if content_type is not None and not isinstance(content_type, str):
            raise TypeError(f"content_type must be a str, got {type(content_type).__name__}")
        if meta is not None and not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a mapping (a JSON object), got {type(meta).__name__}")
        record: dict[str, Any] = {"codec": codec}
        if content_type is not None:
            record["content_type"] = content_type
        if producer is not None:
            record["producer"] = str(producer)
        if meta:
            record["meta"] = dict(meta)
        try:
            meta_bytes = json.dumps(record, separators=(",", ":"), sort_keys=True).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise TypeError(f"meta of key {key!r} must be JSON-serialisable: {exc}") from None
        names = [_kb(a) for a in (aliases or ())]
        for a in names:
            if a.startswith(RESERVED_PREFIX) or not a:
                raise ValueError(f"alias {a!r} of key {key!r} is empty or starts with the reserved prefix")
        data = bytes(value) if isinstance(value, Encoded) else encode(value, codec)

        def note() -> None:
            self.meta[key] = meta_bytes
            for a in names:
                if a != key:
                    self.aliases.setdefault(a, set()).add(key)

        return data, note

    def write(self, writer: WorkflowStoreWriter) -> None:
        """Add the layer's records (called by ``commit`` before the index is built)."""
        keys = writer._index
        for k in keys:
            if k.startswith(RESERVED_PREFIX):
                raise StoreError(f"key {k!r} starts with the reserved prefix {RESERVED_PREFIX!r}, which "
                                 "holds the store's record metadata", path=writer.path, problem="reserved-key")
        for alias, targets in self.aliases.items():
            if alias in keys and targets != {alias}:
                raise DuplicateKeyError(
                    f"alias {alias.decode('utf-8', 'backslashreplace')!r} of "
                    f"{', '.join(repr(t.decode('utf-8', 'backslashreplace')) for t in sorted(targets))} is "
                    "also the key of another record; a key always wins, so the alias could never be used",
                    path=writer.path, problem="alias-collision")
        from ._version import __version__

        add = writer._add_plain
        for k, m in self.meta.items():
            add(META_PREFIX + k, m)
        for alias, targets in sorted(self.aliases.items()):
            add(ALIAS_PREFIX + alias, json.dumps(sorted(t.decode("utf-8", "surrogateescape")
                                                        for t in targets)).encode("utf-8"))
        add(MANIFEST_KEY, json.dumps({"layer": LAYER_VERSION, "producer": f"knhk-memory {__version__}",
                                      "records": len(self.meta), "aliases": len(self.aliases)},
                                     sort_keys=True).encode("utf-8"))


# ---------------------------------------------------------------- reading


def manifest(store: WorkflowStore) -> dict[str, Any] | None:
    """The layer manifest, or None for a store without one (built before this
    layer, or without metadata). A manifest of a newer layer raises
    :class:`~knhk_memory.errors.StoreVersionError`."""
    raw = store.get_raw(MANIFEST_KEY)
    if raw is None:
        return None
    got = _json(store, MANIFEST_KEY, raw)
    if not isinstance(got, dict) or not isinstance(got.get("layer"), int):
        raise StoreCorruptError(f"the record manifest is not a JSON object with a 'layer': {got!r}",
                                path=store.path, problem="corrupt")
    if got["layer"] > LAYER_VERSION:
        raise StoreVersionError(f"record layer {got['layer']} (written by {got.get('producer')}) is newer than "
                                f"this reader's layer {LAYER_VERSION}", path=store.path, problem="newer-version")
    return got


def _json(store: WorkflowStore, key: bytes, raw: Any) -> Any:
    if store._compressed:
        raw = store.get(key)
    try:
        return json.loads(bytes(raw))
    except ValueError as exc:
        raise StoreCorruptError(f"record {key!r} is not valid JSON: {exc}", path=store.path,
                                problem="corrupt") from None


def resolve(store: WorkflowStore, name: Any) -> bytes:
    """The key of the record ``name`` names: itself if it is a key, else the one
    record the alias ``name`` names.

    :raises StoreKeyError: neither a key nor an alias (the message names up to
        three close keys or aliases).
    :raises AmbiguousKeyError: an alias naming several records (all listed).
    """
    if store.__dict__.get("_layer_checked") is not store._view:  # once per opened file (reopen maps a new one)
        manifest(store)
        store.__dict__["_layer_checked"] = store._view
    kb = _kb(name, store.path)
    if not kb.startswith(RESERVED_PREFIX) and store.get_raw(kb) is not None:
        return kb
    raw = store.get_raw(ALIAS_PREFIX + kb)
    if raw is not None and not kb.startswith(RESERVED_PREFIX):
        targets = _json(store, ALIAS_PREFIX + kb, raw)
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise StoreCorruptError(f"alias record of {kb!r} is not a list of keys: {targets!r}",
                                    path=store.path, problem="corrupt")
        if len(targets) > 1:
            raise AmbiguousKeyError(
                f"{kb.decode('utf-8', 'backslashreplace')!r} is an alias of {len(targets)} records: "
                f"{', '.join(map(repr, targets))}; ask for one of them by its key",
                path=store.path, problem="ambiguous-alias")
        return targets[0].encode("utf-8", "surrogateescape")
    from .store import _shown_key

    raise StoreKeyError(f"key {_shown_key(name)} is not in the store (neither a key nor an alias){_nearest(store, kb)}",
                        path=store.path, problem="missing-key")


def _nearest(store: WorkflowStore, kb: bytes) -> str:
    from .errors import did_you_mean

    names = []
    for k in store:
        if k.startswith(ALIAS_PREFIX):
            names.append(k[len(ALIAS_PREFIX):].decode("utf-8", "backslashreplace"))
        elif not k.startswith(RESERVED_PREFIX):
            names.append(k.decode("utf-8", "backslashreplace"))
    return did_you_mean(kb.decode("utf-8", "backslashreplace"), names, cutoff=0.5, template="; nearest: {}",
                        sep=", ")


def meta_of(store: WorkflowStore, key: bytes) -> RecordMeta:
    """The metadata of the record at ``key`` (a resolved key); a record without
    metadata is ``raw``."""
    raw = store.get_raw(META_PREFIX + key)
    if raw is None:
        return RecordMeta(codec="raw")
    got = _json(store, META_PREFIX + key, raw)
    if not isinstance(got, dict) or not isinstance(got.get("codec"), str):
        raise StoreCorruptError(f"metadata of {key!r} is not a JSON object with a 'codec': {got!r}",
                                path=store.path, problem="corrupt")
    return RecordMeta(got)


def aliases_of(store: WorkflowStore) -> dict[str, list[str]]:
    """``{alias: [key, ...]}`` for every alias in the store."""
    out = {}
    for k, v in store.items():
        if k.startswith(ALIAS_PREFIX):
            out[k[len(ALIAS_PREFIX):].decode("utf-8", "surrogateescape")] = _json(store, k, v)
    return out


def check_trust_pickle(value: Any, owner: str) -> bool:
    """``trust_pickle`` if it is exactly True or False, else a TypeError naming ``owner``: unpickling
    runs code from the file, so a truthy stand-in (``"no"``, ``1``) must not switch the guard off."""
    if value is True or value is False:
        return value
    raise TypeError(f"{owner}: trust_pickle must be True or False (True lets pickled records be unpickled, "
                    f"which runs code from the file), got {type(value).__name__} {value!r}")


def get_object(store: WorkflowStore, name: Any, *, trust_pickle: bool) -> Any:
    """The decoded object of a key or alias (see :meth:`WorkflowStore.get_object`);
    ``trust_pickle`` must be True or False (TypeError otherwise)."""
    trust_pickle = check_trust_pickle(trust_pickle, "get_object")
    key = resolve(store, name)
    m = meta_of(store, key)
    if m.codec == "pickle5" and not trust_pickle:
        by = f" written by {m.producer}" if m.producer else ""
        raise UntrustedPickleError(
            f"record {key.decode('utf-8', 'backslashreplace')!r} is a pickle{by}; "
            "unpickling runs code from the file. Open the store with trust_pickle=True only if your own "
            "engine built it", path=store.path, problem="untrusted-pickle")
    value = store.get(key)
    try:
        return decode(value, m.codec, what=f"record {key!r}")
    except StoreError as exc:
        if exc.path is None:
            raise type(exc)(str(exc), path=store.path, problem=exc.problem) from None
        raise
    except (ValueError, pickle.UnpicklingError, EOFError) as exc:  # json.JSONDecodeError is a ValueError
        raise StoreCorruptError(f"record {key!r} does not decode as {m.codec}: {type(exc).__name__}: {exc}",
                                path=store.path, problem="corrupt") from None


# ---------------------------------------------------------------- building from a directory, keyed by template

TEMPLATE_FIELDS = ("relpath", "path", "name", "stem", "ext", "dir", "id")


def template_fields(p: Any, source: Any, file_id: str | None = None) -> dict[str, str]:
    """The fields a key template (``--key``) may use, for file ``p`` under ``source``:
    ``relpath`` (``orders/a.bpmn``), ``path`` (``orders/a``: the default key),
    ``name`` (``a.bpmn``), ``stem`` (``a``), ``ext`` (``bpmn``), ``dir``
    (``orders``, ``""`` at the top) and ``id`` (from ``--key-regex`` /
    ``--key-field``, or an engine's process id)."""
    rel = p.relative_to(source)
    out = {"relpath": rel.as_posix(), "path": rel.with_suffix("").as_posix() if rel.suffix else rel.as_posix(),
           "name": rel.name, "stem": rel.stem, "ext": rel.suffix[1:], "dir": rel.parent.as_posix().strip(".")}
    if file_id is not None:
        out["id"] = file_id
    return out


def check_template(template: str, *, have_id: bool) -> None:
    """Raise KeyTemplateError (a ValueError) for a template naming an unknown
    field (or ``{id}`` without a source of ids)."""
    import string

    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise KeyTemplateError(f"--key {template!r} is not a valid template: {exc}") from None
    for f in names:
        if f not in TEMPLATE_FIELDS:
            raise KeyTemplateError(f"--key {template!r} names the field {{{f}}}; accepted: "
                             f"{', '.join('{' + x + '}' for x in TEMPLATE_FIELDS)}")
        if f == "id" and not have_id:
            raise KeyTemplateError(f"--key {template!r} uses {{id}}, which needs --key-regex or --key-field "
                             "(or --spiff, where it is the process id)")
    if not names:
        raise KeyTemplateError(f"--key {template!r} names no field, so every file would get the same key")
