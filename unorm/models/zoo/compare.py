"""Figures a zoo port is judged by, computed from checkpoints and logits (no framework).

- :func:`relative_logit_error`: ``max |a - b| / max |a|``, the port's tolerance measure.
- :func:`statistics_error`: the largest difference of paired BatchNorms' running
  statistics, in each layer's own units (0.0: carried exactly).

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


def relative_logit_error(reference: np.ndarray, other: np.ndarray) -> float:
    """``max |reference - other| / max |reference|`` (shapes must agree)."""
    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"logits of shape {a.shape} and {b.shape} cannot be compared")
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.finfo(np.float64).tiny))


def statistics_error(a: Checkpoint, b: Checkpoint) -> float:
    """Largest difference of the running statistics of every BatchNorm of ``a`` and its
    pair in ``b`` (:func:`~unorm._core.port_plan.pair_checkpoints`), each in the layer's
    own units: the means' ``max |Δ mean|`` over the layer's running standard deviation
    ``sqrt(max var)`` (a mean that should be 0, after a normalised 1x1 convolution, is
    rounding noise of ~1e-10 and has no scale of its own), the variances' ``max |Δ var|``
    over ``max var``. 0.0: carried exactly. Raises where a pair is not two BatchNorms."""
    worst = 0.0
    for i, j in pair_checkpoints(a, b).items():
        la, lb = a.layers[i], b.layers[j]
        if la.kind != "batchnorm":
            continue
        if lb.kind != "batchnorm":
            raise CheckpointError(f"{la.name!r} pairs with {lb.name!r}, a {lb.kind}")
        mean_a, mean_b, var_a, var_b = (
            np.asarray(ckpt.tensor(layer, role), np.float64)
            for ckpt, layer, role in (
                (a, la, "running_mean"),
                (b, lb, "running_mean"),
                (a, la, "running_var"),
                (b, lb, "running_var"),
            )
        )
        scale = max(float(var_a.max()), 1e-24)
        worst = max(
            worst,
            float(np.abs(mean_a - mean_b).max()) / scale**0.5,
            float(np.abs(var_a - var_b).max()) / scale,
        )
    return worst
