"""Checks shared by the zoo tests of a PyTorch source and its Keras counterpart
(``test_zoo_mobilenet_v2.py``, ``test_zoo_efficientnet.py``).

Ground truth is the source, other people's code: its logits and its own
``nn.BatchNorm2d`` running statistics. The counterpart's layers are named after the
source's modules, so each BatchNorm pairs with the source's module of its name (not
through unorm's own matching), and statistics are read from each framework's own
variables. Imported by those tests only, after their ``importorskip`` of torch and keras.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import torch

import unorm.keras
import unorm.torch
from unorm import port
from unorm.models import zoo
from unorm.models.zoo import training_keras, training_torch
from unorm.models.zoo.data import batch

SIZE = 64
Stats = dict[str, tuple[np.ndarray, np.ndarray]]


def source(name: str, seed: int) -> Any:
    torch.manual_seed(seed)
    return zoo.build(name, "torch", image_size=SIZE)


def counterpart(name: str, seed: int) -> Any:
    keras.utils.set_random_seed(seed)
    return zoo.build(name, "keras", image_size=SIZE)


def torch_stats(model: Any) -> Stats:
    """The source's running statistics by module name (the ``transformers`` wrapper's
    ``mobilenet_v2.`` prefix kept: the counterpart's names carry it too)."""
    return {
        name: (m.running_mean.numpy().copy(), m.running_var.numpy().copy())
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    }


def keras_stats(model: Any) -> Stats:
    """The counterpart's moving statistics by layer name (its unorm BatchNorms)."""
    return {
        la.name: (la.moving_mean.numpy().copy(), la.moving_variance.numpy().copy())
        for la in model.layers
        if isinstance(la, unorm.keras.BatchNorm)
    }


def relative(want: np.ndarray, got: np.ndarray) -> float:
    """``max|got - want| / max|want|``: the difference at the logits' own scale."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_stats(want: Stats, got: Stats, count: int, exact: bool) -> None:
    """Every BatchNorm's statistics, paired by name. Not exact: float32 rounding of a
    training step, at each layer's own scale (a mean of a zero-mean input is rounding
    noise of about 1e-8, so the mean is compared at the scale of the layer's standard
    deviation)."""
    assert sorted(want) == sorted(got) and len(want) == count
    for name, (mean, var) in want.items():
        mean_got, var_got = got[name]
        assert mean.shape == mean_got.shape and var.shape == var_got.shape, name
        if exact:
            np.testing.assert_array_equal(mean_got, mean, err_msg=name)
            np.testing.assert_array_equal(var_got, var, err_msg=name)
        else:
            std = float(np.sqrt(var.max()))
            np.testing.assert_allclose(mean_got, mean, rtol=1e-4, atol=1e-5 * std, err_msg=name)
            np.testing.assert_allclose(var_got, var, rtol=1e-4, atol=1e-6 * var.max(), err_msg=name)


def assert_same_update(before: Stats, want: Stats, got: Stats) -> None:
    """The step's change of every statistic agrees too: with a small momentum (0.01) it
    is a hundredth of the value, finer than comparing the values resolves. The floors
    are those of :func:`assert_stats` (a mean's at the layer's standard deviation)."""
    for name, (mean, var) in before.items():
        floors = (1e-5 * float(np.sqrt(var.max())), 1e-6 * float(var.max()))
        for o, w, g, floor in zip((mean, var), want[name], got[name], floors, strict=True):
            dw, dg = w.astype(np.float64) - o, g.astype(np.float64) - o
            scale = np.abs(dw).max()
            assert scale > 0, f"{name} did not move"
            assert np.abs(dg - dw).max() <= 2e-3 * scale + floor, name


def calibrate_source(model: Any, x: np.ndarray) -> None:
    """The source's running statistics set to those of one training pass on ``x``, by its
    own ``nn.BatchNorm2d`` (reset, then PyTorch's cumulative average, ``momentum=None``,
    for that call): a few steps at momentum 0.01 leave them near mean 0, variance 1,
    where the eval-mode logits hardly depend on the input."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(x))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def trained_source(name: str, path: Path) -> tuple[Any, np.ndarray, np.ndarray]:
    """The source, calibrated and trained 2 steps on ``batch(0)``, exported (with its
    probe) to ``path``; returns it and that batch."""
    x, y = batch(0, image_size=SIZE)
    src = source(name, 0)
    calibrate_source(src, x)
    for _ in range(2):
        training_torch.train_step(src, x, y)
    port.save(unorm.torch.export_checkpoint(src, torch.from_numpy(x)), path)
    return src, x, y


