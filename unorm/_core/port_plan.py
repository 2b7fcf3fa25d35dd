"""The port planner: how a neutral checkpoint goes into a model, written once for every backend.

Loading a :class:`~unorm.port.Checkpoint` is the same algorithm everywhere: pair the
checkpoint's layers with the model's, check every kind, shape, role, group count, flatten
order and setting, and write only when all of them fit. What a framework adds is only
how it walks its layers and reads and writes its variables; a backend says that through a
:class:`PortModel` (one object per model), and this module does the rest:

- :func:`plan_load` does every check and returns the complete plan, one :class:`Step` per
  layer with its values already in the framework's layout; it writes nothing, so a load
  that fails leaves the model as it was.
- :func:`apply_plan` writes a plan: every value first, then the settings.
- :func:`load` plans, writes and then verifies the load on the checkpoint's probe
  (:mod:`unorm._core.probe`): a model whose output differs from the source's is put back
  as it was and the load fails, naming the first layer whose output diverges.
- :func:`export` builds a model's checkpoint through the same adapter, with a probe when
  given an input.
- :func:`match_by_order` pairs the layers (the one replaceable :data:`Matcher`).

:class:`PortBackend` declares what a backend's port module gives ``unorm port``
(:mod:`unorm.port_files`); the registry's ``port_module`` names that module.

Conventions: arrays cross the adapter in the checkpoint's canonical layout (PyTorch's,
channels-first, see :mod:`unorm.port`); a BatchNorm's settings are a
:class:`~unorm.spec.BatchNormSpec` in unorm's convention. Messages name the pair of
layers as ``layer {i}: checkpoint {kind} {name!r} {shape} vs model {kind} {name!r}``.

This module imports no framework: NumPy, :mod:`unorm.spec` and :mod:`unorm.port` only.

Example (a model of one dense layer, held in a dict):
    >>> class Dense(PortModel[str]):
    ...     def __init__(self, arrays): self.arrays = arrays
    ...     def layers(self): return [("fc", "fc", "dense")]
    ...     def slots(self, handle, kind):
    ...         return {role: Slot(a.shape) for role, a in self.arrays.items()}
    ...     def read(self, handle, kind, flatten_from): return dict(self.arrays)
    ...     def assign(self, handle, role, value): self.arrays[role] = value
    >>> a = Dense({"weight": np.ones((2, 3)), "bias": np.zeros(2)})
    >>> b = Dense({"weight": np.zeros((2, 3)), "bias": np.zeros(2)})
    >>> plan = load(b, export(a, source="numpy"))
    >>> [(s.name, sorted(s.values)) for s in plan], float(b.arrays["weight"].sum())
    ([('fc', ['bias', 'weight'])], 6.0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from ..port import (
    Checkpoint,
    CheckpointError,
    Layer,
    describe,
    match_layers,
    role_array,
    temporary_beside,
)
from ..port import ws_settings as _recorded_ws
from ..spec import BatchNormSpec, ScaledWSSpec
from . import flow as flows
from . import probe as probes

__all__ = [
    "COUNTER",
    "ROLES",
    "Matcher",
    "PortBackend",
    "PortModel",
    "Slot",
    "Step",
    "Target",
    "UnverifiedLoadWarning",
    "apply_plan",
    "atomic_file",
    "check_flatten_from",
    "check_shape",
    "check_state_fits",
    "export",
    "kind_of",
    "load",
    "match_by_flow",
    "match_by_names",
    "match_by_order",
    "plan_load",
    "present_roles",
    "warn_native_gaps",
]

#: The BatchNorm counter's role. A model's layer that keeps no counter (its momentum is
#: a number) does not need the checkpoint's count, so that role alone may go unread.
COUNTER = "num_batches_tracked"
#: The roles of each layer kind, in the order they are checked, exported and written.
ROLES: Mapping[str, tuple[str, ...]] = {
    "conv": ("weight", "bias", "gain"),
    "conv_transpose": ("weight", "bias", "gain"),
    "dense": ("weight", "bias", "gain"),
    "batchnorm": ("gamma", "beta", "running_mean", "running_var", COUNTER),
}
# Which flag keeps a BatchNorm role fixed, for the message that refuses other values.
_FIXED_BY = {"gamma": "scale", "beta": "center"}

H = TypeVar("H")
#: One layer of a model as the planner sees it: (name, handle, kind), in model order;
#: the handle is whatever the backend uses to reach the layer (a module, a block).
Target = tuple[str, H, str]
Spec = BatchNormSpec | ScaledWSSpec


# -- what a backend provides -------------------------------------------------------------


class PortBackend(Protocol):
    """What a backend's port module (``unorm._<name>.port``) provides, with one signature
    on every backend; ``unorm port`` uses nothing else. A module satisfies it as it is.

    Extra keyword arguments with defaults may follow (``example=`` on MXNet's
    ``load_checkpoint``). Example::

        backend: PortBackend = importlib.import_module(plugin("torch").port_module)
        backend.write_native(model, "lenet.pt")
    """

    def export_model(self, model: Any, input_shape: tuple[int, ...]) -> Checkpoint:
        """The checkpoint of ``model``; ``input_shape`` is one sample's shape (no batch
        axis) in the framework's own convention, for backends that trace a forward pass
        to find which dense layers read a flattened feature map."""
        ...

    def read_native(self, model: Any, path: str | os.PathLike[str]) -> Any:
        """Read the framework's own file at ``path`` into ``model`` and return the model
        that holds its state (``model`` itself, or one loaded whole from the file); a file
        that does not fit raises :class:`~unorm.port.CheckpointError`, ``model`` unchanged."""
        ...

    def load_checkpoint(self, model: Any, ckpt: Checkpoint) -> None:
        """Load ``ckpt`` into ``model`` after every check (:func:`plan_load`): a
        checkpoint that does not fit raises and changes nothing."""
        ...

    def write_native(self, model: Any, path: str | os.PathLike[str]) -> None:
        """Write ``model``'s state as the framework's own file at ``path``, atomically
        (:func:`atomic_file`); the file's ending says the format."""
        ...


