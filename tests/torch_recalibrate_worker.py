"""Run unorm.torch.recalibrate on 2 gloo ranks over loopback (used by
test_torch_after_training).

Usage: python tests/torch_recalibrate_worker.py PORT OUT_DIR CASE, CASE one of ``uneven``
(rank 0: rows 0-16 in two batches, rank 1: rows 16-29 in one), ``idle`` (rank 1 has no
batch) and ``nonfinite`` (rank 1's batch holds an inf). Each rank writes its parameters,
buffers and error message to OUT_DIR/rank<r>.npz.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from unorm.torch import BatchNorm, recalibrate

SHARES = {
    "uneven": [[(0, 8), (8, 16)], [(16, 29)]],
    "idle": [[(0, 8), (8, 16), (16, 29)], []],
    "nonfinite": [[(0, 8), (8, 16)], [(16, 29)]],
}


def data() -> np.ndarray:
    return (np.random.default_rng(11).normal(size=(29, 3)) * 2 + 1).astype(np.float32)


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4),
        BatchNorm(4, num_dims=2, preset="keras"),
    )  # fmt: skip


def worker(rank: int, port: int, out_dir: str, case: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    net = model()
    x = data()
    if case == "nonfinite" and rank == 1:
        x[20, 1] = np.inf
    batches = [torch.tensor(x[a:b]) for a, b in SHARES[case][rank]]
    error = ""
    try:
        recalibrate(net, batches)
    except ValueError as err:
        error = str(err)
    record = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    np.savez(f"{out_dir}/rank{rank}.npz", error=np.array(error), **record)
    dist.destroy_process_group()


if __name__ == "__main__":
    port, out, case = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    mp.spawn(worker, args=(port, out, case), nprocs=2, join=True)