def torch_to_keras(
    name: str, src: Any, x: np.ndarray, y: np.ndarray, path: Path, count: int
) -> None:
    """The trained source's file loaded into a fresh counterpart: the source's logits and
    statistics, and the same statistics after one more step in each."""
    dst = counterpart(name, 1)
    unorm.keras.load_checkpoint(dst, port.load(path))
    want = training_torch.evaluate(src, x)
    assert np.abs(want - want.mean(0)).max() > 1e-2 * np.abs(want).max()  # input-dependent
    assert relative(want, training_keras.evaluate(dst, x)) < 1e-4
    before = torch_stats(src)
    assert_stats(before, keras_stats(dst), count, exact=True)

    training_torch.train_step(src, x, y)
    training_keras.train_step(dst, x, y)
    assert_stats(torch_stats(src), keras_stats(dst), count, exact=False)
    assert_same_update(before, torch_stats(src), keras_stats(dst))


def keras_to_torch(name: str, count: int, tmp_path: Path) -> None:
    """The reverse: the counterpart calibrated and trained 2 steps, exported to a file,
    loaded into a fresh source, which then has its logits and statistics, and the same
    statistics after one more step in each."""
    x, y = batch(1, image_size=SIZE)
    src_k = counterpart(name, 2)
    unorm.keras.recalibrate(src_k, [np.ascontiguousarray(x.transpose(0, 2, 3, 1))])
    for _ in range(2):
        training_keras.train_step(src_k, x, y)
    path = tmp_path / f"{name}.safetensors"
    port.save(unorm.keras.export_checkpoint(src_k), path)

    dst = source(name, 3)
    unorm.torch.load_checkpoint(dst, port.load(path))
    want = training_keras.evaluate(src_k, x)
    assert np.abs(want - want.mean(0)).max() > 1e-2 * np.abs(want).max()
    assert relative(want, training_torch.evaluate(dst, x)) < 1e-4
    before = keras_stats(src_k)
    assert_stats(before, torch_stats(dst), count, exact=True)

    training_keras.train_step(src_k, x, y)
    training_torch.train_step(dst, x, y)
    assert_stats(keras_stats(src_k), torch_stats(dst), count, exact=False)
    assert_same_update(before, keras_stats(src_k), torch_stats(dst))


def fresh_settings(name: str, path: Path, count: int) -> None:
    """Built, not loaded: each counterpart BatchNorm has its source module's settings, as
    the source's checkpoint at ``path`` records them (an ``nn.BatchNorm2d``: the torch
    preset with its eps and momentum)."""
    want = {la.name: la for la in port.load(path).layers}
    got = unorm.keras.export_checkpoint(counterpart(name, 4), probe=False).layers
    norms = [la for la in got if la.kind == "batchnorm"]
    assert len(norms) == count
    for la in norms:
        spec, ref = la.attrs["spec"], want[la.name].attrs["spec"]
        # The feature axis is each framework's own layout (channels-last in Keras).
        assert {**spec, "axis": None} == {**ref, "axis": None}, la.name


def wrong_padding_refused(
    name: str, path: Path, monkeypatch: pytest.MonkeyPatch, patch: tuple[str, Callable[..., Any]]
) -> None:
    """A counterpart built with symmetric padding (PyTorch's habit; every shape stays)
    computes something else: the verified load of the source's file refuses it, naming
    where it diverges, and leaves the model as it was."""
    from unorm.models.zoo import plans

    monkeypatch.setattr(plans, *patch)
    wrong = counterpart(name, 6)
    kept = [w.numpy().copy() for w in wrong.weights]
    with pytest.raises(port.CheckpointError, match="diverges"):
        unorm.keras.load_checkpoint(wrong, port.load(path))
    for was, w in zip(kept, wrong.weights, strict=True):
        np.testing.assert_array_equal(w.numpy(), was, err_msg=w.path)
