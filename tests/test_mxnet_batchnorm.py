"""unorm.mxnet.BatchNorm against the NumPy reference (SPEC.md section 2).

Runs where MXNet runs (the legacy environment); the ``mxnet`` marker skips it elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
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

    from unorm.mxnet import BatchNorm

F32 = {"rtol": 1e-5, "atol": 2e-5}


def _state(layer: Any) -> dict[str, np.ndarray]:
    prefix = layer.prefix
    return {
        name[len(prefix) :]: p.data().asnumpy().copy() for name, p in layer.collect_params().items()
    }


def _assert_state_equal(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def _running(layer: Any) -> ref.RunningStats:
    return ref.RunningStats(
        layer.running_mean.data().asnumpy().astype(np.float64),
        layer.running_var.data().asnumpy().astype(np.float64),
        int(layer.num_batches_tracked.data().asnumpy()[0]),
    )


def _train_step(layer: Any, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs = mx.nd.array(x, dtype=x.dtype)
    xs.attach_grad()
    with autograd.record():
        y = layer(xs)
    y.backward(mx.nd.array(dy, dtype=x.dtype))
    return y.asnumpy(), xs.grad.asnumpy()


def _run_against_reference(
    layer: Any, spec: BatchNormSpec, shape: tuple[int, ...], seed: int
) -> None:
    """Five training steps (output, gradients, state) and one inference call."""
    rng = np.random.default_rng(seed)
    ax = spec.axis % len(shape)
    channels = shape[ax]
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.uniform(-0.5, 0.5, channels)
    layer.gamma.set_data(mx.nd.array(gamma))
    layer.beta.set_data(mx.nd.array(beta))
    running = ref.init_running_stats(channels)
    g_ref = gamma if spec.scale else None
    for _ in range(5):
        x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        y, dx = _train_step(layer, x, dy)
        y_ref, running = ref.batch_norm_step(x, running, spec, gamma, beta, training=True)
        grads = ref.batch_norm_backward(dy, x, g_ref, eps=spec.eps, axis=ax, center=spec.center)
        np.testing.assert_allclose(y, y_ref, **F32)
        np.testing.assert_allclose(dx, grads.dx, **F32)
        if spec.scale:
            np.testing.assert_allclose(
                layer.gamma.grad().asnumpy(), grads.dgamma, rtol=1e-5, atol=1e-4
            )
        if spec.center:
            np.testing.assert_allclose(
                layer.beta.grad().asnumpy(), grads.dbeta, rtol=1e-5, atol=1e-4
            )
        got = _running(layer)
        np.testing.assert_allclose(got.mean, running.mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got.var, running.var, rtol=1e-6, atol=1e-6)
        assert got.num_batches_tracked == running.num_batches_tracked
    x = rng.standard_normal(shape).astype(np.float32)
    y_ref, _ = ref.batch_norm_step(x, running, spec, gamma, beta, training=False)
    np.testing.assert_allclose(layer(mx.nd.array(x)).asnumpy(), y_ref, **F32)


SHAPES = [(8, 3), (4, 3, 5), (4, 3, 6, 6), (2, 3, 4, 3, 2)]


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"rank{len(s)}" for s in SHAPES])
def test_five_training_steps_then_inference_match_reference(
    shape: tuple[int, ...], hybridize: bool
) -> None:
    layer = BatchNorm(shape[1], num_dims=len(shape))
    layer.initialize()
    if hybridize:
        layer.hybridize()
    _run_against_reference(layer, BatchNormSpec(), shape, seed=len(shape))


SETTINGS = {
    "cumulative_biased": {"momentum": None, "running_var": "biased"},
    "momentum_0.3_eps_1e-3": {"momentum": 0.3, "eps": 1e-3},
    "no_affine": {"center": False, "scale": False},
    "preset_torch": {"preset": "torch"},
    "preset_keras_channels_last": {"preset": "keras", "axis": -1},
    "long_rows": {},
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_settings_match_reference(name: str) -> None:
    kwargs = dict(SETTINGS[name])
    shape = (
        (3, 40, 4) if kwargs.get("axis") == -1 else (3, 4, 40) if name == "long_rows" else (6, 4, 3)
    )
    preset = kwargs.pop("preset", None)
    layer = BatchNorm(preset=preset, **kwargs)
    layer.initialize()
    layer.hybridize()
    spec = BatchNormSpec.from_preset(preset, **{"axis": 1, **kwargs})
    _run_against_reference(layer, spec, shape, seed=7)


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_training_forward_without_backward_updates_running_stats(hybridize: bool) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 2)).astype(np.float32)
    layer = BatchNorm(3)
    layer.initialize()
    if hybridize:
        layer.hybridize()
    with autograd.train_mode():  # a training forward, no recording, no backward
        layer(mx.nd.array(x))
    with autograd.record():  # recorded, but backward never runs
        layer(mx.nd.array(x))
    expected = ref.init_running_stats(3)
    for _ in range(2):
        _, expected = ref.batch_norm_step(x, expected, BatchNormSpec(), training=True)
    got = _running(layer)
    np.testing.assert_allclose(got.mean, expected.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.var, expected.var, rtol=1e-6)
    assert got.num_batches_tracked == 2
    layer(mx.nd.array(x))  # inference changes nothing
    assert _running(layer).num_batches_tracked == 2


def test_updates_once_per_call_inside_a_hybridized_parent() -> None:
    rng = np.random.default_rng(2)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4, in_units=3), BatchNorm(4))
    net.initialize()
    net.hybridize()
    x = rng.standard_normal((6, 3)).astype(np.float32)
    hidden = net[0](mx.nd.array(x)).asnumpy()
    with autograd.train_mode():
        net(mx.nd.array(x))
    with autograd.record():
        out = net(mx.nd.array(x))
    out.backward()
    expected = ref.init_running_stats(4)
    for _ in range(2):
        _, expected = ref.batch_norm_step(hidden, expected, BatchNormSpec(), training=True)
    got = _running(net[1])
    np.testing.assert_allclose(got.mean, expected.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.var, expected.var, rtol=1e-5)
    assert got.num_batches_tracked == 2


def test_large_mean_keeps_float32_accuracy() -> None:
    # SPEC.md section 2, numerics: mean 1e4, std 1. MXNet's own kernel loses every digit here.
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 4, 16, 16)) + 1e4).astype(np.float32)
    layer = BatchNorm(4)
    layer.initialize()
    with autograd.train_mode():
        y = layer(mx.nd.array(x)).asnumpy()
    y_ref, stats = ref.batch_norm_train(x, eps=1e-5, axis=1)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-4)
    got = _running(layer)
    np.testing.assert_allclose(got.mean, 0.1 * stats.mean, rtol=1e-7)
    np.testing.assert_allclose(got.var, 0.9 + 0.1 * stats.var(unbiased=True), rtol=1e-6)


def test_non_finite_batch_skips_the_whole_update() -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    x[1, 2] = np.inf
    layer = BatchNorm(3, momentum=None)
    layer.initialize()
    before = _state(layer)
    with autograd.train_mode():
        y = layer(mx.nd.array(x)).asnumpy()
    assert not np.isfinite(y[:, 2]).any() and np.isfinite(y[:, :2]).all()
    _assert_state_equal(before, _state(layer))
    unguarded = BatchNorm(3, preset="torch")
    unguarded.initialize()
    with autograd.train_mode():
        unguarded(mx.nd.array(x))
    assert not np.isfinite(_running(unguarded).var[2])
    assert _running(unguarded).num_batches_tracked == 1


def test_one_value_per_channel() -> None:
    x = mx.nd.array([[1.0, 2.0, 3.0]])
    layer = BatchNorm(3)
    layer.initialize()
    before = _state(layer)
    with autograd.train_mode(), pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(x)
    _assert_state_equal(before, _state(layer))
    assert layer(x).shape == (1, 3)  # inference with running statistics is fine
    single = BatchNorm(3, allow_single_value=True, center=True)
    single.initialize()
    single.beta.set_data(mx.nd.array([0.5, -1.0, 2.0]))
    with autograd.train_mode():
        y = single(x).asnumpy()
    np.testing.assert_array_equal(y, [[0.5, -1.0, 2.0]])
    np.testing.assert_allclose(_running(single).var, [0.9, 0.9, 0.9])  # biased feed, 0


BAD_INPUTS = {
    "rank1": ((3,), "float32", {}, "rank >= 2"),
    "num_dims": ((2, 3, 4), "float32", {"num_dims": 4}, r"rank 4 \(num_dims=4\)"),
    "int_dtype": ((4, 3), "int32", {}, "floating-point dtype, got int32"),
    "channels": ((4, 5), "float32", {}, "must have 3 features on axis 1, got shape"),
    "axis": ((4, 3), "float32", {"axis": 2}, "axis must be an integer in"),
}


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_changes_nothing(case: str, hybridize: bool) -> None:
    shape, dtype, kwargs, message = BAD_INPUTS[case]
    layer = BatchNorm(3, **kwargs)
    layer.initialize()
    if hybridize:
        layer.hybridize()
    before = _state(layer)
    x = mx.nd.ones(shape, dtype=dtype)
    x.attach_grad()
    with pytest.raises(ValueError, match=message), autograd.record():
        layer(x)
    _assert_state_equal(before, _state(layer))


def _state_bytes(model: Any) -> dict[str, bytes]:
    """Every parameter and state of ``model``, byte for byte."""
    mx.nd.waitall()
    return {n: p.data().asnumpy().tobytes() for n, p in model.collect_params().items()}


@pytest.mark.parametrize("where", ["direct", "hybridized", "hybridized_parent", "imported"])
@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8"])
def test_integer_input_is_refused_everywhere_and_changes_nothing(
    where: str, dtype: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An integer input is refused with one message however the layer is reached. Inside a
    graph (a hybridized parent, an imported model) the operator's type inference refuses
    it before anything runs: MXNet prints that message and raises its own error."""
    rng = np.random.default_rng(9)
    layer = BatchNorm(3)
    model: Any = layer
    if where in ("hybridized_parent", "imported"):
        model = gluon.nn.HybridSequential()
        model.add(gluon.nn.Activation("relu"), layer)
    model.initialize()
    if where != "direct":
        model.hybridize()
    good = mx.nd.array(rng.standard_normal((5, 3)) + 1.0)
    with autograd.record():  # state worth keeping, and the graph built
        model(good).backward()
    if where == "imported":
        model.export(str(tmp_path / "bn"))
        model = gluon.SymbolBlock.imports(
            str(tmp_path / "bn-symbol.json"), ["data"], str(tmp_path / "bn-0000.params")
        )
    before = _state_bytes(model)
    capsys.readouterr()
    bad = mx.nd.array(rng.integers(0, 5, (5, 3)), dtype=dtype)
    message = f"input must have a floating-point dtype, got {dtype}"
    if where in ("direct", "hybridized"):
        with pytest.raises(ValueError, match=message), autograd.record():
            model(bad)
    else:
        with pytest.raises(mx.base.MXNetError), autograd.record():
            model(bad).wait_to_read()
        assert message in capsys.readouterr().out
    assert _state_bytes(model) == before
    with autograd.train_mode():  # the layer still works
        assert model(good).dtype == np.float32
    assert _state_bytes(model) != before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "caffe"}, "preset must be one of"),
        ({"momentum": 1.5}, "momentum must be a number in"),
        ({"eps": -1.0}, "eps must be"),
        ({"in_channels": -1}, "in_channels must be an integer >= 0"),
        ({"num_dims": 1}, "num_dims must be an integer >= 2"),
        ({"update_on": "never"}, "update_on must be one of"),
    ],
)
def test_bad_settings_raise(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchNorm(**kwargs)


def test_float16_input_keeps_float32_state() -> None:
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((8, 3, 4)) * 3 + 1).astype(np.float16)
    layer = BatchNorm(3)
    layer.initialize()
    layer.cast("float16")
    assert np.dtype(layer.gamma.dtype) == np.float32
    assert np.dtype(layer.num_batches_tracked.dtype) == np.int64
    dy = rng.standard_normal(x.shape).astype(np.float16)
    y, dx = _train_step(layer, x, dy)
    assert y.dtype == np.float16 and dx.dtype == np.float16
    y_ref, stats = ref.batch_norm_train(x.astype(np.float64), eps=1e-5, axis=1)
    np.testing.assert_allclose(y, y_ref, rtol=2e-3, atol=4e-3)
    grads = ref.batch_norm_backward(dy, x.astype(np.float64), np.ones(3), eps=1e-5, axis=1)
    np.testing.assert_allclose(dx, grads.dx, rtol=2e-3, atol=4e-3)
    np.testing.assert_allclose(_running(layer).mean, 0.1 * stats.mean, rtol=1e-6)


