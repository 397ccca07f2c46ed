"""MmapVec: a persistent, growable, append-only vector of one numpy dtype in one file.

``MmapVec(path, dtype)`` maps the file and hands out zero-copy numpy views of
its records; ``append``/``extend`` add records, ``sync()`` makes them
durable, and reopening the file later (``MmapVec(path)``, dtype read from the
file) gives back exactly the records of the last ``sync()``. A workflow
engine's event log is the use it is made for.

File layout (little-endian; docs/pools.md has the table)::

    [0, 2048)     header slot A    magic "KNHKVEC1", version, seq, length, itemsize,
    [2048, 4096)  header slot B    CRC-32 of records[0, length), dtype description (JSON
                                   of numpy's descr), CRC-32 of the slot
    [4096, ...)   records          capacity x itemsize bytes; capacity doubles on growth

Crash safety (a ``kill -9`` or a power cut at any moment): ``sync()`` first
writes the records back (``fdatasync``), then writes the *other* header slot
with the next sequence number and syncs again. Opening picks the valid slot
(magic, version and slot CRC right) with the higher sequence number, so a torn
header write leaves the previous one in force, and records past its length are
never read: the file reopens at its last synced length with no garbage.
Growth is ``posix_fallocate`` of the new capacity (so a full disk fails here,
with :class:`StoreFullError` and the old length intact, rather than with a
SIGBUS on a later write), then a new mapping of the whole file; a crash
between the two leaves a longer file, which opens fine.

Views: ``vec[i]``, ``vec[a:b]`` and ``vec.array()`` are read-only numpy views
into the mapping (the log is append-only, and the checksum covers what is
synced). A view taken before a growth stays valid: the old mapping is kept
alive by the view (numpy holds the buffer) and the file never shrinks, so it
maps the same bytes, which the new mapping shares through the page cache.

Errors name the file: a file that is not ours (:class:`StoreMagicError`),
shorter than its header says (:class:`StoreTruncatedError`), longer by a part
of a record or with a failed header checksum (:class:`StoreCorruptError`),
records of another dtype (:class:`StoreDtypeError`), a directory, FIFO or
device (:class:`StoreNotRegularError`, refused before it is opened), opened
for writing elsewhere (:class:`StoreLockedError`, an ``flock``), a disk that
is full (:class:`StoreFullError`).

Not thread-safe (one writer thread; readers in other processes open the file
read-only and see the last synced length) and not fork-safe (open it again in
the child). One exception: ``close()`` may come from another thread (an engine
shutting down) while the writer appends and other threads read. An append,
extend or sync running then completes before the close syncs (so every call
that returned is in the file), later ones raise :class:`StoreClosedError`;
readers get :class:`StoreClosedError` on their next call, and arrays already
handed out stay valid (each keeps the mapping; the file is unmapped when the
last one goes). Issue 22; tests/test_close_race.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import operator
import os
import stat
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    StoreClosedError,
    StoreCorruptError,
    StoreDtypeError,
    StoreEmptyError,
    StoreError,
    StoreFullError,
    StoreIsADirectoryError,
    StoreLockedError,
    StoreMagicError,
    StoreNotFoundError,
    StoreNotRegularError,
    StorePermissionError,
    StoreReadOnlyError,
    StoreTruncatedError,
    StoreVersionError,
)

__all__ = ["MmapVec", "HEADER_SIZE", "MAGIC", "VERSION", "MIN_CAPACITY"]

MAGIC = b"KNHKVEC1"
VERSION = 1
HEADER_SIZE = 4096
SLOT_SIZE = 2048
MIN_CAPACITY = 1024
MAX_DESCR = 1900
# magic, version, header size, seq, length, itemsize, data crc, descr length
_SLOT = struct.Struct("<8sIIQQQII")
_MODES = ("a", "r", "w", "x")


def _descr_json(dt: np.dtype) -> bytes:
    return json.dumps(np.lib.format.dtype_to_descr(dt), separators=(",", ":")).encode()


def _tuples(x: Any) -> Any:
    if isinstance(x, list):
        return [tuple(_tuples(v) for v in item) if isinstance(item, list) else item for item in x]
    return x


def _descr_dtype(raw: bytes) -> np.dtype:
    descr = json.loads(raw.decode())
    if isinstance(descr, list):
        descr = [tuple(_tuples(v) if isinstance(v, list) else v for v in item) for item in descr]
    return np.lib.format.descr_to_dtype(descr)


def _encode_slot(seq: int, length: int, itemsize: int, crc: int, descr: bytes) -> bytes:
    body = _SLOT.pack(MAGIC, VERSION, HEADER_SIZE, seq, length, itemsize, crc, len(descr)) + descr
    body = body.ljust(SLOT_SIZE - 4, b"\0")
    return body + struct.pack("<I", zlib.crc32(body))


class _Slot:
    __slots__ = ("seq", "length", "itemsize", "crc", "descr", "problem")

    def __init__(self, raw: bytes) -> None:
        self.problem = ""
        self.seq = self.length = self.itemsize = self.crc = 0
        self.descr = b""
        magic, version, hsize, seq, length, itemsize, crc, dlen = _SLOT.unpack_from(raw)
        if magic != MAGIC:
            self.problem = "magic"
            return
        (want,) = struct.unpack_from("<I", raw, SLOT_SIZE - 4)
        if zlib.crc32(raw[:SLOT_SIZE - 4]) != want:
            self.problem = "checksum"
            return
        if version > VERSION:
            self.problem = f"version {version}"
            return
        if hsize != HEADER_SIZE or dlen > MAX_DESCR or itemsize == 0:
            self.problem = "fields"
            return
        self.seq, self.length, self.itemsize, self.crc = seq, length, itemsize, crc
        self.descr = bytes(raw[_SLOT.size:_SLOT.size + dlen])


class MmapVec:
    """A persistent vector of ``dtype`` records in the file at ``path`` (see the module docstring).

    :param path: The file. Refused before it is opened if it is not a regular file.
    :param dtype: The record dtype (structured dtypes included; no Python objects). None: read it
        from an existing file. Given for an existing file, it must equal the file's.
    :param mode: ``"a"`` open or create (default), ``"r"`` read-only (must exist), ``"w"`` create
        or empty an existing vector, ``"x"`` create (the file must not exist).
    :param capacity: Records to make room for when the file is created (default 1024); growth
        doubles the capacity.

    ``len(vec)`` is the number of records (synced or not); ``vec.synced_length`` the length a
    reopen after a crash would show. ``close()`` (or leaving a ``with`` block) syncs; a vector
    dropped without ``close()`` keeps only what was synced (no I/O in a finaliser).
    """

    def __init__(self, path: str | os.PathLike[str], dtype: Any = None, *, mode: str = "a",
                 capacity: int = MIN_CAPACITY) -> None:
        self._fd = -1
        self._mm: mmap.mmap | None = None
        self._room = 0
        self._ro: np.ndarray | None = None  # the read-only view readers use; None once closed
        self._busy = False  # the writer is inside append/extend/sync (close() waits for it)
        self._closing = False
        self._close_lock = threading.Lock()  # one close at a time: the second waits, then finds it done
        self._pid = os.getpid()
        self._fields: set[str] = set()
        self.dtype: np.dtype = np.dtype("u1")
        self.path = Path(path)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__} {capacity!r}")
        if not 1 <= capacity <= 1 << 40:
            raise ValueError(f"capacity must be from 1 to {1 << 40} records, got {capacity}")
        self.mode = mode
        want = None if dtype is None else self._dtype_arg(dtype)
        self._open_fd()
        try:
            size = os.fstat(self._fd).st_size
            if mode == "w" and size > 0:
                head = os.pread(self._fd, HEADER_SIZE, 0)
                if head[:8] != MAGIC and head[SLOT_SIZE:SLOT_SIZE + 8] != MAGIC:
                    raise StoreMagicError("is not an MmapVec file (no KNHKVEC1 magic); mode 'w' empties only "
                                          "MmapVec files, never anything else", path=self.path, problem="bad-magic")
            if mode == "w" or (size == 0 and mode in ("a", "x")):
                if want is None:
                    raise StoreError("a new vector needs a dtype (dtype=None only reopens an existing file)",
                                     path=self.path, problem="no-dtype")
                self._create(want, capacity)
            elif size == 0:
                raise StoreEmptyError("the file is empty: not an MmapVec file (was it created by another "
                                      "program, or interrupted before its first header?)", path=self.path,
                                      problem="empty")
            else:
                self._load(size, want)
        except BaseException:
            self._close_fd()
            raise

    # ---------------------------------------------------------------- opening

    def _dtype_arg(self, dtype: Any) -> np.dtype:
        try:
            dt = np.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"dtype {dtype!r} is not a numpy dtype ({exc})") from None
        if dt.hasobject:
            raise TypeError(f"dtype {dt} holds Python objects, which cannot be stored in a file; "
                            "use numbers, bytes (S), str (U) or structured dtypes of them")
        if dt.itemsize == 0:
            raise TypeError(f"dtype {dt} has no size; give a sized dtype such as 'S8' or 'U4'")
        if len(_descr_json(dt)) > MAX_DESCR:
            raise ValueError(f"dtype {dt} has a description of {len(_descr_json(dt))} bytes; the header holds "
                             f"at most {MAX_DESCR}")
        return dt

    def _open_fd(self) -> None:
        p = self.path
        try:
            st = os.stat(p)
        except FileNotFoundError:
            st = None
            if self.mode == "r":
                raise StoreNotFoundError("no such file", path=p, problem="missing") from None
        except OSError as exc:
            raise self._os_error(exc, "examining") from None
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise StoreIsADirectoryError("is a directory, not an MmapVec file", path=p, problem="directory")
            if not stat.S_ISREG(st.st_mode):
                raise StoreNotRegularError(f"is not a regular file ({_kind(st.st_mode)}); an MmapVec lives in a "
                                           "regular file", path=p, problem="not-regular")
            if self.mode == "x":
                raise StoreError("exists already (mode 'x' creates a new file; use mode 'a' to append to it)",
                                 path=p, problem="exists")
        flags = os.O_CLOEXEC | os.O_NONBLOCK | (os.O_RDONLY if self.mode == "r" else os.O_RDWR | os.O_CREAT)
        if self.mode == "x":
            flags |= os.O_EXCL
        try:
            self._fd = os.open(p, flags, 0o644)
        except OSError as exc:
            raise self._os_error(exc, "opening") from None
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
            self._close_fd()
            raise StoreNotRegularError(f"is not a regular file ({_kind(st.st_mode)})", path=p, problem="not-regular")
        os.set_blocking(self._fd, True)
        if self.mode != "r":
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._close_fd()
                raise StoreLockedError("is open for writing by another MmapVec (in this or another process); "
                                       "one writer at a time (open it with mode='r' to read)", path=p,
                                       problem="locked") from None

    def _os_error(self, exc: OSError, doing: str) -> StoreError:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return StorePermissionError(f"{doing}: permission denied", path=self.path, problem="permission")
        if exc.errno == errno.ENOENT:
            return StoreNotFoundError(f"{doing}: no such file or directory", path=self.path, problem="missing")
        if exc.errno == errno.EISDIR:
            return StoreIsADirectoryError(f"{doing}: is a directory", path=self.path, problem="directory")
        return StoreError(f"{doing}: {exc.strerror} (errno {exc.errno})", path=self.path, problem="os-error")

    def _create(self, dt: np.dtype, capacity: int) -> None:
        self.dtype = dt
        self._descr = _descr_json(dt)
        self._itemsize = dt.itemsize
        os.ftruncate(self._fd, 0)
        self._seq = 0
        self._len = self._synced = 0
        self._crc = 0
        self._sync_point = (0, 0)
        self._cap = 0
        self._write_slot(0, 0, seq=0)  # slot A
        self._write_slot(0, 0, seq=1)  # slot B, in force
        self._seq = 1
        self._grow_to(capacity)
        os.fdatasync(self._fd)

    def _load(self, size: int, want: np.dtype | None) -> None:
        if size < HEADER_SIZE:
            raw = os.pread(self._fd, size, 0)
            problem = "truncated" if raw[:8] == MAGIC else "bad-magic"
            exc = StoreTruncatedError if problem == "truncated" else StoreMagicError
            raise exc(f"has {size} bytes, less than the {HEADER_SIZE}-byte header"
                      + ("" if problem == "truncated" else "; not an MmapVec file (magic KNHKVEC1)"),
                      path=self.path, problem=problem)
        raw = os.pread(self._fd, HEADER_SIZE, 0)
        slots = [_Slot(raw[:SLOT_SIZE]), _Slot(raw[SLOT_SIZE:])]
        good = [s for s in slots if not s.problem]
        if not good:
            problems = {s.problem for s in slots}
            if problems == {"magic"}:
                raise StoreMagicError("does not start with the MmapVec magic KNHKVEC1: not an MmapVec file",
                                      path=self.path, problem="bad-magic")
            newer = [p for p in problems if p.startswith("version")]
            if newer:
                raise StoreVersionError(f"was written by format {newer[0]}; this reader knows version {VERSION}",
                                        path=self.path, problem="newer-version")
            raise StoreCorruptError(f"both header slots fail their checks ({', '.join(sorted(problems))}): the "
                                    "header is damaged", path=self.path, problem="corrupt")
        s = max(good, key=lambda x: x.seq)
        try:
            stored = _descr_dtype(s.descr)
        except Exception as exc:
            raise StoreCorruptError(f"the header's dtype description {s.descr[:80]!r} is not a dtype ({exc})",
                                    path=self.path, problem="corrupt") from None
        if stored.hasobject or stored.itemsize == 0:
            raise StoreCorruptError(f"the header's dtype {stored} holds Python objects or has no size: no MmapVec "
                                    "writes that", path=self.path, problem="corrupt")
        if stored.itemsize != s.itemsize:
            raise StoreCorruptError(f"the header says {s.itemsize}-byte records but its dtype {stored} has "
                                    f"{stored.itemsize}", path=self.path, problem="corrupt")
        if want is not None and want != stored:
            raise StoreDtypeError(f"holds records of dtype {stored}, not {want}; open it with that dtype, or "
                                  "dtype=None to use the file's", path=self.path, problem="dtype")
        data = size - HEADER_SIZE
        need = s.length * s.itemsize
        if data < need:
            raise StoreTruncatedError(f"has {size} bytes; its header says {s.length} records of {s.itemsize} "
                                      f"bytes, which need {HEADER_SIZE + need} (truncated by {need - data} bytes)",
                                      path=self.path, problem="truncated")
        if data % s.itemsize:
            raise StoreCorruptError(f"has {data} bytes after the header, not a whole number of {s.itemsize}-byte "
                                    f"records: it was grown by something else ({data % s.itemsize} extra bytes)",
                                    path=self.path, problem="corrupt")
        self.dtype = stored
        self._descr = s.descr
        self._itemsize = s.itemsize
        self._seq = s.seq
        self._len = self._synced = s.length
        self._crc = s.crc
        self._sync_point = (s.length, s.crc)
        self._cap = data // s.itemsize
        self._map(size)

    def _map(self, size: int) -> None:
        access = mmap.ACCESS_READ if self.mode == "r" else mmap.ACCESS_WRITE
        mm = mmap.mmap(self._fd, size, access=access)
        # The old mapping (if any) is dropped here, not closed: views taken from
        # it keep it alive, and it maps the same (never shrinking) file bytes.
        self._mm = mm
        self._room = 0 if self.mode == "r" else self._cap  # append's one compare covers read-only too
        if self._closing:  # checked after the store: a close() from another thread that zeroed the room
            self._room = 0  # meanwhile must not see it come back (append's fast path would skip the check)
        self._fields = set(self.dtype.names or ())
        self._data = np.frombuffer(mm, dtype=self.dtype, count=self._cap, offset=HEADER_SIZE)
        if self.mode == "r":
            self._ro = self._data
        else:
            ro = self._data.view()
            ro.flags.writeable = False
            self._ro = ro

    def _write_slot(self, length: int, crc: int, *, seq: int) -> None:
        slot = _encode_slot(seq, length, self._itemsize, crc, self._descr)
        os.pwrite(self._fd, slot, (seq % 2) * SLOT_SIZE)

    # ---------------------------------------------------------------- growth

    def _grow_to(self, need: int) -> None:
        """Make room for ``need`` records (capacity doubles); on failure nothing changes."""
        cap = max(MIN_CAPACITY if self._cap else need, self._cap)
        while cap < need:
            cap *= 2
        if cap == self._cap and self._mm is not None:
            return
        old_size = HEADER_SIZE + self._cap * self._itemsize
        new_size = HEADER_SIZE + cap * self._itemsize
        try:
            if self._cap == 0:
                os.ftruncate(self._fd, HEADER_SIZE)
            os.posix_fallocate(self._fd, old_size, new_size - old_size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                try:  # no fallocate on this file system: a sparse extension
                    os.ftruncate(self._fd, new_size)
                except OSError as exc2:
                    self._growth_failed(exc2, old_size, cap)
            else:
                self._growth_failed(exc, old_size, cap)
        self._cap = cap
        self._map(new_size)

    def _growth_failed(self, exc: OSError, old_size: int, cap: int) -> None:
        try:
            if os.fstat(self._fd).st_size != old_size:
                os.ftruncate(self._fd, old_size)
        except OSError:
            pass
        what = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file size limit is reached",
                errno.EDQUOT: "the disk quota is exhausted"}.get(exc.errno or 0, exc.strerror)
        raise StoreFullError(f"cannot grow to {cap} records ({HEADER_SIZE + cap * self._itemsize} bytes): {what} "
                             f"(errno {exc.errno}); the vector keeps its {self._len} records", path=self.path,
                             problem="full") from None

    # ---------------------------------------------------------------- writing

    def _writable(self, what: str) -> None:
        if self._mm is None or self._closing:
            raise StoreClosedError(f"cannot {what}: the vector is closed", path=self.path, problem="closed")
        if self.mode == "r":
            raise StoreReadOnlyError(f"cannot {what}: opened read-only (mode 'r')", path=self.path,
                                     problem="read-only")

    def append(self, record: Any) -> None:
        """Add one record (a scalar, or a tuple for a structured dtype). Durable after :meth:`sync`."""
        # In flight from before the room check (close() zeroes the room, then waits).
        self._busy = True
        try:
            n = self._len
            if n >= self._room:
                self._writable("append")
                self._grow_to(n + 1)
            try:
                self._data[n] = record
            except (ValueError, TypeError, OverflowError) as exc:
                raise type(exc)(f"{self.path}: record {record!r} does not fit dtype {self.dtype}: {exc}") from None
            self._len = n + 1
        finally:
            self._busy = False

    def extend(self, records: Any) -> None:
        """Add every record of ``records`` (an array or sequence convertible to ``dtype``, 1-D) at once."""
        self._busy = True
        try:
            self._extend(records)
        finally:
            self._busy = False

    def _extend(self, records: Any) -> None:
        self._writable("extend")
        try:
            arr = np.asarray(records, dtype=self.dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise type(exc)(f"{self.path}: records do not convert to dtype {self.dtype}: {exc}") from None
        if arr.ndim != 1:
            raise ValueError(f"{self.path}: extend takes a 1-D sequence of records, got shape {arr.shape}")
        k = arr.shape[0]
        n = self._len
        if n + k > self._cap:
            self._grow_to(n + k)
        self._data[n:n + k] = arr
        self._len = n + k

    def extend_columns(self, **columns: Any) -> None:
        """Add records given field by field (a structured dtype): ``extend_columns(kind=k, task=t,
        case=c)``, one 1-D array per field, all of one length. Each column is copied straight into
        the mapping, with no structured array in between."""
        self._busy = True
        try:
            self._extend_columns(columns)
        finally:
            self._busy = False

    def _extend_columns(self, columns: dict[str, Any]) -> None:
        n = self._len
        if columns.keys() == self._fields and n < self._room:  # the common case, checked cheaply
            arrays = [np.asarray(c) for c in columns.values()]
            k = arrays[0].shape[0] if arrays[0].ndim == 1 else -1
            if k >= 0 and n + k <= self._room and all(c.ndim == 1 and c.shape[0] == k for c in arrays):
                block = self._data[n:n + k]
                for name, c in zip(columns, arrays):
                    block[name] = c
                self._len = n + k
                return
        self._writable("extend")
        names = self.dtype.names
        if names is None:
            raise TypeError(f"{self.path}: extend_columns needs a structured dtype; this vector holds {self.dtype}")
        if set(columns) != set(names):
            missing, extra = sorted(set(names) - set(columns)), sorted(set(columns) - set(names))
            raise ValueError(f"{self.path}: extend_columns takes exactly the fields {', '.join(names)}"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; unknown {', '.join(extra)}" if extra else ""))
        cols = {k: np.asarray(v) for k, v in columns.items()}
        lengths = {int(c.shape[0]) if c.ndim == 1 else -1 for c in cols.values()}
        if -1 in lengths or len(lengths) != 1:
            raise ValueError(f"{self.path}: extend_columns takes 1-D columns of one length, got "
                             + ", ".join(f"{f} {cols[f].shape}" for f in names))
        k = lengths.pop()
        n = self._len
        if n + k > self._cap:
            self._grow_to(n + k)
        block = self._data[n:n + k]
        for name in names:
            block[name] = cols[name]
        self._len = n + k

    def sync(self) -> None:
        """Make every record appended so far durable: write the records back, then the next header
        slot (length, CRC-32), then sync again. After a crash the file reopens at this length."""
        self._busy = True
        try:
            self._sync()
        finally:
            self._busy = False

    def _sync(self) -> None:
        self._writable("sync")
        self._sync_body()

    def _sync_body(self) -> None:
        if self._len == self._synced and self._seq:
            return
        os.fdatasync(self._fd)
        lo, hi = self._synced * self._itemsize, self._len * self._itemsize
        crc = zlib.crc32(self._data.view(np.uint8)[lo:hi].data, self._crc)
        seq = self._seq + 1
        self._write_slot(self._len, crc, seq=seq)
        os.fdatasync(self._fd)
        self._seq, self._synced, self._crc = seq, self._len, crc
        self._sync_point = (self._synced, crc)  # one store: verify() on another thread reads a matching pair

    # ---------------------------------------------------------------- reading

    def __len__(self) -> int:
        return self._len

    @property
    def synced_length(self) -> int:
        """The records a reopen after a crash would have (the length of the last sync)."""
        return self._synced

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def closed(self) -> bool:
        return self._mm is None

    def _readable(self) -> np.ndarray:
        ro = self._ro  # read once: close() on another thread may clear it between two reads
        if ro is None:
            raise StoreClosedError("cannot read: the vector is closed", path=self.path, problem="closed")
        return ro

    def __getitem__(self, key: Any) -> Any:
        """``vec[i]``: record i (negative from the end); ``vec[a:b:c]``: a read-only zero-copy view."""
        ro = self._readable()[:self._len]
        if isinstance(key, slice):
            return ro[key]
        try:
            i = operator.index(key)
        except TypeError:
            raise TypeError(f"MmapVec indices must be integers or slices, got {type(key).__name__}") from None
        if not -self._len <= i < self._len:
            raise IndexError(f"record index {i} is out of range for {self._len} records")
        return ro[i]

    def array(self) -> np.ndarray:
        """All records as one read-only zero-copy view (shape ``(len(vec),)``)."""
        return self._readable()[:self._len]

    def __iter__(self) -> Any:
        return iter(self.array())

    def verify(self) -> int:
        """Recompute the CRC-32 of the synced records against the header's; returns how many were
        checked. Raises :class:`StoreCorruptError` naming the file when they differ."""
        data = self._readable()
        synced, stored = self._sync_point
        crc = zlib.crc32(data.view(np.uint8)[:synced * self._itemsize].data)
        if crc != stored:
            raise StoreCorruptError(f"the {synced} synced records fail their CRC-32 (stored {stored:#010x}, "
                                    f"computed {crc:#010x}): the records were changed on disk", path=self.path,
                                    problem="corrupt")
        return synced

    def stats(self) -> dict[str, Any]:
        return {"path": str(self.path), "dtype": str(self.dtype), "length": self._len,
                "synced_length": self._synced, "capacity": self._cap, "itemsize": self._itemsize,
                "file_size": HEADER_SIZE + self._cap * self._itemsize, "mode": self.mode}

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Sync (unless read-only) and close. Idempotent. Views stay valid until dropped.

        From another thread than the writer's: an append, extend or sync the writer is
        running completes first and is synced; its next call raises :class:`StoreClosedError`.
        Two threads closing at once: one syncs and closes, the other returns after it."""
        with self._close_lock:
            self._close()

    def _close(self) -> None:
        if self._mm is None:
            self._close_fd()
            return
        # Refuse new writes, then wait out one that began before it could see that: it set
        # _busy before reading _room, so either it saw the zero room or we see it busy.
        self._closing = True
        self._room = 0
        while self._busy and os.getpid() == self._pid:
            time.sleep(1e-5)
        try:
            if self.mode != "r":
                self._sync_body()
        finally:
            mm, self._mm = self._mm, None
            self._room = 0
            self._ro = None  # readers first: they check it
            self._data = None  # type: ignore[assignment]
            try:
                mm.close()
            except BufferError:
                pass  # views still use it; it unmaps when the last one goes
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            _unlock_close(fd)

    def __enter__(self) -> MmapVec:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Collected without close(): release the descriptor (and the lock), do not sync.
        if getattr(self, "_fd", -1) >= 0:
            _unlock_close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        state = "closed" if self._mm is None else f"len={self._len} synced={self._synced} capacity={self._cap}"
        return f"<MmapVec {str(self.path)!r} dtype={self.dtype} {state}>"


def _unlock_close(fd: int) -> None:
    # Unlock explicitly: Python's mmap holds a dup of the descriptor (same open
    # file description, same flock) for as long as a view keeps the mapping.
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"
