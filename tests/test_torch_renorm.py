"""unorm.torch.BatchNorm(renorm=True) against Batch Renormalization written from the paper
in the tests (tests/renorm_formulas.py): outputs, gradients, state, eager and compiled."""

from __future__ import annotations

import io

import numpy as np
import pytest
from renorm_formulas import inference, paper_steps

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
from unorm.torch import BatchNorm, SyncBatchNorm  # noqa: E402

GAMMA, BETA = np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.3])
CLIP = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}


def _data(shape: tuple[int, ...], steps: int = 4, seed: int = 0) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    xs = [rng.normal(2.0 * k, 1.0 + k, shape) for k in range(steps)]
    return xs, [rng.normal(size=shape) for _ in range(steps)]


def _layer(**kwargs: object) -> BatchNorm:
    layer = BatchNorm(3, renorm=True, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(GAMMA))
        layer.bias.copy_(torch.from_numpy(BETA))
    return layer


def _check_steps(layer: torch.nn.Module, bn: BatchNorm, shape: tuple[int, ...], tol: float,
                 dtype: torch.dtype = torch.float32, **paper: object) -> None:  # fmt: skip
    xs, dys = _data(shape)
    want = paper_steps(xs, dys, GAMMA, BETA, **paper)  # type: ignore[arg-type]
    for x_np, dy_np, step in zip(xs, dys, want, strict=True):
        x = torch.tensor(x_np, dtype=dtype, requires_grad=True)
        y = layer(x)
        y.backward(torch.tensor(dy_np, dtype=dtype))
        np.testing.assert_allclose(y.detach().double().numpy(), step["y"], rtol=tol, atol=tol)
        np.testing.assert_allclose(x.grad.double().numpy(), step["dx"], rtol=tol, atol=tol)
        np.testing.assert_allclose(bn.weight.grad.numpy(), step["dgamma"], rtol=tol, atol=tol * 10)
        np.testing.assert_allclose(bn.bias.grad.numpy(), step["dbeta"], rtol=tol, atol=tol * 10)
        bn.weight.grad = bn.bias.grad = None
        for name in ("running_mean", "running_var", "renorm_mean", "renorm_std"):
            got = getattr(bn, name).numpy()
            np.testing.assert_allclose(got, step[name], rtol=tol, atol=tol, err_msg=name)
    assert int(bn.num_batches_tracked) == len(xs)
    bn.eval()
    x = xs[-1]
    got = layer(torch.tensor(x, dtype=dtype)).double().detach().numpy()
    axis = paper.get("axis", 1)
    eps = paper.get("eps", 1e-5)
    want_eval = inference(x, want[-1], GAMMA, BETA, axis=axis, eps=eps)  # type: ignore[arg-type]
    np.testing.assert_allclose(got, want_eval, rtol=tol, atol=tol)


@pytest.mark.parametrize("clip", [None, CLIP])
def test_against_the_paper(clip: dict | None) -> None:
    bn = _layer(renorm_clipping=clip, renorm_momentum=0.2)
    paper = {"renorm_momentum": 0.2, **({} if clip is None else clip)}
    _check_steps(bn, bn, (6, 3, 4), 2e-5, **paper)


def test_channels_last_axis_float64_and_cumulative_clip_rmin_only() -> None:
    bn = _layer(axis=-1, renorm_clipping={"rmin": 0.9}, dtype=torch.float64)
    _check_steps(bn, bn, (5, 2, 3), 1e-10, dtype=torch.float64, axis=-1, rmin=0.9)


def test_keras_arithmetic_of_the_inference_statistics() -> None:
    # renorm_running="stddev" with the keras preset's biased feed and eps.
    bn = _layer(preset="keras", renorm_clipping=CLIP)
    assert bn.running_std is not None
    paper = {"eps": 1e-3, "momentum": 1 - 0.99, "renorm_momentum": 1 - 0.99, "unbiased": False,
             "stddev": True, **CLIP}  # fmt: skip
    _check_steps(bn, bn, (6, 3, 4), 2e-5, **paper)


def test_compiled() -> None:
    bn = _layer(renorm_clipping=CLIP, renorm_momentum=0.2)
    compiled = torch.compile(bn, fullgraph=False)
    _check_steps(compiled, bn, (6, 3, 4), 2e-5, renorm_momentum=0.2, **CLIP)


def test_half_input_keeps_float32_state() -> None:
    bn = _layer(dtype=torch.float16)
    x = torch.randn(8, 3, 4, dtype=torch.float16) * 3 + 5
    y = bn(x)
    assert y.dtype == torch.float16 and bn.renorm_std.dtype == torch.float32
    want = paper_steps([x.double().numpy()], [np.zeros(x.shape)], GAMMA, BETA)[0]
    np.testing.assert_allclose(y.double().detach().numpy(), want["y"], atol=2e-2, rtol=5e-3)
    np.testing.assert_allclose(bn.renorm_mean.numpy(), want["renorm_mean"], rtol=1e-3)


def test_guard_skips_everything_and_update_on_backward_waits() -> None:
    bn = _layer()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3)
    x[0, 1] = float("nan")
    bn(x)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True)
    late = _layer(preset="mxnet")  # update_on="backward"
    y = late(torch.randn(4, 3, requires_grad=True))
    assert float(late.renorm_mean.abs().sum()) == 0.0 and int(late.num_batches_tracked) == 0
    y.sum().backward()
    assert float(late.renorm_mean.abs().sum()) > 0.0 and int(late.num_batches_tracked) == 1


def test_state_dict_round_trip_and_bad_input_changes_nothing() -> None:
    bn = _layer(renorm_clipping=CLIP)
    bn(torch.randn(8, 3) * 2 + 1)
    buffer = io.BytesIO()
    torch.save(bn.state_dict(), buffer)
    keys = set(bn.state_dict())
    assert {"renorm_mean", "renorm_std"} <= keys and "running_std" not in keys
    other = BatchNorm(3, renorm=True, renorm_clipping=CLIP)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(other.renorm_std, bn.renorm_std)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        bn(torch.randn(1, 3))
    with pytest.raises(ValueError, match="renorm_clipping must be a dict with keys among"):
        BatchNorm(3, renorm=True, renorm_clipping={"max": 2.0})
    with pytest.raises(ValueError, match="renorm_rmax must be a number > 0 or None, got -1"):
        BatchNorm(3, renorm=True, renorm_clipping={"rmax": -1})
    with pytest.raises(ValueError, match="renorm must be False with track_running_stats=False"):
        BatchNorm(3, renorm=True, track_running_stats=False)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_sync_refuses_renorm() -> None:
    with pytest.raises(ValueError, match="renorm must be False for SyncBatchNorm"):
        SyncBatchNorm(3, renorm=True)


def test_the_neutral_checkpoint_refuses_renorm() -> None:
    from unorm.port import CheckpointError
    from unorm.torch import export_checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), BatchNorm(3, renorm=True))
    with pytest.raises(CheckpointError, match="renorm=True cannot be exported yet"):
        export_checkpoint(model, torch.randn(2, 3))
