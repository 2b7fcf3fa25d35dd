"""unorm.mxnet.BatchNorm(virtual_batch_size=...) against plain BatchNorm on each group
written in the tests (tests/ghost_formulas.py): imperative, hybridized, in a hybridized
parent and exported then imported.

Runs where MXNet runs (the legacy environment); the ``mxnet`` marker skips it elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ghost_formulas import per_group
from gluon_steps import check_training_step

from conftest import runs_here  # the environment's framework list (UNORM_RUNS)

pytestmark = pytest.mark.mxnet

if runs_here("mxnet"):  # where MXNet is meant to run, a failing import is an error
    import mxnet as mx
    from mxnet import autograd, gluon

    from unorm.mxnet import BatchNorm, SyncBatchNorm

GAMMA, BETA = np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.3])
TOL = {"rtol": 2e-5, "atol": 2e-5}


def _param(block: Any, suffix: str) -> np.ndarray:
    return next(p for n, p in block.collect_params().items() if n.endswith(suffix)).data().asnumpy()


@pytest.mark.parametrize("where", ["direct", "hybridized", "parent"])
@pytest.mark.parametrize(("batch", "size", "feed"), [(12, 4, "batch"), (10, 4, "groups")])
def test_equals_plain_batchnorm_per_group(where: str, batch: int, size: int, feed: str) -> None:
    layer = BatchNorm(3, virtual_batch_size=size, ghost_running=feed)
    model: Any = layer
    if where == "parent":
        model = gluon.nn.HybridSequential()
        model.add(gluon.nn.Activation("relu"), layer)  # positive data: relu passes it
    model.initialize()
    layer.gamma.set_data(mx.nd.array(GAMMA))
    layer.beta.set_data(mx.nd.array(BETA))
    if where != "direct":
        model.hybridize()
    rng = np.random.default_rng(0)
    x_np, dy_np = rng.uniform(0.5, 4.0, (batch, 3, 2)), rng.normal(size=(batch, 3, 2))
    want = per_group(x_np, dy_np, size, GAMMA, BETA, feed=feed)
    check_training_step(model, layer, x_np, dy_np, want)
    np.testing.assert_allclose(_param(model, "running_mean"), 0.1 * want["mean"], **TOL)
    np.testing.assert_allclose(_param(model, "running_var"), 0.9 + 0.1 * want["var"], **TOL)
    small = mx.nd.array(rng.uniform(0.5, 4.0, (2, 3, 2)))  # fewer samples than a group
    assert model(small).shape == (2, 3, 2)


def test_export_import_keeps_the_setting(tmp_path: Path) -> None:
    model = gluon.nn.HybridSequential()
    model.add(gluon.nn.Activation("relu"), BatchNorm(3, virtual_batch_size=2))
    model.initialize()
    model.hybridize()
    x = mx.nd.array(np.random.default_rng(1).uniform(0.5, 4.0, (6, 3)))
    with autograd.train_mode():
        model(x)
    model.export(str(tmp_path / "ghost"))
    loaded = gluon.SymbolBlock.imports(
        str(tmp_path / "ghost-symbol.json"), ["data"], str(tmp_path / "ghost-0000.params")
    )
    with autograd.train_mode():
        a, b = loaded(x).asnumpy(), model(x).asnumpy()
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    want = per_group(x.asnumpy().astype(np.float64), np.zeros((6, 3)), 2, np.ones(3), np.zeros(3))
    np.testing.assert_allclose(a, want["y"], **TOL)


def test_bad_input_changes_nothing() -> None:
    layer = BatchNorm(3, virtual_batch_size=4)
    layer.initialize()
    with autograd.train_mode():
        layer(mx.nd.array(np.random.default_rng(2).normal(size=(8, 3))))
    before = {n: p.data().asnumpy().copy() for n, p in layer.collect_params().items()}
    message = "at most the batch size in training, got 4 for a batch of 3"
    with pytest.raises(ValueError, match=message), autograd.train_mode():
        layer(mx.nd.ones((3, 3)))
    with pytest.raises(ValueError, match="more than 1 value per channel"), autograd.train_mode():
        layer(mx.nd.ones((9, 3)))
    for n, p in layer.collect_params().items():
        np.testing.assert_array_equal(p.data().asnumpy(), before[n])
    with pytest.raises(ValueError, match="virtual_batch_size must be None for SyncBatchNorm"):
        SyncBatchNorm(3, num_devices=2, virtual_batch_size=2)
