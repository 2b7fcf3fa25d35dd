"""Figures a zoo port is judged by, computed from checkpoints and logits (no framework).

- :func:`relative_logit_error`: ``max |a - b| / max |a|``, the port's tolerance measure.
- :func:`statistics_error`: the largest difference of paired BatchNorms' running
  statistics, relative to each statistic's scale (0.0: carried exactly).

Example:
    >>> import numpy as np
    >>> relative_logit_error(np.array([2.0, -4.0]), np.array([2.0, -4.001]))
    0.00025
"""

from __future__ import annotations

import numpy as np

from ..._core.port_plan import pair_checkpoints
from ...port import Checkpoint, CheckpointError

__all__ = ["relative_logit_error", "statistics_error"]

_STATISTICS = ("running_mean", "running_var")


def relative_logit_error(reference: np.ndarray, other: np.ndarray) -> float:
    """``max |reference - other| / max |reference|`` (shapes must agree)."""
    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"logits of shape {a.shape} and {b.shape} cannot be compared")
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.finfo(np.float64).tiny))


def statistics_error(a: Checkpoint, b: Checkpoint) -> float:
    """Largest ``max |a - b| / max(max |a|, 1e-12)`` over the running mean and variance of
    every BatchNorm of ``a`` and its pair in ``b``
    (:func:`~unorm._core.port_plan.pair_checkpoints`). Raises where a
    pair is not two BatchNorms or has no running statistics."""
    worst = 0.0
    for i, j in pair_checkpoints(a, b).items():
        la, lb = a.layers[i], b.layers[j]
        if la.kind != "batchnorm":
            continue
        if lb.kind != "batchnorm":
            raise CheckpointError(f"{la.name!r} pairs with {lb.name!r}, a {lb.kind}")
        for role in _STATISTICS:
            x = np.asarray(a.tensor(la, role), np.float64)
            y = np.asarray(b.tensor(lb, role), np.float64)
            scale = max(float(np.abs(x).max()), 1e-12)
            worst = max(worst, float(np.abs(x - y).max()) / scale)
    return worst
