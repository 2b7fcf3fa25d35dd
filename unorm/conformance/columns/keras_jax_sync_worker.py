"""Cross-replica BatchNorm for the Keras column on Keras's JAX backend:
``unorm.keras.BatchNorm(synchronized=True)`` under ``keras.distribution.DataParallel``
over two host devices (strategy ``data-parallel``).

Usage: ``python -m unorm.conformance.columns.keras_jax_sync_worker REQUEST RESULT`` (see
:mod:`conformance.exchange`). Sets ``KERAS_BACKEND=jax`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=<replicas>`` before Keras and JAX are
imported (both read them once), so it runs in a fresh interpreter.

A JAX array is sharded in equal parts, so uneven shards are written as SPEC.md section 3
(*Uneven shards on JAX*) says: each replica's slice padded to the longest with samples
far from the data, a per-sample mask False on the padding and an output gradient 0 there
(what a loss weighing the padding 0 gives). One jitted step of ``sum(y * dy)`` on the
device-sharded batch gives the outputs and input gradients (the real rows of each shard
are read back), the parameter gradients (already summed over the whole batch) and the
moving statistics.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from unorm.conformance.exchange import read_request

#: What the padding holds: far from any case's data, so statistics that took it in
#: would show.
PAD_VALUE = 1e3


def main(request_path: str, result_path: str) -> None:
    """Run the request's step on ``len(xs)`` host devices; write the result."""
    request = read_request(Path(request_path))
    replicas = len(request.xs)
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={replicas}"]
    ).strip()
    import jax
    import keras

    from unorm.conformance.columns.keras_sync_worker import build_layer

    devices = jax.devices("cpu")
    assert len(devices) == replicas, devices
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)

    rows = max(1, *(x.shape[0] for x in request.xs))
    sample = request.xs[0].shape[1:]
    x = np.full((replicas * rows, *sample), PAD_VALUE, request.xs[0].dtype)
    dy = np.zeros_like(x)
    mask = np.zeros(x.shape[:-1], bool)
    for k, (xk, dyk) in enumerate(zip(request.xs, request.dys, strict=True)):
        x[k * rows : k * rows + len(xk)] = xk
        dy[k * rows : k * rows + len(xk)] = dyk
        mask[k * rows : k * rows + len(xk)] = True

    def sharded(array: np.ndarray) -> Any:
        return keras.distribution.distribute_tensor(
            array, distribution.get_data_layout(array.shape)
        )

    layer = build_layer(request)  # unorm.keras.BatchNorm(synchronized=True), loaded

    @jax.jit
    def step(trainable: Any, state: Any, x: Any, mask: Any, dy: Any) -> Any:
        def loss(trainable: Any, x: Any) -> Any:
            y, new_state = layer.stateless_call(trainable, state, x, training=True, mask=mask)
            return (y * dy).sum(), (y, new_state)

        (d_trainable, dx), (y, new_state) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
            trainable, x
        )
        return y, dx, d_trainable, new_state

    trainable = [v.value for v in layer.trainable_variables]
    state = [v.value for v in layer.non_trainable_variables]
    xs = sharded(x)
    # Each device must hold one replica's padded slice, or this is not the strategy.
    assert len(xs.sharding.device_set) == replicas, xs.sharding
    y, dx, d_trainable, state = step(trainable, state, xs, sharded(mask), sharded(dy))
    y, dx = np.asarray(y), np.asarray(dx)
    out: dict[str, np.ndarray] = {}
    for k, xk in enumerate(request.xs):
        out[f"y{k}"] = y[k * rows : k * rows + len(xk)]
        out[f"dx{k}"] = dx[k * rows : k * rows + len(xk)]
    key = {"gamma": "dgamma", "beta": "dbeta"}
    for v, grad in zip(layer.trainable_variables, d_trainable, strict=True):
        out[key[v.name]] = np.asarray(grad)
    names = {
        "moving_mean": "running_mean",
        "moving_variance": "running_var",
        "num_batches_tracked": "num_batches_tracked",
    }
    for v, value in zip(layer.non_trainable_variables, state, strict=True):
        if v.name in names:
            out[names[v.name]] = np.asarray(value)
    np.savez(result_path, **out)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