@dataclasses.dataclass(frozen=True)
class Slot:
    """One role a model's layer has: its shape in the canonical layout.

    Attributes:
        shape: the canonical shape, e.g. ``(out, in)`` for a dense weight whatever the
            framework stores; ``()`` for the BatchNorm counter.
        fixed: the value the layer keeps the role at, or None (default: a learnt or
            stored value). A BatchNorm built with ``scale=False`` whose framework still
            holds a gamma has ``Slot((C,), fixed=1.0)``: the checkpoint's gamma may only
            be ones, or absent, and ones are written.

    Example:
        >>> Slot((4,), fixed=1.0).fixed
        1.0
    """

    shape: tuple[int, ...]
    fixed: float | None = None


class PortModel(Protocol[H]):
    """One model as the planner sees it: a backend's adapter, built per model.

    Handles (``H``) are the backend's own objects for its layers. Arrays in and out are
    in the canonical layout; the adapter converts in :meth:`to_native` and :meth:`read`.
    Subclass it to inherit the defaults (no flatten order, no groups, no Scaled WS, no
    BatchNorm: a backend overrides what its layers have). See the module's example and
    ``tests/test_port_plan.py`` for a complete adapter over a dict of arrays.

    Attributes:
        flatten_order_matters: True where the framework flattens a feature map in a
            channels-last order (a dense after a Flatten then needs the checkpoint's
            ``flatten_from`` to permute its rows); False (default) where it flattens in
            the canonical order.
    """

    flatten_order_matters: bool = False

    def layers(self) -> list[Target[H]]:
        """The model's layers with parameters, in model order, as (name, handle, kind);
        refuses (:class:`~unorm.port.CheckpointError`) a layer with parameters that the
        checkpoint cannot describe, rather than skipping it."""
        ...

    def slots(self, handle: H, kind: str) -> dict[str, Slot]:
        """The roles (of :data:`ROLES`) the layer has, with their canonical shapes; a
        role the layer lacks (no bias, no running statistics) is absent."""
        ...

    def read(self, handle: H, kind: str, flatten_from: list[int] | None) -> dict[str, np.ndarray]:
        """The layer's arrays by role, in the canonical layout, in :data:`ROLES` order;
        a dense layer's rows put in channels-first order given its ``flatten_from``."""
        ...

    def to_native(
        self, handle: H, kind: str, role: str, value: np.ndarray, flatten_from: list[int] | None
    ) -> Any:
        """``value`` (canonical, shape checked) as :meth:`assign` will write it: the
        framework's layout and dtype. Pure: called while planning, before any write.
        Default: ``value`` itself."""
        del handle, kind, role, flatten_from
        return value

    def assign(self, handle: H, role: str, value: Any) -> None:
        """Write one value made by :meth:`to_native` into the layer's ``role``."""
        ...

    def flatten_from(self, handle: H) -> list[int] | None:
        """``[C, *spatial]`` of the feature map this dense layer reads flattened, where
        the model's structure says so; None where it does not, or is not known
        (default)."""
        del handle
        return None

    def groups(self, handle: H) -> int | None:
        """A convolution's group count; None: not known (default)."""
        del handle
        return None

    def ws_spec(self, handle: H) -> ScaledWSSpec | None:
        """The Scaled WS settings of a Scaled WS convolution, None for any other layer
        (default); such a layer takes the checkpoint's recorded ``ws`` settings."""
        del handle
        return None

    def batchnorm_spec(self, handle: H, name: str) -> BatchNormSpec:
        """The BatchNorm layer's settings in unorm's convention (a native layer's through
        :meth:`~unorm.spec.BatchNormSpec.from_native`; the ``ValueError`` of a setting it
        cannot express becomes a :class:`~unorm.port.CheckpointError` naming ``name``)."""
        raise CheckpointError(f"layer {name!r}: this model has no BatchNorm layers")

    def native_batchnorm(self, handle: H) -> bool:
        """Whether the BatchNorm layer is the framework's own (True) or unorm's (False).
        unorm's keeps its structure (axis, center, scale, running statistics) on load and
        takes every other setting from the checkpoint; a native one takes what it can."""
        del handle
        return False

    def check_spec(self, handle: H, spec: BatchNormSpec, where: str) -> None:
        """Refuse (:class:`~unorm.port.CheckpointError`, prefixed ``where``) a BatchNorm
        setting this layer cannot take, before anything is written. Default: none."""
        del handle, spec, where

    def set_spec(self, handle: H, spec: BatchNormSpec | ScaledWSSpec, source: Layer) -> None:
        """Give the layer the settings planned for it, after every value is written;
        ``source`` is the checkpoint's layer they come from (its name, for warnings)."""
        raise NotImplementedError(f"layer {source.name!r}: this model takes no settings")

    def flow(self) -> list[flows.FlowNode] | None:
        """The model's data flow over its :meth:`layers` (:mod:`unorm._core.flow`), or
        None where it cannot be read (default; a model whose graph does not trace): the
        layers are then matched by order."""
        return None

    def run_probe(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The model's eval-mode output on ``x`` and every layer's output (by the names
        :meth:`layers` gives; a layer it cannot observe may be absent), all in the
        canonical channels-first layout, as float NumPy arrays; ``x`` is canonical too.
        Changes no state (running statistics, training flags). Default: not supported
        (``NotImplementedError``): such a model exports without a probe and loads
        unverified, with a warning."""
        del x
        raise NotImplementedError("this model cannot run a probe")


def kind_of(layer: object, classes: Sequence[tuple[str, type | tuple[type, ...]]]) -> str | None:
    """The kind of the first ``(kind, classes)`` entry ``layer`` is an instance of, or None
    (a layer the checkpoint does not describe). Put subclasses first: a framework's
    transposed convolution is often a subclass of its convolution.

    Example:
        >>> kind_of(True, [("flag", bool), ("number", int)]), kind_of("x", [("n", int)])
        ('flag', None)
    """
    return next((kind for kind, types in classes if isinstance(layer, types)), None)


def present_roles(layer: object, kind: str, attrs: Mapping[str, str]) -> list[tuple[str, Any]]:
    """(role, attribute) for every role of ``kind`` (:data:`ROLES` order) whose attribute
    (named by ``attrs``: role -> attribute name) ``layer`` has and is not None.

    Example:
        >>> class Fc: weight, bias = "W", None
        >>> present_roles(Fc(), "dense", {"weight": "weight", "bias": "bias", "gain": "gain"})
        [('weight', 'W')]
    """
    found = [(role, getattr(layer, attrs[role], None)) for role in ROLES[kind]]
    return [(role, value) for role, value in found if value is not None]


# -- matching ------------------------------------------------------------------------------

#: Pairs a checkpoint's layers with a model's: (checkpoint index, checkpoint layer, model
#: layer) for every layer of both, or a :class:`~unorm.port.CheckpointError`.
Matcher = Callable[[Checkpoint, Sequence[Target[Any]]], list[tuple[int, Layer, Target[Any]]]]


def match_by_order(
    ckpt: Checkpoint, targets: Sequence[Target[Any]]
) -> list[tuple[int, Layer, Target[Any]]]:
    """Pair the checkpoint's layers with the model's by position (:data:`Matcher`).

    Raises :class:`~unorm.port.CheckpointError` when the counts differ (kinds are checked
    by :func:`plan_load`, whose message names both layers).

    Example:
        >>> ckpt = Checkpoint([Layer("a", "dense", {})], {}, source="numpy")
        >>> [(i, la.name, t[0]) for i, la, t in match_by_order(ckpt, [("fc", None, "dense")])]
        [(0, 'a', 'fc')]
    """
    pairs = match_layers(ckpt, [kind for _, _, kind in targets])
    return [(index, layer, target) for (index, layer), target in zip(pairs, targets, strict=True)]


def match_by_names(mapping: Mapping[str, str]) -> Matcher:
    """A :data:`Matcher` that pairs the layers ``mapping`` names (checkpoint layer name
    -> model layer name) and every other layer by order among those left: the explicit
    way to settle a pairing the data flow cannot (an untraceable model). Names that are
    not layers, or a model layer named twice, are a :class:`~unorm.port.CheckpointError`.

    Example:
        >>> ckpt = Checkpoint([Layer("a", "dense", {}), Layer("b", "dense", {})], {}, "x")
        >>> targets = [("fc1", None, "dense"), ("fc2", None, "dense")]
        >>> [(la.name, t[0]) for _, la, t in match_by_names({"a": "fc2"})(ckpt, targets)]
        [('a', 'fc2'), ('b', 'fc1')]
    """

    def match(
        ckpt: Checkpoint, targets: Sequence[Target[Any]]
    ) -> list[tuple[int, Layer, Target[Any]]]:
        by_name = {t[0]: t for t in targets}
        known = {la.name for la in ckpt.layers}
        unknown = sorted(set(mapping) - known)
        missing = sorted(set(mapping.values()) - set(by_name))
        if unknown or missing:
            raise CheckpointError(
                f"mapping names layers that do not exist: checkpoint {unknown}, model "
                f"{missing}; the checkpoint has {sorted(known)}, the model {sorted(by_name)}"
            )
        if len(set(mapping.values())) != len(mapping):
            raise CheckpointError(f"mapping gives one model layer twice: {dict(mapping)}")
        taken = set(mapping.values())
        rest = iter([t for t in targets if t[0] not in taken])
        if len(ckpt.layers) != len(targets):
            match_layers(ckpt, [kind for _, _, kind in targets])  # names both counts
        return [
            (i, la, by_name[mapping[la.name]] if la.name in mapping else next(rest))
            for i, la in enumerate(ckpt.layers)
        ]

    return match


def _signature(kind: str, shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A layer's kind and the shape that identifies it (its weight's; a BatchNorm's
    feature count), the same whether read from a checkpoint or a model."""
    if "weight" in shapes:
        return f"{kind} {tuple(shapes['weight'])}"
    for role in ("running_mean", "gamma", "beta"):
        if role in shapes:
            return f"{kind} {tuple(shapes[role])}"
    return kind


def pair_checkpoints(a: Checkpoint, b: Checkpoint) -> dict[int, int]:
    """Layer index in checkpoint ``a`` -> the same layer's index in ``b`` (two exports of
    one architecture, e.g. from two frameworks): along the two recorded data flows where
    both have one, else by position. :class:`~unorm.port.CheckpointError` where the layer
    counts or the flows' structures differ.

    Example:
        >>> import numpy as np
        >>> one = Checkpoint([Layer("fc", "dense", {"weight": "w"})], {"w": np.ones((2, 3))}, "x")
        >>> pair_checkpoints(one, one)
        {0: 0}
    """
    if len(a.layers) != len(b.layers):
        raise CheckpointError(f"{len(a.layers)} layers against {len(b.layers)}: no pairing")
    fa, fb = a.extra.get("flow"), b.extra.get("flow")
    if fa is None or fb is None:
        return {i: i for i in range(len(a.layers))}

    def signatures(ckpt: Checkpoint) -> list[str]:
        return [
            _signature(la.kind, {r: tuple(ckpt.tensor(la, r).shape) for r in la.tensors})
            for la in ckpt.layers
        ]

    try:
        return flows.match_flows(
            flows.from_json(fa), signatures(a), flows.from_json(fb), signatures(b)
        )
    except flows.FlowError as err:
        raise CheckpointError(f"the two checkpoints' data flows differ: {err}") from None


def match_by_flow(
    model: PortModel[Any], ckpt: Checkpoint, targets: Sequence[Target[Any]]
) -> list[tuple[int, Layer, Target[Any]]] | None:
    """Pair the checkpoint's layers with the model's along both data flows
    (:func:`unorm._core.flow.match_flows`), whatever order either defined them in.

    Where the flows match only when layers are compared by kind (a shape differs), that
    pairing is returned, so that :func:`plan_load` names the two layers whose shapes
    differ. None when either side has no flow or the structures differ: the caller then
    matches by order, whose checks name the first pair that does not fit, and the
    checkpoint's probe refuses what shapes alone would let through."""
    recorded = ckpt.extra.get("flow")
    own = model.flow() if recorded is not None else None
    if recorded is None or own is None:
        return None
    try:
        source = flows.from_json(recorded)
    except flows.FlowError as err:
        raise CheckpointError(f"the checkpoint's data flow: {err}") from None
    ckpt_sigs = [
        _signature(la.kind, {r: tuple(ckpt.tensor(la, r).shape) for r in la.tensors})
        for la in ckpt.layers
    ]
    model_sigs = [
        _signature(kind, {r: s.shape for r, s in model.slots(handle, kind).items()})
        for _, handle, kind in targets
    ]
    kinds = ([la.kind for la in ckpt.layers], [kind for _, _, kind in targets])
    for signatures in ((ckpt_sigs, model_sigs), kinds):
        try:
            pairs = flows.match_flows(source, signatures[0], own, signatures[1])
        except flows.FlowError:
            continue
        return [(i, ckpt.layers[i], targets[pairs[i]]) for i in range(len(ckpt.layers))]
    return None


# -- checks --------------------------------------------------------------------------------


def check_shape(role: str, given: tuple[int, ...], expected: tuple[int, ...], where: str) -> None:
    """Refuse a ``role`` array of shape ``given`` for a model that expects ``expected``.

    Example:
        >>> check_shape("weight", (10, 3), (12, 3), "layer 0")
        Traceback (most recent call last):
        unorm.port.CheckpointError: layer 0: weight shape (10, 3) in the checkpoint,
        (12, 3) in the model
    """
    if tuple(given) != tuple(expected):
        raise CheckpointError(
            f"{where}: {role} shape {tuple(given)} in the checkpoint, "
            f"{tuple(expected)} in the model"
        )


def check_flatten_from(
    layer: Layer,
    model_flat: list[int] | None,
    in_features: int,
    order_matters: bool,
    where: str,
) -> list[int] | None:
    """The checkpoint's ``flatten_from`` for a dense layer, checked against the model.

    ``model_flat``: ``[C, *spatial]`` of the map the model's dense reads flattened (None:
    none, or not known); ``in_features``: its input size; ``order_matters``: the model's
    framework flattens channels-last, so an entry without ``flatten_from`` after a Flatten
    of a map is refused (its row order is unknown). Returns the sizes to undo, or None.

    Example:
        >>> fc = Layer("fc", "dense", {}, {"flatten_from": [2, 3, 3]})
        >>> check_flatten_from(fc, None, 18, True, "layer 1")
        [2, 3, 3]
        >>> check_flatten_from(fc, None, 17, True, "layer 1")
        Traceback (most recent call last):
        unorm.port.CheckpointError: layer 1: flatten_from [2, 3, 3] (18 features) in the
        checkpoint, 17 input features in the model
    """
    given = layer.attrs.get("flatten_from")
    if given is None:
        if order_matters and model_flat is not None and math.prod(model_flat[1:]) > 1:
            raise CheckpointError(
                f"{where}: the model's dense follows a Flatten of a {model_flat} "
                "(channels-first) feature map, but the checkpoint records no flatten_from, "
                "so the order of its input features is unknown; export the source with an "
                "example input"
            )
        return None
    if (
        not isinstance(given, list)
        or len(given) < 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in given)
    ):
        raise CheckpointError(f"{where}: flatten_from must list positive sizes, got {given!r}")
    if math.prod(given) != in_features:
        raise CheckpointError(
            f"{where}: flatten_from {given} ({math.prod(given)} features) in the checkpoint, "
            f"{in_features} input features in the model"
        )
    if model_flat is not None and list(model_flat) != given:
        raise CheckpointError(
            f"{where}: flatten_from {given} in the checkpoint, {model_flat} in the model "
            "(channels-first)"
        )
    return list(given)


