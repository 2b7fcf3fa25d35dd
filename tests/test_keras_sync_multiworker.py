"""Cross-replica BatchNorm of unorm.keras under ``tf.distribute.MultiWorkerMirroredStrategy``:
two worker processes on 127.0.0.1 (a ``TF_CONFIG`` each, free ports), uneven per-worker
batches, a worker with no sample and a step where both have none, against the NumPy
reference on each step's whole batch in one process (outputs, input gradients, the
``gamma``/``beta`` gradients summed over the workers, moving statistics on every worker).

One pair of processes runs every step (TensorFlow's import is the slow part); each has a
bounded time and both are killed if either overruns.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unorm import reference as ref
from unorm.conformance.columns.keras_multiworker_worker import free_ports
from unorm.spec import BatchNormSpec

pytestmark = pytest.mark.keras

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("keras_multiworker_worker.py")
# Per step, each worker's number of samples: uneven, one worker empty, both empty (the
# empty batch of SPEC.md section 2: nothing changes), then uneven again.
SPLITS = [(2, 5), (0, 7), (0, 0), (4, 1)]
SHAPE = (4, 3)  # (length, features) of one sample
TIMEOUT_S = 240


def _batches() -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """``gamma``, ``beta`` and per step the whole batch ``(x, dy)``, fixed by a seed."""
    rng = np.random.default_rng(19)
    gamma = rng.uniform(0.5, 1.5, SHAPE[-1]).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, SHAPE[-1]).astype(np.float32)
    steps = []
    for split in SPLITS:
        x = (3 * rng.standard_normal((sum(split), *SHAPE)) + 2).astype(np.float32)
        steps.append((x, rng.standard_normal(x.shape).astype(np.float32)))
    return gamma, beta, steps


def _run_workers(tmp_path: Path) -> list[dict[str, np.ndarray]]:
    gamma, beta, steps = _batches()
    request: dict[str, Any] = {"gamma": gamma, "beta": beta}
    for s, ((x, dy), split) in enumerate(zip(steps, SPLITS, strict=True)):
        bounds = np.cumsum([0, *split])
        for k in range(len(split)):
            request[f"x{s}_{k}"] = x[bounds[k] : bounds[k + 1]]
            request[f"dy{s}_{k}"] = dy[bounds[k] : bounds[k + 1]]
    source = tmp_path / "request.npz"
    np.savez(source, **request)
    ports = ",".join(str(p) for p in free_ports(2))
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("TF_CONFIG", None)
    logs = [tmp_path / f"worker{k}.log" for k in range(2)]
    procs = []
    for k in range(2):
        with logs[k].open("w") as log:
            cmd = [sys.executable, str(WORKER), str(k), ports, str(source)]
            cmd.append(str(tmp_path / f"worker{k}.npz"))
            procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a worker ran past {TIMEOUT_S} s:\n" + logs[0].read_text()[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for k, p in enumerate(procs):
        assert p.returncode == 0, f"worker {k}:\n" + logs[k].read_text()[-4000:]
    return [dict(np.load(tmp_path / f"worker{k}.npz")) for k in range(2)]


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, np.ndarray]]:
    return _run_workers(tmp_path_factory.mktemp("multiworker"))


@pytest.mark.slow
def test_two_workers_equal_the_whole_batch_in_one_process(
    workers: list[dict[str, np.ndarray]],
) -> None:
    gamma, beta, steps = _batches()
    spec = BatchNormSpec(axis=-1, momentum=None)
    running = ref.init_running_stats(SHAPE[-1])
    for s, (x, dy) in enumerate(steps):
        y_ref, running = ref.batch_norm_step(x, running, spec, gamma, beta, training=True)
        assert running is not None
        y = np.concatenate([w[f"y{s}"] for w in workers])
        dx = np.concatenate([w[f"dx{s}"] for w in workers])
        assert y.shape == dx.shape == x.shape, s
        dgamma = sum(w[f"dgamma{s}"] for w in workers)
        dbeta = sum(w[f"dbeta{s}"] for w in workers)
        if x.shape[0]:
            back = ref.batch_norm_backward(dy, x, gamma, eps=spec.eps, axis=-1)
            np.testing.assert_allclose(y, y_ref, atol=2e-5, err_msg=f"y, step {s}")
            np.testing.assert_allclose(dx, back.dx, atol=1e-4, err_msg=f"dx, step {s}")
            np.testing.assert_allclose(dgamma, back.dgamma, atol=1e-4, err_msg=f"dgamma {s}")
            np.testing.assert_allclose(dbeta, back.dbeta, atol=1e-4, err_msg=f"dbeta {s}")
        else:  # the empty batch: gamma and beta gradients are the sums over nothing
            assert not np.any(dgamma) and not np.any(dbeta)
        for w in workers:  # every worker holds the same state, that of the reference
            np.testing.assert_allclose(w[f"moving_mean{s}"], running.mean, atol=1e-6)
            np.testing.assert_allclose(w[f"moving_variance{s}"], running.var, rtol=1e-5)
            assert int(w[f"num_batches_tracked{s}"]) == running.num_batches_tracked
    assert running.num_batches_tracked == 3  # the empty step is not counted
