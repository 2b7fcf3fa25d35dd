"""unorm.torch.SyncBatchNorm on 3 gloo ranks: uneven and empty shards give the reference's
single-process numbers on the concatenated batch."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unorm import reference as ref
from unorm.spec import BatchNormSpec

pytestmark = pytest.mark.torch
pytest.importorskip("torch")

WORKER = Path(__file__).with_name("torch_sync_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("shards", [[4, 0, 7], [5, 2, 4]])
def test_three_ranks_equal_the_concatenated_batch(shards: list[int], tmp_path: Path) -> None:
    sys.path.insert(0, str(WORKER.parent))
    try:
        from torch_sync_worker import CHANNELS, batches
    finally:
        sys.path.pop(0)
    shard_text = ",".join(map(str, shards))
    done = subprocess.run(
        [sys.executable, str(WORKER), str(_free_port()), str(tmp_path), shard_text],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(len(shards))]
    gamma, beta = np.array([0.5, 1.0, 2.0]), np.array([0.0, -1.0, 1.0])
    spec = BatchNormSpec()
    state = ref.init_running_stats(CHANNELS)
    for step, (x, dy) in enumerate(batches(shards)):
        y, state = ref.batch_norm_step(x, state, spec, gamma, beta, training=True)
        grads = ref.batch_norm_backward(dy, x, gamma)
        np.testing.assert_allclose(np.concatenate([r[f"y{step}"] for r in ranks]), y, atol=1e-12)
        np.testing.assert_allclose(
            np.concatenate([r[f"dx{step}"] for r in ranks]), grads.dx, atol=1e-12
        )
        # parameter gradients are per-rank partial sums; data parallelism adds them up
        np.testing.assert_allclose(sum(r[f"dw{step}"] for r in ranks), grads.dgamma, atol=1e-10)
        np.testing.assert_allclose(sum(r[f"db{step}"] for r in ranks), grads.dbeta, atol=1e-10)
        for r in ranks:
            np.testing.assert_allclose(r[f"mean{step}"], state.mean, atol=1e-12)
            np.testing.assert_allclose(r[f"var{step}"], state.var, atol=1e-12)
    x0, _ = batches(shards)[0]
    want, _ = ref.batch_norm_step(x0, state, spec, gamma, beta, training=False)
    np.testing.assert_allclose(np.concatenate([r["eval"] for r in ranks]), want, atol=1e-12)
