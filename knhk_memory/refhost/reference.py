"""The reference host's semantics, one case at a time, in plain Python.

:func:`run_case` lists the events one case lives, in order, as ``(kind,
task)`` pairs; it is the definition the vectorised executors
(:mod:`.executors`) are tested against, written with Python integers only (no
numpy), so a shared mistake in the two is unlikely.
"""

from __future__ import annotations

from .executors import CASE_END, CASE_START, TASK
from .workflows import Workflow, case_seed_one, decision_one, duration_one

__all__ = ["run_case", "expected_counts"]


def _order(h: int, branches: list[int]) -> list[int]:
    return sorted(branches, key=lambda j: (duration_one(h, j), j))


def run_case(workflow: Workflow, run_seed: int, case: int, workflow_index: int = 0) -> list[tuple[int, int]]:
    """The events of case number ``case`` of ``workflow`` in a run seeded ``run_seed``."""
    seed = case_seed_one(run_seed, case)
    ev: list[tuple[int, int]] = [(CASE_START, workflow_index)]
    for i, b in enumerate(workflow.blocks):
        h = decision_one(seed, i)
        if i:
            ev.append((1, b.first_task))
        t0 = b.first_task
        if b.kind == "sequence":
            ev.append((TASK, t0))
            for t in range(1, b.tasks):
                ev += [(1, t0 + t), (TASK, t0 + t)]
        elif b.kind == "cycle":
            reps = 1 + h % b.max_iterations
            for it in range(1, reps + 1):
                if it > 1:
                    ev.append((10, it))
                ev.append((TASK, t0))
                for t in range(1, b.body):
                    ev += [(1, t0 + t), (TASK, t0 + t)]
        elif b.kind == "instances":
            ev.append((13, b.instances))
            ev += [(TASK, t0)] * b.instances
        else:
            k = b.branches
            if b.split == 2:
                started, detail = list(range(k)), k
            elif b.split == 4:
                started = [h % k]
                detail = started[0]
            else:
                mask = (h & ((1 << k) - 1)) or 1
                started, detail = [j for j in range(k) if mask >> j & 1], mask
            ev.append((b.split, detail))
            done = _order(h, started)
            downstream = t0 + k
            if b.join == 8:
                for j in done:
                    ev += [(TASK, t0 + j), (8, j), (TASK, downstream)]
            elif b.join == 9:
                first, rest = done[0], done[1:]
                ev += [(TASK, t0 + first), (9, first)] + [(TASK, t0 + j) for j in rest] + [(TASK, downstream)]
            else:
                ev += [(TASK, t0 + j) for j in done] + [(b.join, downstream), (TASK, downstream)]
    ev.append((CASE_END, len(workflow.blocks)))
    return ev


def expected_counts(workflow: Workflow, run_seed: int, cases: list[int] | range) -> dict[int, int]:
    """Events per kind over ``cases`` of ``workflow``, by :func:`run_case`."""
    out: dict[int, int] = {}
    for c in cases:
        for kind, _ in run_case(workflow, run_seed, c):
            out[kind] = out.get(kind, 0) + 1
    return out
