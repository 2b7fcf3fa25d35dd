"""The reference column: unorm's NumPy reference driven as if it were a backend.

A sanity column. It runs every case through the same machinery as the frameworks (input
rounding, layers with state kept in the parameter dtype, outputs rounded to the input
dtype, the AGC layout transform, the per-replica cross-replica formulas of SPEC.md
section 3), so a failure here is a bug in the suite or in the reference, not in a backend.
bfloat16 values are rounded with NumPy (:func:`conformance.dtypes.round_bfloat16`).

Example:
    >>> adapter = create()
    >>> adapter.round_to(np.array([1.0 + 2.0**-12]), "float16").tolist()
    [1.0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from unorm import reference as ref
from unorm._core import after_training
from unorm.conformance import dtypes, layouts
from unorm.conformance.adapter import Adapter, AGCArrays, LayerConfig, SyncResult, WSConfig
from unorm.conformance.after import FoldConfig, FoldInputs, FoldValues, conv_transpose2d
from unorm.conformance.cases import SYNC_STRATEGIES
from unorm.conformance.expected import StepValues, WSValues, conv2d, conv2d_backward
from unorm.spec import BatchNormSpec, output_unit_axes

__all__ = ["ReferenceAdapter", "create"]


@dataclasses.dataclass
class _Layer:
    spec: BatchNormSpec
    config: LayerConfig
    gamma: np.ndarray | None
    beta: np.ndarray | None
    running: ref.RunningStats | None
    renorm: ref.RenormStats | None = None
    #: Frozen (SPEC.md section 8): None, else whether gamma and beta stay trainable.
    frozen: bool | None = None


def _store_renorm(renorm: ref.RenormStats, dtype: str) -> ref.RenormStats:
    std = renorm.running_std
    return ref.RenormStats(
        renorm.mean.astype(dtype),
        renorm.std.astype(dtype),
        None if std is None else std.astype(dtype),
    )


def _store(running: ref.RunningStats | None, dtype: str) -> ref.RunningStats | None:
    # A real layer keeps its buffers in the parameter dtype; so does this one.
    if running is None:
        return None
    return ref.RunningStats(
        running.mean.astype(dtype), running.var.astype(dtype), running.num_batches_tracked
    )


def _state(layer: _Layer) -> StepValues:
    r = layer.running
    if r is None:
        return StepValues()
    n = layer.renorm
    return StepValues(
        running_mean=np.asarray(r.mean),
        running_var=np.asarray(r.var),
        num_batches_tracked=r.num_batches_tracked,
        renorm_mean=None if n is None else np.asarray(n.mean),
        renorm_std=None if n is None else np.asarray(n.std),
    )


class ReferenceAdapter(Adapter):
    """Every case on :mod:`unorm.reference`, with a layer's state and dtype rules."""

    name = "reference"
    framework = "numpy"
    dtypes = ("float64", "float32", "float16", "bfloat16")
    layout = layouts.of("torch")
    masks = True
    # The merge of SPEC.md section 3 is the same whoever runs the replicas.
    sync_strategies = SYNC_STRATEGIES

    def bn_build(self, config: LayerConfig, gamma: np.ndarray, beta: np.ndarray) -> _Layer:
        spec = config.spec()
        pdt = config.param_dtype
        running = ref.init_running_stats(config.num_features) if spec.track_running_stats else None
        renorm = ref.RenormStats.initial(config.num_features, spec) if spec.renorm else None
        return _Layer(
            spec,
            config,
            np.asarray(gamma, pdt) if spec.scale else None,
            np.asarray(beta, pdt) if spec.center else None,
            _store(running, pdt),
            None if renorm is None else _store_renorm(renorm, pdt),
        )

    def bn_state(self, layer: _Layer) -> StepValues:
        return _state(layer)

    def bn_step(
        self,
        layer: _Layer,
        x: np.ndarray,
        dy: np.ndarray | None,
        mode: str,
        mask: np.ndarray | None = None,
    ) -> StepValues:
        if layer.frozen is not None:
            # The inference forward and backward whatever the mode; fixed: no gradient.
            out = self.bn_step(dataclasses.replace(layer, frozen=None), x, dy, "eval", mask)
            if not layer.frozen:
                out.dgamma = out.dbeta = None
            return out
        spec, cfg = layer.spec, layer.config
        arr, _ = ref.check_input(x, spec.axis, cfg.num_features)
        x64 = arr.astype(np.float64)
        if layer.renorm is not None:
            return self._renorm_step(layer, x64, dy, mode)
        training = mode != "eval"
        before = layer.running
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            y, after = ref.batch_norm_step(
                x64,
                before,
                spec,
                layer.gamma,
                layer.beta,
                training=training,
                backward_ran=mode == "train",
                mask=mask,
            )
            out = StepValues(y=dtypes.cast(y, cfg.dtype))
            if dy is not None:
                eps, axis, center = spec.eps, spec.axis, spec.center
                dy64 = np.asarray(dy, np.float64)
                if mask is not None and (training or before is None):
                    g = ref.masked_batch_norm_backward(dy64, x64, mask, layer.gamma, spec=spec)
                elif training and spec.virtual_batch_size is not None and x64.size:
                    g = ref.ghost_batch_norm_backward(dy64, x64, layer.gamma, spec=spec)
                elif training or before is None:
                    g = ref.batch_norm_backward(
                        dy64, x64, layer.gamma, eps=eps, axis=axis, center=center
                    )
                else:
                    g = ref.batch_norm_inference_backward(
                        dy64, x64, before.mean, before.var, layer.gamma,
                        eps=eps, axis=axis, center=center,
                    )  # fmt: skip
                out.dx = dtypes.cast(g.dx, cfg.dtype)
                pdt = cfg.param_dtype
                out.dgamma = None if g.dgamma is None else g.dgamma.astype(pdt)
                out.dbeta = None if g.dbeta is None else g.dbeta.astype(pdt)
        layer.running = _store(after, cfg.param_dtype)
        out.take_state(_state(layer))
        return out

    def _renorm_step(
        self, layer: _Layer, x64: np.ndarray, dy: np.ndarray | None, mode: str
    ) -> StepValues:
        """A step of a layer with ``renorm=True`` (SPEC.md section 2, *Batch
        Renormalization*): the state kept in the parameter dtype, as a layer keeps it."""
        spec, cfg = layer.spec, layer.config
        running, renorm = layer.running, layer.renorm
        assert running is not None and renorm is not None
        pdt = cfg.param_dtype
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            y, after, renorm_after = ref.batch_renorm_step(
                x64, running, renorm, spec, layer.gamma, layer.beta,
                training=mode != "eval", backward_ran=mode == "train",
            )  # fmt: skip
            out = StepValues(y=dtypes.cast(y, cfg.dtype))
            if dy is not None:
                dy64 = np.asarray(dy, np.float64)
                if mode == "eval":
                    g = ref.batch_norm_inference_backward(
                        dy64, x64, running.mean, running.var, layer.gamma,
                        eps=spec.eps, axis=spec.axis, center=spec.center,
                    )  # fmt: skip
                else:
                    r, d = ref.renorm_correction(ref.batch_stats(x64, spec.axis), renorm, spec)
                    g = ref.batch_renorm_backward(
                        dy64, x64, r, d, layer.gamma, eps=spec.eps, axis=spec.axis,
                        center=spec.center,
                    )  # fmt: skip
                out.dx = dtypes.cast(g.dx, cfg.dtype)
                out.dgamma = None if g.dgamma is None else g.dgamma.astype(pdt)
                out.dbeta = None if g.dbeta is None else g.dbeta.astype(pdt)
        layer.running = _store(after, pdt)
        layer.renorm = _store_renorm(renorm_after, pdt)
        out.take_state(_state(layer))
        return out

    def agc(
        self,
        params: Sequence[AGCArrays],
        *,
        clipping: float,
        eps: float,
        exclude: Sequence[str],
        unit_axes: Any = None,
    ) -> dict[str, np.ndarray]:
        layer_axes = {p.name: output_unit_axes("torch", p.kind, p.weight.ndim) for p in params}
        # The exclusion is checked first, as every backend checks it (SPEC.md section 5).
        missing = [name for name in exclude if name not in layer_axes]
        if missing:
            raise ValueError(f"exclude names no parameter or layer of the model: {missing}")
        shapes = {p.name: p.weight.shape for p in params if p.name not in exclude}
        axes = ref.agc_unit_axes(shapes, layer_axes, unit_axes)
        with np.errstate(invalid="ignore", over="ignore"):
            return ref.agc_clip_all(
                {p.name: p.grad for p in params},
                {p.name: p.weight for p in params},
                axes,
                clipping=clipping,
                eps=eps,
                exclude=tuple(exclude),
            )

    def sync_bn_step(
        self,
        config: LayerConfig,
        gamma: np.ndarray,
        beta: np.ndarray,
        xs: Sequence[np.ndarray],
        dys: Sequence[np.ndarray],
        strategy: str = "replicas",
    ) -> SyncResult:
        """SPEC.md section 3 replica by replica, whatever the ``strategy``: local (n, mean,
        M2), Chan's merge, local normalisation, all-reduced backward sums."""
        spec = config.spec()
        ax = spec.axis % config.ndim
        axes = tuple(i for i in range(config.ndim) if i != ax)
        shape = [1] * config.ndim
        shape[ax] = config.num_features
        merged = ref.merge_stats([ref.batch_stats(np.asarray(x, np.float64), ax) for x in xs])
        g64 = np.asarray(gamma, np.float64) if spec.scale else np.ones(config.num_features)
        b64 = np.asarray(beta, np.float64) if spec.center else np.zeros(config.num_features)
        r = 1.0 / np.sqrt(merged.var() + spec.eps)
        xhats = [
            (np.asarray(x, np.float64) - merged.mean.reshape(shape)) * r.reshape(shape) for x in xs
        ]
        s1 = sum((np.asarray(d, np.float64).sum(axis=axes) for d in dys), np.zeros(len(r)))
        s2 = sum(
            (
                (np.asarray(d, np.float64) * xh).sum(axis=axes)
                for d, xh in zip(dys, xhats, strict=True)
            ),
            np.zeros(len(r)),
        )
        n = merged.count
        ys, dxs = [], []
        for xh, d in zip(xhats, dys, strict=True):
            ys.append(dtypes.cast(xh * g64.reshape(shape) + b64.reshape(shape), config.dtype))
            dx = (g64 * r).reshape(shape) * (
                np.asarray(d, np.float64) - (s1 / n).reshape(shape) - xh * (s2 / n).reshape(shape)
            )
            dxs.append(dtypes.cast(dx, config.dtype))
        state = StepValues(dgamma=s2 if spec.scale else None, dbeta=s1 if spec.center else None)
        if spec.track_running_stats:
            new = ref.update_running_stats(
                ref.init_running_stats(config.num_features),
                merged,
                momentum=spec.momentum,
                unbiased=spec.unbiased,
                skip_nonfinite=spec.skip_nonfinite,
            )
            state.running_mean, state.running_var = new.mean, new.var
            state.num_batches_tracked = new.num_batches_tracked
        return SyncResult(ys, dxs, state)

    def ws_conv(
        self,
        config: WSConfig,
        x: np.ndarray,
        weight: np.ndarray,
        gain: np.ndarray,
        bias: np.ndarray,
        dy: np.ndarray,
    ) -> WSValues:
        """SPEC.md section 6 on the weight, the suite's NumPy convolution around it; the
        weight is in PyTorch's layout, its output unit axis 0 (``output_unit_axes``)."""
        unit = output_unit_axes("torch", "conv", weight.ndim)
        kw = config.ws_kwargs()
        w_hat = ref.scaled_weight_standardize(weight, gain, unit, **kw)  # fan_in 0: ValueError
        y = conv2d(x, w_hat, config.groups, config.pads) + np.reshape(bias, (1, -1, 1, 1))
        dx, dw_hat = conv2d_backward(dy, x, w_hat, config.groups, config.pads)
        with np.errstate(over="ignore"):  # a constant unit's unused branch of np.where
            dw, dgain = ref.scaled_weight_standardize_backward(dw_hat, weight, gain, unit, **kw)
        cast = [dtypes.cast(a, config.dtype) for a in (y, dx, dw, dgain, np.sum(dy, (0, 2, 3)))]
        return WSValues(*cast)

    def bn_freeze(self, layer: _Layer, trainable: bool) -> _Layer:
        if layer.running is None:
            raise ValueError(after_training.freeze_needs_running_stats("bn"))
        layer.frozen = trainable
        return layer

    def bn_recalibrate(self, layer: _Layer, batches: Sequence[np.ndarray]) -> StepValues:
        stats = ref.recalibrated_stats(
            [np.asarray(b, np.float64) for b in batches], layer.spec.axis,
            unbiased=layer.spec.unbiased,
        )  # fmt: skip
        layer.running = _store(stats, layer.config.param_dtype)
        return _state(layer)

    def bn_accumulate(
        self,
        layer: _Layer,
        xs: Sequence[np.ndarray],
        dys: Sequence[np.ndarray],
        steps: int,
    ) -> list[StepValues]:
        """Each micro-batch normalised with its own statistics (a layer without running
        statistics for the call), the recorded ones merged by ``accumulated_stats`` after
        every ``steps`` calls and at the end."""
        out, recorded = [], []
        for x, dy in zip(xs, dys, strict=True):
            out.append(self.bn_step(dataclasses.replace(layer, running=None), x, dy, "train"))
            with np.errstate(invalid="ignore", over="ignore"):
                recorded.append(ref.batch_stats(np.asarray(x, np.float64), layer.spec.axis))
            if len(recorded) == steps:
                self._accumulated(layer, recorded)
                recorded = []
        if recorded:
            self._accumulated(layer, recorded)
        return out

    def _accumulated(self, layer: _Layer, recorded: list[ref.BatchStats]) -> None:
        assert layer.running is not None
        new = ref.accumulated_stats(layer.running, recorded, layer.spec)
        layer.running = _store(new, layer.config.param_dtype)

    def fold_eval(self, config: FoldConfig, inputs: FoldInputs) -> FoldValues:
        """``fold_batch_norm`` on the weight (PyTorch's layout, its output-channel axes
        from the layer-kind table), then the producer with the folded weight and bias."""
        spec = config.spec()
        w = np.asarray(inputs.weight)
        plan = after_training.fold_plan(
            config.kind, self.layout.kernels[config.kind], w.shape, config.groups
        )
        folded, bias = ref.fold_batch_norm(
            w, inputs.bias, inputs.mean, inputs.var,
            inputs.gamma if spec.scale else None, inputs.beta if spec.center else None,
            eps=spec.eps, out_axes=plan.axes, view=plan.view,
        )  # fmt: skip
        x = np.asarray(inputs.x, np.float64)
        if config.kind == "dense":
            y = x @ folded.astype(np.float64).T
        elif config.kind == "conv_transpose":
            y = conv_transpose2d(x, folded, config.groups)
        else:
            groups = config.in_channels if config.kind == "depthwise_conv" else config.groups
            y = conv2d(x, folded, groups)
        y = y + bias.astype(np.float64).reshape(1, -1, *([1] * (y.ndim - 2)))
        return FoldValues(dtypes.cast(y, config.dtype), 0, "reference.fold_batch_norm")


def create() -> ReferenceAdapter:
    """The adapter the suite loads."""
    return ReferenceAdapter()