def test_float64_input_after_cast() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 3, 5))
    layer = BatchNorm(3)
    layer.initialize()
    with pytest.raises(ValueError, match=r"cast\('float64'\)"):
        layer(mx.nd.array(x, dtype="float64"))
    layer.cast("float64")
    dy = rng.standard_normal(x.shape)
    y, dx = _train_step(layer, x, dy)
    y_ref, _ = ref.batch_norm_train(x, eps=1e-5, axis=1)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    grads = ref.batch_norm_backward(dy, x, np.ones(3), eps=1e-5, axis=1)
    np.testing.assert_allclose(dx, grads.dx, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize(
    ("shape", "kwargs", "dtype"),
    [
        ((6, 4, 5, 5), {}, "float32"),
        ((6, 5, 4), {"axis": -1}, "float32"),
        ((7, 4), {"scale": False, "center": False}, "float32"),
        ((3, 4, 2, 2, 2), {"eps": 1e-2}, "float64"),
        ((6, 4, 3), {}, "float16"),  # through the operator, in float32
    ],
)
def test_inference_without_autograd_matches_the_reference(
    shape: tuple[int, ...],
    kwargs: dict[str, Any],
    dtype: str,
    hybridize: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inference with nothing recorded runs MXNet's kernel on the running statistics; it
    gives the reference's numbers and what the operator gives under autograd.record."""
    rng = np.random.default_rng(len(shape))
    spec = BatchNormSpec(**kwargs)
    channels = shape[spec.axis]
    layer = BatchNorm(channels, **kwargs)
    layer.initialize()
    if dtype == "float64":
        layer.cast("float64")
    values = {
        "gamma": rng.uniform(0.5, 1.5, channels),  # also when fixed: then it counts as 1
        "beta": rng.uniform(-0.5, 0.5, channels),
        "running_mean": rng.normal(size=channels),
        "running_var": rng.uniform(0.5, 2.0, channels),
    }
    for name, value in values.items():
        getattr(layer, name).set_data(mx.nd.array(value, dtype=layer.gamma.dtype))
    if hybridize:
        layer.hybridize()
    x = rng.standard_normal(shape).astype(dtype)
    layer(mx.nd.array(x, dtype=dtype))  # a hybridized block builds its graph first
    before = _state(layer)
    taken = []
    kernel = layer._kernel_inference
    monkeypatch.setattr(layer, "_kernel_inference", lambda a: taken.append(1) or kernel(a))
    y = layer(mx.nd.array(x, dtype=dtype))
    assert taken == ([] if dtype == "float16" else [1])  # float16: the operator, in float32
    assert np.dtype(y.dtype) == np.dtype(dtype)
    running = ref.RunningStats(values["running_mean"], values["running_var"], 0)
    gamma = values["gamma"] if spec.scale else None
    beta = values["beta"] if spec.center else None
    want, _ = ref.batch_norm_step(x.astype(np.float64), running, spec, gamma, beta, training=False)
    tol = {"float16": 2e-3, "float32": 2e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(y.asnumpy().astype(np.float64), want, rtol=tol, atol=tol)
    with autograd.record(train_mode=False):  # the operator's inference pass
        recorded = layer(mx.nd.array(x, dtype=dtype)).asnumpy()
    assert len(taken) <= 1  # recording: not the direct kernel
    np.testing.assert_allclose(y.asnumpy(), recorded, rtol=tol, atol=tol)
    _assert_state_equal(before, _state(layer))


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_inference_after_a_convolution_reads_its_layout(hybridize: bool) -> None:
    """A convolution's output may be held in MKL-DNN's blocked layout; the inference path
    without autograd must read the values, not the memory order."""
    rng = np.random.default_rng(11)
    conv = gluon.nn.HybridSequential()
    conv.add(gluon.nn.Conv2D(16, 3, in_channels=3), gluon.nn.Conv2D(16, 3, in_channels=16))
    conv.initialize(mx.init.Xavier())
    if hybridize:
        conv.hybridize(static_alloc=True)
    layer = BatchNorm(16)
    layer.initialize()
    layer.running_mean.set_data(mx.nd.array(rng.normal(size=16)))
    x = conv(mx.nd.array(rng.standard_normal((4, 3, 12, 12))))
    running = ref.RunningStats(layer.running_mean.data().asnumpy(), np.ones(16), 0)
    want, _ = ref.batch_norm_step(x.asnumpy(), running, BatchNormSpec(), training=False)
    np.testing.assert_allclose(layer(x).asnumpy(), want, **F32)


def test_without_running_stats_inference_uses_batch_stats() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((7, 3)).astype(np.float32)
    layer = BatchNorm(3, track_running_stats=False)
    layer.initialize()
    assert sorted(k.split("_", 1)[1] for k in layer.collect_params()) == ["beta", "gamma"]
    y_ref, _ = ref.batch_norm_train(x, eps=1e-5, axis=1)
    np.testing.assert_allclose(layer(mx.nd.array(x)).asnumpy(), y_ref, **F32)
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(mx.nd.array(x[:1]))


def test_inference_backward_matches_reference() -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = BatchNorm(3)
    layer.initialize()
    mean, var, gamma = (
        np.array([0.1, -0.2, 0.3]),
        np.array([1.5, 0.5, 2.0]),
        np.array([1.0, 2.0, 0.5]),
    )
    layer.running_mean.set_data(mx.nd.array(mean))
    layer.running_var.set_data(mx.nd.array(var))
    layer.gamma.set_data(mx.nd.array(gamma))
    xs = mx.nd.array(x)
    xs.attach_grad()
    with autograd.record(train_mode=False):
        y = layer(xs)
    y.backward(mx.nd.array(dy))
    grads = ref.batch_norm_inference_backward(dy, x, mean, var, gamma, eps=1e-5, axis=1)
    np.testing.assert_allclose(xs.grad.asnumpy(), grads.dx, **F32)
    np.testing.assert_allclose(layer.gamma.grad().asnumpy(), grads.dgamma, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.beta.grad().asnumpy(), grads.dbeta, rtol=1e-5, atol=1e-5)
    assert _running(layer).num_batches_tracked == 0


def test_update_on_backward_with_a_cumulative_average() -> None:
    # update_on="backward" (preset="mxnet") with momentum=None, which gluon.nn.BatchNorm
    # cannot express: the operator (which every layer runs) defers the update to its
    # backward pass and keeps the cumulative average of the batch statistics.
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 2)).astype(np.float32)
    layer = BatchNorm(2, preset="mxnet", momentum=None)
    layer.initialize()
    with autograd.record():
        layer(mx.nd.array(x))
    assert _running(layer).num_batches_tracked == 0
    _train_step(layer, x, np.ones_like(x))
    _, stats = ref.batch_norm_train(x, eps=1e-5, axis=1)
    mx.nd.waitall()  # an update made in backward is not ordered before plain reads
    got = _running(layer)
    assert got.num_batches_tracked == 1
    np.testing.assert_allclose(got.var, stats.var(), rtol=1e-6)  # cumulative, biased


def test_deferred_channel_count() -> None:
    layer = BatchNorm()
    layer.initialize()
    layer.hybridize()
    with autograd.train_mode():
        layer(mx.nd.ones((4, 6, 3)))
    assert layer.gamma.shape == (6,) and layer.running_var.shape == (6,)
    assert _running(layer).num_batches_tracked == 1


def test_export_then_symbolblock_imports_gives_same_inference(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=2), BatchNorm(4), gluon.nn.Activation("relu"))
    net.initialize()
    net.hybridize()
    x = mx.nd.array(rng.standard_normal((3, 2, 6, 6)))
    for _ in range(3):
        with autograd.train_mode():
            net(x)
    expected = net(x).asnumpy()
    net.export(str(tmp_path / "model"), epoch=1)
    loaded = gluon.SymbolBlock.imports(
        str(tmp_path / "model-symbol.json"), ["data"], str(tmp_path / "model-0001.params")
    )
    np.testing.assert_allclose(loaded(x).asnumpy(), expected, rtol=1e-6, atol=1e-6)
    with autograd.train_mode():  # the loaded graph still updates in the forward pass
        loaded(x)
    counter = [p for n, p in loaded.collect_params().items() if n.endswith("num_batches_tracked")]
    assert int(counter[0].data().asnumpy()[0]) == 4


