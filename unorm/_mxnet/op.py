"""The ``unorm_batchnorm`` CustomOp: unorm's BatchNorm as one MXNet operator.

Why a CustomOp: an operator with auxiliary states may write them in its forward pass, in
imperative mode, when hybridized, inside a hybridized parent and after
``export``/``SymbolBlock.imports``. So running statistics are updated in the training
forward pass, once per call, whether or not backward runs (MXNet's own CPU kernel updates
them in backward). Importing :mod:`unorm.mxnet` registers the operator; do that before
loading an exported model that contains it.

Inputs ``data, gamma, beta`` (and ``order``, a ``(1, C)`` array whose value is ignored,
when the setting ``ordered`` is on); auxiliary states ``running_mean, running_var,
num_batches_tracked`` (none with ``track_running_stats=False``); outputs ``output`` and
``saved``, a vector kept for the backward pass (:class:`_Saved`: the statistics used, the
mode (0 running statistics, 1 batch statistics, 2 batch statistics with a
running-statistics update) and the count per channel). One packed vector rather than
several outputs: MXNet 1.9 looks up the auxiliary states' storage types in the backward
pass at an offset counted in outputs instead of arguments, which runs past its buffer when
an operator has more outputs than arguments; and one vector is one host-to-device copy.

Work split: statistics from :mod:`.stats` (BLAS sums finished in float64 on the host,
guarded against cancellation); normalisation and backward pass in MXNet's own kernels
(:mod:`.native`) on ``(P, C, Q)`` views with ``axis=1``; the running-statistics update as a
few per-channel device operations, whose guard and weights are decided on the host. Per
call: one copy of the partial sums to the host and one copy of the packed statistics back.

MXNet 1.9 caveats this module works around or documents:

- arrays in an MKL-DNN blocked layout reach a CustomOp as garbage; the block converts them
  before and after the operator (:meth:`unorm.mxnet.BatchNorm.hybrid_forward`);
- a CustomOp's backward pass reads its auxiliary states but is not their writer (MXNet
  registers ``_backward_Custom`` without ``FMutateInputs``), so a write made there would not
  be ordered before later plain reads (``update_on="backward"``): the block feeds the
  operator's ``order`` argument from a native ``BatchNorm`` node on the running statistics,
  whose backward pass MXNet does register as their writer (apache/mxnet#18644), see
  :meth:`unorm.mxnet.BatchNorm._order`;
- a callback still queued at interpreter exit hangs MXNet's exit handler (:func:`_drain`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import mxnet as mx
import numpy as np

from .._core.renorm import clip_correction
from ..spec import BatchNormSpec
from .native import affine, affine_params, batchnorm_backward, constant, work_dtype
from .stats import Stats, batch_stats, channel_sums, layout
from .sync import exchange, merge

__all__ = ["OP_TYPE", "OpSettings", "count_error", "dtype_error"]

NDArray = Any  # mxnet.nd.NDArray

#: The name the operator is registered under (``op_type`` of ``mx.nd.Custom``).
OP_TYPE = "unorm_batchnorm"

RUNNING, BATCH, BATCH_AND_UPDATE = 0, 1, 2
#: Added to the saved mode of a training call that normalised ghost batches.
GHOST = 4


class Step:
    """The micro-batches of one accumulated step (``SPEC.md`` section 2, *Accumulated
    micro-batches*), per device: each call's statistics, merged exactly (float64, host)
    once ``steps`` calls are recorded."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.parts: dict[str, list[Stats]] = {}

    def record(self, device: str, stats: Stats) -> Stats | None:
        """Add one call on ``device``; its step's merge when the call completes it."""
        parts = self.parts.setdefault(device, [])
        parts.append(stats)
        return self.take(device) if len(parts) >= self.steps else None

    def take(self, device: str) -> Stats | None:
        """The merge of ``device``'s recorded calls (cleared), None where there are none."""
        parts = self.parts.pop(device, [])
        if not parts:
            return None
        total = sum(p.count for p in parts)
        channels = np.shape(parts[0].mean)
        if total == 0:
            return Stats(0, np.zeros(channels), np.zeros(channels))
        with np.errstate(invalid="ignore", over="ignore"):
            mean = sum((p.count * p.mean for p in parts if p.count), np.zeros(channels)) / total
            m2 = sum(
                (p.m2 + p.count * (p.mean - mean) ** 2 for p in parts if p.count),
                np.zeros(channels),
            )
        return Stats(total, mean, m2)


#: The active accumulated steps, by a layer's ``accumulate_key``
#: (:func:`unorm.mxnet.accumulate`).
ACCUMULATING: dict[str, Step] = {}


