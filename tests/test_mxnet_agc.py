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


def test_grouped_conv_transpose_units_do_not_mix_groups() -> None:
    # Weight (I, O/g, kh, kw) = (4, 3, 2, 2) with g = 2: output channel j of group k is
    # w[2k:2k+2, j], i.e. [k, :, j] of the view (2, 2, 3, 2, 2) (SPEC.md section 5).
    layer = gluon.nn.Conv2DTranspose(6, 2, in_channels=4, groups=2, prefix="t_")
    layer.initialize(mx.init.Normal(0.5))
    assert unit_axes_of(layer) == {"t_weight": (0, 2)}
    w = layer.weight.data().asnumpy()
    rng = np.random.default_rng(5)
    # Gradient scales differ per group and output channel, over four decades.
    scales = np.logspace(-3, 1, 6).reshape(2, 1, 3, 1, 1)
    g = (rng.standard_normal((2, 2, 3, 2, 2)) * scales).reshape(w.shape).astype(np.float32)
    layer.weight.grad()[:] = g
    adaptive_clip_grad(layer, clipping=0.05)
    view = (2, 2, 3, 2, 2)
    expected = ref.agc_clip(g.reshape(view), w.reshape(view), (0, 2), clipping=0.05)
    got = layer.weight.grad().asnumpy()
    np.testing.assert_allclose(got, expected.reshape(w.shape), rtol=1e-6, atol=1e-9)
    clipped = ~np.all(got.reshape(view) == g.reshape(view), axis=(1, 3, 4))
    assert clipped.any() and not clipped.all()  # some of the six units clip, some do not
    # Axis 1 alone (the ungrouped rule) mixes the groups and gives other numbers.
    assert not np.allclose(got, ref.agc_clip(g, w, 1, clipping=0.05), rtol=1e-3)


def _bad_last(kind: str) -> Any:
    """Two Dense layers, then a parameter whose gradient AGC refuses (last in the dict)."""

    class Counter(gluon.HybridBlock):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(prefix="cnt_")
            self.c = self.params.get("c", shape=(4,), dtype="int32", init="zeros")

        def hybrid_forward(self, F: Any, x: Any, c: Any) -> Any:
            return x

    net = gluon.nn.HybridSequential(prefix="b_")
    with net.name_scope():
        net.add(gluon.nn.Dense(4, in_units=3), gluon.nn.Dense(4, in_units=4))
        net.add(Counter() if kind == "dtype" else gluon.nn.Embedding(5, 4, sparse_grad=True))
    net.initialize(mx.init.Normal(1.0))
    return net


def _dense_grads(net: Any) -> dict[str, list[np.ndarray]]:
    """The gradients, per device, of the Dense layers (the ones AGC would clip)."""
    return {
        n: [g.asnumpy() for g in p.list_grad()]
        for n, p in net.collect_params().items()
        if n.startswith("b_dense")
    }


@pytest.mark.parametrize("kind", ["dtype", "sparse"])
@pytest.mark.parametrize("how", ["function", "step", "update"])
def test_a_refused_late_gradient_leaves_the_earlier_ones_untouched(kind: str, how: str) -> None:
    message = "floating-point dtype" if kind == "dtype" else "AGC needs dense gradients"
    net = _bad_last(kind)
    ctxs = [mx.cpu(0), mx.cpu(1)] if how == "step" else [mx.cpu(0)]
    net.collect_params().reset_ctx(ctxs)
    for i, ctx in enumerate(ctxs):  # large gradients, different per device: all would clip
        for name, p in net.collect_params().items():
            if name.startswith("b_dense"):
                p.grad(ctx)[:] = 100.0 * (i + 1)
    before = _dense_grads(net)
    weights = {n: p.data(ctxs[0]).asnumpy() for n, p in net.collect_params().items()}
    if how == "function":
        with pytest.raises(ValueError, match=message):
            adaptive_clip_grad(net, clipping=0.01)
    else:
        trainer = AGC(
            gluon.Trainer(net.collect_params(), "sgd", update_on_kvstore=False), net, clipping=0.01
        )
        with pytest.raises(ValueError, match=message):
            getattr(trainer, how)(2)
    after = _dense_grads(net)
    assert before.keys() == after.keys() and len(before) == 4  # both Dense weights and biases
    for name, arrays in before.items():
        for old, new in zip(arrays, after[name], strict=True):
            np.testing.assert_array_equal(new, old, err_msg=name)  # not clipped, not reduced
    for name, p in net.collect_params().items():
        np.testing.assert_array_equal(p.data(ctxs[0]).asnumpy(), weights[name], err_msg=name)


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


