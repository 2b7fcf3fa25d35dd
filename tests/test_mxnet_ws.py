"""unorm.mxnet.ScaledStdConv1D/2D/3D against the NumPy reference of Scaled WS (SPEC.md
section 6): forward and gradients, hybridized and not, deferred initialisation, float16,
export; errors; AGC's view of them; an NF-LeNet built from them trains.

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

    from unorm.mxnet import ScaledStdConv1D, ScaledStdConv2D, ScaledStdConv3D

    CONVS = {1: ScaledStdConv1D, 2: ScaledStdConv2D, 3: ScaledStdConv3D}

# float64 throughout: what is compared is the standardisation, not rounding.
TOL = {"rtol": 1e-9, "atol": 1e-11}
SIDE = {1: 9, 2: 7, 3: 5}  # spatial size of the inputs, per rank


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
@pytest.mark.parametrize(
    ("rank", "kernel", "groups"),
    [
        (2, 3, 1),
        (2, 5, 1),
        (2, (1, 3), 1),
        (2, 3, 2),
        (2, (1, 3), 2),
        (1, 3, 1),
        (1, 5, 2),
        (3, 3, 1),
        (3, (1, 3, 5), 1),
        (3, 3, 2),
    ],
)
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("deferred", [False, True], ids=["in_channels", "deferred"])
def test_forward_and_gradients_match_reference(
    style: str, rank: int, kernel: Any, groups: int, hybridize: bool, deferred: bool
) -> None:
    rng = np.random.default_rng(0)
    ks = (kernel,) * rank if isinstance(kernel, int) else kernel
    pad = tuple(k // 2 for k in ks)
    conv = CONVS[rank](
        6, kernel, padding=pad, groups=groups, in_channels=0 if deferred else 4, style=style
    )
    conv.initialize()
    conv.cast("float64")
    if hybridize:
        conv.hybridize()
    x = rng.normal(size=(2, 4, *(SIDE[rank],) * rank))
    dy = rng.normal(size=(2, 6, *(SIDE[rank],) * rank))
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


@pytest.mark.parametrize(("rank", "fan_in"), [(1, 9), (2, 27), (3, 81)])
def test_float32_weight_has_the_specified_statistics(rank: int, fan_in: int) -> None:
    conv = CONVS[rank](5, 3, in_channels=3)
    conv.initialize()
    w = conv.weight.data()
    w_hat = conv.standardized_weight(mx.nd, w, conv.gain.data()).asnumpy()
    want = ref.scaled_weight_standardize(w.asnumpy(), None, 0)
    np.testing.assert_allclose(w_hat, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w_hat.reshape(5, -1).var(1), 1 / fan_in, rtol=1e-4)


@pytest.mark.parametrize("rank", [1, 3])
def test_float16_weight_is_standardised_in_float32(rank: int) -> None:
    conv = CONVS[rank](4, 3, in_channels=2)
    conv.initialize()
    conv.cast("float16")
    # A large offset: its variance in float16 arithmetic would be rounding noise.
    w = np.random.default_rng(1).normal(40.0, 0.05, conv.weight.shape).astype("float16")
    conv.weight.set_data(mx.nd.array(w, dtype="float16"))
    gain = np.linspace(0.5, 2.0, 4).astype("float16")
    conv.gain.set_data(mx.nd.array(gain, dtype="float16"))
    w_hat = conv.standardized_weight(mx.nd, conv.weight.data(), conv.gain.data())
    assert w_hat.dtype == np.float16
    want = ref.scaled_weight_standardize(w.astype("float64"), gain, 0)
    np.testing.assert_allclose(w_hat.asnumpy().astype("float64"), want, rtol=2e-3, atol=2e-3)
    # The same in the graph a hybridized block builds (MXNet has no float16 convolution
    # on CPU, so the standardisation is evaluated on its own).
    graph = conv.standardized_weight(mx.sym, mx.sym.var("w"), mx.sym.var("g"))
    (traced,) = graph.eval(
        ctx=mx.cpu(), w=mx.nd.array(w, dtype="float16"), g=mx.nd.array(gain, dtype="float16")
    )
    assert traced.dtype == np.float16
    np.testing.assert_array_equal(traced.asnumpy(), w_hat.asnumpy())


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


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_fan_in_zero_and_bad_settings_are_named_for_every_rank(rank: int, hybridize: bool) -> None:
    cls = CONVS[rank]
    zero = (3,) * (rank - 1) + (0,)
    with pytest.raises(ValueError, match=rf"fan_in must be >= 1.*kernel_size \({zero[0]},"):
        cls(4, zero)
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*kernel_size \(0,"):
        cls(4, 0)
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*in_channels=1 in groups=2"):
        cls(4, 2, groups=2, in_channels=1)
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*in_channels=1 in groups=2"):
        cls(4, 2, 1, 0, 1, 2, in_channels=1)  # groups given by position
    deferred = cls(4, 2)
    deferred.initialize()
    if hybridize:
        deferred.hybridize()
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*0 input channels"):
        deferred(mx.nd.array(np.zeros((1, 0, *(4,) * rank), "float32")))
    grouped = cls(4, 2, groups=2)
    grouped.initialize()
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*1 input channels in groups=2"):
        grouped(mx.nd.array(np.zeros((1, 1, *(4,) * rank), "float32")))
    with pytest.raises(ValueError, match="style must be one of 'deepmind', 'timm'"):
        cls(4, 2, style="nfnet")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        cls(4, 2, eps=-1.0)
    assert cls(4, 3).ws.eps == 1e-4
    assert cls(4, 3, style="timm").ws.eps == 1e-5


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_export_and_import_keep_the_outputs(tmp_path: Path, rank: int) -> None:
    net = gluon.nn.HybridSequential()
    net.add(CONVS[rank](4, 3, style="timm", gain_init=0.5, groups=2), gluon.nn.Dense(2))
    net.initialize()
    net.hybridize()
    x = mx.nd.array(np.random.default_rng(0).normal(size=(2, 4, *(6,) * rank)))
    net(x)  # completes the deferred shapes
    net[0].gain.set_data(mx.nd.array([0.5, 1.0, 1.5, 2.0]))
    want = net(x).asnumpy()
    prefix = str(tmp_path / "ws")
    net.export(prefix)
    loaded = gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"], f"{prefix}-0000.params")
    got = loaded(x).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    fresh = gluon.nn.HybridSequential()
    fresh.add(CONVS[rank](4, 3, style="timm", groups=2), gluon.nn.Dense(2))
    fresh.initialize()
    fresh(x)
    assert not np.allclose(fresh(x).asnumpy(), want)  # the gain and weights matter


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_agc_sees_a_convolution_and_the_gain_as_one_unit(rank: int) -> None:
    from unorm.mxnet import unit_axes_of

    conv = CONVS[rank](4, 3, in_channels=2, prefix="ws_")
    assert unit_axes_of(conv) == {"ws_weight": 0}  # the gain (rank 1) is one unit
    assert conv.weight.shape == (4, 2, *(3,) * rank)


def test_nf_lenet_trains_in_seconds() -> None:
    from unorm.models import digits
    from unorm.models.mxnet import lenet_nf, train
    from unorm.models.training import Recipe

    mx.random.seed(0)
    data = digits()
    losses = train(lenet_nf(), data.train_x, data.train_y, Recipe(steps=60, lr=0.1, clipping=0.1))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.9 * losses[0]
