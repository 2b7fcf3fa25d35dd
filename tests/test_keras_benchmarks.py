"""The Keras benchmark plug-in: both sides of every benchmark run and do the same work."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.keras

pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from benchmarks import bench_keras  # noqa: E402
from benchmarks.harness import measure  # noqa: E402


def test_quick_benchmarks_run_both_sides_alike() -> None:
    benches = bench_keras.benchmarks(quick=True)
    names = {"bn_train", "bn_eval", "agc_step", "agc_step_xla", "renorm_train", "ghost_train"}
    names |= {"fold_eval", "recalibrate"}
    assert {b.name for b in benches} == names
    for bench in benches:
        ours, theirs = bench.unorm(), bench.native()
        assert bench.sync is not None
        bench.sync(ours)
        flat_ours, flat_theirs = tf.nest.flatten(ours), tf.nest.flatten(theirs)
        assert [t.shape for t in flat_ours] == [t.shape for t in flat_theirs]
        if bench.name == "bn_eval":  # canonical vs Keras eps: close, not equal
            np.testing.assert_allclose(flat_ours[0], flat_theirs[0], atol=1e-2)
        if bench.name == "fold_eval":  # the folded stack computes the unfolded one's output
            np.testing.assert_allclose(flat_ours[0], flat_theirs[0], rtol=1e-4, atol=1e-5)
    result = measure(benches[0], repeats=1, warmup=0, number=1)
    assert result.unorm_s > 0 and result.native_s > 0


def test_versions_name_keras_and_tensorflow() -> None:
    assert set(bench_keras.versions()) == {"keras", "tensorflow"}
