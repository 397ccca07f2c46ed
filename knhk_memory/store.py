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
import operator
import os
import re
import stat
import struct
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from . import _fast, records, store_options
from ._core import check_as, ffi, lib
from ._core import last_error as _last_error
from ._forksafe import renew_in_child
from .errors import (
    AmbiguousKeyError,
    DuplicateKeyError,
    StoreChangedError,
    StoreClosedError,
    StoreCorruptError,
    StoreDecodeError,
    StoreDiskFullError,
    StoreEmptyError,
    StoreError,
    StoreIsADirectoryError,
    StoreKeyEncodingError,
    StoreKeyError,
    StoreMagicError,
    StoreNotFoundError,
    StorePermissionError,
    StoreTruncatedError,
    StoreVersionError,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (~2 ms of every import); type checkers read True
if TYPE_CHECKING:
    from typing import Any

__all__ = ["WorkflowStore", "WorkflowStoreWriter", "open_store", "hot_ops",
           "HEADER_SIZE", "FORMAT_VERSION", "MAGIC", "DEFAULT_SEED"]

MAGIC = b"KNHKSTOR"
HEADER_SIZE = lib.KNHK_STORE_HEADER_SIZE
FORMAT_VERSION = lib.KNHK_STORE_VERSION
BLOCK_ENTRIES = lib.KNHK_STORE_BLOCK_ENTRIES
# The checksum seed (and the key hash's k1). Fixed; the key hash's k0, the
# hash_key, is random per build (see WorkflowStoreWriter).
DEFAULT_SEED = int.from_bytes(b"knhkwfs1", "little")
# magic, version, flags, count, records_total, slots, max_disp, hash_key
# (version 1: records_offset), records_end, dict_offset, dict_length,
# index_offset, dict_sum, file_size, seed, index_sum; then the header checksum
# (8 bytes) makes 128.
_HEADER = struct.Struct("<8sIIQQQQQQQQQQQQQ")
assert _HEADER.size == HEADER_SIZE - 8

_PROBLEM = {
    lib.KNHK_STORE_EMPTY: (StoreEmptyError, "empty"),
    lib.KNHK_STORE_TRUNCATED: (StoreTruncatedError, "truncated"),
    lib.KNHK_STORE_BAD_MAGIC: (StoreMagicError, "bad-magic"),
    lib.KNHK_STORE_NEWER_VERSION: (StoreVersionError, "newer-version"),
    lib.KNHK_STORE_CORRUPT: (StoreCorruptError, "corrupt"),
    lib.KNHK_STORE_CHANGED_WHILE_OPENING: (StoreChangedError, "changed"),
}
_ABSENT = lib.KNHK_STORE_ABSENT
_WIDE = lib.KNHK_STORE_WIDE
_CHANGED = lib.KNHK_STORE_CHANGED
# The build draws a new hash key when the longest probe passes this; Robin Hood
# at load 0.875 with a random key stays far below it (docs/store.md).
def max_displacement_bound(slots: int) -> int:
    """The longest probe distance a build accepts for ``slots`` index slots:
    ``32 + 4 * ceil(log2(slots))`` (Robin Hood hashing's longest probe grows as
    O(log n); measured 10-40 at 1,000-1,000,000 keys, docs/store.md)."""
    return 32 + 4 * max(1, (slots - 1).bit_length())


RESEEDS = 8
_PACK_MASK = (1 << 24) - 1
_MISSING = object()

# cffi parses a type string the first time it sees it; do that at import,
# not in the first open of a worker process.
_T_HANDLE_OUT = ffi.typeof("knhk_store **")
_T_INT_OUT = ffi.typeof("int *")
_T_INFO = ffi.typeof("knhk_store_info *")
_T_UINTPTR = ffi.typeof("uintptr_t")
_T_U64_ARRAY = ffi.typeof("uint64_t[]")
_INFO_FIELDS = tuple(name for name, _ in ffi.typeof("knhk_store_info").fields)

MMAP_THRESHOLD = 64 * 1024
HUGE_PAGE_THRESHOLD = 1 << 30
# The largest value a compressed record may decompress to, unless the reader says otherwise
# (WorkflowStore(max_value_bytes=...), [store] max_value_bytes): a small frame must not make
# every get() allocate gigabytes (a decompression bomb, issue 22).
MAX_VALUE_BYTES = 64 * 1024 * 1024


# What a key may be, said the same way by every method that takes one.
KEY_TYPES = "str (stored as its UTF-8 bytes) or bytes-like (bytes, bytearray, memoryview)"


def _key_bytes(key: Any, path: Any = None) -> bytes:
    """The bytes of a key: a str's UTF-8 form, a bytes-like object's bytes. Raises TypeError for
    any other type and :class:`~knhk_memory.errors.StoreKeyEncodingError` for a str that has no
    UTF-8 form (a lone surrogate such as ``"\\ud800"``)."""
    if isinstance(key, str):
        try:
            return key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise StoreKeyEncodingError(
                f"key {key!r} is not valid UTF-8 text ({exc.reason} at index {exc.start}); keys must be valid "
                "UTF-8: give a str without lone surrogates, or the key's bytes", path=path,
                problem="bad-key") from None
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"a store key must be {KEY_TYPES}, got {type(key).__name__} {key!r}")


def _stored_key_text(key: bytes) -> str:
    """A key the store holds (bytes), as messages show it: the str it encodes when it is
    UTF-8 (what a caller of get('name') gave), else its bytes."""
    try:
        return repr(key.decode())
    except UnicodeDecodeError:
        return repr(key)


def _shown_key(key: Any) -> str:
    """A key as messages quote it, whichever method was called: a str as its repr, a
    bytes-like key as the repr of its bytes."""
    return repr(key) if isinstance(key, (str, bytes)) else repr(bytes(key))


# ---------------------------------------------------------------- argument checks
#
# The constructors check every argument up front: a wrong type is a TypeError, a value out of
# range a ValueError, each naming the class, the parameter, the value given and what is accepted.


def _int_arg(owner: str, name: str, value: Any, lo: int = 0, hi: int | None = None, what: str = "") -> int:
    """``value`` as an int in [lo, hi] (hi None: no upper bound); bool is not a count. The
    reader's options (store_options.INT_OPTIONS) take their range and message from there, as
    the ``[store]`` configuration section does."""
    shared = name in store_options.INT_OPTIONS and owner == "WorkflowStore"
    if shared:
        lo, hi, what = store_options.INT_OPTIONS[name]
    accepted = f"an int from {lo:,} to {hi:,} ({what})" if hi is not None else f"an int >= {lo:,} ({what})"
    if isinstance(value, bool) or type(value).__name__ == "bool_" or isinstance(value, float):
        raise TypeError(f"{owner}: {name} must be {accepted}, got {type(value).__name__} {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{owner}: {name} must be {accepted}, got {type(value).__name__} {value!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{owner}: {name} must be {accepted}, got {v!r}")
    return v


def _bool_arg(owner: str, name: str, value: Any, what: str = "") -> bool:
    """``value`` if it is exactly True or False: a truthy string ("no") must not switch a guard on."""
    if value is True or value is False:
        return value
    raise TypeError(f"{owner}: {name} must be True or False{what}, got {type(value).__name__} {value!r}")


def _path_arg(owner: str, value: Any) -> Path:
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{owner}: path must be a str or os.PathLike file path, got {type(value).__name__} "
                        f"{value!r}")
    if isinstance(value, str) and not value:
        raise ValueError(f"{owner}: path is empty ('' names no file); give the path of a store file")
    return Path(value)


U64_MAX = (1 << 64) - 1


def _os_error(exc: OSError, path: Path, doing: str) -> StoreError:
    if isinstance(exc, FileNotFoundError):
        return StoreNotFoundError(f"no such file ({doing})", path=path, problem="missing")
    if isinstance(exc, PermissionError):
        return StorePermissionError(f"permission denied ({doing})", path=path, problem="unreadable")
    if isinstance(exc, IsADirectoryError):
        return StoreIsADirectoryError(f"is a directory, not a store file ({doing})", path=path,
                                      problem="directory")
    if exc.errno == errno.ELOOP:
        return StoreError(f"too many levels of symbolic links, a symlink loop ({doing})", path=path,
                          problem="os-error")
    if exc.errno == errno.ENAMETOOLONG:
        return StoreError(f"the file name is too long ({len(os.fsencode(path))} bytes; {doing})", path=path,
                          problem="os-error")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreDiskFullError(f"no space left on the device ({doing}; the file system has "
                                  f"{_free_bytes(Path(path)):,} bytes free for this user)", path=path,
                                  problem="disk-full")
    return StoreError(f"{exc.strerror or exc} ({doing})", path=path, problem="os-error")


