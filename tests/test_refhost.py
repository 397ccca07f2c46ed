"""The reference host: every supported pattern against the one-case interpreter,
the counters and statistics it feeds, its bad input, and `knhk-memory demo`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knhk_memory import load_config
from knhk_memory.cli import main
from knhk_memory.errors import (
    ConfigError,
    HostError,
    StoreMagicError,
    WorkflowDefinitionError,
)
from knhk_memory.refhost import CASE_END, CASE_START, TASK, Engine, parse_workflow, run_case
from knhk_memory.refhost import demo as demo_mod
from knhk_memory.refhost import executors as ex
from knhk_memory.refhost.workflows import JOINS_AFTER, generate_definitions
from knhk_memory.store import WorkflowStoreWriter

# Every test in a fresh working directory and cache (the `isolated` fixture, tests/conftest.py).
pytestmark = pytest.mark.usefixtures("isolated")


def make_store(path: Path, definitions: list[dict]) -> Path:
    with WorkflowStoreWriter(path) as w:
        for d in definitions:
            w.add(d["id"], json.dumps(d).encode())
    return path


def run_and_compare(tmp_path: Path, blocks: list[dict], cases: int = 300, seed: int = 5) -> dict[int, int]:
    """Run ``cases`` cases of one workflow; every case's events must equal the
    reference interpreter's; the counters and pattern statistics must equal
    the reference's totals. Returns the totals per event kind."""
    store = make_store(tmp_path / "wf.knhk", [{"id": "wf", "blocks": blocks}])
    wf = parse_workflow({"id": "wf", "blocks": blocks})
    with Engine(store=store) as engine:
        tally = engine.run(range(cases), seed=seed, sample=set(range(cases)))
        want_total: dict[int, int] = {}
        for c in range(cases):
            want = run_case(wf, seed, c)
            assert tally.samples[c] == want, f"case {c}"
            for kind, _ in want:
                want_total[kind] = want_total.get(kind, 0) + 1
        counters = engine.counters.snapshot()
        stats = engine.pattern_stats.as_dict()
    assert counters["cases_started"] == counters["cases_completed"] == cases
    assert counters["tasks_fired"] == want_total[TASK]
    assert counters["errors"] == 0
    for p in range(1, 44):
        assert stats.get(p, {}).get("executions", 0) == want_total.get(p, 0), f"WCP-{p}"
        assert tally.events[p] == tally.executions[p] == want_total.get(p, 0)
    assert tally.events[CASE_START] == tally.events[CASE_END] == tally.completed == cases
    return want_total


# ---------------------------------------------------------------- each pattern

def test_sequence_wcp1(tmp_path):
    totals = run_and_compare(tmp_path, [{"kind": "sequence", "tasks": 4}, {"kind": "sequence", "tasks": 1}])
    # 3 inside the first block, 1 hand-over between the blocks
    assert totals[1] == 300 * 4
    assert totals[TASK] == 300 * 5


def test_parallel_split_and_synchronization_wcp2_wcp3(tmp_path):
    totals = run_and_compare(tmp_path, [{"kind": "split", "split": 2, "join": 3, "branches": 4}])
    assert totals[2] == totals[3] == 300
    assert totals[TASK] == 300 * 5  # four branches and the downstream task


def test_exclusive_choice_and_simple_merge_wcp4_wcp5(tmp_path):
    totals = run_and_compare(tmp_path, [{"kind": "split", "split": 4, "join": 5, "branches": 3}])
    assert totals[4] == totals[5] == 300
    assert totals[TASK] == 300 * 2


def test_exclusive_choice_takes_every_branch_over_many_cases(tmp_path):
    store = make_store(tmp_path / "wf.knhk", [{"id": "wf", "blocks": [
        {"kind": "split", "split": 4, "join": 5, "branches": 3}]}])
    with Engine(store=store) as engine:
        tally = engine.run(range(300), seed=9, sample=set(range(300)))
    chosen = {next(t for k, t in ev if k == 4) for ev in tally.samples.values()}
    assert chosen == {0, 1, 2}


def test_multi_choice_and_structured_synchronizing_merge_wcp6_wcp7(tmp_path):
    totals = run_and_compare(tmp_path, [{"kind": "split", "split": 6, "join": 7, "branches": 4}])
    assert totals[6] == totals[7] == 300
    # a non-empty subset of four branches: between 1 and 4 branch tasks, plus downstream
    assert 300 * 2 < totals[TASK] < 300 * 5


