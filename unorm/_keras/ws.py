"""``ScaledStdConv1D/2D/3D``: Keras 3 convolutions with Scaled Weight Standardisation
(``SPEC.md`` section 6), for normalizer-free networks.

Keras kernels are ``(*k, I/groups, O)``: the output unit is the last axis, so the
statistics of each output channel run over the others (``fan_in = prod(k) * I/g``).
Written once, with ``keras.ops``, in a mixin over the convolution's rank; each layer
subclasses ``keras.layers.Conv1D``, ``Conv2D`` or ``Conv3D``, so everything that knows
Keras convolutions (unorm's AGC reading output-unit axes from the layer, the checkpoint
port, ``model.summary()``, ``get_weights``) knows these.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import keras
from keras import ops

from ..spec import ScaledWSSpec

__all__ = ["ScaledStdConv1D", "ScaledStdConv2D", "ScaledStdConv3D", "standardize_kernel"]

# Statistics of 16-bit kernels are taken in float32: their variance would lose bits.
_NARROW = ("float16", "bfloat16")


def _fan_in_error(detail: str) -> ValueError:
    return ValueError(
        f"fan_in must be >= 1 for Scaled Weight Standardisation, got {detail} "
        "(a zero-size kernel or no input channels)"
    )


def standardize_kernel(kernel: Any, gain: Any, spec: ScaledWSSpec) -> Any:
    """Scaled WS of a channels-last kernel ``(*k, I/groups, O)``, per output channel (the
    last axis), differentiable; ``gain`` has one value per output channel (None: 1).

    Example:
        >>> import numpy as np
        >>> w = standardize_kernel(np.random.default_rng(0).normal(size=(3, 3, 2, 4)),
        ...                        None, ScaledWSSpec())
        >>> np.allclose(np.var(np.asarray(w).reshape(-1, 4), axis=0), 1 / 18)
        True
    """
    kernel = ops.convert_to_tensor(kernel)
    dtype = keras.backend.standardize_dtype(kernel.dtype)
    work = ops.cast(kernel, "float32") if dtype in _NARROW else kernel
    axes = tuple(range(len(kernel.shape) - 1))
    fan_in = math.prod(int(kernel.shape[i]) for i in axes)
    if fan_in == 0:
        raise _fan_in_error(f"kernel shape {tuple(kernel.shape)}")
    mean = ops.mean(work, axis=axes, keepdims=True)
    centred = work - mean
    var = ops.mean(ops.square(centred), axis=axes, keepdims=True)  # two-pass, biased
    assert spec.eps is not None
    if spec.style == "deepmind":
        scale = ops.rsqrt(ops.maximum(var * fan_in, spec.eps))
    else:
        scale = ops.rsqrt((var + spec.eps) * fan_in)
    if gain is not None:
        scale = scale * ops.cast(gain, work.dtype)  # (O,) broadcasts over the last axis
    return ops.cast(centred * scale, kernel.dtype)


class _ScaledStd(keras.layers.Layer):
    """What ``ScaledStdConv1D/2D/3D`` share: the gain, the settings, the call, the saving.

    A mixin placed before a ``keras.layers.Conv{1,2,3}D`` (the convolution's own
    constructor, ``build`` and ``get_config`` come next in the MRO); ``_rank`` is the number
    of spatial axes. It takes the convolution's own arguments, plus ``gain_init`` (1.0: the
    learnable per-output-channel gain's start), ``style`` (``"deepmind"``, canonical, or
    ``"timm"``) and ``eps`` (None: the style's, 1e-4 or 1e-5); see ``SPEC.md`` section 6.
    """

    _rank: ClassVar[int]

    def __init__(
        self,
        filters: int,
        kernel_size: Any,
        *args: Any,
        gain_init: float = 1.0,
        style: str = "deepmind",
        eps: float | None = None,
        **kwargs: Any,
    ) -> None:
        # Settings first, so that a bad style or eps is named before Keras's own checks.
        self.spec = ScaledWSSpec(style=style, eps=eps)  # type: ignore[arg-type]
        self.gain_init = float(gain_init)
        sizes = (kernel_size,) * self._rank if isinstance(kernel_size, int) else tuple(kernel_size)
        if any(int(s) == 0 for s in sizes):
            # Keras would reject it too, without saying why it matters here.
            raise _fan_in_error(f"kernel_size {sizes}")
        super().__init__(filters, kernel_size, *args, **kwargs)

    def build(self, input_shape: Any) -> None:
        """Create ``kernel`` and ``bias`` as the convolution does, then ``gain``."""
        axis = -1 if self.data_format == "channels_last" else 1
        channels = input_shape[axis]
        if channels is not None and int(channels) // self.groups == 0:
            raise _fan_in_error(
                f"{channels} input channels in {self.groups} group(s) "
                f"(input shape {tuple(input_shape)})"
            )
        super().build(input_shape)
        self.gain = self.add_weight(
            name="gain",
            shape=(self.filters,),
            initializer=keras.initializers.Constant(self.gain_init),
            trainable=True,
            dtype=self.dtype,
        )

    def standardized_kernel(self) -> Any:
        """The kernel this layer convolves with: Scaled WS of ``kernel`` times ``gain``."""
        return standardize_kernel(self.kernel, self.gain, self.spec)

    def call(self, inputs: Any) -> Any:
        """The convolution's call with the standardised kernel."""
        kernel = self.standardized_kernel()
        if self.padding == "causal":  # Conv1D only: pad on the left, then a valid conv
            left = int(self.dilation_rate[0]) * (int(self.kernel_size[0]) - 1)
            step = [[0, 0], [left, 0], [0, 0]]
            pads = step if self.data_format == "channels_last" else [step[0], step[2], step[1]]
            outputs = ops.conv(
                ops.pad(inputs, pads),
                kernel,
                strides=list(self.strides),
                padding="valid",
                dilation_rate=self.dilation_rate,
                data_format=self.data_format,
            )
        else:
            outputs = self.convolution_op(inputs, kernel)
        if self.use_bias:
            shape = (1,) * (self._rank + 1) + (self.filters,)
            if self.data_format != "channels_last":
                shape = (1, self.filters) + (1,) * self._rank
            outputs = ops.add(outputs, ops.reshape(self.bias, shape))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs

    # The convolution saves and loads ``kernel`` and ``bias`` by position; ``gain`` next.
    def _gain_key(self) -> str:
        return str(2 if self.use_bias else 1)

    def save_own_variables(self, store: Any) -> None:
        """The convolution's variables, then ``gain`` (``.keras`` and ``.weights.h5``)."""
        super().save_own_variables(store)
        if self.built:
            store[self._gain_key()] = self.gain

    def load_own_variables(self, store: Any) -> None:
        """Inverse of :meth:`save_own_variables`."""
        super().load_own_variables(store)
        if self.built:
            self.gain.assign(store[self._gain_key()])

    def get_config(self) -> dict[str, Any]:
        """The convolution's config plus ``gain_init``, ``style`` and the resolved ``eps``."""
        config: dict[str, Any] = super().get_config()
        config.update(gain_init=self.gain_init, style=self.spec.style, eps=self.spec.eps)
        return config


@keras.saving.register_keras_serializable(package="unorm")
class ScaledStdConv1D(_ScaledStd, keras.layers.Conv1D):
    """``keras.layers.Conv1D`` whose kernel is standardised on every call (Scaled WS).

    Takes ``Conv1D``'s own arguments (``filters``, ``kernel_size``, ``strides``,
    ``padding``, including ``"causal"``, ``groups``, ``use_bias``, ...), plus:

    Args:
        gain_init: start value of the learnable per-output-channel ``gain`` (default 1.0).
        style: ``"deepmind"`` (canonical, ``rsqrt(max(var * fan_in, eps))``) or ``"timm"``
            (``rsqrt((var + eps) * fan_in)``); see ``SPEC.md`` section 6.
        eps: None (default) takes the style's: 1e-4 (deepmind) or 1e-5 (timm).

    The weights are ``kernel`` ``(k, I/groups, O)``, ``bias`` ``(O,)`` (with ``use_bias``)
    and ``gain`` ``(O,)``. A kernel with ``fan_in = k * I/groups`` of 0 (a zero-size
    kernel, or inputs without channels) is a ``ValueError``.

    Example:
        >>> import numpy as np
        >>> conv = ScaledStdConv1D(8, 3, padding="causal")
        >>> tuple(conv(np.zeros((2, 6, 3), "float32")).shape)
        (2, 6, 8)
        >>> [w.name for w in conv.weights]
        ['kernel', 'bias', 'gain']
        >>> ScaledStdConv1D.from_config(conv.get_config()).spec
        ScaledWSSpec(style='deepmind', eps=0.0001)
    """

    _rank = 1


@keras.saving.register_keras_serializable(package="unorm")
class ScaledStdConv2D(_ScaledStd, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose kernel is standardised on every call (Scaled WS).

    Takes ``Conv2D``'s own arguments (``filters``, ``kernel_size``, ``strides``,
    ``padding``, ``groups``, ``use_bias``, ...), plus:

    Args:
        gain_init: start value of the learnable per-output-channel ``gain`` (default 1.0).
        style: ``"deepmind"`` (canonical, ``rsqrt(max(var * fan_in, eps))``) or ``"timm"``
            (``rsqrt((var + eps) * fan_in)``); see ``SPEC.md`` section 6.
        eps: None (default) takes the style's: 1e-4 (deepmind) or 1e-5 (timm).

    The weights are ``kernel`` ``(kh, kw, I/groups, O)``, ``bias`` ``(O,)`` (with
    ``use_bias``) and ``gain`` ``(O,)``. A kernel with ``fan_in = kh * kw * I/groups`` of 0
    (a zero-size kernel, or inputs without channels) is a ``ValueError``.

    Example:
        >>> import numpy as np
        >>> conv = ScaledStdConv2D(8, 3, padding="same")
        >>> tuple(conv(np.zeros((2, 6, 6, 3), "float32")).shape)
        (2, 6, 6, 8)
        >>> [w.name for w in conv.weights]
        ['kernel', 'bias', 'gain']
        >>> ScaledStdConv2D.from_config(conv.get_config()).spec
        ScaledWSSpec(style='deepmind', eps=0.0001)
    """

    _rank = 2


@keras.saving.register_keras_serializable(package="unorm")
class ScaledStdConv3D(_ScaledStd, keras.layers.Conv3D):
    """``keras.layers.Conv3D`` whose kernel is standardised on every call (Scaled WS).

    Takes ``Conv3D``'s own arguments (``filters``, ``kernel_size``, ``strides``,
    ``padding``, ``groups``, ``use_bias``, ...), plus:

    Args:
        gain_init: start value of the learnable per-output-channel ``gain`` (default 1.0).
        style: ``"deepmind"`` (canonical, ``rsqrt(max(var * fan_in, eps))``) or ``"timm"``
            (``rsqrt((var + eps) * fan_in)``); see ``SPEC.md`` section 6.
        eps: None (default) takes the style's: 1e-4 (deepmind) or 1e-5 (timm).

    The weights are ``kernel`` ``(kd, kh, kw, I/groups, O)``, ``bias`` ``(O,)`` (with
    ``use_bias``) and ``gain`` ``(O,)``. A kernel with ``fan_in = kd * kh * kw * I/groups``
    of 0 (a zero-size kernel, or inputs without channels) is a ``ValueError``.

    Example:
        >>> import numpy as np
        >>> conv = ScaledStdConv3D(4, 2, style="timm")
        >>> tuple(conv(np.zeros((1, 3, 3, 3, 2), "float32")).shape)
        (1, 2, 2, 2, 4)
        >>> tuple(conv.gain.shape)
        (4,)
        >>> ScaledStdConv3D.from_config(conv.get_config()).spec
        ScaledWSSpec(style='timm', eps=1e-05)
    """

    _rank = 3
