"""The port planner (``unorm._core.port_plan``) against a backend of plain NumPy arrays.

The fake backend keeps each layer as a dict of canonical arrays, records every write and
every setting it is given, and says what its model knows (groups, flatten order, Scaled
WS, BatchNorm settings), so each check of the planner is tested on its own, without a
framework. The last tests hold each real backend's port module to :class:`PortBackend`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from typing import Any

import numpy as np
import pytest

from unorm._core import port_plan
from unorm._core.port_plan import (
    COUNTER,
    ROLES,
    PortBackend,
    PortModel,
    Slot,
    export,
    load,
    plan_load,
)
from unorm.port import Checkpoint, CheckpointError, Layer
from unorm.spec import BatchNormSpec, ScaledWSSpec


@dataclasses.dataclass
class FakeLayer:
    """One layer of the fake model: its arrays by role and what the model knows of it."""

    kind: str
    arrays: dict[str, np.ndarray]
    spec: BatchNormSpec | None = None
    native: bool = False
    groups: int | None = None
    flat: list[int] | None = None
    ws: ScaledWSSpec | None = None
    fixed: dict[str, float] = dataclasses.field(default_factory=dict)


class FakeModel(PortModel[str]):
    """A dict-of-arrays model; handles are the layers' names."""

    def __init__(self, layers: dict[str, FakeLayer], channels_last: bool = False) -> None:
        self.net = layers
        self.flatten_order_matters = channels_last
        self.writes: list[tuple[str, str]] = []
        self.given: list[tuple[str, BatchNormSpec | ScaledWSSpec, str]] = []
        self.flatten_seen: dict[str, list[int] | None] = {}

    def layers(self) -> list[tuple[str, str, str]]:
        return [(name, name, layer.kind) for name, layer in self.net.items()]

    def slots(self, handle: str, kind: str) -> dict[str, Slot]:
        layer = self.net[handle]
        return {role: Slot(a.shape, layer.fixed.get(role)) for role, a in layer.arrays.items()}

    def read(self, handle: str, kind: str, flatten_from: list[int] | None) -> dict[str, Any]:
        arrays = self.net[handle].arrays
        return {role: arrays[role].copy() for role in ROLES[kind] if role in arrays}

    def to_native(
        self, handle: str, kind: str, role: str, value: np.ndarray, flatten_from: list[int] | None
    ) -> Any:
        self.flatten_seen[handle] = flatten_from
        return np.asarray(value, dtype=self.net[handle].arrays[role].dtype)

    def assign(self, handle: str, role: str, value: Any) -> None:
        self.writes.append((handle, role))
        self.net[handle].arrays[role] = value

    def flatten_from(self, handle: str) -> list[int] | None:
        return self.net[handle].flat

    def groups(self, handle: str) -> int | None:
        return self.net[handle].groups

    def ws_spec(self, handle: str) -> ScaledWSSpec | None:
        return self.net[handle].ws

    def batchnorm_spec(self, handle: str, name: str) -> BatchNormSpec:
        spec = self.net[handle].spec
        assert spec is not None
        return spec

    def native_batchnorm(self, handle: str) -> bool:
        return self.net[handle].native

    def set_spec(self, handle: str, spec: BatchNormSpec | ScaledWSSpec, source: Layer) -> None:
        self.given.append((handle, spec, source.name))
        if isinstance(spec, ScaledWSSpec):
            self.net[handle].ws = spec
        else:
            self.net[handle].spec = spec


