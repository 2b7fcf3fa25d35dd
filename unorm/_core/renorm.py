"""Batch Renormalization's clipping of ``r`` and ``d`` (``SPEC.md`` section 2), written once
for every backend over the backend's own elementwise ``maximum`` and ``minimum``.

Example:
    >>> clip_correction(3.0, -2.0, rmin=0.5, rmax=2.0, dmax=1.0, maximum=max, minimum=min)
    (2.0, -1.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["clip_correction"]

T = TypeVar("T")


def clip_correction(
    r: T,
    d: T,
    *,
    rmin: float | None,
    rmax: float | None,
    dmax: float | None,
    maximum: Callable[[T, float], T],
    minimum: Callable[[T, float], T],
) -> tuple[T, T]:
    """``r`` clipped to ``[rmin, rmax]`` (``maximum`` with ``rmin``, then ``minimum`` with
    ``rmax``, Keras's order) and ``d`` to ``[-dmax, dmax]``; a bound that is None clips
    nothing. ``maximum(a, bound)``/``minimum(a, bound)`` are the backend's elementwise
    operations of a tensor and a Python float."""
    if rmin is not None:
        r = maximum(r, rmin)
    if rmax is not None:
        r = minimum(r, rmax)
    if dmax is not None:
        d = minimum(maximum(d, -dmax), dmax)
    return r, d
