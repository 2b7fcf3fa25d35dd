"""``preset="mxnet"`` against ``gluon.nn.BatchNorm``, and ``unorm.mxnet.convert``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import runs_here  # the environment's framework list (UNORM_RUNS)
from unorm import reference as ref
from unorm.spec import BatchNormSpec

pytestmark = pytest.mark.mxnet


if runs_here("mxnet"):  # where MXNet is meant to run, a failing import is an error
    import mxnet as mx
    from mxnet import autograd, gluon

    from unorm.mxnet import BatchNorm, convert


def _values(layer: Any) -> dict[str, np.ndarray]:
    # The mxnet preset updates in backward, which MXNet does not order before plain reads.
    mx.nd.waitall()
    prefix = layer.prefix
    return {n[len(prefix) :]: p.data().asnumpy() for n, p in layer.collect_params().items()}


def _step(layer: Any, x: np.ndarray, dy: np.ndarray, backward: bool = True) -> tuple[Any, ...]:
    xs = mx.nd.array(x)
    xs.attach_grad()
    with autograd.record():
        y = layer(xs)
    if not backward:
        return (y.asnumpy(),)
    y.backward(mx.nd.array(dy))
    return y.asnumpy(), xs.grad.asnumpy(), layer.gamma.grad().asnumpy(), layer.beta.grad().asnumpy()


CLOSE = {"rtol": 1e-5, "atol": 1e-5}  # MXNet's own statistics are float32 sums


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 5)], ids=["rank2", "rank4"])
def test_preset_mxnet_matches_gluon_batchnorm(shape: tuple[int, ...], hybridize: bool) -> None:
    rng = np.random.default_rng(0)
    ours = BatchNorm(shape[1], preset="mxnet")
    native = gluon.nn.BatchNorm(in_channels=shape[1])
    for layer in (ours, native):
        layer.initialize()
        if hybridize:
            layer.hybridize()
    # Gluon's parameter names, plus unorm's update counter.
    assert set(_values(ours)) == {*_values(native), "num_batches_tracked"}
    for step in range(3):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        for a, b in zip(_step(ours, x, dy), _step(native, x, dy), strict=True):
            np.testing.assert_allclose(a, b, **CLOSE)
        for name, value in _values(native).items():
            np.testing.assert_allclose(_values(ours)[name], value, err_msg=name, **CLOSE)
        assert int(_values(ours)["num_batches_tracked"][0]) == step + 1
    # MXNet's CPU kernel updates the running statistics in backward: a training forward
    # without backward changes nothing, on both.
    before = _values(ours)
    _step(ours, x, dy, backward=False)
    _step(native, x, dy, backward=False)
    for name, value in before.items():
        np.testing.assert_array_equal(_values(ours)[name], value)
        if name in _values(native):
            np.testing.assert_allclose(_values(native)[name], value, **CLOSE)
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(
        ours(mx.nd.array(x)).asnumpy(), native(mx.nd.array(x)).asnumpy(), **CLOSE
    )


def test_preset_mxnet_inference_backward_holds_running_stats_constant() -> None:
    # The one place the preset departs from Gluon on purpose: MXNet's kernel differentiates
    # an inference-mode call as if the running statistics were batch statistics.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = BatchNorm(3, preset="mxnet")
    layer.initialize()
    mean, var = np.array([0.1, 0.2, -0.3]), np.array([0.5, 1.5, 2.0])
    layer.running_mean.set_data(mx.nd.array(mean))
    layer.running_var.set_data(mx.nd.array(var))
    xs = mx.nd.array(x)
    xs.attach_grad()
    with autograd.record(train_mode=False):
        y = layer(xs)
    y.backward(mx.nd.array(dy))
    expected = ref.batch_norm_inference_backward(dy, x, mean, var, np.ones(3), eps=1e-5, axis=1)
    np.testing.assert_allclose(xs.grad.asnumpy(), expected.dx, rtol=1e-5, atol=1e-6)


def _as_used(bn: Any, where: str, tmp_path: Path) -> tuple[Any, Any]:
    """(the callable to train, the BatchNorm block or SymbolBlock holding the state) for
    ``bn`` used ``where``; every model reads (N, 6)-shaped input, the layer 4 features."""
    if where in ("imperative", "hybridized"):
        bn.initialize()
        if where == "hybridized":
            bn.hybridize()
        return _flat(bn), bn
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4, in_units=6), bn)
    net.initialize(mx.init.Constant(0.2))
    net[0].weight.set_data(mx.nd.array(np.linspace(-1.0, 1.0, 24).reshape(4, 6)))
    if where == "frozen_gamma_beta":  # only the input needs a gradient
        bn.gamma.grad_req = bn.beta.grad_req = "null"
    net.hybridize()
    if where != "imported":
        return net, bn
    net(mx.nd.ones((2, 6)))  # builds the graph export() writes
    tmp_path.mkdir()
    prefix = str(tmp_path / "model")
    net.export(prefix)
    loaded = gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"], prefix + "-0000.params")
    return loaded, loaded


def _flat(bn: Any) -> Any:
    return lambda x: bn(x.reshape((-1, 4, 3)))  # (N, 6) as (N/2, 4, 3) for the bare layer


def _running_stat(holder: Any, name: str) -> np.ndarray:
    params = [p for n, p in holder.collect_params().items() if n.endswith(name)]
    assert len(params) == 1, name
    return params[0].data().asnumpy()  # no waitall: MXNet's own read


@pytest.mark.parametrize(
    "where",
    ["imperative", "hybridized", "hybridized_parent", "frozen_gamma_beta", "imported"],
)
def test_preset_mxnet_running_stats_read_right_after_backward(where: str, tmp_path: Path) -> None:
    """update_on="backward": a read through MXNet's own API straight after backward()
    sees that step's update, as with gluon.nn.BatchNorm (no synchronisation between)."""
    models = [
        _as_used(BatchNorm(4, preset="mxnet"), where, tmp_path / "ours"),
        _as_used(gluon.nn.BatchNorm(in_channels=4), where, tmp_path / "gluon"),
    ]
    rng = np.random.default_rng(3)
    changed = 0.0
    for step in range(4):
        x = mx.nd.array(rng.standard_normal((24, 6)) * (1 + step) + 2 * step)
        x.attach_grad()
        seen = []
        for model, holder in models:
            before = _running_stat(holder, "running_var")
            with autograd.record():
                loss = (model(x) ** 2).sum()
            loss.backward()
            seen.append([_running_stat(holder, n) for n in ("running_mean", "running_var")])
            changed = max(changed, float(np.abs(seen[-1][1] - before).max()))
        for name, ours, gluons in zip(("running_mean", "running_var"), *seen, strict=True):
            np.testing.assert_allclose(ours, gluons, err_msg=f"{name}, step {step}", **CLOSE)
    assert changed > 0.1  # the steps moved the statistics, so a stale read would show
    mx.nd.waitall()
    counter = _running_stat(models[0][1], "num_batches_tracked")
    assert int(counter[0]) == 4


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize(
    ("empty", "full"), [((0, 4), (6, 4)), ((0, 4, 5, 5), (3, 4, 5, 5))], ids=["rank2", "rank4"]
)
def test_preset_mxnet_empty_batch_matches_gluon_batchnorm(
    empty: tuple[int, ...], full: tuple[int, ...], hybridize: bool
) -> None:
    """Under NumPy shape semantics (the only place MXNet 1.x has an empty array) Gluon's
    layer turns its running statistics to NaN when backward runs on an empty batch, and so
    does the preset (SPEC.md section 2, *Empty batch*), counting the batch. The gamma
    gradient is 0 (a sum over nothing), where Gluon's is NaN (SPEC.md section 4)."""
    rng = np.random.default_rng(4)
    with mx.util.np_shape(True):
        ours = BatchNorm(4, preset="mxnet")
        native = gluon.nn.BatchNorm(in_channels=4)
        for layer in (ours, native):
            layer.initialize()
            if hybridize:
                layer.hybridize()
        x = (rng.standard_normal(full) * 2 + 1).astype(np.float32)
        dy = rng.standard_normal(full).astype(np.float32)
        for a, b in zip(_step(ours, x, dy), _step(native, x, dy), strict=True):
            np.testing.assert_allclose(a, b, **CLOSE)
        before, native_before = _values(ours), _values(native)
        assert np.isfinite(before["running_var"]).all() and not (before["running_var"] == 1).all()
        nothing = np.zeros(empty, np.float32)
        # A training forward without backward changes nothing, on both.
        outputs = [_step(layer, nothing, nothing, backward=False)[0] for layer in (ours, native)]
        assert outputs[0].shape == outputs[1].shape == empty
        for layer, values in ((ours, before), (native, native_before)):
            for name, value in _values(layer).items():
                np.testing.assert_array_equal(value, values[name], err_msg=name)
        for layer in (ours, native):
            layer.gamma.grad()[:] = 7.0
        got, want = _step(ours, nothing, nothing), _step(native, nothing, nothing)
        for a, b in zip(got[:2], want[:2], strict=True):  # y, dx: empty
            assert a.shape == b.shape == empty and a.dtype == b.dtype
        np.testing.assert_array_equal(got[3], want[3])  # dbeta: 0 on both
        np.testing.assert_array_equal(got[3], np.zeros(4))
        np.testing.assert_array_equal(got[2], np.zeros(4))  # dgamma: 0, Gluon's NaN
        assert np.isnan(want[2]).all()
        values = _values(ours)
        for name, value in _values(native).items():
            if name.startswith("running"):
                assert np.isnan(value).all() and np.isnan(values[name]).all(), name
            else:  # gamma, beta: unchanged (no optimizer step here)
                np.testing.assert_allclose(values[name], value, err_msg=name, **CLOSE)
        assert int(values["num_batches_tracked"][0]) == 2
        running = ref.RunningStats(before["running_mean"], before["running_var"], 1)
        _, want_state = ref.batch_norm_step(nothing, running, ours.spec, training=True)
        np.testing.assert_array_equal(values["running_mean"], want_state.mean)  # NaN
        assert want_state.num_batches_tracked == 2
        # Inference with NaN statistics: NaN on both, as the reference says.
        x = rng.standard_normal(full).astype(np.float32)
        y_ref = ref.batch_norm_step(x, want_state, ours.spec, training=False)[0]
        assert np.isnan(y_ref).all()
        np.testing.assert_array_equal(
            ours(mx.nd.array(x)).asnumpy(), native(mx.nd.array(x)).asnumpy()
        )


