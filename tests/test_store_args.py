"""WorkflowStore / WorkflowStoreWriter arguments and keys (new-user trial, findings 3-6 and 12):
every bad argument is refused up front with the error type and a message naming the class,
the parameter, the value given and what is accepted; keys follow one rule on every method."""

from __future__ import annotations

import pytest

from knhk_memory.errors import (
    StoreError,
    StoreKeyEncodingError,
    StoreKeyError,
    StoreNotFoundError,
    UntrustedPickleError,
)
from knhk_memory.records import get_object
from knhk_memory.store import WorkflowStore, WorkflowStoreWriter

U64 = "an int from 0 to 18,446,744,073,709,551,615"


@pytest.fixture
def typed(tmp_path):
    path = tmp_path / "typed.kst"
    with WorkflowStoreWriter(path) as w:
        w.add("weights", {"w": [1, 2]}, codec="pickle5", aliases=["invoice"])
        w.add("j", b'{"x": 1}')
    return path


# ---------------------------------------------------------------- finding 3: trust_pickle is a bool

@pytest.mark.parametrize("bad", ["no", "", 1, 0, None, [], "False"])
def test_trust_pickle_accepts_only_a_bool(typed, bad):
    message = ("WorkflowStore: trust_pickle must be True or False (True lets pickled records be unpickled, which "
               f"runs code from the file), got {type(bad).__name__} {bad!r}")
    with pytest.raises(TypeError) as info:
        WorkflowStore(typed, trust_pickle=bad)
    assert str(info.value) == message
    with WorkflowStore(typed) as s:
        with pytest.raises(TypeError) as info:
            s.trust_pickle = bad  # the attribute is checked too: no truthy stand-in later
        assert str(info.value) == message
        assert s.trust_pickle is False
        with pytest.raises(UntrustedPickleError, match="'weights' is a pickle"):
            s.get_object("weights")
        with pytest.raises(TypeError, match=r"get_object: trust_pickle must be True or False .* got "):
            get_object(s, "weights", trust_pickle=bad)


def test_trust_pickle_true_and_false(typed):
    with WorkflowStore(typed, trust_pickle=True) as s:
        assert s.get_object("weights") == {"w": [1, 2]} and s.get_object("invoice") == {"w": [1, 2]}
    with WorkflowStore(typed, trust_pickle=False) as s:
        with pytest.raises(UntrustedPickleError):
            s.get_object("invoice")


def test_spiff_loader_checks_trust_pickle_before_anything(tmp_path):
    pytest.importorskip("SpiffWorkflow")
    from knhk_memory.adapters.spiff import SpiffLoader

    with pytest.raises(TypeError, match=r"SpiffLoader: trust_pickle must be True or False .* got str 'no'"):
        SpiffLoader(tmp_path / "absent.kst", trust_pickle="no")


# ---------------------------------------------------------------- finding 4: constructor arguments

READER_BAD = [
    ("mmap_threshold", -1, ValueError, "an int >= 0 (bytes), got -1"),
    ("mmap_threshold", "x", TypeError, "an int >= 0 (bytes), got str 'x'"),
    ("mmap_threshold", 1.0, TypeError, "an int >= 0 (bytes), got float 1.0"),
    ("mmap_threshold", True, TypeError, "an int >= 0 (bytes), got bool True"),
    ("huge_page_threshold", -5, ValueError, "an int >= 0 (bytes), got -5"),
    ("huge_page_threshold", None, TypeError, "an int >= 0 (bytes), got NoneType None"),
    ("cache_size", 1.5, TypeError, "an int from 0 to 10,000,000 (entries; 0: no cache), got float 1.5"),
    ("cache_size", "10", TypeError, "an int from 0 to 10,000,000 (entries; 0: no cache), got str '10'"),
    ("cache_size", None, TypeError, "an int from 0 to 10,000,000 (entries; 0: no cache), got NoneType None"),
    ("cache_size", -1, ValueError, "an int from 0 to 10,000,000 (entries; 0: no cache), got -1"),
    ("cache_size", 10_000_001, ValueError, "an int from 0 to 10,000,000 (entries; 0: no cache), got 10000001"),
    ("prefetch", "yes", TypeError, "True or False, got str 'yes'"),
    ("prefetch", 1, TypeError, "True or False, got int 1"),
]


