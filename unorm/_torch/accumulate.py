"""``unorm.torch.accumulate``: k training calls of every BatchNorm as one step
(``SPEC.md`` section 2, *Accumulated micro-batches*).

Under gradient accumulation each micro-batch would otherwise update the running statistics
as a step of its own (pytorch/pytorch#46516). Inside the context every BatchNorm of the
model records each micro-batch's ``(n, mean, M2)`` and applies one update per ``steps``
calls from their exact merge, so the running statistics are those of one call on the
concatenated batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .._core.accumulate import accumulation
from .batchnorm import BatchNorm

__all__ = ["Accumulator", "accumulate"]


class Accumulator:
    """The micro-batch statistics one BatchNorm has recorded in the current step: per
    call its count, float64 mean and M2 (device tensors; no host synchronisation).

    ``steps`` calls make a step; :meth:`record` says when the step is complete.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.calls = 0
        self.counts: list[int] = []
        self.means: list[Tensor] = []
        self.m2s: list[Tensor] = []

    def record(self, count: int, mean: Tensor | None, m2: Tensor | None) -> bool:
        """Add one call (``count`` 0, ``mean``/``m2`` None: an empty micro-batch); True
        when it completes the step."""
        self.calls += 1
        if count > 0 and mean is not None and m2 is not None:
            self.counts.append(count)
            self.means.append(mean.detach().to(torch.float64))
            self.m2s.append(m2.detach().to(torch.float64))
        return self.calls >= self.steps

    def merged(self) -> tuple[int, Tensor, Tensor] | None:
        """The step's exact merge ``(N, mean, M2)`` (Chan et al., SPEC.md section 3), and
        clear the step; None for a step of only empty micro-batches."""
        counts, means, m2s = self.counts, self.means, self.m2s
        self.calls, self.counts, self.means, self.m2s = 0, [], [], []
        if not counts:
            return None
        total = sum(counts)
        n = torch.tensor(counts, dtype=torch.float64, device=means[0].device).unsqueeze(1)
        stacked = torch.stack(means)
        mean = (n * stacked).sum(0) / total
        m2 = torch.stack(m2s).sum(0) + (n * (stacked - mean) ** 2).sum(0)
        return total, mean, m2

    @property
    def pending(self) -> bool:
        """Whether calls of an unfinished step are recorded."""
        return self.calls > 0


@contextlib.contextmanager
def accumulate(model: nn.Module, steps: int) -> Iterator[list[BatchNorm]]:
    """Treat every ``steps`` training calls of each unorm BatchNorm in ``model`` as one
    step of accumulated micro-batches (``SPEC.md`` section 2).

    Inside the context each call normalises its micro-batch as usual but only records its
    statistics; after the ``steps``-th call (and, on leaving the context normally, for a
    last step of fewer calls) one running-statistics update is applied from their exact
    merge: the fed variance unbiased on the total count, ``num_batches_tracked`` one more,
    the whole step skipped when any micro-batch was non-finite (``skip_nonfinite``). On an
    exception the unfinished step is dropped. Inference calls, frozen layers and
    :class:`SyncBatchNorm` across ranks (whose micro-batch statistics are the global
    ones) follow the same rule. Yields the layers it governs.

    Raises ``ValueError`` (nothing changed) for ``steps`` not an integer >= 1, a model
    with no BatchNorm that keeps running statistics, or a layer with ``renorm`` or
    ``virtual_batch_size``.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), BatchNorm(4))
        >>> with accumulate(model, steps=2):
        ...     for part in torch.randn(8, 3).split([5, 3]):
        ...         model(part).sum().backward()
        >>> int(model[1].num_batches_tracked)
        1
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, BatchNorm) and m.track_running_stats and not m.frozen
    ]

    def end(layer: BatchNorm, finished: bool) -> None:
        accumulator, layer.accumulator = layer.accumulator, None
        if finished and accumulator is not None and accumulator.pending:
            layer.apply_step(accumulator)

    with accumulation(
        steps,
        layers,
        spec=lambda layer: layer.spec,
        active=lambda layer: layer.accumulator is not None,
        begin=lambda layer: setattr(layer, "accumulator", Accumulator(int(steps))),
        end=end,
    ) as governed:
        yield governed
