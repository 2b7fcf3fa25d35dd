"""The zoo's MXNet counterparts of ``mobilenet_v2`` (``transformers``) and
``efficientnet_b0`` (``efficientnet_pytorch``): they build for the zoo's image size,
hybridize without changing a logit, and carry their state to a fresh copy of themselves.

The cross-framework check (the PyTorch sources' files loaded here and the other way,
every ordered pair) is the cross-environment zoo check, ``tools/crossenv.py``: this
environment has neither source. The asymmetric "same" padding block is checked against
NumPy's padding and a direct sum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.mxnet
mx = pytest.importorskip("mxnet")

import unorm.mxnet  # noqa: E402
from unorm import port  # noqa: E402
from unorm.models import zoo  # noqa: E402
from unorm.models.zoo import training_mxnet  # noqa: E402
from unorm.models.zoo.data import batch  # noqa: E402
from unorm.models.zoo.layers_mxnet import SameConv  # noqa: E402
from unorm.models.zoo.plans import Conv  # noqa: E402

SIZE = 64
MODELS = {"mobilenet_v2": 52, "efficientnet_b0": 49}  # their BatchNorms


def _build(name: str, seed: int) -> Any:
    mx.random.seed(seed)
    return zoo.build(name, "mxnet", image_size=SIZE)


def _stats(net: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    mx.nd.waitall()
    return [(b.running_mean.data().asnumpy(), b.running_var.data().asnumpy()) for b in _norms(net)]


def _norms(net: Any) -> list[Any]:
    found: list[Any] = []

    def visit(block: Any) -> None:
        if isinstance(block, unorm.mxnet.BatchNorm):
            found.append(block)
        for child in block._children.values():
            visit(child)

    visit(net)
    return found


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hybridized_gives_the_same_logits_and_training_step(name: str) -> None:
    x, y = batch(0, image_size=SIZE)
    plain, hybrid = _build(name, 0), _build(name, 0)
    hybrid.hybridize()
    assert len(_norms(plain)) == MODELS[name]
    want = training_mxnet.evaluate(plain, x)
    assert want.shape == (4, 10) and np.isfinite(want).all()
    np.testing.assert_allclose(training_mxnet.evaluate(hybrid, x), want, rtol=1e-5, atol=1e-6)

    # One training step each (dropout aside, which acts after the last BatchNorm): the
    # same running statistics, moved from their fresh values.
    mx.random.seed(1)
    training_mxnet.train_step(plain, x, y)
    mx.random.seed(1)
    training_mxnet.train_step(hybrid, x, y)
    for (m0, v0), (m1, v1) in zip(_stats(plain), _stats(hybrid), strict=True):
        np.testing.assert_allclose(m1, m0, rtol=1e-4, atol=1e-5 * float(np.sqrt(v0.max())))
        np.testing.assert_allclose(v1, v0, rtol=1e-4, atol=1e-6 * float(v0.max()))
    assert any(np.abs(m).max() > 0 for m, _ in _stats(plain))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_own_export_round_trips_to_a_fresh_copy(name: str, tmp_path: Path) -> None:
    x, y = batch(1, image_size=SIZE)
    net = _build(name, 2)
    net.hybridize()
    training_mxnet.train_step(net, x, y)
    path = tmp_path / f"{name}.safetensors"
    port.save(unorm.mxnet.export_checkpoint(net, mx.nd.zeros((1, 3, SIZE, SIZE))), path)
    ckpt = port.load(path)
    assert "probe/output" in ckpt.tensors  # the load below is verified on it

    fresh = _build(name, 3)
    assert not np.allclose(training_mxnet.evaluate(fresh, x), training_mxnet.evaluate(net, x))
    unorm.mxnet.load_checkpoint(fresh, ckpt)
    np.testing.assert_array_equal(
        training_mxnet.evaluate(fresh, x), training_mxnet.evaluate(net, x)
    )
    for (m0, v0), (m1, v1) in zip(_stats(net), _stats(fresh), strict=True):
        np.testing.assert_array_equal(m1, m0)
        np.testing.assert_array_equal(v1, v0)


def _direct_conv(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """A cross-correlation summed term by term (one group), NumPy only."""
    n, _, h, wd = x.shape
    o, _, k, _ = w.shape
    oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * stride : i * stride + k, j * stride : j * stride + k]
            out[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w)
    return out


@pytest.mark.parametrize(
    "size,kernel,stride,pad",
    [(8, 3, 2, ((0, 1), (0, 1))), (7, 5, 2, ((2, 2), (2, 2))), (6, 5, 1, ((2, 2), (2, 2)))],
)
def test_same_conv_pads_asymmetrically_as_numpy(
    size: int, kernel: int, stride: int, pad: tuple[tuple[int, int], tuple[int, int]]
) -> None:
    conv = SameConv(Conv("c", 2, 3, kernel, stride, 1, pad, size))
    conv.initialize(mx.init.Normal(1.0))
    x = np.random.default_rng(0).standard_normal((2, 2, size, size)).astype(np.float32)
    got = conv(mx.nd.array(x)).asnumpy()
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), pad[0], pad[1]))
    want = _direct_conv(padded, conv.conv.weight.data().asnumpy().astype(np.float64), stride)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_same_conv_refuses_another_input_size() -> None:
    conv = SameConv(Conv("c", 2, 3, 3, 2, 1, ((0, 1), (0, 1)), 8))
    conv.initialize()
    with pytest.raises(ValueError, match="built for 8x8 inputs"):
        conv(mx.nd.zeros((1, 2, 9, 9)))
