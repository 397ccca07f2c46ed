"""The reference host's pattern executors: each runs one block for a whole batch of cases.

An executor works on numpy arrays, one row per case, and returns the block's
events in case-major order (every event of case 0, then of case 1, ...), the
order each case lived them in. Events are three columns:

``kind``  1..43 a control-flow pattern executed, :data:`TASK` a task ran,
          :data:`CASE_START` / :data:`CASE_END` a case began / reached its end;
``task``  for a task, its id in the workflow; for a pattern, a detail
          (see :data:`DETAIL`);
``case``  the case's row in the batch.

Three kinds of executor, registered on the engine's pattern registry under
their pattern's number (the host's plugin does it, in ``knhk_register_executors``):

- block executors (WCP-1, 10, 13): ``run(block, h) -> BlockEvents``;
- split executors (WCP-2, 4, 6): ``activate(block, h) -> (active, detail)``, the
  branches each case starts (cases x branches, bool) and the split's detail;
- join executors (WCP-3, 5, 7, 8, 9): ``complete(block, h, active, detail) ->
  BlockEvents``, the whole block's events given the started branches.

``h`` is the block's 64 decision bits per case (:func:`.workflows.decision`).
The one-case interpreter in :mod:`.reference` defines the same semantics and
the tests hold these executors to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .workflows import Block, durations

__all__ = ["TASK", "CASE_START", "CASE_END", "EVENT_KINDS", "DETAIL", "BlockEvents", "EXECUTORS",
           "SequenceExecutor", "ParallelSplit", "ExclusiveChoice", "MultiChoice", "Synchronization",
           "SimpleMerge", "SynchronizingMerge", "MultiMerge", "Discriminator", "ArbitraryCycle",
           "DesignTimeInstances", "completion_order"]

TASK = 60
CASE_START = 62
CASE_END = 63
EVENT_KINDS = 64  # histogram bins: 0..63
DETAIL = {
    1: "the task it enables",
    2: "branches started",
    3: "the downstream task",
    4: "the branch chosen",
    5: "the downstream task",
    6: "bit mask of the branches started",
    7: "the downstream task",
    8: "the branch that arrived",
    9: "the branch that completed first",
    10: "the iteration that starts (2, 3, ...)",
    13: "instances started",
    CASE_START: "the workflow's index in the store",
    CASE_END: "blocks completed",
}


@dataclass
class BlockEvents:
    """One block's events for a batch, case-major, plus what it executed."""

    kind: np.ndarray                  # uint8
    task: np.ndarray                  # uint32
    case: np.ndarray                  # uint32, row in the batch
    executions: dict[int, int] = field(default_factory=dict)  # pattern -> executions
    tasks: int = 0                    # tasks run

    @classmethod
    def from_slots(cls, kind: np.ndarray, task: np.ndarray, valid: np.ndarray | None,
                   executions: dict[int, int]) -> BlockEvents:
        """Compress cases x slots matrices (slot order is each case's event
        order) to event columns; ``valid`` masks slots that did not happen."""
        rows, slots = kind.shape
        case = np.broadcast_to(np.arange(rows, dtype=np.uint32)[:, None], (rows, slots))
        if valid is None:
            k, t, c = kind.ravel(), task.ravel(), case.ravel()
        else:
            k, t, c = kind[valid], task[valid], case[valid]
        return cls(k.astype(np.uint8, copy=False), t.astype(np.uint32, copy=False), np.ascontiguousarray(c),
                   executions, int(np.count_nonzero(k == TASK)))


def completion_order(h: np.ndarray, branches: int) -> np.ndarray:
    """Per case, branch indices in the order they complete: by duration, ties by index."""
    d = durations(h, branches).astype(np.int64) * branches + np.arange(branches, dtype=np.int64)[None, :]
    return np.argsort(d, axis=1, kind="stable")


# ---------------------------------------------------------------- block executors