def test_a_hybridized_layer_used_only_for_inference_exports(tmp_path: Path) -> None:
    """The first call of a hybridized layer builds its graph even in inference (later
    calls run MXNet's kernel directly), so export() works as with any HybridBlock."""
    rng = np.random.default_rng(12)
    layer = BatchNorm(3)
    layer.initialize()
    layer.running_mean.set_data(mx.nd.array(rng.normal(size=3)))
    layer.hybridize()
    x = mx.nd.array(rng.standard_normal((4, 3, 5)))
    expected = [layer(x).asnumpy() for _ in range(2)]
    np.testing.assert_array_equal(expected[0], expected[1])
    layer.export(str(tmp_path / "bn"), epoch=0)
    loaded = gluon.SymbolBlock.imports(
        str(tmp_path / "bn-symbol.json"), ["data"], str(tmp_path / "bn-0000.params")
    )
    np.testing.assert_array_equal(loaded(x).asnumpy(), expected[0])


def test_save_and_load_parameters_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    layer = BatchNorm(3)
    layer.initialize()
    with autograd.train_mode():
        layer(mx.nd.array(rng.standard_normal((5, 3))))
    layer.save_parameters(str(tmp_path / "bn.params"))
    other = BatchNorm(3)
    other.load_parameters(str(tmp_path / "bn.params"))
    _assert_state_equal(_state(layer), _state(other))
    x = mx.nd.array(rng.standard_normal((4, 3)))
    np.testing.assert_array_equal(layer(x).asnumpy(), other(x).asnumpy())


