"""The table of the 43 workflow control-flow patterns, and its one reader.

The table is ``knhk_memory/data/wcp-control-flow-patterns.tsv`` (tab-separated:
``id``, ``name``, ``group``; from the Workflow Patterns Initiative's revised
control-flow patterns, Russell, ter Hofstede, van der Aalst, Mulyar 2006). The
pattern registry (:mod:`knhk_memory.registry`) and the pattern statistics
(:mod:`knhk_memory.counters`) both read it through :func:`read_table`; this
module holds no C and imports nothing of the package, so either may use it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

__all__ = ["PATTERN_TABLE", "Pattern", "builtin_patterns", "read_table"]

PATTERN_TABLE = "wcp-control-flow-patterns.tsv"  # in knhk_memory/data/


@dataclass(frozen=True, slots=True)
class Pattern:
    """One workflow control-flow pattern: ``number`` (WCP-n), ``name``, ``group``."""

    number: int
    name: str
    group: str

    @property
    def code(self) -> str:
        return f"WCP-{self.number}"


def read_table(text: str, source: str) -> list[Pattern]:
    """The patterns in ``text`` (the TSV layout above, header first; blank lines
    skipped). A bad header or row is a ValueError naming ``source`` and the line."""
    import csv
    import io

    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    if not rows or [c.strip() for c in rows[0]] != ["id", "name", "group"]:
        raise ValueError(f"{source}: the header must be 'id<TAB>name<TAB>group', got {rows[:1]!r}")
    patterns = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 3 or not row[0].strip().isdigit():
            raise ValueError(f"{source}:{line}: expected 'number<TAB>name<TAB>group', got {row!r}")
        patterns.append(Pattern(int(row[0]), row[1].strip(), row[2].strip()))
    return patterns


@functools.cache
def builtin_patterns() -> tuple[Pattern, ...]:
    """The packaged table's patterns, read once, in file order."""
    text = resources.files("knhk_memory").joinpath("data", PATTERN_TABLE).read_text(encoding="utf-8")
    return tuple(read_table(text, f"knhk_memory/data/{PATTERN_TABLE}"))
