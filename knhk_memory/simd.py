"""SIMD scans: byte patterns in any buffer, and id scans over numpy id columns.

Single-pass C kernels (scalar, AVX2, AVX-512BW; chosen once at run time, see
docs/simd.md) over memory the caller already has: nothing is copied. The
common calls of find, count and the id scans are METH_FASTCALL builtins
(native/cpython/simd_py.c) that read the buffer directly and keep the GIL for scans
under 64 KiB; every other call goes through the Python functions here, which
pass buffers to C with ``ffi.from_buffer`` and release the GIL for the whole
call. Results equal the obvious Python/numpy reference for every input
(``bytes.find``/``rfind``/``count``, ``numpy.count_nonzero(a == v)``,
``numpy.flatnonzero``, ``numpy.isin``, ``numpy.bincount``, ``min``/``max``/``sum``).

Not here: regular expressions, case folding, anything over non-contiguous
memory (pass ``numpy.ascontiguousarray(a)``; the error says so).
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, NamedTuple, cast

import numpy as np

from . import _fast
from ._core import ErrorFactory, check_as, ffi, last_error, lib
from .errors import KnhkMemoryError, SimdLevelError, SimdTypeError, SimdValueError

__all__ = [
    "SimdLevel", "SimdSetting", "LEVELS", "PORTABLE_BUILD", "level", "set_level", "forced_level", "supported_levels",
    "find", "rfind", "count", "find_all", "find_many", "FindMany", "Needle",
    "count_eq", "find_eq", "mask_eq", "isin", "histogram",
    "Reduction", "reduce", "column_min", "column_max", "column_sum",
    "median_ticks", "hot_ops",
]

# The level names, as the C core spells them (knhk_simd_level_name), and what
# ``[simd] level`` / set_level() accept besides: ``auto``.
SimdLevel = Literal["scalar", "avx2", "avx512"]
SimdSetting = Literal["auto", "scalar", "avx2", "avx512"]

LEVELS: tuple[SimdLevel, ...] = tuple(cast(SimdLevel, ffi.string(lib.knhk_simd_level_name(i)).decode())
                                      for i in range(lib.KNHK_SIMD_LEVELS))
# True in a KNHK_PORTABLE=1 build (native/build_native.py): portable C only,
# so ``scalar`` is the one level whatever the CPU.
PORTABLE_BUILD: bool = bool(lib.KNHK_PORTABLE_BUILD)

# KNHK_SIMD is read once, here (and by the C core at its first call). A bad
# value makes every scan raise until set_level() picks a valid level: a forced
# level never falls back silently.
_init_error: str | None = None
if lib.knhk_simd_init() != lib.KNHK_OK:
    _init_error = last_error()


def _ready() -> None:
    if _init_error is not None:
        raise SimdLevelError(f"{_init_error} (fix or unset KNHK_SIMD, or call knhk_memory.simd.set_level())")


# ---------------------------------------------------------------- levels

def supported_levels() -> list[SimdLevel]:
    """The levels this CPU and OS can run, lowest first (``scalar`` always;
    only ``scalar`` in a portable build, see :data:`PORTABLE_BUILD`)."""
    return [name for i, name in enumerate(LEVELS) if lib.knhk_simd_level_supported(i)]


def auto_level() -> tuple[SimdLevel, str | None]:
    """The level ``auto`` picks here, and why it is not the highest supported
    one (``None`` when it is): on a core that lowers its clock after 512-bit
    instructions (Skylake-SP, Cascade Lake, Cooper Lake) ``auto`` is avx2."""
    name = LEVELS[lib.knhk_simd_auto_level()]
    if name == supported_levels()[-1]:
        return name, None
    return name, ("avx512 passed over: 512-bit instructions lower this CPU's clock, which slows the code "
                  "around every call; KNHK_SIMD=avx512 uses it")


def level() -> SimdLevel:
    """The active SIMD level: ``"scalar"``, ``"avx2"`` or ``"avx512"``."""
    _ready()
    return LEVELS[lib.knhk_simd_level()]


def _level_id(name: str) -> int:
    if not isinstance(name, str):
        raise SimdTypeError(f"a SIMD level is a string, got {type(name).__name__} {name!r}; "
                            f"accepted: auto, {', '.join(LEVELS)}")
    key = name.strip().lower()
    if key == "auto":
        return int(lib.knhk_simd_auto_level())
    if key not in LEVELS:
        raise SimdLevelError(f"unknown SIMD level {name!r}; accepted: auto, {', '.join(LEVELS)}")
    return LEVELS.index(key)


def set_level(name: SimdSetting) -> str:
    """Make ``name`` (``auto``, ``scalar``, ``avx2``, ``avx512``) the active level
    for the whole process; returns the previous one. A level this machine lacks
    is a :class:`SimdLevelError`."""
    global _init_error
    lid = _level_id(name)
    previous = LEVELS[lib.knhk_simd_level()] if lib.knhk_simd_level() >= 0 else "none"
    check_as(lib.knhk_simd_set_level(lid), lambda d: SimdLevelError(
        f"cannot use SIMD level {name!r}: {d}; this machine supports: {', '.join(supported_levels())}"))
    _init_error = None
    return previous


@contextlib.contextmanager
def forced_level(name: SimdSetting) -> Iterator[SimdLevel]:
    """``with forced_level("scalar"):`` runs the block at that level (process-wide)."""
    previous = set_level(name)
    try:
        yield LEVELS[lib.knhk_simd_level()]
    finally:
        if previous in LEVELS:
            lib.knhk_simd_set_level(LEVELS.index(previous))


# ---------------------------------------------------------------- byte patterns

def _haystack(obj: Any) -> Any:
    if isinstance(obj, str):
        raise SimdTypeError("a bytes-like haystack is required (bytes, bytearray, memoryview, mmap, "
                            "numpy uint8 array), not str; encode it first")
    try:
        return ffi.from_buffer("uint8_t[]", obj)
    except TypeError:
        raise SimdTypeError(f"a bytes-like haystack is required (bytes, bytearray, memoryview, mmap, "
                            f"numpy uint8 array), not {type(obj).__name__}") from None
    except (BufferError, ValueError) as exc:
        raise SimdValueError(f"the haystack must be one C-contiguous buffer ({exc}); "
                             "pass bytes(x) or numpy.ascontiguousarray(x)") from None


def _needle(obj: Any) -> bytes:
    if type(obj) is bytes:
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool):
        if not 0 <= obj < 256:
            raise SimdValueError(f"a needle given as an int is one byte: it must be in range(0, 256), got {obj}")
        return bytes((obj,))
    if isinstance(obj, str):
        raise SimdTypeError("the needle must be bytes-like or an int in range(0, 256), not str; encode it first")
    try:
        return bytes(memoryview(obj).cast("B")) if not isinstance(obj, bytes) else obj
    except TypeError:
        raise SimdTypeError(f"the needle must be bytes-like or an int in range(0, 256), "
                            f"not {type(obj).__name__}") from None
    except (BufferError, ValueError) as exc:
        raise SimdValueError(f"the needle must be one C-contiguous buffer ({exc})") from None


def _index(value: Any, what: str) -> int | None:
    if value is None:
        return None
    try:
        return operator.index(value)
    except TypeError:
        raise SimdTypeError(f"{what} must be an integer or None (as for bytes.find), "
                            f"got {type(value).__name__} {value!r}") from None


def _bounds(n: int, start: Any, end: Any) -> tuple[int, int]:
    """bytes.find's ADJUST_INDICES: negatives count from the end, end is clamped
    to n, start is not clamped upwards (so start > n finds nothing)."""
    if start is None and end is None:
        return 0, n
    s, e = _index(start, "start"), _index(end, "end")
    s = 0 if s is None else s
    e = n if e is None else e
    if e > n:
        e = n
    elif e < 0:
        e = max(e + n, 0)
    if s < 0:
        s = max(s + n, 0)
    return s, e


def _prepare(haystack: Any, needle: Any, start: Any, end: Any) -> tuple[Any, int, int, bytes] | None:
    _ready()
    h = _haystack(haystack)
    s = _needle(needle)
    lo, hi = _bounds(len(h), start, end)
    if hi - lo < len(s):
        return None
    return h, lo, hi, s


def find(haystack: Any, needle: Any, start: Any = None, end: Any = None) -> int:
    """Lowest index of ``needle`` in ``haystack[start:end]``, or -1 (as ``bytes.find``)."""
    if type(haystack) is bytes and type(needle) is bytes and start is None and end is None and _init_error is None:
        # The common call, without building a buffer view: cffi passes bytes as a pointer.
        return lib.knhk_simd_find(haystack, len(haystack), needle, len(needle)) if len(needle) <= len(haystack) else -1
    p = _prepare(haystack, needle, start, end)
    if p is None:
        return -1
    h, lo, hi, s = p
    r = lib.knhk_simd_find(h + lo, hi - lo, s, len(s))
    return r + lo if r >= 0 else -1


def rfind(haystack: Any, needle: Any, start: Any = None, end: Any = None) -> int:
    """Highest index of ``needle`` in ``haystack[start:end]``, or -1 (as ``bytes.rfind``)."""
    p = _prepare(haystack, needle, start, end)
    if p is None:
        return -1
    h, lo, hi, s = p
    r = lib.knhk_simd_rfind(h + lo, hi - lo, s, len(s))
    return r + lo if r >= 0 else -1


def count(haystack: Any, needle: Any, start: Any = None, end: Any = None, *, overlapping: bool = False) -> int:
    """Number of non-overlapping occurrences (as ``bytes.count``); ``overlapping=True``
    counts every match position. An empty needle counts ``len(slice) + 1``."""
    p = _prepare(haystack, needle, start, end)
    if p is None:
        return 0
    h, lo, hi, s = p
    return int(lib.knhk_simd_count(h + lo, hi - lo, s, len(s), bool(overlapping)))


def find_all(haystack: Any, needle: Any, start: Any = None, end: Any = None, *,
             overlapping: bool = False) -> np.ndarray:
    """Every match position, ascending, as an int64 array: non-overlapping (the
    positions ``bytes.count`` counts) unless ``overlapping=True``. An empty
    needle matches at every position from start to end inclusive."""
    p = _prepare(haystack, needle, start, end)
    if p is None:
        return np.empty(0, np.int64)
    h, lo, hi, s = p
    return _collect(lambda frm, out, cap, nxt: lib.knhk_simd_find_all(
        h + lo, hi - lo, s, len(s), bool(overlapping), frm, out, cap, nxt), lo)


# find and count as METH_FASTCALL builtins (native/cpython/simd_py.c): bytes or any
# C-contiguous buffer, a bytes needle and int/None bounds are one vectorcall
# (~60 ns instead of ~350 through cffi); every other call goes to the Python
# functions above, which convert or raise.
_find_py, _count_py = find, count
find = _fast.make_scan(0, _find_py)
count = _fast.make_scan(1, _count_py)


def _collect(call: Any, offset: int, cap: int = 1024) -> np.ndarray:
    """Drive a resumable C scan, growing the output geometrically: one pass over
    the input whatever the number of results. The result owns exactly its
    memory: a buffer that was too large is shrunk in place (realloc; for a big
    buffer, mremap: no copy), never sliced."""
    parts: list[np.ndarray] = []
    nxt = ffi.new("size_t *")
    frm = 0
    while True:
        buf = np.empty(cap, np.int64)
        k = call(frm, ffi.cast("int64_t *", ffi.from_buffer(buf)), cap, nxt)
        if k < cap:
            buf.resize(k, refcheck=False)  # no view of buf exists
            parts.append(buf)
            break
        parts.append(buf)
        frm = nxt[0]
        cap = min(cap * 4, 1 << 24)
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if offset:
        out += offset
    return out


def _needle_span(nd: Any, haystack: Any, start: Any, end: Any) -> tuple[Any, int, int] | None:
    h = _haystack(haystack)
    lo, hi = _bounds(len(h), start, end)
    return None if hi - lo < nd.len else (h, lo, hi)


def _needle_find(nd: Any, haystack: Any, start: Any = None, end: Any = None) -> int:
    p = _needle_span(nd, haystack, start, end)
    if p is None:
        return -1
    h, lo, hi = p
    r = nd.find(nd, h + lo, hi - lo)
    return r + lo if r >= 0 else -1


def _needle_count(nd: Any, haystack: Any, start: Any = None, end: Any = None, *, overlapping: bool = False) -> int:
    p = _needle_span(nd, haystack, start, end)
    if p is None:
        return 0
    h, lo, hi = p
    return int(lib.knhk_simd_needle_count(nd, h + lo, hi - lo, bool(overlapping)))


class Needle:
    """A needle prepared once for searching many haystacks.

    ``Needle(b"case:42|")`` broadcasts the needle's probe bytes and picks the
    kernel of the active level (or of ``level=``) once; ``find``, ``count`` and
    ``find_all`` then take the same arguments as the module functions, minus
    the needle, and return the same results. ``find`` and ``count`` are
    METH_FASTCALL builtins (one vectorcall, the GIL kept for scans under
    64 KiB). The level is fixed at construction: a later :func:`set_level`
    does not change it (``.level`` says which it is). In C:
    ``knhk_simd_needle_new`` and ``nd->find``.

    ``find(haystack, start=None, end=None)``: lowest index of the needle in
    ``haystack[start:end]``, or -1 (as ``bytes.find``).
    ``count(haystack, start=None, end=None, *, overlapping=False)``:
    non-overlapping occurrences (as ``bytes.count``), or every match position.
    Both are per-instance builtins held in slots (a slot read is the fastest
    attribute lookup; a method shadowed by an instance attribute is not).
    """

    __slots__ = ("needle", "level", "_nd", "find", "count")

    def __init__(self, needle: Any, level: str | None = None) -> None:
        _ready()
        self.needle: bytes = _needle(needle)
        lid = -1 if level is None else _level_id(level)
        out = ffi.new("knhk_simd_needle **")
        def failed(err: type[KnhkMemoryError]) -> ErrorFactory:
            return lambda d: err(f"cannot prepare the needle at level {level!r}: {d}; "
                                 f"this machine supports: {', '.join(supported_levels())}")

        check_as(lib.knhk_simd_needle_new(self.needle, len(self.needle), lid, out), failed(SimdValueError),
                 special={lib.KNHK_ERR_UNAVAILABLE: failed(SimdLevelError),
                          lib.KNHK_ERR_INVALID: failed(SimdLevelError)})
        nd = self._nd = ffi.gc(out[0], lib.knhk_simd_needle_free)
        self.level: str = LEVELS[nd.level]
        # The builtins hold the needle's memory (nd), not this object: no cycle.
        addr = int(ffi.cast("uintptr_t", nd))
        self.find: Callable[..., int] = _fast.make_needle_method(
            0, addr, nd, functools.partial(_needle_find, nd))
        self.count: Callable[..., int] = _fast.make_needle_method(
            1, addr, nd, functools.partial(_needle_count, nd))

    def __repr__(self) -> str:
        return f"Needle({self.needle!r}, level={self.level!r})"

    def __len__(self) -> int:
        return len(self.needle)

    def find_all(self, haystack: Any, start: Any = None, end: Any = None, *,
                 overlapping: bool = False) -> np.ndarray:
        """Match positions as an int64 array, as :func:`find_all`."""
        nd = self._nd
        p = _needle_span(nd, haystack, start, end)
        if p is None:
            return np.empty(0, np.int64)
        h, lo, hi = p
        return _collect(lambda frm, out, cap, nxt: lib.knhk_simd_needle_find_all(
            nd, h + lo, hi - lo, bool(overlapping), frm, out, cap, nxt), lo)


class FindMany(NamedTuple):
    """Result of :func:`find_many`."""

    first: int          #: lowest match position of any needle, or -1
    which: int          #: index of the needle matched at ``first`` (lowest on a tie), or -1
    counts: np.ndarray  #: int64, each needle's non-overlapping count over the whole haystack


def find_many(haystack: Any, needles: Sequence[Any]) -> FindMany:
    """Search several needles at once: the first match of any of them, and how
    often each occurs (non-overlapping, as ``bytes.count``)."""
    _ready()
    h = _haystack(haystack)
    if isinstance(needles, (bytes, bytearray, str)):
        raise SimdTypeError("needles must be a sequence of needles (e.g. [b'ab', b'cd']), "
                            f"not a single {type(needles).__name__}")
    ns = [_needle(x) for x in needles]
    k = len(ns)
    keep = [ffi.from_buffer("uint8_t[]", x) for x in ns]
    ptrs = ffi.new("const uint8_t *[]", max(k, 1))
    for i, c in enumerate(keep):
        ptrs[i] = c
    lens = ffi.new("size_t[]", [len(x) for x in ns] or [0])
    counts = np.zeros(k, np.uint64)
    first, which = ffi.new("int64_t *"), ffi.new("int64_t *")
    lib.knhk_simd_find_many(h, len(h), ptrs, lens, k, first, which,
                            ffi.cast("uint64_t *", ffi.from_buffer(counts, require_writable=True)))
    return FindMany(int(first[0]), int(which[0]), counts.astype(np.int64))


# ---------------------------------------------------------------- id scans

_ID_DTYPES = "uint8, uint16, uint32, uint64"
_WIDTHS = {np.dtype(t): np.dtype(t).itemsize for t in (np.uint8, np.uint16, np.uint32, np.uint64)}


def _ids(a: Any, what: str) -> tuple[Any, int, int]:
    """(buffer, element count, width) of a C-contiguous unsigned id array."""
    _ready()
    if type(a) is np.ndarray:
        w = _WIDTHS.get(a.dtype)  # native byte order only: '>u4' is a different dtype
        if w is not None and a.flags.c_contiguous and a.flags.aligned:
            return ffi.from_buffer(a), a.size, w
    if not isinstance(a, np.ndarray):
        raise SimdTypeError(f"{what}: expected a numpy array of {_ID_DTYPES}, got {type(a).__name__}; "
                            "wrap it with numpy.asarray(x, dtype=numpy.uint32) (that copies)")
    dt = a.dtype
    if dt.kind != "u" or dt.itemsize not in (1, 2, 4, 8) or not dt.isnative:
        hint = (f"; a signed array can be viewed as unsigned with a.view(numpy.uint{dt.itemsize * 8})"
                if dt.kind == "i" and dt.isnative else "")
        raise SimdTypeError(f"{what}: dtype {dt} is not supported; accepted: {_ID_DTYPES} "
                            f"in native byte order{hint}")
    if not a.flags.c_contiguous:
        raise SimdValueError(f"{what}: the array is not C-contiguous (shape {a.shape}, strides {a.strides}); "
                             "pass numpy.ascontiguousarray(a), which copies")
    if not a.flags.aligned:
        # The C kernels read elements as their C type: a misaligned one is
        # undefined behaviour there, so it is refused rather than read.
        address = a.__array_interface__["data"][0]
        raise SimdValueError(f"{what}: the array's data is not aligned to its {dt.itemsize}-byte elements "
                             f"(address % {dt.itemsize} = {address % dt.itemsize}); "
                             "pass numpy.require(a, requirements='A'), which copies")
    return ffi.from_buffer(a), a.size, dt.itemsize


_LIMITS = {1: 1 << 8, 2: 1 << 16, 4: 1 << 32, 8: 1 << 64}


def _value(v: Any, width: int, what: str) -> int | None:
    """The id as an int, or None when no element of that width can equal it."""
    if isinstance(v, (bool, np.bool_)):
        raise SimdTypeError(f"{what}: the id must be an integer, got bool {v!r}")
    try:
        x = operator.index(v)
    except TypeError:
        raise SimdTypeError(f"{what}: the id must be an integer, got {type(v).__name__} {v!r}") from None
    return x if 0 <= x < (1 << (8 * width)) else None


def count_eq(a: np.ndarray, v: int) -> int:
    """``numpy.count_nonzero(a == v)`` in one pass. An id outside the dtype's
    range matches nothing (as numpy compares it)."""
    buf, n, w = _ids(a, "count_eq")
    x = v if type(v) is int and 0 <= v < _LIMITS[w] else _value(v, w, "count_eq")
    if x is None:
        return 0
    out = ffi.new("uint64_t *")
    lib.knhk_simd_count_eq(buf, n, w, x, out)
    return int(out[0])


def find_eq(a: np.ndarray, v: int) -> np.ndarray:
    """``numpy.flatnonzero(a == v)``: flat (C-order) indices as int64, one pass."""
    buf, n, w = _ids(a, "find_eq")
    x = _value(v, w, "find_eq")
    if x is None or n == 0:
        return np.empty(0, np.int64)
    written = ffi.new("size_t *")

    def call(frm: int, out: Any, cap: int, nxt: Any) -> int:
        lib.knhk_simd_find_eq(buf, n, w, x, frm, out, cap, written, nxt)
        return int(written[0])

    # Room for every element up to 2**21 (16 MiB of int64, only the pages
    # written are ever touched): most scans finish in one call, one buffer.
    return _collect(call, 0, cap=max(1024, min(n, 1 << 21)))


def mask_eq(a: np.ndarray, v: int) -> np.ndarray:
    """``a == v`` as a bool array of ``a``'s shape."""
    buf, n, w = _ids(a, "mask_eq")
    x = _value(v, w, "mask_eq")
    out = np.zeros(a.shape, np.bool_) if x is None else np.empty(a.shape, np.bool_)
    if x is not None and n:
        lib.knhk_simd_mask_eq(buf, n, w, x, ffi.cast("uint8_t *", ffi.from_buffer(out, require_writable=True)))
    return out