# -- Empty batch (SPEC.md section 2, *Empty batch*) ----------------------------------------
#
# An array with a 0 in its shape exists in MXNet 1.x only under NumPy shape semantics; the
# fixture turns them on for one test and restores the setting afterwards.


@pytest.fixture
def np_shape() -> Iterator[None]:
    with mx.util.np_shape(True):
        yield


EMPTY_SHAPES = {"rank2": ((0, 3), (6, 3)), "rank4": ((0, 3, 4, 4), (2, 3, 4, 4))}
EMPTY_SETTINGS: dict[str, dict[str, Any]] = {
    "canonical": {},
    "torch": {"preset": "torch"},
    "torch_cumulative": {"preset": "torch", "momentum": None},
    "keras": {"preset": "keras"},
    "mxnet": {"preset": "mxnet"},
    "mxnet_guarded": {"preset": "mxnet", "skip_nonfinite": True},
}


def _empty_layer(kwargs: dict[str, Any], hybridize: bool) -> tuple[Any, BatchNormSpec]:
    layer = BatchNorm(3, **kwargs)
    layer.initialize()
    if hybridize:
        layer.hybridize()
    return layer, BatchNormSpec.from_preset(
        kwargs.get("preset"), axis=1, **{k: v for k, v in kwargs.items() if k != "preset"}
    )


