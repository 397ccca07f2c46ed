"""The SpiffWorkflow adapter (knhk_memory.adapters.spiff): every generated model
runs the same from the store as from the parsed XML; bad input is named; task
metrics are exact across processes. The models are built once per module."""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("SpiffWorkflow")

from knhk_memory.adapters import spiff
from knhk_memory.adapters import spiff_models as models
from knhk_memory.adapters.spiff import SpiffLoader, TaskMetrics, build_spiff_store
from knhk_memory.cli import main
from knhk_memory.errors import (
    AdapterBuildError,
    EngineVersionError,
    StoreCorruptError,
    UnknownProcessError,
    UntrustedPickleError,
)

ROOT = Path(__file__).resolve().parent.parent
FILES = 50  # 2 processes a file + the library + the pattern file: 114 executable process models
PROCESSES = 2 * FILES + models.LIBRARY_PROCESSES + len(models.PATTERN_PROCESSES)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("bpmn") / "models"
    ids = models.generate(src, files=FILES)
    assert len(ids) >= 100
    return src


@pytest.fixture(scope="module")
def store_path(source):
    out = source.parent / "specs.kst"
    summary = build_spiff_store(source, out)
    assert summary["processes"] == PROCESSES and summary["skipped"] == []
    return out


@pytest.fixture(scope="module")
def loader(store_path):
    with SpiffLoader(store_path, trust_pickle=True) as ld:
        assert ld.load_all() == len(ld._specs)  # from the one pickle of every spec
        yield ld


@pytest.fixture(scope="module")
def parsed(source):
    from SpiffWorkflow.spiff.parser.process import SpiffBpmnParser

    p = SpiffBpmnParser()
    p.add_bpmn_files(sorted(glob.glob(str(source / "**" / "*.bpmn"), recursive=True)))
    p.add_dmn_files(sorted(glob.glob(str(source / "**" / "*.dmn"), recursive=True)))
    return p


def _from_xml(parser, pid):
    from SpiffWorkflow.bpmn.workflow import BpmnWorkflow

    return BpmnWorkflow(parser.get_spec(pid), parser.get_subprocess_specs(pid))


def test_every_model_runs_the_same_from_the_store_as_from_the_xml(loader, parsed):
    ids = loader.process_ids()
    assert ids == sorted(parsed.get_process_ids()) and len(ids) >= 100
    kinds = set()
    one_by_one = SpiffLoader(loader.store, trust_pickle=True, cache_size=0)  # each spec from its own record
    for pid in ids:
        want = models.final_state(models.run_to_end(_from_xml(parsed, pid)))
        got = models.final_state(models.run_to_end(loader.workflow(pid)))  # specs restored by load_all, cached
        again = models.final_state(models.run_to_end(one_by_one.workflow(pid)))
        assert want[0] is True
        assert got == want, pid
        assert again == want, pid
        kinds.update(t[1] for t in want[1])
    # the models cover what the issue asks for
    assert {"ScriptTask", "ExclusiveGateway", "ParallelGateway", "SubWorkflowTask", "CallActivity",
            "BusinessRuleTask", "UserTask", "IntermediateCatchEvent", "InclusiveGateway", "EventBasedGateway",
            "ParallelMultiInstanceTask", "SequentialMultiInstanceTask", "StandardLoopTask", "BoundaryEvent",
            "ReceiveTask"} <= kinds


def test_keys_aliases_and_metadata(loader, store_path):
    s = loader.store
    assert loader.key("order_3") == "orders/order_003.bpmn#order_3"
    assert s.resolve("order_3") == b"orders/order_003.bpmn#order_3"
    m = s.meta("order_3")
    assert m.codec == "pickle5" and m.producer == f"SpiffWorkflow {spiff.spiff_version()}"
    assert m.meta["subprocesses"] == ["lib_3", "o3_sub_30"] or "lib_3" in m.meta["subprocesses"]
    assert m.meta["file"] == "orders/order_003.bpmn"
    # the gateways' patterns (the rest are WCP-1 steps and are left out)
    assert {tuple(v) for v in m.meta["patterns"].values()} >= {(2,), (3,), (4,), (5,), (11,)}
    assert s.meta("pat_cycle").meta["patterns"]["pc_loopmerge_4"] == [5, 21]


