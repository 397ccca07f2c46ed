"""knhk-memory on Dask distributed (knhk_memory.distributed, `knhk-memory demo --cluster`).

One LocalCluster of two worker processes (127.0.0.1 only) serves the module;
the test that kills a worker runs last. What is checked: totals equal a
one-process run for the same seed, each batch merged once even when a worker
is SIGKILLed mid-run, the store shipped by path and by content, and every
refusal (version, store checksum, allocator backend, scheduler address) by
error type and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from knhk_memory.cli import main  # noqa: E402
from knhk_memory.config import load_config  # noqa: E402
from knhk_memory.counters import Counters, PatternStats  # noqa: E402
from knhk_memory.distributed import (  # noqa: E402
    BatchResults,
    KnhkWorkerPlugin,
    NodeBlocks,
    StoreArtifact,
    _pull_store,
    connect,
    parse_cluster,
    register,
    stage_store,
    unstage_store,
    worker_state,
)
from knhk_memory.errors import (  # noqa: E402
    ClusterError,
    HostError,
    SharedBlockNotFoundError,
    WorkerBackendError,
    WorkerStoreError,
    WorkerVersionError,
)
from knhk_memory.refhost import demo as demo_mod  # noqa: E402

from .conftest import jemalloc_loadable  # noqa: E402

CASES = "12000"
SEED = "5"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "demo.knhk"
    demo_mod.ensure_store(path)
    return path


@pytest.fixture(scope="module")
def worker_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("worker-cache")


@pytest.fixture(scope="module")
def cluster(worker_cache):
    """Two one-thread worker processes on 127.0.0.1; their cache dir is worker_cache."""
    saved = os.environ.get("KNHK_MEMORY_CACHE")
    # The spawned workers inherit it, and so do the replacements the nannies (in this process)
    # start after a kill: it stays set for the module, or a replacement would be another node.
    os.environ["KNHK_MEMORY_CACHE"] = str(worker_cache)
    try:
        client, local = connect("local:2", timeout=30)
        client.wait_for_workers(2, timeout=30)
        yield client, local
        client.close()
        local.close()
    finally:
        if saved is None:
            del os.environ["KNHK_MEMORY_CACHE"]
        else:
            os.environ["KNHK_MEMORY_CACHE"] = saved


@pytest.fixture(scope="module")
def one_worker(store, tmp_path_factory):
    """The reference totals: the same cases and seed in this process, one worker."""
    r = demo_mod.run_demo(load_config(mapping={}), cases=int(CASES), store=str(store), seed=int(SEED),
                          progress=False, budgets=False)
    assert r["ok"], r["checks"]
    return r


def same_totals(r: dict, ref: dict) -> None:
    assert r["ok"], [c for c in r["checks"] if not c["ok"]]
    assert r["counters"] == ref["counters"]
    assert r["events"] == ref["events"] and r["tasks"] == ref["tasks"]
    assert [p["executions"] for p in r["patterns"]] == [p["executions"] for p in ref["patterns"]]
    # the batches are cut by workflow, so the engine runs exactly the one-process batches
    assert r["batches"] == ref["batches"] and r["workflows_run"] == ref["workflows_run"]


def demo_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["demo", "--no-budgets", "--no-progress", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- no cluster needed

@pytest.mark.parametrize("text, message", [
    ("local:0", ("--cluster 'local:0': the worker count must be an integer from 1 to {n}, got '0'; accepted: local, "
                "local:N (N from 1 to {n}) or tcp://HOST:PORT (a running Dask scheduler)")),
    ("local:x", "--cluster 'local:x': the worker count must be an integer from 1 to {n}, got 'x'"),
    ("127.0.0.1:8786", "--cluster must be local, local:N or tcp://HOST:PORT, got '127.0.0.1:8786'; accepted: "),
    ("tcp://127.0.0.1", "--cluster must be local, local:N or tcp://HOST:PORT, got 'tcp://127.0.0.1'"),
    ("tcp://127.0.0.1:70000", "--cluster 'tcp://127.0.0.1:70000': the port must be from 1 to 65535, got 70000"),
])
def test_bad_cluster_values_name_the_value_and_what_is_accepted(capsys, text, message):
    message = message.format(n=8 * (os.cpu_count() or 1))
    with pytest.raises(ClusterError) as info:
        parse_cluster(text)
    assert str(info.value).startswith(message)
    assert main(["demo", "--no-budgets", "--cluster", text]) == 2
    assert capsys.readouterr().err.startswith(f"knhk-memory: error: {message}")


def test_a_scheduler_that_does_not_answer_is_an_error_within_the_timeout(capsys, store):
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    code = main(["demo", "--no-budgets", "--no-progress", "--store", str(store), "--cases", "100",
                 "--cluster", address, "--cluster-timeout", "1"])
    elapsed = time.monotonic() - t0
    assert code == 2
    err = capsys.readouterr().err
    assert f"knhk-memory: error: cannot reach the Dask scheduler at {address} within 1 s" in err
    assert "start one there (`dask scheduler`)" in err
    assert elapsed < 30  # bounded by the timeout, not hung
    with pytest.raises(ClusterError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:\d+ within 0\.5 s"):
        connect(address, timeout=0.5)


@pytest.fixture
def silent_listener():
    """A port that accepts connections and never says a word (what the trial pointed
    --cluster at: a dashboard port, any other service)."""
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(srv.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"tcp://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def test_issue_input_a_port_that_accepts_but_is_no_scheduler_is_an_error_not_a_hang(capsys, store,
                                                                                     silent_listener):
    # Before: the Client waited forever (its timeout bounds only the TCP connect).
    t0 = time.monotonic()
    code = main(["demo", "--no-budgets", "--no-progress", "--store", str(store), "--cases", "100",
                 "--cluster", silent_listener, "--cluster-timeout", "1"])
    assert code == 2 and time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    assert (f"knhk-memory: error: cannot reach the Dask scheduler at {silent_listener} within 1 s (no Dask "
            "scheduler answered there") in err
    with pytest.raises(ClusterError, match=r"within 0\.5 s \(no Dask scheduler answered"):
        connect(silent_listener, timeout=0.5)


def test_a_host_name_that_does_not_resolve_is_named():
    with pytest.raises(ClusterError, match=r"cannot reach the Dask scheduler at tcp://nohost\.invalid:8786: the "
                                           r"host name 'nohost\.invalid' does not resolve"):
        connect("tcp://nohost.invalid:8786", timeout=2)


def test_a_worker_address_is_refused_as_not_a_scheduler(store):
    client, cluster = connect("local:1")
    try:
        worker = next(iter(client.scheduler_info()["workers"]))
        with pytest.raises(ClusterError, match=r"answered as a Dask Worker, not a scheduler; give the scheduler's"):
            connect(worker, timeout=5)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def test_cluster_options_that_do_not_fit_together(capsys, store):
    assert main(["demo", "--no-budgets", "--store", str(store), "--workers", "2", "--cluster", "local:2"]) == 2
    assert "--cluster and --workers are exclusive" in capsys.readouterr().err
    # an explicit --workers 1 too (trial item 10): the default is "not given", not 1
    assert main(["demo", "--no-budgets", "--store", str(store), "--cluster", "local:2", "--workers", "1"]) == 2
    assert ("knhk-memory: error: --cluster and --workers are exclusive: --workers 1 runs local processes"
            in capsys.readouterr().err)
    with pytest.raises(HostError, match="--cluster and --workers are exclusive: --workers 1 "):
        demo_mod.run_demo(load_config(mapping={}), cases=10, store=str(store), cluster="local:1", workers=1)
    assert main(["demo", "--no-budgets", "--store", str(store), "--batch-cases", "10"]) == 2
    assert "knhk-memory: error: --batch-cases applies to --cluster runs only" in capsys.readouterr().err
    # each option named as given (a second trial: --ship-store alone was reported as --batch-cases,
    # and --cluster-timeout without --cluster was silently ignored)
    assert main(["demo", "--no-budgets", "--store", str(store), "--ship-store", "content"]) == 2
    assert "knhk-memory: error: --ship-store applies to --cluster runs only" in capsys.readouterr().err
    assert main(["demo", "--no-budgets", "--store", str(store), "--cluster-timeout", "2"]) == 2
    assert "knhk-memory: error: --cluster-timeout applies to --cluster runs only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--cluster-timeout", "0"])
    assert "--cluster-timeout must be in (0, 3600] seconds, got 0" in capsys.readouterr().err
    with pytest.raises(HostError, match="--batch-cases must be a positive integer, got 0"):
        from knhk_memory.refhost.cluster import run_on_cluster

        run_on_cluster(load_config(mapping={}), store, cases=10, seed=1, sample=frozenset(), cluster="local:1",
                       batch_cases=0)


def test_cluster_without_the_dask_extra_is_a_clear_error(capsys, store, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "knhk_memory.distributed")
    assert main(["demo", "--no-budgets", "--store", str(store), "--cluster", "local:2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("knhk-memory: error: --cluster local:2 needs Dask's distributed scheduler, which is "
                          "not installed")
    assert err.rstrip().endswith("pip install 'knhk-memory[dask]'")


def test_a_scheduler_without_workers_is_an_error_within_the_timeout(store):
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0") as empty:
        with pytest.raises(ClusterError, match=r"the Dask scheduler at tcp://127\.0\.0\.1:\d+ has no workers "
                                               r"\(none joined within 0\.5 s\); start some: dask worker"):
            demo_mod.run_demo(load_config(mapping={}), cases=100, store=str(store), progress=False, budgets=False,
                              cluster=empty.scheduler_address, cluster_timeout=0.5)


def test_store_by_path_refuses_a_file_whose_checksum_differs(tmp_path, store):
    copy = tmp_path / "copy.knhk"
    copy.write_bytes(store.read_bytes())
    art = StoreArtifact.from_path(copy)
    assert art.sha256 == hashlib.sha256(store.read_bytes()).hexdigest() and art.size == store.stat().st_size
    assert art.resolve(address="tcp://w1") == copy
    demo_mod.ensure_store(tmp_path / "other.knhk", count=50)
    os.replace(tmp_path / "other.knhk", copy)  # the worker's file is another store now
    other = hashlib.sha256(copy.read_bytes()).hexdigest()
    with pytest.raises(WorkerStoreError) as info:
        art.resolve(address="tcp://w1")
    msg = str(info.value)
    assert msg.startswith(f"worker tcp://w1: refused the workflow store {copy}: its SHA-256 here is {other}")
    assert f"the client's is {art.sha256}" in msg and info.value.address == "tcp://w1"
    copy.unlink()
    with pytest.raises(WorkerStoreError, match=r"worker tcp://w1: cannot read the workflow store .*copy\.knhk "
                                               r"\(No such file or directory\).*--ship-store content"):
        art.resolve(address="tcp://w1")


def test_store_by_content_is_fetched_once_per_node_and_verified(tmp_path, store):
    art = StoreArtifact.from_path(store, shipping="content")
    # to the workers an artifact is a name, a size and a checksum: the bytes never travel with it
    shipped = pickle.loads(pickle.dumps(art))
    assert shipped.content is None and shipped == art and len(pickle.dumps(art)) < 1024
    fetched = []

    def fetch():
        fetched.append(1)
        return store.read_bytes()

    before = worker_state()
    first = shipped.resolve(cache=tmp_path, address="w", fetch=fetch)
    assert first == tmp_path / "stores" / f"{art.sha256}.knhk" and first.read_bytes() == store.read_bytes()
    assert shipped.resolve(cache=tmp_path, address="w", fetch=fetch) == first  # verified, not fetched again
    after = worker_state()
    assert len(fetched) == 1
    assert after["stores_written"] - before["stores_written"] == 1
    assert after["stores_reused"] - before["stores_reused"] == 1
    first.write_bytes(b"damaged")  # a damaged cached copy is fetched again and replaced
    stale = tmp_path / "stores" / f".{art.sha256}.99999.dead.tmp"
    stale.write_bytes(b"half")  # what a worker killed mid-write leaves: removed under the lock
    assert shipped.resolve(cache=tmp_path, address="w", fetch=fetch).read_bytes() == store.read_bytes()
    assert len(fetched) == 2 and not stale.exists()
    # fetched bytes that do not hash to the client's checksum: refused, nothing written
    first.unlink()
    wrong = b"not the store" * 10
    with pytest.raises(WorkerStoreError) as info:
        shipped.resolve(cache=tmp_path, address="w", fetch=lambda: wrong)
    assert str(info.value) == (f"worker w: the store content fetched for {art.sha256} hashes to "
                               f"{hashlib.sha256(wrong).hexdigest()} ({len(wrong):,} bytes, {art.size:,} expected); "
                               "refusing it")
    assert info.value.address == "w" and not first.exists()
    with pytest.raises(WorkerStoreError, match=f"worker w: the store content fetched for {art.sha256} is a str, "
                                               "not bytes; refusing it"):
        shipped.resolve(cache=tmp_path, address="w", fetch=lambda: "text")
    with pytest.raises(WorkerStoreError, match=f"worker w: the workflow store {art.sha256} is not in this node's "
                                               r"cache and there is nothing to fetch it from \(stage_store"):
        shipped.resolve(cache=tmp_path, address="w")
    with pytest.raises(ClusterError, match="store shipping must be one of path, content, got 'nfs'"):
        StoreArtifact.from_path(store, shipping="nfs")
    with pytest.raises(ClusterError, match=f"the store artifact {art.sha256} holds no content to stage"):
        stage_store(None, shipped)


def test_concurrent_workers_of_a_node_fetch_the_store_once(tmp_path, store):
    """Four workers' set-ups at once (threads: each opens the lock file itself, so the flocks
    exclude each other as between processes): one fetch, four verified uses of one file."""
    import threading

    art = pickle.loads(pickle.dumps(StoreArtifact.from_path(store, shipping="content")))
    fetched, paths, go = [], [], threading.Barrier(4)

    def fetch():
        fetched.append(1)
        time.sleep(0.2)  # the others arrive meanwhile and wait on the lock
        return store.read_bytes()

    def worker(i):
        go.wait()
        paths.append(art.resolve(cache=tmp_path, address=f"w{i}", fetch=fetch))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fetched) == 1 and len(paths) == 4 and len(set(paths)) == 1
    assert paths[0].read_bytes() == store.read_bytes()


def test_node_id_is_the_machine_and_the_cache_directory(tmp_path):
    from knhk_memory.distributed import node_id

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert node_id(tmp_path / "a") == node_id(tmp_path / "link") != node_id(tmp_path / "b")
    assert len(node_id(tmp_path / "a")) == 12 and int(node_id(tmp_path / "a"), 16) >= 0


class _FakeScheduler:
    """What a worker's scheduler RPC answers to get_metadata (a dict of staged keys)."""

    def __init__(self, data):
        self.data = data
        self.calls = 0

    async def get_metadata(self, keys, default=None):
        self.calls += 1
        return self.data.get(tuple(keys), default)


