"""BatchNorm after training (``SPEC.md`` section 8): the rules every backend shares.

A backend reads its model's data flow and describes each BatchNorm it found as a
:class:`FoldCandidate` (what feeds it, who else reads that, which axes meet); this module
decides whether it folds (:func:`fold_refusal`), which axes of the producer's weight are
its output channels (:func:`fold_plan`), what the report says and when ``strict`` makes
it an error (:func:`finish_report`), and the messages of ``recalibrate`` and ``freeze``.
Nothing here imports a framework.

Example:
    >>> c = FoldCandidate("bn", producer="fc", producer_kind="dense", num_features=4,
    ...                   out_channels=4, bn_axis=-1, channel_axis=-1)
    >>> fold_refusal(c) is None
    True
    >>> fold_refusal(dataclasses.replace(c, other_users=("head",))).split(": ")[1]
    "the output of 'fc' also feeds 'head'; folding would change what it receives"
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import IO, TYPE_CHECKING, Any, TypeVar

from ..progress import ProgressBar
from .layer_kinds import KernelLayout, UnitPlan, unit_plan

if TYPE_CHECKING:  # NumPy is imported where arrays are folded or merged
    import numpy as np

#: An array or tensor of per-feature values (NumPy's or a framework's), or a number.
A = TypeVar("A", bound=Any)

__all__ = [
    "EMPTY_BATCHES",
    "NO_BATCHNORM",
    "PRODUCER_KINDS",
    "FoldCandidate",
    "FoldEntry",
    "FoldError",
    "FoldWarning",
    "Moments",
    "check_counts",
    "finish_report",
    "fold_arrays",
    "fold_plan",
    "fold_refusal",
    "freeze_needs_running_stats",
    "merge_moments",
    "no_values",
    "nonfinite_batch",
    "run_batches",
]

#: The layer kinds a BatchNorm folds into (``SPEC.md`` section 8, *Fold*).
PRODUCER_KINDS = ("dense", "conv", "conv_transpose", "depthwise_conv")

#: ``recalibrate`` on a model without a BatchNorm that keeps running statistics.
NO_BATCHNORM = (
    "recalibrate needs a model with at least one BatchNorm that keeps running statistics "
    "(track_running_stats=True) and is not frozen, got none"
)

#: ``recalibrate`` given no batch.
EMPTY_BATCHES = "batches must yield at least one batch, got none"


def nonfinite_batch(index: int, bn: str) -> str:
    """The message for batch ``index`` giving non-finite statistics at BatchNorm ``bn``."""
    return (
        f"batches[{index}] gives non-finite statistics at BatchNorm {bn!r}; recalibrate "
        "only on finite data"
    )


def no_values(bn: str) -> str:
    """The message for a BatchNorm whose input held no value over all batches."""
    return f"BatchNorm {bn!r} received no values from batches; its running statistics are undefined"


def freeze_needs_running_stats(bn: str) -> str:
    """The message for freezing a BatchNorm that keeps no running statistics."""
    return f"freeze needs running statistics: BatchNorm {bn!r} has track_running_stats=False"


class FoldError(ValueError):
    """A BatchNorm that ``fold(..., strict=True)`` could not fold; the message says why."""


class FoldWarning(UserWarning):
    """``fold`` left BatchNorm layers in place; the message lists them and why."""


@dataclasses.dataclass(frozen=True)
class FoldCandidate:
    """What a backend knows about one BatchNorm call of a model's data flow.

    Attributes:
        bn: the BatchNorm's name in the model.
        source: what its input is, in words, when that is not a producer layer
            (``"ReLU 'act'"``, ``"the model's input"``).
        producer: the producer layer's name (None: the input is no producer's output).
        producer_kind: one of :data:`PRODUCER_KINDS`.
        other_users: the names of the other readers of the producer's output.
        producer_uses: how often the producer is used (calls, shared weights).
        bn_uses: how often the BatchNorm is called, where a backend replaces layers.
        tracks_running_stats: the BatchNorm keeps running statistics.
        bn_axis: its feature axis as configured (may be negative).
        channel_axis: the producer output's channel axis (may be negative).
        rank: the rank of the BatchNorm's input, None where it is not known.
        num_features: the BatchNorm's feature count.
        out_channels: the producer's output channels.
    """

    bn: str
    source: str = ""
    producer: str | None = None
    producer_kind: str | None = None
    other_users: tuple[str, ...] = ()
    producer_uses: int = 1
    bn_uses: int = 1
    tracks_running_stats: bool = True
    bn_axis: int = 1
    channel_axis: int = 1
    rank: int | None = None
    num_features: int = 0
    out_channels: int = 0


@dataclasses.dataclass(frozen=True)
class FoldEntry:
    """One line of a fold's report: ``bn`` folded ``into`` a layer, or not, and why."""

    bn: str
    into: str | None
    reason: str | None = None

    @property
    def folded(self) -> bool:
        """Whether the BatchNorm was folded."""
        return self.reason is None