def test_unknown_process_names_the_id_and_the_nearest(loader):
    with pytest.raises(UnknownProcessError, match=rf"no process 'order_x7' in the store \({PROCESSES} processes\); "
                                                  r"nearest: 'order_7'") as e:
        loader.workflow("order_x7")
    assert isinstance(e.value, KeyError)
    with pytest.raises(TypeError, match=r"a process id is a str \(e\.g\. '.+'\), got list \['not', 'hashable'\]"):
        loader.workflow(["not", "hashable"])
    with pytest.raises(TypeError, match="a process id is a str"):
        loader.spec(["not", "hashable"])


def test_pickled_specs_need_trust(store_path):
    with pytest.raises(UntrustedPickleError, match=r"the specs are pickles \(built by SpiffWorkflow .*\); loading "
                                                   r"them runs code.*trust_pickle=True.*--codec json"):
        SpiffLoader(store_path)


def test_a_store_from_another_spiffworkflow_version_is_refused(source, tmp_path, monkeypatch):
    out = tmp_path / "old.kst"
    monkeypatch.setattr(spiff, "spiff_version", lambda: "3.0.0")
    build_spiff_store(source / "lib", out)
    monkeypatch.undo()
    mine = spiff.spiff_version()
    with pytest.raises(EngineVersionError, match=rf"built by SpiffWorkflow 3.0.0, but this process has "
                                                 rf"SpiffWorkflow {mine}"):
        SpiffLoader(out, trust_pickle=True)


def test_a_plain_store_is_not_a_spiff_store(tmp_path):
    from knhk_memory.store import WorkflowStoreWriter

    with WorkflowStoreWriter(tmp_path / "p.kst") as w:
        w.add("x", b"1")
    with pytest.raises(StoreCorruptError, match="not a store built by `knhk-memory store build --spiff`"):
        SpiffLoader(tmp_path / "p.kst")


def test_json_codec_store_runs_the_same(source, tmp_path, parsed):
    out = tmp_path / "json.kst"
    build_spiff_store(source, out, codec="json")
    with SpiffLoader(out) as ld:  # no pickle: no trust needed
        assert ld.store.meta("order_2").codec == "json"
        assert "bundle" not in ld.index and ld.load_all() == len(ld._specs)  # spec by spec
        for pid in ("order_0", "order_1", "order_2", "refund_5", "lib_0"):
            want = models.final_state(models.run_to_end(_from_xml(parsed, pid)))
            assert models.final_state(models.run_to_end(ld.workflow(pid))) == want


@pytest.fixture
def small(tmp_path):
    src = tmp_path / "small"
    models.generate(src, files=2)
    return src


def test_an_unparsable_file_is_named_and_nothing_is_built(small, tmp_path, capsys):
    (small / "orders" / "broken.bpmn").write_text("<bpmn:definitions")
    out = tmp_path / "s.kst"
    with pytest.raises(AdapterBuildError, match=r"orders/broken.bpmn: XMLSyntaxError: .*nothing was written|"
                                                r"nothing was written[\s\S]*orders/broken.bpmn: XMLSyntaxError"):
        build_spiff_store(small, out)
    assert not out.exists()
    assert main(["store", "build", "--spiff", str(small), "-o", str(out)]) == 1
    assert "orders/broken.bpmn: XMLSyntaxError" in capsys.readouterr().err and not out.exists()
    assert main(["store", "build", "--spiff", "--skip-invalid", str(small), "-o", str(out)]) == 0
    cap = capsys.readouterr()
    assert "skipped orders/broken.bpmn: XMLSyntaxError" in cap.err and "1 skipped" in cap.out
    with SpiffLoader(out, trust_pickle=True) as ld:
        assert len(ld.process_ids()) == 4 + models.LIBRARY_PROCESSES + len(models.PATTERN_PROCESSES)