def _empty_step(layer: Any, shape: tuple[int, ...], backward: bool = True) -> tuple[Any, Any]:
    """One recorded training call on an empty batch; the parameter gradients are filled
    with 7 first, so that a backward pass that wrote nothing shows."""
    xs = mx.nd.zeros(shape)
    xs.attach_grad()
    for param in (layer.gamma, layer.beta):
        if param.grad_req != "null":
            param.grad()[:] = 7.0
    with autograd.record():
        y = layer(xs)
    if backward:
        y.backward(mx.nd.zeros(shape))
    mx.nd.waitall()  # update_on="backward" is not ordered before plain reads
    return y, xs.grad


def _assert_running(layer: Any, want: ref.RunningStats) -> None:
    mx.nd.waitall()
    got = _running(layer)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6, atol=1e-6)  # NaN == NaN
    np.testing.assert_allclose(got.var, want.var, rtol=1e-6, atol=1e-6)
    assert got.num_batches_tracked == want.num_batches_tracked


@pytest.mark.usefixtures("np_shape")
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("shapes", list(EMPTY_SHAPES.values()), ids=list(EMPTY_SHAPES))
@pytest.mark.parametrize("name", list(EMPTY_SETTINGS))
def test_empty_batch_matches_reference(
    name: str, shapes: tuple[tuple[int, ...], tuple[int, ...]], hybridize: bool
) -> None:
    """A batch, an empty one, a batch: outputs, gradients and state as the reference."""
    empty, full = shapes
    rng = np.random.default_rng(20)
    layer, spec = _empty_layer(EMPTY_SETTINGS[name], hybridize)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.uniform(-0.5, 0.5, 3)
    layer.gamma.set_data(mx.nd.array(gamma))
    layer.beta.set_data(mx.nd.array(beta))
    running = ref.init_running_stats(3)
    x = (rng.standard_normal(full) * 2 + 1).astype(np.float32)
    _train_step(layer, x, rng.standard_normal(full).astype(np.float32))
    _, running = ref.batch_norm_step(x, running, spec, gamma, beta, training=True)
    _assert_running(layer, running)

    y, dx = _empty_step(layer, empty)
    y_ref, running = ref.batch_norm_step(
        np.zeros(empty, np.float32), running, spec, gamma, beta, training=True
    )
    grads = ref.batch_norm_backward(np.zeros(empty), np.zeros(empty, np.float32), gamma)
    assert y.shape == y_ref.shape == empty and np.dtype(y.dtype) == y_ref.dtype
    assert dx.shape == empty and np.dtype(dx.dtype) == np.float32
    np.testing.assert_array_equal(layer.gamma.grad().asnumpy(), grads.dgamma)  # 0, not 7
    np.testing.assert_array_equal(layer.beta.grad().asnumpy(), grads.dbeta)
    _assert_running(layer, running)
    expected_count = {"canonical": 1, "mxnet_guarded": 1}.get(name, 2)
    assert running.num_batches_tracked == expected_count  # the reference says so too
    assert np.isnan(running.mean).all() == (name in ("keras", "mxnet"))

    # The next batch continues from that state (a cumulative average counts the empty call).
    x = (rng.standard_normal(full) - 0.5).astype(np.float32)
    dy = rng.standard_normal(full).astype(np.float32)
    y, dx = _train_step(layer, x, dy)
    y_ref, running = ref.batch_norm_step(x, running, spec, gamma, beta, training=True)
    grads = ref.batch_norm_backward(dy, x, gamma, eps=spec.eps, axis=1)
    np.testing.assert_allclose(y, y_ref, **F32)
    np.testing.assert_allclose(dx, grads.dx, **F32)
    _assert_running(layer, running)


