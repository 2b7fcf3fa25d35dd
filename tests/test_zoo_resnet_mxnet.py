"""The zoo's MXNet ResNets (the counterparts of ``transformers``' ResNet-18/50 and of
``keras.applications.ResNet50``) in the legacy environment: they build, hybridize, give
the same logits hybridized and not, and round-trip their own export through a file.

Their ports from and to the sources are checked across environments by the zoo port
check (``tools/crossenv.py``): the sources need transformers and Keras, which this
environment has not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unorm import port

pytestmark = pytest.mark.mxnet
mx = pytest.importorskip("mxnet")

import unorm.mxnet  # noqa: E402
from unorm.models import zoo  # noqa: E402
from unorm.models.zoo import training_mxnet  # noqa: E402
from unorm.models.zoo.data import batch  # noqa: E402

SIZE = 64
#: model -> (the source's BatchNorm preset, its eps, BatchNorm layers).
CASES = {
    "resnet18": ("torch", 1e-5, 20),
    "resnet50": ("torch", 1e-5, 53),
    "keras_resnet50": ("keras", 1.001e-5, 53),
}


def _build(name: str, seed: int) -> Any:
    mx.random.seed(seed)
    np.random.seed(seed)  # Gluon's initialisers draw from both
    return zoo.build(name, "mxnet", image_size=SIZE)


def _batchnorms(block: Any) -> list[Any]:
    found = [block] if isinstance(block, unorm.mxnet.BatchNorm) else []
    for child in block._children.values():
        found += _batchnorms(child)
    return found


@pytest.mark.parametrize("name", sorted(CASES))
def test_builds_with_the_source_batchnorm_settings(name: str) -> None:
    preset, eps, count = CASES[name]
    layers = _batchnorms(_build(name, 0))
    assert len(layers) == count
    assert {(bn.spec.preset, bn.spec.eps) for bn in layers} == {(preset, eps)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hybridizes_and_round_trips_its_own_export(name: str, tmp_path: Path) -> None:
    """After a training step (running statistics that are not the initial ones): the
    same logits hybridized and not, and a fresh copy loaded from its export through a
    file (verified on the probe it carries) gives them too, with the same statistics."""
    a = _build(name, 1)
    x, y = batch(1, image_size=SIZE)
    training_mxnet.train_step(a, x, y)
    path = tmp_path / f"{name}.safetensors"
    port.save(unorm.mxnet.export_checkpoint(a, mx.nd.array(x)), path)
    imperative = training_mxnet.evaluate(a, x)
    assert imperative.shape == (4, zoo.NUM_LABELS)
    a.hybridize()
    scale = float(np.abs(imperative).max())
    np.testing.assert_allclose(
        training_mxnet.evaluate(a, x), imperative, rtol=1e-5, atol=1e-6 * scale
    )

    b = _build(name, 2)
    assert not np.allclose(training_mxnet.evaluate(b, x), imperative)
    unorm.mxnet.load_checkpoint(b, port.load(path))
    np.testing.assert_array_equal(training_mxnet.evaluate(b, x), imperative)
    for bn_a, bn_b in zip(_batchnorms(a), _batchnorms(b), strict=True):
        for stat in ("running_mean", "running_var"):
            want = getattr(bn_a, stat).data().asnumpy()
            np.testing.assert_array_equal(getattr(bn_b, stat).data().asnumpy(), want)