def test_a_missing_called_process_names_the_process(small, tmp_path):
    shutil.rmtree(small / "lib")  # every order calls a library process
    out = tmp_path / "s.kst"
    with pytest.raises(AdapterBuildError) as e:
        build_spiff_store(small, out)
    assert "orders/order_000.bpmn#order_0: ValidationException" in str(e.value)
    assert "lib_0" in str(e.value)
    assert not out.exists()
    summary = build_spiff_store(small, out, skip_invalid=True)
    assert summary["processes"] == len(models.PATTERN_PROCESSES)  # the only ones that call nothing
    assert sorted(w.split("#")[1] for w, _ in summary["skipped"]) == ["order_0", "order_1", "refund_0", "refund_1"]


def test_a_spec_that_cannot_be_serialized_is_named(small, tmp_path, monkeypatch):
    real = spiff._parser

    def poisoned():
        p = real()
        get_spec = p.get_spec

        def get(pid, required=True):
            spec = get_spec(pid, required)
            if pid == "refund_1":
                spec.poison = lambda: None  # a lambda does not pickle
            return spec
        p.get_spec = get
        return p

    monkeypatch.setattr(spiff, "_parser", poisoned)
    with pytest.raises(AdapterBuildError, match=r"orders/order_001.bpmn#refund_1: cannot serialize the spec: "
                                                r"(PicklingError|AttributeError)"):
        build_spiff_store(small, tmp_path / "s.kst")
    summary = build_spiff_store(small, tmp_path / "s.kst", skip_invalid=True)
    assert [w for w, _ in summary["skipped"]] == ["orders/order_001.bpmn#refund_1"]


def test_cli_refuses_options_that_do_not_apply(small, tmp_path, capsys):
    # each with its own reason (a second trial: --zstd was given --last-wins's)
    out = str(tmp_path / "s.kst")
    assert main(["store", "build", "--spiff", "--zstd", "3", str(small), "-o", out]) == 2
    assert ("knhk-memory store build: error: --zstd does not apply to --spiff (specs are stored uncompressed"
            in capsys.readouterr().err)
    assert main(["store", "build", "--spiff", "--last-wins", str(small), "-o", out]) == 2
    assert "--last-wins does not apply to --spiff (a process id defined twice" in capsys.readouterr().err
    assert main(["store", "build", "--spiff", "--key-regex", "(x)", str(small), "-o", out]) == 2
    assert "--key-regex does not apply to --spiff (keys come from --key" in capsys.readouterr().err


def test_skip_invalid_that_skips_everything_writes_nothing_without_allow_empty(tmp_path, capsys):
    # A second trial: a folder where nothing parsed wrote an empty store, exit 0, over any old file.
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.bpmn").write_text("<bpmn:definitions")
    (src / "b.bpmn").write_text("not xml")
    out = tmp_path / "s.kst"
    out.write_bytes(b"the old file")
    with pytest.raises(AdapterBuildError, match=r"every process under .*bad was skipped \(2 problem\(s\) with "
                                                r"SpiffWorkflow .*\); nothing was written \(.*s.kst is left as it was; "
                                                r"--allow-empty writes an empty store\)"):
        build_spiff_store(src, out, skip_invalid=True)
    assert out.read_bytes() == b"the old file"
    assert main(["store", "build", "--spiff", "--skip-invalid", str(src), "-o", str(out)]) == 1
    assert "nothing was written" in capsys.readouterr().err and out.read_bytes() == b"the old file"
    assert main(["store", "build", "--spiff", "--skip-invalid", "--allow-empty", str(src), "-o", str(out)]) == 0
    assert "0 processes" in capsys.readouterr().out


def test_key_template_collision_names_both(small, tmp_path):
    with pytest.raises(AdapterBuildError, match=r"gives the key 'orders/order_000.bpmn' to both 'order_0' and "
                                                r"'refund_0'|gives the key '.*' to both"):
        build_spiff_store(small, tmp_path / "s.kst", key_template="{relpath}")


# ---------------------------------------------------------------- metrics


