"""scikit-learn's bundled 8x8 digits, resized to the 28x28 inputs LeNet expects.

No download: the 1,797 images ship inside scikit-learn. They are resized by bilinear
interpolation, scaled to [0, 1] and split once, by a fixed seed, into train and test sets.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Digits", "digits", "resize_bilinear"]


class Digits(NamedTuple):
    """Images ``(N, 1, 28, 28)`` float32 in [0, 1] (channels-first) and labels ``(N,)`` int64."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(N, h, w)`` images to ``(N, size, size)`` by bilinear interpolation
    (pixel centres aligned, as ``align_corners=False`` in PyTorch).

    Example:
        >>> resize_bilinear(np.ones((1, 8, 8)), 28).shape
        (1, 28, 28)
    """
    _, h, w = images.shape

    def weights(src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(size) + 0.5) * src / size - 0.5
        pos = np.clip(pos, 0, src - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, pos - lo

    r0, r1, fr = weights(h)
    c0, c1, fc = weights(w)
    rows = images[:, r0, :] * (1 - fr)[None, :, None] + images[:, r1, :] * fr[None, :, None]
    out: np.ndarray = rows[:, :, c0] * (1 - fc)[None, None, :] + rows[:, :, c1] * fc[None, None, :]
    return out


def digits(test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """The digits data set as 28x28 images, split into train and test sets.

    Example:
        >>> data = digits()
        >>> data.train_x.shape[1:], data.train_x.dtype, len(data.test_y)
        ((1, 28, 28), dtype('float32'), 359)
    """
    from sklearn.datasets import load_digits  # imported here: only the models need it

    bunch = load_digits()
    images = resize_bilinear(bunch.images.astype(np.float64) / 16.0, 28)
    x = images[:, None].astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])
