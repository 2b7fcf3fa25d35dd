"""``unorm.torch.BatchNorm``: BatchNorm for PyTorch following ``SPEC.md``.

The heavy work is PyTorch's own fused ``F.batch_norm`` kernel wherever its semantics equal
the spec; only the differences (the non-finite guard, the biased running-variance option,
the MXNet preset's update-on-backward) are done here, on per-channel tensors, never with
an extra pass over the input and without host synchronisation. The one exception is
PyTorch's own semantics (the ``"torch"`` preset) with ``momentum=None``: its kernel takes
the cumulative-average factor ``1 / num_batches_tracked`` as a host number, so that is
read from the device there, exactly as ``nn.BatchNorm*d`` reads it; every other setting
keeps the factor a tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._core.renorm import clip_correction
from .._core.settings import BatchNormSettings
from ..spec import UNSET, BatchNormSpec, Unset, given, normalize_axis

__all__ = ["BatchNorm"]

_LAYOUTS = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}
_HALF = (torch.float16, torch.bfloat16)


class BatchNorm(BatchNormSettings, nn.Module):
    """Batch Normalisation with one meaning on every backend (``SPEC.md`` section 2).

    A drop-in for ``nn.BatchNorm1d/2d/3d``: the same state-dict keys (``weight``,
    ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), so native
    checkpoints load and vice versa; channels-last memory format is kept.

    Args:
        num_features: C, the number of channels on the feature axis.
        num_dims: the input rank this layer accepts, as in the textbook signature
            ``BatchNorm(6, num_dims=4)`` (2 = (N, C), 4 = (N, C, H, W)). None (default)
            accepts any rank >= 2.
        eps: added to the variance inside the square root (default 1e-5).
        momentum: weight of the *new* batch statistic in the running average (default
            0.1, PyTorch's own convention); None gives the cumulative average.
        affine: learn ``weight`` (gamma) and ``bias`` (beta). Default True.
        bias: with ``affine``, learn ``bias`` too (default True); ``bias=False`` learns a
            scale and no shift, as ``nn.BatchNorm*d(bias=False)`` (``center=False``).
        track_running_stats: keep running statistics and use them in eval mode; when
            False, batch statistics are used in both modes. Default True.
        axis: the feature axis (default 1, channels-first).
        preset: None (canonical), ``"torch"`` (exactly ``nn.BatchNorm*d``), ``"keras"``
            or ``"mxnet"``: each framework's native semantics (``SPEC.md`` section 4).
        running_var: ``"unbiased"`` (canonical, n/(n-1)) or ``"biased"`` estimate fed to
            the running variance; default from the preset.
        skip_nonfinite: skip the whole running-statistics update for a batch whose
            statistics are not all finite; default True (False in the native presets).
        allow_single_value: train on one value per channel instead of raising; default
            False (True in the ``keras`` and ``mxnet`` presets).
        renorm: Batch Renormalization (Ioffe 2017, arXiv 1702.03275; ``SPEC.md`` section
            2): training corrects the normalised batch by ``r``, ``d`` (no gradient
            through them) from the buffers ``renorm_mean`` and ``renorm_std``. Default
            False; needs ``track_running_stats``.
        renorm_clipping: the bounds, as Keras's dictionary: keys ``"rmax"``, ``"rmin"``
            (``r`` clipped to ``[rmin, rmax]``) and ``"dmax"`` (``d`` to
            ``[-dmax, dmax]``), each optional; default none. The paper's ``r`` range is
            ``{"rmax": R, "rmin": 1 / R}``.
        renorm_momentum: weight of the new batch statistic in the renorm statistics
            (default 0.01).
        renorm_running: ``"variance"`` (default: the running variance as without renorm)
            or ``"stddev"`` (the ``keras`` preset: a ``running_std`` buffer, the running
            variance derived from it as Keras's layer does).
        virtual_batch_size: ghost batches (``SPEC.md`` section 2, *Ghost batches*): in
            training each group of this many consecutive samples (the last one holds the
            remainder) is normalised with its own statistics; eval mode is never
            grouped. Default None (off); an integer >= 2, at most the batch size.
        ghost_running: what the running statistics are fed under ghost batches:
            ``"batch"`` (default: the exact merge of the groups, the batch's statistics)
            or ``"groups"`` (the mean of the groups' statistics, tf.keras 2's).
        device, dtype: where and in which dtype parameters and buffers live. A 16-bit
            ``dtype`` keeps them in float32, as the spec asks for 16-bit inputs.

    Example:
        >>> bn = BatchNorm(6, num_dims=4)
        >>> y = bn(torch.randn(8, 6, 5, 5))
        >>> tuple(y.shape), int(bn.num_batches_tracked)
        ((8, 6, 5, 5), 1)
    """

    _version = 2  # state-dict version of nn.BatchNorm*d: loads checkpoints of every age

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        num_dims: int | None = None,
        *,
        eps: float | Unset = UNSET,
        momentum: float | Unset | None = UNSET,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = 1,
        preset: str | None = None,
        running_var: str | Unset = UNSET,
        skip_nonfinite: bool | Unset = UNSET,
        allow_single_value: bool | Unset = UNSET,
        empty_batch: str | Unset = UNSET,
        renorm: bool | Unset = UNSET,
        renorm_clipping: Mapping[str, float] | Unset | None = UNSET,
        renorm_momentum: float | Unset = UNSET,
        renorm_running: str | Unset = UNSET,
        virtual_batch_size: int | Unset | None = UNSET,
        ghost_running: str | Unset = UNSET,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if num_dims is not None and (
            isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 2
        ):
            raise ValueError(f"num_dims must be an integer >= 2 or None, got {num_dims!r}")
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True or False, got {bias!r}")
        self.spec = BatchNormSpec.from_preset(
            preset,
            center=affine and bias,
            scale=affine,
            track_running_stats=track_running_stats,
            axis=axis,
            **given(
                eps=eps,
                momentum=momentum,
                running_var=running_var,
                skip_nonfinite=skip_nonfinite,
                allow_single_value=allow_single_value,
                empty_batch=empty_batch,
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
        if num_dims is not None:
            normalize_axis(axis, num_dims)
        self.num_features = num_features
        self.num_dims = num_dims
        self._frozen = False
        #: Set by :func:`unorm.torch.accumulate`: the micro-batches of the current step.
        self.accumulator: Any = None
        factory: dict[str, Any] = {
            "device": device,
            "dtype": torch.float32 if dtype in _HALF else dtype,
        }
        if self.spec.scale:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
        if self.spec.center:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            counter = torch.tensor(0, dtype=torch.long, device=device)
            self.register_buffer("num_batches_tracked", counter)
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        if self.spec.renorm:
            # SPEC.md section 2, *Batch Renormalization*: the statistics r and d come from.
            self.register_buffer("renorm_mean", torch.zeros(num_features, **factory))
            self.register_buffer("renorm_std", torch.ones(num_features, **factory))
            if self.spec.renorm_running == "stddev":
                self.register_buffer("running_std", torch.ones(num_features, **factory))
        self.reset_parameters()

    # -- the settings, read through the spec so that they cannot drift apart ----------

    @property
    def affine(self) -> bool:
        """Whether the layer learns ``weight`` and ``bias``."""
        return self.spec.scale

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batch tracked."""
        if self.running_mean is not None and self.running_var is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.zero_()
        for name, value in (("renorm_mean", 0), ("renorm_std", 1), ("running_std", 1)):
            buffer = self._buffers.get(name)
            if buffer is not None:
                buffer.fill_(value)

    def reset_parameters(self) -> None:
        """Reset the running statistics; ``weight`` to 1 and ``bias`` to 0."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def frozen(self) -> bool:
        """The frozen mode (``SPEC.md`` section 8): normalise with the running statistics in
        training and in eval mode, never updating them. Default False.

        A frozen layer stays in eval mode (``training`` is False whatever ``train()``
        says), which is how every path of the layer takes the running statistics;
        setting ``frozen = False`` gives ``train()`` back its effect (call it again).
        ``weight`` and ``bias`` learn unless their ``requires_grad`` is off
        (:func:`unorm.torch.freeze` sets it).

        Example:
            >>> bn = BatchNorm(3)
            >>> bn.frozen = True
            >>> _ = bn.train()(torch.randn(4, 3))
            >>> int(bn.num_batches_tracked), bn.training
            (0, False)
        """
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"frozen must be True or False, got {value!r}")
        if value and not self.track_running_stats:
            raise ValueError(
                "frozen needs running statistics: this BatchNorm has track_running_stats=False"
            )
        self._frozen = value
        if value:
            self.training = False

    def train(self, mode: bool = True) -> BatchNorm:
        """As ``nn.Module.train``; a frozen layer stays in eval mode (:attr:`frozen`)."""
        super().train(mode and not self._frozen)
        return self

    def extra_repr(self) -> str:
        """The settings shown by ``repr(layer)``: the non-default ones and the preset."""
        spec = self.spec
        parts = [f"{self.num_features}"]
        if self.num_dims is not None:
            parts.append(f"num_dims={self.num_dims}")
        parts += [f"eps={spec.eps}", f"momentum={spec.momentum}", f"affine={self.affine}"]
        if spec.scale and not spec.center:
            parts.append("bias=False")
        parts.append(f"track_running_stats={spec.track_running_stats}")
        if spec.axis != 1:
            parts.append(f"axis={spec.axis}")
        parts.append(f"preset={spec.preset!r}")
        if spec.renorm:
            parts.append(f"renorm=True, renorm_clipping={spec.renorm_clipping}")
        if self._frozen:
            parts.append("frozen=True")
        return ", ".join(parts)

    # -- input checks ------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> int:
        """Validate ``x`` (before any state is touched) and return its feature axis."""
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(
                "input must have rank >= 2 (a batch axis and a feature axis), "
                f"got shape {tuple(x.shape)}"
            )
        if self.num_dims is not None and x.dim() != self.num_dims:
            layout = _LAYOUTS.get(self.num_dims, f"rank {self.num_dims}")
            raise ValueError(
                f"input must have rank {self.num_dims} {layout} for num_dims={self.num_dims}, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"input must have a floating-point dtype, got {x.dtype}")
        self._check_dtype_and_device(x)
        ax = normalize_axis(self.spec.axis, x.dim())
        if x.shape[ax] != self.num_features:
            raise ValueError(
                f"input must have {self.num_features} features on axis {self.spec.axis}, "
                f"got shape {tuple(x.shape)} with {x.shape[ax]}"
            )
        return ax

    def _check_dtype_and_device(self, x: Tensor) -> None:
        """Refuse an input PyTorch's kernel would refuse only after the running statistics
        were handed to it: a dtype other than the parameters' and buffers' (16-bit inputs
        with float32 state excepted, as ``nn.BatchNorm*d`` allows), or another device."""
        # The registries directly: nn.Module's attribute lookup costs a microsecond each.
        buffers = self._buffers
        state = (buffers.get("running_mean"), buffers.get("running_var"))
        held = [t for t in (*self._parameters.values(), *state) if t is not None]
        if not held:
            return  # nothing to match: no parameters, no running statistics
        dtype, device = x.dtype, x.device
        if all(t.dtype == dtype and t.device == device for t in held):
            return  # the common case, kept cheap: this runs on every call
        dtypes = {t.dtype for t in held}
        if dtypes != {x.dtype} and not (x.dtype in _HALF and dtypes == {torch.float32}):
            if len(dtypes) > 1:
                want = "one dtype, but the layer's parameters and buffers mix " + ", ".join(
                    sorted(str(d) for d in dtypes)
                )
            elif dtypes == {torch.float32}:
                want = "dtype torch.float32 (or torch.float16/torch.bfloat16)"
            else:
                want = f"dtype {next(iter(dtypes))}"
            raise ValueError(
                f"input must have {want} to match the layer's parameters and buffers, got "
                f"{x.dtype}; convert the input or the layer with .to()"
            )
        devices = {t.device for t in held}
        if devices != {x.device}:
            want = ", ".join(sorted(str(d) for d in devices))
            raise ValueError(
                f"input must be on the layer's device ({want}), got {x.device}; move the "
                "input or the layer with .to()"
            )

    def _check_count(self, count: int, shape: tuple[int, ...], where: str = "") -> int:
        """Refuse batch statistics of ``count`` values per channel (``SPEC.md`` section 2,
        *One value per feature*); ``where`` says whose values they are (``" across all ranks"``)."""
        if count == 1 and not self.spec.allow_single_value:  # count 0: an empty batch
            raise ValueError(
                f"expected more than 1 value per channel{where} to compute batch statistics "
                f"(training, or track_running_stats=False), got {count} (batch size x "
                f"spatial size) for input of shape {shape}; use a larger batch or "
                "eval mode with running statistics"
            )
        return count

    # -- forward -----------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x``: with batch statistics in training (updating the running ones)
        or with ``track_running_stats=False``, otherwise with the running statistics.

        ``x`` has the layer's dtype (or is 16-bit with float32 state), its device, and
        ``num_features`` channels on ``axis``; bad input raises ``ValueError`` before
        any state changes. Returns a tensor of ``x``'s shape, dtype and memory format.
        """
        ax = self._check_input(x)
        # PyTorch's kernels want channels on axis 1; other axes go through a view.
        x1 = x if ax == 1 else x.movedim(ax, 1)
        updating = self.training and self.track_running_stats
        if self.training or not self.track_running_stats:
            count = self._check_count(x1.numel() // self.num_features, tuple(x.shape))
            if updating and self.accumulator is not None:
                y = self._accumulate_call(x1, count)
            elif count == 0:
                y = self._empty(x1, updating)
            elif self.training and self.spec.virtual_batch_size is not None:
                y = self._ghost_train(x1, ax, tuple(x.shape), updating)
            elif updating:
                y = self._train_and_update(x1, count)
            else:
                y = self._normalise(x1, None, None, training=True, count=count)
        else:
            y = F.batch_norm(
                x1, self.running_mean, self.running_var, self.weight, self.bias,
                False, 0.0, self.spec.eps,
            )  # fmt: skip
        return y if ax == 1 else y.movedim(1, ax)

    def _normalise(
        self,
        x: Tensor,
        mean_out: Tensor | None,
        var_out: Tensor | None,
        *,
        training: bool,
        count: int,
    ) -> Tensor:
        """Normalise ``x`` (channels on axis 1) with batch statistics.

        With ``mean_out``/``var_out`` (zeros) the batch mean and unbiased variance are
        written into them by the fused kernel itself (momentum 1: ``0 * 0 + 1 * stat``).
        One value per channel (where allowed) and ``eps=0`` take a plain-ops path, because
        PyTorch's kernel refuses both in training; there ``var_out`` receives the unbiased
        variance, or the biased one (0) for a single value.
        """
        if not training or self._kernel_trains(count):
            return F.batch_norm(
                x, mean_out, var_out, self.weight, self.bias, training, 1.0, self.spec.eps
            )
        dims = [d for d in range(x.dim()) if d != 1]
        stat_dtype = torch.float32 if x.dtype in _HALF else x.dtype
        xs = x.to(stat_dtype)
        var, mean = torch.var_mean(xs, dim=dims, correction=0, keepdim=True)
        xhat = (xs - mean) * torch.rsqrt(var + self.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.weight is not None:
            xhat = xhat * self.weight.view(shape)
        if self.bias is not None:
            xhat = xhat + self.bias.view(shape)
        if mean_out is not None and var_out is not None:
            with torch.no_grad():
                mean_out.copy_(mean.reshape(-1))
                var_out.copy_(var.reshape(-1) * (count / (count - 1) if count > 1 else 0.0))
        return xhat.to(x.dtype)

    def _empty(self, x: Tensor, updating: bool) -> Tensor:
        """An empty batch (``SPEC.md`` section 2, *Empty batch*): an empty output through
        the affine parameters, so their gradients are the zero sums over nothing; the state
        as ``empty_batch`` says, when an update would run."""
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = x
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        y = y.to(x.dtype)
        return self._after_empty(y) if updating else y

    def _after_empty(self, y: Tensor) -> Tensor:
        """Apply ``empty_batch`` to the state, now or (``update_on="backward"``) when
        backward reaches ``y``."""
        rm, tracked = self.running_mean, self.num_batches_tracked
        assert rm is not None and tracked is not None
        rule = self.spec.empty_batch
        if rule == "skip":
            return y
        if rule == "nan":  # the statistics of no values, fed as any batch's
            nothing = torch.full_like(rm, float("nan"))
            if self.spec.renorm:
                return self._deferred(y, self._renorm_update, nothing, nothing.clone(), 0)
            return self._update_running(y, nothing, nothing.clone())
        if self.spec.update_on == "backward":
            if y.requires_grad:
                y.register_hook(lambda grad: self._count_empty(grad))  # type: ignore[no-untyped-call]
            return y
        self._count_empty(None)
        return y

    @torch.no_grad()
    def _count_empty(self, grad: Tensor | None) -> Tensor | None:
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        return grad

    def _kernel_trains(self, count: int) -> bool:
        """Whether PyTorch's fused kernel accepts this training batch: it refuses one
        value per channel and, since PyTorch 2.x, ``eps=0`` ("batch_norm eps must be
        positive during training")."""
        return count > 1 and self.spec.eps > 0

    def _train_and_update(self, x: Tensor, count: int) -> Tensor:
        rm, rv, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        assert rm is not None and rv is not None and tracked is not None
        spec = self.spec
        kernel = self._kernel_trains(count)
        if spec.renorm:
            return self._renorm_train(x, count)
        if spec.unbiased and not spec.skip_nonfinite and spec.update_on == "forward" and kernel:
            # Exactly nn.BatchNorm*d (the "torch" preset): the fused kernel updates the buffers.
            # The kernel wants a host factor (the one sync, as nn.BatchNorm*d has); the counter
            # moves only once the kernel succeeded, so a failing call changes nothing.
            factor = 1.0 / (float(tracked) + 1) if spec.momentum is None else spec.momentum
            y = F.batch_norm(x, rm, rv, self.weight, self.bias, True, factor, spec.eps)
            tracked.add_(1)
            return y
        if spec.unbiased and spec.update_on == "forward" and kernel and spec.momentum is not None:
            # Canonical: PyTorch's own update arithmetic on copies, kept only if finite.
            # (momentum=None goes through _blend below, whose factor stays on the device.)
            factor = spec.momentum
            new_mean, new_var = rm.clone(), rv.clone()
            y = F.batch_norm(x, new_mean, new_var, self.weight, self.bias, True, factor, spec.eps)
            self._commit(new_mean, new_var)
            return y
        batch_mean, batch_var = torch.zeros_like(rm), torch.zeros_like(rv)
        y = self._normalise(x, batch_mean, batch_var, training=True, count=count)
        if count > 1 and not spec.unbiased:
            batch_var = batch_var * ((count - 1) / count)  # the kernel wrote the unbiased one
        return self._update_running(y, batch_mean, batch_var)

    # -- accumulated micro-batches (SPEC.md section 2) ---------------------------------

    def _accumulate_call(self, x: Tensor, count: int) -> Tensor:
        """A training call inside :func:`unorm.torch.accumulate`: the micro-batch
        normalised with its own statistics, which are recorded (now, or when backward
        reaches the output under ``update_on="backward"``) instead of updating."""
        if count == 0:
            y = self._empty(x, updating=False)
            return self._deferred(y, self.record_micro_batch, 0, None, None)
        assert self.running_mean is not None  # updating: running statistics are kept
        mean, var = torch.zeros_like(self.running_mean), torch.zeros_like(self.running_mean)
        y = self._normalise(x, mean, var, training=True, count=count)
        m2 = var * (count - 1) if count > 1 else var  # the kernel wrote the unbiased one
        return self._deferred(y, self.record_micro_batch, count, mean, m2)

    def record_micro_batch(self, count: int, mean: Tensor | None, m2: Tensor | None) -> None:
        """Record one micro-batch's ``(count, mean, M2)`` in the active step; apply the
        step's update once it is complete. Without an active step, nothing."""
        accumulator = self.accumulator
        if accumulator is not None and accumulator.record(count, mean, m2):
            self.apply_step(accumulator)

    @torch.no_grad()
    def apply_step(self, accumulator: Any) -> None:
        """One running-statistics update from the exact merge of the step's micro-batches
        (section 2's update on the total count); an all-empty step follows
        ``empty_batch``."""
        merged = accumulator.merged()
        rm, tracked = self.running_mean, self.num_batches_tracked
        assert rm is not None and tracked is not None
        if merged is None:
            if self.spec.empty_batch == "count":
                tracked.add_(1)
            elif self.spec.empty_batch == "nan":
                nothing = torch.full_like(rm, float("nan"))
                self._blend(nothing, nothing.clone())
            return
        total, mean, m2 = merged
        unbiased = self.spec.unbiased and total > 1
        fed = m2 / (total - 1 if unbiased else total)
        self._blend(mean.to(rm.dtype), fed.to(rm.dtype))

    # -- ghost batches (SPEC.md section 2, *Ghost batches*) ----------------------------

    def _ghost_train(self, x: Tensor, ax: int, shape: tuple[int, ...], updating: bool) -> Tensor:
        """Normalise each group of ``virtual_batch_size`` samples of ``x`` (channels on
        axis 1) with its own statistics, vectorised: the full groups as one batch of
        ``groups * C`` channels for PyTorch's kernel (a transposed copy), the remainder
        as a batch of its own; then one running-statistics update."""
        spec = self.spec
        size = spec.virtual_batch_size
        assert size is not None
        if ax == 0:
            raise ValueError(
                "axis must not be 0 with virtual_batch_size (the groups split the batch "
                f"axis 0), got {spec.axis}"
            )
        batch, channels = x.shape[0], x.shape[1]
        if batch < size:
            raise ValueError(
                f"virtual_batch_size must be at most the batch size in training, got {size} "
                f"for a batch of {batch}"
            )
        full, rest = divmod(batch, size)
        spatial = x[0, 0].numel()
        self._check_count(size * spatial, shape, " in a ghost batch")
        if rest:
            self._check_count(rest * spatial, shape, " in the last ghost batch")
        tail = x.shape[2:]
        grouped = x[: full * size].reshape(full, size, *x.shape[1:]).transpose(0, 1)
        grouped = grouped.reshape(size, full * channels, *tail)
        y, mean, var = self._group_batch_norm(grouped, full, size * spatial)
        y = y.reshape(size, full, channels, *tail).transpose(0, 1).reshape(-1, channels, *tail)
        means, variances, counts = (
            [mean.view(full, channels)],
            [var.view(full, channels)],
            [size * spatial] * full,
        )
        if rest:
            y_rest, mean_rest, var_rest = self._group_batch_norm(
                x[full * size :], 1, rest * spatial
            )
            y = torch.cat([y, y_rest])
            means.append(mean_rest.view(1, channels))
            variances.append(var_rest.view(1, channels))
            counts.append(rest * spatial)
        if not updating:
            return y
        fed_mean, fed_var = self._ghost_fed(torch.cat(means), torch.cat(variances), counts)
        return self._update_running(y, fed_mean, fed_var)

    def _group_batch_norm(
        self, x: Tensor, groups: int, count: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` (``groups * C`` channels on axis 1) normalised per channel with the
        layer's ``weight``/``bias`` repeated per group; also each channel's mean and
        unbiased variance (the biased 0 for one value), without gradient."""
        weight = None if self.weight is None else self.weight.repeat(groups)
        bias = None if self.bias is None else self.bias.repeat(groups)
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        if self._kernel_trains(count):
            mean = torch.zeros(x.shape[1], dtype=stat_dtype, device=x.device)
            var = torch.zeros_like(mean)
            y = F.batch_norm(x, mean, var, weight, bias, True, 1.0, self.spec.eps)
            return y, mean, var
        dims = [d for d in range(x.dim()) if d != 1]
        xs = x.to(stat_dtype)
        var_b, mean_b = torch.var_mean(xs, dim=dims, correction=0, keepdim=True)
        xhat = (xs - mean_b) * torch.rsqrt(var_b + self.spec.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if weight is not None:
            xhat = xhat * weight.view(shape)
        if bias is not None:
            xhat = xhat + bias.view(shape)
        factor = count / (count - 1) if count > 1 else 0.0
        return xhat.to(x.dtype), mean_b.detach().reshape(-1), var_b.detach().reshape(-1) * factor

    @torch.no_grad()
    def _ghost_fed(
        self, means: Tensor, variances: Tensor, counts: list[int]
    ) -> tuple[Tensor, Tensor]:
        """The mean and variance fed to the running statistics from the groups' means and
        unbiased variances (``(groups, C)``) and counts, as ``ghost_running`` says."""
        n = torch.tensor(counts, dtype=means.dtype, device=means.device).unsqueeze(1)
        m2 = variances * (n - 1).clamp_min(0)
        if self.spec.ghost_running == "groups":
            fed = variances if self.spec.unbiased else m2 / n
            return means.mean(0), fed.mean(0)
        total = sum(counts)
        mean = (n * means).sum(0) / total
        m2_total = m2.sum(0) + (n * (means - mean) ** 2).sum(0)
        unbiased = self.spec.unbiased and total > 1
        return mean, m2_total / (total - 1 if unbiased else total)

    # -- Batch Renormalization (SPEC.md section 2) -------------------------------------

    def _renorm_train(self, x: Tensor, count: int) -> Tensor:
        """Normalise ``x`` (channels on axis 1) with the batch statistics, corrected by
        ``r`` and ``d`` folded into the scale and shift (``gamma * r``, ``gamma * d +
        beta``, ``r`` and ``d`` detached, so autograd gives the spec's gradients), then
        update the state once (now, or in backward for ``update_on="backward"``)."""
        spec = self.spec
        renorm_mean, renorm_std = self._buffers["renorm_mean"], self._buffers["renorm_std"]
        assert renorm_mean is not None and renorm_std is not None
        dims = [d for d in range(x.dim()) if d != 1]
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.no_grad():
            if x.dtype == stat_dtype and x.dim() > 2:
                # PyTorch's statistics-only kernel: one pass, 1.6x faster than var_mean on
                # CPU over (N, H, W); biased variance, in the input's dtype (so not for
                # 16-bit inputs, whose statistics are float32).
                mean, var = torch.batch_norm_update_stats(x, None, None, 1.0)
            else:
                var, mean = torch.var_mean(x.to(stat_dtype), dim=dims, correction=0)
            floor = renorm_std.to(stat_dtype).clamp_min(spec.eps**0.5)
            r = torch.sqrt(var + spec.eps) / floor
            d = (mean - renorm_mean.to(stat_dtype)) / floor
            r, d = clip_correction(
                r, d, rmin=spec.renorm_rmin, rmax=spec.renorm_rmax, dmax=spec.renorm_dmax,
                maximum=Tensor.clamp_min, minimum=Tensor.clamp_max,
            )  # fmt: skip
        param_dtype = renorm_std.dtype
        r, d = r.to(param_dtype), d.to(param_dtype)
        weight = r if self.weight is None else self.weight * r
        bias = d if self.weight is None else self.weight * d
        if self.bias is not None:
            bias = bias + self.bias
        if self._kernel_trains(count):
            y = F.batch_norm(x, None, None, weight, bias, True, 0.0, spec.eps)
        else:  # one value per channel, or eps=0: PyTorch's kernel refuses both
            shape = [1, -1] + [1] * (x.dim() - 2)
            xs = x.to(stat_dtype)
            xhat = (xs - mean.view(shape)) * torch.rsqrt(var.view(shape) + spec.eps)
            y = (xhat * weight.view(shape) + bias.view(shape)).to(x.dtype)
        return self._deferred(y, self._renorm_update, mean, var, count)

    def _deferred(self, y: Tensor, update: Any, *args: Any) -> Tensor:
        """Run ``update(*args)`` now, or when backward reaches ``y`` (``update_on``)."""
        if self.spec.update_on == "backward":
            if y.requires_grad:

                def hook(grad: Tensor) -> Tensor:
                    update(*args)
                    return grad

                y.register_hook(hook)  # type: ignore[no-untyped-call]
            return y
        update(*args)
        return y

    @torch.no_grad()
    def _renorm_update(self, mean: Tensor, var: Tensor, count: int) -> None:
        """One state update of Batch Renormalization: renorm statistics at
        ``renorm_momentum``, inference statistics as ``renorm_running`` says, all kept
        only where the guard passes (``torch.where`` on a 0-d flag: no host sync)."""
        spec = self.spec
        rm, rv, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        assert rm is not None and rv is not None and tracked is not None
        fed = var * (count / (count - 1)) if spec.unbiased and count > 1 else var
        sigma = torch.sqrt(var + spec.eps)
        g = spec.renorm_momentum
        targets = {
            "renorm_mean": mean,
            "renorm_std": sigma,
        }
        new = {
            name: (1 - g) * self._buffers[name] + g * value.to(rm.dtype)  # type: ignore[operator]
            for name, value in targets.items()
        }
        factor: Tensor | float
        if spec.momentum is None:
            wide = torch.promote_types(rm.dtype, torch.float32)
            factor = (1.0 / (tracked.to(wide) + 1)).to(rm.dtype)
        else:
            factor = spec.momentum
        new["running_mean"] = (1 - factor) * rm + factor * mean.to(rm.dtype)
        running_std = self._buffers.get("running_std")
        if running_std is not None:
            std = (1 - factor) * running_std + factor * torch.sqrt(fed + spec.eps).to(rm.dtype)
            new["running_std"] = std
            new["running_var"] = torch.relu(std * std - spec.eps)
        else:
            new["running_var"] = (1 - factor) * rv + factor * fed.to(rv.dtype)
        ok: Tensor | None = None
        if spec.skip_nonfinite:
            ok = torch.stack([torch.isfinite(t).all() for t in (mean, fed, sigma)]).all()
        for name, value in new.items():
            buffer = self._buffers[name]
            assert buffer is not None
            buffer.copy_(value if ok is None else torch.where(ok, value, buffer))
        tracked.add_(1 if ok is None else ok.to(tracked.dtype))

    def _update_running(self, y: Tensor, batch_mean: Tensor, batch_var: Tensor) -> Tensor:
        """Fold a batch's mean and fed variance into the running statistics, now or, for
        the MXNet preset, when backward reaches ``y`` (MXNet's CPU kernel updates them in
        backward, so a forward-only training call leaves them unchanged there)."""
        if self.spec.update_on == "backward":
            if y.requires_grad:
                y.register_hook(self._update_in_backward(batch_mean, batch_var))  # type: ignore[no-untyped-call]
            return y
        self._blend(batch_mean, batch_var)
        return y

    def _update_in_backward(self, batch_mean: Tensor, batch_var: Tensor) -> Any:
        def hook(grad: Tensor) -> Tensor:
            self._blend(batch_mean, batch_var)
            return grad

        return hook

    @torch.no_grad()
    def _blend(self, batch_mean: Tensor, batch_var: Tensor) -> None:
        """``running <- (1 - f) running + f batch`` (reference order), then commit."""
        rm, rv, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        assert rm is not None and rv is not None and tracked is not None
        if self.spec.momentum is None:
            # In float32 at least: a count past 65504 overflows a float16 buffer's dtype.
            wide = torch.promote_types(rm.dtype, torch.float32)
            factor: Tensor | float = (1.0 / (tracked.to(wide) + 1)).to(rm.dtype)
        else:
            factor = self.spec.momentum
        new_mean = (1 - factor) * rm + factor * batch_mean.to(rm.dtype)
        new_var = (1 - factor) * rv + factor * batch_var.to(rv.dtype)
        self._commit(new_mean, new_var)

    @torch.no_grad()
    def _commit(self, new_mean: Tensor, new_var: Tensor) -> None:
        """Store new running statistics; with the guard, only if all are finite.

        ``torch.where`` on a 0-d flag keeps this free of host synchronisation.
        """
        rm, rv, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        assert rm is not None and rv is not None and tracked is not None
        if not self.spec.skip_nonfinite:
            rm.copy_(new_mean)
            rv.copy_(new_var)
            tracked.add_(1)
            return
        ok = torch.isfinite(new_mean).all() & torch.isfinite(new_var).all()
        rm.copy_(torch.where(ok, new_mean, rm))
        rv.copy_(torch.where(ok, new_var, rv))
        tracked.add_(ok.to(tracked.dtype))

    # -- checkpoints -------------------------------------------------------------------

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # Checkpoints of nn.BatchNorm*d before the counter existed (version < 2).
            assert isinstance(state_dict, dict)
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        # Check every entry before any is copied, so a mismatched checkpoint changes nothing.
        for name in ("weight", "bias", "running_mean", "running_var"):
            entry = state_dict.get(prefix + name)
            if entry is not None and tuple(entry.shape) != (self.num_features,):
                raise ValueError(
                    f"checkpoint entry {prefix + name!r} has shape {tuple(entry.shape)}, "
                    f"expected ({self.num_features},) for num_features={self.num_features}"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
