"""``ScaledStdConv``: ``nnx.Conv`` with Scaled Weight Standardisation (``SPEC.md``
section 6), for normalizer-free networks."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ..spec import ScaledWSSpec

__all__ = ["ScaledStdConv", "standardize_kernel"]


def standardize_kernel(kernel: jax.Array, gain: jax.Array | None, spec: ScaledWSSpec) -> jax.Array:
    """Scaled WS of an ``nnx.Conv`` kernel ``(*k, I/g, O)``, per output channel (the last
    axis), differentiable; statistics in float32 at least.

    Example:
        >>> k = jax.random.normal(jax.random.key(0), (3, 3, 3, 4))
        >>> w = standardize_kernel(k, None, ScaledWSSpec())
        >>> bool(jnp.allclose(w.reshape(-1, 4).var(0), 1 / 27, rtol=1e-4))
        True
    """
    axes = tuple(range(kernel.ndim - 1))
    fan_in = math.prod(kernel.shape[:-1])
    w = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
    mean = jnp.mean(w, axes, keepdims=True)
    var = jnp.mean(jnp.square(w - mean), axes, keepdims=True)
    assert spec.eps is not None
    if spec.style == "deepmind":
        scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, spec.eps))
    else:
        scale = jax.lax.rsqrt((var + spec.eps) * fan_in)
    if gain is not None:
        scale = scale * gain.astype(w.dtype)
    return ((w - mean) * scale).astype(kernel.dtype)


class ScaledStdConv(nnx.Conv):
    """``nnx.Conv`` whose kernel is Scaled-Weight-Standardised on every call, times a
    learnable per-output-channel ``gain`` (an ``nnx.Param``, ``gain_init`` 1.0).

    Takes ``nnx.Conv``'s arguments, plus ``gain_init``, ``style`` (``"deepmind"``,
    canonical: ``rsqrt(max(var * fan_in, eps))``; or ``"timm"``) and ``eps`` (None: the
    style's, 1e-4 or 1e-5). Kernel ``(*k, I/g, O)``, statistics per output channel over
    ``fan_in = prod(k) * I/g`` values.

    Example:
        >>> conv = ScaledStdConv(3, 8, (3, 3), rngs=nnx.Rngs(0))
        >>> conv(jnp.ones((2, 6, 6, 3))).shape
        (2, 6, 6, 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tuple[int, ...],
        *,
        gain_init: float = 1.0,
        style: str = "deepmind",
        eps: float | None = None,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ) -> None:
        sizes = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
        groups = int(kwargs.get("feature_group_count", 1))
        if math.prod(sizes) * (in_features // max(groups, 1)) < 1:
            raise ValueError(
                "fan_in must be >= 1 for Scaled Weight Standardisation, got kernel_size "
                f"{kernel_size!r} and {in_features} input features (groups {groups})"
            )
        super().__init__(in_features, out_features, kernel_size, rngs=rngs, **kwargs)
        self.ws = ScaledWSSpec(style=style, eps=eps)  # type: ignore[arg-type]
        self.gain = nnx.Param(jnp.full((out_features,), gain_init, self.param_dtype))

    def standardized_kernel(self) -> jax.Array:
        """The kernel this layer convolves with: Scaled WS of ``kernel`` times ``gain``."""
        return standardize_kernel(self.kernel[...], self.gain[...], self.ws)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """Convolve ``inputs`` with :meth:`standardized_kernel` (recomputed every call)."""
        raw = self.kernel[...]
        self.kernel[...] = self.standardized_kernel()
        try:
            out: jax.Array = super().__call__(inputs, out_sharding=out_sharding)
        finally:
            self.kernel[...] = raw
        return out
