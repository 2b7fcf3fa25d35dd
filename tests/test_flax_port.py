"""unorm.flax's neutral-checkpoint port (``unorm._flax.port``): LeNet-BN to and from
PyTorch and Keras through files, layouts against PyTorch's own layers, BatchNorm
conventions, matching along the data flow, verified loads and refusals that change
nothing."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unorm import port

pytestmark = pytest.mark.flax
pytest.importorskip("flax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from unorm._flax.port import (  # noqa: E402
    export_checkpoint,
    export_model,
    load_checkpoint,
    read_native,
    write_native,
)
from unorm.flax import BatchNorm, ScaledStdConv  # noqa: E402
from unorm.models import flax as flax_models  # noqa: E402

SAMPLE = (28, 28, 1)
RTOL = 1e-4


def _images(seed: int, n: int = 16) -> np.ndarray:
    """Channels-first images, the seed networks' data layout."""
    return np.random.default_rng(seed).normal(size=(n, 1, 28, 28)).astype(np.float32)


def _trained_flax(seed: int, preset: str | None = None) -> Any:
    """A Flax LeNet-BN whose running statistics moved (two training forward passes)."""
    flax_models.seed(seed)
    net = flax_models.lenet_bn(preset)
    net.train()
    for step in range(2):
        _forward(net, jnp.asarray(np.moveaxis(_images(100 * seed + step), 1, -1)))
    return net


@nnx.jit
def _forward(net: Any, x: jax.Array) -> jax.Array:
    # Jitted: an eager training pass dispatches every operation on its own (slow).
    out: jax.Array = net(x)
    return out


def _state(model: Any) -> list[np.ndarray]:
    return [np.array(v) for v in jax.tree_util.tree_leaves(nnx.state(model))]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


def _through_file(ckpt: port.Checkpoint, path: Path) -> port.Checkpoint:
    port.save(ckpt, path)
    return port.load(path)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    """Within RTOL of the logits' scale."""
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= RTOL * scale


def _bn_stats(model: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.array(b.mean[...]), np.array(b.var[...])) for b in model.norms]


def _torch_bns(model: Any) -> list[Any]:
    return [m for m in model.modules() if getattr(m, "running_mean", None) is not None]


# -- LeNet-BN with PyTorch and Keras, through files ------------------------------------------


