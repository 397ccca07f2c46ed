"""Mutate the header of real shared counter blocks and attach to them; count signals and wrong attaches.

A shared block is a file any process with write access can change, so attach
treats it as untrusted input (docs/counters.md, "What a writer of the block can
do"). Each child process makes a real block (``Counters`` with random names,
or ``PatternStats``) in a file under /dev/shm, then, per try, writes a mutated
copy of its header and names over it and calls ``attach``:

- random bytes or flipped bits anywhere in the header and names;
- a field (an offset, a length, a count) set to an extreme value (2**40, 2**63,
  all ones, the mapped size, ...);
- half of the tries then recompute the checksum, as a deliberate writer would,
  so the offset checks themselves are exercised, not just the checksum;
- some tries also truncate the file.

Outcomes: *refused* (``SharedBlockError``, the expected answer to damage),
*accepted* (the block is consistent: for a try that kept the checksum stale,
only when the bytes changed are outside what the checksum covers), *wrong*
(accepted although a covered byte changed and the checksum was not
recomputed, or accepted with names or a count that do not match the bytes),
*unexpected* (any other exception), and *signals* (a child killed by a
signal: SIGSEGV, SIGBUS...). The goal is signals 0, wrong 0, unexpected 0.

Usage: ``python scripts/shm_fuzz.py [--blocks 12000] [--children 8] [--seed N]``;
prints one JSON object. tests/test_shared_block_fuzz.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
from typing import Any

# (offset, width) of block_header's fields, native/counters.c: magic, version,
# cache_line, flavor, count, slots, names_len; slot_stride, names_off, base_off,
# owners_off, cells_off, total_size.
HEADER_FIELDS = [
    (0, 8), (8, 4), (12, 4), (16, 4), (20, 4), (24, 4), (28, 4),
    (32, 8), (40, 8), (48, 8), (56, 8), (64, 8), (72, 8),
]
CHECKSUM_AT, READY_AT, NAMES_AT = 80, 88, 128
EXTREMES = [0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1, 2**64 - 128, 127, 128]


def fnv(data: bytes, h: int = 0xCBF29CE484222325) -> int:
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def checksum(buf: bytes | bytearray) -> int:
    """The header checksum as the C core computes it, over the header's names_len."""
    names_len = struct.unpack_from("<I", buf, 28)[0]
    names_off = struct.unpack_from("<Q", buf, 40)[0]
    h = fnv(bytes(buf[:CHECKSUM_AT]))
    if names_off + names_len <= len(buf):
        h = fnv(bytes(buf[names_off:names_off + names_len]), h)
    return h


def child(seed: int, tries: int, directory: str, out_fd: int) -> None:
    import knhk_memory as km

    rng = random.Random(seed)
    stats = {"tries": 0, "refused": 0, "accepted": 0, "wrong": 0, "unexpected": 0, "unexpected_examples": []}
    path = os.path.join(directory, f"block-{seed}")
    kind = km.PatternStats if seed % 3 == 0 else km.Counters
    if kind is km.Counters:
        names = [f"c{i}_{rng.randrange(10**6)}" for i in range(rng.randint(1, 40))]
        block: Any = km.Counters(names, shared=path)
        block.add(0, 5)
    else:
        block = km.PatternStats(shared=path)
        block.record(2, 100)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        names_len = struct.unpack_from("<I", f.read(32), 28)[0]
    region = NAMES_AT + names_len  # header and names: what attach reads before trusting
    fd = os.open(path, os.O_RDWR)
    original = os.pread(fd, region, 0)
    covered = set(range(READY_AT + 4)) | set(range(NAMES_AT, region))
    covered -= set(range(CHECKSUM_AT, CHECKSUM_AT + 8))  # the checksum itself: a change there is caught too
    covered |= set(range(CHECKSUM_AT, CHECKSUM_AT + 8))
    for _ in range(tries):
        buf = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            how = rng.random()
            if how < 0.35:
                buf[rng.randrange(region)] = rng.randrange(256)
            elif how < 0.6:
                i = rng.randrange(region)
                buf[i] ^= 1 << rng.randrange(8)
            else:
                off, width = rng.choice(HEADER_FIELDS)
                v = rng.choice([*EXTREMES, size, size + 8, size - 8, rng.randrange(2 ** (8 * width))])
                buf[off:off + width] = (v % 2 ** (8 * width)).to_bytes(width, "little")
        forged = rng.random() < 0.5
        if forged:  # a deliberate writer: a valid checksum over the damaged header
            buf[CHECKSUM_AT:CHECKSUM_AT + 8] = checksum(buf).to_bytes(8, "little")
        truncate = rng.random() < 0.1
        os.pwrite(fd, bytes(buf), 0)
        if truncate:
            os.ftruncate(fd, rng.randrange(1, size))
        changed = {i for i in range(region) if buf[i] != original[i]}
        stats["tries"] += 1
        try:
            b = kind.attach(path)
        except km.SharedBlockError:
            stats["refused"] += 1
        except Exception as exc:
            stats["unexpected"] += 1
            if len(stats["unexpected_examples"]) < 5:
                stats["unexpected_examples"].append(f"{type(exc).__name__}: {exc}")
        else:
            ok = True
            if not forged and changed & covered:
                ok = False  # damage the checksum covers, and it was let through
            else:
                # Consistent with the bytes: the names it reports are the names region's.
                n = struct.unpack_from("<I", buf, 20)[0]
                nl = struct.unpack_from("<I", buf, 28)[0]
                got = b"".join(x.encode() + b"\0" for x in b._names)
                ok = len(b._names) == n and got == bytes(buf[NAMES_AT:NAMES_AT + nl]) and not truncate
                if kind is km.Counters:
                    b.values()
                    b.add(0, 1)
                    b.add(0, -1)
                else:
                    b.as_dict()
            b.close()
            del b
            stats["accepted" if ok else "wrong"] += 1
        if truncate:
            os.ftruncate(fd, size)
        os.pwrite(fd, original, 0)
    os.close(fd)
    block.close()
    os.write(out_fd, json.dumps(stats).encode())


def run(blocks: int, children: int, seed: int) -> dict[str, Any]:
    import knhk_memory  # noqa: F401 - imported once; the children inherit it

    t0 = time.monotonic()
    total = {"mutated_blocks": 0, "refused": 0, "accepted": 0, "wrong": 0, "unexpected": 0, "signals": 0,
             "lost_children": 0, "unexpected_examples": []}
    per = -(-blocks // children)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        procs = []
        for k in range(children):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                code = 1
                try:
                    child(seed + k, per, d, w)
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            procs.append((pid, r, seed + k))
        for pid, r, s in procs:
            data = b""
            while chunk := os.read(r, 65536):
                data += chunk
            os.close(r)
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                total["signals"] += 1
                total.setdefault("signalled", []).append(
                    {"seed": s, "signal": signal.Signals(os.WTERMSIG(status)).name})
            if not data:
                total["lost_children"] += 1
                continue
            st = json.loads(data)
            total["mutated_blocks"] += st["tries"]
            for key in ("refused", "accepted", "wrong", "unexpected"):
                total[key] += st[key]
            total["unexpected_examples"] += st["unexpected_examples"]
    total["seconds"] = round(time.monotonic() - t0, 1)
    total["seed"] = seed
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=12000, help="mutated blocks in all (default 12000)")
    ap.add_argument("--children", type=int, default=8, help="child processes (default 8)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    report = run(args.blocks, args.children, seed)
    print(json.dumps(report), flush=True)
    bad = report["signals"] or report["wrong"] or report["unexpected"] or report["lost_children"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