def isin(a: np.ndarray, ids: Iterable[int]) -> np.ndarray:
    """``numpy.isin(a, ids)`` for a small set (at most ``KNHK_SIMD_ISIN_MAX`` =
    256 distinct ids in the dtype's range; ids outside it match nothing)."""
    buf, n, w = _ids(a, "isin")
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise SimdTypeError(f"isin: ids must be an iterable of integers, got {type(ids).__name__}")
    values = sorted({x for x in (_value(i, w, "isin") for i in (ids.ravel() if isinstance(ids, np.ndarray)
                                                                  else ids)) if x is not None})
    if len(values) > lib.KNHK_SIMD_ISIN_MAX:
        raise SimdValueError(f"isin: {len(values)} distinct ids given; at most {lib.KNHK_SIMD_ISIN_MAX} are "
                             "accepted (use numpy.isin for large sets)")
    out = np.empty(a.shape, np.bool_)
    if not values:
        out[...] = False
        return out
    if n:
        setbuf = ffi.new("uint64_t[]", values)
        lib.knhk_simd_isin(buf, n, w, setbuf, len(values),
                           ffi.cast("uint8_t *", ffi.from_buffer(out, require_writable=True)))
    return out


def histogram(a: np.ndarray, nbins: int | None = None, *, out_of_range: str = "raise") -> np.ndarray:
    """Counts per id (``numpy.bincount(a, minlength=nbins)``), int64, length ``nbins``.

    ``nbins=None`` means ``max(a) + 1`` (0 bins for an empty array), as bincount.
    Ids ``>= nbins``: ``out_of_range="raise"`` (default) raises
    :class:`SimdValueError` saying how many and the largest; ``"ignore"``
    leaves them out of the counts.
    """
    buf, n, w = _ids(a, "histogram")
    if out_of_range not in ("raise", "ignore"):
        raise SimdValueError(f"histogram: out_of_range={out_of_range!r}; accepted: 'raise', 'ignore'")
    if nbins is None:
        if n == 0:
            return np.zeros(0, np.int64)
        nbins = reduce(a).max + 1
    else:
        if isinstance(nbins, bool):
            raise SimdTypeError(f"histogram: nbins must be an integer, got bool {nbins!r}")
        try:
            nbins = operator.index(nbins)
        except TypeError:
            raise SimdTypeError(f"histogram: nbins must be an integer, got {type(nbins).__name__} "
                                f"{nbins!r}") from None
        if nbins < 1:
            raise SimdValueError(f"histogram: nbins must be at least 1, got {nbins}")
    # int64 from the start (C counts in uint64; no count reaches 2**63): the
    # result owns its memory, as the fast path's does.
    counts = np.empty(nbins, np.int64)
    oor = ffi.new("uint64_t *")
    lib.knhk_simd_histogram(buf, n, w, ffi.cast("uint64_t *", ffi.from_buffer(counts, require_writable=True)),
                            nbins, oor)
    if oor[0] and out_of_range == "raise":
        raise SimdValueError(f"histogram: {oor[0]} ids are >= nbins={nbins} (largest {reduce(a).max}); "
                             "pass a larger nbins, or out_of_range='ignore' to leave them out")
    return counts


