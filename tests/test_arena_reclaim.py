"""Arenas reclaim memory chunk by chunk (issue 22, item 2): a few live arrays
pin only their own chunks, so resident memory under a straggler workload stays
flat instead of growing with every batch."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import textwrap
import threading

import numpy as np

from knhk_memory.arena import Arena

STRAGGLERS = textwrap.dedent("""
    import gc, json, os, numpy as np
    from knhk_memory.arena import Arena

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    a = Arena(64 * 1024)
    kept, peak_reserved, peak_pinned, start = [], 0, 0, None
    for batch in range({batches}):
        with a.scope():
            arrays = [np.ones(1024) for _ in range(32)]          # 32 x 8 KiB per batch
        kept += arrays[:2]                                       # two stragglers per batch ...
        del kept[:-4]                                            # ... each living two batches
        del arrays
        a.reset()
        st = a.stats()
        peak_reserved = max(peak_reserved, st.bytes_reserved)
        peak_pinned = max(peak_pinned, st.pinned_chunks)
        if batch == 50:
            start = rss()
    gc.collect()
    print(json.dumps({{"rss_growth": rss() - start, "peak_reserved": peak_reserved, "peak_pinned": peak_pinned,
                      "resets": a.stats().resets, "ok": all((k == 1).all() for k in kept)}}))
""")


def test_stragglers_pin_their_chunks_and_resident_memory_stays_flat():
    out = subprocess.run([sys.executable, "-c", STRAGGLERS.format(batches=2000)], capture_output=True, text=True,
                         check=True, timeout=300)
    r = json.loads(out.stdout)
    assert r["ok"] and r["resets"] == 2000  # every reset went through
    # Live data: 4 x 8 KiB; a batch: 256 KiB. Bounded by a few chunks, not 2,000 batches' worth.
    assert r["peak_pinned"] <= 4, r
    assert r["peak_reserved"] <= 4 * 1024 * 1024, r
    assert r["rss_growth"] < 32 * 1024 * 1024, r  # before: 1.5 GiB over 2,000 batches


def test_blocks_freed_by_another_thread_come_back_to_the_owner():
    """Producer/consumer: the owner makes batches, a consumer thread drops them later."""
    a = Arena(64 * 1024)
    q: queue.Queue = queue.Queue(maxsize=8)

    def consume() -> None:
        while (item := q.get()) is not None:
            del item

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    peak = 0
    try:
        for _ in range(500):
            with a.scope():
                batch = [np.ones(512) for _ in range(16)]
            q.put(batch)
            del batch
            a.reset()
            peak = max(peak, a.stats().bytes_reserved)
    finally:
        q.put(None)
        t.join(timeout=60)
    # up to ~10 batches of 64 KiB alive in the queue at once: their chunks, and no growth beyond
    assert peak <= 2 * 1024 * 1024, peak
    st = a.stats()
    assert st.live_blocks == 0 and st.pinned_chunks == 0 and st.pinned_bytes == 0
    assert st.resets == 500


def test_a_pinned_chunk_is_reused_after_its_last_block_goes():
    a = Arena(4096, max_chunk_size=4096)
    v = a.alloc(1024)
    a.reset()
    assert a.stats().pinned_chunks == 1
    calls = a.stats().backend_calls
    w = a.alloc(1024)  # the pinned chunk is not usable yet: a new chunk
    assert a.stats().backend_calls == calls + 1
    del v, w
    a.reset()
    st = a.stats()
    assert st.pinned_chunks == 0 and st.chunks == 2  # both kept as spares (retention: twice the need)
    before = st.backend_calls
    x, y = a.alloc(1024), a.alloc(1024)  # served from the spares: no backend call
    assert a.stats().backend_calls == before
    del x, y


def test_close_returns_what_no_block_uses_at_once():
    from knhk_memory import get_backend

    backend = get_backend("system")
    a = Arena(4096, backend=backend)
    keep = a.alloc(100)
    with a.scope():
        junk = [np.ones(256) for _ in range(20)]
    del junk
    live_before = backend.stats().live_bytes
    a.close()
    freed = live_before - backend.stats().live_bytes
    assert freed > 0  # the chunks the dropped arrays used
    keep[:3] = b"abc"
    assert bytes(keep[:3]) == b"abc"
    del keep
