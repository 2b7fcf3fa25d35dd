"""Parameter types, presets and validation messages of unorm.spec."""

from __future__ import annotations

import math

import pytest

from unorm._core.registry import plugins_in_order
from unorm.spec import (
    PRESETS,
    AGCSpec,
    BatchNormSpec,
    normalize_axis,
    output_unit_axes,
)


def test_canonical_defaults() -> None:
    spec = BatchNormSpec()
    assert (spec.eps, spec.momentum, spec.axis) == (1e-5, 0.1, 1)
    assert spec.running_var == "unbiased" and spec.unbiased
    assert spec.skip_nonfinite and not spec.allow_single_value
    assert spec.update_on == "forward" and spec.preset is None
    assert (AGCSpec().clipping, AGCSpec().eps) == (0.01, 1e-3)


def test_specs_are_frozen() -> None:
    with pytest.raises(AttributeError):
        BatchNormSpec().eps = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("preset", "eps", "momentum", "running_var", "update_on"),
    [
        ("torch", 1e-5, 0.1, "unbiased", "forward"),
        ("keras", 1e-3, 0.01, "biased", "forward"),
        ("mxnet", 1e-5, 0.1, "biased", "backward"),
        ("flax", 1e-5, 0.01, "biased", "forward"),
    ],
)
def test_presets(
    preset: str, eps: float, momentum: float, running_var: str, update_on: str
) -> None:
    spec = BatchNormSpec.from_preset(preset)
    assert spec.eps == eps and math.isclose(spec.momentum or 0, momentum, rel_tol=1e-12)
    assert spec.running_var == running_var and spec.update_on == update_on
    assert spec.preset == preset and not spec.skip_nonfinite
    assert list(PRESETS) == [p.name for p in plugins_in_order()]  # one per plug-in


def test_preset_overrides_use_unorm_convention() -> None:
    spec = BatchNormSpec.from_preset("keras", momentum=0.2, axis=-1)
    assert spec.momentum == 0.2 and spec.eps == 1e-3 and spec.axis == -1


@pytest.mark.parametrize(
    ("framework", "native", "expected"),
    [
        (
            "torch",
            {"eps": 1e-3, "momentum": None, "affine": False},
            {"eps": 1e-3, "momentum": None, "center": False, "scale": False},
        ),
        (
            "keras",
            {"momentum": 0.9, "epsilon": 1e-4, "center": False},
            {"momentum": 1 - 0.9, "eps": 1e-4, "center": False},
        ),
        (
            "mxnet",
            {"momentum": 0.99, "scale": False, "axis": 3},
            {"momentum": 1 - 0.99, "scale": False, "axis": 3},
        ),
    ],
)
def test_from_native_translates_conventions(
    framework: str, native: dict[str, object], expected: dict[str, object]
) -> None:
    spec = BatchNormSpec.from_native(framework, **native)
    for key, value in expected.items():
        assert getattr(spec, key) == value, key
    assert spec.preset == framework


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -1e-5}, r"eps must be a finite number >= 0, got -1e-05"),
        ({"eps": float("nan")}, r"eps must be a finite number >= 0, got nan"),
        ({"eps": "0.1"}, r"eps must be a finite number >= 0, got '0.1'"),
        ({"momentum": 1.5}, r"momentum must be a number in \[0, 1\] or None, got 1.5"),
        ({"momentum": -0.1}, r"momentum must be a number in \[0, 1\] or None, got -0.1"),
        ({"momentum": True}, r"momentum must be a number in \[0, 1\] or None, got True"),
        ({"axis": 1.0}, r"axis must be an integer, got 1.0"),
        ({"center": 1}, r"center must be True or False, got 1"),
        (
            {"running_var": "sample"},
            r"running_var must be one of 'unbiased', 'biased', got 'sample'",
        ),
        ({"update_on": "step"}, r"update_on must be one of 'forward', 'backward', got 'step'"),
        (
            {"preset": "pytorch"},
            r"preset must be one of 'torch', 'keras', 'mxnet', 'flax' or None, got 'pytorch'",
        ),
    ],
)
def test_batchnorm_validation_names_parameter_value_and_range(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        BatchNormSpec(**kwargs)  # type: ignore[arg-type]


def test_unknown_preset_and_native_arguments() -> None:
    with pytest.raises(
        ValueError,
        match="preset must be one of 'torch', 'keras', 'mxnet', 'flax' or None, got 'tf'",
    ):
        BatchNormSpec.from_preset("tf")
    with pytest.raises(ValueError, match="unknown argument"):
        BatchNormSpec.from_native("keras", beta_initializer="zeros")
    with pytest.raises(
        ValueError, match=r"momentum must be a number in \[0, 1\] \(keras convention\)"
    ):
        BatchNormSpec.from_native("keras", momentum=1.2)
    with pytest.raises(ValueError, match="use_global_stats must be False"):
        BatchNormSpec.from_native("mxnet", use_global_stats=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clipping": 0.0}, r"clipping must be a finite number > 0, got 0.0"),
        ({"clipping": -0.01}, r"clipping must be a finite number > 0, got -0.01"),
        ({"clipping": float("inf")}, r"clipping must be a finite number > 0, got inf"),
        ({"eps": -1.0}, r"eps must be a finite number >= 0, got -1.0"),
    ],
)
def test_agc_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AGCSpec(**kwargs)