def _net(
    seed: int, units: int = 3, *, bn: BatchNormSpec | None = None, flat: list[int] | None = None
) -> FakeModel:
    """conv (2 channels of a 2x2 map, flattened to 8) -> batchnorm -> dense."""
    rng = np.random.default_rng(seed)

    def f32(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    stats = {"running_mean": f32(2), "running_var": np.abs(f32(2)) + 0.5}
    return FakeModel(
        {
            "conv": FakeLayer("conv", {"weight": f32(2, 1, 3, 3), "bias": f32(2)}, groups=1),
            "bn": FakeLayer(
                "batchnorm",
                {"gamma": f32(2), "beta": f32(2), **stats, COUNTER: np.asarray(seed, np.int64)},
                spec=bn or BatchNormSpec(),
            ),
            "fc": FakeLayer("dense", {"weight": f32(units, 8), "bias": f32(units)}, flat=flat),
        }
    )


def _state(model: FakeModel) -> dict[str, dict[str, np.ndarray]]:
    return {n: {r: a.copy() for r, a in la.arrays.items()} for n, la in model.net.items()}


def _refused(model: FakeModel, ckpt: Checkpoint, message: str) -> None:
    """The load fails with exactly ``message`` and writes nothing, settings included."""
    before = _state(model)
    with pytest.raises(CheckpointError) as caught:
        load(model, ckpt)
    assert str(caught.value) == message
    assert model.writes == [] and model.given == []
    after = _state(model)
    for name, arrays in before.items():
        for role, value in arrays.items():
            np.testing.assert_array_equal(after[name][role], value, err_msg=f"{name}.{role}")


def _with_layer(ckpt: Checkpoint, index: int, **changes: Any) -> Checkpoint:
    layers = list(ckpt.layers)
    layers[index] = dataclasses.replace(layers[index], **changes)
    return dataclasses.replace(ckpt, layers=layers)


# -- a load that fits -------------------------------------------------------------------------


def test_export_then_load_copies_every_array_and_the_settings() -> None:
    source, dest = _net(0, bn=BatchNormSpec(eps=1e-3, momentum=0.3)), _net(1)
    ckpt = export(source, source="numpy")
    assert [(la.name, la.kind) for la in ckpt.layers] == [
        ("conv", "conv"),
        ("bn", "batchnorm"),
        ("fc", "dense"),
    ]
    assert ckpt.layers[0].attrs == {"groups": 1}
    assert ckpt.layers[1].attrs["native"] is False
    plan = load(dest, ckpt)
    assert [step.name for step in plan] == ["conv", "bn", "fc"]
    for name, layer in source.net.items():
        for role, value in layer.arrays.items():
            np.testing.assert_array_equal(dest.net[name].arrays[role], value)
    assert int(dest.net["bn"].arrays[COUNTER]) == 0  # the source's count, not the model's 1
    # Every value is written before the first setting is given.
    assert len(dest.writes) == 2 + 5 + 2
    assert [(h, n) for h, _, n in dest.given] == [("bn", "bn")]


def test_a_batchnorm_spec_is_carried_over_and_the_layer_keeps_its_structure() -> None:
    theirs = BatchNormSpec(eps=1e-3, momentum=0.01, running_var="biased", axis=-1)
    ours = BatchNormSpec(eps=1e-5, momentum=0.1, axis=1, center=True, scale=True)
    dest = _net(1, bn=ours)
    load(dest, export(_net(0, bn=theirs), source="numpy"))
    given = dest.net["bn"].spec
    assert given is not None
    assert (given.eps, given.momentum, given.running_var) == (1e-3, 0.01, "biased")
    assert given.axis == 1  # unorm's layer keeps its own axis


def test_a_native_batchnorm_gets_the_checkpoint_spec_unchanged() -> None:
    theirs = BatchNormSpec(eps=1e-3, momentum=0.01, axis=-1)
    dest = _net(1)
    dest.net["bn"].native = True
    load(dest, export(_net(0, bn=theirs), source="numpy"))
    assert dest.given[0][1] == theirs  # the backend decides what its native layer can take


def test_the_counter_is_skipped_for_a_layer_without_one_and_required_by_one_with_it() -> None:
    ckpt = export(_net(0), source="numpy")
    no_counter = _net(1)
    del no_counter.net["bn"].arrays[COUNTER]
    load(no_counter, ckpt)
    assert ("bn", COUNTER) not in no_counter.writes
    bn = ckpt.layers[1]
    tensors = {k: v for k, v in bn.tensors.items() if k != COUNTER}
    _refused(
        _net(1),
        _with_layer(ckpt, 1, tensors=tensors),
        "layer 1: checkpoint batchnorm 'bn' vs model batchnorm 'bn': the checkpoint has no "
        "'num_batches_tracked'",
    )


def test_a_fixed_role_accepts_only_its_value_and_writes_it() -> None:
    def fixed_gamma() -> FakeModel:
        net = _net(1)
        net.net["bn"].fixed = {"gamma": 1.0}
        return net

    ckpt = export(_net(0), source="numpy")
    _refused(
        fixed_gamma(),
        ckpt,
        "layer 1: checkpoint batchnorm 'bn' vs model batchnorm 'bn': the model's layer has "
        "scale=False (gamma fixed at 1), the checkpoint's gamma is not all 1",
    )
    ones = {**ckpt.tensors, "bn.gamma": np.ones(2, np.float32)}
    dest = fixed_gamma()
    load(dest, dataclasses.replace(ckpt, tensors=ones))
    np.testing.assert_array_equal(dest.net["bn"].arrays["gamma"], np.ones(2))
    # A checkpoint without gamma fits as well: the layer's 1 is written.
    tensors = {k: v for k, v in ckpt.layers[1].tensors.items() if k != "gamma"}
    dest = fixed_gamma()
    load(dest, _with_layer(ckpt, 1, tensors=tensors))
    np.testing.assert_array_equal(dest.net["bn"].arrays["gamma"], np.ones(2))


# -- refusals: one message each, nothing written -------------------------------------------------


def test_a_shape_mismatch_names_both_layers_and_writes_nothing() -> None:
    _refused(
        _net(1, units=4),
        export(_net(0, units=3), source="numpy"),
        "layer 2: checkpoint dense 'fc' (3, 8) vs model dense 'fc': weight shape (3, 8) in the "
        "checkpoint, (4, 8) in the model",
    )


def test_a_late_failure_leaves_the_earlier_matching_layers_unwritten() -> None:
    ckpt = export(_net(0), source="numpy")
    bad = dataclasses.replace(ckpt, tensors={**ckpt.tensors, "fc.bias": np.zeros(5, np.float32)})
    _refused(
        _net(1),
        bad,
        "layer 2: checkpoint dense 'fc' (3, 8) vs model dense 'fc': bias shape (5,) in the "
        "checkpoint, (3,) in the model",
    )


def test_a_role_on_one_side_only_is_refused() -> None:
    ckpt = export(_net(0), source="numpy")
    no_bias = _net(1)
    del no_bias.net["conv"].arrays["bias"]
    _refused(
        no_bias, ckpt, "layer 0: checkpoint conv 'conv' (2, 1, 3, 3) vs model conv 'conv': the "
        "model has no 'bias'",
    )  # fmt: skip
    tensors = {"weight": ckpt.layers[0].tensors["weight"]}
    _refused(
        _net(1),
        _with_layer(ckpt, 0, tensors=tensors),
        "layer 0: checkpoint conv 'conv' (2, 1, 3, 3) vs model conv 'conv': the checkpoint "
        "has no 'bias'",
    )


def test_a_kind_mismatch_is_refused() -> None:
    dest = _net(1)
    dest.net["bn"].kind = "dense"
    _refused(
        dest,
        export(_net(0), source="numpy"),
        "layer 1: checkpoint batchnorm 'bn' vs model dense 'bn': kinds differ",
    )


def test_a_layer_count_mismatch_is_refused() -> None:
    dest = _net(1)
    del dest.net["bn"]
    _refused(
        dest,
        export(_net(0), source="numpy"),
        "the checkpoint has 3 layers with parameters, the model 2: ['conv', 'batchnorm', "
        "'dense'] vs ['conv', 'dense']",
    )


def test_groups_that_differ_are_refused() -> None:
    dest = _net(1)
    dest.net["conv"].groups = 2
    _refused(
        dest,
        export(_net(0), source="numpy"),
        "layer 0: checkpoint conv 'conv' (2, 1, 3, 3) vs model conv 'conv': groups 1 in the "
        "checkpoint, 2 in the model",
    )


def test_invalid_or_untakeable_batchnorm_settings_are_refused_before_any_write() -> None:
    ckpt = export(_net(0), source="numpy")
    attrs = {**ckpt.layers[1].attrs, "spec": {**ckpt.layers[1].attrs["spec"], "eps": -1.0}}
    with pytest.raises(CheckpointError, match="invalid BatchNorm settings in the checkpoint"):
        load(_net(1), _with_layer(ckpt, 1, attrs=attrs))

    class NoCumulative(FakeModel):
        def check_spec(self, handle: str, spec: BatchNormSpec, where: str) -> None:
            if spec.momentum is None:
                raise CheckpointError(f"{where}: momentum=None cannot be taken")

    cumulative = export(_net(0, bn=BatchNormSpec(momentum=None)), source="numpy")
    _refused(
        NoCumulative(_net(1).net),
        cumulative,
        "layer 1: checkpoint batchnorm 'bn' vs model batchnorm 'bn': momentum=None cannot be taken",
    )


def test_scaled_ws_settings_travel_and_invalid_ones_are_refused() -> None:
    source, dest = _net(0), _net(1)
    source.net["conv"].ws = ScaledWSSpec(style="timm")
    dest.net["conv"].ws = ScaledWSSpec()
    for net in (source, dest):
        net.net["conv"].arrays["gain"] = np.ones(2, np.float32)
    ckpt = export(source, source="numpy")
    assert ckpt.layers[0].attrs["ws"] == {"style": "timm", "eps": ScaledWSSpec(style="timm").eps}
    load(dest, ckpt)
    assert dest.net["conv"].ws == ScaledWSSpec(style="timm")
    attrs = {**ckpt.layers[0].attrs, "ws": {"style": "nope"}}
    dest = _net(2)
    dest.net["conv"].ws = ScaledWSSpec()
    dest.net["conv"].arrays["gain"] = np.ones(2, np.float32)
    with pytest.raises(CheckpointError, match="invalid Scaled WS settings"):
        load(dest, _with_layer(ckpt, 0, attrs=attrs))
    assert dest.writes == []


# -- flatten_from -------------------------------------------------------------------------------


def _flattened(given: Any) -> Checkpoint:
    ckpt = export(_net(0, flat=[2, 2, 2]), source="numpy")
    attrs = {} if given is None else {"flatten_from": given}
    return _with_layer(ckpt, 2, attrs=attrs)


WHERE = "layer 2: checkpoint dense 'fc' (3, 8) vs model dense 'fc'"


@pytest.mark.parametrize("given", [[8], [2, 0, 4], [2.0, 4], [True, 8], "2,2,2", {"c": 2}])
def test_flatten_from_must_list_positive_sizes(given: Any) -> None:
    _refused(
        _net(1), _flattened(given), f"{WHERE}: flatten_from must list positive sizes, got {given!r}"
    )


def test_flatten_from_must_fit_the_input_features_and_the_model() -> None:
    _refused(
        _net(1),
        _flattened([2, 3, 3]),
        f"{WHERE}: flatten_from [2, 3, 3] (18 features) in the checkpoint, 8 input features in "
        "the model",
    )
    _refused(
        _net(1, flat=[2, 2, 2]),
        _flattened([4, 2, 1]),
        f"{WHERE}: flatten_from [4, 2, 1] in the checkpoint, [2, 2, 2] in the model "
        "(channels-first)",
    )


def test_flatten_from_reaches_the_backend_and_is_required_only_where_order_matters() -> None:
    dest = _net(1, flat=[2, 2, 2])
    dest.flatten_order_matters = True
    load(dest, _flattened([2, 2, 2]))
    assert dest.flatten_seen == {"conv": None, "bn": None, "fc": [2, 2, 2]}
    # Channels-first: the rows are already in the checkpoint's order, nothing is needed.
    load(_net(1, flat=[2, 2, 2]), _flattened(None))
    channels_last = _net(1, flat=[2, 2, 2])
    channels_last.flatten_order_matters = True
    message = (
        f"{WHERE}: the model's dense follows a Flatten of a [2, 2, 2] (channels-first) feature "
        "map, but the checkpoint records no flatten_from, so the order of its input features is "
        "unknown; export the source with an example input"
    )
    _refused(channels_last, _flattened(None), message)
    # A map of one position per channel has one order: nothing to permute.
    one_position = _net(1, flat=[8, 1, 1])
    one_position.flatten_order_matters = True
    load(one_position, _flattened(None))


# -- the planner's parts ------------------------------------------------------------------------


def test_plan_load_writes_nothing_and_the_matcher_can_be_replaced() -> None:
    source = _net(0)
    ckpt = export(source, source="numpy")
    dest = _net(1)
    dest.net = dict(reversed(list(dest.net.items())))  # fc, bn, conv: order no longer pairs

    def by_name(ckpt: Checkpoint, targets: Any) -> list[tuple[int, Layer, Any]]:
        named = {name: target for target in targets for name in [target[0]]}
        return [(i, layer, named[layer.name]) for i, layer in enumerate(ckpt.layers)]

    with pytest.raises(CheckpointError, match="kinds differ"):
        plan_load(dest, ckpt)
    plan = plan_load(dest, ckpt, match=by_name)
    assert [s.name for s in plan] == ["conv", "bn", "fc"] and dest.writes == []
    port_plan.apply_plan(dest, plan)
    np.testing.assert_array_equal(
        dest.net["fc"].arrays["weight"], source.net["fc"].arrays["weight"]
    )


def test_check_state_fits_names_missing_and_unexpected_entries() -> None:
    message = (
        "f.pt: keys do not fit the model (a file of another model?): missing ['b'], "
        "unexpected ['c']"
    )
    with pytest.raises(CheckpointError, match=re.escape(message)):
        port_plan.check_state_fits("f.pt", "keys", {"a": (2,), "c": (1,)}, {"a": (2,), "b": (1,)})
    many = {f"k{i:02}": (1,) for i in range(12)}
    shown = "missing ['k00', 'k01', 'k02', 'k03', 'k04'] and 7 more, unexpected []"
    with pytest.raises(CheckpointError, match=re.escape(shown)):
        port_plan.check_state_fits("f.pt", "keys", {}, many)
    port_plan.check_state_fits("f.pt", "keys", {"a": (2,)}, {"a": (2,)})


def test_atomic_file_leaves_the_old_file_when_the_write_fails(tmp_path: Any) -> None:
    target = tmp_path / "model.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError), port_plan.atomic_file(target) as tmp:
        with open(tmp, "w") as out:
            out.write("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


# -- every backend's port module has the protocol's signatures ------------------------------------


def _positional(function: Any) -> list[str]:
    params = inspect.signature(function).parameters.values()
    required = [p for p in params if p.default is inspect.Parameter.empty]
    return [p.name for p in required]


@pytest.mark.parametrize(
    "framework",
    [
        pytest.param("torch", marks=pytest.mark.torch),
        pytest.param("keras", marks=pytest.mark.keras),
        pytest.param("mxnet", marks=pytest.mark.mxnet),
    ],
)
def test_each_backend_port_module_implements_port_backend(framework: str) -> None:
    module = importlib.import_module(f"unorm._{framework}.port")
    for name, member in inspect.getmembers(PortBackend, inspect.isfunction):
        if name.startswith("_"):
            continue
        expected = _positional(member)[1:]  # without self
        assert _positional(getattr(module, name)) == expected, f"{framework}.{name}"
