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


DDP_WORKER = Path(__file__).with_name("torch_ddp_worker.py")


def run_ddp_worker(
    out: Path, shards: list[int], modes: list[str], how: tuple[str, str] = ("cpu", "gloo")
) -> list[dict[str, np.ndarray]]:
    """Run ``torch_ddp_worker.py`` (bounded in time) and load every rank's record."""
    done = subprocess.run(
        [sys.executable, str(DDP_WORKER), str(_free_port()), str(out),
         ",".join(map(str, shards)), ",".join(modes), *how],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(len(shards))]


def check_ddp_against_reference(
    ranks: list[dict[str, np.ndarray]], shards: list[int], mode: str
) -> None:
    """Each rank's DDP training record equals the reference's single process on the whole
    batch: outputs and input gradients by rank, parameter gradients averaged over the ranks
    (DDP's all-reduce), the SGD step, the running statistics and eval."""
    sys.path.insert(0, str(DDP_WORKER.parent))
    try:
        from torch_ddp_worker import BETA, CHANNELS, GAMMA, LR, batches
    finally:
        sys.path.pop(0)
    world = len(shards)
    gamma, beta = np.array(GAMMA), np.array(BETA)
    spec = BatchNormSpec()
    state = ref.init_running_stats(CHANNELS)
    for step, (x, dy) in enumerate(batches(shards)):
        y, state = ref.batch_norm_step(x, state, spec, gamma, beta, training=True)
        grads = ref.batch_norm_backward(dy, x, gamma)
        got = {k: [r[f"{mode}/{k}{step}"] for r in ranks] for k in ("y", "dx")}
        np.testing.assert_allclose(np.concatenate(got["y"]), y, atol=1e-12)
        np.testing.assert_allclose(np.concatenate(got["dx"]), grads.dx, atol=1e-12)
        gamma = gamma - LR * grads.dgamma / world
        beta = beta - LR * grads.dbeta / world
        for r in ranks:
            np.testing.assert_allclose(r[f"{mode}/dw{step}"], grads.dgamma / world, atol=1e-10)
            np.testing.assert_allclose(r[f"{mode}/db{step}"], grads.dbeta / world, atol=1e-10)
            np.testing.assert_allclose(r[f"{mode}/w{step}"], gamma, atol=1e-12)
            np.testing.assert_allclose(r[f"{mode}/b{step}"], beta, atol=1e-12)
            np.testing.assert_allclose(r[f"{mode}/mean{step}"], state.mean, atol=1e-12)
            np.testing.assert_allclose(r[f"{mode}/var{step}"], state.var, atol=1e-12)
    x0, _ = batches(shards)[0]
    want, _ = ref.batch_norm_step(x0, state, spec, gamma, beta, training=False)
    np.testing.assert_allclose(np.concatenate([r[f"{mode}/eval"] for r in ranks]), want, atol=1e-12)


def test_ddp_training_eager_and_compiled_equal_the_concatenated_batch(tmp_path: Path) -> None:
    # DistributedDataParallel over 3 gloo ranks, one of them empty; torch.compile of the
    # DDP model, or of the layer inside DDP, breaks its graph at the layer's collective and
    # must give the same numbers.
    shards, modes = [4, 0, 7], ["eager", "compiled", "compiled-module"]
    ranks = run_ddp_worker(tmp_path, shards, modes)
    for mode in modes:
        check_ddp_against_reference(ranks, shards, mode)
