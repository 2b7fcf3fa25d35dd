"""Thin wrappers over MXNet's own kernels, so that unorm's heavy per-element work runs native.

- :func:`affine` is ``gamma * (x - mean) / sqrt(var + eps) + beta`` per channel: MXNet's
  BatchNorm kernel in inference mode (``use_global_stats=True``). With ``var=1``, ``eps=0``,
  ``gamma=1`` and ``beta=0`` it is the exact per-channel shift ``x - mean``.
- :func:`batchnorm_backward` runs MXNet's ``_backward_BatchNorm`` kernel on statistics that
  unorm computed (MXNet only reaches that kernel through a graph; it is called here by its
  operator handle with the gradient arrays given as outputs).
- :func:`constant` caches small constant arrays (ones, zeros) per shape, dtype and device.

Work dtype: kernels run in float32 (float64 for float64 input); float16 input is cast to
float32 first (:func:`work_dtype`), as SPEC.md asks statistics of 16-bit input in float32.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd
from mxnet.base import _LIB, c_str, check_call
from mxnet.ndarray.register import _imperative_invoke

__all__ = ["affine", "affine_params", "batchnorm_backward", "constant", "shift", "work_dtype"]

NDArray = Any  # mxnet.nd.NDArray; MXNet ships no type information

_CACHE_SIZE = 256
_cache: OrderedDict[tuple[object, ...], NDArray] = OrderedDict()
_cache_lock = threading.Lock()
_backward_handle: int | None = None


def work_dtype(dtype: Any) -> np.dtype[Any]:
    """The dtype kernels run in for input of ``dtype``: float64 stays, all else float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def constant(value: float, shape: tuple[int, ...], dtype: Any, ctx: Any) -> NDArray:
    """A cached array of ``shape`` filled with ``value``, on ``ctx``, of ``dtype``.

    The same key returns the same array (the cache keeps the :data:`_CACHE_SIZE` most
    recently used), so never write into it.

    Example:
        >>> ones = constant(1.0, (2,), "float32", mx.cpu())
        >>> ones.asnumpy().tolist(), constant(1.0, (2,), "float32", mx.cpu()) is ones
        ([1.0, 1.0], True)
    """
    key = (float(value), tuple(shape), np.dtype(dtype).name, str(ctx))
    with _cache_lock:
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
            return found
    array = mx.nd.full(shape, value, ctx=ctx, dtype=dtype)
    with _cache_lock:
        _cache[key] = array
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return array


def affine_params(
    gamma: NDArray, beta: NDArray, *, scale: bool, center: bool, dtype: Any, ctx: Any
) -> tuple[NDArray, NDArray]:
    """``gamma`` and ``beta`` as :func:`affine` takes them: a layer with ``scale`` or
    ``center`` off keeps the (fixed) parameter, which then counts as 1 or 0."""
    channels = gamma.shape[0]
    return (
        gamma if scale else constant(1.0, (channels,), dtype, ctx),
        beta if center else constant(0.0, (channels,), dtype, ctx),
    )


