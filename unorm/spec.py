"""Parameter types, defaults, presets and validation for unorm's operations.

Everything here is plain Python: no NumPy, no framework. A backend builds one
:class:`BatchNormSpec` or :class:`AGCSpec` from its constructor arguments and from then on
reads every setting from it, so that a value means the same on every backend.

The canonical ("unorm") convention is written out in ``SPEC.md``; this module is its
parameter table. The presets ``torch``, ``keras`` and ``mxnet`` reproduce each
framework's native BatchNorm semantics (``SPEC.md`` section 4).

Example:
    >>> from unorm.spec import BatchNormSpec
    >>> BatchNormSpec().momentum
    0.1
    >>> BatchNormSpec.from_preset("keras").eps
    0.001
    >>> BatchNormSpec.from_native("keras", momentum=0.9).momentum  # Keras weighs the old value
    0.09999999999999998
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal

from ._core import layer_kinds
from ._core.registry import plugin, plugins_in_order

__all__ = [
    "AGC_GRAD_NORM_FLOOR",
    "LAYER_KINDS",
    "PRESETS",
    "UNSET",
    "WS_EPS",
    "AGCSpec",
    "BatchNormSpec",
    "ScaledWSSpec",
    "UnitAxes",
    "Unset",
    "given",
    "normalize_axis",
    "normalize_unit_axes",
    "output_unit_axes",
    "validate_preset",
]

#: The name of a preset: a backend's name (:func:`unorm._core.registry.plugin_names`).
PresetName = str
RunningVarEstimator = Literal["unbiased", "biased"]
UpdateTime = Literal["forward", "backward"]
EmptyBatch = Literal["skip", "count", "nan"]
FullyMasked = Literal["error", "zero"]
RenormRunning = Literal["variance", "stddev"]
GhostRunning = Literal["batch", "groups"]

#: The floor under a unit's gradient norm in AGC's rescale factor (``SPEC.md`` section 5).
AGC_GRAD_NORM_FLOOR = 1e-6


class Unset(enum.Enum):
    """Type of :data:`UNSET`."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: Default of a backend constructor argument that was not given: the preset's (or the
#: canonical) value applies. Needed because ``momentum=None`` is a real setting (the
#: cumulative average), so None cannot mean "not given".
UNSET = Unset.UNSET


def given(**arguments: Any) -> dict[str, Any]:
    """The ``arguments`` that were given, i.e. are not :data:`UNSET`.

    Example:
        >>> given(eps=1e-3, momentum=UNSET, axis=None)
        {'eps': 0.001, 'axis': None}
    """
    return {name: value for name, value in arguments.items() if value is not UNSET}


def _fail(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "True or False")
    return value


def _check_real(name: str, value: object, allowed: str) -> float:
    # bool is an int subclass: True as an eps is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, value, allowed)
    number = float(value)
    if not math.isfinite(number):
        raise _fail(name, value, allowed)
    return number


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise _fail(name, value, f"one of {listed}")
    return str(value)


def normalize_axis(axis: object, ndim: int, name: str = "axis") -> int:
    """Return ``axis`` as a non-negative index into a tensor of rank ``ndim``.

    Negative values count from the end, as in NumPy. Raises ``ValueError`` naming
    ``name`` when ``axis`` is not an integer in ``[-ndim, ndim)``.

    Example:
        >>> normalize_axis(-1, 4)
        3
    """
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise _fail(name, axis, f"an integer in [{-ndim}, {ndim})")
    index = int(axis)
    if not -ndim <= index < ndim:
        raise _fail(name, axis, f"an integer in [{-ndim}, {ndim}) for an input of rank {ndim}")
    return index % ndim


def normalize_unit_axes(unit_axes: UnitAxes, ndim: int) -> tuple[int, ...]:
    """AGC's output-unit axes of a tensor of rank ``ndim`` as sorted non-negative indices;
    ``()`` where the tensor is one unit (``unit_axes`` None, or rank <= 1).

    Raises ``ValueError`` naming ``unit_axes`` for an axis out of range or one named twice
    (``SPEC.md`` section 5).

    Example:
        >>> normalize_unit_axes((-1, 0), 4)
        (0, 3)
    """
    if unit_axes is None or ndim <= 1:
        return ()
    # One axis may be any integer (a NumPy one too); normalize_axis refuses the rest.
    listed = tuple(unit_axes) if isinstance(unit_axes, (tuple, list)) else (unit_axes,)
    normalised = tuple(sorted({normalize_axis(a, ndim, "unit_axes") for a in listed}))
    if len(normalised) != len(listed):
        raise ValueError(f"unit_axes must name distinct axes, got {unit_axes!r}")
    return normalised