@pytest.mark.torch
def test_flax_lenet_ports_to_torch_and_back(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from unorm._torch import port as torch_port
    from unorm.models import torch as torch_models

    source = _trained_flax(1)
    ckpt = _through_file(export_model(source, SAMPLE), tmp_path / "flax.safetensors")
    dest = torch_models.lenet_bn()
    torch_port.load_checkpoint(dest, ckpt)
    x = _images(7)
    _close(torch_models.predict(dest, x), flax_models.predict(source, x))
    # Running statistics exactly: PyTorch's BatchNorm2d buffers against Flax's variables.
    torch_bns = _torch_bns(dest)
    for bn, (mean, var) in zip(torch_bns, _bn_stats(source), strict=True):
        assert np.array_equal(bn.running_mean.numpy(), mean)
        assert np.array_equal(bn.running_var.numpy(), var)
    # Back: a fresh Flax model from the PyTorch one's checkpoint.
    back = flax_models.lenet_bn()
    load_checkpoint(back, _through_file(torch_port.export_model(dest, (1, 28, 28)), tmp_path / "t"))
    _close(flax_models.predict(back, x), torch_models.predict(dest, x))
    assert all(
        np.array_equal(a, b) and np.array_equal(c, d)
        for (a, c), (b, d) in zip(_bn_stats(back), _bn_stats(source), strict=True)
    )


@pytest.mark.torch
def test_torch_lenet_ports_to_flax(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from unorm._torch import port as torch_port
    from unorm.models import torch as torch_models
    from unorm.models.training import Recipe

    torch.manual_seed(3)
    source = torch_models.lenet_bn()
    x = _images(2, 64)
    torch_models.train(source, x, np.arange(64) % 10, Recipe(steps=3, batch_size=16))
    ckpt = _through_file(torch_port.export_model(source, (1, 28, 28)), tmp_path / "t.safetensors")
    dest = flax_models.lenet_bn()
    load_checkpoint(dest, ckpt)
    test = _images(9)
    _close(flax_models.predict(dest, test), torch_models.predict(source, test))
    torch_bns = _torch_bns(source)
    for bn, layer in zip(torch_bns, dest.norms, strict=True):
        assert np.array_equal(np.array(layer.mean[...]), bn.running_mean.numpy())
        assert np.array_equal(np.array(layer.var[...]), bn.running_var.numpy())
        assert int(layer.num_batches_tracked[...]) == int(bn.num_batches_tracked)


@pytest.mark.keras
def test_flax_and_keras_lenet_port_both_ways(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    from unorm._keras import port as keras_port
    from unorm.models import keras as keras_models

    source = _trained_flax(2)
    x = _images(5)
    ckpt = _through_file(export_model(source, SAMPLE), tmp_path / "f.safetensors")
    dest = keras_models.lenet_bn()
    keras_port.load_checkpoint(dest, ckpt)
    _close(keras_models.predict(dest, x), flax_models.predict(source, x))
    keras_bns = [la for la in dest.layers if getattr(la, "moving_mean", None) is not None]
    for bn, (mean, var) in zip(keras_bns, _bn_stats(source), strict=True):
        assert np.array_equal(bn.moving_mean.numpy(), mean)
        assert np.array_equal(bn.moving_variance.numpy(), var)
    # Keras -> Flax: a Keras model whose statistics moved.
    keras.utils.set_random_seed(4)
    other = keras_models.lenet_bn()
    other(np.moveaxis(_images(11), 1, -1), training=True)
    back = flax_models.lenet_bn()
    load_checkpoint(back, _through_file(keras_port.export_checkpoint(other), tmp_path / "k"))
    _close(flax_models.predict(back, x), keras_models.predict(other, x))


# -- layouts against PyTorch's own layers ------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize(
    "case", ["conv2d_grouped", "depthwise", "conv1d", "transpose", "transpose_kernel", "scaled_ws"]
)
def test_layer_layouts_match_torch(case: str) -> None:
    torch = pytest.importorskip("torch")
    from unorm._torch.port import load_checkpoint as torch_load
    from unorm.torch import ScaledStdConv2d

    nn, r = torch.nn, nnx.Rngs(case.__len__())
    flax_layer, dest, shape = {
        "conv2d_grouped": (
            nnx.Conv(4, 6, (3, 3), feature_group_count=2, padding="VALID", rngs=r),
            nn.Conv2d(4, 6, 3, groups=2),
            (6, 6, 4),
        ),
        "depthwise": (
            nnx.Conv(3, 6, (3, 3), feature_group_count=3, padding="VALID", rngs=r),
            nn.Conv2d(3, 6, 3, groups=3),
            (5, 5, 3),
        ),
        "conv1d": (nnx.Conv(2, 3, (2,), padding="VALID", rngs=r), nn.Conv1d(2, 3, 2), (5, 2)),
        "transpose": (
            nnx.ConvTranspose(2, 3, (3, 3), strides=(2, 2), padding="VALID", rngs=r),
            nn.ConvTranspose2d(2, 3, 3, stride=2),
            (3, 3, 2),
        ),
        "transpose_kernel": (
            nnx.ConvTranspose(2, 3, (2, 3), padding="VALID", transpose_kernel=True, rngs=r),
            nn.ConvTranspose2d(2, 3, (2, 3)),
            (3, 4, 2),
        ),
        "scaled_ws": (
            ScaledStdConv(2, 3, (3, 3), padding="VALID", gain_init=0.5, style="timm", rngs=r),
            ScaledStdConv2d(2, 3, 3),
            (5, 5, 2),
        ),
    }[case]
    if case == "scaled_ws":  # a gain other than the torch layer's, to see it travel
        flax_layer.gain[...] = jnp.linspace(0.5, 1.5, 3)
    torch_load(dest, export_checkpoint(flax_layer, shape))
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    with torch.no_grad():
        want = dest(torch.from_numpy(np.moveaxis(x, -1, 1))).numpy()
    got = np.moveaxis(np.asarray(flax_layer(jnp.asarray(x))), -1, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if case == "scaled_ws":
        assert dest.ws.style == "timm"
    # And back into a fresh Flax layer of the same structure.
    fresh = type(flax_layer)(
        *(flax_layer.in_features, flax_layer.out_features, flax_layer.kernel_size),
        **{
            k: getattr(flax_layer, k)
            for k in ("strides", "padding")
            if getattr(flax_layer, k, None) is not None
        },
        **(
            {"transpose_kernel": flax_layer.transpose_kernel}
            if isinstance(flax_layer, nnx.ConvTranspose)
            else {"feature_group_count": flax_layer.feature_group_count}
        ),
        rngs=nnx.Rngs(99),
    )
    from unorm._torch.port import export_checkpoint as torch_export

    load_checkpoint(fresh, torch_export(dest, torch.from_numpy(np.moveaxis(x, -1, 1))))
    np.testing.assert_allclose(np.moveaxis(np.asarray(fresh(jnp.asarray(x))), -1, 1), want,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


class _ChannelsLastFlatten(nnx.Module):
    """Conv, then a flatten of the NHWC map as it stands (rows in (H, W, C) order)."""

    def __init__(self) -> None:
        self.conv = nnx.Conv(1, 3, (3, 3), padding="VALID", rngs=nnx.Rngs(0))
        self.fc = nnx.Linear(3 * 4 * 4, 5, rngs=nnx.Rngs(1))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.conv(x))
        return self.fc(y.reshape(y.shape[0], -1))


@pytest.mark.torch
def test_a_channels_last_flatten_is_reordered_for_torch() -> None:
    torch = pytest.importorskip("torch")
    from unorm._torch.port import load_checkpoint as torch_load

    source = _ChannelsLastFlatten()
    ckpt = export_checkpoint(source, (6, 6, 1))
    assert ckpt.layers[1].attrs["flatten_from"] == [3, 4, 4]
    dest = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(48, 5)
    )
    torch_load(dest, ckpt)  # verified on the probe
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 1)).astype(np.float32)
    with torch.no_grad():
        want = dest(torch.from_numpy(np.moveaxis(x, -1, 1))).numpy()
    np.testing.assert_allclose(np.asarray(source(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    back = _ChannelsLastFlatten()
    load_checkpoint(back, ckpt)
    assert np.array_equal(np.array(back.fc.kernel[...]), np.array(source.fc.kernel[...]))


# -- BatchNorm settings --------------------------------------------------------------------


class _NativeNet(nnx.Module):
    """Conv -> nnx.BatchNorm (Flax's own, eps 1e-3, momentum 0.9) -> Linear."""

    def __init__(self, seed: int) -> None:
        self.conv = nnx.Conv(1, 3, (3, 3), padding="VALID", rngs=nnx.Rngs(seed))
        self.bn = nnx.BatchNorm(3, epsilon=1e-3, momentum=0.9, rngs=nnx.Rngs(seed))
        self.fc = nnx.Linear(3, 2, rngs=nnx.Rngs(seed + 1))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(jnp.mean(self.bn(self.conv(x)), axis=(1, 2)))


def test_a_native_batchnorm_stays_preset_flax_and_carries_its_settings(tmp_path: Path) -> None:
    source = _NativeNet(0)
    source(jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 6, 1)), jnp.float32))
    ckpt = _through_file(export_checkpoint(source, (6, 6, 1)), tmp_path / "n.safetensors")
    assert [la.kind for la in ckpt.layers] == ["conv", "batchnorm", "dense"]  # as they run
    bn = ckpt.layers[1]
    assert bn.attrs["native"] is True
    assert bn.attrs["spec"]["eps"] == 1e-3
    assert bn.attrs["spec"]["momentum"] == pytest.approx(0.1)  # weight of the new value
    assert bn.attrs["spec"]["running_var"] == "biased" and not bn.attrs["spec"]["skip_nonfinite"]
    # Into unorm's BatchNorm: it takes the flax preset's semantics, so training continues
    # exactly as nnx.BatchNorm would (against Flax's own layer, one more training step).
    dest = _NativeNet(5)
    dest.bn = BatchNorm(3)
    load_checkpoint(dest, ckpt)
    assert dest.bn.spec.running_var == "biased" and dest.bn.spec.eps == 1e-3
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6, 6, 1)), jnp.float32)
    source(x), dest(x)
    np.testing.assert_allclose(np.array(dest.bn.var[...]), np.array(source.bn.var[...]), rtol=1e-6)
    # Into a native nnx.BatchNorm from a canonical source: eps and momentum, and a warning.
    canonical = _NativeNet(1)
    canonical.bn = BatchNorm(3, eps=1e-4, momentum=0.2)
    native = _NativeNet(2)
    with pytest.warns(UserWarning, match="nnx.BatchNorm cannot express"):
        load_checkpoint(native, export_checkpoint(canonical, (6, 6, 1)))
    assert native.bn.epsilon == 1e-4 and native.bn.momentum == pytest.approx(0.8)


