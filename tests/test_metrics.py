"""Labelled counter families, histograms and their exposition (knhk_memory.metrics, issue 17)."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import struct
import threading
import urllib.request

import pytest

from knhk_memory import Counters, PatternStats
from knhk_memory.config import load_config
from knhk_memory.errors import (
    ConfigError,
    CounterIncrementError,
    HistogramBucketsError,
    KnhkMemoryError,
    LabelSetLimitError,
    LabelValueError,
    MetricDefinitionError,
    MetricNameError,
    SharedBlockError,
    SharedBlockNotFoundError,
)
from knhk_memory.metrics import (
    CountersSource,
    GaugeSource,
    Metrics,
    PatternStatsSource,
    generate,
    make_server,
    prometheus_collector,
)

prom_parser = pytest.importorskip("prometheus_client.parser")
om_parser = pytest.importorskip("prometheus_client.openmetrics.parser")


@pytest.fixture
def block():
    m = Metrics(shared=True, max_label_sets=64, max_cells=1024)
    yield m
    m.close()


def parse(text: str, openmetrics: bool) -> dict[str, dict]:
    """{family name: {(sample name, sorted labels): value}} via prometheus_client's parsers."""
    fams = (om_parser if openmetrics else prom_parser).text_string_to_metric_families(text)
    out: dict[str, dict] = {}
    for f in fams:
        out[f.name] = {"type": f.type, "help": f.documentation,
                       "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}}
    return out


# ---------------------------------------------------------------- families


def test_counter_family_children_are_builtins_and_exact():
    m = Metrics()
    fam = m.counter("tasks_completed", "Tasks completed, by task type.", labels=("task_type",))
    user = fam.labels(task_type="UserTask")
    assert type(user.add).__name__ == "builtin_function_or_method"
    assert fam.labels("UserTask") is user  # positional and keyword give the same child
    user.add()
    user.add(41)
    user.inc()
    fam.labels(task_type="ScriptTask").add(2)
    assert user.get() == 43 and fam.get("ScriptTask") == 2
    nolab = m.counter("cases_total", "Cases.")  # _total is dropped, the exposition adds it back
    assert nolab.name == "cases"
    nolab.add(3)
    assert nolab.get() == 3
    assert m.usage()["label_sets"] == 3


def test_ints_as_label_values_are_decimal_strings():
    m = Metrics()
    fam = m.counter("http", "x", labels=("code",))
    fam.labels(code=200).add()
    assert fam.labels(code="200").get() == 1


def test_threads_add_exactly():
    m = Metrics()
    fam = m.counter("n", "n", labels=("t",))
    n = 20_000

    def run(k: int) -> None:
        child = fam.labels(t=str(k % 2))
        for _ in range(n):
            child.add()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fam.get("0") == 2 * n and fam.get("1") == 2 * n


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "ümlaut", None, 3])
def test_bad_metric_names_are_refused(name):
    with pytest.raises(MetricNameError, match=r"metric name .* is not accepted: names match \[a-zA-Z_:\]"):
        Metrics().counter(name, "x")


@pytest.mark.parametrize("label", ["", "1a", "a-b", "a:b", "é", 5])
def test_bad_label_names_are_refused(label):
    with pytest.raises(MetricNameError, match=r"label name .* is not accepted: label names match "
                                              r"\[a-zA-Z_\]\[a-zA-Z0-9_\]\*"):
        Metrics().counter("x", "x", labels=("ok", label))


def test_reserved_and_repeated_label_names_are_refused():
    m = Metrics()
    with pytest.raises(MetricNameError, match="label name '__name' is reserved"):
        m.counter("x", "x", labels=("__name",))
    with pytest.raises(MetricNameError, match="label name 'le' is reserved in this family type"):
        m.histogram("h", "x", labels=("le",))
    with pytest.raises(MetricNameError, match="label names must be unique; repeated: 'a'"):
        m.counter("x", "x", labels=("a", "b", "a"))
    with pytest.raises(MetricNameError, match="labels must be a sequence of label names, got 'ab'"):
        m.counter("x", "x", labels="ab")