def _axes_meet(bn_axis: int, channel_axis: int, rank: int | None) -> bool | None:
    """Whether two axes name the same one of an input of ``rank`` (None: unknown)."""
    if (bn_axis < 0) == (channel_axis < 0):
        return bn_axis == channel_axis
    if rank is None:
        return None
    return bn_axis % rank == channel_axis % rank


def fold_refusal(c: FoldCandidate) -> str | None:
    """Why the BatchNorm of ``c`` cannot be folded exactly (``SPEC.md`` section 8), or
    None when it can. The reasons are checked in the specification's order."""
    head = f"BatchNorm {c.bn!r} is not folded: "
    if c.producer is None or c.producer_kind not in PRODUCER_KINDS:
        return head + (
            f"its input is {c.source or 'not a layer'}, not the output of a convolution, "
            "transposed convolution or dense layer (a BatchNorm is never folded into the "
            "layer after it: a padded convolution there pads with zeros the shift would "
            "have moved)"
        )
    if c.other_users:
        listed = ", ".join(repr(u) for u in c.other_users)
        what = "it receives" if len(c.other_users) == 1 else "they receive"
        return head + (
            f"the output of {c.producer!r} also feeds {listed}; folding would change what {what}"
        )
    if c.bn_uses > 1:
        return head + (
            f"it is called {c.bn_uses} times, and folding replaces the layer in all of its calls"
        )
    if c.producer_uses > 1:
        return head + (
            f"{c.producer!r} is used {c.producer_uses} times (called again or its weight "
            "shared); folding would change its other uses"
        )
    if not c.tracks_running_stats:
        return head + (
            "track_running_stats=False: inference uses batch statistics, which no weight can hold"
        )
    meet = _axes_meet(c.bn_axis, c.channel_axis, c.rank)
    if meet is None:
        return head + (
            f"the rank of its input is unknown, so whether its feature axis {c.bn_axis} is "
            f"{c.producer!r}'s output-channel axis {c.channel_axis} is unknown; pass an "
            "example input"
        )
    if not meet:
        return head + (
            f"its feature axis {c.bn_axis} is not {c.producer!r}'s output-channel axis "
            f"{c.channel_axis} (input of rank {c.rank})"
        )
    if c.num_features != c.out_channels:
        return head + (
            f"it has {c.num_features} features and {c.producer!r} {c.out_channels} output channels"
        )
    return None


def fold_plan(kind: str, layout: KernelLayout, shape: tuple[int, ...], groups: int = 1) -> UnitPlan:
    """The axes of a producer's weight that index its output channels (of the grouped view
    for a grouped transposed convolution): the output units of the layer-kind table.

    Example:
        >>> fold_plan("conv_transpose", KernelLayout("a b k"), (6, 2, 3), groups=3)
        UnitPlan(axes=(0, 2), view=(3, 2, 2, 3))
    """
    if kind not in PRODUCER_KINDS:
        raise ValueError(f"a BatchNorm folds into one of {PRODUCER_KINDS}, got {kind!r}")
    return unit_plan(kind, layout, shape, groups)


def finish_report(entries: Sequence[FoldEntry], strict: bool) -> str | None:
    """Raise :class:`FoldError` for the first refused entry under ``strict``; otherwise the
    warning text listing every refused entry (None when all folded)."""
    refused = [e for e in entries if not e.folded]
    if not refused:
        return None
    if strict:
        raise FoldError(f"{refused[0].reason} (strict=True)")
    lines = "\n".join(f"- {e.reason}" for e in refused)
    return f"fold left {len(refused)} BatchNorm layer(s) in place:\n{lines}"


def fold_arrays(
    weight: np.ndarray,
    bias: np.ndarray | None,
    mean: np.ndarray,
    var: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    plan: UnitPlan,
) -> tuple[np.ndarray, np.ndarray]:
    """``W' = W * s`` on ``plan``'s axes, ``b' = (b - mean) * s + beta`` with
    ``s = gamma / sqrt(var + eps)``, in float64, returned in ``weight``'s dtype (for
    backends whose weights reach NumPy; ``SPEC.md`` section 8).

    Example:
        >>> import numpy as np
        >>> w, b = fold_arrays(np.ones((2, 3), np.float32), None, np.zeros(3), np.full(3, 3.0),
        ...                    None, None, 1.0, UnitPlan((1,)))
        >>> w.tolist(), b.tolist(), w.dtype.name
        ([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], [0.0, 0.0, 0.0], 'float32')
    """
    import numpy as np

    w = np.asarray(weight)
    shape = plan.view or w.shape
    mean64, var64 = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    g = np.ones_like(var64) if gamma is None else np.asarray(gamma, np.float64)
    be = np.zeros_like(var64) if beta is None else np.asarray(beta, np.float64)
    b = np.zeros_like(var64) if bias is None else np.asarray(bias, np.float64)
    s = g / np.sqrt(var64 + eps)
    # Channel o is the row-major index over the sizes of plan.axes (sorted).
    broadcast = [shape[a] if a in plan.axes else 1 for a in range(len(shape))]
    folded = (w.astype(np.float64).reshape(shape) * s.reshape(broadcast)).reshape(w.shape)
    return folded.astype(w.dtype), ((b - mean64) * s + be).astype(w.dtype)


