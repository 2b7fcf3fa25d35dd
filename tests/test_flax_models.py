"""The Flax seed networks: LeNet-BN and NF-LeNet learn the digits with unorm's layers."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.flax

pytest.importorskip("flax")

from unorm.models import flax as models  # noqa: E402
from unorm.models.data import digits  # noqa: E402
from unorm.models.training import Recipe, accuracy  # noqa: E402


@pytest.mark.parametrize("factory", [models.lenet_bn, models.lenet_nf])
def test_seed_networks_learn(factory: object) -> None:
    data = digits()
    models.seed(0)
    net = factory()  # type: ignore[operator]
    losses = models.train(net, data.train_x, data.train_y, Recipe(steps=60, lr=0.2))
    assert np.all(np.isfinite(losses)) and np.mean(losses[-10:]) < np.mean(losses[:10])
    logits = models.predict(net, data.test_x[:256])
    assert logits.shape == (256, 10)
    assert accuracy(logits, data.test_y[:256]) > 0.2


def test_seed_is_reproducible() -> None:
    models.seed(3)
    a = models.lenet_bn()
    models.seed(3)
    b = models.lenet_bn()
    np.testing.assert_array_equal(a.conv1.kernel[...], b.conv1.kernel[...])
    assert set(models.MODELS) == {"lenet_bn"}
