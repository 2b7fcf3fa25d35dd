"""Cross-replica BatchNorm for the Keras columns: ``MirroredStrategy`` over one logical CPU
per replica, in a fresh interpreter (logical devices must exist before TensorFlow's first
op).

Usage: ``python -m unorm.conformance.columns.keras_sync_worker REQUEST RESULT`` (see
:mod:`conformance.exchange`). Builds ``unorm.keras.BatchNorm(synchronized=True)`` (or, for
a native request, ``keras.layers.BatchNormalization(synchronized=True)``), runs one
training step with each replica's slice, and writes outputs, input gradients, the
parameter gradients summed over replicas, and the moving statistics.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before TensorFlow and Keras are imported: the backend is chosen once, at import.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from unorm.conformance.exchange import read_request


def main(request_path: str, result_path: str) -> None:
    request = read_request(Path(request_path))
    replicas = len(request.xs)
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
    )
    import keras

    config = request.config
    spec = config.spec()
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{k}" for k in range(replicas)])
    with strategy.scope():
        if request.native:
            if spec.momentum is None:
                raise SystemExit("unsupported: momentum=None")
            layer = keras.layers.BatchNormalization(
                axis=config.axis,
                momentum=1.0 - spec.momentum,
                epsilon=spec.eps,
                center=spec.center,
                scale=spec.scale,
                synchronized=True,
                dtype=config.dtype,
            )
        else:
            from unorm.keras import BatchNorm

            layer = BatchNorm(
                config.axis,
                preset=config.preset,
                synchronized=True,
                dtype=config.dtype,
                **dict(config.settings),
            )
        shape: list[int | None] = [None] * config.ndim
        shape[config.axis % config.ndim] = config.num_features
        layer.build(tuple(shape))
        if getattr(layer, "gamma", None) is not None:
            layer.gamma.assign(request.gamma)
        if getattr(layer, "beta", None) is not None:
            layer.beta.assign(request.beta)
    params = [
        v for v in (getattr(layer, "gamma", None), getattr(layer, "beta", None)) if v is not None
    ]

    @tf.function
    def step(xs, dys):  # type: ignore[no-untyped-def]
        def replica(x, dy):  # type: ignore[no-untyped-def]
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return (y, *tape.gradient(y, [x, *params], output_gradients=dy))

        return strategy.run(replica, args=(xs, dys))

    def distribute(arrays):  # type: ignore[no-untyped-def]
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(arrays[ctx.replica_id_in_sync_group])
        )

    outputs = step(distribute(request.xs), distribute(request.dys))
    local = strategy.experimental_local_results
    out: dict[str, np.ndarray] = {}
    for k, t in enumerate(local(outputs[0])):
        out[f"y{k}"] = t.numpy()
    for k, t in enumerate(local(outputs[1])):
        out[f"dx{k}"] = t.numpy()
    grads = [sum(t.numpy() for t in local(g)) for g in outputs[2:]]
    names = [n for n in ("gamma", "beta") if getattr(layer, n, None) is not None]
    key = {"gamma": "dgamma", "beta": "dbeta"}
    for name, g in zip(names, grads, strict=True):
        out[key[name]] = g
    for attr, name in (("moving_mean", "running_mean"), ("moving_variance", "running_var")):
        value = getattr(layer, attr, None)
        if value is not None:
            out[name] = np.asarray(value.numpy())
    tracked = getattr(layer, "num_batches_tracked", None)
    if tracked is not None:
        out["num_batches_tracked"] = np.asarray(tracked.numpy())
    np.savez(result_path, **out)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