@pytest.mark.usefixtures("np_shape")
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("name", ["torch", "keras", "mxnet"])
def test_empty_batch_without_backward(name: str, hybridize: bool) -> None:
    """update_on="backward" (mxnet): a training forward on an empty batch without backward
    changes nothing, as any of its calls; the keras preset's NaN comes in the forward."""
    layer, spec = _empty_layer(EMPTY_SETTINGS[name], hybridize)
    running = ref.init_running_stats(3)
    for shape in EMPTY_SHAPES["rank2"][0], EMPTY_SHAPES["rank4"][0]:
        _empty_step(layer, shape, backward=False)
        with autograd.train_mode():  # not recorded
            assert layer(mx.nd.zeros(shape)).shape == shape
        for _ in range(2):
            _, running = ref.batch_norm_step(
                np.zeros(shape), running, spec, training=True, backward_ran=False
            )
    _assert_running(layer, running)
    assert running.num_batches_tracked == {"torch": 4, "keras": 4, "mxnet": 0}[name]


@pytest.mark.usefixtures("np_shape")
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_empty_batch_in_inference_and_without_running_stats(hybridize: bool) -> None:
    rng = np.random.default_rng(21)
    layer, _ = _empty_layer({"preset": "torch"}, hybridize)
    layer.running_mean.set_data(mx.nd.array(rng.normal(size=3)))
    layer.gamma.set_data(mx.nd.array(rng.uniform(0.5, 1.5, 3)))
    layer(mx.nd.ones((2, 3)))  # a hybridized block builds its graph on its first call
    before = _state(layer)
    for shape in EMPTY_SHAPES["rank2"][0], EMPTY_SHAPES["rank4"][0]:
        assert layer(mx.nd.zeros(shape)).shape == shape  # MXNet's kernel, directly
        xs = mx.nd.zeros(shape)
        xs.attach_grad()
        layer.gamma.grad()[:] = 7.0
        with autograd.record(train_mode=False):  # the operator's inference pass
            y = layer(xs)
        y.backward(mx.nd.zeros(shape))
        assert y.shape == xs.grad.shape == shape
        np.testing.assert_array_equal(layer.gamma.grad().asnumpy(), np.zeros(3))
    _assert_state_equal(before, _state(layer))
    batch_only, _ = _empty_layer({"track_running_stats": False}, hybridize)
    for train in (False, True):
        with autograd.record(train_mode=train):
            y = batch_only(mx.nd.zeros((0, 3, 2)))
        assert y.shape == (0, 3, 2)


