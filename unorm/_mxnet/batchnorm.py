"""The Gluon blocks: :class:`BatchNorm` and its cross-device form :class:`SyncBatchNorm`.

Both keep Gluon's parameter names (``gamma``, ``beta``, ``running_mean``,
``running_var``), so checkpoints and :func:`unorm.mxnet.convert` carry state over from
``gluon.nn.BatchNorm``; the canonical layer adds the integer auxiliary state
``num_batches_tracked``. Settings come from :class:`unorm.spec.BatchNormSpec`, so every
argument means what SPEC.md says on every backend.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from .._core.settings import BatchNormSettings
from ..spec import BatchNormSpec, normalize_axis
from . import internals
from .native import affine, affine_params
from .op import OP_TYPE, OpSettings, count_error, dtype_error, ghost_error
from .stats import layout

__all__ = ["BatchNorm", "SyncBatchNorm"]

NDArray = Any  # mxnet.nd.NDArray

_UNSET: Any = object()  # "momentum not given": None already means the cumulative average


def _check_count_arg(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class BatchNorm(BatchNormSettings, gluon.HybridBlock):  # type: ignore[misc]
    """Batch normalisation with unorm's one meaning per parameter (SPEC.md), for Gluon 1.9.

    ``BatchNorm(in_channels=0, num_dims=None, *, axis=1, eps=None, momentum=<unset>,
    center=None, scale=None, preset=None, track_running_stats=None, running_var=None,
    skip_nonfinite=None, allow_single_value=None, update_on=None, empty_batch=None,
    renorm=None, renorm_clipping=None, renorm_momentum=None, renorm_running=None,
    virtual_batch_size=None, ghost_running=None)``.
    Arguments left at None (``momentum``: left out) take the preset's value, or the
    canonical default with ``preset=None``: ``eps=1e-5``; ``momentum=0.1``, the weight of
    the **new** batch statistic (Gluon's own ``momentum=0.9`` weighs the old value),
    ``None`` for a cumulative average; ``axis=1`` (channels first); running variance fed
    ``n/(n-1)`` times the batch variance; a batch with non-finite statistics updates
    nothing; training on one value per channel is a ``ValueError``; an empty batch changes
    no state.

    ``renorm=True`` is Batch Renormalization (Ioffe 2017, arXiv 1702.03275; ``SPEC.md``
    section 2): training corrects the normalised batch by ``r`` and ``d`` (constants to
    the gradient) taken from the auxiliary states ``renorm_mean`` and ``renorm_std``;
    ``renorm_clipping`` is Keras's dictionary of bounds (``"rmax"``, ``"rmin"``,
    ``"dmax"``, each optional; default none), ``renorm_momentum`` the weight of the new
    statistic in the renorm statistics (default 0.01), ``renorm_running`` ``"variance"``
    (default) or ``"stddev"`` (Keras's moving stddev, a state ``running_std``).

    ``virtual_batch_size`` (an integer >= 2) is ghost batches (``SPEC.md`` section 2): in
    training each group of that many consecutive samples (the last one holds the
    remainder) is normalised with its own statistics, vectorised; inference is never
    grouped. ``ghost_running`` is what the running statistics are fed: ``"batch"``
    (default: the exact merge of the groups) or ``"groups"`` (their mean, tf.keras 2's).

    ``in_channels=0`` infers the channel count from the first input; ``num_dims`` (2 for
    ``(N, C)``, 4 for ``(N, C, H, W)``, or None for any rank >= 2) makes other ranks a
    ``ValueError``. Parameters ``gamma``, ``beta`` and auxiliary states ``running_mean``,
    ``running_var`` are named as in ``gluon.nn.BatchNorm``; ``num_batches_tracked`` (int64)
    counts the updates. With ``scale=False``/``center=False`` the ``gamma``/``beta``
    parameters stay (fixed, ``grad_req='null'``, as in Gluon) and count as 1 and 0.
    Parameters and running statistics are float32 for float16 and float32 input
    (``cast('float64')`` for float64 input); the output has the input's dtype.

    Running statistics are updated in the training forward pass (``autograd.record()`` or
    ``autograd.train_mode()``), exactly once per call, whether or not backward runs,
    hybridized or not, also inside a hybridized parent and after ``export`` /
    ``SymbolBlock.imports`` (import :mod:`unorm.mxnet` before loading).

    ``preset="mxnet"`` has ``gluon.nn.BatchNorm``'s semantics: ``eps=1e-5``, Gluon's
    ``momentum=0.9`` (unorm's 0.1), a biased running variance, no guard, one value per
    channel accepted, and running statistics updated only when the backward pass of the
    call runs (a training forward without backward leaves them unchanged), which is how
    MXNet's CPU kernel behaves; unlike the canonical layer, which updates them in the
    forward pass. Its numbers match Gluon's to float32 rounding, with two deliberate
    differences: the statistics are accurate (MXNet's kernel sums one float32 at a time and
    at a mean of 1e4 loses every digit of the variance), and in inference mode the backward
    pass treats the running statistics as constants (MXNet's kernel differentiates through
    them as if they were batch statistics). With ``update_on="backward"`` a read of
    ``running_mean``/``running_var`` through MXNet's API right after ``backward()`` waits
    for the update, as with Gluon's own layer (:meth:`_order`); ``num_batches_tracked``,
    which no native backward pass can write (it is int64), is ordered before later forward
    calls but not before a plain read: read it after ``mx.nd.waitall()``. Under
    ``hybridize(static_alloc=True)`` MXNet 1.9 orders no write to a block's state (in the
    forward pass either) before later reads: synchronise first there.

    An empty batch (no sample, or a spatial size of 0) exists in MXNet 1.x only under NumPy
    shape semantics (``mx.util.set_np_shape(True)``, ``mx.util.np_shape(True)``); without
    them MXNet itself refuses such an array. Under them the output is empty, the input
    gradient empty, the ``gamma``/``beta`` gradients 0, and a training call changes the
    state as ``empty_batch`` says (SPEC.md section 2, *Empty batch*): canonical
    ``"skip"`` nothing, ``preset="torch"`` (``"count"``) only ``num_batches_tracked``,
    ``preset="keras"``/``"mxnet"`` (``"nan"``) running statistics NaN (with
    ``update_on="backward"`` when backward runs, as ``gluon.nn.BatchNorm`` does; Gluon's
    own ``gamma`` gradient is NaN there) unless ``skip_nonfinite`` skips the update.

    Errors (``ValueError``, raised before anything changes): input rank below 2 or other
    than ``num_dims``, a non-floating dtype, ``axis`` out of range, a channel count other
    than the layer's, one value per channel in training. Inside a hybridized parent (or an
    imported ``SymbolBlock``) the layer sees symbols, so the operator's shape and type
    inference refuse the rank, dtype and channel errors, before anything runs: MXNet prints
    the same message and raises its own ``MXNetError``.

    Example:
        >>> import mxnet as mx
        >>> from mxnet import autograd
        >>> from unorm.mxnet import BatchNorm
        >>> layer = BatchNorm(2, num_dims=2)
        >>> layer.initialize()
        >>> with autograd.train_mode():  # a training forward pass, no backward
        ...     y = layer(mx.nd.array([[0.0, 1.0], [2.0, 3.0]]))
        >>> layer.running_mean.data().asnumpy().tolist()  # 0.9 * 0 + 0.1 * batch mean
        [0.10000000149011612, 0.20000000298023224]
    """

    def __init__(
        self,
        in_channels: int = 0,
        num_dims: int | None = None,
        *,
        axis: int = 1,
        eps: float | None = None,
        momentum: float | None = _UNSET,
        center: bool | None = None,
        scale: bool | None = None,
        preset: str | None = None,
        track_running_stats: bool | None = None,
        running_var: str | None = None,
        skip_nonfinite: bool | None = None,
        allow_single_value: bool | None = None,
        update_on: str | None = None,
        empty_batch: str | None = None,
        renorm: bool | None = None,
        renorm_clipping: Any = None,
        renorm_momentum: float | None = None,
        renorm_running: str | None = None,
        virtual_batch_size: int | None = None,
        ghost_running: str | None = None,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        running_mean_initializer: Any = "zeros",
        running_variance_initializer: Any = "ones",
        prefix: str | None = None,
        params: Any = None,
    ) -> None:
        super().__init__(prefix=prefix, params=params)
        channels = _check_count_arg("in_channels", in_channels, 0)
        self._num_dims = None if num_dims is None else _check_count_arg("num_dims", num_dims, 2)
        given = {
            "eps": eps,
            "center": center,
            "scale": scale,
            "track_running_stats": track_running_stats,
            "running_var": running_var,
            "skip_nonfinite": skip_nonfinite,
            "allow_single_value": allow_single_value,
            "update_on": update_on,
            "empty_batch": empty_batch,
            "renorm": renorm,
            "renorm_momentum": renorm_momentum,
            "renorm_running": renorm_running,
            "virtual_batch_size": virtual_batch_size,
            "ghost_running": ghost_running,
        }
        overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if momentum is not _UNSET:
            overrides["momentum"] = momentum
        if renorm_clipping is not None:
            overrides.update(BatchNormSpec.clipping_settings(renorm_clipping))
        #: The layer's settings in unorm's convention (:class:`unorm.spec.BatchNormSpec`).
        self.spec = BatchNormSpec.from_preset(preset, axis=axis, **overrides)
        extra = self._sync_extra() or {}
        #: This layer's name in the operator's table of accumulated steps.
        self.accumulate_key = uuid.uuid4().hex
        self._settings = OpSettings.from_spec(
            self.spec, accumulate_key=self.accumulate_key, **extra
        )
        spec = self.spec
        self.gamma = self.params.get(
            "gamma",
            grad_req="write" if spec.scale else "null",
            shape=(channels,),
            init=gamma_initializer,
            allow_deferred_init=True,
            differentiable=spec.scale,
        )
        self.beta = self.params.get(
            "beta",
            grad_req="write" if spec.center else "null",
            shape=(channels,),
            init=beta_initializer,
            allow_deferred_init=True,
            differentiable=spec.center,
        )
        self.running_mean = self.running_var = self.num_batches_tracked = None
        if spec.track_running_stats:
            self.running_mean = self.params.get(
                "running_mean",
                grad_req="null",
                shape=(channels,),
                init=running_mean_initializer,
                allow_deferred_init=True,
                differentiable=False,
            )
            self.running_var = self.params.get(
                "running_var",
                grad_req="null",
                shape=(channels,),
                init=running_variance_initializer,
                allow_deferred_init=True,
                differentiable=False,
            )
            self.num_batches_tracked = self.params.get(
                "num_batches_tracked",
                grad_req="null",
                shape=(1,),
                init="zeros",
                dtype="int64",
                differentiable=False,
            )
        # Batch Renormalization's states (SPEC.md section 2), after the running statistics
        # in the operator's order (OpSettings.aux_names); attributes, so that Gluon
        # registers them and passes them to hybrid_forward by name.
        self._renorm_states = []
        for name in self._settings.aux_names()[3:]:
            state = self.params.get(
                name,
                grad_req="null",
                shape=(channels,),
                init="zeros" if name == "renorm_mean" else "ones",
                allow_deferred_init=True,
                differentiable=False,
            )
            setattr(self, name, state)
            self._renorm_states.append(state)

    def _sync_extra(self) -> dict[str, Any] | None:
        return None

    @property
    def frozen(self) -> bool:
        """The frozen mode (``SPEC.md`` section 8): normalise with the running statistics
        in training too and never update them. Default False. ``gamma`` and ``beta`` learn
        unless their ``grad_req`` is ``"null"`` (:func:`unorm.mxnet.freeze` sets it);
        hybridize again after changing it inside a hybridized parent.

        Example:
            >>> import mxnet as mx
            >>> from mxnet import autograd
            >>> layer = BatchNorm(2)
            >>> layer.initialize()
            >>> layer.frozen = True
            >>> with autograd.train_mode():
            ...     _ = layer(mx.nd.array([[0.0, 1.0], [2.0, 3.0]]))
            >>> layer.running_mean.data().asnumpy().tolist()
            [0.0, 0.0]
        """
        return self._settings.frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"frozen must be True or False, got {value!r}")
        if value and not self.spec.track_running_stats:
            raise ValueError(
                "frozen needs running statistics: this BatchNorm has track_running_stats=False"
            )
        self._settings = dataclasses.replace(self._settings, frozen=value)
        internals.clear_cached_graph(self)  # the operator's settings are in the cached graph

    def _channels(self) -> int:
        """The channel count, 0 while deferred initialisation has not inferred it (Gluon
        writes an unknown size as 0, or as -1 under NumPy shape semantics)."""
        shape = self.gamma.shape
        return max(int(shape[0]), 0) if shape else 0

    def _check(self, x: NDArray) -> None:
        """Validate an NDArray input (``SPEC.md`` section 2, *Errors*); raises before any
        state changes."""
        shape = tuple(x.shape)
        if self._num_dims is not None and len(shape) != self._num_dims:
            raise ValueError(
                f"input must have rank {self._num_dims} (num_dims={self._num_dims}), "
                f"got shape {shape}"
            )
        if len(shape) < 2:
            raise ValueError(
                f"input must have rank >= 2 (a batch axis and a feature axis), got shape {shape}"
            )
        dtype = np.dtype(x.dtype)
        error = dtype_error(dtype)
        if error is not None:
            raise error
        axis = normalize_axis(self.spec.axis, len(shape))
        channels = shape[axis]
        expected = self._channels()
        if expected and channels != expected:
            raise ValueError(
                f"input must have {expected} features on axis {self.spec.axis}, "
                f"got shape {shape} with {channels}"
            )
        wanted = np.dtype(np.float64 if dtype == np.float64 else np.float32)
        if np.dtype(self.gamma.dtype) != wanted:
            raise ValueError(
                f"input of dtype {dtype.name} needs parameters of dtype {wanted.name}, "
                f"got {np.dtype(self.gamma.dtype).name}; call .cast({wanted.name!r}) on the layer"
            )
        training = autograd.is_training() and not self.frozen
        batch_stats = training or not self.spec.track_running_stats
        size = self.spec.virtual_batch_size
        if training and size is not None:
            error = ghost_error(shape, self.spec.axis, size, self.spec.allow_single_value)
            if error is not None:
                raise error
        if batch_stats and self._sync_extra() is None:
            count = int(np.prod(shape, dtype=np.int64)) // channels if channels else 0
            error = count_error(count, self.spec.allow_single_value)
            if error is not None:
                raise error

    def forward(self, x: Any, *args: Any) -> Any:
        """Normalise ``x`` (an NDArray, or a Symbol inside a hybridized parent).

        An NDArray in inference mode with nothing recorded for autograd runs MXNet's own
        kernel with the running statistics: the same formula as the operator's inference
        pass, without the layout conversions its backward pass needs (see
        :meth:`hybrid_forward`), hybridized or not.
        """
        if isinstance(x, mx.nd.NDArray):
            self._check(x)
            if self._kernel_inference_applies(x):
                return self._kernel_inference(x)
        return super().forward(x, *args)

    def _kernel_inference_applies(self, x: NDArray) -> bool:
        """Inference with running statistics, no gradient recorded, parameters ready and
        of the input's dtype (float16 input goes through the operator, which computes in
        float32)."""
        if not self.spec.track_running_stats or (autograd.is_training() and not self.frozen):
            return False
        if autograd.is_recording() or not self._channels():  # deferred initialisation
            return False
        if self._active and not self._cached_graph:
            # A hybridized block builds its graph on its first call; export() needs it.
            return False
        return bool(np.dtype(x.dtype) == np.dtype(self.gamma.dtype))

    def _kernel_inference(self, x: NDArray) -> NDArray:
        assert self.running_mean is not None and self.running_var is not None  # tracked
        ctx, spec = x.context, self.spec
        gamma, beta = affine_params(
            self.gamma.data(ctx),
            self.beta.data(ctx),
            scale=spec.scale,
            center=spec.center,
            dtype=np.dtype(self.gamma.dtype),
            ctx=ctx,
        )
        # The operator's (P, C, Q) view and kernel, so that the numbers are bit for bit
        # those of the operator's inference pass (MKL-DNN's 4-d kernel rounds otherwise).
        view = layout(tuple(x.shape), normalize_axis(self.spec.axis, x.ndim))
        y = affine(
            x.reshape(view),
            self.running_mean.data(ctx),
            self.running_var.data(ctx),
            gamma,
            beta,
            eps=self.spec.eps,
            axis=1,
        )
        return y.reshape(x.shape)

    def hybrid_forward(
        self,
        F: Any,
        x: Any,
        gamma: Any,
        beta: Any,
        running_mean: Any = None,
        running_var: Any = None,
        num_batches_tracked: Any = None,
        **renorm_states: Any,
    ) -> Any:
        """The graph: one ``unorm_batchnorm`` operator (see :mod:`unorm._mxnet.op`), and
        with ``update_on="backward"`` the node that orders its update (:meth:`_order`).
        ``renorm_states``: Batch Renormalization's (``renorm_mean``, ``renorm_std``,
        ``running_std``), passed by Gluon by name."""
        names = self._settings.aux_names()
        states = [running_mean, running_var, num_batches_tracked][: len(names)]
        states += [renorm_states[name] for name in names[3:]]
        settings = self._settings
        args = [gamma, beta]
        if self._orders_update(F):
            settings = dataclasses.replace(settings, ordered=True)
            args.append(self._order(F, x, gamma, beta, running_mean, running_var))
        # Arrays produced by MKL-DNN kernels (a convolution's output, the gradient from
        # the next layer) may be held in a blocked layout, which MXNet 1.9 does not convert
        # for a CustomOp: the operator would read garbage. Ordinary operators that keep
        # the values get the layout converted by MXNet (and run in place when there is
        # nothing to convert): called imperatively, a reshape before the operator for its
        # input and after it for the gradient; in a graph, an expand_dims/squeeze pair on
        # both sides (the executor skips a reshape's backward, and MKL-DNN's reshape fails
        # on an empty array, which the graph must accept under NumPy shape semantics).
        # An empty NDArray has no layout to convert and skips the reshapes.
        attrs = settings.attrs()
        if F is mx.nd:
            if not x.size:
                return F.Custom(x, *args, *states, op_type=OP_TYPE, name="fwd", **attrs)[0]
            data = F.reshape(x, shape=(-2,))
            outputs = F.Custom(data, *args, *states, op_type=OP_TYPE, name="fwd", **attrs)
            return F.reshape(outputs[0], shape=(-2,))
        data = F.squeeze(F.expand_dims(x, axis=0), axis=0)
        outputs = F.Custom(data, *args, *states, op_type=OP_TYPE, name="fwd", **attrs)
        return F.squeeze(F.expand_dims(outputs[0], axis=0), axis=0)

    def _orders_update(self, F: Any) -> bool:
        """Whether this call needs :meth:`_order`: running statistics updated in backward,
        and, called on NDArrays, a recorded training call (only that one runs a backward
        pass that updates). A graph serves every mode, so it always has the node."""
        if self.spec.update_on != "backward" or not self.spec.track_running_stats:
            return False
        return F is not mx.nd or (autograd.is_recording() and autograd.is_training())

    def _order(self, F: Any, x: Any, gamma: Any, beta: Any, mean: Any, var: Any) -> Any:
        """Zeros of shape ``(1, C)`` from a native ``BatchNorm`` node on the running
        statistics, for the operator's ``order`` argument.

        The operator applies an ``update_on="backward"`` update in its backward pass, which
        MXNet 1.9 does not register as a writer of the auxiliary states (``_backward_Custom``
        has no ``FMutateInputs``): a read right after ``backward()`` would not wait for it
        and could see the previous values. Native ``_backward_BatchNorm`` is registered as
        the writer of its moving statistics (apache/mxnet#18644). With
        ``use_global_stats=True`` it changes nothing in them, but as this node feeds the
        operator, its backward pass runs after the operator's and every later read waits
        for it. Its input is zeros whose gradient reaches a trainable ``gamma``/``beta``
        (or ``x`` when neither is, at the price of an input-sized gradient), so that the
        backward pass includes the node; ``where`` keeps it zero (and its gradient zero)
        whatever the values. Which of them is decided when the graph is traced: after
        freezing both ``gamma`` and ``beta`` of a hybridized layer, call ``hybridize()``
        again to trace anew.
        """
        zeros = F.zeros_like(gamma)
        links = [p for p, q in ((gamma, self.gamma), (beta, self.beta)) if q.grad_req != "null"]
        if links:
            tied = F.add_n(*[F.where(zeros, link, zeros) for link in links])
        else:
            total = F.reshape(F.sum(x), shape=(1,))
            tied = F.broadcast_add(zeros, F.where(F.zeros_like(total), total, F.zeros_like(total)))
        return F.BatchNorm(
            F.reshape(tied, shape=(1, -1)),
            F.ones_like(gamma),
            zeros,
            mean,
            var,
            eps=self.spec.eps,
            use_global_stats=True,
            fix_gamma=False,
            axis=1,
            name="order",
        )

    def cast(self, dtype: Any) -> None:
        """Cast parameters and running statistics (float16 becomes float32, as in Gluon);
        ``num_batches_tracked`` stays int64."""
        if np.dtype(dtype).name == "float16":
            dtype = "float32"
        internals.clear_cached_graph(self)
        for param in (self.gamma, self.beta, self.running_mean, self.running_var):
            if param is not None:
                param.cast(dtype)
        for param in self._renorm_states:
            if param is not None:
                param.cast(dtype)

    def __repr__(self) -> str:
        spec = self.spec
        channels = self._channels()
        return (
            f"{type(self).__name__}(in_channels={channels or None}, axis={spec.axis}, "
            f"eps={spec.eps!r}, momentum={spec.momentum!r}, center={spec.center}, "
            f"scale={spec.scale}, preset={spec.preset!r})"
        )


class SyncBatchNorm(BatchNorm):
    """Cross-device BatchNorm: every device normalises with the statistics of the whole batch.

    ``SyncBatchNorm(in_channels=0, num_dims=None, *, num_devices, timeout=120.0,
    **BatchNorm arguments)``. Use it like any layer in Gluon data parallelism, calling the
    model once on each of ``num_devices`` devices per step (``[net(x) for x in
    gluon.utils.split_and_load(batch, ctxs, even_split=False)]``). Each device computes
    ``(n, mean, M2)`` of its slice; they are merged exactly (Chan et al. 1979, SPEC.md
    section 3), so uneven slices give the single-device result. Gluon's
    ``contrib.nn.SyncBatchNorm`` averages the per-device moments with equal weights, which
    is wrong for uneven slices. The backward pass all-reduces ``sum(dy)`` and
    ``sum(dy * xhat)``; ``gamma``/``beta`` gradients stay per device and are summed by the
    Trainer's all-reduce like every other parameter. Every device updates its copy of the
    running statistics with the merged statistics. Any feature ``axis`` works. A device
    shard is empty only under NumPy shape semantics (without them MXNet 1.x reads a 0
    dimension as "unknown", and ``split_and_load`` refuses more devices than rows); such a
    shard contributes nothing, and when every shard is empty the call is an empty batch
    (see :class:`BatchNorm`), the same on every device.

    The devices meet inside MXNet's CustomOp worker threads: issue every device's call
    before waiting on any result (as data-parallel loops do) and run backward on all
    devices. A device that does not arrive within ``timeout`` seconds makes the others fail
    (MXNet then raises its own error and prints the reason). The one-value check uses the
    total count over devices, so it too is reported by MXNet when the output is read.

    Several ``cpu(i)`` contexts: MXNet gives all CPU contexts one pool of
    ``MXNET_CPU_TEMP_COPY`` workspaces (default 4). Operators queued after the layer on one
    device can hold every workspace while they wait for it, and the operators another
    device needs to reach the layer then wait for them: the step deadlocks until the
    timeout, whose message then names the variable. Set ``MXNET_CPU_TEMP_COPY=64`` in the
    environment before MXNet runs its first operator. GPU contexts have a pool each.

    Example:
        >>> layer = SyncBatchNorm(4, num_devices=2)
        >>> layer.spec.momentum
        0.1
    """

    def __init__(
        self,
        in_channels: int = 0,
        num_dims: int | None = None,
        *,
        num_devices: int,
        timeout: float = 120.0,
        **kwargs: Any,
    ) -> None:
        self._num_devices = _check_count_arg("num_devices", num_devices, 1)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self._timeout = float(timeout)
        self._key = uuid.uuid4().hex
        super().__init__(in_channels, num_dims, **kwargs)
        if self.spec.virtual_batch_size is not None:
            raise ValueError(
                "virtual_batch_size must be None for SyncBatchNorm (ghost batches are per "
                f"device, not merged), got {self.spec.virtual_batch_size}"
            )

    def _sync_extra(self) -> dict[str, Any] | None:
        return {"sync_key": self._key, "num_devices": self._num_devices, "timeout": self._timeout}