def _role_values(
    ckpt: Checkpoint, layer: Layer, kind: str, slots: Mapping[str, Slot], where: str
) -> dict[str, np.ndarray]:
    """The checkpoint's array for every role the model's layer has, shapes checked."""
    values: dict[str, np.ndarray] = {}
    for role in ROLES[kind]:
        slot = slots.get(role)
        if slot is None and role == COUNTER:
            continue  # a layer that keeps no counter does not need the checkpoint's count
        if slot is not None and slot.fixed is not None:
            values[role] = _fixed_value(ckpt, layer, role, slot, slot.fixed, where)
            continue
        src = role_array(ckpt, layer, role, slot is not None, where)
        if src is None:
            continue
        assert slot is not None  # role_array refuses a role the model lacks
        check_shape(role, tuple(src.shape), slot.shape, where)
        values[role] = src
    return values


def _fixed_value(
    ckpt: Checkpoint, layer: Layer, role: str, slot: Slot, fixed: float, where: str
) -> np.ndarray:
    """A role the model's layer keeps at ``fixed``: the checkpoint may only agree."""
    if role in layer.tensors:
        src = ckpt.tensor(layer, role)
        check_shape(role, tuple(src.shape), slot.shape, where)
        if not np.all(src == fixed):
            flag = _FIXED_BY.get(role, role)
            raise CheckpointError(
                f"{where}: the model's layer has {flag}=False ({role} fixed at {fixed:g}), "
                f"the checkpoint's {role} is not all {fixed:g}"
            )
    return np.full(slot.shape, fixed)