def test_structured_synchronizing_merge_after_parallel_split(tmp_path):
    totals = run_and_compare(tmp_path, [{"kind": "split", "split": 2, "join": 7, "branches": 3}])
    assert totals[2] == totals[7] == 300


@pytest.mark.parametrize("split", [2, 4, 6])
def test_multi_merge_wcp8_fires_once_per_arriving_branch(tmp_path, split):
    totals = run_and_compare(tmp_path, [{"kind": "split", "split": split, "join": 8, "branches": 3}])
    branch_tasks = totals[8]
    assert totals[split] == 300
    # each arrival runs the downstream task: tasks = branch tasks + downstream runs
    assert totals[TASK] == 2 * branch_tasks
    if split == 2:
        assert branch_tasks == 900
    elif split == 4:
        assert branch_tasks == 300


def test_structured_discriminator_wcp9_fires_once_for_the_first_branch(tmp_path):
    totals = run_and_compare(tmp_path, [{"kind": "split", "split": 2, "join": 9, "branches": 4}])
    assert totals[9] == 300 and totals[TASK] == 300 * 5
    with Engine(store=tmp_path / "wf.knhk") as engine:
        tally = engine.run(range(50), seed=3, sample=set(range(50)))
    for events in tally.samples.values():
        kinds = [k for k, _ in events]
        i = kinds.index(9)
        # the discriminator fires right after the first branch task, then the
        # other three complete (absorbed), then the downstream task runs once
        assert kinds[i - 1] == TASK and kinds[i + 1:i + 4] == [TASK] * 3 and kinds.count(9) == 1
    firsts = {next(t for k, t in ev if k == 9) for ev in tally.samples.values()}
    assert len(firsts) > 1  # the first to complete depends on the case


def test_arbitrary_cycles_wcp10(tmp_path):
    totals = run_and_compare(tmp_path, [{"kind": "cycle", "body": 2, "max_iterations": 4}])
    iterations = totals[TASK] // 2
    assert totals[10] == iterations - 300  # one loop-back per iteration after the first
    assert 300 < iterations <= 1200
    assert totals[1] == iterations  # one WCP-1 inside each pass of a two-task body


def test_multiple_instances_with_design_time_knowledge_wcp13(tmp_path):
    totals = run_and_compare(tmp_path, [{"kind": "instances", "instances": 6}])
    assert totals[13] == 300 and totals[TASK] == 300 * 6


def test_a_workflow_of_every_block(tmp_path):
    run_and_compare(tmp_path, [
        {"kind": "sequence", "tasks": 2},
        {"kind": "split", "split": 2, "join": 3, "branches": 3},
        {"kind": "split", "split": 4, "join": 5, "branches": 2},
        {"kind": "split", "split": 6, "join": 7, "branches": 5},
        {"kind": "split", "split": 2, "join": 8, "branches": 2},
        {"kind": "split", "split": 2, "join": 9, "branches": 3},
        {"kind": "cycle", "body": 3, "max_iterations": 3},
        {"kind": "instances", "instances": 2},
    ], cases=500)


def test_batches_split_a_workflow_without_changing_results(tmp_path):
    blocks = [{"kind": "split", "split": 6, "join": 8, "branches": 4}, {"kind": "cycle", "body": 1,
                                                                       "max_iterations": 5}]
    store = make_store(tmp_path / "wf.knhk", [{"id": "wf", "blocks": blocks}])
    with Engine(store=store, batch_size=7) as small, Engine(store=store) as big:
        a = small.run(range(100), seed=2)
        b = big.run(range(100), seed=2)
    assert a.batches == 15 and b.batches == 1
    assert (a.events == b.events).all() and (a.executions == b.executions).all()


