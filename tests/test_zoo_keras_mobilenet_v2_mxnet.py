"""The zoo's ``keras_mobilenet_v2`` counterpart in MXNet Gluon: it builds, hybridizes to
the same logits and statistics, round-trips its own export through a file, and refuses
an input size its paddings were not computed for.

Its port from and to ``keras.applications.MobileNetV2`` itself is the cross-environment
zoo check (``tools/crossenv.py``): this environment has no Keras.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import runs_here  # the environment's framework list (UNORM_RUNS)
from unorm import port

pytestmark = pytest.mark.mxnet

if runs_here("mxnet"):  # where MXNet is meant to run, a failing import is an error
    import mxnet as mx
else:
    mx = pytest.importorskip("mxnet")

import unorm.mxnet  # noqa: E402
from unorm.models import zoo  # noqa: E402
from unorm.models.zoo import training_mxnet  # noqa: E402
from unorm.models.zoo.data import batch  # noqa: E402

NAME = "keras_mobilenet_v2"
SIZE = 64
NORMS = 52  # the stem's 1, block 0's 2, 16 blocks x 3, the head's 1


def _model(seed: int) -> Any:
    mx.random.seed(seed)
    np.random.seed(seed)
    return zoo.build(NAME, "mxnet", image_size=SIZE)


def _calibrated(seed: int, x: np.ndarray) -> Any:
    """A model whose running statistics are those of ``x`` (with Keras's momentum 0.999
    a few steps leave them at mean 0, variance 1, where eval logits hardly depend on the
    input), then two training steps."""
    net = _model(seed)
    unorm.mxnet.recalibrate(net, [mx.nd.array(x)])
    return net


def _stats(net: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _, block in _blocks(net):
        if isinstance(block, unorm.mxnet.BatchNorm):
            out.append((block.running_mean.data().asnumpy(), block.running_var.data().asnumpy()))
    mx.nd.waitall()
    return out


def _blocks(block: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every block under ``block`` in registration order (Keras's creation order)."""
    found = [(prefix, block)]
    for name, child in block._children.items():
        found += _blocks(child, f"{prefix}.{name}")
    return found


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def test_builds_with_keras_structure() -> None:
    net = _model(0)
    convs = [b for _, b in _blocks(net) if isinstance(b, mx.gluon.nn.Conv2D)]
    norms = [b for _, b in _blocks(net) if isinstance(b, unorm.mxnet.BatchNorm)]
    assert len(convs) == len(norms) == NORMS  # each convolution has its BatchNorm
    depthwise = [c for c in convs if c._kwargs["num_group"] > 1]
    assert len(depthwise) == 17
    for conv in depthwise:  # Keras's DepthwiseConv2D: one group per channel
        assert conv._kwargs["num_group"] == conv._channels == conv.weight.shape[0]
        assert conv.weight.shape[1:] == (1, 3, 3)
    assert all(b.spec.preset == "keras" and b.spec.eps == 1e-3 for b in norms)
    assert all(abs(b.spec.momentum - (1 - 0.999)) < 1e-15 for b in norms)
    x, _ = batch(0, image_size=SIZE)
    assert training_mxnet.evaluate(net, x).shape == (4, 10)


def test_hybridized_gives_the_same_logits_and_statistics() -> None:
    x, y = batch(1, image_size=SIZE)
    plain, hybrid = _calibrated(1, x), _calibrated(1, x)
    hybrid.hybridize()
    want = training_mxnet.evaluate(plain, x)
    assert _relative(want, training_mxnet.evaluate(hybrid, x)) < 1e-5
    training_mxnet.train_step(plain, x, y)
    training_mxnet.train_step(hybrid, x, y)
    for (m0, v0), (m1, v1) in zip(_stats(plain), _stats(hybrid), strict=True):
        np.testing.assert_allclose(m1, m0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-6)
    assert _relative(training_mxnet.evaluate(plain, x), training_mxnet.evaluate(hybrid, x)) < 1e-5


def test_round_trips_its_own_export_through_a_file(tmp_path: Path) -> None:
    x, y = batch(2, image_size=SIZE)
    source = _calibrated(2, x)
    for _ in range(2):
        training_mxnet.train_step(source, x, y)
    path = tmp_path / "keras_mobilenet_v2.safetensors"
    port.save(unorm.mxnet.export_checkpoint(source, mx.nd.array(x)), path)

    target = _model(3)
    target.hybridize()
    assert _relative(training_mxnet.evaluate(source, x), training_mxnet.evaluate(target, x)) > 0.1
    unorm.mxnet.load_checkpoint(target, port.load(path))
    assert _relative(training_mxnet.evaluate(source, x), training_mxnet.evaluate(target, x)) < 1e-6
    for (m0, v0), (m1, v1) in zip(_stats(source), _stats(target), strict=True):
        np.testing.assert_array_equal(m1, m0)
        np.testing.assert_array_equal(v1, v0)


def test_other_input_sizes_are_refused() -> None:
    net = _model(4)
    with pytest.raises(ValueError, match="built for 64x64"):
        net(mx.nd.zeros((1, 3, 65, 65)))
    net.hybridize()
    with pytest.raises(mx.base.MXNetError):
        net(mx.nd.zeros((1, 3, 65, 65))).wait_to_read()
    assert net(mx.nd.zeros((1, 3, SIZE, SIZE))).shape == (1, 10)
