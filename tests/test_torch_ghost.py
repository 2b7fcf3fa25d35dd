"""unorm.torch.BatchNorm(virtual_batch_size=...) against plain BatchNorm on each group
written in the tests (tests/ghost_formulas.py), eager and compiled."""

from __future__ import annotations

import numpy as np
import pytest
from ghost_formulas import per_group

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
from unorm.torch import BatchNorm, SyncBatchNorm  # noqa: E402

GAMMA, BETA = np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.3])


def _layer(**kwargs: object) -> BatchNorm:
    layer = BatchNorm(3, dtype=torch.float64, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(GAMMA))
        layer.bias.copy_(torch.from_numpy(BETA))
    return layer


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(
    ("batch", "size", "feed", "axis"),
    [(12, 4, "batch", 1), (10, 4, "batch", 1), (10, 4, "groups", 1), (7, 3, "groups", -1)],
)
def test_equals_plain_batchnorm_per_group(
    batch: int, size: int, feed: str, axis: int, compiled: bool
) -> None:
    bn = _layer(virtual_batch_size=size, ghost_running=feed, axis=axis)
    module = torch.compile(bn) if compiled else bn
    rng = np.random.default_rng(0)
    shape = (batch, 3, 2) if axis == 1 else (batch, 2, 3)
    x_np, dy_np = rng.normal(1.0, 2.0, shape), rng.normal(size=shape)
    want = per_group(x_np, dy_np, size, GAMMA, BETA, axis=axis, feed=feed)
    x = torch.tensor(x_np, requires_grad=True)
    y = module(x)
    y.backward(torch.tensor(dy_np))
    tol = {"rtol": 1e-10, "atol": 1e-12}
    np.testing.assert_allclose(y.detach().numpy(), want["y"], **tol)
    np.testing.assert_allclose(x.grad.numpy(), want["dx"], **tol)
    np.testing.assert_allclose(bn.weight.grad.numpy(), want["dgamma"], **tol)
    np.testing.assert_allclose(bn.bias.grad.numpy(), want["dbeta"], **tol)
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.1 * want["mean"], **tol)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.9 + 0.1 * want["var"], **tol)
    # Inference with any batch size, smaller than a group too, is never grouped.
    bn.eval()
    small = torch.tensor(rng.normal(size=(2, *shape[1:])))
    expected = small.numpy() - bn.running_mean.numpy().reshape(
        (1, 3, 1) if axis == 1 else (1, 1, 3)
    )
    scale = np.sqrt(bn.running_var.numpy() + 1e-5).reshape((1, 3, 1) if axis == 1 else (1, 1, 3))
    g, b = (GAMMA.reshape(scale.shape), BETA.reshape(scale.shape))
    np.testing.assert_allclose(module(small).detach().numpy(), g * expected / scale + b, **tol)


def test_float32_channels_last_memory_format_and_update_on_backward() -> None:
    bn = BatchNorm(3, virtual_batch_size=2, preset="mxnet")  # update_on="backward"
    x = torch.randn(6, 3, 4, 4).to(memory_format=torch.channels_last).requires_grad_(True)
    y = bn(x)
    assert int(bn.num_batches_tracked) == 0
    y.sum().backward()
    assert int(bn.num_batches_tracked) == 1
    want = per_group(x.detach().double().numpy(), np.ones(x.shape), 2, np.ones(3), np.zeros(3))
    np.testing.assert_allclose(y.detach().numpy(), want["y"], rtol=1e-5, atol=2e-5)


def test_bad_input_changes_nothing() -> None:
    bn = _layer(virtual_batch_size=4)
    bn(torch.randn(8, 3, dtype=torch.float64))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(
        ValueError, match="at most the batch size in training, got 4 for a batch of 3"
    ):
        bn(torch.randn(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value per channel in the last ghost batch"):
        bn(torch.randn(9, 3, dtype=torch.float64))
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(value, before[key])
    with pytest.raises(
        ValueError, match="virtual_batch_size must be an integer >= 2 or None, got 1"
    ):
        BatchNorm(3, virtual_batch_size=1)
    with pytest.raises(ValueError, match="axis must not be 0 with virtual_batch_size"):
        BatchNorm(3, axis=0, virtual_batch_size=2)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="virtual_batch_size must be None for SyncBatchNorm"):
        SyncBatchNorm(3, virtual_batch_size=2)
