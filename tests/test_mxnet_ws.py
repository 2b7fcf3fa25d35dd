"""unorm.mxnet.ScaledStdConv2D against the NumPy reference of Scaled WS (SPEC.md section
6): forward and gradients, hybridized and not, deferred initialisation, export; errors;
an NF-LeNet built from it trains.

Runs where MXNet runs (the legacy environment); the ``mxnet`` marker skips it elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import runs_here  # the environment's framework list (UNORM_RUNS)
from unorm import reference as ref

pytestmark = pytest.mark.mxnet


if runs_here("mxnet"):  # where MXNet is meant to run, a failing import is an error
    import mxnet as mx
    from mxnet import autograd, gluon

    from unorm.mxnet import ScaledStdConv2D

# float64 throughout: what is compared is the standardisation, not rounding.
TOL = {"rtol": 1e-9, "atol": 1e-11}


def _conv_call(
    conv: Any, x: np.ndarray, dy: np.ndarray, w: np.ndarray, gain: np.ndarray
) -> dict[str, np.ndarray]:
    """One recorded call; the weight and gain are set after the first (deferred) call."""
    xt = mx.nd.array(x, dtype="float64")
    conv(xt)  # completes a deferred initialisation
    conv.weight.set_data(mx.nd.array(w, dtype="float64"))
    conv.gain.set_data(mx.nd.array(gain, dtype="float64"))
    xt.attach_grad()
    with autograd.record():
        y = conv(xt)
    y.backward(mx.nd.array(dy, dtype="float64"))
    return {
        "y": y.asnumpy(),
        "dx": xt.grad.asnumpy(),
        "dw": conv.weight.grad().asnumpy(),
        "dgain": conv.gain.grad().asnumpy(),
    }


@pytest.mark.parametrize("style", ["deepmind", "timm"])
@pytest.mark.parametrize(("kernel", "groups"), [(3, 1), (5, 1), ((1, 3), 1), (3, 2), ((1, 3), 2)])
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("deferred", [False, True], ids=["in_channels", "deferred"])
def test_forward_and_gradients_match_reference(
    style: str, kernel: Any, groups: int, hybridize: bool, deferred: bool
) -> None:
    rng = np.random.default_rng(0)
    ks = (kernel, kernel) if isinstance(kernel, int) else kernel
    pad = (ks[0] // 2, ks[1] // 2)
    conv = ScaledStdConv2D(
        6, kernel, padding=pad, groups=groups, in_channels=0 if deferred else 4, style=style
    )
    conv.initialize()
    conv.cast("float64")
    if hybridize:
        conv.hybridize()
    x = rng.normal(size=(2, 4, 7, 7))
    dy = rng.normal(size=(2, 6, 7, 7))
    # Small weights with an offset: the mean subtraction and the styles' eps both matter.
    w = rng.normal(0.3, 0.1, (6, 4 // groups, *ks))
    gain = np.linspace(0.5, 2.0, 6)
    got = _conv_call(conv, x, dy, w, gain)

    # The reference on the weight, MXNet's own convolution around it: what is tested is
    # the standardisation and its gradient.
    w_hat = mx.nd.array(ref.scaled_weight_standardize(w, gain, 0, style=style), dtype="float64")
    w_hat.attach_grad()
    x2 = mx.nd.array(x, dtype="float64")
    x2.attach_grad()
    bias = conv.bias.data()
    with autograd.record():
        y2 = mx.nd.Convolution(x2, w_hat, bias, kernel=ks, pad=pad, num_filter=6, num_group=groups)
    y2.backward(mx.nd.array(dy, dtype="float64"))
    np.testing.assert_allclose(got["y"], y2.asnumpy(), **TOL)
    np.testing.assert_allclose(got["dx"], x2.grad.asnumpy(), **TOL)
    dw, dgain = ref.scaled_weight_standardize_backward(
        w_hat.grad.asnumpy(), w, gain, 0, style=style
    )
    np.testing.assert_allclose(got["dw"], dw, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got["dgain"], dgain, rtol=1e-8, atol=1e-10)


def test_float32_weight_has_the_specified_statistics() -> None:
    conv = ScaledStdConv2D(5, 3, in_channels=3)
    conv.initialize()
    w = conv.weight.data()
    w_hat = conv.standardized_weight(mx.nd, w, conv.gain.data()).asnumpy()
    want = ref.scaled_weight_standardize(w.asnumpy(), None, 0)
    np.testing.assert_allclose(w_hat, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w_hat.reshape(5, -1).var(1), 1 / 27, rtol=1e-4)


def test_bad_sizes_and_settings_are_named() -> None:
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*kernel_size \(0, 3\)"):
        ScaledStdConv2D(4, (0, 3))
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*in_channels=1 in groups=2"):
        ScaledStdConv2D(4, 3, groups=2, in_channels=1)
    deferred = ScaledStdConv2D(4, 3)
    deferred.initialize()
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*0 input channels"):
        deferred(mx.nd.array(np.zeros((1, 0, 5, 5), "float32")))
    with pytest.raises(ValueError, match="style must be one of 'deepmind', 'timm'"):
        ScaledStdConv2D(4, 3, style="nfnet")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        ScaledStdConv2D(4, 3, eps=-1.0)
    assert ScaledStdConv2D(4, 3).ws.eps == 1e-4
    assert ScaledStdConv2D(4, 3, style="timm").ws.eps == 1e-5


def test_export_and_import_keep_the_outputs(tmp_path: Path) -> None:
    net = gluon.nn.HybridSequential()
    net.add(ScaledStdConv2D(4, 3, style="timm", gain_init=0.5), gluon.nn.Dense(2))
    net.initialize()
    net.hybridize()
    x = mx.nd.array(np.random.default_rng(0).normal(size=(2, 3, 6, 6)))
    want = net(x).asnumpy()
    prefix = str(tmp_path / "ws")
    net.export(prefix)
    loaded = gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params")
    np.testing.assert_allclose(loaded(x).asnumpy(), want, rtol=1e-6)


def test_agc_sees_a_convolution_and_the_gain_as_one_unit() -> None:
    from unorm.mxnet import unit_axes_of

    conv = ScaledStdConv2D(4, 3, in_channels=2, prefix="ws_")
    assert unit_axes_of(conv) == {"ws_weight": 0}  # the gain (rank 1) is one unit


def test_nf_lenet_trains_in_seconds() -> None:
    from unorm.models import digits
    from unorm.models.mxnet import lenet_nf, train
    from unorm.models.training import Recipe

    mx.random.seed(0)
    data = digits()
    losses = train(lenet_nf(), data.train_x, data.train_y, Recipe(steps=60, lr=0.1, clipping=0.1))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.9 * losses[0]
