"""``unorm.mxnet.accumulate``: k training calls of every BatchNorm as one step
(``SPEC.md`` section 2, *Accumulated micro-batches*), imperative and hybridized.

The operator runs on the host each call, so the step lives there
(:data:`unorm._mxnet.op.ACCUMULATING`, by each layer's ``accumulate_key``): every
micro-batch's ``(n, mean, M2)`` per device, merged exactly once ``steps`` calls are in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import mxnet as mx

from .._core.accumulate import accumulation
from . import internals
from .batchnorm import BatchNorm
from .op import ACCUMULATING, OpSettings, Step, apply_merged

__all__ = ["accumulate"]


def _blocks(block: Any) -> Iterator[Any]:
    yield block
    for _, child in internals.children(block):
        yield from _blocks(child)


@contextlib.contextmanager
def accumulate(model: Any, steps: int) -> Iterator[list[BatchNorm]]:
    """Treat every ``steps`` training calls of each unorm BatchNorm in ``model`` as one
    step of accumulated micro-batches (``SPEC.md`` section 2).

    Inside the context each training call normalises its micro-batch as usual and records
    its statistics (under ``update_on="backward"``, when its backward runs); after the
    ``steps``-th call on a device (and, on leaving the context normally, for a last step of
    fewer calls) one update of the running statistics is applied from their exact merge:
    the variance unbiased on the total count, the whole step skipped when any micro-batch
    was non-finite (``skip_nonfinite``). :class:`SyncBatchNorm` records the merged
    statistics of every call on every device. On an exception the unfinished step is
    dropped. Yields the layers it governs.

    Raises ``ValueError`` (nothing changed) for ``steps`` not an integer >= 1, a model with
    no BatchNorm that keeps running statistics and is not frozen, or a layer with
    ``renorm`` or ``virtual_batch_size``.

    Example:
        >>> import mxnet as mx
        >>> from mxnet import autograd
        >>> layer = BatchNorm(2)
        >>> layer.initialize()
        >>> with accumulate(layer, steps=2), autograd.train_mode():
        ...     _ = [layer(mx.nd.array([[0.0, 1.0], [2.0, 3.0]])) for _ in range(2)]
        >>> int(layer.num_batches_tracked.data().asnumpy()[0])
        1
    """
    layers = [
        b
        for b in _blocks(model)
        if isinstance(b, BatchNorm) and b.spec.track_running_stats and not b.frozen
    ]

    def end(layer: BatchNorm, finished: bool) -> None:
        step = ACCUMULATING.pop(layer.accumulate_key, None)
        if finished and step is not None:
            _finish(layer, step)

    with accumulation(
        steps,
        layers,
        spec=lambda layer: layer.spec,
        active=lambda layer: layer.accumulate_key in ACCUMULATING,
        begin=lambda layer: ACCUMULATING.__setitem__(layer.accumulate_key, Step(int(steps))),
        end=end,
        # MXNet runs the operators asynchronously: every recorded call must have run
        # before the step is closed.
        wait=mx.nd.waitall,
    ) as governed:
        yield governed


def _finish(layer: BatchNorm, step: Step) -> None:
    """Apply each device's last step of fewer than ``steps`` calls."""
    settings = OpSettings.from_spec(layer.spec)
    mean, var, tracked = layer.running_mean, layer.running_var, layer.num_batches_tracked
    assert mean is not None and var is not None and tracked is not None  # tracking layers
    states = (mean, var, tracked)
    for ctx in mean.list_ctx():
        merged = step.take(str(ctx))
        if merged is None:
            continue
        aux = [p.data(ctx) for p in states]
        apply_merged(aux, merged, settings)
