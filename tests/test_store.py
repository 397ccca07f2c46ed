"""The workflow store: round trips, atomic replacement, every bad file the
issue names, a property-based fuzz of open/get/verify, CLI, config and hook."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import knhk_memory
from knhk_memory import (
    ConfigError,
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
    WorkflowStore,
    WorkflowStoreWriter,
)
from knhk_memory._core import ffi, lib
from knhk_memory.cli import main
from knhk_memory.store import HEADER_SIZE, MAGIC, hot_ops

# XXH64 reference values (from the reference implementation via the xxhash package).
XXH64_VECTORS = [
    (b"", 0, 0xEF46DB3751D8E999),
    (b"a", 0, 0xD24EC4F1A98C6E5B),
    (b"abc", 0, 0x44BC2CF5AD770999),
    (b"workflow/000001", 0, 0x9472F9E64FE1825D),
    (bytes(range(100)), 0, 0x6AC1E58032166597),
    (bytes(range(100)), 2**64 - 1, 0x09A991A091C9F6D7),
    (b"Nobody inspects the spammish repetition", 12345, 0x081A876428A9313B),
]


def definition(i: int) -> bytes:
    return json.dumps({"id": f"wf-{i}", "steps": [{"n": j, "op": "task"} for j in range(i % 7)]}).encode()


def build(path: Path, n: int = 200, **kw) -> dict[str, bytes]:
    data = {f"flows/{i:05d}": definition(i) for i in range(n)}
    with WorkflowStoreWriter(path, **kw) as w:
        for k, v in data.items():
            w.add(k, v)
    return data


def rewrite_header(path: Path, **fields: int) -> None:
    """Patch header fields and recompute the header checksum."""
    offsets = {"version": (8, "<I"), "flags": (12, "<I"), "count": (16, "<Q"), "slots": (32, "<Q"),
               "max_disp": (40, "<Q"), "records_end": (56, "<Q"), "file_size": (96, "<Q")}
    b = bytearray(path.read_bytes())
    for name, value in fields.items():
        off, fmt = offsets[name]
        struct.pack_into(fmt, b, off, value)
    struct.pack_into("<Q", b, HEADER_SIZE - 8, lib.knhk_store_hash(bytes(b[:HEADER_SIZE - 8]), HEADER_SIZE - 8, 0))
    path.write_bytes(bytes(b))


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "flows.kst"


# ---------------------------------------------------------------- hash


@pytest.mark.parametrize(("data", "seed", "expected"), XXH64_VECTORS)
def test_hash_is_xxh64(data, seed, expected):
    assert lib.knhk_store_hash(data, len(data), seed) == expected


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("mmap_threshold", [0, 1 << 30], ids=["mapped", "read"])
def test_round_trip(store_path, mmap_threshold):
    data = build(store_path)
    with WorkflowStore(store_path, mmap_threshold=mmap_threshold) as s:
        assert len(s) == 200
        assert s.stats()["access"] == ("mmap" if mmap_threshold == 0 else "read")
        for k, v in data.items():
            got = s.get(k)
            assert isinstance(got, memoryview) and got.readonly
            assert got == v
            assert s[k.encode()] == v
            assert k in s
        assert s.get("flows/99999") is None
        assert s.get("nope", b"dflt") == b"dflt"
        assert "nope" not in s
        with pytest.raises(TypeError, match="a store key must be str"):
            42 in s  # noqa: B015 - refused as get and [] refuse it
        assert list(s.keys()) == [k.encode() for k in data]
        assert [(k, bytes(v)) for k, v in s.items()] == [(k.encode(), v) for k, v in data.items()]
        assert s.verify() == 200


def test_get_is_zero_copy_into_the_mapping(store_path):
    build(store_path)
    with WorkflowStore(store_path, mmap_threshold=0) as s:
        v = s.get("flows/00003")
        assert v.obj is s._map  # a slice of the mapping, no copy
        assert v.tobytes() == definition(3)


def test_missing_key_raises_keyerror(store_path):
    build(store_path, 3)
    with WorkflowStore(store_path) as s:
        with pytest.raises(StoreKeyError, match=r"key 'flows/7' is not in the store \(3 keys\)") as ei:
            s["flows/7"]
        assert isinstance(ei.value, KeyError)


def test_empty_store_and_odd_keys(store_path):
    with WorkflowStoreWriter(store_path):
        pass
    with WorkflowStore(store_path) as s:
        assert len(s) == 0 and list(s.items()) == [] and s.get("x") is None and s.verify() == 0
    with WorkflowStoreWriter(store_path) as w:
        w.add(b"", b"empty key")
        w.add("ünï/κ", b"")
        w.add(bytearray(b"\x00\xff"), memoryview(b"binary"))
    with WorkflowStore(store_path) as s:
        assert s[b""] == b"empty key" and s["ünï/κ"] == b"" and s[b"\x00\xff"] == b"binary"
    with pytest.raises(TypeError, match=r"key must be str \(stored as its UTF-8 bytes\) or bytes-like "
                                           r"\(bytes, bytearray, memoryview\), got int"):
        WorkflowStore(store_path).get(5)


def test_duplicate_keys_raise_unless_last_wins(store_path):
    with pytest.raises(DuplicateKeyError, match=r"duplicate key b'a' \(pass last_wins=True"):
        with WorkflowStoreWriter(store_path) as w:
            w.add("a", b"1")
            w.add("a", b"2")
    assert not store_path.exists()
    assert list(store_path.parent.iterdir()) == []  # the temporary file is gone too
    with WorkflowStoreWriter(store_path, last_wins=True) as w:
        w.add("a", b"1")
        w.add("b", b"x")
        w.add("a", b"2")
    with WorkflowStore(store_path) as s:
        assert s["a"] == b"2" and len(s) == 2 and list(s.keys()) == [b"b", b"a"]
        assert s.stats()["superseded_records"] == 1
        assert s.verify() == 3


def test_wide_value_takes_the_span_path(store_path):
    big = os.urandom(1 << 24)  # 16 MiB: too long for the packed result
    with WorkflowStoreWriter(store_path) as w:
        w.add("big", big)
        w.add("small", b"s")
    with WorkflowStore(store_path) as s:
        assert s._find(s._handle, b"big", 3) == lib.KNHK_STORE_WIDE
        assert s["big"] == big and s["small"] == b"s" and "big" in s


def test_get_decoded_lru(store_path):
    build(store_path, 10)
    calls = []

    def decoder(b: bytes):
        calls.append(b)
        return json.loads(b)

    with WorkflowStore(store_path, cache_size=2) as s:
        assert s.get_decoded("flows/00001", decoder)["id"] == "wf-1"
        assert s.get_decoded("flows/00001", decoder)["id"] == "wf-1"
        assert len(calls) == 1
        s.get_decoded("flows/00002", decoder)
        s.get_decoded("flows/00003", decoder)  # evicts 00001
        s.get_decoded("flows/00001", decoder)
        assert len(calls) == 4 and len(s._cache) == 2
        assert s.get_decoded("flows/00004")["id"] == "wf-4"  # json.loads by default
        with pytest.raises(StoreKeyError):
            s.get_decoded("none")


def test_zstd_values(store_path):
    data = build(store_path, 50, compress=3)
    with WorkflowStore(store_path) as s:
        assert s.stats()["compression"] == "zstd"
        assert all(s[k] == v for k, v in data.items())
        assert bytes(s.get_raw("flows/00001"))[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
        assert {k.decode(): bytes(v) for k, v in s.items()} == data
        assert s.verify() == 50


def test_zstd_with_dictionary(store_path):
    import zstandard

    samples = [definition(i) for i in range(300)]
    zdict = zstandard.train_dictionary(2048, samples).as_bytes()
    with WorkflowStoreWriter(store_path, compress=3, zstd_dict=zdict) as w:
        for i, v in enumerate(samples):
            w.add(str(i), v)
    with WorkflowStore(store_path) as s:
        assert s.stats()["compression"] == "zstd+dict"
        assert all(s[str(i)] == v for i, v in enumerate(samples))
    with pytest.raises(ValueError, match="zstd_dict needs compress"):
        WorkflowStoreWriter(store_path, zstd_dict=zdict)
    with pytest.raises(ValueError, match=r"compress must be an int from 1 to 22 \(a zstd level; or None: no "
                                         r"compression\), got 40"):
        WorkflowStoreWriter(store_path, compress=40)


def test_threads_read_concurrently(store_path):
    data = build(store_path, 500)
    errors = []
    with WorkflowStore(store_path, mmap_threshold=0) as s:
        def reader(offset: int) -> None:
            for _r in range(4):
                for i in range(offset, 500, 3):
                    k = f"flows/{i:05d}"
                    if s.get(k) != data[k]:
                        errors.append(k)

        threads = [threading.Thread(target=reader, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_closed_store(store_path):
    build(store_path, 5)
    s = WorkflowStore(store_path)
    s.close()
    assert s.closed
    with pytest.raises(StoreClosedError, match="the store is closed"):
        s.get("flows/00001")
    with pytest.raises(StoreClosedError, match="is closed"):
        len(s)
    s.close()  # twice is fine


# ---------------------------------------------------------------- atomic replacement


def test_crash_mid_build_leaves_the_old_file(store_path):
    build(store_path, 10)
    before = store_path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with WorkflowStoreWriter(store_path) as w:
            w.add("x", b"y")
            raise RuntimeError("boom")
    assert store_path.read_bytes() == before
    assert sorted(p.name for p in store_path.parent.iterdir()) == [store_path.name]


def test_reader_keeps_its_view_across_replacement_and_reopen_sees_the_new_file(store_path):
    build(store_path, 10)
    s = WorkflowStore(store_path, mmap_threshold=0)
    old = s.get("flows/00001")
    with WorkflowStoreWriter(store_path) as w:
        w.add("flows/00001", b"new")
        w.add("only-new", b"1")
    assert old == definition(1)  # old mapping still valid
    assert s.get("only-new") is None
    s.get_decoded("flows/00002")
    s.reopen()
    assert s["flows/00001"] == b"new" and len(s) == 2 and s._cache == {}
    assert old == definition(1)
    garbage = store_path.with_suffix(".tmp")
    garbage.write_bytes(b"garbage")
    os.replace(garbage, store_path)  # replaced atomically, as a writer does: never rewritten in place
    with pytest.raises(StoreMagicError):
        s.reopen()
    assert s["only-new"] == b"1"  # a failed reopen keeps the current file
    s.close()
    assert old == definition(1)


def test_writer_refuses_a_directory(tmp_path):
    with pytest.raises(StoreIsADirectoryError, match="is a directory; give a file path"):
        WorkflowStoreWriter(tmp_path)


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(StoreNotFoundError, match=r"nope\.kst: no such file") as ei:
        WorkflowStore(tmp_path / "nope.kst")
    assert isinstance(ei.value, FileNotFoundError) and ei.value.problem == "missing"


def test_directory(tmp_path):
    with pytest.raises(StoreIsADirectoryError, match="is a directory, not a store file"):
        WorkflowStore(tmp_path)


def test_unreadable(store_path, monkeypatch):
    build(store_path, 3)
    if os.geteuid() == 0:  # root reads anything: make open fail as it would for a user
        real = os.open

        def deny(path, *a, **kw):
            if Path(path) == store_path:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *a, **kw)

        monkeypatch.setattr(os, "open", deny)
    else:
        store_path.chmod(0)
    with pytest.raises(StorePermissionError, match=r"flows\.kst: permission denied"):
        WorkflowStore(store_path)


@pytest.mark.parametrize("mmap_threshold", [0, 1 << 30], ids=["mapped", "read"])
def test_empty_file(store_path, mmap_threshold):
    store_path.write_bytes(b"")
    with pytest.raises(StoreEmptyError, match=r"flows\.kst: the file is empty \(0 bytes\)"):
        WorkflowStore(store_path, mmap_threshold=mmap_threshold)


@pytest.mark.parametrize("keep", [4, 100, -1, -9])
def test_truncated(store_path, keep):
    build(store_path, 50)
    b = store_path.read_bytes()
    store_path.write_bytes(b[:keep])
    with pytest.raises(StoreTruncatedError, match=r"flows\.kst: truncated: \d+ bytes"):
        WorkflowStore(store_path)


def test_wrong_magic(store_path):
    store_path.write_bytes(b"SQLite format 3\x00" + bytes(200))
    with pytest.raises(StoreMagicError, match="wrong magic: not a knhk workflow store"):
        WorkflowStore(store_path)


def test_newer_version(store_path):
    build(store_path, 5)
    rewrite_header(store_path, version=3)
    with pytest.raises(StoreVersionError, match="format version 3 is newer than this reader"):
        WorkflowStore(store_path)


def test_trailing_garbage(store_path):
    build(store_path, 5)
    with open(store_path, "ab") as f:
        f.write(b"junk")
    with pytest.raises(StoreCorruptError, match="trailing garbage"):
        WorkflowStore(store_path)


def test_inconsistent_header_fields(store_path):
    build(store_path, 5)
    rewrite_header(store_path, max_disp=10**12)
    with pytest.raises(StoreCorruptError, match="header fields are inconsistent"):
        WorkflowStore(store_path)


def test_flipped_bit_in_header(store_path):
    build(store_path, 5)
    b = bytearray(store_path.read_bytes())
    b[20] ^= 0x10
    store_path.write_bytes(bytes(b))
    with pytest.raises(StoreCorruptError, match="header checksum mismatch"):
        WorkflowStore(store_path)


def test_flipped_bit_in_a_record(store_path):
    data = build(store_path, 50)
    b = bytearray(store_path.read_bytes())
    pos = b.index(definition(7))
    b[pos + 5] ^= 0x01
    store_path.write_bytes(bytes(b))
    with WorkflowStore(store_path) as s:
        assert s["flows/00008"] == data["flows/00008"]
        with pytest.raises(StoreCorruptError, match=r"reading key b'flows/00007': record at offset \d+: "
                           "checksum mismatch"):
            s.get("flows/00007")
        with pytest.raises(StoreCorruptError, match="verify: record at offset"):
            s.verify()


def test_flipped_bit_in_the_index(store_path):
    build(store_path, 50)
    info = WorkflowStore(store_path)._info
    b = bytearray(store_path.read_bytes())
    b[info["index_offset"] + 3] ^= 0x04
    store_path.write_bytes(bytes(b))
    with WorkflowStore(store_path) as s:
        with pytest.raises(StoreCorruptError, match=r"index block 0 .*checksum mismatch"):
            s.get("flows/00001")
        with pytest.raises(StoreCorruptError, match="verify: index block 0"):
            s.verify()


def test_flipped_bit_in_the_block_sums(store_path):
    build(store_path, 50)
    b = bytearray(store_path.read_bytes())
    b[-2] ^= 0x80
    store_path.write_bytes(bytes(b))
    with pytest.raises(StoreCorruptError, match="index checksum mismatch"):
        WorkflowStore(store_path)


def test_random_garbage(store_path):
    store_path.write_bytes(os.urandom(4096))
    with pytest.raises(StoreMagicError, match="wrong magic"):
        WorkflowStore(store_path)
    store_path.write_bytes(MAGIC + os.urandom(4096))
    with pytest.raises(StoreError, match=r"flows.kst: "):
        WorkflowStore(store_path)


# ---------------------------------------------------------------- fuzz


def _exercise(data: bytes, keys: list[str]) -> None:
    """open/get/in/items/verify on arbitrary bytes: StoreError or success, never a crash."""
    cbuf = ffi.from_buffer(data)
    out = ffi.new("knhk_store **")
    problem = ffi.new("int *")
    if lib.knhk_store_open(cbuf, len(data), out, problem) != lib.KNHK_OK:
        assert out[0] == ffi.NULL and problem[0] != 0
        return
    s = out[0]
    try:
        span = ffi.new("uint64_t[2]")
        for k in keys:
            kb = k.encode()
            r = lib.knhk_store_find(s, kb, len(kb))
            if r >= 0:
                assert (r >> 24) + (r & 0xFFFFFF) <= len(data)
            r = lib.knhk_store_find_span(s, kb, len(kb), span)
            if r >= 0:
                assert span[0] + span[1] <= len(data)
            r = lib.knhk_store_lookup(s, kb, len(kb), span, span + 1)  # the fast get's probe
            if r >= 0:
                assert span[0] + span[1] <= len(data)
        offs = ffi.new("uint64_t[64]")
        n = lib.knhk_store_live_offsets(s, offs, 64)
        spans = ffi.new("uint64_t[4]")
        for i in range(max(0, min(n, 64))):
            if lib.knhk_store_record_at(s, offs[i], spans) == lib.KNHK_OK:
                assert spans[2] + spans[3] <= len(data)
        lib.knhk_store_verify(s, ffi.NULL)
    finally:
        lib.knhk_store_close(s)


_FUZZ_KEYS = [f"flows/{i:05d}" for i in range(0, 40, 3)] + ["missing", ""]


@pytest.fixture(scope="module")
def valid_image(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("fuzz") / "f.kst"
    build(p, 40)
    return p.read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    _exercise(data, _FUZZ_KEYS)
    _exercise(MAGIC + data, _FUZZ_KEYS)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_valid_files(valid_image, data):
    b = bytearray(valid_image)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "byte", "truncate", "insert", "fixheader"]))
        if kind == "flip" and b:
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "byte" and b:
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del b[data.draw(st.integers(0, len(b))):]
        elif kind == "insert":
            i = data.draw(st.integers(0, len(b)))
            b[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "fixheader" and len(b) >= HEADER_SIZE:
            # Mutate a header field and re-seal it: reaches the checks behind the checksum.
            off = data.draw(st.sampled_from(range(16, 112, 8)))
            struct.pack_into("<Q", b, off, data.draw(st.sampled_from(
                [0, 1, 7, 128, len(b), len(b) - 8, 2**47, 2**63, 2**64 - 1])))
            struct.pack_into("<Q", b, HEADER_SIZE - 8,
                             lib.knhk_store_hash(bytes(b[:HEADER_SIZE - 8]), HEADER_SIZE - 8, 0))
    _exercise(bytes(b), _FUZZ_KEYS)


def test_fuzzed_index_entries_with_resealed_checksums(valid_image):
    """Index entries pointing anywhere, with every checksum made valid again:
    only the bounds checks stand between the file and an out-of-bounds read."""
    import random

    rng = random.Random(6)
    img = valid_image
    slots, index_off = struct.unpack_from("<Q", img, 32)[0], struct.unpack_from("<Q", img, 80)[0]
    seed = struct.unpack_from("<Q", img, 104)[0]
    for _trial in range(300):
        b = bytearray(img)
        for _ in range(rng.randint(1, 8)):
            j = rng.randrange(slots)
            entry = (rng.getrandbits(16) << 48) | rng.choice(
                [rng.getrandbits(48), len(b) - rng.randrange(1, 32), rng.randrange(len(b)), 2**48 - 1])
            struct.pack_into("<Q", b, index_off + 8 * j, entry)
        nblocks = -(-slots // 512)
        sums_off = index_off + slots * 8
        for blk in range(nblocks):
            n = min(512, slots - blk * 512)
            chunk = bytes(b[index_off + blk * 4096:index_off + blk * 4096 + n * 8])
            struct.pack_into("<Q", b, sums_off + 8 * blk, lib.knhk_store_hash(chunk, len(chunk), blk))
        sums = bytes(b[sums_off:sums_off + nblocks * 8])
        struct.pack_into("<Q", b, 112, lib.knhk_store_hash(sums, len(sums), seed))
        struct.pack_into("<Q", b, 120, lib.knhk_store_hash(bytes(b[:120]), 120, 0))
        _exercise(bytes(b), _FUZZ_KEYS)


# ---------------------------------------------------------------- CLI


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    src = tmp_path / "defs"
    (src / "billing").mkdir(parents=True)
    (src / "billing" / "invoice.json").write_text(json.dumps({"id": "inv-1", "steps": 3}))
    (src / "onboard.yaml").write_text("id: onb-7\nsteps: []\n")
    (src / ".hidden").write_text("skip me")
    return src


def test_cli_build_get_list_verify_stats(source_dir, tmp_path, capfd):
    out = tmp_path / "wf.kst"
    assert main(["store", "build", str(source_dir), "-o", str(out)]) == 0
    assert "2 keys from 2 files" in capfd.readouterr().out
    assert main(["store", "list", str(out)]) == 0
    assert capfd.readouterr().out.split() == ["billing/invoice", "onboard"]
    assert main(["store", "get", str(out), "onboard"]) == 0
    assert capfd.readouterr().out == "id: onb-7\nsteps: []\n"
    assert main(["store", "get", str(out), "nope"]) == 1
    assert "key 'nope' not found" in capfd.readouterr().err
    assert main(["store", "verify", str(out)]) == 0
    assert "ok, 2 records checked" in capfd.readouterr().out
    assert main(["store", "stats", str(out), "--json"]) == 0
    st_ = json.loads(capfd.readouterr().out)
    assert st_["keys"] == 2 and st_["value_bytes"] == len(json.dumps({"id": "inv-1", "steps": 3})) + 20


def test_cli_build_with_keys_from_files(source_dir, tmp_path, capsys):
    out = tmp_path / "wf.kst"
    assert main(["store", "build", str(source_dir), "-o", str(out), "--key-regex", r"id\W+([\w-]+)",
                 "--zstd", "3", "--progress"]) == 0
    with WorkflowStore(out) as s:
        assert sorted(s.keys()) == [b"inv-1", b"onb-7"]
    assert main(["store", "build", str(source_dir), "-o", str(out), "--key-field", "id"]) == 2
    assert "--key-field needs a JSON file" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert main(["store", "build", str(tmp_path / "none"), "-o", str(tmp_path / "x.kst")]) == 2
    assert "source directory does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.kst"
    bad.write_bytes(b"")
    assert main(["store", "verify", str(bad)]) == 2
    assert "bad.kst: the file is empty" in capsys.readouterr().err


# ---------------------------------------------------------------- config, hook, hot op


def test_config_section_is_checked():
    cfg = knhk_memory.load_config(mapping={"store": {"path": "x.kst", "cache_size": 8}})
    assert cfg.store.path == "x.kst" and cfg.store.cache_size == 8 and cfg.store.mmap_threshold == 65536
    with pytest.raises(ConfigError, match=r"store.cache_size: must be an int from 0 to 10,000,000 \(entries; 0: no "
                                          r"cache\), got -1"):
        knhk_memory.load_config(mapping={"store": {"cache_size": -1}})
    with pytest.raises(ConfigError, match=r"unknown key 'pth' in \[store\].*did you mean 'path'"):
        knhk_memory.load_config(mapping={"store": {"pth": "x"}})


def test_hook_hands_the_engine_the_configured_store(store_path):
    build(store_path, 20)
    pm = knhk_memory.get_plugin_manager()
    cfg = knhk_memory.load_config(mapping={"store": {"path": str(store_path), "cache_size": 4,
                                                     "prefetch": True, "mmap_threshold": 0}})
    pm.hook.knhk_configure(config=cfg)
    try:
        store = pm.hook.knhk_workflow_store(config=cfg)
        assert isinstance(store, WorkflowStore) and store.cache_size == 4
        assert store.get_decoded("flows/00002")["id"] == "wf-2"
        stats = {}
        for part in pm.hook.knhk_memory_stats(config=cfg):
            stats.update(part)
        assert stats["store"]["keys"] == 20
    finally:
        pm.hook.knhk_unconfigure(config=cfg)
    assert store.closed


def test_hook_returns_none_without_a_store():
    pm = knhk_memory.get_plugin_manager()
    cfg = knhk_memory.load_config(mapping={})
    pm.hook.knhk_configure(config=cfg)
    try:
        assert pm.hook.knhk_workflow_store(config=cfg) is None
    finally:
        pm.hook.knhk_unconfigure(config=cfg)


def test_hook_bad_store_path_is_a_config_error(tmp_path):
    pm = knhk_memory.get_plugin_manager()
    cfg = knhk_memory.load_config(mapping={"store": {"path": str(tmp_path / "none.kst")}})
    with pytest.raises(ConfigError, match=r"store.path: .*none.kst: no such file"):
        pm.hook.knhk_configure(config=cfg)


def test_prefetch_and_huge_page_advice(store_path):
    build(store_path, 50)
    with WorkflowStore(store_path, mmap_threshold=0, huge_page_threshold=0, prefetch=True) as s:
        s.prefetch()
        assert s["flows/00001"] == definition(1)


def test_hot_op_store_probe():
    (op,) = hot_ops()
    assert op.name == "store_probe"
    ctx, cleanup = op.setup()
    try:
        lib.knhk_store_hotop_probe(ctx, 1000)
        c = ffi.cast("knhk_store_probe_ctx *", ctx)
        assert lib.knhk_store_find(c.store, c.key, c.key_len) >= 0
        info = ffi.new("knhk_store_info *")
        lib.knhk_store_get_info(c.store, info)
        assert info.count == 10_000 and info.max_disp < 64
    finally:
        cleanup()


def test_encode_record_reports_short_buffers():
    out = ffi.new("uint8_t[8]")
    h = ffi.new("uint64_t *")
    assert lib.knhk_store_encode_record(b"key", 3, b"value", 5, 0, out, 8, h) == 0
    assert h[0] == lib.knhk_store_hash(b"key", 3, 0)


def test_build_index_rejects_bad_arguments():
    hashes = ffi.new("uint64_t[2]", [1, 2])
    offsets = ffi.new("uint64_t[2]", [128, 2**48])
    table = ffi.new("uint64_t[2]")
    sums = ffi.new("uint64_t[1]")
    md = ffi.new("uint64_t *")
    assert lib.knhk_store_build_index(hashes, offsets, 2, 1, table, sums, md) == lib.KNHK_ERR_INVALID
    assert "must be at least the record count" in ffi.string(lib.knhk_last_error()).decode()
    assert lib.knhk_store_build_index(hashes, offsets, 2, 2, table, sums, md) == lib.KNHK_ERR_INVALID
    assert "does not fit the 48-bit index field" in ffi.string(lib.knhk_last_error()).decode()
    assert lib.knhk_store_close(ffi.NULL) is None


# ---------------------------------------------------------------- the C getter


def test_c_getter_lifetime_and_arguments(store_path):
    import gc
    import weakref

    build(store_path, 20)
    g = WorkflowStore(store_path).get  # the getter keeps its store alive
    assert g("flows/00001") == definition(1) and g(b"nope", 7) == 7
    assert g(bytearray(b"flows/00002")) == definition(2)  # through the slow path
    with pytest.raises(TypeError, match=r"key must be str \(stored as its UTF-8 bytes\) or bytes-like "
                                           r"\(bytes, bytearray, memoryview\), got float 1.5"):
        g(1.5)
    with pytest.raises(TypeError, match=r"WorkflowStore\.get\(\) takes from 2 to 3 positional arguments but 4"):
        g("a", 1, 2)
    s = WorkflowStore(store_path)
    saved = s.get
    s.close()
    with pytest.raises(StoreClosedError, match=r"flows.kst: the store is closed"):
        saved("flows/00001")
    ref = weakref.ref(WorkflowStore(store_path))
    gc.collect()
    assert ref() is None  # a bound C method holds its store; the store holds nothing back
    del g
    gc.collect()


def test_batches_and_last_wins_across_batches(store_path):
    with WorkflowStoreWriter(store_path, last_wins=True) as w:
        for i in range(9000):  # three encode batches
            w.add(b"k%d" % (i % 6000), b"v%d" % i)
    with WorkflowStore(store_path) as s:
        assert len(s) == 6000 and s.stats()["records"] == 9000
        assert s["k0"] == b"v6000" and s["k2999"] == b"v8999" and s["k3000"] == b"v3000"
        assert s.verify() == 9000


def test_encode_batch_rejects_overrunning_lengths():
    lens = ffi.new("uint64_t[1]", [10])
    vlens = ffi.new("uint64_t[1]", [1])
    out = ffi.new("uint8_t[64]")
    h = ffi.new("uint64_t[1]")
    o = ffi.new("uint64_t[1]")
    assert lib.knhk_store_encode_batch(b"abc", 3, lens, b"v", 1, vlens, 1, 0, 128, out, 64, h, o) == 0
    assert "lengths run past" in ffi.string(lib.knhk_last_error()).decode()
    lens[0] = 3
    assert lib.knhk_store_encode_batch(b"abc", 3, lens, b"v", 1, vlens, 1, 0, 128, out, 8, h, o) == 0
    assert "does not fit" in ffi.string(lib.knhk_last_error()).decode()
    assert lib.knhk_store_encode_batch(b"abc", 3, lens, b"v", 1, vlens, 1, 0, 128, out, 64, h, o) == 3 + 1 + 2 + 8
    assert o[0] == 128 and h[0] == lib.knhk_store_hash(b"abc", 3, 0)