def apply_merged(aux: list[NDArray], merged: Stats, s: OpSettings) -> None:
    """One running-statistics update of ``s`` from a step's merged statistics."""
    var = merged.m2 / max(merged.count, 1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        update = _Update(aux, merged.mean, var, merged.count, s)
    ctx, dtype = aux[0].context, aux[0].dtype
    update.apply(
        aux,
        mx.nd.array(update.mean_term, ctx=ctx, dtype=dtype),
        mx.nd.array(update.var_term, ctx=ctx, dtype=dtype),
    )


#: The input dtypes the operator accepts.
_FLOAT_DTYPES = ("float16", "float32", "float64")


def _drain() -> None:
    # A CustomOp callback still queued when the interpreter shuts down waits for the GIL
    # while MXNet's own exit handler waits for the callback: the process hangs. This
    # handler, registered after MXNet's, runs before it and lets the queue finish.
    with contextlib.suppress(Exception):  # an op's failure was reported when it happened
        mx.nd.waitall()


atexit.register(_drain)


def count_error(count: int, allow_single_value: bool) -> ValueError | None:
    """The error for ``count`` values per channel in batch-statistics mode, or None.

    ``count`` is batch size times spatial size (over all devices for a synchronised
    layer). One value is an error with ``allow_single_value=False``; zero values are not
    (an empty batch, SPEC.md section 2, *Empty batch*). Returned, not raised, so that the
    caller raises it where it can: the block before any state changes, the operator when
    the cross-device count is known.

    Example:
        >>> count_error(1, allow_single_value=True) is None
        True
        >>> count_error(0, allow_single_value=False) is None
        True
        >>> raise count_error(1, allow_single_value=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: expected more than 1 value per channel to compute batch statistics ...
    """
    if count == 1 and not allow_single_value:
        return ValueError(
            f"expected more than 1 value per channel to compute batch statistics (training, "
            f"or track_running_stats=False), got {count} (batch size x spatial size); "
            "use a larger batch or inference mode with running statistics"
        )
    return None


def dtype_error(dtype: Any) -> ValueError | None:
    """The error for an input of ``dtype`` (SPEC.md section 2, *Errors*), or None.

    One message for every path: the block raises it for an NDArray, the operator's type
    inference for a graph (a hybridized parent, an imported model), both before any state
    changes.

    Example:
        >>> dtype_error("float16") is None
        True
        >>> raise dtype_error(np.int32)
        Traceback (most recent call last):
        ValueError: input must have a floating-point dtype, got int32
    """
    name = np.dtype(dtype).name
    if name in _FLOAT_DTYPES:
        return None
    return ValueError(f"input must have a floating-point dtype, got {name}")


def _flag(value: str) -> bool:
    return value in ("True", "true", "1")


def _bound(value: str) -> float | None:
    return None if value == "None" else float(value)


def _size(value: str) -> int | None:
    return None if value == "None" else int(value)


def ghost_error(
    shape: tuple[int, ...], axis: int, size: int, allow_single_value: bool
) -> ValueError | None:
    """The error for a training batch of ``shape`` split into ghost batches of ``size``
    samples (``SPEC.md`` section 2, *Ghost batches*), or None: the feature axis on the
    batch axis, more samples per group than the batch holds, or a group of one value per
    feature without ``allow_single_value``. Returned, as :func:`count_error`."""
    if axis % len(shape) == 0:
        return ValueError(
            "axis must not be 0 with virtual_batch_size (the groups split the batch axis 0), "
            f"got {axis}"
        )
    batch = shape[0]
    if 0 < batch < size:
        return ValueError(
            f"virtual_batch_size must be at most the batch size in training, got {size} for "
            f"a batch of {batch}"
        )
    spatial = int(np.prod(shape[1:], dtype=np.int64)) // max(shape[axis], 1)
    smallest = (batch % size or size) * spatial if batch else 2
    return count_error(smallest, allow_single_value)


@dataclasses.dataclass(frozen=True)
class OpSettings:
    """The operator's settings, carried as string attributes of the graph node.

    Built from a :class:`unorm.spec.BatchNormSpec` (:meth:`from_spec`), in unorm's
    convention (``momentum`` weighs the new batch, None for a cumulative average;
    ``unbiased`` feeds ``n/(n-1)`` times the batch variance to the running variance;
    ``track`` is ``track_running_stats``; ``empty_batch`` is what an empty training batch
    does to the state, default ``"skip"`` also for graphs exported before the setting
    existed). ``fully_masked`` is carried for the spec's sake (Gluon's layers take no mask;
    default ``"error"``, also for older graphs). ``ordered`` adds the ``order`` argument
    (default False, also for graphs exported before it existed). ``frozen`` is the frozen
    mode of ``SPEC.md`` section 8: running statistics in training too, never updated
    (default False, also for older graphs). ``renorm`` and the ``renorm_*`` settings are
    Batch Renormalization's (``SPEC.md`` section 2; default off, also for older graphs),
    with the auxiliary states ``renorm_mean``, ``renorm_std`` (and ``running_std`` under
    ``renorm_running="stddev"``) after the running statistics. ``accumulate_key`` names
    the layer in :data:`ACCUMULATING` (default ``""``: none, also for older graphs).
    ``sync_key`` and
    ``num_devices`` make it cross-device (``num_devices > 1``; default ``""`` and 1: one
    device), ``timeout`` (120.0) bounds the wait for the other devices, in seconds.
    :meth:`attrs` and :meth:`from_attrs` convert to and from the strings a graph node
    stores.

    Example:
        >>> settings = OpSettings.from_spec(BatchNormSpec())
        >>> settings.attrs()["momentum"], settings.attrs()["unbiased"]
        ('0.1', 'True')
        >>> OpSettings.from_attrs(settings.attrs()) == settings
        True
    """

    eps: float
    momentum: float | None
    unbiased: bool
    skip_nonfinite: bool
    allow_single_value: bool
    update_on: str
    track: bool
    center: bool
    scale: bool
    axis: int
    empty_batch: str = "skip"
    fully_masked: str = "error"
    renorm: bool = False
    renorm_rmax: float | None = None
    renorm_rmin: float | None = None
    renorm_dmax: float | None = None
    renorm_momentum: float = 0.01
    renorm_running: str = "variance"
    virtual_batch_size: int | None = None
    ghost_running: str = "batch"
    ordered: bool = False
    frozen: bool = False
    sync_key: str = ""
    accumulate_key: str = ""
    num_devices: int = 1
    timeout: float = 120.0

    @classmethod
    def from_spec(cls, spec: BatchNormSpec, **extra: Any) -> OpSettings:
        """The settings of ``spec`` (plus ``sync_key``/``num_devices``/``timeout``)."""
        return cls(
            eps=spec.eps,
            momentum=spec.momentum,
            unbiased=spec.unbiased,
            skip_nonfinite=spec.skip_nonfinite,
            allow_single_value=spec.allow_single_value,
            update_on=spec.update_on,
            track=spec.track_running_stats,
            center=spec.center,
            scale=spec.scale,
            axis=spec.axis,
            empty_batch=spec.empty_batch,
            fully_masked=spec.fully_masked,
            renorm=spec.renorm,
            renorm_rmax=spec.renorm_rmax,
            renorm_rmin=spec.renorm_rmin,
            renorm_dmax=spec.renorm_dmax,
            renorm_momentum=spec.renorm_momentum,
            renorm_running=spec.renorm_running,
            virtual_batch_size=spec.virtual_batch_size,
            ghost_running=spec.ghost_running,
            **extra,
        )

    def to_spec(self) -> BatchNormSpec:
        """The :class:`BatchNormSpec` these settings carry (the inverse of :meth:`from_spec`,
        which an exported graph's operator attributes are read back with)."""
        return BatchNormSpec(
            eps=self.eps,
            momentum=self.momentum,
            axis=self.axis,
            center=self.center,
            scale=self.scale,
            track_running_stats=self.track,
            running_var="unbiased" if self.unbiased else "biased",
            skip_nonfinite=self.skip_nonfinite,
            allow_single_value=self.allow_single_value,
            update_on=self.update_on,  # type: ignore[arg-type]
            empty_batch=self.empty_batch,  # type: ignore[arg-type]
            fully_masked=self.fully_masked,  # type: ignore[arg-type]
            renorm=self.renorm,
            renorm_rmax=self.renorm_rmax,
            renorm_rmin=self.renorm_rmin,
            renorm_dmax=self.renorm_dmax,
            renorm_momentum=self.renorm_momentum,
            renorm_running=self.renorm_running,  # type: ignore[arg-type]
            virtual_batch_size=self.virtual_batch_size,
            ghost_running=self.ghost_running,  # type: ignore[arg-type]
        )

    def aux_names(self) -> list[str]:
        """The operator's auxiliary states, in order (none without running statistics)."""
        if not self.track:
            return []
        names = ["running_mean", "running_var", "num_batches_tracked"]
        if self.renorm:
            names += ["renorm_mean", "renorm_std"]
            if self.renorm_running == "stddev":
                names.append("running_std")
        return names

    def attrs(self) -> dict[str, str]:
        """String attributes for ``mx.nd.Custom``/``mx.sym.Custom`` (floats round-trip)."""
        out: dict[str, str] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = repr(value) if isinstance(value, float) else str(value)
        return out

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, str]) -> OpSettings:
        """Parse the string attributes written by :meth:`attrs`."""
        momentum = attrs["momentum"]
        return cls(
            eps=float(attrs["eps"]),
            momentum=None if momentum == "None" else float(momentum),
            unbiased=_flag(attrs["unbiased"]),
            skip_nonfinite=_flag(attrs["skip_nonfinite"]),
            allow_single_value=_flag(attrs["allow_single_value"]),
            update_on=attrs["update_on"],
            track=_flag(attrs["track"]),
            center=_flag(attrs["center"]),
            scale=_flag(attrs["scale"]),
            axis=int(attrs["axis"]),
            empty_batch=attrs.get("empty_batch", "skip"),
            fully_masked=attrs.get("fully_masked", "error"),
            renorm=_flag(attrs.get("renorm", "False")),
            renorm_rmax=_bound(attrs.get("renorm_rmax", "None")),
            renorm_rmin=_bound(attrs.get("renorm_rmin", "None")),
            renorm_dmax=_bound(attrs.get("renorm_dmax", "None")),
            renorm_momentum=float(attrs.get("renorm_momentum", "0.01")),
            renorm_running=attrs.get("renorm_running", "variance"),
            virtual_batch_size=_size(attrs.get("virtual_batch_size", "None")),
            ghost_running=attrs.get("ghost_running", "batch"),
            ordered=_flag(attrs.get("ordered", "False")),
            frozen=_flag(attrs.get("frozen", "False")),
            sync_key=attrs.get("sync_key", ""),
            accumulate_key=attrs.get("accumulate_key", ""),
            num_devices=int(attrs.get("num_devices", "1")),
            timeout=float(attrs.get("timeout", "120.0")),
        )


