"""Allocator backends under allocation churn, each against the system backend in the same run.

Two comparisons (pytest-benchmark groups), following docs/benchmarks.md:

- ``allocator: C malloc+free 64 B``: 10 000 malloc+free pairs inside C
  (``knhk_backend_hotop_malloc_free``, statistics included) per round;
- ``allocator: numpy 4 KiB arrays``: 1 000 ``numpy.empty(512)`` arrays made and
  dropped with numpy's data routed through each backend (NEP 49 handler),
  plus numpy's own default handler for reference.

The peer of both is the system backend (glibc malloc). Unavailable backends
are skipped with the reason.
"""

from __future__ import annotations

import numpy
import pytest

from knhk_memory._core import ffi, lib
from knhk_memory.allocator import BACKENDS, get_backend, numpy_handler
from knhk_memory.errors import BackendUnavailableError

PAIRS = 10_000
ARRAYS = 1_000


def backend_or_skip(name):
    try:
        return get_backend(name)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", BACKENDS)
def test_c_malloc_free(benchmark, name):
    backend = backend_or_skip(name)
    benchmark.group = "allocator: C malloc+free 64 B"
    benchmark.extra_info.update(label=name, peer=name == "system", ops=PAIRS)
    ctx = ffi.cast("void *", backend.cdata)
    fn = lib.knhk_backend_hotop_malloc_free
    benchmark(fn, ctx, PAIRS)


def churn(n=ARRAYS):
    empty = numpy.empty
    for _ in range(n):
        a = empty(512)  # 4 KiB of float64
        a[0] = 1.0
        del a


@pytest.mark.parametrize("name", [*BACKENDS, "numpy-default"])
def test_numpy_churn(benchmark, name):
    benchmark.group = "allocator: numpy 4 KiB arrays"
    benchmark.extra_info.update(label=name if name != "numpy-default" else "numpy default handler",
                                peer=name == "system", ops=ARRAYS)
    if name == "numpy-default":
        benchmark(churn)
        return
    backend = backend_or_skip(name)
    with numpy_handler(backend):
        benchmark(churn)