def test_bad_label_values_are_refused():
    fam = Metrics().counter("x", "x", labels=("a", "b"))
    with pytest.raises(LabelValueError, match=r"family 'x' has labels \('a', 'b'\); missing \['b'\]"):
        fam.labels(a="1")
    with pytest.raises(LabelValueError, match=r"unknown \['c'\]"):
        fam.labels(a="1", b="2", c="3")
    with pytest.raises(LabelValueError, match=r"family 'x' has 2 labels \('a', 'b'\), got 1 values"):
        fam.labels("1")
    with pytest.raises(LabelValueError, match=r"label 'b' value 1\.5 is a float; label values are strings"):
        fam.labels("1", 1.5)
    with pytest.raises(LabelValueError, match="label 'a' value None is a NoneType"):
        fam.labels(None, "x")
    with pytest.raises(LabelValueError, match="by position or by name, not both"):
        fam.labels("1", b="2")
    with pytest.raises(LabelValueError, match=r"family 'x' has labels \('a', 'b'\): use .labels"):
        fam.add()


@pytest.mark.parametrize("n, message", [
    (-1, "a counter never goes down: increment -1 is negative"),
    (1.0, "a counter's increment must be an integer, got float 1.0"),
    (True, "a counter's increment must be an integer, got bool True"),
    ("1", "a counter's increment must be an integer, got str '1'"),
    (2**63, "increment 9223372036854775808 does not fit a 64-bit counter"),
])
def test_bad_increments_are_refused_and_add_nothing(n, message):
    child = Metrics().counter("x", "x", labels=("a",)).labels("v")
    with pytest.raises(CounterIncrementError, match=message):
        child.add(n)
    assert child.get() == 0


def test_redeclaring_a_family_differently_is_refused(block):
    block.counter("x", "help", labels=("a",))
    assert block.counter("x", "help", labels=("a",)) is block.counter("x_total", "help", labels=("a",))
    with pytest.raises(MetricDefinitionError, match=r"family 'x' already exists in this block as a counter with "
                                                    r"labels \('a',\) and help 'help'; declared now as a counter "
                                                    r"with labels \('b',\)"):
        block.counter("x", "help", labels=("b",))
    other = Metrics.attach(block.name)  # another handle: the definition in the block decides
    with pytest.raises(MetricDefinitionError, match="declared now as a histogram"):
        other.histogram("x", "help", labels=("a",))
    other.close()


# ---------------------------------------------------------------- bounds


def test_too_many_label_sets_raise_naming_the_bound_and_the_key():
    m = Metrics(max_label_sets=3)
    fam = m.counter("tasks", "x", labels=("task_type",))
    for t in ("a", "b", "c"):
        fam.labels(t).add()
    with pytest.raises(LabelSetLimitError, match=r"family 'tasks' cannot add the label set \{'task_type': 'd'\}: "
                                                 r"the metrics block is full \(all 3 label sets are used\); the "
                                                 r"bound is the config key \[metrics\] max_label_sets"):
        fam.labels("d")
    assert fam.labels("a").get() == 1  # known label sets still work
    assert m.usage()["label_sets"] == 3


def test_too_many_cells_raise_naming_max_cells():
    m = Metrics(max_label_sets=100, max_cells=12)
    h = m.histogram("h", "x", labels=("a",), buckets=(1, 2, 3))  # 5 cells a set
    h.labels("1")
    h.labels("2")
    with pytest.raises(LabelSetLimitError, match=r"the metrics block is full \(10 of its 12 cells are used, 5 more "
                                                 r"are needed\); the bound is the config key \[metrics\] max_cells"):
        h.labels("3")
    assert m.usage()["label_sets"] == 2  # the refused set gave its reservation back
    c = m.counter("c", "x")  # a smaller set still fits in what is left
    c.add(4)
    assert c.get() == 4 and m.usage()["cells"] == 11


