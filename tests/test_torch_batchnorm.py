"""unorm.torch.BatchNorm against the NumPy reference and against nn.BatchNorm*d."""

from __future__ import annotations

import numpy as np
import pytest

from unorm import reference as ref
from unorm.spec import BatchNormSpec

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
from unorm.torch import BatchNorm  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
SHAPES = {2: (8, 3), 3: (5, 3, 4), 4: (4, 3, 3, 5), 5: (3, 3, 2, 2, 3)}


def _run_sequence(
    layer: BatchNorm, spec: BatchNormSpec, shape: tuple[int, ...], dtype: torch.dtype, seed: int
) -> None:
    """Five training steps then eval, each compared with the reference."""
    rng = np.random.default_rng(seed)
    channels = shape[spec.axis]
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.normal(size=channels)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    state = ref.init_running_stats(channels)
    tol = TOL[dtype]
    for step in range(5):
        x_np = rng.normal(step, 1 + step, shape)
        dy_np = rng.normal(size=shape)
        x = torch.tensor(x_np, dtype=dtype, requires_grad=True)
        x_used = x.detach().to(torch.float64).numpy()  # the rounded input the layer sees
        y = layer(x)
        y.backward(torch.tensor(dy_np, dtype=dtype))
        want_y, state = ref.batch_norm_step(x_used, state, spec, gamma, beta, training=True)
        grads = ref.batch_norm_backward(dy_np, x_used, gamma, eps=spec.eps, axis=spec.axis)
        scale = 1 + np.abs(want_y).max()
        np.testing.assert_allclose(y.detach().double().numpy(), want_y, atol=tol * scale)
        np.testing.assert_allclose(
            x.grad.double().numpy(), grads.dx, atol=tol * (1 + np.abs(grads.dx).max())
        )
        np.testing.assert_allclose(
            layer.weight.grad.double().numpy(),
            grads.dgamma,
            rtol=tol,
            atol=tol * np.abs(grads.dgamma).max(),
        )
        np.testing.assert_allclose(
            layer.bias.grad.double().numpy(),
            grads.dbeta,
            rtol=tol,
            atol=tol * np.abs(grads.dbeta).max(),
        )
        layer.weight.grad = layer.bias.grad = None
        # The buffers' own dtype sets their tolerance: float32 state fed by a 16-bit input
        # is computed in float32 from x_used, so a 16-bit tolerance would hide a biased feed.
        stat_tol = TOL[layer.running_mean.dtype]
        np.testing.assert_allclose(
            layer.running_mean.double().numpy(), state.mean, rtol=stat_tol, atol=stat_tol
        )
        np.testing.assert_allclose(
            layer.running_var.double().numpy(), state.var, rtol=stat_tol, atol=stat_tol
        )
        assert int(layer.num_batches_tracked) == state.num_batches_tracked
    layer.eval()
    x_np = rng.normal(2, 3, shape)
    x = torch.tensor(x_np, dtype=dtype)
    want, _ = ref.batch_norm_step(x.double().numpy(), state, spec, gamma, beta, training=False)
    np.testing.assert_allclose(
        layer(x).detach().double().numpy(), want, atol=tol * (1 + np.abs(want).max())
    )


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_matches_reference_over_training_then_eval(
    rank: int, dtype: torch.dtype, axis: int
) -> None:
    base = SHAPES[rank]
    shape = base if axis == 1 else (base[0], *base[2:], base[1])  # channels last
    spec = BatchNormSpec(axis=axis)
    layer = BatchNorm(3, num_dims=rank, axis=axis).to(dtype)
    _run_sequence(layer, spec, shape, dtype, seed=rank)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_keep_float32_state(dtype: torch.dtype) -> None:
    layer = BatchNorm(3, dtype=dtype)
    assert layer.weight.dtype == layer.running_var.dtype == torch.float32
    _run_sequence(layer, BatchNormSpec(), (6, 3, 4, 4), dtype, seed=7)
    assert layer(torch.randn(2, 3, 4, 4, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": None},
        {"momentum": 0.3, "eps": 1e-2},
        {"running_var": "biased"},
        {"preset": "keras"},
        {"preset": "torch", "momentum": None},
    ],
)
def test_options_match_reference(options: dict[str, object]) -> None:
    preset = options.get("preset")
    rest = {k: v for k, v in options.items() if k != "preset"}
    spec = BatchNormSpec.from_preset(preset, **rest)  # type: ignore[arg-type]
    layer = BatchNorm(3, **options).double()  # type: ignore[arg-type]
    _run_sequence(layer, spec, (6, 3, 2), torch.float64, seed=11)


