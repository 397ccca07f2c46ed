"""Workflow definitions of the reference host: their JSON form, checks and generator.

A definition is a JSON object stored in the workflow store under its id::

    {"id": "wf-000042", "blocks": [
        {"kind": "sequence", "tasks": 3},
        {"kind": "split", "split": 2, "join": 3, "branches": 3},
        {"kind": "cycle", "body": 2, "max_iterations": 4},
        {"kind": "instances", "instances": 5}]}

A case runs the blocks in order; each hand-over from one block to the next is
one execution of WCP-1 (Sequence). The blocks, and the patterns they execute:

``sequence`` (``tasks`` >= 1)
    ``tasks`` tasks in a row: WCP-1 before each task after the first.
``split`` (``split`` in 2, 4, 6; ``join`` as below; ``branches`` in 2..16)
    A split into ``branches`` one-task branches, then a join, then the join's
    downstream task. WCP-2 Parallel Split starts every branch; WCP-4 Exclusive
    Choice one, chosen by the case's data; WCP-6 Multi-Choice a non-empty
    subset (the case's data bits; none set takes the first, default branch).
    Joins: WCP-3 Synchronization (after WCP-2) and WCP-7 Structured
    Synchronizing Merge (after WCP-2 or WCP-6) wait for every started branch
    and fire once; WCP-5 Simple Merge (after WCP-4) fires once for its one
    branch; WCP-8 Multi-Merge (after any split) fires once per arriving
    branch, and each firing runs the downstream task; WCP-9 Structured
    Discriminator (after WCP-2) fires once, when the first branch (the one
    with the shortest duration in the case's data) completes, and absorbs the
    rest.
``cycle`` (``body`` >= 1, ``max_iterations`` in 1..64)
    WCP-10 Arbitrary Cycles: the ``body`` tasks run 1 + (data mod
    ``max_iterations``) times; each loop-back is one WCP-10 execution.
``instances`` (``instances`` in 1..64)
    WCP-13 Multiple Instances with a priori Design-Time Knowledge: one
    execution starts ``instances`` instances of one task and synchronises them.

Every decision is a function of the case's seed and the block's position
(:func:`decision`), so the same case takes the same path in any process, and
the vectorised executors (:mod:`.executors`) can be checked against the
one-case-at-a-time interpreter (:mod:`.reference`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import WorkflowDefinitionError

__all__ = [
    "SPLITS", "JOINS_AFTER", "MAX_BRANCHES", "MAX_ITERATIONS", "MAX_INSTANCES", "MAX_TASKS",
    "Block", "Workflow", "parse_workflow", "generate_definitions", "case_seeds", "decision",
    "decision_one", "durations", "duration_one", "workflow_choice", "SUPPORTED_PATTERNS",
]

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MAX_BRANCHES = 16
MAX_ITERATIONS = 64
MAX_INSTANCES = 64
MAX_TASKS = 64
SPLITS = {2: "parallel split", 4: "exclusive choice", 6: "multi-choice"}
# Which joins may close which split (a structured block must be sound: a
# simple merge after a parallel split would fire more than once, a
# discriminator after a multi-choice could wait for branches never started).
JOINS_AFTER = {2: (3, 7, 8, 9), 4: (5, 8), 6: (7, 8)}
SUPPORTED_PATTERNS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13)
_BLOCK_KEYS = {
    "sequence": ("tasks",),
    "split": ("split", "join", "branches"),
    "cycle": ("body", "max_iterations"),
    "instances": ("instances",),
}


@dataclass(frozen=True)
class Block:
    """One checked block. ``first_task`` numbers its tasks within the workflow."""

    kind: str
    first_task: int
    tasks: int = 0
    split: int = 0
    join: int = 0
    branches: int = 0
    body: int = 0
    max_iterations: int = 0
    instances: int = 0

    @property
    def patterns(self) -> tuple[int, ...]:
        """The control-flow patterns this block executes."""
        return {"sequence": (1,), "split": (self.split, self.join), "cycle": (10,),
                "instances": (13,)}[self.kind]

    @property
    def task_count(self) -> int:
        """Task ids the block uses (``first_task`` .. ``first_task + task_count - 1``)."""
        return {"sequence": self.tasks, "split": self.branches + 1, "cycle": self.body,
                "instances": 1}[self.kind]


@dataclass(frozen=True)
class Workflow:
    """A checked workflow definition."""

    id: str
    blocks: tuple[Block, ...]

    @property
    def task_count(self) -> int:
        return sum(b.task_count for b in self.blocks)

    def as_json(self) -> dict[str, Any]:
        out = []
        for b in self.blocks:
            d: dict[str, Any] = {"kind": b.kind}
            d.update({k: getattr(b, k) for k in _BLOCK_KEYS[b.kind]})
            out.append(d)
        return {"id": self.id, "blocks": out}

    def encode(self) -> bytes:
        return json.dumps(self.as_json(), separators=(",", ":"), sort_keys=True).encode()


def _fail(wf: str, where: str, message: str) -> WorkflowDefinitionError:
    return WorkflowDefinitionError(f"workflow {wf!r}, {where}: {message}", workflow=wf)


def _int_field(wf: str, where: str, block: dict[str, Any], key: str, lo: int, hi: int) -> int:
    if key not in block:
        raise _fail(wf, where, f"missing key {key!r} (an integer in {lo}..{hi})")
    v = block[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(wf, where, f"{key} must be an integer in {lo}..{hi}, got {v!r}")
    if not lo <= v <= hi:
        raise _fail(wf, where, f"{key} must be in {lo}..{hi}, got {v}")
    return v


def parse_workflow(data: bytes | bytearray | memoryview | str | dict[str, Any], key: str | None = None) -> Workflow:
    """Check a definition (JSON text or an already decoded dict) and number its tasks.

    ``key`` is the store key it came from; a definition whose ``id`` differs
    from its key is refused. Raises :class:`WorkflowDefinitionError` naming
    the workflow, the block, the key, the value and what is accepted."""
    label = key if key is not None else "?"
    if isinstance(data, (bytes, bytearray, memoryview, str)):
        try:
            doc = json.loads(bytes(data) if not isinstance(data, str) else data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _fail(label, "definition", f"not valid JSON ({exc})") from None
    else:
        doc = data
    if not isinstance(doc, dict):
        raise _fail(label, "definition", f"must be a JSON object with 'id' and 'blocks', got {type(doc).__name__}")
    wf = doc.get("id")
    if not isinstance(wf, str) or not wf:
        raise _fail(label, "definition", f"'id' must be a non-empty string, got {wf!r}")
    if key is not None and wf != key:
        raise _fail(key, "definition", f"its id {wf!r} differs from the store key {key!r}")
    extra = sorted(set(doc) - {"id", "blocks"})
    if extra:
        raise _fail(wf, "definition", f"unknown keys {extra}; accepted: 'id', 'blocks'")
    raw = doc.get("blocks")
    if not isinstance(raw, list) or not raw:
        raise _fail(wf, "definition", f"'blocks' must be a non-empty list of blocks, got {raw!r}")
    blocks: list[Block] = []
    task = 0
    for i, b in enumerate(raw):
        where = f"block {i}"
        if not isinstance(b, dict):
            raise _fail(wf, where, f"a block is an object with a 'kind', got {b!r}")
        kind = b.get("kind")
        if kind not in _BLOCK_KEYS:
            raise _fail(wf, where, f"unknown kind {kind!r}; accepted: {', '.join(map(repr, _BLOCK_KEYS))}")
        unknown = sorted(set(b) - {"kind", *_BLOCK_KEYS[kind]})
        if unknown:
            raise _fail(wf, where, f"unknown keys {unknown} for a {kind} block; accepted: "
                        f"{', '.join(map(repr, ('kind', *_BLOCK_KEYS[kind])))}")
        if kind == "sequence":
            blk = Block(kind, task, tasks=_int_field(wf, where, b, "tasks", 1, MAX_TASKS))
        elif kind == "split":
            split = _int_field(wf, where, b, "split", 2, 6)
            if split not in SPLITS:
                raise _fail(wf, where, f"split must be one of {sorted(SPLITS)} "
                            f"({', '.join(f'{k} {v}' for k, v in SPLITS.items())}), got {split}")
            join = _int_field(wf, where, b, "join", 3, 9)
            if join not in JOINS_AFTER[split]:
                raise _fail(wf, where, f"join {join} cannot close split {split} ({SPLITS[split]}); "
                            f"accepted joins after it: {list(JOINS_AFTER[split])}")
            blk = Block(kind, task, split=split, join=join,
                        branches=_int_field(wf, where, b, "branches", 2, MAX_BRANCHES))
        elif kind == "cycle":
            blk = Block(kind, task, body=_int_field(wf, where, b, "body", 1, MAX_TASKS),
                        max_iterations=_int_field(wf, where, b, "max_iterations", 1, MAX_ITERATIONS))
        else:
            blk = Block(kind, task, instances=_int_field(wf, where, b, "instances", 1, MAX_INSTANCES))
        blocks.append(blk)
        task += blk.task_count
    return Workflow(wf, tuple(blocks))


# ---------------------------------------------------------------- case data

def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix_one(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


# Array arithmetic on uint64 wraps silently in numpy (only scalar arithmetic
# warns), which is what these hashes want.

def case_seeds(run_seed: int, cases: np.ndarray) -> np.ndarray:
    """Each case's seed: a hash of the run's seed and the case number."""
    return _mix(cases.astype(np.uint64) * np.uint64(GOLDEN) + np.uint64(run_seed & M64))


def case_seed_one(run_seed: int, case: int) -> int:
    return _mix_one(((run_seed & M64) + case * GOLDEN) & M64)


def decision(seeds: np.ndarray, block_index: int) -> np.ndarray:
    """The 64 random bits block ``block_index`` decides with, per case."""
    return _mix(seeds ^ np.uint64(((block_index + 1) * GOLDEN) & M64))


def decision_one(seed: int, block_index: int) -> int:
    return _mix_one(seed ^ (((block_index + 1) * GOLDEN) & M64))


def durations(h: np.ndarray, branches: int) -> np.ndarray:
    """Per case and branch, a duration in 0..999 (cases x branches): who completes first."""
    salts = np.arange(1, branches + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
    return _mix(h[:, None] ^ salts[None, :]) % np.uint64(1000)


def duration_one(h: int, branch: int) -> int:
    return _mix_one(h ^ (((branch + 1) * 0xD1B54A32D192ED03) & M64)) % 1000


def workflow_choice(seeds: np.ndarray, n_workflows: int) -> np.ndarray:
    """Which workflow each case runs: skewed (u**3), so a few workflows are
    popular and many are rare, as in real engines."""
    u = (_mix(seeds ^ np.uint64(0x5851F42D4C957F2D)) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return np.minimum((u * u * u * n_workflows).astype(np.int64), n_workflows - 1)


def workflow_choice_one(seed: int, n_workflows: int) -> int:
    u = (_mix_one(seed ^ 0x5851F42D4C957F2D) >> 11) * (1.0 / (1 << 53))
    return min(int(u * u * u * n_workflows), n_workflows - 1)


# ---------------------------------------------------------------- generator

def _random_block(rng: np.random.Generator) -> dict[str, Any]:
    r = rng.random()
    if r < 0.25:
        return {"kind": "sequence", "tasks": int(rng.integers(1, 5))}
    if r < 0.75:
        split = int(rng.choice(list(SPLITS)))
        join = int(rng.choice(JOINS_AFTER[split]))
        return {"kind": "split", "split": split, "join": join, "branches": int(rng.integers(2, 6))}
    if r < 0.88:
        return {"kind": "cycle", "body": int(rng.integers(1, 4)), "max_iterations": int(rng.integers(2, 5))}
    return {"kind": "instances", "instances": int(rng.integers(2, 9))}


def generate_definitions(count: int, seed: int = 2026) -> list[Workflow]:
    """``count`` checked workflows of 3 to 8 blocks, ids ``wf-000000``...; the
    same ``seed`` gives the same workflows."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        blocks = [_random_block(rng) for _ in range(int(rng.integers(3, 9)))]
        out.append(parse_workflow({"id": f"wf-{i:06d}", "blocks": blocks}))
    return out