block = st.one_of(
    st.builds(lambda n: {"kind": "sequence", "tasks": n}, st.integers(1, 5)),
    st.sampled_from(sorted((s, j) for s, js in JOINS_AFTER.items() for j in js)).flatmap(
        lambda sj: st.builds(lambda k: {"kind": "split", "split": sj[0], "join": sj[1], "branches": k},
                             st.integers(2, 16))),
    st.builds(lambda b, m: {"kind": "cycle", "body": b, "max_iterations": m}, st.integers(1, 3), st.integers(1, 6)),
    st.builds(lambda k: {"kind": "instances", "instances": k}, st.integers(1, 9)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.lists(block, min_size=1, max_size=6), seed=st.integers(0, 2**64 - 1))
def test_any_workflow_matches_the_reference_event_for_event(tmp_path, blocks, seed):
    run_and_compare(tmp_path, blocks, cases=40, seed=seed)


# ---------------------------------------------------------------- the services it uses

def test_engine_uses_every_memory_service(tmp_path):
    store = make_store(tmp_path / "wf.knhk", [d.as_json() for d in generate_definitions(20)])
    (tmp_path / "knhk.toml").write_text('[allocator]\nbackend = "system"\nnumpy = true\n')
    with Engine(store=store) as engine:
        assert engine.config.source.endswith("knhk.toml")
        assert engine.pm.hook.knhk_allocator(config=engine.config).name == "system"
        assert engine.patterns.frozen and set(engine.patterns.executors()) == set(ex.EXECUTORS)
        assert "compiled_workflows" in engine.resources.created()
        assert str(engine.store.path) == str(store)
        before = engine.arena.stats().resets
        tally = engine.run(range(2000), seed=1)
        assert engine.arena.stats().resets - before == tally.batches
        assert tally.arena_allocations > 10 * tally.arena_backend_calls
        stats = {}
        for part in engine.pm.hook.knhk_memory_stats(config=engine.config):
            stats.update(part)
        assert stats["counters"]["values"]["cases_completed"] == 2000
    assert engine.arena.closed


def test_engine_closes_what_it_opened(tmp_path):
    store = make_store(tmp_path / "wf.knhk", [d.as_json() for d in generate_definitions(3)])
    engine = Engine(store=store)
    s, arena = engine.store, engine.arena
    engine.close()
    engine.close()  # idempotent
    assert s.closed and arena.closed


def test_arrays_kept_alive_by_a_caller_pin_their_chunks_not_corrupted(tmp_path, monkeypatch):
    store = make_store(tmp_path / "wf.knhk", [d.as_json() for d in generate_definitions(3)])
    kept = []
    original = ex.DesignTimeInstances.run

    def keep(self, block, h):
        out = original(self, block, h)
        kept.append(out.kind)  # an array from the batch's arena outlives the batch
        return out

    monkeypatch.setattr(ex.DesignTimeInstances, "run", keep)
    wf = {"id": "wf", "blocks": [{"kind": "instances", "instances": 3}]}
    store = make_store(tmp_path / "one.knhk", [wf])
    with Engine(store=store, batch_size=10) as engine:
        tally = engine.run(range(30), seed=1)
        assert tally.arenas == 1 and tally.completed == 30  # one arena: every reset went through
        assert engine.arena.stats().pinned_chunks >= 1  # the kept arrays' chunks, set aside
    assert all((k[::4] == 13).all() for k in kept)  # still readable, still right


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("doc, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object with 'id' and 'blocks', got list"),
    ({"blocks": []}, "'id' must be a non-empty string, got None"),
    ({"id": "other", "blocks": [{"kind": "sequence", "tasks": 1}]}, "its id 'other' differs from the store key 'wf'"),
    ({"id": "wf", "blocks": [], "x": 1}, "unknown keys ['x']; accepted: 'id', 'blocks'"),
    ({"id": "wf", "blocks": []}, "'blocks' must be a non-empty list of blocks, got []"),
    ({"id": "wf", "blocks": [7]}, "block 0: a block is an object with a 'kind', got 7"),
    ({"id": "wf", "blocks": [{"kind": "loop"}]}, "block 0: unknown kind 'loop'; accepted: 'sequence', 'split'"),
    ({"id": "wf", "blocks": [{"kind": "sequence"}]}, "block 0: missing key 'tasks' (an integer in 1..64)"),
    ({"id": "wf", "blocks": [{"kind": "sequence", "tasks": "3"}]}, "tasks must be an integer in 1..64, got '3'"),
    ({"id": "wf", "blocks": [{"kind": "sequence", "tasks": True}]}, "tasks must be an integer in 1..64, got True"),
    ({"id": "wf", "blocks": [{"kind": "sequence", "tasks": 0}]}, "tasks must be in 1..64, got 0"),
    ({"id": "wf", "blocks": [{"kind": "sequence", "tasks": 1, "join": 3}]},
     "unknown keys ['join'] for a sequence block; accepted: 'kind', 'tasks'"),
    ({"id": "wf", "blocks": [{"kind": "split", "split": 3, "join": 3, "branches": 2}]},
     "split must be one of [2, 4, 6] (2 parallel split, 4 exclusive choice, 6 multi-choice), got 3"),
    ({"id": "wf", "blocks": [{"kind": "split", "split": 2, "join": 5, "branches": 2}]},
     "join 5 cannot close split 2 (parallel split); accepted joins after it: [3, 7, 8, 9]"),
    ({"id": "wf", "blocks": [{"kind": "split", "split": 6, "join": 9, "branches": 2}]},
     "join 9 cannot close split 6 (multi-choice); accepted joins after it: [7, 8]"),
    ({"id": "wf", "blocks": [{"kind": "split", "split": 2, "join": 3, "branches": 17}]},
     "branches must be in 2..16, got 17"),
    ({"id": "wf", "blocks": [{"kind": "cycle", "body": 1, "max_iterations": 65}]},
     "max_iterations must be in 1..64, got 65"),
    ({"id": "wf", "blocks": [{"kind": "instances", "instances": -1}]}, "instances must be in 1..64, got -1"),
])
def test_bad_definitions_name_the_workflow_the_key_and_what_is_accepted(doc, message):
    with pytest.raises(WorkflowDefinitionError) as info:
        parse_workflow(doc, "wf")
    assert message in str(info.value)
    assert str(info.value).startswith("workflow ")
    assert info.value.workflow in ("wf", "other")


