"""Tick counter, harness, budgets, the `budget` command and the pytest plugin."""

from __future__ import annotations

import json
import textwrap

import pytest

from knhk_memory import budgets
from knhk_memory._core import ffi, lib
from knhk_memory.allocator import get_backend
from knhk_memory.budgets import (
    Settings,
    choose_counter,
    gather_ops,
    resolve_budgets,
    run_budgets,
    use_counter,
)
from knhk_memory.cli import main
from knhk_memory.config import load_config
from knhk_memory.errors import ConfigError, HotOpError, UnknownOperationError
from knhk_memory.hookspecs import hookimpl
from knhk_memory.host import get_plugin_manager
from knhk_memory.hotpath import (
    DefaultBudget,
    HotOp,
    PyHotOp,
    default_budgets,
    parse_default_budgets,
    with_default_budgets,
)
from knhk_memory.plugins import memory

pytest_plugins = ("pytester",)

FAST = Settings(batches=31, warmup=2, py_batches=11, py_batch_ns=20_000)
INVARIANT = {"has_tsc": 1, "has_rdtscp": 1, "invariant_tsc": 1, "has_cntvct": 0, "tsc_hz": 2.5e9}


@pytest.fixture(autouse=True)
def _auto_counter():
    yield
    lib.knhk_ticks_select(lib.KNHK_TICKS_AUTO)


def memory_pm(*plugins):
    """A plugin manager with the memory plugin (the built-in hot paths) and ``plugins``."""
    return get_plugin_manager([memory, *plugins], autoload=False)


# ---------------------------------------------------------------- the C counter and harness

def counter() -> dict:
    c = ffi.new("knhk_tick_counter *")
    assert lib.knhk_ticks_counter(c) == lib.KNHK_OK
    return {k: getattr(c, k) for k in dir(c)}


def ticks_here() -> bool:
    """Whether C operations are figured in ticks here: a cycle counter (rdtscp,
    cntvct), or clock_gettime with a TSC rate to convert at. Without one (a
    KNHK_PORTABLE=1 build reads no counter; a machine may have none) native
    figures are nanoseconds only and their verdicts "unchecked", which the
    tests below then assert instead."""
    return use_counter("auto").tick_hz > 0


def test_counter_facts_are_consistent():
    c = counter()
    assert c["hz"] > 0
    assert c["source"] in (lib.KNHK_TICKS_RDTSCP, lib.KNHK_TICKS_RDTSC_LFENCE, lib.KNHK_TICKS_CNTVCT,
                           lib.KNHK_TICKS_CLOCK_GETTIME)
    if c["has_tsc"]:
        # The TSC's rate from CPUID (or calibration) agrees with a measurement within 2 %.
        assert c["tsc_hz"] == pytest.approx(c["tsc_calibrated_hz"], rel=0.02)
        assert (c["source"] == lib.KNHK_TICKS_CLOCK_GETTIME) == (not c["invariant_tsc"])
    names = {s: ffi.string(lib.knhk_ticks_source_name(s)).decode() for s in range(6)}
    assert names == {0: "auto", 1: "rdtscp", 2: "lfence+rdtsc", 3: "cntvct_el0", 4: "clock_gettime", 5: "unknown"}


def test_ticks_now_moves_forward_on_every_counter():
    for source in (lib.KNHK_TICKS_AUTO, lib.KNHK_TICKS_CLOCK_GETTIME):
        assert lib.knhk_ticks_select(source) == lib.KNHK_OK
        a = lib.knhk_ticks_now()
        b = lib.knhk_ticks_now()
        assert b >= a > 0