class Reduction(NamedTuple):
    """min, max and sum (modulo 2**64, as numpy's uint64 sum) of an id column."""

    min: int
    max: int
    sum: int


def reduce(a: np.ndarray) -> Reduction:
    """min, max and sum of ``a`` in one pass. An empty array raises
    :class:`SimdValueError` (as ``numpy.min`` does); use :func:`column_sum` for 0."""
    buf, n, w = _ids(a, "reduce")
    if n == 0:
        raise SimdValueError(f"reduce: the array is empty (shape {a.shape}); min and max need at least one element")
    out = ffi.new("knhk_simd_reduction *")
    lib.knhk_simd_reduce(buf, n, w, out)
    return Reduction(int(out.min), int(out.max), int(out.sum))


def column_min(a: np.ndarray) -> int:
    """``int(a.min())``; an empty array raises :class:`SimdValueError`."""
    return reduce(a).min


def column_max(a: np.ndarray) -> int:
    """``int(a.max())``; an empty array raises :class:`SimdValueError`."""
    return reduce(a).max


def column_sum(a: np.ndarray) -> int:
    """``int(a.sum(dtype=numpy.uint64))``: the sum modulo 2**64; 0 for an empty array."""
    _, n, _ = _ids(a, "column_sum")
    return 0 if n == 0 else reduce(a).sum


