"""unorm.keras.AGC against the NumPy reference (``reference.agc_clip``)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from unorm import reference as ref
from unorm.spec import AGCSpec

pytestmark = pytest.mark.keras

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from unorm._keras.clip import clip_gradient, clip_gradients  # noqa: E402
from unorm.keras import AGC, adaptive_clip_grad, final_classifier, unit_axes_of  # noqa: E402

# Output-unit axes of Keras weights, written out from SPEC.md's table (not from the code).
KERNEL_AXES = {
    "dense": -1,
    "conv": -1,
    "conv_transpose": -2,
    "depthwise_conv": (-2, -1),
    "embedding": 0,
}


class Recorder(keras.optimizers.SGD):
    """Plain SGD that keeps the last gradient its update step received per variable."""

    def build(self, var_list: Any) -> None:
        super().build(var_list)
        self.seen = [self.add_variable_from_reference(v, name="seen") for v in var_list]
        self.updates = self.add_variable((), dtype="int64", name="updates")

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        index = self._get_variable_index(variable)
        self.seen[index].assign(tf.convert_to_tensor(gradient))
        if index == 0:
            self.updates.assign_add(1)
        super().update_step(gradient, variable, learning_rate)


def _unit_scaled(rng: np.random.Generator, weight: np.ndarray, axes: Any) -> np.ndarray:
    """A gradient whose per-unit norm ratios to the weight span 1e-4..1e0, so that some
    units clip (ratio > 0.01) and some do not."""
    if axes is None or weight.ndim <= 1:
        return (0.5 * weight + 0.01).astype(weight.dtype)
    listed = (axes,) if isinstance(axes, int) else axes
    keep = sorted(a % weight.ndim for a in listed)
    shape = [weight.shape[a] if a in keep else 1 for a in range(weight.ndim)]
    ratios = np.logspace(-4, 0, int(np.prod(shape))).reshape(shape)
    noise = rng.standard_normal(weight.shape)
    return (ratios * np.abs(weight).max() * noise).astype(weight.dtype)


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((6, 5), -1),
        ((3, 3, 4, 6), -1),
        ((3, 3, 6, 4), -2),
        ((3, 3, 4, 2), (-2, -1)),
        ((10, 4), 0),
        ((7,), -1),
        ((), None),
        ((4, 5), None),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_clip_matches_reference(shape: tuple[int, ...], axes: Any, dtype: str) -> None:
    rng = np.random.default_rng(len(shape))
    weight = rng.standard_normal(shape).astype(np.float32)
    grad = tf.cast(_unit_scaled(rng, weight, axes), dtype)
    keep = () if axes is None or len(shape) <= 1 else axes
    listed = (keep,) if isinstance(keep, int) else keep
    normalised = tuple(sorted(a % len(shape) for a in listed))
    got = clip_gradient(grad, weight, normalised, AGCSpec())
    assert keras.backend.standardize_dtype(got.dtype) == dtype
    grad64 = np.asarray(tf.cast(grad, "float64"))
    want = ref.agc_clip(grad64, weight, axes)
    tol = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    got64 = np.asarray(tf.cast(got, "float64"))
    np.testing.assert_allclose(got64, want, rtol=2 * tol, atol=tol * np.abs(want).max())
    # Units under the threshold come back bit for bit.
    untouched = want == grad64
    np.testing.assert_array_equal(got64[untouched], grad64[untouched])
    if len(shape) >= 2 and axes is not None:
        assert untouched.any() and not untouched.all()


# Gradients of one optimizer update, as AGC clips them together: kernels whose units are
# trailing axes (the matrix-product norms), leading or inner axes (plain sums), many tiny
# one-unit tensors (packed into one vector), a large one-unit tensor, float64 and 16-bit.
BATCH = (
    [
        ((6, 5), -1, "float32"),
        ((3, 3, 4, 6), -1, "float32"),
        ((3, 3, 6, 4), -2, "float32"),
        ((3, 3, 4, 2), (-2, -1), "float32"),
        ((10, 4), 0, "float32"),
        ((300, 300), None, "float32"),
        ((4, 5), -1, "float64"),
        ((7,), None, "float64"),
        ((3, 4), -1, "float16"),
        ((0, 3), -1, "float32"),
    ]
    + [((n,), None, "float32") for n in (1, 7, 64, 0, 5)]
    + [((), None, "float32")]
)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_clipping_an_update_at_once_matches_the_reference(mode: str) -> None:
    rng = np.random.default_rng(7)
    weights, grads, axes = [], [], []
    for shape, unit, dtype in BATCH:
        weight = rng.standard_normal(shape).astype(np.float32)
        weights.append(tf.cast(weight, dtype))
        grad = _unit_scaled(rng, weight, unit) if weight.size else weight
        if len(grads) % 2 and len(shape) <= 1:  # every other tiny tensor under its limit
            grad = grad * 1e-4
        grads.append(tf.cast(grad, dtype))
        listed = () if unit is None else (unit,) if isinstance(unit, int) else unit
        axes.append(tuple(sorted(a % len(shape) for a in listed)))

    def run() -> list[Any]:
        return clip_gradients(grads, weights, axes, AGCSpec())

    fn = run if mode == "eager" else tf.function(run, jit_compile=mode == "xla")
    got = fn()
    for (shape, unit, dtype), g, w, c in zip(BATCH, grads, weights, got, strict=True):
        assert keras.backend.standardize_dtype(c.dtype) == dtype and tuple(c.shape) == shape
        grad64 = np.asarray(tf.cast(g, "float64"))
        want = ref.agc_clip(grad64, np.asarray(tf.cast(w, "float64")), unit)
        tol = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-3}[dtype]
        got64 = np.asarray(tf.cast(c, "float64"))
        scale = np.abs(want).max() if want.size else 0.0
        np.testing.assert_allclose(got64, want, rtol=2 * tol, atol=tol * scale)
        untouched = want == grad64
        np.testing.assert_array_equal(got64[untouched], grad64[untouched])
    # Some tiny one-unit tensors are clipped and some are not: the packed path decides per
    # tensor, not once for the pack.
    tiny = [
        np.array_equal(np.asarray(c), np.asarray(g))
        for g, c in zip(grads[-6:], got[-6:], strict=True)
        if g.shape.num_elements()
    ]
    assert any(tiny) and not all(tiny)


def test_a_gradient_of_unknown_shape_is_clipped_on_its_own() -> None:
    """Inside a tf.function traced with a None dimension, such a gradient (at any index)
    cannot join the batch of static shapes; it is clipped alone, with the same result."""
    rng = np.random.default_rng(9)
    weights = [rng.standard_normal(s).astype(np.float32) for s in ((5,), (7,), (3, 4), (6,))]
    grads = [(0.5 * w + 0.01).astype(np.float32) for w in weights]
    grads[3] *= 1e-4  # under its limit: unchanged
    axes = [(), (), (1,), ()]
    specs = [
        tf.TensorSpec((None,) if i == 1 else w.shape, tf.float32) for i, w in enumerate(weights)
    ]

    @tf.function(input_signature=[specs, specs])
    def clip(gs: Any, ws: Any) -> Any:
        return clip_gradients(gs, ws, axes, AGCSpec())

    got = clip(grads, weights)
    for g, w, a, c in zip(grads, weights, [None, None, -1, None], got, strict=True):
        np.testing.assert_allclose(np.asarray(c), ref.agc_clip(g, w, a), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(got[3]), grads[3])


def test_clip_gradients_checks_its_lists() -> None:
    with pytest.raises(ValueError, match="one entry per variable"):
        clip_gradients([np.ones(2, np.float32)], [], [()], AGCSpec())


def test_nonfinite_units_are_left_alone() -> None:
    weight = np.ones((3, 4), np.float32)
    grad = np.full((3, 4), 5.0, np.float32)  # every unit (column) is over its threshold
    grad[1, 2] = np.inf
    grad[0, 0] = np.nan
    got = np.asarray(clip_gradient(grad, weight, (1,), AGCSpec()))
    want = ref.agc_clip(grad, weight, -1)
    for column in (0, 2):  # non-finite units: unchanged, inf and nan included
        np.testing.assert_array_equal(got[:, column], grad[:, column])
        np.testing.assert_array_equal(want[:, column], grad[:, column])
    for column in (1, 3):  # the others are still clipped
        np.testing.assert_allclose(got[:, column], want[:, column], rtol=1e-6)
        assert np.all(got[:, column] < 5.0)


def test_integer_gradient_is_an_error() -> None:
    with pytest.raises(ValueError, match="grad must have a floating-point dtype"):
        clip_gradient(np.ones((2, 2), np.int32), np.ones((2, 2), np.float32), (0,), AGCSpec())


# -- inside model.fit ------------------------------------------------------------------


def _conv_model() -> Any:
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            layers.Conv2D(4, 3, name="conv"),
            layers.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise"),
            layers.Conv2DTranspose(3, 3, name="transpose"),
            layers.SeparableConv2D(5, 3, depth_multiplier=2, name="separable"),
            layers.Flatten(),
            layers.Dense(6, name="hidden"),
            layers.Dense(2, name="head"),
        ]
    )


CONV_AXES = {
    "conv/kernel": KERNEL_AXES["conv"],
    "depthwise/kernel": KERNEL_AXES["depthwise_conv"],
    "transpose/kernel": KERNEL_AXES["conv_transpose"],
    "separable/depthwise_kernel": KERNEL_AXES["depthwise_conv"],
    "separable/pointwise_kernel": KERNEL_AXES["conv"],
    "hidden/kernel": KERNEL_AXES["dense"],
    "head/kernel": KERNEL_AXES["dense"],
}


def _expected_axes(path: str, ndim: int, table: dict[str, Any]) -> Any:
    if ndim <= 1:
        return None
    return next(axes for suffix, axes in table.items() if path.endswith(suffix))


def _gradients(model: Any, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, model(x, training=True))
    return [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, model.trainable_variables)]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_first_step_gradients_are_clipped_as_the_reference(jit_compile: bool) -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = _conv_model()
    x = rng.standard_normal((8, 6, 6, 2)).astype(np.float32)
    y = rng.standard_normal((8, 2)).astype(np.float32)
    weights = [v.numpy() for v in model.trainable_variables]
    grads = _gradients(model, x, y)
    inner = Recorder(0.1)
    head = final_classifier(model)
    assert head.name == "head"
    model.compile(
        optimizer=AGC(inner, model, clipping=0.01, exclude=head),
        loss="mse",
        jit_compile=jit_compile,
    )
    model.fit(x, y, batch_size=8, verbose=0)
    clipped = []
    for v, g, w, seen in zip(model.trainable_variables, grads, weights, inner.seen, strict=True):
        # fit's gradient is computed by another graph than the tape's: rounding differs.
        atol = 1e-5 * np.abs(g).max()
        if v.path.split("/")[-2] == "head":  # excluded: weight and bias unclipped
            np.testing.assert_allclose(seen.numpy(), g, rtol=1e-5, atol=atol)
            continue
        want = ref.agc_clip(g, w, _expected_axes(v.path, g.ndim, CONV_AXES))
        np.testing.assert_allclose(seen.numpy(), want, rtol=1e-5, atol=atol)
        clipped.append(bool((want != g).any()))
    assert all(clipped)  # the axes matter: a wrong unit layout would give other numbers


def test_embedding_rows_are_units_with_sparse_gradients() -> None:
    rng = np.random.default_rng(1)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(10, 4, name="embed"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, name="out"),
        ]
    )
    model.get_layer("embed").embeddings.assign(
        0.01 * rng.standard_normal((10, 4)).astype(np.float32)
    )
    x = np.array([[1, 2, 1], [5, 1, 9], [2, 2, 7], [0, 0, 0]], np.int32)  # repeated rows
    y = rng.standard_normal((4, 2)).astype(np.float32)
    weights = [v.numpy() for v in model.trainable_variables]
    grads = _gradients(model, x, y)
    inner = Recorder(0.1)
    model.compile(optimizer=AGC(inner, model), loss="mse")
    model.fit(x, y, batch_size=4, verbose=0)
    table = {"embed/embeddings": KERNEL_AXES["embedding"], "out/kernel": KERNEL_AXES["dense"]}
    for v, g, w, seen in zip(model.trainable_variables, grads, weights, inner.seen, strict=True):
        want = ref.agc_clip(g, w, _expected_axes(v.path, g.ndim, table))
        np.testing.assert_allclose(seen.numpy(), want, rtol=1e-5, atol=1e-9)
    embed_grad = grads[0]
    assert (ref.agc_clip(embed_grad, weights[0], 0) != embed_grad).any()


def _dense_model() -> Any:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(7, name="a"), keras.layers.Dense(3, name="b")]
    )


def _dense_data(seed: int, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, 5)).astype(np.float32),
        (10 * rng.standard_normal((n, 3))).astype(np.float32),
    )


def _expected_dense(model: Any, weights: list[np.ndarray], grads: list[np.ndarray]) -> list[Any]:
    return [
        ref.agc_clip(g, w, KERNEL_AXES["dense"] if g.ndim == 2 else None)
        for g, w in zip(grads, weights, strict=True)
    ]


@pytest.mark.parametrize("nesting", ["scaler_outside", "scaler_inside"])
def test_loss_scaling_clips_the_unscaled_gradient(nesting: str) -> None:
    model = _dense_model()
    x, y = _dense_data(2)
    weights = [v.numpy() for v in model.trainable_variables]
    grads = _gradients(model, x, y)
    inner = Recorder(0.1)
    scaler = keras.optimizers.LossScaleOptimizer
    if nesting == "scaler_outside":
        optimizer = scaler(AGC(inner, model), initial_scale=2.0**10)
    else:
        optimizer = AGC(scaler(inner, initial_scale=2.0**10), model)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=8, verbose=0)
    want = _expected_dense(model, weights, grads)
    for seen, w_clip in zip(inner.seen, want, strict=True):
        np.testing.assert_allclose(seen.numpy(), w_clip, rtol=1e-5, atol=1e-8)
    # Clipping the scaled gradient would have given a different answer.
    wrong = ref.agc_clip(grads[0] * 2.0**10, weights[0], -1) / 2.0**10
    assert not np.allclose(wrong, want[0], rtol=1e-3)


def test_gradient_accumulation_clips_the_accumulated_gradient_once() -> None:
    model = _dense_model()
    x, y = _dense_data(3, n=16)
    weights = [v.numpy() for v in model.trainable_variables]
    g1, g2 = _gradients(model, x[:8], y[:8]), _gradients(model, x[8:], y[8:])
    inner = Recorder(0.1, gradient_accumulation_steps=2)
    model.compile(optimizer=AGC(inner, model), loss="mse")
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert int(inner.updates.numpy()) == 1
    mean = [(a + b) / 2 for a, b in zip(g1, g2, strict=True)]
    want = _expected_dense(model, weights, mean)
    for seen, w_clip in zip(inner.seen, want, strict=True):
        np.testing.assert_allclose(seen.numpy(), w_clip, rtol=1e-5, atol=1e-8)
    per_batch = ref.agc_clip(g1[0], weights[0], -1) + ref.agc_clip(g2[0], weights[0], -1)
    assert not np.allclose(per_batch / 2, want[0], rtol=1e-3)


def test_custom_loop_apply_and_names() -> None:
    model = _dense_model()
    x, y = _dense_data(4)
    weights = [v.numpy() for v in model.trainable_variables]
    grads = _gradients(model, x, y)
    inner = Recorder(0.1)
    agc = AGC(inner, unit_axes={"a/kernel": 0}, exclude="b")
    agc.apply([tf.constant(g) for g in grads], model.trainable_variables)
    np.testing.assert_allclose(
        inner.seen[0].numpy(), ref.agc_clip(grads[0], weights[0], 0), rtol=1e-5
    )
    np.testing.assert_allclose(
        inner.seen[1].numpy(), ref.agc_clip(grads[1], weights[1], None), rtol=1e-5
    )
    for seen, g in zip(inner.seen[2:], grads[2:], strict=True):
        np.testing.assert_array_equal(seen.numpy(), g)
    assert [s.excluded for s in agc.variable_settings] == [False, False, True, True]
    assert int(agc.iterations.numpy()) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "output-unit axis of parameter .*a/kernel.*, model= .*or exclude it"),
        (
            {"exclude": "nothing_here", "unit_axes": 0},
            r"exclude names no parameter or layer of the model: \['nothing_here'\]",
        ),
        (
            {"unit_axes": {"a/kernel": 0, "c": 1}},
            r"unit_axes names no parameter or layer of the model: \['c'\]",
        ),
        ({"unit_axes": {"a/kernel": (0, -2), "b/kernel": 0}}, "unit_axes must name distinct"),
        ({"unit_axes": {"a/kernel": 2, "b/kernel": 0}}, "unit_axes must be an integer in"),
    ],
)
def test_bad_settings_raise_when_built(kwargs: dict[str, Any], message: str) -> None:
    model = _dense_model()
    agc = AGC(keras.optimizers.SGD(), **kwargs)
    with pytest.raises(ValueError, match=message):
        agc.build(model.trainable_variables)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clipping": 0.0}, "clipping must be a finite number > 0"),
        ({"eps": -1.0}, "eps must be a finite number >= 0"),
        ({"learning_rate": 0.1}, "AGC takes no learning_rate"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AGC(keras.optimizers.SGD(), **kwargs)


def test_wrapping_one_optimizer_twice_is_an_error() -> None:
    model = _dense_model()
    inner = keras.optimizers.SGD()
    AGC(inner, model).build(model.trainable_variables)
    with pytest.raises(ValueError, match="already wrapped by an AGC"):
        AGC(inner, model).build(model.trainable_variables)


# -- serialisation ---------------------------------------------------------------------


def test_config_round_trip_before_and_after_build() -> None:
    model = _dense_model()
    agc = AGC(keras.optimizers.Adam(1e-3), model, clipping=0.02, eps=1e-4, exclude=["b"])
    early = AGC.from_config(agc.get_config())
    assert (early.clipping, early.eps) == (0.02, 1e-4)
    assert isinstance(early.inner_optimizer, keras.optimizers.Adam)
    agc.build(model.trainable_variables)
    late = AGC.from_config(agc.get_config())  # no model: the config holds the axes
    late.build(model.trainable_variables)
    assert late.variable_settings == agc.variable_settings
    scaled = keras.optimizers.LossScaleOptimizer(AGC(keras.optimizers.SGD(), exclude="b"))
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(scaled))
    assert isinstance(restored.inner_optimizer, AGC)
    assert restored.inner_optimizer.get_config()["exclude"] == ["b"]


def test_keras_file_round_trip_with_agc(tmp_path: Any) -> None:
    model = _dense_model()
    x, y = _dense_data(5, n=16)
    model.compile(
        optimizer=AGC(keras.optimizers.SGD(0.05, momentum=0.9), model, exclude="b"), loss="mse"
    )
    model.fit(x, y, batch_size=8, verbose=0)
    path = tmp_path / "agc.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, AGC)
    assert int(loaded.optimizer.iterations.numpy()) == 2
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loaded.fit(x, y, batch_size=8, verbose=0)
    assert [s.excluded for s in loaded.optimizer.variable_settings] == [False, False, True, True]
    assert [s.unit_axes for s in loaded.optimizer.variable_settings][:2] == [(1,), ()]


def test_mixed_float16_model_trains_with_agc_and_batchnorm() -> None:
    """compile() wraps AGC in a LossScaleOptimizer under mixed_float16; the first step
    the scaler lets through is clipped on the unscaled gradient (float32 variables)."""
    from unorm.keras import BatchNorm

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(8), BatchNorm(), keras.layers.Dense(3)]
        )
        x, y = _dense_data(6)
        inner = Recorder(0.1)
        model.compile(optimizer=AGC(inner, model), loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        weights = [v.numpy() for v in model.trainable_variables]
        grads = _gradients(model, x, y)
        # Skipped steps (inf/nan at a too-large initial scale) leave the weights alone.
        for _ in range(30):
            model.fit(x, y, batch_size=8, verbose=0)
            if int(inner.updates.numpy()):
                break
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert int(inner.updates.numpy()) == 1
    for v, seen, g, w in zip(model.trainable_variables, inner.seen, grads, weights, strict=True):
        assert v.dtype == "float32"
        want = ref.agc_clip(g, w, -1 if g.ndim == 2 else None)
        # float16 forward and backward: the two gradients agree to float16 precision.
        np.testing.assert_allclose(seen.numpy(), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_functional_agc_matches_the_reference_per_layer() -> None:
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2DTranspose(3, 3, name="up"),
            keras.layers.Flatten(),
            keras.layers.Dense(4, name="fc"),
        ]
    )
    variables = list(model.trainable_variables)
    rng = np.random.default_rng(4)
    grads = [rng.standard_normal(tuple(v.shape)).astype(np.float32) for v in variables]
    out = adaptive_clip_grad(grads, variables, model, clipping=0.05, exclude="fc/bias")
    axes = unit_axes_of(model)
    # Conv2DTranspose (kh, kw, O, I): O is axis 2; Dense (in, out): axis 1.
    assert {path.split("/", 1)[1]: a for path, a in axes.items()} == {
        "up/kernel": 2,
        "fc/kernel": 1,
    }
    for v, g, c in zip(variables, grads, out, strict=True):
        w = np.array(v.numpy(), np.float64)
        if v.path.endswith("fc/bias"):
            np.testing.assert_array_equal(np.asarray(c), g)  # excluded
            continue
        unit = {"kernel": 2 if "up" in v.path else 1}.get(v.path.split("/")[-1])
        want = ref.agc_clip(g.astype(np.float64), w, unit, clipping=0.05, eps=1e-3)
        np.testing.assert_allclose(np.asarray(c), want, rtol=2e-6, atol=1e-7, err_msg=v.path)


def test_a_misspelled_exclude_is_refused_when_the_optimizer_is_made() -> None:
    model = _dense_model()
    with pytest.raises(ValueError, match=r"exclude names no parameter or layer .*\['head'\]"):
        AGC(keras.optimizers.SGD(), model, exclude="head")


# -- owners, frozen layers, gradient shapes --------------------------------------------


class _Bilinear(keras.layers.Layer):
    """A layer AGC does not know, with one rank-2 weight ``p``."""

    def build(self, input_shape: Any) -> None:
        self.p = self.add_weight(shape=(2, 2), name="p")

    def call(self, x: Any) -> Any:
        return keras.ops.matmul(x, self.p)


class _Block(keras.layers.Layer):
    """A layer AGC does not know holding a Dense: the Dense kernel's owner is the Dense."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fc = keras.layers.Dense(3, name="fc")

    def build(self, input_shape: Any) -> None:
        self.fc.build(input_shape)
        self.mix = self.add_weight(shape=(3, 3), name="mix")

    def call(self, x: Any) -> Any:
        return keras.ops.matmul(self.fc(x), self.mix)


