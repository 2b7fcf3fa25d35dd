"""The zoo's ResNets ported between PyTorch and Keras through a file, both ways:
``transformers``' ResNet-18 and ResNet-50 (the source, PyTorch's own ``nn.BatchNorm2d``)
and their Keras counterparts, ``keras.applications.ResNet50`` (the source, Keras's own
``BatchNormalization``) and its PyTorch counterpart.

Ground truth is the source model: its logits and its own BatchNorm layers' running
statistics, read from the layers themselves, before and after one more training step,
against the other model's. The counterparts carry the source's layer names, which pairs
the BatchNorm layers of both sides without the port's own matching.
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
pytest.importorskip("transformers")

import unorm.keras  # noqa: E402
import unorm.torch  # noqa: E402
from unorm.models import zoo  # noqa: E402
from unorm.models.zoo import training_keras, training_torch  # noqa: E402
from unorm.models.zoo.data import batch  # noqa: E402

SIZE = 64
#: model -> (source framework, counterpart framework, BatchNorm layers).
CASES = {
    "resnet18": ("torch", "keras", 20),  # stem + 8 blocks x 2 + 3 shortcuts
    "resnet50": ("torch", "keras", 53),  # stem + 16 blocks x 3 + 4 shortcuts
    "keras_resnet50": ("keras", "torch", 53),
}
Stats = dict[str, tuple[np.ndarray, np.ndarray]]


def _build(name: str, framework: str, seed: int) -> Any:
    if framework == "torch":
        torch.manual_seed(seed)
    else:
        keras.utils.set_random_seed(seed)
    return zoo.build(name, framework, image_size=SIZE)


def _training(framework: str) -> Any:
    return training_torch if framework == "torch" else training_keras


def _stats(framework: str, model: Any) -> Stats:
    """Every BatchNorm's running mean and variance, by layer name, read from the layers
    (PyTorch's or Keras's own, or unorm's)."""
    if framework == "torch":
        return {
            name: (m.running_mean.numpy().copy(), m.running_var.numpy().copy())
            for name, m in model.named_modules()
            if isinstance(m, (torch.nn.BatchNorm2d, unorm.torch.BatchNorm))
        }
    return {
        la.name: (np.array(la.moving_mean.numpy()), np.array(la.moving_variance.numpy()))
        for la in model.layers
        if isinstance(la, (keras.layers.BatchNormalization, unorm.keras.BatchNorm))
    }


def _export(framework: str, model: Any, x: np.ndarray | None) -> port.Checkpoint:
    """``model``'s checkpoint; with ``x``, carrying a probe (Keras's always can)."""
    if framework == "torch":
        return unorm.torch.export_checkpoint(model, None if x is None else torch.from_numpy(x))
    return unorm.keras.export_checkpoint(model, probe=x is not None)


def _load(framework: str, model: Any, ckpt: port.Checkpoint) -> None:
    if framework == "torch":
        unorm.torch.load_checkpoint(model, ckpt)
    else:
        unorm.keras.load_checkpoint(model, ckpt)


def _relative(want: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(want - got).max() / np.abs(want).max())


def _assert_stats(want: Stats, got: Stats, count: int, exact: bool) -> None:
    assert sorted(want) == sorted(got) and len(want) == count
    for name, pair in want.items():
        for role, w, h in zip(("mean", "var"), pair, got[name], strict=True):
            if exact:
                np.testing.assert_array_equal(h, w, err_msg=f"{name} running {role}")
            else:
                # float32 forward passes of two frameworks through up to 50 layers.
                tol = 1e-4 * float(np.abs(w).max())
                np.testing.assert_allclose(h, w, rtol=1e-4, atol=tol, err_msg=f"{name} {role}")


def _assert_same_update(before: Stats, want: Stats, got: Stats) -> None:
    """The step's change of every running statistic agrees too: with Keras's momentum
    (1 - 0.99) the change is a hundredth of the value, finer than comparing values."""
    for name, old in before.items():
        for role, o, w, h in zip(("mean", "var"), old, want[name], got[name], strict=True):
            dw, dh = w.astype(np.float64) - o, h.astype(np.float64) - o
            scale = float(np.abs(dw).max())
            assert scale > 0, f"{name} running {role} did not move"
            assert np.abs(dh - dw).max() <= 2e-3 * scale + 1e-7, f"{name} running {role}"


def _port_and_step(name: str, sender: str, a: Any, receiver: str, seed: int, tmp_path: Path) -> Any:
    """Port the trained ``a`` (a ``sender`` model) to a freshly built ``receiver``
    model through a file and compare; then one more training step on the same batch in
    both and compare again. Returns the stepped receiver."""
    count = CASES[name][2]
    x, _ = batch(0, image_size=SIZE)
    path = tmp_path / f"{name}-{sender}.safetensors"
    port.save(_export(sender, a, x), path)

    b = _build(name, receiver, seed)
    _load(receiver, b, port.load(path))
    want = _training(sender).evaluate(a, x)
    assert _relative(want, _training(receiver).evaluate(b, x)) < 1e-4
    before = _stats(sender, a)
    _assert_stats(before, _stats(receiver, b), count, exact=True)

    x2, y2 = batch(seed, image_size=SIZE)
    _training(sender).train_step(a, x2, y2)
    _training(receiver).train_step(b, x2, y2)
    stepped = _stats(sender, a)
    _assert_stats(stepped, _stats(receiver, b), count, exact=False)
    _assert_same_update(before, stepped, _stats(receiver, b))
    return b


# ResNet-50 from transformers runs the bottleneck path of resnet18's code and takes a
# quarter of this file's time; the zoo check of ./dev test ports it every way.
@pytest.mark.parametrize("name", sorted(set(CASES) - {"resnet50"}))
def test_port_both_ways_through_files(name: str, tmp_path: Path) -> None:
    """The source, trained two steps, to its counterpart; then the counterpart, after a
    training step of its own, to a fresh source."""
    source, counterpart, _ = CASES[name]
    a = _build(name, source, 0)
    x, y = batch(0, image_size=SIZE)
    for _ in range(2):
        _training(source).train_step(a, x, y)
    b = _port_and_step(name, source, a, counterpart, 1, tmp_path)
    _port_and_step(name, counterpart, b, source, 2, tmp_path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fresh_counterpart_has_the_source_batchnorm_settings(name: str) -> None:
    """Built, not loaded: every BatchNorm of the counterpart already trains as the
    source's own layer (its framework's semantics, eps and momentum); only the feature
    axis is each framework's own."""
    source, counterpart, count = CASES[name]
    want = {la.name: la for la in _export(source, _build(name, source, 0), None).layers}
    got = {la.name: la for la in _export(counterpart, _build(name, counterpart, 0), None).layers}
    assert sorted(want) == sorted(got)
    specs = [
        (w.attrs["spec"], got[n].attrs["spec"]) for n, w in want.items() if w.kind == "batchnorm"
    ]
    assert len(specs) == count
    for w, g in specs:
        assert {k: v for k, v in g.items() if k != "axis"} == {
            k: v for k, v in w.items() if k != "axis"
        }


def _tf_padded_pool(model: Any, pad_name: str) -> Any:
    """``model`` with the zero padding before its stem's max pooling moved to
    TensorFlow's "same" place (one row and column after, none before): every shape
    stays, the windows move by one."""

    def clone(layer: Any) -> Any:
        if layer.name == pad_name:
            return keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name=pad_name)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)


