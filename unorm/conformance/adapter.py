"""The adapter protocol: the only framework-specific code the suite drives.

A column is a module ``unorm.conformance.columns.<name>`` (``-`` written ``_``:
``torch_native``) whose ``create()`` returns an :class:`Adapter`. The suite never imports
a framework itself; it hands the adapter NumPy arrays and plain settings and reads NumPy
arrays back:

==========================  ==================================================================
``availability()``          None when the backend can run here, else why not (the cases are
                            then reported "not available", not failed)
``round_to(a, dtype)``      ``a`` (float64) rounded to ``dtype`` by the framework's own cast,
                            as a NumPy carrier (bfloat16 as float32)
``bn_build(config, g, b)``  a layer from a :class:`LayerConfig`, with ``gamma`` / ``beta`` set
``bn_step(layer, x, dy,     one call: ``mode`` is ``train`` (training forward + backward with
mode)``                     upstream gradient ``dy``), ``forward`` (training forward only) or
                            ``eval`` (inference forward + backward); returns
                            :class:`~conformance.expected.StepValues`
``bn_state(layer)``         the buffers now (a StepValues with only buffer fields)
``native_spec(config)``     native columns only: the settings the framework's own layer
                            really has when given the case's native arguments
``agc(params, ...)``        AGC over :class:`AGCArrays` in the backend's layout; returns the
                            clipped gradients by name
``sync_bn_step(...)``       cross-replica training step over several slices, or
                            :class:`Unsupported`; ``strategy=`` is given for a strategy
                            other than ``replicas`` that ``sync_strategies`` names
``ws_conv(config, x, w,     the backend's Scaled WS convolution built from a :class:`WSConfig`,
gain, bias, dy)``           weight (backend layout), gain and bias loaded, called on ``x``
                            ``(N, C, H, W)`` with upstream gradient ``dy``; returns
                            :class:`~conformance.expected.WSValues` (``dweight`` in the
                            backend layout, ``y``/``dx`` channels-first); bad sizes raise
                            ``ValueError`` when the layer is built or called
==========================  ==================================================================

An adapter raises :class:`Unsupported` for what its backend cannot express (a dtype, a
setting, cross-replica BatchNorm); any other exception raised while a case runs is a
failure of that case (or, for an :class:`~conformance.cases.ErrorCase`, the error under
test). ``layout`` declares how logical AGC weights are laid out for this backend
(:mod:`conformance.layouts`).

Example:
    >>> adapter = load_adapter("reference")
    >>> adapter.name, adapter.availability() is None
    ('reference', True)
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from unorm._core.registry import plugin, plugins_in_order
from unorm.spec import BatchNormSpec

from . import dtypes, layouts
from .expected import StepValues, WSValues

if TYPE_CHECKING:
    from .after import FoldConfig, FoldInputs, FoldValues

__all__ = [
    "BACKENDS",
    "CHECKOUT",
    "FRAMEWORK_PACKAGES",
    "PACKAGE",
    "REFERENCE",
    "AGCArrays",
    "Adapter",
    "Backend",
    "LayerConfig",
    "SyncResult",
    "Unsupported",
    "WSConfig",
    "constructor_settings",
    "load_adapter",
    "load_adapter_module",
    "missing_packages",
    "old_weight",
    "old_weight_native_spec",
    "present",
    "work_folder",
]

#: The suite's own folder (its golden file and xfail lists live here, in the wheel too).
PACKAGE = Path(__file__).resolve().parent


def _checkout() -> Path | None:
    """The source checkout the suite runs from (the folder of ``pyproject.toml`` above
    ``unorm/``), or None for an installed package."""
    root = PACKAGE.parent.parent
    return root if (root / "pyproject.toml").exists() and (root / "tests").is_dir() else None


#: The project's checkout, or None when the suite runs from an installed package.
CHECKOUT = _checkout()


def work_folder() -> Path:
    """Where reports and results go unless told: the checkout's root (``./dev main``
    writes ``conformance-report.md`` there), else the current directory."""
    return CHECKOUT if CHECKOUT is not None else Path.cwd()


class Unsupported(Exception):
    """The backend cannot express this case (reported "unsupported", not failed)."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """A column of the report: its adapter module and the environment it runs in."""

    name: str
    environment: str
    native: bool = False

    @property
    def module(self) -> str:
        """``unorm.conformance.columns.<name>`` (``torch-native``: ``torch_native``)."""
        return f"{__package__}.columns.{self.name.replace('-', '_')}"


#: The column that runs :mod:`unorm.reference` itself, and the environment it runs in.
REFERENCE = Backend("reference", "current")


def _columns() -> tuple[Backend, ...]:
    """The reference, then every backend's own column, then every native column (a column
    ending in ``-native``), the backends in their plug-ins' declared order."""
    declared = [
        Backend(column, p.environment, native=column.endswith("-native"))
        for p in plugins_in_order()
        for column in p.columns
    ]
    return (REFERENCE, *sorted(declared, key=lambda b: b.native))


