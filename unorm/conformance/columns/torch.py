"""The PyTorch column: ``unorm.torch`` driven by the conformance suite.

Also home of the PyTorch helpers the native column (``torch_native``) shares:
array conversion, bfloat16 rounding and the training/inference step. ``torch`` and
``unorm.torch`` are imported only when a case runs, so this file loads anywhere.

Example:
    >>> adapter = create()
    >>> adapter.name, adapter.layout.framework
    ('torch', 'torch')
"""

from __future__ import annotations

import dataclasses
import importlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unorm.conformance import dtypes, exchange, layouts
from unorm.conformance.adapter import (
    Adapter,
    AGCArrays,
    LayerConfig,
    SyncResult,
    UnormModule,
    Unsupported,
    WSConfig,
    constructor_settings,
)
from unorm.conformance.after import FoldConfig, FoldInputs, FoldValues
from unorm.conformance.expected import StepValues, WSValues

#: The training modes' constructor arguments (SPEC.md section 2: Batch Renormalization,
#: ghost batches).
MODE_ARGUMENTS = (
    "renorm",
    "renorm_clipping",
    "renorm_momentum",
    "renorm_running",
    "virtual_batch_size",
    "ghost_running",
)

__all__ = [
    "SYNC_WORKER",
    "Built",
    "TorchAdapter",
    "TorchBase",
    "build_agc_model",
    "build_producer",
    "create",
    "load_bn",
    "native_norm",
]

#: The helper that runs a cross-replica case on one gloo process per replica.
#: The module run, one fresh interpreter per request, for the cross-replica cases.
SYNC_WORKER = f"{__package__}.torch_sync_worker"


def torch() -> Any:
    """The ``torch`` module (imported on first use)."""
    return importlib.import_module("torch")


def to_tensor(a: np.ndarray, dtype: str | None = None) -> Any:
    """A CPU tensor of ``a`` in ``dtype`` (default: ``a``'s own; bfloat16 from float32)."""
    t = torch().from_numpy(np.asarray(a, order="C"))
    return t if dtype is None else t.to(getattr(torch(), dtype))


def to_numpy(t: Any) -> np.ndarray:
    """A tensor's values as NumPy (bfloat16 as float32 carriers)."""
    t = t.detach().cpu()
    if t.dtype == torch().bfloat16:
        t = t.float()
    return t.numpy().copy()


def _grad(param: Any) -> np.ndarray | None:
    return None if param is None or param.grad is None else to_numpy(param.grad)


def _buffer(module: Any, name: str) -> np.ndarray | None:
    value = getattr(module, name, None)
    return None if value is None else to_numpy(value)


@dataclasses.dataclass
class Built:
    """A layer under test: the module called, the module holding parameters and buffers
    (the same one unless the call is wrapped), and the case's input dtype."""

    module: Any
    norm: Any
    dtype: str


