"""Figures a zoo port is judged by, computed from checkpoints and logits (no framework).

- :func:`relative_logit_error`: ``max |a - b| / max |a|``, the port's tolerance measure.
- :func:`pair_layers`: which layer of one checkpoint is which layer of another, along the
  data flows both record (by order where either records none).
- :func:`statistics_error`: the largest difference of paired BatchNorms' running
  statistics, relative to each statistic's scale (0.0: carried exactly).

Example:
    >>> import numpy as np
    >>> relative_logit_error(np.array([2.0, -4.0]), np.array([2.0, -4.001]))
    0.00025
"""

from __future__ import annotations

import numpy as np

from ..._core import flow as flows
from ..._core.port_plan import _signature
from ...port import Checkpoint, CheckpointError

__all__ = ["pair_layers", "relative_logit_error", "statistics_error"]

_STATISTICS = ("running_mean", "running_var")


def relative_logit_error(reference: np.ndarray, other: np.ndarray) -> float:
    """``max |reference - other| / max |reference|`` (shapes must agree)."""
    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"logits of shape {a.shape} and {b.shape} cannot be compared")
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.finfo(np.float64).tiny))


def _signatures(ckpt: Checkpoint) -> list[str]:
    return [
        _signature(la.kind, {r: tuple(ckpt.tensor(la, r).shape) for r in la.tensors})
        for la in ckpt.layers
    ]


def pair_layers(a: Checkpoint, b: Checkpoint) -> dict[int, int]:
    """Layer index in ``a`` -> layer index in ``b``: along the two recorded data flows
    where both have one, else by position. Raises :class:`~unorm.port.CheckpointError`
    where the layer counts or the flows' structures differ."""
    if len(a.layers) != len(b.layers):
        raise CheckpointError(f"{len(a.layers)} layers against {len(b.layers)}: no pairing")
    fa, fb = a.extra.get("flow"), b.extra.get("flow")
    if fa is None or fb is None:
        return {i: i for i in range(len(a.layers))}
    try:
        return flows.match_flows(
            flows.from_json(fa), _signatures(a), flows.from_json(fb), _signatures(b)
        )
    except flows.FlowError as err:
        raise CheckpointError(f"the two checkpoints' data flows differ: {err}") from None


def statistics_error(a: Checkpoint, b: Checkpoint) -> float:
    """Largest ``max |a - b| / max(max |a|, 1e-12)`` over the running mean and variance of
    every BatchNorm of ``a`` and its pair in ``b`` (:func:`pair_layers`). Raises where a
    pair is not two BatchNorms or has no running statistics."""
    worst = 0.0
    for i, j in pair_layers(a, b).items():
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
