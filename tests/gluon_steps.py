"""One recorded training step of a Gluon model, checked against expected values: shared by
the MXNet tests of the BatchNorm training modes (imported only where MXNet runs)."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_training_step(
    model: Any, layer: Any, x_np: np.ndarray, dy_np: np.ndarray, want: dict[str, Any]
) -> None:
    """Run ``model`` on ``x_np`` under ``autograd.record()``, backward with ``dy_np``, and
    compare ``y``, ``dx`` and ``layer``'s ``gamma``/``beta`` gradients with ``want``."""
    import mxnet as mx
    from mxnet import autograd

    x = mx.nd.array(x_np)
    x.attach_grad()
    with autograd.record():
        y = model(x)
    y.backward(mx.nd.array(dy_np))
    tol = {"rtol": 2e-5, "atol": 2e-5}
    np.testing.assert_allclose(y.asnumpy(), want["y"], **tol)
    np.testing.assert_allclose(x.grad.asnumpy(), want["dx"], **tol)
    # Sums over the batch: an absolute tolerance of their size.
    np.testing.assert_allclose(layer.gamma.grad().asnumpy(), want["dgamma"], rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(layer.beta.grad().asnumpy(), want["dbeta"], rtol=2e-5, atol=2e-4)
