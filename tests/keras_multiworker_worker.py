"""One worker of unorm.keras BatchNorm(synchronized=True) under
``tf.distribute.MultiWorkerMirroredStrategy`` (used by test_keras_sync_multiworker).

Usage: ``python tests/keras_multiworker_worker.py INDEX PORTS IN OUT``: worker ``INDEX``
of a cluster of ``127.0.0.1:<port>`` workers (``PORTS`` comma-separated), one CPU replica
each. ``IN`` (``.npz``) holds ``gamma``, ``beta`` and, per step ``s`` and worker ``k``,
``x<s>_<k>`` and ``dy<s>_<k>`` (each worker's slice, of any length, 0 included). The worker
trains one fresh ``BatchNorm(synchronized=True, momentum=None)`` on its slices, step after
step, and writes to ``OUT`` (``.npz``) per step its output ``y<s>``, input gradient
``dx<s>``, its own ``gamma``/``beta`` gradients ``dgamma<s>``/``dbeta<s>`` (their sum over
the workers is the global one) and the moving statistics after the step
(``moving_mean<s>``, ``moving_variance<s>``, ``num_batches_tracked<s>``).

TensorFlow reads ``TF_CONFIG`` once, when the strategy is made, so it is set here before
TensorFlow is imported; nothing is imported at module level (pytest's doctest collection
imports this file).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def main(index: int, ports: list[int], source: str, target: str) -> None:
    """Run worker ``index`` of the cluster on ``ports``; see the module docstring."""
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from unorm.keras import BatchNorm

    data = dict(np.load(source))
    steps = 1 + max(int(k[1:].split("_")[0]) for k in data if k.startswith("x"))
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == len(ports), strategy.num_replicas_in_sync
    with strategy.scope():
        layer = BatchNorm(synchronized=True, momentum=None)
        layer.build((None, *data["x0_0"].shape[1:]))
        layer.gamma.assign(data["gamma"])
        layer.beta.assign(data["beta"])

    @tf.function
    def step(xs: Any, dys: Any) -> Any:
        def replica(x: Any, dy: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return (y, *tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=dy))

        return strategy.run(replica, args=(xs, dys))

    out: dict[str, Any] = {}
    for s in range(steps):
        # One replica per worker: its id in the sync group is the worker's index.
        xs, dys = (
            strategy.experimental_distribute_values_from_function(
                lambda ctx, key=f"{name}{s}_": tf.constant(
                    data[f"{key}{ctx.replica_id_in_sync_group}"]
                )
            )
            for name in ("x", "dy")
        )
        results = step(xs, dys)
        for name, value in zip(("y", "dx", "dgamma", "dbeta"), results, strict=True):
            (local,) = strategy.experimental_local_results(value)
            out[f"{name}{s}"] = local.numpy()
        out[f"moving_mean{s}"] = layer.moving_mean.numpy()
        out[f"moving_variance{s}"] = layer.moving_variance.numpy()
        out[f"num_batches_tracked{s}"] = np.asarray(layer.num_batches_tracked.numpy())
    np.savez(target, **out)


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(p) for p in sys.argv[2].split(",")], sys.argv[3], sys.argv[4])