class SequenceExecutor:
    """WCP-1 Sequence: ``tasks`` tasks in a row, WCP-1 before each one after the first."""

    pattern = 1
    role = "block"

    def run(self, block: Block, h: np.ndarray) -> BlockEvents:
        rows, n = h.shape[0], block.tasks
        # slots: task0, (WCP1, task_i) for i in 1..n-1
        kind = np.full(2 * n - 1, TASK, dtype=np.uint8)
        kind[1::2] = 1
        ids = block.first_task + np.arange(n, dtype=np.uint32)
        task = np.repeat(ids, 2)[1:]
        return BlockEvents.from_slots(np.broadcast_to(kind, (rows, kind.size)),
                                      np.broadcast_to(task, (rows, task.size)), None, {1: rows * (n - 1)})


class ArbitraryCycle:
    """WCP-10 Arbitrary Cycles: the body (a sequence) repeats 1 + (h mod max_iterations) times."""

    pattern = 10
    role = "block"

    def run(self, block: Block, h: np.ndarray) -> BlockEvents:
        rows, n, m = h.shape[0], block.body, block.max_iterations
        reps = (h % np.uint64(m)).astype(np.int64) + 1                   # iterations per case
        per = 2 * n - 1                                                   # one pass of the body
        body_kind = np.full(per, TASK, dtype=np.uint8)
        body_kind[1::2] = 1
        body_task = np.repeat(block.first_task + np.arange(n, dtype=np.uint32), 2)[1:]
        # slots: pass 1, then (WCP10, pass i) for i in 2..m
        kind = np.concatenate([body_kind] + [np.concatenate([[10], body_kind]).astype(np.uint8)] * (m - 1))
        task = np.concatenate([body_task] + [np.concatenate([[i], body_task]).astype(np.uint32)
                                             for i in range(2, m + 1)])
        slot_iteration = np.concatenate([np.ones(per, np.int64)] +
                                        [np.full(per + 1, i, np.int64) for i in range(2, m + 1)])
        valid = slot_iteration[None, :] <= reps[:, None]
        loops = int(reps.sum()) - rows
        return BlockEvents.from_slots(np.broadcast_to(kind, valid.shape), np.broadcast_to(task, valid.shape),
                                      valid, {10: loops, 1: (int(reps.sum())) * (n - 1)})


class DesignTimeInstances:
    """WCP-13: one execution starts ``instances`` instances of a task and synchronises them."""

    pattern = 13
    role = "block"

    def run(self, block: Block, h: np.ndarray) -> BlockEvents:
        rows, k = h.shape[0], block.instances
        kind = np.full(k + 1, TASK, dtype=np.uint8)
        kind[0] = 13
        task = np.full(k + 1, block.first_task, dtype=np.uint32)
        task[0] = k
        return BlockEvents.from_slots(np.broadcast_to(kind, (rows, k + 1)), np.broadcast_to(task, (rows, k + 1)),
                                      None, {13: rows})


# ---------------------------------------------------------------- splits