def _check_groups(layer: Layer, own: int | None, where: str) -> None:
    given = layer.attrs.get("groups")
    if given is not None and own is not None and given != own:
        raise CheckpointError(f"{where}: groups {given} in the checkpoint, {own} in the model")


def _batchnorm_settings(
    model: PortModel[H], handle: H, name: str, layer: Layer, where: str
) -> BatchNormSpec | None:
    """The checkpoint's BatchNorm settings as this layer will take them (validated)."""
    if "spec" not in layer.attrs:
        return None
    try:
        spec = BatchNormSpec(**dict(layer.attrs["spec"]))
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{where}: invalid BatchNorm settings in the checkpoint: {err}"
        ) from None
    if not model.native_batchnorm(handle):
        own = _layer_spec(model, handle, name)
        # The layer's structure stays the model's: its parameters were built for these.
        spec = spec.replace(
            axis=own.axis,
            center=own.center,
            scale=own.scale,
            track_running_stats=own.track_running_stats,
        )
    model.check_spec(handle, spec, where)
    return spec


def _layer_spec(model: PortModel[H], handle: H, name: str) -> BatchNormSpec:
    """The layer's own BatchNorm settings; a native setting unorm cannot express is
    refused with the layer's name."""
    try:
        return model.batchnorm_spec(handle, name)
    except CheckpointError:
        raise
    except ValueError as err:  # from BatchNormSpec.from_native
        raise CheckpointError(f"layer {name!r}: {err}") from None


