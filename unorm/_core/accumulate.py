"""The rules of accumulated micro-batches (``SPEC.md`` section 2), written once for every
backend: the checks and messages of ``accumulate(model, steps)`` and the life of its
context; each backend supplies how a layer starts and ends a step.

Example:
    >>> from unorm.spec import BatchNormSpec
    >>> ended = []
    >>> with accumulation(2, ["bn"], spec=lambda _: BatchNormSpec(), active=lambda _: False,
    ...                   begin=lambda _: None, end=lambda l, done: ended.append((l, done))):
    ...     pass
    >>> ended
    [('bn', True)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from ..spec import BatchNormSpec

__all__ = ["accumulation"]

L = TypeVar("L")


@contextlib.contextmanager
def accumulation(
    steps: object,
    layers: Sequence[L],
    *,
    spec: Callable[[L], BatchNormSpec],
    active: Callable[[L], bool],
    begin: Callable[[L], None],
    end: Callable[[L, bool], None],
    refused: Callable[[L], bool] = lambda _: False,
    wait: Callable[[], None] | None = None,
) -> Iterator[list[L]]:
    """Check ``steps`` and the governed ``layers`` (those that keep running statistics and
    are not frozen: the backend's choice), ``begin`` each, yield them, and ``end`` each
    with whether the block finished without an exception (``wait`` first: a backend that
    runs its operators asynchronously). ``ValueError`` before anything begins for
    ``steps`` not an integer >= 1, no layer, a layer with ``renorm`` or
    ``virtual_batch_size`` (or ``refused``), or one already accumulating (``active``)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not layers:
        raise ValueError(
            "accumulate needs a model with at least one BatchNorm that keeps running "
            "statistics (track_running_stats=True) and is not frozen, got none"
        )
    for layer in layers:
        settings = spec(layer)
        if settings.renorm or settings.virtual_batch_size is not None or refused(layer):
            raise ValueError(
                "accumulate takes no BatchNorm with renorm=True, virtual_batch_size or "
                f"cross-replica statistics it cannot merge, got {layer!r}"
            )
        if active(layer):
            raise ValueError(f"accumulate is already active on {layer!r}")
    for layer in layers:
        begin(layer)
    finished = False
    try:
        yield list(layers)
        finished = True
    finally:
        if wait is not None:
            wait()
        for layer in layers:
            end(layer, finished)
