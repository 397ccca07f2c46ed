"""knhk-memory on Dask distributed (knhk_memory.distributed, `knhk-memory demo --cluster`).

One LocalCluster of two worker processes (127.0.0.1 only) serves the module;
the test that kills a worker runs last. What is checked: totals equal a
one-process run for the same seed, each batch merged once even when a worker
is SIGKILLed mid-run, the store shipped by path and by content, and every
refusal (version, store checksum, allocator backend, scheduler address) by
error type and message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from knhk_memory.cli import main  # noqa: E402
from knhk_memory.config import load_config  # noqa: E402
from knhk_memory.distributed import (  # noqa: E402
    BatchResults,
    KnhkWorkerPlugin,
    StoreArtifact,
    connect,
    parse_cluster,
    register,
    worker_state,
)
from knhk_memory.errors import (  # noqa: E402
    ClusterError,
    HostError,
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
    os.environ["KNHK_MEMORY_CACHE"] = str(worker_cache)  # the spawned workers inherit it
    try:
        client, local = connect("local:2", timeout=30)
    finally:
        if saved is None:
            del os.environ["KNHK_MEMORY_CACHE"]
        else:
            os.environ["KNHK_MEMORY_CACHE"] = saved
    client.wait_for_workers(2, timeout=30)
    yield client, local
    client.close()
    local.close()


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


def test_cluster_options_that_do_not_fit_together(capsys, store):
    assert main(["demo", "--no-budgets", "--store", str(store), "--workers", "2", "--cluster", "local:2"]) == 2
    assert "--cluster and --workers are exclusive" in capsys.readouterr().err
    assert main(["demo", "--no-budgets", "--store", str(store), "--batch-cases", "10"]) == 2
    assert "--batch-cases and --ship-store apply to --cluster runs only" in capsys.readouterr().err
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


def test_store_by_content_is_written_once_per_node_and_verified(tmp_path, store):
    art = StoreArtifact.from_path(store, shipping="content")
    before = worker_state()
    first = art.resolve(cache=tmp_path, address="w")
    assert first == tmp_path / "stores" / f"{art.sha256}.knhk" and first.read_bytes() == store.read_bytes()
    assert art.resolve(cache=tmp_path, address="w") == first
    after = worker_state()
    assert after["stores_written"] - before["stores_written"] == 1
    assert after["stores_reused"] - before["stores_reused"] == 1
    first.write_bytes(b"damaged")  # a damaged cached copy is replaced from the shipped bytes
    assert art.resolve(cache=tmp_path, address="w").read_bytes() == store.read_bytes()
    forged = StoreArtifact(art.path, "0" * 64, art.size, "content", art.content)
    with pytest.raises(WorkerStoreError, match=f"worker w: the store content shipped for {'0' * 64} does not hash"):
        forged.resolve(cache=tmp_path, address="w")
    with pytest.raises(ClusterError, match="store shipping must be one of path, content, got 'nfs'"):
        StoreArtifact.from_path(store, shipping="nfs")


def test_batch_results_keep_each_id_once():
    r = BatchResults(range(3))
    assert r.add(0, "a") and r.add(2, "c") and not r.add(0, "again")
    assert r.duplicates == 1 and r.missing() == [1] and not r.complete()
    assert r.results[0] == "a"
    with pytest.raises(ClusterError, match="a result for batch 7, which this run never submitted"):
        r.add(7, "x")


class _FakeWorker:
    address = "tcp://127.0.0.1:1"


def test_plugin_setup_and_teardown_in_process(store):
    """The plugin's own life, without a cluster: set up, session open, torn down, unconfigured."""
    from knhk_memory.refhost import Engine

    plugin = KnhkWorkerPlugin(load_config(mapping={}), StoreArtifact.from_path(store), host=Engine)
    before = worker_state()
    plugin.setup(_FakeWorker())
    engine = plugin.session
    assert engine.config.store.path == str(store) and engine.config.counters.shared is False
    assert len(engine.workflows.keys) == demo_mod.DEFAULT_WORKFLOWS
    plugin.teardown(_FakeWorker())
    assert plugin.session is None and not engine._configured
    after = worker_state()
    assert after["set_up"] - before["set_up"] == 1 and after["torn_down"] - before["torn_down"] == 1
    # the default session: the plugin manager configured, the services it hands out
    plain = KnhkWorkerPlugin(load_config(mapping={}), StoreArtifact.from_path(store))
    plain.setup(_FakeWorker())
    s = plain.session
    assert len(s.store) == demo_mod.DEFAULT_WORKFLOWS and s.counters.index("cases_started") == 0
    assert s.pattern_stats is not None
    plain.teardown(_FakeWorker())
    assert s.store.closed
    other = KnhkWorkerPlugin(load_config(mapping={}), StoreArtifact.from_path(store), client_version="0.0.1")
    with pytest.raises(WorkerVersionError, match=r"worker tcp://127\.0\.0\.1:1 runs knhk-memory \S+, the client "
                                                 r"0\.0\.1; refused: install knhk-memory 0\.0\.1 on every worker"):
        other.setup(_FakeWorker())
    assert other.session is None and isinstance(other.error, WorkerVersionError)


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
    for w in rows:  # each worker's own counter block is the sum of the batches it ran
        assert w["alive_at_end"] and w["block_counters"]["cases_started"] == w["cases"]
    assert [ch["check"] for ch in r["checks"]][-2:] == ["every batch merged exactly once, by id",
                                                        "each live worker's own counters equal the sum of its batches"]
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
    sha = r["cluster"]["store_sha256"]
    assert sorted(p.name for p in (worker_cache / "stores").glob("*.knhk")) == [f"{sha}.knhk"]
    after = client.run(worker_state)
    written = sum(after[w]["stores_written"] - before[w]["stores_written"] for w in after)
    reused = sum(after[w]["stores_reused"] - before[w]["stores_reused"] for w in after)
    assert (written, reused) == (1, 1), (before, after)  # two workers, one node: fetched to disk once


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
    same_totals(r, one_worker)
    c = r["cluster"]
    assert killed and killed["address"] in c["workers_lost"]
    assert c["batches"] == c["batches_expected"] == 12
    ran_on = {w["address"]: w for w in c["per_worker"]}
    # the batches the killed worker held when it died were run again by a live worker
    assert killed["keys"], "the killed worker was not running a batch"
    assert ran_on.get(killed["address"], {"batches": 0})["batches"] < 12
    assert sum(w["cases"] for w in c["per_worker"]) == int(CASES)
