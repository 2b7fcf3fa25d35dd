"""Benchmark plug-in "numpy": unorm's NumPy reference against plain NumPy expressions.

Needs no framework, so it runs everywhere and shows the harness working end to end. The
reference computes in float64 for accuracy, so its ratio to a float32 expression is well
above 1; that is the price of being the reference, not a target. Run it with
``python -m benchmarks.run numpy``.

Benchmarks (full size; ``quick`` uses small inputs):

- ``batch_norm_inference``: (32, 64, 56, 56) float32, channels on axis 1, against
  ``(x - m) / np.sqrt(v + eps) * g + b`` with broadcast per-channel arrays.
- ``batch_norm_train``: the same input normalised with its own batch statistics, against
  ``x.mean``/``x.var`` over (0, 2, 3) and the same expression.
- ``agc_clip``: a (1024, 1024) float32 gradient clipped per row against its weight, against
  a per-row norm clip written with ``np.linalg.norm``.

``bytes_moved`` counts every input read once and the output written once; for training
BatchNorm the input is counted twice, since the statistics need a whole pass before the
first output value can be written.

Example:
    >>> [b.name for b in benchmarks(quick=True)]
    ['batch_norm_inference', 'batch_norm_train', 'agc_clip']
"""

from __future__ import annotations

import numpy as np

from unorm import reference

from .harness import Benchmark

__all__ = ["benchmarks", "versions"]

BACKEND = "numpy"
EPS = 1e-5
CLIPPING = 0.01
AGC_EPS = 1e-3


def versions() -> dict[str, str]:
    """The versions of what these benchmarks run on.

    Example:
        >>> versions()["numpy"] == np.__version__
        True
    """
    return {"numpy": np.__version__}


def _nbytes(*arrays: np.ndarray) -> int:
    return sum(a.nbytes for a in arrays)


def _bn_inputs(shape: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """A float32 NCHW batch and float32 per-channel mean, variance, gamma and beta."""
    rng = np.random.default_rng(seed)
    channels = shape[1]

    def per_channel(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, channels).astype(np.float32)

    return {
        "x": rng.standard_normal(shape, dtype=np.float32),
        "mean": per_channel(-1.0, 1.0),
        "var": per_channel(0.5, 2.0),
        "gamma": per_channel(0.5, 1.5),
        "beta": per_channel(-0.5, 0.5),
    }


def _as_nchw(v: np.ndarray) -> np.ndarray:
    return v.reshape(1, -1, 1, 1)


def bn_inference(shape: tuple[int, ...]) -> Benchmark:
    """``reference.batch_norm_inference`` against the NumPy expression, on ``shape``.

    Example:
        >>> bn_inference((2, 3, 4, 4)).params
        {'shape': (2, 3, 4, 4), 'dtype': 'float32'}
    """
    a = _bn_inputs(shape)
    x = a["x"]
    m, v, g, b = (_as_nchw(a[k]) for k in ("mean", "var", "gamma", "beta"))

    def unorm() -> np.ndarray:
        return reference.batch_norm_inference(
            x, a["mean"], a["var"], a["gamma"], a["beta"], eps=EPS, axis=1
        )

    def native() -> np.ndarray:
        y: np.ndarray = (x - m) / np.sqrt(v + EPS) * g + b
        return y

    return Benchmark(
        name="batch_norm_inference",
        backend=BACKEND,
        params={"shape": shape, "dtype": "float32"},
        unorm=unorm,
        native=native,
        bytes_moved=_nbytes(*a.values()) + x.nbytes,
    )


def bn_train(shape: tuple[int, ...]) -> Benchmark:
    """``reference.batch_norm_train`` against NumPy batch statistics and expression.

    Example:
        >>> bn_train((2, 3, 4, 4)).bytes_moved == 3 * 2 * 3 * 4 * 4 * 4 + 2 * 3 * 4
        True
    """
    a = _bn_inputs(shape)
    x = a["x"]
    g, b = _as_nchw(a["gamma"]), _as_nchw(a["beta"])
    axes = (0, *range(2, x.ndim))

    def unorm() -> np.ndarray:
        return reference.batch_norm_train(x, a["gamma"], a["beta"], eps=EPS, axis=1)[0]

    def native() -> np.ndarray:
        m = x.mean(axis=axes, keepdims=True)
        v = x.var(axis=axes, keepdims=True)
        y: np.ndarray = (x - m) / np.sqrt(v + EPS) * g + b
        return y

    return Benchmark(
        name="batch_norm_train",
        backend=BACKEND,
        params={"shape": shape, "dtype": "float32"},
        unorm=unorm,
        native=native,
        bytes_moved=3 * x.nbytes + _nbytes(a["gamma"], a["beta"]),
    )


def _agc_inputs(shape: tuple[int, int], seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A weight and a gradient whose row norms span five decades, so about half clip."""
    rng = np.random.default_rng(seed)
    weight = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    row_scale = np.logspace(-5, 0, shape[0])[:, None]
    grad = (row_scale * rng.standard_normal(shape)).astype(np.float32)
    return grad, weight


def agc_clip(shape: tuple[int, int]) -> Benchmark:
    """``reference.agc_clip`` (one unit per row) against a plain per-row norm clip.

    Example:
        >>> agc_clip((8, 4)).bytes_moved
        384
    """
    grad, weight = _agc_inputs(shape)

    def unorm() -> np.ndarray:
        return reference.agc_clip(grad, weight, 0, clipping=CLIPPING, eps=AGC_EPS)

    def native() -> np.ndarray:
        w_norm = np.linalg.norm(weight, axis=1, keepdims=True)
        g_norm = np.linalg.norm(grad, axis=1, keepdims=True)
        max_norm = CLIPPING * np.maximum(w_norm, AGC_EPS)
        factor = np.where(g_norm > max_norm, max_norm / np.maximum(g_norm, 1e-6), 1.0)
        return grad * factor.astype(np.float32)

    return Benchmark(
        name="agc_clip",
        backend=BACKEND,
        params={"shape": shape, "dtype": "float32", "unit_axis": 0},
        unorm=unorm,
        native=native,
        bytes_moved=2 * grad.nbytes + weight.nbytes,
    )


def benchmarks(quick: bool) -> list[Benchmark]:
    """This plug-in's benchmarks: full size, or small inputs when ``quick``.

    Example:
        >>> benchmarks(quick=True)[0].params["shape"]
        (4, 8, 16, 16)
    """
    bn_shape = (4, 8, 16, 16) if quick else (32, 64, 56, 56)
    agc_shape = (128, 128) if quick else (1024, 1024)
    return [bn_inference(bn_shape), bn_train(bn_shape), agc_clip(agc_shape)]
