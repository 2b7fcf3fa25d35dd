"""One training step and eval-mode logits for a zoo model in PyTorch.

Both take channels-first NumPy images, as every framework's zoo helpers do.

Example:
    >>> from torch import nn
    >>> from unorm.models.zoo.data import batch
    >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Flatten(),
    ...                     nn.Linear(2 * 6 * 6, 10))
    >>> x, y = batch(0, image_size=8)
    >>> loss = train_step(net, x, y)
    >>> evaluate(net, x).shape
    (4, 10)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...torch import recalibrate as _recalibrate

__all__ = ["evaluate", "recalibrate", "train_step"]


def _logits(output: Any) -> torch.Tensor:
    """A model's logits: the output itself, or the ``logits`` field ``transformers``'
    ``ModelOutput`` carries."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returns a {type(output).__name__} without logits")
    return logits


def train_step(model: nn.Module, x: np.ndarray, y: np.ndarray, lr: float = 0.01) -> float:
    """One plain SGD step (learning rate ``lr``) on the mean softmax cross-entropy of
    ``model``'s logits for channels-first images ``x`` and int labels ``y``, in training
    mode; returns the loss before the update. The model is left in training mode."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = F.cross_entropy(_logits(model(torch.from_numpy(x))), torch.from_numpy(y))
    loss.backward()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(lr * p.grad)
                p.grad = None
    return float(loss.detach())


def evaluate(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """``model``'s eval-mode logits for channels-first images ``x``, as float32 NumPy;
    the model is left in eval mode."""
    model.eval()
    with torch.no_grad():
        logits: np.ndarray = _logits(model(torch.from_numpy(x))).numpy()
    return logits


def recalibrate(model: nn.Module, x: np.ndarray) -> None:
    """Set every BatchNorm's running statistics to the exact statistics of its input on
    channels-first images ``x`` (:func:`unorm.torch.recalibrate`), so that a few training
    steps start from statistics a model of the data would have, not 0 and 1."""
    _recalibrate(model, [torch.from_numpy(x)])
