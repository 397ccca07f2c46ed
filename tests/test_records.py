"""The store's record layer (knhk_memory.records): codecs, metadata, aliases,
key templates for `store build`, and old stores reading as before."""

from __future__ import annotations

import json

import numpy as np
import pytest

from knhk_memory.cli import main
from knhk_memory.errors import (
    AmbiguousKeyError,
    DuplicateKeyError,
    KeyTemplateError,
    StoreCorruptError,
    StoreError,
    StoreKeyError,
    UntrustedPickleError,
)
from knhk_memory.records import RESERVED_PREFIX, decode, encode
from knhk_memory.store import WorkflowStore, WorkflowStoreWriter


@pytest.fixture(scope="module")
def typed(tmp_path_factory):
    path = tmp_path_factory.mktemp("records") / "typed.kst"
    with WorkflowStoreWriter(path) as w:
        w.add("plain", b"abc")
        w.add("a.bpmn#p", {"x": [1, 2]}, codec="json", aliases=["p", "both"], producer="tool 1.0",
              meta={"file": "a.bpmn"})
        w.add("b.bpmn#q", {"arr": np.arange(6, dtype=np.int32)}, codec="pickle5", aliases=["q", "both"])
        w.add("c#raw", b"\x00\x01", codec="raw", content_type="application/x-thing")
    return path


def test_codecs_round_trip_and_metadata(typed):
    with WorkflowStore(typed, trust_pickle=True) as s:
        assert s.get_object("a.bpmn#p") == {"x": [1, 2]}
        assert s.get_object("p") == {"x": [1, 2]}
        got = s.get_object("q")["arr"]
        assert got.tolist() == list(range(6)) and got.dtype == np.int32
        assert s.get_object("plain") == b"abc"  # a record without metadata is raw
        assert s.get_object("c#raw") == b"\x00\x01"
        m = s.meta("p")
        assert (m.codec, m.producer, m.meta, m.content_type) == ("json", "tool 1.0", {"file": "a.bpmn"},
                                                                 "application/json")
        assert s.meta("c#raw").content_type == "application/x-thing"
        assert s.meta("plain").codec == "raw"
        # json.loads accepts what get_bytes returns (it refuses a memoryview)
        assert json.loads(s.get_bytes("p")) == {"x": [1, 2]}
        assert s.aliases() == {"both": ["a.bpmn#p", "b.bpmn#q"], "p": ["a.bpmn#p"], "q": ["b.bpmn#q"]}
        assert s.get_object("p") is s.get_object("p")  # cached


def test_pickle_is_refused_unless_trusted(typed):
    with WorkflowStore(typed) as s:
        with pytest.raises(UntrustedPickleError, match=r"'b.bpmn#q' is a pickle.*trust_pickle=True"):
            s.get_object("q")
        assert s.get_object("p") == {"x": [1, 2]}  # other codecs need no trust


def test_ambiguous_alias_lists_every_record_and_unknown_names_nearest(typed):
    with WorkflowStore(typed) as s:
        with pytest.raises(AmbiguousKeyError, match=r"'both' is an alias of 2 records: 'a.bpmn#p', 'b.bpmn#q'"):
            s.get_object("both")
        assert isinstance(AmbiguousKeyError("x"), KeyError)
        with pytest.raises(StoreKeyError, match=r"key 'pp' is not in the store \(neither a key nor an alias\); "
                                                 r"nearest: 'p'"):
            s.resolve("pp")
        with pytest.raises(StoreKeyError):
            s.get_object(RESERVED_PREFIX + b"manifest")  # reserved records are not objects


def test_alias_equal_to_another_key_is_refused(tmp_path):
    path = tmp_path / "x.kst"
    with pytest.raises(DuplicateKeyError, match=r"alias 'other' of 'k' is also the key of another record"):
        with WorkflowStoreWriter(path) as w:
            w.add("other", b"1")
            w.add("k", b"2", aliases=["other"])
    assert not path.exists()