@dataclasses.dataclass(frozen=True)
class BatchNormSpec:
    """Every setting of a BatchNorm layer, in unorm's canonical convention.

    Attributes (defaults are the canonical convention, ``SPEC.md``):
        eps: 1e-5. Added to the variance inside the square root. ``>= 0``.
        momentum: 0.1. Weight of the *new* batch statistic in the running average
            (``running = (1 - momentum) * running + momentum * batch``); ``None`` gives the
            cumulative average over all batches seen. In ``[0, 1]``.
        axis: 1. The feature (channel) axis; every other axis is reduced. Backends pass
            their framework's default (channels-last ``-1`` for Keras).
        center: True. Learn a per-feature offset ``beta``.
        scale: True. Learn a per-feature scale ``gamma``.
        track_running_stats: True. Keep running statistics and use them in inference;
            when False, batch statistics are used in training and inference alike.
        running_var: ``"unbiased"``. The running variance is fed ``n/(n-1)`` times the
            batch variance (``"unbiased"``) or the batch variance itself (``"biased"``).
        skip_nonfinite: True. A batch whose statistics are not all finite updates no
            running statistic (and not ``num_batches_tracked``).
        allow_single_value: False. Training on one value per feature is an error unless
            True (the Keras and MXNet layers accept it silently).
        update_on: ``"forward"``. When running statistics are updated: in the training
            forward pass (canonical) or only when backward runs (MXNet's CPU kernel).
        empty_batch: ``"skip"``. What a training batch of zero values per feature does
            (its output is empty either way): ``"skip"`` changes no state (canonical),
            ``"count"`` only counts it in ``num_batches_tracked`` (PyTorch's layer),
            ``"nan"`` feeds the statistics of no values, NaN, to the update like any
            batch's (Keras's and Gluon's layers; the non-finite guard then skips it).
        fully_masked: ``"error"``. What a masked training batch (a backend whose layers
            take a mask: Keras) does with a feature whose mask keeps no value:
            ``"error"`` refuses it as one value per feature is refused (canonical),
            ``"zero"`` gives that feature mean 0 and variance 0, fed to the update
            (Keras's layer, whose masked sums are divided by ``count + 1e-7``).
        renorm: False. Batch Renormalization (Ioffe 2017, arXiv 1702.03275, ``SPEC.md``
            section 2, *Batch Renormalization*): in training the normalised batch is
            corrected by ``r``, ``d`` from the renorm statistics, constants to the
            gradient. Needs ``track_running_stats``. The ``renorm_*`` settings act only
            with ``renorm=True``.
        renorm_rmax, renorm_rmin: None, None. The bounds ``r`` is clipped to (None: no
            upper bound, no lower bound; the paper's choice is ``rmin = 1/rmax``).
            ``rmin >= 0`` and ``rmin <= rmax``.
        renorm_dmax: None. ``d`` is clipped to ``[-dmax, dmax]`` (None: not clipped).
            ``>= 0``.
        renorm_momentum: 0.01. Weight of the new batch statistic in the renorm
            statistics (``renorm_mean``, ``renorm_std``) that ``r`` and ``d`` are taken
            from (Keras's ``renorm_momentum=0.99`` weighs the old value). In ``[0, 1]``.
        renorm_running: ``"variance"``. What the running statistics used in inference
            keep under renorm: ``"variance"`` the running variance as without renorm
            (canonical), ``"stddev"`` a running ``sqrt(var + eps)`` from which the running
            variance is derived as ``max(std^2 - eps, 0)`` (Keras's layer).
        virtual_batch_size: None. Ghost batches (Hoffer et al. 2017; ``SPEC.md`` section 2,
            *Ghost batches*): in training each group of this many consecutive samples
            (the batch axis is axis 0; the last group holds the remainder) is normalised
            with its own statistics. An integer ``>= 2``; at most the batch size.
            Inference is never grouped.
        ghost_running: ``"batch"``. What the running statistics are fed under ghost
            batches, once per call: ``"batch"`` the exact merge of the groups (the
            batch's own statistics, canonical), ``"groups"`` the unweighted mean of the
            groups' means and fed variances (tf.keras 2's ``virtual_batch_size``).
        preset: None, or the name of the preset the spec was built from.

    Example:
        >>> BatchNormSpec(eps=1e-3, momentum=None).momentum is None
        True
        >>> BatchNormSpec(renorm=True, renorm_rmax=3.0, renorm_rmin=1 / 3).renorm_clipping
        {'rmax': 3.0, 'rmin': 0.3333333333333333}
    """

    eps: float = 1e-5
    momentum: float | None = 0.1
    axis: int = 1
    center: bool = True
    scale: bool = True
    track_running_stats: bool = True
    running_var: RunningVarEstimator = "unbiased"
    skip_nonfinite: bool = True
    allow_single_value: bool = False
    update_on: UpdateTime = "forward"
    empty_batch: EmptyBatch = "skip"
    fully_masked: FullyMasked = "error"
    renorm: bool = False
    renorm_rmax: float | None = None
    renorm_rmin: float | None = None
    renorm_dmax: float | None = None
    renorm_momentum: float = 0.01
    renorm_running: RenormRunning = "variance"
    virtual_batch_size: int | None = None
    ghost_running: GhostRunning = "batch"
    preset: PresetName | None = None

    def __post_init__(self) -> None:
        _check_real("eps", self.eps, "a finite number >= 0")
        if self.eps < 0:
            raise _fail("eps", self.eps, "a finite number >= 0")
        if self.momentum is not None:
            _check_real("momentum", self.momentum, "a number in [0, 1] or None")
            if not 0.0 <= self.momentum <= 1.0:
                raise _fail("momentum", self.momentum, "a number in [0, 1] or None")
        if isinstance(self.axis, bool) or not isinstance(self.axis, numbers.Integral):
            raise _fail("axis", self.axis, "an integer")
        for flag in ("center", "scale", "track_running_stats", "skip_nonfinite"):
            _check_bool(flag, getattr(self, flag))
        _check_bool("allow_single_value", self.allow_single_value)
        _check_choice("running_var", self.running_var, ("unbiased", "biased"))
        _check_choice("update_on", self.update_on, ("forward", "backward"))
        _check_choice("empty_batch", self.empty_batch, ("skip", "count", "nan"))
        _check_choice("fully_masked", self.fully_masked, ("error", "zero"))
        self._check_renorm()
        self._check_ghost()
        if self.preset is not None:
            validate_preset(self.preset)

    def _check_renorm(self) -> None:
        """Validate the ``renorm_*`` settings (``SPEC.md`` section 2, *Batch
        Renormalization*), whether or not ``renorm`` is on."""
        _check_bool("renorm", self.renorm)
        rmax, rmin, dmax = self.renorm_rmax, self.renorm_rmin, self.renorm_dmax
        if rmax is not None and _check_real("renorm_rmax", rmax, "a number > 0 or None") <= 0:
            raise _fail("renorm_rmax", rmax, "a number > 0 or None")
        if rmin is not None and _check_real("renorm_rmin", rmin, "a number >= 0 or None") < 0:
            raise _fail("renorm_rmin", rmin, "a number >= 0 or None")
        if rmax is not None and rmin is not None and rmin > rmax:
            raise _fail("renorm_rmin", rmin, f"a number <= renorm_rmax ({rmax!r})")
        if dmax is not None and _check_real("renorm_dmax", dmax, "a number >= 0 or None") < 0:
            raise _fail("renorm_dmax", dmax, "a number >= 0 or None")
        _check_real("renorm_momentum", self.renorm_momentum, "a number in [0, 1]")
        if not 0.0 <= self.renorm_momentum <= 1.0:
            raise _fail("renorm_momentum", self.renorm_momentum, "a number in [0, 1]")
        _check_choice("renorm_running", self.renorm_running, ("variance", "stddev"))
        if self.renorm and not self.track_running_stats:
            raise _fail(
                "renorm", True, "False with track_running_stats=False (it needs running statistics)"
            )

    def _check_ghost(self) -> None:
        """Validate ``virtual_batch_size`` and ``ghost_running`` (``SPEC.md`` section 2,
        *Ghost batches*)."""
        size = self.virtual_batch_size
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 2
        ):
            raise _fail("virtual_batch_size", size, "an integer >= 2 or None")
        _check_choice("ghost_running", self.ghost_running, ("batch", "groups"))
        if size is not None and self.renorm:
            raise _fail("virtual_batch_size", size, "None with renorm=True (not combined)")

    @property
    def renorm_clipping(self) -> dict[str, float]:
        """The clipping bounds that are set, in Keras's ``renorm_clipping`` form (keys
        ``"rmax"``, ``"rmin"``, ``"dmax"``; an unset bound is absent)."""
        bounds = {"rmax": self.renorm_rmax, "rmin": self.renorm_rmin, "dmax": self.renorm_dmax}
        return {k: float(v) for k, v in bounds.items() if v is not None}

    @staticmethod
    def clipping_settings(clipping: object) -> dict[str, float | None]:
        """Keras's ``renorm_clipping`` dictionary (keys ``"rmax"``, ``"rmin"``, ``"dmax"``,
        each optional; None or ``{}``: no clipping) as the spec's ``renorm_rmax``,
        ``renorm_rmin``, ``renorm_dmax`` settings. An infinite ``rmax``/``dmax`` (or a zero
        ``rmin``, Keras's defaults) is no bound, None.

        Example:
            >>> BatchNormSpec.clipping_settings({"rmax": 3.0, "dmax": float("inf")})
            {'renorm_rmax': 3.0, 'renorm_rmin': None, 'renorm_dmax': None}
        """
        given_bounds = {} if clipping is None else clipping
        if not isinstance(given_bounds, Mapping):
            raise _fail("renorm_clipping", clipping, "a dict with keys 'rmax', 'rmin', 'dmax'")
        unknown = sorted(set(given_bounds) - {"rmax", "rmin", "dmax"})
        if unknown:
            raise _fail(
                "renorm_clipping", clipping, "a dict with keys among 'rmax', 'rmin', 'dmax'"
            )
        out: dict[str, float | None] = {}
        for key, none_at in (("rmax", math.inf), ("rmin", 0.0), ("dmax", math.inf)):
            value = given_bounds.get(key)
            out[f"renorm_{key}"] = None if value is None or value == none_at else value
        return out

    @property
    def unbiased(self) -> bool:
        """True when the running variance is fed the unbiased ``n/(n-1)`` estimate."""
        return self.running_var == "unbiased"

    def replace(self, **changes: Any) -> BatchNormSpec:
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, preset: str | None, **overrides: Any) -> BatchNormSpec:
        """Build the spec of a preset, then apply ``overrides`` in unorm's convention.

        ``preset=None`` is the canonical convention. Overrides always use unorm's
        meaning of each parameter (``momentum`` weighs the new batch statistic); to pass
        a framework's own argument values use :meth:`from_native`.

        Example:
            >>> BatchNormSpec.from_preset("torch", eps=1e-3).running_var
            'unbiased'
        """
        base = {} if preset is None else dict(PRESETS[validate_preset(preset)])
        base.update(overrides)
        return cls(**base)

    def native_gaps(self, framework: str) -> list[str]:
        """The training settings of this spec that ``framework``'s own BatchNorm layer
        cannot be told, as ``name=value`` strings: where it differs from the framework's
        preset in the running-variance feed, the non-finite guard, one value per feature,
        when the update runs, what an empty batch or (with masks) a fully masked feature
        does, ``momentum=None`` outside
        PyTorch (Keras's and Gluon's layers have no cumulative average), and Batch
        Renormalization where the layer has none (``renorm=True``) or keeps other
        inference statistics (``renorm_running``). Eps, a momentum weight and the renorm
        clipping bounds translate.

        Example:
            >>> BatchNormSpec(momentum=None).native_gaps("torch")
            ['skip_nonfinite=True', "empty_batch='skip'"]
            >>> BatchNormSpec.from_preset("keras").native_gaps("keras")
            []
        """
        native = PRESETS[validate_preset(framework)]
        averages = plugin(framework).native_arguments["cumulative_average"]
        gaps = ["momentum=None"] if self.momentum is None and not averages else []
        names = (
            "running_var",
            "skip_nonfinite",
            "allow_single_value",
            "update_on",
            "empty_batch",
            "fully_masked",
        )
        for name in names:
            value = getattr(self, name)
            # A framework whose layers take no mask declares no fully_masked: never a gap.
            if name in native and value != native[name]:
                gaps.append(f"{name}={value!r}")
        if self.virtual_batch_size is not None:
            # No native layer here has ghost batches (Keras 3 dropped tf.keras 2's).
            gaps.append(f"virtual_batch_size={self.virtual_batch_size!r}")
        if self.renorm:
            # A framework without Batch Renormalization declares no renorm_running.
            if "renorm_running" not in native:
                gaps.append("renorm=True")
            elif self.renorm_running != native["renorm_running"]:
                gaps.append(f"renorm_running={self.renorm_running!r}")
        return gaps

    @classmethod
    def from_native(cls, framework: str, **native: Any) -> BatchNormSpec:
        """Build the spec that reproduces a framework's own BatchNorm layer.

        ``native`` takes the framework's own argument names and conventions:
        PyTorch ``eps``, ``momentum`` (new-value weight or None), ``affine``, ``bias``
        (``bias=False``: a scale and no shift), ``track_running_stats``; Keras
        ``epsilon``, ``momentum`` (old-value weight), ``center``, ``scale``, ``axis``;
        MXNet Gluon ``epsilon``, ``momentum`` (old-value weight), ``center``, ``scale``,
        ``axis``, ``use_global_stats`` (not supported: raises); Keras also ``renorm``,
        ``renorm_clipping`` (a dict) and ``renorm_momentum`` (old-value weight).

        Example:
            >>> BatchNormSpec.from_native("mxnet", momentum=0.9, epsilon=1e-5).momentum
            0.09999999999999998
        """
        name = validate_preset(framework)
        declared = plugin(name).native_arguments
        out: dict[str, Any] = {}
        args = dict(native)
        if declared["eps"] in args:
            out["eps"] = args.pop(declared["eps"])
        if "momentum" in args:
            if declared["momentum_weighs"] == "new":
                out["momentum"] = args.pop("momentum")
            else:
                old_weight = _check_real("momentum", args.pop("momentum"), "a number in [0, 1]")
                if not 0.0 <= old_weight <= 1.0:
                    raise _fail("momentum", old_weight, f"a number in [0, 1] ({name} convention)")
                out["momentum"] = 1.0 - old_weight
        if declared["affine"]:
            affine = _check_bool("affine", args.pop("affine", True))
            bias = _check_bool("bias", args.pop("bias", True))  # nn.BatchNorm*d(bias=False)
            if not (affine and bias):
                out["center"] = False
            if not affine:
                out["scale"] = False
            if "track_running_stats" in args:
                out["track_running_stats"] = args.pop("track_running_stats")
        else:
            for key in ("center", "scale", "axis"):
                if key in args:
                    out[key] = args.pop(key)
            # Presets themselves leave the axis to the backend, but a native argument set
            # means the framework's own default (channels-last for Keras).
            out.setdefault("axis", declared["default_axis"])
            if args.pop("use_global_stats", False):
                raise _fail("use_global_stats", True, "False (freeze the layer instead)")
            if declared.get("renorm"):
                out.update(_native_renorm(name, args))
        if args:
            unknown = ", ".join(sorted(args))
            raise ValueError(f"from_native({name!r}) got unknown argument(s): {unknown}")
        return cls.from_preset(name, **out)