@pytest.mark.parametrize(("name", "value", "kind", "tail"), READER_BAD, ids=lambda v: repr(v)[:20])
def test_reader_arguments_are_checked(typed, name, value, kind, tail):
    with pytest.raises(kind) as info:
        WorkflowStore(typed, **{name: value})
    assert str(info.value) == f"WorkflowStore: {name} must be {tail}"


def test_reader_arguments_are_checked_before_the_file(tmp_path):
    with pytest.raises(ValueError, match="mmap_threshold must be"):
        WorkflowStore(tmp_path / "absent.kst", mmap_threshold=-1)


def test_reader_accepts_numpy_integers(typed):
    np = pytest.importorskip("numpy")
    with WorkflowStore(typed, cache_size=np.int64(5), mmap_threshold=np.uint32(0)) as s:
        assert s.cache_size == 5 and type(s.cache_size) is int and s.stats()["access"] == "mmap"


@pytest.mark.parametrize(("path", "kind", "message"), [
    ("", ValueError, "WorkflowStore: path is empty ('' names no file); give the path of a store file"),
    (None, TypeError, "WorkflowStore: path must be a str or os.PathLike file path, got NoneType None"),
    (3, TypeError, "WorkflowStore: path must be a str or os.PathLike file path, got int 3"),
])
def test_reader_path(path, kind, message):
    with pytest.raises(kind) as info:
        WorkflowStore(path)
    assert str(info.value) == message


WRITER_BAD = [
    ("hash_key", 2**70, ValueError, f"{U64} (the 64-bit SipHash key k0; or None: random per build), got {2**70}"),
    ("hash_key", -1, ValueError, f"{U64} (the 64-bit SipHash key k0; or None: random per build), got -1"),
    ("hash_key", "abc", TypeError, f"{U64} (the 64-bit SipHash key k0; or None: random per build), got str 'abc'"),
    ("seed", "x", TypeError, f"{U64} (a 64-bit checksum seed), got str 'x'"),
    ("seed", 2**64, ValueError, f"{U64} (a 64-bit checksum seed), got {2**64}"),
    ("compress", True, TypeError, "an int from 1 to 22 (a zstd level; or None: no compression), got bool True"),
    ("compress", "3", TypeError, "an int from 1 to 22 (a zstd level; or None: no compression), got str '3'"),
    ("compress", 0, ValueError, "an int from 1 to 22 (a zstd level; or None: no compression), got 0"),
    ("compress", 23, ValueError, "an int from 1 to 22 (a zstd level; or None: no compression), got 23"),
    ("load_factor", "0.5", TypeError, "a float in (0, 0.95]: keys per index slot, got str '0.5'"),
    ("load_factor", 0.96, ValueError, "a float in (0, 0.95]: keys per index slot, got 0.96"),
    ("load_factor", 0, ValueError, "a float in (0, 0.95]: keys per index slot, got 0"),
    ("load_factor", float("nan"), ValueError, "a float in (0, 0.95]: keys per index slot, got nan"),
    ("last_wins", "yes", TypeError, "True or False, got str 'yes'"),
]


@pytest.mark.parametrize(("name", "value", "kind", "tail"), WRITER_BAD, ids=lambda v: repr(v)[:20])
def test_writer_arguments_are_checked(tmp_path, name, value, kind, tail):
    with pytest.raises(kind) as info:
        WorkflowStoreWriter(tmp_path / "w.kst", **{name: value})
    assert str(info.value) == f"WorkflowStoreWriter: {name} must be {tail}"
    assert list(tmp_path.iterdir()) == []  # refused before a temporary file was made


