"""unorm.flax.BatchNorm against nnx.BatchNorm (preset="flax") and the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.flax

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")

from unorm import reference as ref  # noqa: E402
from unorm.flax import BatchNorm, convert  # noqa: E402
from unorm.spec import BatchNormSpec  # noqa: E402


def _batches(n: int, shape: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(1.5, 2.0, shape)).astype(np.float32) for _ in range(n)]


def _step(layer: nnx.Module, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, ...]:
    """One training call under nnx.jit: output, input gradient, scale and bias gradients
    (the state updated by the call)."""

    @nnx.jit
    def run(model: nnx.Module, inp: jax.Array, cot: jax.Array) -> tuple[jax.Array, ...]:
        def loss(m: nnx.Module, v: jax.Array) -> tuple[jax.Array, jax.Array]:
            y = m(v)
            return jnp.sum(y * cot), y

        (_, y), (gm, gx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, inp)
        return y, gx, gm["scale"][...], gm["bias"][...]

    return tuple(np.asarray(a) for a in run(layer, jnp.asarray(x), jnp.asarray(dy)))


def _state(layer: nnx.Module) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(layer.mean[...]), np.asarray(layer.var[...])


@pytest.mark.parametrize("fast", [False, True])
def test_flax_preset_is_nnx_batchnorm_over_training_steps_and_inference(fast: bool) -> None:
    native = nnx.BatchNorm(3, use_fast_variance=fast, rngs=nnx.Rngs(0))
    ours = BatchNorm(3, preset="flax")
    rng = np.random.default_rng(1)
    for param in ("scale", "bias"):
        value = jnp.asarray(rng.normal(1.0, 0.3, 3).astype(np.float32))
        getattr(native, param)[...] = value
        getattr(ours, param)[...] = value
    for x in _batches(4, (8, 5, 3)):
        dy = rng.normal(size=x.shape).astype(np.float32)
        got, want = _step(ours, x, dy), _step(native, x, dy)
        if fast:  # nnx's E[x^2] - E[x]^2 against unorm's two passes: float32 rounding
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
            np.testing.assert_allclose(_state(ours), _state(native), rtol=2e-6, atol=1e-7)
        else:  # the same two-pass arithmetic: bit for bit
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)
            np.testing.assert_array_equal(_state(ours), _state(native))
    native.eval()
    ours.eval()
    x = _batches(1, (4, 5, 3), seed=9)[0]
    np.testing.assert_allclose(ours(jnp.asarray(x)), native(jnp.asarray(x)), rtol=1e-6, atol=1e-6)
    assert int(ours.num_batches_tracked[...]) == 4


@pytest.mark.parametrize("preset", [None, "torch", "keras", "flax"])
def test_every_preset_against_the_reference(preset: str | None) -> None:
    spec = BatchNormSpec.from_preset(preset, axis=1)
    layer = BatchNorm(4, axis=1, preset=preset)
    state = ref.init_running_stats(4)
    rng = np.random.default_rng(2)
    for x in _batches(3, (6, 4, 3, 3)):
        dy = rng.normal(size=x.shape).astype(np.float32)
        y, dx, dgamma, dbeta = _step(layer, x, dy)
        want_y, state = ref.batch_norm_step(x, state, spec, training=True)
        grads = ref.batch_norm_backward(dy, x, np.ones(4), eps=spec.eps, axis=1)
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, grads.dx, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dgamma, grads.dgamma, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dbeta, grads.dbeta, rtol=1e-5, atol=1e-4)
        assert state is not None
        np.testing.assert_allclose(_state(layer), (state.mean, state.var), rtol=1e-5, atol=1e-6)
        assert int(layer.num_batches_tracked[...]) == state.num_batches_tracked
    layer.eval()
    want_y, _ = ref.batch_norm_step(x, state, spec, training=False)
    np.testing.assert_allclose(layer(jnp.asarray(x)), want_y, rtol=1e-5, atol=1e-5)


def test_momentum_none_is_the_cumulative_average() -> None:
    layer = BatchNorm(2, momentum=None)
    xs = _batches(3, (5, 2))
    for x in xs:
        layer(jnp.asarray(x))
    means = np.mean([x.mean(0) for x in xs], 0)
    np.testing.assert_allclose(layer.mean[...], means, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_inputs_keep_float32_statistics(dtype: str) -> None:
    x = _batches(1, (64, 3), seed=3)[0] + 1000.0
    xt = jnp.asarray(x).astype(dtype)
    layer = BatchNorm(3)
    y = layer(xt)
    assert y.dtype == xt.dtype and layer.mean[...].dtype == jnp.float32
    x16 = np.asarray(xt.astype(jnp.float32), np.float64)
    stats = ref.batch_stats(x16, axis=-1)
    np.testing.assert_allclose(layer.mean[...], 0.1 * stats.mean, rtol=1e-6)
    want = 0.9 + 0.1 * stats.var(unbiased=True)
    np.testing.assert_allclose(layer.var[...], want, rtol=1e-5)


def test_nonfinite_batch_updates_nothing_under_the_guard_only() -> None:
    x = _batches(1, (6, 3))[0]
    x[0, 1] = np.nan
    guarded, native = BatchNorm(3), BatchNorm(3, preset="flax")
    guarded(jnp.asarray(x))
    native(jnp.asarray(x))
    np.testing.assert_array_equal(_state(guarded), (np.zeros(3), np.ones(3)))
    assert int(guarded.num_batches_tracked[...]) == 0
    assert np.isnan(native.mean[...][1]) and int(native.num_batches_tracked[...]) == 1


def test_one_value_per_feature_is_an_error_unless_the_preset_allows_it() -> None:
    layer = BatchNorm(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nnx.jit(lambda m, v: m(v))(layer, jnp.ones((1, 3)))
    assert int(layer.num_batches_tracked[...]) == 0
    allowed = BatchNorm(3, preset="flax")
    native = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(allowed(jnp.ones((1, 3))), native(jnp.ones((1, 3))))
    np.testing.assert_array_equal(_state(allowed), _state(native))


@pytest.mark.parametrize(
    ("preset", "tracked", "nan"), [(None, 0, False), ("torch", 1, False), ("flax", 1, True)]
)
def test_empty_batches_follow_empty_batch(preset: str | None, tracked: int, nan: bool) -> None:
    layer = BatchNorm(3, preset=preset)
    y = layer(jnp.zeros((0, 3)))
    assert y.shape == (0, 3)
    assert int(layer.num_batches_tracked[...]) == tracked
    assert bool(np.isnan(layer.mean[...]).all()) is nan
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.zeros((0, 3)))))(BatchNorm(3, preset=preset))
    np.testing.assert_array_equal(grads["scale"][...], np.zeros(3))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.ones(3, np.float32), "rank >= 2"),
        (np.ones((4, 5), np.float32), "3 features on axis -1"),
        (np.ones((4, 3), np.int32), "floating-point dtype"),
    ],
)
def test_bad_input_is_refused_with_the_state_unchanged(x: np.ndarray, match: str) -> None:
    layer = BatchNorm(3)
    before = nnx.state(layer)
    before = jax.tree.map(np.asarray, before)
    with pytest.raises(ValueError, match=match):
        layer(jnp.asarray(x))
    with pytest.raises(ValueError, match=match):
        nnx.jit(lambda m, v: m(v))(layer, jnp.asarray(x))
    after = jax.tree.map(np.asarray, nnx.state(layer))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_unknown_preset_and_backward_update_are_refused() -> None:
    with pytest.raises(ValueError, match="preset must be one of"):
        BatchNorm(3, preset="jax")
    with pytest.raises(ValueError, match="update_on='backward'"):
        BatchNorm(3, preset="mxnet")


def test_track_running_stats_false_always_uses_batch_statistics() -> None:
    layer = BatchNorm(3, track_running_stats=False, use_running_average=True)
    x = _batches(1, (5, 3))[0]
    want, _ = ref.batch_norm_train(x, axis=-1)
    np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
    assert layer.mean is None


def test_train_eval_and_state_round_trip() -> None:
    model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), BatchNorm(3))
    x = jnp.asarray(_batches(1, (8, 4))[0])
    model(x)
    saved = jax.tree.map(np.asarray, nnx.state(model))
    fresh = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(5)), BatchNorm(3))
    nnx.update(fresh, jax.tree.map(jnp.asarray, saved))
    model.eval()
    fresh.eval()
    assert fresh.layers[1].use_running_average
    np.testing.assert_array_equal(model(x), fresh(x))


def test_orbax_round_trip(tmp_path: object) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    layer = BatchNorm(3)
    layer(jnp.asarray(_batches(1, (8, 3))[0]))
    state = nnx.state(layer)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(f"{tmp_path}/bn", nnx.to_pure_dict(state))
        ckpt.wait_until_finished()
        restored = ckpt.restore(f"{tmp_path}/bn")
    other = BatchNorm(3)
    nnx.replace_by_pure_dict(state := nnx.state(other), restored)
    nnx.update(other, state)
    np.testing.assert_array_equal(_state(other), _state(layer))
    assert int(other.num_batches_tracked[...]) == 1


def test_nnx_vmap_over_an_ensemble() -> None:
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(_: jax.Array) -> BatchNorm:
        return BatchNorm(3)

    ensemble = make(jnp.arange(2))
    xs = jnp.asarray(np.stack(_batches(2, (6, 3))))

    @nnx.vmap(in_axes=(0, 0))
    def call(m: BatchNorm, v: jax.Array) -> jax.Array:
        return m(v)

    call(ensemble, xs)
    for i in range(2):
        single = BatchNorm(3)
        single(xs[i])
        np.testing.assert_allclose(ensemble.mean[...][i], single.mean[...], rtol=1e-6)
        np.testing.assert_allclose(ensemble.var[...][i], single.var[...], rtol=1e-6)


def test_convert_keeps_the_numbers() -> None:
    bn = nnx.BatchNorm(3, momentum=0.9, epsilon=1e-3, rngs=nnx.Rngs(0))
    native = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), bn)
    x = jnp.asarray(_batches(1, (8, 4))[0])
    native(x)
    twin = nnx.clone(native)
    convert(twin)
    layer = twin.layers[1]
    assert isinstance(layer, BatchNorm) and layer.spec.preset == "flax"
    assert layer.eps == 1e-3 and abs(layer.momentum - 0.1) < 1e-12
    np.testing.assert_allclose(twin(x), native(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_state(layer), _state(native.layers[1]), rtol=1e-6, atol=1e-7)


def test_freeze_normalises_with_running_statistics_and_fixes_the_parameters() -> None:
    from unorm.flax import FrozenParam, freeze

    net = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    x = jnp.asarray(_batches(1, (8, 4))[0])
    net(x)  # moves the native layer's statistics
    net = freeze(net)
    net.train()
    layer = net.layers[1]
    before = _state(layer)
    y = net(x)
    np.testing.assert_array_equal(_state(layer), before)
    h = np.asarray(net.layers[0](x), np.float64)
    want = (h - before[0]) / np.sqrt(before[1] + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert isinstance(layer.scale, FrozenParam)
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(net)
    assert set(grads["layers"]) == {0}  # the BatchNorm has no nnx.Param left
    trainable = freeze(nnx.Sequential(BatchNorm(3)), trainable=True)
    assert isinstance(trainable.layers[0].scale, nnx.Param) and trainable.layers[0].frozen
    untracked = nnx.Sequential(BatchNorm(3, track_running_stats=False))
    with pytest.raises(ValueError, match="freeze needs running statistics"):
        freeze(untracked)
    assert not untracked.layers[0].frozen