def _pair(native_cls: type, num_dims: int, **kwargs: object) -> tuple[object, BatchNorm]:
    native = native_cls(4, **kwargs)
    ours = BatchNorm(4, num_dims, preset="torch", **kwargs)
    with torch.no_grad():
        w = torch.linspace(0.5, 2.0, 4)
        for layer in (native, ours):
            if layer.weight is not None:
                layer.weight.copy_(w)
                layer.bias.copy_(-w)
    return native, ours


@pytest.mark.parametrize(
    ("native_cls", "shape"),
    [
        (torch.nn.BatchNorm1d, (6, 4)),
        (torch.nn.BatchNorm1d, (5, 4, 7)),
        (torch.nn.BatchNorm2d, (3, 4, 5, 6)),
        (torch.nn.BatchNorm3d, (2, 4, 3, 3, 2)),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_preset_is_identical_to_native(
    native_cls: type, shape: tuple[int, ...], momentum: float | None
) -> None:
    native, ours = _pair(
        native_cls,
        len(shape) if native_cls is not torch.nn.BatchNorm1d else None,
        momentum=momentum,
    )
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = (torch.randn(shape, generator=gen) * (step + 1) + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        dy = torch.randn(shape, generator=gen)
        y_native, y_ours = native(x), ours(x2)
        y_native.backward(dy)
        y_ours.backward(dy)
        assert torch.equal(y_native, y_ours)
        assert torch.equal(x.grad, x2.grad)
        assert torch.equal(native.weight.grad, ours.weight.grad)
        assert torch.equal(native.bias.grad, ours.bias.grad)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(native, name), getattr(ours, name)), name
    native.eval(), ours.eval()
    x = torch.randn(shape, generator=gen)
    assert torch.equal(native(x), ours(x))


def test_canonical_default_equals_native_on_finite_batches() -> None:
    # The canonical convention equals PyTorch's except for the guard, which costs nothing here.
    native, ours = torch.nn.BatchNorm2d(4), BatchNorm(4)
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3)
        assert torch.equal(native(x), ours(x))
    assert torch.equal(native.running_var, ours.running_var)


def test_state_dict_is_interchangeable_with_native() -> None:
    native = torch.nn.BatchNorm2d(4)
    native(torch.randn(6, 4, 2, 2) * 3 + 1)
    ours = BatchNorm(4, num_dims=4)
    ours.load_state_dict(native.state_dict())
    assert set(ours.state_dict()) == set(native.state_dict())
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    ours.eval(), back.eval()
    x = torch.randn(2, 4, 2, 2)
    assert torch.equal(ours(x), back(x))


def test_old_checkpoint_without_counter_loads() -> None:
    native = torch.nn.BatchNorm2d(3)
    state = native.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    ours = BatchNorm(3)
    ours.load_state_dict(state)
    assert int(ours.num_batches_tracked) == 0


def test_mismatched_checkpoint_is_refused_and_changes_nothing() -> None:
    ours = BatchNorm(4)
    ours(torch.randn(5, 4))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    bad = torch.nn.BatchNorm1d(3).state_dict()
    with pytest.raises(ValueError, match=r"'weight' has shape \(3,\), expected \(4,\)"):
        ours.load_state_dict(bad)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_channels_last_keeps_format_and_numbers() -> None:
    x = torch.randn(4, 3, 5, 5)
    a, b = BatchNorm(3), BatchNorm(3)
    y_cl = a(x.to(memory_format=torch.channels_last))
    y = b(x)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y)
    torch.testing.assert_close(a.running_var, b.running_var)


