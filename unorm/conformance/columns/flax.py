"""The Flax NNX column: ``unorm.flax`` driven by the conformance suite.

Also home of the helpers the native column (``flax_native``) shares: array conversion,
the functional training/inference step (``jax.vjp`` of the layer's call, so gradients are
JAX's own) and the cross-replica step (``jax.vmap`` with an axis name: the collectives
``shard_map`` and ``pmap`` run, in one process; uneven replicas padded with samples a
mask leaves out). ``jax``, ``flax`` and ``unorm.flax`` are imported only when a case runs.
Float64 cases run under ``jax.enable_x64``.

Example:
    >>> adapter = create()
    >>> adapter.name, adapter.layout.framework
    ('flax', 'flax')
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from unorm.conformance import dtypes, layouts
from unorm.conformance.adapter import (
    Adapter,
    AGCArrays,
    LayerConfig,
    SyncResult,
    UnormModule,
    Unsupported,
    WSConfig,
    present,
)
from unorm.conformance.expected import StepValues, WSValues

__all__ = ["Built", "FlaxAdapter", "FlaxBase", "create"]


def jax() -> Any:
    """The ``jax`` module (imported on first use)."""
    return importlib.import_module("jax")


def jnp() -> Any:
    """``jax.numpy``."""
    return importlib.import_module("jax.numpy")


def nnx() -> Any:
    """``flax.nnx``."""
    return importlib.import_module("flax.nnx")


@contextlib.contextmanager
def precision(dtype: str) -> Iterator[None]:
    """Float64 arrays need JAX's x64 mode; every other dtype runs as JAX defaults."""
    if dtype == "float64":
        with jax().enable_x64(True):
            yield
    else:
        yield


def to_array(a: np.ndarray, dtype: str | None = None) -> Any:
    """A JAX array of ``a`` in ``dtype`` (default ``a``'s own)."""
    arr = jnp().asarray(np.asarray(a))
    return arr if dtype is None else arr.astype(getattr(jnp(), dtype))


def to_numpy(a: Any) -> np.ndarray | None:
    """An array's values as NumPy (16-bit floats as float32 carriers)."""
    if a is None:
        return None
    a = jnp().asarray(a)
    if a.dtype == jnp().bfloat16:
        a = a.astype(jnp().float32)
    return np.array(a)


@dataclasses.dataclass
class Built:
    """A layer under test and the case's settings."""

    layer: Any
    config: LayerConfig