def merge_moments(count: int, mean: A, m2: A, n: int, batch_mean: A, batch_m2: A) -> tuple[A, A]:
    """Chan's exact pairwise merge of ``(count, mean, m2)`` with a batch's
    ``(n, batch_mean, batch_m2)`` (``count + n > 0``): the merged mean and M2. Arithmetic
    operators only, so it works on NumPy arrays and on any framework's tensors alike.

    Example:
        >>> merge_moments(2, 1.5, 0.5, 1, 6.0, 0.0)
        (3.0, 14.0)
    """
    total = count + n
    delta = batch_mean - mean
    return mean + delta * (n / total), m2 + batch_m2 + delta * delta * (count * n / total)


class Moments:
    """Per-feature ``(count, mean, M2)`` of the batches added so far, in float64, merged
    exactly batch by batch (Chan's pairwise form of ``SPEC.md`` section 3's merge), for
    backends whose BatchNorm inputs reach NumPy.

    Example:
        >>> import numpy as np
        >>> m = Moments(axis=-1)
        >>> m.add(np.array([[1.0], [2.0]])); m.add(np.array([[6.0]]))
        True
        True
        >>> m.count, m.mean.tolist(), m.variance(unbiased=True).tolist()
        (3, [3.0], [7.0])
    """

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.count = 0
        self.batches = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, x: np.ndarray) -> bool:
        """Merge one batch; False (and nothing merged) when its statistics are not finite.
        A batch of no values merges nothing and is True."""
        import numpy as np

        data = np.asarray(x, np.float64)
        ax = self.axis % data.ndim
        n = data.size // data.shape[ax] if data.shape[ax] else 0
        if n == 0:
            return True
        dims = tuple(d for d in range(data.ndim) if d != ax)
        with np.errstate(invalid="ignore", over="ignore"):
            mean = data.mean(axis=dims)
            m2 = ((data - np.expand_dims(mean, dims)) ** 2).sum(axis=dims)
        if not (np.isfinite(mean).all() and np.isfinite(m2).all()):
            return False
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = mean, m2
        else:
            self.mean, self.m2 = merge_moments(self.count, self.mean, self.m2, n, mean, m2)
        self.count += n
        self.batches += 1
        return True

    def variance(self, unbiased: bool) -> np.ndarray:
        """``M2/(N-1)`` (``unbiased`` and ``N >= 2``) or ``M2/N``."""
        assert self.m2 is not None and self.count > 0
        return self.m2 / (self.count - 1 if unbiased and self.count > 1 else self.count)


def run_batches(
    batches: Iterable[Any],
    run_one: Callable[[Any], str | None],
    progress: bool | IO[str],
    allow_empty: bool = False,
) -> int:
    """Run ``run_one`` on each batch (``recalibrate``'s pass), drawing a progress bar on
    ``sys.stderr`` (``progress=True``) or the given stream; the number of batches.

    ``run_one`` returns the name of a BatchNorm whose statistics of that batch were not
    finite (None: all were), which is the error of ``SPEC.md`` section 8 with the batch's
    index; no batch at all is an error too, unless ``allow_empty`` (one replica of several,
    whose total the caller checks).
    """
    total = len(batches) if isinstance(batches, Sized) else 0
    bar = None
    if progress is not False:
        bar = ProgressBar(total, sys.stderr if progress is True else progress)
    seen = 0
    try:
        for index, batch in enumerate(batches):
            bad = run_one(batch)
            if bad is not None:
                raise ValueError(nonfinite_batch(index, bad))
            seen = index + 1
            if bar is not None:
                bar.update(seen, f"recalibrate: batch {seen}")
    finally:
        if bar is not None:
            bar.close()
    if seen == 0 and not allow_empty:
        raise ValueError(EMPTY_BATCHES)
    return seen


def check_counts(counts: Mapping[str, int]) -> None:
    """Refuse a BatchNorm (by name) whose input held no value over all batches."""
    for name, count in counts.items():
        if count == 0:
            raise ValueError(no_values(name))
