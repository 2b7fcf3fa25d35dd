"""unorm's MXNet Gluon port: neutral checkpoints, MXNet's own files (symbol API, export,
save_parameters), ports to and from PyTorch, and refusals that change nothing.

Runs where MXNet runs (the legacy environment); the ``mxnet`` marker skips it elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import runs_here  # the environment's framework list (UNORM_RUNS)
from unorm import port
from unorm import reference as ref
from unorm.spec import BatchNormSpec

pytestmark = pytest.mark.mxnet


if runs_here("mxnet"):  # where MXNet is meant to run, a failing import is an error
    import mxnet as mx

    # PyTorch is part of the environment that runs MXNet (backends/envs/legacy.txt), so
    # the ports to and from it are tested there, never skipped. Not runs_here("torch"):
    # ./dev lists only "mxnet" for that environment, which would skip them every time.
    import torch
    from mxnet import autograd, gluon

    from unorm._mxnet.port import (
        export_checkpoint,
        export_model,
        load_checkpoint,
        read_native,
        read_symbol,
        write_native,
    )
    from unorm.models.mxnet import MODELS, lenet_bn, predict, train
    from unorm.mxnet import BatchNorm

LENET_KINDS = ["conv", "batchnorm"] * 2 + ["dense", "batchnorm"] * 2 + ["dense"]
ROOT = Path(__file__).resolve().parents[1]


def _batch(seed: int, shape: tuple[int, ...] = (8, 1, 28, 28)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _randomised(net: Any, seed: int) -> Any:
    """``net`` with random values in every parameter (BatchNorm's gamma away from 1,
    running variances positive), so a port that drops or reorders anything shows."""
    rng = np.random.default_rng(seed)
    for name, param in net._collect_params_with_prefix().items():
        shape = param.shape
        if name.endswith("num_batches_tracked"):
            value = np.full(shape, 7)
        elif name.endswith(("gamma", "running_var")):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.3, shape)
        param.set_data(mx.nd.array(value, dtype=param.dtype))
    return net


def _trained(seed: int, preset: str | None = None) -> Any:
    """A Gluon LeNet with random weights whose BatchNorm statistics moved (two training
    forward passes)."""
    net = _randomised(lenet_bn(preset), seed)
    with autograd.train_mode():
        for step in range(2):
            net(mx.nd.array(_batch(100 * seed + step)))
    return net


def _state(net: Any) -> dict[str, np.ndarray]:
    return {k: p.data().asnumpy().copy() for k, p in net._collect_params_with_prefix().items()}


def _assert_unchanged(before: dict[str, np.ndarray], net: Any) -> None:
    after = _state(net)
    assert before.keys() == after.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(value, after[key], err_msg=key)


def _logits(net: Any, x: np.ndarray) -> np.ndarray:
    return predict(net, x)


def _through_file(ckpt: port.Checkpoint, path: Path) -> port.Checkpoint:
    port.save(ckpt, path)
    return port.load(path)


def _refused(net: Any, ckpt: port.Checkpoint, match: str) -> None:
    before = _state(net)
    with pytest.raises(port.CheckpointError, match=match):
        load_checkpoint(net, ckpt)
    _assert_unchanged(before, net)


# -- Gluon -> file -> Gluon ---------------------------------------------------------------


@pytest.mark.parametrize("preset", [None, "torch", "keras", "mxnet"])
@pytest.mark.parametrize("axis", [1, -1])
def test_operator_attributes_give_back_the_layer_spec(preset: str | None, axis: int) -> None:
    # An exported graph keeps the spec only as the operator's attributes; reading them
    # back must give every setting (the preset's name is not an attribute).
    from unorm._mxnet.op import OpSettings

    spec = BatchNormSpec.from_preset(preset, axis=axis)
    back = OpSettings.from_attrs(OpSettings.from_spec(spec).attrs()).to_spec()
    assert dataclasses.replace(back, preset=spec.preset) == spec


def test_round_trip_through_a_file_gives_identical_logits(tmp_path: Path) -> None:
    source, dest = _trained(0), _trained(1)
    ckpt = export_model(source, MODELS["lenet_bn"][1])
    assert [la.kind for la in ckpt.layers] == LENET_KINDS
    assert ckpt.layers[4].attrs["flatten_from"] == [16, 4, 4]
    assert "flatten_from" not in ckpt.layers[6].attrs  # fed by a BatchNorm'd vector
    assert ckpt.tensor(ckpt.layers[1], "num_batches_tracked").shape == ()
    load_checkpoint(dest, _through_file(ckpt, tmp_path / "lenet.safetensors"))
    x = _batch(5)
    np.testing.assert_array_equal(_logits(source, x), _logits(dest, x))
    assert int(dest[1].num_batches_tracked.data().asnumpy()[0]) == 9  # 7 + 2 updates


def test_flatten_from_is_found_through_dense_flattening_and_dropout() -> None:
    dense_flattens = gluon.nn.HybridSequential()
    dense_flattens.add(
        gluon.nn.Conv2D(3, 3, in_channels=2),  # (N, 2, 6, 6) -> (N, 3, 4, 4)
        gluon.nn.Dense(16, in_units=4, flatten=False),  # on the last axis: (N, 3, 4, 16)
        gluon.nn.Dense(4, in_units=3 * 4 * 16),  # Gluon's Dense flattens its input itself
        gluon.nn.Dense(16, in_units=4),
    )
    flatten_layer = gluon.nn.HybridSequential()
    flatten_layer.add(
        gluon.nn.Conv2D(2, 3, in_channels=1),  # (N, 1, 4, 4) -> (N, 2, 2, 2)
        gluon.nn.Flatten(),
        gluon.nn.Dropout(0.5),
        gluon.nn.Activation("relu"),
        gluon.nn.Dense(3, in_units=8),
    )
    outer = gluon.nn.HybridSequential()
    outer.add(dense_flattens, flatten_layer)
    outer.initialize()
    ckpt = export_checkpoint(dense_flattens, mx.nd.zeros((1, 2, 6, 6)))
    assert [la.attrs.get("flatten_from") for la in ckpt.layers] == [None, None, [3, 4, 16], None]
    ckpt = export_checkpoint(flatten_layer, mx.nd.zeros((1, 1, 4, 4)))
    assert [la.name for la in ckpt.layers] == ["0", "4"]
    assert ckpt.layers[1].attrs["flatten_from"] == [2, 2, 2]
    # Nested blocks are entered in place and named by path.
    names = [la.name for la in export_checkpoint(outer).layers]
    assert names == ["0.0", "0.1", "0.2", "0.3", "1.0", "1.4"]


def test_a_mismatched_flatten_from_is_refused_given_an_example() -> None:
    ckpt = export_model(_trained(0), MODELS["lenet_bn"][1])
    dense = dataclasses.replace(ckpt.layers[4], attrs={"flatten_from": [4, 8, 8]})
    wrong = dataclasses.replace(ckpt, layers=[*ckpt.layers[:4], dense, *ckpt.layers[5:]])
    net = _trained(1)
    before = _state(net)
    with pytest.raises(
        port.CheckpointError,
        match=r"flatten_from \[4, 8, 8\] in the checkpoint, \[16, 4, 4\] in the model",
    ):
        load_checkpoint(net, wrong, np.zeros((1, 1, 28, 28), np.float32))
    _assert_unchanged(before, net)


# -- PyTorch <-> Gluon -----------------------------------------------------------------


def _torch_lenet(seed: int) -> Any:
    from unorm.models.torch import lenet_bn as torch_lenet

    torch.manual_seed(seed)
    net = torch_lenet()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(8, 1, 28, 28))
    return net.eval()


def _torch_logits(net: Any, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.asarray(net.eval()(torch.from_numpy(x)).numpy())


def test_torch_lenet_ports_to_gluon(tmp_path: Path) -> None:
    from unorm._torch.port import export_checkpoint as torch_export

    source = _torch_lenet(0)
    ckpt = torch_export(source, torch.zeros(1, 1, 28, 28))
    dest = lenet_bn()
    load_checkpoint(dest, _through_file(ckpt, tmp_path / "lenet.safetensors"))
    x = _batch(3)
    assert np.max(np.abs(_logits(dest, x) - _torch_logits(source, x))) <= 1e-4
    assert dest[10].spec == source[10].spec
    assert int(dest[1].num_batches_tracked.data().asnumpy()[0]) == 2


def test_gluon_lenet_ports_to_torch(tmp_path: Path) -> None:
    from unorm._torch.port import load_checkpoint as torch_load

    source = _trained(0)
    dest = _torch_lenet(1)
    ckpt = export_model(source, MODELS["lenet_bn"][1])
    torch_load(dest, _through_file(ckpt, tmp_path / "lenet.safetensors"))
    x = _batch(4)
    assert np.max(np.abs(_logits(source, x) - _torch_logits(dest, x))) <= 1e-4
    assert int(dest[1].num_batches_tracked) == 9


# -- BatchNorm conventions ---------------------------------------------------------------


def _native_net(**bn: Any) -> Any:
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4, in_units=3), gluon.nn.BatchNorm(in_channels=4, **bn))
    net.initialize()
    return _randomised(net, 0)


def _ours(**bn: Any) -> Any:
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4, in_units=3), BatchNorm(4, **bn))
    net.initialize()
    return net


def test_native_gluon_batchnorm_semantics_travel(tmp_path: Path) -> None:
    native = _native_net(epsilon=1e-3, momentum=0.7)
    ours = _ours()
    load_checkpoint(ours, _through_file(export_checkpoint(native), tmp_path / "bn.safetensors"))
    spec = ours[1].spec
    assert (spec.eps, round(spec.momentum, 12), spec.preset) == (1e-3, 0.3, "mxnet")
    assert (spec.running_var, spec.update_on, spec.skip_nonfinite) == ("biased", "backward", False)
    x = mx.nd.array(_batch(1, (6, 3)))
    np.testing.assert_allclose(ours(x).asnumpy(), native(x).asnumpy(), rtol=1e-6, atol=1e-6)
    # One training step (forward and backward) moves both the same way: biased variance,
    # weight 0.3 on the new batch, update when backward runs.
    for net in (native, ours):
        with autograd.record():
            out = net(x)
        out.backward()
    # The update-on-backward write happens inside the custom operator's backward, which
    # MXNet does not order before later plain reads of the parameter: wait for it.
    mx.nd.waitall()
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(
            getattr(ours[1], name).data().asnumpy(),
            getattr(native[1], name).data().asnumpy(),
            rtol=1e-5,
            atol=1e-6,
        )


def test_fixed_gamma_is_exported_as_ones_and_refused_when_it_is_not() -> None:
    native = _native_net(scale=False)  # fix_gamma: MXNet ignores the stored gamma
    assert not np.allclose(native[1].gamma.data().asnumpy(), 1.0)
    ckpt = export_checkpoint(native)
    np.testing.assert_array_equal(ckpt.tensor(ckpt.layers[1], "gamma"), np.ones(4))
    assert ckpt.layers[1].attrs["spec"]["scale"] is False
    ours = _ours()
    load_checkpoint(ours, ckpt)
    x = mx.nd.array(_batch(2, (5, 3)))
    np.testing.assert_allclose(ours(x).asnumpy(), native(x).asnumpy(), rtol=1e-6, atol=1e-6)
    # The other way round: a learnt gamma cannot go into a layer that fixes it at 1.
    source = _randomised(_ours(), 1)
    _refused(
        _native_net(scale=False),
        export_checkpoint(source),
        r"layer 1: checkpoint batchnorm '1' vs model batchnorm '1': the model's layer has "
        r"scale=False \(gamma fixed at 1\), the checkpoint's gamma is not all 1",
    )


def test_native_gluon_batchnorm_takes_eps_and_momentum_and_warns() -> None:
    source = _randomised(_ours(eps=1e-2, momentum=0.25), 3)
    dest = _native_net()
    # The canonical layer differs from gluon.nn.BatchNorm in every training setting but
    # momentum (a number here): each one is named.
    lost = (
        "running_var='unbiased', skip_nonfinite=True, allow_single_value=False, "
        "update_on='forward', empty_batch='skip'"
    )
    with pytest.warns(UserWarning) as caught:
        load_checkpoint(dest, export_checkpoint(source))
    assert [str(w.message) for w in caught if w.category is UserWarning] == [
        f"'1': gluon.nn.BatchNorm cannot express the source's training semantics ({lost}); "
        "eval output is unchanged, training differs. Use unorm.mxnet.convert(net, "
        "preset=None) first."
    ]
    assert dest[1]._kwargs["eps"] == 1e-2
    assert dest[1]._kwargs["momentum"] == pytest.approx(0.75)
    x = mx.nd.array(_batch(3, (5, 3)))
    np.testing.assert_allclose(dest(x).asnumpy(), source(x).asnumpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_loaded_settings_reach_the_operator(hybridize: bool) -> None:
    """The operator takes eps and momentum as graph attributes: a hybridized model that
    already ran must still use the loaded ones."""
    net = gluon.nn.HybridSequential()
    net.add(BatchNorm(3, num_dims=2))
    net.initialize()
    if hybridize:
        net.hybridize()
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, 3)) * 2 + 1).astype(np.float32)
    with autograd.train_mode():
        net(mx.nd.array(x))  # caches a graph with the old settings
    spec = BatchNormSpec(eps=0.5, momentum=0.4, running_var="biased", update_on="forward")
    tensors = {
        "gamma": rng.uniform(0.5, 1.5, 3).astype(np.float32),
        "beta": rng.normal(size=3).astype(np.float32),
        "running_mean": np.zeros(3, np.float32),
        "running_var": np.ones(3, np.float32),
        "num_batches_tracked": np.asarray(0, np.int64),
    }
    layer = port.Layer(
        "bn", "batchnorm", {k: f"bn.{k}" for k in tensors}, {"spec": dataclasses.asdict(spec)}
    )
    ckpt = port.Checkpoint([layer], {f"bn.{k}": v for k, v in tensors.items()}, "test")
    load_checkpoint(net, ckpt)
    with autograd.record():
        y = net(mx.nd.array(x))
    y.backward()
    g, b = tensors["gamma"], tensors["beta"]
    y_ref, running = ref.batch_norm_step(x, ref.init_running_stats(3), spec, g, b, training=True)
    np.testing.assert_allclose(y.asnumpy(), y_ref, rtol=1e-5, atol=1e-5)
    assert running is not None
    bn = net[0]
    np.testing.assert_allclose(bn.running_mean.data().asnumpy(), running.mean, rtol=1e-6)
    np.testing.assert_allclose(bn.running_var.data().asnumpy(), running.var, rtol=1e-6)


def test_a_preset_layer_takes_the_checkpoint_settings() -> None:
    dest = _trained(1, preset="mxnet")
    load_checkpoint(dest, export_model(_trained(0), MODELS["lenet_bn"][1]))
    assert dest[1].spec == BatchNormSpec(axis=1)  # the canonical layer's settings
    ours = _ours(preset="torch")
    load_checkpoint(ours, export_checkpoint(_native_net(epsilon=1e-3)))
    assert (ours[1].spec.eps, ours[1].spec.preset) == (1e-3, "mxnet")


# -- MXNet's own files -------------------------------------------------------------------


def _symbol_lenet() -> Any:
    """LeNet-BN written with the symbol API, its BatchNorm nodes left at the raw
    operator's defaults (no eps, no fix_gamma: eps=1e-3 and gamma fixed at 1)."""
    sym = mx.sym
    h = sym.var("data")
    for index, channels in enumerate((6, 16), start=1):
        h = sym.Convolution(h, num_filter=channels, kernel=(5, 5), name=f"conv{index}")
        h = sym.Activation(sym.BatchNorm(h, name=f"bn{index}"), act_type="sigmoid")
        h = sym.Pooling(h, kernel=(2, 2), stride=(2, 2), pool_type="max")
    h = sym.Flatten(h)
    for index, units in enumerate((120, 84), start=1):
        h = sym.FullyConnected(h, num_hidden=units, name=f"fc{index}")
        h = sym.Activation(sym.BatchNorm(h, name=f"bn{index + 2}"), act_type="sigmoid")
    return sym.FullyConnected(h, num_hidden=10, name="fc3")