@pytest.mark.parametrize("kw, message", [
    ({"max_label_sets": 0}, r"max_label_sets must be an integer in 1..1048576, got 0"),
    ({"max_label_sets": True}, r"max_label_sets must be an integer in 1..1048576, got True"),
    ({"max_cells": 65537}, r"max_cells must be an integer in 1..65536, got 65537"),
])
def test_bad_block_bounds_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        Metrics(**kw)


@pytest.mark.parametrize("key, value, message", [
    ("max_label_sets", 0, "must be a positive integer, got 0"),
    ("max_label_sets", 2**21, "must be at most 1048576, got 2097152"),
    ("max_label_sets", "10", "expected an integer, got the string '10'"),
    ("max_cells", 70000, "must be at most 65536, got 70000"),
    ("shared", "yes", "expected a boolean"),
])
def test_bad_metrics_config_is_refused(key, value, message):
    with pytest.raises(ConfigError, match=f"metrics.{key}") as exc:
        load_config(mapping={"metrics": {key: value}})
    assert message in str(exc.value)


def test_from_config():
    config = load_config(mapping={"metrics": {"max_label_sets": 5, "max_cells": 100}})
    m = Metrics.from_config(config)
    assert (m.max_label_sets, m.max_cells, m.shared) == (5, 100, False)
    with pytest.raises(ConfigError, match="attaching needs the block's name: set \\[metrics\\] shared_name"):
        Metrics.from_config(config, attach=True)


# ---------------------------------------------------------------- histograms


def test_histogram_le_semantics_and_cumulative_export():
    m = Metrics()
    h = m.histogram("lat_seconds", "Latency.", labels=("p",), buckets=(0.1, 1, 10))
    c = h.labels("a")
    assert type(c.observe).__name__ == "builtin_function_or_method"
    for v in (0.05, 0.1, 0.5, 1, 3, 100, -2):  # 0.1 and 1 land in their own bucket (le: <=)
        c.observe(v)
    got = c.get()
    assert got["buckets"] == [(0.1, 3), (1.0, 5), (10.0, 6), (math.inf, 7)]
    assert got["count"] == 7
    assert got["sum"] == pytest.approx(102.65, abs=1e-9)
    fams = parse(generate(m), openmetrics=False)
    s = fams["lat_seconds"]["samples"]
    assert s[("lat_seconds_bucket", (("le", "0.1"), ("p", "a")))] == 3
    assert s[("lat_seconds_bucket", (("le", "+Inf"), ("p", "a")))] == 7
    assert s[("lat_seconds_count", (("p", "a"),))] == 7
    assert s[("lat_seconds_sum", (("p", "a"),))] == pytest.approx(102.65)


def test_histogram_integer_observations_and_resolution():
    h = Metrics().histogram("ticks", "x", buckets=(10, 100), sum_resolution=1)
    for v in (5, 50, 500, 2**40):
        h.observe(v)
    assert h.labels().get()["sum"] == 5 + 50 + 500 + 2**40


@pytest.mark.parametrize("buckets, message", [
    ((1, 3, 2), r"buckets must be strictly increasing: bucket 2 \(2.0\) is below bucket 1 \(3.0\)"),
    ((1, 2, 2), r"buckets must be strictly increasing: bucket 2 \(2.0\) repeats bucket 1 \(2.0\)"),
    ((1, float("nan")), r"bucket 1 is NaN; bucket bounds are finite numbers"),
    ((float("inf"), 1), r"bucket 0 is inf; bucket bounds are finite \(the \+Inf bucket is implied"),
    ((float("-inf"),), r"bucket 0 is -inf"),
    ((1, "2"), r"bucket 1 is '2', not a number"),
    ((True,), r"bucket 0 is True, not a number"),
    ("0.1,1", r"buckets must be a sequence of numbers, got '0.1,1'"),
    (range(2000), r"2000 buckets; at most 1024 are accepted"),
])
def test_bad_buckets_are_refused(buckets, message):
    with pytest.raises(HistogramBucketsError, match=message):
        Metrics().histogram("h", "x", buckets=buckets)


