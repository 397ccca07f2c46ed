"""The reference host (pytest-benchmark; not part of the test run).

    bash scripts/dev.sh bench -k refhost

Compared in the same run, on one store of 50 generated workflows:
- 2,000 cases run with every batch in an arena scope (the host's design)
  versus the same engine with batches on numpy's ordinary allocator (the
  peer): what the arena saves a real engine, not a micro-benchmark;
- the same with the batch size cut to 64 cases, where per-batch costs weigh more.
Time per case is reported (``ops`` = cases).
"""

from __future__ import annotations

import numpy as np
import pytest

from knhk_memory.refhost import Engine, generate_definitions
from knhk_memory.store import WorkflowStoreWriter

CASES = 2000


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("refhost") / "wf.knhk"
    with WorkflowStoreWriter(path) as w:
        for wf in generate_definitions(50, seed=7):
            w.add(wf.id, wf.encode())
    return path


@pytest.mark.parametrize("batch_size", [4096, 64])
@pytest.mark.parametrize("arena", [True, False], ids=["arena scopes", "ordinary allocator"])
def test_host_cases(benchmark, store, arena, batch_size):
    benchmark.group = f"host: {CASES} cases, batches of up to {batch_size}"
    benchmark.extra_info.update(label="arena scopes" if arena else "ordinary allocator (numpy default)",
                                peer=not arena, ops=CASES)
    cases = np.arange(CASES)
    with Engine(store=store, arena_scopes=arena, batch_size=batch_size) as engine:
        engine.run(cases, seed=1)  # compile the definitions, settle the arena
        tally = benchmark(engine.run, cases, seed=1)
    assert tally.completed == CASES