def warn_native_gaps(
    spec: BatchNormSpec,
    framework: str,
    layer: str,
    convert: str,
    source: Layer,
    stacklevel: int = 6,
) -> None:
    """Warn (``UserWarning``) that the framework's own BatchNorm cannot express all of
    ``spec``, the settings it was given from ``source``; silent when it can.

    ``framework``: the native preset's name (``spec.native_gaps(framework)`` lists what is
    lost); ``layer``: how the framework's class is called in the message; ``convert``: the
    call that swaps it for unorm's layer. ``stacklevel`` 6 points at the caller of the
    backend's ``load_checkpoint`` when called from :meth:`PortModel.set_spec`.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_native_gaps(BatchNormSpec(), "mxnet", "Native", "convert()",
        ...                      Layer("bn", "batchnorm", {}), stacklevel=2)
        >>> print(caught[0].message)
        'bn': Native cannot express the source's training semantics (running_var='unbiased',
        skip_nonfinite=True, allow_single_value=False, update_on='forward',
        empty_batch='skip'); eval output is unchanged, training differs. Use convert() first.
    """
    lost = spec.native_gaps(framework)
    if lost:
        warnings.warn(
            f"{source.name!r}: {layer} cannot express the source's training semantics "
            f"({', '.join(lost)}); eval output is unchanged, training differs. "
            f"Use {convert} first.",
            stacklevel=stacklevel,
        )