def _unknown_axis_message(path: str, shape: tuple[int, ...], owner: str) -> str:
    """SPEC.md section 5's message, written out."""
    return (
        f"^AGC does not know the output-unit axis of parameter {re.escape(repr(path))} "
        f"\\(shape {re.escape(str(shape))}\\) of {owner}; pass "
        f"unit_axes={re.escape('{' + repr(path) + ': <axis>}')} or exclude it$"
    )


def test_the_unknown_axis_error_names_the_layer_type() -> None:
    model = keras.Sequential([keras.Input((2,)), _Bilinear(name="bil")])
    (p,) = model.trainable_variables
    message = _unknown_axis_message(p.path, (2, 2), "_Bilinear")
    with pytest.raises(ValueError, match=message):
        AGC(keras.optimizers.SGD(), model).build(model.trainable_variables)
    grad = np.ones((2, 2), "float32")
    with pytest.raises(ValueError, match=message):
        adaptive_clip_grad([grad], [p], model)


def test_a_nested_layer_owns_its_weights() -> None:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), _Block(name="block")])
    kernel, bias, mix = (
        next(v for v in model.weights if v.path.endswith(n))
        for n in ("fc/kernel", "fc/bias", "mix")
    )
    variables = [kernel, bias, mix]
    with pytest.raises(ValueError, match=_unknown_axis_message(mix.path, (3, 3), "_Block")):
        adaptive_clip_grad([np.ones(v.shape, "float32") for v in variables], variables, model)
    assert unit_axes_of(model) == {kernel.path: 1}
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(tuple(v.shape)).astype(np.float32) for v in variables]
    out = adaptive_clip_grad(grads, variables, model, unit_axes={"block/mix": 0})
    for v, g, c, axes in zip(variables, grads, out, [-1, None, 0], strict=True):
        want = ref.agc_clip(g, np.array(v.numpy(), np.float64), axes)
        np.testing.assert_allclose(np.asarray(c), want, rtol=2e-6, atol=1e-7, err_msg=v.path)