def test_update_in_backward_is_refused_naming_the_setting() -> None:
    source = _NativeNet(0)
    ckpt = export_checkpoint(source, (6, 6, 1))
    spec = dict(ckpt.layers[1].attrs["spec"], update_on="backward", native=False)
    spec.pop("native")
    layers = list(ckpt.layers)
    layers[1] = port.Layer(layers[1].name, "batchnorm", layers[1].tensors, {"spec": spec})
    dest = _NativeNet(3)
    dest.bn = BatchNorm(3)
    before = _state(dest)
    with pytest.raises(port.CheckpointError, match="update_on='backward'"):
        load_checkpoint(dest, port.Checkpoint(layers, ckpt.tensors, ckpt.source, ckpt.extra))
    assert _same(before, _state(dest))


# -- matching along the data flow, verified loads -------------------------------------------


class _TwoNorms(nnx.Module):
    """Two BatchNorms of one size; ``swapped`` defines them in the other order than they
    run (the attribute names sort the other way too)."""

    def __init__(self, swapped: bool, seed: int) -> None:
        self.fc = nnx.Linear(4, 3, rngs=nnx.Rngs(seed))
        self.out = nnx.Linear(3, 2, rngs=nnx.Rngs(seed + 1))
        if swapped:
            self.b_second, self.a_first = BatchNorm(3), BatchNorm(3)
        else:
            self.a_first, self.b_second = BatchNorm(3), BatchNorm(3)
        self.swapped = swapped

    def __call__(self, x: jax.Array) -> jax.Array:
        first, second = (
            (self.b_second, self.a_first) if self.swapped else (self.a_first, self.b_second)
        )
        return self.out(second(jax.nn.sigmoid(first(self.fc(x)))))


