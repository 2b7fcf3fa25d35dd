"""unorm.mxnet's BatchNorm after training (``SPEC.md`` section 8): ``fold`` against the
unfolded model's inference output (Gluon's own layers) and its ``export``, ``recalibrate``
against NumPy statistics of the whole data set. Runs where MXNet runs (legacy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.mxnet
mx = pytest.importorskip("mxnet")
from mxnet import gluon  # noqa: E402

from unorm._mxnet import internals  # noqa: E402
from unorm.mxnet import (  # noqa: E402
    BatchNorm,
    FoldError,
    FoldWarning,
    convert,
    fold,
    freeze,
    recalibrate,
)

nn = gluon.nn
_BNS = (BatchNorm, nn.BatchNorm)


def _blocks(block: Any) -> list[Any]:
    out = [block]
    for _, child in internals.children(block):
        out += _blocks(child)
    return out


def _bns(model: Any) -> list[Any]:
    return [b for b in _blocks(model) if isinstance(b, _BNS)]


def _randomise(model: Any, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    for name, p in model.collect_params().items():
        shape = p.shape
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            value = rng.uniform(0.2, 2.0, shape)
        elif name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(size=shape) * 0.5
        p.set_data(mx.nd.array(value, dtype=p.dtype))
    return model


def _state(model: Any) -> dict[str, np.ndarray]:
    return {k: p.data().asnumpy().copy() for k, p in model.collect_params().items()}


def _same(model: Any, before: dict[str, np.ndarray]) -> None:
    after = _state(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)


def _stack() -> Any:
    net = nn.HybridSequential()
    net.add(
        nn.Conv2D(6, 3, in_channels=4, use_bias=False),
        BatchNorm(in_channels=6),
        nn.Activation("relu"),
        nn.Conv2D(6, 3, groups=2, in_channels=6),
        nn.BatchNorm(in_channels=6),
        nn.Conv2DTranspose(4, 2, groups=2, in_channels=6),
        nn.BatchNorm(in_channels=4, scale=False),
        nn.Conv2D(8, 1, groups=4, in_channels=4),  # depthwise, multiplier 2
        BatchNorm(in_channels=8, preset="mxnet"),
        nn.Flatten(),
        nn.Dense(5, in_units=8 * 5 * 5),
        nn.BatchNorm(in_channels=5, use_global_stats=True),
    )
    net.initialize()
    return _randomise(net)


def _x(seed: int, shape: tuple[int, ...] = (3, 4, 8, 8)) -> Any:
    return mx.nd.array(np.random.default_rng(seed).normal(size=shape).astype("float32"))


def test_fold_equals_the_unfolded_inference_model_and_exports_without_batchnorm(
    tmp_path: Path,
) -> None:
    net = _stack()
    before = _state(net)
    folded = fold(net)
    _same(net, before)  # the original is untouched (before its forward: fix_gamma, below)
    assert not _bns(folded)
    assert len(folded.fold_report) == 5 and all(e.folded for e in folded.fold_report)
    x = _x(1)
    # Gluon's scale=False (fix_gamma) takes gamma as 1, and its forward writes the 1s in.
    np.testing.assert_allclose(folded(x).asnumpy(), net(x).asnumpy(), rtol=1e-5, atol=1e-5)
    folded.hybridize()
    folded(x)
    folded.export(str(tmp_path / "folded"))
    ops = {n["op"] for n in json.loads((tmp_path / "folded-symbol.json").read_text())["nodes"]}
    assert "BatchNorm" not in ops and "Custom" not in ops and "Convolution" in ops
    loaded = gluon.SymbolBlock.imports(
        str(tmp_path / "folded-symbol.json"), ["data"], str(tmp_path / "folded-0000.params")
    )
    np.testing.assert_allclose(loaded(x).asnumpy(), net(x).asnumpy(), rtol=1e-5, atol=1e-5)


class _Block(gluon.HybridBlock):  # type: ignore[misc]
    """ResNet-like: the stem's output feeds its BatchNorm and the shortcut."""

    def __init__(self) -> None:
        super().__init__()
        with self.name_scope():
            self.stem = nn.Conv2D(4, 3, padding=1, in_channels=3)
            self.stem_bn = nn.BatchNorm(in_channels=4)
            self.conv1 = nn.Conv2D(4, 3, padding=1, in_channels=4, use_bias=False)
            self.bn1 = BatchNorm(in_channels=4)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        h = self.stem(x)
        return self.bn1(self.conv1(F.relu(self.stem_bn(h)))) + h


