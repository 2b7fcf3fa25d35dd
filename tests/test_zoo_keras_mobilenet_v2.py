"""The zoo's ``keras_mobilenet_v2``: ``keras.applications.MobileNetV2`` (the source, Keras's
own layers) ported to its PyTorch counterpart through a file and back.

Ground truth is Keras's model: its logits and its ``BatchNormalization`` layers' moving
statistics, before and after one more training step, against the PyTorch model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unorm import port

pytestmark = [pytest.mark.keras, pytest.mark.torch]
keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")

import unorm.keras  # noqa: E402
import unorm.torch  # noqa: E402
from unorm.models import zoo  # noqa: E402
from unorm.models.zoo import training_keras, training_torch  # noqa: E402
from unorm.models.zoo.data import batch  # noqa: E402

NAME = "keras_mobilenet_v2"
SIZE = 64


def _source(seed: int) -> Any:
    keras.utils.set_random_seed(seed)
    return zoo.build(NAME, "keras", image_size=SIZE)


def _calibrated_source(seed: int, x: np.ndarray) -> Any:
    """The source with the moving statistics of one training pass on ``x``: Keras's own
    update with momentum 0 for that call (with Keras's 0.999 a few steps leave them at
    mean 0, variance 1, where the eval-mode logits hardly depend on the input)."""
    source = _source(seed)
    norms = [la for la in source.layers if isinstance(la, keras.layers.BatchNormalization)]
    for la in norms:
        la.momentum = 0.0
    source(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), training=True)
    for la in norms:
        la.momentum = 0.999
    return source


def _counterpart(seed: int) -> Any:
    torch.manual_seed(seed)
    return zoo.build(NAME, "torch", image_size=SIZE)


def _keras_stats(model: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Keras's own moving statistics, BatchNormalization layers in creation order."""
    return [
        (la.moving_mean.numpy(), la.moving_variance.numpy())
        for la in model.layers
        if isinstance(la, keras.layers.BatchNormalization)
    ]


def _torch_stats(model: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """The counterpart's running statistics, its BatchNorms in creation order (Keras's)."""
    return [
        (m.running_mean.numpy().copy(), m.running_var.numpy().copy())
        for m in model.modules()
        if isinstance(m, unorm.torch.BatchNorm)
    ]


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def _assert_stats_equal(
    expected: list[tuple[np.ndarray, np.ndarray]],
    got: list[tuple[np.ndarray, np.ndarray]],
    exact: bool,
) -> None:
    assert len(expected) == len(got) == 52  # 1 stem + 16 blocks x 3 + block 0 x 2 + 1 head
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        for w, h in zip(want, have, strict=True):
            assert w.shape == h.shape, i
            if exact:
                np.testing.assert_array_equal(h, w, err_msg=f"BatchNorm {i}")
            else:
                np.testing.assert_allclose(h, w, rtol=1e-5, atol=1e-6, err_msg=f"BatchNorm {i}")


def _assert_same_update(
    before: list[tuple[np.ndarray, np.ndarray]],
    expected: list[tuple[np.ndarray, np.ndarray]],
    got: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    """The step's change of every running statistic agrees too (with Keras's momentum
    0.999 it is a thousandth of the value, below what comparing the values resolves)."""
    for i, (old, want, have) in enumerate(zip(before, expected, got, strict=True)):
        for o, w, h in zip(old, want, have, strict=True):
            dw, dh = w.astype(np.float64) - o, h.astype(np.float64) - o
            # float32 values of about 1 change by about 1e-3: ~1e-4 relative rounding.
            scale = np.abs(dw).max()
            assert scale > 0, f"BatchNorm {i} did not move"
            assert np.abs(dh - dw).max() <= 2e-3 * scale + 1e-7, f"BatchNorm {i}"


def test_keras_to_torch_through_a_file(tmp_path: Path) -> None:
    x, y = batch(0, image_size=SIZE)
    source = _calibrated_source(0, x)
    for _ in range(2):
        training_keras.train_step(source, x, y)
    path = tmp_path / "keras_mobilenet_v2.safetensors"
    port.save(unorm.keras.export_checkpoint(source), path)

    target = _counterpart(1)
    unorm.torch.load_checkpoint(target, port.load(path))
    want = training_keras.evaluate(source, x)
    assert _relative(want, training_torch.evaluate(target, x)) < 1e-4
    before = _keras_stats(source)
    _assert_stats_equal(before, _torch_stats(target), exact=True)

    x2, y2 = batch(1, image_size=SIZE)
    training_keras.train_step(source, x2, y2)
    training_torch.train_step(target, x2, y2)
    _assert_stats_equal(_keras_stats(source), _torch_stats(target), exact=False)
    _assert_same_update(before, _keras_stats(source), _torch_stats(target))


def test_torch_to_keras_through_a_file(tmp_path: Path) -> None:
    counterpart = _counterpart(2)
    x, y = batch(2, image_size=SIZE)
    # Non-trivial statistics to start from, as for the source above.
    unorm.torch.recalibrate(counterpart, [torch.from_numpy(x)])
    for _ in range(2):
        training_torch.train_step(counterpart, x, y)
    path = tmp_path / "keras_mobilenet_v2.safetensors"
    example = torch.from_numpy(x)
    port.save(unorm.torch.export_checkpoint(counterpart.eval(), example), path)

    source = _source(3)
    unorm.keras.load_checkpoint(source, port.load(path))
    want = training_torch.evaluate(counterpart, x)
    assert _relative(want, training_keras.evaluate(source, x)) < 1e-4
    before = _torch_stats(counterpart)
    _assert_stats_equal(before, _keras_stats(source), exact=True)

    x2, y2 = batch(3, image_size=SIZE)
    training_torch.train_step(counterpart, x2, y2)
    training_keras.train_step(source, x2, y2)
    _assert_stats_equal(_torch_stats(counterpart), _keras_stats(source), exact=False)
    _assert_same_update(before, _torch_stats(counterpart), _keras_stats(source))


def test_fresh_counterpart_has_keras_batchnorm_settings() -> None:
    """Built, not loaded: every BatchNorm already trains as Keras's layer of MobileNetV2."""
    want = unorm.keras.export_checkpoint(_source(4), probe=False)
    got = unorm.torch.export_checkpoint(_counterpart(4))
    pairs = [
        (w, g)
        for w, g in zip(want.layers, got.layers, strict=True)
        if w.kind == g.kind == "batchnorm"
    ]
    assert len(pairs) == 52
    for w, g in pairs:
        # The feature axis is each framework's own layout (channels-first here).
        assert {**g.attrs["spec"], "axis": None} == {**w.attrs["spec"], "axis": None}


def test_a_wrong_padding_is_refused_by_the_probe() -> None:
    """Symmetric padding in the stem (PyTorch's habit) keeps every shape and computes
    something else: the verified load names the stem and changes nothing."""
    x, y = batch(5, image_size=SIZE)
    source = _calibrated_source(5, x)
    training_keras.train_step(source, x, y)
    ckpt = unorm.keras.export_checkpoint(source)

    target = _counterpart(6)
    target.pad = torch.nn.ZeroPad2d(1)  # TensorFlow's "same" puts (0, 1) on a side of 64
    kept = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(port.CheckpointError) as refused:
        unorm.torch.load_checkpoint(target, ckpt)
    assert "first layer whose output diverges is layer 0: checkpoint conv 'Conv1'" in str(
        refused.value
    )
    for key, value in target.state_dict().items():
        assert torch.equal(value, kept[key]), key
