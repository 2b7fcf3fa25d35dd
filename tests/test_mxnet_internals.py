"""Each private Gluon attribute unorm relies on (unorm._mxnet.internals) still exists and
means what unorm takes it to mean: a renamed attribute fails here, by name, not deep in AGC
or the port."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.mxnet
mx = pytest.importorskip("mxnet")

from mxnet import gluon  # noqa: E402

from unorm._mxnet import internals  # noqa: E402


def test_layer_arguments_are_the_operator_arguments() -> None:
    conv = gluon.nn.Conv2DTranspose(4, 3, in_channels=6, groups=2)
    assert internals.layer_arguments(conv)["num_group"] == 2, "Block._kwargs changed"
    assert internals.groups(conv) == 2
    assert internals.groups(gluon.nn.Dense(3)) == 1
    bn = gluon.nn.BatchNorm(epsilon=1e-3, center=False)
    assert internals.layer_arguments(bn)["eps"] == 1e-3
    assert internals.differentiable(bn.beta) is False, "Parameter._differentiable changed"
    assert internals.differentiable(bn.gamma) is True


def test_children_in_registration_order_and_replaceable() -> None:
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(2), gluon.nn.Dense(3))
    keys = [key for key, _ in internals.children(net)]
    assert len(keys) == 2, "Block._children changed"
    new = gluon.nn.Dense(5)
    internals.replace_child(net, keys[1], new)
    assert [child for _, child in internals.children(net)][1] is new
    net.initialize()
    net.hybridize()
    net(mx.nd.ones((1, 4)))
    internals.clear_cached_graph(net)  # HybridBlock._clear_cached_op
    assert net(mx.nd.ones((1, 4))).shape == (1, 5)


def test_trainer_scale_and_kvstore_settings() -> None:
    net = gluon.nn.Dense(2, in_units=3)
    net.initialize(ctx=[mx.cpu(0), mx.cpu(1)])
    trainer = gluon.Trainer(net.collect_params(), "sgd", update_on_kvstore=True)
    assert internals.trainer_scale(trainer) == 1.0, "Trainer._scale changed"
    internals.ensure_kvstore(trainer)
    assert trainer._kv_initialized, "Trainer._init_kvstore no longer initialises the kvstore"
    assert internals.updates_on_kvstore(trainer) is True
    local = gluon.Trainer(net.collect_params(), "sgd", update_on_kvstore=False)
    internals.ensure_kvstore(local)
    assert internals.updates_on_kvstore(local) is False


def test_own_parameters_and_structural_names() -> None:
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(2, in_units=3))
    assert internals.own_parameters(net) == {}, "Block._reg_params changed"
    assert sorted(internals.own_parameters(net[0])) == ["bias", "weight"]
    keys = sorted(internals.parameters_by_structure(net))
    assert keys == ["0.bias", "0.weight"], "Block._collect_params_with_prefix changed"