class _FakeClient:
    def __init__(self):
        self.data = {}

    def set_metadata(self, keys, value):
        self.data[tuple(keys)] = value


class _Worker:
    def __init__(self, scheduler=None, address="tcp://127.0.0.1:1"):
        self.scheduler, self.address = scheduler, address


def test_staged_store_is_pulled_in_chunks_and_refused_when_missing(store):
    art = StoreArtifact.from_path(store, shipping="content")
    client = _FakeClient()
    n = -(-art.size // 100_000)
    assert n >= 3 and stage_store(client, art, chunk=100_000) == n
    sched = _FakeScheduler(client.data)
    before = worker_state()
    data = asyncio.run(_pull_store(_Worker(sched), art.sha256, "w"))
    assert data == store.read_bytes() and sched.calls == 1 + n
    after = worker_state()
    assert after["store_fetches"] - before["store_fetches"] == 1
    assert after["store_bytes_fetched"] - before["store_bytes_fetched"] == art.size
    with pytest.raises(WorkerStoreError, match=f"worker w: the workflow store {'1' * 64} is not staged on the "
                                               "scheduler"):
        asyncio.run(_pull_store(_Worker(sched), "1" * 64, "w"))
    del client.data[("knhk-memory", "stores", art.sha256, "chunk", 2)]
    with pytest.raises(WorkerStoreError, match=f"worker w: chunk 2 of {n} of the workflow store {art.sha256} is "
                                               r"missing on the scheduler"):
        asyncio.run(_pull_store(_Worker(sched), art.sha256, "w"))
    with pytest.raises(ClusterError, match="the stage chunk size must be a positive number of bytes, got 0"):
        stage_store(client, art, chunk=0)


_HOLDER = """
import os, sys, time
from knhk_memory.distributed import NodeBlocks
nb = NodeBlocks(sys.argv[1], ["a", "b"], cache=sys.argv[2], node="n0")
nb.counters.add("a", 5)
print("ready", flush=True)
time.sleep(60)
"""


def test_node_blocks_are_shared_removed_by_the_last_holder_and_survive_a_killed_one(tmp_path):
    first = NodeBlocks("run1", ["a", "b"], cache=tmp_path, node="n0")
    assert first.created and first.counters_name == "knhk_dask_run1_n0_c"
    second = NodeBlocks("run1", ["a", "b"], cache=tmp_path, node="n0")
    assert not second.created
    first.counters.add("a", 2)
    second.counters.add("a", 3)
    second.pattern_stats.record(4, 10)
    assert first.snapshot()["counters"] == {"a": 5, "b": 0}
    assert first.snapshot()["pattern_executions"][4] == 1
    # the maker leaves first: the blocks stay (the name is not the maker's to remove)
    assert first.close() is False and not first.removed
    assert Counters.attach("knhk_dask_run1_n0_c").get("a") == 5
    # another holder, SIGKILLed while it holds them: its counts stay, its hold goes with it
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, "run1", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert second.snapshot()["counters"]["a"] == 10
    assert second.close() is True and second.removed  # the last live holder removes both names and the files
    for name, kind in (("knhk_dask_run1_n0_c", Counters), ("knhk_dask_run1_n0_p", PatternStats)):
        with pytest.raises(SharedBlockNotFoundError):
            kind.attach(name)
    assert list((tmp_path / "nodes").iterdir()) == []
    assert second.close() is False  # idempotent
    with pytest.raises(ClusterError, match=r"a run id is 1 to 64 letters, digits, '-' or '_', got 'a/b'"):
        NodeBlocks("a/b", ["a"], cache=tmp_path)


def test_batch_results_keep_each_id_once():
    r = BatchResults(range(3))
    assert r.add(0, "a") and r.add(2, "c") and not r.add(0, "again")
    assert r.duplicates == 1 and r.missing() == [1] and not r.complete()
    assert r.results[0] == "a"
    with pytest.raises(ClusterError, match="a result for batch 7, which this run never submitted"):
        r.add(7, "x")


_FakeWorker = _Worker


def test_plugin_setup_and_teardown_in_process(store, tmp_path):
    """The plugin's own life, without a cluster: set up, session open, torn down, unconfigured."""
    from knhk_memory.refhost import Engine

    plugin = KnhkWorkerPlugin(load_config(mapping={}), StoreArtifact.from_path(store), host=Engine, cache=tmp_path)
    assert len(pickle.dumps(plugin)) < 4096  # what Dask sends to each worker
    before = worker_state()
    asyncio.run(plugin.setup(_FakeWorker()))
    engine = plugin.session
    assert engine.config.store.path == str(store) and engine.config.counters.shared is False
    assert len(engine.workflows.keys) == demo_mod.DEFAULT_WORKFLOWS
    assert engine.counters.name == plugin.node.counters_name  # counting into the node's shared block
    with engine.metered() as m:  # the batch's own adds, read from the engine, not from the shared block
        engine.run(np.arange(300), seed=3)
        with pytest.raises(HostError, match=r"already inside a metered\(\) block; they do not nest"):
            with engine.metered():
                pass
    node = plugin.node.snapshot()
    assert m.counter_dict() == node["counters"] and m.counter_dict()["cases_started"] == 300
    assert m.pattern_executions.tolist() == node["pattern_executions"]
    assert m.pattern_ticks.tolist() == node["pattern_ticks"]
    name = plugin.node.counters_name
    plugin.teardown(_FakeWorker())
    assert plugin.session is None and not engine._configured and plugin.node is None
    with pytest.raises(SharedBlockNotFoundError):  # its only holder left: the node block is gone
        Counters.attach(name)
    after = worker_state()
    assert after["set_up"] - before["set_up"] == 1 and after["torn_down"] - before["torn_down"] == 1
    # the default session: the plugin manager configured, the services it hands out
    plain = KnhkWorkerPlugin(load_config(mapping={}), StoreArtifact.from_path(store), cache=tmp_path)
    asyncio.run(plain.setup(_FakeWorker()))
    s = plain.session
    assert len(s.store) == demo_mod.DEFAULT_WORKFLOWS and s.counters.index("cases_started") == 0
    assert s.counters.name == plain.node.counters_name and s.pattern_stats.name == plain.node.patterns_name
    plain.teardown(_FakeWorker())
    assert s.store.closed and s.counters.closed
    other = KnhkWorkerPlugin(load_config(mapping={}), StoreArtifact.from_path(store), client_version="0.0.1",
                             cache=tmp_path)
    with pytest.raises(WorkerVersionError, match=r"worker tcp://127\.0\.0\.1:1 runs knhk-memory \S+, the client "
                                                 r"0\.0\.1; refused: install knhk-memory 0\.0\.1 on every worker"):
        asyncio.run(other.setup(_FakeWorker()))
    assert other.session is None and isinstance(other.error, WorkerVersionError) and other.node is None


# ---------------------------------------------------------------- on the cluster (in file order; the kill is last)

@pytest.mark.skipif(not jemalloc_loadable(), reason="jemalloc is not loadable in this process "
                    "(run under scripts/dev.sh, which sets the static-TLS tunable)")
def test_a_worker_that_cannot_load_the_backend_stops_the_run_naming_it(cluster, store):
    client, _ = cluster
    broken = sorted(client.scheduler_info()["workers"])[0]
    var = "KNHK_MEMORY_JEMALLOC_LIBRARY"
    # lambdas travel by value: they run against the worker's own os.environ
    client.run(lambda: os.environ.__setitem__(var, "/nonexistent/libjemalloc.so.2"), workers=[broken])
    try:
        config = load_config(mapping={"allocator": {"backend": "jemalloc"}})
        with pytest.raises(WorkerBackendError) as info:
            demo_mod.run_demo(config, cases=1000, store=str(store), progress=False, budgets=False,
                              cluster=client.scheduler.address)
    finally:
        client.run(lambda: os.environ.pop(var, None), workers=[broken])
    msg = str(info.value)
    assert info.value.address == broken
    assert msg.startswith(f"worker {broken} cannot load the allocator backend 'jemalloc' that {config.source} "
                          "configures: ")
    assert "/nonexistent/libjemalloc.so.2" in msg and "no fallback to another backend" in msg
    # the other worker's session was torn down: nothing is left open anywhere
    assert all(s["open"] == 0 for s in client.run(worker_state).values())


def test_cluster_run_equals_one_local_worker_and_reports_per_worker(cluster, store, one_worker, capsys):
    client, _ = cluster
    code, r = demo_json(capsys, "--cases", CASES, "--seed", SEED, "--store", str(store),
                        "--cluster", client.scheduler.address, "--batch-cases", "1500", "--ship-store", "path")
    assert code == 0
    same_totals(r, one_worker)
    c = r["cluster"]
    assert c["workers"] == 2 and c["batches"] == c["batches_expected"] == 8 and c["workers_lost"] == []
    assert c["store_shipping"] == "path" and c["duplicates_dropped"] == 0
    rows = c["per_worker"]
    assert sum(w["cases"] for w in rows) == int(CASES) and sum(w["batches"] for w in rows) == 8
    assert all(w["alive_at_end"] and w["cases"] == w["counters"]["cases_started"] for w in rows)
    # one node: both workers counted into one shared block, which equals the merged batches exactly
    [node] = c["nodes"]
    assert sorted(node["workers"]) == sorted(w["address"] for w in rows) and node["lost_workers"] == []
    assert node["block_counters"] == node["merged_counters"] == r["counters"] and node["exact"]
    assert node["merged_batches"] == 8 and not any(node["unreported_counters"].values())
    assert all(node["block_pattern_executions"][p["id"]] == p["executions"] for p in r["patterns"])
    assert node["store_bytes_fetched"] == 0 and c["store_bytes_fetched"] == 0  # shipped by path
    # the case records' pools are the workers' (trial item 9), not the client's unused one
    assert r["case_records"]["pool"] is None
    wp = r["case_records"]["worker_pools"]
    assert wp["pools"] == 2 and wp["in_use"] == 0 and wp["failed"] == 0 and wp["high_water"] >= 1
    assert wp["allocations"] == wp["frees"] >= int(CASES)
    assert c["arena_live_blocks"] == 0 and all(w["arena_live_blocks"] == 0 for w in rows)
    arena_check = next(ch for ch in r["checks"] if ch["check"] == "batch memory all returned to the arena")
    assert arena_check["ok"] and "live blocks 0 (the Dask workers' arenas, after each batch)" in arena_check["detail"]
    assert "a --cluster run writes no event log and its check does not apply" in r["event_log_note"]
    text = demo_mod.format_summary(r)
    assert f"cases pool: {int(CASES):,} case records through the Dask workers' 2 FixedPool(s)" in text
    assert "event log:  none: the Dask workers may be on other machines" in text
    assert [ch["check"] for ch in r["checks"]][-2:] == [
        "every batch merged exactly once, by id",
        "each node's shared counters equal its merged batches (plus the lost runs on a node that lost a worker)"]
    # the plugin was unregistered: every session set up was torn down (unconfigured)
    for s in client.run(worker_state).values():
        assert s["open"] == 0 and s["set_up"] == s["torn_down"] >= 1


def test_store_shipped_by_content_lands_once_in_the_node_cache(cluster, store, one_worker, worker_cache, capsys):
    client, _ = cluster
    shutil.rmtree(worker_cache / "stores", ignore_errors=True)  # an earlier tcp:// run shipped it already
    before = client.run(worker_state)
    code, r = demo_json(capsys, "--cases", CASES, "--seed", SEED, "--store", str(store),
                        "--cluster", client.scheduler.address, "--ship-store", "content")
    assert code == 0
    same_totals(r, one_worker)
    # no --batch-cases: two batches per worker (trial item 9: one batch left a worker idle)
    assert r["cluster"]["batch_cases"] == int(CASES) // 4 and r["cluster"]["batches"] == 4
    sha, size = r["cluster"]["store_sha256"], r["cluster"]["store_size"]
    assert sorted(p.name for p in (worker_cache / "stores").glob("*.knhk")) == [f"{sha}.knhk"]
    after = client.run(worker_state)

    def delta(key):
        return sum(after[w][key] - before[w][key] for w in after)

    # two workers, one node: the bytes crossed the network once, were written once, and both verified the file
    assert (delta("store_fetches"), delta("store_bytes_fetched")) == (1, size), (before, after)
    assert (delta("stores_written"), delta("stores_reused")) == (1, 1), (before, after)
    assert r["cluster"]["store_bytes_fetched"] == size and r["cluster"]["nodes"][0]["store_bytes_fetched"] == size
    # the scheduler no longer holds the staged bytes
    assert client.get_metadata(["knhk-memory", "stores", sha], None) is None
    # the next run on the same node finds the verified file: nothing crosses the network
    before = after
    code, r = demo_json(capsys, "--cases", "600", "--store", str(store), "--cluster", client.scheduler.address,
                        "--ship-store", "content")
    assert code == 0 and r["ok"]
    after = client.run(worker_state)
    assert (delta("store_fetches"), delta("stores_written"), delta("stores_reused")) == (0, 0, 2)


@pytest.mark.parametrize("cases, workers, per_batch", [
    (5000, 2, 1250), (100, 2, 25), (1, 8, 1), (3, 2, 1), (1_000_000, 2, 5000), (40_000, 0, 5000)])
def test_default_batch_size_gives_every_worker_work(cases, workers, per_batch):
    from knhk_memory.refhost.cluster import default_batch_cases

    assert default_batch_cases(cases, workers) == per_batch


def test_batches_never_split_a_workflow_and_tiny_batches_still_add_up(cluster, tmp_path, capsys):
    """--batch-cases 1 asks for more batches than the store has workflows: one per workflow."""
    client, _ = cluster
    small = tmp_path / "small.knhk"
    demo_mod.ensure_store(small, count=30)
    code, one = demo_json(capsys, "--cases", "900", "--store", str(small))
    code, r = demo_json(capsys, "--cases", "900", "--store", str(small), "--cluster", client.scheduler.address,
                        "--batch-cases", "1")
    assert code == 0 and r["ok"], r["checks"]
    assert r["cluster"]["batches"] == r["cluster"]["batches_expected"] == 30 == r["batches"] == one["batches"]
    assert r["counters"] == one["counters"] and r["events"] == one["events"]


def test_a_task_on_a_worker_without_the_plugin_names_the_worker(cluster):
    from knhk_memory.errors import WorkerError
    from knhk_memory.refhost.cluster import run_batch

    client, _ = cluster
    fut = client.submit(run_batch, "knhk-memory-never-registered", 0, np.arange(3), 1, [], pure=False)
    with pytest.raises(WorkerError, match=r"worker tcp://127\.0\.0\.1:\d+ has no knhk-memory plugin "
                                          r"'knhk-memory-never-registered'; register it first"):
        fut.result(timeout=30)


def test_workers_refuse_another_store_or_another_version_by_name(cluster, store, tmp_path):
    client, _ = cluster
    config = load_config(mapping={})
    demo_mod.ensure_store(tmp_path / "other.knhk", count=40)
    real = StoreArtifact.from_path(store)
    # the client hashed its store; the file the workers find at that path is another one
    forged = StoreArtifact(str(tmp_path / "other.knhk"), real.sha256, real.size, "path")
    with pytest.raises(WorkerStoreError) as info:
        register(client, KnhkWorkerPlugin(config, forged))
    assert info.value.address in client.scheduler_info()["workers"]
    assert f"refused the workflow store {tmp_path / 'other.knhk'}: its SHA-256 here is " in str(info.value)
    assert f"the client's is {real.sha256}" in str(info.value)
    with pytest.raises(WorkerVersionError, match=r"worker tcp://127\.0\.0\.1:\d+ runs knhk-memory \S+, the client "
                                                 r"0\.0\.0\+other; refused"):
        register(client, KnhkWorkerPlugin(config, real, client_version="0.0.0+other"))
    # shipped by content: the bytes staged under the client's checksum are another store's
    other = (tmp_path / "other.knhk").read_bytes()
    lying = StoreArtifact(str(store), real.sha256, real.size, "content", other)
    stage_store(client, lying)
    try:
        with pytest.raises(WorkerStoreError) as info:
            register(client, KnhkWorkerPlugin(config, lying, cache=tmp_path / "cache"))
    finally:
        unstage_store(client, lying)
    assert info.value.address in client.scheduler_info()["workers"]
    assert str(info.value) == (f"worker {info.value.address}: the store content fetched for {real.sha256} hashes to "
                               f"{hashlib.sha256(other).hexdigest()} ({len(other):,} bytes, {real.size:,} expected); "
                               "refusing it")
    assert not (tmp_path / "cache" / "stores" / f"{real.sha256}.knhk").exists()  # nothing written
    assert all(s["open"] == 0 for s in client.run(worker_state).values())


def test_a_worker_killed_mid_run_has_its_batches_rerun_and_counted_once(cluster, store, one_worker):
    """SIGKILL one worker process after the first batch result; the totals stay exact."""
    client, _ = cluster
    killed: dict = {}

    def kill_one(result, run_client):
        if killed:
            return
        processing = run_client.processing()
        pids = run_client.run(os.getpid)
        busy = [w for w, keys in processing.items() if keys and w != result["worker"]]
        victim = busy[0] if busy else next(w for w in pids if w != result["worker"])
        killed.update(address=victim, keys=list(processing.get(victim, ())), pid=pids[victim])
        os.kill(pids[victim], signal.SIGKILL)

    r = demo_mod.run_demo(load_config(mapping={}), cases=int(CASES), store=str(store), seed=int(SEED),
                          progress=False, budgets=False, cluster=client.scheduler.address, batch_cases=1000,
                          on_result=kill_one)
    # the client's totals are the batch results merged by id: exactly the one-process totals
    same_totals(r, one_worker)
    c = r["cluster"]
    assert killed and killed["address"] in c["workers_lost"]
    assert c["batches"] == c["batches_expected"] == 12
    ran_on = {w["address"]: w for w in c["per_worker"]}
    # the batches the killed worker held when it died were run again by a live worker
    assert killed["keys"], "the killed worker was not running a batch"
    assert ran_on.get(killed["address"], {"batches": 0})["batches"] < 12
    assert sum(w["cases"] for w in c["per_worker"]) == int(CASES)
    # The node's shared block (the victim, its replacement and the other worker counted into it) holds the
    # merged batches plus what the victim's runs added that never reached the client: batches it had
    # finished whose results died with it, and the one it was running. Never negative, never in the totals.
    [node] = c["nodes"]
    assert killed["address"] in node["lost_workers"] and node["never_negative"]
    assert node["merged_counters"] == r["counters"] and node["merged_batches"] == 12
    un = node["unreported_counters"]
    assert {k: node["block_counters"][k] - v for k, v in un.items()} == r["counters"]
    # a batch is run as one engine batch per workflow, each adding its cases whole: a killed batch's adds
    # are a prefix of its workflows, so every case started in a lost run also completed or was cut short
    assert un["cases_started"] <= int(CASES) and un["tasks_fired"] >= 0
    assert 0 <= un["cases_completed"] <= un["cases_started"] and un["errors"] == 0
    check = next(ch for ch in r["checks"] if ch["check"].startswith("each node's shared counters"))
    assert check["ok"] and f"lost {killed['address']}" in check["detail"]


def test_node_rows_set_each_node_block_against_its_merged_dropped_and_lost_runs():
    """The client's per-node accounting, on made-up results: block = merged + dropped + unreported."""
    from knhk_memory.refhost.cluster import node_rows

    def res(batch, node, started, worker="w"):
        e = np.zeros(44, dtype=np.int64)
        e[1] = started
        return {"batch": batch, "node": node, "worker": worker, "counters": {"cases_started": started},
                "pattern_executions": e, "pattern_ticks": e * 10}

    def fig(node, started, execs):
        e = [0] * 44
        e[1] = execs
        return {"node": node, "host": "h", "node_blocks": f"b_{node}", "counters": {"cases_started": started},
                "pattern_executions": e, "pattern_ticks": [v * 10 for v in e], "store_bytes_fetched": 5}

    merged = BatchResults(range(4))
    for b, node, n in ((0, "A", 10), (1, "A", 20), (2, "B", 30), (3, "C", 40)):
        merged.add(b, res(b, node, n, worker=f"w{node}"))
    dropped = [res(1, "A", 20)]  # a repeat of batch 1, run on A again: in A's block, not in the totals
    live = {"a1": fig("A", 50, 50), "a2": fig("A", 50, 50), "b1": fig("B", 37, 37)}  # C's workers are all gone
    per = {"wB": {"node": "B"}}
    rows = {n["node"]: n for n in node_rows(merged, dropped, live, ["wB"], per)}
    assert sorted(rows) == ["A", "B"]
    a, b = rows["A"], rows["B"]
    assert a["workers"] == ["a1", "a2"] and a["store_bytes_fetched"] == 10 and a["lost_workers"] == []
    assert a["merged_counters"] == {"cases_started": 30} and a["dropped_counters"] == {"cases_started": 20}
    assert a["unreported_counters"] == {"cases_started": 0} and a["exact"] and a["merged_batches"] == 2
    # B lost worker wB: 7 cases started by runs whose results died with it
    assert b["lost_workers"] == ["wB"] and b["unreported_counters"] == {"cases_started": 7}
    assert not b["exact"] and b["never_negative"] and b["unreported_pattern_executions"] == 7
    # a block below its merged batches is never right: flagged
    live["b1"] = fig("B", 29, 29)
    [bad] = [n for n in node_rows(merged, dropped, live, ["wB"], per) if n["node"] == "B"]
    assert not bad["never_negative"] and bad["unreported_counters"] == {"cases_started": -1}