def test_explicit_inf_last_and_bad_resolution():
    m = Metrics()
    assert m.histogram("h", "x", buckets=(1, 2, float("inf"))).buckets == (1.0, 2.0)
    with pytest.raises(HistogramBucketsError, match="sum_resolution must be a positive finite number, got 0"):
        m.histogram("g", "x", sum_resolution=0)


@pytest.mark.parametrize("value, message", [
    (float("nan"), "observation nan cannot be recorded: it must be finite"),
    (float("inf"), "observation inf cannot be recorded"),
    (1e12, r"observation 1000000000000.0 cannot be recorded: .* below 9.2e18"),
    ("1", "an observation must be a number, got str '1'"),
    (None, "an observation must be a number, got NoneType None"),
])
def test_bad_observations_are_refused_and_record_nothing(value, message):
    c = Metrics().histogram("h", "x", labels=("a",), buckets=(1,)).labels("v")
    with pytest.raises(CounterIncrementError, match=message):
        c.observe(value)
    assert c.get()["count"] == 0


# ---------------------------------------------------------------- exposition


def test_exposition_parses_back_with_both_parsers_and_escapes_values():
    m = Metrics()
    fam = m.counter("tasks_completed", 'Tasks "done"\nby type \\ ok.', labels=("task_type", "q"))
    weird = 'a"b\\c\nd'
    fam.labels(task_type="UserTask", q=weird).add(7)
    fam.labels(task_type="Ünïcode ✓", q="").add(2)
    m.histogram("lat_seconds", "Latency.", buckets=(0.5,)).observe(0.25)
    for om in (False, True):
        text = generate(m, openmetrics=om)
        assert text.endswith("# EOF\n") == om
        got = parse(text, om)
        samples = got["tasks_completed"]["samples"]
        assert got["tasks_completed"]["type"] == "counter"
        assert got["tasks_completed"]["help"] == 'Tasks "done"\nby type \\ ok.'
        assert samples[("tasks_completed_total", (("q", weird), ("task_type", "UserTask")))] == 7
        assert samples[("tasks_completed_total", (("q", ""), ("task_type", "Ünïcode ✓")))] == 2
        assert got["lat_seconds"]["samples"][("lat_seconds_sum", ())] == 0.25
        assert got["lat_seconds"]["samples"][("lat_seconds_bucket", (("le", "0.5"),))] == 1
    # the exact text of one line: what a scraper reads
    assert 'tasks_completed_total{task_type="UserTask",q="a\\"b\\\\c\\nd"} 7' in generate(m)


def test_other_sources_and_duplicate_family_names():
    c = Counters(["cases_started", "errors"])
    c.add("cases_started", 4)
    ps = PatternStats()
    ps.record(1, 1000)
    g = GaugeSource("knhk_arena_bytes", "Arena bytes.", lambda: {("a1",): 10, ("a2",): 20}, labels=("arena",))
    text = generate(CountersSource(c), PatternStatsSource(ps), g, openmetrics=True)
    got = parse(text, True)
    assert got["knhk_cases_started"]["samples"][("knhk_cases_started_total", ())] == 4
    assert got["knhk_pattern_executions"]["samples"][
        ("knhk_pattern_executions_total", (("name", "Sequence"), ("pattern", "1")))] == 1
    assert got["knhk_arena_bytes"]["samples"][("knhk_arena_bytes", (("arena", "a2"),))] == 20
    with pytest.raises(MetricDefinitionError, match="two sources export the family 'knhk_cases_started'"):
        generate(CountersSource(c), CountersSource(c))
    with pytest.raises(MetricNameError, match="metric name 'knhk_bad-name' is not accepted"):
        CountersSource(Counters(["bad-name"]))
    text = generate(CountersSource(Counters(["jobs_total"])), openmetrics=True)
    assert "# TYPE knhk_jobs counter\nknhk_jobs_total 0\n" in text
    assert next(iter(om_parser.text_string_to_metric_families(text))).name == "knhk_jobs"