def test_nonfinite_batch_keeps_running_stats() -> None:
    layer = BatchNorm(3)
    layer(torch.randn(4, 3))
    before = [t.clone() for t in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]
    x = torch.randn(4, 3)
    x[0, 1] = float("inf")
    layer(x)
    after = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b)
    native = BatchNorm(3, preset="torch")
    native(x)
    assert not torch.isfinite(native.running_var).all()  # what the guard prevents


def test_track_running_stats_off_uses_batch_statistics_in_eval() -> None:
    layer = BatchNorm(3, track_running_stats=False).eval()
    x = torch.randn(6, 3, 2).double()
    want, _ = ref.batch_norm_train(x.numpy(), np.ones(3), np.zeros(3), axis=1)
    np.testing.assert_allclose(layer.double()(x).detach().numpy(), want, atol=1e-12)
    assert layer.running_mean is None and "running_mean" not in layer.state_dict()


def test_mxnet_preset_updates_only_when_backward_runs() -> None:
    layer = BatchNorm(2, preset="mxnet")
    x = torch.randn(5, 2) * 2 + 1
    layer(x)  # forward only: MXNet's CPU kernel would not update
    assert torch.equal(layer.running_mean, torch.zeros(2))
    layer(x).sum().backward()
    expected = 0.1 * x.mean(0)
    torch.testing.assert_close(layer.running_mean, expected)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * x.var(0, correction=0))


