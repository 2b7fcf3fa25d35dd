"""Cross-replica BatchNorm for the PyTorch columns: one gloo process per replica.

Usage: ``python -m unorm.conformance.columns.torch_sync_worker REQUEST RESULT`` (see
:mod:`conformance.exchange`). Every rank builds ``unorm.torch.SyncBatchNorm`` (or, for a
native request, ``torch.nn.SyncBatchNorm``), runs one training step on its slice, and
writes its output and input gradient; rank 0 also writes the summed parameter gradients
(what data parallelism hands the optimizer) and its buffers.

Strategy ``replicas`` calls the layer itself and all-reduces its parameter gradients;
``ddp`` wraps it in ``DistributedDataParallel``, which averages them over the ranks (an
empty rank included), so the sum the suite compares is that average times the world size.
"""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from unorm.conformance.exchange import read_request


def _layer(request):  # type: ignore[no-untyped-def]
    config = request.config
    spec = config.spec()
    layer: torch.nn.Module
    if request.native:
        layer = torch.nn.SyncBatchNorm(
            config.num_features,
            eps=spec.eps,
            momentum=spec.momentum,
            affine=spec.scale,
            bias=spec.center or not spec.scale,
            track_running_stats=spec.track_running_stats,
        )
    else:
        from unorm.torch import SyncBatchNorm

        settings = dict(config.settings)
        kwargs = {
            k: settings[k] for k in ("eps", "momentum", "track_running_stats") if k in settings
        }
        if "center" in settings or "scale" in settings:
            kwargs["affine"] = settings.get("scale", True)
            kwargs["bias"] = settings.get("center", True) or not kwargs["affine"]
        layer = SyncBatchNorm(config.num_features, axis=config.axis, preset=config.preset, **kwargs)
    if config.param_dtype == "float64":
        layer = layer.double()
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.from_numpy(request.gamma))
        if layer.bias is not None:
            layer.bias.copy_(torch.from_numpy(request.beta))
    return layer


def _rank(rank: int, port: int, request_path: str, folder: str) -> None:
    request = read_request(Path(request_path))
    world = len(request.xs)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)  # one process per replica on a small machine
    layer = _layer(request).train()
    ddp = request.strategy == "ddp"
    model = DistributedDataParallel(layer) if ddp else layer
    x = torch.from_numpy(request.xs[rank]).requires_grad_(True)
    y = model(x)
    y.backward(torch.from_numpy(request.dys[rank]))
    assert x.grad is not None
    out = {"y": y.detach().numpy(), "dx": x.grad.numpy()}
    for key, p in (("dgamma", layer.weight), ("dbeta", layer.bias)):
        if p is None:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if ddp:
            g = g * world  # DDP left the mean over the ranks
        else:
            dist.all_reduce(g)  # what the data-parallel wrapper does with parameter gradients
        out[key] = g.numpy()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        value = getattr(layer, name, None)
        if value is not None:
            out[name] = value.numpy()
    np.savez(f"{folder}/rank{rank}.npz", **out)  # type: ignore[arg-type]  # numpy's stub
    dist.destroy_process_group()


def main(request_path: str, result_path: str) -> None:
    request = read_request(Path(request_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(  # type: ignore[attr-defined]  # torch.multiprocessing re-exports it
            _rank, args=(port, request_path, folder), nprocs=len(request.xs), join=True
        )
        ranks = [dict(np.load(f"{folder}/rank{r}.npz")) for r in range(len(request.xs))]
    out = {}
    for k, r in enumerate(ranks):
        out[f"y{k}"], out[f"dx{k}"] = r["y"], r["dx"]
    for key in ("dgamma", "dbeta", "running_mean", "running_var", "num_batches_tracked"):
        if key in ranks[0]:
            out[key] = ranks[0][key]
    np.savez(result_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
