"""``unorm.keras.BatchNorm``: BatchNorm for Keras 3 following ``SPEC.md``.

Written with ``keras.ops``. On TensorFlow the heavy work is the same two ops Keras's own
layer uses (``ops.moments``, there a two-pass mean and mean squared deviation, and
``ops.batch_normalization``), so ``preset="keras"`` gives Keras's numbers bit for bit. The
other settings add one elementwise pass in training, the per-feature shift that keeps
float32 statistics accurate at a large mean (:func:`.stats.shift_by_first`); the spec's
other differences (the unbiased feed, the non-finite guard, the cumulative average) are
done on per-channel tensors. The statistics themselves live in :mod:`.stats`, the
cross-replica ones in :mod:`.sync`.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from .._core.renorm import clip_correction
from .._core.settings import BatchNormSettings
from ..spec import UNSET, BatchNormSpec, Unset, given, normalize_axis
from . import stats

__all__ = ["BatchNorm"]


def _count_message(count: object, shape: object) -> str:
    return (
        "expected more than 1 value per channel to compute batch statistics (training, or "
        f"track_running_stats=False), got {count} (batch size x spatial size) for inputs of "
        f"shape {shape}; use a larger batch, inference mode with running statistics, or "
        "allow_single_value=True"
    )


def _uncounted_zeros(count: Any, floor: float) -> Any:
    """A per-feature ``count`` with its zeros raised above ``floor``: under
    ``fully_masked="zero"`` a feature of no kept value is taken (mean 0, variance 0), so
    only the features that keep some values are held to the floor."""
    return ops.where(ops.equal(count, 0), ops.cast(floor + 1, count.dtype), count)


def _concrete_int(value: Any) -> int | None:
    """``value`` as a Python int where it is concrete (an eager tensor), None where it is
    only known when a graph runs (a ``tf.function`` or a JAX trace)."""
    try:
        return int(value)
    except TypeError:  # TensorFlow's graph tensors and JAX tracers raise TypeErrors here
        return None


def _tensorflow_backend() -> bool:
    return stats.tensorflow_backend()


def _no_gradient_where(empty: Any, *params: Any) -> tuple[Any, ...]:
    """``params`` (None stays None) as they are, but passing no gradient where the bool
    tensor ``empty`` holds: an empty batch's ``gamma``/``beta`` gradients are then 0, not
    the NaN that the statistics of no values would make of them. ``empty`` None: as given."""
    if empty is None:
        return params
    return tuple(None if p is None else ops.where(empty, ops.stop_gradient(p), p) for p in params)


def _either(empty: Any, when_empty: bool, otherwise: Any) -> Any:
    """A condition that is ``when_empty`` where the bool tensor ``empty`` holds and
    ``otherwise`` elsewhere (None: always true); None where it is always true."""
    if when_empty:
        return None if otherwise is None else ops.logical_or(empty, otherwise)
    nonempty = ops.logical_not(empty)
    return nonempty if otherwise is None else ops.logical_and(nonempty, otherwise)


@keras.saving.register_keras_serializable(package="unorm")
class BatchNorm(BatchNormSettings, keras.layers.Layer):
    """Batch Normalisation with one meaning on every backend (``SPEC.md`` section 2).

    A drop-in for ``keras.layers.BatchNormalization``: the same weights under the same
    names (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``), so
    ``set_weights``/``get_weights`` and checkpoints carry over; with ``momentum=None``
    there is one more, the integer ``num_batches_tracked`` the cumulative average needs.

    Every setting means what ``SPEC.md`` says, on every unorm backend. In particular
    ``momentum`` is the weight of the **new** batch statistic (canonical 0.1), not Keras's
    weight of the old value (0.99): ``preset="keras"`` reproduces
    ``keras.layers.BatchNormalization()`` exactly (on the TensorFlow backend outputs,
    gradients and moving statistics bit for bit). An argument left out takes the preset's
    value (canonical when ``preset=None``). A Keras ``mask`` leaves masked positions out of
    the batch statistics, as in Keras's layer.

    Args:
        axis: the feature axis (default -1, channels-last as in Keras).
        eps: added to the variance inside the square root (canonical 1e-5; Keras 1e-3).
        momentum: weight of the new batch statistic (canonical 0.1); None gives the
            cumulative average over all batches seen.
        center: learn the offset ``beta`` (default True).
        scale: learn the scale ``gamma`` (default True).
        track_running_stats: keep moving statistics and use them in inference; when
            False, batch statistics are used in training and inference (default True).
        running_var: ``"unbiased"`` (canonical, ``n/(n-1)`` times the batch variance) or
            ``"biased"`` (Keras) fed to the moving variance.
        skip_nonfinite: a batch whose statistics are not all finite updates no moving
            statistic (default True; False in the native presets).
        allow_single_value: accept training with one value per feature (default False;
            True in the ``keras`` and ``mxnet`` presets).
        update_on: ``"forward"`` (default), or ``"backward"`` (the ``mxnet`` preset:
            moving statistics change only when a gradient flows back through the output;
            TensorFlow backend only).
        empty_batch: what a training batch of zero values per feature (no samples, or a
            spatial size of 0) does to the moving statistics; its output is empty and its
            ``gamma``/``beta`` gradients are 0 either way: ``"skip"`` (canonical) nothing,
            ``"count"`` (``"torch"``) only counts it in ``num_batches_tracked``, ``"nan"``
            (``"keras"``, ``"mxnet"``) feeds the NaN statistics of no values, as Keras's
            layer does (``SPEC.md`` section 2, *Empty batch*).
        preset: None (canonical), ``"keras"``, ``"torch"`` or ``"mxnet"``
            (``SPEC.md`` section 4).
        synchronized: compute the batch statistics over the global batch, merged
            exactly, so uneven or empty per-replica batches give the single-device
            result (``SPEC.md`` section 3). TensorFlow: under a ``tf.distribute``
            strategy with several replicas (``MirroredStrategy``,
            ``MultiWorkerMirroredStrategy``); with a mask, over the values the mask keeps
            on every replica (Keras's own layer computes masked statistics per replica).
            JAX: under ``keras.distribution`` (e.g. ``DataParallel``) or ``jax.jit`` over
            sharded arrays, where the layer computes on the global batch; shards have
            equal shapes there, so an uneven split is written as padded shards with a
            ``mask`` that is False on the padding (and a loss weight of 0 there); refused
            inside ``jax.shard_map``/``jax.pmap``, which see one device's shard. Refused
            on the torch backend, which has no distribution of its own (Keras's layer
            synchronizes on TensorFlow only, keras-team/keras#18667).
        renorm: Batch Renormalization (Ioffe 2017, arXiv 1702.03275; ``SPEC.md`` section
            2, *Batch Renormalization*): training corrects the normalised batch by ``r``
            and ``d`` (constants to the gradient) from the renorm statistics, weights
            ``renorm_mean`` and ``renorm_stddev``. Default False; needs
            ``track_running_stats``.
        renorm_clipping: Keras's dictionary of bounds, keys ``"rmax"``, ``"rmin"``,
            ``"dmax"``, each optional (``r`` clipped to ``[rmin, rmax]``, ``d`` to
            ``[-dmax, dmax]``); default none.
        renorm_momentum: weight of the new batch statistic in the renorm statistics
            (canonical 0.01; Keras's ``renorm_momentum=0.99`` weighs the old value, so
            ``preset="keras"`` has ``1 - 0.99``).
        renorm_running: ``"variance"`` (canonical: the moving variance as without renorm)
            or ``"stddev"`` (``preset="keras"``: a ``moving_stddev`` weight from which the
            moving variance is derived, as Keras's layer keeps it).
        virtual_batch_size: ghost batches (``SPEC.md`` section 2, *Ghost batches*), which
            Keras 3 dropped: in training each group of this many consecutive samples (the
            last one holds the remainder) is normalised with its own statistics, also
            where the batch size is only known when the graph runs (the batch is padded
            to whole groups, the padding left out of every statistic); inference is never
            grouped. Default None; an integer >= 2, at most the batch size (checked where
            the batch size is known when the layer is called). Not with a mask or
            ``synchronized=True``.
        ghost_running: ``"batch"`` (default: the moving statistics are fed the exact merge
            of the groups, the batch's own statistics) or ``"groups"`` (the mean of the
            groups' means and variances, as tf.keras 2's ``virtual_batch_size`` fed them).
        frozen: the frozen mode (``SPEC.md`` section 8): normalise with the moving
            statistics also under ``training=True`` and never update them, while gamma
            and beta keep learning (default False; ``trainable=False`` freezes them too,
            Keras's convention). Needs ``track_running_stats``.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer, beta_regularizer, gamma_regularizer,
        beta_constraint, gamma_constraint: as in ``keras.layers.BatchNormalization``.
        **kwargs: base layer arguments (``name``, ``dtype``, ``trainable``).

    Precision: statistics are computed in float32 or wider (two-pass: the mean, then the
    mean squared deviation from it); under ``mixed_float16``/``mixed_bfloat16`` the
    weights stay float32 and the output has the compute dtype.

    Speed: on TensorFlow, with float32 statistics and features last (no mask, one
    replica, any preset but ``"keras"``), training runs TensorFlow's fused BatchNorm
    kernel, forward and backward, on the input less its batch mean: half the time of
    Keras's own layer, which composes a dozen passes over the input
    (``benchmarks/bench_keras.py``). Inference runs the same kernel in inference mode,
    as fast as the composed form and, subtracting the mean before scaling, accurate at
    a running mean far above the spread. Other cases compose ``keras.ops``.

    ``trainable=False`` follows the Keras convention for BatchNormalization: a frozen
    layer runs in inference mode, also when called with ``training=True`` (inside
    ``fit``), using and never updating its moving statistics. (With
    ``track_running_stats=False`` there are none; batch statistics are used.)

    Empty batch: a batch of no values per feature (no samples, or a spatial size of 0;
    under ``synchronized=True``, every replica's shard empty) is not an error: its output
    is empty, its ``gamma``/``beta`` gradients are 0, and ``empty_batch`` says what it does
    to the state, eagerly, in a ``tf.function`` and under XLA alike.

    Errors: a bad setting or input raises ``ValueError`` naming it (``inputs`` of rank
    other than the built one, of another feature count, or of an integer dtype; training
    on one value per feature unless allowed, also where a mask keeps one or none of a
    nonempty batch), before any weight is touched. Where the count is only known when the
    graph runs (a ``tf.function`` traced with a ``None`` batch axis or given a mask, or a
    synchronized global batch), that last check is a TensorFlow assertion instead; and
    where no check can fail the call (XLA drops assertions; a JAX-traced function), such a
    batch leaves the moving statistics unchanged. ``preset="keras"`` takes a mask that
    keeps nothing of a feature as Keras's layer does: with Keras's masked arithmetic (sums
    over ``count + 1e-7``), that feature's mean and variance are 0 and are fed as such.

    Example:
        >>> import numpy as np
        >>> bn = BatchNorm()
        >>> x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
        >>> y = bn(x, training=True)
        >>> tuple(y.shape), bn.momentum, bn.eps
        ((8, 3), 0.1, 1e-05)
        >>> BatchNorm(preset="keras").momentum  # Keras's momentum=0.99, as a new-value weight
        0.010000000000000009
    """

    def __init__(
        self,
        axis: int = -1,
        *,
        eps: float | Unset = UNSET,
        momentum: float | Unset | None = UNSET,
        center: bool | Unset = UNSET,
        scale: bool | Unset = UNSET,
        track_running_stats: bool | Unset = UNSET,
        running_var: str | Unset = UNSET,
        skip_nonfinite: bool | Unset = UNSET,
        allow_single_value: bool | Unset = UNSET,
        update_on: str | Unset = UNSET,
        empty_batch: str | Unset = UNSET,
        fully_masked: str | Unset = UNSET,
        renorm: bool | Unset = UNSET,
        renorm_clipping: Any = UNSET,
        renorm_momentum: float | Unset = UNSET,
        renorm_running: str | Unset = UNSET,
        virtual_batch_size: int | Unset | None = UNSET,
        ghost_running: str | Unset = UNSET,
        preset: str | None = None,
        synchronized: bool = False,
        frozen: bool = False,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = BatchNormSpec.from_preset(
            preset,
            axis=axis,
            **given(
                eps=eps,
                momentum=momentum,
                center=center,
                scale=scale,
                track_running_stats=track_running_stats,
                running_var=running_var,
                skip_nonfinite=skip_nonfinite,
                allow_single_value=allow_single_value,
                update_on=update_on,
                empty_batch=empty_batch,
                fully_masked=fully_masked,
                renorm=renorm,
                renorm_momentum=renorm_momentum,
                renorm_running=renorm_running,
                virtual_batch_size=virtual_batch_size,
                ghost_running=ghost_running,
            ),
            **(
                {} if renorm_clipping is UNSET else BatchNormSpec.clipping_settings(renorm_clipping)
            ),
        )
        if not isinstance(synchronized, bool):
            raise ValueError(f"synchronized must be True or False, got {synchronized!r}")
        if synchronized:
            from .sync import unsupported_backend

            refused = unsupported_backend()
            if refused is not None:
                raise ValueError(refused)
        if self.spec.update_on == "backward" and not _tensorflow_backend():
            raise ValueError(
                "update_on must be 'forward' with the "
                f"{keras.backend.backend()!r} backend, got 'backward' (it needs TensorFlow)"
            )
        if synchronized and self.spec.virtual_batch_size is not None:
            raise ValueError(
                "virtual_batch_size must be None with synchronized=True (ghost batches are "
                f"per replica, not merged), got {self.spec.virtual_batch_size}"
            )
        if not isinstance(frozen, bool):
            raise ValueError(f"frozen must be True or False, got {frozen!r}")
        if frozen and not self.spec.track_running_stats:
            raise ValueError(
                "frozen needs running statistics: this BatchNorm has track_running_stats=False"
            )
        self.synchronized = synchronized
        # SPEC.md section 8, *Frozen mode*: the moving statistics always, never updated,
        # while gamma and beta may still learn (trainable=False also fixes them).
        self.frozen = frozen
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.supports_masking = True
        self.gamma: Any = None
        self.beta: Any = None
        self.moving_mean: Any = None
        self.moving_variance: Any = None
        self.num_batches_tracked: Any = None
        #: Set by :func:`unorm.keras.accumulate`: the current step's micro-batches.
        self.accumulation: Any = None
        self.moving_stddev: Any = None
        self.renorm_mean: Any = None
        self.renorm_stddev: Any = None
        self._rank = 0
        self._channels = 0
        self._reduce_axes: list[int] = []

    # -- the settings, read through the spec so that they cannot drift apart ----------

    # -- weights ---------------------------------------------------------------------

    def build(self, input_shape: Any) -> None:
        """Create the weights for inputs of ``input_shape`` (rank >= 2, known features)."""
        shape = tuple(input_shape)
        if len(shape) < 2:
            raise ValueError(
                f"inputs must have rank >= 2 (a batch axis and a feature axis), got shape {shape}"
            )
        axis = normalize_axis(self.spec.axis, len(shape))
        channels = shape[axis]
        if channels is None:
            raise ValueError(
                f"inputs must have a known number of features on axis {self.spec.axis}, "
                f"got shape {shape}"
            )
        self._rank = len(shape)
        self._channels = int(channels)
        self._reduce_axes = [i for i in range(len(shape)) if i != axis]
        per_channel = (self._channels,)
        # SPEC.md section 2, *Numerics and dtypes*: parameters and statistics stay float32
        # for 16-bit inputs, also under a plain float16/bfloat16 policy (whose variables
        # Keras's own layer keeps in 16 bits, where a moving variance can overflow to inf).
        weight_dtype = None
        if keras.backend.standardize_dtype(self.variable_dtype) in ("float16", "bfloat16"):
            weight_dtype = "float32"
        if self.spec.scale:
            self.gamma = self.add_weight(
                shape=per_channel,
                name="gamma",
                dtype=weight_dtype,
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.spec.center:
            self.beta = self.add_weight(
                shape=per_channel,
                name="beta",
                dtype=weight_dtype,
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        if self.spec.track_running_stats:
            self.moving_mean = self.add_weight(
                shape=per_channel,
                name="moving_mean",
                dtype=weight_dtype,
                initializer=self.moving_mean_initializer,
                trainable=False,
                autocast=False,
            )
            self.moving_variance = self.add_weight(
                shape=per_channel,
                name="moving_variance",
                dtype=weight_dtype,
                initializer=self.moving_variance_initializer,
                trainable=False,
                autocast=False,
            )
            if self.spec.momentum is None:
                self.num_batches_tracked = self.add_weight(
                    shape=(),
                    name="num_batches_tracked",
                    initializer="zeros",
                    dtype="int64" if _tensorflow_backend() else "int32",
                    trainable=False,
                    autocast=False,
                )
            if self.spec.renorm:
                self._build_renorm(per_channel, weight_dtype)

    def _build_renorm(self, shape: tuple[int, ...], dtype: Any) -> None:
        """Batch Renormalization's weights, named and ordered as in Keras's layer
        (``moving_stddev`` only with ``renorm_running="stddev"``); a standard deviation
        starts at the square root of the moving variance's initial value, as there."""
        variance_initializer = self.moving_variance_initializer

        def stddev_initializer(shape: Any, dtype: Any = None) -> Any:
            return ops.sqrt(variance_initializer(shape, dtype=dtype))

        def add(name: str, initializer: Any) -> Any:
            return self.add_weight(
                shape=shape,
                name=name,
                dtype=dtype,
                initializer=initializer,
                trainable=False,
                autocast=False,
            )

        if self.spec.renorm_running == "stddev":
            self.moving_stddev = add("moving_stddev", stddev_initializer)
        self.renorm_mean = add("renorm_mean", self.moving_mean_initializer)
        self.renorm_stddev = add("renorm_stddev", stddev_initializer)

    def compute_output_shape(self, input_shape: Any) -> Any:
        """The output has the input's shape."""
        return input_shape

    # -- forward ---------------------------------------------------------------------

    def _check_inputs(self, inputs: Any) -> None:
        """Validate ``inputs`` against the built layer, before any state is touched."""
        shape = tuple(inputs.shape)
        if len(shape) != self._rank:
            raise ValueError(
                f"inputs must have rank {self._rank} (the rank this layer was built for), "
                f"got shape {shape}"
            )
        if not keras.backend.is_float_dtype(inputs.dtype):
            dtype = keras.backend.standardize_dtype(inputs.dtype)
            raise ValueError(f"inputs must have a floating-point dtype, got {dtype}")
        axis = normalize_axis(self.spec.axis, self._rank)
        if shape[axis] is not None and shape[axis] != self._channels:
            raise ValueError(
                f"inputs must have {self._channels} features on axis {self.spec.axis} "
                f"(the feature count this layer was built for), got shape {shape}"
            )

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        """Normalise ``inputs``: batch statistics in training (updating the moving ones),
        moving statistics in inference, per ``SPEC.md``.

        ``mask`` (Keras masking, shape ``inputs.shape[:-1]``) leaves masked positions out
        of the batch statistics, as in Keras's layer; ``n`` is then the number of
        unmasked values per feature. A batch of no values (``SPEC.md`` section 2, *Empty
        batch*) gives an empty output and changes the state as ``empty_batch`` says.
        """
        self._check_inputs(inputs)
        if mask is not None and len(mask.shape) != self._rank - 1:
            raise ValueError(
                f"mask must have rank {self._rank - 1} (one less than inputs), "
                f"got shape {tuple(mask.shape)}"
            )
        spec = self.spec
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        # Statistics in float32 at least: 16-bit inputs overflow and lose the mean.
        x = ops.cast(inputs, dtype)
        gamma = None if self.gamma is None else ops.cast(self.gamma, dtype)
        beta = None if self.beta is None else ops.cast(self.beta, dtype)
        # Keras convention: a frozen BatchNorm runs in inference mode (trainable=False, or
        # frozen=True with gamma and beta still learning).
        training = bool(training) and self.trainable and not self.frozen
        batch = training or not spec.track_running_stats
        # fully_masked="zero" (preset="keras") takes a masked batch whatever the mask keeps,
        # with empty_batch="nan" an empty one too (SPEC.md section 2, *Masked batches*).
        zero_masked = batch and mask is not None and spec.fully_masked == "zero"
        if self._static_empty(x, batch, zero_masked):
            return self._empty_batch(x, gamma, beta, training)
        if training and spec.virtual_batch_size is not None:
            return ops.cast(self._ghost_call(x, gamma, beta, mask), self.compute_dtype)
        shift = None
        y = None
        empty = None  # a bool tensor where the batch may be empty, known only when it runs
        if batch and self._fusable(x, mask):
            y, mean, variance, count, empty = self._fused_statistics(x, gamma, beta)
        elif batch:
            if spec.preset != "keras" and not self._replicated():
                # Shifting each feature by one of its own values keeps float32 statistics
                # and x - mean accurate at a large mean against the spread (SPEC.md section
                # 2, numerics): Keras's own arithmetic, kept by preset="keras", loses ~1e-2 at
                # mean 1e4, std 1. Any per-feature constant is exact; one pass over x.
                # With a mask, a kept value: masked padding may be far from the data.
                if mask is None:
                    x, shift = stats.shift_by_first(x, self._reduce_axes)
                else:
                    axis = normalize_axis(spec.axis, self._rank)
                    x, shift = stats.shift_by_first_unmasked(x, mask, axis)
            mean, variance, count, empty = self._batch_moments(x, mask)
            gamma, beta = _no_gradient_where(empty, gamma, beta)
            if training and spec.renorm:
                true_mean = mean if shift is None else mean + shift
                gamma, beta = self._renorm_transform(true_mean, variance, gamma, beta, dtype)
        else:
            mean = ops.cast(self.moving_mean, dtype)
            variance = ops.cast(self.moving_variance, dtype)
            size = stats.count(x, self._reduce_axes)
            if not isinstance(size, int):
                # Maybe empty: zero gamma/beta gradients, also from NaN moving statistics.
                gamma, beta = _no_gradient_where(ops.equal(size, 0), gamma, beta)
            if self._fusable(x, None, batch_statistics=False):
                from .tf_runtime import fused_batch_norm_inference

                y = fused_batch_norm_inference(x, gamma, beta, mean, variance, spec.eps)
        if y is None:
            y = ops.batch_normalization(
                x, mean, variance, axis=spec.axis, offset=beta, scale=gamma, epsilon=spec.eps
            )
        if shift is not None:
            mean = mean + shift  # the running mean is of the unshifted input
        if training and spec.track_running_stats:

            def update() -> None:
                if self.accumulation is not None:  # unorm.keras.accumulate: record only
                    self.accumulation.record(mean, variance, count)
                else:
                    self._update(mean, variance, count, empty, zero_masked)

            if spec.update_on == "backward":
                from .tf_runtime import update_on_backward

                y = update_on_backward(y, update)
            else:
                update()
        return ops.cast(y, self.compute_dtype)

    # -- an empty batch (SPEC.md section 2, *Empty batch*) ----------------------------

    def _static_empty(self, x: Any, batch: bool, zero_masked: bool) -> bool:
        """Whether ``x`` is known, from its static shape, to hold no value per feature
        (no samples, or a spatial size of 0), and is handled as an empty batch, in any
        mode (``batch``: normalised with batch statistics).

        Not for batch statistics across replicas (another replica may hold values), and
        not for a masked batch under ``fully_masked="zero"`` (``zero_masked``) and
        ``empty_batch="nan"``, which feeds the statistics of no kept value, 0 and 0, as
        Keras's masked arithmetic does. A shape known only when the graph runs takes the
        guarded branch of :meth:`_update` instead."""
        size = stats.count(x, self._reduce_axes)
        if not isinstance(size, int) or size != 0 or (batch and self._replicated()):
            return False
        return not (zero_masked and self.spec.empty_batch == "nan")

    def _empty_batch(self, x: Any, gamma: Any, beta: Any, training: bool) -> Any:
        """The output of an empty batch, ``x * gamma + beta`` (empty, so ``dx`` is empty
        and the ``gamma``/``beta`` gradients are the sums over nothing, 0), and its effect
        on the state in training, as ``empty_batch`` says."""
        axis = normalize_axis(self.spec.axis, self._rank)
        broadcast = [1] * self._rank
        broadcast[axis] = self._channels
        y = x
        if gamma is not None:
            y = y * ops.reshape(gamma, broadcast)
        if beta is not None:
            y = y + ops.reshape(beta, broadcast)
        if training and self.spec.track_running_stats:
            if self.spec.update_on == "backward":
                from .tf_runtime import update_on_backward

                y = update_on_backward(y, self._update_empty)
            else:
                self._update_empty()
        return ops.cast(y, self.compute_dtype)

    def _update_empty(self) -> None:
        """``empty_batch`` applied to the state: ``"skip"`` nothing, ``"count"`` one more
        batch tracked, ``"nan"`` the NaN statistics of no values folded in like any
        batch's (which the non-finite guard skips)."""
        spec = self.spec
        tracked = self.num_batches_tracked
        if spec.empty_batch == "count":
            if tracked is not None:
                tracked.assign(tracked + 1)
        elif spec.empty_batch == "nan" and not spec.skip_nonfinite:
            nothing = ops.full((self._channels,), float("nan"), dtype=self.moving_mean.dtype)
            self._update(nothing, nothing, 0, None, zero_masked=False)

    # -- batch statistics ------------------------------------------------------------

    def _fusable(self, x: Any, mask: Any, batch_statistics: bool = True) -> bool:
        """Whether the output (and in training the batch statistics) may come from
        TensorFlow's fused kernel: float32, features last, no mask, one replica,
        not Keras's own arithmetic (``preset="keras"`` keeps it bit for bit), and at least
        2 values per feature (the kernel's unbiased variance divides by n - 1), as the
        count check ensures unless one value is allowed."""
        if not _tensorflow_backend() or mask is not None or self.spec.preset == "keras":
            return False
        if keras.backend.standardize_dtype(x.dtype) != "float32" or self._replicated():
            return False
        axis = normalize_axis(self.spec.axis, self._rank)
        if axis != self._rank - 1 or x.shape[axis] is None:
            # Features last (TensorFlow's CPU kernel transposes channels-first input,
            # 1.2-1.7x slower than the composed form), with their count known when traced.
            return False
        if not batch_statistics:
            return True
        if self.spec.renorm and self.trainable and not self.frozen:
            return False  # r and d need the statistics before the output
        count = stats.count(x, self._reduce_axes)
        return not self.spec.allow_single_value or (isinstance(count, int) and count > 1)

    def _fused_statistics(self, x: Any, gamma: Any, beta: Any) -> tuple[Any, ...]:
        """Output, batch mean, biased batch variance, count and the empty flag (see
        :meth:`_checked`) from TensorFlow's fused kernel (see :meth:`_fusable`), run on
        ``x`` less its mean.

        The mean is a separate float32 reduction (the one ``tf.nn.moments`` makes), which
        is also the running mean's source: the fused kernel sums in a fixed order that
        loses a few more digits of the mean (1e-6 of the spread at 4096 values per
        feature), and on oneDNN builds its variance is ``E[x^2] - E[x]^2``, harmless on
        centred input but not at a mean of 1e4 against a spread of 1. Subtracting the
        mean is a constant to autodiff: the kernel's own gradient is the layer's. A batch
        size known only when the graph runs may be 0: ``gamma`` and ``beta`` then reach
        the kernel as constants (under XLA its ``gamma`` gradient over nothing is NaN), so
        their gradients are 0.
        """
        from .tf_runtime import fused_batch_norm_train

        count = stats.count(x, self._reduce_axes)
        empty = self._empty_flag(count, zero_masked=False)
        if isinstance(count, int):  # refused before the kernel sees the batch
            self._checked(count, count, empty, x.shape, None, None, masked=False)
        gamma, beta = _no_gradient_where(empty, gamma, beta)
        mean = ops.stop_gradient(ops.mean(x, axis=self._reduce_axes, keepdims=True))
        y, _, variance = fused_batch_norm_train(x - mean, gamma, beta, self.spec.eps)
        mean, variance = self._checked(
            count, count, empty, x.shape, ops.reshape(mean, (-1,)), variance, masked=False
        )
        return y, mean, variance, count, empty

    def _replicated(self) -> bool:
        """Whether the batch statistics are merged across replicas (whose shifts would
        differ, so they are not shifted)."""
        if not self.synchronized:
            return False
        from .sync import replica_count

        return replica_count() > 1

    def _batch_moments(self, x: Any, mask: Any) -> tuple[Any, Any, Any, Any]:
        """Per-feature mean and biased variance of ``x``, the count they cover (an int,
        or a tensor: one entry per feature with a mask, a scalar otherwise), and the
        empty flag (see :meth:`_empty_flag`)."""
        axes = self._reduce_axes
        # preset="keras" keeps Keras's arithmetic bit for bit (sums / (count + 1e-7)).
        keras_arithmetic = mask is not None and self.spec.preset == "keras"
        zero_masked = mask is not None and self.spec.fully_masked == "zero"
        if self._replicated():
            from .sync import synchronized_moments

            weights = None if mask is None else stats.mask_weights(mask, x, x.dtype)
            mean, variance, count, size = synchronized_moments(x, axes, weights)
        elif keras_arithmetic:
            mean, variance, count = stats.keras_masked_moments(x, mask, axes)
            size = stats.count(x, axes)
        elif mask is not None:
            mean, variance, count = stats.masked_moments(x, mask, axes)
            size = stats.count(x, axes)
        else:
            mean, variance = stats.moments(x, axes)
            count = size = stats.count(x, axes)
        empty = self._empty_flag(size, zero_masked)
        mean, variance = self._checked(
            count, size, empty, x.shape, mean, variance, masked=mask is not None,
            zero_masked=zero_masked,
        )  # fmt: skip
        return mean, variance, count, empty

    def _empty_flag(self, size: Any, zero_masked: bool) -> Any:
        """Where ``size`` (values per feature by shape; for a synchronized batch, over
        every replica) is only known when the graph runs, a bool tensor: whether the batch
        is empty, for :meth:`_update`'s guarded branch. None where the batch is known not
        to be empty, and for a masked batch under ``fully_masked="zero"``
        (``zero_masked``) and ``empty_batch="nan"``, which feeds the statistics of no kept
        value, 0."""
        if isinstance(size, int) or (zero_masked and self.spec.empty_batch == "nan"):
            return None
        return ops.equal(size, 0)

    def _checked(
        self,
        count: Any,
        size: Any,
        empty: Any,
        shape: Any,
        mean: Any,
        variance: Any,
        *,
        masked: bool,
        zero_masked: bool = False,
    ) -> tuple[Any, Any]:
        """Raise unless ``count`` values per feature (the smallest, for a per-feature
        count) may be trained on: one needs ``allow_single_value``, none is an error
        under a mask that keeps nothing of a nonempty batch (``size`` values per
        feature) unless ``zero_masked`` (``fully_masked="zero"``: a feature of no kept
        value is not counted), and an empty batch (``empty``, see :meth:`_empty_flag`)
        passes. A count
        known only when a TensorFlow graph runs gets a graph assertion that ``mean`` and
        ``variance`` wait for; where not even that can fail the call (XLA drops
        assertions; a JAX trace), :meth:`_update` leaves the moving statistics alone
        instead."""
        allow = self.spec.allow_single_value
        floor = 0 if allow else 1
        count = _uncounted_zeros(count, floor) if zero_masked else count
        smallest = count if isinstance(count, int) else _concrete_int(ops.min(count))
        known_size = size if isinstance(size, int) else _concrete_int(size)
        if smallest is not None and known_size is not None:
            if known_size > 0 and smallest <= floor:
                raise ValueError(_count_message(smallest, tuple(shape)))
            return mean, variance
        if not _tensorflow_backend() or (allow and (not masked or zero_masked)):
            return mean, variance  # 0 values is the empty batch (or zero), 1 is allowed
        from .tf_runtime import assert_count

        least = ops.min(count)
        if empty is not None:  # an empty batch passes
            least = ops.where(empty, ops.cast(floor + 1, least.dtype), least)
        told = "0" if allow else "1 or fewer" if masked and not zero_masked else "1"
        message = _count_message(told, tuple(shape))
        mean, variance = assert_count(least, allow, message, mean, variance)
        return mean, variance

    # -- ghost batches (SPEC.md section 2, *Ghost batches*) --------------------------

    def _ghost_call(self, x: Any, gamma: Any, beta: Any, mask: Any) -> Any:
        """Training with ghost batches, vectorised: the batch padded to whole groups and
        reshaped to ``(groups, virtual_batch_size, ...)``, each group's statistics over
        its real samples (a 0/1 weight leaves the padding out), one update."""
        spec = self.spec
        size = spec.virtual_batch_size
        assert size is not None
        if mask is not None:
            raise ValueError("virtual_batch_size must be None for a masked batch, got a mask")
        axis = normalize_axis(spec.axis, self._rank)
        if axis == 0:
            raise ValueError(
                "axis must not be 0 with virtual_batch_size (the groups split the batch "
                f"axis 0), got {spec.axis}"
            )
        static = x.shape[0]
        spatial = stats.count(x, [a for a in self._reduce_axes if a != 0])
        if static is not None and static < size:
            raise ValueError(
                f"virtual_batch_size must be at most the batch size in training, got {size} "
                f"for a batch of {static}"
            )
        if static is not None and isinstance(spatial, int):
            rest = static % size
            smallest = (rest or size) * spatial
            self._checked(smallest, smallest, None, x.shape, None, None, masked=False)
        shift = None
        if spec.preset != "keras":
            x, shift = stats.shift_by_first(x, self._reduce_axes)
        batch = ops.shape(x)[0]
        groups = (batch + size - 1) // size
        padded = ops.pad(x, [[0, groups * size - batch]] + [[0, 0]] * (self._rank - 1))
        rest_shape = [ops.shape(x)[i] if d is None else d for i, d in enumerate(x.shape)][1:]
        grouped = ops.reshape(padded, [-1, size, *rest_shape])
        real = ops.cast(ops.arange(groups * size) < batch, x.dtype)
        weight = ops.reshape(real, [-1, size] + [1] * (self._rank - 1))
        axes = [1] + [a + 1 for a in self._reduce_axes if a != 0]
        counts = ops.sum(weight, axis=1, keepdims=True) * ops.cast(spatial, x.dtype)
        mean = ops.sum(grouped * weight, axis=axes, keepdims=True) / counts
        centred = (grouped - mean) * weight
        variance = ops.sum(ops.square(centred), axis=axes, keepdims=True) / counts
        broadcast = [1] * (self._rank + 1)
        broadcast[axis + 1] = self._channels
        y = (grouped - mean) * ops.rsqrt(variance + spec.eps)
        if gamma is not None:
            y = y * ops.reshape(gamma, broadcast)
        if beta is not None:
            y = y + ops.reshape(beta, broadcast)
        y = ops.reshape(y, [-1, *rest_shape])[:batch]
        if spec.track_running_stats:
            fed_mean, fed_var, count = self._ghost_fed(mean, variance, counts, shift)

            def update() -> None:
                empty = None if static is not None else ops.equal(batch, 0)
                self._update(fed_mean, fed_var, count, empty, zero_masked=False)

            if spec.update_on == "backward":
                from .tf_runtime import update_on_backward

                y = update_on_backward(y, update)
            else:
                update()
        return y

    def _ghost_fed(self, mean: Any, variance: Any, counts: Any, shift: Any) -> tuple[Any, ...]:
        """What the moving statistics are fed after a ghost-batch call (``ghost_running``),
        from the groups' means, biased variances and counts: the mean, the variance and
        the count :meth:`_update` applies the unbiased factor with (1 where the variance
        is already the fed one, as under ``"groups"``)."""
        flat = [ops.reshape(t, (-1, self._channels)) for t in (mean, variance)]
        n = ops.reshape(counts, (-1, 1))
        group_mean, group_var = flat
        if self.spec.ghost_running == "groups":
            fed = group_var
            if self.spec.unbiased:
                fed = group_var * n / ops.maximum(n - 1.0, 1.0)
            out_mean, out_var, count = ops.mean(group_mean, 0), ops.mean(fed, 0), 1
        else:
            total = ops.sum(n)
            out_mean = ops.sum(n * group_mean, 0) / total
            m2 = ops.sum(n * group_var, 0) + ops.sum(n * ops.square(group_mean - out_mean), 0)
            out_var = m2 / total
            known = _concrete_int(total)
            count = ops.cast(total, "int32") if known is None else known
        if shift is not None:
            out_mean = out_mean + shift
        return out_mean, out_var, count

    # -- Batch Renormalization (SPEC.md section 2) -----------------------------------

    def _renorm_transform(
        self, mean: Any, variance: Any, gamma: Any, beta: Any, dtype: Any
    ) -> tuple[Any, Any]:
        """``gamma * r`` and ``gamma * d + beta``: the scale and offset that apply the
        correction ``xhat * r + d`` in the normalisation itself, ``r`` and ``d`` constants
        to autodiff. Op for op Keras's arithmetic (its ``_renorm_correction_and_moments``
        and ``_compose_transforms``), so that ``preset="keras"`` is Keras bit for bit."""
        spec = self.spec
        stddev = ops.sqrt(variance + spec.eps)
        renorm_mean = ops.cast(self.renorm_mean, mean.dtype)
        floor = ops.sqrt(ops.cast(spec.eps, mean.dtype))
        renorm_stddev = ops.maximum(ops.cast(self.renorm_stddev, mean.dtype), floor)
        r = ops.divide(stddev, renorm_stddev)
        d = ops.divide(ops.subtract(mean, renorm_mean), renorm_stddev)
        r, d = clip_correction(
            r, d, rmin=spec.renorm_rmin, rmax=spec.renorm_rmax, dmax=spec.renorm_dmax,
            maximum=ops.maximum, minimum=ops.minimum,
        )  # fmt: skip
        r, d = ops.stop_gradient(r), ops.stop_gradient(d)
        if gamma is not None:
            scale, offset = ops.multiply(r, gamma), ops.multiply(d, gamma)
        else:
            scale, offset = ops.cast(r, dtype), ops.cast(d, dtype)
        if beta is not None:
            offset = ops.add(offset, beta)
        return scale, offset

    def _renorm_values(self, mean: Any, variance: Any, fed: Any, factor: Any) -> dict[str, Any]:
        """The renorm weights' new values after a batch of ``mean`` and biased
        ``variance`` (``fed``: the variance fed to the moving statistics; ``factor``: their
        weight), in Keras's order ``old * (1 - g) + new * g``; with
        ``renorm_running="stddev"`` also ``moving_stddev`` and the moving variance derived
        from it (key ``"moving_variance"``)."""
        spec = self.spec
        g = spec.renorm_momentum
        stddev = ops.sqrt(variance + spec.eps)
        values = {
            "renorm_mean": ops.cast(self.renorm_mean, mean.dtype) * (1.0 - g) + mean * g,
            "renorm_stddev": ops.cast(self.renorm_stddev, mean.dtype) * (1.0 - g) + stddev * g,
        }
        if spec.renorm_running == "stddev":
            fed_stddev = stddev if fed is variance else ops.sqrt(fed + spec.eps)
            old = ops.cast(self.moving_stddev, mean.dtype)
            new_stddev = old * (1.0 - factor) + fed_stddev * factor
            values["moving_stddev"] = new_stddev
            values["moving_variance"] = ops.relu(new_stddev * new_stddev - spec.eps)
        return values

    # -- moving statistics -----------------------------------------------------------

    def _update(
        self,
        mean: Any,
        variance: Any,
        count: Any,
        empty: Any,
        zero_masked: bool,
        when: Any = None,
    ) -> None:
        """Fold one batch's statistics into the moving ones (``SPEC.md`` section 2,
        *Running statistics*), in Keras's arithmetic order ``old * (1 - f) + new * f``.

        ``empty`` (a bool tensor, see :meth:`_empty_flag`) selects, when the graph runs,
        what ``empty_batch`` does instead; ``zero_masked`` (``fully_masked="zero"``): a
        feature of no kept value feeds 0 and 0 and is not counted against the floor.
        ``when`` (a bool tensor, None: always) applies the update only where it holds (an
        accumulated step's end, :func:`unorm.keras.accumulate`)."""
        spec = self.spec
        fed = variance
        if spec.unbiased:
            if isinstance(count, int):
                if count > 1:
                    fed = variance * (count / (count - 1))
            else:
                n = ops.cast(count, variance.dtype)
                # One value per feature (where allowed) feeds the biased 0: factor 1.
                fed = variance * (n / ops.maximum(n - 1.0, 1.0))
        old_mean = ops.cast(self.moving_mean, mean.dtype)
        old_var = ops.cast(self.moving_variance, mean.dtype)
        tracked = self.num_batches_tracked
        factor: Any
        if spec.momentum is None:
            factor = 1.0 / (ops.cast(tracked, mean.dtype) + 1.0)
        else:
            factor = spec.momentum
        new_mean = old_mean * (1.0 - factor) + mean * factor
        renorm = self._renorm_values(mean, variance, fed, factor) if spec.renorm else {}
        new_var = renorm.pop("moving_variance", None)
        if new_var is None:
            new_var = old_var * (1.0 - factor) + fed * factor
        new_tracked = None if tracked is None else tracked + 1
        keep = None  # when this batch may be folded in (None: always)
        if spec.skip_nonfinite:
            keep = ops.logical_and(ops.all(ops.isfinite(mean)), ops.all(ops.isfinite(fed)))
            if spec.renorm:  # sqrt(var + eps) too: the renorm statistics' feed
                keep = ops.logical_and(keep, ops.all(ops.isfinite(variance)))
        # Where every count passes (no kept value is taken, one is allowed) no guard is
        # built: it could only change XLA's fusion, and preset="keras" is Keras bit for bit.
        if not isinstance(count, int) and not (zero_masked and spec.allow_single_value):
            # A count that no check could reject (under XLA, which drops assertions, or in
            # a JAX trace): too few values never reach the moving statistics.
            floor = 0.0 if spec.allow_single_value else 1.0
            counted_values = _uncounted_zeros(count, floor) if zero_masked else count
            enough = ops.greater(ops.min(ops.cast(counted_values, "float32")), floor)
            keep = enough if keep is None else ops.logical_and(keep, enough)
        fold = counted = keep
        if empty is not None:
            # A batch size known only when the graph runs: empty_batch, as a guarded branch.
            nan = spec.empty_batch == "nan" and not spec.skip_nonfinite
            fold = _either(empty, nan, keep)
            counted = _either(empty, nan or spec.empty_batch == "count", keep)
            if nan:  # the statistics of no values (0/0), whatever the kernel made of them
                nothing = ops.full_like(new_mean, float("nan"))
                new_mean = ops.where(empty, nothing, new_mean)
                new_var = ops.where(empty, nothing, new_var)
                renorm = {k: ops.where(empty, nothing, v) for k, v in renorm.items()}
        if when is not None:
            fold = when if fold is None else ops.logical_and(fold, when)
            counted = when if counted is None else ops.logical_and(counted, when)
        if fold is not None:
            new_mean = ops.where(fold, new_mean, old_mean)
            new_var = ops.where(fold, new_var, old_var)
            renorm = {
                k: ops.where(fold, v, ops.cast(getattr(self, k), v.dtype))
                for k, v in renorm.items()
            }
        for name, value in renorm.items():
            getattr(self, name).assign(value)
        if tracked is not None and counted is not None:
            # The variable's value, not the variable: Keras's JAX ops.where hands its
            # arguments to jnp.where unconverted, which JAX >= 0.9 refuses for objects
            # with __jax_array__ (a keras.Variable).
            new_tracked = ops.where(counted, new_tracked, ops.convert_to_tensor(tracked))
        self.moving_mean.assign(new_mean)
        self.moving_variance.assign(new_var)
        if tracked is not None:
            tracked.assign(new_tracked)

    # -- serialisation ---------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """Every setting (resolved, in unorm's convention) and the base layer's config."""
        spec = self.spec
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "axis": spec.axis,
                "eps": spec.eps,
                "momentum": spec.momentum,
                "center": spec.center,
                "scale": spec.scale,
                "track_running_stats": spec.track_running_stats,
                "running_var": spec.running_var,
                "skip_nonfinite": spec.skip_nonfinite,
                "allow_single_value": spec.allow_single_value,
                "update_on": spec.update_on,
                "empty_batch": spec.empty_batch,
                "fully_masked": spec.fully_masked,
                "renorm": spec.renorm,
                "renorm_clipping": spec.renorm_clipping,
                "renorm_momentum": spec.renorm_momentum,
                "renorm_running": spec.renorm_running,
                "virtual_batch_size": spec.virtual_batch_size,
                "ghost_running": spec.ghost_running,
                "preset": spec.preset,
                "synchronized": self.synchronized,
                "frozen": self.frozen,
                "beta_initializer": keras.initializers.serialize(self.beta_initializer),
                "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
                "moving_mean_initializer": keras.initializers.serialize(
                    self.moving_mean_initializer
                ),
                "moving_variance_initializer": keras.initializers.serialize(
                    self.moving_variance_initializer
                ),
                "beta_regularizer": keras.regularizers.serialize(self.beta_regularizer),
                "gamma_regularizer": keras.regularizers.serialize(self.gamma_regularizer),
                "beta_constraint": keras.constraints.serialize(self.beta_constraint),
                "gamma_constraint": keras.constraints.serialize(self.gamma_constraint),
            }
        )
        return config