#: The count per channel is saved as ``hi * _SPLIT + lo``, both exact in float32.
_SPLIT = 2**24


class _Saved:
    """Views into the saved vector (work dtype, so kernels read its slices as they are).

    Layout, ``C`` entries each: ``mean``, ``var`` (the statistics the call normalised with:
    batch mean, biased variance), ``offset`` (the mean of the array actually normalised,
    ``mean - centre`` when the input was shifted), ``invstd = 1/sqrt(var + eps)`` (for the
    backward kernel), ``mean_term``, ``var_term`` (the update's ``f * mean`` and
    ``f * fed_var``), ``r``, ``d`` (Batch Renormalization's correction; 1 and 0 without
    it); then ``mode``, ``count_hi``, ``count_lo``.
    """

    def __init__(self, array: NDArray, channels: int) -> None:
        c = channels
        self.array = array
        self.mean, self.var = array[0:c], array[c : 2 * c]
        self.offset, self.invstd = array[2 * c : 3 * c], array[3 * c : 4 * c]
        self.mean_term, self.var_term = array[4 * c : 5 * c], array[5 * c : 6 * c]
        self.r, self.d = array[6 * c : 7 * c], array[7 * c : 8 * c]
        self.tail = array[8 * c :]

    @staticmethod
    def size(channels: int) -> int:
        return 8 * channels + 3

    def mode_and_count(self) -> tuple[int, int]:
        """The mode (:data:`GHOST` added when the call normalised ghost batches) and the
        count per channel."""
        mode, high, low = (int(v) for v in self.tail.asnumpy())
        return mode, high * _SPLIT + low


