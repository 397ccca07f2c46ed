"""The numeric options of a workflow store reader, checked in one place.

``WorkflowStore(...)`` and the ``[store]`` section of the configuration
(knhk_memory.config) take the same options; both check them with
:func:`range_problem`, so a bad value reads the same from either. Standard
library only and nothing imported: both the store (imported by every worker)
and the configuration import it.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing; type checkers read True
if TYPE_CHECKING:
    from typing import Any

MAX_CACHE_SIZE = 10_000_000
MAX_VALUE_BYTES_CAP = 1 << 40  # 1 TiB

# name -> (lowest, highest or None, the unit or meaning shown in messages)
INT_OPTIONS: dict[str, tuple[int, int | None, str]] = {
    "mmap_threshold": (0, None, "bytes"),
    "huge_page_threshold": (0, None, "bytes"),
    "cache_size": (0, MAX_CACHE_SIZE, "entries; 0: no cache"),
    "max_value_bytes": (1, MAX_VALUE_BYTES_CAP, "bytes"),
}


def accepted(name: str) -> str:
    """What option ``name`` accepts, e.g. ``an int from 0 to 10,000,000 (entries; 0: no cache)``."""
    lo, hi, what = INT_OPTIONS[name]
    return f"an int from {lo:,} to {hi:,} ({what})" if hi is not None else f"an int >= {lo:,} ({what})"


def range_problem(name: str, value: Any) -> str | None:
    """None when the int ``value`` is in option ``name``'s range, else the sentence saying
    what is accepted (``must be an int >= 0 (bytes), got -1``)."""
    lo, hi, _ = INT_OPTIONS[name]
    if lo <= value and (hi is None or value <= hi):
        return None
    return f"must be {accepted(name)}, got {value!r}"
