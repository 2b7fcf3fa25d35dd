"""Cross-replica BatchNorm and AGC under tf.distribute (MirroredStrategy over two logical
CPUs), compared with the single-device reference.

Logical devices must be configured before TensorFlow runs its first op, so the work runs
in a fresh interpreter: this file is also the worker script (``python
tests/test_keras_sync.py`` prints one JSON line of measured errors).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.keras

SPLITS = {"uneven": [2, 5], "empty_replica": [0, 7]}


def _worker() -> dict[str, Any]:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from unorm import reference as ref
    from unorm.keras import AGC, BatchNorm
    from unorm.spec import BatchNormSpec

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out: dict[str, Any] = {"replicas": strategy.num_replicas_in_sync}
    rng = np.random.default_rng(0)
    channels = 3
    gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, channels).astype(np.float32)

    for label, split in SPLITS.items():
        with strategy.scope():
            layer = BatchNorm(synchronized=True, momentum=None)
            layer.build((None, 4, channels))
            layer.gamma.assign(gamma)
            layer.beta.assign(beta)

        @tf.function
        def step(xs: Any, dys: Any, layer: Any = layer) -> Any:
            def replica(x_k: Any, dy_k: Any) -> Any:
                with tf.GradientTape() as tape:
                    tape.watch(x_k)
                    y_k = layer(x_k, training=True)
                    loss = tf.reduce_sum(y_k * dy_k)
                return (y_k, *tape.gradient(loss, [x_k, layer.gamma, layer.beta]))

            return strategy.run(replica, args=(xs, dys))

        spec = BatchNormSpec(axis=-1, momentum=None)
        running = ref.init_running_stats(channels)
        errors = {"y": 0.0, "dx": 0.0, "dgamma": 0.0, "dbeta": 0.0}
        for _ in range(3):
            x = (rng.standard_normal((sum(split), 4, channels)) * 2 + 1).astype(np.float32)
            dy = rng.standard_normal(x.shape).astype(np.float32)
            bounds = np.cumsum([0, *split])
            parts = [(x[a:b], dy[a:b]) for a, b in itertools.pairwise(bounds)]
            xs = strategy.experimental_distribute_values_from_function(
                lambda ctx, p=parts: tf.constant(p[ctx.replica_id_in_sync_group][0])
            )
            dys = strategy.experimental_distribute_values_from_function(
                lambda ctx, p=parts: tf.constant(p[ctx.replica_id_in_sync_group][1])
            )
            y, dx, dgamma, dbeta = step(xs, dys)
            local = strategy.experimental_local_results
            y_all = np.concatenate([t.numpy() for t in local(y)])
            dx_all = np.concatenate([t.numpy() for t in local(dx)])
            # gamma and beta gradients stay per replica; their sum is the global one.
            dgamma_sum = sum(t.numpy() for t in local(dgamma))
            dbeta_sum = sum(t.numpy() for t in local(dbeta))
            y_ref, running = ref.batch_norm_step(x, running, spec, gamma, beta, training=True)
            back = ref.batch_norm_backward(dy, x, gamma, eps=spec.eps, axis=-1)
            errors["y"] = max(errors["y"], float(np.abs(y_all - y_ref).max()))
            errors["dx"] = max(errors["dx"], float(np.abs(dx_all - back.dx).max()))
            errors["dgamma"] = max(errors["dgamma"], float(np.abs(dgamma_sum - back.dgamma).max()))
            errors["dbeta"] = max(errors["dbeta"], float(np.abs(dbeta_sum - back.dbeta).max()))
        assert running is not None
        errors["moving_mean"] = float(np.abs(layer.moving_mean.numpy() - running.mean).max())
        errors["moving_variance"] = float(np.abs(layer.moving_variance.numpy() - running.var).max())
        errors["num_batches_tracked"] = int(layer.num_batches_tracked.numpy())
        out[label] = errors

    # Every replica's shard empty: the empty batch of SPEC.md section 2 (an empty output,
    # gamma and beta gradients of 0, the state as empty_batch says), between real batches.
    for label, preset in (
        ("empty_canonical", None),
        ("empty_torch", "torch"),
        ("empty_keras", "keras"),
    ):
        kwargs: dict[str, Any] = {} if preset == "keras" else {"momentum": None}
        with strategy.scope():
            empty_layer = BatchNorm(synchronized=True, preset=preset, **kwargs)
            empty_layer.build((None, 4, channels))
            empty_layer.gamma.assign(gamma)
            empty_layer.beta.assign(beta)

        @tf.function
        def empty_step(xs: Any, dys: Any, layer: Any = empty_layer) -> Any:
            def replica(x_k: Any, dy_k: Any) -> Any:
                with tf.GradientTape() as tape:
                    tape.watch(x_k)
                    y_k = layer(x_k, training=True)
                    loss = tf.reduce_sum(y_k * dy_k)
                return (y_k, *tape.gradient(loss, [x_k, layer.gamma, layer.beta]))

            return strategy.run(replica, args=(xs, dys))

        spec = BatchNormSpec.from_preset(preset, axis=-1, **kwargs)
        running = ref.init_running_stats(channels)
        found = {"y": 0.0, "dgamma": 0.0, "dbeta": 0.0, "shapes": True, "state": True}
        for split in ([2, 5], [0, 0], [3, 4], [0, 0], [4, 1]):
            x = (rng.standard_normal((sum(split), 4, channels)) * 2 + 1).astype(np.float32)
            dy = rng.standard_normal(x.shape).astype(np.float32)
            bounds = np.cumsum([0, *split])
            parts = [(x[a:b], dy[a:b]) for a, b in itertools.pairwise(bounds)]
            xs = strategy.experimental_distribute_values_from_function(
                lambda ctx, p=parts: tf.constant(p[ctx.replica_id_in_sync_group][0])
            )
            dys = strategy.experimental_distribute_values_from_function(
                lambda ctx, p=parts: tf.constant(p[ctx.replica_id_in_sync_group][1])
            )
            y, dx, dgamma, dbeta = empty_step(xs, dys)
            local = strategy.experimental_local_results
            y_all = np.concatenate([t.numpy() for t in local(y)])
            dx_all = np.concatenate([t.numpy() for t in local(dx)])
            dgamma_sum = sum(t.numpy() for t in local(dgamma))
            dbeta_sum = sum(t.numpy() for t in local(dbeta))
            y_ref, running = ref.batch_norm_step(x, running, spec, gamma, beta, training=True)
            back = ref.batch_norm_backward(dy, x, gamma, eps=spec.eps, axis=-1)
            assert running is not None
            found["shapes"] &= y_all.shape == x.shape and dx_all.shape == x.shape
            if x.size:
                found["y"] = max(found["y"], float(np.abs(y_all - y_ref).max()))
            found["dgamma"] = max(found["dgamma"], float(np.abs(dgamma_sum - back.dgamma).max()))
            found["dbeta"] = max(found["dbeta"], float(np.abs(dbeta_sum - back.dbeta).max()))
            for got, want in (
                (empty_layer.moving_mean, running.mean),
                (empty_layer.moving_variance, running.var),
            ):
                close = np.allclose(got.numpy(), want, rtol=1e-5, atol=1e-6, equal_nan=True)
                found["state"] &= bool(close)
            if empty_layer.num_batches_tracked is not None:
                tracked = int(empty_layer.num_batches_tracked.numpy())
                found["state"] &= tracked == running.num_batches_tracked
        found["nan"] = bool(np.isnan(empty_layer.moving_mean.numpy()).all())
        out[label] = found

    # Keras masking: the statistics are those of the values the mask keeps across the
    # global batch (replicas of 2 and 5 samples keeping different numbers of positions).
    with strategy.scope():
        masked_layer = BatchNorm(synchronized=True, momentum=None)
        masked_layer.build((None, 4, channels))

    @tf.function
    def masked_step(xs: Any, masks: Any, layer: Any = masked_layer) -> Any:
        return strategy.run(lambda x_k, m_k: layer(x_k, training=True, mask=m_k), (xs, masks))

    spec = BatchNormSpec(axis=-1, momentum=None)
    running = ref.init_running_stats(channels)
    masked = {"y": 0.0}
    for _ in range(2):
        x = (rng.standard_normal((7, 4, channels)) * 2 + 1).astype(np.float32)
        mask = rng.random((7, 4)) < 0.6
        mask[0, 0] = True  # both replicas keep something
        mask[2, 0] = True
        # Padding that is not finite stays out of the statistics (a product with a 0
        # weight would still be NaN).
        x[~mask] = np.nan
        x[np.argwhere(~mask)[0][0], np.argwhere(~mask)[0][1]] = np.inf
        parts = [(x[:2], mask[:2]), (x[2:], mask[2:])]
        xs = strategy.experimental_distribute_values_from_function(
            lambda ctx, p=parts: tf.constant(p[ctx.replica_id_in_sync_group][0])
        )
        masks = strategy.experimental_distribute_values_from_function(
            lambda ctx, p=parts: tf.constant(p[ctx.replica_id_in_sync_group][1])
        )
        y = masked_step(xs, masks)
        y_all = np.concatenate([t.numpy() for t in strategy.experimental_local_results(y)])
        ones, zeros = np.ones(channels, np.float32), np.zeros(channels, np.float32)
        y_ref, running = ref.batch_norm_step(x[mask], running, spec, ones, zeros, training=True)
        masked["y"] = max(masked["y"], float(np.abs(y_all[mask] - y_ref).max()))
    assert running is not None
    masked["moving_mean"] = float(np.abs(masked_layer.moving_mean.numpy() - running.mean).max())
    masked["moving_variance"] = float(
        np.abs(masked_layer.moving_variance.numpy() - running.var).max()
    )
    out["masked"] = masked

    # AGC inside model.fit: the clip sees the all-reduced gradient of the global batch.
    class Recorder(keras.optimizers.SGD):
        def build(self, var_list: Any) -> None:
            super().build(var_list)
            self.seen = [self.add_variable_from_reference(v, name="seen") for v in var_list]

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            self.seen[self._get_variable_index(variable)].assign(gradient)
            super().update_step(gradient, variable, learning_rate)

    keras.utils.set_random_seed(1)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    target = (10 * rng.standard_normal((8, 3))).astype(np.float32)
    with strategy.scope():
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
        inner = Recorder(0.1)
        model.compile(optimizer=AGC(inner, model), loss="mse")
    weights = [v.numpy() for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(target, model(x))
    grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
    model.fit(x, target, batch_size=8, verbose=0)
    agc_errors = []
    for g, w, seen in zip(grads, weights, inner.seen, strict=True):
        want = ref.agc_clip(g, w, -1 if g.ndim == 2 else None)
        agc_errors.append(float(np.abs(seen.numpy() - want).max() / np.abs(want).max()))
    # With units clipped, clipping each replica's local gradient before the sum would
    # give other numbers, so agreement shows the clip ran after the all-reduce.
    clipped = ref.agc_clip(grads[0], weights[0], -1)
    out["agc"] = {"relative_error": max(agc_errors), "clipped": bool((clipped != grads[0]).any())}
    return out


@pytest.fixture(scope="module")
def measured() -> dict[str, Any]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("split", list(SPLITS))
def test_cross_replica_batchnorm_equals_single_device(measured: dict[str, Any], split: str) -> None:
    assert measured["replicas"] == 2
    errors = measured[split]
    assert errors["y"] < 2e-5
    assert errors["dx"] < 1e-4
    assert errors["dgamma"] < 1e-4 and errors["dbeta"] < 1e-4
    assert errors["moving_mean"] < 1e-6 and errors["moving_variance"] < 1e-5
    assert errors["num_batches_tracked"] == 3


@pytest.mark.parametrize("preset", ["canonical", "torch", "keras"])
def test_every_replica_empty_is_the_empty_batch(measured: dict[str, Any], preset: str) -> None:
    """All shards empty: an empty output, zero gamma/beta gradients and the state of the
    reference (canonical: unchanged; torch: counted; keras: NaN), between real batches."""
    found = measured[f"empty_{preset}"]
    assert found["shapes"] and found["state"]
    assert found["y"] < 2e-5
    assert found["dgamma"] < 1e-4 and found["dbeta"] < 1e-4
    assert found["nan"] == (preset == "keras")


def test_masked_cross_replica_statistics_are_those_of_the_kept_values(
    measured: dict[str, Any],
) -> None:
    errors = measured["masked"]
    assert errors["y"] < 2e-5
    assert errors["moving_mean"] < 1e-6 and errors["moving_variance"] < 1e-5


def test_agc_clips_the_all_reduced_gradient(measured: dict[str, Any]) -> None:
    assert measured["agc"]["clipped"]
    assert measured["agc"]["relative_error"] < 1e-5


if __name__ == "__main__":
    print(json.dumps(_worker()))
