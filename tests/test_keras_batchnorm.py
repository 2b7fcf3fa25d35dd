"""unorm.keras.BatchNorm against the NumPy reference and against Keras's own layer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from unorm import reference as ref
from unorm.spec import BatchNormSpec

pytestmark = pytest.mark.keras

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from unorm.keras import BatchNorm  # noqa: E402

# Per compute dtype: (atol, rtol) for outputs and input gradients. Outputs are O(1);
# float32 differs from the float64 reference by rounding only, 16-bit outputs by a
# couple of their own ulps (float16 ~1e-3, bfloat16 ~8e-3 relative).
TOL = {"float32": (2e-5, 2e-5), "float16": (4e-3, 4e-3), "bfloat16": (3e-2, 3e-2)}
STATE_TOL = (1e-6, 1e-5)  # moving statistics are float32 in every case


def _batch(rng: np.random.Generator, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Per-feature offsets and scales, so that features differ."""
    channels = shape[axis]
    loc = rng.uniform(-2.0, 2.0, channels)
    scale = rng.uniform(0.5, 3.0, channels)
    bshape = [1] * len(shape)
    bshape[axis] = channels
    x = rng.standard_normal(shape) * scale.reshape(bshape) + loc.reshape(bshape)
    return x.astype(np.float32)


def _train_call(layer: Any, x: Any, dy: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """One training call; returns y and the gradients of sum(y * dy) w.r.t. x and the
    layer's trainable weights."""
    xt = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
    grads = tape.gradient(loss, [xt, *layer.trainable_weights])
    return y.numpy(), [None if g is None else g.numpy() for g in grads]


def _set_affine(layer: Any, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    channels = layer.moving_mean.shape[0] if layer.moving_mean is not None else None
    channels = channels or layer.gamma.shape[0]
    gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, channels).astype(np.float32)
    if layer.gamma is not None:
        layer.gamma.assign(gamma)
    if layer.beta is not None:
        layer.beta.assign(beta)
    return gamma, beta


def _check_against_reference(
    spec: BatchNormSpec,
    shape: tuple[int, ...],
    *,
    dtype: str = "float32",
    seed: int = 0,
    steps: int = 5,
) -> None:
    rng = np.random.default_rng(seed)
    kwargs = {} if dtype == "float32" else {"dtype": f"mixed_{dtype}"}
    settings = {
        name: getattr(spec, name)
        for name in (
            "eps",
            "momentum",
            "center",
            "scale",
            "track_running_stats",
            "running_var",
            "skip_nonfinite",
            "allow_single_value",
        )
    }
    layer = BatchNorm(spec.axis, preset=spec.preset, **settings, **kwargs)
    layer.build(shape)
    gamma, beta = _set_affine(layer, rng)
    channels = shape[spec.axis]
    running = ref.init_running_stats(channels) if spec.track_running_stats else None
    atol, rtol = TOL[dtype]
    for _ in range(steps):
        x32 = _batch(rng, shape, spec.axis)
        x = x32 if dtype == "float32" else tf.cast(x32, dtype)
        x_in = np.asarray(tf.cast(x, "float64")) if dtype == "bfloat16" else np.asarray(x)
        dy = rng.standard_normal(shape).astype(np.float32)
        y, grads = _train_call(layer, x, dy)
        y_ref, running = ref.batch_norm_step(x_in, running, spec, gamma, beta, training=True)
        np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, atol=atol, rtol=rtol)
        # The gradient reaches the layer in the output's dtype; from there on the layer
        # computes in float32, so only dx's final rounding is 16-bit.
        dy_in = np.asarray(tf.cast(tf.cast(dy, dtype), "float64"))
        back = ref.batch_norm_backward(
            dy_in,
            x_in,
            gamma if spec.scale else None,
            eps=spec.eps,
            axis=spec.axis,
            center=spec.center,
        )
        np.testing.assert_allclose(grads[0], back.dx, atol=2 * atol, rtol=2 * rtol)
        expected = [g for g in (back.dgamma, back.dbeta) if g is not None]
        for got, want in zip(grads[1:], expected, strict=True):
            # float32 sums over the batch whatever the input dtype
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        if running is not None:
            assert layer.moving_mean.dtype == "float32"
            np.testing.assert_allclose(layer.moving_mean.numpy(), running.mean, *STATE_TOL[::-1])
            np.testing.assert_allclose(layer.moving_variance.numpy(), running.var, *STATE_TOL[::-1])
    assert y.dtype == np.dtype(dtype) if dtype != "bfloat16" else str(y.dtype) == "bfloat16"
    x32 = _batch(rng, shape, spec.axis)
    x = x32 if dtype == "float32" else tf.cast(x32, dtype)
    x_in = np.asarray(tf.cast(x, "float64")) if dtype == "bfloat16" else np.asarray(x)
    y_inf = np.asarray(tf.cast(layer(x, training=False), "float64"))
    y_ref, _ = ref.batch_norm_step(x_in, running, spec, gamma, beta, training=False)
    np.testing.assert_allclose(y_inf, np.asarray(y_ref, np.float64), atol=atol, rtol=rtol)


SHAPES = {2: (16, 3), 3: (4, 3, 5), 4: (4, 3, 5, 6), 5: (2, 3, 4, 3, 5)}


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("preset", [None, "torch", "keras"])
def test_matches_reference_over_training_then_inference(rank: int, axis: int, preset: Any) -> None:
    shape = list(SHAPES[rank])
    shape[axis], shape[1] = shape[1], shape[axis]  # 3 features on the feature axis
    spec = BatchNormSpec.from_preset(preset, axis=axis)
    _check_against_reference(spec, tuple(shape), seed=rank)