def _native_renorm(framework: str, args: dict[str, Any]) -> dict[str, Any]:
    """Keras's ``renorm``, ``renorm_clipping`` and ``renorm_momentum`` (old-value weight),
    popped from ``args``, as spec settings; none of them given: none."""
    out: dict[str, Any] = {}
    if "renorm" in args:
        out["renorm"] = args.pop("renorm")
    if "renorm_clipping" in args:
        out.update(BatchNormSpec.clipping_settings(args.pop("renorm_clipping")))
    if "renorm_momentum" in args:
        old = _check_real("renorm_momentum", args.pop("renorm_momentum"), "a number in [0, 1]")
        if not 0.0 <= old <= 1.0:
            raise _fail("renorm_momentum", old, f"a number in [0, 1] ({framework} convention)")
        out["renorm_momentum"] = 1.0 - old
    return out


#: The native presets: each backend's own BatchNorm semantics, as unorm settings, from its
#: plug-in declaration. Sources are cited in ``SPEC.md`` section 4.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    p.name: {**p.native_preset, "preset": p.name} for p in plugins_in_order()
}


def validate_preset(preset: object) -> PresetName:
    """Return ``preset`` if it names a preset; raise ``ValueError`` listing them if not."""
    if not isinstance(preset, str) or preset not in PRESETS:
        listed = ", ".join(repr(name) for name in PRESETS)
        raise _fail("preset", preset, f"one of {listed} or None")
    return preset


