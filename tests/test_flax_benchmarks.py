"""The Flax benchmark plug-in: both sides of every benchmark run and do the same work."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.flax

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

from benchmarks import bench_flax  # noqa: E402
from benchmarks.harness import measure  # noqa: E402


def test_quick_benchmarks_run_both_sides_alike() -> None:
    benches = bench_flax.benchmarks(quick=True)
    assert {b.name for b in benches} == {"bn_train", "bn_eval", "agc"}
    for bench in benches:
        ours, theirs = bench.unorm(), bench.native()
        assert bench.sync is not None
        bench.sync(ours)
        shapes = [np.shape(a) for a in jax.tree.leaves(ours)]
        assert shapes == [np.shape(a) for a in jax.tree.leaves(theirs)] or bench.name == "bn_train"
        if bench.name == "bn_eval":  # fresh statistics: eps alone differs (both 1e-5)
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    result = measure(benches[0], repeats=1, warmup=1, number=1)
    assert result.unorm_s > 0 and result.native_s > 0


def test_versions_name_jax_flax_and_optax() -> None:
    assert set(bench_flax.versions()) == {"jax", "flax", "optax"}
