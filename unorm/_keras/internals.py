"""Every private attribute of Keras 3 (and of TensorFlow, its backend) that unorm reads or
replaces, in one place.

Keras and TensorFlow have no public API for these; each function says what it reaches and
why, and ``tests/test_keras_internals.py`` fails with a clear message if a release renames
or moves one. Code elsewhere in :mod:`unorm._keras` calls these functions, never the
attributes. Nothing here imports TensorFlow until a TensorFlow-only function is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "all_layers",
    "graph_in_xla_context",
    "history",
    "inbound_node",
    "optimizer_variables",
    "replace_all_reduce",
    "replace_update_step",
    "variable_index",
]


def all_layers(model: Any) -> list[Any]:
    """``model`` and every layer nested in it, in any container (Sequential, functional,
    subclassed models, layers holding layers), each layer before the layers nested in it:
    ``Layer._flatten_layers`` is the one walk that reaches them all; ``Model.layers``
    lists only the top level."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def graph_in_xla_context(graph: Any) -> bool:
    """Whether ops added to the TensorFlow ``graph`` now are compiled by XLA (the graph,
    or one it is nested in, is traced by ``tf.function(jit_compile=True)``), by
    TensorFlow's own test
    (``tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext``):
    TensorFlow has no public way to ask, and AGC's clip picks the faster of two exact
    formulations of its unit norms by it (:mod:`unorm._keras.clip`). Raises
    ``ImportError`` or ``AttributeError`` where TensorFlow has moved it."""
    from tensorflow.python.ops import control_flow_util

    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


def history(tensor: Any) -> Any:
    """Which operation made a symbolic tensor, and which of its calls
    (``KerasTensor._keras_history``: ``operation``, ``node_index``); None for a tensor no
    layer made."""
    return getattr(tensor, "_keras_history", None)


def inbound_node(operation: Any, index: int) -> Any:
    """The call node ``index`` of ``operation`` in a functional graph
    (``Operation._inbound_nodes``; a tensor's ``_keras_history`` names the operation and
    index, and Keras exposes no public walk of the graph)."""
    return operation._inbound_nodes[index]


def optimizer_variables(optimizer: Any) -> list[Any]:
    """The model variables a built optimizer updates, in its own order
    (``Optimizer._trainable_variables``; ``Optimizer.variables`` lists its slots instead)."""
    return list(optimizer._trainable_variables)


def variable_index(optimizer: Any, variable: Any) -> int:
    """The position of ``variable`` in :func:`optimizer_variables`
    (``Optimizer._get_variable_index``, which Keras keys by the variable's path)."""
    return int(optimizer._get_variable_index(variable))


def replace_all_reduce(optimizer: Any, wrap: Callable[[Any], Any]) -> None:
    """On this optimizer instance only, replace the TensorFlow update step's
    ``_all_reduce_sum_gradients(grads_and_vars)`` by ``wrap(original)``: the one call that
    sees the final gradients (after accumulation and unscaling, all-reduced) with their
    variables."""
    original = optimizer._all_reduce_sum_gradients
    object.__setattr__(optimizer, "_all_reduce_sum_gradients", wrap(original))


def replace_update_step(optimizer: Any, wrap: Callable[[Any], Any]) -> None:
    """On this optimizer instance only, replace ``_backend_update_step(grads, variables,
    learning_rate)`` by ``wrap(original)``: where the JAX and torch backends hand over the
    final gradients."""
    original = optimizer._backend_update_step
    object.__setattr__(optimizer, "_backend_update_step", wrap(original))
