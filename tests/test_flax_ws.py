"""unorm.flax.ScaledStdConv against the NumPy reference of Scaled WS (SPEC.md section 6)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.flax

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")

from unorm import reference as ref  # noqa: E402
from unorm.flax import ScaledStdConv, agc, unit_axes_of  # noqa: E402


@pytest.mark.parametrize(("style", "groups"), [("deepmind", 1), ("timm", 1), ("deepmind", 2)])
def test_the_convolved_kernel_is_the_reference_and_gradients_flow(style: str, groups: int) -> None:
    conv = ScaledStdConv(4, 6, (3, 3), style=style, feature_group_count=groups, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    conv.gain[...] = jnp.asarray(rng.uniform(0.5, 1.5, 6).astype(np.float32))
    kernel, gain = np.asarray(conv.kernel[...]), np.asarray(conv.gain[...])
    want = ref.scaled_weight_standardize(kernel.astype(np.float64), gain, -1, style=style)
    np.testing.assert_allclose(conv.standardized_kernel(), want, rtol=1e-5, atol=1e-6)
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 4)).astype(np.float32))
    plain = nnx.Conv(4, 6, (3, 3), feature_group_count=groups, rngs=nnx.Rngs(0))
    plain.kernel[...] = jnp.asarray(want.astype(np.float32))
    plain.bias[...] = conv.bias[...]
    np.testing.assert_allclose(nnx.jit(lambda m, v: m(v))(conv, x), plain(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(conv.kernel[...], kernel)  # the raw kernel is kept
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(conv)
    # d loss / d W_hat from the plain convolution, through the reference's backward.
    dw_hat = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(plain)["kernel"][...]
    back = ref.scaled_weight_standardize_backward(
        np.asarray(dw_hat, np.float64), kernel.astype(np.float64), gain, -1, style=style
    )
    np.testing.assert_allclose(grads["kernel"][...], back[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(grads["gain"][...], back[1], rtol=1e-3, atol=1e-4)


def test_agc_clips_its_kernel_per_output_channel() -> None:
    conv = ScaledStdConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    assert unit_axes_of(conv) == {"kernel": 3}
    assert agc(conv) is not None


def test_zero_fan_in_is_refused() -> None:
    with pytest.raises(ValueError, match="fan_in must be >= 1"):
        ScaledStdConv(0, 4, (3, 3), rngs=nnx.Rngs(0))
