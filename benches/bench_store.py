"""Workflow store against lmdb, sqlite3, pure-cdb and json.load, in the same run.

Two ways to run it:

- ``bash scripts/dev.sh bench -k store`` (pytest-benchmark): lookup and build
  rounds side by side; compare the rows of one run.
- ``.venv/bin/python benches/bench_store.py`` prints every figure of
  docs/store.md as medians with ratios (store / peer): lookup latency, open
  time in a new process with a warm page cache (1,000 / 100,000 / 1,000,000
  records), build time and file size.

Data: keys ``workflow/0000123``, values ~600 bytes of JSON-like text that
differ per record (``--small`` values of ~64 bytes for the 1M open-time files,
so the million-record run stays small on disk). Peers: ``lmdb`` (get with
``buffers=True`` inside one read transaction), ``sqlite3`` (a WITHOUT ROWID
table, prepared SELECT), ``pure-cdb`` (``cdblib.Reader64`` over an mmap), and
``json.load`` of one file into a dict.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from knhk_memory.store import WorkflowStore, WorkflowStoreWriter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.store_flood import flooding_keys

N = 100_000
# Issue 15's flooding case: 4,000 keys, 1,000 of them found by brute force to
# share one home slot under a guessed hash key (0).
FLOOD_ORDINARY, FLOOD_AIMED = 3_000, 1_000


def make_records(n: int, value_size: int = 600, seed: int = 6) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    words = [b"task", b"gateway", b"timer", b"join", b"split", b"approve", b"notify", b"retry", b"escalate"]
    out = []
    for i in range(n):
        head = b'{"id":"wf-%d","version":%d,"steps":[' % (i, rng.randrange(100))
        body = bytearray(head)
        while len(body) < value_size - 2:
            body += b'{"op":"%s","n":%d},' % (rng.choice(words), rng.randrange(10**6))
        out.append((b"workflow/%07d" % i, bytes(body[:value_size - 2]) + b"]}"))
    return out


# ---------------------------------------------------------------- builders


def build_store(path: Path, records) -> None:
    with WorkflowStoreWriter(path) as w:
        add = w.add
        for k, v in records:
            add(k, v)


def build_lmdb(path: Path, records) -> None:
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 34, subdir=False, lock=False, sync=True)
    with env.begin(write=True) as txn:
        put = txn.put
        for k, v in records:
            put(k, v)
    env.sync(True)
    env.close()


def build_sqlite(path: Path, records) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("CREATE TABLE wf (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")
    con.executemany("INSERT INTO wf VALUES (?, ?)", records)
    con.commit()
    con.close()


def build_cdb(path: Path, records) -> None:
    import cdblib

    with open(path, "wb") as f:
        w = cdblib.Writer64(f)
        for k, v in records:
            w.put(k, v)
        w.finalize()
        f.flush()
        os.fsync(f.fileno())


def build_json(path: Path, records) -> None:
    with open(path, "w") as f:
        json.dump({k.decode(): v.decode() for k, v in records}, f)
        f.flush()
        os.fsync(f.fileno())


BUILDERS = {"store": build_store, "lmdb": build_lmdb, "sqlite3": build_sqlite, "cdb": build_cdb,
            "json": build_json}


# ---------------------------------------------------------------- readers: (open, get)


def open_reader(name: str, path: Path):
    """Return (get, close) with get(key: bytes) -> value or None."""
    if name == "store":
        s = WorkflowStore(path)
        return s.get, s.close
    if name == "lmdb":
        import lmdb

        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
        txn = env.begin(buffers=True)
        return txn.get, lambda: (txn.abort(), env.close())
    if name == "sqlite3":
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        cur = con.cursor()
        q = "SELECT v FROM wf WHERE k = ?"

        def get(k):
            row = cur.execute(q, (k,)).fetchone()
            return row[0] if row else None
        return get, con.close
    if name == "cdb":
        import cdblib

        f = open(path, "rb")  # noqa: SIM115 - stays open under the mmap until the close callback
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        r = cdblib.Reader64(m)
        return r.get, lambda: (f.close())
    if name == "json":
        with open(path) as f:
            d = json.load(f)
        return (lambda k: d.get(k.decode())), lambda: None
    raise ValueError(name)


OPEN_SNIPPET = """
import sys, time
sys.path.insert(0, {bench_dir!r})
import bench_store as b
{imports}
t0 = time.perf_counter()
get, close = b.open_reader({name!r}, b.Path({path!r}))
v = get({key!r})
t1 = time.perf_counter()
assert v is not None
print(t1 - t0)
"""

PRE_IMPORT = {"store": "import knhk_memory.store", "lmdb": "import lmdb", "sqlite3": "import sqlite3",
              "cdb": "import cdblib", "json": "import json"}


OPEN_ROUNDS = 3  # the open-time-by-size section (docs/store.md)


def open_time(name: str, path: Path, key: bytes, repeats: int = 5) -> float:
    """Median seconds to open and read one key, in a fresh process (imports done before timing)."""
    code = OPEN_SNIPPET.format(bench_dir=str(Path(__file__).parent), imports=PRE_IMPORT[name], name=name,
                               path=str(path), key=key)
    times = []
    for _ in range(repeats + 1):  # the first run warms the page cache
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip()))
    return statistics.median(times[1:])


def lookup_ns(get, keys: list[bytes], repeats: int = 7) -> float:
    for k in keys:  # warm: page faults, first-read checksums
        get(k)
    per = []
    for _ in range(repeats):
        t = time.perf_counter()
        for k in keys:
            get(k)
        per.append((time.perf_counter() - t) / len(keys) * 1e9)
    return statistics.median(per)


# ---------------------------------------------------------------- pytest-benchmark


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_store")
    records = make_records(N)
    paths = {}
    for name, builder in BUILDERS.items():
        paths[name] = d / f"data.{name}"
        builder(paths[name], records)
    keys = [k for k, _ in records]
    random.Random(1).shuffle(keys)
    return paths, keys[:20_000], records


@pytest.mark.parametrize("name", list(BUILDERS))
def test_lookup_random_keys(benchmark, dataset, name):
    paths, keys, _ = dataset
    get, close = open_reader(name, paths[name])
    try:
        for k in keys:
            get(k)
        benchmark.group = "store: 20,000 random lookups of 100,000 records"
        # lmdb, the mmap'd key-value store an engine would otherwise reach for, is the peer
        benchmark.extra_info.update(label=name, peer=name == "lmdb", ops=len(keys))
        benchmark(lambda: [get(k) for k in keys])
    finally:
        close()


@pytest.mark.parametrize("name", ["store", "lmdb", "cdb"])
def test_build(benchmark, dataset, tmp_path, name):
    _, _, records = dataset
    benchmark.group = "store: build 100,000 records"
    benchmark.extra_info.update(label=name, peer=name == "lmdb", ops=len(records))
    benchmark.pedantic(lambda: BUILDERS[name](tmp_path / f"b.{name}", records), rounds=2, iterations=1,
                       setup=lambda: [p.unlink() for p in tmp_path.glob("b.*")] and None)


# ---------------------------------------------------------------- hash flooding


def flood_dataset(d: Path) -> dict[str, object]:
    """A store of 3,000 ordinary and 1,000 aimed keys (built with its own
    random hash key), and the same keys in a store built with the key they
    were aimed at (the build's displacement bound lifted, to show what the
    version-1 format's fixed public seed allowed)."""
    import knhk_memory.store as store_mod

    ordinary = [b"workflow/%07d" % i for i in range(FLOOD_ORDINARY)]
    slots = -(-(FLOOD_ORDINARY + FLOOD_AIMED) * 1000 // 875)
    aimed = flooding_keys(FLOOD_AIMED, slots, hash_key=0)
    value = b"x" * 64
    keyed, fixed = d / "flood.kst", d / "flood-aimed.kst"
    with WorkflowStoreWriter(keyed) as w:
        for k in ordinary + aimed:
            w.add(k, value)
    bound = store_mod.max_displacement_bound
    store_mod.max_displacement_bound = lambda slots: slots
    try:
        with WorkflowStoreWriter(fixed, hash_key=0) as w:
            for k in ordinary + aimed:
                w.add(k, value)
    finally:
        store_mod.max_displacement_bound = bound
    absent = [b"absent/%09d" % i for i in range(FLOOD_AIMED)]
    return {"keyed": keyed, "fixed": fixed, "ordinary": ordinary, "aimed": aimed, "absent": absent}


@pytest.fixture(scope="module")
def flood(tmp_path_factory):
    return flood_dataset(tmp_path_factory.mktemp("bench_flood"))


@pytest.mark.parametrize("keys", ["ordinary", "aimed", "absent"])
def test_lookup_flooding_keys(benchmark, flood, keys):
    """Lookups of 1,000 keys of each kind in the store with its own random hash
    key: the aimed keys must cost at most 1.5x the ordinary ones."""
    s = WorkflowStore(flood["keyed"])
    ks = flood[keys][:FLOOD_AIMED]
    get = s.get
    try:
        benchmark.group = "store: 1,000 lookups, flooding key set vs ordinary keys (random hash key)"
        benchmark.extra_info.update(label=keys, peer=keys == "ordinary", ops=len(ks),
                                    max_displacement=s.stats()["max_displacement"])
        benchmark(lambda: [get(k) for k in ks])
    finally:
        s.close()


def flood_report(d: Path) -> None:
    f = flood_dataset(d)
    print(f"\n## hash flooding: {FLOOD_ORDINARY:,} ordinary keys + {FLOOD_AIMED:,} aimed at one home slot "
          "(hash key 0)")
    print("| store | max displacement | ordinary ns | aimed ns | absent ns | aimed / ordinary | absent / ordinary |")
    print("|---|---|---|---|---|---|---|")
    for label, path in (("own random key", f["keyed"]), ("the aimed-at key (bound lifted)", f["fixed"])):
        s = WorkflowStore(path)
        ns = {}
        for _ in range(3):  # interleaved rounds, medians of medians
            for kind in ("ordinary", "aimed", "absent"):
                ns.setdefault(kind, []).append(lookup_ns(s.get, f[kind][:FLOOD_AIMED], repeats=5))
        m = {k: statistics.median(v) for k, v in ns.items()}
        print(f"| {label} | {s.stats()['max_displacement']} | {m['ordinary']:.0f} | {m['aimed']:.0f} | "
              f"{m['absent']:.0f} | {m['aimed'] / m['ordinary']:.2f} | {m['absent'] / m['ordinary']:.2f} |")
        s.close()


# ---------------------------------------------------------------- report


def report() -> None:
    print(f"# bench_store {time.strftime('%Y-%m-%d')} python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=os.environ.get("BENCH_DIR")) as tmp:
        d = Path(tmp)
        records = make_records(N)
        kv = sum(len(k) + len(v) for k, v in records)
        keys = [k for k, _ in records]
        random.Random(1).shuffle(keys)
        print(f"\n## 100,000 records, keys+values {kv} bytes")
        print("| peer | build s | size bytes | size / (k+v) | get ns | open ms (new process) |")
        print("|---|---|---|---|---|---|")
        rows = {}
        for name, builder in BUILDERS.items():
            p = d / f"data.{name}"
            bt = []
            for _ in range(3 if name != "json" else 1):
                if p.exists():
                    p.unlink()
                t = time.perf_counter()
                builder(p, records)
                bt.append(time.perf_counter() - t)
            size = p.stat().st_size
            get, close = open_reader(name, p)
            ns = lookup_ns(get, keys[:20_000])
            close()
            ot = open_time(name, p, keys[0]) * 1e3
            rows[name] = (statistics.median(bt), size, ns, ot)
            print(f"| {name} | {rows[name][0]:.3f} | {size} | {size / kv:.4f} | {ns:.0f} | {ot:.3f} |")
        s = rows["store"]
        print("\nratios store / peer (below 1: the store is faster or smaller)")
        for name, r in rows.items():
            if name != "store":
                print(f"- {name}: build {s[0] / r[0]:.2f}, size {s[1] / r[1]:.3f}, get {s[2] / r[2]:.2f}, "
                      f"open {s[3] / r[3]:.3f}")
        flood_report(d)
        if os.environ.get("BENCH_STORE_QUICK"):
            return
        for n in (1_000, 100_000, 1_000_000):
            recs = make_records(n, value_size=600 if n <= 100_000 else 64)
            print(f"\n## open time, {n:,} records (values {len(recs[0][1])} B): {OPEN_ROUNDS} interleaved rounds "
                  "of the median of 7 fresh processes, median of the rounds")
            paths = {}
            for name in ("store", "lmdb", "cdb", "sqlite3"):
                paths[name] = d / f"open{n}.{name}"
                BUILDERS[name](paths[name], recs)
            rounds: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(OPEN_ROUNDS):  # interleaved: a load change hits every peer alike
                for name, p in paths.items():
                    rounds[name].append(open_time(name, p, recs[n // 2][0], repeats=7) * 1e3)
            times = {k: statistics.median(v) for k, v in rounds.items()}
            for p in paths.values():
                p.unlink()
            print(" | ".join(f"{k} {v:.3f} ms" for k, v in times.items()))
            print("ratios store / peer: " + ", ".join(f"{k} {times['store'] / v:.3f}" for k, v in times.items()
                                                       if k != "store"))


if __name__ == "__main__":
    report()
