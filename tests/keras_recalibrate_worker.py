"""Run unorm.keras.recalibrate on a model built under tf.distribute.MirroredStrategy over
two logical CPUs, each replica's share passed as a batch of its own (used by
test_keras_after_training). Prints a JSON line: each replica's moving statistics and the
dense layer's weights. A subprocess, because the logical devices must exist before
TensorFlow's first operation."""

from __future__ import annotations

import json

import numpy as np
import tensorflow as tf

SHARES = (0, 4, 11)  # rows 0-4 on one replica, 4-11 on the other


def data() -> np.ndarray:
    return (np.random.default_rng(0).normal(size=(11, 3)) * 3 + 2).astype("float32")


def main() -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from unorm.keras import BatchNorm, recalibrate

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), BatchNorm()])
    x = data()
    recalibrate(model, [x[SHARES[0] : SHARES[1]], x[SHARES[1] : SHARES[2]]])
    bn = model.layers[1]
    copies = [
        [np.asarray(v).tolist() for v in w.value.values]
        for w in (bn.moving_mean, bn.moving_variance)
    ]
    kernel, bias = (np.asarray(v).tolist() for v in model.layers[0].get_weights())
    out = {"replicas": strategy.num_replicas_in_sync, "mean": copies[0], "var": copies[1]}
    print(json.dumps({**out, "kernel": kernel, "bias": bias}))


if __name__ == "__main__":
    main()
