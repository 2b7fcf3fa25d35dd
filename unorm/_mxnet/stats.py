"""Accurate per-channel batch statistics ``(n, mean, M2)`` of an MXNet NDArray.

MXNet's own BatchNorm kernels sum in float32 one value at a time, which at a mean of 1e4
and a standard deviation of 1 leaves no correct digit of the variance (``SPEC.md`` section
2, *Numerics and dtypes*).
Here the sums run in BLAS (matrix products with a vector of ones, whose many partial
accumulators keep float32 sums accurate) and are finished in float64 on the host:

The input is viewed as ``(P, C, Q)`` (:func:`layout`: sizes before, on and after the
channel axis), and the path depends on ``Q`` alone:

- *rows* (``Q >= ROW_MIN``, e.g. NCHW with ``H * W >= 32``): the ``P * C`` rows of length
  ``Q``; per row ``sum(x)`` is ``rows @ ones`` and ``sum(x * x)`` the diagonal of small
  batched Gram matrices (:data:`GRAM_BLOCK` rows each);
- *columns* (``Q < ROW_MIN``: ``(N, C)`` input, channels-last input of any rank, and
  channels-first input with small spatial maps): the ``(P, C * Q)`` view, summed down its
  ``P`` rows as ``ones @ x`` and ``ones @ (x * x)``, then over the ``Q`` columns of each
  channel on the host.

``M2 = sum(x^2) - sum(x)^2 / n`` cancels when the mean is large against the spread, so it
is guarded: where ``sum(x^2) >= CANCELLATION * M2`` the input is shifted by its mean (one
exact native pass) and the sums are taken again around it, which is the shifted-data form
of the two-pass algorithm. Typical activations (mean within a few standard deviations of
zero) never need the second pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mxnet as mx
import numpy as np
from numpy.typing import NDArray as Array

from .native import constant, shift

__all__ = [
    "CANCELLATION",
    "GRAM_BLOCK",
    "ROW_MIN",
    "Stats",
    "batch_stats",
    "channel_sums",
    "layout",
]

NDArray = Any  # mxnet.nd.NDArray
F64 = Array[np.float64]

#: Rows at least this long are summed row by row; shorter ones column by column.
ROW_MIN = 32
#: Rows per Gram block in the row-wise sum of products.
GRAM_BLOCK = 4
#: Redo the statistics around the mean when ``sum(x^2) >= CANCELLATION * M2`` (the mean
#: exceeds about 2.6 standard deviations): the float32 sums then keep ~6 digits of M2.
CANCELLATION = 8.0


@dataclasses.dataclass(frozen=True)
class Stats:
    """Per-channel ``count``, ``mean`` and ``m2`` (sum of squared deviations), float64."""

    count: int
    mean: F64
    m2: F64

    @property
    def var(self) -> F64:
        """The biased variance ``m2 / count`` (requires ``count >= 1``)."""
        result: F64 = self.m2 / self.count
        return result


def layout(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    """``(P, C, Q)``: the sizes before, on and after the feature ``axis`` (non-negative).

    Any input reshapes to ``(P, C, Q)`` without moving data, with the channels on axis 1.

    Example:
        >>> layout((8, 3, 4, 5), 1)  # NCHW
        (8, 3, 20)
        >>> layout((8, 4, 5, 3), 3)  # NHWC
        (160, 3, 1)
    """
    before = int(np.prod(shape[:axis], dtype=np.int64))
    after = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    return before, shape[axis], after


def channel_sums(a: NDArray, b: NDArray, axis: int) -> tuple[F64, F64]:
    """Per-channel ``sum(a)`` and ``sum(a * b)`` in float64 (BLAS partial sums, host total).

    ``a`` and ``b`` share a shape and dtype, channels on ``axis`` (non-negative); pass
    ``b=a`` for the sum of squares. Returns two float64 arrays of shape ``(C,)``, zeros for
    an empty input. The partial sums are in ``a``'s dtype, the totals in float64 (see the
    module docstring for the row and column paths).

    Example:
        >>> x = mx.nd.array([[1.0, 2.0], [3.0, 4.0]])
        >>> total, squares = channel_sums(x, x, 1)
        >>> total.tolist(), squares.tolist()
        ([4.0, 6.0], [10.0, 20.0])
    """
    p, c, q = layout(a.shape, axis)
    if p * c * q == 0:
        return np.zeros(c), np.zeros(c)
    ctx, dtype = a.context, a.dtype
    if q >= ROW_MIN:
        rows = p * c
        # sum(a * b) per row is the diagonal of a Gram matrix. Blocks of GRAM_BLOCK rows make
        # one small GEMM each: far fewer BLAS calls than one dot per row, at about the cost
        # of reading the input once (4x4 Gram blocks: 4 times the products actually needed).
        block = next(k for k in (GRAM_BLOCK, 2, 1) if rows % k == 0)
        # Both partial sums land in one buffer, so one copy to the host fetches them.
        sums = mx.nd.empty((rows * (1 + block),), ctx=ctx, dtype=dtype)
        mx.nd.dot(
            a.reshape((rows, q)),
            constant(1.0, (q, 1), dtype, ctx),
            out=sums[:rows].reshape((rows, 1)),
        )
        mx.nd.batch_dot(
            a.reshape((rows // block, block, q)),
            b.reshape((rows // block, block, q)),
            transpose_b=True,
            out=sums[rows:].reshape((rows // block, block, block)),
        )
        host = sums.asnumpy().astype(np.float64)
        gram = host[rows:].reshape(rows // block, block, block)
        products = np.einsum("kii->ki", gram).reshape(p, c)
        return host[:rows].reshape(p, c).sum(axis=0), products.sum(axis=0)
    sums = mx.nd.empty((2, c * q), ctx=ctx, dtype=dtype)
    cols = a.reshape((p, c * q))
    ones = constant(1.0, (1, p), dtype, ctx)
    product = cols * (cols if b is a else b.reshape((p, c * q)))
    mx.nd.dot(ones, cols, out=sums[0].reshape((1, c * q)))
    mx.nd.dot(ones, product, out=sums[1].reshape((1, c * q)))
    host = sums.asnumpy().astype(np.float64).reshape(2, c, q)
    return host[0].sum(axis=1), host[1].sum(axis=1)


def batch_stats(x: NDArray, axis: int) -> tuple[Stats, NDArray | None, F64 | None]:
    """Statistics of ``x`` per channel on ``axis``, plus the shifted input if one was made.

    Returns ``(stats, centred, centre)``: when the guarded second pass ran, ``centred`` is
    ``x - centre`` (an NDArray) and ``centre`` the float64 values subtracted; normalising
    ``centred`` with ``stats.mean - centre`` is then more exact than normalising ``x``.
    Otherwise both are None. ``axis`` is non-negative; ``stats.m2`` is the sum of squared
    deviations (``stats.var`` the biased variance), an empty input gives ``count=0``.

    Example:
        >>> stats, centred, centre = batch_stats(mx.nd.array([[1.0, -1.0], [3.0, 1.0]]), 1)
        >>> stats.count, stats.mean.tolist(), stats.var.tolist(), centred is None
        (2, [2.0, 0.0], [1.0, 1.0], True)
        >>> stats, centred, centre = batch_stats(mx.nd.array([[1e4 + 1], [1e4 - 1]]), 1)
        >>> stats.var.tolist(), centre.tolist()  # a large mean: the second pass ran
        ([1.0], [10000.0])
    """
    p, c, q = layout(x.shape, axis)
    count = p * q
    if count == 0:
        return Stats(0, np.zeros(c), np.zeros(c)), None, None
    s1, s2 = channel_sums(x, x, axis)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = s1 / count
        m2 = s2 - s1 * mean
        # NaN compares false, so overflowed squares also take the second pass.
        cancelled = ~(m2 * CANCELLATION > s2) & np.isfinite(mean)
    if not cancelled.any():
        return Stats(count, mean, np.maximum(m2, 0.0)), None, None
    centre_values = np.where(np.isfinite(mean), mean, 0.0).astype(x.dtype)
    centre = mx.nd.array(centre_values, ctx=x.context, dtype=x.dtype)
    centred = shift(x, centre, axis)
    t1, t2 = channel_sums(centred, centred, axis)
    centre64 = centre_values.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = centre64 + t1 / count
        m2 = np.maximum(t2 - t1 * t1 / count, 0.0)
    return Stats(count, mean, m2), centred, centre64
