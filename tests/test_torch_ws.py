"""ScaledStdConv*d against the NumPy reference of Scaled WS; the NF-LeNet trains."""

from __future__ import annotations

import numpy as np
import pytest

from unorm import reference as ref

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from unorm.torch import ScaledStdConv1d, ScaledStdConv2d, ScaledStdConv3d  # noqa: E402


@pytest.mark.parametrize("style", ["deepmind", "timm"])
@pytest.mark.parametrize(("kernel", "groups"), [(3, 1), (5, 1), ((1, 3), 2), (3, 2)])
def test_forward_and_gradients_match_reference(style: str, kernel: object, groups: int) -> None:
    torch.manual_seed(0)
    conv = ScaledStdConv2d(4, 6, kernel, groups=groups, padding=1, style=style).double()
    with torch.no_grad():
        conv.gain.copy_(torch.linspace(0.5, 2.0, 6))
        conv.weight.mul_(0.1)  # small weights: where the two styles' eps handling differs
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = conv.weight.detach().numpy()
    gain = conv.gain.detach().numpy()
    w_hat = torch.tensor(ref.scaled_weight_standardize(w, gain, 0, style=style), requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y2 = F.conv2d(x2, w_hat, conv.bias.detach(), padding=1, groups=groups)
    y2.backward(dy)  # the convolution itself is PyTorch's: what is tested is the WS
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    dw, dgain = ref.scaled_weight_standardize_backward(w_hat.grad.numpy(), w, gain, 0, style=style)
    np.testing.assert_allclose(conv.weight.grad.numpy(), dw, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(conv.gain.grad.numpy(), dgain, rtol=1e-8, atol=1e-10)


def test_all_ranks_and_float32() -> None:
    for cls, shape in ((ScaledStdConv1d, (2, 3, 8)), (ScaledStdConv3d, (1, 3, 4, 4, 4))):
        conv = cls(3, 5, 3)
        w_hat = conv.standardized_weight().detach().numpy()
        want = ref.scaled_weight_standardize(conv.weight.detach().numpy(), None, 0)
        np.testing.assert_allclose(w_hat, want, rtol=1e-5, atol=1e-6)
        assert conv(torch.randn(shape)).shape[1] == 5


def test_bad_settings_and_sizes_are_named() -> None:
    with pytest.raises(ValueError, match="fan_in must be >= 1"):
        ScaledStdConv2d(0, 4, 3)
    with pytest.raises(ValueError, match="style must be one of 'deepmind', 'timm'"):
        ScaledStdConv2d(3, 4, 3, style="nfnet")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        ScaledStdConv2d(3, 4, 3, eps=-1.0)


def test_nf_lenet_trains_in_seconds() -> None:
    from unorm.models import digits
    from unorm.models.torch import lenet_nf, train
    from unorm.models.training import Recipe

    data = digits()
    torch.manual_seed(0)
    losses = train(lenet_nf(), data.train_x, data.train_y, Recipe(steps=30, lr=0.1, clipping=0.1))
    assert np.mean(losses[-5:]) < 0.8 * losses[0]


def test_agc_clips_scaled_ws_weights_per_channel_and_the_gain_as_one_unit() -> None:
    from unorm.torch import adaptive_clip_grad_

    conv = ScaledStdConv2d(3, 4, 3).double()
    grads = {n: torch.randn_like(p) for n, p in conv.named_parameters()}
    weights = {n: p.detach().numpy().copy() for n, p in conv.named_parameters()}
    for name, p in conv.named_parameters():
        p.grad = grads[name].clone()
    adaptive_clip_grad_(conv, clipping=0.01)
    want = ref.agc_clip_all(
        {n: g.numpy() for n, g in grads.items()}, weights, {"weight": 0}, clipping=0.01
    )  # bias and gain (rank 1): one unit each
    for name, p in conv.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), want[name], rtol=1e-12)
