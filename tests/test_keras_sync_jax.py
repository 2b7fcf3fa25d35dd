"""Cross-replica BatchNorm of unorm.keras on Keras's JAX backend: ``synchronized=True``
under ``keras.distribution.DataParallel`` over two host devices, uneven shards written as
equal padded shards with a mask (``SPEC.md`` section 3, *Uneven shards on JAX*), against
the NumPy reference on the real samples of each step in one process: outputs, input and
parameter gradients of a jitted step, moving statistics, and one ``model.fit`` epoch.
Also: refused inside ``jax.shard_map``, and on Keras's torch backend.

Each backend runs in a fresh interpreter (Keras picks its backend once, JAX reads
``XLA_FLAGS`` once), with a bounded time.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unorm import reference as ref
from unorm.spec import BatchNormSpec

pytestmark = pytest.mark.keras

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("keras_jax_sync_worker.py")
ROWS = 5  # samples per device shard, padding included
SHAPE = (4, 3)  # (length, features) of one sample
# Per step, the real samples on each of the two devices: uneven, one device with none.
SPLITS = [(2, 5), (0, 5), (5, 3), (4, 1)]
FIT_SPLITS = [(3, 5), (5, 1)]  # the real samples of each fit batch, per device
LR = 0.1
TIMEOUT_S = 240


def _python(backend: str, *args: str) -> str:
    """Run ``python ARGS`` with Keras on ``backend`` in a fresh interpreter, in bounded
    time; its stdout (a failure shows its stderr)."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT_S, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _padded(
    rng: np.random.Generator, split: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A global batch of two equal shards of ``ROWS`` samples, the first ``split[k]`` of
    shard ``k`` real, the rest padding far from the data; the per-sample keep flags; and
    the real samples in order (the whole batch of one process)."""
    x = (1e3 + 50 * rng.standard_normal((2 * ROWS, *SHAPE))).astype(np.float32)
    keep = np.zeros(2 * ROWS, bool)
    for k, n in enumerate(split):
        keep[k * ROWS : k * ROWS + n] = True
    x[keep] = (3 * rng.standard_normal((int(keep.sum()), *SHAPE)) + 2).astype(np.float32)
    return x, keep, x[keep]


def _request() -> dict[str, Any]:
    rng = np.random.default_rng(19)
    request: dict[str, Any] = {
        "gamma": rng.uniform(0.5, 1.5, SHAPE[-1]).astype(np.float32),
        "beta": rng.uniform(-0.5, 0.5, SHAPE[-1]).astype(np.float32),
    }
    for s, split in enumerate(SPLITS):
        x, keep, _ = _padded(rng, split)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        dy[~keep] = 0  # the loss weighs the padding 0
        request[f"x{s}"], request[f"dy{s}"] = x, dy
        request[f"mask{s}"] = np.repeat(keep[:, None], SHAPE[0], axis=1)
    batches = [_padded(rng, split) for split in FIT_SPLITS]
    request["fit_x"] = np.concatenate([x for x, _, _ in batches])
    keep = np.concatenate([k for _, k, _ in batches])
    request["fit_mask"] = np.repeat(keep[:, None], SHAPE[0], axis=1)
    target = rng.standard_normal(request["fit_x"].shape).astype(np.float32)
    request["fit_target"] = target
    request["fit_lr"] = np.asarray(LR)
    request["fit_batch"] = np.asarray(2 * ROWS)
    return request


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    pytest.importorskip("jax")
    folder = tmp_path_factory.mktemp("jax_sync")
    np.savez(folder / "request.npz", **_request())
    _python("jax", str(WORKER), str(folder / "request.npz"), str(folder / "out.npz"))
    return dict(np.load(folder / "out.npz"))


def test_data_parallel_shards_the_batch_over_two_devices(measured: dict[str, np.ndarray]) -> None:
    assert int(measured["devices"]) == 2
    assert measured["shard_rows"].tolist() == [ROWS, ROWS]


def test_uneven_shards_equal_the_real_batch_in_one_process(
    measured: dict[str, np.ndarray],
) -> None:
    """A jitted step on the sharded, padded batch, step after step, against the reference
    on the real samples: outputs and input gradients there, gradients of 0 on the padding,
    ``gamma``/``beta`` gradients and the moving statistics."""
    request = _request()
    gamma, beta = request["gamma"], request["beta"]
    spec = BatchNormSpec(axis=-1, momentum=None)
    running = ref.init_running_stats(SHAPE[-1])
    for s in range(len(SPLITS)):
        keep = request[f"mask{s}"][:, 0]
        x, dy = request[f"x{s}"][keep], request[f"dy{s}"][keep]
        y_ref, running = ref.batch_norm_step(x, running, spec, gamma, beta, training=True)
        back = ref.batch_norm_backward(dy, x, gamma, eps=spec.eps, axis=-1)
        assert running is not None
        y, dx = measured[f"y{s}"], measured[f"dx{s}"]
        np.testing.assert_allclose(y[keep], y_ref, atol=2e-5, err_msg=f"y, step {s}")
        np.testing.assert_allclose(dx[keep], back.dx, atol=1e-4, err_msg=f"dx, step {s}")
        assert not np.any(dx[~keep]), s
        np.testing.assert_allclose(measured[f"dgamma{s}"], back.dgamma, atol=1e-4)
        np.testing.assert_allclose(measured[f"dbeta{s}"], back.dbeta, atol=1e-4)
        np.testing.assert_allclose(measured[f"moving_mean{s}"], running.mean, atol=1e-5)
        np.testing.assert_allclose(measured[f"moving_variance{s}"], running.var, rtol=1e-5)
        assert int(measured[f"num_batches_tracked{s}"]) == running.num_batches_tracked


def test_fit_trains_on_the_real_samples_of_each_batch(measured: dict[str, np.ndarray]) -> None:
    """One epoch of ``model.fit`` (SGD, MSE, the mask carried to the loss): the loss is the
    mean over the real positions, so each step is the reference's step on the real
    samples alone."""
    request = _request()
    gamma = request["gamma"].astype(np.float64)
    beta = request["beta"].astype(np.float64)
    spec = BatchNormSpec(axis=-1, momentum=None)
    running = ref.init_running_stats(SHAPE[-1])
    size = 2 * ROWS
    for b in range(len(FIT_SPLITS)):
        rows = slice(b * size, (b + 1) * size)
        keep = request["fit_mask"][rows, 0]
        x = request["fit_x"][rows][keep].astype(np.float64)
        target = request["fit_target"][rows][keep]
        y, running = ref.batch_norm_step(x, running, spec, gamma, beta, training=True)
        dy = 2 * (y - target) / y.size  # d mean((y - target)^2)
        back = ref.batch_norm_backward(dy, x, gamma, eps=spec.eps, axis=-1)
        gamma, beta = gamma - LR * back.dgamma, beta - LR * back.dbeta
    assert running is not None
    np.testing.assert_allclose(measured["fit_gamma"], gamma, atol=1e-5)
    np.testing.assert_allclose(measured["fit_beta"], beta, atol=1e-5)
    np.testing.assert_allclose(measured["fit_moving_mean"], running.mean, atol=1e-5)
    np.testing.assert_allclose(measured["fit_moving_variance"], running.var, rtol=1e-5)


def test_shard_map_is_refused(measured: dict[str, np.ndarray]) -> None:
    message = str(measured["shard_map_error"])
    assert "one device's shard" in message and "shard_map" in message


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_torch_backend_refuses_synchronized() -> None:
    code = (
        "from unorm.keras import BatchNorm\n"
        "try:\n"
        "    BatchNorm(synchronized=True)\n"
        "except ValueError as err:\n"
        "    print(err)\n"
    )
    printed = _python("torch", "-c", code)
    assert "synchronized must be False with the 'torch' backend" in printed
    assert "unorm.torch.SyncBatchNorm" in printed
