"""``unorm.torch.SyncBatchNorm``: cross-replica BatchNorm over ``torch.distributed``.

Each rank computes its shard's (count, mean, M2); one ``all_gather`` brings every rank's
triple to every rank, which merges them exactly (Chan's k-way merge, ``SPEC.md``
section 3) in float64. Uneven shards and empty ranks therefore give the
single-process result on the concatenated batch. Backward all-reduces ``sum(dy)`` and
``sum(dy * xhat)`` once; ``weight``/``bias`` gradients stay local, to be averaged by the
data-parallel wrapper like every other parameter's (as ``nn.SyncBatchNorm`` does).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .batchnorm import _HALF, BatchNorm

__all__ = ["SyncBatchNorm"]


def _merge(gathered: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Merge rows ``[count, mean (C), M2 (C)]`` of every rank: total count, mean, M2."""
    counts = gathered[:, :1]
    means = gathered[:, 1 : 1 + channels]
    m2s = gathered[:, 1 + channels :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total.clamp(min=1)
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return total, mean, m2


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        group: Any,
        layer: SyncBatchNorm,
    ) -> tuple[Tensor, Tensor, Tensor]:
        channels = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        stat_dtype = torch.float32 if x.dtype in _HALF else x.dtype
        xs = x.to(stat_dtype)
        local = x.numel() // channels
        if local > 0:
            var, mean = torch.var_mean(xs, dim=dims, correction=0)
            m2 = var * local
        else:
            mean = m2 = xs.new_zeros(channels)
        row = torch.cat([mean.new_full((1,), float(local)), mean, m2]).to(torch.float64)
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, row, group=group)
        total, mean64, m2_64 = _merge(torch.stack(rows), channels)
        count = int(total.item())  # one host sync per call, as nn.SyncBatchNorm has too
        layer._check_count(count, tuple(x.shape), " across all ranks")
        layer._global_count = count  # an empty global batch follows empty_batch (SPEC.md)
        var64 = m2_64 / count if count else torch.full_like(m2_64, float("nan"))
        # The running variance is fed the estimate over the *global* count (SPEC.md).
        fed64 = m2_64 / (count - 1) if layer.spec.unbiased and count > 1 else var64
        mean_s, var_s = mean64.to(stat_dtype), var64.to(stat_dtype)
        # PyTorch's eval-mode kernel normalises with given statistics: fused, channels-last safe.
        y = F.batch_norm(x, mean_s, var_s, weight, bias, False, 0.0, eps)
        invstd = torch.rsqrt(var_s + eps)
        ctx.save_for_backward(xs, weight, mean_s, invstd)
        ctx.count, ctx.group, ctx.out_dtype = count, group, x.dtype
        ctx.mark_non_differentiable(mean64, fed64)
        return y, mean64, fed64

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dy: Tensor, *_: Any
    ) -> tuple[Tensor | None, ...]:
        xs, weight, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (xs.dim() - 2)
        dims = [d for d in range(xs.dim()) if d != 1]
        dys = dy.to(xs.dtype)
        xhat = (xs - mean.view(shape)) * invstd.view(shape)
        sum_dy = dys.sum(dim=dims)
        sum_dy_xhat = (dys * xhat).sum(dim=dims)
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both, group=ctx.group)  # every rank calls it, empty shards too
        g_dy, g_dy_xhat = both.chunk(2)
        scale = invstd if weight is None else invstd * weight.to(xs.dtype)
        dx = scale.view(shape) * (
            dys - (g_dy / ctx.count).view(shape) - xhat * (g_dy_xhat / ctx.count).view(shape)
        )
        dweight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_dy if ctx.needs_input_grad[2] else None
        return dx.to(ctx.out_dtype), dweight, dbias, None, None, None


class SyncBatchNorm(BatchNorm):
    """:class:`BatchNorm` whose batch statistics span every rank of a process group.

    Same arguments as :class:`BatchNorm`, plus ``process_group`` (default: the whole
    world). In training (or with ``track_running_stats=False``) under an initialised
    ``torch.distributed`` with more than one rank, statistics are merged exactly across
    ranks; otherwise it is a plain :class:`BatchNorm`. Works with gloo (CPU) and nccl.
    Every rank must call forward and backward together, as with ``nn.SyncBatchNorm``.

    Example (one process; on several ranks the statistics are global):
        >>> bn = SyncBatchNorm(4)
        >>> bn(torch.randn(3, 4)).shape
        torch.Size([3, 4])
    """

    def __init__(self, num_features: int, *args: Any, process_group: Any = None, **kwargs: Any):
        super().__init__(num_features, *args, **kwargs)
        if self.spec.renorm:
            # Its merged statistics would need r and d inside the collective's Function.
            raise ValueError(
                "renorm must be False for SyncBatchNorm, got True (Batch Renormalization "
                "across ranks is not implemented in unorm.torch; use BatchNorm)"
            )
        if self.spec.virtual_batch_size is not None:
            raise ValueError(
                "virtual_batch_size must be None for SyncBatchNorm (ghost batches are per "
                f"rank, not merged), got {self.spec.virtual_batch_size}"
            )
        self.process_group = process_group
        self._global_count = -1  # the merged count of the last synchronised call

    def _synchronised(self) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group) > 1

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` as :meth:`BatchNorm.forward` does, with batch statistics merged
        across the process group's ranks when it has more than one (every rank must call).

        Bad input raises ``ValueError`` before any state changes (the shape and dtype
        checks before the collective, the global count check right after it).
        """
        uses_batch = self.training or not self.track_running_stats
        if not uses_batch or not self._synchronised():
            return super().forward(x)
        ax = self._check_input(x)
        x1 = x if ax == 1 else x.movedim(ax, 1)
        y, mean64, fed64 = _SyncBatchNormFunction.apply(  # type: ignore[no-untyped-call]
            x1, self.weight, self.bias, self.spec.eps, self.process_group, self
        )
        y = cast(Tensor, y)
        if self.training and self.track_running_stats and self._global_count == 0:
            if self.accumulator is not None:
                y = self._deferred(y, self.record_micro_batch, 0, None, None)
            else:
                y = self._after_empty(y)
        elif self.training and self.track_running_stats and self.accumulator is not None:
            # Accumulated micro-batches: the global (count, mean, M2) of this call.
            total = self._global_count
            m2 = fed64 * (total - 1 if self.spec.unbiased and total > 1 else total)
            y = self._deferred(y, self.record_micro_batch, total, mean64, m2)
        elif self.training and self.track_running_stats:
            assert self.running_mean is not None
            dtype = self.running_mean.dtype
            y = self._update_running(y, mean64.to(dtype), fed64.to(dtype))
        return y if ax == 1 else y.movedim(1, ax)