def _saved_symbol_lenet(prefix: str, x: np.ndarray) -> np.ndarray:
    """Bind, initialise and run the symbol LeNet; save it (epoch 3, and a decoy epoch 1);
    return the executor's inference output."""
    net = _symbol_lenet()
    exe = net.simple_bind(mx.cpu(), data=x.shape, grad_req="null")
    rng = np.random.default_rng(0)
    for name, array in exe.arg_dict.items():
        if name.endswith("gamma"):
            array[:] = rng.uniform(0.5, 1.5, array.shape)  # ignored: fix_gamma by default
        elif name != "data":
            array[:] = rng.normal(0.0, 0.3, array.shape)
    for name, array in exe.aux_dict.items():
        # Small variances make eps=1e-3 against 1e-5 matter.
        small = rng.uniform(0.002, 0.02, array.shape)
        array[:] = small if name.endswith("var") else rng.normal(0.0, 0.2, array.shape)
    out = exe.forward(is_train=False, data=mx.nd.array(x))[0].asnumpy()
    args = {k: v for k, v in exe.arg_dict.items() if k != "data"}
    aux = dict(exe.aux_dict)
    decoy = {k: v * 0 for k, v in args.items()}
    mx.model.save_checkpoint(prefix, 1, net, decoy, aux)
    mx.model.save_checkpoint(prefix, 3, net, args, aux)
    return np.asarray(out)