def test_preset_mxnet_is_gluons_native_arguments() -> None:
    layer = BatchNorm(3, preset="mxnet")
    assert layer.spec == BatchNormSpec.from_native("mxnet", momentum=0.9, epsilon=1e-5)


def _model(bn: Any) -> Any:
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=2), bn, gluon.nn.Activation("relu"))
    net.add(gluon.nn.Dense(3))
    return net


def test_convert_keeps_state_and_gluon_numbers() -> None:
    rng = np.random.default_rng(1)
    x = mx.nd.array(rng.standard_normal((5, 2, 6, 6)))
    net = _model(gluon.nn.BatchNorm(momentum=0.8, epsilon=1e-4))
    twin = _model(gluon.nn.BatchNorm(momentum=0.8, epsilon=1e-4))
    for model in (net, twin):
        model.initialize(mx.init.Xavier())
    for _ in range(2):  # give the native layer some state
        with autograd.record():
            out = net(x)
        out.backward()
    twin_params = twin.collect_params()
    for (_, p), (_, q) in zip(net.collect_params().items(), twin_params.items(), strict=True):
        q.set_data(p.data().copy())  # a snapshot: twin initialises lazily
    gamma_before = net[1].gamma
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    net = convert(net)
    assert isinstance(net[1], BatchNorm) and net[1].gamma is gamma_before
    assert net[1].spec == BatchNormSpec.from_native("mxnet", momentum=0.8, epsilon=1e-4)
    net.hybridize()
    twin.hybridize()
    for _ in range(2):
        outs = []
        for model in (net, twin):
            with autograd.record():
                out = model(x)
            out.backward()
            outs.append(out.asnumpy())
        np.testing.assert_allclose(*outs, **CLOSE)
    mx.nd.waitall()  # an update made in backward is not ordered before plain reads
    for name in ("running_mean", "running_var"):
        ours, gluons = (getattr(m[1], name).data().asnumpy() for m in (net, twin))
        np.testing.assert_allclose(ours, gluons, err_msg=name, **CLOSE)
    assert int(net[1].num_batches_tracked.data().asnumpy()[0]) == 2  # counted from convert
    trainer.step(5)  # a trainer made before the conversion still updates the same gamma
    assert not np.array_equal(net[1].gamma.data().asnumpy(), twin[1].gamma.data().asnumpy())


