"""Train unorm.torch.SyncBatchNorm under DistributedDataParallel (used by test_torch_sync).

Usage: python tests/torch_ddp_worker.py PORT OUT_DIR SHARDS MODES [DEVICE BACKEND]
(e.g. ``29500 /tmp/out 4,0,7 eager,compiled``; DEVICE ``cpu`` or ``cuda``, BACKEND
``gloo`` or ``nccl``; defaults ``cpu gloo``). One process per shard, over 127.0.0.1.

For each mode every rank builds a fresh ``DDP(SyncBatchNorm)`` (``compiled``:
``torch.compile(DDP(...))``; ``compiled-module``: ``DDP(torch.compile(...))``), trains
two SGD steps on its shard of a fixed batch with the loss ``sum(y * dy)``, then runs
eval, and writes per step its outputs, input gradients, the parameter gradients DDP left
(averaged over the ranks), the parameters after the optimizer step and the running
statistics to ``OUT_DIR/rank<r>.npz`` (keys ``<mode>/<what><step>``).

``torch.compile`` breaks the graph at the collective's host read of the global count
(``Tensor.item()`` in ``unorm/_torch/sync.py``): the layer runs eagerly between compiled
pieces and the results are exact. ``fullgraph=True`` cannot hold: besides that read,
DDP's own forward breaks the graph (its logger), unorm or not. With one process
(``nccl`` on one GPU) SyncBatchNorm is a plain BatchNorm, so the worker forces the
cross-replica path there to run its collectives on the device.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch_sync_worker import CHANNELS, batches  # the same fixed batches, beside this file

from unorm.torch import SyncBatchNorm

GAMMA = (0.5, 1.0, 2.0)
BETA = (0.0, -1.0, 1.0)
LR = 0.1
#: ``compiled``: ``torch.compile(DDP(layer))``; ``compiled-module``: ``DDP(torch.compile(layer))``.
MODES = ("eager", "compiled", "compiled-module")


def _model(mode: str, device: torch.device) -> tuple[torch.nn.Module, SyncBatchNorm]:
    layer = SyncBatchNorm(CHANNELS).double().to(device)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(GAMMA))
        layer.bias.copy_(torch.tensor(BETA))
    if dist.get_world_size() == 1:
        layer._synchronised = lambda: True  # type: ignore[method-assign]
    ids = [device.index or 0] if device.type == "cuda" else None
    inner = torch.compile(layer) if mode == "compiled-module" else layer
    model: torch.nn.Module = DistributedDataParallel(inner, device_ids=ids)
    if mode == "compiled":
        model = torch.compile(model)  # type: ignore[assignment]
    return model, layer


def _train(mode: str, rank: int, shards: list[int], device: torch.device) -> dict[str, np.ndarray]:
    start, stop = sum(shards[:rank]), sum(shards[: rank + 1])
    model, layer = _model(mode, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    record: dict[str, np.ndarray] = {}

    def keep(name: str, t: torch.Tensor) -> None:
        record[f"{mode}/{name}"] = t.detach().cpu().numpy().copy()

    for step, (x_all, dy_all) in enumerate(batches(shards)):
        x = torch.tensor(x_all[start:stop], device=device, requires_grad=True)
        y = model(x)
        (y * torch.tensor(dy_all[start:stop], device=device)).sum().backward()
        assert x.grad is not None and layer.weight.grad is not None
        assert layer.bias.grad is not None
        keep(f"y{step}", y)
        keep(f"dx{step}", x.grad)
        keep(f"dw{step}", layer.weight.grad)
        keep(f"db{step}", layer.bias.grad)
        optimizer.step()
        optimizer.zero_grad()
        keep(f"w{step}", layer.weight)
        keep(f"b{step}", layer.bias)
        assert layer.running_mean is not None and layer.running_var is not None
        keep(f"mean{step}", layer.running_mean)
        keep(f"var{step}", layer.running_var)
    model.eval()
    x_all, _ = batches(shards)[0]
    with torch.no_grad():
        keep("eval", model(torch.tensor(x_all[start:stop], device=device)))
    return record


def worker(
    rank: int, port: int, out_dir: str, shards: list[int], modes: list[str], how: str
) -> None:
    """One rank: every mode's training run, saved to ``out_dir/rank<rank>.npz``."""
    device_name, backend = how.split(":")
    torch.set_num_threads(1)  # 3 ranks on a small machine: no oversubscription
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(shards)
    )
    device = torch.device(device_name, rank) if device_name == "cuda" else torch.device("cpu")
    record: dict[str, np.ndarray] = {}
    for mode in modes:
        record.update(_train(mode, rank, shards, device))
    np.savez(f"{out_dir}/rank{rank}.npz", **record)
    dist.destroy_process_group()


if __name__ == "__main__":
    port, out, shard_text, mode_text = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    how = ":".join(sys.argv[5:7]) if len(sys.argv) > 6 else "cpu:gloo"
    shard_sizes = [int(s) for s in shard_text.split(",")]
    mode_list = mode_text.split(",")
    for mode_name in mode_list:
        if mode_name not in MODES:
            raise SystemExit(f"unknown mode {mode_name!r}: expected one of {MODES}")
    args = (port, out, shard_sizes, mode_list, how)
    mp.spawn(worker, args=args, nprocs=len(shard_sizes), join=True)
