"""The Keras 3 column: ``unorm.keras`` driven by the conformance suite (TensorFlow backend).

Also home of the Keras helpers the native column (``keras_native``) shares:
tensor conversion, dtype policies (16-bit inputs run under ``mixed_float16`` /
``mixed_bfloat16``, so variables stay float32) and the training/inference step under a
``GradientTape``. Keras is imported only when a case runs.

Example:
    >>> create().layout.framework
    'keras'
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
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
    present,
)
from unorm.conformance.after import FoldConfig, FoldInputs, FoldValues
from unorm.conformance.expected import StepValues, WSValues

__all__ = ["SYNC_WORKER", "SYNC_WORKERS", "Built", "KerasAdapter", "KerasBase", "create", "policy"]

#: The helper that runs a cross-replica case under MirroredStrategy in a fresh interpreter.
#: The module run, one fresh interpreter per request, for the cross-replica cases.
SYNC_WORKER = f"{__package__}.keras_sync_worker"
#: The helper of each cross-replica strategy the Keras columns run.
SYNC_WORKERS = {
    "replicas": SYNC_WORKER,
    "multi-worker": f"{__package__}.keras_multiworker_worker",
    "data-parallel": f"{__package__}.keras_jax_sync_worker",
}

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def keras() -> Any:
    """The ``keras`` module (imported on first use)."""
    return importlib.import_module("keras")


def tf() -> Any:
    """The ``tensorflow`` module."""
    return importlib.import_module("tensorflow")


def policy(dtype: str) -> str:
    """The dtype policy a layer for ``dtype`` inputs gets (float32 variables for 16-bit).

    Example:
        >>> policy("float16"), policy("float64")
        ('mixed_float16', 'float64')
    """
    return {"float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}.get(dtype, dtype)


def to_tensor(a: np.ndarray, dtype: str | None = None) -> Any:
    """A tensor of ``a`` in ``dtype`` (default: ``a``'s own)."""
    t = tf().convert_to_tensor(np.asarray(a))
    return t if dtype is None else tf().cast(t, dtype)


def to_numpy(t: Any) -> np.ndarray | None:
    """A tensor's (or variable's) values as NumPy; bfloat16 as float32 carriers."""
    if t is None:
        return None
    t = tf().convert_to_tensor(t)
    if t.dtype == tf().bfloat16:
        t = tf().cast(t, "float32")
    return np.array(t.numpy())


@dataclasses.dataclass
class Built:
    """A layer under test and the case's input dtype."""

    layer: Any
    dtype: str


def _var(layer: Any, name: str) -> Any:
    return getattr(layer, name, None)


class KerasBase(Adapter):
    """What both Keras columns share; layers expose ``gamma``, ``beta``, ``moving_mean``,
    ``moving_variance`` (and, where kept, ``num_batches_tracked``)."""

    framework = "keras"
    dtypes = ("float64", "float32", "float16", "bfloat16")
    layout = layouts.of("keras")
    absent = frozenset({"num_batches_tracked"})
    sync_strategies = ("replicas", "multi-worker", "data-parallel")
    masks = True  # Keras layers take a mask (SPEC.md section 2, *Masked batches*)

    def availability(self) -> str | None:
        try:
            keras()
        except ImportError as exc:
            return f"keras is not importable: {exc}"
        if keras().backend.backend() != "tensorflow":
            return f"the suite drives Keras on TensorFlow, not {keras().backend.backend()}"
        return None

    def versions(self) -> dict[str, str]:
        return {
            "keras": keras().__version__,
            "tensorflow": tf().__version__,
            "numpy": np.__version__,
        }

    def round_to(self, a: np.ndarray, dtype: str) -> np.ndarray:
        out = to_numpy(to_tensor(np.asarray(a, np.float64), dtype))
        assert out is not None
        return out

    def built(self, layer: Any, config: LayerConfig, gamma: np.ndarray, beta: np.ndarray) -> Built:
        """Build ``layer`` for the case's rank and load ``gamma`` / ``beta``."""
        ndim = max(config.ndim, 2)  # a rank-1 input is the error under test, not the build
        shape: list[int | None] = [None] * ndim
        shape[config.axis % ndim] = config.num_features
        layer.build(tuple(shape))
        if _var(layer, "gamma") is not None:
            layer.gamma.assign(gamma)
        if _var(layer, "beta") is not None:
            layer.beta.assign(beta)
        return Built(layer, config.dtype)

    def bn_state(self, layer: Built) -> StepValues:
        tracked = _var(layer.layer, "num_batches_tracked")
        return StepValues(
            running_mean=to_numpy(_var(layer.layer, "moving_mean")),
            running_var=to_numpy(_var(layer.layer, "moving_variance")),
            num_batches_tracked=None if tracked is None else int(present(to_numpy(tracked))),
            renorm_mean=to_numpy(_var(layer.layer, "renorm_mean")),
            renorm_std=to_numpy(_var(layer.layer, "renorm_stddev")),
        )

    def bn_step(
        self,
        layer: Built,
        x: np.ndarray,
        dy: np.ndarray | None,
        mode: str,
        mask: np.ndarray | None = None,
    ) -> StepValues:
        dtype = layer.dtype if layer.dtype in dtypes.DTYPES else None
        xt = to_tensor(x, dtype)
        training = mode != "eval"
        # Keras's mask has the input's shape without the last axis it is broadcast over.
        kw = {} if mask is None else {"mask": tf().constant(mask[..., 0])}
        out = StepValues()
        if dy is None:
            out.y = to_numpy(layer.layer(xt, training=training, **kw))
        else:
            # Only trainable ones: a fixed (frozen) gamma or beta takes no gradient.
            trainable = {id(v) for v in layer.layer.trainable_weights}
            params = [
                v
                for v in (_var(layer.layer, "gamma"), _var(layer.layer, "beta"))
                if v is not None and id(v) in trainable
            ]
            with tf().GradientTape() as tape:
                tape.watch(xt)
                y = layer.layer(xt, training=training, **kw)
            grads = tape.gradient(y, [xt, *params], output_gradients=to_tensor(dy, y.dtype))
            out.y, out.dx = to_numpy(y), to_numpy(grads[0])
            named = dict(zip([id(p) for p in params], grads[1:], strict=True))
            gamma, beta = _var(layer.layer, "gamma"), _var(layer.layer, "beta")
            out.dgamma = None if gamma is None else to_numpy(named.get(id(gamma)))
            out.dbeta = None if beta is None else to_numpy(named.get(id(beta)))
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
        """``synchronized=True`` in a fresh interpreter: under MirroredStrategy, one
        logical CPU per replica (``replicas``, ``keras_sync_worker.py``), under
        MultiWorkerMirroredStrategy, one worker process per replica (``multi-worker``,
        ``keras_multiworker_worker.py``), or on Keras's JAX backend under DataParallel,
        one host device per replica (``data-parallel``, ``keras_jax_sync_worker.py``)."""
        if self.native:
            self.native_spec(config)
            if strategy == "data-parallel":
                raise Unsupported(
                    "keras.layers.BatchNormalization refuses synchronized=True off the "
                    "TensorFlow backend (keras-team/keras#18667)"
                )
        if strategy == "data-parallel" and importlib.util.find_spec("jax") is None:
            raise Unsupported("Keras's JAX backend needs jax, which is not installed here")
        with tempfile.TemporaryDirectory() as folder:
            request = exchange.write_request(
                Path(folder), config, gamma, beta, xs, dys, self.native, strategy
            )
            return exchange.run_helper(SYNC_WORKERS[strategy], request)


class KerasAdapter(UnormModule, KerasBase):
    """``unorm.keras.BatchNorm`` and the ``unorm.keras.AGC`` optimizer wrapper."""

    name = "keras"

    module_name = "unorm.keras"

    def _model(self, layer: Built, x: np.ndarray) -> Any:
        """A functional model of the one layer on inputs like ``x`` in the case's dtype (a
        Sequential model without an input would cast them to its float32 policy)."""
        k = keras()
        inp = k.Input(x.shape[1:], dtype=layer.dtype)
        return k.Model(inp, layer.layer(inp))

    def bn_freeze(self, layer: Built, trainable: bool) -> Built:
        """``unorm.keras.freeze`` on a Sequential model of the layer."""
        model = self.module().freeze(keras().Sequential([layer.layer]), trainable=trainable)
        return Built(model.layers[0], layer.dtype)

    def bn_recalibrate(self, layer: Built, batches: Sequence[np.ndarray]) -> StepValues:
        """``unorm.keras.recalibrate`` over the batches."""
        model = self._model(layer, batches[0])
        self.module().recalibrate(model, [to_tensor(b, layer.dtype) for b in batches])
        return self.bn_state(layer)

    def bn_accumulate(
        self, layer: Built, xs: Sequence[np.ndarray], dys: Sequence[np.ndarray], steps: int
    ) -> list[StepValues]:
        """The training steps inside ``with unorm.keras.accumulate(model, steps)``."""
        model = self._model(layer, xs[0])
        with self.module().accumulate(model, steps=steps):
            return [self.bn_step(layer, x, dy, "train") for x, dy in zip(xs, dys, strict=True)]

    def fold_eval(self, config: FoldConfig, inputs: FoldInputs) -> FoldValues:
        """``unorm.keras.fold`` of a channels-last ``Sequential([producer, BatchNorm])``
        (unorm's or ``keras.layers.BatchNormalization``), called with ``training=False``."""
        k = keras()
        spec = config.spec()
        if config.native_bn:
            norm = k.layers.BatchNormalization(
                axis=-1, epsilon=spec.eps, center=spec.center, scale=spec.scale,
                dtype=config.dtype,
            )  # fmt: skip
        else:
            norm = self.module().BatchNorm(
                -1, preset=config.preset, dtype=config.dtype,
                **constructor_settings(config.settings),
            )  # fmt: skip
        x = np.moveaxis(np.asarray(inputs.x), 1, -1)
        model = k.Sequential([k.Input(x.shape[1:], dtype=config.dtype),
                              keras_producer(config), norm])  # fmt: skip
        producer = model.layers[0]
        producer.kernel.assign(inputs.weight)
        if inputs.bias is not None:
            producer.bias.assign(inputs.bias)
        for name, value in (("gamma", inputs.gamma), ("beta", inputs.beta)):
            if _var(norm, name) is not None:
                getattr(norm, name).assign(value)
        norm.moving_mean.assign(inputs.mean)
        norm.moving_variance.assign(inputs.var)
        folded = self.module().fold(model, strict=True)
        left = sum(isinstance(m, (type(norm), k.layers.BatchNormalization))
                   for m in folded._flatten_layers())  # fmt: skip
        y = present(to_numpy(folded(to_tensor(x, config.dtype), training=False)))
        return FoldValues(np.moveaxis(y, -1, 1), int(left), "unorm.keras.fold")

    def bn_build(self, config: LayerConfig, gamma: np.ndarray, beta: np.ndarray) -> Built:
        policy_name = policy(config.dtype) if config.dtype in dtypes.DTYPES else "float32"
        layer = self.module().BatchNorm(
            config.axis,
            preset=config.preset,
            dtype=policy_name,
            **constructor_settings(config.settings),
        )
        return self.built(layer, config, gamma, beta)

    def agc(
        self,
        params: Sequence[AGCArrays],
        *,
        clipping: float,
        eps: float,
        exclude: Sequence[str],
        unit_axes: Any = None,
    ) -> dict[str, np.ndarray]:
        holder, variables = build_agc_model(params)
        recorder = _recorder()
        # A name the model lacks goes through as a name, which the API must refuse.
        skip = [variables.get(name, name) for name in exclude]
        if isinstance(unit_axes, dict):  # keyed by path: Keras variables are not hashable
            unit_axes = {
                variables[n].path if n in variables else n: axes for n, axes in unit_axes.items()
            }
        opt = self.module().AGC(
            recorder, holder, clipping=clipping, eps=eps, exclude=skip, unit_axes=unit_axes
        )
        order = [p.name for p in params]
        grads = [to_tensor(p.grad, p.dtype) for p in params]
        opt.apply(grads, [variables[n] for n in order])
        return {n: present(to_numpy(recorder.seen[i])) for i, n in enumerate(order)}

    def ws_conv(
        self,
        config: WSConfig,
        x: np.ndarray,
        weight: np.ndarray,
        gain: np.ndarray,
        bias: np.ndarray,
        dy: np.ndarray,
    ) -> WSValues:
        """``unorm.keras.ScaledStdConv2D`` (kernel ``(kh, kw, C/groups, O)``) on
        channels-last inputs: the case's ``(N, C, H, W)`` arrays are transposed in and out."""
        conv = self.module().ScaledStdConv2D(
            config.out_channels,
            config.kernel,
            groups=config.groups,
            padding=config.padding,
            dtype=config.dtype,
            **config.ws_kwargs(),
        )
        nhwc = np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))
        conv.build((None, *nhwc.shape[1:]))
        for variable, value in ((conv.kernel, weight), (conv.gain, gain), (conv.bias, bias)):
            variable.assign(to_tensor(value, config.dtype))
        xt = to_tensor(nhwc, config.dtype)
        variables = [conv.kernel, conv.gain, conv.bias]
        with tf().GradientTape() as tape:
            tape.watch(xt)
            y = conv(xt)
        upstream = to_tensor(np.ascontiguousarray(np.transpose(dy, (0, 2, 3, 1))), y.dtype)
        grads = tape.gradient(y, [xt, *variables], output_gradients=upstream)
        nchw = (0, 3, 1, 2)
        dx = to_numpy(grads[0])
        return WSValues(
            y=np.transpose(present(to_numpy(y)), nchw),
            dx=None if dx is None else np.transpose(dx, nchw),
            dweight=to_numpy(grads[1]),
            dgain=to_numpy(grads[2]),
            dbias=to_numpy(grads[3]),
        )