class TorchBase(Adapter):
    """What both PyTorch columns share: conversion, rounding, loading parameters and one
    step of a module with ``weight``/``bias`` and ``running_mean``/``running_var``/
    ``num_batches_tracked``."""

    framework = "torch"
    dtypes = ("float64", "float32", "float16", "bfloat16")
    layout = layouts.of("torch")
    sync_strategies = ("replicas", "ddp")

    def availability(self) -> str | None:
        try:
            torch()
        except ImportError as exc:
            return f"torch is not importable: {exc}"
        return None

    def versions(self) -> dict[str, str]:
        return {"torch": torch().__version__, "numpy": np.__version__}

    def round_to(self, a: np.ndarray, dtype: str) -> np.ndarray:
        return to_numpy(to_tensor(np.asarray(a, np.float64), dtype))

    def built(self, module: Any, norm: Any, config: LayerConfig, gamma, beta) -> Built:
        """Cast to the parameter dtype, load ``gamma`` / ``beta``, wrap."""
        if config.param_dtype == "float64":
            module.double()
        with torch().no_grad():
            if getattr(norm, "weight", None) is not None:
                norm.weight.copy_(to_tensor(gamma))
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(to_tensor(beta))
        return Built(module, norm, config.dtype)

    def bn_state(self, layer: Built) -> StepValues:
        tracked = getattr(layer.norm, "num_batches_tracked", None)
        return StepValues(
            running_mean=_buffer(layer.norm, "running_mean"),
            running_var=_buffer(layer.norm, "running_var"),
            num_batches_tracked=None if tracked is None else int(tracked.item()),
            renorm_mean=_buffer(layer.norm, "renorm_mean"),
            renorm_std=_buffer(layer.norm, "renorm_std"),
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
        # Integer inputs (an error case) go in as they are; floats in the case's dtype.
        dtype = layer.dtype if layer.dtype in dtypes.DTYPES else None
        xt = to_tensor(x, dtype)
        if dy is not None:
            xt.requires_grad_(True)
        layer.module.train(mode != "eval")
        for p in layer.module.parameters():
            p.grad = None
        y = layer.module(xt)
        out = StepValues(y=to_numpy(y))
        if dy is not None:
            y.backward(to_tensor(dy, dtype))
            out.dx = _grad(xt)
            out.dgamma = _grad(getattr(layer.norm, "weight", None))
            out.dbeta = _grad(getattr(layer.norm, "bias", None))
        out.take_state(self.bn_state(layer))
        return out

    def sync_bn_step(
        self,
        config: LayerConfig,
        gamma: np.ndarray,
        beta: np.ndarray,
        xs: Sequence[np.ndarray],
        dys: Sequence[np.ndarray],
        strategy: str = "replicas",
    ) -> SyncResult:
        """One process per replica over gloo (``torch_sync_worker.py``); parameter
        gradients are summed over the replicas, by an all-reduce (``replicas``) or by
        ``DistributedDataParallel`` (``ddp``: its average times the world size)."""
        if self.native:
            self.native_spec(config)  # what native PyTorch cannot express is unsupported
        else:
            _affine(dict(config.settings))
        with tempfile.TemporaryDirectory() as folder:
            request = exchange.write_request(
                Path(folder), config, gamma, beta, xs, dys, self.native, strategy
            )
            return exchange.run_helper(SYNC_WORKER, request)


def build_producer(config: FoldConfig, inputs: FoldInputs) -> Any:
    """The producer layer of a fold case (PyTorch's layout: the weight as handed), its
    weight and bias loaded, in the case's dtype."""
    nn = torch().nn
    i, o, k, has_bias = config.in_channels, config.out_channels, config.kernel, config.bias
    if config.kind == "dense":
        layer = nn.Linear(i, o, bias=has_bias)
    elif config.kind == "conv_transpose":
        layer = nn.ConvTranspose2d(i, o, k, groups=config.groups, bias=has_bias)
    else:
        groups = i if config.kind == "depthwise_conv" else config.groups
        layer = nn.Conv2d(i, o, k, groups=groups, bias=has_bias)
    layer.to(getattr(torch(), config.dtype))
    with torch().no_grad():
        layer.weight.copy_(to_tensor(inputs.weight))
        if inputs.bias is not None:
            layer.bias.copy_(to_tensor(inputs.bias))
    return layer


def load_bn(norm: Any, inputs: FoldInputs) -> Any:
    """Load a fold case's ``gamma``, ``beta`` and running statistics into ``norm``."""
    with torch().no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.copy_(to_tensor(inputs.gamma))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(to_tensor(inputs.beta))
        norm.running_mean.copy_(to_tensor(inputs.mean))
        norm.running_var.copy_(to_tensor(inputs.var))
    return norm


def native_norm(config: FoldConfig) -> Any:
    """``nn.BatchNorm1d`` (dense) or ``nn.BatchNorm2d`` with the case's eps and affine."""
    spec = config.spec()
    nn = torch().nn
    cls = nn.BatchNorm1d if config.kind == "dense" else nn.BatchNorm2d
    if spec.center != spec.scale:
        raise Unsupported("nn.BatchNorm*d has gamma and beta both or neither (affine)")
    norm = cls(config.out_channels, eps=spec.eps, affine=spec.scale)
    return norm.to(getattr(torch(), config.dtype))


def _affine(settings: dict[str, Any]) -> dict[str, bool]:
    """``affine`` and ``bias`` for ``center``/``scale`` settings (empty: neither given):
    PyTorch's layers learn gamma alone with ``bias=False``, and have no beta without gamma."""
    if "center" not in settings and "scale" not in settings:
        return {}
    center, scale = settings.get("center", True), settings.get("scale", True)
    if center and not scale:
        raise Unsupported("PyTorch's BatchNorm has no shift without a scale (affine, bias)")
    return {"affine": bool(scale), "bias": bool(center) or not scale}


class TorchAdapter(UnormModule, TorchBase):
    """``unorm.torch.BatchNorm`` and ``unorm.torch.adaptive_clip_grad_``."""

    name = "torch"

    module_name = "unorm.torch"

    def bn_build(self, config: LayerConfig, gamma: np.ndarray, beta: np.ndarray) -> Built:
        settings = constructor_settings(config.settings)
        kwargs: dict[str, Any] = {"axis": config.axis, "preset": config.preset}
        for key in ("eps", "momentum", "track_running_stats", *MODE_ARGUMENTS):
            if key in settings:
                kwargs[key] = settings[key]
        kwargs.update(_affine(settings))
        layer = self.module().BatchNorm(config.num_features, **kwargs)
        return self.built(layer, layer, config, gamma, beta)

    def bn_freeze(self, layer: Built, trainable: bool) -> Built:
        """``unorm.torch.freeze`` on the layer."""
        frozen = self.module().freeze(layer.module, trainable=trainable)
        return Built(frozen, frozen, layer.dtype)

    def bn_recalibrate(self, layer: Built, batches: Sequence[np.ndarray]) -> StepValues:
        """``unorm.torch.recalibrate`` over the batches as tensors of the case's dtype."""
        self.module().recalibrate(layer.module, [to_tensor(b, layer.dtype) for b in batches])
        return self.bn_state(layer)

    def bn_accumulate(
        self, layer: Built, xs: Sequence[np.ndarray], dys: Sequence[np.ndarray], steps: int
    ) -> list[StepValues]:
        """The training steps inside ``with unorm.torch.accumulate(layer, steps)``."""
        with self.module().accumulate(layer.module, steps=steps):
            return [self.bn_step(layer, x, dy, "train") for x, dy in zip(xs, dys, strict=True)]

    def fold_eval(self, config: FoldConfig, inputs: FoldInputs) -> FoldValues:
        """``unorm.torch.fold`` of ``nn.Sequential(producer, BatchNorm)`` (unorm's or
        ``nn.BatchNorm*d``), the folded module called in eval mode."""
        if config.native_bn:
            norm = native_norm(config)
        else:
            settings = constructor_settings(config.settings)
            kwargs: dict[str, Any] = {"preset": config.preset, **_affine(settings)}
            kwargs.update({k: settings[k] for k in ("eps", "momentum") if k in settings})
            norm = self.module().BatchNorm(config.out_channels, **kwargs)
            norm.to(getattr(torch(), config.dtype))
        model = torch().nn.Sequential(build_producer(config, inputs), load_bn(norm, inputs))
        # The example input tells fold the rank a dense layer's output has.
        folded = self.module().fold(model, strict=True, example=to_tensor(inputs.x))
        left = sum(isinstance(m, (type(norm), torch().nn.modules.batchnorm._BatchNorm))
                   for m in folded.modules())  # fmt: skip
        with torch().no_grad():
            y = folded(to_tensor(inputs.x))
        return FoldValues(to_numpy(y), int(left), "unorm.torch.fold")

    def agc(
        self,
        params: Sequence[AGCArrays],
        *,
        clipping: float,
        eps: float,
        exclude: Sequence[str],
        unit_axes: Any = None,
    ) -> dict[str, np.ndarray]:
        model = build_agc_model(params)
        kwargs: dict[str, Any] = {"clipping": clipping, "eps": eps, "unit_axes": unit_axes}
        if exclude:
            kwargs["exclude"] = list(exclude)
        self.module().adaptive_clip_grad_(model, **kwargs)
        named = dict(model.named_parameters())
        return {p.name: to_numpy(named[p.name].grad) for p in params}

    def ws_conv(
        self,
        config: WSConfig,
        x: np.ndarray,
        weight: np.ndarray,
        gain: np.ndarray,
        bias: np.ndarray,
        dy: np.ndarray,
    ) -> WSValues:
        """``unorm.torch.ScaledStdConv2d`` (weight ``(O, C/groups, kh, kw)``), one forward
        and backward call."""
        conv = self.module().ScaledStdConv2d(
            config.in_channels,
            config.out_channels,
            config.kernel,
            groups=config.groups,
            padding=config.pads,
            **config.ws_kwargs(),
        )
        conv.to(getattr(torch(), config.dtype))
        with torch().no_grad():
            conv.weight.copy_(to_tensor(weight))
            conv.gain.copy_(to_tensor(gain))
            conv.bias.copy_(to_tensor(bias))
        xt = to_tensor(x).requires_grad_(True)
        y = conv(xt)
        y.backward(to_tensor(dy))
        return WSValues(
            y=to_numpy(y),
            dx=_grad(xt),
            dweight=_grad(conv.weight),
            dgain=_grad(conv.gain),
            dbias=_grad(conv.bias),
        )


def build_agc_model(params: Sequence[AGCArrays]) -> Any:
    """A module whose children are real PyTorch layers of each parameter's kind, with the
    weights and gradients loaded, so AGC finds each output-unit axis from its layer."""
    nn = torch().nn
    by_layer: dict[str, dict[str, AGCArrays]] = {}
    for p in params:
        by_layer.setdefault(p.layer, {})[p.role] = p
    model = nn.Module()
    for layer_name, roles in by_layer.items():
        model.add_module(layer_name, _layer(nn, roles))
    named = dict(model.named_parameters())
    wanted = {p.name for p in params}
    with torch().no_grad():
        for p in params:
            target = named[p.name]
            target.copy_(to_tensor(p.weight, p.dtype))
            target.grad = to_tensor(p.grad, p.dtype)
    for name, value in named.items():
        if name not in wanted:
            value.requires_grad_(False)  # a stand-in weight the case does not cover
    return model


def _layer(nn: Any, roles: dict[str, AGCArrays]) -> Any:
    first = next(iter(roles.values()))
    dtype = getattr(torch(), first.dtype)
    if "gain" in roles:
        holder = nn.Module()
        holder.gain = nn.Parameter(torch().zeros(roles["gain"].weight.shape, dtype=dtype))
        return holder
    weight, bias = roles.get("weight"), roles.get("bias")
    if weight is None:  # a bias alone: its layer's weight is a stand-in
        assert bias is not None
        return nn.Linear(1, bias.weight.shape[0]).to(dtype)
    shape = weight.weight.shape
    kernel, dims, has_bias = tuple(shape[2:]), len(shape) - 2, bias is not None
    if first.kind == "dense":
        layer = nn.Linear(shape[1], shape[0], bias=has_bias)
    elif first.kind == "embedding":
        layer = nn.Embedding(shape[0], shape[1])
    elif first.kind == "conv":
        layer = getattr(nn, f"Conv{dims}d")(shape[1], shape[0], kernel, bias=has_bias)
    elif first.kind == "conv_transpose":
        layer = getattr(nn, f"ConvTranspose{dims}d")(shape[0], shape[1], kernel, bias=has_bias)
    elif first.kind == "depthwise_conv":
        # (I*M, 1, *k): one group per output channel has exactly this layout.
        layer = getattr(nn, f"Conv{dims}d")(
            shape[0], shape[0], kernel, groups=shape[0], bias=has_bias
        )
    else:
        raise Unsupported(f"no PyTorch layer for kind {first.kind!r}")
    return layer.to(dtype)


def create() -> TorchAdapter:
    """The adapter the suite loads."""
    return TorchAdapter()