def test_prometheus_client_collector():
    from prometheus_client import CollectorRegistry, generate_latest

    m = Metrics()
    m.counter("jobs", "Jobs.", labels=("kind",)).labels("x").add(3)
    m.histogram("lat", "L.", labels=("kind",), buckets=(1, 2)).labels("x").observe(1.5)
    reg = CollectorRegistry()
    reg.register(prometheus_collector(m))
    got = parse(generate_latest(reg).decode(), False)
    assert got["jobs"]["samples"][("jobs_total", (("kind", "x"),))] == 3
    assert got["lat"]["samples"][("lat_bucket", (("kind", "x"), ("le", "2.0")))] == 1
    assert got["lat"]["samples"][("lat_sum", (("kind", "x"),))] == 1.5


def test_scrape_over_http_on_loopback():
    m = Metrics()
    m.counter("hits", "Hits.").add(5)
    server = make_server([m], port=0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert parse(r.read().decode(), False)["hits"]["samples"][("hits_total", ())] == 5
        req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Accept": "application/openmetrics-text"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read().decode()
            assert r.headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith("# EOF\n")
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- across processes


def _child_adds(name: str, value: str, n: int) -> None:
    m = Metrics.attach(name)
    fam = m.counter("tasks", "Tasks.", labels=("task_type",))
    child = fam.labels(value)
    for _ in range(n):
        child.add()
    m.histogram("lat", "L.", labels=("task_type",), buckets=(1.0,)).labels(value).observe(0.5)
    m.close()


def test_a_label_set_first_seen_in_one_process_is_visible_to_all(block):
    fam = block.counter("tasks", "Tasks.", labels=("task_type",))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child_adds, args=(block.name, v, 1000)) for v in ("A", "B", "A")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert fam.get("A") == 2000 and fam.get("B") == 1000
    got = parse(generate(block), False)
    assert got["tasks"]["samples"][("tasks_total", (("task_type", "A"),))] == 2000
    assert got["lat"]["samples"][("lat_count", (("task_type", "A"),))] == 2
    assert block.usage()["label_sets"] == 4  # A and B in two families: inserted once each
    other = pickle.loads(pickle.dumps(block))  # pickles as its name
    assert other.counter("tasks", "Tasks.", labels=("task_type",)).get("B") == 1000
    other.close()


def test_private_blocks_do_not_pickle_and_closed_blocks_refuse():
    m = Metrics()
    child = m.counter("x", "x").labels()
    with pytest.raises(TypeError, match="a private Metrics block cannot be sent to another process"):
        pickle.dumps(m)
    m.close()
    with pytest.raises(KnhkMemoryError, match="this Metrics block is closed"):
        child.add()
    with pytest.raises(KnhkMemoryError, match="this Metrics block is closed"):
        generate(m)


# ---------------------------------------------------------------- untrusted blocks


def _file_block(tmp_path, **kw) -> Metrics:
    return Metrics(shared=str(tmp_path / "m.block"), **kw)


def test_attach_refuses_what_is_not_a_metrics_block(tmp_path):
    with pytest.raises(SharedBlockNotFoundError, match=r"no metrics block to attach to: file .*nope"):
        Metrics.attach(str(tmp_path / "nope"))
    path = tmp_path / "junk"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(SharedBlockError, match="not a metrics block this build can use: 64 bytes cannot hold"):
        Metrics.attach(str(path))
    path.write_bytes(b"x" * 8192)
    with pytest.raises(SharedBlockError, match="not a metrics block \\(magic"):
        Metrics.attach(str(path))
    c = Counters(["a"], shared=str(tmp_path / "c.block"))
    with pytest.raises(SharedBlockError, match="not a metrics block"):
        Metrics.attach(str(tmp_path / "c.block"))
    c.close()


