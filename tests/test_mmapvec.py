"""MmapVec: persistence, growth, views, crash safety (kill -9), bad files and disk full (issue 19)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from knhk_memory.errors import (
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
    StoreReadOnlyError,
    StoreTruncatedError,
    StoreVersionError,
)
from knhk_memory.mmapvec import HEADER_SIZE, SLOT_SIZE, MmapVec

EVENT = np.dtype([("kind", "u1"), ("task", "<u4"), ("case", "<u8")], align=True)  # 16 bytes


def rec(i: int) -> tuple[int, int, int]:
    return (i % 7, i, 3 * i)


def filled(path: Path, n: int, dtype: np.dtype = EVENT, *, sync: bool = True) -> MmapVec:
    v = MmapVec(path, dtype, mode="w")
    v.extend(np.array([rec(i) for i in range(n)], dtype=dtype))
    if sync:
        v.sync()
    return v


# ---------------------------------------------------------------- basics

def test_roundtrip_structured_and_reopen(tmp_path: Path) -> None:
    p = tmp_path / "log.kvec"
    with MmapVec(p, EVENT, capacity=4) as v:
        for i in range(10):
            v.append(rec(i))
        v.extend([rec(i) for i in range(10, 25)])
        assert len(v) == 25 and v.capacity >= 25
        assert tuple(v[3]) == rec(3) and tuple(v[-1]) == rec(24)
    with MmapVec(p) as v:  # dtype from the file
        assert v.dtype == EVENT and len(v) == 25 and v.synced_length == 25
        assert [tuple(r) for r in v.array()] == [rec(i) for i in range(25)]
        assert v.verify() == 25


@pytest.mark.parametrize("dtype", ["<f8", "u1", "<i4", "S5", "<U3", np.dtype([("a", "<f4"), ("b", "S3")], align=True),
                                   np.dtype([("x", "<i2", (3,)), ("y", [("z", "u1")])])])
def test_dtypes_roundtrip(tmp_path: Path, dtype: object) -> None:
    dt = np.dtype(dtype)
    values = np.zeros(50, dtype=dt)
    values.view(np.uint8)[:] = np.arange(values.nbytes, dtype=np.uint64).astype(np.uint8)
    with MmapVec(tmp_path / "v", dt) as v:
        v.extend(values)
    with MmapVec(tmp_path / "v", mode="r") as v:
        assert v.dtype == dt
        got = v.array()
        # field by field: a structured copy does not carry the padding bytes between fields
        for name in dt.names or [None]:
            a, b = (got, values) if name is None else (got[name], values[name])
            assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def test_views_are_zero_copy_read_only_and_survive_growth(tmp_path: Path) -> None:
    v = MmapVec(tmp_path / "v", "<u8", capacity=8)
    v.extend(np.arange(8, dtype=np.uint64))
    before = v[2:6]
    whole = v.array()
    assert np.shares_memory(before, whole)
    with pytest.raises(ValueError, match="read-only"):
        before[0] = 99
    for i in range(8, 5000):  # several doublings, each a new mapping
        v.append(i)
    assert v.capacity >= 5000
    # views from before the growth still read the same records
    assert before.tolist() == [2, 3, 4, 5] and whole.tolist() == list(range(8))
    assert v[2:6].tolist() == [2, 3, 4, 5] and v[4999] == 4999 and v[-1] == 4999
    assert v[::1000].tolist() == [0, 1000, 2000, 3000, 4000]
    v.close()
    # and after close too: the mapping lives while a view does
    assert before.tolist() == [2, 3, 4, 5]


def test_index_errors(tmp_path: Path) -> None:
    with MmapVec(tmp_path / "v", "<u4") as v:
        v.extend([1, 2, 3])
        with pytest.raises(IndexError, match="record index 3 is out of range for 3 records"):
            v[3]
        with pytest.raises(IndexError, match="record index -4 is out of range for 3 records"):
            v[-4]
        with pytest.raises(TypeError, match="MmapVec indices must be integers or slices, got str"):
            v["a"]
        with pytest.raises(ValueError, match=r"extend takes a 1-D sequence of records, got shape \(1, 2\)"):
            v.extend([[1, 2]])
        with pytest.raises(OverflowError, match="does not fit dtype uint32"):
            v.append(-1)
        assert len(v) == 3


# ---------------------------------------------------------------- bad arguments and bad files

@pytest.mark.parametrize(("kwargs", "exc", "message"), [
    ({"dtype": object}, TypeError, "holds Python objects"),
    ({"dtype": "S0"}, TypeError, "has no size"),
    ({"dtype": "nonsense"}, TypeError, "is not a numpy dtype"),
    ({"dtype": np.dtype([(f"field_{i:04d}", "<f8") for i in range(200)])}, ValueError,
     "the header holds at most 1900"),
    ({"dtype": "u1", "mode": "rw"}, ValueError, "mode must be one of 'a', 'r', 'w', 'x', got 'rw'"),
    ({"dtype": "u1", "capacity": 0}, ValueError, "capacity must be from 1 to 1099511627776 records, got 0"),
    ({"dtype": "u1", "capacity": -5}, ValueError, "capacity must be from 1 to 1099511627776 records, got -5"),
    ({"dtype": "u1", "capacity": 1 << 41}, ValueError, "capacity must be from 1 to 1099511627776 records"),
    ({"dtype": "u1", "capacity": 2.0}, TypeError, "capacity must be an int, got float 2.0"),
    ({"dtype": None}, StoreError, "a new vector needs a dtype"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, exc: type, message: str) -> None:
    with pytest.raises(exc, match=None) as info:
        MmapVec(tmp_path / "v", **kwargs)
    assert message in str(info.value)


def test_missing_existing_and_wrong_dtype(tmp_path: Path) -> None:
    p = tmp_path / "v"
    with pytest.raises(StoreNotFoundError, match=f"{p}: no such file"):
        MmapVec(p, mode="r")
    filled(p, 3).close()
    with pytest.raises(StoreError, match=f"{p}: exists already"):
        MmapVec(p, EVENT, mode="x")
    with pytest.raises(StoreDtypeError) as info:
        MmapVec(p, "<u8")
    assert str(p) in str(info.value) and "not uint64" in str(info.value) and "kind" in str(info.value)
    with MmapVec(p, EVENT, mode="w") as v:  # "w" empties an MmapVec
        assert len(v) == 0
    with MmapVec(p) as v:
        assert len(v) == 0


def test_non_regular_files_refused_before_open(tmp_path: Path) -> None:
    with pytest.raises(StoreIsADirectoryError, match="is a directory"):
        MmapVec(tmp_path, "u1")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(StoreNotRegularError, match=f"{fifo}: is not a regular file \\(a FIFO\\)"):
        MmapVec(fifo, "u1")  # never opened, so never blocks
    with pytest.raises(StoreNotRegularError, match="a character device"):
        MmapVec("/dev/null", "u1", mode="r")


def test_not_ours_empty_short_corrupt_newer(tmp_path: Path) -> None:
    p = tmp_path / "v"
    p.write_bytes(b"")
    with pytest.raises(StoreEmptyError, match="the file is empty"):
        MmapVec(p, mode="r")
    p.write_bytes(b"hello world" * 1000)
    with pytest.raises(StoreMagicError, match="not an MmapVec file"):
        MmapVec(p)
    with pytest.raises(StoreMagicError, match="mode 'w' empties only MmapVec files"):
        MmapVec(p, "u1", mode="w")
    assert p.read_bytes().startswith(b"hello world")  # untouched
    p.write_bytes(b"hi")
    with pytest.raises(StoreMagicError, match="less than the 4096-byte header"):
        MmapVec(p)
    p.unlink()
    filled(p, 10).close()
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(StoreTruncatedError, match="has 100 bytes, less than the 4096-byte header"):
        MmapVec(p)
    p.unlink()
    filled(p, 10).close()
    raw = bytearray(p.read_bytes())
    for slot in (0, SLOT_SIZE):
        raw[slot + 40] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match="both header slots fail their checks"):
        MmapVec(p)
    p.unlink()
    filled(p, 10).close()
    raw = bytearray(p.read_bytes())
    for slot in (0, SLOT_SIZE):
        raw[slot + 8] = 9  # version 9
        body = bytes(raw[slot:slot + SLOT_SIZE - 4])
        import zlib
        raw[slot + SLOT_SIZE - 4:slot + SLOT_SIZE] = zlib.crc32(body).to_bytes(4, "little")
    p.write_bytes(bytes(raw))
    with pytest.raises(StoreVersionError, match="format version 9; this reader knows version 1"):
        MmapVec(p)


def test_one_torn_header_slot_falls_back_to_the_other(tmp_path: Path) -> None:
    p = tmp_path / "v"
    v = filled(p, 10)
    v.extend([rec(i) for i in range(10, 15)])
    v.sync()  # seq 3 in slot B (15 records); seq 2 in slot A (10 records)
    v.close()
    raw = bytearray(p.read_bytes())
    raw[SLOT_SIZE + 100] ^= 0x55  # tear slot B, the newer
    p.write_bytes(bytes(raw))
    with MmapVec(p, mode="r") as r:
        assert len(r) == 10 and r.verify() == 10


def test_truncated_and_grown_files(tmp_path: Path) -> None:
    p = tmp_path / "v"
    filled(p, 2000).close()
    size = p.stat().st_size
    os.truncate(p, HEADER_SIZE + 1999 * EVENT.itemsize)
    with pytest.raises(StoreTruncatedError) as info:
        MmapVec(p)
    assert f"{p}: has {HEADER_SIZE + 1999 * EVENT.itemsize} bytes; its header says 2000 records" in str(info.value)
    assert info.value.path == str(p) and info.value.problem == "truncated"
    filled(p, 2000).close()
    size = p.stat().st_size
    with open(p, "ab") as f:
        f.write(b"x" * 5)
    with pytest.raises(StoreCorruptError, match="not a whole number of 16-byte records: it was grown by "
                                                 "something else \\(5 extra bytes\\)"):
        MmapVec(p)
    os.truncate(p, size + 16 * 100)  # whole records more: what a crash during growth leaves
    with MmapVec(p) as v:
        assert len(v) == 2000 and v.capacity == (size - HEADER_SIZE) // 16 + 100


def test_changed_records_fail_verify(tmp_path: Path) -> None:
    p = tmp_path / "v"
    filled(p, 100).close()
    with open(p, "r+b") as f:
        f.seek(HEADER_SIZE + 16 * 50 + 3)
        f.write(b"\xAA")
    with MmapVec(p, mode="r") as v:
        with pytest.raises(StoreCorruptError, match="the 100 synced records fail their CRC-32"):
            v.verify()


def test_one_writer_many_readers(tmp_path: Path) -> None:
    p = tmp_path / "v"
    v = filled(p, 5)
    with pytest.raises(StoreLockedError, match="is open for writing by another MmapVec"):
        MmapVec(p)
    with MmapVec(p, mode="r") as r:
        assert len(r) == 5
        with pytest.raises(StoreReadOnlyError, match="opened read-only"):
            r.append(rec(5))
        with pytest.raises(StoreReadOnlyError, match="opened read-only"):
            r.extend([rec(5)])
    v.append(rec(5))  # not synced: a reader sees 5
    with MmapVec(p, mode="r") as r:
        assert len(r) == 5
    view = v[:2]
    v.close()  # syncs; the view keeps the mapping (and its descriptor) but not the lock
    with MmapVec(p) as again:
        assert len(again) == 6
    assert view.tolist() == [rec(0), rec(1)]
    with pytest.raises(StoreClosedError, match="the vector is closed"):
        v.append(rec(9))
    with pytest.raises(StoreClosedError, match="the vector is closed"):
        v[0]
    v.close()  # idempotent


# ---------------------------------------------------------------- disk full

def test_disk_full_during_growth_keeps_the_old_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "v"
    v = MmapVec(p, EVENT, capacity=16)
    v.extend([rec(i) for i in range(16)])
    v.sync()
    size = p.stat().st_size

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(StoreFullError) as info:
        v.append(rec(16))
    msg = str(info.value)
    assert msg.startswith(f"{p}: cannot grow to 1024 records") and "the disk is full" in msg
    assert "the vector keeps its 16 records" in msg
    with pytest.raises(StoreFullError):
        v.extend([rec(i) for i in range(16, 40)])
    assert len(v) == 16 and p.stat().st_size == size
    monkeypatch.undo()
    v.append(rec(16))
    v.close()
    with MmapVec(p) as r:
        assert [tuple(x) for x in r.array()] == [rec(i) for i in range(17)]


RLIMIT_CHILD = """
import resource, signal, sys
import numpy as np
from knhk_memory.mmapvec import MmapVec
from knhk_memory.errors import StoreFullError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
v = MmapVec(sys.argv[1], "<u8", capacity=1024)
n = 0
try:
    while True:
        v.extend(np.arange(n, n + 1000, dtype=np.uint64))
        n += 1000
        v.sync()