def _expected(loader, ids):
    """Counts by task type and (type, WCP id), gathered with SpiffWorkflow's own
    callback and the pattern map of each spec, independently of TaskMetrics."""
    from SpiffWorkflow.util.task import TaskState

    from knhk_memory.adapters.spiff_patterns import process_patterns

    counts: dict[str, int] = {}
    pats: dict[tuple[str, int], int] = {}
    tables: dict[int, dict] = {}

    def did(task):
        ts = task.task_spec
        t = type(ts).__name__
        counts[t] = counts.get(t, 0) + 1
        table = tables.setdefault(id(ts._wf_spec), process_patterns(ts._wf_spec))
        for p in table[ts.name]:
            pats[t, p] = pats.get((t, p), 0) + 1

    for pid in ids:
        wf = loader.workflow(pid)
        for _ in range(100):
            wf.do_engine_steps(None, did)
            if wf.completed:
                break
            for task in wf.get_tasks(state=TaskState.READY, manual=True):
                task.data["approved"] = True
                task.run()
                did(task)
            wf.refresh_timers()
    return counts, pats


IDS = ["order_0", "order_1", "order_3", "refund_0", "lib_0", *models.PATTERN_PROCESSES]


def _pattern_counts(snap):
    return {(t, p): n for t, v in snap.items() for p, n in v["patterns"].items()}


def test_task_metrics_count_every_task_by_type_and_pattern(loader):
    from knhk_memory.counters import PatternStats

    ps = PatternStats()
    with TaskMetrics.for_loader(loader, pattern_stats=ps) as tm:
        for pid in IDS:
            models.run_to_end(loader.workflow(pid), metrics=tm)
        snap = tm.snapshot()
        counts, pats = _expected(loader, IDS)
        assert {t: v["count"] for t, v in snap.items()} == counts
        assert _pattern_counts(snap) == pats
        for v in snap.values():
            assert v["buckets"][float("inf")] == v["count"] and v["seconds"] > 0
            cum = list(v["buckets"].values())
            assert cum == sorted(cum)  # cumulative
        # the engine-wide pattern statistics got every task under its patterns, not all under WCP-1
        by_wcp: dict[int, int] = {}
        for (_, p), n in pats.items():
            by_wcp[p] = by_wcp.get(p, 0) + n
        assert {p: r["executions"] for p, r in ps.as_dict().items()} == by_wcp
        assert {2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 14, 16, 19, 21, 25, 34, 43} <= set(by_wcp)
        # exported in the Prometheus text format (and OpenMetrics)
        text = tm.exposition()
        n_gw = counts["ExclusiveGateway"]
        assert f'spiff_tasks_completed_total{{task_type="ExclusiveGateway"}} {n_gw}' in text
        assert (f'spiff_task_patterns_total{{task_type="ParallelGateway",pattern="2",name="Parallel Split"}} '
                f'{pats["ParallelGateway", 2]}') in text
        assert f'spiff_task_duration_seconds_count{{task_type="ScriptTask"}} {counts["ScriptTask"]}' in text
        assert 'spiff_task_duration_seconds_bucket{task_type="ScriptTask",le="+Inf"}' in text
        assert tm.exposition(openmetrics=True).endswith("# EOF\n")
    ps.close()


def _worker(tm, path, ids):
    with SpiffLoader(path, trust_pickle=True) as ld:
        for pid in ids:
            models.run_to_end(ld.workflow(pid), metrics=tm)


def test_task_metrics_are_exact_across_processes(loader, store_path):
    with TaskMetrics.for_loader(loader, shared=True) as tm:
        # one forked worker (inherits the object) and one spawned (gets it pickled, as its name, and attaches)
        procs = [mp.get_context(m).Process(target=_worker, args=(tm, store_path, IDS)) for m in ("fork", "spawn")]
        for p in procs:
            p.start()
        _worker(tm, store_path, IDS)
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        counts, pats = _expected(loader, IDS)
        snap = tm.snapshot()
        assert {t: v["count"] for t, v in snap.items()} == {t: 3 * n for t, n in counts.items()}
        assert _pattern_counts(snap) == {k: 3 * n for k, n in pats.items()}
        # the histograms' sums are exact integers of ns: 3 processes' worth, nothing lost
        assert all(v["buckets"][float("inf")] == v["count"] for v in snap.values())


def test_private_metrics_do_not_pickle(loader):
    import pickle

    with TaskMetrics.for_loader(loader) as tm, pytest.raises(TypeError, match="shared=True"):
        pickle.dumps(tm)


