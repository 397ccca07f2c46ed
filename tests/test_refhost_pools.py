"""The reference host's case records in a FixedPool and its event log in an MmapVec (issue 19)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from knhk_memory import load_config
from knhk_memory.cli import main
from knhk_memory.errors import HostError, StoreError, StoreMagicError
from knhk_memory.mmapvec import MmapVec
from knhk_memory.pools import FixedPool, LockFreePool
from knhk_memory.refhost import Engine
from knhk_memory.refhost import demo as demo_mod
from knhk_memory.refhost.engine import CASE_RECORD, EVENT_RECORD, tally_event_log
from knhk_memory.refhost.executors import CASE_END, CASE_START, TASK
from knhk_memory.refhost.workflows import generate_definitions
from knhk_memory.store import WorkflowStoreWriter

# Every test in a fresh working directory and cache (the `isolated` fixture, tests/conftest.py).
pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "wf.knhk"
    with WorkflowStoreWriter(path) as w:
        for d in generate_definitions(40):
            w.add(d.id, d.encode())
    return path


def test_engine_keeps_case_records_in_the_cases_pool(store: Path) -> None:
    with Engine(store=store) as engine:
        assert isinstance(engine.case_pool, FixedPool) and engine.case_pool.name == "cases"
        assert engine.case_pool.block_size >= CASE_RECORD.itemsize
        tally = engine.run(np.arange(3000), seed=4)
        st = engine.case_pool.stats()
        assert tally.case_records == 3000 and tally.record_mismatches == 0
        assert st.in_use == 0 and st.allocations == st.frees == 3000 and 0 < st.high_water <= 3000


def test_event_log_reopens_with_the_runs_tallies(store: Path, tmp_path: Path) -> None:
    log = tmp_path / "events.kvec"
    with Engine(store=store, event_log=log) as engine:
        first = engine.run(np.arange(2500), seed=9)
        assert engine.event_log is not None and engine.event_log.synced_length == int(first.events.sum())
        second = engine.run(np.arange(2500, 4000), seed=9)
    got = tally_event_log(log)
    events = first.events + second.events
    executions = first.executions + second.executions
    assert got["events"] == int(events.sum())
    assert got["tasks"] == int(events[TASK])
    assert got["cases_started"] == got["cases_completed"] == got["distinct_cases"] == 4000
    assert got["cases_started"] == int(events[CASE_START]) and got["cases_completed"] == int(events[CASE_END])
    assert got["executions"] == {p: int(executions[p]) for p in range(1, 44) if executions[p]}
    with MmapVec(log, mode="r") as v:
        assert v.dtype == EVENT_RECORD
        assert sorted(np.unique(v.array()["case"]).tolist()) == list(range(4000))


def test_a_lockfree_cases_pool_works_too(store: Path) -> None:
    config = load_config(mapping={"pools": {"cases": {"kind": "lockfree"}}})
    with Engine(config, store=store) as engine:
        assert isinstance(engine.case_pool, LockFreePool)
        tally = engine.run(np.arange(500), seed=2)
        assert tally.case_records == 500 and tally.record_mismatches == 0
        assert engine.case_pool.stats().in_use == 0


@pytest.mark.parametrize(("pools", "message"), [
    ({"cases": {"capacity": 100}}, ("pools.cases.capacity in <argument> is 100; a batch of 4096 cases needs "
                                    "that many records")),
    ({"cases": {"block_size": 16}}, "pools.cases.block_size in <argument> is 16; a case record needs 24 bytes"),
])
def test_cases_pool_too_small_is_a_host_error(store: Path, pools: dict, message: str) -> None:
    config = load_config(mapping={"pools": pools})
    with pytest.raises(HostError) as info:
        Engine(config, store=store)
    assert message in str(info.value)


def test_small_batches_fit_a_small_pool(store: Path) -> None:
    config = load_config(mapping={"pools": {"cases": {"capacity": 64}}})
    with Engine(config, store=store, batch_size=64) as engine:
        assert engine.run(np.arange(1000), seed=1).case_records == 1000


def test_tally_of_a_damaged_or_foreign_log(tmp_path: Path, store: Path) -> None:
    log = tmp_path / "events.kvec"
    with Engine(store=store, event_log=log) as engine:
        engine.run(np.arange(200), seed=1)
    raw = bytearray(log.read_bytes())
    raw[4096 + 13 * 50] ^= 0x40  # flip a bit in record 50
    log.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=f"{log}: the .* synced records fail their CRC-32"):
        tally_event_log(log)
    other = tmp_path / "other.kvec"
    with MmapVec(other, "<f8") as v:
        v.append(1.0)
    with pytest.raises(StoreError, match="not reference-host events"):
        tally_event_log(other)
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 5000)
    with pytest.raises(StoreMagicError, match="not an MmapVec file"):
        tally_event_log(junk)


def demo_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["demo", "--no-budgets", "--no-progress", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_demo_event_log_option(isolated: Path, capsys) -> None:
    log = isolated / "run-events.kvec"
    code, r = demo_json(capsys, "--cases", "3000", "--event-log", str(log))
    assert code == 0 and r["ok"], [c for c in r["checks"] if not c["ok"]]
    check = next(c for c in r["checks"] if c["check"] == "the event log reopens with the run's tallies")
    assert check["ok"] and "agree" in check["detail"]
    assert r["event_log"]["paths"] == [str(log)] and r["event_log"]["events"] == r["events"]
    # Reopening the log later gives the tallies the run printed.
    got = tally_event_log(log)
    assert got["events"] == r["events"] and got["tasks"] == r["tasks"]
    assert got["cases_started"] == got["cases_completed"] == r["cases"] == r["counters"]["cases_completed"]
    assert got["executions"] == {p["id"]: p["executions"] for p in r["patterns"] if p["executions"]}
    assert r["case_records"]["records"] == 3000 and r["case_records"]["pool"]["in_use"] == 0


def test_demo_writes_the_log_by_default_and_can_skip_it(isolated: Path, capsys) -> None:
    code, r = demo_json(capsys, "--cases", "500")
    assert code == 0 and r["event_log"]["paths"] == [str(demo_mod.default_event_log_path())]
    assert str(demo_mod.default_event_log_path()).startswith(str(isolated / "cache"))
    code, r = demo_json(capsys, "--cases", "500", "--no-event-log")
    assert code == 0 and r["event_log"] is None and len(r["checks"]) == 8


def test_demo_event_log_with_two_workers(isolated: Path, capsys) -> None:
    log = isolated / "ev.kvec"
    code, r = demo_json(capsys, "--cases", "3000", "--workers", "2", "--event-log", str(log),
                        "--store", str(isolated / "s.knhk"), "--build")
    assert code == 0 and r["ok"], [c for c in r["checks"] if not c["ok"]]
    paths = [str(isolated / "ev.kvec.w0"), str(isolated / "ev.kvec.w1")]
    assert r["event_log"]["paths"] == paths
    got = tally_event_log(paths)
    assert got["events"] == r["events"] and got["distinct_cases"] == 3000


def test_demo_event_log_bad_paths(isolated: Path, capsys) -> None:
    (isolated / "d").mkdir()
    assert main(["demo", "--no-budgets", "--no-progress", "--cases", "100", "--event-log", str(isolated / "d")]) == 2
    assert "is a directory; give a file path" in capsys.readouterr().err
    (isolated / "notes.txt").write_text("my notes\n" * 1000)
    assert main(["demo", "--no-budgets", "--no-progress", "--cases", "100",
                 "--event-log", str(isolated / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert "notes.txt: is not an MmapVec file" in err and "never anything else" in err
    assert (isolated / "notes.txt").read_text().startswith("my notes")  # not overwritten
    with pytest.raises(SystemExit):
        main(["demo", "--event-log", "x", "--no-event-log"])