@dataclasses.dataclass(frozen=True)
class AGCSpec:
    """Settings of Adaptive Gradient Clipping (Brock et al. 2021, arXiv 2102.06171).

    Attributes:
        clipping: 0.01. The largest allowed ratio of a unit's gradient norm to its
            weight norm. ``> 0``.
        eps: 1e-3. Floor under a unit's weight norm, so that zero-initialised weights
            can still move. ``>= 0``.

    Example:
        >>> AGCSpec(clipping=0.02).eps
        0.001
    """

    clipping: float = 0.01
    eps: float = 1e-3

    def __post_init__(self) -> None:
        _check_real("clipping", self.clipping, "a finite number > 0")
        if self.clipping <= 0:
            raise _fail("clipping", self.clipping, "a finite number > 0")
        _check_real("eps", self.eps, "a finite number >= 0")
        if self.eps < 0:
            raise _fail("eps", self.eps, "a finite number >= 0")


WSStyle = Literal["deepmind", "timm"]

#: Default eps of each Scaled Weight Standardisation style (``SPEC.md`` section 6).
WS_EPS: Mapping[str, float] = {"deepmind": 1e-4, "timm": 1e-5}


@dataclasses.dataclass(frozen=True)
class ScaledWSSpec:
    """Settings of Scaled Weight Standardisation (Brock et al. 2021, NFNets).

    Attributes:
        style: ``"deepmind"`` (canonical): ``W_hat = gain * (W - mean) *
            rsqrt(max(var * fan_in, eps))``, as DeepMind's NFNet code; or ``"timm"``:
            ``W_hat = gain * fan_in**-0.5 * (W - mean) / sqrt(var + eps)``, as timm's
            ``ScaledStdConv2d``. Statistics per output unit, biased variance.
        eps: None (default) takes the style's: 1e-4 (deepmind) or 1e-5 (timm). ``>= 0``.

    Example:
        >>> ScaledWSSpec().eps, ScaledWSSpec(style="timm").eps
        (0.0001, 1e-05)
    """

    style: WSStyle = "deepmind"
    eps: float | None = None

    def __post_init__(self) -> None:
        _check_choice("style", self.style, ("deepmind", "timm"))
        if self.eps is None:
            object.__setattr__(self, "eps", WS_EPS[self.style])
        eps = _check_real("eps", self.eps, "a finite number >= 0 or None")
        if eps < 0:
            raise _fail("eps", self.eps, "a finite number >= 0 or None")


