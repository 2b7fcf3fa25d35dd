"""unorm.mxnet.accumulate: k micro-batches give each BatchNorm the running statistics of
one call on their union (NumPy on the concatenated batch, written in the tests),
imperative and hybridized.

Runs where MXNet runs (the legacy environment); the ``mxnet`` marker skips it elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import runs_here  # the environment's framework list (UNORM_RUNS)

pytestmark = pytest.mark.mxnet

if runs_here("mxnet"):  # where MXNet is meant to run, a failing import is an error
    import mxnet as mx
    from mxnet import autograd, gluon

    from unorm.mxnet import BatchNorm, accumulate

TOL = {"rtol": 2e-5, "atol": 1e-6}


def _union(parts: list[np.ndarray], unbiased: bool = True) -> tuple[np.ndarray, np.ndarray]:
    whole = np.concatenate(parts)
    axes = tuple(i for i in range(whole.ndim) if i != 1)
    n = whole.size // whole.shape[1]
    var = whole.var(axis=axes) * (n / (n - 1) if unbiased else 1.0)
    return 0.1 * whole.mean(axis=axes), 0.9 + 0.1 * var


@pytest.mark.parametrize("hybridize", [False, True])
@pytest.mark.parametrize("preset", [None, "mxnet"])  # "mxnet": recorded when backward runs
def test_uneven_micro_batches_give_the_union(hybridize: bool, preset: str | None) -> None:
    layer = BatchNorm(3, preset=preset)
    model = gluon.nn.HybridSequential()
    model.add(layer)
    model.initialize()
    if hybridize:
        model.hybridize()
    rng = np.random.default_rng(0)
    parts = [rng.normal(k, 1 + k, (size, 3, 4)) for k, size in enumerate((5, 2, 7))]
    with accumulate(model, steps=3):
        for part in parts:
            with autograd.record():
                y = model(mx.nd.array(part))
            y.backward()
    mean, var = _union(parts, unbiased=preset is None)
    np.testing.assert_allclose(layer.running_mean.data().asnumpy(), mean, **TOL)
    np.testing.assert_allclose(layer.running_var.data().asnumpy(), var, **TOL)
    assert int(layer.num_batches_tracked.data().asnumpy()[0]) == 1


def test_partial_step_nonfinite_and_refusals() -> None:
    layer = BatchNorm(3)
    layer.initialize()
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(4, 3)) for _ in range(3)]
    with accumulate(layer, steps=2), autograd.train_mode():
        for part in parts:
            layer(mx.nd.array(part))
    assert int(layer.num_batches_tracked.data().asnumpy()[0]) == 2  # {0, 1} and {2}
    before = layer.running_var.data().asnumpy().copy()
    bad = parts[0].copy()
    bad[0, 1] = np.nan
    with accumulate(layer, steps=2), autograd.train_mode():
        layer(mx.nd.array(parts[1]))
        layer(mx.nd.array(bad))
    np.testing.assert_array_equal(layer.running_var.data().asnumpy(), before)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        accumulate(layer, steps=0).__enter__()
    with pytest.raises(ValueError, match="renorm=True, virtual_batch_size"):
        accumulate(BatchNorm(3, renorm=True), steps=2).__enter__()
    with pytest.raises(ValueError, match="accumulate needs a model with at least one BatchNorm"):
        accumulate(gluon.nn.Dense(2), steps=2).__enter__()