def _recorder() -> Any:
    """An optimizer that applies nothing and keeps the gradients its update receives (the
    ones AGC clipped), in variables so that graph mode works too."""
    k: Any = keras()

    class Recorder(k.optimizers.Optimizer):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(learning_rate=0.0, name="recorder")
            self.seen: list[Any] = []

        def build(self, variables: Sequence[Any]) -> None:
            super().build(variables)
            self.seen = [self.add_variable_from_reference(v, "seen") for v in variables]

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            index = self._get_variable_index(variable)
            self.seen[index].assign(k.ops.cast(gradient, variable.dtype))

    return Recorder()


def build_agc_model(params: Sequence[AGCArrays]) -> tuple[Any, dict[str, Any]]:
    """A layer holding real Keras layers of each parameter's kind, weights loaded; and the
    variable of each parameter name. AGC reads the output-unit axes from these layers."""
    k = keras()
    holder = k.layers.Layer(name="agc_case")
    by_layer: dict[str, dict[str, AGCArrays]] = {}
    for p in params:
        by_layer.setdefault(p.layer, {})[p.role] = p
    variables: dict[str, Any] = {}
    for layer_name, roles in by_layer.items():
        layer, found = _layer(k, layer_name, roles)
        setattr(holder, layer_name, layer)
        variables.update(found)
    for p in params:
        variables[p.name].assign(to_tensor(p.weight, p.dtype))
    return holder, variables