except StoreFullError as exc:
    print(len(v), v.synced_length, n, str(exc))
v.close()
"""


def test_file_size_limit_during_growth_real(tmp_path: Path) -> None:
    p = tmp_path / "v"
    out = subprocess.run([sys.executable, "-c", RLIMIT_CHILD, str(p)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    length, synced, n, msg = out.stdout.split(" ", 3)
    assert int(length) == int(synced) == int(n) > 0
    assert "the file size limit is reached" in msg
    with MmapVec(p, mode="r") as r:
        assert len(r) == int(n) and r.array().tolist() == list(range(int(n)))


# ---------------------------------------------------------------- kill -9

KILL_CHILD = """
import sys
import numpy as np
from knhk_memory.mmapvec import MmapVec
dt = np.dtype([("kind", "u1"), ("task", "<u4"), ("case", "<u8")], align=True)
v = MmapVec(sys.argv[1], dt, mode="w", capacity=64)
i = 0
batch = int(sys.argv[2])
while True:
    v.extend([(j % 7, j, 3 * j) for j in range(i, i + batch)])
    i += batch
    if (i // batch) % 3:
        v.sync()
        sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()
    # every third batch is left unsynced on purpose
"""


@pytest.mark.parametrize("batch", [1, 37, 500])
def test_kill_9_reopens_at_last_synced_length(tmp_path: Path, batch: int) -> None:
    p = tmp_path / "log.kvec"
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(p), str(batch)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None
        target = 4 + 7 * attempt
        reported = []
        for line in proc.stdout:
            reported.append(int(line))
            if len(reported) >= target:
                break
        os.kill(proc.pid, signal.SIGKILL)  # somewhere in the next batch, sync or growth
        proc.wait()
        # the child may have run ahead of our reading: lines still in the pipe count too
        reported += [int(line) for line in proc.stdout.read().splitlines() if line.strip()]
        proc.stdout.close()
        last = reported[-1]
        with MmapVec(p, mode="r") as v:
            n = len(v)
            # the last sync the child reported, or one it finished but could not report
            assert n in (last, last + batch, last + 2 * batch), (n, last)
            assert v.verify() == n
            got = v.array()
            assert got["task"].tolist() == list(range(n))
            assert got["case"].tolist() == [3 * j for j in range(n)]
            assert got["kind"].tolist() == [j % 7 for j in range(n)]


@pytest.mark.parametrize(("descr", "itemsize", "message"), [
    (b'"|O"', 8, "holds Python objects or has no size"),
    (b'"<f8"', 4, "the header says 4-byte records but its dtype float64 has 8"),
    (b'{"not": "a dtype"}', 8, "is not a dtype"),
    (b'[["a", "<f8", [100000000]]]', 8, "the header says 8-byte records"),
    (b'[["a", "<f8", [1000000000000]]]', 8, "is not a dtype"),
    (b"\xff\xfe", 8, "is not a dtype"),
])
def test_crafted_header_dtypes_are_refused(tmp_path: Path, descr: bytes, itemsize: int, message: str) -> None:
    """A header with a valid checksum but a dtype no MmapVec writes: a StoreCorruptError, never a crash."""
    from knhk_memory.mmapvec import _encode_slot

    p = tmp_path / "v"
    slot = _encode_slot(5, 0, itemsize, 0, descr)
    p.write_bytes(slot + slot + b"\0" * 64)
    with pytest.raises(StoreCorruptError) as info:
        MmapVec(p, mode="r")
    assert str(p) in str(info.value) and message in str(info.value)


def test_huge_length_in_a_valid_header_is_truncation(tmp_path: Path) -> None:
    from knhk_memory.mmapvec import _encode_slot

    p = tmp_path / "v"
    slot = _encode_slot(2, 1 << 62, 8, 0, b'"<u8"')
    p.write_bytes(slot + slot + b"\0" * 80)
    with pytest.raises(StoreTruncatedError, match="its header says 4611686018427387904 records of 8 bytes"):
        MmapVec(p, mode="r")
