"""Layers matched along the data flow (unorm._core.flow), across frameworks: definition
and registration order never decide, parallel branches are told apart by the graph, and
the probe verifies each load against the source's own outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from unorm._core.flow import FlowError, FlowNode, match_flows

pytestmark = [pytest.mark.torch, pytest.mark.keras]
torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
nn = torch.nn
L = keras.layers

from unorm._keras.port import export_checkpoint as keras_export  # noqa: E402
from unorm._keras.port import load_checkpoint as keras_load  # noqa: E402
from unorm._torch.port import export_checkpoint as torch_export  # noqa: E402
from unorm._torch.port import load_checkpoint as torch_load  # noqa: E402
from unorm.keras import BatchNorm as KerasBN  # noqa: E402
from unorm.port import Checkpoint, CheckpointError  # noqa: E402
from unorm.torch import BatchNorm as TorchBN  # noqa: E402


class Residual(nn.Module):
    """conv -> BN -> relu -> conv -> BN, plus a 1x1 conv shortcut with its BN (both 4
    channels), added; the shortcut's modules are registered first."""

    def __init__(self) -> None:
        super().__init__()
        self.short = nn.Conv2d(3, 4, 1)
        self.short_bn = TorchBN(4)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = TorchBN(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = TorchBN(4)

    def forward(self, x: Any) -> Any:
        main = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(main + self.short_bn(self.short(x)))


def keras_residual() -> Any:
    """The same block in Keras, the main path defined first."""
    x = keras.Input((6, 6, 3))
    main = L.Conv2D(4, 3, padding="same")(x)
    main = L.ReLU()(KerasBN()(main))
    main = KerasBN()(L.Conv2D(4, 3, padding="same")(main))
    short = KerasBN()(L.Conv2D(4, 1)(x))
    return keras.Model(x, L.ReLU()(L.Add()([short, main])))


class Towers(nn.Module):
    """Two towers of equal shapes, concatenated in the order (b, a)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(5, 6), TorchBN(6))
        self.b = nn.Sequential(nn.Linear(5, 6), TorchBN(6))
        self.head = nn.Linear(12, 3)

    def forward(self, x: Any) -> Any:
        return self.head(torch.cat([self.b(x), self.a(x)], dim=1))


def keras_towers() -> Any:
    x = keras.Input((5,))
    a = KerasBN()(L.Dense(6)(x))
    b = KerasBN()(L.Dense(6)(x))
    return keras.Model(x, L.Dense(3)(L.Concatenate()([b, a])))


def _stepped(model: Any, shape: tuple[int, ...]) -> Any:
    torch.manual_seed(1)
    for p in model.parameters():
        p.data.normal_(0.0, 0.5)
    model.train()
    for _ in range(3):
        model(torch.randn(8, *shape) * 2 + 0.5)
    return model.eval()


def _torch_out(model: Any, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_a_residual_block_ports_whatever_order_its_branches_are_defined_in() -> None:
    source = _stepped(Residual(), (3, 6, 6))
    ckpt = torch_export(source, torch.zeros(1, 3, 6, 6))
    dest = keras_residual()
    keras_load(dest, ckpt)  # verified on the probe
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(np.float32)
    got = np.moveaxis(np.asarray(dest(np.moveaxis(x, 1, -1), training=False)), -1, 1)
    np.testing.assert_allclose(got, _torch_out(source, x), rtol=1e-5, atol=1e-5)
    back = Residual()
    torch_load(back, keras_export(dest))
    np.testing.assert_allclose(_torch_out(back.eval(), x), _torch_out(source, x), atol=1e-5)


def test_concatenated_towers_keep_their_concatenation_order() -> None:
    source = _stepped(Towers(), (5,))
    dest = keras_towers()
    keras_load(dest, torch_export(source, torch.zeros(1, 5)))
    x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    got = np.asarray(dest(x, training=False))
    np.testing.assert_allclose(got, _torch_out(source, x), rtol=1e-5, atol=1e-5)


def test_without_a_flow_the_order_is_used_and_the_probe_refuses_what_it_gets_wrong() -> None:
    """The same residual checkpoint with its flow removed: by order, the shortcut's 1x1
    conv meets the model's 3x3 conv and the load is refused, naming both layers."""
    ckpt = torch_export(_stepped(Residual(), (3, 6, 6)), torch.zeros(1, 3, 6, 6))
    bare = Checkpoint(ckpt.layers, ckpt.tensors, ckpt.source)
    dest = keras_residual()
    before = [w.numpy().copy() for w in dest.weights]
    with pytest.raises(CheckpointError, match="weight shape"):
        keras_load(dest, bare)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, dest.weights, strict=True))