#: Every column of the report, in the order shown (:func:`_columns`).
BACKENDS: dict[str, Backend] = {b.name: b for b in _columns()}


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """How a case builds its layer: the public constructor arguments, framework-free.

    ``preset`` and ``settings`` are passed as given (an unknown preset is the error some
    cases test); ``axis`` is the feature axis, ``ndim`` the input rank, ``dtype`` the input
    dtype.
    """

    num_features: int
    ndim: int
    axis: int
    dtype: str
    preset: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()

    def spec(self) -> BatchNormSpec:
        """The settings in unorm's convention (``ValueError`` for an unknown preset)."""
        return BatchNormSpec.from_preset(self.preset, axis=self.axis, **dict(self.settings))

    @property
    def param_dtype(self) -> str:
        """Dtype of parameters and buffers (float32 for 16-bit inputs)."""
        return dtypes.param_dtype(self.dtype) if self.dtype in dtypes.DTYPES else "float32"


@dataclasses.dataclass(frozen=True)
class AGCArrays:
    """One parameter handed to :meth:`Adapter.agc`, already in the backend's layout.

    ``dtype`` is the case's dtype (``weight`` and ``grad`` hold bfloat16 values as float32).
    """

    name: str
    layer: str
    kind: str
    role: str
    weight: np.ndarray
    grad: np.ndarray
    dtype: str = "float32"


@dataclasses.dataclass
class SyncResult:
    """Cross-replica step: per-replica ``ys`` and ``dxs``, ``dgamma`` / ``dbeta`` summed
    over replicas, and the running statistics after the step."""

    ys: list[np.ndarray]
    dxs: list[np.ndarray]
    state: StepValues


@dataclasses.dataclass(frozen=True)
class WSConfig:
    """How a Scaled WS case builds its convolution: public constructor arguments.

    ``padding`` is ``"valid"`` or ``"same"`` (odd kernels: ``pads`` on each side), stride
    1; ``eps`` None means the style's default (the constructor is not given one).
    """

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    groups: int
    style: str
    eps: float | None
    padding: str
    pads: tuple[int, int]
    dtype: str

    def ws_kwargs(self) -> dict[str, Any]:
        """``style`` and, when given, ``eps``: what every backend's constructor takes."""
        return {"style": self.style} if self.eps is None else {"style": self.style, "eps": self.eps}


