"""Hash-flooding key sets for the workflow store (tests and benches/bench_store.py).

An attacker who knows the index hash (its algorithm *and* its key) can pick
keys whose home slot is the same: every one lands in slot 0 and the longest
probe grows to the number of keys. This finds such keys by brute force, as
the issue did for the version-1 format's fixed public seed.
"""

from __future__ import annotations

import numpy as np

from knhk_memory._core import ffi, lib
from knhk_memory.store import DEFAULT_SEED


def candidate_keys(start: int, count: int, prefix: bytes = b"flood/") -> tuple[bytes, int]:
    """``count`` keys ``prefix + 10 digits`` from ``start``, back to back, and their length."""
    ids = np.arange(start, start + count, dtype=np.int64)
    digits = ((ids[:, None] // (10 ** np.arange(9, -1, -1, dtype=np.int64))) % 10 + 48).astype(np.uint8)
    pre = np.frombuffer(prefix, dtype=np.uint8)
    keys = np.hstack([np.broadcast_to(pre, (count, len(pre))), digits])
    return np.ascontiguousarray(keys).tobytes(), len(pre) + 10


def flooding_keys(n: int, slots: int, *, hash_key: int = 0, seed: int = DEFAULT_SEED,
                  batch: int = 1 << 20) -> list[bytes]:
    """``n`` keys whose version-2 hash under (hash_key, seed) has home slot 0 of ``slots``."""
    threshold = np.uint64(-(-(1 << 64) // slots) - 1)  # home_slot(h) == 0  <=>  h * slots < 2**64
    found: list[bytes] = []
    start = 0
    lens = np.full(batch, 16, dtype=np.uint64)
    hashes = np.empty(batch, dtype=np.uint64)
    while len(found) < n:
        kb, width = candidate_keys(start, batch)
        lens[:] = width
        status = lib.knhk_store_key_hashes(ffi.from_buffer("uint8_t[]", kb), len(kb),
                                           ffi.from_buffer("uint64_t[]", lens), batch, hash_key, seed,
                                           ffi.from_buffer("uint64_t[]", hashes))
        assert status == lib.KNHK_OK
        for i in np.flatnonzero(hashes <= threshold).tolist():
            found.append(kb[i * width:(i + 1) * width])
        start += batch
    return found[:n]
