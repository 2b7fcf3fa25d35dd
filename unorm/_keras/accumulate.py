"""``unorm.keras.accumulate``: k training calls of every BatchNorm as one step
(``SPEC.md`` section 2, *Accumulated micro-batches*), eagerly, in a ``tf.function`` and
inside ``model.fit``.

Each layer's step lives in variables of its own (float64 count, mean and M2, merged call
by call with Chan's pairwise formula, and the call counter), so a traced step records
and applies as an eager one does. They belong to the context, not to the layer's weights:
saving the model inside it saves none of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops

from .._core.accumulate import accumulation
from .batchnorm import BatchNorm

__all__ = ["Accumulation", "accumulate"]


class Accumulation:
    """The micro-batches one :class:`BatchNorm` has recorded in the current step."""

    def __init__(self, layer: BatchNorm, steps: int) -> None:
        self.layer, self.steps = layer, steps
        channels = (layer._channels,)

        def variable(shape: tuple[int, ...], dtype: str) -> Any:
            return keras.Variable(ops.zeros(shape, dtype), dtype=dtype, trainable=False)

        self.calls = variable((), "int32")
        self.count = variable((), "float64")
        self.mean = variable(channels, "float64")
        self.m2 = variable(channels, "float64")

    def record(self, mean: Any, variance: Any, count: Any) -> None:
        """Merge one call's mean, biased variance and count into the step (Chan et al.'s
        pairwise form); at the step's ``steps``-th call apply one update and clear."""
        n = ops.cast(count, "float64")
        mean64, m2 = ops.cast(mean, "float64"), ops.cast(variance, "float64") * n
        old_n, old_mean = ops.convert_to_tensor(self.count), ops.convert_to_tensor(self.mean)
        total = old_n + n
        share = ops.where(total > 0, n / ops.maximum(total, 1.0), 0.0)
        delta = mean64 - old_mean
        # An empty call (n == 0) changes nothing, whatever its (NaN) statistics.
        nonempty = n > 0
        new_mean = ops.where(nonempty, old_mean + delta * share, old_mean)
        new_m2 = ops.where(nonempty, self.m2 + m2 + delta * delta * old_n * share, self.m2)
        calls = self.calls + 1
        done = calls >= self.steps
        self._apply(total, new_mean, new_m2, done)
        self.calls.assign(ops.where(done, 0, calls))
        self.count.assign(ops.where(done, 0.0, total))
        self.mean.assign(ops.where(done, ops.zeros_like(new_mean), new_mean))
        self.m2.assign(ops.where(done, ops.zeros_like(new_m2), new_m2))

    def _apply(self, total: Any, mean: Any, m2: Any, when: Any) -> None:
        layer = self.layer
        dtype = layer.moving_mean.dtype
        variance = ops.cast(m2 / ops.maximum(total, 1.0), dtype)
        empty = ops.equal(total, 0.0)
        count = ops.cast(total, "int32")
        layer._update(ops.cast(mean, dtype), variance, count, empty, False, when=when)

    def finish(self) -> None:
        """Apply a last step of fewer than ``steps`` calls (eagerly, on leaving)."""
        if int(self.calls) > 0:
            self._apply(
                ops.convert_to_tensor(self.count),
                ops.convert_to_tensor(self.mean),
                ops.convert_to_tensor(self.m2),
                None,
            )


def _batchnorms(model: Any) -> list[BatchNorm]:
    return [
        layer for layer in model._flatten_layers(include_self=True) if isinstance(layer, BatchNorm)
    ]


def _retrace(model: Any) -> None:
    # A train/test/predict function traced before (or inside) the context would keep the
    # other branch of the layers' calls.
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


@contextlib.contextmanager
def accumulate(model: Any, steps: int) -> Iterator[list[BatchNorm]]:
    """Treat every ``steps`` training calls of each unorm BatchNorm in ``model`` as one
    step of accumulated micro-batches (``SPEC.md`` section 2), as with the wrapped
    optimizer's ``gradient_accumulation_steps``.

    Inside the context each training call normalises its micro-batch as usual and records
    its statistics; after the ``steps``-th call (and, on leaving the context normally, for a
    last step of fewer calls) one update of the moving statistics is applied from their
    exact merge: the variance unbiased on the total count, the whole step skipped when any
    micro-batch was non-finite (``skip_nonfinite``). On an exception the unfinished step is
    dropped. ``model.fit`` inside the context traces its step anew; a ``tf.function`` of
    your own traced outside it must be traced again. Yields the layers it governs.

    Raises ``ValueError`` (nothing changed) for ``steps`` not an integer >= 1, a model with
    no built BatchNorm that keeps moving statistics and is not frozen, or a layer with
    ``renorm``, ``virtual_batch_size`` or ``synchronized``.

    Example:
        >>> import numpy as np
        >>> model = keras.Sequential([keras.Input((3,)), BatchNorm()])
        >>> with accumulate(model, steps=2):
        ...     for part in np.split(np.random.rand(8, 3).astype("float32"), [5]):
        ...         _ = model(part, training=True)
        >>> layer = model.layers[0]
        >>> bool(np.all(np.asarray(layer.moving_mean) > 0))
        True
    """
    layers = [
        layer
        for layer in _batchnorms(model)
        if layer.built and layer.spec.track_running_stats and not layer.frozen and layer.trainable
    ]

    def begin(layer: BatchNorm) -> None:
        layer.accumulation = Accumulation(layer, int(steps))

    def end(layer: BatchNorm, finished: bool) -> None:
        accumulation_, layer.accumulation = layer.accumulation, None
        if finished and accumulation_ is not None:
            accumulation_.finish()

    with accumulation(
        steps,
        layers,
        spec=lambda layer: layer.spec,
        active=lambda layer: layer.accumulation is not None,
        begin=begin,
        end=end,
        refused=lambda layer: layer.synchronized,
        wait=lambda: _retrace(model),
    ) as governed:
        _retrace(model)
        yield governed
