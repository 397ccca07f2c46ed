"""The shared helpers every capability uses: one way to turn a C status into an
exception (_core.check / check_as), one "did you mean" (errors.did_you_mean),
one pattern-table reader (knhk_memory.patterns)."""

from __future__ import annotations

import pytest

from knhk_memory import counters, registry
from knhk_memory._core import check, check_as, lib
from knhk_memory.errors import HotOpError, NativeError, did_you_mean
from knhk_memory.patterns import Pattern, builtin_patterns, read_table


def fail_with_message() -> int:
    """A real C call that fails and leaves its message: an unknown tick source."""
    return lib.knhk_ticks_select(99)


def test_check_as_is_silent_on_ok():
    check_as(lib.KNHK_OK, lambda d: AssertionError(d))
    check(lib.KNHK_OK, "nothing")


def test_check_as_gives_check_s_standard_wording_by_default():
    with pytest.raises(NativeError) as standard:
        check(fail_with_message(), "selecting")
    with pytest.raises(HotOpError) as same:
        check_as(fail_with_message(), what="selecting", exc_type=HotOpError)
    assert str(standard.value) == str(same.value)
    assert str(same.value).startswith("selecting: invalid argument (status ") and "tick source 99" in str(same.value)


def test_check_as_words_the_message_the_caller_gives_and_special_statuses_have_their_own():
    with pytest.raises(ValueError, match=r"^mine: tick source 99 is not one of"):
        check_as(fail_with_message(), lambda d: ValueError(f"mine: {d}"))
    with pytest.raises(MemoryError, match="special: tick source 99"):
        check_as(fail_with_message(), lambda d: ValueError(d),
                 special={lib.KNHK_ERR_INVALID: lambda d: MemoryError(f"special: {d}")})
    # A special entry for another status does not apply; with no error factory the standard wording does.
    with pytest.raises(NativeError, match=r"^what: invalid argument \(status \d+\): tick source 99"):
        check_as(fail_with_message(), what="what", special={lib.KNHK_ERR_NOMEM: MemoryError})


def test_did_you_mean_wordings():
    names = ["backend_malloc_free", "py_get_backend"]
    assert did_you_mean("backend_malloc_fre", names) == " (did you mean 'backend_malloc_free'?)"
    assert did_you_mean("zzz", names) == ""
    assert did_you_mean("cases_startd", ["cases_started", "cases_stopped"], cutoff=0.5, template="; nearest: {}",
                        sep=", ") == "; nearest: 'cases_started', 'cases_stopped'"
    # The normalised second try gives the names back as spelled.
    assert did_you_mean("PARALLEL-SPLIT", ["Parallel Split"], cutoff=0.9,
                        normalise=lambda s: s.lower().replace("-", " "), template="{}") == "'Parallel Split'"


def test_one_pattern_table_reader_for_registry_and_counters():
    patterns = builtin_patterns()
    assert len(patterns) == 43 and patterns[0] == Pattern(1, "Sequence", "basic control-flow")
    assert {p.number: p.name for p in patterns} == counters.PATTERNS
    reg = registry.PatternRegistry()
    assert [reg[n] for n in range(1, 44)] == list(patterns)
    assert registry.Pattern is Pattern
    with pytest.raises(ValueError, match=r"^t.tsv: the header must be 'id<TAB>name<TAB>group'"):
        read_table("number\tname\n", "t.tsv")
    with pytest.raises(ValueError, match=r"^t.tsv:3: expected 'number<TAB>name<TAB>group', got \['x', 'y', 'z'\]"):
        read_table("id\tname\tgroup\n1\tA\tg\nx\ty\tz\n", "t.tsv")
    assert read_table("id\tname\tgroup\n\n7\t Seven \t g \n", "t.tsv") == [Pattern(7, "Seven", "g")]


def test_the_version_is_written_once_and_the_core_agrees():
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    import knhk_memory
    from knhk_memory._core import ffi
    from knhk_memory._version import __version__

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "knhk_memory._version.__version__"}
    assert knhk_memory.__version__ == __version__ == version("knhk-memory")
    assert ffi.string(lib.knhk_version()).decode() == __version__


def test_a_stale_core_is_an_import_error_naming_both_versions():
    from knhk_memory._core import check_core_version

    check_core_version("0.1.0", "0.1.0")
    with pytest.raises(ImportError, match=r"^knhk_memory's compiled C core is version '0.0.9' but the Python "
                                          r"package is '0.1.0': the build is stale. Rebuild it with `pip install .`"):
        check_core_version("0.0.9", "0.1.0")


def test_literal_types_name_exactly_the_runtime_values():
    from typing import get_args

    from knhk_memory import allocator, budgets, simd
    from knhk_memory.config import SCHEMA

    assert get_args(simd.SimdLevel) == simd.LEVELS == ("scalar", "avx2", "avx512")
    assert get_args(simd.SimdSetting) == ("auto", *simd.LEVELS) == SCHEMA["simd"]["level"].choices
    assert get_args(allocator.BackendName) == allocator.BACKENDS
    assert get_args(allocator.BackendSetting) == ("auto", *allocator.BACKENDS) == SCHEMA["allocator"]["backend"].choices
    assert get_args(budgets.TickSource) == tuple(budgets.COUNTERS)
    assert set(get_args(budgets.Verdict)) == {"ok", "over", "unchecked"}
