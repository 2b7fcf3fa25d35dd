"""unorm.keras on the other Keras backends (torch, JAX where installed), in a fresh
interpreter each, since Keras picks its backend once, at import.

This file is also the worker script: ``KERAS_BACKEND=torch python
tests/test_keras_backends.py`` prints one JSON line of measured errors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.keras


def _worker() -> dict[str, Any]:
    import keras

    from unorm import reference as ref
    from unorm.keras import AGC, BatchNorm
    from unorm.spec import BatchNormSpec

    def numpy(t: Any) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(t))

    out: dict[str, Any] = {"backend": keras.backend.backend()}
    rng = np.random.default_rng(0)
    layer = BatchNorm(momentum=None)
    spec = BatchNormSpec(axis=-1, momentum=None)
    running = ref.init_running_stats(3)
    error = 0.0
    for _ in range(3):
        x = (2 * rng.standard_normal((8, 4, 3)) + 1).astype(np.float32)
        y = numpy(layer(x, training=True))
        y_ref, running = ref.batch_norm_step(
            x, running, spec, np.ones(3), np.zeros(3), training=True
        )
        error = max(error, float(np.abs(y - y_ref).max()))
    assert running is not None
    out["bn_y"] = error
    out["bn_var"] = float(np.abs(numpy(layer.moving_variance) - running.var).max())
    out["bn_inference"] = float(
        np.abs(
            numpy(layer(x)) - ref.batch_norm_inference(x, running.mean, running.var, axis=-1)
        ).max()
    )

    # Two-pass statistics: a mean of 1e4 leaves the variance its digits.
    offset = (1e4 + rng.standard_normal((256, 3))).astype(np.float32)
    wide = BatchNorm(momentum=1.0, running_var="biased")
    y_offset = numpy(wide(offset, training=True))
    exact = ref.batch_stats(offset, axis=-1).var()
    out["bn_offset_var"] = float(np.abs(numpy(wide.moving_variance) / exact - 1).max())
    # The per-feature shift keeps y = (x - mean) / std float32-accurate there too.
    y_exact, _ = ref.batch_norm_train(offset, eps=1e-5, axis=-1)
    out["bn_offset_y"] = float(np.abs(y_offset - y_exact).max())

    # Keras masking: statistics of the kept values; a mask keeping one value per
    # feature is refused before the moving statistics change.
    masked = BatchNorm(momentum=1.0, running_var="biased")
    x = (2 * rng.standard_normal((4, 5, 3)) + 1).astype(np.float32)
    mask = rng.random((4, 5)) < 0.5
    mask[0, :2] = True
    masked(x, training=True, mask=mask)
    kept = ref.batch_stats(x[mask], axis=-1)
    out["bn_masked_var"] = float(np.abs(numpy(masked.moving_variance) - kept.var()).max())
    before = numpy(masked.moving_variance).copy()
    one = np.zeros((4, 5), bool)
    one[1, 1] = True
    try:
        masked(x, training=True, mask=one)
        out["bn_masked_one_value"] = "accepted"
    except ValueError as err:
        out["bn_masked_one_value"] = str(err)
    out["bn_masked_state_kept"] = bool(np.array_equal(numpy(masked.moving_variance), before))

    class Recorder(keras.optimizers.SGD):
        def build(self, var_list: Any) -> None:
            super().build(var_list)
            self.seen = [self.add_variable_from_reference(v, name="seen") for v in var_list]

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            self.seen[self._get_variable_index(variable)].assign(gradient)
            super().update_step(gradient, variable, learning_rate)

    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    weights = [numpy(v) for v in model.trainable_variables]
    grads = [(0.5 * w + 0.05 * rng.standard_normal(w.shape)).astype(np.float32) for w in weights]
    inner = Recorder(0.1)
    agc = AGC(inner, model)
    agc.apply([keras.ops.convert_to_tensor(g) for g in grads], model.trainable_variables)
    out["agc"] = max(
        float(np.abs(numpy(seen) - ref.agc_clip(g, w, -1 if g.ndim == 2 else None)).max())
        for seen, g, w in zip(inner.seen, grads, weights, strict=True)
    )
    model.compile(optimizer=AGC(keras.optimizers.SGD(0.01), model), loss="mse")
    history = model.fit(rng.standard_normal((8, 5)), rng.standard_normal((8, 2)), verbose=0)
    out["fit_loss_finite"] = bool(np.isfinite(history.history["loss"][0]))
    return out


BACKENDS = [b for b in ("torch", "jax") if importlib.util.find_spec(b) is not None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_and_agc_on_other_backends(backend: str) -> None:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
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
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["backend"] == backend
    assert measured["bn_y"] < 2e-5 and measured["bn_inference"] < 2e-5
    assert measured["bn_var"] < 1e-5
    assert measured["bn_offset_var"] < 1e-5
    assert measured["bn_offset_y"] < 2e-5  # ~1e-3 without the shift
    assert measured["bn_masked_var"] < 1e-5
    assert "more than 1 value per channel" in measured["bn_masked_one_value"]
    assert measured["bn_masked_state_kept"]
    assert measured["agc"] < 1e-6
    assert measured["fit_loss_finite"]


if __name__ == "__main__":
    print(json.dumps(_worker()))
