"""Ghost batches written out in plain NumPy as the tests' own ground truth (no unorm code):
plain BatchNorm run on each group of ``size`` consecutive samples separately, the last
group holding the remainder; and the two feeds of the running statistics."""

from __future__ import annotations

from typing import Any

import numpy as np


def per_group(
    x: np.ndarray,
    dy: np.ndarray,
    size: int,
    gamma: np.ndarray,
    beta: np.ndarray,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    feed: str = "batch",
    unbiased: bool = True,
) -> dict[str, Any]:
    """``y``, ``dx``, ``dgamma``, ``dbeta`` of training BatchNorm on each group, and the
    ``mean`` and ``var`` the running statistics are fed (``feed``: ``"batch"`` the whole
    batch's statistics, ``"groups"`` the mean of the groups' means and variances)."""
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    g, b = gamma.reshape(shape), beta.reshape(shape)
    ys, dxs, means, fed = [], [], [], []
    dgamma, dbeta = np.zeros_like(gamma), np.zeros_like(gamma)
    for start in range(0, x.shape[0], size):
        xg, dg = x[start : start + size], dy[start : start + size]
        n = xg.size // xg.shape[axis]
        mean = xg.mean(axis=reduce, keepdims=True)
        var = ((xg - mean) ** 2).mean(axis=reduce, keepdims=True)
        xhat = (xg - mean) / np.sqrt(var + eps)
        ys.append(g * xhat + b)
        dxs.append(
            g / np.sqrt(var + eps)
            * (dg - dg.mean(axis=reduce, keepdims=True)
               - xhat * (dg * xhat).mean(axis=reduce, keepdims=True))
        )  # fmt: skip
        dgamma += (dg * xhat).sum(axis=reduce)
        dbeta += dg.sum(axis=reduce)
        means.append(mean.ravel())
        fed.append(var.ravel() * (n / (n - 1) if unbiased else 1.0))
    if feed == "batch":
        n = x.size // x.shape[axis]
        feed_mean = x.mean(axis=reduce)
        feed_var = x.var(axis=reduce) * (n / (n - 1) if unbiased else 1.0)
    else:
        feed_mean, feed_var = np.mean(means, axis=0), np.mean(fed, axis=0)
    return {
        "y": np.concatenate(ys),
        "dx": np.concatenate(dxs),
        "dgamma": dgamma,
        "dbeta": dbeta,
        "mean": feed_mean,
        "var": feed_var,
    }