def test_symbol_api_files_read_with_the_raw_operator_defaults(tmp_path: Path) -> None:
    x = _batch(7, (6, 1, 28, 28))
    prefix = str(tmp_path / "lenet")
    expected = _saved_symbol_lenet(prefix, x)
    ckpt = read_symbol(prefix + "-symbol.json")
    assert [la.kind for la in ckpt.layers] == LENET_KINDS
    assert {la.attrs["spec"]["eps"] for la in ckpt.layers if la.kind == "batchnorm"} == {1e-3}
    np.testing.assert_array_equal(ckpt.tensor(ckpt.layers[1], "gamma"), np.ones(6))
    net = read_native(lenet_bn(), prefix + "-symbol.json")
    np.testing.assert_allclose(_logits(net, x), expected, rtol=0, atol=1e-5)
    assert net[1].spec.eps == 1e-3 and net[1].spec.preset == "mxnet"
    # Both traps matter here: Gluon's eps or the stored gamma would change the logits.
    for layer in ckpt.layers[1::2]:
        layer.attrs["spec"]["eps"] = 1e-5
    load_checkpoint(net, ckpt)
    assert np.max(np.abs(_logits(net, x) - expected)) > 1e-3
    # The epoch's .params file read on its own goes through its symbol file.
    again = read_native(lenet_bn(), prefix + "-0003.params")
    np.testing.assert_allclose(_logits(again, x), expected, rtol=0, atol=1e-5)