def test_record_by_hand_and_bad_pattern_ids():
    with TaskMetrics() as tm:
        tm.record("Mystery", 5_000, patterns=(4, 5))
        snap = tm.snapshot()
        assert snap["Mystery"]["count"] == 1 and snap["Mystery"]["patterns"] == {4: 1, 5: 1}
        assert snap["Mystery"]["seconds"] == pytest.approx(5e-6)
        assert snap["Mystery"]["buckets"][spiff.BOUNDS_S[2]] == 1 and snap["Mystery"]["buckets"][spiff.BOUNDS_S[1]] == 0
        with pytest.raises(ValueError, match=r"pattern ids are 1..43.*got 44"):
            tm.record("Mystery", 1, patterns=(44,))
        assert tm.snapshot()["Mystery"]["count"] == 1  # the refused call recorded nothing


# ---------------------------------------------------------------- pattern map


def test_pattern_map_of_each_construct(loader):
    from knhk_memory.adapters.spiff_patterns import process_patterns

    def mapped(pid):
        out = {}
        for spec in (loader.spec(pid), *loader.subprocess_specs(pid).values()):
            out.update({n: p for n, p in process_patterns(spec).items() if p != (1,)})
        return out

    assert mapped("pat_inclusive") == {"pi_or_4": (6,), "pi_orjoin_5": (7,), "pat_inclusive.EndJoin": (11,)}
    assert mapped("pat_deferred") == {"pd_evgw_1": (16,), "pat_deferred.EndJoin": (11,)}
    assert mapped("pat_multi") == {"pm_mi_4": (13,), "pm_mi_6": (14,), "pm_mi_8": (14, 34), "pm_mi_10": (21,),
                                   "pm_mi_12": (21,), "pat_multi.EndJoin": (11,)}
    assert mapped("pat_cycle") == {"pc_loopmerge_4": (5, 21), "pc_looptest_5": (4,), "pat_cycle.EndJoin": (11,)}
    assert mapped("pat_arbitrary") == {"pa_pick_4": (4,), "pa_m1_5": (5, 10), "pa_m2_6": (5, 10), "pa_test_7": (4,),
                                       "pat_arbitrary.EndJoin": (11,)}
    assert mapped("pat_cancel") == {"pb_recv_2": (24,), "pb_boundary_4": (19,), "pb_boundary_12": (25,),
                                    "pb_sp_recv_2": (24,), "pat_cancel.EndJoin": (11,), "pb_sub_5.EndJoin": (11,),
                                    "pb_sub_5.BoundaryEventSplit": (8,)}  # two flows into the region
    assert mapped("pat_terminate") == {"pt_and_1": (2,), "pt_end_6": (43,), "pt_recv_8": (24,),
                                       "pat_terminate.EndJoin": (11,)}
    assert mapped("pat_uncontrolled") == {"pu_and_1": (2,), "pu_script_10": (8,), "pat_uncontrolled.EndJoin": (11,)}


def test_pattern_map_over_every_model(loader):
    """Every gateway of every stored spec lands on its split/join pattern, no
    gateway or loop is left as a plain WCP-1 step, and every id is in the table."""
    from knhk_memory.adapters.spiff_patterns import process_patterns
    from knhk_memory.patterns import builtin_patterns

    ids = {p.number for p in builtin_patterns()}
    rules = {"ParallelGateway": (2, 3), "ExclusiveGateway": (4, 5), "InclusiveGateway": (6, 7)}
    seen: dict[str, set[int]] = {}
    for name in loader._specs:
        spec = loader.spec(name)
        for ts_name, pats in process_patterns(spec).items():
            ts = spec.task_specs[ts_name]
            t = type(ts).__name__
            assert pats and set(pats) <= ids, (name, ts_name, pats)
            seen.setdefault(t, set()).update(pats)
            if t in rules:
                split, join = rules[t]
                assert (split in pats) == (len(ts.outputs) > 1), (name, ts_name, pats)
                assert (join in pats) == (len(ts.inputs) > 1), (name, ts_name, pats)
                assert pats != (1,), (name, ts_name)
    assert seen["ExclusiveGateway"] >= {4, 5} and seen["ParallelGateway"] == {2, 3}
    assert seen["ScriptTask"] == {1, 8} and seen["_EndJoin"] == {11}
    assert seen["EventBasedGateway"] == {16} and seen["BoundaryEvent"] == {19, 25}