def _frozen_body_model() -> Any:
    model = _dense_model()
    model.get_layer("a").trainable = False
    return model


@pytest.mark.parametrize(
    "kwargs",
    [
        {"exclude": "a"},
        {"exclude": "a/kernel"},
        {"exclude": ["b/bias", "a"]},
        {"unit_axes": {"a": 0}},
        {"unit_axes": {"a/kernel": 0, "b/kernel": 0}},
    ],
)
def test_a_frozen_layer_may_be_named(kwargs: dict[str, Any]) -> None:
    model = _frozen_body_model()
    x, y = _dense_data(7)
    weights = [v.numpy() for v in model.trainable_variables]
    grads = _gradients(model, x, y)
    inner = Recorder(0.1)
    agc = AGC(inner, model, **kwargs)  # refused before: "names no parameter or layer"
    agc.apply([tf.constant(g) for g in grads], model.trainable_variables)
    axes = kwargs.get("unit_axes", {}).get("b/kernel", -1)
    bias_excluded = "b/bias" in kwargs.get("exclude", [])
    np.testing.assert_allclose(
        inner.seen[0].numpy(), ref.agc_clip(grads[0], weights[0], axes), rtol=1e-5
    )
    if bias_excluded:
        np.testing.assert_array_equal(inner.seen[1].numpy(), grads[1])
    else:
        np.testing.assert_allclose(
            inner.seen[1].numpy(), ref.agc_clip(grads[1], weights[1], None), rtol=1e-5
        )
    assert [s.path.split("/", 1)[1] for s in agc.variable_settings] == ["b/kernel", "b/bias"]
    weights = [v.numpy() for v in model.trainable_variables]  # after the update
    out = adaptive_clip_grad(grads, model.trainable_variables, model, **kwargs)
    np.testing.assert_allclose(
        np.asarray(out[0]), ref.agc_clip(grads[0], weights[0], axes), rtol=1e-5
    )