def _layer(k: Any, name: str, roles: dict[str, AGCArrays]) -> tuple[Any, dict[str, Any]]:
    first = next(iter(roles.values()))
    dtype = first.dtype
    weight, bias = roles.get("weight"), roles.get("bias")
    if "gain" in roles:
        layer = k.layers.Layer(name=name, dtype=dtype)
        layer.gain = layer.add_weight(shape=roles["gain"].weight.shape, name="gain")
        return layer, {roles["gain"].name: layer.gain}
    if weight is None:  # a bias alone: its layer's kernel is a stand-in
        assert bias is not None
        layer = k.layers.Dense(bias.weight.shape[0], name=name, dtype=dtype)
        layer.build((None, 1))
        return layer, {bias.name: layer.bias}
    shape = weight.weight.shape
    dims, has_bias = len(shape) - 2, bias is not None
    kernel_size = tuple(shape[:-2])
    if first.kind == "dense":
        layer = k.layers.Dense(shape[1], use_bias=has_bias, name=name, dtype=dtype)
        layer.build((None, shape[0]))
    elif first.kind == "embedding":
        layer = k.layers.Embedding(shape[0], shape[1], name=name, dtype=dtype)
        layer.build((None,))
    elif first.kind == "conv":
        layer = getattr(k.layers, f"Conv{dims}D")(
            shape[-1], kernel_size, use_bias=has_bias, name=name, dtype=dtype
        )
        layer.build((None, *(s + 4 for s in kernel_size), shape[-2]))
    elif first.kind == "conv_transpose":
        layer = getattr(k.layers, f"Conv{dims}DTranspose")(
            shape[-2], kernel_size, use_bias=has_bias, name=name, dtype=dtype
        )
        layer.build((None, *(s + 4 for s in kernel_size), shape[-1]))
    elif first.kind == "depthwise_conv":
        layer = getattr(k.layers, f"DepthwiseConv{dims}D")(
            kernel_size, depth_multiplier=shape[-1], use_bias=has_bias, name=name, dtype=dtype
        )
        layer.build((None, *(s + 4 for s in kernel_size), shape[-2]))
    else:
        raise Unsupported(f"no Keras layer for kind {first.kind!r}")
    kernel = layer.embeddings if first.kind == "embedding" else layer.kernel
    found = {weight.name: kernel}
    if bias is not None:
        found[bias.name] = layer.bias
    return layer, found


def keras_producer(config: FoldConfig) -> Any:
    """The channels-last producer layer of a fold case (weights loaded by the caller)."""
    layers = keras().layers
    o, k, bias, dtype = config.out_channels, config.kernel, config.bias, config.dtype
    if config.kind == "dense":
        return layers.Dense(o, use_bias=bias, dtype=dtype)
    if config.kind == "conv_transpose":
        if config.groups != 1:
            raise Unsupported("keras.layers.Conv2DTranspose has no groups")
        return layers.Conv2DTranspose(o, k, use_bias=bias, dtype=dtype)
    if config.kind == "depthwise_conv":
        multiplier = o // config.in_channels
        return layers.DepthwiseConv2D(k, depth_multiplier=multiplier, use_bias=bias, dtype=dtype)
    return layers.Conv2D(o, k, groups=config.groups, use_bias=bias, dtype=dtype)


def create() -> KerasAdapter:
    """The adapter the suite loads."""
    return KerasAdapter()