@pytest.mark.parametrize("how", ["meta", "plain"])
def test_reserved_keys_are_refused(tmp_path, how):
    with pytest.raises(StoreError, match="reserved prefix"):
        with WorkflowStoreWriter(tmp_path / "x.kst") as w:
            w.add("k", b"1", codec="raw")
            if how == "meta":
                w.add(RESERVED_PREFIX + b"m/k", b"1", codec="raw")
            else:
                w.add(RESERVED_PREFIX + b"m/k", b"1")


def test_bad_arguments(tmp_path):
    with WorkflowStoreWriter(tmp_path / "x.kst") as w:
        with pytest.raises(ValueError, match="unknown codec 'yaml'; accepted: raw, json, pickle5"):
            w.add("k", b"1", codec="yaml")
        with pytest.raises(TypeError, match="JSON-serialisable"):
            w.add("k", b"1", meta={"x": object()})
        with pytest.raises(TypeError, match="codec 'raw' stores bytes-like values, got dict"):
            w.add("k", {}, codec="raw")
        w.add("k", b"1", codec="raw")  # nothing was half-added by the failures above
    assert WorkflowStore(tmp_path / "x.kst").get_object("k") == b"1"


def test_old_store_without_manifest_reads_as_before(tmp_path):
    path = tmp_path / "old.kst"
    with WorkflowStoreWriter(path) as w:
        w.add("a", b'{"v": 1}')
    with WorkflowStore(path) as s:
        assert list(s) == [b"a"]  # no layer records when no metadata was given
        assert s.get_object("a") == b'{"v": 1}'
        assert s.get_decoded("a") == {"v": 1}


def test_pickle5_out_of_band_buffers_are_zero_copy_views():
    arr = np.arange(1000, dtype=np.float64)
    data = encode({"a": arr}, "pickle5")
    assert len(data) < arr.nbytes + 400  # the array's bytes appear once, outside the pickle
    back = decode(memoryview(data), "pickle5")["a"]
    assert np.array_equal(back, arr) and not back.flags.writeable


@pytest.mark.parametrize("bad", [b"", b"\x01\x00\x00\x00" + b"\xff" * 8, b"\xff\xff\xff\xff" + bytes(8),
                                 b"\x00\x00\x00\x00\x05" + bytes(7) + b"abc"])
def test_malformed_pickle5_frames_are_corrupt_errors(bad):
    with pytest.raises(StoreCorruptError, match="pickle5 frame"):
        decode(bad, "pickle5")


def test_undecodable_json_record_is_a_corrupt_error(tmp_path):
    path = tmp_path / "x.kst"
    with WorkflowStoreWriter(path) as w:
        w.add("k", {"a": 1}, codec="json")
    raw = bytearray(path.read_bytes())
    with WorkflowStore(path) as s:
        view = s.get("k")
        assert bytes(view) == b'{"a":1}'
    # a store whose metadata says json but whose value is not: rebuilt by hand
    with WorkflowStoreWriter(tmp_path / "y.kst") as w:
        w.add("k", b"{not json", codec="raw")
        w._layer.meta[b"k"] = b'{"codec":"json"}'
    with WorkflowStore(tmp_path / "y.kst") as s:
        with pytest.raises(StoreCorruptError, match=r"'k'.*does not decode as json"):
            s.get_object("k")
    assert raw  # the first file was fine


def test_cache_is_bounded(tmp_path):
    path = tmp_path / "x.kst"
    with WorkflowStoreWriter(path) as w:
        for i in range(20):
            w.add(f"k{i}", {"i": i}, codec="json")
    with WorkflowStore(path, cache_size=4) as s:
        for i in range(20):
            assert s.get_object(f"k{i}") == {"i": i}
        assert len(s._cache) == 4


# ---------------------------------------------------------------- store build --key


@pytest.fixture
def defs(tmp_path):
    src = tmp_path / "defs"
    (src / "billing").mkdir(parents=True)
    (src / "shipping").mkdir()
    (src / "billing" / "invoice.json").write_text('{"id": "inv"}')
    (src / "shipping" / "invoice.json").write_text('{"id": "ship"}')
    return src