def test_writer_zstd_dict(tmp_path):
    with pytest.raises(TypeError) as info:
        WorkflowStoreWriter(tmp_path / "w.kst", compress=3, zstd_dict="str")
    assert str(info.value) == ("WorkflowStoreWriter: zstd_dict must be bytes-like (bytes, bytearray, memoryview: a "
                               "zstd dictionary's raw bytes) or None, got str 'str'")
    with pytest.raises(ValueError) as info:
        WorkflowStoreWriter(tmp_path / "w.kst", zstd_dict=b"dict")
    assert str(info.value) == ("WorkflowStoreWriter: zstd_dict needs compress=<level> (a zstd level from 1 to 22); "
                               "got compress=None")


def test_writer_full_range_hash_key_and_seed_round_trip(tmp_path):
    path = tmp_path / "w.kst"
    with WorkflowStoreWriter(path, hash_key=2**64 - 1, seed=0, load_factor=0.5) as w:
        w.add("k", b"v")
    with WorkflowStore(path) as s:
        assert s["k"] == b"v" and s.verify() == 1 and s.stats()["index_slots"] == 2


# ---------------------------------------------------------------- finding 12: paths the writer cannot use

def test_writer_names_a_missing_directory(tmp_path):
    target = tmp_path / "nodir" / "w.kst"
    with pytest.raises(StoreNotFoundError) as info:
        WorkflowStoreWriter(target)
    assert str(info.value) == (f"{target}: the directory {str(target.parent)!r} does not exist, so the store "
                               "cannot be written there; create the directory first")
    assert info.value.problem == "missing-directory"


