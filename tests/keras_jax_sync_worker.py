"""unorm.keras BatchNorm(synchronized=True) on Keras's JAX backend under
``keras.distribution.DataParallel`` over two host devices (used by test_keras_sync_jax).

Usage: ``python tests/keras_jax_sync_worker.py IN OUT``. Sets ``KERAS_BACKEND=jax`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` before JAX is imported (JAX reads
them once), so it runs in a fresh interpreter; nothing is imported at module level
(pytest's doctest collection imports this file).

``IN`` (``.npz``) holds ``gamma``, ``beta`` and per step ``s`` the global batch ``x<s>``
(each device's equal shard padded with samples that are not part of the batch), the
per-position mask ``mask<s>`` (False on the padding) and the output gradient ``dy<s>``
(0 on the padding, as a loss weighting padding by 0 gives). For ``fit``: ``fit_x``,
``fit_mask``, ``fit_target``, ``fit_lr`` and ``fit_batch``.

``OUT`` (``.npz``) gets, per step, the output ``y<s>``, the gradients ``dx<s>``,
``dgamma<s>``, ``dbeta<s>`` of ``sum(y * dy)`` and the moving statistics after the step
(``moving_mean<s>``, ``moving_variance<s>``, ``num_batches_tracked<s>``), computed by one
jitted step on the device-sharded batch; ``devices`` and ``shard_rows`` (what each device
held); after one ``model.fit`` epoch (batch = two shards) of a functional model
``BatchNorm(x, mask)``, ``fit_gamma``, ``fit_beta``, ``fit_moving_mean``,
``fit_moving_variance``; and ``shard_map_error``, the message of the call refused inside
``jax.shard_map``.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def main(source: str, target: str) -> None:
    """Run every check; see the module docstring."""
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2"]
    ).strip()
    import jax
    import keras
    import numpy as np

    from unorm.keras import BatchNorm

    data = dict(np.load(source))
    steps = 1 + max(int(k[1:]) for k in data if k.startswith("x") and k[1:].isdigit())
    devices = jax.devices("cpu")
    assert len(devices) == 2, devices
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)

    def sharded(array: Any) -> Any:
        layout = distribution.get_data_layout(array.shape)
        return keras.distribution.distribute_tensor(array, layout)

    layer = BatchNorm(synchronized=True, momentum=None)
    layer.build((None, *data["x0"].shape[1:]))
    layer.gamma.assign(data["gamma"])
    layer.beta.assign(data["beta"])

    @jax.jit
    def step(trainable: Any, state: Any, x: Any, mask: Any, dy: Any) -> Any:
        def loss(trainable: Any, x: Any) -> Any:
            y, new_state = layer.stateless_call(trainable, state, x, training=True, mask=mask)
            return (y * dy).sum(), (y, new_state)

        grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
        (d_trainable, dx), (y, new_state) = grad(trainable, x)
        return y, dx, d_trainable, new_state

    out: dict[str, Any] = {}
    names = [v.name for v in layer.trainable_variables]
    state_names = [v.name for v in layer.non_trainable_variables]
    trainable = [v.value for v in layer.trainable_variables]
    state = [v.value for v in layer.non_trainable_variables]
    for s in range(steps):
        x, mask, dy = (sharded(data[f"{name}{s}"]) for name in ("x", "mask", "dy"))
        if s == 0:
            out["devices"] = np.asarray(len(x.sharding.device_set))
            out["shard_rows"] = np.asarray([shard.data.shape[0] for shard in x.addressable_shards])
        y, dx, d_trainable, state = step(trainable, state, x, mask, dy)
        out[f"y{s}"], out[f"dx{s}"] = np.asarray(y), np.asarray(dx)
        for name, grad in zip(names, d_trainable, strict=True):
            out[f"d{name}{s}"] = np.asarray(grad)
        for name, value in zip(state_names, state, strict=True):
            out[f"{name}{s}"] = np.asarray(value)

    # model.fit: the trainer jits the step over the sharded batch itself.
    fit_layer = BatchNorm(synchronized=True, momentum=None)
    features = data["fit_x"].shape[1:]
    x_in = keras.Input(features)
    mask_in = keras.Input(features[:-1], dtype="bool")
    model = keras.Model([x_in, mask_in], fit_layer(x_in, mask=mask_in))
    fit_layer.gamma.assign(data["gamma"])
    fit_layer.beta.assign(data["beta"])
    model.compile(optimizer=keras.optimizers.SGD(float(data["fit_lr"])), loss="mse")
    model.fit(
        [data["fit_x"], data["fit_mask"]],
        data["fit_target"],  # the output carries the mask: the loss weighs padding 0
        batch_size=int(data["fit_batch"]),
        shuffle=False,
        verbose=0,
    )
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        out[f"fit_{name}"] = np.asarray(getattr(fit_layer, name).value)

    # Inside shard_map each call sees one device's shard: refused, not per-shard statistics.
    mesh = distribution.device_mesh.backend_mesh
    spec = jax.sharding.PartitionSpec("batch")
    x0 = sharded(data["x0"])

    def per_shard(x: Any) -> Any:
        y, _ = layer.stateless_call(trainable, state, x, training=True)
        return y

    try:
        jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=spec)(x0)
        out["shard_map_error"] = np.asarray("accepted")
    except ValueError as err:
        out["shard_map_error"] = np.asarray(str(err))
    np.savez(target, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
