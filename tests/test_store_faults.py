"""Issue 15, the store: damaged files are errors (never a miss), codec and disk
errors are StoreErrors, a keyed hash bounds probes whatever keys an outsider
picks, builds killed at any point leave the old file, and readers of a file
rewritten in place get the old value, the new value or StoreChangedError,
never a wrong answer and never a signal."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from knhk_memory import (
    StoreChangedError,
    StoreCorruptError,
    StoreDecodeError,
    StoreDiskFullError,
    StoreError,
    WorkflowStore,
    WorkflowStoreWriter,
)
from knhk_memory._core import lib
from knhk_memory.cli import main
from knhk_memory.store import HEADER_SIZE, max_displacement_bound

from .store_flood import flooding_keys

DATA = Path(__file__).parent / "data"


def build(path: Path, n: int = 200, tag: bytes = b"", **kw) -> dict[bytes, bytes]:
    data = {b"flows/%05d" % i: json.dumps({"id": i, "tag": tag.decode(), "pad": "x" * (i % 50)}).encode()
            for i in range(n)}
    with WorkflowStoreWriter(path, **kw) as w:
        for k, v in data.items():
            w.add(k, v)
    return data


def reseal(b: bytearray) -> None:
    struct.pack_into("<Q", b, HEADER_SIZE - 8, lib.knhk_store_hash(bytes(b[:HEADER_SIZE - 8]), HEADER_SIZE - 8, 0))


# ---------------------------------------------------------------- the keyed hash (issue 15 #3)

def test_siphash_matches_the_reference():
    key = bytes(range(16))
    k0, k1 = struct.unpack("<QQ", key)
    # SipHash-2-4 test vectors from the reference implementation (Aumasson and Bernstein).
    assert lib.knhk_store_siphash(b"", 0, k0, k1, 2, 4) == 0x726FDB47DD0E0E31
    assert lib.knhk_store_siphash(bytes(range(15)), 15, k0, k1, 2, 4) == 0xA129CA6149BE45E5
    assert lib.knhk_store_siphash(bytes(range(8)), 8, k0, k1, 2, 4) == 0x93F5F5799A932462
    # SipHash-1-3 against CPython's own (PYTHONHASHSEED=0 zeroes its key).
    for data in (b"a", b"workflow/0000123", bytes(range(40))):  # hash(b"") is 0 by special case
        r = subprocess.run([sys.executable, "-c", f"print(hash({data!r}))"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONHASHSEED="0"), check=True)
        want = int(r.stdout) & (2**64 - 1)
        got = lib.knhk_store_siphash(data, len(data), 0, 0, 1, 3)
        assert got == want or (want == 2**64 - 2 and got == 2**64 - 1), data


def test_each_build_draws_its_own_hash_key(tmp_path):
    a, b = tmp_path / "a.kst", tmp_path / "b.kst"
    build(a, 50)
    build(b, 50)
    with WorkflowStore(a) as sa, WorkflowStore(b) as sb:
        assert sa._info["hash_key"] != sb._info["hash_key"]
        assert sa._info["version"] == 2
    build(a, 50, hash_key=7)  # fixed on request: reproducible bytes
    first = a.read_bytes()
    build(a, 50, hash_key=7)
    assert a.read_bytes() == first


def test_flooding_keys_do_not_lengthen_probes(tmp_path):
    """500 keys found to share home slot 0 under a guessed hash key (0)."""
    ordinary = [b"workflow/%07d" % i for i in range(1000)]
    slots = -(-1500 * 1000 // 875)
    flood = flooding_keys(500, slots, hash_key=0)
    keys = ordinary + flood
    # With the key the attacker aimed at, the probe would run past the bound: refused.
    with pytest.raises(StoreError, match=r"the index's longest probe is \d+ slots, above the bound of 76 for 1715 "
                                         r"slots, after 1 hash key\(s\); the hash_key was fixed by the caller"):
        with WorkflowStoreWriter(tmp_path / "aimed.kst", hash_key=0) as w:
            for k in keys:
                w.add(k, b"v")
    assert not (tmp_path / "aimed.kst").exists()
    # With the build's own random key the same keys spread out.
    with WorkflowStoreWriter(tmp_path / "flows.kst") as w:
        for k in keys:
            w.add(k, k)
    with WorkflowStore(tmp_path / "flows.kst") as s:
        st = s.stats()
        assert st["max_displacement"] <= max_displacement_bound(st["index_slots"]) == 76
        assert st["max_displacement"] < 40
        assert all(bytes(s[k]) == k for k in keys)
        assert s.verify() == 1500


def test_build_draws_a_new_key_past_the_displacement_bound(tmp_path, monkeypatch):
    import knhk_memory.store as store_mod

    monkeypatch.setattr(store_mod, "max_displacement_bound", lambda slots: 2)
    w = WorkflowStoreWriter(tmp_path / "x.kst")
    for i in range(400):
        w.add(b"k%d" % i, b"v")
    with pytest.raises(StoreError, match=r"longest probe is \d+ slots, above the bound of 2 .* after 9 hash key"):
        w.commit()
    assert w.reseeds == 8


def test_version_1_files_are_still_read():
    with WorkflowStore(DATA / "store-v1.kst") as s:
        assert s.stats()["format_version"] == 1 and len(s) == 300
        assert json.loads(bytes(s["flows/00042"])) == {"id": 42, "steps": [0, 1]}
        assert s.get("flows/99999") is None
        assert s.verify() == 300
        assert len(list(s.keys())) == 300
    with WorkflowStore(DATA / "store-v1-zstd.kst", mmap_threshold=0) as s:
        assert bytes(s["z/7"]) == b"value 7 " * 20 and s.verify() == 50


# ---------------------------------------------------------------- header (#7), damaged records (#13)

def test_flipped_bit_in_the_version_field_is_a_corrupt_header(tmp_path):
    p = tmp_path / "f.kst"
    build(p, 5)
    for bit in range(32):
        b = bytearray(p.read_bytes())
        b[8 + bit // 8] ^= 1 << (bit % 8)
        (tmp_path / "g.kst").write_bytes(bytes(b))
        with pytest.raises(StoreCorruptError, match=r"g.kst: corrupt header: header checksum mismatch") as info:
            WorkflowStore(tmp_path / "g.kst")
        assert info.value.problem == "corrupt"


@pytest.mark.parametrize("mmap_threshold", [0, 1 << 30])
def test_damaged_record_is_an_error_never_a_miss(tmp_path, mmap_threshold):
    """Flip every bit of some records' key bytes and length varints: the lookup of
    that key raises (get, in, []); it never says the key is absent."""
    p = tmp_path / "f.kst"
    data = build(p, 60)
    image = p.read_bytes()
    rng = random.Random(5)
    keys = list(data)
    for key in rng.sample(keys, 6):
        at = image.index(key)  # the key bytes; the two varints are just before them
        for pos in range(at - 2, at + len(key)):
            for bit in range(8):
                b = bytearray(image)
                b[pos] ^= 1 << bit
                p.write_bytes(bytes(b))
                with WorkflowStore(p, mmap_threshold=mmap_threshold) as s:
                    with pytest.raises(StoreCorruptError, match=r"f.kst: reading key .*(checksum mismatch|run past)"):
                        s.get(key)
                    with pytest.raises(StoreCorruptError):
                        key in s  # noqa: B015
                    with pytest.raises(StoreCorruptError):
                        s[key]
                    for other in rng.sample(keys, 5):  # other keys: their value, or an error
                        try:
                            v = s.get(other)
                        except StoreCorruptError:
                            continue
                        assert v is not None and bytes(v) == data[other]


# ---------------------------------------------------------------- codec errors, header fields (#14)

def test_codec_errors_are_store_errors_naming_key_and_file(tmp_path, capsys):
    p = tmp_path / "z.kst"
    with WorkflowStoreWriter(p) as w:  # raw values, then the header claims zstd
        w.add("good", b"not a frame")
    b = bytearray(p.read_bytes())
    struct.pack_into("<I", b, 12, lib.KNHK_STORE_FLAG_ZSTD)
    reseal(b)
    p.write_bytes(bytes(b))
    with WorkflowStore(p) as s:
        with pytest.raises(StoreCorruptError, match=r"z.kst: the value of key 'good' is not a valid zstd frame"):
            list(s.items())
        with pytest.raises(StoreCorruptError, match=r"z.kst: the value of key 'good' is not a valid zstd frame"):
            s.get("good")
        with pytest.raises(StoreCorruptError, match=r"z.kst: verify: the header says values are zstd frames, but the "
                                                    r"value of key 'good' is not one"):
            s.verify()
    assert main(["store", "get", str(p), "good"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "the value of key 'good' is not a valid zstd frame" in err
    assert main(["store", "list", str(p)]) == 0  # the keys: nothing is decompressed
    assert capsys.readouterr().out == "good\n"
    assert main(["store", "list", "-l", str(p)]) == 2  # that record's size is unknown: said, and the rest listed
    out, err = capsys.readouterr()
    assert out == "?\tgood\n"
    assert "Traceback" not in err and "the value of key 'good' is not a zstd frame with a recorded size" in err
    assert "1 of the values listed have no readable size" in err


def test_decoder_errors_name_key_and_file(tmp_path):
    p = tmp_path / "d.kst"
    with WorkflowStoreWriter(p) as w:
        w.add("bad", b"{not json")
    with WorkflowStore(p) as s:
        with pytest.raises(StoreDecodeError, match=r"d.kst: the value of key 'bad' \(9 bytes\) cannot be decoded by "
                                                   r"loads: JSONDecodeError") as info:
            s.get_decoded("bad")
        assert isinstance(info.value.__cause__, ValueError)


def test_verify_checks_max_disp_against_the_index(tmp_path):
    p = tmp_path / "m.kst"
    build(p, 50)
    b = bytearray(p.read_bytes())
    real = struct.unpack_from("<Q", b, 40)[0]
    struct.pack_into("<Q", b, 40, real + 3)  # opens (still < slots), probes longer than needed
    reseal(b)
    p.write_bytes(bytes(b))
    with WorkflowStore(p) as s:
        with pytest.raises(StoreCorruptError, match=rf"header: max_disp is {real + 3}, the index's longest "
                                                    rf"displacement is {real}"):
            s.verify()


# ---------------------------------------------------------------- disk full (#15)

class _FullFile:
    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_during_add_is_a_store_error_with_the_space_needed(tmp_path):
    p = tmp_path / "full.kst"
    w = WorkflowStoreWriter(p)
    w._file = _FullFile(w._file)
    tmp = w._tmp
    with pytest.raises(StoreDiskFullError, match=r"full.kst: no space left on the device while writing the store "
                                                 r"\(at byte 128 of the temporary file; this write needed [\d,]+ "
                                                 r"bytes more, the file system has [\d,]+ bytes free") as info:
        for i in range(5000):  # the first batch flush
            w.add(b"k%d" % i, b"x" * 100)
    assert info.value.problem == "disk-full" and isinstance(info.value, OSError)
    assert not tmp.exists() and not p.exists()


def test_disk_full_at_commit(tmp_path, monkeypatch):
    p = tmp_path / "full.kst"
    build(p, 10)
    before = p.read_bytes()
    w = WorkflowStoreWriter(p)
    w.add("k", b"v")
    real_fsync = os.fsync

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreDiskFullError, match=r"full.kst: no space left on the device while committing the store "
                                                 r"\(the file needs [\d,]+ bytes, the file system has [\d,]+ bytes "
                                                 r"free for this user\); the temporary file was removed"):
        w.commit()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert p.read_bytes() == before
    assert [e for e in os.listdir(tmp_path) if e.endswith(".tmp")] == []


def test_disk_full_on_a_real_small_file_system_names_the_bytes_missing(tmp_path):
    """A 64 KiB tmpfs (root only; skipped where mounting is not allowed): the build's
    buffered writes fail at commit's flush, which names what the disk took and what was
    missing (found by a new-user trial: the CLI's message had no byte count)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and a tmpfs mount")
    try:
        w = WorkflowStoreWriter(mnt / "z.kst")
        with pytest.raises(StoreDiskFullError, match=r"no space left on the device while (writing|committing) "
                                                     r"the store \(.*[\d,]+ bytes.*bytes free for this user\)") as info:
            for i in range(400):
                w.add(f"k{i}", os.urandom(400))
            w.commit()
        assert "needed" in str(info.value) or "needs" in str(info.value)
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------- killed builds (#6)

def test_sigkill_during_50_builds_leaves_the_old_file_and_no_stale_temporary(tmp_path):
    p = tmp_path / "flows.kst"
    old = build(p, 300, tag=b"old")
    rng = random.Random(1)
    opened = stale_seen = 0
    for _ in range(50):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                build(p, 3000, tag=b"new")
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        stale_seen += any(e.endswith(".tmp") for e in os.listdir(tmp_path))
        with WorkflowStore(p) as s:  # the old file, or a whole new one
            s.verify()
            n = len(s)
            assert n in (300, 3000)
            if n == 300:
                assert bytes(s[b"flows/00007"]) == old[b"flows/00007"]
        opened += 1
    assert opened == 50
    assert stale_seen > 0  # the kills did land mid-build
    build(p, 10)  # the next build removes what the dead ones left
    assert [e for e in os.listdir(tmp_path) if e.endswith(".tmp")] == []


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    p = tmp_path / "flows.kst"
    w = WorkflowStoreWriter(p)  # alive, in this process
    other = tmp_path / f".flows.kst.{os.getppid()}.abcd1234.tmp"  # a live process's
    other.write_bytes(b"")
    dead = tmp_path / ".flows.kst.999999999.abcd1234.tmp"
    dead.write_bytes(b"")
    build(p, 3)
    assert w._tmp.exists() and other.exists() and not dead.exists()
    w.discard()


# ---------------------------------------------------------------- readers under in-place rewrite (#1, #2)

def _image(path: Path, n: int, tag: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    data = build(path, n, tag=tag)
    return path.read_bytes(), data


def test_in_place_copy_of_a_bigger_store_is_detected(tmp_path):
    """Issue #1: cp new.kst flows.kst over an open reader; same inode, file grows."""
    p = tmp_path / "flows.kst"
    new_image, new = _image(tmp_path / "new.kst", 3000, b"new")
    old = build(p, 2000, tag=b"old")
    s = WorkflowStore(p, mmap_threshold=0)
    assert bytes(s[b"flows/00010"]) == old[b"flows/00010"]
    with open(p, "r+b") as f:  # what cp does: truncate, then write from the start
        f.truncate(0)
        f.write(new_image)
    for call in (lambda: s.get(b"flows/00010"), lambda: b"flows/00011" in s, lambda: s[b"flows/02500"],
                 lambda: s.get(b"absent")):
        with pytest.raises(StoreChangedError, match=r"flows.kst: reading key .*: the file changed under this "
                                                    r"reader \(.*\); call reopen\(\)"):
            call()
    with pytest.raises(StoreChangedError):
        s.verify()
    s.reopen()
    assert bytes(s[b"flows/02500"]) == new[b"flows/02500"]
    s.close()


def test_a_view_read_after_truncation_reads_zeros_not_sigbus(tmp_path, run_python):
    p = tmp_path / "flows.kst"
    build(p, 3000)
    r = run_python(f"""
from knhk_memory import WorkflowStore, StoreChangedError
s = WorkflowStore({str(p)!r}, mmap_threshold=0)
view = s.get(b"flows/02999")
before = bytes(view)
with open({str(p)!r}, "r+b") as f:
    f.truncate(4096)
after = bytes(view)   # past the new end: SIGBUS without the guard
assert after == bytes(len(before)), after[:20]
assert s.changed()
try:
    s.get(b"flows/00001")
except StoreChangedError as e:
    print("changed:", e)
""")
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "changed: " in r.stdout and "a memoryview read past its new end: it was truncated" in r.stdout


@pytest.mark.parametrize("how", ["truncate-4096", "empty", "smaller"])
def test_truncation_under_a_reader_is_an_error_not_sigbus(tmp_path, how, run_python):
    """Issue #2, in a child process so a SIGBUS would show as its exit signal."""
    p = tmp_path / "flows.kst"
    build(p, 3000, tag=b"old")
    build(tmp_path / "small.kst", 20, tag=b"new")
    code = f"""
import os
from pathlib import Path
from knhk_memory import WorkflowStore, StoreChangedError
p = Path({str(p)!r})
s = WorkflowStore(p, mmap_threshold=0)
assert s.get(b"flows/00001") is not None
how = {how!r}
with open(p, "r+b") as f:
    if how == "truncate-4096":
        f.truncate(4096)
    elif how == "empty":
        f.truncate(0)
    else:
        f.truncate(0); f.write(Path({str(tmp_path / "small.kst")!r}).read_bytes())
errors = 0
for call in (lambda: s.get(b"flows/02999"), lambda: list(s.items()), lambda: list(s.keys()), s.verify,
             lambda: s.get_bytes(b"flows/00002"), lambda: s.stats(deep=True)):
    try:
        call()
    except StoreChangedError as e:
        errors += 1
        assert "the file changed under this reader" in str(e), e
print(errors)
"""
    r = run_python(code)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert int(r.stdout) == 6


def _reader_loop(path: Path, versions: list[dict[bytes, bytes]], keys: list[bytes], stop: threading.Event,
                 tally: dict[str, int], seed: int) -> None:
    try:
        _reader_loop_body(path, versions, keys, stop, tally, seed)
    except BaseException as exc:  # anything but a StoreError escaping is a failure of the test
        tally["crashed"] = repr(exc)  # type: ignore[assignment]


def _reader_loop_body(path: Path, versions: list[dict[bytes, bytes]], keys: list[bytes], stop: threading.Event,
                      tally: dict[str, int], seed: int) -> None:
    rng = random.Random(seed)
    while True:  # the writer may be mid-rewrite already
        try:
            s = WorkflowStore(path, mmap_threshold=0)
            break
        except StoreError:
            time.sleep(0.001)
    while not stop.is_set():
        k = rng.choice(keys)
        try:
            v = s.get_bytes(k)
            present = k in s
            tally["reads"] += 1
        except StoreChangedError:
            tally["changed"] += 1
            try:
                s.reopen()
                tally["reopens"] += 1
            except StoreError:
                pass  # mid-write: the file is not whole yet; try again
            continue
        except StoreError:
            tally["other_errors"] += 1
            continue
        if not any(v == d.get(k) for d in versions) or not any(present == (k in d) for d in versions):
            tally["wrong"] += 1
    s.close()


# 40 keeps the run to seconds; KNHK_FAULT_ROUNDS=300 gave docs/store.md's long-run figures.
FAULT_ROUNDS = int(os.environ.get("KNHK_FAULT_ROUNDS", "40"))


def test_fault_suite_threads(tmp_path):
    """N in-place rewrites and truncations under reader threads: wrong answers 0."""
    p = tmp_path / "flows.kst"
    images, versions = [], []
    for n, tag in ((2000, b"a"), (2600, b"b"), (1500, b"c")):
        image, data = _image(tmp_path / f"{tag.decode()}.kst", n, tag)
        images.append(image)
        versions.append(data)
    keys = [*sorted(set().union(*versions)), b"absent/1", b"absent/2"]
    p.write_bytes(images[0])
    stop = threading.Event()
    tallies = [{"reads": 0, "changed": 0, "reopens": 0, "wrong": 0, "other_errors": 0} for _ in range(3)]
    threads = [threading.Thread(target=_reader_loop, args=(p, versions, keys, stop, t, i))
               for i, t in enumerate(tallies)]
    for t in threads:
        t.start()
    rng = random.Random(3)
    for i in range(FAULT_ROUNDS):
        with open(p, "r+b") as f:
            if i % 4 == 3:
                f.truncate(rng.choice([0, 4096, 20000]))
                time.sleep(0.002)
                f.truncate(0)
            else:
                f.truncate(0)
            image = images[rng.randrange(3)]
            for at in range(0, len(image), 16384):  # written in pieces, as cp does
                f.write(image[at:at + 16384])
                f.flush()
        time.sleep(0.005)
    stop.set()
    for t in threads:
        t.join()
    assert [t.get("crashed") for t in tallies] == [None] * 3
    total = {k: sum(t[k] for t in tallies) for k in tallies[0]}
    print(f"\nfault suite, 3 reader threads, {FAULT_ROUNDS} rewrites: {total}")  # docs/store.md's figures (-s)
    assert total["wrong"] == 0, total
    assert total["changed"] > 0 and total["reads"] > 0, total


def test_fault_suite_processes(tmp_path):
    """The same with reader processes reading through get() (zero-copy views) and
    get_bytes(): wrong answers 0, processes killed by a signal 0."""
    p = tmp_path / "flows.kst"
    images = []
    for n, tag in ((2000, b"a"), (2600, b"b")):
        image, _ = _image(tmp_path / f"{tag.decode()}.kst", n, tag)
        images.append(image)
    p.write_bytes(images[0])
    script = f"""
import json, random, sys, time
from pathlib import Path
from knhk_memory import WorkflowStore, StoreChangedError, StoreError
versions = []
for t in ("a", "b"):
    with WorkflowStore(Path({str(tmp_path)!r}) / (t + ".kst"), mmap_threshold=1 << 40) as s:
        versions.append({{bytes(k): bytes(v) for k, v in s.items()}})
keys = sorted(set().union(*versions))
rng = random.Random(int(sys.argv[1]))
s = WorkflowStore({str(p)!r}, mmap_threshold=0)
print("ready", flush=True)
reads = wrong = changed = stale_views = 0
stop = Path(sys.argv[2])
it = 0
while not (it % 256 == 0 and stop.exists()):
    it += 1
    k = rng.choice(keys)
    try:
        v = s.get_bytes(k)
        view = s.get(k)
        n = None if view is None else len(view)
        seen = None if view is None else bytes(view)  # reads the mapping itself, unguarded
        reads += 1
        if not any(seen == d.get(k) for d in versions):
            # a view is a window on the live file: stale bytes are allowed only
            # once the store says the file changed
            if s.changed():
                stale_views += 1
            else:
                wrong += 1
    except StoreChangedError:
        changed += 1
        try:
            s.reopen()
        except StoreError:
            pass
        continue
    except StoreError:
        continue
    sizes = [None if d.get(k) is None else len(d[k]) for d in versions]
    if not any(v == d.get(k) for d in versions) or n not in sizes:
        wrong += 1
print(json.dumps({{"reads": reads, "wrong": wrong, "changed": changed, "stale_views": stale_views}}))
"""
    stop = tmp_path / "stop"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i), str(stop)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        assert proc.stdout.readline() == "ready\n"
    rng = random.Random(4)
    for rounds in range(1, FAULT_ROUNDS + 1):
        with open(p, "r+b") as f:
            f.truncate(rng.choice([0, 4096]))
            time.sleep(0.001)
            f.truncate(0)
            image = images[rounds % 2]
            for at in range(0, len(image), 16384):
                f.write(image[at:at + 16384])
                f.flush()
        time.sleep(0.01)
    stop.write_bytes(b"")
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (proc.returncode, err)  # a SIGBUS would be -7
        results.append(json.loads(out))
    print(f"\nfault suite, 2 reader processes, {rounds} rewrites: {results}")  # docs/store.md's figures (-s)
    assert sum(r["wrong"] for r in results) == 0, results
    assert sum(r["changed"] for r in results) > 0, results


def test_a_sigbus_that_is_not_the_stores_still_kills(tmp_path, run_python):
    """The handler chains: a SIGBUS sent with kill(), or a fault outside a watched
    mapping, does what it did before the store was opened."""
    p = tmp_path / "flows.kst"
    build(p, 3000)
    r = run_python(f"""
import os, signal
from knhk_memory import WorkflowStore
s = WorkflowStore({str(p)!r}, mmap_threshold=0)
s.get(b"flows/00001")
os.kill(os.getpid(), signal.SIGBUS)
print("survived")
""", env={"PYTHONFAULTHANDLER": ""})
    assert "survived" not in r.stdout
    if "asan" in os.environ.get("LD_PRELOAD", ""):  # the handler before ours is ASan's: it reports and aborts
        assert "AddressSanitizer: BUS" in r.stderr
    else:
        assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr)
