"""pytest plugin: hot-path budgets in a project's own test run.

Registered through the ``pytest11`` entry point, so installing knhk-memory
is enough. Nothing happens unless ``--knhk-budgets`` is given; then

- every hot-path operation (the memory plugin's and other plugins'
  ``knhk_hot_ops``, see ``knhk_memory.budgets``) becomes a test item,
  ``knhk-budget[<name>]``, that fails when its budget is broken (after one
  retry); ``-k`` selects among them like any test;
- a test marked ``@pytest.mark.knhk_budget(ns=N)`` is run once as usual, then
  its body is timed in batches (median, empty call taken off) and the test
  fails when a call takes more than N nanoseconds;
- the terminal summary ends with the budget table.

Options: ``--knhk-config PATH`` (default: the usual lookup),
``--knhk-counter NAME`` (default auto).
"""

from __future__ import annotations

from typing import Any

import pytest

ENABLED = "--knhk-budgets"
_STATE = "knhk_budgets_state"


class BudgetBroken(Exception):
    """An operation took longer than its budget."""


class _State:
    def __init__(self, config: pytest.Config) -> None:
        from .budgets import Settings

        self.pytest_config = config
        self.results: list[Any] = []
        self.counter: Any = None
        self.settings = Settings()
        self._ready = False

    def prepare(self) -> None:
        """Load the config, gather operations and resolve budgets (collection time)."""
        from .budgets import gather_ops, resolve_budgets, use_counter
        from .config import load_config
        from .host import get_plugin_manager, with_memory_plugin

        self.config = load_config(self.pytest_config.getoption("knhk_config"))
        self.pm = with_memory_plugin(get_plugin_manager())
        self.ops = gather_ops(self.config, self.pm)
        self.budgets = resolve_budgets(self.config, self.ops)
        self.counter = use_counter(self.pytest_config.getoption("knhk_counter"))
        self._ready = True


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("knhk-memory", "knhk-memory hot-path budgets")
    group.addoption(ENABLED, action="store_true", dest="knhk_budgets",
                    help="measure every hot-path operation against its budget and report the table")
    group.addoption("--knhk-config", dest="knhk_config", metavar="PATH", default=None,
                    help="knhk-memory configuration file for the budgets (default: the usual lookup)")
    group.addoption("--knhk-counter", dest="knhk_counter", default="auto",
                    choices=["auto", "rdtscp", "rdtsc", "cntvct", "clock_gettime"],
                    help="tick counter for C operations (default: the best this machine has)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "knhk_budget(ns): with --knhk-budgets, time this test's body in batches and fail "
                   "when one run takes more than ns nanoseconds (median)")
    if config.getoption("knhk_budgets"):
        config.stash[_state_key] = _State(config)


_state_key = pytest.StashKey[_State]()


class BudgetItem(pytest.Item):
    """One hot-path operation held to its budget."""

    def __init__(self, *, op: Any, state: _State, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.op = op
        self.state = state

    def runtest(self) -> None:
        from .budgets import check_op
        from .host import configured

        st = self.state
        budget, source = st.budgets[self.op.name]
        with configured(st.pm, st.config):
            result = check_op(self.op, budget, source, st.counter, st.settings)
        st.results.append(result)
        if result.failed:
            raise BudgetBroken(
                f"{result.name}: median {result.value:.1f} {result.unit} per operation, budget {result.budget} "
                f"{result.unit} ({result.budget_source}); {result.verdict} after {result.attempts} runs; "
                f"counter {result.counter}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, BudgetBroken):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[str, int | None, str]:
        return "knhk-budgets", None, f"knhk-budget[{self.op.name}]"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: the items exist before -k and -m deselect, so both apply to them.
    state = config.stash.get(_state_key, None)
    if state is None:
        return
    state.prepare()
    for op in state.ops:
        items.append(BudgetItem.from_parent(session, name=f"knhk-budget[{op.name}]", op=op, state=state))


def _marker_budget(item: pytest.Item) -> int | None:
    marker = item.get_closest_marker("knhk_budget")
    if marker is None:
        return None
    if marker.args and "ns" in marker.kwargs:
        pytest.fail(pytrace=False, reason=f"{item.nodeid}: knhk_budget takes the budget once, as ns=N")
    extra = set(marker.kwargs) - {"ns"}
    if extra or len(marker.args) > 1:
        pytest.fail(pytrace=False, reason=f"{item.nodeid}: knhk_budget takes one argument, ns=N (nanoseconds per run); "
                                f"got args {marker.args!r}, kwargs {marker.kwargs!r}")
    ns = marker.kwargs.get("ns", marker.args[0] if marker.args else None)
    if isinstance(ns, bool) or not isinstance(ns, int) or ns <= 0:
        pytest.fail(pytrace=False, reason=f"{item.nodeid}: knhk_budget(ns=...) must be a positive integer number of "
                                f"nanoseconds, got {ns!r}")
    return ns


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Any:
    budget = _marker_budget(pyfuncitem)  # checked with or without --knhk-budgets
    result = yield
    state = pyfuncitem.config.stash.get(_state_key, None)
    if budget is None or state is None:
        return result
    from .budgets import PY_COUNTER, OpResult, measure_python

    fn = pyfuncitem.obj
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}

    def call() -> None:
        fn(**kwargs)

    attempts, m = 1, measure_python(call, state.settings)
    if m.median > budget:
        attempts, second = 2, measure_python(call, state.settings)
        m = min(m, second, key=lambda x: x.median)
    res = OpResult(pyfuncitem.nodeid, "test", "a test body marked knhk_budget", "ns", budget, "marker",
                   m.median, m.min, None, None, PY_COUNTER, True, attempts, m.iterations, m.batches)
    state.results.append(res)
    if res.failed:
        raise BudgetBroken(f"{pyfuncitem.nodeid}: median {m.median:.0f} ns per run, budget {budget} ns "
                           f"(knhk_budget marker); {res.verdict} after {attempts} runs")
    return result


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_state_key, None)
    if state is None or state.counter is None:
        return
    from .budgets import BudgetReport, format_table

    terminalreporter.write_sep("=", "knhk-memory hot-path budgets")
    if not state.results:
        terminalreporter.write_line("no budget was measured (all deselected?)")
        return
    report = BudgetReport(state.counter, list(state.results))
    for line in format_table(report).splitlines():
        terminalreporter.write_line(line)