@pytest.mark.parametrize("how", ["step", "manual"])
@pytest.mark.parametrize("loss_kind", ["sum", "mean"])
def test_agc_step_equals_reference_step(loss_kind: str, how: str) -> None:
    """``agc.step(n)`` and Gluon's manual ``allreduce_grads(); update(n)`` both take the
    reference step: plain SGD on the clipped effective gradient."""
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
    batch_size = 6 if loss_kind == "sum" else 1
    if how == "step":
        trainer.step(batch_size)
    else:
        trainer.allreduce_grads()
        trainer.update(batch_size)
    for name, p in net.collect_params().items():
        np.testing.assert_allclose(
            p.data().asnumpy(), expected[name[len("r_") :]], rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_multi_device_agc_step_equals_one_device_and_the_reference() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 4)).astype(np.float32) * 5
    ctxs = [mx.cpu(0), mx.cpu(1)]
    multi, single, plain = _regression("m_"), _regression("s_"), _regression("u_")
    _copy_params(single, multi)
    _copy_params(single, plain)
    multi.collect_params().reset_ctx(ctxs)
    plain_trainer = gluon.Trainer(plain.collect_params(), "sgd", {"learning_rate": 0.1})
    axes = {"dense0_weight": 0, "dense1_weight": 0}
    clipped_units = 0
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
        # The reference step from the single-device gradient (effective: 1/7 of it).
        names = [n[len("s_") :] for n in single.collect_params()]
        params = list(single.collect_params().values())
        effective = {n: p.grad().asnumpy() / 7 for n, p in zip(names, params, strict=True)}
        weights = {n: p.data().asnumpy() for n, p in zip(names, params, strict=True)}
        clipped = ref.agc_clip_all(effective, weights, axes, clipping=0.01)
        clipped_units += sum(
            int(np.any(clipped[n] != effective[n], axis=tuple(range(1, effective[n].ndim))).sum())
            for n in names
        )
        expected = {n: weights[n] - 0.1 * clipped[n] for n in names}
        trainers[1].step(7)
        with autograd.record():
            loss = (plain(mx.nd.array(x)) ** 2).sum()
        loss.backward()
        plain_trainer.step(7)
        for name, p in zip(names, multi.collect_params().values(), strict=True):
            for ctx in ctxs:
                np.testing.assert_allclose(
                    p.data(ctx).asnumpy(), expected[name], rtol=1e-5, atol=1e-6, err_msg=name
                )
    assert clipped_units > 0
    for p, q in zip(multi.collect_params().values(), single.collect_params().values(), strict=True):
        for ctx in ctxs:
            np.testing.assert_allclose(
                p.data(ctx).asnumpy(), q.data().asnumpy(), rtol=1e-5, atol=1e-6
            )
    # Without AGC the same steps end elsewhere: the clipping did something.
    assert any(
        not np.allclose(p.data().asnumpy(), q.data().asnumpy(), rtol=1e-3)
        for p, q in zip(
            single.collect_params().values(), plain.collect_params().values(), strict=True
        )
    )


def test_updating_on_the_kvstore_is_refused() -> None:
    ctxs = [mx.cpu(0), mx.cpu(1)]
    net = _regression("k_")
    net.collect_params().reset_ctx(ctxs)
    trainer = AGC(gluon.Trainer(net.collect_params(), "sgd", update_on_kvstore=True), net)
    with autograd.record():
        losses = [net(mx.nd.ones((2, 4), ctx=c)).sum() for c in ctxs]
    autograd.backward(losses)
    before = {n: [g.asnumpy() for g in p.list_grad()] for n, p in net.collect_params().items()}
    with pytest.raises(ValueError, match="update_on_kvstore=False"):
        trainer.step(4)
    with pytest.raises(ValueError, match="update_on_kvstore=False"):
        trainer.update(4)  # the manual form is refused too, before clipping anything
    for name, p in net.collect_params().items():
        for old, new in zip(before[name], p.list_grad(), strict=True):
            np.testing.assert_array_equal(new.asnumpy(), old, err_msg=name)