class Adapter:
    """Base class of every adapter: defaults and the methods a backend overrides.

    Class attributes: ``name`` (the column), ``framework`` (``numpy`` or a plug-in's name:
    ``torch``, ``keras``, ``mxnet``), ``native`` (a framework's own layer, compared under
    its preset), ``dtypes`` (the input dtypes it runs), ``layout`` (its AGC weight layout,
    :mod:`conformance.layouts`; the logical one unless the adapter declares its own) and
    ``absent`` (quantities the backend may not keep, e.g. ``num_batches_tracked``: compared
    only when the adapter returns them) and ``masks`` (its layers take a mask: it runs the
    masked cases, SPEC.md section 2, *Masked batches*) and ``sync_strategies`` (the
    cross-replica strategies it runs, :data:`conformance.cases.SYNC_STRATEGIES`; the
    others are unsupported).
    """

    name = "base"
    framework = "numpy"
    native = False
    masks = False
    dtypes: tuple[str, ...] = ("float64", "float32", "float16", "bfloat16")
    layout: layouts.Layout = layouts.LOGICAL
    absent: frozenset[str] = frozenset()
    sync_strategies: tuple[str, ...] = ("replicas",)

    def availability(self) -> str | None:
        """None when the backend can run here; otherwise the reason it cannot."""
        return None

    def versions(self) -> dict[str, str]:
        """Versions worth printing in the report (framework, numpy)."""
        return {"numpy": np.__version__}

    def round_to(self, a: np.ndarray, dtype: str) -> np.ndarray:
        """``a`` rounded to ``dtype`` as the backend rounds it (NumPy carrier)."""
        return dtypes.cast(a, dtype)

    def bn_build(self, config: LayerConfig, gamma: np.ndarray, beta: np.ndarray) -> Any:
        """A BatchNorm layer configured by ``config`` with ``gamma`` and ``beta`` set."""
        raise Unsupported(f"{self.name} has no BatchNorm")

    def bn_step(
        self,
        layer: Any,
        x: np.ndarray,
        dy: np.ndarray | None,
        mode: str,
        mask: np.ndarray | None = None,
    ) -> StepValues:
        """One call of ``layer`` on ``x`` (see the module docstring for ``mode``);
        ``mask`` (boolean, ``x.shape[:-1] + (1,)``) only where :attr:`masks` is set."""
        raise Unsupported(f"{self.name} has no BatchNorm")

    def bn_state(self, layer: Any) -> StepValues:
        """The layer's buffers (running statistics, ``num_batches_tracked``)."""
        raise Unsupported(f"{self.name} has no BatchNorm")

    def native_spec(self, config: LayerConfig) -> BatchNormSpec:
        """Native columns: what the framework's own layer does with ``config``'s values."""
        raise NotImplementedError

    def agc(
        self,
        params: Sequence[AGCArrays],
        *,
        clipping: float,
        eps: float,
        exclude: Sequence[str],
        unit_axes: Any = None,
    ) -> dict[str, np.ndarray]:
        """Clipped gradients, by parameter name, in the backend's layout. ``unit_axes`` is
        passed to the backend's AGC as it is, with a mapping's parameter names turned into
        the backend's own handles (as ``exclude``'s): the error cases give it."""
        raise Unsupported(f"{self.name} has no AGC")

    def sync_bn_step(
        self,
        config: LayerConfig,
        gamma: np.ndarray,
        beta: np.ndarray,
        xs: Sequence[np.ndarray],
        dys: Sequence[np.ndarray],
    ) -> SyncResult:
        """One cross-replica training step over the replicas' slices ``xs``. An adapter
        that declares other :attr:`sync_strategies` also takes ``strategy: str`` (given
        only for those, so that an adapter of one strategy need not take it)."""
        raise Unsupported(f"{self.name} has no cross-replica BatchNorm in this suite")

    def ws_conv(
        self,
        config: WSConfig,
        x: np.ndarray,
        weight: np.ndarray,
        gain: np.ndarray,
        bias: np.ndarray,
        dy: np.ndarray,
    ) -> WSValues:
        """One forward and backward call of the backend's Scaled WS convolution."""
        raise Unsupported(f"{self.name} has no Scaled WS convolution")

    def fold_eval(self, config: FoldConfig, inputs: FoldInputs) -> FoldValues:
        """Build the producer of ``config`` (weight in the backend's layout) followed by
        a BatchNorm holding ``inputs``' parameters and running statistics, fold it
        (SPEC.md section 8) and return the folded model's inference output on
        ``inputs.x`` (channels-first) and how many BatchNorm layers it still holds."""
        raise Unsupported(f"{self.name} has no fold")

    def bn_freeze(self, layer: Any, trainable: bool) -> Any:
        """``layer`` (a :meth:`bn_build` result) frozen (SPEC.md section 8, *Frozen
        mode*), its scale and shift ``trainable`` or fixed; the layer to call next."""
        raise Unsupported(f"{self.name} has no frozen BatchNorm")

    def bn_recalibrate(self, layer: Any, batches: Sequence[np.ndarray]) -> StepValues:
        """Recalibrate ``layer``'s running statistics over ``batches`` (SPEC.md section
        8); the state after (:meth:`bn_state`)."""
        raise Unsupported(f"{self.name} has no recalibrate")

    def bn_accumulate(
        self,
        layer: Any,
        xs: Sequence[np.ndarray],
        dys: Sequence[np.ndarray],
        steps: int,
    ) -> list[StepValues]:
        """Training steps on the micro-batches ``xs`` (upstream gradients ``dys``) inside
        one accumulation of ``steps`` calls per step (SPEC.md section 2, *Accumulated
        micro-batches*), the context left afterwards; each call's values."""
        raise Unsupported(f"{self.name} has no accumulated micro-batches")


#: The packages each framework column needs installed, by ``Adapter.framework`` (a plug-in's
#: name, or ``numpy``): a column is unavailable only while one of these is missing (its
#: plug-in's ``modules``: Keras runs on TensorFlow here).
FRAMEWORK_PACKAGES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",),
    **{p.name: tuple(p.modules) for p in plugins_in_order()},
}


def missing_packages(framework: str) -> list[str]:
    """The packages of ``framework`` (:data:`FRAMEWORK_PACKAGES`) not installed here.

    Example:
        >>> missing_packages("numpy")
        []
    """
    return [p for p in FRAMEWORK_PACKAGES[framework] if importlib.util.find_spec(p) is None]


