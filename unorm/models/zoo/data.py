"""The zoo's data: seeded random images and labels, the same bytes in every framework.

Example:
    >>> x, y = batch(0, n=2, image_size=8)
    >>> x.shape, x.dtype, y.shape
    ((2, 3, 8, 8), dtype('float32'), (2,))
"""

from __future__ import annotations

import numpy as np

__all__ = ["batch"]


def batch(
    seed: int, n: int = 4, image_size: int = 64, num_labels: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` channels-first float32 images (standard normal, as normalised inputs look)
    and int64 labels in ``[0, num_labels)``, drawn from NumPy's generator seeded
    ``seed``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, image_size, image_size)).astype(np.float32)
    y = rng.integers(0, num_labels, size=n).astype(np.int64)
    return x, y