def test_exported_files_round_trip_and_import_in_gluon(tmp_path: Path) -> None:
    source = _trained(0)
    target = tmp_path / "lenet-symbol.json"
    write_native(source, target)
    assert sorted(os.listdir(tmp_path)) == ["lenet-0000.params", "lenet-symbol.json"]
    x = _batch(8)
    dest = read_native(_trained(1), target)
    np.testing.assert_array_equal(_logits(dest, x), _logits(source, x))
    assert dest[1].spec == source[1].spec
    imported = gluon.SymbolBlock.imports(str(target), ["data"], str(tmp_path / "lenet-0000.params"))
    np.testing.assert_allclose(
        imported(mx.nd.array(x)).asnumpy(), _logits(source, x), rtol=1e-6, atol=1e-6
    )
    # HybridBlock.export's own files read the same way.
    source.hybridize()
    source(mx.nd.array(x))
    source.export(str(tmp_path / "gluon"), epoch=2)
    again = read_native(_trained(2), tmp_path / "gluon-symbol.json")
    np.testing.assert_array_equal(_logits(again, x), _logits(source, x))


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen_gamma_beta"])
def test_an_exported_update_in_backward_layer_is_one_layer(tmp_path: Path, frozen: bool) -> None:
    """update_on="backward" adds a native BatchNorm node that only orders the update
    (BatchNorm._order); the reader takes the unorm node as the layer and skips that node."""
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(3, in_units=5), BatchNorm(3, preset="mxnet"))
    net.initialize()
    if frozen:  # the node then reads the Dense output instead of gamma and beta
        net[1].gamma.grad_req = net[1].beta.grad_req = "null"
    net.hybridize()
    x = mx.nd.array(_batch(4, (4, 5)))
    with autograd.record():
        loss = net(x).sum()
    loss.backward()
    mx.nd.waitall()  # num_batches_tracked (int64) is not ordered before export's reads
    net.export(str(tmp_path / "bn"))
    nodes = json.loads((tmp_path / "bn-symbol.json").read_text())["nodes"]
    assert [n["op"] for n in nodes].count("BatchNorm") == 1  # the ordering node
    ckpt = read_symbol(tmp_path / "bn-symbol.json")
    assert [la.kind for la in ckpt.layers] == ["dense", "batchnorm"]
    assert ckpt.layers[1].attrs["spec"]["update_on"] == "backward"
    for role in ("gamma", "beta", "running_mean", "running_var", "num_batches_tracked"):
        want = getattr(net[1], role).data().asnumpy().reshape(-1)
        got = ckpt.tensor(ckpt.layers[1], role).reshape(-1)
        np.testing.assert_array_equal(got, want, err_msg=role)