def test_a_frozen_layer_of_unknown_kind_needs_no_axis() -> None:
    model = keras.Sequential(
        [keras.Input((2,)), _Bilinear(name="bil"), keras.layers.Dense(3, name="head")]
    )
    model.get_layer("bil").trainable = False
    agc = AGC(keras.optimizers.SGD(), model, unit_axes={"bil/p": 1})
    agc.build(model.trainable_variables)
    assert [s.unit_axes for s in agc.variable_settings] == [(1,), ()]


def test_naming_no_weight_of_a_model_with_a_frozen_layer_is_still_refused() -> None:
    message = r"exclude names no parameter or layer of the model: \['nobody'\]"
    with pytest.raises(ValueError, match=message):
        AGC(keras.optimizers.SGD(), _frozen_body_model(), exclude="nobody")
    model = _frozen_body_model()
    agc = AGC(keras.optimizers.SGD(), exclude="a")  # no model: the frozen "a" is unknown
    with pytest.raises(ValueError, match=r"exclude names no parameter .*\['a'\]"):
        agc.build(model.trainable_variables)
    with pytest.raises(ValueError, match=r"unit_axes must be an integer in \[-2, 2\)"):
        AGC(keras.optimizers.SGD(), model, unit_axes={"a/kernel": 2})


@pytest.mark.parametrize(
    ("grad_shape", "want"),
    [((1, 3), "(1, 3) and (3, 3)"), ((3,), "(3,) and (3, 3)"), ((3, 4), "(3, 4) and (3, 3)")],
)
def test_a_gradient_of_another_shape_is_refused(grad_shape: tuple[int, ...], want: str) -> None:
    fc = keras.layers.Dense(3, name="fc")
    fc.build((None, 3))
    g = np.full(grad_shape, 100.0, "float32")
    with pytest.raises(ValueError) as reference:
        ref.agc_clip(g, fc.kernel.numpy(), -1)
    message = f"{reference.value} (variable 'fc/kernel')"
    assert want in message
    bias_grad = np.full((3,), 100.0, "float32")
    for args in ([bias_grad, g], [fc.bias, fc.kernel]), ([g, bias_grad], [fc.kernel, fc.bias]):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            adaptive_clip_grad(*args, fc)