def test_fold_leaves_the_batchnorm_whose_input_feeds_a_shortcut() -> None:
    net = _Block()
    net.initialize()
    _randomise(net, seed=2)
    with pytest.warns(FoldWarning, match=r"'stem_bn' is not folded: the output of 'stem' also"):
        folded = fold(net)
    assert [type(b).__name__ for b in _bns(folded)] == ["BatchNorm"]
    assert _bns(folded)[0] is folded.stem_bn
    report = {e.bn: e for e in folded.fold_report}
    assert report["bn1"].into == "conv1"
    x = _x(3, (2, 3, 5, 5))
    np.testing.assert_allclose(folded(x).asnumpy(), net(x).asnumpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(FoldError, match=r"'stem_bn' is not folded.*\(strict=True\)"):
        fold(net, strict=True)


class _Twice(gluon.HybridBlock):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        with self.name_scope():
            self.conv = nn.Conv2D(4, 1, in_channels=4)
            self.bn = nn.BatchNorm(in_channels=4)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return self.bn(self.conv(x)) + self.conv(x)


def _seq(*blocks: Any) -> Any:
    net = nn.HybridSequential()
    net.add(*blocks)
    return net


def test_fold_reports_what_it_cannot_fold_exactly() -> None:
    cases = [
        (_seq(nn.Activation("relu"), nn.BatchNorm(in_channels=4)), "its input is Activation"),
        (_seq(nn.Conv2D(5, 1, in_channels=4), BatchNorm(in_channels=5, axis=-1)), "axis -1 is not"),
        (
            _seq(
                nn.Conv2D(4, 1, in_channels=4), BatchNorm(in_channels=4, track_running_stats=False)
            ),
            "track_running_stats=False",
        ),
        (_Twice(), "'conv' is used 2 times"),
    ]  # fmt: skip
    for net, reason in cases:
        net.initialize()
        _randomise(net)
        before = _state(net)
        with pytest.warns(FoldWarning, match=reason):
            folded = fold(net)
        assert _bns(folded)
        with pytest.raises(FoldError, match=reason):
            fold(net, strict=True)
        _same(net, before)


def test_fold_refuses_an_uninitialised_model() -> None:
    net = _seq(nn.Dense(3), nn.BatchNorm())
    net.initialize()  # shapes deferred until the first call
    with pytest.raises(ValueError, match="fold needs an initialised model: parameter"):
        fold(net)


# -- freeze and convert ------------------------------------------------------------------


@pytest.mark.parametrize("trainable", [False, True])
def test_freeze_normalises_with_running_statistics_in_training(trainable: bool) -> None:
    from mxnet import autograd

    net = _seq(nn.Dense(3, in_units=2), nn.BatchNorm(in_channels=3))
    net.initialize()
    _randomise(net, seed=7)
    native = net[1]
    rm, rv = native.running_mean.data().asnumpy(), native.running_var.data().asnumpy()
    gamma, beta = native.gamma.data().asnumpy(), native.beta.data().asnumpy()
    net = freeze(net, trainable=trainable)
    bn = net[1]
    assert isinstance(bn, BatchNorm) and bn.frozen
    x = _x(8, (4, 2))
    h = net[0](x).asnumpy()
    dy = np.random.default_rng(9).normal(size=(4, 3)).astype("float32")
    with autograd.record(train_mode=True):
        y = net(x)
    y.backward(mx.nd.array(dy))
    xhat = (h - rm) / np.sqrt(rv + 1e-5)
    np.testing.assert_allclose(y.asnumpy(), xhat * gamma + beta, rtol=1e-5, atol=1e-6)
    mx.nd.waitall()
    np.testing.assert_array_equal(bn.running_mean.data().asnumpy(), rm)
    np.testing.assert_array_equal(bn.running_var.data().asnumpy(), rv)
    assert bn.gamma.grad_req == ("write" if trainable else "null")
    if trainable:  # the inference backward: running statistics are constants
        np.testing.assert_allclose(bn.gamma.grad().asnumpy(), (dy * xhat).sum(0), rtol=1e-5)
        np.testing.assert_allclose(bn.beta.grad().asnumpy(), dy.sum(0), rtol=1e-5)
    net.hybridize()  # the operator in a graph carries the frozen mode too
    with autograd.record(train_mode=True):
        again = net(x)
    again.backward(mx.nd.array(dy))
    np.testing.assert_allclose(again.asnumpy(), xhat * gamma + beta, rtol=1e-5, atol=1e-6)
    mx.nd.waitall()
    np.testing.assert_array_equal(bn.running_mean.data().asnumpy(), rm)
    with pytest.raises(ValueError, match="freeze needs running statistics: BatchNorm '0'"):
        freeze(_seq(BatchNorm(in_channels=2, track_running_stats=False)))


def test_convert_maps_use_global_stats_onto_the_frozen_mode() -> None:
    from mxnet import autograd

    net = _seq(nn.BatchNorm(in_channels=3, use_global_stats=True))
    net.initialize()
    _randomise(net, seed=10)
    x = _x(11, (4, 3))
    with autograd.record(train_mode=True):
        expected = net(x).asnumpy()  # Gluon's own frozen layer, in training
    state = _state(net)
    converted = convert(net)
    assert converted[0].frozen
    with autograd.record(train_mode=True):
        got = converted(x)
    got.backward()
    np.testing.assert_allclose(got.asnumpy(), expected, rtol=1e-5, atol=1e-6)
    mx.nd.waitall()
    after = _state(converted)
    for k, v in state.items():  # the very Parameters, unchanged by the training call
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    assert int(converted[0].num_batches_tracked.data().asnumpy()[0]) == 0


# -- recalibrate -------------------------------------------------------------------------


def test_recalibrate_gives_the_statistics_of_the_whole_data_set() -> None:
    net = _seq(
        nn.Dense(5, in_units=3),
        nn.BatchNorm(in_channels=5),
        nn.Activation("relu"),
        nn.Dense(4, in_units=5),
        BatchNorm(in_channels=4, preset="torch"),
    )
    net.initialize()
    _randomise(net, seed=4)
    params = _state(net)
    rng = np.random.default_rng(5)
    data = (rng.normal(size=(23, 3)) * 2 + 1).astype("float32")
    recalibrate(net, [mx.nd.array(data[i : i + 8]) for i in (0, 8, 16)])
    p = {k: v.astype(np.float64) for k, v in params.items()}  # in registration order
    names = list(p)
    w1, b1 = p[names[0]], p[names[1]]
    gamma1, beta1 = p[names[2]], p[names[3]]
    w2, b2 = p[names[6]], p[names[7]]
    h1 = data.astype(np.float64) @ w1.T + b1
    parts = []
    for i in (0, 8, 16):
        h = h1[i : i + 8]
        normed = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * gamma1 + beta1
        parts.append(np.maximum(normed, 0) @ w2.T + b2)
    h2 = np.concatenate(parts)
    bn1, bn2 = net[1], net[4]
    np.testing.assert_allclose(bn1.running_mean.data().asnumpy(), h1.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn1.running_var.data().asnumpy(), h1.var(0), rtol=1e-5)  # biased
    np.testing.assert_allclose(bn2.running_mean.data().asnumpy(), h2.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn2.running_var.data().asnumpy(), h2.var(0, ddof=1), rtol=1e-4)
    assert int(bn2.num_batches_tracked.data().asnumpy().reshape(-1)[0]) == 3
    after = _state(net)
    for k in names:
        if "running" not in k and "num_batches" not in k:
            np.testing.assert_array_equal(after[k], params[k], err_msg=k)


def test_recalibrate_refuses_bad_input_and_leaves_the_model_unchanged() -> None:
    net = _seq(nn.Dense(4, in_units=3), nn.BatchNorm(in_channels=4))
    net.initialize()
    _randomise(net, seed=6)
    before = _state(net)
    ok = mx.nd.ones((4, 3))
    bad = np.ones((4, 3), "float32")
    bad[1, 2] = np.inf
    plain = _seq(nn.Dense(2, in_units=3))
    plain.initialize()
    frozen = _seq(nn.BatchNorm(in_channels=3, use_global_stats=True))
    frozen.initialize()
    cases = [
        (plain, [ok], "recalibrate needs a model with at least one BatchNorm"),
        (frozen, [ok], "is not frozen, got none"),
        (net, [], "batches must yield at least one batch, got none"),
        (net, [ok, mx.nd.array(bad)], r"batches\[1\] gives non-finite statistics at BatchNorm"),
    ]
    for model, batches, message in cases:
        with pytest.raises(ValueError, match=message):
            recalibrate(model, batches)
    _same(net, before)
    net.hybridize()
    with pytest.raises(ValueError, match="recalibrate needs a model that is not hybridized"):
        recalibrate(net, [ok])
    _same(net, before)
    assert internals.hybridized(net) and not internals.hybridized(plain)


def test_recalibrate_over_two_devices_merges_their_uneven_shares() -> None:
    devices = [mx.cpu(0), mx.cpu(1)]
    net = _seq(nn.Dense(4, in_units=3), BatchNorm(in_channels=4))
    net.initialize(ctx=devices)
    data = np.random.default_rng(12).normal(size=(11, 3)).astype("float32") * 3 + 2
    shares = gluon.utils.split_and_load(mx.nd.array(data), devices, even_split=False)
    assert sorted(s.shape[0] for s in shares) == [5, 6]  # uneven
    recalibrate(net, shares)
    w = net[0].weight.data(devices[0]).asnumpy().astype(np.float64)
    b = net[0].bias.data(devices[0]).asnumpy().astype(np.float64)
    h = data.astype(np.float64) @ w.T + b
    for device in devices:  # every device's copy holds the statistics of all the data
        np.testing.assert_allclose(
            net[1].running_mean.data(device).asnumpy(), h.mean(0), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            net[1].running_var.data(device).asnumpy(), h.var(0, ddof=1), rtol=1e-5
        )


@pytest.mark.parametrize("running", ["variance", "stddev"])
def test_recalibrate_leaves_batch_renormalization_states(running: str) -> None:
    net = _seq(BatchNorm(in_channels=3, renorm=True, renorm_running=running))
    net.initialize()
    bn = net[0]
    bn.renorm_mean.set_data(mx.nd.array([0.5, -1.0, 2.0]))
    bn.renorm_std.set_data(mx.nd.array([1.5, 0.5, 2.0]))
    kept = [bn.renorm_mean.data().asnumpy().copy(), bn.renorm_std.data().asnumpy().copy()]
    rng = np.random.default_rng(17)
    data = [(rng.normal(size=(6, 3)) * 2 + 1).astype("float32"), rng.normal(size=(3, 3))]
    recalibrate(net, [mx.nd.array(d.astype("float32")) for d in data])
    flat = np.concatenate(data).astype(np.float32).astype(np.float64)
    var = flat.var(0, ddof=1)
    np.testing.assert_allclose(bn.running_mean.data().asnumpy(), flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.data().asnumpy(), var, rtol=1e-5)
    np.testing.assert_array_equal(bn.renorm_mean.data().asnumpy(), kept[0])
    np.testing.assert_array_equal(bn.renorm_std.data().asnumpy(), kept[1])
    if running == "stddev":
        got = bn.running_std.data().asnumpy()
        np.testing.assert_allclose(got, np.sqrt(var + 1e-5), rtol=1e-5)