@pytest.mark.parametrize(
    "changes",
    [
        {"momentum": None},
        {"running_var": "biased", "momentum": 0.3},
        {"center": False},
        {"scale": False, "center": False},
        {"track_running_stats": False},
        {"eps": 0.5, "momentum": 1.0},
        {"momentum": 0.0},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_settings_match_reference(changes: dict[str, Any]) -> None:
    spec = BatchNormSpec(axis=-1).replace(**changes)
    _check_against_reference(spec, (6, 4, 3), seed=7)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("axis", [1, -1])
def test_mixed_precision_matches_reference(dtype: str, axis: int) -> None:
    spec = BatchNormSpec(axis=axis)
    _check_against_reference(spec, (8, 3, 4, 3), dtype=dtype, seed=3)


def test_mixed_precision_keeps_float32_weights() -> None:
    layer = BatchNorm(dtype="mixed_float16")
    y = layer(np.ones((4, 3), np.float16), training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    assert {w.dtype for w in layer.weights} == {"float32"}


@pytest.mark.parametrize("policy", ["float16", "bfloat16"])
def test_a_plain_16_bit_policy_keeps_float32_weights_and_statistics(policy: str) -> None:
    """A moving variance of 1e5 overflows float16, where Keras's own layer keeps it."""
    layer = BatchNorm(dtype=policy)
    x = (1000 * np.random.default_rng(5).standard_normal((64, 3))).astype(policy)
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == policy
    assert {w.dtype for w in layer.weights} == {"float32"}
    wide = np.asarray(keras.ops.cast(x, "float32"), np.float64)
    want = 0.9 + 0.1 * wide.var(axis=0, ddof=1)
    assert want.max() > 65504  # beyond float16
    np.testing.assert_allclose(layer.moving_variance.numpy(), want, rtol=1e-5)


def _op_types(layer: Any, x: np.ndarray) -> set[str]:
    traced = tf.function(lambda t: layer(t, training=True)).get_concrete_function(
        tf.TensorSpec(x.shape, x.dtype)
    )
    return {op.type for op in traced.graph.get_operations()}


def test_training_runs_the_fused_kernel_where_its_arithmetic_is_the_specs() -> None:
    x = np.zeros((4, 3, 3, 2), np.float32)
    assert "FusedBatchNormV3" in _op_types(BatchNorm(), x)
    assert "FusedBatchNormV3" in _op_types(BatchNorm(), np.zeros((5, 2), np.float32))
    assert "FusedBatchNormV3" in _op_types(BatchNorm(), np.zeros((2, 3, 2, 2, 2), np.float32))
    # Keras's own arithmetic, features first (the CPU kernel would transpose them) or in
    # the middle, float64: composed from keras.ops.
    assert "FusedBatchNormV3" not in _op_types(BatchNorm(preset="keras"), x)
    assert "FusedBatchNormV3" not in _op_types(BatchNorm(axis=1), np.zeros((4, 2, 3, 3), "f"))
    assert "FusedBatchNormV3" not in _op_types(BatchNorm(axis=2), x)
    assert "FusedBatchNormV3" not in _op_types(BatchNorm(dtype="float64"), x.astype(np.float64))


def test_an_input_traced_without_its_feature_count_takes_the_composed_form() -> None:
    """The fused kernel needs the feature count when traced; without it the layer
    composes keras.ops, with the same numbers."""
    layer = BatchNorm(momentum=0.5)
    layer.build((None, 3))
    x = np.random.default_rng(8).standard_normal((6, 3)).astype(np.float32)
    spec = tf.TensorSpec((None, None), tf.float32)
    train = tf.function(lambda t: layer(t, training=True), input_signature=[spec])
    infer = tf.function(lambda t: layer(t, training=False), input_signature=[spec])
    y = train(x).numpy()
    y_ref, running = ref.batch_norm_step(
        x, ref.init_running_stats(3), BatchNormSpec(momentum=0.5, axis=-1),
        np.ones(3), np.zeros(3), training=True,
    )  # fmt: skip
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    assert running is not None
    np.testing.assert_allclose(layer.moving_variance.numpy(), running.var, rtol=1e-5)
    want = ref.batch_norm_inference(x, running.mean, running.var, eps=1e-5, axis=-1)
    np.testing.assert_allclose(infer(x).numpy(), want, atol=2e-5)


@pytest.mark.parametrize("shape", [(32, 5, 3), (32, 3)])
def test_inference_at_a_large_running_mean_keeps_float32_accuracy(
    shape: tuple[int, ...],
) -> None:
    """The fused kernel subtracts the running mean before scaling; the composed
    ``x * s + (beta - mean * s)`` of Keras's own layer (kept by preset="keras") loses
    1e-3 of y at a running mean of 1e4 against a spread of 1."""
    rng = np.random.default_rng(7)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    layer = BatchNorm(momentum=1.0, running_var="biased")
    layer(x, training=True)
    mean, var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    want = ref.batch_norm_inference(x, mean, var, eps=1e-5, axis=-1)
    np.testing.assert_allclose(np.asarray(layer(x)), want, atol=2e-6)
    graph = (
        tf.function(lambda t: layer(t, training=False))
        .get_concrete_function(tf.TensorSpec(x.shape, tf.float32))
        .graph
    )
    assert "FusedBatchNormV3" in {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("axis", [-1, 2])
def test_fused_and_composed_training_agree_with_the_reference_at_a_large_mean(axis: int) -> None:
    """axis -1 runs the fused kernel on the centred input, axis 2 the composed form on
    the input shifted by a value of each feature: both keep float32 accuracy."""
    rng = np.random.default_rng(6)
    x = (1e4 + rng.standard_normal((8, 5, 6, 7))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = BatchNorm(axis=axis, momentum=0.5)
    y, grads = _train_call(layer, x, dy)
    gamma = np.ones(x.shape[axis])
    y_ref, running = ref.batch_norm_step(
        x, ref.init_running_stats(x.shape[axis]), BatchNormSpec(axis=axis, momentum=0.5),
        gamma, np.zeros_like(gamma), training=True,
    )  # fmt: skip
    back = ref.batch_norm_backward(dy, x, gamma, eps=1e-5, axis=axis)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    np.testing.assert_allclose(grads[0], back.dx, atol=2e-5)
    np.testing.assert_allclose(grads[1], back.dgamma, atol=1e-4)
    assert running is not None
    np.testing.assert_allclose(layer.moving_mean.numpy(), running.mean, rtol=2e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), running.var, rtol=1e-5)


def test_large_offset_statistics_are_accurate() -> None:
    """Two-pass statistics: a mean of 1e4 does not cost the variance its digits."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((256, 4))).astype(np.float32)
    layer = BatchNorm(momentum=1.0, running_var="biased")
    layer(x, training=True)
    expected = ref.batch_stats(x, axis=-1)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected.var(), rtol=1e-5)


@pytest.mark.parametrize(("loc", "scale"), [(1e4, 1.0), (0.5, 1e-3)])
def test_large_mean_against_the_spread_keeps_float32_accuracy(loc: float, scale: float) -> None:
    """Outputs and gradients at a mean far above the spread are as accurate as float32
    inputs allow (SPEC.md section 2, numerics); Keras's own arithmetic, which preset="keras" keeps,
    loses 1e-3 of y's scale and 1e-2 of dgamma's at mean 1e4."""
    rng = np.random.default_rng(3)
    x = (loc + scale * rng.standard_normal((16, 8, 8, 4))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = BatchNorm()
    y, (dx, dgamma, dbeta) = _train_call(layer, x, dy)
    want_y, stats = ref.batch_norm_train(x, eps=1e-5, axis=-1)
    want = ref.batch_norm_backward(dy, x, np.ones(4), eps=1e-5, axis=-1)
    for got, expected in [(y, want_y), (dx, want.dx), (dgamma, want.dgamma), (dbeta, want.dbeta)]:
        expected = np.asarray(expected, np.float64)
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * stats.mean, rtol=1e-6)


# -- preset="keras" is keras.layers.BatchNormalization --------------------------------


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("axis", [1, -1])
def test_keras_preset_is_bit_identical_to_keras(rank: int, axis: int) -> None:
    rng = np.random.default_rng(rank)
    shape = list(SHAPES[rank])
    shape[axis], shape[1] = shape[1], shape[axis]
    native = keras.layers.BatchNormalization(axis=axis)
    ours = BatchNorm(axis, preset="keras")
    native.build(tuple(shape))
    ours.build(tuple(shape))
    _set_affine(native, np.random.default_rng(9))
    _set_affine(ours, np.random.default_rng(9))
    for _ in range(5):
        x = _batch(rng, tuple(shape), axis)
        dy = rng.standard_normal(shape).astype(np.float32)
        y_native, g_native = _train_call(native, x, dy)
        y_ours, g_ours = _train_call(ours, x, dy)
        np.testing.assert_array_equal(y_ours, y_native)
        for a, b in zip(g_ours, g_native, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ours.moving_mean.numpy(), native.moving_mean.numpy())
        np.testing.assert_array_equal(ours.moving_variance.numpy(), native.moving_variance.numpy())
    x = _batch(rng, tuple(shape), axis)
    np.testing.assert_array_equal(ours(x, training=False), native(x, training=False))


def test_keras_preset_with_native_arguments_is_identical_under_mixed_float16() -> None:
    rng = np.random.default_rng(1)
    spec = BatchNormSpec.from_native("keras", momentum=0.9, epsilon=1e-2)
    native = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-2, dtype="mixed_float16")
    ours = BatchNorm(preset="keras", momentum=spec.momentum, eps=spec.eps, dtype="mixed_float16")
    for _ in range(3):
        x = tf.cast(_batch(rng, (8, 5, 4), -1), "float16")
        np.testing.assert_array_equal(ours(x, training=True), native(x, training=True))
    np.testing.assert_array_equal(ours.moving_mean.numpy(), native.moving_mean.numpy())
    np.testing.assert_array_equal(ours.moving_variance.numpy(), native.moving_variance.numpy())
    assert [w.name for w in ours.weights] == [w.name for w in native.weights]


# -- running statistics: guard, once per call, modes --------------------------------------


def test_nonfinite_batch_updates_nothing_with_the_guard() -> None:
    layer = BatchNorm(momentum=None)
    layer(np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32), training=True)
    before = [w.numpy().copy() for w in layer.non_trainable_weights]
    x = np.ones((8, 3), np.float32)
    x[2, 1] = np.nan
    layer(x, training=True)
    after = [w.numpy() for w in layer.non_trainable_weights]
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(layer.num_batches_tracked.numpy()) == 1


def test_nonfinite_batch_poisons_without_the_guard() -> None:
    layer = BatchNorm(preset="torch")
    x = np.ones((8, 3), np.float32)
    x[2, 1] = np.inf
    layer(x, training=True)
    assert np.isnan(layer.moving_variance.numpy()[1]) or np.isinf(layer.moving_variance.numpy()[1])
    assert np.all(np.isfinite(layer.moving_mean.numpy()[[0, 2]]))


def test_inference_changes_no_state_and_training_updates_once() -> None:
    layer = BatchNorm(momentum=0.5)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    layer(x)  # inference by default
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3))
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.5 * x.mean(axis=0), rtol=1e-6)


def test_single_value_per_channel_is_an_error_unless_allowed() -> None:
    layer = BatchNorm()
    layer(np.ones((4, 2), np.float32), training=True)
    before = [w.numpy().copy() for w in layer.weights]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(np.ones((1, 2), np.float32), training=True)
    for a, b in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
    layer(np.ones((1, 2), np.float32))  # inference with running statistics is fine
    keras_like = BatchNorm(preset="keras")
    y = keras_like(np.full((1, 2), 3.0, np.float32), training=True)
    np.testing.assert_array_equal(y, np.zeros((1, 2)))


def test_single_value_check_at_run_time_with_an_unknown_batch_size() -> None:
    layer = BatchNorm()
    layer.build((None, 2))

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    def step(x: Any) -> Any:
        return layer(x, training=True)

    step(tf.ones((3, 2)))
    before = layer.moving_mean.numpy().copy()
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than 1 value per channel"):
        step(tf.ones((1, 2)))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), before)


@pytest.mark.parametrize("kept", [0, 1])
def test_a_mask_keeping_one_value_or_none_is_an_error_and_changes_nothing(kept: int) -> None:
    layer = BatchNorm(momentum=None)
    rng = np.random.default_rng(3)
    layer(rng.standard_normal((4, 5, 2)).astype(np.float32), training=True)
    before = [w.numpy().copy() for w in layer.weights]
    mask = np.zeros((4, 5), bool)
    mask[0, :kept] = True
    x = rng.standard_normal((4, 5, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=f"got {kept} .*inputs of shape"):
        layer(x, training=True, mask=mask)
    for a, b in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_graph_mask_keeping_too_little_changes_no_moving_statistic(jit_compile: bool) -> None:
    """Inside a graph the masked count is known only when it runs: TensorFlow's assertion
    fails the call, and under XLA, which drops assertions, the update is skipped."""
    layer = BatchNorm(momentum=None)
    layer.build((None, 5, 2))

    @tf.function(jit_compile=jit_compile)
    def step(x: Any, mask: Any) -> Any:
        return layer(x, training=True, mask=mask)

    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 5, 2)).astype(np.float32)
    mask = np.ones((4, 5), bool)
    mask[0, 0] = False
    step(x, mask)
    kept = x[mask].astype(np.float64)
    before = [w.numpy().copy() for w in layer.weights]
    np.testing.assert_allclose(layer.moving_mean.numpy(), kept.mean(axis=0), rtol=1e-5)
    one = np.zeros((4, 5), bool)
    one[1, 2] = True
    if jit_compile:
        step(x, one)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="more than 1 value"):
            step(x, one)
    for a, b in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


def test_mxnet_preset_updates_in_backward_only() -> None:
    layer = BatchNorm(preset="mxnet")
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    layer(x, training=True)  # forward only: MXNet's CPU kernel leaves the stats alone
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3))
    _train_call(layer, x, np.ones((6, 3), np.float32))
    spec = BatchNormSpec.from_preset("mxnet", axis=-1)
    _, state = ref.batch_norm_step(
        x, ref.init_running_stats(3), spec, np.ones(3), np.zeros(3), training=True
    )
    assert state is not None
    np.testing.assert_allclose(layer.moving_mean.numpy(), state.mean, rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), state.var, rtol=1e-6)


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (np.ones((4, 3), np.float32), "inputs must have rank 3"),
        (np.ones((4, 5, 2), np.float32), "inputs must have 3 features on axis -1"),
        (np.ones((4, 5, 3), np.int32), "inputs must have a floating-point dtype, got int32"),
    ],
    ids=["rank", "features", "dtype"],
)
def test_bad_inputs_raise_and_change_nothing(inputs: np.ndarray, message: str) -> None:
    layer = BatchNorm(momentum=None)
    layer(np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32), training=True)
    before = [w.numpy().copy() for w in layer.weights]
    with pytest.raises(ValueError, match=message):
        layer(inputs, training=True)
    for a, b in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"preset": "caffe"}, "preset"),
        ({"momentum": 1.5}, "momentum"),
        ({"eps": -1.0}, "eps"),
        ({"running_var": "sample"}, "running_var"),
        ({"center": 1}, "center"),
        ({"synchronized": "yes"}, "synchronized"),
    ],
)
def test_bad_settings_name_the_parameter(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be"):
        BatchNorm(**kwargs)


def test_rank_one_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="inputs must have rank >= 2"):
        BatchNorm()(np.ones(3, np.float32))


def test_axis_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="axis must be an integer in"):
        BatchNorm(axis=3)(np.ones((2, 3), np.float32))


# -- trainable=False -------------------------------------------------------------------


def test_frozen_layer_runs_in_inference_mode_like_keras() -> None:
    rng = np.random.default_rng(0)
    ours, native = BatchNorm(preset="keras"), keras.layers.BatchNormalization()
    x = _batch(rng, (8, 3), -1)
    ours(x, training=True)
    native(x, training=True)
    ours.trainable = False
    native.trainable = False
    state = [w.numpy().copy() for w in ours.weights]
    x2 = _batch(rng, (8, 3), -1)
    y = ours(x2, training=True)
    np.testing.assert_array_equal(y, ours(x2, training=False))
    np.testing.assert_array_equal(y, native(x2, training=True))
    for a, b in zip(ours.weights, state, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


def test_frozen_layer_is_unchanged_by_fit() -> None:
    layer = BatchNorm(momentum=0.5)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), layer])
    layer.trainable = False
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    state = [w.numpy().copy() for w in layer.weights]
    rng = np.random.default_rng(0)
    model.fit(_batch(rng, (16, 3), -1), np.zeros((16, 3)), batch_size=8, verbose=0)
    for a, b in zip(layer.weights, state, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


# -- inside model.fit, with and without XLA ------------------------------------------


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("preset", [None, "mxnet"])
def test_fit_updates_running_stats_as_the_reference(jit_compile: bool, preset: Any) -> None:
    rng = np.random.default_rng(4)
    layer = BatchNorm(preset=preset)
    model = keras.Sequential([keras.Input((5, 3)), layer])
    # learning rate 0: gamma and beta stay put, so the reference can follow the stats.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=jit_compile)
    x = _batch(rng, (20, 5, 3), -1)  # batches of 8, 8 and a last one of 4
    model.fit(x, np.zeros_like(x), batch_size=8, shuffle=False, verbose=0)
    spec = BatchNormSpec.from_preset(preset, axis=-1)
    running = ref.init_running_stats(3)
    for start in range(0, 20, 8):
        _, running = ref.batch_norm_step(
            x[start : start + 8], running, spec, np.ones(3), np.zeros(3), training=True
        )
    assert running is not None
    np.testing.assert_allclose(layer.moving_mean.numpy(), running.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), running.var, rtol=1e-5, atol=1e-6)
    y = model.predict(x, batch_size=20, verbose=0)
    y_ref = ref.batch_norm_inference(x, running.mean, running.var, eps=spec.eps, axis=-1)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=2e-5)


# -- configuration and saving ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"preset": "keras"},
        {"momentum": None, "axis": 1},
        {"preset": "mxnet", "eps": 0.1},
        {"preset": "keras", "empty_batch": "count"},
    ],
)
def test_config_round_trip(kwargs: dict[str, Any]) -> None:
    layer = BatchNorm(**kwargs)
    clone = BatchNorm.from_config(layer.get_config())
    assert clone.spec == layer.spec
    assert keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)
    ).spec == (layer.spec)


def test_keras_file_round_trip_restores_running_stats(tmp_path: Any) -> None:
    rng = np.random.default_rng(5)
    model = keras.Sequential(
        [keras.Input((4, 3)), BatchNorm(momentum=None, name="bn"), keras.layers.Dense(2)]
    )
    model.compile(optimizer="sgd", loss="mse")
    x = _batch(rng, (24, 4, 3), -1)
    model.fit(x, np.zeros((24, 4, 2)), batch_size=8, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    bn, bn_loaded = model.get_layer("bn"), loaded.get_layer("bn")
    assert isinstance(bn_loaded, BatchNorm)
    assert bn_loaded.spec == bn.spec
    assert int(bn_loaded.num_batches_tracked.numpy()) == 3
    for a, b in zip(bn_loaded.weights, bn.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_masked_positions_are_left_out_of_the_statistics() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 5, 3)).astype(np.float32) + 2.0
    mask = np.ones((4, 5), bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    ours, native = BatchNorm(momentum=0.5), keras.layers.BatchNormalization(momentum=0.5)
    y = ours(x, training=True, mask=mask)
    native(x, training=True, mask=mask)
    kept = x[mask]  # (n, 3): the unmasked values of each feature
    stats = ref.batch_stats(kept, axis=-1)
    y_ref, _ = ref.batch_norm_train(kept, eps=ours.eps, axis=-1)
    np.testing.assert_allclose(np.asarray(y)[mask], y_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(ours.moving_mean.numpy(), 0.5 * stats.mean, rtol=1e-5)
    np.testing.assert_allclose(
        ours.moving_variance.numpy(), 0.5 + 0.5 * stats.var(unbiased=True), rtol=1e-5
    )
    # Keras's layer agrees on the mean (its variance is biased and eps-damped).
    np.testing.assert_allclose(ours.moving_mean.numpy(), native.moving_mean.numpy(), rtol=1e-5)


def test_masked_padding_far_from_the_data_does_not_shift_the_statistics() -> None:
    """Left-padded sequences: the first positions are masked and hold 1e7, far from the
    values (near 1e4); each feature is shifted by its first kept value, so the statistics
    of the kept values keep their float32 accuracy."""
    rng = np.random.default_rng(8)
    x = (1e4 + rng.standard_normal((4, 6, 3))).astype(np.float32)
    x[:, :2] = 1e7
    mask = np.ones((4, 6), bool)
    mask[:, :2] = False
    ours = BatchNorm(momentum=1.0)
    y = np.asarray(ours(x, training=True, mask=mask))
    kept = x[mask].astype(np.float64)
    y_ref, stats = ref.batch_norm_train(kept, eps=ours.eps, axis=-1)
    np.testing.assert_allclose(y[mask], y_ref, atol=3e-5)  # Keras's arithmetic: ~1e-3
    np.testing.assert_allclose(ours.moving_mean.numpy(), stats.mean, rtol=1e-6)


def test_masked_channels_first_shifts_by_a_kept_value_of_each_feature() -> None:
    """axis=1 with a mask over (batch, channel): each channel's statistics are those of
    its kept rows, shifted by a kept value (channel 2's first row is masked padding)."""
    rng = np.random.default_rng(9)
    x = (1e4 + rng.standard_normal((5, 3, 4))).astype(np.float32)
    mask = np.ones((5, 3), bool)
    mask[:2, 2] = False
    x[:2, 2] = -1e7
    ours = BatchNorm(axis=1, momentum=1.0, running_var="biased")
    y = np.asarray(ours(x, training=True, mask=mask))
    for c in range(3):
        kept = x[mask[:, c], c, :].astype(np.float64)
        mean, var = kept.mean(), kept.var()
        np.testing.assert_allclose(ours.moving_mean.numpy()[c], mean, rtol=1e-7)
        np.testing.assert_allclose(ours.moving_variance.numpy()[c], var, rtol=1e-4)
        want = (kept - mean) / np.sqrt(var + ours.eps)
        np.testing.assert_allclose(y[mask[:, c], c, :], want, atol=3e-5)


def test_synchronized_outside_a_strategy_is_a_plain_batchnorm() -> None:
    x = np.random.default_rng(7).standard_normal((6, 3)).astype(np.float32)
    sync, plain = BatchNorm(synchronized=True), BatchNorm()
    np.testing.assert_array_equal(sync(x, training=True), plain(x, training=True))
    np.testing.assert_array_equal(sync.moving_variance.numpy(), plain.moving_variance.numpy())
    assert BatchNorm.from_config(sync.get_config()).synchronized


# -- an empty batch (SPEC.md section 2, *Empty batch*) -----------------------------------

# How a training step is run: eagerly; in a tf.function traced for each shape (the layer
# sees the shape, empty or not); in one traced with every axis but the features unknown
# (the layer learns the size only when the graph runs); and both under XLA.
MODES = ["eager", "function", "function-unknown", "xla", "xla-unknown"]


def _stepper(layer: Any, mode: str, rank: int, axis: int = -1) -> Any:
    """A training step ``(x, dy[, mask]) -> (y, [dx, *trainable weight gradients])`` of
    ``layer`` (built for ``rank`` with the feature axis ``axis``), run as ``mode`` says."""

    def step(x: Any, dy: Any, mask: Any = None) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
        return y, tape.gradient(loss, [x, *layer.trainable_weights])

    if mode == "eager":
        return step
    jit = mode.startswith("xla")
    if not mode.endswith("unknown"):
        return tf.function(step, jit_compile=jit)
    shape: list[int | None] = [None] * rank
    shape[axis] = layer.moving_mean.shape[0] if layer.moving_mean is not None else 3
    spec = tf.TensorSpec(shape, tf.float32)
    return tf.function(step, jit_compile=jit, input_signature=[spec, spec])


def _numpy(values: list[Any]) -> list[Any]:
    return [None if v is None else np.asarray(v) for v in values]


# rank: (a batch, an empty one), features last; rank 3's is empty in its spatial axis.
EMPTY = {2: ((8, 3), (0, 3)), 3: ((4, 5, 3), (4, 0, 3)), 4: ((2, 4, 4, 3), (0, 4, 4, 3))}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_keras_preset_on_an_empty_batch_is_keras_layer(rank: int, mode: str) -> None:
    """Keras's layer on an empty batch: an empty output, moving statistics of NaN from
    then on (the mean and variance of nothing are fed). preset="keras" computes the same
    outputs, input gradients and moving statistics; its gamma gradient is 0 (SPEC.md
    section 2), where Keras's layer's is NaN (section 4 lists that difference)."""
    full, empty = EMPTY[rank]
    native = keras.layers.BatchNormalization()
    ours = BatchNorm(preset="keras")
    for layer in (native, ours):
        layer.build(full)
        _set_affine(layer, np.random.default_rng(9))
    steps = {id(layer): _stepper(layer, mode, rank) for layer in (native, ours)}
    rng = np.random.default_rng(rank)
    for shape in (full, empty, full, empty, full):
        x = tf.constant(_batch(rng, shape, -1))
        dy = tf.constant(rng.standard_normal(shape).astype(np.float32))
        y_native, g_native = steps[id(native)](x, dy)
        y_ours, g_ours = steps[id(ours)](x, dy)
        y_ours, g_ours, g_native = np.asarray(y_ours), _numpy(g_ours), _numpy(g_native)
        assert y_ours.shape == shape and y_ours.dtype == np.float32
        np.testing.assert_array_equal(y_ours, y_native)
        np.testing.assert_array_equal(g_ours[0], g_native[0])  # dx (empty, or equal)
        np.testing.assert_array_equal(g_ours[2], g_native[2])  # dbeta
        if shape == empty:
            np.testing.assert_array_equal(g_ours[1], np.zeros(3))  # dgamma: a sum over nothing
            assert np.isnan(g_native[1]).all()  # Keras's: 0 times the NaN statistics
        else:
            np.testing.assert_array_equal(g_ours[1], g_native[1])
        np.testing.assert_array_equal(ours.moving_mean.numpy(), native.moving_mean.numpy())
        np.testing.assert_array_equal(ours.moving_variance.numpy(), native.moving_variance.numpy())
    assert np.isnan(ours.moving_mean.numpy()).all()
    x = _batch(rng, full, -1)
    np.testing.assert_array_equal(ours(x, training=False), native(x, training=False))


def _spec_layer(spec: BatchNormSpec) -> Any:
    """unorm.keras.BatchNorm with every setting of ``spec``."""
    names = (
        "eps",
        "momentum",
        "center",
        "scale",
        "track_running_stats",
        "running_var",
        "skip_nonfinite",
        "allow_single_value",
        "update_on",
        "empty_batch",
    )
    return BatchNorm(spec.axis, preset=spec.preset, **{n: getattr(spec, n) for n in names})


def _follow_reference(
    spec: BatchNormSpec, shapes: list[tuple[int, ...]], mode: str, seed: int = 0
) -> None:
    """Train on batches of ``shapes`` (some empty) and check outputs, gradients and
    state against the reference after each step, then inference."""
    layer = _spec_layer(spec)
    full = next(s for s in shapes if 0 not in s)
    layer.build(full)
    rng = np.random.default_rng(seed)
    gamma, beta = _set_affine(layer, rng)
    step = _stepper(layer, mode, len(full), spec.axis)
    channels = full[spec.axis]
    running = ref.init_running_stats(channels) if spec.track_running_stats else None
    for shape in shapes:
        x = _batch(rng, shape, spec.axis)
        dy = rng.standard_normal(shape).astype(np.float32)
        y, grads = step(tf.constant(x), tf.constant(dy))
        y, grads = np.asarray(y), _numpy(grads)
        y_ref, running = ref.batch_norm_step(x, running, spec, gamma, beta, training=True)
        back = ref.batch_norm_backward(dy, x, gamma, eps=spec.eps, axis=spec.axis)
        assert y.shape == shape and y.dtype == np.float32
        np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(grads[0], back.dx, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(grads[1], back.dgamma, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(grads[2], back.dbeta, atol=1e-4, rtol=1e-4)
        if running is not None:
            np.testing.assert_allclose(layer.moving_mean.numpy(), running.mean, *STATE_TOL[::-1])
            np.testing.assert_allclose(layer.moving_variance.numpy(), running.var, *STATE_TOL[::-1])
            if layer.num_batches_tracked is not None:
                assert int(layer.num_batches_tracked.numpy()) == running.num_batches_tracked
    for shape in {full, *shapes}:
        x = _batch(rng, shape, spec.axis)
        y_ref, _ = ref.batch_norm_step(x, running, spec, gamma, beta, training=False)
        y = np.asarray(layer(x, training=False))
        assert y.shape == shape
        np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=2e-5)


# Settings whose empty batch differs: the presets (torch and canonical with the cumulative
# average, whose count the empty batch changes or not), and the rules off their presets.
EMPTY_SETTINGS = {
    "canonical": BatchNormSpec(momentum=None),
    "torch": BatchNormSpec.from_preset("torch", momentum=None),
    "keras": BatchNormSpec.from_preset("keras"),
    "mxnet": BatchNormSpec.from_preset("mxnet"),
    "nan-guarded": BatchNormSpec(empty_batch="nan"),
    "count": BatchNormSpec(momentum=None, empty_batch="count"),
    "no-running-stats": BatchNormSpec(track_running_stats=False),
}
# (axis, a batch, an empty one): features last and first, empty in samples or in space.
EMPTY_LAYOUTS = [
    (-1, (2, 4, 4, 3), (0, 4, 4, 3)),
    (-1, (4, 5, 3), (4, 0, 3)),
    (1, (4, 3, 5), (0, 3, 5)),
    (1, (2, 3, 4, 4), (2, 3, 4, 0)),
]


@pytest.mark.parametrize("layout", range(len(EMPTY_LAYOUTS)))
@pytest.mark.parametrize("settings", list(EMPTY_SETTINGS))
def test_an_empty_batch_follows_the_reference(settings: str, layout: int) -> None:
    axis, full, empty = EMPTY_LAYOUTS[layout]
    spec = EMPTY_SETTINGS[settings].replace(axis=axis)
    _follow_reference(spec, [full, empty, full, empty, full], "eager", seed=layout)


@pytest.mark.parametrize("mode", MODES[1:])
@pytest.mark.parametrize("settings", ["canonical", "torch", "keras", "mxnet", "count"])
def test_an_empty_batch_in_a_graph_follows_the_reference(settings: str, mode: str) -> None:
    """Features last in float32: canonical and torch take the fused kernel, also where
    the batch size is only known when the graph runs (a guarded branch then)."""
    spec = EMPTY_SETTINGS[settings].replace(axis=-1)
    _follow_reference(spec, [(2, 4, 4, 3), (0, 4, 4, 3), (4, 4, 4, 3), (0, 4, 4, 3)], mode)


@pytest.mark.parametrize("mode", ["function-unknown", "xla-unknown"])
def test_an_empty_channels_first_batch_of_unknown_size_follows_the_reference(mode: str) -> None:
    spec = BatchNormSpec(axis=1, momentum=None, empty_batch="count")
    _follow_reference(spec, [(4, 3, 5), (0, 3, 5), (2, 3, 6), (4, 3, 0), (3, 3, 2)], mode)


@pytest.mark.parametrize("unknown", [False, True])
@pytest.mark.parametrize("preset", [None, "keras"])
def test_an_empty_batch_is_empty_in_inference_too(preset: Any, unknown: bool) -> None:
    """Inference on an empty batch: an empty output, zero gamma/beta gradients (also
    from the NaN moving statistics an empty training batch left under preset="keras"),
    no state change."""
    layer = BatchNorm(preset=preset)
    layer(np.ones((4, 3), np.float32), training=True)
    layer(np.ones((0, 3), np.float32), training=True)
    assert np.isnan(layer.moving_mean.numpy()).all() == (preset == "keras")
    before = [w.numpy().copy() for w in layer.weights]

    def infer(x: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=False)
            loss = tf.reduce_sum(y)
        return y, tape.gradient(loss, [x, *layer.trainable_weights])

    if unknown:
        infer = tf.function(infer, input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    y, grads = infer(tf.zeros((0, 3)))
    assert tuple(y.shape) == (0, 3)
    assert tuple(grads[0].shape) == (0, 3)
    for g in grads[1:]:
        np.testing.assert_array_equal(g, np.zeros(3))
    for a, b in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("preset", [None, "torch", "keras"])
def test_fit_through_an_empty_batch_follows_the_reference(jit_compile: bool, preset: Any) -> None:
    """model.fit on batches of 8, 0 and 8 (a detection head's image without proposals)."""
    rng = np.random.default_rng(11)
    kwargs: dict[str, Any] = {} if preset == "keras" else {"momentum": None}
    layer = BatchNorm(preset=preset, **kwargs)
    model = keras.Sequential([keras.Input((5, 3)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=jit_compile)
    batches = [_batch(rng, (n, 5, 3), -1) for n in (8, 0, 8)]
    data = tf.data.Dataset.from_generator(
        lambda: ((b, np.zeros_like(b)) for b in batches),
        output_signature=(tf.TensorSpec((None, 5, 3), tf.float32),) * 2,
    ).apply(tf.data.experimental.assert_cardinality(len(batches)))
    model.fit(data, shuffle=False, verbose=0)
    spec = BatchNormSpec.from_preset(preset, axis=-1, **kwargs)
    running = ref.init_running_stats(3)
    for b in batches:
        _, running = ref.batch_norm_step(b, running, spec, np.ones(3), np.zeros(3), training=True)
    assert running is not None
    np.testing.assert_allclose(layer.moving_mean.numpy(), running.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), running.var, rtol=1e-5, atol=1e-6)
    if layer.num_batches_tracked is not None:
        assert int(layer.num_batches_tracked.numpy()) == running.num_batches_tracked
    assert np.isfinite(layer.gamma.numpy()).all()  # a zero gradient over the empty batch


# -- a mask that keeps nothing: Keras's arithmetic under preset="keras" ------------------


# (axis, input shape, mask): a batch the mask keeps nothing of, at ranks 2, 3 and 4; a
# feature it keeps nothing of (a mask along the feature axis), at ranks 2 (features on
# axis 0), 3 and 4 (features on axis 1); one kept value (Keras divides by 1 + 1e-7).
def _masks() -> dict[str, tuple[int, tuple[int, ...], np.ndarray]]:
    feature3 = np.ones((4, 3), bool)
    feature3[:, 1] = False
    feature3[2:, 2] = False
    feature4 = np.ones((2, 3, 4), bool)
    feature4[:, 0] = False
    one = np.zeros((4, 5), bool)
    one[2, 3] = True
    return {
        "nothing-rank2": (-1, (6, 3), np.zeros(6, bool)),
        "nothing-rank3": (-1, (4, 5, 3), np.zeros((4, 5), bool)),
        "nothing-rank4": (-1, (2, 3, 4, 3), np.zeros((2, 3, 4), bool)),
        "feature-rank2": (0, (3, 4), np.array([True, False, True])),
        "feature-rank3": (1, (4, 3, 5), feature3),
        "feature-rank4": (1, (2, 3, 4, 5), feature4),
        "one-kept-rank3": (-1, (4, 5, 3), one),
    }


MASKS = _masks()


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize("case", list(MASKS))
def test_keras_preset_on_a_mask_keeping_nothing_is_keras_layer(case: str, mode: str) -> None:
    """Keras's layer divides the masked sums by count + 1e-7: a feature the mask keeps
    nothing of has mean 0 and variance 0, so its outputs are x / sqrt(eps) (times gamma,
    plus beta) and its moving statistics decay towards 0. preset="keras" computes the same
    numbers, bit for bit, over several steps, and so do inference and the gradients."""
    axis, shape, mask = MASKS[case]
    native = keras.layers.BatchNormalization(axis=axis)
    ours = BatchNorm(axis, preset="keras")
    for layer in (native, ours):
        layer.build(shape)
        _set_affine(layer, np.random.default_rng(9))
    steps = [_stepper(layer, mode, len(shape), axis) for layer in (native, ours)]
    rng = np.random.default_rng(len(shape))
    masks = [mask, np.ones_like(mask), mask]  # nothing kept, all kept, nothing kept
    for m in masks:
        x = tf.constant(_batch(rng, shape, axis))
        dy = tf.constant(rng.standard_normal(shape).astype(np.float32))
        (y_native, g_native), (y_ours, g_ours) = (step(x, dy, tf.constant(m)) for step in steps)
        assert np.isfinite(np.asarray(y_native)).all()
        np.testing.assert_array_equal(y_ours, y_native)
        for a, b in zip(_numpy(g_ours), _numpy(g_native), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ours.moving_mean.numpy(), native.moving_mean.numpy())
        np.testing.assert_array_equal(ours.moving_variance.numpy(), native.moving_variance.numpy())
    x = _batch(rng, shape, axis)
    np.testing.assert_array_equal(ours(x, training=False), native(x, training=False))


def test_keras_preset_masked_feature_is_keras_arithmetic_in_numbers() -> None:
    """What Keras's arithmetic is, in numbers: a feature the mask keeps nothing of is
    normalised with mean 0 and variance 0, and those are fed to the moving statistics."""
    axis, shape, mask = MASKS["feature-rank3"]
    x = _batch(np.random.default_rng(2), shape, axis)
    layer = BatchNorm(axis, preset="keras")
    y = np.asarray(layer(x, training=True, mask=mask))
    np.testing.assert_allclose(y[:, 1], x[:, 1] / np.sqrt(1e-3), rtol=1e-6)
    assert layer.moving_mean.numpy()[1] == 0.0
    np.testing.assert_allclose(layer.moving_variance.numpy()[1], 0.99, rtol=1e-7)
    kept = x[:2, 2].ravel().astype(np.float64)  # feature 2: its first two rows are kept
    np.testing.assert_allclose(layer.moving_mean.numpy()[2], 0.01 * kept.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        layer.moving_variance.numpy()[2], 0.99 + 0.01 * kept.var(), rtol=1e-5
    )


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize("case", ["nothing-rank3", "feature-rank3", "feature-rank4"])
def test_fully_masked_zero_outside_the_keras_preset_is_the_reference(case: str, mode: str) -> None:
    """fully_masked="zero" in the canonical convention (exact statistics, the unbiased
    feed, an input far from 0 that unorm shifts): outputs, gradients and moving statistics
    of the reference's masked step, over a masked, an unmasked and a masked step."""
    axis, shape, mask = MASKS[case]
    spec = BatchNormSpec(axis=axis, fully_masked="zero", momentum=0.3)
    layer = BatchNorm(axis, fully_masked="zero", momentum=0.3)
    layer.build(shape)
    gamma, beta = _set_affine(layer, np.random.default_rng(4))
    step = _stepper(layer, mode, len(shape), axis)
    rng = np.random.default_rng(11)
    running = ref.init_running_stats(shape[axis])
    for m in (mask, np.ones_like(mask), mask):
        x = _batch(rng, shape, axis) + np.float32(300.0)
        dy = rng.standard_normal(shape).astype(np.float32)
        y, grads = step(tf.constant(x), tf.constant(dy), tf.constant(m))
        keep = m[..., None]  # Keras's mask, broadcast over the last axis
        x64 = x.astype(np.float64)
        want, running = ref.batch_norm_step(
            x64, running, spec, gamma, beta, training=True, mask=keep
        )  # fmt: skip
        dx, dgamma, dbeta = ref.masked_batch_norm_backward(dy, x64, keep, gamma, spec=spec)
        np.testing.assert_allclose(np.asarray(y), want, rtol=2e-4, atol=2e-3)
        got = _numpy(grads)
        np.testing.assert_allclose(got[0], dx, rtol=2e-4, atol=2e-3)
        np.testing.assert_allclose(got[1], dgamma, rtol=2e-4, atol=2e-3)
        np.testing.assert_allclose(got[2], dbeta, rtol=1e-5, atol=1e-4)
        assert running is not None
        np.testing.assert_allclose(layer.moving_mean.numpy(), running.mean, rtol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), running.var, rtol=1e-4)


@pytest.mark.parametrize("preset", [None, "keras"])
def test_non_finite_masked_padding_takes_no_part(preset: str | None) -> None:
    """NaN and inf where the mask drops them (padding) change no statistic: the layer's
    kept positions and moving statistics are the reference's on the kept values."""
    axis, shape, mask = MASKS["feature-rank3"]
    spec = BatchNormSpec.from_preset(preset, axis=axis, fully_masked="zero")
    layer = BatchNorm(axis, preset=preset, fully_masked="zero")
    layer.build(shape)
    x = _batch(np.random.default_rng(6), shape, axis)
    keep = np.broadcast_to(mask[..., None], shape)
    x[~keep] = np.where(np.arange((~keep).sum()) % 2, np.nan, np.inf)
    y = np.asarray(layer(x, training=True, mask=mask))
    want, running = ref.batch_norm_step(
        x.astype(np.float64), ref.init_running_stats(3), spec, training=True, mask=keep
    )
    np.testing.assert_allclose(y[keep], want[keep], rtol=1e-4, atol=1e-4)
    assert running is not None
    np.testing.assert_allclose(layer.moving_mean.numpy(), running.mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(layer.moving_variance.numpy(), running.var, rtol=1e-5)


def test_fully_masked_is_a_setting_that_round_trips() -> None:
    layer = BatchNorm(fully_masked="zero")
    again = BatchNorm.from_config(layer.get_config())
    assert again.spec.fully_masked == "zero"
    assert BatchNorm(preset="keras").spec.fully_masked == "zero"
    assert BatchNorm(preset="keras", fully_masked="error").spec.fully_masked == "error"
    with pytest.raises(ValueError, match="fully_masked must be one of"):
        BatchNorm(fully_masked="nan")


def test_keras_preset_told_to_refuse_a_fully_masked_feature_refuses_it() -> None:
    axis, shape, mask = MASKS["feature-rank3"]
    layer = BatchNorm(axis, preset="keras", fully_masked="error")
    layer.build(shape)
    before = [w.numpy().copy() for w in layer.weights]
    x = _batch(np.random.default_rng(5), shape, axis)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*got 0"):
        layer(x, training=True, mask=mask)
    for w, b in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), b)


@pytest.mark.parametrize("mode", ["eager", "function", "function-unknown", "xla-unknown"])
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_keras_preset_on_an_empty_masked_batch_is_keras_layer(rank: int, mode: str) -> None:
    """A mask on an empty batch: Keras's masked arithmetic feeds 0 and 0 (0 / (0 + 1e-7)),
    not NaN, and preset="keras" does the same."""
    full, empty = EMPTY[rank]
    native = keras.layers.BatchNormalization()
    ours = BatchNorm(preset="keras")
    for layer in (native, ours):
        layer.build(full)
    steps = [_stepper(layer, mode, rank) for layer in (native, ours)]
    rng = np.random.default_rng(rank)
    for shape in (full, empty, full):
        x = tf.constant(_batch(rng, shape, -1))
        dy = tf.constant(rng.standard_normal(shape).astype(np.float32))
        mask = tf.constant(rng.random(shape[:-1]) < 0.7)
        if mode.endswith("unknown"):
            spec = tf.TensorSpec([None] * (rank - 1) + [3], tf.float32)
            mspec = tf.TensorSpec([None] * (rank - 1), tf.bool)
            traced = [
                tf.function(s.python_function, input_signature=[spec, spec, mspec]) for s in steps
            ]
            results = [t(x, dy, mask) for t in traced]
        else:
            results = [s(x, dy, mask) for s in steps]
        (y_native, g_native), (y_ours, g_ours) = results
        np.testing.assert_array_equal(y_ours, y_native)
        np.testing.assert_array_equal(_numpy(g_ours)[0], _numpy(g_native)[0])
        np.testing.assert_array_equal(ours.moving_mean.numpy(), native.moving_mean.numpy())
        np.testing.assert_array_equal(ours.moving_variance.numpy(), native.moving_variance.numpy())
    assert np.isfinite(ours.moving_variance.numpy()).all()


@pytest.mark.parametrize("preset", [None, "torch", "mxnet"])
@pytest.mark.parametrize("case", ["nothing-rank3", "feature-rank3", "feature-rank4"])
def test_other_settings_refuse_a_mask_keeping_nothing(preset: Any, case: str) -> None:
    """The canonical convention (and the other presets) refuse a feature the mask keeps
    nothing of, eagerly and in a graph, and change no state."""
    axis, shape, mask = MASKS[case]
    layer = BatchNorm(axis, preset=preset)
    rng = np.random.default_rng(5)
    layer(_batch(rng, shape, axis), training=True)
    before = [w.numpy().copy() for w in layer.weights]
    x = _batch(rng, shape, axis)
    with pytest.raises(ValueError, match="got 0 "):
        layer(x, training=True, mask=mask)
    # In a graph the masked count is known only when it runs: a TensorFlow assertion.
    unknown_x = [None] * len(shape)
    unknown_x[axis] = 3
    unknown = [tf.TensorSpec(unknown_x), tf.TensorSpec([None] * (len(shape) - 1), bool)]
    for signature in (None, unknown):
        graph = tf.function(lambda t, m: layer(t, training=True, mask=m), signature)
        with pytest.raises(tf.errors.InvalidArgumentError, match="more than 1 value"):
            graph(x, mask)
    for a, b in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


@pytest.mark.parametrize("mode", ["eager", "function", "function-unknown", "xla-unknown"])
@pytest.mark.parametrize("preset", [None, "torch", "mxnet"])
def test_a_masked_empty_batch_is_an_empty_batch(preset: Any, mode: str) -> None:
    """A mask on an empty batch (every setting but preset="keras"): the empty batch of
    SPEC.md, the state as empty_batch says; between empty batches, masked batches (of a
    size known only when the graph runs, in the unknown modes) give the reference's
    numbers on the rows their mask keeps."""
    kwargs: dict[str, Any] = {"momentum": None} if preset != "mxnet" else {}
    spec = BatchNormSpec.from_preset(preset, axis=1, **kwargs)
    layer = _spec_layer(spec)
    layer.build((4, 3, 5))
    rng = np.random.default_rng(6)
    gamma, beta = _set_affine(layer, rng)
    running = ref.init_running_stats(3)
    step = _stepper(layer, mode, 3, 1)
    if mode.endswith("unknown"):
        spec_x = tf.TensorSpec([None, 3, None], tf.float32)
        spec_m = tf.TensorSpec([None, 3], tf.bool)
        step = tf.function(
            step.python_function,
            jit_compile=mode.startswith("xla"),
            input_signature=[spec_x, spec_x, spec_m],
        )
    for n in (4, 0, 6, 0, 5):
        x = _batch(rng, (n, 3, 5), 1)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        rows = np.arange(n) % 3 != 0  # the first row is masked padding
        mask = np.repeat(rows[:, None], 3, axis=1)
        dy[~rows] = 0.0  # the loss of the kept rows only
        y, grads = step(tf.constant(x), tf.constant(dy), tf.constant(mask))
        y, grads = np.asarray(y), _numpy(grads)
        y_ref, running = ref.batch_norm_step(x[rows], running, spec, gamma, beta, training=True)
        back = ref.batch_norm_backward(dy[rows], x[rows], gamma, eps=spec.eps, axis=1)
        assert y.shape == x.shape
        np.testing.assert_allclose(y[rows], y_ref, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(grads[0][rows], back.dx, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(grads[1], back.dgamma, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(grads[2], back.dbeta, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(layer.moving_mean.numpy(), running.mean, *STATE_TOL[::-1])
        np.testing.assert_allclose(layer.moving_variance.numpy(), running.var, *STATE_TOL[::-1])
        if layer.num_batches_tracked is not None:
            assert int(layer.num_batches_tracked.numpy()) == running.num_batches_tracked


@pytest.mark.parametrize("signature", [False, True])
def test_keras_preset_masked_empty_batch_follows_an_empty_batch_rule_given(
    signature: bool,
) -> None:
    """preset="keras" with another empty_batch rule: a masked empty batch follows that
    rule (skip: nothing; count: counted), and the preset's own "nan" feeds Keras's zeros."""
    got = {}
    for rule in ("skip", "count", "nan"):
        layer = BatchNorm(preset="keras", empty_batch=rule, momentum=None)
        layer.build((None, 5, 3))
        specs = [tf.TensorSpec([None, 5, 3]), tf.TensorSpec([None, 5], tf.bool)]
        step = tf.function(
            lambda x, m, layer=layer: layer(x, training=True, mask=m),
            input_signature=specs if signature else None,
        )
        step(tf.ones((2, 5, 3)) * tf.range(3.0), tf.ones((2, 5), bool))
        y = step(tf.zeros((0, 5, 3)), tf.zeros((0, 5), bool))
        assert tuple(y.shape) == (0, 5, 3)
        got[rule] = (layer.moving_mean.numpy(), int(layer.num_batches_tracked.numpy()))
    np.testing.assert_allclose(got["skip"][0], [0.0, 1.0, 2.0], rtol=1e-6)
    assert got["skip"][1] == 1
    np.testing.assert_allclose(got["count"][0], [0.0, 1.0, 2.0], rtol=1e-6)
    assert got["count"][1] == 2
    np.testing.assert_allclose(got["nan"][0], [0.0, 0.5, 1.0], rtol=1e-6)  # 0 fed
    assert got["nan"][1] == 2