class _Update:
    """A running-statistics update decided on the host: skip it, or its weight and terms.

    An empty batch (``count == 0``) follows ``empty_batch`` (SPEC.md section 2, *Empty
    batch*): ``"skip"`` changes nothing, ``"count"`` only counts the batch, ``"nan"`` feeds
    the statistics of no values (NaN), which the non-finite guard then skips.
    """

    def __init__(self, aux: list[NDArray], mean: Any, var: Any, count: int, s: OpSettings) -> None:
        empty = count == 0
        #: Count the batch without changing the running statistics (``"count"``).
        self.count_only = empty and s.empty_batch == "count"
        if empty:
            mean = var = np.full(np.shape(mean), np.nan)  # 0/0: the statistics of nothing
        fed = var * (count / (count - 1)) if s.unbiased and count > 1 else var
        with np.errstate(invalid="ignore", over="ignore"):
            finite = bool(np.isfinite(mean).all() and np.isfinite(fed).all())
        # The whole update is skipped on a non-finite batch, num_batches_tracked included.
        self.skip = (empty and s.empty_batch == "skip") or (
            not self.count_only and s.skip_nonfinite and not finite
        )
        if s.momentum is not None:
            self.weight = s.momentum
        elif self.skip or self.count_only:
            self.weight = 0.0
        else:  # cumulative average: weight 1/(k+1) after k updates
            self.weight = 1.0 / (int(aux[2].asnumpy()[0]) + 1)
        with np.errstate(invalid="ignore", over="ignore"):
            self.mean_term = self.weight * mean
            self.var_term = self.weight * fed
        self.mean, self.var, self.fed = mean, var, fed
        # Batch Renormalization's feed, sqrt(var + eps), is finite where var is.
        if s.renorm and not self.count_only and s.skip_nonfinite:
            with np.errstate(invalid="ignore"):
                self.skip = self.skip or not bool(np.isfinite(var).all())

    def apply(self, aux: list[NDArray], mean_term: NDArray, var_term: NDArray) -> None:
        """``running = (1 - f) * running + term`` on the device, then count the batch."""
        if self.skip:
            return
        if not self.count_only:
            keep = 1.0 - self.weight
            mx.nd.elemwise_add(aux[0] * keep, mean_term, out=aux[0])
            mx.nd.elemwise_add(aux[1] * keep, var_term, out=aux[1])
        counter = aux[2]
        counter += 1

    def apply_renorm(self, aux: list[NDArray], s: OpSettings) -> None:
        """Batch Renormalization's part of the update (``SPEC.md`` section 2), after
        :meth:`apply`: the renorm statistics at ``renorm_momentum`` and, under
        ``renorm_running="stddev"``, the running standard deviation with the running
        variance derived from it. Per-channel host arithmetic, written to the states."""
        if not s.renorm or self.skip or self.count_only:
            return
        g, f = s.renorm_momentum, self.weight
        dtype = aux[3].dtype
        with np.errstate(invalid="ignore", over="ignore"):
            sigma = np.sqrt(self.var + s.eps)
            renorm_mean = (1.0 - g) * aux[3].asnumpy().astype(np.float64) + g * self.mean
            renorm_std = (1.0 - g) * aux[4].asnumpy().astype(np.float64) + g * sigma
            aux[3][:] = renorm_mean.astype(dtype)
            aux[4][:] = renorm_std.astype(dtype)
            if s.renorm_running == "stddev":
                std = (1.0 - f) * aux[5].asnumpy().astype(np.float64) + f * np.sqrt(
                    self.fed + s.eps
                )
                aux[5][:] = std.astype(dtype)
                aux[1][:] = np.maximum(std * std - s.eps, 0.0).astype(dtype)


