"""The decompression cap (issue 22, item 4): a small compressed value that would
grow past the reader's cap is a store error before anything is allocated."""

from __future__ import annotations

import resource

import pytest
import zstandard

from knhk_memory.errors import StoreCorruptError
from knhk_memory.store import MAX_VALUE_BYTES, WorkflowStore, WorkflowStoreWriter


def test_the_default_cap_refuses_a_gigabyte_from_a_small_file(tmp_path):
    path = tmp_path / "bomb.kst"
    with WorkflowStoreWriter(path, compress=19) as w:
        w.add("small", b'{"ok": true}')
        w.add("bomb", bytes(80 * 1024 * 1024))  # 80 MiB of zeros: a few KiB compressed
    assert path.stat().st_size < 256 * 1024
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with WorkflowStore(path) as s:
        assert bytes(s.get("small")) == b'{"ok": true}'
        for read in (lambda: s.get("bomb"), lambda: s.get_bytes("bomb"), lambda: s["bomb"]):
            with pytest.raises(StoreCorruptError, match=rf"the value of key 'bomb' would decompress to "
                                                        rf"83,886,080 bytes, past the cap of {MAX_VALUE_BYTES:,} "
                                                        r"\(max_value_bytes, \[store\] max_value_bytes\)"):
                read()
    # Nothing near 80 MiB was allocated to find that out (ru_maxrss is in KiB).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 40 * 1024
    with WorkflowStore(path, max_value_bytes=100 * 1024 * 1024) as s:  # a reader that expects it
        assert len(s.get_bytes("bomb")) == 80 * 1024 * 1024


def test_a_frame_without_a_recorded_size_stops_at_the_cap(tmp_path):
    path = tmp_path / "s.kst"
    with WorkflowStoreWriter(path, compress=3) as w:
        w.add("v", b"x")
    with WorkflowStore(path, max_value_bytes=1000) as s:
        frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(5000))
        assert zstandard.frame_content_size(frame) == -1
        with pytest.raises(StoreCorruptError, match=r"decompresses to more than the cap of 1,000 bytes"):
            s._decompress(s._gen, b"k", frame)
        small = zstandard.ZstdCompressor(write_content_size=False).compress(b"abc")
        assert s._decompress(s._gen, b"k", small) == b"abc"


@pytest.mark.parametrize(("bad", "kind"), [(0, ValueError), (-1, ValueError), (2**40 + 1, ValueError),
                                           (1.5, TypeError), (True, TypeError), ("64", TypeError)])
def test_a_bad_cap_is_refused(tmp_path, bad, kind):
    path = tmp_path / "s.kst"
    with WorkflowStoreWriter(path) as w:
        w.add("v", b"x")
    with pytest.raises(kind) as info:
        WorkflowStore(path, max_value_bytes=bad)
    shown = repr(bad) if kind is ValueError else f"{type(bad).__name__} {bad!r}"
    assert str(info.value) == ("WorkflowStore: max_value_bytes must be an int from 1 to 1,099,511,627,776 (bytes), "
                               f"got {shown}")