def test_select_rejects_unknown_and_absent_counters():
    assert lib.knhk_ticks_select(99) == lib.KNHK_ERR_INVALID
    assert "tick source 99 is not one of" in ffi.string(lib.knhk_last_error()).decode()
    # x86 has no cntvct; aarch64 and a KNHK_PORTABLE build have no rdtscp.
    absent, name = ((lib.KNHK_TICKS_CNTVCT, "cntvct") if counter()["has_tsc"]
                    else (lib.KNHK_TICKS_RDTSCP, "rdtscp"))
    assert lib.knhk_ticks_select(absent) == lib.KNHK_ERR_UNAVAILABLE
    assert "tick source" in ffi.string(lib.knhk_last_error()).decode()
    with pytest.raises(HotOpError, match=f"selecting tick counter '{name}'.*unavailable"):
        use_counter(name)


def measure(fn, ctx, **params):
    p = ffi.new("knhk_ticks_params *", {"batches": 51, "warmup": 2, **params})
    out = ffi.new("knhk_ticks_result *")
    return lib.knhk_ticks_measure(fn, ctx, p, out), out


def test_empty_op_measures_zero_and_a_real_op_does_not():
    lib.knhk_ticks_hotop_empty(ffi.NULL, 10)  # callable on its own, like every hot op
    status, out = measure(ffi.addressof(lib, "knhk_ticks_hotop_empty"), ffi.NULL)
    assert status == lib.KNHK_OK
    # The harness subtracts its own loop: what is left is noise, a few ticks at most on a busy VM.
    assert out.median < 3 and out.overhead > 0 and out.batches == 51
    backend = get_backend("system")
    lib.knhk_backend_hotop_malloc_free(ffi.cast("void *", backend.cdata), 100)
    status, out = measure(ffi.addressof(lib, "knhk_backend_hotop_malloc_free"), ffi.cast("void *", backend.cdata))
    assert status == lib.KNHK_OK
    assert out.median > 5 and out.min <= out.median <= out.raw_median
    assert out.iterations >= 16  # grown until a batch lasts ~8 us


def test_measure_rejects_bad_parameters():
    fn = ffi.addressof(lib, "knhk_ticks_hotop_empty")
    assert measure(fn, ffi.NULL, batches=2)[0] == lib.KNHK_ERR_INVALID
    assert "batches must be in [3, 100000], got 2" in ffi.string(lib.knhk_last_error()).decode()
    assert measure(fn, ffi.NULL, batches=lib.KNHK_TICKS_MAX_BATCHES + 1)[0] == lib.KNHK_ERR_INVALID
    assert measure(fn, ffi.NULL, iterations=lib.KNHK_TICKS_MAX_ITERATIONS + 1)[0] == lib.KNHK_ERR_INVALID
    assert "iterations must be 0 (automatic) or at most" in ffi.string(lib.knhk_last_error()).decode()
    p = ffi.new("knhk_ticks_params *", {"batches": 5})
    assert lib.knhk_ticks_measure(ffi.NULL, ffi.NULL, p, ffi.new("knhk_ticks_result *")) == lib.KNHK_ERR_INVALID
    status, out = measure(fn, ffi.NULL, iterations=1000)
    assert status == lib.KNHK_OK and out.iterations == 1000


# ---------------------------------------------------------------- counter policy: no invariant TSC

def test_auto_uses_the_invariant_tsc():
    assert choose_counter(INVARIANT) == (lib.KNHK_TICKS_RDTSCP, True, "")
    assert choose_counter({**INVARIANT, "has_rdtscp": 0})[0] == lib.KNHK_TICKS_RDTSC_LFENCE


def test_without_invariant_tsc_auto_falls_back_and_says_so():
    source, trusted, note = choose_counter({**INVARIANT, "invariant_tsc": 0})
    assert source == lib.KNHK_TICKS_CLOCK_GETTIME and not trusted
    assert "TSC is not invariant (CPUID 0x80000007 EDX bit 8 clear)" in note and "advisory" in note
    source, trusted, note = choose_counter({**INVARIANT, "has_tsc": 0, "invariant_tsc": 0, "tsc_hz": 0})
    assert source == lib.KNHK_TICKS_CLOCK_GETTIME and not trusted and "no cycle counter" in note
    assert choose_counter({**INVARIANT, "has_tsc": 0, "has_cntvct": 1})[:2] == (lib.KNHK_TICKS_CNTVCT, True)
    with pytest.raises(ValueError, match="unknown tick counter 'tsc'; accepted: auto, rdtscp"):
        choose_counter(INVARIANT, "tsc")


