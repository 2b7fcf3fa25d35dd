"""unorm.torch.accumulate: k micro-batches give each BatchNorm the running statistics of
one call on their union (NumPy on the concatenated batch, written in the tests)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from unorm.torch import BatchNorm, accumulate  # noqa: E402


def _union_update(parts: list[np.ndarray], momentum: float = 0.1) -> tuple[np.ndarray, ...]:
    """Running mean and variance after one update from the concatenated batch (channels
    on axis 1), the unbiased feed on its total count."""
    whole = np.concatenate(parts)
    axes = tuple(i for i in range(whole.ndim) if i != 1)
    n = whole.size // whole.shape[1]
    mean, var = whole.mean(axis=axes), whole.var(axis=axes) * n / (n - 1)
    return momentum * mean, (1 - momentum) + momentum * var


def _model(**kwargs: object) -> nn.Sequential:
    return nn.Sequential(nn.Identity(), BatchNorm(3, dtype=torch.float64, **kwargs))  # type: ignore[arg-type]


def test_uneven_micro_batches_give_the_union() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(k, 1 + k, (size, 3, 4)) for k, size in enumerate((5, 2, 7))]
    model = _model()
    with accumulate(model, steps=3):
        for part in parts:
            x = torch.tensor(part, requires_grad=True)
            y = model(x)
            y.sum().backward()
            # Each micro-batch is normalised with its own statistics.
            mean = part.mean(axis=(0, 2), keepdims=True)
            want = (part - mean) / np.sqrt(part.var(axis=(0, 2), keepdims=True) + 1e-5)
            np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-10, atol=1e-12)
    bn = model[1]
    mean, var = _union_update(parts)
    np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(bn.running_var.numpy(), var, rtol=1e-12)
    assert int(bn.num_batches_tracked) == 1
    assert bn.accumulator is None


def test_steps_within_one_context_and_a_partial_last_step() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(4, 3)) * (k + 1) for k in range(5)]
    model = _model(momentum=None)  # cumulative average: the mean of the steps' feeds
    with accumulate(model, steps=2):
        for part in parts:
            model(torch.tensor(part))
    bn = model[1]
    assert int(bn.num_batches_tracked) == 3  # steps {0, 1}, {2, 3} and the partial {4}
    feeds = [np.concatenate(parts[0:2]), np.concatenate(parts[2:4]), parts[4]]
    want = np.mean([f.var(axis=0) * len(f) / (len(f) - 1) for f in feeds], axis=0)
    np.testing.assert_allclose(bn.running_var.numpy(), want, rtol=1e-12)


def test_a_nonfinite_micro_batch_skips_the_whole_step() -> None:
    rng = np.random.default_rng(2)
    bad = rng.normal(size=(4, 3))
    bad[1, 2] = np.nan
    model = _model()
    with accumulate(model, steps=2):
        model(torch.tensor(rng.normal(size=(4, 3))))
        model(torch.tensor(bad))
    bn = model[1]
    assert int(bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(bn.running_var.numpy(), np.ones(3))
    native = _model(preset="torch")  # no guard: the merged NaN is written
    with accumulate(native, steps=2):
        native(torch.tensor(rng.normal(size=(4, 3))))
        native(torch.tensor(bad))
    assert np.isnan(native[1].running_var.numpy()[2])


def test_update_on_backward_records_when_backward_runs() -> None:
    model = _model(preset="mxnet")
    rng = np.random.default_rng(3)
    parts = [rng.normal(size=(4, 3)), rng.normal(size=(6, 3))]
    with accumulate(model, steps=2):
        outputs = [model(torch.tensor(p, requires_grad=True)) for p in parts]
        assert int(model[1].num_batches_tracked) == 0
        for y in outputs:
            y.sum().backward()
    whole = np.concatenate(parts)
    want = 0.9 + (1 - 0.9) * whole.var(axis=0)  # the mxnet preset feeds the biased variance
    np.testing.assert_allclose(model[1].running_var.numpy(), want, rtol=1e-6)


def test_refusals_and_an_exception_drop_the_step() -> None:
    model = _model()
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        accumulate(model, steps=0).__enter__()
    with pytest.raises(ValueError, match="accumulate needs a model with at least one BatchNorm"):
        accumulate(nn.Linear(2, 2), steps=2).__enter__()
    with pytest.raises(ValueError, match="renorm=True, virtual_batch_size"):
        accumulate(_model(renorm=True), steps=2).__enter__()
    with pytest.raises(RuntimeError, match="boom"), accumulate(model, steps=4):
        model(torch.randn(4, 3, dtype=torch.float64))
        raise RuntimeError("boom")
    assert int(model[1].num_batches_tracked) == 0 and model[1].accumulator is None
    model.eval()
    with accumulate(model, steps=1):  # inference records nothing
        model(torch.randn(4, 3, dtype=torch.float64))
    assert int(model[1].num_batches_tracked) == 0