# ---------------------------------------------------------------- the documented host


def test_the_host_in_the_docs_runs(tmp_path):
    import re

    text = (ROOT / "docs" / "adapters" / "spiff.md").read_text()
    body = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ})
    assert r.returncode == 0, r.stderr
    assert "order_7" in r.stdout


def test_the_commands_in_the_adapter_doc_parse():
    import re
    import shlex

    from knhk_memory.cli import build_parser

    text = (ROOT / "docs" / "adapters" / "spiff.md").read_text()
    lines = [ln.split("  #")[0] for body in re.findall(r"```sh\n(.*?)```", text, re.S)
             for ln in body.splitlines() if ln.startswith("knhk-memory ")]
    assert len(lines) >= 3
    for ln in lines:
        build_parser().parse_args(shlex.split(ln)[1:])


def test_a_process_id_in_two_files_is_named(small, tmp_path):
    text = (small / "orders" / "order_001.bpmn").read_text()
    (small / "orders" / "copy_of_order_001.bpmn").write_text(text)
    with pytest.raises(AdapterBuildError, match=r"orders/order_001.bpmn: ValidationException: Duplicate process ID: "
                                                r"order_1|orders/copy_of_order_001.bpmn.*Duplicate process ID"):
        build_spiff_store(small, tmp_path / "s.kst")


def test_a_damaged_spec_record_is_a_corrupt_error_not_a_workflow(store_path, tmp_path):
    from knhk_memory.store import WorkflowStore, WorkflowStoreWriter

    out = tmp_path / "damaged.kst"
    with WorkflowStore(store_path) as src, WorkflowStoreWriter(out) as w:
        for k, v in src.items():
            w._add_plain(k, b"\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00garbage"[:17]
                         if k == b"orders/order_000.bpmn#order_0" else bytes(v))
    with SpiffLoader(out, trust_pickle=True) as ld:
        with pytest.raises(StoreCorruptError, match=r"spec 'order_0' \('orders/order_000.bpmn#order_0'\) does not "
                                                    r"restore|pickle5 frame"):
            ld.workflow("order_0")
        assert ld.workflow("order_1") is not None  # the others are untouched


def test_a_damaged_all_specs_record_is_a_corrupt_error(store_path, tmp_path):
    from knhk_memory.records import encode
    from knhk_memory.store import WorkflowStore, WorkflowStoreWriter

    for bad, match in ((b"\x00" * 5, r"pickle5 frame of 5 bytes"),
                       (encode({"order_0": 1}, "pickle5"), r"does not hold the \d+ specs the index names")):
        out = tmp_path / "damaged.kst"
        out.unlink(missing_ok=True)
        with WorkflowStore(store_path) as src, WorkflowStoreWriter(out) as w:
            for k, v in src.items():
                w._add_plain(k, bad if k == spiff.BUNDLE_KEY.encode() else bytes(v))
        with SpiffLoader(out, trust_pickle=True) as ld, pytest.raises(StoreCorruptError, match=match):
            ld.load_all()
        with SpiffLoader(out, trust_pickle=True, cache_size=10) as ld:  # too small a cache: spec by spec
            assert ld.load_all() == len(ld._specs)


def test_a_source_without_models_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a model")
    with pytest.raises(AdapterBuildError, match=r"no .bpmn or .dmn files under .*empty"):
        build_spiff_store(tmp_path / "empty", tmp_path / "s.kst")
    assert not (tmp_path / "s.kst").exists()


@pytest.mark.parametrize("bad", [None, 5, b"order_0"])
def test_a_process_id_that_is_not_a_str_is_a_type_error(small, tmp_path, bad):
    # A second trial: workflow(None) said "no process None in the store" with no hint.
    out = tmp_path / "s.kst"
    build_spiff_store(small, out)
    with SpiffLoader(out, trust_pickle=True) as ld:
        with pytest.raises(TypeError, match=rf"a process id is a str \(e\.g\. '.+'\), got {type(bad).__name__} "):
            ld.workflow(bad)
        with pytest.raises(TypeError, match="a process id is a str"):
            ld.spec(bad)