class _GhostParts:
    """The ghost batches of a ``(P, C, Q)`` input of ``batch`` samples as
    ``(groups, size, P/batch, C, Q)``, zero-padded to whole groups: the 0/1 ``weight`` of
    real samples, each group's ``counts``, ``mean``, biased ``var`` and ``invstd``, and
    ``xhat`` (0 on the padding)."""

    def __init__(self, xw: NDArray, batch: int, size: int, eps: float) -> None:
        rows, channels, after = xw.shape
        self.batch, self.rows, self.channels, self.after = batch, rows, channels, after
        self.groups = -(-batch // size)
        self.size = size
        ctx, dtype = xw.context, xw.dtype
        real = mx.nd.arange(self.groups * size, ctx=ctx) < batch
        self.weight = real.astype(dtype).reshape((self.groups, size, 1, 1, 1))
        x5 = self.pad(xw)
        per_sample = (rows // batch) * after
        self.counts = mx.nd.sum(self.weight, axis=1, keepdims=True) * per_sample
        axes = (1, 2, 4)
        self.mean = mx.nd.broadcast_div(mx.nd.sum(x5, axis=axes, keepdims=True), self.counts)
        centred = mx.nd.broadcast_mul(mx.nd.broadcast_sub(x5, self.mean), self.weight)
        self.var = mx.nd.broadcast_div(
            mx.nd.sum(mx.nd.square(centred), axis=axes, keepdims=True), self.counts
        )
        self.invstd = mx.nd.rsqrt(self.var + eps)
        self.xhat = mx.nd.broadcast_mul(centred, self.invstd)

    def pad(self, a: NDArray) -> NDArray:
        """``a`` (``(P, C, Q)``) as the zero-padded ``(groups, size, P/batch, C, Q)``."""
        per = self.rows // self.batch
        a4 = a.reshape((self.batch, per, self.channels, self.after))
        missing = self.groups * self.size - self.batch
        if missing:
            zeros = mx.nd.zeros((missing, per, self.channels, self.after), a.context, a.dtype)
            a4 = mx.nd.concat(a4, zeros, dim=0)
        return a4.reshape((self.groups, self.size, per, self.channels, self.after))

    def unpad(self, a5: NDArray) -> NDArray:
        """The inverse of :meth:`pad`: the real samples, as ``(P, C, Q)``."""
        per = self.rows // self.batch
        flat = a5.reshape((self.groups * self.size, per, self.channels, self.after))
        return flat[: self.batch].reshape((self.rows, self.channels, self.after))


def _ghost_moments(xw: NDArray, batch: int, size: int, eps: float) -> _GhostParts:
    return _GhostParts(xw, batch, size, eps)


def _renorm_correction(stats: Stats, aux: list[NDArray], s: OpSettings) -> tuple[Any, Any]:
    """Batch Renormalization's ``r`` and ``d`` (host, float64) from the renorm statistics
    before this call's update; 1 and 0 where there is no correction."""
    channels = len(stats.mean)
    if not s.renorm or stats.count == 0:
        return np.ones(channels), np.zeros(channels)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        floor = np.maximum(aux[4].asnumpy().astype(np.float64), np.sqrt(s.eps))
        r = np.sqrt(stats.var + s.eps) / floor
        d = (stats.mean - aux[3].asnumpy().astype(np.float64)) / floor
    return clip_correction(
        r, d, rmin=s.renorm_rmin, rmax=s.renorm_rmax, dmax=s.renorm_dmax,
        maximum=np.maximum, minimum=np.minimum,
    )  # fmt: skip


def _pack(
    stats: Stats,
    offset: Any,
    eps: float,
    mode: int,
    update: _Update | None,
    correction: tuple[Any, Any],
) -> Any:
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        var = stats.var
        invstd = 1.0 / np.sqrt(var + eps)
    zeros = np.zeros_like(var)
    terms = [zeros, zeros] if update is None else [update.mean_term, update.var_term]
    tail = np.array([mode, stats.count // _SPLIT, stats.count % _SPLIT], dtype=np.float64)
    return np.concatenate([stats.mean, var, offset, invstd, *terms, *correction, tail])


def _assign(op: Any, dst: NDArray, req: str, value: NDArray) -> None:
    if req == "null":
        return
    op.assign(dst, req, value if value.dtype == dst.dtype else value.astype(dst.dtype))


def _as_3d(a: NDArray, dtype: Any, before: int, channels: int, after: int) -> NDArray:
    """``a`` as a ``(P, C, Q)`` view in the work dtype (cast only for float16).

    The kernels then always see rank 3 and ``axis=1``: one code path for every rank and
    feature axis, and MXNet's plain CPU kernels rather than MKL-DNN's, which may leave their
    output in a blocked layout that the CustomOp's caller would misread.
    """
    a = a if a.dtype == dtype else a.astype(dtype)
    return a.reshape((before, channels, after))


def _shape_semantics(x: NDArray) -> contextlib.AbstractContextManager[Any]:
    """MXNet's NumPy shape semantics for an empty input, none needed otherwise.

    An empty array exists only under those semantics, and the setting is per thread: the
    thread that created ``x`` had it on, but a CustomOp runs on MXNet's worker threads,
    where every operator on ``x`` (a cast, a copy) would read its 0 as "unknown" and fail.
    """
    return contextlib.nullcontext() if x.size else mx.util.np_shape(True)


class BatchNormOp(mx.operator.CustomOp):  # type: ignore[misc]
    """Forward and backward of unorm's BatchNorm (see the module docstring)."""

    def __init__(self, settings: OpSettings, device: str) -> None:
        super().__init__()
        self.s = settings
        # The device the operator was created for names this member of a cross-device
        # exchange (an NDArray's own .context inside the callback can read cpu(0)).
        self.device = device

    def _accumulating(self) -> bool:
        return bool(self.s.accumulate_key) and self.s.accumulate_key in ACCUMULATING

    def _record(self, aux: list[NDArray], stats: Stats) -> None:
        """Record this call's statistics in the active step; apply the step when complete."""
        step = ACCUMULATING.get(self.s.accumulate_key)
        merged = None if step is None else step.record(self.device, stats)
        if merged is not None:
            apply_merged(aux, merged, self.s)

    def _params(self, in_data: list[NDArray], dtype: Any) -> tuple[Any, Any]:
        s, ctx = self.s, in_data[0].context
        return affine_params(
            in_data[1], in_data[2], scale=s.scale, center=s.center, dtype=dtype, ctx=ctx
        )

    def _stats(self, x: NDArray, axis: int) -> tuple[Stats, NDArray | None, Any]:
        local, centred, centre = batch_stats(x, axis)
        if self.s.num_devices <= 1:
            return local, centred, centre
        parts = exchange(
            self.s.sync_key, "forward", self.s.num_devices, self.device, local, self.s.timeout
        )
        return merge(parts), None, None

    def forward(
        self,
        is_train: bool,
        req: list[str],
        in_data: list[NDArray],
        out_data: list[NDArray],
        aux: list[NDArray],
    ) -> None:
        with _shape_semantics(in_data[0]):
            self._forward(is_train, req, in_data, out_data, aux)

    def _forward(
        self,
        is_train: bool,
        req: list[str],
        in_data: list[NDArray],
        out_data: list[NDArray],
        aux: list[NDArray],
    ) -> None:
        s = self.s
        # A frozen layer computes inference in training too (its backward then treats the
        # running statistics as constants: the saved mode says so).
        is_train = is_train and not s.frozen
        x = in_data[0]
        before, channels, after = layout(x.shape, s.axis % x.ndim)
        dtype = work_dtype(x.dtype)
        xw = _as_3d(x, dtype, before, channels, after)
        gamma, beta = self._params(in_data, dtype)
        target = out_data[1]
        if req[1] == "null":
            target = mx.nd.empty(target.shape, ctx=x.context, dtype=dtype)
        ghost = is_train and s.virtual_batch_size is not None and x.size > 0
        if ghost:
            assert s.virtual_batch_size is not None
            error = ghost_error(tuple(x.shape), s.axis, s.virtual_batch_size, s.allow_single_value)
            if error is not None:
                raise error
            self._ghost_forward(req, xw, x, gamma, beta, out_data, aux, target, channels)
            return
        if is_train or not s.track:
            stats, centred, centre = self._stats(xw, 1)
            error = count_error(stats.count, s.allow_single_value)
            if error is not None:
                raise error
            mode = BATCH_AND_UPDATE if is_train and s.track else BATCH
            update = None
            correction = _renorm_correction(stats, aux, s) if mode == BATCH_AND_UPDATE else None
            if mode == BATCH_AND_UPDATE:
                with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                    update = _Update(aux, stats.mean, stats.var, stats.count, s)
            offset = stats.mean if centre is None else stats.mean - centre
            ones = np.ones(channels), np.zeros(channels)
            # One host-to-device copy; every per-channel array below is a view of it.
            target[:] = _pack(stats, offset, s.eps, mode, update, correction or ones)
            saved = _Saved(target, channels)
            if s.renorm and correction is not None:
                # y = gamma * (xhat * r + d) + beta, r and d constants (SPEC.md section 2).
                gamma, beta = gamma * saved.r, gamma * saved.d + beta
            if update is not None and self._accumulating():
                if s.update_on == "forward":
                    self._record(aux, stats)
            elif update is not None and s.update_on == "forward":
                update.apply(aux, saved.mean_term, saved.var_term)
                update.apply_renorm(aux, s)
            # Normalising the exactly shifted input keeps digits a large mean would eat.
            source = xw if centred is None else centred
            mean_used, var_used = saved.offset, saved.var
        else:
            target[:] = 0  # mode 0: the backward pass reads the running statistics
            source, mean_used, var_used = xw, aux[0], aux[1]
        if x.size:
            direct = req[0] == "write" and x.dtype == dtype
            y = affine(
                source,
                mean_used,
                var_used,
                gamma,
                beta,
                eps=s.eps,
                axis=1,
                out=out_data[0].reshape(xw.shape) if direct else None,
            )
            if not direct:
                _assign(self, out_data[0], req[0], y.reshape(x.shape))

    def _ghost_forward(
        self,
        req: list[str],
        xw: NDArray,
        x: NDArray,
        gamma: NDArray,
        beta: NDArray,
        out_data: list[NDArray],
        aux: list[NDArray],
        target: NDArray,
        channels: int,
    ) -> None:
        """Ghost batches (``SPEC.md`` section 2): every group normalised with its own
        statistics (:func:`_ghost_moments`, vectorised), the running statistics fed once
        as ``ghost_running`` says; the backward pass recomputes the groups' statistics."""
        s = self.s
        parts = _ghost_moments(xw, x.shape[0], s.virtual_batch_size or 2, s.eps)
        shape5 = (1, 1, 1, channels, 1)
        y5 = mx.nd.broadcast_add(
            mx.nd.broadcast_mul(parts.xhat, gamma.reshape(shape5)), beta.reshape(shape5)
        )
        y = parts.unpad(y5)
        _assign(self, out_data[0], req[0], y.reshape(x.shape))
        stats, _, _ = batch_stats(xw, 1)  # the whole batch's: the "batch" feed, the count
        update = None
        if s.track:
            mean, var, count = stats.mean, stats.var, stats.count
            if s.ghost_running == "groups":  # saved as such for an update in backward
                n = parts.counts.asnumpy().reshape(-1, 1).astype(np.float64)
                means = parts.mean.asnumpy().reshape(-1, channels).astype(np.float64)
                variances = parts.var.asnumpy().reshape(-1, channels).astype(np.float64)
                if s.unbiased:
                    variances = variances * n / np.maximum(n - 1, 1)
                # Already the fed variance: a count of 1 makes _Update feed it as it is.
                mean, var, count = means.mean(0), variances.mean(0), 1
                stats = Stats(1, mean, var)
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                update = _Update(aux, mean, var, count, s)
        mode = (BATCH_AND_UPDATE if s.track else BATCH) + GHOST
        target[:] = _pack(stats, stats.mean, s.eps, mode, update,
                          (np.ones(channels), np.zeros(channels)))  # fmt: skip
        saved = _Saved(target, channels)
        if update is not None and s.update_on == "forward":
            update.apply(aux, saved.mean_term, saved.var_term)

    def _ghost_backward(
        self, req: list[str], dyw: NDArray, xw: NDArray, x: NDArray, gamma: NDArray,
        in_grad: list[NDArray],
    ) -> None:  # fmt: skip
        """Each group's training backward (section 2) with its own statistics, the
        ``gamma``/``beta`` gradients summed over the groups."""
        s = self.s
        parts = _ghost_moments(xw, x.shape[0], s.virtual_batch_size or 2, s.eps)
        dy5 = parts.pad(dyw)
        axes = (1, 2, 4)
        sum_dy = mx.nd.sum(dy5, axis=axes, keepdims=True)
        sum_dy_xhat = mx.nd.sum(dy5 * parts.xhat, axis=axes, keepdims=True)
        channels = gamma.shape[0]
        scale = mx.nd.broadcast_mul(parts.invstd, gamma.reshape((1, 1, 1, channels, 1)))
        inner = mx.nd.broadcast_sub(dy5, mx.nd.broadcast_div(sum_dy, parts.counts))
        inner = inner - mx.nd.broadcast_mul(
            parts.xhat, mx.nd.broadcast_div(sum_dy_xhat, parts.counts)
        )
        dx5 = mx.nd.broadcast_mul(mx.nd.broadcast_mul(inner, scale), parts.weight)
        _assign(self, in_grad[0], req[0], parts.unpad(dx5).reshape(x.shape))
        dgamma = sum_dy_xhat.sum(axis=(0, 1, 2, 4))
        dbeta = sum_dy.sum(axis=(0, 1, 2, 4))
        _assign(self, in_grad[1], req[1], dgamma if s.scale else dgamma.zeros_like())
        _assign(self, in_grad[2], req[2], dbeta if s.center else dbeta.zeros_like())

    def backward(
        self,
        req: list[str],
        out_grad: list[NDArray],
        in_data: list[NDArray],
        out_data: list[NDArray],
        in_grad: list[NDArray],
        aux: list[NDArray],
    ) -> None:
        with _shape_semantics(in_data[0]):
            self._backward(req, out_grad, in_data, out_data, in_grad, aux)

    def _backward(
        self,
        req: list[str],
        out_grad: list[NDArray],
        in_data: list[NDArray],
        out_data: list[NDArray],
        in_grad: list[NDArray],
        aux: list[NDArray],
    ) -> None:
        s = self.s
        x, dy = in_data[0], out_grad[0]
        before, channels, after = layout(x.shape, s.axis % x.ndim)
        ctx = x.context
        dtype = work_dtype(x.dtype)
        saved = _Saved(out_data[1], channels)
        mode, count = saved.mode_and_count()
        ghost = mode >= GHOST
        mode = mode % GHOST
        xw = _as_3d(x, dtype, before, channels, after)
        dyw = _as_3d(dy, dtype, before, channels, after)
        gamma, _ = self._params(in_data, dtype)
        renorm = s.renorm and mode == BATCH_AND_UPDATE
        if renorm:
            gamma = gamma * saved.r  # dx is the plain backward's with gamma * r
        if ghost:
            self._ghost_backward(req, dyw, xw, x, gamma, in_grad)
        elif mode != RUNNING and s.num_devices > 1:
            dx, dgamma, dbeta = self._sync_backward(dyw, xw, gamma, saved.mean, saved.var, count, 1)
            if renorm:
                dgamma = dgamma * saved.r + dbeta * saved.d
            _assign(self, in_grad[0], req[0], dx.reshape(x.shape))
            _assign(self, in_grad[1], req[1], dgamma if s.scale else dgamma.zeros_like())
            _assign(self, in_grad[2], req[2], dbeta if s.center else dbeta.zeros_like())
        else:
            self._native_backward(req, dyw, xw, gamma, saved, mode, in_grad, aux, renorm)
        if s.ordered and req[3] != "null":
            self.assign(in_grad[3], req[3], in_grad[3].zeros_like())  # its value is unused
        if mode == BATCH_AND_UPDATE and s.update_on == "backward" and self._accumulating():
            host = saved.array[: 2 * channels].asnumpy().astype(np.float64)
            self._record(aux, Stats(count, host[:channels], host[channels:] * count))
        elif mode == BATCH_AND_UPDATE and s.update_on == "backward":
            # The forward call's statistics, applied now (a cumulative average counts
            # the updates applied so far).
            host = saved.array[: 2 * channels].asnumpy().astype(np.float64)
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                update = _Update(aux, host[:channels], host[channels:], count, s)
            dtype_aux = aux[0].dtype
            update.apply(
                aux,
                mx.nd.array(update.mean_term, ctx=ctx, dtype=dtype_aux),
                mx.nd.array(update.var_term, ctx=ctx, dtype=dtype_aux),
            )
            update.apply_renorm(aux, s)

    def _native_backward(
        self,
        req: list[str],
        dy: NDArray,
        x: NDArray,
        gamma: NDArray,
        saved: _Saved,
        mode: int,
        in_grad: list[NDArray],
        aux: list[NDArray],
        renorm: bool = False,
    ) -> None:
        """MXNet's backward kernel on ``(P, C, Q)`` views, into the gradients where it can.

        ``renorm``: ``gamma`` is already ``gamma * r``; the kernel's ``sum(dy * xhat)``
        becomes Batch Renormalization's ``r * sum(dy * xhat) + d * sum(dy)``."""
        s = self.s
        channels = gamma.shape[0]
        ctx, dtype = x.context, np.dtype(gamma.dtype)
        wanted = (True, s.scale, s.center)
        direct = [
            req[i] == "write" and wanted[i] and np.dtype(in_grad[i].dtype) == dtype
            for i in range(3)
        ]
        direct[1] = direct[1] and not renorm
        targets = (in_grad[0].reshape(x.shape), in_grad[1], in_grad[2])
        shapes = (x.shape, (channels,), (channels,))
        outs = [
            targets[i] if direct[i] else mx.nd.empty(shapes[i], ctx=ctx, dtype=dtype)
            for i in range(3)
        ]
        if x.size:
            batchnorm_backward(
                dy,
                x,
                gamma,
                eps=s.eps,
                axis=1,
                out=outs,
                batch=(saved.mean, saved.invstd) if mode != RUNNING else None,
                running=(aux[0], aux[1]) if mode == RUNNING else None,
            )
        else:
            outs[1][:] = 0
            outs[2][:] = 0
        if renorm:
            outs[1] = outs[1] * saved.r + outs[2] * saved.d
        for i in range(3):
            if direct[i] or req[i] == "null":
                continue
            value = outs[i] if wanted[i] else outs[i].zeros_like()  # off: zero gradient
            _assign(self, in_grad[i], req[i], value.reshape(in_grad[i].shape))

    def _sync_backward(
        self,
        dy: NDArray,
        x: NDArray,
        gamma: NDArray,
        mean: NDArray,
        var: NDArray,
        count: int,
        axis: int,
    ) -> tuple[NDArray, NDArray, NDArray]:
        """SPEC.md section 3: local sums, all-reduced, then ``dx`` from the global sums."""
        s = self.s
        channels = mean.shape[0]
        ctx, dtype = x.context, mean.dtype
        one = constant(1.0, (channels,), dtype, ctx)
        zero = constant(0.0, (channels,), dtype, ctx)
        if x.size:
            xhat = affine(x, mean, var, one, zero, eps=s.eps, axis=axis)
            sum_dy, sum_dy_xhat = channel_sums(dy, xhat, axis)
        else:
            xhat = None
            sum_dy, sum_dy_xhat = np.zeros(channels), np.zeros(channels)
        parts = exchange(
            s.sync_key,
            "backward",
            s.num_devices,
            self.device,
            (sum_dy, sum_dy_xhat),
            s.timeout,
        )
        total_dy = np.sum([p[0] for p in parts], axis=0)
        total_dy_xhat = np.sum([p[1] for p in parts], axis=0)
        dgamma = mx.nd.array(sum_dy_xhat, ctx=ctx, dtype=dtype)
        dbeta = mx.nd.array(sum_dy, ctx=ctx, dtype=dtype)
        if xhat is None:
            return mx.nd.empty(x.shape, ctx=ctx, dtype=dtype), dgamma, dbeta
        scale = gamma.asnumpy().astype(np.float64) / np.sqrt(
            var.asnumpy().astype(np.float64) + s.eps
        )
        # dx = gamma*r*(dy - S1/N) - gamma*r*(S2/N)*xhat: two native affine passes and a sum.
        centred_dy = affine(
            dy,
            mx.nd.array(total_dy / count, ctx=ctx, dtype=dtype),
            one,
            mx.nd.array(scale, ctx=ctx, dtype=dtype),
            zero,
            eps=0.0,
            axis=axis,
        )
        correction = affine(
            xhat,
            zero,
            one,
            mx.nd.array(-scale * total_dy_xhat / count, ctx=ctx, dtype=dtype),
            zero,
            eps=0.0,
            axis=axis,
        )
        return centred_dy + correction, dgamma, dbeta


@mx.operator.register(OP_TYPE)
class BatchNormProp(mx.operator.CustomOpProp):  # type: ignore[misc]
    """Shapes, dtypes, states and backward dependencies of ``unorm_batchnorm``."""

    def __init__(self, **attrs: str) -> None:
        super().__init__(need_top_grad=True)
        self.settings = OpSettings.from_attrs(attrs)

    def list_arguments(self) -> list[str]:
        return ["data", "gamma", "beta"] + (["order"] if self.settings.ordered else [])

    def list_outputs(self) -> list[str]:
        return ["output", "saved"]

    def list_auxiliary_states(self) -> list[str]:
        return self.settings.aux_names()

    def infer_shape(self, in_shape: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
        data = tuple(in_shape[0])
        if len(data) < 2:
            raise ValueError(
                f"input must have rank >= 2 (a batch axis and a feature axis), got shape {data}"
            )
        axis = self.settings.axis
        if not -len(data) <= axis < len(data):
            raise ValueError(
                f"axis must be an integer in [{-len(data)}, {len(data)}) for an input of "
                f"rank {len(data)}, got {axis}"
            )
        channels = data[axis]
        for name, shape in zip(("gamma", "beta"), in_shape[1:3], strict=True):
            known = len(shape) == 1 and shape[0] > 0  # 0 or -1: not inferred yet
            if known and tuple(shape) != (channels,):
                raise ValueError(
                    f"input must have {shape[0]} features on axis {axis}, "
                    f"got shape {data} with {channels} ({name})"
                )
        per_channel = (channels,)
        aux = [
            (1,) if n == "num_batches_tracked" else per_channel for n in self.settings.aux_names()
        ]
        saved = (_Saved.size(channels),)
        args = [data, per_channel, per_channel] + ([(1, channels)] if self.settings.ordered else [])
        return args, [data, saved], aux

    def infer_type(self, in_type: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
        # MXNet's callback maps numpy scalar types (np.float32), not dtype objects; None
        # stands for "not known yet".
        if in_type[0] is None:
            unknown = [None] * len(self.list_auxiliary_states())
            return list(in_type), [None, None], unknown
        error = dtype_error(in_type[0])
        if error is not None:
            raise error  # inside a graph no block method sees the input first
        data = np.dtype(in_type[0]).type
        params = work_dtype(data).type
        aux = [
            np.int64 if n == "num_batches_tracked" else params for n in self.settings.aux_names()
        ]
        args = [data, params, params] + ([params] if self.settings.ordered else [])
        return args, [data, params], aux

    def declare_backward_dependency(
        self, out_grad: list[int], in_data: list[int], out_data: list[int]
    ) -> list[int]:
        return [out_grad[0], in_data[0], in_data[1], out_data[1]]

    def create_operator(self, ctx: Any, in_shapes: Any, in_dtypes: Any) -> BatchNormOp:
        return BatchNormOp(self.settings, str(ctx))
