"""Constants of the normalizer-free seed networks (framework-free).

NFNets keep activations at unit variance without BatchNorm by scaling each nonlinearity
by ``gamma = 1 / std(f(z))`` for ``z ~ N(0, 1)`` (Brock et al. 2021, "Characterizing
signal propagation to close the performance gap in unnormalized ResNets", appendix).

Example:
    >>> round(SIGMOID_GAMMA, 4)
    4.8013
"""

from __future__ import annotations

import numpy as np

__all__ = ["SIGMOID_GAMMA", "activation_gamma"]


def activation_gamma(f: object, points: int = 200_001) -> float:
    """``1 / std(f(z))`` for ``z ~ N(0, 1)``, integrated on a fine grid over [-12, 12]
    (a grid rather than Gauss-Hermite quadrature: kinks such as ReLU's spoil the latter).

    Example:
        >>> round(activation_gamma(lambda z: np.maximum(z, 0.0)), 4)  # ReLU: sqrt(2 / (1 - 1/pi))
        1.7129
    """
    nodes = np.linspace(-12.0, 12.0, points)
    weights = np.exp(-0.5 * nodes**2)
    weights /= weights.sum()
    values = np.asarray(f(nodes), dtype=np.float64)  # type: ignore[operator]
    mean = float((weights * values).sum())
    var = float((weights * (values - mean) ** 2).sum())
    return float(1.0 / np.sqrt(var))


#: The sigmoid's variance-preserving scale.
SIGMOID_GAMMA = activation_gamma(lambda z: 1.0 / (1.0 + np.exp(-z)))