def test_save_parameters_files_round_trip_and_mismatches_change_nothing(tmp_path: Path) -> None:
    source = _trained(0)
    write_native(source, tmp_path / "lenet.params")
    assert os.listdir(tmp_path) == ["lenet.params"]
    dest = read_native(_trained(1), tmp_path / "lenet.params")
    x = _batch(9)
    np.testing.assert_array_equal(_logits(dest, x), _logits(source, x))
    other = gluon.nn.HybridSequential()
    other.add(gluon.nn.Dense(3, in_units=2))
    other.initialize()
    write_native(other, tmp_path / "other.params")
    before = _state(dest)
    with pytest.raises(
        port.CheckpointError,
        match=r"names do not fit the model \(a file of another model\?\): missing",
    ):
        read_native(dest, tmp_path / "other.params")
    _assert_unchanged(before, dest)


# -- refusals ----------------------------------------------------------------------------


def test_wrong_shape_names_both_layers_and_changes_nothing() -> None:
    ckpt = export_model(_trained(0), MODELS["lenet_bn"][1])
    key = ckpt.layers[7].tensors["running_var"]
    tensors = {**ckpt.tensors, key: np.ones(85, np.float32)}
    _refused(
        _trained(1),
        dataclasses.replace(ckpt, tensors=tensors),
        r"layer 7: checkpoint batchnorm '13' vs model batchnorm '13': running_var shape "
        r"\(85,\) in the checkpoint, \(84,\) in the model",
    )
    key = ckpt.layers[8].tensors["weight"]
    tensors = {**ckpt.tensors, key: np.ones((12, 84), np.float32)}
    _refused(
        _trained(1),
        dataclasses.replace(ckpt, tensors=tensors),
        r"layer 8: checkpoint dense '15' \(12, 84\) vs model dense '15': weight shape "
        r"\(12, 84\) in the checkpoint, \(10, 84\) in the model",
    )


