"""unorm.keras.ScaledStdConv2D against the NumPy reference of Scaled WS (SPEC.md section
6); its errors, serialisation, AGC's view of it; the Keras NF-LeNet trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unorm import reference as ref

pytestmark = pytest.mark.keras

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from unorm.keras import ScaledStdConv2D  # noqa: E402

# float64 throughout: what is compared is the standardisation, not rounding.
TOL = {"rtol": 1e-9, "atol": 1e-11}


def _layer(
    cin: int, cout: int, kernel: Any, groups: int, style: str, rng: np.random.Generator
) -> Any:
    conv = ScaledStdConv2D(
        cout, kernel, groups=groups, padding="same", style=style, dtype="float64"
    )
    conv.build((None, 7, 7, cin))
    # Small weights with an offset: the mean subtraction and the styles' eps both matter.
    conv.kernel.assign(rng.normal(0.3, 0.1, conv.kernel.shape))
    conv.gain.assign(np.linspace(0.5, 2.0, cout))
    conv.bias.assign(rng.normal(size=cout))
    return conv


@pytest.mark.parametrize("style", ["deepmind", "timm"])
@pytest.mark.parametrize(("kernel", "groups"), [(3, 1), (5, 1), ((1, 3), 1), (3, 2), ((1, 3), 2)])
def test_forward_and_gradients_match_reference(style: str, kernel: Any, groups: int) -> None:
    rng = np.random.default_rng(0)
    conv = _layer(4, 6, kernel, groups, style, rng)
    x = tf.constant(rng.normal(size=(2, 7, 7, 4)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = conv(x)
        dy = tf.constant(rng.normal(size=y.shape))
        loss = tf.reduce_sum(y * dy)
    dx, dkernel, dgain = tape.gradient(loss, [x, conv.kernel, conv.gain])

    # The reference on the kernel (unit axis -1 of HWIO), Keras's own convolution around
    # it: what is tested is the standardisation and its gradient.
    k = conv.kernel.numpy()
    gain = conv.gain.numpy()
    w_hat = tf.Variable(ref.scaled_weight_standardize(k, gain, -1, style=style))
    x2 = tf.identity(x)
    with tf.GradientTape() as tape2:
        tape2.watch(x2)
        y2 = keras.ops.conv(x2, w_hat, padding="same") + conv.bias
        loss2 = tf.reduce_sum(y2 * dy)
    dx2, dw_hat = tape2.gradient(loss2, [x2, w_hat])
    np.testing.assert_allclose(y.numpy(), y2.numpy(), **TOL)
    np.testing.assert_allclose(dx.numpy(), dx2.numpy(), **TOL)
    dk_ref, dgain_ref = ref.scaled_weight_standardize_backward(
        dw_hat.numpy(), k, gain, -1, style=style
    )
    np.testing.assert_allclose(dkernel.numpy(), dk_ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(dgain.numpy(), dgain_ref, rtol=1e-8, atol=1e-10)


def test_float32_standardised_kernel_has_the_specified_statistics() -> None:
    conv = ScaledStdConv2D(5, 3)
    conv.build((None, 6, 6, 3))
    w_hat = np.asarray(conv.standardized_kernel())
    want = ref.scaled_weight_standardize(conv.kernel.numpy(), None, -1)
    np.testing.assert_allclose(w_hat, want, rtol=1e-5, atol=1e-6)
    flat = w_hat.reshape(-1, 5)
    np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(flat.var(0), 1 / 27, rtol=1e-4)


def test_bad_sizes_and_settings_are_named() -> None:
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*kernel_size \(0, 3\)"):
        ScaledStdConv2D(4, (0, 3))
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*0 input channels"):
        ScaledStdConv2D(4, 3)(np.zeros((1, 5, 5, 0), "float32"))
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*1 input channels in 2 group"):
        ScaledStdConv2D(4, 3, groups=2).build((None, 5, 5, 1))
    with pytest.raises(ValueError, match="style must be one of 'deepmind', 'timm'"):
        ScaledStdConv2D(4, 3, style="nfnet")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        ScaledStdConv2D(4, 3, eps=-1.0)


def test_styles_have_their_own_eps_and_a_given_one_wins() -> None:
    assert ScaledStdConv2D(4, 3).spec.eps == 1e-4
    assert ScaledStdConv2D(4, 3, style="timm").spec.eps == 1e-5
    assert ScaledStdConv2D(4, 3, style="timm", eps=0.0).spec.eps == 0.0


def test_config_and_saved_model_round_trip(tmp_path: Path) -> None:
    model = keras.Sequential(
        [keras.Input((6, 6, 2)), ScaledStdConv2D(4, 3, groups=2, style="timm", gain_init=0.5)]
    )
    model.layers[0].gain.assign(np.arange(1.0, 5.0, dtype="float32"))
    x = np.random.default_rng(0).normal(size=(1, 6, 6, 2)).astype("float32")
    path = tmp_path / "ws.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.layers[0]
    assert isinstance(layer, ScaledStdConv2D)
    assert layer.spec == model.layers[0].spec and layer.gain_init == 0.5
    np.testing.assert_array_equal(layer.gain.numpy(), [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    weights = tmp_path / "ws.weights.h5"
    model.save_weights(weights)
    fresh = keras.Sequential(
        [keras.Input((6, 6, 2)), ScaledStdConv2D(4, 3, groups=2, style="timm")]
    )
    fresh.load_weights(weights)
    np.testing.assert_array_equal(fresh(x).numpy(), model(x).numpy())


def test_agc_clips_the_kernel_per_output_channel_and_the_gain_as_one_unit() -> None:
    from unorm.keras import unit_axes_of

    conv = ScaledStdConv2D(4, 3)
    conv.build((None, 5, 5, 2))
    axes = unit_axes_of(conv)
    assert axes[conv.kernel.path] == 3  # HWIO: O is the last axis
    assert conv.gain.path not in axes  # rank 1: one unit


def test_nf_lenet_trains_in_seconds() -> None:
    from unorm.models import digits
    from unorm.models.keras import lenet, lenet_nf, train
    from unorm.models.training import Recipe

    data = digits()
    keras.utils.set_random_seed(0)
    losses = train(lenet_nf(), data.train_x, data.train_y, Recipe(steps=20, agc=True))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < losses[0]
    # The plain LeNet, its baseline, is built from the same layer names.
    names = [layer.name for layer in lenet().layers if layer.weights]
    assert names == [layer.name for layer in lenet_nf().layers if layer.weights]