def test_key_template(defs, tmp_path, capsys):
    out = tmp_path / "s.kst"
    assert main(["store", "build", str(defs), "-o", str(out), "--key", "{dir}:{stem}"]) == 0
    assert sorted(WorkflowStore(out)) == [b"billing:invoice", b"shipping:invoice"]
    assert main(["store", "build", str(defs), "-o", str(out), "--key", "{relpath}#{id}", "--key-field", "id"]) == 0
    assert sorted(WorkflowStore(out)) == [b"billing/invoice.json#inv", b"shipping/invoice.json#ship"]


def test_key_collision_names_both_files_and_builds_nothing(defs, tmp_path, capsys):
    out = tmp_path / "s.kst"
    assert main(["store", "build", str(defs), "-o", str(out), "--key", "{stem}"]) == 2
    err = capsys.readouterr().err
    assert (f"key 'invoice' comes from two files: {defs / 'billing' / 'invoice.json'} and "
            f"{defs / 'shipping' / 'invoice.json'}") in err
    assert not out.exists()
    assert main(["store", "build", str(defs), "-o", str(out), "--key", "{stem}", "--last-wins"]) == 0
    err = capsys.readouterr().err
    assert (f"--last-wins: key 'invoice': '{defs / 'shipping' / 'invoice.json'}' replaced "
            f"'{defs / 'billing' / 'invoice.json'}'") in err
    assert json.loads(WorkflowStore(out).get_bytes("invoice")) == {"id": "ship"}


@pytest.mark.parametrize(("template", "message"), [
    ("{nope}", "names the field {nope}; accepted: {relpath}"),
    ("fixed", "names no field"),
    ("{id}", "needs --key-regex or --key-field"),
    ("{", "is not a valid template"),
])
def test_bad_key_templates(defs, tmp_path, capsys, template, message):
    assert main(["store", "build", str(defs), "-o", str(tmp_path / "s.kst"), "--key", template]) == 2
    assert message in capsys.readouterr().err
    assert issubclass(KeyTemplateError, ValueError)


def test_store_list_hides_the_layer_records(typed, capsys):
    assert main(["store", "list", str(typed)]) == 0
    assert capsys.readouterr().out.split() == ["plain", "a.bpmn#p", "b.bpmn#q", "c#raw"]
    assert main(["store", "list", "--all", str(typed)]) == 0
    assert "manifest" in capsys.readouterr().out


def test_the_layer_works_in_a_compressed_store(tmp_path):
    path = tmp_path / "z.kst"
    with WorkflowStoreWriter(path, compress=3) as w:
        w.add("a#p", {"x": 1}, codec="json", aliases=["p"], meta={"m": 1})
        w.add("b#q", [1, 2], codec="pickle5", aliases=["q"])
    with WorkflowStore(path, trust_pickle=True) as s:
        assert s.get_object("p") == {"x": 1} and s.get_object("q") == [1, 2]
        assert s.meta("p").meta == {"m": 1}
        assert s.aliases() == {"p": ["a#p"], "q": ["b#q"]}
        assert s.get_bytes("p") == b'{"x":1}'
        assert s.verify() == len(s)


def test_a_newer_record_layer_is_refused(tmp_path):
    from knhk_memory.errors import StoreVersionError
    from knhk_memory.records import MANIFEST_KEY

    path = tmp_path / "future.kst"
    with WorkflowStoreWriter(path) as w:
        w.add("k", b"1")
        w.add(b"x", b"2")
    # a file written by a future layer: its manifest says layer 2
    with WorkflowStoreWriter(path) as w:
        w.add("k", b"1")
        w.add(MANIFEST_KEY, b'{"layer": 2, "producer": "knhk-memory 9"}')
    with WorkflowStore(path) as s:
        with pytest.raises(StoreVersionError, match=r"record layer 2 \(written by knhk-memory 9\) is newer than "
                                                    r"this reader's layer 1"):
            s.get_object("k")
        assert bytes(s.get("k")) == b"1"  # the plain API is unaffected
