"""Cross-replica BatchNorm for the Keras columns: ``MirroredStrategy`` over one logical CPU
per replica, in a fresh interpreter (logical devices must exist before TensorFlow's first
op).

Usage: ``python -m unorm.conformance.columns.keras_sync_worker REQUEST RESULT`` (see
:mod:`conformance.exchange`). Builds ``unorm.keras.BatchNorm(synchronized=True)`` (or, for
a native request, ``keras.layers.BatchNormalization(synchronized=True)``), runs one
training step with each replica's slice, and writes outputs, input gradients, the
parameter gradients summed over replicas, and the moving statistics.
:func:`build_layer` and :func:`train_step` also serve ``keras_multiworker_worker``, and
:func:`build_layer` ``keras_jax_sync_worker`` (TensorFlow is imported only to train).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# Before TensorFlow and Keras are imported: the backend is chosen once, at import.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from unorm.conformance.exchange import SyncRequest, read_request


def build_layer(request: SyncRequest) -> Any:
    """The request's layer, built and loaded (under TensorFlow, call it inside the
    strategy's scope)."""
    import keras

    config = request.config
    spec = config.spec()
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
    return layer


def train_step(strategy: Any, request: SyncRequest) -> dict[str, list[np.ndarray]]:
    """One training step of the request's layer under ``strategy``, replica ``k`` fed the
    request's slice ``k`` (its id in the sync group). Returns this process's replicas'
    results in order: ``y``, ``dx``, ``dgamma``/``dbeta`` (each replica's own), and one
    entry each of ``running_mean``, ``running_var``, ``num_batches_tracked``."""
    import tensorflow as tf

    with strategy.scope():
        layer = build_layer(request)
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
    names = ["y", "dx"] + [
        key
        for key, n in (("dgamma", "gamma"), ("dbeta", "beta"))
        if getattr(layer, n, None) is not None
    ]
    out = {name: [t.numpy() for t in local(v)] for name, v in zip(names, outputs, strict=True)}
    for attr, name in (
        ("moving_mean", "running_mean"),
        ("moving_variance", "running_var"),
        ("num_batches_tracked", "num_batches_tracked"),
    ):
        value = getattr(layer, attr, None)
        if value is not None:
            out[name] = [np.asarray(value.numpy())]
    return out


def main(request_path: str, result_path: str) -> None:
    import tensorflow as tf

    request = read_request(Path(request_path))
    replicas = len(request.xs)
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
    )
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{k}" for k in range(replicas)])
    got = train_step(strategy, request)
    out: dict[str, np.ndarray] = {}
    for k in range(replicas):
        out[f"y{k}"], out[f"dx{k}"] = got["y"][k], got["dx"][k]
    for key, values in got.items():
        if key not in ("y", "dx"):
            # Gradients summed over the replicas; the statistics come once.
            out[key] = sum(values[1:], values[0])
    np.savez(result_path, **out)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
