"""pytest-benchmark micro-benchmarks of the CPU kernels against torch's CPU matmuls.

    .venv/bin/python -m pytest benchmarks/test_bench_cpu.py --benchmark-group-by=param:shape,param:batch

Not part of the test run (``pytest tests``). Each call takes the next of 16 distinct weights
(fewer for large dense ones, see ``suite.make_methods``), so the weight streams from memory.
The full side-by-side tables come from ``python benchmarks/suite.py``.
"""
import functools
import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402

SHAPES = {"4096x4096": (4096, 4096), "384x1536": (384, 1536)}


@functools.lru_cache(maxsize=1)  # one shape's weights at a time (parametrize order groups by shape)
def methods_for(shape: str):
    return suite.make_methods(*SHAPES[shape])[0]


@pytest.mark.parametrize("method", suite.METHODS)
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_linear(benchmark, shape, batch, method):
    weights, fn, dtype = methods_for(shape)[method]
    k, n = SHAPES[shape]
    x = torch.randn(batch, k).to(dtype)
    cycle = itertools.cycle(weights)
    with torch.inference_mode():
        y = benchmark(lambda: fn(x, next(cycle)))
    assert y.shape == (batch, n) and y.dtype == dtype