def test_attach_checks_sizes_and_checksum(tmp_path):
    m = _file_block(tmp_path, max_label_sets=8, max_cells=64)
    path = tmp_path / "m.block"
    data = bytearray(path.read_bytes())
    truncated = tmp_path / "t.block"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SharedBlockError, match=r"metrics block needs .* bytes, only .* are mapped"):
        Metrics.attach(str(truncated))
    bad = bytearray(data)
    struct.pack_into("<I", bad, 20, 2**30)  # max_sets: the checksum no longer matches
    (tmp_path / "b.block").write_bytes(bad)
    with pytest.raises(SharedBlockError, match="header checksum does not match"):
        Metrics.attach(str(tmp_path / "b.block"))
    m.close()


def _table(path) -> tuple[int, int]:
    data = path.read_bytes()
    capacity = struct.unpack_from("<I", data, 16)[0]
    table_off = struct.unpack_from("<Q", data, 40)[0]
    return capacity, table_off


def test_corrupt_entries_are_skipped_and_counted_not_read_out_of_bounds(tmp_path):
    m = _file_block(tmp_path)
    fam = m.counter("x", "x", labels=("a",))
    fam.labels("1").add(1)
    fam.labels("2").add(2)
    path = tmp_path / "m.block"
    capacity, table_off = _table(path)
    other = Metrics.attach(str(path))  # a fresh handle: nothing decoded yet
    with open(path, "r+b") as f:
        data = f.read()
        for i in range(capacity):
            off = table_off + 48 * i
            state, kind = struct.unpack_from("<Q", data, off)[0], struct.unpack_from("<I", data, off + 32)[0]
            if state == 2 and kind == 2:  # a READY label set: point its key far outside the arena
                f.seek(off + 16)
                f.write(struct.pack("<Q", 2**62))
                break
    got = parse(generate(other), False)
    assert got["knhk_metrics_skipped_entries"]["samples"][("knhk_metrics_skipped_entries", ())] == 1
    assert sum(got["x"]["samples"].values()) in (1, 2)  # the other label set is intact
    other.close()
    m.close()