def test_a_broken_budget_without_invariant_tsc_is_advisory_not_a_failure():
    config = load_config(mapping={"budgets": {"backend_malloc_free": 1}})
    # The whole played machine (its TSC rate too), so it plays the same on a
    # machine without a TSC or in a KNHK_PORTABLE build.
    report = run_budgets(config, pm=memory_pm(), only=["backend_malloc_free"],
                         facts={**INVARIANT, "invariant_tsc": 0}, settings=FAST)
    (r,) = report.results
    assert r.counter == "clock_gettime" and not r.trusted
    assert r.over and not r.failed and r.verdict.endswith("(advisory)") and r.attempts == 2
    assert report.failed == []
    assert "TSC NOT invariant" in budgets.format_table(report)


# ---------------------------------------------------------------- budgets from the config

def write(tmp_path, text: str):
    path = tmp_path / "knhk.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("value, message", [
    ("0", "budgets.backend_malloc_free: must be a positive integer, got 0"),
    ("-5", "budgets.backend_malloc_free: must be a positive integer, got -5"),
    ("1.5", "budgets.backend_malloc_free: expected an integer, got the number 1.5"),
    ('"80"', "budgets.backend_malloc_free: expected an integer, got the string '80'"),
    ("true", "budgets.backend_malloc_free: expected an integer, got the boolean True"),
])
def test_bad_budget_values_are_config_errors(tmp_path, value, message):
    path = write(tmp_path, f"[budgets]\nbackend_malloc_free = {value}\n")
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        load_config(path)


def test_unknown_operation_in_budgets_is_a_config_error(tmp_path):
    config = load_config(write(tmp_path, "[budgets]\nbackend_malloc_fre = 90\n"))
    with pytest.raises(ConfigError, match=r"budgets.backend_malloc_fre: unknown hot-path operation "
                                          r"'backend_malloc_fre'; operations with budgets: backend_malloc_free, "
                                          r".*\(did you mean 'backend_malloc_free'"):
        resolve_budgets(config, gather_ops(config, memory_pm()))


def test_config_overrides_default_budgets(tmp_path):
    config = load_config(write(tmp_path, "[budgets]\nbackend_malloc_free = 400\npy_get_backend = 900\n"))
    resolved = resolve_budgets(config, gather_ops(config, memory_pm()))
    assert resolved["backend_malloc_free"] == (400, "config")
    assert resolved["py_get_backend"] == (900, "config")
    assert resolved["py_malloc_free"][1] == "default"
    assert load_config(mapping={}).budgets == {}


# ---------------------------------------------------------------- gathering

def test_the_memory_plugin_gives_the_built_in_ops_with_budgets():
    ops = gather_ops(None, memory_pm())
    names = [op.name for op in ops]
    assert "backend_malloc_free" in names and "py_malloc_free" in names
    assert len(set(names)) == len(names)
    by = {op.name: op for op in ops}
    assert by["backend_malloc_free"].default_budget == 250 and "measured" in by["backend_malloc_free"].budget_reason
    assert by["py_get_backend"].default_budget == 1500


def test_every_built_in_op_has_a_default_budget_and_every_budget_an_op():
    ops = memory.builtin_hot_ops()
    table = default_budgets()
    assert sorted(op.name for op in ops) == sorted(table)
    for op in ops:
        assert op.default_budget == 0 and op.budget_reason == ""  # the numbers live in the data file only
        entry = table[op.name]
        assert entry.unit == ("ticks" if isinstance(op, HotOp) else "ns"), op.name
        assert entry.budget > 0 and len(entry.reason) > 20, op.name