def test_convert_to_canonical_updates_in_forward() -> None:
    net = _model(gluon.nn.BatchNorm(in_channels=4))
    net.initialize()
    running = net[1].running_mean.data().asnumpy().copy()
    net = convert(net, preset=None)
    layer = net[1]
    assert layer.spec.running_var == "unbiased" and layer.spec.momentum == pytest.approx(0.1)
    assert layer.num_batches_tracked is not None
    np.testing.assert_array_equal(layer.running_mean.data().asnumpy(), running)
    with autograd.train_mode():
        net(mx.nd.ones((2, 2, 6, 6)))
    assert int(layer.num_batches_tracked.data().asnumpy()[0]) == 1


def test_convert_a_bare_layer_and_freeze_global_stats() -> None:
    layer = convert(gluon.nn.BatchNorm(scale=False, center=False, in_channels=2))
    assert isinstance(layer, BatchNorm) and not layer.spec.scale and not layer.spec.center
    frozen = convert(gluon.nn.BatchNorm(use_global_stats=True))  # SPEC.md section 8
    assert isinstance(frozen, BatchNorm) and frozen.frozen
    with pytest.raises(ValueError, match="preset must be one of"):
        convert(gluon.nn.BatchNorm(), preset="caffe")


def test_convert_refuses_a_frozen_nonzero_beta_before_replacing_anything() -> None:
    # Gluon's center=False still adds its (frozen) beta: Gluon's own layer is the truth here.
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.BatchNorm(in_channels=3), gluon.nn.BatchNorm(center=False, in_channels=3))
    net.initialize()
    net[1].beta.set_data(mx.nd.array([1.0, 2.0, 3.0]))
    x = mx.nd.array(np.random.default_rng(2).normal(size=(4, 3)))
    beta = np.array([1.0, 2.0, 3.0])
    # Inference with running mean 0 and variance 1: Gluon's output holds the stored beta.
    np.testing.assert_allclose(
        net[1](x).asnumpy(), x.asnumpy() / np.sqrt(1 + 1e-5) + beta, rtol=1e-5, atol=1e-6
    )
    named = re.escape(f"layer {net[1].name!r}: gluon.nn.BatchNorm(center=False) adds")
    with pytest.raises(ValueError, match=named):
        convert(net)
    assert [type(b) for b in net] == [gluon.nn.BatchNorm, gluon.nn.BatchNorm]  # nothing replaced
    # A zero beta (what Gluon initialises) converts, and keeps Gluon's output.
    net[1].beta.set_data(mx.nd.zeros(3))
    want = net(x).asnumpy()
    converted = convert(net)
    assert not converted[1].spec.center
    np.testing.assert_allclose(converted(x).asnumpy(), want, rtol=1e-6, atol=1e-6)