def test_normalize_axis() -> None:
    assert normalize_axis(-1, 4) == 3 and normalize_axis(0, 1) == 0
    with pytest.raises(
        ValueError, match=r"axis must be an integer in \[-2, 2\) for an input of rank 2, got 2"
    ):
        normalize_axis(2, 2)
    with pytest.raises(ValueError, match=r"channel_axis must be an integer"):
        normalize_axis(True, 2, "channel_axis")


def test_output_unit_axes_table() -> None:
    assert output_unit_axes("torch", "dense", 2) == 0
    assert output_unit_axes("keras", "dense", 2) == 1
    assert output_unit_axes("torch", "conv_transpose", 4) == 1
    assert output_unit_axes("mxnet", "conv_transpose", 4) == 1
    assert output_unit_axes("keras", "conv_transpose", 4) == 2
    assert output_unit_axes("keras", "conv", 3) == 2
    assert output_unit_axes("keras", "depthwise_conv", 4) == (2, 3)
    assert output_unit_axes("keras", "embedding", 2) == 0
    assert output_unit_axes("keras", "conv", 1) is None  # a bias is one unit
    with pytest.raises(ValueError, match="layer_kind must be one of"):
        output_unit_axes("torch", "lstm", 2)


@pytest.mark.parametrize("framework", ["torch", "keras", "mxnet", "flax"])
def test_native_gaps_are_the_settings_a_native_layer_cannot_be_told(framework: str) -> None:
    assert BatchNormSpec.from_preset(framework, eps=0.1, momentum=0.3).native_gaps(framework) == []
    canonical = BatchNormSpec(momentum=None).native_gaps(framework)
    want = {
        "torch": ["skip_nonfinite=True", "empty_batch='skip'"],
        "keras": [
            "momentum=None",
            "running_var='unbiased'",
            "skip_nonfinite=True",
            "allow_single_value=False",
            "empty_batch='skip'",
            "fully_masked='error'",
        ],
        "mxnet": [
            "momentum=None",
            "running_var='unbiased'",
            "skip_nonfinite=True",
            "allow_single_value=False",
            "update_on='forward'",
            "empty_batch='skip'",
        ],
        "flax": [
            "momentum=None",
            "running_var='unbiased'",
            "skip_nonfinite=True",
            "allow_single_value=False",
            "empty_batch='skip'",
        ],
    }
    assert canonical == want[framework]
    # Only a framework whose layers take a mask can lose what a fully masked feature does.
    zero = BatchNormSpec(fully_masked="zero").native_gaps(framework)
    assert ("fully_masked='zero'" in zero) is False
    assert ("fully_masked='error'" in canonical) is (framework == "keras")