def test_writer_names_a_file_used_as_a_directory(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    target = tmp_path / "f" / "w.kst"
    with pytest.raises(StoreError) as info:
        WorkflowStoreWriter(target)
    assert str(info.value) == (f"{target}: {str(target.parent)!r} (or a directory above it) is not a directory, so "
                               "the store cannot be written there; give a path inside a directory")


def test_writer_empty_path():
    with pytest.raises(ValueError, match=r"^WorkflowStoreWriter: path is empty \(''"):
        WorkflowStoreWriter("")


# ---------------------------------------------------------------- finding 5: the decoder

@pytest.mark.parametrize("bad", ["json", None, 3])
def test_get_decoded_refuses_a_decoder_that_is_not_callable(typed, bad):
    with WorkflowStore(typed) as s:
        with pytest.raises(TypeError) as info:
            s.get_decoded("j", decoder=bad)
        assert str(info.value) == ("get_decoded: decoder must be a callable taking the value's bytes (e.g. "
                                   f"json.loads), got {type(bad).__name__} {bad!r}")
        with pytest.raises(TypeError, match="decoder must be a callable"):  # before the key is looked at
            s.get_decoded("absent", decoder=bad)
        assert s.get_decoded("j") == {"x": 1} and s.get_decoded("j", bytes) == b'{"x": 1}'


# ---------------------------------------------------------------- finding 6: one rule for keys

KEY_TYPES = "str (stored as its UTF-8 bytes) or bytes-like (bytes, bytearray, memoryview)"


def _methods(s):
    return {"get": s.get, "[]": s.__getitem__, "in": s.__contains__, "get_bytes": s.get_bytes,
            "get_raw": s.get_raw, "get_decoded": s.get_decoded, "get_object": s.get_object, "meta": s.meta,
            "resolve": s.resolve}


@pytest.mark.parametrize("compress", [None, 3])
@pytest.mark.parametrize("bad", [1, None, ["a"], 1.5, ("j",)])
def test_every_method_refuses_the_same_key_types(tmp_path, compress, bad):
    path = tmp_path / "s.kst"
    with WorkflowStoreWriter(path, compress=compress) as w:
        w.add("j", b'{"x": 1}')
    with WorkflowStore(path) as s:
        for name, fn in _methods(s).items():
            with pytest.raises(TypeError) as info:
                fn(bad)
            assert str(info.value) == f"a store key must be {KEY_TYPES}, got {type(bad).__name__} {bad!r}", name


@pytest.mark.parametrize("compress", [None, 3])
@pytest.mark.parametrize("key", ["\ud800", "a\udcff", "\u00e9\udfff"])
def test_every_method_names_a_key_with_no_utf8_form(tmp_path, compress, key):
    path = tmp_path / "s.kst"
    with WorkflowStoreWriter(path, compress=compress) as w:
        w.add("j", b'{"x": 1}')
        with pytest.raises(StoreKeyEncodingError, match="keys must be valid UTF-8"):
            w.add(key, b"v")
    with WorkflowStore(path) as s:
        first = next(i for i, c in enumerate(key) if 0xD800 <= ord(c) <= 0xDFFF)
        for name, fn in _methods(s).items():
            with pytest.raises(StoreKeyEncodingError) as info:
                fn(key)
            assert str(info.value) == (f"{path}: key {key!r} is not valid UTF-8 text (surrogates not allowed at "
                                       f"index {first}); keys must be valid UTF-8: give a str without lone "
                                       "surrogates, or the key's bytes"), name
            assert isinstance(info.value, ValueError) and info.value.problem == "bad-key"


@pytest.mark.parametrize("compress", [None, 3])
def test_every_method_accepts_bytes_like_keys(tmp_path, compress):
    np = pytest.importorskip("numpy")
    path = tmp_path / "s.kst"
    with WorkflowStoreWriter(path, compress=compress) as w:
        w.add("j", b'{"x": 1}')
        w.add(bytearray(b"b"), b"2")
    with WorkflowStore(path) as s:
        for key in ("j", b"j", bytearray(b"j"), memoryview(b"j"), np.bytes_(b"j"), np.str_("j")):
            assert s.get(key) == b'{"x": 1}' and s[key] == b'{"x": 1}' and key in s
            assert s.get_bytes(key) == b'{"x": 1}' and s.get_decoded(key) == {"x": 1}
            assert s.get_object(key) == b'{"x": 1}' and s.meta(key)["codec"] == "raw"
        assert s["b"] == b"2"


@pytest.mark.parametrize("key", ["nope", b"nope", bytearray(b"nope"), memoryview(b"nope")], ids=repr)
def test_the_absent_key_message_quotes_the_key_the_same_way(typed, key):
    shown = "'nope'" if isinstance(key, str) else "b'nope'"
    with WorkflowStore(typed) as s:
        for fn in (s.__getitem__, s.get_decoded):
            with pytest.raises(StoreKeyError) as info:
                fn(key)
            assert str(info.value) == f"{typed}: key {shown} is not in the store (5 keys)"
        for fn in (s.get_object, s.meta, s.resolve):
            with pytest.raises(StoreKeyError) as info:
                fn(key)
            assert str(info.value).startswith(f"{typed}: key {shown} is not in the store (neither a key nor an "
                                              "alias)")
        assert key not in s and s.get(key) is None and s.get_bytes(key, 7) == 7


@pytest.mark.parametrize(("name", "value"), [("cache_size", -1), ("cache_size", 10_000_001), ("mmap_threshold", -1),
                                             ("max_value_bytes", 0), ("max_value_bytes", 2**40 + 1)])
def test_the_config_section_and_the_constructor_say_the_same(typed, name, value):
    from knhk_memory.config import load_config
    from knhk_memory.errors import ConfigError

    with pytest.raises(ConfigError) as from_config:
        load_config(mapping={"store": {name: value}})
    with pytest.raises(ValueError) as from_constructor:
        WorkflowStore(typed, **{name: value})
    said = str(from_constructor.value).removeprefix(f"WorkflowStore: {name} ")
    assert str(from_config.value).endswith(f"store.{name}: {said}") and said.startswith("must be an int ")
