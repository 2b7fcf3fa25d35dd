"""AGC for Gluon (``adaptive_clip_grad``, ``AGC``) against the NumPy reference (SPEC.md 5)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from conftest import runs_here  # the environment's framework list (UNORM_RUNS)
from unorm import reference as ref

pytestmark = pytest.mark.mxnet


if runs_here("mxnet"):  # where MXNet is meant to run, a failing import is an error
    import mxnet as mx
    from mxnet import autograd, gluon

    from unorm.mxnet import AGC, BatchNorm, adaptive_clip_grad, final_classifier, unit_axes_of


def _zoo() -> Any:
    """One layer of every kind AGC knows, plus a BatchNorm and a classifier."""
    net = gluon.nn.HybridSequential(prefix="zoo_")
    with net.name_scope():
        net.add(
            gluon.nn.Embedding(10, 6),
            gluon.nn.Dense(4, in_units=6),
            gluon.nn.Conv2D(3, 2, in_channels=2),
            gluon.nn.Conv2DTranspose(5, 3, in_channels=2),
            gluon.nn.Conv1D(3, 1, in_channels=3, groups=3),
            BatchNorm(3),
            gluon.nn.Dense(2, in_units=4),
        )
    net.initialize(mx.init.Normal(0.5))
    return net


def _set_random_grads(net: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    grads = {}
    for name, p in net.collect_params().items():
        if p.grad_req == "null":
            continue
        # Per-unit scales over five decades, so some units clip and some do not.
        g = rng.standard_normal(p.shape) * np.logspace(-4, 1, p.shape[0]).reshape(
            (-1,) + (1,) * (len(p.shape) - 1)
        )
        grads[name] = g.astype(np.float32)
        p.list_grad()[0][:] = grads[name]
    return grads


def test_unit_axes_follow_the_owning_layer() -> None:
    axes = unit_axes_of(_zoo())
    assert axes == {
        "zoo_embedding0_weight": 0,
        "zoo_dense0_weight": 0,
        "zoo_conv0_weight": 0,
        "zoo_conv1_weight": 1,  # Conv2DTranspose stores (in, out, kh, kw)
        "zoo_conv2_weight": 0,  # depthwise: (out, 1, k)
        "zoo_dense1_weight": 0,
    }


def test_clip_grad_matches_reference_for_every_layer_kind() -> None:
    rng = np.random.default_rng(0)
    net = _zoo()
    grads = _set_random_grads(net, rng)
    weights = {n: p.data().asnumpy() for n, p in net.collect_params().items() if n in grads}
    classifier = final_classifier(net)
    assert classifier.name == "zoo_dense1"
    adaptive_clip_grad(net, clipping=0.05, eps=1e-3, exclude=[classifier])
    expected = ref.agc_clip_all(
        grads,
        weights,
        unit_axes_of(net),
        clipping=0.05,
        eps=1e-3,
        exclude=["zoo_dense1_weight", "zoo_dense1_bias"],
    )
    clipped_any = False
    for name, p in net.collect_params().items():
        if name in grads:
            got = p.grad().asnumpy()
            np.testing.assert_allclose(got, expected[name], rtol=1e-6, atol=1e-9, err_msg=name)
            clipped_any |= not np.array_equal(got, grads[name])
    assert clipped_any
    for name in ("zoo_dense1_weight", "zoo_dense1_bias"):
        np.testing.assert_array_equal(net.collect_params()[name].grad().asnumpy(), grads[name])


def test_units_under_the_threshold_and_non_finite_units_keep_their_bits() -> None:
    layer = gluon.nn.Dense(3, in_units=2, use_bias=False, prefix="d_")
    layer.initialize(mx.init.Constant(1.0))
    g = np.array([[np.nan, 1.0], [3.0, 4.0], [1e-3, 2e-3]], dtype=np.float32)
    layer.weight.grad()[:] = g
    adaptive_clip_grad(layer, clipping=0.01)
    got = layer.weight.grad().asnumpy()
    assert np.isnan(got[0, 0]) and got[0, 1] == 1.0  # non-finite unit: untouched
    np.testing.assert_allclose(got[1], [3.0, 4.0] / np.float32(5.0) * 0.01 * np.sqrt(2), rtol=1e-6)
    np.testing.assert_array_equal(got[2], g[2])  # under the threshold: bit for bit


def _regression(prefix: str) -> Any:
    net = gluon.nn.HybridSequential(prefix=prefix)
    with net.name_scope():
        net.add(gluon.nn.Dense(5, in_units=4), gluon.nn.Dense(3, in_units=5))
    net.initialize(mx.init.Normal(0.3))
    return net


def _copy_params(src: Any, dst: Any) -> None:
    for p, q in zip(src.collect_params().values(), dst.collect_params().values(), strict=True):
        q.set_data(p.data().copy())


@pytest.mark.parametrize("loss_kind", ["sum", "mean"])
def test_agc_step_equals_reference_step(loss_kind: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4)).astype(np.float32) * 5
    target = rng.standard_normal((6, 3)).astype(np.float32)
    net = _regression("r_")
    probe = _regression("p_")
    _copy_params(net, probe)
    # The effective gradient is that of the mean loss, however the loss is written.
    with autograd.record():
        loss = ((probe(mx.nd.array(x)) - mx.nd.array(target)) ** 2).sum(axis=1).mean()
    loss.backward()
    names = [n[len("p_") :] for n in probe.collect_params()]
    effective = {
        n: p.grad().asnumpy() for n, p in zip(names, probe.collect_params().values(), strict=True)
    }
    weights = {
        n: p.data().asnumpy() for n, p in zip(names, probe.collect_params().values(), strict=True)
    }
    axes = {"dense0_weight": 0, "dense1_weight": 0}
    clipped = ref.agc_clip_all(
        effective, weights, axes, clipping=0.02, exclude=["dense1_weight", "dense1_bias"]
    )
    expected = {n: weights[n] - 0.1 * clipped[n] for n in names}
    assert any(not np.allclose(clipped[n], effective[n]) for n in names)

    trainer = AGC(
        gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}),
        net,
        clipping=0.02,
        exclude=[final_classifier(net)],
    )
    with autograd.record():
        per_sample = ((net(mx.nd.array(x)) - mx.nd.array(target)) ** 2).sum(axis=1)
        loss = per_sample.sum() if loss_kind == "sum" else per_sample.mean()
    loss.backward()
    trainer.step(6 if loss_kind == "sum" else 1)
    for name, p in net.collect_params().items():
        np.testing.assert_allclose(
            p.data().asnumpy(), expected[name[len("r_") :]], rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_multi_device_agc_step_equals_one_device() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 4)).astype(np.float32) * 5
    ctxs = [mx.cpu(0), mx.cpu(1)]
    multi, single = _regression("m_"), _regression("s_")
    _copy_params(single, multi)
    multi.collect_params().reset_ctx(ctxs)
    trainers = [
        AGC(
            gluon.Trainer(
                multi.collect_params(), "sgd", {"learning_rate": 0.1}, update_on_kvstore=False
            ),
            multi,
            clipping=0.01,
        ),
        AGC(
            gluon.Trainer(single.collect_params(), "sgd", {"learning_rate": 0.1}),
            single,
            clipping=0.01,
        ),
    ]
    for _ in range(2):
        with autograd.record():
            losses = [
                (multi(p) ** 2).sum()
                for p in gluon.utils.split_and_load(mx.nd.array(x), ctxs, even_split=False)
            ]
        autograd.backward(losses)
        trainers[0].step(7)
        with autograd.record():
            loss = (single(mx.nd.array(x)) ** 2).sum()
        loss.backward()
        trainers[1].step(7)
    for p, q in zip(multi.collect_params().values(), single.collect_params().values(), strict=True):
        for ctx in ctxs:
            np.testing.assert_allclose(
                p.data(ctx).asnumpy(), q.data().asnumpy(), rtol=1e-5, atol=1e-6
            )


def test_updating_on_the_kvstore_is_refused() -> None:
    ctxs = [mx.cpu(0), mx.cpu(1)]
    net = _regression("k_")
    net.collect_params().reset_ctx(ctxs)
    trainer = AGC(gluon.Trainer(net.collect_params(), "sgd", update_on_kvstore=True), net)
    with autograd.record():
        losses = [net(mx.nd.ones((2, 4), ctx=c)).sum() for c in ctxs]
    autograd.backward(losses)
    with pytest.raises(ValueError, match="update_on_kvstore=False"):
        trainer.step(4)


def _bilinear() -> Any:
    """A layer AGC does not know, with a (2, 3) weight."""

    class Bilinear(gluon.HybridBlock):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(prefix="bil_")
            self.w = self.params.get("w", shape=(2, 3))

        def hybrid_forward(self, F: Any, x: Any, w: Any) -> Any:
            return F.dot(x, w)

    return Bilinear()


def test_unknown_layers_need_unit_axes() -> None:
    block = _bilinear()
    block.initialize(mx.init.Constant(1.0))
    block.w.grad()[:] = 100.0
    with pytest.raises(
        ValueError, match=r"unit_axes has no entry for parameter 'bil_w' of shape \(2, 3\)"
    ):
        adaptive_clip_grad(block)
    adaptive_clip_grad(block.collect_params(), unit_axes={"bil_w": 1}, clipping=0.1)
    expected = ref.agc_clip(np.full((2, 3), 100.0), np.ones((2, 3)), 1, clipping=0.1)
    np.testing.assert_allclose(block.w.grad().asnumpy(), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exclude": ["nope"]}, r"exclude names parameters that do not exist: \['nope'\]"),
        ({"unit_axes": {"nope": 0}}, "unit_axes names parameters that do not exist"),
        ({"unit_axes": {"e_dense0_weight": (0, -2)}}, "unit_axes must name distinct axes"),
        ({"unit_axes": {"e_dense0_weight": 2}}, "unit_axes must be an integer in"),
        ({"clipping": 0.0}, "clipping must be a finite number > 0, got 0.0"),
        ({"eps": -1.0}, "eps must be a finite number >= 0"),
        ({"rescale_grad": 0.0}, "rescale_grad must be a finite number > 0"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], message: str) -> None:
    net = _regression("e_")
    with pytest.raises(ValueError, match=message):
        adaptive_clip_grad(net, **kwargs)


def test_float16_gradients_are_clipped_in_float32() -> None:
    layer = gluon.nn.Dense(2, in_units=3, prefix="h_")
    layer.initialize(mx.init.Constant(0.5))
    layer.cast("float16")
    g = np.array([[60.0, -30.0, 20.0], [1e-4, 2e-4, 0.0]], dtype=np.float16)
    layer.weight.grad()[:] = g
    adaptive_clip_grad(layer, clipping=0.01)
    got = layer.weight.grad().asnumpy()
    assert got.dtype == np.float16
    expected = ref.agc_clip(g, np.full((2, 3), 0.5, np.float16), 0, clipping=0.01)
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=1e-3)
    np.testing.assert_array_equal(got[1], g[1])