# -- plan, apply, export ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step(Generic[H]):
    """One layer of a complete plan: every check done, nothing written yet.

    Attributes:
        index: the layer's position in the checkpoint.
        name: the model's name of the layer.
        handle: the backend's handle of it.
        kind: its kind (one of :data:`ROLES`).
        source: the checkpoint's layer it takes its state from.
        values: role -> value in the framework's layout (:meth:`PortModel.to_native`).
        spec: the settings it takes (a BatchNorm's, a Scaled WS convolution's), or None.

    Example:
        >>> step = Step(0, "fc", "fc", "dense", Layer("fc", "dense", {}), {}, None)
        >>> step.spec is None
        True
    """

    index: int
    name: str
    handle: H
    kind: str
    source: Layer
    values: dict[str, Any]
    spec: Spec | None


def plan_load(model: PortModel[H], ckpt: Checkpoint, match: Matcher | None = None) -> list[Step[H]]:
    """Check everything ``ckpt`` needs of ``model`` and return the plan; write nothing.

    ``match`` pairs the layers (default: along the data flow where the checkpoint
    records one and the model can give its own, :func:`match_by_flow`, else by order,
    :func:`match_by_order`). Per pair, in this order:
    kinds; every role of the kind (present on both sides or neither, canonical shapes,
    fixed values); a convolution's groups; a dense layer's ``flatten_from``
    (:func:`check_flatten_from`); the BatchNorm settings (valid, takeable by the layer)
    or the Scaled WS settings. The first failure raises
    :class:`~unorm.port.CheckpointError` naming both layers.

    Example:
        >>> ckpt = Checkpoint([Layer("bn", "batchnorm", {})], {}, source="numpy")
        >>> class Conv(PortModel[int]):
        ...     def layers(self): return [("conv", 0, "conv")]
        >>> plan_load(Conv(), ckpt)
        Traceback (most recent call last):
        unorm.port.CheckpointError: layer 0: checkpoint batchnorm 'bn' vs model conv 'conv':
        kinds differ
    """
    plan: list[Step[H]] = []
    targets = model.layers()
    paired = None if match is not None else match_by_flow(model, ckpt, targets)
    if paired is None:
        paired = (match or match_by_order)(ckpt, targets)
    for index, layer, (name, handle, kind) in paired:
        where = f"layer {index}: checkpoint {describe(layer, ckpt)} vs model {kind} {name!r}"
        if kind != layer.kind:
            raise CheckpointError(f"{where}: kinds differ")
        slots = model.slots(handle, kind)
        values = _role_values(ckpt, layer, kind, slots, where)
        flatten: list[int] | None = None
        spec: Spec | None = None
        if kind == "batchnorm":
            spec = _batchnorm_settings(model, handle, name, layer, where)
        else:
            if kind != "dense":
                _check_groups(layer, model.groups(handle), where)
            weight = slots.get("weight")
            if kind == "dense" and weight is not None:
                in_features = weight.shape[1]
                flat = model.flatten_from(handle)
                order = model.flatten_order_matters
                flatten = check_flatten_from(layer, flat, in_features, order, where)
            if model.ws_spec(handle) is not None:
                spec = _recorded_ws(layer, where)
        native = {
            role: model.to_native(handle, kind, role, value, flatten)
            for role, value in values.items()
        }
        plan.append(Step(index, name, handle, kind, layer, native, spec))
    return plan