def test_batchnorms_defined_in_another_order_are_matched_by_the_flow() -> None:
    source = _TwoNorms(False, 0)
    source(jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32))
    source(jnp.asarray(np.random.default_rng(1).normal(3.0, 2.0, size=(8, 4)), jnp.float32))
    dest = _TwoNorms(True, 7)
    load_checkpoint(dest, export_checkpoint(source, (4,)))
    # dest.b_second runs first, as source.a_first does.
    assert np.array_equal(np.array(dest.b_second.mean[...]), np.array(source.a_first.mean[...]))
    assert np.array_equal(np.array(dest.a_first.var[...]), np.array(source.b_second.var[...]))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4)), jnp.float32)
    source.eval(), dest.eval()
    _close(np.asarray(dest(x)), np.asarray(source(x)))


def test_a_failed_probe_leaves_the_model_unchanged_and_names_the_layer() -> None:
    ckpt = export_model(_trained_flax(0), SAMPLE)
    bn = next(i for i, la in enumerate(ckpt.layers) if la.kind == "batchnorm")
    key = ckpt.layers[bn].tensors["running_mean"]
    tampered = port.Checkpoint(
        ckpt.layers, {**ckpt.tensors, key: ckpt.tensors[key] + 0.5}, ckpt.source, ckpt.extra
    )
    dest = flax_models.lenet_bn()
    before = _state(dest)
    with pytest.raises(port.CheckpointError, match=f"diverges is layer {bn}: checkpoint batchnorm"):
        load_checkpoint(dest, tampered)
    assert _same(before, _state(dest))
    load_checkpoint(dest, ckpt)  # the untampered one loads, verified