def test_missing_tensor_and_structural_mismatches_are_refused() -> None:
    ckpt = export_model(_trained(0), MODELS["lenet_bn"][1])
    dropped = dataclasses.replace(
        ckpt.layers[4], tensors={k: v for k, v in ckpt.layers[4].tensors.items() if k != "bias"}
    )
    _refused(
        _trained(1),
        dataclasses.replace(ckpt, layers=[*ckpt.layers[:4], dropped, *ckpt.layers[5:]]),
        r"layer 4: checkpoint dense '9' \(120, 256\) vs model dense '9': "
        r"the checkpoint has no 'bias'",
    )
    _refused(
        _trained(1),
        dataclasses.replace(ckpt, layers=ckpt.layers[:-1]),
        r"the checkpoint has 8 layers with parameters, the model 9",
    )
    swapped = [ckpt.layers[1], ckpt.layers[0], *ckpt.layers[2:]]
    _refused(
        _trained(1),
        dataclasses.replace(ckpt, layers=swapped),
        r"layer 0: checkpoint batchnorm '1' vs model conv '0': kinds differ",
    )
    bad = dataclasses.replace(ckpt.layers[1], attrs={"spec": {"eps": -1.0}})
    _refused(
        _trained(1),
        dataclasses.replace(ckpt, layers=[ckpt.layers[0], bad, *ckpt.layers[2:]]),
        r"layer 1: .*invalid BatchNorm settings in the checkpoint",
    )


def test_garbage_files_leave_the_model_unchanged(tmp_path: Path) -> None:
    net = _trained(0)
    before = _state(net)
    noise = np.random.default_rng(0).bytes(4096)
    for name in ("bad.safetensors", "bad-symbol.json", "bad-0000.params", "alone.params"):
        (tmp_path / name).write_bytes(noise)
    with pytest.raises(port.CheckpointError):
        load_checkpoint(net, port.load(tmp_path / "bad.safetensors"))
    with pytest.raises(port.CheckpointError, match="not an MXNet symbol file"):
        read_native(net, tmp_path / "bad-symbol.json")
    with pytest.raises(port.CheckpointError, match=r"not a readable MXNet \.params file"):
        read_native(net, tmp_path / "alone.params")
    (tmp_path / "bad-symbol.json").write_text(_symbol_lenet().tojson())
    with pytest.raises(port.CheckpointError, match=r"not a readable MXNet \.params file"):
        read_native(net, tmp_path / "bad-symbol.json")
    _assert_unchanged(before, net)


def test_blocks_with_unknown_parameters_are_refused_not_skipped() -> None:
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4, in_units=3), gluon.nn.LayerNorm(in_channels=4))
    net.initialize()
    with pytest.raises(port.CheckpointError, match=r"block '1' \(LayerNorm\) has parameters"):
        export_checkpoint(net)
    deferred = gluon.nn.HybridSequential()
    deferred.add(gluon.nn.Dense(4))
    deferred.initialize()
    with pytest.raises(port.CheckpointError, match="is not initialized"):
        export_checkpoint(deferred)


# -- the seed network's training --------------------------------------------------------


def test_training_lowers_the_loss() -> None:
    from unorm.models.data import digits
    from unorm.models.training import Recipe

    mx.random.seed(0)
    data = digits()
    losses = train(lenet_bn(), data.train_x, data.train_y, Recipe(steps=20))
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])


