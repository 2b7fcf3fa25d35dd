"""Each private Keras attribute unorm relies on (unorm._keras.internals) still exists and
means what unorm takes it to mean: a renamed attribute fails here, by name, not deep in AGC
or the port."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras")

from unorm._keras import internals  # noqa: E402


def _model() -> object:
    inner = keras.Sequential([keras.layers.Dense(3, name="inner_fc")], name="block")
    return keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2, name="head")])


def test_all_layers_reaches_nested_layers() -> None:
    names = [layer.name for layer in internals.all_layers(_model())]
    assert "inner_fc" in names and "head" in names, "Layer._flatten_layers changed"
    # Each layer before the layers nested in it (AGC takes a weight's innermost owner).
    assert names.index("block") < names.index("inner_fc"), "Layer._flatten_layers order changed"


def test_inbound_node_is_the_call_in_the_graph() -> None:
    x = keras.Input((4,))
    dense = keras.layers.Dense(2)
    y = dense(x)
    history = y._keras_history
    node = internals.inbound_node(history.operation, history.node_index)
    assert node.operation is dense, "Operation._inbound_nodes changed"
    assert node.input_tensors[0] is x


def test_optimizer_variables_and_their_index() -> None:
    model = _model()
    opt = keras.optimizers.SGD()
    opt.build(model.trainable_variables)
    listed = internals.optimizer_variables(opt)
    assert [v.path for v in listed] == [v.path for v in model.trainable_variables]
    for i, v in enumerate(model.trainable_variables):
        assert internals.variable_index(opt, v) == i, "Optimizer._get_variable_index changed"


def test_the_replaced_step_sees_the_final_gradients() -> None:
    model = _model()
    opt = keras.optimizers.SGD(0.0)
    opt.build(model.trainable_variables)
    seen: list[int] = []

    def wrap(original: object) -> object:
        def step(*args: object) -> object:
            seen.append(len(args))
            return original(*args)  # type: ignore[operator]

        return step

    if keras.backend.backend() == "tensorflow":
        internals.replace_all_reduce(opt, wrap)
    else:
        internals.replace_update_step(opt, wrap)
    grads = [np.ones(tuple(v.shape), "float32") for v in model.trainable_variables]
    opt.apply(grads, model.trainable_variables)
    assert seen, "the replaced optimizer step was never called: Keras's update path changed"


def test_graph_in_xla_context_tells_where_xla_compiles() -> None:
    tf = pytest.importorskip("tensorflow")
    seen: dict[str, bool] = {}

    def probe(where: str) -> None:
        try:
            seen[where] = internals.graph_in_xla_context(tf.compat.v1.get_default_graph())
        except (ImportError, AttributeError) as err:
            pytest.fail(
                "tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext moved "
                f"or was renamed: {err}"
            )

    def traced(where: str, jit_compile: bool) -> None:
        @tf.function(jit_compile=jit_compile)
        def f(x: object) -> object:
            probe(where)
            return x

        f.get_concrete_function(tf.TensorSpec((2,), tf.float32))  # traces, runs nothing

    probe("eager")
    traced("xla", True)
    traced("graph", False)
    assert seen == {"eager": False, "xla": True, "graph": False}, (
        "GraphOrParentsInXlaContext no longer tells an XLA-compiled graph from others"
    )
