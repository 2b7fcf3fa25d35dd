"""``ScaledStdConv1d/2d/3d``: convolutions with Scaled Weight Standardisation (``SPEC.md``
section 6), for normalizer-free networks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..spec import ScaledWSSpec

__all__ = ["ScaledStdConv1d", "ScaledStdConv2d", "ScaledStdConv3d", "standardize_weight"]


def standardize_weight(weight: Tensor, gain: Tensor | None, spec: ScaledWSSpec) -> Tensor:
    """Scaled WS of a ``(O, I/groups, *kernel)`` weight, per output channel, differentiable.

    Example:
        >>> w = standardize_weight(torch.randn(4, 3, 3, 3), None, ScaledWSSpec())
        >>> bool(torch.allclose(w.flatten(1).var(1, correction=0), torch.full((4,), 1 / 27)))
        True
    """
    dims = list(range(1, weight.dim()))
    fan_in = weight[0].numel()
    # Statistics in float32 at least: 16-bit weights would lose the variance.
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    var, mean = torch.var_mean(w, dim=dims, correction=0, keepdim=True)
    assert spec.eps is not None
    if spec.style == "deepmind":
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=spec.eps))
    else:
        scale = torch.rsqrt((var + spec.eps) * fan_in)
    if gain is not None:
        scale = scale * gain.view(-1, *([1] * len(dims)))
    return ((w - mean) * scale).to(weight.dtype)


class _ScaledStd(nn.Module):
    """What the ``ScaledStdConv*d`` share: the gain, the settings, the forward.

    Takes the convolution's own arguments, plus ``gain_init`` (1.0: the learnable
    per-channel gain's start), ``style`` (``"deepmind"``, canonical, or ``"timm"``) and
    ``eps`` (None: the style's, 1e-4 or 1e-5); see ``SPEC.md`` section 6.
    """

    weight: Tensor
    bias: Tensor | None
    out_channels: int

    def __init__(
        self,
        *args: Any,
        gain_init: float = 1.0,
        style: str = "deepmind",
        eps: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)  # the convolution's own constructor, next in the MRO
        self.ws = ScaledWSSpec(style=style, eps=eps)  # type: ignore[arg-type]
        if self.weight[0].numel() == 0:
            raise ValueError(
                f"fan_in must be >= 1 for Scaled Weight Standardisation, got weight shape "
                f"{tuple(self.weight.shape)} (a zero-size kernel or no input channels)"
            )
        start = torch.full(
            (self.out_channels,),
            float(gain_init),
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        self.gain = nn.Parameter(start)

    def standardized_weight(self) -> Tensor:
        """The weight this layer convolves with: Scaled WS of ``weight`` times ``gain``."""
        return standardize_weight(self.weight, self.gain, self.ws)

    def forward(self, x: Tensor) -> Tensor:
        """Convolve ``x`` with :meth:`standardized_weight` (recomputed every call, so the
        gradient reaches ``weight`` and ``gain``) and ``bias``."""
        out: Tensor = self._conv_forward(x, self.standardized_weight(), self.bias)  # type: ignore[operator]
        return out


class ScaledStdConv1d(_ScaledStd, nn.Conv1d):
    """``nn.Conv1d`` with Scaled Weight Standardisation (arguments as :class:`_ScaledStd`).

    Example:
        >>> ScaledStdConv1d(3, 8, 3)(torch.randn(2, 3, 6)).shape
        torch.Size([2, 8, 4])
    """


class ScaledStdConv2d(_ScaledStd, nn.Conv2d):
    """``nn.Conv2d`` with Scaled Weight Standardisation (arguments as :class:`_ScaledStd`).

    Example:
        >>> ScaledStdConv2d(3, 8, 3, padding=1)(torch.randn(2, 3, 6, 6)).shape
        torch.Size([2, 8, 6, 6])
    """


class ScaledStdConv3d(_ScaledStd, nn.Conv3d):
    """``nn.Conv3d`` with Scaled Weight Standardisation (arguments as :class:`_ScaledStd`).

    Example:
        >>> ScaledStdConv3d(2, 4, 2)(torch.randn(1, 2, 3, 3, 3)).shape
        torch.Size([1, 4, 2, 2, 2])
    """