def test_a_wrong_padding_in_the_keras_counterpart_is_refused() -> None:
    """A Keras ResNet-18 whose stem pads as TensorFlow's "same" would: the verified load
    names the first layer after the pooling and changes nothing."""
    source = _build("resnet18", "torch", 5)
    x, _ = batch(5, image_size=SIZE)
    ckpt = unorm.torch.export_checkpoint(source, torch.from_numpy(x))

    keras.utils.set_random_seed(6)
    target = _tf_padded_pool(zoo.build("resnet18", "keras"), "resnet.embedder.pooler.padding")
    kept = [w.numpy().copy() for w in target.weights]
    first = r"'resnet\.encoder\.stages\.0\.layers\.0\.layer\.0\.convolution'"
    with pytest.raises(port.CheckpointError, match=rf"probe.*diverges.*{first}"):
        unorm.keras.load_checkpoint(target, ckpt)
    for weight, value in zip(target.weights, kept, strict=True):
        np.testing.assert_array_equal(weight.numpy(), value)


def test_a_wrong_padding_in_the_torch_counterpart_is_refused() -> None:
    """The PyTorch counterpart of Keras's ResNet50 with the same mistake before its max
    pooling: refused, nothing changed."""
    source = _build("keras_resnet50", "keras", 7)
    ckpt = unorm.keras.export_checkpoint(source)

    target = _build("keras_resnet50", "torch", 8)
    target.pool1_pad = torch.nn.ZeroPad2d((0, 1, 0, 1))  # (left, right, top, bottom)
    kept = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(port.CheckpointError, match=r"probe.*diverges.*'conv2_block1_[01]_conv'"):
        unorm.torch.load_checkpoint(target, ckpt)
    for key, value in target.state_dict().items():
        assert torch.equal(value, kept[key]), key
