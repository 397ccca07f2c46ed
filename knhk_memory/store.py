"""The workflow store: workflow definitions packed into one immutable file.

Opening maps the file (constant time whatever its size); ``get(key)`` is one
call into C that hashes the key, probes the index and bounds-checks the
record, then a slice of the mapping: a zero-copy, read-only memoryview. Many
worker processes that open the same file share one copy in the page cache.
The file format is in docs/store.md and in native/store.c.

What this module is not: a database. A store is written once, by
:class:`WorkflowStoreWriter`, and replaced atomically as a whole; readers
never see a half-written file and keep their view of the old one until they
call :meth:`WorkflowStore.reopen`.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import stat
import struct
import sys
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


from . import _fast
from ._core import check_as, ffi, lib
from ._core import last_error as _last_error
from .errors import (
    DuplicateKeyError,
    StoreClosedError,
    StoreCorruptError,
    StoreEmptyError,
    StoreError,
    StoreIsADirectoryError,
    StoreKeyError,
    StoreMagicError,
    StoreNotFoundError,
    StorePermissionError,
    StoreTruncatedError,
    StoreVersionError,
)

__all__ = ["WorkflowStore", "WorkflowStoreWriter", "open_store", "hot_ops",
           "HEADER_SIZE", "FORMAT_VERSION", "MAGIC", "DEFAULT_SEED"]

MAGIC = b"KNHKSTOR"
HEADER_SIZE = lib.KNHK_STORE_HEADER_SIZE
FORMAT_VERSION = lib.KNHK_STORE_VERSION
BLOCK_ENTRIES = lib.KNHK_STORE_BLOCK_ENTRIES
# Fixed, so the same input always builds the same bytes.
DEFAULT_SEED = int.from_bytes(b"knhkwfs1", "little")
# magic, version, flags, count, records_total, slots, max_disp, records_offset,
# records_end, dict_offset, dict_length, index_offset, dict_sum, file_size,
# seed, index_sum; then the header checksum (8 bytes) makes 128.
_HEADER = struct.Struct("<8sIIQQQQQQQQQQQQQ")
assert _HEADER.size == HEADER_SIZE - 8

_PROBLEM = {
    lib.KNHK_STORE_EMPTY: (StoreEmptyError, "empty"),
    lib.KNHK_STORE_TRUNCATED: (StoreTruncatedError, "truncated"),
    lib.KNHK_STORE_BAD_MAGIC: (StoreMagicError, "bad-magic"),
    lib.KNHK_STORE_NEWER_VERSION: (StoreVersionError, "newer-version"),
    lib.KNHK_STORE_CORRUPT: (StoreCorruptError, "corrupt"),
}
_ABSENT = lib.KNHK_STORE_ABSENT
_WIDE = lib.KNHK_STORE_WIDE
_PACK_MASK = (1 << 24) - 1
_MISSING = object()

# cffi parses a type string the first time it sees it; do that at import,
# not in the first open of a worker process.
_T_HANDLE_OUT = ffi.typeof("knhk_store **")
_T_INT_OUT = ffi.typeof("int *")
_T_INFO = ffi.typeof("knhk_store_info *")
_T_UINTPTR = ffi.typeof("uintptr_t")
_INFO_FIELDS = tuple(name for name, _ in ffi.typeof("knhk_store_info").fields)

MMAP_THRESHOLD = 64 * 1024
HUGE_PAGE_THRESHOLD = 1 << 30


def _key_bytes(key: Any) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"a store key must be str or bytes, got {type(key).__name__} {key!r}")


def _os_error(exc: OSError, path: Path, doing: str) -> StoreError:
    if isinstance(exc, FileNotFoundError):
        return StoreNotFoundError(f"no such file ({doing})", path=path, problem="missing")
    if isinstance(exc, PermissionError):
        return StorePermissionError(f"permission denied ({doing})", path=path, problem="unreadable")
    if isinstance(exc, IsADirectoryError):
        return StoreIsADirectoryError(f"is a directory, not a store file ({doing})", path=path,
                                      problem="directory")
    return StoreError(f"{exc.strerror or exc} ({doing})", path=path, problem="os-error")


# ---------------------------------------------------------------- reader


class WorkflowStore:
    """A read-only workflow store file.

    :param path: The store file.
    :param mmap_threshold: Files smaller than this many bytes are read into
        memory instead of mapped (a mapping costs more than reading a few pages).
    :param cache_size: Entries of :meth:`get_decoded`'s LRU cache (0: no cache).
    :param prefetch: Advise the kernel to read the whole file ahead (``MADV_WILLNEED``).
    :param huge_page_threshold: Mapped files at least this large are advised
        ``MADV_HUGEPAGE`` where the kernel offers it.

    ``get`` and ``in`` are thread-safe; :meth:`close` and :meth:`reopen` must
    not race with other calls on the same object.
    """

    def __init__(self, path: str | os.PathLike[str], *, mmap_threshold: int = MMAP_THRESHOLD,
                 cache_size: int = 1024, prefetch: bool = False,
                 huge_page_threshold: int = HUGE_PAGE_THRESHOLD) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.path = Path(path)
        self.mmap_threshold = mmap_threshold
        self.huge_page_threshold = huge_page_threshold
        self.cache_size = cache_size
        self._cache: OrderedDict[Any, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._handle: Any = ffi.NULL
        self._map: mmap.mmap | None = None
        self._cbuf: Any = None
        self._find: Callable[..., int] = _closed_find
        self._load()
        if prefetch:
            self.prefetch()

    # -- opening

    def _load(self) -> None:
        path = self.path
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _os_error(exc, path, "opening the store") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise StoreIsADirectoryError("is a directory, not a store file", path=path,
                                             problem="directory")
            if not stat.S_ISREG(st.st_mode):
                raise StoreError("is not a regular file", path=path, problem="not-a-file")
            size = st.st_size
            mapped: mmap.mmap | None = None
            if size < max(self.mmap_threshold, 1):
                chunks = []
                while True:  # a short read is not the end of the file
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        break
                    chunks.append(chunk)
                buf: Any = b"".join(chunks)
                size = len(buf)
            else:
                mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                buf = mapped
                size = len(mapped)
                _advise(mapped, "MADV_RANDOM")
                if size >= self.huge_page_threshold:
                    _advise(mapped, "MADV_HUGEPAGE")
        except IsADirectoryError as exc:
            raise _os_error(exc, path, "reading the store") from None
        except OSError as exc:
            if isinstance(exc, StoreError):
                raise
            raise _os_error(exc, path, "reading the store") from None
        finally:
            os.close(fd)
        cbuf = ffi.from_buffer(buf)
        out = ffi.new(_T_HANDLE_OUT)
        problem = ffi.new(_T_INT_OUT)
        def refused(message: str) -> StoreError:
            exc_type, tag = _PROBLEM.get(problem[0], (StoreCorruptError, "corrupt"))
            return exc_type(message, path=path, problem=tag)

        try:
            check_as(lib.knhk_store_open(cbuf, size, out, problem), refused,
                     special={lib.KNHK_ERR_NOMEM: lambda d: MemoryError(f"{path}: {d}")})
        except BaseException:
            ffi.release(cbuf)
            if mapped is not None:
                mapped.close()
            raise
        info = ffi.new(_T_INFO)
        lib.knhk_store_get_info(out[0], info)
        self._handle = out[0]
        self._cbuf = cbuf
        self._map = mapped
        self._view = memoryview(buf)
        self._info = {name: getattr(info, name) for name in _INFO_FIELDS}
        self._size = size
        self._find = lib.knhk_store_find
        self._compressed = bool(self._info["flags"] & lib.KNHK_STORE_FLAG_ZSTD)
        self._dctx: Any = None
        if self._compressed:
            import zstandard

            d = self._info
            if d["dict_length"]:
                start = d["dict_offset"]
                zdict = zstandard.ZstdCompressionDict(bytes(self._view[start:start + d["dict_length"]]))
                self._dctx = zstandard.ZstdDecompressor(dict_data=zdict)
            else:
                self._dctx = zstandard.ZstdDecompressor()
            self.get = self._get_decompressed  # type: ignore[method-assign]
        else:
            # The fast path: get is a C builtin bound to this handle (native/cpython/store_py.c).
            self.get = _fast.make_store_getter(int(ffi.cast(_T_UINTPTR, self._handle)), self._view,  # type: ignore[method-assign]
                                    _slow_path(self), self)

    def _release(self) -> None:
        _detach_getter(self.__dict__.get("get"))
        handle, self._handle = self._handle, ffi.NULL
        self._find = _closed_find
        if handle != ffi.NULL:
            lib.knhk_store_close(handle)
        if self._cbuf is not None:
            ffi.release(self._cbuf)
            self._cbuf = None
        mapped, self._map = self._map, None
        self._view = memoryview(b"")
        if mapped is not None:
            try:
                mapped.close()
            except BufferError:
                pass  # views handed out still use it; it is unmapped when the last one goes

    def close(self) -> None:
        """Release the store. Views already handed out stay valid; saved ``get``
        callables raise :class:`~knhk_memory.errors.StoreClosedError`."""
        self._release()
        self._clear_cache()

    def reopen(self) -> None:
        """Open the file at :attr:`path` again, picking up an atomic replacement.

        On failure the store keeps its current file.
        """
        old = (self._handle, self._cbuf, self._map, self._view, self._info, self._size, self._find,
               self._compressed, self._dctx, self.__dict__.get("get"))
        self._handle, self._cbuf, self._map = ffi.NULL, None, None
        self.__dict__.pop("get", None)
        try:
            self._load()
        except BaseException:
            (self._handle, self._cbuf, self._map, self._view, self._info, self._size, self._find,
             self._compressed, self._dctx, get) = old
            if get is not None:
                self.get = get  # type: ignore[method-assign]
            raise
        handle, cbuf, mapped = old[0], old[1], old[2]
        _detach_getter(old[9])
        if handle != ffi.NULL:
            lib.knhk_store_close(handle)
        if cbuf is not None:
            ffi.release(cbuf)
        if mapped is not None:
            try:
                mapped.close()
            except BufferError:
                pass
        self._clear_cache()

    def __enter__(self) -> WorkflowStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_handle", ffi.NULL) != ffi.NULL:
            self._release()
            self.__dict__.pop("get", None)  # break the getter cycle

    @property
    def closed(self) -> bool:
        return self._handle == ffi.NULL

    # -- lookups

    def get(self, key: str | bytes | bytearray | memoryview, default: Any = None) -> memoryview | Any:
        """The value of ``key`` as a read-only memoryview into the file, or ``default``.

        (An open uncompressed store replaces this method on the instance by the
        C builtin from native/cpython/store_py.c, which does the same in one call.)
        """
        if key.__class__ is not bytes:
            key = _key_bytes(key)
        r = self._find(self._handle, key, len(key))
        if r >= 0:
            o = r >> 24
            return self._view[o:o + (r & _PACK_MASK)]
        return self._slow(key, r, default)

    def _slow(self, key: bytes, r: int, default: Any) -> Any:
        if r == _ABSENT:
            return default
        if r == _WIDE:
            span = ffi.new("uint64_t[2]")
            r = lib.knhk_store_find_span(self._handle, key, len(key), span)
            if r >= 0:
                return self._view[span[0]:span[0] + span[1]]
            return self._slow(key, r, default)
        raise StoreCorruptError(f"reading key {key!r}: {_last_error()}", path=self.path, problem="corrupt")

    def get_raw(self, key: str | bytes | bytearray | memoryview, default: Any = None) -> memoryview | Any:
        """The stored bytes of ``key`` (zstd frames in a compressed store), zero-copy."""
        return WorkflowStore.get(self, key, default)

    def _get_decompressed(self, key: str | bytes | bytearray | memoryview, default: Any = None) -> memoryview | Any:
        raw = WorkflowStore.get(self, key, _MISSING)
        if raw is _MISSING:
            return default
        try:
            return memoryview(self._dctx.decompress(raw))
        except Exception as exc:  # zstd.ZstdError
            raise StoreCorruptError(f"value of key {_key_bytes(key)!r} is not a valid zstd frame: {exc}",
                                    path=self.path, problem="corrupt") from None

    def __getitem__(self, key: str | bytes) -> memoryview:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise StoreKeyError(f"key {key!r} is not in the store ({len(self)} keys)", path=self.path,
                                problem="missing-key")
        return value

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (str, bytes, bytearray, memoryview)):
            return False
        return WorkflowStore.get(self, key, _MISSING) is not _MISSING

    def get_decoded(self, key: str | bytes, decoder: Callable[[bytes], Any] = json.loads) -> Any:
        """``decoder(value)``, cached in a bounded LRU keyed by (key, decoder).

        Raises :class:`~knhk_memory.errors.StoreKeyError` for a missing key.
        """
        kb = _key_bytes(key)
        ck = (kb, decoder)
        if self.cache_size:
            with self._cache_lock:
                hit = self._cache.get(ck, _MISSING)
                if hit is not _MISSING:
                    self._cache.move_to_end(ck)
                    return hit
        obj = decoder(bytes(self[kb]))
        if self.cache_size:
            with self._cache_lock:
                self._cache[ck] = obj
                self._cache.move_to_end(ck)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return obj

    def _clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    # -- whole-store operations

    def _check_open(self) -> None:
        if self._handle == ffi.NULL:
            raise StoreClosedError("the store is closed", path=self.path, problem="closed")

    def __len__(self) -> int:
        self._check_open()
        return self._info["count"]

    def _record_offsets(self) -> np.ndarray:
        import numpy as np

        self._check_open()
        n = self._info["count"]
        offsets = np.zeros(max(n, 1), dtype=np.uint64)
        got = lib.knhk_store_live_offsets(self._handle, ffi.from_buffer("uint64_t[]", offsets), n)
        if got < 0 or got != n:
            raise StoreCorruptError(f"listing keys: {_last_error() if got < 0 else f'{got} keys, header says {n}'}",
                                    path=self.path, problem="corrupt")
        offsets = offsets[:n]
        offsets.sort()  # insertion order
        return offsets

    def _records(self) -> Iterator[tuple[memoryview, memoryview]]:
        spans = ffi.new("uint64_t[4]")
        view = self._view

        def corrupt(d: str) -> StoreError:
            return StoreCorruptError(d, path=self.path, problem="corrupt")
        for off in self._record_offsets().tolist():
            check_as(lib.knhk_store_record_at(self._handle, off, spans), corrupt)
            yield view[spans[0]:spans[0] + spans[1]], view[spans[2]:spans[2] + spans[3]]

    def keys(self) -> Iterator[bytes]:
        """Every key, as bytes, in the order they were added."""
        for k, _ in self._records():
            yield bytes(k)

    __iter__ = keys

    def items(self) -> Iterator[tuple[bytes, memoryview]]:
        """(key, value) pairs in the order they were added; values as :meth:`get` returns them."""
        if not self._compressed:
            for k, v in self._records():
                yield bytes(k), v
            return
        for k, v in self._records():
            yield bytes(k), memoryview(self._dctx.decompress(v))

    def verify(self) -> int:
        """Check every checksum and every index entry; return the number of records checked.

        Raises :class:`~knhk_memory.errors.StoreCorruptError` naming the first fault.
        """
        self._check_open()
        checked = ffi.new("uint64_t *")
        check_as(lib.knhk_store_verify(self._handle, checked),
                 lambda d: StoreCorruptError(f"verify: {d}", path=self.path, problem="corrupt"))
        if self._compressed:
            for k, v in self._records():
                try:
                    self._dctx.decompress(v)
                except Exception as exc:
                    raise StoreCorruptError(f"verify: value of key {bytes(k)!r} is not a valid zstd "
                                            f"frame: {exc}", path=self.path, problem="corrupt") from None
        return int(checked[0])

    def prefetch(self) -> None:
        """Ask the kernel to read the whole file ahead (``MADV_WILLNEED``)."""
        self._check_open()
        if self._map is not None:
            _advise(self._map, "MADV_WILLNEED")

    def stats(self, *, deep: bool = False) -> dict[str, Any]:
        """Figures about the file; ``deep=True`` also sums key and value bytes (reads every record)."""
        self._check_open()
        d = self._info
        out: dict[str, Any] = {
            "path": str(self.path),
            "file_size": self._size,
            "format_version": d["version"],
            "access": "mmap" if self._map is not None else "read",
            "compression": ("zstd+dict" if d["dict_length"] else "zstd") if self._compressed else "none",
            "keys": d["count"],
            "records": d["records_total"],
            "superseded_records": d["records_total"] - d["count"],
            "index_slots": d["slots"],
            "load_factor": round(d["count"] / d["slots"], 4) if d["slots"] else 0.0,
            "max_displacement": d["max_disp"],
            "index_bytes": self._size - d["index_offset"],
            "records_bytes": d["records_end"] - d["records_offset"],
            "dictionary_bytes": d["dict_length"],
        }
        if deep:
            kb = vb = 0
            for k, v in self._records():
                kb += len(k)
                vb += len(v)
            out["key_bytes"] = kb
            out["value_bytes"] = vb
            out["overhead"] = round(self._size / (kb + vb) - 1, 4) if kb + vb else None
        return out

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._info['count']} keys, {self._size} bytes"
        return f"WorkflowStore({str(self.path)!r}, {state})"


def _slow_path(store: WorkflowStore) -> Callable[[Any, int, Any], Any]:
    """The getter's way back into Python; holds the store weakly (capsules are not
    followed by the cycle collector)."""
    ref = weakref.ref(store)
    closed = lib.KNHK_STORE_BROKEN - 1

    def slow(key: Any, code: int, default: Any) -> Any:
        s = ref()
        if s is None or code == closed:
            raise StoreClosedError("the store is closed", path=None if s is None else s.path, problem="closed")
        if code == 0:  # not str/bytes: convert (or raise TypeError) and go the cffi way
            return WorkflowStore.get(s, _key_bytes(key), default)
        return s._slow(_key_bytes(key), code, default)

    return slow


def _detach_getter(getter: Any) -> None:
    if getter is not None and isinstance(getattr(getter, "__self__", None), tuple):
        _fast.detach_store_getter(getter)


def _closed_find(handle: Any, key: bytes, n: int) -> int:
    raise StoreClosedError("the store is closed")


def _advise(mapped: mmap.mmap, name: str) -> bool:
    """madvise the whole mapping if the platform has the advice; False when not applied."""
    advice = getattr(mmap, name, None)
    if advice is None:
        return False
    try:
        mapped.madvise(advice)
    except OSError:  # e.g. EINVAL: the kernel does not offer it for this mapping
        return False
    return True


def open_store(path: str | os.PathLike[str], **kwargs: Any) -> WorkflowStore:
    """Open a store; the same as ``WorkflowStore(path, **kwargs)``."""
    return WorkflowStore(path, **kwargs)


# ---------------------------------------------------------------- writer


class WorkflowStoreWriter:
    """Builds a store file; the file appears at ``path`` only when :meth:`commit` succeeds.

    :param path: Where the store goes. The records are written to a temporary
        file in the same directory, which is flushed, fsynced and renamed over
        ``path``, and then the directory is fsynced: a crash at any point leaves
        either the old file or the new one, never a half-written one.
    :param last_wins: A repeated key replaces the earlier value instead of
        raising :class:`~knhk_memory.errors.DuplicateKeyError`.
    :param compress: zstd level (1-22) to compress values with, or None.
    :param zstd_dict: A zstd dictionary (raw bytes, e.g. from
        ``zstandard.train_dictionary(...).as_bytes()``) stored in the file and
        used for every value; only with ``compress``.
    :param load_factor: Keys per index slot, in (0, 0.95].

    Used as a context manager it commits on success and discards on error.
    """

    def __init__(self, path: str | os.PathLike[str], *, last_wins: bool = False, compress: int | None = None,
                 zstd_dict: bytes | None = None, load_factor: float = 0.875,
                 seed: int = DEFAULT_SEED) -> None:
        import numpy as np

        if not 0 < load_factor <= 0.95:
            raise ValueError(f"load_factor must be in (0, 0.95], got {load_factor}")
        if zstd_dict is not None and compress is None:
            raise ValueError("zstd_dict needs compress=<level>")
        self.path = Path(path)
        self.last_wins = last_wins
        self.load_factor = load_factor
        self.seed = seed & 0xFFFFFFFFFFFFFFFF
        self._cctx: Any = None
        self._zstd_dict = bytes(zstd_dict) if zstd_dict is not None else b""
        if compress is not None:
            import zstandard

            if not 1 <= compress <= 22:
                raise ValueError(f"compress must be a zstd level in 1..22, got {compress}")
            params: dict[str, Any] = {"level": compress, "write_content_size": True, "write_checksum": False}
            if zstd_dict is not None:
                params["dict_data"] = zstandard.ZstdCompressionDict(self._zstd_dict)
            self._cctx = zstandard.ZstdCompressor(**params)
        if self.path.is_dir():
            raise StoreIsADirectoryError("is a directory; give a file path for the store", path=self.path,
                                         problem="directory")
        directory = self.path.parent if str(self.path.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise _os_error(exc, directory, "creating a temporary file for the store") from None
        self._tmp = Path(tmp)
        self._file: Any = os.fdopen(fd, "wb", buffering=1 << 20)
        self._file.write(bytes(HEADER_SIZE))
        self._pos = HEADER_SIZE
        self._index: dict[bytes, int] = {}   # key -> slot in _hashes/_offsets
        self._hashes = np.zeros(1024, dtype=np.uint64)
        self._offsets = np.zeros(1024, dtype=np.uint64)
        self._records = 0
        # Records wait in batches and are encoded by one C call per batch.
        self._pk: list[bytes] = []
        self._pv: list[bytes] = []
        self._pslot: list[int] = []
        self._pbytes = 0
        self._buf = bytearray(1 << 16)
        self._cbuf = ffi.from_buffer("uint8_t[]", self._buf)

    def __len__(self) -> int:
        return len(self._index)

    def add(self, key: str | bytes, value: bytes | bytearray | memoryview) -> None:
        """Add one record. ``key``: str (UTF-8) or bytes; ``value``: bytes-like."""
        if self._file is None:
            raise StoreClosedError("the writer is committed or discarded", path=self.path, problem="closed")
        if key.__class__ is not bytes:
            key = _key_bytes(key)
        if value.__class__ is not bytes:
            if not isinstance(value, (bytearray, memoryview)):
                raise TypeError(f"a store value must be bytes-like, got {type(value).__name__}")
            value = bytes(value)
        if self._cctx is not None:
            value = bytes(self._cctx.compress(value))  # bytes(b) is b: a name for mypy, no copy
        index = self._index
        n = len(index)
        slot = index.setdefault(key, n)
        if self.last_wins:
            self._pslot.append(slot)
        elif slot != n:
            raise DuplicateKeyError(f"duplicate key {key!r} (pass last_wins=True to keep the last value)",
                                    path=self.path, problem="duplicate-key")
        self._pk.append(key)
        self._pv.append(value)
        self._pbytes += len(value)
        if len(self._pk) >= 4096 or self._pbytes >= (8 << 20):
            self._flush()

    def _flush(self) -> None:
        import numpy as np

        keys, vals, slots = self._pk, self._pv, self._pslot
        n = len(keys)
        if not n:
            return
        kb, vb = b"".join(keys), b"".join(vals)
        kl = np.fromiter(map(len, keys), dtype=np.uint64, count=n)
        vl = np.fromiter(map(len, vals), dtype=np.uint64, count=n)
        cap = len(kb) + len(vb) + 28 * n
        if cap > len(self._buf):
            self._buf = bytearray(cap)
            self._cbuf = ffi.from_buffer("uint8_t[]", self._buf)
        hashes = np.empty(n, dtype=np.uint64)
        offsets = np.empty(n, dtype=np.uint64)
        u64 = "uint64_t[]"
        written = lib.knhk_store_encode_batch(
            ffi.from_buffer("uint8_t[]", kb), len(kb), ffi.from_buffer(u64, kl),
            ffi.from_buffer("uint8_t[]", vb), len(vb), ffi.from_buffer(u64, vl), n, self.seed, self._pos,
            self._cbuf, len(self._buf), ffi.from_buffer(u64, hashes), ffi.from_buffer(u64, offsets))
        if written == 0:
            raise StoreError(f"encoding records: {_last_error()}", path=self.path, problem="build")
        self._file.write(memoryview(self._buf)[:written])
        self._pos += written
        self._records += n
        top = len(self._index)
        if top > len(self._offsets):
            size = max(top, 2 * len(self._offsets))
            self._hashes = np.resize(self._hashes, size)
            self._offsets = np.resize(self._offsets, size)
        if self.last_wins:  # repeated slots: the later record must win, in order
            for i, slot in enumerate(slots):
                self._hashes[slot] = hashes[i]
                self._offsets[slot] = offsets[i]
        else:  # without repeats, the batch holds slots top - n .. top - 1 in order
            self._hashes[top - n:top] = hashes
            self._offsets[top - n:top] = offsets
        self._pk, self._pv, self._pslot, self._pbytes = [], [], [], 0

    def update(self, pairs: Any) -> None:
        """Add every (key, value) of a mapping or an iterable of pairs."""
        items = pairs.items() if hasattr(pairs, "items") else pairs
        for k, v in items:
            self.add(k, v)

    def commit(self) -> Path:
        """Write the index and header, then make the file appear atomically at :attr:`path`."""
        import numpy as np

        if self._file is None:
            raise StoreClosedError("the writer is already committed or discarded", path=self.path,
                                   problem="closed")
        f = self._file
        try:
            self._flush()
            records_end = self._pos
            dict_offset = records_end
            f.write(self._zstd_dict)
            pos = dict_offset + len(self._zstd_dict)
            pad = -pos % 8
            f.write(bytes(pad))
            index_offset = pos + pad
            n = len(self._index)
            slots = max(1, -(-n * 1000 // int(self.load_factor * 1000)))
            slots = max(slots, n)
            hashes = np.ascontiguousarray(self._hashes[:n])
            offsets = np.ascontiguousarray(self._offsets[:n])
            table = np.zeros(slots, dtype=np.uint64)
            nblocks = -(-slots // BLOCK_ENTRIES)
            blocksums = np.zeros(nblocks, dtype=np.uint64)
            max_disp = ffi.new("uint64_t *")
            status = lib.knhk_store_build_index(
                ffi.from_buffer("uint64_t[]", hashes) if n else ffi.NULL,
                ffi.from_buffer("uint64_t[]", offsets) if n else ffi.NULL,
                n, slots, ffi.from_buffer("uint64_t[]", table), ffi.from_buffer("uint64_t[]", blocksums),
                max_disp)
            check_as(status, lambda d: StoreError(f"building the index: {d}", path=self.path, problem="build"))
            table_bytes = table.tobytes()
            sums_bytes = blocksums.tobytes()
            f.write(table_bytes)
            f.write(sums_bytes)
            file_size = index_offset + len(table_bytes) + len(sums_bytes)
            flags = lib.KNHK_STORE_FLAG_ZSTD if self._cctx is not None else 0
            dict_sum = lib.knhk_store_hash(self._zstd_dict, len(self._zstd_dict), self.seed) if self._zstd_dict else 0
            index_sum = lib.knhk_store_hash(sums_bytes, len(sums_bytes), self.seed)
            head = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, n, self._records, slots, max_disp[0], HEADER_SIZE,
                                records_end, dict_offset, len(self._zstd_dict), index_offset, dict_sum,
                                file_size, self.seed, index_sum)
            head += lib.knhk_store_hash(head, len(head), 0).to_bytes(8, "little")
            f.seek(0)
            f.write(head)
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._file = None
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self.discard()
            raise _os_error(exc, self.path, "writing the store") from None
        except BaseException:
            self.discard()
            raise
        _fsync_dir(self.path.parent if str(self.path.parent) else Path("."))
        self._index.clear()
        return self.path

    def discard(self) -> None:
        """Drop everything added; the temporary file is removed and ``path`` is untouched."""
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass

    abort = discard

    def __enter__(self) -> WorkflowStoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if self._file is not None:
                self.commit()
        else:
            self.discard()

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            self.discard()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some filesystems will not open a directory; the rename is done
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------- building from a directory


def iter_source(source: Path, *, key_regex: str | None = None, key_field: str | None = None
                ) -> Iterator[tuple[str, Path]]:
    """(key, file) for every regular file under ``source``, sorted, hidden entries skipped.

    The key is the path relative to ``source`` without its extension (``/``
    separated), or taken from the file: ``key_regex``'s first group, or the
    top-level ``key_field`` of a JSON document.
    """
    pattern = re.compile(key_regex.encode()) if key_regex else None
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / name for name in filenames if not name.startswith("."))
    for p in sorted(found, key=lambda q: q.relative_to(source).as_posix()):
        if not p.is_file():
            continue
        if pattern is None and key_field is None:
            rel = p.relative_to(source)
            yield rel.with_suffix("").as_posix() if rel.suffix else rel.as_posix(), p
        else:
            yield _key_from_file(p, pattern, key_field), p


def _key_from_file(p: Path, pattern: re.Pattern[bytes] | None, key_field: str | None) -> str:
    data = p.read_bytes()
    if pattern is not None:
        m = pattern.search(data)
        if m is None or not m.groups():
            raise StoreError(f"--key-regex {pattern.pattern.decode()!r} found no key (with a group) "
                             "in the file", path=p, problem="no-key")
        return m.group(1).decode("utf-8")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise StoreError(f"--key-field needs a JSON file: {exc}", path=p, problem="no-key") from None
    if not isinstance(doc, dict) or key_field not in doc:
        raise StoreError(f"JSON document has no top-level field {key_field!r}", path=p, problem="no-key")
    return str(doc[key_field])


def build_from_directory(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
                         key_regex: str | None = None, key_field: str | None = None,
                         last_wins: bool = False, compress: int | None = None,
                         progress: bool | None = None) -> dict[str, Any]:
    """Build ``output`` from the files under ``source``; returns a summary."""
    src = Path(source)
    if not src.exists():
        raise StoreNotFoundError("source directory does not exist", path=src, problem="missing")
    if not src.is_dir():
        raise StoreError("source must be a directory of workflow definition files", path=src,
                         problem="not-a-directory")
    files = list(iter_source(src, key_regex=key_regex, key_field=key_field))
    show = progress if progress is not None else (len(files) >= 2000 and sys.stderr.isatty())
    total = 0
    with WorkflowStoreWriter(output, last_wins=last_wins, compress=compress) as w:
        it: Any = files
        if show:
            from tqdm import tqdm

            it = tqdm(files, desc="store build", unit="file", file=sys.stderr)
        for key, p in it:
            data = p.read_bytes()
            total += len(data)
            w.add(key, data)
        keys = len(w)
    return {"keys": keys, "files": len(files), "value_bytes": total, "output": str(output),
            "file_size": Path(output).stat().st_size}


# ---------------------------------------------------------------- hot path


def hot_ops() -> list[Any]:
    """The store's hot path for the tick harness (see knhk_memory.hotpath)."""
    from .hotpath import HotOp

    def setup() -> tuple[Any, Callable[[], None]]:
        tmp = tempfile.TemporaryDirectory(prefix="knhk-store-hotop-")
        path = Path(tmp.name) / "probe.kst"
        with WorkflowStoreWriter(path) as w:
            for i in range(10_000):
                w.add(f"workflow/{i:06d}", b"x" * 600)
        store = WorkflowStore(path, mmap_threshold=0)
        key = ffi.new("char[]", b"workflow/004242")
        ctx = ffi.new("knhk_store_probe_ctx *", {"store": store._handle, "key": key, "key_len": 15})

        def cleanup() -> None:
            nonlocal ctx, key
            store.close()
            tmp.cleanup()
            ctx = key = None

        return ffi.cast("void *", ctx), cleanup

    return [HotOp(
        name="store_probe",
        description="one index probe of a present 15-byte key in a 10,000-record mapped store: XXH64 of "
                    "the key, multiply-shift home slot, tag compare, record bounds check, key memcmp",
        fn=ffi.addressof(lib, "knhk_store_hotop_probe"),
        setup=setup,
    )]