def test_keras_preset_allows_one_value_per_channel() -> None:
    layer = BatchNorm(3, preset="keras")
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(1, 3, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, torch.tensor([[1.0, 2.0, 3.0]]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros(1, 3))
    torch.testing.assert_close(layer.running_mean, 0.01 * x.detach()[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("layer_kwargs", "x", "error", "message"),
    [
        (
            {"num_dims": 4},
            torch.randn(2, 3, 4),
            ValueError,
            r"rank 4 \(N, C, H, W\) for num_dims=4",
        ),
        ({}, torch.randn(3), ValueError, "rank >= 2"),
        ({}, torch.randn(4, 5), ValueError, "must have 3 features on axis 1"),
        (
            {},
            torch.ones(4, 3, dtype=torch.int64),
            ValueError,
            "floating-point dtype, got torch.int64",
        ),
        ({}, torch.randn(1, 3), ValueError, "more than 1 value per channel"),
        ({}, torch.randn(1, 3, 1, 1), ValueError, "more than 1 value per channel"),
        ({}, [[1.0, 2.0, 3.0]], TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_input_is_named_and_changes_nothing(
    layer_kwargs: dict[str, int], x: object, error: type, message: str
) -> None:
    layer = BatchNorm(3, **layer_kwargs)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=message):
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("preset", [None, "torch", "keras", "mxnet"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
def test_float64_input_into_float32_layer_is_refused_like_native(
    preset: str | None, momentum: float | None, training: bool
) -> None:
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    native = torch.nn.BatchNorm2d(3, momentum=momentum).train(training)
    with pytest.raises(RuntimeError):  # PyTorch's own kernel refuses the mix ...
        native(x)
    layer = BatchNorm(3, preset=preset, momentum=momentum).train(training)
    layer(torch.randn(4, 3, 2, 2))  # a tracked batch, so "unchanged" is not all defaults
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    # ... ours says so before the running statistics or the counter move.
    with pytest.raises(
        ValueError, match=r"input must have dtype torch.float32 .*got torch.float64"
    ):
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dtype_and_device_must_match_the_layer_state() -> None:
    layer = BatchNorm(3).double()
    with pytest.raises(
        ValueError, match=r"input must have dtype torch.float64 .*got torch.float32"
    ):
        layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"input must be on the layer's device \(cpu\), got meta"):
        layer(torch.empty(4, 3, dtype=torch.float64, device="meta"))
    assert int(layer.num_batches_tracked) == 0
    # Nothing to match without parameters or running statistics: any float dtype is fine,
    # as for nn.BatchNorm2d(affine=False, track_running_stats=False).
    bare = BatchNorm(3, affine=False, track_running_stats=False)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    native = torch.nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    torch.testing.assert_close(bare(x), native(x))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_preset_counter_moves_only_after_the_kernel_succeeded(
    monkeypatch: pytest.MonkeyPatch, momentum: float | None
) -> None:
    from types import SimpleNamespace

    from unorm._torch import batchnorm as module

    layer = BatchNorm(3, preset="torch", momentum=momentum)
    layer(torch.randn(5, 3))
    before = {k: v.clone() for k, v in layer.state_dict().items()}

    def failing_kernel(*_: object, **__: object) -> None:
        raise RuntimeError("kernel failed")  # e.g. out of memory inside F.batch_norm

    monkeypatch.setattr(module, "F", SimpleNamespace(batch_norm=failing_kernel))
    with pytest.raises(RuntimeError, match="kernel failed"):
        layer(torch.randn(5, 3))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cumulative_average_reads_no_counter_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # momentum=None outside the "torch" preset keeps the factor 1/(n+1) a device tensor.
    layer = BatchNorm(3, momentum=None).double()
    xs = [torch.randn(6, 3, dtype=torch.float64) * (i + 1) + i for i in range(3)]

    def refuse(*_: object) -> None:
        raise AssertionError("host synchronisation")

    with monkeypatch.context() as patch:
        for method in ("item", "__bool__", "tolist", "__float__", "__int__"):
            patch.setattr(torch.Tensor, method, refuse)
        for x in xs:
            layer(x)
    state = ref.init_running_stats(3)
    for x in xs:
        _, state = ref.batch_norm_step(
            x.numpy(), state, BatchNormSpec(momentum=None), np.ones(3), np.zeros(3), training=True
        )
    np.testing.assert_allclose(layer.running_mean.numpy(), state.mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), state.var, rtol=1e-12)
    assert int(layer.num_batches_tracked) == state.num_batches_tracked == 3


def test_cumulative_average_factor_survives_a_count_beyond_float16() -> None:
    # A layer forced to 16-bit buffers: 1/(n+1) is taken in float32, not in float16,
    # where n = 70000 overflows to inf and the factor to 0.
    layer = BatchNorm(3, momentum=None).half()
    assert layer.num_batches_tracked is not None
    layer.num_batches_tracked.fill_(70000)
    x = torch.full((4, 3), 5.0, dtype=torch.float16) + torch.arange(4.0).half()[:, None]
    layer(x)
    # 6.5 / 70001 = 9.29e-5; the float16 factor (a subnormal) keeps about 3 digits.
    np.testing.assert_allclose(layer.running_mean.numpy(), np.full(3, 6.5 / 70001), rtol=3e-3)


def test_batch_of_one_with_spatial_extent_trains() -> None:
    layer = BatchNorm(3, num_dims=4)
    layer(torch.randn(1, 3, 2, 2))
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -1.0}, "eps must be a finite number >= 0"),
        ({"momentum": 2.0}, r"momentum must be a number in \[0, 1\] or None"),
        ({"preset": "tf"}, "preset must be one of 'torch', 'keras', 'mxnet', 'flax' or None"),
        ({"num_dims": 1}, "num_dims must be an integer >= 2"),
        ({"num_dims": 2, "axis": 3}, r"axis must be an integer in \[-2, 2\)"),
    ],
)
def test_bad_settings_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchNorm(3, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_features must be a positive integer"):
        BatchNorm(0)


def test_settings_read_through_the_spec() -> None:
    layer = BatchNorm(6, num_dims=4, preset="keras")
    assert (layer.eps, layer.affine, layer.track_running_stats) == (1e-3, True, True)
    assert layer.momentum == pytest.approx(0.01)
    assert "preset='keras'" in repr(layer)


def test_eps_zero_trains_where_pytorch_kernel_refuses() -> None:
    # F.batch_norm rejects eps=0 in training; SPEC.md allows it (a constant channel is 0/0).
    layer = BatchNorm(3, eps=0.0).double()
    x = torch.randn(6, 3, 2, dtype=torch.float64)
    y = layer(x)
    want, _ = ref.batch_norm_train(x.numpy(), np.ones(3), np.zeros(3), eps=0.0, axis=1)
    np.testing.assert_allclose(y.detach().numpy(), want, atol=1e-12)
    stats = ref.batch_stats(x.numpy(), axis=1)
    np.testing.assert_allclose(layer.running_var.numpy(), 0.9 + 0.1 * stats.var(unbiased=True))