# The id scans as METH_FASTCALL builtins (native/cpython/simd_py.c): an exact
# numpy.ndarray of uint8/16/32/64 in native byte order, C-contiguous, with an
# exact int (or numpy integer) id in the dtype's range is one vectorcall (0.26-
# 2.8 us on 4096 ids, against 3.6-12.4 through cffi); histogram also takes nbins
# (None or an int up to 2**20) and out_of_range by keyword, isin a list or tuple
# of at most 256 ids, find_eq arrays of up to 2**21 elements. Every other call
# goes to the Python functions above, which convert or raise; they stay
# reachable as _<name>_py.
_count_eq_py, _find_eq_py, _mask_eq_py, _isin_py, _histogram_py = count_eq, find_eq, mask_eq, isin, histogram
_reduce_py, _column_min_py, _column_max_py, _column_sum_py = reduce, column_min, column_max, column_sum
count_eq = _fast.make_id_scan("count_eq", _count_eq_py)
find_eq = _fast.make_id_scan("find_eq", _find_eq_py)
mask_eq = _fast.make_id_scan("mask_eq", _mask_eq_py)
isin = _fast.make_id_scan("isin", _isin_py)
histogram = _fast.make_id_scan("histogram", _histogram_py)
reduce = _fast.make_id_scan("reduce", _reduce_py, Reduction)
column_min = _fast.make_id_scan("column_min", _column_min_py)
column_max = _fast.make_id_scan("column_max", _column_max_py)
column_sum = _fast.make_id_scan("column_sum", _column_sum_py)