def test_probe_and_export_leave_the_model_as_it_was() -> None:
    net = _trained_flax(3)
    net.train()
    before = _state(net)
    ckpt = export_model(net, SAMPLE)
    assert ckpt.tensors["probe/input"].shape == (2, 1, 28, 28)
    assert sum(k.startswith("probe/digest/") for k in ckpt.tensors) == len(ckpt.layers)
    assert _same(before, _state(net))
    assert all(not bn.use_running_average for bn in net.norms)  # still training


# -- bad input --------------------------------------------------------------------------------


def test_wrong_shapes_and_unsupported_layers_are_refused() -> None:
    ckpt = export_model(_trained_flax(0), SAMPLE)
    other = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    before = _state(other)
    with pytest.raises(port.CheckpointError, match="layers with parameters"):
        load_checkpoint(other, ckpt)
    assert _same(before, _state(other))
    embed = nnx.Sequential(nnx.Embed(5, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 2, rngs=nnx.Rngs(1)))
    with pytest.raises(port.CheckpointError, match="belongs to no layer"):
        export_checkpoint(embed, (1,))
    wide = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    with pytest.raises(port.CheckpointError, match=r"weight shape \(2, 3\) in the checkpoint"):
        load_checkpoint(wide, export_checkpoint(nnx.Linear(3, 2, rngs=nnx.Rngs(1)), (3,)))


def test_native_files_round_trip_and_bad_files_are_refused(tmp_path: Path) -> None:
    source = _trained_flax(4)
    path = tmp_path / "lenet.msgpack"
    write_native(source, path)
    dest = flax_models.lenet_bn()
    assert read_native(dest, path) is dest
    assert _same(_state(source), _state(dest))
    x = _images(3)
    assert np.array_equal(flax_models.predict(dest, x), flax_models.predict(source, x))
    before = _state(dest)
    truncated = tmp_path / "cut.msgpack"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(port.CheckpointError, match=r"cut\.msgpack"):
        read_native(dest, truncated)
    small = tmp_path / "small.msgpack"
    write_native(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), small)
    with pytest.raises(port.CheckpointError, match="do not fit the model"):
        read_native(dest, small)
    with pytest.raises(port.CheckpointError, match="does not exist"):
        write_native(dest, tmp_path / "missing" / "x.msgpack")
    assert _same(before, _state(dest))


def test_export_without_input_shape_warns_that_flatten_order_is_unknown() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_checkpoint(nnx.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0)))  # no Linear: silent
    with pytest.warns(UserWarning, match="flatten_from"):
        ckpt = export_checkpoint(_ChannelsLastFlatten())
    assert "probe/input" not in ckpt.tensors


@pytest.mark.torch
def test_unorm_port_moves_a_state_dict_to_msgpack_and_back(tmp_path: Path) -> None:
    """``unorm port`` file to file through the plug-in: a PyTorch ``.pt`` to Flax's
    ``.msgpack`` (read back before it is kept) and on to the neutral file; the logits are
    PyTorch's own."""
    torch = pytest.importorskip("torch")
    from unorm.models import torch as torch_models
    from unorm.port_files import framework_of, port_file

    assert framework_of("net.msgpack") == "flax"
    torch.manual_seed(5)
    source = torch_models.lenet_bn()
    source.train()
    with torch.no_grad():
        source(torch.from_numpy(_images(6)))
    torch.save(source.state_dict(), tmp_path / "lenet.pt")
    port_file(tmp_path / "lenet.pt", tmp_path / "lenet.msgpack")
    dest = read_native(flax_models.lenet_bn(), tmp_path / "lenet.msgpack")
    x = _images(8)
    _close(flax_models.predict(dest, x), torch_models.predict(source, x))
    ckpt = port_file(tmp_path / "lenet.msgpack", tmp_path / "again.safetensors")
    assert ckpt.source == "flax"
    back = torch_models.lenet_bn()
    from unorm._torch.port import load_checkpoint as torch_load

    torch_load(back, port.load(tmp_path / "again.safetensors"))
    _close(torch_models.predict(back, x), torch_models.predict(source, x))