@pytest.mark.parametrize("batch_size", [0, -2, float("nan"), "4"])
def test_bad_batch_size_raises_before_anything_changes(batch_size: Any) -> None:
    net = _regression("z_")
    net.collect_params()["z_dense0_weight"].grad()[:] = 100.0
    before = net.collect_params()["z_dense0_weight"].grad().asnumpy()
    trainer = AGC(gluon.Trainer(net.collect_params(), "sgd"), net)
    for method in (trainer.step, trainer.update):
        with pytest.raises(ValueError, match="batch_size must be a finite number > 0"):
            method(batch_size)
    np.testing.assert_array_equal(net.collect_params()["z_dense0_weight"].grad().asnumpy(), before)


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
    with pytest.raises(ValueError) as err:
        adaptive_clip_grad(block)
    assert str(err.value) == (
        "AGC does not know the output-unit axis of parameter 'bil_w' (shape (2, 3)) of "
        "Bilinear; pass unit_axes={'bil_w': <axis>} or exclude it"
    )
    adaptive_clip_grad(block.collect_params(), unit_axes={"bil_w": 1}, clipping=0.1)
    expected = ref.agc_clip(np.full((2, 3), 100.0), np.ones((2, 3)), 1, clipping=0.1)
    np.testing.assert_allclose(block.w.grad().asnumpy(), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exclude": ["nope"]}, r"exclude names no parameter or layer of the model: \['nope'\]"),
        ({"unit_axes": {"nope": 0}}, r"unit_axes names no parameter or layer .*\['nope'\]"),
        ({"unit_axes": True}, "unit_axes must be an int .*, a mapping"),
        ({"unit_axes": 2}, r"unit_axes must be an integer in \[-2, 2\) .*'e_dense0_weight'"),
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


def test_an_int_unit_axes_applies_to_every_parameter_of_rank_2_and_more() -> None:
    # As on every backend: one axis for every weight, biases stay one unit.
    net = _regression("i_")
    params = net.collect_params()
    rng = np.random.default_rng(8)
    grads = {}
    for name, p in params.items():
        g = rng.standard_normal(p.shape) * 3.0
        p.grad()[:] = g
        grads[name] = g
    weights = {name: p.data().asnumpy().astype(np.float64) for name, p in params.items()}
    adaptive_clip_grad(net, clipping=0.02, unit_axes=1)
    for name, p in params.items():
        axes = 1 if len(p.shape) >= 2 else None
        want = ref.agc_clip(grads[name], weights[name], axes, clipping=0.02, eps=1e-3)
        np.testing.assert_allclose(p.grad().asnumpy(), want, rtol=2e-6, err_msg=name)


def _custom_in_a_model() -> Any:
    """A Dense, then a custom Block with a registered (2, 2) weight ``u_w`` and a (2, 3)
    ``u_v`` it created with ``params.get`` without keeping it as an attribute."""

    class Mixer(gluon.HybridBlock):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(prefix="u_")
            self.w = self.params.get("w", shape=(2, 2))
            self.params.get("v", shape=(2, 3))

        def hybrid_forward(self, F: Any, x: Any, w: Any) -> Any:
            return F.dot(x, w)

    net = gluon.nn.HybridSequential(prefix="m_")
    with net.name_scope():
        net.add(gluon.nn.Dense(2, in_units=3))
    net.add(Mixer())
    net.initialize(mx.init.Constant(1.0))
    return net


def test_the_unknown_layer_error_names_the_owning_block() -> None:
    net = _custom_in_a_model()
    with pytest.raises(ValueError) as err:
        adaptive_clip_grad(net)
    assert str(err.value) == (
        "AGC does not know the output-unit axis of parameter 'u_w' (shape (2, 2)) of Mixer; "
        "pass unit_axes={'u_w': <axis>} or exclude it"
    )
    with pytest.raises(ValueError) as err:
        adaptive_clip_grad(net, exclude=["u_w"])
    assert str(err.value) == (
        "AGC does not know the output-unit axis of parameter 'u_v' (shape (2, 3)) of Mixer; "
        "pass unit_axes={'u_v': <axis>} or exclude it"
    )
    # A bare parameter list has no layers: no owner to name.
    with pytest.raises(ValueError, match=r"'u_w' \(shape \(2, 2\)\), which no layer"):
        adaptive_clip_grad(net.collect_params(), exclude=["m_dense0_weight"])
    # The Dense weight keeps its kind beside the unknown Block.
    assert unit_axes_of(net) == {"m_dense0_weight": 0}


def test_exclude_of_a_wrong_type_is_refused_and_none_excludes_nothing() -> None:
    net = _regression("x_")
    with pytest.raises(ValueError) as err:
        adaptive_clip_grad(net, exclude=5)
    assert str(err.value) == "exclude takes parameters, layers or their names, got 5"
    params = net.collect_params()
    grads = {n: np.full(p.shape, 50.0, np.float32) for n, p in params.items()}
    weights = {n: p.data().asnumpy().astype(np.float64) for n, p in params.items()}
    for name, p in params.items():
        p.grad()[:] = grads[name]
    adaptive_clip_grad(net, clipping=0.01, exclude=None)
    for name, p in params.items():
        axes = 0 if len(p.shape) == 2 else None  # Dense (units, in): rows; biases one unit
        want = ref.agc_clip(grads[name], weights[name], axes, clipping=0.01, eps=1e-3)
        assert not np.allclose(want, grads[name])  # every parameter, the classifier too
        np.testing.assert_allclose(p.grad().asnumpy(), want, rtol=2e-6, err_msg=name)


# Channels-last convolutions. Gluon 1.9 stores their weights as Conv (O, *k, I/g) and
# Conv*DTranspose (I, *k, O/g) (shapes below), but its CPU kernels run neither forward
# ("could not create a descriptor"), and Conv1D/Conv1DTranspose refuse "NWC" when built.
# The clipping needs no forward pass: the gradients are set by hand. The unit axes are
# those of SPEC.md section 5 for these stored layouts, written out by hand.
_CHANNELS_LAST = [
    # (layer, weight shape, unit axes of the weight, or of the grouped view)
    ("Conv2DTranspose", {"layout": "NHWC"}, (4, 3, 3, 6), (3,), None),
    ("Conv3DTranspose", {"layout": "NDHWC"}, (4, 3, 3, 3, 6), (4,), None),
    ("Conv2DTranspose", {"layout": "NHWC", "groups": 2}, (4, 3, 3, 3), (0, 4), (2, 2, 3, 3, 3)),
    ("Conv2D", {"layout": "NHWC"}, (6, 3, 3, 4), (0,), None),
    ("Conv2D", {"layout": "NHWC", "groups": 2}, (6, 3, 3, 2), (0,), None),
    ("Conv3D", {"layout": "NDHWC"}, (6, 3, 3, 3, 4), (0,), None),
]


@pytest.mark.parametrize(("layer", "kwargs", "shape", "axes", "view"), _CHANNELS_LAST)
def test_channels_last_convolutions_clip_per_output_channel(
    layer: str,
    kwargs: dict[str, Any],
    shape: tuple[int, ...],
    axes: tuple[int, ...],
    view: tuple[int, ...] | None,
) -> None:
    block = getattr(gluon.nn, layer)(6, 3, in_channels=4, prefix="cl_", **kwargs)
    block.initialize(mx.init.Normal(0.5))
    w = block.weight.data().asnumpy()
    assert w.shape == shape  # Gluon's stored layout
    assert unit_axes_of(block) == {"cl_weight": axes[0] if len(axes) == 1 else axes}
    clipped_shape = view or shape
    # Gradient scales over four decades along the output units (six of them).
    scales = np.ones(clipped_shape)
    unit_shape = [clipped_shape[a] if a in axes else 1 for a in range(len(clipped_shape))]
    scales = scales * np.logspace(-3, 1, 6).reshape(unit_shape)
    rng = np.random.default_rng(11)
    g = (rng.standard_normal(clipped_shape) * scales).reshape(shape).astype(np.float32)
    block.weight.grad()[:] = g
    adaptive_clip_grad(block, clipping=0.05)
    got = block.weight.grad().asnumpy()
    want = ref.agc_clip(g.reshape(clipped_shape), w.reshape(clipped_shape), axes, clipping=0.05)
    np.testing.assert_allclose(got, want.reshape(shape), rtol=1e-6, atol=1e-9)
    reduce = tuple(a for a in range(len(clipped_shape)) if a not in axes)
    changed = ~np.all(got.reshape(clipped_shape) == g.reshape(clipped_shape), axis=reduce)
    assert changed.any() and not changed.all()  # some of the six units clip, some do not
    if "Transpose" in layer:  # axis 1, the channels-first rule, is a kernel axis here
        assert not np.allclose(got, ref.agc_clip(g, w, 1, clipping=0.05), rtol=1e-3)


def test_channels_last_depthwise_and_channels_first_layouts_keep_axis_0() -> None:
    net = gluon.nn.HybridSequential(prefix="d_")
    with net.name_scope():
        net.add(
            gluon.nn.Conv2D(4, 3, in_channels=4, groups=4, layout="NHWC"),  # (4, 3, 3, 1)
            gluon.nn.Conv2D(4, 3, in_channels=2, layout="NCHW"),
            gluon.nn.Conv3DTranspose(4, 3, in_channels=2, layout="NCDHW"),
        )
    net.initialize()
    assert net[0].weight.shape == (4, 3, 3, 1)
    assert unit_axes_of(net) == {"d_conv0_weight": 0, "d_conv1_weight": 0, "d_conv2_weight": 1}
