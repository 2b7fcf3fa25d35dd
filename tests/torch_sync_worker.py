"""Run unorm.torch.SyncBatchNorm on 3 gloo ranks over loopback (used by test_torch_sync).

Usage: python tests/torch_sync_worker.py PORT OUT_DIR SHARDS (e.g. "4,0,7").
Each rank trains two steps on its shard of a fixed batch, then runs eval, and writes
its outputs, input gradients, parameter gradients and buffers to OUT_DIR/rank<r>.npz.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unorm.torch import SyncBatchNorm

CHANNELS = 3


def batches(shards: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    total = sum(shards)
    return [
        (rng.normal(s, 1 + s, (total, CHANNELS, 2)), rng.normal(size=(total, CHANNELS, 2)))
        for s in range(2)
    ]


def worker(rank: int, port: int, out_dir: str, shards: list[int]) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(shards)
    )
    start, stop = sum(shards[:rank]), sum(shards[: rank + 1])
    layer = SyncBatchNorm(CHANNELS).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    record: dict[str, np.ndarray] = {}
    for step, (x_all, dy_all) in enumerate(batches(shards)):
        x = torch.tensor(x_all[start:stop], requires_grad=True)
        y = layer(x)
        y.backward(torch.tensor(dy_all[start:stop]))
        record[f"y{step}"] = y.detach().numpy()
        record[f"dx{step}"] = x.grad.numpy()
        record[f"dw{step}"] = layer.weight.grad.numpy().copy()
        record[f"db{step}"] = layer.bias.grad.numpy().copy()
        layer.weight.grad = layer.bias.grad = None
        record[f"mean{step}"] = layer.running_mean.numpy().copy()
        record[f"var{step}"] = layer.running_var.numpy().copy()
    layer.eval()
    x_all, _ = batches(shards)[0]
    record["eval"] = layer(torch.tensor(x_all[start:stop])).detach().numpy()
    np.savez(f"{out_dir}/rank{rank}.npz", **record)
    dist.destroy_process_group()


if __name__ == "__main__":
    port, out, shard_text = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    shard_sizes = [int(s) for s in shard_text.split(",")]
    mp.spawn(worker, args=(port, out, shard_sizes), nprocs=len(shard_sizes), join=True)