def test_a_bad_definition_in_the_store_fails_the_run_naming_it(tmp_path):
    store = make_store(tmp_path / "wf.knhk", [{"id": "wf", "blocks": [{"kind": "split", "split": 4, "join": 3,
                                                                         "branches": 2}]}])
    with Engine(store=store) as engine:
        with pytest.raises(WorkflowDefinitionError, match=r"workflow 'wf', block 0: join 3 cannot close split 4"):
            engine.run(range(10))


def test_engine_needs_a_store():
    with pytest.raises(HostError, match=r"no workflow store: set \[store\] path in <defaults> or pass store=PATH"):
        Engine()


def test_engine_needs_its_counters(tmp_path):
    store = make_store(tmp_path / "wf.knhk", [d.as_json() for d in generate_definitions(2)])
    config = load_config(mapping={"counters": {"names": ["cases_started", "other"]}})
    with pytest.raises(HostError, match=r"lacks cases_completed, tasks_fired, errors"):
        Engine(config, store=store)
    config = load_config(mapping={"counters": {"pattern_stats": False}})
    with pytest.raises(HostError, match=r"\[counters\] pattern_stats is false in <argument>; set it to true"):
        Engine(config, store=store)


def test_engine_refuses_an_empty_store_and_bad_parameters(tmp_path):
    store = make_store(tmp_path / "empty.knhk", [])
    with pytest.raises(HostError, match=r"holds no definitions"):
        Engine(store=store)
    good = make_store(tmp_path / "wf.knhk", [d.as_json() for d in generate_definitions(2)])
    with pytest.raises(HostError, match=r"batch_size must be a positive integer, got 0"):
        Engine(store=good, batch_size=0)
    with Engine(store=good) as engine:
        with pytest.raises(HostError, match=r"case numbers must be >= 0, got -1"):
            engine.run([1, -1])
        with pytest.raises(HostError, match=r"case numbers must be a 1-D sequence, got shape \(2, 2\)"):
            engine.run([[1, 2], [3, 4]])
        with pytest.raises(HostError, match=r"partition must be \(w, n\) with 0 <= w < n, got \(2, 2\)"):
            engine.run([1], partition=(2, 2))


def test_config_replace_checks_like_a_file():
    config = load_config()
    assert config.replace(store={"path": "x.knhk"}).store.path == "x.knhk"
    with pytest.raises(ConfigError, match=r"store.cache_size: must be an int from 0 to 10,000,000 \(entries; 0: no "
                                          r"cache\), got -1"):
        config.replace(store={"cache_size": -1})
    with pytest.raises(ConfigError, match=r"unknown section \[stores\]"):
        config.replace(stores={"path": "x"})


# ---------------------------------------------------------------- the demo

