"""Seed networks, the same in every framework, and the data they train on.

``import unorm.models`` imports no framework; the networks live in
``unorm.models.torch``, ``unorm.models.keras`` and ``unorm.models.mxnet``.

- LeNet with BatchNorm (the textbook variant): Conv(1->6, k5) - BatchNorm(6) - Sigmoid -
  MaxPool(2, s2) - Conv(6->16, k5) - BatchNorm(16) - Sigmoid - MaxPool(2, s2) - Flatten -
  Dense(256->120) - BatchNorm(120) - Sigmoid - Dense(120->84) - BatchNorm(84) - Sigmoid -
  Dense(84->10), on 1x28x28 inputs.
- :func:`digits`: scikit-learn's bundled 8x8 handwritten digits, resized to 28x28.
"""

from __future__ import annotations

from .data import Digits, digits

__all__ = ["Digits", "digits"]