# ---------------------------------------------------------------- reader


class _Open:
    """One opened file: the C handle, the cffi buffer over the bytes it reads, the
    mapping (None for a file read into memory), the view over the whole file, and
    the header. A *generation*: a reopen makes a new one.

    It frees the handle, releases the buffer and unmaps the file when its last
    reference goes, never before. A :class:`WorkflowStore` holds one reference and
    every read holds its own for as long as it reads (the C read paths under the
    GIL, the Python ones in a local variable across the cffi calls that release
    the GIL), so ``close()`` or ``reopen()`` on another thread only drops the
    store's: a reader in the middle of a read finishes on the file it started
    with (issue 22). Views handed out by ``get`` keep the mapping (not the
    handle) alive on their own, as memoryviews do.
    """

    __slots__ = ("handle", "cbuf", "map", "view", "info", "size", "compressed", "zstd", "zdict", "local",
                 "__weakref__")

    def __init__(self, handle: Any, cbuf: Any, mapped: mmap.mmap | None, buf: Any, size: int) -> None:
        self.handle, self.cbuf, self.map, self.size = handle, cbuf, mapped, size
        self.view = memoryview(buf)
        info = ffi.new(_T_INFO)
        lib.knhk_store_get_info(handle, info)
        self.info = {name: getattr(info, name) for name in _INFO_FIELDS}
        self.compressed = bool(self.info["flags"] & lib.KNHK_STORE_FLAG_ZSTD)
        self.zstd: Any = None
        self.zdict: Any = None
        self.local: Any = None

    def dctx(self) -> Any:
        """This thread's zstd decompressor (python-zstandard's are not to be shared by
        threads running at once), made on the thread's first use."""
        d = getattr(self.local, "d", None)
        if d is None:
            d = self.zstd.ZstdDecompressor(dict_data=self.zdict) if self.zdict is not None else \
                self.zstd.ZstdDecompressor()
            self.local.d = d
        return d

    def release(self) -> None:
        handle, self.handle = self.handle, ffi.NULL
        if handle != ffi.NULL:
            lib.knhk_store_close(handle)
        cbuf, self.cbuf = self.cbuf, None
        if cbuf is not None:
            ffi.release(cbuf)
        self.view = memoryview(b"")
        mapped, self.map = self.map, None
        if mapped is not None:
            try:
                mapped.close()
            except BufferError:
                pass  # views handed out still use it; it is unmapped when the last one goes

    def __del__(self) -> None:
        if getattr(self, "handle", ffi.NULL) != ffi.NULL:
            self.release()


_CLOSED_VIEW = memoryview(b"")


