"""unorm.keras.ScaledStdConv1D/2D/3D against the NumPy reference of Scaled WS (SPEC.md
section 6); their errors, serialisation, AGC's view of them; the Keras NF-LeNet trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unorm import reference as ref

pytestmark = pytest.mark.keras

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from unorm.keras import ScaledStdConv1D, ScaledStdConv2D, ScaledStdConv3D  # noqa: E402

# float64 throughout: what is compared is the standardisation, not rounding.
TOL = {"rtol": 1e-9, "atol": 1e-11}
CONVS = {1: ScaledStdConv1D, 2: ScaledStdConv2D, 3: ScaledStdConv3D}
SIDE = {1: 9, 2: 7, 3: 5}  # spatial size of the inputs, per rank


def _numpy(tensor: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def _layer(
    rank: int,
    cin: int,
    cout: int,
    kernel: Any,
    groups: int,
    style: str,
    rng: np.random.Generator,
    padding: str = "same",
) -> Any:
    conv = CONVS[rank](cout, kernel, groups=groups, padding=padding, style=style, dtype="float64")
    conv.build((None, *(SIDE[rank],) * rank, cin))
    # Small weights with an offset: the mean subtraction and the styles' eps both matter.
    conv.kernel.assign(rng.normal(0.3, 0.1, conv.kernel.shape))
    conv.gain.assign(np.linspace(0.5, 2.0, cout))
    conv.bias.assign(rng.normal(size=cout))
    return conv


@pytest.mark.parametrize("style", ["deepmind", "timm"])
@pytest.mark.parametrize(
    ("rank", "kernel", "groups", "padding"),
    [
        (2, 3, 1, "same"),
        (2, 5, 1, "same"),
        (2, (1, 3), 1, "same"),
        (2, 3, 2, "same"),
        (2, (1, 3), 2, "same"),
        (1, 3, 1, "same"),
        (1, 5, 2, "same"),
        (1, 3, 1, "causal"),
        (1, 2, 2, "valid"),
        (3, 3, 1, "same"),
        (3, (1, 2, 3), 1, "valid"),
        (3, 3, 2, "same"),
    ],
)
def test_forward_and_gradients_match_reference(
    style: str, rank: int, kernel: Any, groups: int, padding: str
) -> None:
    rng = np.random.default_rng(0)
    conv = _layer(rank, 4, 6, kernel, groups, style, rng, padding)
    x = tf.constant(rng.normal(size=(2, *(SIDE[rank],) * rank, 4)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = conv(x)
        dy = tf.constant(rng.normal(size=y.shape))
        loss = tf.reduce_sum(y * dy)
    dx, dkernel, dgain = tape.gradient(loss, [x, conv.kernel, conv.gain])

    # The reference on the kernel (unit axis -1 of (*k, I/g, O)), Keras's own convolution
    # around it: what is tested is the standardisation and its gradient.
    k = conv.kernel.numpy()
    gain = conv.gain.numpy()
    w_hat = tf.Variable(ref.scaled_weight_standardize(k, gain, -1, style=style))
    x2 = tf.identity(x)
    with tf.GradientTape() as tape2:
        tape2.watch(x2)
        if padding == "causal":  # left padding by k - 1, then a valid convolution
            padded = keras.ops.pad(x2, [[0, 0], [int(kernel) - 1, 0], [0, 0]])
            y2 = keras.ops.conv(padded, w_hat, padding="valid") + conv.bias
        else:
            y2 = keras.ops.conv(x2, w_hat, padding=padding) + conv.bias
        loss2 = tf.reduce_sum(y2 * dy)
    dx2, dw_hat = tape2.gradient(loss2, [x2, w_hat])
    assert y.shape == y2.shape
    np.testing.assert_allclose(y.numpy(), y2.numpy(), **TOL)
    np.testing.assert_allclose(dx.numpy(), dx2.numpy(), **TOL)
    dk_ref, dgain_ref = ref.scaled_weight_standardize_backward(
        dw_hat.numpy(), k, gain, -1, style=style
    )
    np.testing.assert_allclose(dkernel.numpy(), dk_ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(dgain.numpy(), dgain_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("rank", "fan_in"), [(1, 9), (2, 27), (3, 81)])
def test_float32_standardised_kernel_has_the_specified_statistics(rank: int, fan_in: int) -> None:
    conv = CONVS[rank](5, 3)
    conv.build((None, *(6,) * rank, 3))
    w_hat = np.asarray(conv.standardized_kernel())
    want = ref.scaled_weight_standardize(conv.kernel.numpy(), None, -1)
    np.testing.assert_allclose(w_hat, want, rtol=1e-5, atol=1e-6)
    flat = w_hat.reshape(-1, 5)
    np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(flat.var(0), 1 / fan_in, rtol=1e-4)


@pytest.mark.parametrize("rank", [1, 3])
def test_float16_kernel_is_standardised_in_float32(rank: int) -> None:
    conv = CONVS[rank](4, 3, dtype="float16")
    conv.build((None, *(6,) * rank, 2))
    # A large offset: its variance in float16 arithmetic would be rounding noise.
    k = np.random.default_rng(1).normal(40.0, 0.05, conv.kernel.shape).astype("float16")
    conv.kernel.assign(k)
    w_hat = conv.standardized_kernel()
    assert keras.backend.standardize_dtype(w_hat.dtype) == "float16"
    want = ref.scaled_weight_standardize(k.astype("float64"), None, -1)
    np.testing.assert_allclose(_numpy(w_hat).astype("float64"), want, rtol=2e-3, atol=2e-3)
    y = conv(np.ones((1, *(6,) * rank, 2), "float16"))
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    assert np.all(np.isfinite(_numpy(y).astype("float32")))


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


@pytest.mark.parametrize("rank", [1, 3])
def test_fan_in_zero_and_bad_settings_are_named_for_every_rank(rank: int) -> None:
    cls = CONVS[rank]
    zero = (3,) * (rank - 1) + (0,)
    with pytest.raises(ValueError, match=rf"fan_in must be >= 1.*kernel_size \({zero[0]},"):
        cls(4, zero)
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*kernel_size \(0,"):
        cls(4, 0)
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*0 input channels"):
        cls(4, 2)(np.zeros((1, *(4,) * rank, 0), "float32"))
    with pytest.raises(ValueError, match=r"fan_in must be >= 1.*1 input channels in 2 group"):
        cls(4, 2, groups=2).build((None, *(4,) * rank, 1))
    with pytest.raises(ValueError, match="style must be one of 'deepmind', 'timm'"):
        cls(4, 2, style="nfnet")
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        cls(4, 2, eps=-1.0)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_styles_have_their_own_eps_and_a_given_one_wins(rank: int) -> None:
    cls = CONVS[rank]
    assert cls(4, 3).spec.eps == 1e-4
    assert cls(4, 3, style="timm").spec.eps == 1e-5
    assert cls(4, 3, style="timm", eps=0.0).spec.eps == 0.0


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_config_and_saved_model_round_trip(tmp_path: Path, rank: int) -> None:
    cls = CONVS[rank]
    shape = (*(6,) * rank, 2)
    model = keras.Sequential([keras.Input(shape), cls(4, 3, groups=2, style="timm", gain_init=0.5)])
    model.layers[0].gain.assign(np.arange(1.0, 5.0, dtype="float32"))
    x = np.random.default_rng(0).normal(size=(1, *shape)).astype("float32")
    path = tmp_path / "ws.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.layers[0]
    assert type(layer) is cls
    assert layer.get_config() == model.layers[0].get_config()
    assert layer.spec == model.layers[0].spec and layer.gain_init == 0.5
    np.testing.assert_array_equal(layer.gain.numpy(), [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    weights = tmp_path / "ws.weights.h5"
    model.save_weights(weights)
    fresh = keras.Sequential([keras.Input(shape), cls(4, 3, groups=2, style="timm")])
    fresh.load_weights(weights)
    np.testing.assert_array_equal(fresh.layers[0].gain.numpy(), [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(fresh(x).numpy(), model(x).numpy())


def test_causal_padding_survives_the_config() -> None:
    conv = ScaledStdConv1D(3, 4, padding="causal", dilation_rate=2, style="timm")
    copy = ScaledStdConv1D.from_config(conv.get_config())
    x = np.random.default_rng(2).normal(size=(2, 10, 2)).astype("float32")
    y = conv(x)
    copy(x)
    copy.set_weights(conv.get_weights())
    assert tuple(y.shape) == (2, 10, 3)
    np.testing.assert_array_equal(_numpy(copy(x)), _numpy(y))
    # Causal: the first output depends on the first input step only.
    moved = x.copy()
    moved[:, 1:] += 1.0
    np.testing.assert_allclose(_numpy(conv(moved))[:, 0], _numpy(y)[:, 0], atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_agc_clips_the_kernel_per_output_channel_and_the_gain_as_one_unit(rank: int) -> None:
    from unorm.keras import unit_axes_of

    conv = CONVS[rank](4, 3)
    conv.build((None, *(5,) * rank, 2))
    axes = unit_axes_of(conv)
    assert axes[conv.kernel.path] == rank + 1  # (*k, I/g, O): O is the last axis
    assert conv.gain.path not in axes  # rank 1: one unit
    assert len(conv.kernel.shape) == rank + 2


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