def demo_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["demo", "--no-budgets", "--no-progress", "--json", *args])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_demo_builds_its_store_once_and_passes_its_checks(isolated, capsys):
    code, first = demo_json(capsys, "--cases", "3000")
    assert code == 0 and first["ok"]
    assert first["store"]["built"] and first["store"]["path"].startswith(str(isolated / "cache"))
    assert first["store"]["keys"] == demo_mod.DEFAULT_WORKFLOWS
    assert [c["ok"] for c in first["checks"]] == [True] * 9
    code, second = demo_json(capsys, "--cases", "3000")
    assert code == 0 and not second["store"]["built"]
    assert second["counters"] == first["counters"] and second["events"] == first["events"]
    assert {p["id"] for p in first["patterns"]} == {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13}
    assert all(p["executions"] > 0 for p in first["patterns"])


def test_demo_two_workers_give_the_same_totals_as_one(isolated, capsys):
    store = str(isolated / "demo.knhk")
    code, one = demo_json(capsys, "--cases", "4000", "--store", store, "--seed", "11", "--build")
    assert code == 0
    code, two = demo_json(capsys, "--cases", "4000", "--store", store, "--seed", "11", "--workers", "2")
    assert code == 0 and two["ok"], two["checks"]
    assert two["counters"] == one["counters"]
    assert [p["executions"] for p in two["patterns"]] == [p["executions"] for p in one["patterns"]]
    assert two["events"] == one["events"] and two["tasks"] == one["tasks"]


def test_demo_text_summary_and_budget_table(isolated, capsys):
    assert main(["demo", "--cases", "500", "--no-progress", "--store", str(isolated / "s.knhk"), "--build"]) == 0
    out = capsys.readouterr().out
    for text in ("knhk-memory demo: 500 cases, 1 worker(s), seed 1", "throughput: 500 cases in ",
                 "arena:      ", "backend calls", "WCP-9   Structured Discriminator",
                 "[ok] sampled cases match the one-case reference interpreter",
                 "tick counter: ", "cases pool: 500 case records through a FixedPool", "event log:  ",
                 "9 of 9 checks passed"):
        assert text in out, text


def test_demo_fails_when_a_check_fails(isolated, capsys, monkeypatch):
    original = ex.MultiMerge.complete

    def miscount(self, block, h, active, detail):
        out = original(self, block, h, active, detail)
        out.executions[8] += 1  # an executor that reports one execution too many
        return out

    monkeypatch.setattr(ex.MultiMerge, "complete", miscount)
    code, result = demo_json(capsys, "--cases", "2000", "--store", str(isolated / "s.knhk"), "--build")
    assert code == 1 and not result["ok"]
    failed = [c for c in result["checks"] if not c["ok"]]
    assert [c["check"] for c in failed] == ["pattern statistics equal the pattern events in the log"]
    assert "WCP-8: statistics" in failed[0]["detail"]
    with pytest.raises(Exception, match=r"1 check\(s\) failed: pattern statistics"):
        demo_mod.main_check(result)


@pytest.mark.parametrize("args, message", [
    (["--cases", "0"], "--cases must be at least 1, got 0"),
    (["--cases", "many"], "--cases must be an integer, got 'many'"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--seed", "-1"], "--seed must be in 0..2**64-1, got -1"),
])
def test_demo_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(["demo", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_bad_store_paths(isolated, capsys):
    (isolated / "dir").mkdir()
    assert main(["demo", "--no-budgets", "--store", str(isolated / "dir")]) == 2
    assert "is a directory; give a store file path" in capsys.readouterr().err
    (isolated / "junk.knhk").write_bytes(b"this is not a store" * 10)
    assert main(["demo", "--no-budgets", "--store", str(isolated / "junk.knhk")]) == 2
    assert "junk.knhk" in capsys.readouterr().err
    with pytest.raises(StoreMagicError):
        demo_mod.measure_store(isolated / "junk.knhk")
    with pytest.raises(HostError, match=r"--workers must be an integer from 1 to"):
        demo_mod.run_demo(load_config(), workers=10_000)


def test_demo_store_from_the_config_file(isolated, capsys):
    (isolated / "knhk.toml").write_text('[store]\npath = "from-config.knhk"\n')
    code, result = demo_json(capsys, "--cases", "300", "--build")
    assert code == 0 and result["store"]["from"].startswith("[store] path in ")
    assert (isolated / "from-config.knhk").is_file()


def test_reference_events_are_well_formed():
    wf = generate_definitions(1, seed=4)[0]
    events = run_case(wf, 1, 0)
    assert events[0][0] == CASE_START and events[-1] == (CASE_END, len(wf.blocks))
    assert np.all([0 < k < 44 or k == TASK for k, _ in events[1:-1]])