def test_models_whose_flows_differ_are_refused() -> None:
    ckpt = torch_export(_stepped(Towers(), (5,)), torch.zeros(1, 5))
    x = keras.Input((5,))
    chain = L.Dense(3)(L.Concatenate()([KerasBN()(L.Dense(6)(x)), KerasBN()(L.Dense(6)(x))]))
    keras_load(keras.Model(x, chain), ckpt)  # the same flow, towers in the other order
    y = KerasBN()(L.Dense(6)(x))
    other = keras.Model(x, L.Dense(3)(L.Concatenate()([y, KerasBN()(L.Dense(6)(y))])))
    before = [w.numpy().copy() for w in other.weights]
    with pytest.raises(CheckpointError, match=r"weight shape \(6, 5\) in the checkpoint, \(6, 6\)"):
        keras_load(other, ckpt)  # by order, as the structures differ: the first misfit named
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, other.weights, strict=True))


def test_flow_matching_in_numbers() -> None:
    """The core alone: interchangeable branches pair consistently, an add's inputs in
    any order, a concat's in order; a different structure is a FlowError."""
    inp = FlowNode("input")
    a = [inp, FlowNode("layer", (0,), 0), FlowNode("layer", (1,), 1), FlowNode("layer", (0,), 2),
         FlowNode("layer", (3,), 3), FlowNode("concat", (2, 4))]  # fmt: skip
    b = [inp, FlowNode("layer", (0,), 0), FlowNode("layer", (1,), 1), FlowNode("layer", (0,), 2),
         FlowNode("layer", (3,), 3), FlowNode("concat", (4, 2))]  # fmt: skip
    assert match_flows(a, ["p", "q", "p", "q"], b, ["p", "q", "p", "q"]) == {0: 2, 1: 3, 2: 0, 3: 1}
    c = [inp, FlowNode("layer", (0,), 0), FlowNode("layer", (1,), 1), FlowNode("layer", (2,), 2),
         FlowNode("layer", (3,), 3)]  # fmt: skip
    with pytest.raises(FlowError, match="differ"):
        match_flows(a, ["p", "q", "p", "q"], c, ["p", "q", "p", "q"])


class FlattenInForward(nn.Module):
    """A conv whose map is flattened by ``torch.flatten`` in ``forward`` (no nn.Flatten)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = TorchBN(3)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: Any) -> Any:
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


class ViewInForward(FlattenInForward):
    """The same, flattened by ``x.view(x.size(0), -1)``."""

    def forward(self, x: Any) -> Any:
        return self.fc(torch.relu(self.bn(self.conv(x))).view(x.size(0), -1))


@pytest.mark.parametrize("model", [FlattenInForward, ViewInForward])
def test_a_flatten_written_in_forward_ports_to_a_channels_last_framework(model: Any) -> None:
    source = model()
    source = _stepped(source, (2, 6, 6))
    ckpt = torch_export(source, torch.zeros(1, 2, 6, 6))
    assert ckpt.layers[-1].attrs["flatten_from"] == [3, 4, 4]
    x = keras.Input((6, 6, 2))
    y = L.Flatten()(L.ReLU()(KerasBN()(L.Conv2D(3, 3)(x))))
    dest = keras.Model(x, L.Dense(5)(y))
    keras_load(dest, ckpt)  # verified on the probe: the Dense's rows were permuted
    batch = np.random.default_rng(2).normal(size=(2, 2, 6, 6)).astype(np.float32)
    got = np.asarray(dest(np.moveaxis(batch, 1, -1), training=False))
    np.testing.assert_allclose(got, _torch_out(source, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_and_grouped_convolutions_port_to_keras_and_back(multiplier: int) -> None:
    """torch's Conv2d(groups=C) is Keras's DepthwiseConv2D (output channel i*M + m on
    both sides), Conv2d(groups=2) Keras's Conv2D(groups=2)."""
    source = nn.Sequential(
        nn.Conv2d(4, 4 * multiplier, 3, groups=4),
        TorchBN(4 * multiplier),
        nn.Conv2d(4 * multiplier, 6, 1, groups=2),
    )
    source = _stepped(source, (4, 5, 5))
    x = keras.Input((5, 5, 4))
    y = KerasBN()(L.DepthwiseConv2D(3, depth_multiplier=multiplier)(x))
    dest = keras.Model(x, L.Conv2D(6, 1, groups=2)(y))
    keras_load(dest, torch_export(source, torch.zeros(1, 4, 5, 5)))
    batch = np.random.default_rng(3).normal(size=(2, 4, 5, 5)).astype(np.float32)
    got = np.moveaxis(np.asarray(dest(np.moveaxis(batch, 1, -1), training=False)), -1, 1)
    np.testing.assert_allclose(got, _torch_out(source, batch), rtol=1e-5, atol=1e-5)
    back = nn.Sequential(
        nn.Conv2d(4, 4 * multiplier, 3, groups=4),
        TorchBN(4 * multiplier),
        nn.Conv2d(4 * multiplier, 6, 1, groups=2),
    )
    torch_load(back, keras_export(dest))
    np.testing.assert_allclose(_torch_out(back.eval(), batch), got, rtol=1e-5, atol=1e-5)
