"""unorm.mxnet.BatchNorm(renorm=True) against Batch Renormalization written from the paper
in the tests (tests/renorm_formulas.py): imperative, hybridized, inside a hybridized
parent and exported then imported.

Runs where MXNet runs (the legacy environment); the ``mxnet`` marker skips it elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gluon_steps import check_training_step
from renorm_formulas import inference, paper_steps

from conftest import runs_here  # the environment's framework list (UNORM_RUNS)

pytestmark = pytest.mark.mxnet

if runs_here("mxnet"):  # where MXNet is meant to run, a failing import is an error
    import mxnet as mx
    from mxnet import autograd, gluon

    from unorm.mxnet import BatchNorm

CLIP = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}
GAMMA, BETA = np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.3])
TOL = {"rtol": 2e-5, "atol": 2e-5}


def _param(block: Any, suffix: str) -> np.ndarray:
    found = [p for n, p in block.collect_params().items() if n.endswith(suffix)]
    assert len(found) == 1, suffix
    return found[0].data().asnumpy()


def _build(where: str, **kwargs: Any) -> tuple[Any, Any]:
    layer = BatchNorm(3, renorm=True, **kwargs)
    model: Any = layer
    if where == "parent":
        model = gluon.nn.HybridSequential()
        model.add(gluon.nn.Activation("relu"), layer)  # relu: the tests feed positive data
    model.initialize()
    layer.gamma.set_data(mx.nd.array(GAMMA))
    layer.beta.set_data(mx.nd.array(BETA))
    if where != "direct":
        model.hybridize()
    return model, layer


@pytest.mark.parametrize("where", ["direct", "hybridized", "parent"])
@pytest.mark.parametrize("clip", [None, CLIP])
def test_against_the_paper(where: str, clip: dict | None) -> None:
    model, layer = _build(where, renorm_clipping=clip, renorm_momentum=0.2)
    rng = np.random.default_rng(0)
    xs = [rng.uniform(0.5, 3.0 + k, (6, 3, 4)) for k in range(4)]  # positive: relu passes
    dys = [rng.normal(size=(6, 3, 4)) for _ in range(4)]
    want = paper_steps(xs, dys, GAMMA, BETA, renorm_momentum=0.2, **(clip or {}))
    for x_np, dy_np, step in zip(xs, dys, want, strict=True):
        check_training_step(model, layer, x_np, dy_np, step)
        for name in ("running_mean", "running_var", "renorm_mean", "renorm_std"):
            np.testing.assert_allclose(_param(model, name), step[name], **TOL, err_msg=name)
    assert int(_param(model, "num_batches_tracked")[0]) == len(xs)
    got = model(mx.nd.array(xs[-1])).asnumpy()
    np.testing.assert_allclose(got, inference(xs[-1], want[-1], GAMMA, BETA), **TOL)


def test_keras_inference_statistics_and_export_import(tmp_path: Path) -> None:
    model, _ = _build("parent", preset="keras", renorm_clipping=CLIP)
    rng = np.random.default_rng(1)
    xs = [rng.uniform(0.5, 4.0, (8, 3)) for _ in range(3)]
    want = paper_steps(xs, [np.zeros((8, 3))] * 3, GAMMA, BETA, eps=1e-3, momentum=1 - 0.99,
                       renorm_momentum=1 - 0.99, unbiased=False, stddev=True, **CLIP)  # fmt: skip
    for x in xs:
        with autograd.train_mode():
            model(mx.nd.array(x))
    for name in ("running_mean", "running_var", "running_std", "renorm_mean", "renorm_std"):
        np.testing.assert_allclose(_param(model, name), want[-1][name], **TOL, err_msg=name)
    model.export(str(tmp_path / "renorm"))
    loaded = gluon.SymbolBlock.imports(
        str(tmp_path / "renorm-symbol.json"), ["data"], str(tmp_path / "renorm-0000.params")
    )
    x = mx.nd.array(xs[0])
    np.testing.assert_allclose(loaded(x).asnumpy(), model(x).asnumpy(), rtol=1e-6, atol=1e-6)
    with autograd.train_mode():  # the imported graph keeps renorm's training arithmetic
        a, b = loaded(x).asnumpy(), model(x).asnumpy()
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_param(loaded, "renorm_std"), _param(model, "renorm_std"), rtol=1e-6)


def test_bad_settings_and_input_change_nothing() -> None:
    with pytest.raises(ValueError, match="renorm_rmin must be a number <= renorm_rmax"):
        BatchNorm(3, renorm=True, renorm_clipping={"rmax": 1.0, "rmin": 2.0})
    with pytest.raises(ValueError, match="renorm must be False with track_running_stats=False"):
        BatchNorm(3, renorm=True, track_running_stats=False)
    model, _ = _build("direct")
    with autograd.train_mode():
        model(mx.nd.array(np.random.default_rng(2).normal(size=(4, 3))))
    before = {n: p.data().asnumpy().copy() for n, p in model.collect_params().items()}
    with (
        pytest.raises(ValueError, match="expected more than 1 value per channel"),
        autograd.train_mode(),
    ):
        model(mx.nd.ones((1, 3)))
    for n, p in model.collect_params().items():
        np.testing.assert_array_equal(p.data().asnumpy(), before[n])