def _fnv(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _dead_pid() -> int:
    p = mp.get_context("fork").Process(target=os._exit, args=(0,))
    p.start()
    p.join()
    return p.pid


def test_an_insert_killed_mid_write_is_buried_and_the_key_inserted_once(tmp_path):
    m = _file_block(tmp_path)
    fam = m.counter("x", "x", labels=("a",))
    path = tmp_path / "m.block"
    capacity, table_off = _table(path)
    key = b'["v"]'
    h = _fnv(struct.pack("<II", 2, fam._entry) + key)
    slot = h & (capacity - 1)
    with open(path, "r+b") as f:  # a WRITING entry of a process that is gone
        f.seek(table_off + 48 * slot)
        f.write(struct.pack("<Q", (_dead_pid() << 32) | 1))
    fam.labels("v").add(3)
    other = Metrics.attach(str(path))
    assert other.counter("x", "x", labels=("a",)).get("v") == 3
    assert parse(generate(other), False)["x"]["samples"][("x_total", (("a", "v"),))] == 3
    other.close()
    m.close()


def test_an_insert_stuck_in_a_live_process_is_buried_after_2_s_not_waited_for_forever(tmp_path):
    import time

    m = _file_block(tmp_path)
    fam = m.counter("x", "x", labels=("a",))
    path = tmp_path / "m.block"
    capacity, table_off = _table(path)
    key = b'["stuck"]'
    slot = _fnv(struct.pack("<II", 2, fam._entry) + key) & (capacity - 1)
    with open(path, "r+b") as f:  # WRITING by a live pid (this one) that never finishes
        f.seek(table_off + 48 * slot)
        f.write(struct.pack("<Q", (os.getpid() << 32) | 1))
    t0 = time.monotonic()
    fam.labels("stuck").add(2)
    assert 1.9 < time.monotonic() - t0 < 30
    assert fam.get("stuck") == 2
    assert parse(generate(m), False)["x"]["samples"][("x_total", (("a", "stuck"),))] == 2
    m.close()


def _inserter(name: str, start, n: int) -> None:
    m = Metrics.attach(name)
    fam = m.counter("race", "r", labels=("k",))
    start.wait()
    for i in range(n):
        fam.labels(str(i)).add()
    m.close()


def test_concurrent_inserts_of_the_same_label_sets_meet_at_one_entry(block):
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_inserter, args=(block.name, start, 50)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    fam = block.counter("race", "r", labels=("k",))
    assert [fam.get(str(i)) for i in range(50)] == [3] * 50
    assert block.usage()["label_sets"] == 50


def test_fork_after_binding_children_counts_into_the_same_totals(block):
    fam = block.counter("forked", "f", labels=("who",))
    child = fam.labels("any")  # bound before the fork: the builtin goes with it
    child.add(5)
    hist = block.histogram("forked_seconds", "f", buckets=(1.0,)).labels()
    ctx = mp.get_context("fork")

    def run() -> None:
        for _ in range(1000):
            child.add()
        hist.observe(0.5)
        fam.labels("child").add(7)  # a label set first used after the fork
        os._exit(0)

    procs = [ctx.Process(target=run) for _ in range(3)]
    for p in procs:
        p.start()
    for _ in range(1000):
        child.add()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert child.get() == 5 + 4 * 1000
    assert fam.get("child") == 21
    assert hist.get()["count"] == 3


def test_the_memory_plugin_makes_the_block_on_first_use_and_closes_it():
    from knhk_memory import get_plugin_manager

    config = load_config(mapping={"metrics": {"max_label_sets": 7, "max_cells": 70}})
    pm = get_plugin_manager()
    pm.hook.knhk_configure(config=config)
    try:
        block = pm.hook.knhk_metrics(config=config)
        assert block is pm.hook.knhk_metrics(config=config)
        assert (block.max_label_sets, block.max_cells) == (7, 70)
        block.counter("x", "x").add()
        (stats,) = [s for s in pm.hook.knhk_memory_stats(config=config) if s]
        got = stats["metrics"]
        assert got == {"shared_name": None, "label_sets": 1, "families": 1, "bytes": got["bytes"], "cells": 1,
                       "max_label_sets": 7, "max_cells": 70}
    finally:
        pm.hook.knhk_unconfigure(config=config)
    assert block.closed


def test_the_memory_plugin_names_the_key_when_the_block_cannot_be_made(tmp_path):
    from knhk_memory import get_plugin_manager

    taken = Metrics(shared=str(tmp_path / "taken"))
    config = load_config(mapping={"metrics": {"shared_name": str(tmp_path / "taken")}})
    pm = get_plugin_manager()
    pm.hook.knhk_configure(config=config)
    try:
        with pytest.raises(ConfigError, match=r"metrics\.shared_name.*already exists"):
            pm.hook.knhk_metrics(config=config)
    finally:
        pm.hook.knhk_unconfigure(config=config)
        taken.close()


def test_a_label_set_entry_with_the_wrong_cells_is_refused_not_written_through(tmp_path):
    m = _file_block(tmp_path)
    m.counter("x", "x", labels=("a",)).labels("1").add(1)
    path = tmp_path / "m.block"
    capacity, table_off = _table(path)
    with open(path, "r+b") as f:
        data = f.read()
        for i in range(capacity):
            off = table_off + 48 * i
            if struct.unpack_from("<Q", data, off)[0] == 2 and struct.unpack_from("<I", data, off + 32)[0] == 2:
                f.seek(off + 44)
                f.write(struct.pack("<I", 3))  # ncells 3 on a counter's label set
                break
    other = Metrics.attach(str(path))
    with pytest.raises(SharedBlockError, match=r"entry for x\['1'\] is corrupt \(it does not own the 1 cells"):
        other.counter("x", "x", labels=("a",)).labels("1")
    got = parse(generate(other), False)
    assert got["knhk_metrics_skipped_entries"]["samples"][("knhk_metrics_skipped_entries", ())] == 1
    other.close()
    m.close()


def test_random_corruption_never_crashes_an_attach_or_a_scrape(tmp_path_factory):
    """Flip bytes anywhere in the header, table and label-value arena of a real block:
    attaching refuses it with SharedBlockError, or a scrape reads what is intact and
    parses; nothing reads out of bounds (run under ASan by docs/development.md)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    src = tmp_path_factory.mktemp("fuzz") / "m.block"
    m = Metrics(shared=str(src), max_label_sets=8, max_cells=64)
    m.counter("jobs", "Jobs.", labels=("kind", "zone")).labels("a", "z1").add(3)
    m.histogram("lat", "L.", labels=("kind",), buckets=(1, 2)).labels("b").observe(1.5)
    pristine = src.read_bytes()
    _, table_off = _table(src)
    arena_end = struct.unpack_from("<Q", pristine, 64)[0]  # counters_off: header, table and arena end here
    m.close()
    target = src.parent / "fuzzed.block"

    where = st.one_of(st.integers(0, table_off - 1), st.integers(table_off, arena_end - 1))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(where, st.integers(0, 255)), min_size=1, max_size=8))
    def run(flips):
        data = bytearray(pristine)
        for off, byte in flips:
            data[off] = byte
        target.write_bytes(bytes(data))
        try:
            block = Metrics.attach(str(target))
        except SharedBlockError:
            return
        try:
            text = generate(block)
            parse(text, False)
            parse(generate(block, openmetrics=True), True)
        finally:
            block.close()

    run()


def test_pattern_histograms_next_to_pattern_stats():
    from knhk_memory.errors import CounterIndexError
    from knhk_memory.metrics import PatternHistograms

    m = Metrics()
    h = PatternHistograms(m)
    tps = PatternStats.ticks_per_second()
    h.record(3, int(tps * 2e-6), count=10)  # 10 executions of 2 us
    h.record(3, 0)
    with h.time(7):
        pass
    got = h.child(3).get()
    assert got["count"] == 11
    assert dict(got["buckets"])[2.5e-6] == 11 and dict(got["buckets"])[1e-6] == 1
    assert got["sum"] == pytest.approx(20e-6, rel=1e-3)
    assert h.child(7).get()["count"] == 1
    with pytest.raises(CounterIndexError, match=r"pattern id 44 is out of range \[1, 43\]"):
        h.record(44, 1)
    with pytest.raises(TypeError, match=r"a pattern id is an integer 1\.\.43, got str '3'"):
        h.record("3", 1)
    with pytest.raises(CounterIncrementError, match="ticks must be an integer >= 0, got -1"):
        h.record(3, -1)
    with pytest.raises(CounterIncrementError, match=r"count must be an integer in 0..9223372036854775807, got -2"):
        h.record(3, 1, count=-2)
    fams = parse(generate(m), False)
    assert fams["knhk_pattern_execution_seconds"]["samples"][
        ("knhk_pattern_execution_seconds_count", (("pattern", "3"),))] == 11


def test_too_many_families_raise_naming_the_fixed_bound():
    m = Metrics(max_label_sets=1, max_cells=1)
    for i in range(256):
        m.counter(f"f{i}", "x")
    with pytest.raises(LabelSetLimitError, match=r"declaring family 'f256': the metrics block is full \(all 256 "
                                                 r"families are used\); a block holds at most 256 families \(a fixed "
                                                 r"bound, no config key\)"):
        m.counter("f256", "x")
    assert m.usage()["families"] == 256
