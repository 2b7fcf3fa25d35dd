"""unorm.keras's neutral-checkpoint export and load: round trips within Keras, to and
from PyTorch, through Keras's own files, and refusals that change nothing."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unorm import port

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

from unorm.keras import BatchNorm, export_checkpoint, load_checkpoint  # noqa: E402
from unorm.models.keras import lenet_bn  # noqa: E402

layers = keras.layers
LENET_KINDS = ["conv", "batchnorm"] * 2 + ["dense", "batchnorm"] * 2 + ["dense"]


def _batch(seed: int, shape: tuple[int, ...] = (8, 28, 28, 1)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _trained(seed: int, preset: str | None = None) -> Any:
    """A Keras LeNet whose BatchNorm statistics moved (two training forward passes)."""
    keras.utils.set_random_seed(seed)
    net = lenet_bn(preset)
    for step in range(2):
        net(_batch(100 * seed + step), training=True)
    return net


def _logits(net: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(net(x, training=False)))


def _weights(model: Any) -> list[np.ndarray]:
    # Variable.numpy(): Keras's get_weights() trips a NumPy 2 DeprecationWarning on TF.
    return [np.array(v.numpy()) for v in model.weights]


def _same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


def _through_file(ckpt: port.Checkpoint, path: Path) -> port.Checkpoint:
    port.save(ckpt, path)
    return port.load(path)


# -- (a) Keras -> file -> Keras ------------------------------------------------------------


def test_keras_round_trip_through_a_file_gives_identical_logits(tmp_path: Path) -> None:
    source, dest = _trained(0), _trained(1)
    ckpt = export_checkpoint(source)
    assert ckpt.source == "keras"
    assert [la.kind for la in ckpt.layers] == LENET_KINDS
    assert [la.name for la in ckpt.layers][:2] == ["conv1", "bn1"]
    assert ckpt.layers[4].attrs["flatten_from"] == [16, 4, 4]  # channels-first
    assert ckpt.layers[0].attrs["groups"] == 1 and ckpt.layers[1].attrs["native"] is False
    assert ckpt.tensor(ckpt.layers[0], "weight").shape == (6, 1, 5, 5)
    assert ckpt.tensor(ckpt.layers[4], "weight").shape == (120, 256)
    counter = ckpt.tensor(ckpt.layers[1], "num_batches_tracked")
    assert counter.dtype == np.int64 and counter.shape == ()
    load_checkpoint(dest, _through_file(ckpt, tmp_path / "lenet.safetensors"))
    x = _batch(7, (4, 28, 28, 1))
    assert np.array_equal(_logits(source, x), _logits(dest, x))
    assert _same_weights(_weights(source), _weights(dest))


def test_flatten_order_is_converted_for_either_data_format() -> None:
    for data_format, shape, to_nchw in [
        ("channels_last", (3, 4, 2), (0, 3, 1, 2)),
        ("channels_first", (2, 3, 4), (0, 1, 2, 3)),
    ]:
        net = keras.Sequential(
            [keras.Input(shape), layers.Flatten(data_format=data_format), layers.Dense(5)]
        )
        ckpt = export_checkpoint(net)
        layer = ckpt.layers[0]
        assert layer.attrs["flatten_from"] == [2, 3, 4]
        x = _batch(1, (3, *shape))
        # The canonical weight reads channels-first features, as PyTorch's Flatten gives.
        features = x.transpose(to_nchw).reshape(3, -1)
        expected = features @ ckpt.tensor(layer, "weight").T + ckpt.tensor(layer, "bias")
        np.testing.assert_allclose(_logits(net, x), expected, rtol=1e-5, atol=1e-5)


def test_flatten_is_found_across_nested_models_and_dropout() -> None:
    inner = keras.Sequential(
        [keras.Input((64,)), layers.Dropout(0.5), layers.Dense(3, name="fc")], name="head"
    )
    inputs = keras.Input((6, 6, 1))
    features = layers.Flatten()(layers.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, inner(features))
    ckpt = export_checkpoint(model)
    assert [(la.name, la.attrs.get("flatten_from")) for la in ckpt.layers] == [
        ("conv", None),
        ("head/fc", [4, 4, 4]),
    ]


def test_subclassed_model_warns_that_flatten_order_is_unknown() -> None:
    class Net(keras.Model):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self.flatten = layers.Flatten()
            self.fc = layers.Dense(2)

        def call(self, x: Any) -> Any:
            return self.fc(self.flatten(x))

    net = Net()
    net(_batch(0, (1, 3, 3, 2)))
    with pytest.warns(UserWarning, match="cannot read from the model's structure"):
        ckpt = export_checkpoint(net)
    assert "flatten_from" not in ckpt.layers[0].attrs


def test_momentum_none_counter_travels() -> None:
    def model() -> Any:
        return keras.Sequential([keras.Input((3,)), layers.Dense(4), BatchNorm(momentum=None)])

    source, dest = model(), model()
    for step in range(3):
        source(_batch(step, (5, 3)), training=True)
    load_checkpoint(dest, export_checkpoint(source))
    assert int(dest.layers[1].num_batches_tracked.numpy()) == 3
    assert _same_weights(_weights(source), _weights(dest))


# -- (b), (c) PyTorch <-> Keras --------------------------------------------------------------


def _torch_lenet(seed: int) -> Any:
    torch = pytest.importorskip("torch")
    from unorm.models.torch import lenet_bn as torch_lenet_bn

    torch.manual_seed(seed)
    net = torch_lenet_bn()
    for _ in range(2):
        net(torch.randn(8, 1, 28, 28))
    return net.eval()


def _max_diff(keras_net: Any, torch_net: Any, seed: int) -> float:
    torch = pytest.importorskip("torch")
    x = _batch(seed, (4, 1, 28, 28))
    with torch.no_grad():
        expected = torch_net(torch.from_numpy(x)).numpy()
    got = _logits(keras_net, x.transpose(0, 2, 3, 1))  # NCHW -> NHWC
    return float(np.max(np.abs(got - expected)))


@pytest.mark.torch
def test_torch_lenet_ports_to_keras(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from unorm._torch.port import export_checkpoint as torch_export

    source = _torch_lenet(0)
    ckpt = torch_export(source, torch.zeros(1, 1, 28, 28))
    dest = lenet_bn()
    load_checkpoint(dest, _through_file(ckpt, tmp_path / "lenet.safetensors"))
    assert _max_diff(dest, source, 3) <= 1e-4
    assert dest.get_layer("bn3").spec == source[10].spec.replace(axis=-1)


@pytest.mark.torch
def test_keras_lenet_ports_to_torch(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from unorm._torch.port import load_checkpoint as torch_load

    source = _trained(0)
    dest = _torch_lenet(1)
    torch_load(dest, _through_file(export_checkpoint(source), tmp_path / "lenet.safetensors"))
    assert _max_diff(source, dest, 4) <= 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("case", ["conv1d_grouped", "conv3d", "conv2d_transpose"])
def test_conv_layouts_match_torch(case: str) -> None:
    torch = pytest.importorskip("torch")
    from unorm._torch.port import load_checkpoint as torch_load

    nn = torch.nn
    keras_layer, dest, shape = {
        "conv1d_grouped": (layers.Conv1D(4, 2, groups=2), nn.Conv1d(4, 4, 2, groups=2), (5, 4)),
        "conv3d": (layers.Conv3D(3, 2), nn.Conv3d(2, 3, 2), (3, 3, 3, 2)),
        "conv2d_transpose": (
            layers.Conv2DTranspose(3, 2, strides=2),
            nn.ConvTranspose2d(2, 3, 2, stride=2),
            (3, 3, 2),
        ),
    }[case]
    source = keras.Sequential([keras.Input(shape), keras_layer])
    torch_load(dest, export_checkpoint(source))
    x = _batch(5, (2, *shape))
    to_channels_first = (0, len(shape), *range(1, len(shape)))
    with torch.no_grad():
        expected = dest(torch.from_numpy(x.transpose(to_channels_first))).numpy()
    got = _logits(source, x).transpose(to_channels_first)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# -- (d) BatchNorm conventions -------------------------------------------------------------


def _small(norm: Any) -> Any:
    return keras.Sequential(
        [keras.Input((5, 5, 2)), layers.Conv2D(3, 3), norm, layers.Flatten(), layers.Dense(4)]
    )


def test_native_batchnorm_keeps_its_semantics_in_unorm_batchnorm() -> None:
    native, ours = _small(layers.BatchNormalization()), _small(BatchNorm())
    for step in range(2):
        native(_batch(step, (6, 5, 5, 2)), training=True)
    ckpt = export_checkpoint(native)
    assert ckpt.layers[1].attrs["native"] is True
    load_checkpoint(ours, ckpt)
    spec = ours.layers[1].spec
    assert (spec.eps, spec.momentum, spec.running_var) == (1e-3, 1 - 0.99, "biased")
    assert (spec.preset, spec.axis, spec.skip_nonfinite) == ("keras", -1, False)
    x = _batch(9, (4, 5, 5, 2))
    assert np.array_equal(_logits(native, x), _logits(ours, x))
    # One more training step on each: the moving statistics move alike.
    native(x, training=True)
    ours(x, training=True)
    for a, b in zip(native.layers[1].weights, ours.layers[1].weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_native_batchnorm_takes_eps_and_momentum_and_warns_about_the_rest() -> None:
    ours, native = _small(BatchNorm(eps=1e-4, momentum=0.2)), _small(layers.BatchNormalization())
    with pytest.warns(UserWarning, match=r"running_var='unbiased'.*eval output is unchanged") as w:
        load_checkpoint(native, export_checkpoint(ours))
    (message,) = [str(item.message) for item in w]
    assert "skip_nonfinite=True" in message and "allow_single_value=False" in message
    bn = native.layers[1]
    assert (bn.epsilon, bn.momentum) == (1e-4, pytest.approx(0.8))
    x = _batch(2, (3, 5, 5, 2))
    assert np.array_equal(_logits(native, x), _logits(ours, x))
    # A Keras-preset BatchNorm is expressible: no warning.
    keras_preset = _small(BatchNorm(preset="keras", momentum=0.3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(native, export_checkpoint(keras_preset))
    assert native.layers[1].momentum == pytest.approx(0.7)


def test_loaded_settings_reach_traced_predict_functions() -> None:
    source, dest = _trained(0, preset="keras"), lenet_bn()
    x = _batch(3, (4, 28, 28, 1))
    dest.predict(x, verbose=0)  # traces a predict function with the canonical eps
    load_checkpoint(dest, export_checkpoint(source))
    assert dest.get_layer("bn2").spec.eps == 1e-3
    np.testing.assert_array_equal(dest.predict(x, verbose=0), _logits(source, x))


# -- (e) refusals: clear errors, nothing changed --------------------------------------------


def _refused(model: Any, ckpt: port.Checkpoint, match: str) -> None:
    before = _weights(model)
    with pytest.raises(port.CheckpointError, match=match):
        load_checkpoint(model, ckpt)
    assert _same_weights(before, _weights(model))


def test_wrong_shape_names_both_layers_and_changes_nothing() -> None:
    def net(units: int) -> Any:
        return keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                layers.Conv2D(6, 5, name="conv"),
                layers.Flatten(),
                layers.Dense(units, name="fc"),
            ]
        )

    _refused(
        net(12),
        export_checkpoint(net(10)),
        r"layer 1: checkpoint dense 'fc' \(10, 3456\) vs model dense 'fc': weight shape "
        r"\(10, 3456\) in the checkpoint, \(12, 3456\) in the model",
    )
    # A late mismatch (the last BatchNorm) leaves the earlier, matching layers untouched.
    ckpt = export_checkpoint(_trained(0))
    key = ckpt.layers[7].tensors["running_var"]
    tensors = {**ckpt.tensors, key: np.ones(85, np.float32)}
    _refused(
        _trained(1),
        dataclasses.replace(ckpt, tensors=tensors),
        r"layer 7: checkpoint batchnorm 'bn4' vs model batchnorm 'bn4': running_var shape "
        r"\(85,\) in the checkpoint, \(84,\) in the model",
    )


def test_missing_tensor_is_refused() -> None:
    ckpt = export_checkpoint(_trained(0))
    dropped = dataclasses.replace(
        ckpt.layers[4], tensors={k: v for k, v in ckpt.layers[4].tensors.items() if k != "bias"}
    )
    layers_ = [*ckpt.layers[:4], dropped, *ckpt.layers[5:]]
    _refused(
        _trained(1),
        dataclasses.replace(ckpt, layers=layers_),
        r"layer 4: checkpoint dense 'fc1' \(120, 256\) vs model dense 'fc1': "
        r"the checkpoint has no 'bias'",
    )
    # A layer naming a tensor the checkpoint does not hold cannot even be built.
    tensors = {k: v for k, v in ckpt.tensors.items() if k != "fc1.bias"}
    with pytest.raises(port.CheckpointError, match=r"'fc1' \(dense\) is missing tensor"):
        port.Checkpoint(layers=ckpt.layers, tensors=tensors, source="keras")


def test_garbage_file_leaves_the_model_unchanged(tmp_path: Path) -> None:
    net = _trained(0)
    before = _weights(net)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(port.CheckpointError):
        load_checkpoint(net, port.load(path))
    assert _same_weights(before, _weights(net))


def test_structural_mismatches_are_refused() -> None:
    ckpt = export_checkpoint(_trained(0))
    dest = _trained(1)

    def with_flatten(value: list[int]) -> port.Checkpoint:
        changed = dataclasses.replace(
            ckpt.layers[4], attrs={**ckpt.layers[4].attrs, "flatten_from": value}
        )
        return dataclasses.replace(ckpt, layers=[*ckpt.layers[:4], changed, *ckpt.layers[5:]])

    _refused(dest, with_flatten([16, 2, 8]), r"flatten_from \[16, 2, 8\] in the checkpoint, "
             r"\[16, 4, 4\] in the model")  # fmt: skip
    _refused(dest, with_flatten([8, 4, 4]), r"\(128 features\) in the checkpoint, 256 input")
    _refused(dest, with_flatten([]), "flatten_from must list positive sizes")
    no_flatten = dataclasses.replace(ckpt.layers[4], attrs={})
    _refused(
        dest,
        dataclasses.replace(ckpt, layers=[*ckpt.layers[:4], no_flatten, *ckpt.layers[5:]]),
        "records no flatten_from",
    )
    _refused(dest, dataclasses.replace(ckpt, layers=ckpt.layers[:-1]), "has 8 layers with")
    dense = keras.Sequential([keras.Input((3,)), layers.Dense(2, use_bias=False)])
    _refused(
        dense,
        export_checkpoint(keras.Sequential([keras.Input((3,)), layers.Dense(2)])),
        "the model has no 'bias'",
    )
    conv = keras.Sequential([keras.Input((3,)), layers.Reshape((3, 1)), layers.Conv1D(2, 1)])
    _refused(conv, export_checkpoint(dense), "kinds differ")
    centred = _small(BatchNorm(center=False))
    _refused(centred, export_checkpoint(_small(BatchNorm())), "the model has no 'beta'")
    cumulative = _small(BatchNorm(momentum=None))
    _refused(cumulative, export_checkpoint(_small(BatchNorm())), "build the model's layer with")
    bad_spec = dataclasses.replace(ckpt.layers[1], attrs={"spec": {"eps": -1.0}})
    layers_ = [ckpt.layers[0], bad_spec, *ckpt.layers[2:]]
    _refused(dest, dataclasses.replace(ckpt, layers=layers_), "invalid BatchNorm settings")


def test_unsupported_layers_are_refused_not_skipped() -> None:
    model = keras.Sequential([keras.Input((4,), dtype="int32"), layers.Embedding(10, 3)])
    with pytest.raises(port.CheckpointError, match=r"'embedding.*' \(Embedding\) has weights"):
        export_checkpoint(model)
    with pytest.raises(port.CheckpointError, match="is not built"):
        export_checkpoint(keras.Sequential([layers.Dense(2)]))


# -- (f) Keras's own files ---------------------------------------------------------------------


# Keras's own save() trips NumPy 2's __array__ deprecation on TensorFlow variables.
_KERAS_SAVE_WARNING = "ignore:__array__ implementation:DeprecationWarning"


@pytest.mark.filterwarnings(_KERAS_SAVE_WARNING)
def test_keras_files_go_through_export(tmp_path: Path) -> None:
    source = _trained(0)
    x = _batch(5, (4, 28, 28, 1))
    source.save(tmp_path / "lenet.keras")
    source.save_weights(tmp_path / "lenet.weights.h5")
    from_weights = lenet_bn()
    from_weights.load_weights(tmp_path / "lenet.weights.h5")
    for restored in (keras.saving.load_model(tmp_path / "lenet.keras"), from_weights):
        dest = lenet_bn()
        load_checkpoint(dest, _through_file(export_checkpoint(restored), tmp_path / "n.st"))
        assert np.array_equal(_logits(dest, x), _logits(source, x))


@pytest.mark.filterwarnings(_KERAS_SAVE_WARNING)
def test_a_loaded_model_saves_with_its_new_settings(tmp_path: Path) -> None:
    source, dest = _trained(0, preset="torch"), lenet_bn()
    load_checkpoint(dest, export_checkpoint(source))
    dest.save(tmp_path / "ported.keras")
    reloaded = keras.saving.load_model(tmp_path / "ported.keras")
    assert reloaded.get_layer("bn1").spec == source.get_layer("bn1").spec
    x = _batch(6, (2, 28, 28, 1))
    assert np.array_equal(_logits(reloaded, x), _logits(source, x))


def test_nf_lenet_gain_and_settings_travel_between_torch_and_keras() -> None:
    torch = pytest.importorskip("torch")
    from unorm._torch.port import export_checkpoint as torch_export
    from unorm._torch.port import load_checkpoint as torch_load
    from unorm.models.keras import lenet_nf as keras_nf
    from unorm.models.torch import lenet_nf as torch_nf

    source = torch_nf(style="timm")
    with torch.no_grad():
        source[0].gain.copy_(torch.linspace(0.5, 1.5, 6))
    keras_net = keras_nf()
    load_checkpoint(keras_net, torch_export(source, torch.zeros(1, 1, 28, 28)))
    assert keras_net.layers[0].spec.style == "timm"
    x = np.random.default_rng(0).normal(size=(2, 1, 28, 28)).astype("float32")
    want = source.eval()(torch.from_numpy(x)).detach().numpy()
    got = np.asarray(keras_net(x.transpose(0, 2, 3, 1), training=False))
    np.testing.assert_allclose(got, want, atol=1e-4)
    back = torch_nf()
    torch_load(back, export_checkpoint(keras_net))
    assert back[0].ws.style == "timm"
    torch.testing.assert_close(back[0].gain, source[0].gain)
    from unorm.models.torch import lenet

    plain = torch.nn.Sequential(*[m for m in lenet() if not isinstance(m, torch.nn.Sigmoid)])
    with pytest.raises(port.CheckpointError, match="the model has no 'gain'"):
        torch_load(plain, torch_export(source))


# -- Scaled WS convolutions of every rank ------------------------------------------------


def _ws_net(rank: int, **ws: Any) -> Any:
    from unorm.keras import ScaledStdConv1D, ScaledStdConv2D, ScaledStdConv3D

    cls = {1: ScaledStdConv1D, 2: ScaledStdConv2D, 3: ScaledStdConv3D}[rank]
    conv = cls(6, 3, groups=2, **ws)
    return keras.Sequential(
        [keras.Input((*(5,) * rank, 4)), conv, layers.Flatten(), layers.Dense(3)]
    )


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_scaled_ws_conv_of_every_rank_round_trips_with_gain_and_settings(
    tmp_path: Path, rank: int
) -> None:
    keras.utils.set_random_seed(rank)
    source = _ws_net(rank, style="timm", eps=1e-3)
    source.layers[0].gain.assign(np.linspace(0.5, 2.0, 6).astype("float32"))
    ckpt = _through_file(export_checkpoint(source), tmp_path / "ws.safetensors")
    assert [la.kind for la in ckpt.layers] == ["conv", "dense"]
    conv = ckpt.layers[0]
    assert set(conv.tensors) == {"weight", "bias", "gain"} and conv.attrs["groups"] == 2
    assert ckpt.tensor(conv, "weight").shape == (6, 2, *(3,) * rank)  # (O, I/g, *k)
    dest = _ws_net(rank)  # deepmind, eps 1e-4: the checkpoint's settings replace them
    load_checkpoint(dest, ckpt)
    assert dest.layers[0].spec == source.layers[0].spec
    np.testing.assert_array_equal(dest.layers[0].gain.numpy(), source.layers[0].gain.numpy())
    x = _batch(7, (2, *(5,) * rank, 4))
    np.testing.assert_array_equal(_logits(dest, x), _logits(source, x))


@pytest.mark.torch
@pytest.mark.parametrize("rank", [1, 3])
def test_scaled_ws_conv_of_every_rank_matches_torch(rank: int) -> None:
    torch = pytest.importorskip("torch")
    from unorm._torch.port import export_checkpoint as torch_export
    from unorm._torch.port import load_checkpoint as torch_load
    from unorm.keras import ScaledStdConv1D, ScaledStdConv3D
    from unorm.torch import ScaledStdConv1d, ScaledStdConv3d

    shape = (*(5,) * rank, 4)
    cls = {1: ScaledStdConv1D, 3: ScaledStdConv3D}[rank]
    source = keras.Sequential([keras.Input(shape), cls(6, 3, groups=2, style="timm")])
    source.layers[0].gain.assign(np.linspace(0.5, 2.0, 6).astype("float32"))
    dest = {1: ScaledStdConv1d, 3: ScaledStdConv3d}[rank](4, 6, 3, groups=2)
    torch_load(dest, export_checkpoint(source))
    assert dest.ws == source.layers[0].spec
    x = _batch(8, (2, *shape))
    to_channels_first = (0, rank + 1, *range(1, rank + 1))
    with torch.no_grad():
        expected = dest(torch.from_numpy(x.transpose(to_channels_first))).numpy()
    got = _logits(source, x).transpose(to_channels_first)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    back = keras.Sequential([keras.Input(shape), cls(6, 3, groups=2)])
    load_checkpoint(back, torch_export(dest))
    assert back.layers[0].spec == source.layers[0].spec
    np.testing.assert_allclose(_logits(back, x), _logits(source, x), rtol=1e-6, atol=1e-6)


# -- verified loads (the checkpoint's probe) -------------------------------------------------


def test_an_exported_model_carries_a_probe_of_its_input_shape() -> None:
    ckpt = export_checkpoint(_trained(0))
    assert ckpt.tensors["probe/input"].shape == (2, 1, 28, 28)  # canonical, channels-first
    assert ckpt.tensors["probe/output"].shape == (2, 10)
    digests = [k for k in ckpt.tensors if k.startswith("probe/digest/")]
    assert len(digests) == len(ckpt.layers)


def test_a_load_whose_outputs_differ_is_refused_naming_the_layer() -> None:
    """A running mean changed in the file: the model's output on the probe differs from
    the source's, so the load puts every weight back and names the BatchNorm."""
    ckpt = export_checkpoint(_trained(0))
    bn = next(i for i, la in enumerate(ckpt.layers) if la.kind == "batchnorm")
    key = ckpt.layers[bn].tensors["running_mean"]
    tampered = port.Checkpoint(
        ckpt.layers, {**ckpt.tensors, key: ckpt.tensors[key] + 0.5}, ckpt.source
    )
    dest = lenet_bn()
    before = _weights(dest)
    with pytest.raises(port.CheckpointError, match=f"diverges is layer {bn}: checkpoint batchnorm"):
        load_checkpoint(dest, tampered)
    assert _same_weights(before, _weights(dest))
    load_checkpoint(dest, ckpt)  # the untampered file still loads, verified


@pytest.mark.parametrize("ending", [".keras", ".weights.h5"])
def test_native_files_get_the_umask_mode_or_keep_their_own(tmp_path: Path, ending: str) -> None:
    import os

    from unorm._keras.port import write_native

    old = os.umask(0o027)
    try:
        write_native(lenet_bn(), tmp_path / f"new{ending}")
        assert (tmp_path / f"new{ending}").stat().st_mode & 0o777 == 0o640
        kept = tmp_path / f"kept{ending}"
        write_native(lenet_bn(), kept)
        kept.chmod(0o604)
        write_native(lenet_bn(), kept)
        assert kept.stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(old)