# ---------------------------------------------------------------- hot paths

def _search64_setup(level: str | None = None) -> tuple[Any, Any]:
    """search_64's window and a needle prepared at ``level``: by default the
    highest level this CPU supports, even where auto passes avx512 over (a C
    loop that does nothing but search is where avx512 pays: the ticks include
    its lower clock, and no interpreter runs in between)."""
    lid = _level_id(supported_levels()[-1] if level is None else level)
    ctx = ffi.new("knhk_simd_search64_ctx *")
    rng = np.random.default_rng(64)
    window = rng.integers(0, 256, 64, dtype=np.uint8)
    needle = bytes(window[48:64])  # a match in the last candidate: the whole window is scanned
    ffi.memmove(ctx.window, window.tobytes(), 64)
    ffi.memmove(ctx.needle, needle, 16)
    out = ffi.new("knhk_simd_needle **")
    check_as(lib.knhk_simd_needle_new(ctx.needle, 16, lid, out),  # only on NOMEM
             lambda d: SimdValueError(f"search_64: cannot prepare the needle: {d}"))
    ctx.prepared = out[0]
    holder = [ctx]

    def cleanup() -> None:
        if holder:
            lib.knhk_simd_needle_free(holder[0].prepared)
            holder[0].prepared = ffi.NULL
            holder.clear()

    return ffi.cast("void *", ctx), cleanup


