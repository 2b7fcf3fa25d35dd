"""Batch Renormalization written out from the paper (Ioffe 2017, arXiv 1702.03275,
Algorithm 1) in plain NumPy, as the tests' own ground truth: no unorm code.

``paper_steps`` runs training steps of one layer and returns, per step, the output, the
gradients and the state after the step. Conventions as in SPEC.md: ``momentum`` and
``renorm_momentum`` weigh the new value; the running variance is fed ``n/(n-1)`` times the
batch variance when ``unbiased``; ``stddev`` keeps Keras's running standard deviation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def paper_steps(
    xs: Sequence[np.ndarray],
    dys: Sequence[np.ndarray],
    gamma: np.ndarray,
    beta: np.ndarray,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    momentum: float = 0.1,
    renorm_momentum: float = 0.01,
    rmax: float = np.inf,
    rmin: float = 0.0,
    dmax: float = np.inf,
    unbiased: bool = True,
    stddev: bool = False,
) -> list[dict[str, Any]]:
    """One dict per step: ``y``, ``dx``, ``dgamma``, ``dbeta`` and the state after it
    (``running_mean``, ``running_var``, ``renorm_mean``, ``renorm_std``)."""
    channels = gamma.shape[0]
    mu_r, sigma_r = np.zeros(channels), np.ones(channels)  # the renorm statistics
    run_mean, run_var, run_std = np.zeros(channels), np.ones(channels), np.ones(channels)
    out = []
    for x, dy in zip(xs, dys, strict=True):
        x = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, channels)
        dy = np.moveaxis(np.asarray(dy, np.float64), axis, -1).reshape(-1, channels)
        m = x.shape[0]
        mu_b = x.mean(axis=0)
        var_b = ((x - mu_b) ** 2).mean(axis=0)
        sigma_b = np.sqrt(var_b + eps)
        floor = np.maximum(sigma_r, np.sqrt(eps))
        r = np.clip(sigma_b / floor, rmin, rmax)
        d = np.clip((mu_b - mu_r) / floor, -dmax, dmax)
        xhat = (x - mu_b) / sigma_b
        corrected = xhat * r + d
        y = gamma * corrected + beta
        # Backward with r and d constant: y = (gamma r) * xhat + const.
        g = dy * gamma * r
        dx = (g - g.mean(axis=0) - xhat * (g * xhat).mean(axis=0)) / sigma_b
        dgamma = (dy * corrected).sum(axis=0)
        dbeta = dy.sum(axis=0)
        mu_r = mu_r + renorm_momentum * (mu_b - mu_r)
        sigma_r = sigma_r + renorm_momentum * (sigma_b - sigma_r)
        fed = var_b * m / (m - 1) if unbiased else var_b
        run_mean = (1 - momentum) * run_mean + momentum * mu_b
        if stddev:
            run_std = (1 - momentum) * run_std + momentum * np.sqrt(fed + eps)
            run_var = np.maximum(run_std**2 - eps, 0.0)
        else:
            run_var = (1 - momentum) * run_var + momentum * fed
        shape = list(np.moveaxis(np.empty(np.shape(xs[0])), axis, -1).shape)

        def back(a: np.ndarray, shape: list[int] = shape) -> np.ndarray:
            return np.moveaxis(a.reshape(shape), -1, axis)

        out.append(
            {
                "y": back(y),
                "dx": back(dx),
                "dgamma": dgamma,
                "dbeta": dbeta,
                "running_mean": run_mean.copy(),
                "running_var": run_var.copy(),
                "running_std": run_std.copy(),
                "renorm_mean": mu_r.copy(),
                "renorm_std": sigma_r.copy(),
            }
        )
    return out


def inference(
    x: np.ndarray,
    step: dict[str, Any],
    gamma: np.ndarray,
    beta: np.ndarray,
    *,
    axis: int = 1,
    eps: float = 1e-5,
) -> np.ndarray:
    """The inference output after ``step``: the running statistics, as without renorm."""
    shape = [1] * np.ndim(x)
    shape[axis] = -1
    mean = step["running_mean"].reshape(shape)
    var = step["running_var"].reshape(shape)
    return gamma.reshape(shape) * (x - mean) / np.sqrt(var + eps) + beta.reshape(shape)