class ParallelSplit:
    """WCP-2 Parallel Split: every branch starts. Detail: the number of branches."""

    pattern = 2
    role = "split"

    def activate(self, block: Block, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = h.shape[0]
        return np.ones((rows, block.branches), dtype=bool), np.full(rows, block.branches, dtype=np.uint32)


class ExclusiveChoice:
    """WCP-4 Exclusive Choice: branch ``h mod branches`` starts. Detail: its index."""

    pattern = 4
    role = "split"

    def activate(self, block: Block, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chosen = (h % np.uint64(block.branches)).astype(np.uint32)
        return chosen[:, None] == np.arange(block.branches, dtype=np.uint32)[None, :], chosen


class MultiChoice:
    """WCP-6 Multi-Choice: the branches whose bit is set in ``h``'s low bits
    start; with none set, the first (default) branch does. Detail: the mask."""

    pattern = 6
    role = "split"

    def activate(self, block: Block, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = block.branches
        mask = (h & np.uint64((1 << k) - 1)).astype(np.uint32)
        mask[mask == 0] = 1
        active = (mask[:, None] >> np.arange(k, dtype=np.uint32)[None, :]) & np.uint32(1)
        return active.astype(bool), mask


# ---------------------------------------------------------------- joins

def _branch_slots(block: Block, h: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Started branches in completion order: (branch index, started) per case and rank."""
    order = completion_order(h, block.branches)
    return order, np.take_along_axis(active, order, axis=1)


class _WaitAllJoin:
    """Fires once when every started branch has completed (WCP-3, 5, 7)."""

    role = "join"
    pattern = 0

    def complete(self, block: Block, h: np.ndarray, active: np.ndarray, detail: np.ndarray) -> BlockEvents:
        rows, k = active.shape
        order, started = _branch_slots(block, h, active)
        downstream = block.first_task + k
        # slots: split, k branch tasks (completion order), join, downstream task
        kind = np.empty((rows, k + 3), dtype=np.uint8)
        kind[:, 0] = block.split
        kind[:, 1:k + 1] = TASK
        kind[:, k + 1] = self.pattern
        kind[:, k + 2] = TASK
        task = np.empty((rows, k + 3), dtype=np.uint32)
        task[:, 0] = detail
        task[:, 1:k + 1] = block.first_task + order
        task[:, k + 1:] = downstream
        valid = np.ones((rows, k + 3), dtype=bool)
        valid[:, 1:k + 1] = started
        return BlockEvents.from_slots(kind, task, valid, {block.split: rows, self.pattern: rows})


class Synchronization(_WaitAllJoin):
    """WCP-3 Synchronization: after a parallel split, waits for every branch."""

    pattern = 3


class SimpleMerge(_WaitAllJoin):
    """WCP-5 Simple Merge: after an exclusive choice, passes its one branch on."""

    pattern = 5


class SynchronizingMerge(_WaitAllJoin):
    """WCP-7 Structured Synchronizing Merge: waits for every branch that started."""

    pattern = 7


class MultiMerge:
    """WCP-8 Multi-Merge: each arriving branch fires the downstream task once."""

    pattern = 8
    role = "join"

    def complete(self, block: Block, h: np.ndarray, active: np.ndarray, detail: np.ndarray) -> BlockEvents:
        rows, k = active.shape
        order, started = _branch_slots(block, h, active)
        downstream = block.first_task + k
        # slots: split, then per branch in completion order: task, WCP8, downstream task
        kind = np.empty((rows, 1 + 3 * k), dtype=np.uint8)
        kind[:, 0] = block.split
        kind[:, 1::3] = TASK
        kind[:, 2::3] = 8
        kind[:, 3::3] = TASK
        task = np.empty((rows, 1 + 3 * k), dtype=np.uint32)
        task[:, 0] = detail
        task[:, 1::3] = block.first_task + order
        task[:, 2::3] = order
        task[:, 3::3] = downstream
        valid = np.ones((rows, 1 + 3 * k), dtype=bool)
        for j in range(3):
            valid[:, 1 + j::3] = started
        return BlockEvents.from_slots(kind, task, valid, {block.split: rows, 8: int(np.count_nonzero(started))})


class Discriminator:
    """WCP-9 Structured Discriminator: the first branch to complete fires the
    downstream task; the others complete and are absorbed."""

    pattern = 9
    role = "join"

    def complete(self, block: Block, h: np.ndarray, active: np.ndarray, detail: np.ndarray) -> BlockEvents:
        rows, k = active.shape
        order, _ = _branch_slots(block, h, active)  # after a parallel split every branch starts
        # slots: split, first branch task, WCP9, the other branch tasks, downstream task
        kind = np.empty((rows, k + 3), dtype=np.uint8)
        kind[:, 0] = block.split
        kind[:, 1] = TASK
        kind[:, 2] = 9
        kind[:, 3:] = TASK
        task = np.empty((rows, k + 3), dtype=np.uint32)
        task[:, 0] = detail
        task[:, 1] = block.first_task + order[:, 0]
        task[:, 2] = order[:, 0]
        task[:, 3:k + 2] = block.first_task + order[:, 1:]
        task[:, k + 2] = block.first_task + k
        return BlockEvents.from_slots(kind, task, None, {block.split: rows, 9: rows})


# Every executor the host registers, by pattern number.
EXECUTORS = {cls.pattern: cls for cls in (
    SequenceExecutor, ParallelSplit, Synchronization, ExclusiveChoice, SimpleMerge, MultiChoice,
    SynchronizingMerge, MultiMerge, Discriminator, ArbitraryCycle, DesignTimeInstances)}