class WorkflowStore(_fast.StoreBase):
    """A read-only workflow store file.

    :param path: The store file (str or os.PathLike; not empty).
    :param mmap_threshold: Files smaller than this many bytes are read into
        memory instead of mapped (a mapping costs more than reading a few pages).
        An int >= 0; default 65,536 bytes.
    :param cache_size: Entries of :meth:`get_decoded`'s and :meth:`get_object`'s
        LRU cache, an int from 0 (no cache) to 10,000,000; default 1,024.
    :param prefetch: True: advise the kernel to read the whole file ahead
        (``MADV_WILLNEED``) at open. True or False; default False.
    :param huge_page_threshold: Mapped files of at least this many bytes are
        advised ``MADV_HUGEPAGE`` where the kernel offers it. An int >= 0;
        default 2**30 bytes (1 GiB).
    :param trust_pickle: Let :meth:`get_object` unpickle ``pickle5`` records.
        Unpickling runs code chosen by whoever wrote the file: pass True only
        for a store your own engine built (see knhk_memory.records). Exactly
        True or False (a truthy ``"no"`` is a TypeError, never a yes); default False.
    :param max_value_bytes: The largest size a compressed value may decompress
        to, in bytes (a decompression bomb is refused, issue 22). An int from
        1 to 2**40; default 64 MiB.
    :raises TypeError: an argument of the wrong type (bool is not a count); the
        message names the parameter, the value and what is accepted.
    :raises ValueError: an argument out of range, or an empty ``path``.
    :raises StoreNotFoundError: no file at ``path``.
    :raises StorePermissionError: the file is not readable.
    :raises StoreIsADirectoryError: ``path`` is a directory.
    :raises StoreError: a FIFO, device or socket (refused before it is opened).
    :raises StoreFormatError: not a valid store: :class:`~knhk_memory.errors.StoreEmptyError`,
        ``StoreTruncatedError``, ``StoreMagicError``, ``StoreVersionError``, ``StoreCorruptError``.
    :raises StoreChangedError: the file changed while it was being opened.

    Keys, on every method that takes one (``get``, ``store[key]``, ``key in
    store``, ``get_bytes``, ``get_raw``, ``get_decoded``, ``get_object``,
    ``meta``, ``resolve``): a ``str`` (looked up as its UTF-8 bytes) or
    bytes-like (``bytes``, ``bytearray``, ``memoryview``). Another type is a
    TypeError, ``in`` included; a str with no UTF-8 form (a lone surrogate) is
    a :class:`~knhk_memory.errors.StoreKeyEncodingError` (a ValueError).

    ``store[key]``: the value as :meth:`get` returns it (a read-only memoryview
    into the file, zero-copy; decompressed into memory in a compressed store);
    an absent key raises :class:`~knhk_memory.errors.StoreKeyError` (a KeyError)
    quoting the key as given. ``key in store``: True when ``key`` is a key
    (aliases are not keys; nothing is decompressed). Both raise
    :class:`~knhk_memory.errors.StoreClosedError` after :meth:`close`.

    Every method is thread-safe, :meth:`close` and :meth:`reopen` included: a
    read running on another thread while the store closes finishes on the file
    it started with, and the next read raises
    :class:`~knhk_memory.errors.StoreClosedError`; a read racing a reopen
    answers from the old file or the new one, never a mix. The mapping is
    unmapped once the last read and the last view handed out are done.

    ``get``, ``get_bytes``, ``store[key]`` and ``key in store`` are C
    (native/cpython/store_py.c); anything unusual goes to the Python methods
    below, which hold every message.
    """

    def __init__(self, path: str | os.PathLike[str], *, mmap_threshold: int = MMAP_THRESHOLD,
                 cache_size: int = 1024, prefetch: bool = False,
                 huge_page_threshold: int = HUGE_PAGE_THRESHOLD, trust_pickle: bool = False,
                 max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        who = "WorkflowStore"
        self.path = _path_arg(who, path)
        self.mmap_threshold = _int_arg(who, "mmap_threshold", mmap_threshold)
        self.cache_size = _int_arg(who, "cache_size", cache_size)
        prefetch = _bool_arg(who, "prefetch", prefetch)
        self.huge_page_threshold = _int_arg(who, "huge_page_threshold", huge_page_threshold)
        self.trust_pickle = trust_pickle  # checked by the property: get_object unpickles only on True
        # The decompression cap (issue 22): a compressed value may not grow past this.
        self.max_value_bytes = _int_arg(who, "max_value_bytes", max_value_bytes)
        self._cache: OrderedDict[Any, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        renew_in_child(self, "_cache_lock")
        self._find = lib.knhk_store_find
        self._attach_gen(self._open_file())
        if prefetch:
            self.prefetch()

    @property
    def trust_pickle(self) -> bool:
        """Whether :meth:`get_object` unpickles ``pickle5`` records (True or False only: a
        pickle runs code chosen by whoever wrote the file)."""
        return self._trust_pickle

    @trust_pickle.setter
    def trust_pickle(self, value: bool) -> None:
        self._trust_pickle = records.check_trust_pickle(value, "WorkflowStore")

    # -- opening

    def _open_file(self) -> _Open:
        """Open the file at :attr:`path` as a new generation (the store's current one untouched)."""
        path = self.path
        try:  # stat first: opening a FIFO would block, a device may act on open
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                raise StoreError(f"is a {_file_kind(st.st_mode)}, not a store file (a regular file)", path=path,
                                 problem="not-a-file")
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except StoreError:
            raise
        except OSError as exc:
            raise _os_error(exc, path, "opening the store") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise StoreIsADirectoryError("is a directory, not a store file", path=path,
                                             problem="directory")
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"is a {_file_kind(st.st_mode)}, not a store file (a regular file)", path=path,
                                 problem="not-a-file")
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
                # The length from fstat, not 0 ("the size now"): a file truncated
                # since then maps anyway and open faults under its guard instead.
                try:
                    mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
                except ValueError:  # mmap's own size check: it shrank since fstat
                    raise StoreChangedError("the file changed while it was being opened (it shrank); try again once "
                                            "it is whole", path=path, problem="changed") from None
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
        if mapped is not None:
            slot = lib.knhk_store_watch(out[0])
            if slot < -1:  # pragma: no cover - sigaction failing
                lib.knhk_store_close(out[0])
                ffi.release(cbuf)
                mapped.close()
                raise StoreError(_last_error(), path=path, problem="os-error")
            if slot >= 0:  # forget the range when the mapping itself goes (views may outlive the store)
                weakref.finalize(mapped, _unwatch, slot)
        g = _Open(out[0], cbuf, mapped, buf, size)  # from here on, g frees all three
        if g.compressed:
            import zstandard

            g.zstd, g.local = zstandard, threading.local()
            d = g.info
            if d["dict_length"]:
                g.zdict = zstandard.ZstdCompressionDict(self._copy(g, d["dict_offset"], d["dict_length"]))
            g.dctx()  # the first decompressor prepares the dictionary, here rather than in a reader thread
        return g

    def _attach_gen(self, g: _Open) -> None:
        # The C read paths probe this generation's handle; a compressed store has none
        # (its values need the Python decompression path).
        self._attach(g, 0 if g.compressed else int(ffi.cast(_T_UINTPTR, g.handle)), g.view)

    def close(self) -> None:
        """Release the store. Views already handed out stay valid; later reads raise
        :class:`~knhk_memory.errors.StoreClosedError`. A read still running on another
        thread finishes first: the file is unmapped when the last one is done."""
        self._detach()  # drops the store's reference; the generation goes with the last reader's
        self._forget_generation()

    def reopen(self) -> None:
        """Open the file at :attr:`path` again, picking up an atomic replacement.

        On failure the store keeps its current file. Reads racing the reopen answer
        from the old file or the new one. The decode cache is cleared. A closed
        store is opened again.

        Raises what the constructor raises for the file: StoreNotFoundError,
        StorePermissionError, StoreIsADirectoryError, StoreError (not a regular
        file), a StoreFormatError (StoreEmptyError, StoreTruncatedError,
        StoreMagicError, StoreVersionError, StoreCorruptError), StoreChangedError.
        """
        g = self._open_file()
        self._attach_gen(g)  # the old generation goes with its last reader
        self._forget_generation()

    def _forget_generation(self) -> None:
        """Drop what was read from the previous generation: the decode cache, and
        records' note of the view whose layer manifest it checked (a view keeps
        the old mapping mapped)."""
        self.__dict__.pop("_layer_checked", None)
        self._clear_cache()

    def __enter__(self) -> WorkflowStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True after :meth:`close` (until a :meth:`reopen`): reads raise StoreClosedError."""
        return self._gen is None

    # The open generation's parts, for code that does not race close() (records, tests).
    @property
    def _handle(self) -> Any:
        g = self._gen
        return ffi.NULL if g is None else g.handle

    @property
    def _view(self) -> memoryview:
        g = self._gen
        return _CLOSED_VIEW if g is None else g.view

    @property
    def _map(self) -> mmap.mmap | None:
        g = self._gen
        return None if g is None else g.map

    @property
    def _info(self) -> dict[str, Any]:
        return self._open().info

    @property
    def _compressed(self) -> bool:
        return self._open().compressed  # closed: StoreClosedError, never a guess

    def _open(self) -> _Open:
        """The open generation -- a reference the caller keeps in a local variable for the
        whole read -- or :class:`~knhk_memory.errors.StoreClosedError`."""
        g = self._gen
        if g is None:
            raise StoreClosedError("the store is closed", path=self.path, problem="closed")
        return g

    _check_open = _open

    # -- lookups (the C methods of StoreBase come here for anything unusual)

    def _get_slow(self, key: Any, default: Any = None) -> memoryview | Any:
        """get() for what the C path does not do: a compressed store, a key that is
        neither str nor bytes, a closed store, a changed or damaged file."""
        g = self._open()
        kb = key if key.__class__ is bytes else _key_bytes(key, self.path)
        if g.compressed:
            value = self._bytes(g, kb, _MISSING)
            return default if value is _MISSING else memoryview(value)
        return self._raw(g, kb, default)

    def _raw(self, g: _Open, key: bytes, default: Any) -> memoryview | Any:
        """The stored bytes of ``key`` in generation ``g``, zero-copy."""
        r = self._find(g.handle, key, len(key))
        if r >= 0:
            o = r >> 24
            return g.view[o:o + (r & _PACK_MASK)]
        return self._slow(g, key, r, default)

    def _slow(self, g: _Open, key: bytes, r: int, default: Any) -> Any:
        if r == _ABSENT:
            return default
        if r == _CHANGED:
            raise StoreChangedError(f"reading key {key!r}: {_last_error()}", path=self.path, problem="changed")
        if r == _WIDE:
            span = ffi.new("uint64_t[2]")
            r = lib.knhk_store_find_span(g.handle, key, len(key), span)
            if r >= 0:
                return g.view[span[0]:span[0] + span[1]]
            return self._slow(g, key, r, default)
        raise StoreCorruptError(f"reading key {key!r}: {_last_error()}", path=self.path, problem="corrupt")

    if TYPE_CHECKING:  # the C methods (native/cpython/store_py.c), documented here
        def get(self, key: str | bytes | bytearray | memoryview, default: Any = None) -> memoryview | Any:
            """The value of ``key`` as a read-only memoryview into the file, or ``default``
            (decompressed into memory in a compressed store)."""

        def get_bytes(self, key: str | bytes | bytearray | memoryview, default: Any = None) -> bytes | Any:
            """The value of ``key`` as a ``bytes`` copy; see :meth:`_get_bytes_slow`."""

    def _get_bytes_slow(self, key: Any, default: Any = None) -> bytes | Any:
        """``get_bytes(key, default=None)``: the value of ``key`` -- or of the record an
        alias names (typed records, :mod:`knhk_memory.records`) -- as a ``bytes`` copy
        (what ``json.loads`` and engine decoders accept; decompressed in a compressed
        store), or ``default`` when it is neither a key nor an alias.

        The copy is taken under the SIGBUS guard and the header is re-read
        after it, so it is the value of one version of the file, or
        :class:`~knhk_memory.errors.StoreChangedError`, even while someone
        rewrites the file in place. (A memoryview from :meth:`get` reads the
        live mapping whenever it is read.) An alias naming several records
        raises :class:`~knhk_memory.errors.AmbiguousKeyError`.

        The C method (native/cpython/store_py.c) does the common case -- a key
        of an uncompressed store, a value up to 1 MiB, copied with the GIL held --
        and comes here for everything else.
        """
        g = self._open()
        return self._bytes(g, _key_bytes(key, self.path), default)

    def _bytes(self, g: _Open, kb: bytes, default: Any) -> bytes | Any:
        span = ffi.new("uint64_t[2]")
        r = lib.knhk_store_find_span(g.handle, kb, len(kb), span)
        if r == _ABSENT:
            try:
                kb = records.resolve(self, kb)  # an alias, in a store of typed records
            except AmbiguousKeyError:
                raise
            except StoreKeyError:
                return default
            r = lib.knhk_store_find_span(g.handle, kb, len(kb), span)
        if r < 0:
            if r == _ABSENT:
                return default
            return self._slow(g, kb, r, default)
        raw = self._copy(g, span[0], span[1])
        return self._decompress(g, kb, raw) if g.compressed else raw

    def get_raw(self, key: str | bytes | bytearray | memoryview, default: Any = None) -> memoryview | Any:
        """The stored bytes of ``key`` as a read-only memoryview into the file, zero-copy
        (the zstd frame in a compressed store: nothing is decompressed), or ``default``
        (None unless given) when ``key`` is absent. Aliases are not resolved.

        Raises TypeError for a key of another type, StoreKeyEncodingError for a str
        with no UTF-8 form, StoreClosedError after close(), StoreChangedError once the
        mapped file was rewritten in place, StoreCorruptError for a damaged record."""
        g = self._open()
        return self._raw(g, key if key.__class__ is bytes else _key_bytes(key, self.path), default)

    def _copy(self, g: _Open, offset: int, length: int) -> bytes:
        """bytes of generation ``g``'s file at [offset, offset + length), copied under the SIGBUS guard."""
        out = bytearray(length)
        r = lib.knhk_store_copy(g.handle, offset, length, ffi.from_buffer("uint8_t[]", out))
        if r != lib.KNHK_OK:
            self._raise(r, "reading")
        return bytes(out)

    def _raise(self, code: int, doing: str) -> None:
        if code == _CHANGED:
            raise StoreChangedError(f"{doing}: {_last_error()}", path=self.path, problem="changed")
        raise StoreCorruptError(f"{doing}: {_last_error()}", path=self.path, problem="corrupt")

    def _decompress(self, g: _Open, key: bytes, frame: bytes) -> bytes:
        """The value of ``key`` from its zstd ``frame``, checked against the cap before a
        byte is allocated: the frame header records the value's size (the writer
        stores it, ``write_content_size``), and zstd checks the output against it; a
        frame without a recorded size is decompressed to at most the cap."""
        cap = self.max_value_bytes
        try:
            size = g.zstd.frame_content_size(frame)
        except Exception:  # not even a frame header: the decompressor below says so
            size = -1
        if size > cap:
            raise StoreCorruptError(f"the value of key {_stored_key_text(key)} would decompress to {size:,} "
                                    f"bytes, past the cap of {cap:,} (max_value_bytes, [store] max_value_bytes); a "
                                    "store that holds such a value needs a larger cap", path=self.path,
                                    problem="too-large")
        try:
            if size < 0:  # no recorded size: stream it, never reading past the cap
                with g.dctx().stream_reader(frame) as reader:
                    data = reader.read(cap + 1)
                if len(data) > cap:
                    raise StoreCorruptError(f"the value of key {_stored_key_text(key)} decompresses to more than "
                                            f"the cap of {cap:,} bytes (max_value_bytes, [store] max_value_bytes)",
                                            path=self.path, problem="too-large")
                return data
            return g.dctx().decompress(frame)
        except StoreCorruptError:
            raise
        except Exception as exc:  # zstandard.ZstdError, and anything else the codec raises
            raise StoreCorruptError(f"the value of key {_stored_key_text(key)} is not a valid zstd frame "
                                    f"({type(exc).__name__}: {exc}); the header says values are compressed",
                                    path=self.path, problem="corrupt") from None

    def _getitem_slow(self, key: Any) -> memoryview:
        value = self._get_slow(key, _MISSING)
        if value is _MISSING:
            raise self._absent(key)
        return value

    def _absent(self, key: Any) -> StoreKeyError:
        """The error for a key that is not in the store, the key quoted as the caller gave it."""
        return StoreKeyError(f"key {_shown_key(key)} is not in the store ({len(self)} keys)", path=self.path,
                             problem="missing-key")

    def _contains_slow(self, key: object) -> bool:
        # The same rule, in the same order, as get and []: closed first, then an unsupported key
        # type is a TypeError (not False), a str with no UTF-8 form a StoreKeyEncodingError.
        g = self._open()
        kb = key if key.__class__ is bytes else _key_bytes(key, self.path)
        # The raw frame is enough to know in a compressed store: no decompression.
        return self._raw(g, kb, _MISSING) is not _MISSING

    def get_decoded(self, key: str | bytes | bytearray | memoryview,
                    decoder: Callable[[bytes], Any] = json.loads) -> Any:
        """``decoder(value)``: the value of ``key`` as ``bytes``, decoded, cached in a bounded
        LRU keyed by (key, decoder) (``cache_size`` entries; a hit hands out the same
        object again, so treat it as read-only). The default decoder is ``json.loads``.

        :param key: a str (its UTF-8 bytes) or bytes-like key.
        :param decoder: any callable taking the value's ``bytes``.
        :raises TypeError: ``decoder`` is not callable (checked before anything is read), or
            ``key`` is not an accepted type.
        :raises StoreKeyEncodingError: ``key`` is a str with no UTF-8 form.
        :raises StoreKeyError: ``key`` is not in the store.
        :raises StoreDecodeError: ``decoder`` raised; ``__cause__`` is its exception.
        :raises StoreClosedError: the store is closed.
        """
        if not callable(decoder):
            raise TypeError(f"get_decoded: decoder must be a callable taking the value's bytes (e.g. json.loads), "
                            f"got {type(decoder).__name__} {decoder!r}")
        self._open()
        kb = _key_bytes(key, self.path)
        ck = (kb, decoder)
        hit = self._cached(ck)
        if hit is not _MISSING:
            return hit
        value = self.get(kb, _MISSING)
        if value is _MISSING:
            raise self._absent(key)
        raw = bytes(value)
        try:
            obj = decoder(raw)
        except Exception as exc:
            name = getattr(decoder, "__qualname__", type(decoder).__name__)
            raise StoreDecodeError(f"the value of key {_shown_key(key)} ({len(raw)} bytes) cannot be decoded by "
                                   f"{name}: {type(exc).__name__}: {exc}", path=self.path, problem="decode") from exc
        return self._remember(ck, obj)

    def _cached(self, ck: Any) -> Any:
        """The LRU's entry for ``ck`` (made most recent), or _MISSING."""
        if not self.cache_size:
            return _MISSING
        with self._cache_lock:
            hit = self._cache.get(ck, _MISSING)
            if hit is not _MISSING:
                self._cache.move_to_end(ck)
            return hit

    def _remember(self, ck: Any, obj: Any) -> Any:
        """Put ``obj`` in the LRU under ``ck`` (oldest entries out past cache_size); returns obj."""
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

    # -- typed records (knhk_memory.records: codecs, metadata, aliases)

    def resolve(self, name: str | bytes) -> bytes:
        """The key of the record ``name`` names: ``name`` itself if it is a key,
        else the one record the alias ``name`` names. Raises
        :class:`~knhk_memory.errors.StoreKeyError` (nearest names in the message)
        or :class:`~knhk_memory.errors.AmbiguousKeyError` (every record listed)."""
        return records.resolve(self, name)

    def meta(self, name: str | bytes) -> Any:
        """The :class:`~knhk_memory.records.RecordMeta` (a dict) of a key or alias:
        ``codec``, ``content_type``, ``producer``, ``meta``; ``{"codec": "raw"}`` for a
        record written without metadata.

        Raises as :meth:`resolve` (StoreKeyError with the nearest names,
        AmbiguousKeyError), TypeError / StoreKeyEncodingError for a bad key,
        StoreCorruptError for metadata that is not a JSON object with a codec,
        StoreClosedError after close()."""
        return records.meta_of(self, records.resolve(self, name))

    def aliases(self) -> dict[str, list[str]]:
        """``{alias: [key, ...]}`` for every alias in the store (reads every record)."""
        return records.aliases_of(self)

    def get_object(self, name: str | bytes) -> Any:
        """The decoded object of a key or alias, by the codec in its metadata
        (``raw`` -> bytes, ``json``, ``pickle5``), cached in the bounded LRU of
        :meth:`get_decoded` (``cache_size`` entries; the same object is handed
        out again, so treat it as read-only).

        Raises as :meth:`resolve`; :class:`~knhk_memory.errors.UntrustedPickleError`
        for a pickled record when the store was not opened with
        ``trust_pickle=True``; :class:`~knhk_memory.errors.StoreCorruptError`
        for a value its codec cannot decode; :class:`~knhk_memory.errors.StoreClosedError`
        once the store is closed (cached objects included).
        """
        self._open()
        ck = (_key_bytes(name, self.path), records.get_object)
        hit = self._cached(ck)
        if hit is not _MISSING:
            return hit
        obj = records.get_object(self, name, trust_pickle=self.trust_pickle)
        return self._remember(ck, obj)

    # -- whole-store operations

    def changed(self) -> bool:
        """True when the file under this (mapped) reader no longer reads as it did
        at open: rewritten in place or truncated. Cheap: one guarded 8-byte read.
        Always False for a file read into memory (below ``mmap_threshold``). Raises
        StoreClosedError after close()."""
        g = self._open()
        return lib.knhk_store_check_changed(g.handle) != lib.KNHK_OK

    def __len__(self) -> int:
        """The number of keys in the file: a key replaced under ``last_wins`` counts
        once, and the record layer's metadata and alias records (``\\0knhk/...``)
        are keys too. Raises StoreClosedError after close()."""
        return self._open().info["count"]

    def _record_offsets(self, g: _Open) -> list[int]:
        """The offset of every live record of ``g``, in insertion order (no numpy: this
        runs on reader threads, where a first import could be caught by a fork)."""
        n = g.info["count"]
        offsets = ffi.new(_T_U64_ARRAY, max(n, 1))
        got = lib.knhk_store_live_offsets(g.handle, offsets, n)
        if got == _CHANGED:
            self._raise(got, "listing keys")
        if got < 0 or got != n:
            raise StoreCorruptError(f"listing keys: {_last_error() if got < 0 else f'{got} keys, header says {n}'}",
                                    path=self.path, problem="corrupt")
        return sorted(ffi.unpack(offsets, n))  # insertion order

    def _spans(self, g: _Open) -> Iterator[tuple[int, int, int, int]]:
        """(key offset, key length, value offset, value length) of every record of ``g``.
        The generator holds ``g``: a close meanwhile makes the next step raise
        StoreClosedError; after a reopen it goes on listing the file it began on."""
        spans = ffi.new("uint64_t[4]")
        for off in self._record_offsets(g):
            if self._gen is None:  # closed meanwhile: stop here (a reopen: go on listing the file begun)
                self._open()
            r = lib.knhk_store_record_at(g.handle, off, spans)
            if r != lib.KNHK_OK:
                self._raise(r, f"reading the record at offset {off}")
            yield spans[0], spans[1], spans[2], spans[3]

    def keys(self) -> Iterator[bytes]:
        """Every key, as bytes, in the order they were added (copied under the
        SIGBUS guard: a file truncated meanwhile raises StoreChangedError). Also
        ``iter(store)``. The record layer's own keys (``\\0knhk/...``) are keys too.
        Raises StoreClosedError when the store is closed (before, or at the next
        step after a close); StoreCorruptError for a damaged record."""
        g = self._open()
        return self._keys(g)

    def _keys(self, g: _Open) -> Iterator[bytes]:
        for k, kl, _, _ in self._spans(g):
            yield self._copy(g, k, kl)

    __iter__ = keys

    def items(self) -> Iterator[tuple[bytes, memoryview]]:
        """(key, value) pairs in the order they were added; values as :meth:`get` returns them.

        A close while iterating ends the iteration at the next step with
        :class:`~knhk_memory.errors.StoreClosedError`; an iteration begun before a
        reopen lists the file it began on."""
        g = self._open()
        return self._items(g)

    def _items(self, g: _Open) -> Iterator[tuple[bytes, memoryview]]:
        view = g.view
        for k, kl, v, vl in self._spans(g):
            key = self._copy(g, k, kl)
            if g.compressed:
                yield key, memoryview(self._decompress(g, key, self._copy(g, v, vl)))
            else:
                yield key, view[v:v + vl]

    def verify(self) -> int:
        """Check every checksum and every index entry; return the number of records checked.

        Raises :class:`~knhk_memory.errors.StoreCorruptError` naming the first fault,
        :class:`~knhk_memory.errors.StoreClosedError` when the store is closed
        (before or while it runs).
        """
        g = self._open()
        checked = ffi.new("uint64_t *")
        r = lib.knhk_store_verify(g.handle, checked)
        if r != lib.KNHK_OK:
            self._raise(r, "verify")
        if g.compressed:  # the header's compression flag: every value must be a frame
            for k, kl, v, vl in self._spans(g):
                key = self._copy(g, k, kl)
                try:
                    g.dctx().decompress(self._copy(g, v, vl))
                except Exception as exc:
                    raise StoreCorruptError(f"verify: the header says values are zstd frames, but the value of key "
                                            f"{_stored_key_text(key)} is not one ({type(exc).__name__}: {exc})",
                                            path=self.path, problem="corrupt") from None
        r = lib.knhk_store_check_changed(g.handle)
        if r != lib.KNHK_OK:
            self._raise(r, "verify")
        return int(checked[0])

    def prefetch(self) -> None:
        """Ask the kernel to read the whole file ahead (``MADV_WILLNEED``); returns at
        once (the kernel reads in the background). Nothing to do for a file read into
        memory or a kernel without the advice. Raises StoreClosedError after close()."""
        g = self._open()
        if g.map is not None:
            try:
                _advise(g.map, "MADV_WILLNEED")
            except ValueError:  # pragma: no cover - unmapped by a close racing this call
                pass

    def stats(self, *, deep: bool = False) -> dict[str, Any]:
        """Figures about the file, as a dict:

        ``path`` (str), ``file_size`` (bytes), ``format_version``, ``access``
        (``"mmap"`` or ``"read"``: read into memory), ``compression`` (``"none"``,
        ``"zstd"``, ``"zstd+dict"``), ``keys``, ``records`` (all records written,
        superseded ones included), ``superseded_records``, ``index_slots``,
        ``load_factor`` (keys per slot), ``max_displacement`` (the longest probe, in
        slots), ``index_bytes``, ``records_bytes``, ``dictionary_bytes`` (bytes).
        ``deep=True`` reads every record and adds ``key_bytes`` and ``value_bytes``
        (bytes, as stored: compressed in a compressed store) and ``overhead``
        (file bytes per key-and-value byte, less 1; None for an empty store).

        Raises StoreClosedError after close(); with ``deep``, StoreChangedError /
        StoreCorruptError as :meth:`keys`."""
        g = self._open()
        d = g.info
        out: dict[str, Any] = {
            "path": str(self.path),
            "file_size": g.size,
            "format_version": d["version"],
            "access": "mmap" if g.map is not None else "read",
            "compression": ("zstd+dict" if d["dict_length"] else "zstd") if g.compressed else "none",
            "keys": d["count"],
            "records": d["records_total"],
            "superseded_records": d["records_total"] - d["count"],
            "index_slots": d["slots"],
            "load_factor": round(d["count"] / d["slots"], 4) if d["slots"] else 0.0,
            "max_displacement": d["max_disp"],
            "index_bytes": g.size - d["index_offset"],
            "records_bytes": d["records_end"] - d["records_offset"],
            "dictionary_bytes": d["dict_length"],
        }
        if deep:
            kb = vb = 0
            for _, kl, _, vl in self._spans(g):
                kb += kl
                vb += vl
            out["key_bytes"] = kb
            out["value_bytes"] = vb
            out["overhead"] = round(g.size / (kb + vb) - 1, 4) if kb + vb else None
        return out

    def __repr__(self) -> str:
        g = self._gen
        state = "closed" if g is None else f"{g.info['count']} keys, {g.size} bytes"
        return f"WorkflowStore({str(self.path)!r}, {state})"


# The C get and get_bytes hand keyword and wrong-arity calls to these: a TypeError
# about the call names the public method.
WorkflowStore._get_slow.__qualname__ = "WorkflowStore.get"
WorkflowStore._get_bytes_slow.__qualname__ = "WorkflowStore.get_bytes"


def _unwatch(slot: int) -> None:
    lib.knhk_store_unwatch(slot)

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
    :param last_wins: True or False; default False.
    :param compress: zstd level to compress values with, an int from 1 to 22
        (not a bool), or None (the default): no compression.
    :param zstd_dict: A zstd dictionary (bytes-like raw bytes, e.g. from
        ``zstandard.train_dictionary(...).as_bytes()``) stored in the file and
        used for every value; only with ``compress``.
    :param load_factor: Keys per index slot, a float in (0, 0.95]; default 0.875.
    :param hash_key: The 64-bit k0 of the index's SipHash-1-3 key hash, an int
        from 0 to 2**64 - 1; by default (None) drawn from ``os.urandom`` for every
        build, so nobody outside can choose keys that pile up in one slot (hash
        flooding). Give a fixed value only for byte-identical rebuilds of trusted keys.
    :param seed: The checksum seed (and the key hash's k1), an int from 0 to
        2**64 - 1; default :data:`DEFAULT_SEED` (``b"knhkwfs1"`` as a little-endian
        u64). Written in the header, so readers need not know it.
    :raises TypeError: an argument of the wrong type; the message names the
        parameter, the value and what is accepted.
    :raises ValueError: an argument out of range, an empty ``path``, or
        ``zstd_dict`` without ``compress``.
    :raises StoreNotFoundError: the directory of ``path`` does not exist (named).
    :raises StoreIsADirectoryError: ``path`` is a directory.
    :raises StoreError: ``path`` exists and is not a regular file, or its parent
        is not a directory.
    :raises StorePermissionError: the directory is not writable.

    The file is created with mode ``0666 & ~umask``, or with the mode of the
    file it replaces. Temporaries are named ``.NAME.PID.XXXX.tmp``; the next
    writer of the same path removes those whose process is gone.

    Used as a context manager it commits on success and discards on error.
    Running out of disk space raises
    :class:`~knhk_memory.errors.StoreDiskFullError` naming the file, the bytes
    it needed and the bytes free, and removes the temporary file.
    """

    def __init__(self, path: str | os.PathLike[str], *, last_wins: bool = False, compress: int | None = None,
                 zstd_dict: bytes | None = None, load_factor: float = 0.875,
                 seed: int = DEFAULT_SEED, hash_key: int | None = None) -> None:
        import numpy as np

        who = "WorkflowStoreWriter"
        self.path = _path_arg(who, path)
        self.last_wins = _bool_arg(who, "last_wins", last_wins)
        if compress is not None:
            compress = _int_arg(who, "compress", compress, 1, 22, "a zstd level; or None: no compression")
        if zstd_dict is not None:
            if not isinstance(zstd_dict, (bytes, bytearray, memoryview)):
                raise TypeError(f"{who}: zstd_dict must be bytes-like (bytes, bytearray, memoryview: a zstd "
                                f"dictionary's raw bytes) or None, got {type(zstd_dict).__name__} {zstd_dict!r}")
            if compress is None:
                raise ValueError(f"{who}: zstd_dict needs compress=<level> (a zstd level from 1 to 22); got "
                                 "compress=None")
        accepted = "a float in (0, 0.95]: keys per index slot"
        if isinstance(load_factor, bool) or not isinstance(load_factor, (int, float)):
            raise TypeError(f"{who}: load_factor must be {accepted}, got {type(load_factor).__name__} "
                            f"{load_factor!r}")
        if not 0 < load_factor <= 0.95:  # NaN fails this too
            raise ValueError(f"{who}: load_factor must be {accepted}, got {load_factor!r}")
        self.load_factor = float(load_factor)
        self.seed = _int_arg(who, "seed", seed, 0, U64_MAX, "a 64-bit checksum seed")
        self._fixed_key = hash_key is not None
        self.hash_key = (_int_arg(who, "hash_key", hash_key, 0, U64_MAX, "the 64-bit SipHash key k0; or None: "
                                  "random per build") if hash_key is not None else _random_key())
        self.reseeds = 0
        self._cctx: Any = None
        self._zstd_dict = bytes(zstd_dict) if zstd_dict is not None else b""
        if compress is not None:
            import zstandard

            params: dict[str, Any] = {"level": compress, "write_content_size": True, "write_checksum": False}
            if zstd_dict is not None:
                params["dict_data"] = zstandard.ZstdCompressionDict(self._zstd_dict)
            self._cctx = zstandard.ZstdCompressor(**params)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except NotADirectoryError:
            raise _not_a_directory(self.path) from None
        except OSError as exc:
            raise _os_error(exc, self.path, "checking the output path") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise StoreIsADirectoryError("is a directory; give a file path for the store", path=self.path,
                                         problem="directory")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise StoreError(f"exists and is a {_file_kind(st.st_mode)}, not a regular file; give a file path "
                             "for the store", path=self.path, problem="not-a-file")
        directory = self.path.parent if str(self.path.parent) else Path(".")
        _remove_stale_temporaries(directory, self.path.name)
        try:
            fd, tmp = _create_temporary(directory, f".{self.path.name}.{os.getpid()}.")
        except FileNotFoundError:
            raise StoreNotFoundError(f"the directory {str(directory)!r} does not exist, so the store cannot be "
                                     "written there; create the directory first", path=self.path,
                                     problem="missing-directory") from None
        except NotADirectoryError:
            raise _not_a_directory(self.path) from None
        except OSError as exc:
            raise _os_error(exc, directory, "creating a temporary file for the store") from None
        # The temporary is made 0600; a store gets the mode of the file it
        # replaces, else what open() would give: 0666 less the umask.
        try:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask())
        except OSError:
            pass
        self._tmp = Path(tmp)
        self._file: Any = os.fdopen(fd, "wb", buffering=1 << 20)
        self._file.write(bytes(HEADER_SIZE))
        self._pos = HEADER_SIZE
        self._index: dict[bytes, int] = {}   # key -> slot in _offsets (keys are hashed at commit)
        self._offsets = np.zeros(1024, dtype=np.uint64)
        self._records = 0
        # Records wait in batches and are encoded by one C call per batch.
        self._pk: list[bytes] = []
        self._pv: list[bytes] = []
        self._pslot: list[int] = []
        self._pbytes = 0
        self._buf = bytearray(1 << 16)
        self._cbuf = ffi.from_buffer("uint8_t[]", self._buf)
        self._layer: Any = None  # knhk_memory.records.LayerWriter once a record has metadata

    def __len__(self) -> int:
        return len(self._index)

    def add(self, key: str | bytes, value: Any, *, codec: str | None = None, content_type: str | None = None,
            meta: Any = None, aliases: Any = None, producer: str | None = None) -> None:
        """Add one record. ``key``: str (stored as its UTF-8 bytes) or bytes-like;
        ``value``: bytes-like (bytes, bytearray, memoryview), copied; compressed when
        the writer compresses.

        With any keyword, the record gets metadata (knhk_memory.records):
        ``codec`` (``"raw"``, ``"json"`` or ``"pickle5"``: ``value`` is encoded
        with it; default raw), ``content_type``, ``producer`` (e.g.
        ``"SpiffWorkflow 3.2.0"``), ``meta`` (a JSON-serialisable mapping) and
        ``aliases`` (other names of this record; see
        :meth:`WorkflowStore.resolve` for the rule when one names several).

        :raises DuplicateKeyError: ``key`` was added before and ``last_wins`` is False.
        :raises TypeError: a key or value of another type (a value needs ``codec=``
            to be encoded from an object).
        :raises StoreKeyEncodingError: a str key with no UTF-8 form (a lone surrogate).
        :raises ValueError: an unknown ``codec`` or bad metadata (knhk_memory.records).
        :raises StoreClosedError: the writer was committed or discarded.
        :raises StoreDiskFullError: the disk filled while a batch was written (the
            temporary file is removed; the writer is discarded).
        """
        if codec is not None or content_type is not None or meta is not None or aliases or producer is not None:
            self._add_with_meta(key, value, codec, content_type, meta, aliases, producer)
            return
        if self._file is None:
            raise StoreClosedError("the writer is committed or discarded", path=self.path, problem="closed")
        if key.__class__ is not bytes:
            key = _key_bytes(key, self.path)
        if value.__class__ is not bytes:
            if not isinstance(value, (bytearray, memoryview)):
                raise TypeError(f"a store value must be bytes-like (bytes, bytearray, memoryview; or give codec= "
                                f"to encode an object), got {type(value).__name__} for key {key!r}")
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

    def _add_with_meta(self, key: Any, value: Any, codec: str | None, content_type: str | None, meta: Any,
                       aliases: Any, producer: str | None) -> None:
        if self._file is None:
            raise StoreClosedError("the writer is committed or discarded", path=self.path, problem="closed")
        if self._layer is None:
            self._layer = records.LayerWriter()
        key = _key_bytes(key, self.path)
        value, note = self._layer.prepare(self, key, value, codec, content_type, meta, aliases, producer)
        WorkflowStoreWriter.add(self, key, value)
        note()

    def _add_plain(self, key: bytes, value: bytes) -> None:
        """Add a record without metadata (the record layer's own records)."""
        WorkflowStoreWriter.add(self, key, value)

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
        offsets = np.empty(n, dtype=np.uint64)
        u64 = "uint64_t[]"
        written = lib.knhk_store_encode_batch(
            ffi.from_buffer("uint8_t[]", kb), len(kb), ffi.from_buffer(u64, kl),
            ffi.from_buffer("uint8_t[]", vb), len(vb), ffi.from_buffer(u64, vl), n, self.seed, self._pos,
            self._cbuf, len(self._buf), ffi.NULL, ffi.from_buffer(u64, offsets))
        if written == 0:
            raise StoreError(f"encoding records: {_last_error()}", path=self.path, problem="build")
        self._write(memoryview(self._buf)[:written])
        self._pos += written
        self._records += n
        top = len(self._index)
        if top > len(self._offsets):
            size = max(top, 2 * len(self._offsets))
            self._offsets = np.resize(self._offsets, size)
        if self.last_wins:  # repeated slots: the later record must win, in order
            for i, slot in enumerate(slots):
                self._offsets[slot] = offsets[i]
        else:  # without repeats, the batch holds slots top - n .. top - 1 in order
            self._offsets[top - n:top] = offsets
        self._pk, self._pv, self._pslot, self._pbytes = [], [], [], 0

    def _write(self, data: Any) -> None:
        """Write to the temporary file; a full disk discards it and raises
        StoreDiskFullError, any other OSError a StoreError naming the file."""
        try:
            self._file.write(data)
        except OSError as exc:
            need = len(data)
            self.discard()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                free = _free_bytes(self.path)
                raise StoreDiskFullError(
                    f"no space left on the device while writing the store (at byte {self._pos:,} of the temporary "
                    f"file; this write needed {need:,} bytes more, the file system has {free:,} bytes free for "
                    "this user); the temporary file was removed", path=self.path, problem="disk-full") from None
            raise _os_error(exc, self.path, "writing the store") from None

    def update(self, pairs: Any) -> None:
        """Add every (key, value) of a mapping or an iterable of pairs, in order, as
        :meth:`add` without keywords; raises as :meth:`add`. Records added before a
        failing one stay added."""
        items = pairs.items() if hasattr(pairs, "items") else pairs
        for k, v in items:
            self.add(k, v)

    def commit(self) -> Path:
        """Write the index and header, then make the file appear atomically at :attr:`path`
        (flush, fsync, rename over ``path``, fsync of the directory). Returns the path.

        :raises StoreClosedError: already committed or discarded.
        :raises StoreDiskFullError: the disk filled (the bytes needed and free named).
        :raises StoreError: the index's longest probe stayed above the bound after 8
            random hash keys, or once with a caller's fixed ``hash_key``; or an OS error
            writing or renaming (named).

        On any failure the temporary file is removed and ``path`` is untouched."""
        import numpy as np

        if self._file is None:
            raise StoreClosedError("the writer is already committed or discarded", path=self.path,
                                   problem="closed")
        f = self._file
        total = None  # the file's final size, once known (a full disk names what was missing)
        try:
            if self._layer is not None:
                layer, self._layer = self._layer, None
                layer.write(self)
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
            offsets = np.ascontiguousarray(self._offsets[:n])
            keys = list(self._index)  # slot order: key i is slot i
            kb = b"".join(keys)
            kl = np.fromiter(map(len, keys), dtype=np.uint64, count=n)
            hashes = np.zeros(max(n, 1), dtype=np.uint64)
            nblocks = -(-slots // BLOCK_ENTRIES)
            bound = max_displacement_bound(slots)
            max_disp = ffi.new("uint64_t *")
            while True:
                if n and lib.knhk_store_key_hashes(ffi.from_buffer("uint8_t[]", kb), len(kb),
                                                   ffi.from_buffer("uint64_t[]", kl), n, self.hash_key, self.seed,
                                                   ffi.from_buffer("uint64_t[]", hashes)) != lib.KNHK_OK:
                    raise StoreError(f"hashing the keys: {_last_error()}", path=self.path, problem="build")
                table = np.zeros(slots, dtype=np.uint64)
                blocksums = np.zeros(nblocks, dtype=np.uint64)
                status = lib.knhk_store_build_index(
                    ffi.from_buffer("uint64_t[]", hashes) if n else ffi.NULL,
                    ffi.from_buffer("uint64_t[]", offsets) if n else ffi.NULL,
                    n, slots, ffi.from_buffer("uint64_t[]", table), ffi.from_buffer("uint64_t[]", blocksums),
                    max_disp)
                check_as(status, lambda d: StoreError(f"building the index: {d}", path=self.path, problem="build"))
                if max_disp[0] <= bound:
                    break
                if self._fixed_key or self.reseeds >= RESEEDS:
                    raise StoreError(f"the index's longest probe is {max_disp[0]} slots, above the bound of {bound} "
                                     f"for {slots} slots, after {self.reseeds + 1} hash key(s)"
                                     + ("; the hash_key was fixed by the caller" if self._fixed_key else ""),
                                     path=self.path, problem="build")
                self.reseeds += 1
                self.hash_key = _random_key()
            table_bytes = table.tobytes()
            sums_bytes = blocksums.tobytes()
            self._write(table_bytes)
            self._write(sums_bytes)
            file_size = total = index_offset + len(table_bytes) + len(sums_bytes)
            flags = lib.KNHK_STORE_FLAG_ZSTD if self._cctx is not None else 0
            dict_sum = lib.knhk_store_hash(self._zstd_dict, len(self._zstd_dict), self.seed) if self._zstd_dict else 0
            index_sum = lib.knhk_store_hash(sums_bytes, len(sums_bytes), self.seed)
            head = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, n, self._records, slots, max_disp[0], self.hash_key,
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
        except StoreError:
            self.discard()
            raise
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            written = _size_or_none(self._tmp) if full else None
            self.discard()
            if full:
                # Buffered writes fail at the flush or fsync: say how much of the file the disk took.
                size = total if total is not None else max(self._pos, written or 0)
                short = written is not None and written < size
                got = f"the temporary file held {written:,} of its {size:,} bytes" if short else \
                    f"the file needs {size:,} bytes"
                missing = f"; {size - written:,} bytes more were needed" if short and written is not None else ""
                raise StoreDiskFullError(
                    f"no space left on the device while committing the store ({got}{missing}, the file system "
                    f"has {_free_bytes(self.path):,} bytes free for this user); the temporary file was removed",
                    path=self.path, problem="disk-full") from None
            raise _os_error(exc, self.path, "writing the store") from None
        except BaseException:
            self.discard()
            raise
        _fsync_dir(self.path.parent if str(self.path.parent) else Path("."))
        self._index.clear()
        return self.path

    def discard(self) -> None:
        """Drop everything added; the temporary file is removed and ``path`` is untouched.
        Also spelled :meth:`abort` (the same method). Safe to call again, or after
        :meth:`commit` (then it does nothing to ``path``)."""
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

    abort = discard  # the same method, under the name other writers use

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


def _not_a_directory(path: Path) -> StoreError:
    return StoreError(f"{str(path.parent)!r} (or a directory above it) is not a directory, so the store cannot "
                      "be written there; give a path inside a directory", path=path, problem="not-a-directory")


def _create_temporary(directory: Path, prefix: str) -> tuple[int, str]:
    """Create ``directory/PREFIX<12 random hex digits>.tmp``, new and only ours (``O_EXCL``,
    mode 0600, no symlink followed): what ``tempfile.mkstemp`` does, without importing
    tempfile (and shutil, random, bz2, lzma with it) into every reader's ``import``."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        name = os.path.join(directory, f"{prefix}{os.urandom(6).hex()}.tmp")
        try:
            return os.open(name, flags, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name after 100 tries", str(directory))


def _random_key() -> int:
    return int.from_bytes(os.urandom(8), "little")


def _size_or_none(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path.parent if str(path.parent) else ".")
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _umask() -> int:
    """The process umask, read without changing it where Linux says it
    (``/proc/self/status``, kernel 4.7+); else set and restored at once."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# A writer's temporary; compiled by the first writer (re's cache), not by every reader's import.
_TEMP_PATTERN = r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmp"


def _remove_stale_temporaries(directory: Path, name: str) -> list[Path]:
    """Remove ``.NAME.PID.XXXX.tmp`` files in ``directory`` whose writer
    process (PID) no longer exists: what a build killed by SIGKILL or a
    power cut leaves. Returns the files removed. A temporary whose PID is
    alive (another build, or a reused PID) is left alone."""
    removed: list[Path] = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    pattern = re.compile(_TEMP_PATTERN)
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m is None or m["name"] != name:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            os.unlink(directory / entry)
            removed.append(directory / entry)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process: alive
    return True


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return kind
    return "special file"


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


def iter_source(source: Path, *, key_regex: str | None = None, key_field: str | None = None,
                exclude: tuple[Path, ...] = ()) -> Iterator[tuple[str, Path]]:
    """(key, file) for every regular file under ``source``, sorted, hidden entries skipped.

    The key is the path relative to ``source`` without its extension (``/``
    separated), or taken from the file: ``key_regex``'s first group, or the
    top-level ``key_field`` of a JSON document. Files that are the same file
    as one in ``exclude`` (the build's own output) are skipped.

    Raises :class:`~knhk_memory.errors.StoreError` for a file name or a key
    that is not UTF-8 text, naming the file.
    """
    pattern = re.compile(key_regex.encode("utf-8", "surrogateescape")) if key_regex else None
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(source, onerror=_walk_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / name for name in filenames if not name.startswith("."))
    skip = set()
    for e in exclude:
        try:
            st = e.stat()
            skip.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    for p in sorted(found, key=lambda q: os.fsencode(q.relative_to(source).as_posix())):
        try:
            st = p.stat()
        except OSError:
            continue  # a dangling symlink, or a file removed since the walk
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in skip:
            continue
        if pattern is None and key_field is None:
            rel = p.relative_to(source)
            key = rel.with_suffix("").as_posix() if rel.suffix else rel.as_posix()
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                raise StoreError(f"the file name is not UTF-8 text ({os.fsencode(rel.as_posix())!r}), so it "
                                 "cannot be a key; rename the file, or take keys from the contents with "
                                 "--key-regex / --key-field", path=_shown(p), problem="bad-key") from None
            yield key, p
        else:
            yield _key_from_file(p, pattern, key_field), p


def _shown(p: Path) -> str:
    """A path for a message: undecodable bytes as escapes, never a UnicodeEncodeError."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def _walk_error(exc: OSError) -> None:
    raise _os_error(exc, Path(exc.filename) if exc.filename else Path("?"), "listing the source directory")


def _key_from_file(p: Path, pattern: re.Pattern[bytes] | None, key_field: str | None) -> str:
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise _os_error(exc, Path(_shown(p)), "reading a source file") from None
    if pattern is not None:
        m = pattern.search(data)
        if m is None or not m.groups() or m.group(1) is None:
            raise StoreError(f"--key-regex {pattern.pattern.decode('utf-8', 'backslashreplace')!r} found no "
                             "key (with a group) in the file", path=_shown(p), problem="no-key")
        try:
            return m.group(1).decode("utf-8")
        except UnicodeDecodeError:
            raise StoreError(f"--key-regex matched {m.group(1)!r}, which is not UTF-8 text",
                             path=_shown(p), problem="bad-key") from None
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise StoreError(f"--key-field needs a JSON file: {exc}", path=_shown(p), problem="no-key") from None
    if not isinstance(doc, dict) or key_field not in doc:
        raise StoreError(f"JSON document has no top-level field {key_field!r}", path=_shown(p), problem="no-key")
    return str(doc[key_field])


def build_from_directory(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
                         key_template: str | None = None, key_regex: str | None = None,
                         key_field: str | None = None, last_wins: bool = False, compress: int | None = None,
                         progress: bool | None = None, allow_empty: bool = False) -> dict[str, Any]:
    """Build ``output`` from the files under ``source``; returns a summary
    (``keys``, ``files``, ``value_bytes``, ``output``, ``file_size`` in bytes,
    and ``replaced``: ``(key, earlier file, later file)`` for every key a later
    file replaced under ``last_wins``).

    A file's key is ``key_template`` filled in (e.g. ``"{dir}/{stem}"`` or
    ``"{relpath}#{id}"``; fields: :func:`knhk_memory.records.template_fields`),
    else the ``key_regex`` / ``key_field`` id, else its path under ``source``
    without the extension.

    The output is never one of the inputs: an ``output`` that is a file under
    ``source`` is refused, and an output (or its temporary file) kept inside
    ``source`` is left out of the build, so rebuilding does not pack the
    previous store. Raises :class:`~knhk_memory.errors.StoreError` (and
    subclasses) for a missing or empty source (unless ``allow_empty``), an
    output that is an input, a name or key that is not text, and
    :class:`~knhk_memory.errors.DuplicateKeyError` naming both files of a
    repeated key unless ``last_wins``.
    """
    src = Path(source)
    out = Path(output)
    try:
        is_dir = src.is_dir()
        exists = is_dir or os.path.lexists(src)
    except OSError as exc:
        raise _os_error(exc, src, "reading the source directory") from None
    if not exists:
        raise StoreNotFoundError("source directory does not exist", path=src, problem="missing")
    if not is_dir:
        raise StoreError("source must be a directory of workflow definition files", path=src,
                         problem="not-a-directory")
    if key_template is not None:
        records.check_template(key_template, have_id=bool(key_regex or key_field))
    files = list(iter_source(src, key_regex=key_regex, key_field=key_field, exclude=(out,)))
    if key_template is not None:
        with_id = bool(key_regex or key_field)
        files = [(key_template.format_map(records.template_fields(p, src, key if with_id else None)), p)
                 for key, p in files]
    try:
        out_st = out.stat()
        out_inside = out.resolve().is_relative_to(src.resolve())
    except OSError:
        out_st, out_inside = None, False
    # An existing output under SOURCE was left out of the listing; if it is not
    # a store (an earlier build's output) it is one of the user's inputs.
    if out_st is not None and out_inside and stat.S_ISREG(out_st.st_mode) and not _is_store_file(out):
        raise StoreError(f"the output is a file under SOURCE ({src}): the build would replace that input "
                         "with the store; write the store outside SOURCE", path=out, problem="output-is-input")
    if not files and not allow_empty:
        raise StoreError("source directory holds no definition files (hidden files are skipped); pass "
                         "--allow-empty (allow_empty=True) to build an empty store", path=src, problem="empty-source")
    seen: dict[str, Path] = {}
    replaced: list[tuple[str, str, str]] = []
    for key, p in files:
        first = seen.get(key)
        if first is not None:
            if not last_wins:
                raise DuplicateKeyError(f"key {key!r} comes from two files: {_shown(first)} and {_shown(p)}; "
                                        "give every file its own key (--key), or pass --last-wins (last_wins=True) "
                                        "to keep the later file", path=src, problem="duplicate-key")
            replaced.append((key, _shown(first), _shown(p)))
        seen[key] = p
    show = progress if progress is not None else (len(files) >= 2000 and sys.stderr.isatty())
    total = 0
    with WorkflowStoreWriter(out, last_wins=last_wins, compress=compress) as w:
        it: Any = files
        if show:
            from tqdm import tqdm

            it = tqdm(files, desc="store build", unit="file", file=sys.stderr)
        for key, p in it:
            try:
                data = p.read_bytes()
            except OSError as exc:
                raise _os_error(exc, Path(_shown(p)), "reading a source file") from None
            total += len(data)
            w.add(key, data)
        keys = len(w)
    return {"keys": keys, "files": len(files), "value_bytes": total, "output": str(output),
            "file_size": out.stat().st_size, "replaced": replaced}


def _is_store_file(path: Path) -> bool:
    """True when ``path`` starts with the store's magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------- hot path


def hot_ops() -> list[Any]:
    """The store's hot path for the tick harness (see knhk_memory.hotpath)."""
    import tempfile

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
        description="one index probe of a present 15-byte key in a 10,000-record mapped store: SipHash-1-3 of "
                    "the key, multiply-shift home slot, tag compare, record bounds check, key memcmp, under the "
                    "SIGBUS guard with the header checksum re-read",
        fn=ffi.addressof(lib, "knhk_store_hotop_probe"),
        setup=setup,
    )]