def test_budgets_need_a_plugin_manager():
    with pytest.raises(TypeError, match=r"the budgets need the engine's plugin manager "
                                        r"\(knhk_memory.get_plugin_manager\(\)\), got None"):
        gather_ops(None, None)
    # Without the memory plugin there are no built-in operations.
    assert gather_ops(None, get_plugin_manager(autoload=False)) == []


def test_a_built_in_op_without_a_default_budget_is_an_error():
    op = empty_op("brand_new_op", budget=0)
    with pytest.raises(HotOpError, match=r"built-in hot-path operation 'brand_new_op' has no default budget in "
                                         r"knhk_memory/data/budgets.toml; add a \[brand_new_op\] table"):
        with_default_budgets([op])
    with pytest.raises(HotOpError, match=r"budgets.toml: \[brand_new_op\]: unit is 'ns', but the operation is "
                                         r"a C hot path \(ticks\)"):
        with_default_budgets([op], {"brand_new_op": DefaultBudget(5, "ns", "measured")})
    (filled,) = with_default_budgets([op], {"brand_new_op": DefaultBudget(5, "ticks", "measured 1-2 ticks")})
    assert (filled.default_budget, filled.budget_reason) == (5, "measured 1-2 ticks")


@pytest.mark.parametrize("text, message", [
    ("[a]\nbudget = 0\nunit = 'ticks'\nreason = 'x'\n", r"\[a\]: budget must be a positive integer, got 0"),
    ("[a]\nbudget = true\nunit = 'ticks'\nreason = 'x'\n", r"\[a\]: budget must be a positive integer, got True"),
    ("[a]\nbudget = 5\nunit = 'cycles'\nreason = 'x'\n", r"\[a\]: unit must be 'ticks' or 'ns', got 'cycles'"),
    ("[a]\nbudget = 5\nunit = 'ns'\nreason = ' '\n", r"\[a\]: reason must say what was measured, got ' '"),
    ("[a]\nbudget = 5\nunits = 'ns'\n", (r"\[a\]: expected the keys budget, unit and reason; unknown: units; "
                                          r"missing: unit, reason")),
    ("a = 5\n", r"\[a\]: expected a table of budget, unit and reason, got 5"),
    ("[a\n", r"budgets.toml is not valid TOML"),
])
def test_a_malformed_budgets_file_is_refused(text, message):
    with pytest.raises(HotOpError, match=message):
        parse_default_budgets(text)


class EnginePlugin:
    """An engine plugin with one C and one Python hot path of its own."""

    def __init__(self, ops):
        self.ops = ops

    @hookimpl
    def knhk_hot_ops(self, config):
        return self.ops


def empty_op(name="engine_empty", budget=50):
    return HotOp(name, "the harness's empty op, as an engine's", ffi.addressof(lib, "knhk_ticks_hotop_empty"),
                 lambda: (ffi.NULL, lambda: None), budget)


def py_op(name="engine_py", budget=10**6):
    cleaned = []
    return PyHotOp(name, "a dict lookup", lambda: ((lambda: {1: 2}.get(1)), lambda: cleaned.append(1)), budget), cleaned


def test_knhk_hot_ops_hook_adds_a_plugins_operations():
    pop, cleaned = py_op()
    pm = memory_pm(EnginePlugin([empty_op(), pop]))
    config = load_config(mapping={"budgets": {"engine_empty": 5}})
    report = run_budgets(config, pm=pm, only=["engine_empty", "engine_py"], settings=FAST)
    by = {r.name: r for r in report.results}
    assert by["engine_empty"].budget == 5 and by["engine_empty"].budget_source == "config"
    if ticks_here():
        assert by["engine_empty"].verdict == "ok" and by["engine_empty"].median_ticks < 1
    else:  # nanoseconds only: measured, not judged
        assert by["engine_empty"].verdict == "unchecked" and by["engine_empty"].median_ticks is None
        assert by["engine_empty"].median_ns < 1
    assert by["engine_py"].unit == "ns" and by["engine_py"].verdict == "ok"
    assert cleaned  # every setup's cleanup ran