def apply_plan(model: PortModel[H], plan: Sequence[Step[H]]) -> None:
    """Write a plan made by :func:`plan_load`: every value of every layer, then the
    settings (a setting may be read from the values, so they go first).

    Example: see :func:`load`.
    """
    for step in plan:
        for role, value in step.values.items():
            model.assign(step.handle, role, value)
    for step in plan:
        if step.spec is not None:
            model.set_spec(step.handle, step.spec, step.source)


class UnverifiedLoadWarning(UserWarning):
    """A load that could not be checked on a probe: the checkpoint carries none (a file
    from before probes, or exported without an example input), or the model cannot run
    one."""


def load(
    model: PortModel[H],
    ckpt: Checkpoint,
    match: Matcher | None = None,
    refresh: Callable[[Sequence[Step[H]]], None] | None = None,
) -> list[Step[H]]:
    """:func:`plan_load`, :func:`apply_plan`, then the probe's check; returns the plan
    that was applied.

    ``refresh`` is called with the plan after every write (a backend's hook for what it
    must redo once values or settings change, e.g. clearing traced graphs) and before the
    model runs. With a probe (:mod:`unorm._core.probe`), the model runs on the probe's
    input; an output other than the source's (beyond :data:`~unorm._core.probe.RTOL` of
    its scale), or a model that fails to run on it, puts back every value and setting the
    model had and raises :class:`~unorm.port.CheckpointError` naming the first layer whose
    output diverges. Without one, the load is made and an :class:`UnverifiedLoadWarning`
    says it was not verified.

    Example: see the module's.
    """
    plan = plan_load(model, ckpt, match)
    probe = probes.Probe.from_tensors(ckpt.tensors, len(ckpt.layers))
    before = _snapshot(model) if probe is not None else None
    apply_plan(model, plan)
    if refresh is not None:
        refresh(plan)
    if probe is None:
        warnings.warn(
            "the checkpoint carries no probe (exported without an example input, or by an "
            "older unorm): the load is not verified against the source's outputs",
            UnverifiedLoadWarning,
            stacklevel=3,
        )
        return plan
    assert before is not None
    failure = _verify(model, ckpt, plan, probe)
    if failure is not None:
        _restore(model, before, plan, refresh)
        raise CheckpointError(f"{failure}; the model is left as it was")
    return plan


def _snapshot(model: PortModel[H]) -> Checkpoint | None:
    """The model's own state, to put back after a failed probe (None: it has none to
    read yet, e.g. an unbuilt layer; such a model is then restored by nothing)."""
    try:
        return export(model, source="snapshot", with_flow=False)  # restored by order
    except CheckpointError:
        return None


def _restore(
    model: PortModel[H],
    before: Checkpoint | None,
    plan: Sequence[Step[H]],
    refresh: Callable[[Sequence[Step[H]]], None] | None,
) -> None:
    if before is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model's own settings, written back
        back = plan_load(model, before, match_by_order)  # its own layers, in its own order
        apply_plan(model, back)
    if refresh is not None:
        refresh(back)


def _verify(
    model: PortModel[H], ckpt: Checkpoint, plan: Sequence[Step[H]], probe: probes.Probe
) -> str | None:
    """Why the loaded model fails the probe, or None when it passes."""
    try:
        output, outputs = model.run_probe(probe.input)
    except NotImplementedError:
        warnings.warn(
            "this model cannot run the checkpoint's probe: the load is not verified",
            UnverifiedLoadWarning,
            stacklevel=4,
        )
        return None
    except Exception as err:  # a model that cannot take the source's input
        return f"the loaded model fails on the checkpoint's probe input: {err}"
    why = probes.mismatch(probe.output, output)
    if why is None:
        return None
    per_layer = {s.index: outputs[s.name] for s in plan if s.name in outputs}
    names = {s.index: s.name for s in plan}
    first = probes.first_divergence(probe, per_layer, [s.index for s in plan])
    if not set(per_layer) & set(probe.digests):
        where = (
            "no layer's own output could be compared (the model runs them unobserved, e.g. "
            "hybridized or compiled, or the checkpoint has no digests), so no layer is named"
        )
    elif first is None:
        where = (
            "no layer with parameters diverges, so what differs comes after the last one "
            "(an activation, pooling or head the two models compute differently)"
        )
    else:
        index, layer_why = first
        layer = ckpt.layers[index]
        where = (
            f"the first layer whose output diverges is layer {index}: checkpoint "
            f"{describe(layer, ckpt)} (model {names[index]!r}), {layer_why}"
        )
    return f"the loaded model's output on the checkpoint's probe is {why}; {where}"