def test_convert_leaves_subclasses_such_as_contrib_sync_batchnorm_as_they_are() -> None:
    # Only the exact type gluon.nn.BatchNorm is replaced (see convert's docstring).
    net = gluon.nn.HybridSequential()
    sync = gluon.contrib.nn.SyncBatchNorm(in_channels=4, num_devices=1)
    net.add(gluon.nn.Dense(4, in_units=3), sync, gluon.nn.BatchNorm(in_channels=4))
    net.initialize()
    net = convert(net)
    assert net[1] is sync and type(net[1]) is gluon.contrib.nn.SyncBatchNorm
    assert isinstance(net[2], BatchNorm)


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_between_convolutions_matches_gluon(hybridize: bool) -> None:
    # Convolutions hand their outputs and input gradients over in MKL-DNN layouts, which
    # MXNet's CustomOp mishandles unless the layer converts them (see BatchNorm).
    rng = np.random.default_rng(3)
    mx.random.seed(3)  # Xavier draws from MXNet's RNG: independent of the tests run before

    def net(bn: Any) -> Any:
        model = gluon.nn.HybridSequential()
        model.add(
            # No bias before BatchNorm: its gradient is zero up to rounding, so comparing
            # it compared rounding noise (it failed for some initial weights).
            gluon.nn.Conv2D(16, 3, in_channels=3, use_bias=False),
            bn,
            gluon.nn.Activation("relu"),
            gluon.nn.Conv2D(8, 3, in_channels=16),
            gluon.nn.MaxPool2D(2, 2),
            gluon.nn.Dense(4, in_units=8 * 4 * 4),
        )
        model.initialize(mx.init.Xavier(rnd_type="gaussian"))
        if hybridize:
            model.hybridize()
        return model

    ours, native = net(BatchNorm(16, preset="mxnet")), net(gluon.nn.BatchNorm(in_channels=16))
    native_params = list(native.collect_params().values())
    own_params = [p for n, p in ours.collect_params().items() if "tracked" not in n]
    for p, q in zip(own_params, native_params, strict=True):
        q.set_data(p.data())
    for _ in range(2):
        x = mx.nd.array(rng.standard_normal((6, 3, 12, 12)))
        for model in (ours, native):
            with autograd.record():
                loss = (model(x) ** 2).sum()
            loss.backward()
        for p, q in zip(own_params, native_params, strict=True):
            if p.grad_req != "null":
                np.testing.assert_allclose(
                    p.grad().asnumpy(), q.grad().asnumpy(), rtol=1e-4, atol=1e-4, err_msg=p.name
                )
    mx.nd.waitall()
    for p, q in zip(own_params, native_params, strict=True):
        np.testing.assert_allclose(p.data().asnumpy(), q.data().asnumpy(), **CLOSE)
    x = mx.nd.array(rng.standard_normal((4, 3, 12, 12)))
    np.testing.assert_allclose(ours(x).asnumpy(), native(x).asnumpy(), rtol=1e-5, atol=1e-5)