@pytest.mark.parametrize("ops, message", [
    ([empty_op("backend_malloc_free")], "two providers give a hot-path operation named 'backend_malloc_free'"),
    (["not an op"], "must be a knhk_memory.hotpath.HotOp or PyHotOp, got str 'not an op'"),
    ([empty_op(budget=0)], "'engine_empty': default_budget must be a positive integer, got 0"),
    ([empty_op(budget=2.5)], "'engine_empty': default_budget must be a positive integer, got 2.5"),
])
def test_malformed_plugin_operations_are_refused(ops, message):
    pm = memory_pm(EnginePlugin(ops))
    with pytest.raises(HotOpError, match=message):
        gather_ops(load_config(mapping={}), pm)


def test_unknown_only_name_is_refused_before_measuring():
    with pytest.raises(UnknownOperationError, match="unknown hot-path operation 'malloc'; known operations: "
                                                    "backend_malloc_free"):
        run_budgets(load_config(mapping={}), pm=memory_pm(), only=["malloc"])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="batches must be an integer from 3 to 100000, got 1"):
        Settings(batches=1)


# ---------------------------------------------------------------- the CLI

def test_cli_budget_passes_with_default_budgets(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["budget", "--only", "backend_malloc_free,py_get_backend", "--batches", "31"]) == 0
    out = capsys.readouterr().out
    assert "tick counter:" in out and "all 2 budgets kept" in out
    assert "backend_malloc_free" in out and "250 ticks" in out and "1500 ns" in out


def test_cli_budget_registers_the_memory_plugin_when_autoload_is_off(capsys, tmp_path, monkeypatch):
    from knhk_memory.host import DISABLE_AUTOLOAD_ENV, with_memory_plugin

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    assert main(["budget", "--only", "py_get_backend", "--batches", "3", "--json"]) == 0
    (op,) = json.loads(capsys.readouterr().out)["operations"]
    assert op["name"] == "py_get_backend" and op["budget"] == 1500
    pm = with_memory_plugin(get_plugin_manager())
    assert pm.get_plugin("memory") is memory and with_memory_plugin(pm) is pm  # once only
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV)
    pm = get_plugin_manager()
    assert with_memory_plugin(pm).get_plugin("memory") is memory and len(pm.get_plugins()) == 1