def _count4k_setup() -> tuple[Any, Any]:
    ctx = ffi.new("knhk_simd_count4k_ctx *")
    ids = np.random.default_rng(4096).integers(0, 43, 1024, dtype=np.uint32)
    ffi.memmove(ctx.ids, ids.tobytes(), ids.nbytes)
    ctx.value = 7
    return _owned(ctx)


def _owned(ctx: Any) -> tuple[Any, Any]:
    """(void * to ctx, cleanup); the cleanup closure owns ctx until it is called."""
    holder = [ctx]
    return ffi.cast("void *", ctx), holder.clear


def median_ticks(op_name: str, batch: int = 1000, reps: int = 101) -> float:
    """Median ticks per call of one of this module's hot ops, measured in C."""
    ops = {op.name: op for op in hot_ops()}
    if op_name not in ops:
        raise SimdValueError(f"unknown hot op {op_name!r}; accepted: {', '.join(ops)}")
    op = ops[op_name]
    ctx, cleanup = op.setup()
    try:
        return float(lib.knhk_simd_median_ticks(op.fn, ctx, batch, reps))
    finally:
        cleanup()


def hot_ops() -> list[Any]:
    """The SIMD hot paths for the tick harness (see knhk_memory.hotpath)."""
    from .hotpath import HotOp

    return [
        HotOp(
            name="search_64",
            description="a 16-byte needle in a 64-byte window (match at the end) through a needle "
                        "prepared at setup (knhk_simd_needle) at the highest level this CPU supports: one "
                        "direct call a search",
            fn=ffi.addressof(lib, "knhk_simd_hotop_search_64"),
            setup=_search64_setup,
        ),
        HotOp(
            name="count_eq_4k",
            description="knhk_simd_count_eq over 1024 uint32 ids (4 KiB, L1-resident)",
            fn=ffi.addressof(lib, "knhk_simd_hotop_count_eq_4k"),
            setup=_count4k_setup,
        ),
    ]
