"""preset="torch" as a true drop-in for nn.BatchNorm*d: empty batches and bias=False,
checked against PyTorch's own layers over several steps (outputs, gradients, running
statistics, counters, eval), and the canonical convention's empty batch against the NumPy
reference (SPEC.md section 2, *Empty batch*)."""

from __future__ import annotations

import numpy as np
import pytest

from unorm import reference as ref
from unorm.spec import BatchNormSpec

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from unorm.torch import BatchNorm, convert, export_checkpoint, load_checkpoint  # noqa: E402

NATIVE = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _batches(ndim: int, seed: int) -> list[torch.Tensor]:
    """Training batches with empty ones in between (no samples, or no spatial extent)."""
    gen = torch.Generator().manual_seed(seed)
    spatial = (3,) * (ndim - 2)
    empty_space = (0,) * (ndim - 2) if ndim > 2 else ()
    shapes = [(4, 3, *spatial), (0, 3, *spatial), (5, 3, *spatial), (0, 3, *spatial)]
    if empty_space:
        shapes.append((2, 3, *empty_space))
    shapes.append((3, 3, *spatial))
    return [torch.randn(s, generator=gen, dtype=torch.float64) * 2 + 1 for s in shapes]


def _step(layer: nn.Module, x: torch.Tensor, dy_seed: int) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=y.dtype)
    (y * dy).sum().backward()
    grads = tuple(
        torch.zeros(3, dtype=x.dtype) if p.grad is None else p.grad.clone()
        for p in (layer.weight, layer.bias)
        if p is not None
    )
    for p in layer.parameters():
        p.grad = None
    assert x.grad is not None
    return (y.detach(), x.grad, *grads)


def _state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bias", [True, False])
def test_preset_torch_matches_the_native_layer(
    ndim: int, momentum: float | None, bias: bool
) -> None:
    native = NATIVE[ndim](3, momentum=momentum, bias=bias).double()
    ours = BatchNorm(3, num_dims=ndim, momentum=momentum, bias=bias, preset="torch").double()
    ours.load_state_dict(native.state_dict())  # same keys: no 'bias' with bias=False
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5)
        if bias:
            native.bias.uniform_(-1, 1)
    ours.load_state_dict(native.state_dict())
    for i, x in enumerate(_batches(ndim, seed=ndim)):
        got, want = _step(ours, x, i), _step(native, x, i)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        mine, theirs = _state(ours), _state(native)
        assert mine.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-12, atol=0, msg=key)
    ours.eval()
    native.eval()
    for x in _batches(ndim, seed=9)[:2]:  # a batch and an empty one in eval
        torch.testing.assert_close(ours(x), native(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 4])
@pytest.mark.parametrize(
    "preset", [None, "keras", "mxnet"], ids=["canonical", "keras-preset", "mxnet-preset"]
)
def test_an_empty_batch_against_the_reference(ndim: int, preset: str | None) -> None:
    layer = BatchNorm(3, num_dims=ndim, preset=preset).double()
    spec = BatchNormSpec.from_preset(preset, axis=1)
    layer(torch.randn(4, 3, *(2,) * (ndim - 2), dtype=torch.float64))  # one real batch
    assert layer.running_mean is not None and layer.running_var is not None
    before = ref.RunningStats(
        layer.running_mean.numpy().copy(),
        layer.running_var.numpy().copy(),
        int(layer.num_batches_tracked),  # type: ignore[arg-type]
    )
    x = torch.zeros((0, 3, *(2,) * (ndim - 2)), dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    _, after = ref.batch_norm_step(x.detach().numpy(), before, spec, training=True)
    assert after is not None
    np.testing.assert_array_equal(layer.weight.grad.numpy(), np.zeros(3))  # type: ignore[union-attr]
    np.testing.assert_array_equal(layer.bias.grad.numpy(), np.zeros(3))  # type: ignore[union-attr]
    np.testing.assert_array_equal(layer.running_mean.numpy(), after.mean)
    np.testing.assert_array_equal(layer.running_var.numpy(), after.var)
    assert int(layer.num_batches_tracked) == after.num_batches_tracked  # type: ignore[arg-type]
    if preset is None:  # nothing to learn from: nothing changed, the counter included
        assert after == before
    else:  # Keras's and Gluon's layers average in the mean of nothing
        assert np.isnan(after.mean).all()


def test_an_empty_batch_in_16_bit_keeps_float32_state() -> None:
    layer = BatchNorm(3, num_dims=4, dtype=torch.float16)
    y = layer(torch.zeros((0, 3, 2, 2), dtype=torch.float16))
    assert y.dtype == torch.float16 and y.shape == (0, 3, 2, 2)
    assert layer.running_mean is not None and layer.running_mean.dtype == torch.float32
    assert int(layer.num_batches_tracked) == 0  # type: ignore[arg-type]


def test_bias_false_converts_and_ports_with_its_meaning() -> None:
    native = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, bias=False)).double()
    with torch.no_grad():
        native[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    native(x)  # one training step: running statistics move
    native.eval()
    want = native(x)
    converted = convert(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, bias=False)).double())
    converted.load_state_dict(native.state_dict())
    converted.eval()
    assert converted[1].bias is None and converted[1].spec.center is False
    torch.testing.assert_close(converted(x), want, rtol=1e-12, atol=1e-12)
    ckpt = export_checkpoint(native)
    assert "beta" not in ckpt.layers[1].tensors
    assert ckpt.layers[1].attrs["spec"]["center"] is False
    target = nn.Sequential(nn.Conv2d(2, 3, 1), BatchNorm(3, bias=False, preset="torch")).double()
    load_checkpoint(target, ckpt)
    target.eval()
    torch.testing.assert_close(target(x), want, rtol=1e-12, atol=1e-12)
    # A layer with a shift cannot take a checkpoint without one: refused, nothing changed.
    shifted = nn.Sequential(nn.Conv2d(2, 3, 1), BatchNorm(3, preset="torch")).double()
    before = {k: v.clone() for k, v in shifted.state_dict().items()}
    with pytest.raises(ValueError, match="beta"):
        load_checkpoint(shifted, ckpt)
    for key, value in shifted.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bias_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="bias must be True or False, got 0"):
        BatchNorm(3, bias=0)  # type: ignore[arg-type]