def export(
    model: PortModel[Any],
    source: str,
    probe_input: np.ndarray | None = None,
    with_flow: bool = True,
) -> Checkpoint:
    """The checkpoint of ``model``: its layers in order, each with its arrays (named
    ``"{layer}.{role}"``, canonical layout) and attributes (``groups``, ``flatten_from``,
    ``ws``; a BatchNorm's ``spec`` and whether it is ``native``). ``source`` names the
    framework it came from. ``probe_input`` (canonical layout, e.g.
    :func:`unorm._core.probe.make_input`): the model runs on it in eval mode and the
    checkpoint carries the probe every load is verified on (a model that cannot run one
    exports without it). ``with_flow``: record the model's data flow (default; a model
    snapshot put back by order needs none, and reading the flow traces the model).

    Example: see the module's.
    """
    layers: list[Layer] = []
    tensors: dict[str, np.ndarray] = {}
    flow = model.flow() if with_flow else None
    for name, handle, kind in model.layers():
        flatten = model.flatten_from(handle) if kind == "dense" else None
        attrs: dict[str, Any] = {}
        if kind == "batchnorm":
            spec = _layer_spec(model, handle, name)
            if spec.renorm:
                # Its renorm statistics have no role here yet: a load would restart them.
                raise CheckpointError(
                    f"{name}: a BatchNorm with renorm=True cannot be exported yet (the "
                    "checkpoint has no place for its renorm_mean and renorm_std)"
                )
            attrs = {"spec": dataclasses.asdict(spec), "native": model.native_batchnorm(handle)}
        else:
            groups = model.groups(handle) if kind != "dense" else None
            if groups is not None:
                attrs["groups"] = int(groups)
            if flatten is not None:
                attrs["flatten_from"] = list(flatten)
            ws = model.ws_spec(handle)
            if ws is not None:  # a Scaled WS convolution: its settings travel with it
                attrs["ws"] = {"style": ws.style, "eps": ws.eps}
        roles: dict[str, str] = {}
        for role, value in model.read(handle, kind, flatten).items():
            key = f"{name}.{role}"
            tensors[key] = value
            roles[role] = key
        layers.append(Layer(name, kind, roles, attrs))
    if probe_input is not None:
        tensors.update(_probe(model, probe_input))
    extra = {} if flow is None else {"flow": flows.to_json(flow)}
    return Checkpoint(layers=layers, tensors=tensors, source=source, extra=extra)


def _probe(model: PortModel[Any], x: np.ndarray) -> dict[str, np.ndarray]:
    """The probe's tensors for ``model`` on input ``x``; none when it cannot run one."""
    try:
        output, outputs = model.run_probe(np.asarray(x, dtype=np.float32))
    except NotImplementedError:
        return {}
    names = [name for name, _, _ in model.layers()]
    digests = {i: probes.digest(outputs[n]) for i, n in enumerate(names) if n in outputs}
    made = probes.Probe(np.asarray(x, dtype=np.float32), np.asarray(output), digests)
    return made.tensors()


# -- what every backend's native files share ---------------------------------------------------


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[str]:
    """A temporary file name in ``target``'s folder, renamed over ``target`` when the
    block succeeds and removed when it fails: a crash leaves the old file or the new one.

    ``suffix``: the temporary name's ending (default ``.tmp``), for writers that read the
    format from the name (``.keras``). The file ends with the mode an existing ``target``
    had, else the one the umask gives; a missing folder is a
    :class:`~unorm.port.CheckpointError` naming it (:func:`unorm.port.temporary_beside`).

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "state.txt")
        >>> with atomic_file(path) as tmp:
        ...     _ = Path(tmp).write_text("done")
        >>> Path(path).read_text()
        'done'
    """
    path = Path(target)
    tmp = temporary_beside(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_state_fits(
    path: str | os.PathLike[str],
    word: str,
    given: Mapping[str, tuple[int, ...]],
    own: Mapping[str, tuple[int, ...]],
) -> None:
    """Refuse a native state file whose entries do not fit the model, before any is set.

    ``given``/``own``: entry name -> shape in the file and in the model; ``word`` says what
    the framework calls its entries (``keys``, ``names``).

    Example:
        >>> check_state_fits("m.pt", "keys", {"w": (2, 4)}, {"w": (2, 3)})
        Traceback (most recent call last):
        unorm.port.CheckpointError: m.pt: 'w' has shape (2, 4), the model's (2, 3)
    """
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: {word} do not fit the model (a file of another model?): missing "
            f"{_some(missing)}, unexpected {_some(unexpected)}"
        )
    for key, shape in given.items():
        if tuple(shape) != tuple(own[key]):
            raise CheckpointError(
                f"{path}: {key!r} has shape {tuple(shape)}, the model's {tuple(own[key])}"
            )


def _some(names: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names`` and how many more (a ResNet has hundreds)."""
    if len(names) <= shown:
        return repr(list(names))
    return f"{list(names[:shown])!r} and {len(names) - shown} more"