def affine(
    x: NDArray,
    mean: NDArray,
    var: NDArray,
    gamma: NDArray,
    beta: NDArray,
    *,
    eps: float,
    axis: int,
    out: NDArray | None = None,
) -> NDArray:
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` along ``axis``, in one native pass.

    ``mean``, ``var``, ``gamma`` and ``beta`` have shape ``(C,)`` and :func:`work_dtype`.
    The kernel reads ``mean`` and ``var`` only (inference mode never updates them).
    ``out``: write the result there (may be ``x`` itself); returns the result.

    Example:
        >>> x = mx.nd.array([[1.0, 2.0], [3.0, 6.0]])
        >>> mean, var = mx.nd.array([2.0, 4.0]), mx.nd.array([1.0, 4.0])
        >>> gamma, beta = mx.nd.array([1.0, 1.0]), mx.nd.array([0.0, 10.0])
        >>> affine(x, mean, var, gamma, beta, eps=0.0, axis=1).asnumpy().tolist()
        [[-1.0, 9.0], [1.0, 11.0]]
    """
    return mx.nd.BatchNorm(
        x,
        gamma,
        beta,
        mean,
        var,
        eps=eps,
        fix_gamma=False,
        use_global_stats=True,
        axis=axis,
        out=out,
    )


def shift(x: NDArray, by: NDArray, axis: int) -> NDArray:
    """``x - by`` along ``axis``, exact where ``x`` and ``by`` are close (one native pass).

    ``by`` has shape ``(C,)`` and ``x``'s dtype; the result is a new array.

    Example:
        >>> shift(mx.nd.array([[1.0, 5.0]]), mx.nd.array([1.0, 2.0]), 1).asnumpy().tolist()
        [[0.0, 3.0]]
    """
    channels = by.shape[0]
    one = constant(1.0, (channels,), by.dtype, x.context)
    zero = constant(0.0, (channels,), by.dtype, x.context)
    # var=1 and eps=0 make the kernel's scale exactly 1, so only the subtraction rounds.
    return affine(x, by, one, one, zero, eps=0.0, axis=axis)


def _handle() -> int:
    global _backward_handle
    if _backward_handle is None:
        handle = ctypes.c_void_p()
        check_call(_LIB.NNGetOpHandle(c_str("_backward_BatchNorm"), ctypes.byref(handle)))
        if handle.value is None:  # pragma: no cover - every MXNet 1.x build has the kernel
            raise RuntimeError("MXNet has no _backward_BatchNorm kernel")
        _backward_handle = int(handle.value)
    return _backward_handle


def batchnorm_backward(
    dy: NDArray,
    x: NDArray,
    gamma: NDArray,
    *,
    eps: float,
    axis: int,
    out: list[NDArray],
    batch: tuple[NDArray, NDArray] | None = None,
    running: tuple[NDArray, NDArray] | None = None,
) -> None:
    """MXNet's BatchNorm backward kernel, writing ``dx, dgamma, dbeta`` into ``out``.

    ``batch=(mean, invstd)``: the training formula, gradients flow through the batch mean
    and the biased variance (``invstd = 1/sqrt(var + eps)``). ``running=(mean, var)``: the
    inference formula with running statistics as constants. Give exactly one.
    ``out`` holds three preallocated arrays of the shapes of ``x``, ``gamma`` and
    ``gamma``, which are overwritten (MXNet's ``req='write'``).

    Example:
        >>> x, dy = mx.nd.array([[1.0], [3.0]]), mx.nd.array([[1.0], [1.0]])
        >>> out = [mx.nd.empty((2, 1)), mx.nd.empty((1,)), mx.nd.empty((1,))]
        >>> running = (mx.nd.array([0.0]), mx.nd.array([4.0]))  # mean 0, std 2
        >>> batchnorm_backward(dy, x, mx.nd.array([2.0]), eps=0.0, axis=1, out=out,
        ...                    running=running)
        >>> [o.asnumpy().tolist() for o in out]  # dy*gamma/std, sum(dy*x/std), sum(dy)
        [[[1.0], [1.0]], [2.0], [2.0]]
    """
    channels = gamma.shape[0]
    ctx, dtype = x.context, np.dtype(gamma.dtype)
    beta = constant(0.0, (channels,), dtype, ctx)  # read by nothing, but an input
    if batch is not None:
        # Training mode folds the statistics into the moving averages it is given: scratch.
        scratch = [mx.nd.empty((channels,), ctx=ctx, dtype=dtype) for _ in range(2)]
        inputs = [dy, batch[0], batch[1], x, gamma, beta, *scratch]
        global_stats = "False"
    elif running is not None:
        zero = constant(0.0, (channels,), dtype, ctx)
        one = constant(1.0, (channels,), dtype, ctx)
        inputs = [dy, zero, one, x, gamma, beta, running[0], running[1]]
        global_stats = "True"
    else:  # pragma: no cover - internal misuse
        raise TypeError("batchnorm_backward needs batch= or running=")
    keys = ["eps", "fix_gamma", "use_global_stats", "axis"]
    values = [repr(float(eps)), "False", global_stats, str(axis)]
    # The kernel picks its formula from the training flag, which is per thread.
    with autograd.train_mode():
        _imperative_invoke(_handle(), inputs, keys, values, out, False, True)