def test_a_gradient_of_unknown_size_in_a_traced_function_is_accepted() -> None:
    fc = keras.layers.Dense(3, name="fc")
    fc.build((None, 3))
    g = np.full((3, 3), 100.0, "float32")

    @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32)])
    def clip(grad: Any) -> Any:
        return adaptive_clip_grad([grad], [fc.kernel], fc)[0]

    want = ref.agc_clip(g, np.array(fc.kernel.numpy(), np.float64), -1)
    np.testing.assert_allclose(clip(tf.constant(g)).numpy(), want, rtol=1e-6)


def test_exclude_of_a_wrong_type_and_exclude_none() -> None:
    model = _dense_model()
    message = "^exclude takes parameters, layers or their names, got 5$"
    with pytest.raises(ValueError, match=message):
        AGC(keras.optimizers.SGD(), model, exclude=5)
    with pytest.raises(ValueError, match=message):
        AGC(keras.optimizers.SGD(), exclude=5).build(model.trainable_variables)
    grads = _gradients(model, *_dense_data(8))
    with pytest.raises(ValueError, match=message):
        adaptive_clip_grad(grads, model.trainable_variables, model, exclude=5)
    weights = [v.numpy() for v in model.trainable_variables]
    out = adaptive_clip_grad(grads, model.trainable_variables, model, exclude=None)
    for c, g, w in zip(out, grads, weights, strict=True):
        want = ref.agc_clip(g, w, -1 if g.ndim == 2 else None)
        np.testing.assert_allclose(np.asarray(c), want, rtol=1e-5)
    agc = AGC(keras.optimizers.SGD(), model, exclude=None)
    config = agc.get_config()  # before build: the config says no exclude
    assert config["exclude"] == []
    restored = AGC.from_config({**config, "unit_axes": -1})  # a restored AGC has no model
    for optimizer in (agc, restored):
        optimizer.build(model.trainable_variables)
        assert [s.excluded for s in optimizer.variable_settings] == [False] * 4
