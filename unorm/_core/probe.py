"""Verified loads: the probe a neutral checkpoint carries, and the check every load runs.

A checkpoint exported with an example input holds a *probe*: a small input in the
canonical (channels-first) layout, the source model's eval-mode output on it, and a
*digest* of every layer's output (per channel: the mean and the root mean square over
every other axis). Loading runs the target model on the same input; an output that
differs from the source's beyond :data:`RTOL` of its scale fails the load, naming the
first layer (in the checkpoint's order) whose digest diverges, and the model is put back
as it was (:func:`unorm._core.port_plan.load`). The probe travels in the file, so this
works across environments. Nothing here imports a framework.

Tolerance: float32 arithmetic in another framework (another summation order, fused
kernels) moves a deep network's outputs by about 1e-6 of their scale; a wrong weight,
statistic or setting moves them by far more. :data:`RTOL` (1e-4 of the scale, the
scale being the largest absolute value of the source's output, or of that channel's
digest) sits between the two.

Example:
    >>> y = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    >>> digest(y).shape
    (2, 3)
    >>> mismatch(y, y + 1e-6) is None, mismatch(y, y + 1.0) is not None
    (True, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "INPUT",
    "OUTPUT",
    "PROBE_BATCH",
    "RTOL",
    "Probe",
    "digest",
    "digest_key",
    "first_divergence",
    "make_input",
    "mismatch",
]

#: Relative tolerance of a verified load, against the scale of what is compared.
RTOL = 1e-4
#: Samples in a probe: two, so a batch-dependent computation would show.
PROBE_BATCH = 2
#: Tensor names of the probe's input and output in a checkpoint.
INPUT, OUTPUT = "probe/input", "probe/output"


def digest_key(index: int) -> str:
    """The tensor name of the digest of the checkpoint's layer ``index``."""
    return f"probe/digest/{index}"


def make_input(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A probe input: :data:`PROBE_BATCH` samples of ``shape`` (one sample's canonical,
    channels-first shape) drawn from a standard normal, float32, the same for a seed.

    Example:
        >>> make_input((1, 4, 4)).shape
        (2, 1, 4, 4)
    """
    rng = np.random.default_rng(seed)
    return rng.standard_normal((PROBE_BATCH, *shape)).astype(np.float32)


def digest(output: np.ndarray) -> np.ndarray:
    """``(2, C)``: per channel (axis 1 of a canonical ``(N, C, ...)`` output; a rank-1
    output is one channel), the mean and the root mean square over every other axis, in
    float64 then stored as float32.

    Example:
        >>> digest(np.array([[1.0, -2.0], [3.0, 2.0]])).tolist()
        [[2.0, 0.0], [2.2360680103302, 2.0]]
    """
    a = np.asarray(output, dtype=np.float64)
    if a.ndim == 0:
        a = a.reshape(1, 1)
    elif a.ndim == 1:
        a = a.reshape(-1, 1)
    axes = tuple(i for i in range(a.ndim) if i != 1)
    return np.stack([a.mean(axis=axes), np.sqrt((a * a).mean(axis=axes))]).astype(np.float32)


def mismatch(expected: np.ndarray, got: np.ndarray, rtol: float = RTOL) -> str | None:
    """Why ``got`` is not ``expected`` within ``rtol`` of ``expected``'s scale (its
    largest absolute value), or None when it is.

    Example:
        >>> mismatch(np.ones(3), np.ones(4))
        'shape (4,), the source (3,)'
    """
    want = np.asarray(expected, dtype=np.float64)
    have = np.asarray(got, dtype=np.float64)
    if want.shape != have.shape:
        return f"shape {have.shape}, the source {want.shape}"
    if not np.all(np.isfinite(have) == np.isfinite(want)):
        return "non-finite values where the source's are finite (or the other way round)"
    finite = np.isfinite(want)
    if not finite.any():
        return None
    scale = max(float(np.abs(want[finite]).max()), 1e-6)
    error = float(np.abs(have[finite] - want[finite]).max())
    if error > rtol * scale:
        return f"off by {error:.3g} at a scale of {scale:.3g} (tolerance {rtol:g} of the scale)"
    return None


@dataclasses.dataclass(frozen=True)
class Probe:
    """A checkpoint's probe: its input, the source's output and per-layer digests (by
    the checkpoint's layer index; a layer without one is not compared)."""

    input: np.ndarray
    output: np.ndarray
    digests: Mapping[int, np.ndarray]

    def tensors(self) -> dict[str, np.ndarray]:
        """The probe as checkpoint tensors (:data:`INPUT`, :data:`OUTPUT`,
        :func:`digest_key`)."""
        out = {INPUT: self.input, OUTPUT: self.output}
        out.update({digest_key(i): d for i, d in self.digests.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], layers: int) -> Probe | None:
        """The probe in a checkpoint's ``tensors`` (of ``layers`` layers), or None."""
        if INPUT not in tensors or OUTPUT not in tensors:
            return None
        digests = {i: tensors[digest_key(i)] for i in range(layers) if digest_key(i) in tensors}
        return cls(np.asarray(tensors[INPUT]), np.asarray(tensors[OUTPUT]), digests)


def first_divergence(
    probe: Probe, per_layer: Mapping[int, np.ndarray], order: Sequence[int]
) -> tuple[int, str] | None:
    """The first checkpoint layer (in ``order``) whose output on the probe, ``per_layer``
    (by checkpoint index), has a digest other than the probe's, and why; None when every
    compared layer agrees.

    Example:
        >>> p = Probe(np.zeros(1), np.zeros(1), {0: digest(np.ones((2, 3)))})
        >>> first_divergence(p, {0: np.ones((2, 3))}, [0]) is None
        True
        >>> first_divergence(p, {0: np.zeros((2, 3))}, [0])[0]
        0
    """
    for index in order:
        if index not in probe.digests or index not in per_layer:
            continue
        why = mismatch(probe.digests[index], digest(per_layer[index]))
        if why is not None:
            return index, why
    return None