class FlaxBase(Adapter):
    """What both Flax columns share: conversion, loading parameters and one step of a
    layer with ``scale``/``bias`` and ``mean``/``var`` (``num_batches_tracked`` where kept)."""

    framework = "flax"
    dtypes = ("float64", "float32", "float16", "bfloat16")
    layout = layouts.of("flax")

    def availability(self) -> str | None:
        try:
            nnx()
        except ImportError as exc:
            return f"flax is not importable: {exc}"
        return None

    def versions(self) -> dict[str, str]:
        flax = importlib.import_module("flax")
        return {"jax": jax().__version__, "flax": flax.__version__, "numpy": np.__version__}

    def round_to(self, a: np.ndarray, dtype: str) -> np.ndarray:
        with precision(dtype):
            out = to_numpy(to_array(np.asarray(a, np.float64), dtype))
        assert out is not None
        return out

    def make(self, config: LayerConfig) -> Any:
        """The layer itself (a subclass's)."""
        raise NotImplementedError

    def bn_build(self, config: LayerConfig, gamma: np.ndarray, beta: np.ndarray) -> Built:
        with precision(config.dtype):
            layer = self.make(config)
            dtype = getattr(jnp(), config.param_dtype)
            if layer.scale is not None:
                layer.scale[...] = jnp().asarray(gamma, dtype)
            if layer.bias is not None:
                layer.bias[...] = jnp().asarray(beta, dtype)
        return Built(layer, config)

    def bn_state(self, layer: Built) -> StepValues:
        norm = layer.layer
        mean, var = getattr(norm, "mean", None), getattr(norm, "var", None)
        tracked = getattr(norm, "num_batches_tracked", None)
        with precision(layer.config.dtype):
            return StepValues(
                running_mean=None if mean is None else to_numpy(mean[...]),
                running_var=None if var is None else to_numpy(var[...]),
                num_batches_tracked=None if tracked is None else int(tracked[...]),
            )

    def bn_step(
        self,
        layer: Built,
        x: np.ndarray,
        dy: np.ndarray | None,
        mode: str,
        mask: np.ndarray | None = None,
    ) -> StepValues:
        if mask is not None:  # masks = False: the runner hands this column none
            raise Unsupported(f"{self.name} runs no masked cases")
        config = layer.config
        with precision(config.dtype):
            dtype = config.dtype if config.dtype in dtypes.DTYPES else None
            xt = to_array(x, dtype)
            norm = layer.layer
            inference = mode == "eval"
            graphdef, params, rest = nnx().split(norm, nnx().Param, ...)

            def call(p: Any, inp: Any) -> Any:
                module = nnx().merge(graphdef, p, rest, copy=True)
                y = module(inp, use_running_average=inference)
                return y, nnx().state(module, nnx().BatchStat)

            out = StepValues()
            if dy is None:
                y, stats = call(params, xt)
            else:
                y, pullback, stats = jax().vjp(call, params, xt, has_aux=True)
                dparams, dx = pullback(to_array(dy, str(y.dtype)))
                out.dx = to_numpy(dx)
                out.dgamma = to_numpy(_leaf(dparams, "scale"))
                out.dbeta = to_numpy(_leaf(dparams, "bias"))
            out.y = to_numpy(y)
            nnx().update(norm, stats)
        state = self.bn_state(layer)
        out.running_mean, out.running_var = state.running_mean, state.running_var
        out.num_batches_tracked = state.num_batches_tracked
        return out

    def sync_bn_step(
        self,
        config: LayerConfig,
        gamma: np.ndarray,
        beta: np.ndarray,
        xs: Sequence[np.ndarray],
        dys: Sequence[np.ndarray],
    ) -> SyncResult:
        """Replicas as a ``jax.vmap`` axis named ``replicas``: every replica's batch padded
        to the largest with samples its mask leaves out, the layer's ``axis_name`` merging
        their statistics; gradients of ``scale``/``bias`` summed over the replicas by the
        pullback of the unbatched parameters."""
        with precision(config.dtype):
            built = self.bn_build(config, gamma, beta)
            norm = built.layer
            norm.axis_name = "replicas"
            dtype = config.dtype if config.dtype in dtypes.DTYPES else None
            biggest = max(int(x.shape[0]) for x in xs)
            feature = config.axis % config.ndim
            if feature == 0:
                raise Unsupported("the replicas are split on axis 0, the feature axis here")

            def pad(a: np.ndarray) -> np.ndarray:
                widths = [(0, biggest - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
                return np.pad(np.asarray(a, np.float64), widths)

            xb = to_array(np.stack([pad(x) for x in xs]), dtype)
            dyb = to_array(np.stack([pad(d) for d in dys]), dtype)
            keep = np.zeros((len(xs), biggest) + (1,) * (config.ndim - 1), bool)
            for i, x in enumerate(xs):
                keep[i, : x.shape[0]] = True
            graphdef, params, rest = nnx().split(norm, nnx().Param, ...)

            def replica(p: Any, inp: Any, m: Any) -> Any:
                module = nnx().merge(graphdef, p, rest, copy=True)
                y = module(inp, mask=jnp().asarray(m))
                return y, nnx().state(module, nnx().BatchStat)

            both = jax().vmap(replica, in_axes=(None, 0, 0), axis_name="replicas")
            y, pullback, stats = jax().vjp(
                lambda p, inp: both(p, inp, keep), params, xb, has_aux=True
            )
            dparams, dx = pullback(dyb)
            nnx().update(norm, jax().tree.map(lambda a: a[0], stats))
            ys = [np.asarray(to_numpy(y))[i, : x.shape[0]] for i, x in enumerate(xs)]
            dxs = [np.asarray(to_numpy(dx))[i, : x.shape[0]] for i, x in enumerate(xs)]
            state = self.bn_state(built)
            state.dgamma = to_numpy(_leaf(dparams, "scale"))
            state.dbeta = to_numpy(_leaf(dparams, "bias"))
        return SyncResult(ys, dxs, state)


def _leaf(state: Any, name: str) -> Any:
    """A parameter's array in an ``nnx.State`` (None where the layer has none)."""
    try:
        value = state[name]
    except (KeyError, AttributeError):
        return None
    return getattr(value, "value", value)


class FlaxAdapter(UnormModule, FlaxBase):
    """``unorm.flax.BatchNorm`` and ``unorm.flax.agc``."""

    name = "flax"
    module_name = "unorm.flax"

    def make(self, config: LayerConfig) -> Any:
        settings = dict(config.settings)
        unknown = sorted(
            set(settings) - {"eps", "momentum", "track_running_stats", "center", "scale"}
        )
        if unknown:
            raise Unsupported(f"unorm.flax.BatchNorm takes no {', '.join(unknown)}")
        if config.spec().update_on == "backward":
            raise Unsupported("JAX has no backward pass of a layer's own: no update_on='backward'")
        kwargs: dict[str, Any] = {"axis": config.axis, "preset": config.preset}
        for key in ("eps", "momentum", "track_running_stats"):
            if key in settings:
                kwargs[key] = settings[key]
        if "center" in settings:
            kwargs["use_bias"] = settings["center"]
        if "scale" in settings:
            kwargs["use_scale"] = settings["scale"]
        return self.module().BatchNorm(
            config.num_features, param_dtype=getattr(jnp(), config.param_dtype), **kwargs
        )

    def bn_freeze(self, layer: Built, trainable: bool) -> Built:
        """``unorm.flax.freeze`` on the layer (fixed scale and bias become FrozenParam)."""
        with precision(layer.config.dtype):
            frozen = self.module().freeze(layer.layer, trainable=trainable)
        return Built(frozen, layer.config)

    def agc(
        self,
        params: Sequence[AGCArrays],
        *,
        clipping: float,
        eps: float,
        exclude: Sequence[str],
        unit_axes: Any = None,
    ) -> dict[str, np.ndarray]:
        dtype = params[0].dtype if params else "float32"
        with precision(dtype):
            model, paths = build_agc_model(params)
            # A name the model lacks goes through as a name, which the API must refuse.
            skip = [paths.get(name, name) for name in exclude]
            if isinstance(unit_axes, dict):
                unit_axes = {paths.get(n, n): axes for n, axes in unit_axes.items()}
            tx = self.module().agc(
                model, clipping=clipping, eps=eps, exclude=skip, unit_axes=unit_axes
            )
            weights = nnx().state(model, nnx().Param)
            # New variables (a tree map rebuilds them), so the weights stay as they are.
            grads = jax().tree.map(jnp().copy, weights)
            for p in params:
                layer, attribute = paths[p.name].split(".")
                grads[layer][attribute][...] = to_array(p.grad, p.dtype)
            clipped, _ = tx.update(grads, tx.init(weights), weights)
            out: dict[str, np.ndarray] = {}
            for p in params:
                layer, attribute = paths[p.name].split(".")
                value = to_numpy(_leaf(clipped[layer], attribute))
                assert value is not None
                out[p.name] = value
        return out

    def ws_conv(
        self,
        config: WSConfig,
        x: np.ndarray,
        weight: np.ndarray,
        gain: np.ndarray,
        bias: np.ndarray,
        dy: np.ndarray,
    ) -> WSValues:
        """``unorm.flax.ScaledStdConv`` (kernel ``(kh, kw, C/groups, O)``) on channels-last
        inputs: the case's ``(N, C, H, W)`` arrays are transposed in and out."""
        with precision(config.dtype):
            dtype = getattr(jnp(), config.dtype)
            conv = self.module().ScaledStdConv(
                config.in_channels,
                config.out_channels,
                config.kernel,
                feature_group_count=config.groups,
                padding=config.padding.upper(),
                param_dtype=dtype,
                dtype=dtype,
                rngs=nnx().Rngs(0),
                **config.ws_kwargs(),
            )
            for variable, value in ((conv.kernel, weight), (conv.gain, gain), (conv.bias, bias)):
                variable[...] = to_array(value, config.dtype)
            graphdef, params, rest = nnx().split(conv, nnx().Param, ...)

            def call(p: Any, inp: Any) -> Any:
                return nnx().merge(graphdef, p, rest, copy=True)(inp)

            nhwc = to_array(np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1))), config.dtype)
            y, pullback = jax().vjp(call, params, nhwc)
            upstream = to_array(np.ascontiguousarray(np.transpose(dy, (0, 2, 3, 1))), config.dtype)
            dparams, dx = pullback(upstream)
            nchw = (0, 3, 1, 2)
            return WSValues(
                y=np.transpose(present(to_numpy(y)), nchw),
                dx=np.transpose(present(to_numpy(dx)), nchw),
                dweight=to_numpy(_leaf(dparams, "kernel")),
                dgain=to_numpy(_leaf(dparams, "gain")),
                dbias=to_numpy(_leaf(dparams, "bias")),
            )


