"""The MXNet Gluon 1.9 column: ``unorm.mxnet`` driven by the conformance suite.

Runs in the legacy environment (numpy 1.23). Also home of the MXNet helpers the native
column (``mxnet_native``) shares: NDArray conversion and the step under
``autograd.record``: ``train`` records in training mode and runs backward, ``forward``
records in training mode without backward (where MXNet's CPU kernel never updates its
statistics), ``eval`` records in inference mode and runs backward. MXNet has no
bfloat16 on CPU. MXNet is imported only when a case runs.

Example:
    >>> create().layout.framework
    'mxnet'
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from unorm.conformance import layouts
from unorm.conformance.adapter import (
    Adapter,
    AGCArrays,
    LayerConfig,
    SyncResult,
    UnormModule,
    Unsupported,
    WSConfig,
    constructor_settings,
    present,
)
from unorm.conformance.after import FoldConfig, FoldInputs, FoldValues
from unorm.conformance.expected import StepValues, WSValues

__all__ = ["Built", "MXNetAdapter", "MXNetBase", "create"]


def mx() -> Any:
    """The ``mxnet`` module (imported on first use)."""
    return importlib.import_module("mxnet")


def to_nd(a: np.ndarray, dtype: str | None = None) -> Any:
    """An NDArray of ``a`` in ``dtype`` (default: ``a``'s own)."""
    arr = np.asarray(a)
    return mx().nd.array(arr, dtype=dtype or arr.dtype)


def to_numpy(a: Any) -> np.ndarray | None:
    """An NDArray's values (None stays None)."""
    return None if a is None else np.array(a.asnumpy())


@dataclasses.dataclass
class Built:
    """A block under test, its parameters by short name, and the case's input dtype."""

    block: Any
    params: dict[str, Any]
    dtype: str


def _short(name: str) -> str:
    # Gluon prefixes parameter names with the block's ("batchnorm0_gamma").
    return (
        name.rsplit("_", 1)[-1]
        if not name.endswith(("_mean", "_var", "_std", "_tracked"))
        else (
            "_".join(name.split("_")[-2:])
            if not name.endswith("_tracked")
            else "num_batches_tracked"
        )
    )


def _param_data(built: Built, name: str) -> np.ndarray | None:
    param = built.params.get(name)
    return None if param is None else to_numpy(param.data())


def _param_grad(built: Built, name: str) -> np.ndarray | None:
    param = built.params.get(name)
    if param is None or param.grad_req == "null":
        return None
    return to_numpy(param.grad())


class MXNetBase(Adapter):
    """What both MXNet columns share; blocks hold parameters named ``gamma``, ``beta``,
    ``running_mean``, ``running_var`` (and, where kept, ``num_batches_tracked``)."""

    framework = "mxnet"
    dtypes = ("float64", "float32", "float16")
    layout = layouts.of("mxnet")
    absent = frozenset({"num_batches_tracked"})

    def availability(self) -> str | None:
        try:
            mx()
        except (ImportError, AttributeError) as exc:  # numpy 2 breaks mxnet's import
            return f"mxnet is not importable: {exc}"
        return None

    def versions(self) -> dict[str, str]:
        return {"mxnet": mx().__version__, "numpy": np.__version__}

    def round_to(self, a: np.ndarray, dtype: str) -> np.ndarray:
        if dtype == "bfloat16":
            raise Unsupported("MXNet has no bfloat16 on CPU")
        out = to_numpy(to_nd(np.asarray(a, np.float64), dtype))
        assert out is not None
        return out

    def built(self, block: Any, config: LayerConfig, gamma: np.ndarray, beta: np.ndarray) -> Built:
        """Initialise ``block``, cast it to the input dtype and load ``gamma`` / ``beta``."""
        block.initialize()
        if config.dtype in ("float16", "float64"):
            block.cast(config.dtype)  # Gluon keeps BatchNorm parameters float32 under float16
        params = {_short(k): v for k, v in block.collect_params().items()}
        for name, value in (("gamma", gamma), ("beta", beta)):
            if name in params:
                param = params[name]
                param.set_data(to_nd(value, param.dtype))
        return Built(block, params, config.dtype)

    def bn_state(self, layer: Built) -> StepValues:
        tracked = _param_data(layer, "num_batches_tracked")
        return StepValues(
            running_mean=_param_data(layer, "running_mean"),
            running_var=_param_data(layer, "running_var"),
            num_batches_tracked=None if tracked is None else int(tracked.reshape(-1)[0]),
            renorm_mean=_param_data(layer, "renorm_mean"),
            renorm_std=_param_data(layer, "renorm_std"),
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
            raise Unsupported(f"{self.name}'s BatchNorm layers take no mask")
        if 0 in x.shape:
            # MXNet 1.x holds an empty array only under its NumPy shape semantics.
            with mx().util.np_shape(True):
                return self._bn_step(layer, x, dy, mode)
        return self._bn_step(layer, x, dy, mode)

    def _bn_step(self, layer: Built, x: np.ndarray, dy: np.ndarray | None, mode: str) -> StepValues:
        autograd = mx().autograd
        xt = to_nd(x)
        if dy is not None:
            xt.attach_grad()
        with autograd.record(train_mode=mode != "eval"):
            y = layer.block(xt)
        if dy is not None:
            y.backward(to_nd(dy, str(y.dtype.__name__) if hasattr(y.dtype, "__name__") else None))
        out = StepValues(y=to_numpy(y))
        if dy is not None:
            out.dx = to_numpy(xt.grad)
            out.dgamma = _param_grad(layer, "gamma")
            out.dbeta = _param_grad(layer, "beta")
        out.take_state(self.bn_state(layer))
        return out

    def sync_block(self, config: LayerConfig, devices: int) -> Any:
        """The cross-device block for ``devices`` replicas (each column's own)."""
        raise Unsupported(f"{self.name} has no cross-device BatchNorm")

    def sync_bn_step(
        self,
        config: LayerConfig,
        gamma: np.ndarray,
        beta: np.ndarray,
        xs: Sequence[np.ndarray],
        dys: Sequence[np.ndarray],
    ) -> SyncResult:
        """Gluon data parallelism: one call per ``mx.cpu(k)`` context, every call issued
        before any result is read, then backward on all of them."""
        if any(x.shape[0] == 0 for x in xs):
            # Legacy NDArrays read a 0 dimension as "unknown": no operator, not even
            # attach_grad's zeros_like, runs on an empty array, and split_and_load refuses
            # more devices than rows. An empty device shard cannot occur in MXNet 1.x.
            raise Unsupported(
                "MXNet 1.x has no empty arrays (a 0 dimension means unknown shape), so "
                "no device shard can be empty"
            )
        autograd = mx().autograd
        contexts = [mx().cpu(k) for k in range(len(xs))]
        block = self.sync_block(config, len(xs))
        block.initialize(ctx=contexts)
        if config.dtype == "float64":
            block.cast("float64")
        params = {_short(k): v for k, v in block.collect_params().items()}
        for name, value in (("gamma", gamma), ("beta", beta)):
            if name in params:
                params[name].set_data(to_nd(value, params[name].dtype))
        inputs = [mx().nd.array(x, ctx=c, dtype=x.dtype) for x, c in zip(xs, contexts, strict=True)]
        for x in inputs:
            x.attach_grad()
        with autograd.record(train_mode=True):
            ys = [block(x) for x in inputs]
        heads = [mx().nd.array(d, ctx=c, dtype=d.dtype) for d, c in zip(dys, contexts, strict=True)]
        autograd.backward(ys, head_grads=heads)
        state = StepValues()
        for name, key in (("gamma", "dgamma"), ("beta", "dbeta")):
            param = params.get(name)
            if param is not None and param.grad_req != "null":
                # The Trainer's all-reduce sums parameter gradients over devices.
                setattr(state, key, sum(g.asnumpy() for g in param.list_grad()))
        for name in ("running_mean", "running_var"):
            if name in params:
                setattr(state, name, params[name].data(contexts[0]).asnumpy())
        if "num_batches_tracked" in params:
            tracked = params["num_batches_tracked"].data(contexts[0]).asnumpy()
            state.num_batches_tracked = int(tracked.reshape(-1)[0])
        return SyncResult([y.asnumpy() for y in ys], [x.grad.asnumpy() for x in inputs], state)


class MXNetAdapter(UnormModule, MXNetBase):
    """``unorm.mxnet.BatchNorm`` and unorm's AGC for Gluon."""

    name = "mxnet"

    module_name = "unorm.mxnet"

    def bn_build(self, config: LayerConfig, gamma: np.ndarray, beta: np.ndarray) -> Built:
        block = self.module().BatchNorm(
            in_channels=config.num_features,
            axis=config.axis,
            preset=config.preset,
            **constructor_settings(config.settings),
        )
        return self.built(block, config, gamma, beta)

    def bn_freeze(self, layer: Built, trainable: bool) -> Built:
        """``unorm.mxnet.freeze`` on the block."""
        frozen = self.module().freeze(layer.block, trainable=trainable)
        return Built(frozen, params_of(frozen), layer.dtype)

    def bn_recalibrate(self, layer: Built, batches: Sequence[np.ndarray]) -> StepValues:
        """``unorm.mxnet.recalibrate`` over the batches as NDArrays (the block in a
        ``HybridSequential``: recalibrate looks for BatchNorm layers inside a model)."""
        if any(0 in np.shape(b) for b in batches):
            raise Unsupported("MXNet 1.x has no empty arrays (a 0 dimension means unknown shape)")
        model = mx().gluon.nn.HybridSequential()
        model.add(layer.block)
        self.module().recalibrate(model, [to_nd(b) for b in batches])
        return self.bn_state(layer)

    def bn_accumulate(
        self, layer: Built, xs: Sequence[np.ndarray], dys: Sequence[np.ndarray], steps: int
    ) -> list[StepValues]:
        """The training steps inside ``with unorm.mxnet.accumulate(block, steps)``."""
        with self.module().accumulate(layer.block, steps=steps):
            return [self.bn_step(layer, x, dy, "train") for x, dy in zip(xs, dys, strict=True)]

    def fold_eval(self, config: FoldConfig, inputs: FoldInputs) -> FoldValues:
        """``unorm.mxnet.fold`` of ``HybridSequential(producer, BatchNorm)`` (unorm's or
        ``gluon.nn.BatchNorm``), the folded block called outside ``autograd.record``."""
        if config.dtype == "float16":
            raise Unsupported("MXNet has no float16 convolution or dense layer on CPU (FP16 gemm)")
        nn = mx().gluon.nn
        spec = config.spec()
        o = config.out_channels
        if config.native_bn:
            norm = nn.BatchNorm(
                axis=1, epsilon=spec.eps, center=spec.center, scale=spec.scale, in_channels=o
            )
        else:
            norm = self.module().BatchNorm(
                in_channels=o, axis=1, preset=config.preset,
                **constructor_settings(config.settings),
            )  # fmt: skip
        model = nn.HybridSequential()
        model.add(mxnet_producer(config), norm)
        model.initialize()
        if config.dtype in ("float16", "float64"):
            model.cast(config.dtype)
        producer = params_of(model[0])
        producer["weight"].set_data(to_nd(inputs.weight, config.dtype))
        if inputs.bias is not None:
            producer["bias"].set_data(to_nd(inputs.bias, config.dtype))
        bn = params_of(norm)
        values = {"gamma": inputs.gamma, "beta": inputs.beta}
        values.update(running_mean=inputs.mean, running_var=inputs.var)
        for name, value in values.items():
            if name in bn:
                bn[name].set_data(to_nd(value, config.dtype))
        x = to_nd(inputs.x, config.dtype)
        folded = self.module().fold(model, strict=True, example=x)
        left = _count_batchnorms(folded, (type(norm), nn.BatchNorm))
        return FoldValues(to_numpy(folded(x)), left, "unorm.mxnet.fold")

    def sync_block(self, config: LayerConfig, devices: int) -> Any:
        return self.module().SyncBatchNorm(
            in_channels=config.num_features,
            num_devices=devices,
            timeout=10.0,  # a device that never arrives fails the case, not the run
            axis=config.axis,
            preset=config.preset,
            **dict(config.settings),
        )

    def agc(
        self,
        params: Sequence[AGCArrays],
        *,
        clipping: float,
        eps: float,
        exclude: Sequence[str],
        unit_axes: Any = None,
    ) -> dict[str, np.ndarray]:
        block, by_name = build_agc_block(params)
        # A name the block lacks goes through as a name, which the API must refuse.
        skip = [by_name.get(name, name) for name in exclude]
        if isinstance(unit_axes, dict):
            unit_axes = {by_name.get(n, n): axes for n, axes in unit_axes.items()}
        self.module().adaptive_clip_grad(
            block, clipping=clipping, eps=eps, exclude=skip, unit_axes=unit_axes
        )
        return {p.name: present(to_numpy(by_name[p.name].grad())) for p in params}

    def ws_conv(
        self,
        config: WSConfig,
        x: np.ndarray,
        weight: np.ndarray,
        gain: np.ndarray,
        bias: np.ndarray,
        dy: np.ndarray,
    ) -> WSValues:
        """``unorm.mxnet.ScaledStdConv2D`` (weight ``(O, C/groups, kh, kw)``), hybridized,
        one call under ``autograd.record`` and its backward. ``in_channels=0`` is Gluon's
        "infer it from the input": the zero-channel input is then the error under test."""
        conv = self.module().ScaledStdConv2D(
            config.out_channels,
            config.kernel,
            padding=config.pads,
            groups=config.groups,
            in_channels=config.in_channels,
            **config.ws_kwargs(),
        )
        conv.initialize()
        if config.dtype != "float32":
            conv.cast(config.dtype)
        conv.hybridize()
        xt = to_nd(x)
        if config.in_channels:  # else the weight's shape is inferred by the first call
            for param, value in ((conv.weight, weight), (conv.gain, gain), (conv.bias, bias)):
                param.set_data(to_nd(value, config.dtype))
        if xt.size:  # MXNet 1.x cannot allocate a gradient for a zero-size array
            xt.attach_grad()
        with mx().autograd.record():
            y = conv(xt)
        y.backward(to_nd(dy, config.dtype))
        return WSValues(
            y=to_numpy(y),
            dx=to_numpy(xt.grad),
            dweight=to_numpy(conv.weight.grad()),
            dgain=to_numpy(conv.gain.grad()),
            dbias=to_numpy(conv.bias.grad()),
        )


def build_agc_block(params: Sequence[AGCArrays]) -> tuple[Any, dict[str, Any]]:
    """A Gluon block of real layers of each parameter's kind, weights and gradients
    loaded; and the Gluon parameter of each of the suite's parameter names."""
    nn = mx().gluon.nn
    by_layer: dict[str, dict[str, AGCArrays]] = {}
    for p in params:
        by_layer.setdefault(p.layer, {})[p.role] = p
    holder = nn.Block()
    found: dict[str, Any] = {}
    for layer_name, roles in by_layer.items():
        layer, mapping = _layer(nn, layer_name, roles)
        holder.register_child(layer, layer_name)
        found.update(mapping)
    holder.initialize()
    for p in params:
        param = found[p.name]
        param.set_data(to_nd(p.weight, p.dtype))
        param.grad()[:] = to_nd(p.grad, p.dtype)
    return holder, found


def _layer(nn: Any, name: str, roles: dict[str, AGCArrays]) -> tuple[Any, dict[str, Any]]:
    first = next(iter(roles.values()))
    dtype = first.dtype
    weight, bias = roles.get("weight"), roles.get("bias")
    if "gain" in roles:
        shape = roles["gain"].weight.shape
        if not shape:  # MXNet 1.x reads shape () as "unknown" and refuses to initialise it
            raise Unsupported("Gluon parameters cannot have shape () (a scalar)")
        block = nn.Block(prefix=f"{name}_")
        with block.name_scope():
            gain = block.params.get("gain", shape=shape, dtype=dtype)
        return block, {roles["gain"].name: gain}
    if weight is None:
        assert bias is not None
        block = nn.Dense(bias.weight.shape[0], in_units=1, dtype=dtype, prefix=f"{name}_")
        return block, {bias.name: block.bias}
    shape = weight.weight.shape
    dims, has_bias, kernel = len(shape) - 2, bias is not None, tuple(shape[2:])
    if first.kind == "dense":
        block = nn.Dense(
            shape[0], in_units=shape[1], use_bias=has_bias, dtype=dtype, prefix=f"{name}_"
        )
    elif first.kind == "embedding":
        block = nn.Embedding(shape[0], shape[1], dtype=dtype, prefix=f"{name}_")
    elif first.kind == "conv":
        block = getattr(nn, f"Conv{dims}D")(
            shape[0], kernel, in_channels=shape[1], use_bias=has_bias, prefix=f"{name}_"
        )
    elif first.kind == "conv_transpose":
        block = getattr(nn, f"Conv{dims}DTranspose")(
            shape[1], kernel, in_channels=shape[0], use_bias=has_bias, prefix=f"{name}_"
        )
    elif first.kind == "depthwise_conv":
        block = getattr(nn, f"Conv{dims}D")(
            shape[0],
            kernel,
            in_channels=shape[0],
            groups=shape[0],
            use_bias=has_bias,
            prefix=f"{name}_",
        )
    else:
        raise Unsupported(f"no Gluon layer for kind {first.kind!r}")
    if dtype != "float32":
        block.cast(dtype)
    mapping = {weight.name: block.weight}
    if bias is not None:
        mapping[bias.name] = block.bias
    return block, mapping


def params_of(block: Any) -> dict[str, Any]:
    """A block's parameters by short name (``gamma``, ``running_mean``, ``weight``)."""
    return {_short(k): v for k, v in block.collect_params().items()}


def _count_batchnorms(block: Any, kinds: tuple[type, ...]) -> int:
    found = int(isinstance(block, kinds))
    return found + sum(_count_batchnorms(child, kinds) for child in block._children.values())


def mxnet_producer(config: FoldConfig) -> Any:
    """The producer block of a fold case (channels-first; weights loaded by the caller)."""
    nn = mx().gluon.nn
    i, o, k, bias = config.in_channels, config.out_channels, config.kernel, config.bias
    if config.kind == "dense":
        return nn.Dense(o, in_units=i, use_bias=bias)
    if config.kind == "conv_transpose":
        return nn.Conv2DTranspose(o, k, groups=config.groups, in_channels=i, use_bias=bias)
    groups = i if config.kind == "depthwise_conv" else config.groups
    return nn.Conv2D(o, k, groups=groups, in_channels=i, use_bias=bias)


def create() -> MXNetAdapter:
    """The adapter the suite loads."""
    return MXNetAdapter()