def test_the_worker_trains_and_evaluates_from_the_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def worker(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "unorm.models", "mxnet", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    worker("train", "-", "out.safetensors", "losses.json", "--steps", "5")
    record = json.loads((tmp_path / "losses.json").read_text())
    assert record["framework"] == "mxnet" and len(record["losses"]) == 5
    assert port.load(tmp_path / "out.safetensors").source == "mxnet"
    printed = worker("evaluate", "out.safetensors", "logits.npy")
    assert printed.startswith("mxnet: test accuracy")
    assert np.load(tmp_path / "logits.npy").shape == (359, 10)


def test_no_warning_for_a_canonical_port() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_checkpoint(_trained(1), export_model(_trained(0), MODELS["lenet_bn"][1]))


def test_scaled_ws_gain_and_settings_arrive_from_pytorch() -> None:
    from unorm.models.nf import SIGMOID_GAMMA
    from unorm.models.torch import lenet_nf
    from unorm.mxnet import ScaledStdConv2D
    from unorm.torch import export_checkpoint as torch_export

    torch.manual_seed(0)
    source = lenet_nf("timm")
    with torch.no_grad():
        source[0].gain.copy_(torch.linspace(0.5, 1.5, 6))

    class ScaledSigmoid(gluon.HybridBlock):
        def hybrid_forward(self, F, x):  # type: ignore[no-untyped-def]
            return F.sigmoid(x) * SIGMOID_GAMMA

    net = gluon.nn.HybridSequential()
    net.add(
        ScaledStdConv2D(6, 5, in_channels=1), ScaledSigmoid(), gluon.nn.MaxPool2D(2, 2),
        ScaledStdConv2D(16, 5, in_channels=6), ScaledSigmoid(), gluon.nn.MaxPool2D(2, 2),
        gluon.nn.Flatten(), gluon.nn.Dense(120, in_units=256), ScaledSigmoid(),
        gluon.nn.Dense(84, in_units=120), ScaledSigmoid(), gluon.nn.Dense(10, in_units=84),
    )  # fmt: skip
    net.initialize()
    load_checkpoint(net, torch_export(source, torch.zeros(1, 1, 28, 28)))
    assert net[0].ws.style == "timm"
    x = np.random.default_rng(0).normal(size=(2, 1, 28, 28)).astype("float32")
    want = source.eval()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(net(mx.nd.array(x)).asnumpy(), want, atol=1e-4)


# -- Scaled WS convolutions of every rank ------------------------------------------------


def _ws_net(rank: int, **ws: Any) -> Any:
    from unorm.mxnet import ScaledStdConv1D, ScaledStdConv2D, ScaledStdConv3D

    cls = {1: ScaledStdConv1D, 2: ScaledStdConv2D, 3: ScaledStdConv3D}[rank]
    net = gluon.nn.HybridSequential()
    net.add(cls(6, 3, groups=2, in_channels=4, **ws), gluon.nn.Dense(3, in_units=6 * 3**rank))
    net.initialize()
    return net


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_scaled_ws_conv_of_every_rank_round_trips_with_gain_and_settings(
    tmp_path: Path, rank: int, hybridize: bool
) -> None:
    source = _randomised(_ws_net(rank, style="timm", eps=1e-3), rank)
    source[0].gain.set_data(mx.nd.array(np.linspace(0.5, 2.0, 6)))
    ckpt = _through_file(export_checkpoint(source), tmp_path / "ws.safetensors")
    assert [la.kind for la in ckpt.layers] == ["conv", "dense"]
    conv = ckpt.layers[0]
    assert set(conv.tensors) == {"weight", "bias", "gain"} and conv.attrs["groups"] == 2
    assert ckpt.tensor(conv, "weight").shape == (6, 2, *(3,) * rank)  # (O, I/g, *k)
    dest = _ws_net(rank)  # deepmind, eps 1e-4: the checkpoint's settings replace them
    x = _batch(7, (2, 4, *(5,) * rank))
    if hybridize:
        dest.hybridize()
        dest(mx.nd.array(x))  # a graph traced with the old settings, to be dropped
    load_checkpoint(dest, ckpt)
    assert dest[0].ws == source[0].ws
    np.testing.assert_array_equal(dest[0].gain.data().asnumpy(), source[0].gain.data().asnumpy())
    np.testing.assert_array_equal(_logits(dest, x), _logits(source, x))


@pytest.mark.parametrize("rank", [1, 3])
def test_scaled_ws_conv_of_every_rank_matches_torch(rank: int) -> None:
    from unorm._torch.port import export_checkpoint as torch_export
    from unorm._torch.port import load_checkpoint as torch_load
    from unorm.mxnet import ScaledStdConv1D, ScaledStdConv3D
    from unorm.torch import ScaledStdConv1d, ScaledStdConv3d

    cls = {1: ScaledStdConv1D, 3: ScaledStdConv3D}[rank]
    source = cls(6, 3, groups=2, in_channels=4, style="timm")
    source.initialize()
    source.gain.set_data(mx.nd.array(np.linspace(0.5, 2.0, 6)))
    dest = {1: ScaledStdConv1d, 3: ScaledStdConv3d}[rank](4, 6, 3, groups=2)
    torch_load(dest, export_checkpoint(source))
    assert dest.ws == source.ws
    x = _batch(8, (2, 4, *(5,) * rank))
    with torch.no_grad():
        expected = dest(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_logits(source, x), expected, rtol=1e-5, atol=1e-5)
    back = cls(6, 3, groups=2, in_channels=4)
    back.initialize()
    load_checkpoint(back, torch_export(dest))
    assert back.ws == source.ws
    np.testing.assert_allclose(_logits(back, x), _logits(source, x), rtol=1e-6, atol=1e-6)


# -- verified loads (the checkpoint's probe) -------------------------------------------------


def _tampered(ckpt: port.Checkpoint, index: int, role: str, by: float) -> port.Checkpoint:
    key = ckpt.layers[index].tensors[role]
    return port.Checkpoint(ckpt.layers, {**ckpt.tensors, key: ckpt.tensors[key] + by}, ckpt.source)


def test_a_load_whose_outputs_differ_is_refused_naming_the_layer() -> None:
    ckpt = export_model(_trained(0), (1, 28, 28))
    assert ckpt.tensors["probe/input"].shape == (2, 1, 28, 28)
    dest = _randomised(lenet_bn(), 1)
    _refused(dest, _tampered(ckpt, 3, "running_var", 0.5), "diverges is layer 3: checkpoint")
    load_checkpoint(dest, ckpt)  # verified
    np.testing.assert_allclose(_logits(dest, _batch(2)), _logits(_trained(0), _batch(2)))


def test_a_hybridized_model_is_verified_on_its_output() -> None:
    """A hybridized model runs its layers inside one graph, unobserved: the output still
    decides, and the message says no layer could be named."""
    ckpt = export_model(_trained(0), (1, 28, 28))
    dest = _randomised(lenet_bn(), 1)
    dest.hybridize()
    _logits(dest, _batch(3))
    _refused(dest, _tampered(ckpt, 1, "running_mean", 0.5), "no layer's own output")


# -- layers matched along the data flow ----------------------------------------------------


def _gluon_residual() -> Any:
    """conv -> BN -> relu -> conv -> BN plus a 1x1 conv + BN shortcut, added; the
    shortcut's blocks are registered first."""

    class Residual(gluon.HybridBlock):
        def __init__(self) -> None:
            super().__init__()
            self.short = gluon.nn.Conv2D(4, 1, in_channels=3)
            self.short_bn = BatchNorm(in_channels=4)
            self.conv1 = gluon.nn.Conv2D(4, 3, padding=1, in_channels=3)
            self.bn1 = BatchNorm(in_channels=4)
            self.conv2 = gluon.nn.Conv2D(4, 3, padding=1, in_channels=4)
            self.bn2 = BatchNorm(in_channels=4)

        def hybrid_forward(self, F: Any, x: Any) -> Any:
            main = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(main + self.short_bn(self.short(x)))

    net = Residual()
    net.initialize()
    return net


def _torch_residual(seed: int = 4) -> Any:
    """The same block in PyTorch with the main path registered first."""
    from unorm.torch import BatchNorm as TorchBN

    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn1 = TorchBN(4)
            self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = TorchBN(4)
            self.short = torch.nn.Conv2d(3, 4, 1)
            self.short_bn = TorchBN(4)

        def forward(self, x: Any) -> Any:
            main = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(main + self.short_bn(self.short(x)))

    torch.manual_seed(seed)
    net = Residual()
    for p in net.parameters():
        p.data.normal_(0.0, 0.5)
    for _ in range(3):
        net(torch.randn(8, 3, 6, 6) * 2 + 0.5)
    return net.eval()


@pytest.mark.parametrize("hybridize", [False, True])
def test_a_residual_block_pairs_along_the_data_flow_both_ways(hybridize: bool) -> None:
    from unorm._torch.port import export_checkpoint as torch_export
    from unorm._torch.port import load_checkpoint as torch_load

    source = _torch_residual()
    dest = _gluon_residual()
    if hybridize:
        dest.hybridize()
    load_checkpoint(dest, torch_export(source, torch.zeros(1, 3, 6, 6)))  # verified
    x = _batch(5, (2, 3, 6, 6))
    with torch.no_grad():
        want = source(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(dest(mx.nd.array(x)).asnumpy(), want, rtol=1e-5, atol=1e-5)
    back = _torch_residual(seed=9)  # other values everywhere
    torch_load(back, export_checkpoint(dest, mx.nd.zeros((1, 3, 6, 6))))
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.from_numpy(x)).numpy(), want, atol=1e-5)