def build_agc_model(params: Sequence[AGCArrays]) -> tuple[Any, dict[str, str]]:
    """An ``nnx.Module`` whose attributes are real NNX layers of each parameter's kind,
    weights loaded, and each case name's dotted path in it."""
    by_layer: dict[str, dict[str, AGCArrays]] = {}
    for p in params:
        by_layer.setdefault(p.layer, {})[p.role] = p
    model = nnx().Module()
    paths: dict[str, str] = {}
    for layer_name, roles in by_layer.items():
        layer, names = _layer(roles)
        setattr(model, layer_name, layer)
        for role, p in roles.items():
            attribute = names[role]
            getattr(layer, attribute)[...] = to_array(p.weight, p.dtype)
            paths[p.name] = f"{layer_name}.{attribute}"
    return model, paths


def _layer(roles: dict[str, AGCArrays]) -> tuple[Any, dict[str, str]]:
    nn = nnx()
    rngs = nn.Rngs(0)
    first = next(iter(roles.values()))
    dtype = getattr(jnp(), first.dtype)
    if "gain" in roles:
        holder = nn.Module()
        holder.gain = nn.Param(jnp().zeros(roles["gain"].weight.shape, dtype))
        return holder, {"gain": "gain"}
    weight, bias = roles.get("weight"), roles.get("bias")
    if weight is None:  # a bias alone: its layer's weight is a stand-in
        assert bias is not None
        return nn.Linear(1, bias.weight.shape[0], rngs=rngs, param_dtype=dtype), {"bias": "bias"}
    shape = weight.weight.shape
    has_bias = bias is not None
    common = {"use_bias": has_bias, "rngs": rngs, "param_dtype": dtype}
    if first.kind == "dense":
        layer = nn.Linear(shape[0], shape[1], **common)
    elif first.kind == "embedding":
        layer = nn.Embed(shape[0], shape[1], rngs=rngs, param_dtype=dtype)
        return layer, {"weight": "embedding", "bias": "bias"}
    elif first.kind == "conv":
        layer = nn.Conv(shape[-2], shape[-1], tuple(shape[:-2]), **common)
    elif first.kind == "conv_transpose":
        layer = nn.ConvTranspose(shape[-2], shape[-1], tuple(shape[:-2]), **common)
    elif first.kind == "depthwise_conv":
        # (*k, 1, I*M): one group per output channel has exactly this layout.
        channels = shape[-1]
        layer = nn.Conv(
            channels, channels, tuple(shape[:-2]), feature_group_count=channels, **common
        )
    else:
        raise Unsupported(f"no Flax layer for kind {first.kind!r}")
    return layer, {"weight": "kernel", "bias": "bias"}


def create() -> FlaxAdapter:
    """The adapter the suite loads."""
    return FlaxAdapter()