def test_cli_budget_fails_on_a_deliberately_broken_budget(capsys, tmp_path):
    path = write(tmp_path, "[budgets]\nbackend_malloc_free = 1\n")
    if not ticks_here():  # no tick rate: the budget cannot be judged, and the report says so
        assert main(["budget", "--config", str(path), "--only", "backend_malloc_free", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        (op,) = doc["operations"]
        assert op["verdict"] == "unchecked" and not op["failed"] and op["median_ticks"] is None
        assert op["median_ns"] > 1 and doc["ok"] is True and doc["counter"]["trusted"] is False
        assert main(["budget", "--config", str(path), "--only", "backend_malloc_free"]) == 0
        assert "all 1 budgets kept (1 unchecked: no tick rate on this counter)" in capsys.readouterr().out
        return
    assert main(["budget", "--config", str(path), "--only", "backend_malloc_free", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    (op,) = doc["operations"]
    assert op["failed"] and op["verdict"].startswith("OVER +") and op["attempts"] == 2
    assert op["budget"] == 1 and op["budget_source"] == "config" and doc["ok"] is False
    assert doc["counter"]["trusted"] is True
    assert main(["budget", "--config", str(path), "--only", "backend_malloc_free"]) == 1
    assert "1 of 1 budgets broken: backend_malloc_free" in capsys.readouterr().out


def test_cli_budget_usage_errors_exit_2(capsys, tmp_path):
    assert main(["budget", "--only", "nope"]) == 2
    assert "knhk-memory: error: unknown hot-path operation 'nope'; known operations:" in capsys.readouterr().err
    path = write(tmp_path, "[budgets]\nnope = 3\n")
    assert main(["budget", "--config", str(path)]) == 2
    assert "budgets.nope: unknown hot-path operation 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["budget", "--batches", "2"])
    assert exc.value.code == 2
    assert "must be from 3 to 100000, got 2" in capsys.readouterr().err


def test_cli_budget_with_the_clock_gettime_counter(capsys):
    assert main(["budget", "--only", "backend_malloc_free", "--counter", "clock_gettime", "--json"]) == 0
    (op,) = json.loads(capsys.readouterr().out)["operations"]
    assert op["counter"] == "clock_gettime" and op["median_ns"] > 0
    if counter()["has_tsc"]:  # converted to ticks at the TSC's rate
        assert op["median_ticks"] > 0
    else:  # aarch64, a KNHK_PORTABLE build: no TSC rate to convert at
        assert op["median_ticks"] is None and op["verdict"] == "unchecked"


# ---------------------------------------------------------------- the pytest plugin

def test_pytest_plugin_reports_the_table(pytester):
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest("--knhk-budgets", "-k", "test_ok or backend_malloc_free")
    result.assert_outcomes(passed=2)
    if ticks_here():
        result.stdout.fnmatch_lines(["*knhk-memory hot-path budgets*", "tick counter: *",
                                     "backend_malloc_free *250 ticks*ok*", "all 1 budgets kept"])
    else:
        result.stdout.fnmatch_lines(["*knhk-memory hot-path budgets*", "tick counter: *",
                                     "backend_malloc_free *250 ticks*unchecked*",
                                     "all 1 budgets kept (1 unchecked: no tick rate on this counter)"])


def test_pytest_plugin_fails_a_deliberately_broken_budget(pytester):
    pytester.makefile(".toml", knhk="[budgets]\nbackend_malloc_free = 1\n")
    result = pytester.runpytest("--knhk-budgets", "-k", "backend_malloc_free")
    if not ticks_here():  # no tick rate: reported unchecked, never failed
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["backend_malloc_free *1 ticks*unchecked*"])
        return
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*backend_malloc_free: median * ticks per operation, budget 1 ticks (config)*",
                                 "*1 of 1 budgets broken: backend_malloc_free*"])
    assert result.ret == 1


def test_pytest_plugin_is_off_without_the_flag(pytester):
    pytester.makepyfile("import pytest\n@pytest.mark.knhk_budget(ns=1)\ndef test_x():\n    sum(range(100))\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert "hot-path budgets" not in result.stdout.str()


def test_budget_marker_on_a_projects_own_test(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.fixture
        def data():
            return list(range(1000))

        @pytest.mark.knhk_budget(ns=1)
        def test_too_slow(data):
            sorted(data)

        @pytest.mark.knhk_budget(ns=10**9)
        def test_fast_enough(data):
            sorted(data)
    """))
    result = pytester.runpytest("--knhk-budgets", "-k", "too_slow or fast_enough")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_too_slow: median * ns per run, budget 1 ns (knhk_budget marker)*",
                                 "*test_fast_enough*1000000000 ns*ok*"])


def test_bad_budget_markers_fail_their_tests(pytester):
    cases = {"zero": "ns=0", "text": "ns='fast'", "twice": "5, ns=5", "ticks": "ticks=5"}
    pytester.makepyfile("import pytest\n" + "".join(
        f"@pytest.mark.knhk_budget({args})\ndef test_{name}():\n    pass\n" for name, args in cases.items()))
    result = pytester.runpytest()
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines_random([
        "*test_zero: knhk_budget(ns=...) must be a positive integer number of nanoseconds, got 0*",
        "*test_text: knhk_budget(ns=...) must be a positive integer number of nanoseconds, got 'fast'*",
        "*test_twice: knhk_budget takes the budget once, as ns=N*",
        "*test_ticks: knhk_budget takes one argument, ns=N (nanoseconds per run); got args (), kwargs {'ticks': 5}*",
    ])