#: Axes that index a parameter's output units: one axis, several axes that together
#: index the unit (Keras depthwise kernels), or None for "the whole tensor is one unit".
UnitAxes = int | tuple[int, ...] | None

#: The layer kinds whose weights AGC knows the layout of (:mod:`unorm._core.layer_kinds`).
LAYER_KINDS = layer_kinds.LAYER_KINDS


def _single(axes: tuple[int, ...]) -> UnitAxes:
    return axes[0] if len(axes) == 1 else axes


def output_unit_axes(framework: str, layer_kind: str, ndim: int) -> UnitAxes:
    """Return the output-unit axes (non-negative) of a ``layer_kind`` weight of rank
    ``ndim`` in ``framework``'s layout; one axis as an int, several as a tuple.

    Tensors of rank <= 1 (biases, gains) are one unit: the result is None. A grouped
    transposed convolution's units need its group count:
    :func:`unorm._core.layer_kinds.unit_plan`.

    Example:
        >>> output_unit_axes("keras", "dense", 2)
        1
        >>> output_unit_axes("keras", "depthwise_conv", 4)
        (2, 3)
        >>> output_unit_axes("torch", "dense", 1) is None
        True
    """
    fw = validate_preset(framework)
    kind = layer_kinds.check_kind(layer_kind)
    if ndim <= 1:
        return None
    layout = plugin(fw).layouts.get(kind)
    if layout is None:
        raise ValueError(f"{fw} has no layer of kind {kind!r}")
    return _single(layout.unit_axes(kind, ndim))
