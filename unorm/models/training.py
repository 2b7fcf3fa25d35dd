"""One training recipe for the seed networks, the same in every framework.

Plain SGD (no momentum, no weight decay) on the mean cross-entropy, batches drawn in a
fixed order (:func:`batch_indices`), optional AGC with the final classifier excluded.
Each framework's ``unorm.models.<framework>`` implements :class:`Recipe` with its own
layers and optimizer; given the same initial state (a neutral checkpoint) the three loss
curves agree (the lock-step run, ``./dev lockstep``).

Example:
    >>> [len(b) for b in batch_indices(10, batch_size=4, steps=3, seed=0)]
    [4, 4, 4]
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Recipe", "accuracy", "batch_indices"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of a training run.

    Attributes:
        steps: optimizer steps (default 50).
        batch_size: examples per step (default 64).
        lr: SGD learning rate (default 0.2: large enough for the sigmoid LeNet-BN to learn
            in a few hundred steps, small enough that float32 rounding differences
            between frameworks do not grow chaotically over the lock-step run).
        agc: clip with AGC before each step (default True).
        clipping: AGC's clipping factor (default 0.05: small batches tolerate more than
            the paper's 0.01 at batch 4096).
        seed: seeds the batch order (default 0).
    """

    steps: int = 50
    batch_size: int = 64
    lr: float = 0.2
    agc: bool = True
    clipping: float = 0.05
    seed: int = 0


def batch_indices(count: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """Indices of each step's batch: epochs of a seeded permutation, full batches only."""
    per_epoch = count // batch_size
    out: list[np.ndarray] = []
    epoch = 0
    while len(out) < steps:
        order = np.random.default_rng([seed, epoch]).permutation(count)
        out += [order[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch)]
        epoch += 1
    return out[:steps]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose largest logit is the label.

    Example:
        >>> accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]))
        0.5
    """
    return float(np.mean(np.argmax(logits, axis=1) == labels))