@pytest.mark.usefixtures("np_shape")
@pytest.mark.parametrize("name", ["canonical", "torch", "mxnet"])
def test_empty_batch_inside_a_hybridized_parent(name: str) -> None:
    net = gluon.nn.HybridSequential()
    # (Not an Activation: MXNet's MKL-DNN kernels refuse empty arrays.)
    net.add(BatchNorm(3, **EMPTY_SETTINGS[name]), gluon.nn.HybridLambda(lambda F, x: 2 * x))
    net.initialize()
    net.hybridize()
    spec = net[0].spec
    running = ref.init_running_stats(3)
    for shape in EMPTY_SHAPES["rank2"][0], EMPTY_SHAPES["rank4"][0]:
        xs = mx.nd.zeros(shape)
        xs.attach_grad()
        with autograd.record():
            y = net(xs)
        y.backward(mx.nd.zeros(shape))
        assert y.shape == xs.grad.shape == shape
        np.testing.assert_array_equal(net[0].gamma.grad().asnumpy(), np.zeros(3))
        _, running = ref.batch_norm_step(np.zeros(shape), running, spec, training=True)
    _assert_running(net[0], running)
    assert running.num_batches_tracked == {"canonical": 0, "torch": 2, "mxnet": 2}[name]


@pytest.mark.usefixtures("np_shape")
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 6, 6)], ids=["rank2", "rank4"])
def test_non_empty_batches_under_numpy_shape_semantics(
    shape: tuple[int, ...], hybridize: bool
) -> None:
    layer = BatchNorm(shape[1], num_dims=len(shape))
    layer.initialize()
    if hybridize:
        layer.hybridize()
    _run_against_reference(layer, BatchNormSpec(), shape, seed=30 + len(shape))


@pytest.mark.usefixtures("np_shape")
def test_deferred_channel_count_under_numpy_shape_semantics() -> None:
    # Gluon writes the unknown channel count as -1 under NumPy shape semantics (0 without).
    layer = BatchNorm()
    layer.initialize()
    assert "in_channels=None" in repr(layer)
    with autograd.train_mode():
        layer(mx.nd.ones((4, 6, 3)))
    assert layer.gamma.shape == (6,)
    assert _running(layer).num_batches_tracked == 1


def test_without_numpy_shape_semantics_mxnet_refuses_an_empty_array() -> None:
    # So nothing reaches the layer: an empty batch needs NumPy shape semantics in MXNet 1.x.
    assert not mx.util.is_np_shape()
    with pytest.raises(mx.base.MXNetError):
        mx.nd.zeros((0, 3)).asnumpy()