class UnormModule:
    """Mixin of the columns that run unorm's own layers: ``module()`` is
    ``module_name`` (e.g. ``unorm.torch``).

    The column is unavailable only while its framework is not installed. Once it is, a
    unorm module that fails to import (a renamed symbol, a bad import) is a bug: the
    ``ImportError`` propagates from :meth:`availability` instead of turning every case
    into "unavailable", which would let the suite pass with no results for that column.
    """

    module_name = ""

    def module(self) -> Any:
        """The unorm module this column runs."""
        return importlib.import_module(self.module_name)

    def availability(self) -> str | None:
        """None when the column can run; why not while its framework is not installed.

        Raises the unorm module's ``ImportError`` when the framework is installed.
        """
        missing: str | None = super().availability()  # type: ignore[misc]
        if missing:
            return missing
        framework: str = getattr(self, "framework", "numpy")
        absent = missing_packages(framework)
        if absent:
            return f"{', '.join(absent)} not installed here ({self.module_name} needs it)"
        self.module()
        return None


def constructor_settings(settings: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """A case's settings as unorm's layer constructors take them: the spec's names, but
    Batch Renormalization's bounds (``renorm_rmax``, ``renorm_rmin``, ``renorm_dmax``) as
    the one ``renorm_clipping`` dictionary every backend's BatchNorm takes.

    Example:
        >>> constructor_settings((("eps", 0.1), ("renorm_rmax", 2.0)))
        {'eps': 0.1, 'renorm_clipping': {'rmax': 2.0}}
    """
    out = dict(settings)
    bounds = {k[len("renorm_") :]: out.pop(k) for k in list(out) if k in _RENORM_BOUNDS}
    if bounds:
        out["renorm_clipping"] = bounds
    return out


_RENORM_BOUNDS = ("renorm_rmax", "renorm_rmin", "renorm_dmax")


def old_weight_native_spec(
    config: LayerConfig, framework: str, layer: str, state: str
) -> BatchNormSpec:
    """The spec of ``config`` as a layer whose ``momentum`` weighs the old value (Keras,
    Gluon) can express it: no cumulative average, running statistics always kept (``state``
    says how the layer uses them), Batch Renormalization where the framework's plug-in
    declares it (its bounds and renorm momentum translated); raises :class:`Unsupported`
    otherwise."""
    spec = config.spec()
    if spec.momentum is None:
        raise Unsupported(f"{layer} has no cumulative average (momentum=None)")
    if not spec.track_running_stats:
        raise Unsupported(f"{layer} always {state}")
    if spec.virtual_batch_size is not None:
        raise Unsupported(f"{layer} has no ghost batches (virtual_batch_size)")
    renorm: dict[str, Any] = {}
    if spec.renorm:
        if not plugin(framework).native_arguments.get("renorm"):
            raise Unsupported(f"{layer} has no Batch Renormalization (renorm=True)")
        renorm = {
            "renorm": True,
            "renorm_clipping": spec.renorm_clipping,
            "renorm_momentum": 1.0 - spec.renorm_momentum,
        }
    return BatchNormSpec.from_native(
        framework,
        epsilon=spec.eps,
        momentum=1.0 - spec.momentum,
        center=spec.center,
        scale=spec.scale,
        axis=spec.axis,
        **renorm,
    )


def present(a: np.ndarray | None) -> np.ndarray:
    """``a``, which the caller knows is there (an adapter's converted tensor)."""
    if a is None:
        raise ValueError("expected an array, got None")
    return a


def old_weight(spec: BatchNormSpec) -> float:
    """The native ``momentum`` of a layer that weighs the old value (Keras, Gluon), from a
    spec :func:`old_weight_native_spec` made (which has no cumulative average)."""
    if spec.momentum is None:
        raise Unsupported("a layer weighing the old value has no cumulative average")
    return 1.0 - spec.momentum


def load_adapter_module(name: str) -> ModuleType:
    """Import column ``name``'s module (:attr:`Backend.module`); ``KeyError`` for a name
    that is no column. Its absolute imports reach the real frameworks: a column module
    named ``torch`` inside the package shadows nothing."""
    if name not in BACKENDS:
        raise KeyError(f"no conformance column {name!r}; the columns are {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name].module)


def load_adapter(name: str) -> Adapter:
    """The adapter of column ``name`` (its module's ``create()``)."""
    adapter = load_adapter_module(name).create()
    if not isinstance(adapter, Adapter):
        raise TypeError(f"{BACKENDS[name].module}: create() must return an Adapter")
    return adapter
