"""Every private attribute of Gluon 1.9 that unorm reads or writes, in one place.

Gluon has no public API for these; each function says what it reaches and why, and
``tests/test_mxnet_internals.py`` fails with a clear message if an MXNet release renames
one. Code elsewhere in :mod:`unorm._mxnet` calls these functions, never the attributes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = [
    "children",
    "clear_cached_graph",
    "differentiable",
    "ensure_kvstore",
    "groups",
    "hybridized",
    "layer_arguments",
    "own_parameters",
    "parameters_by_structure",
    "replace_child",
    "trainer_scale",
    "updates_on_kvstore",
]


def layer_arguments(block: Any) -> dict[str, Any]:
    """The operator arguments a Gluon layer was built with (``kernel``, ``num_group``,
    ``layout``, ``eps``...): Gluon keeps them in ``Block._kwargs`` and has no getter. The
    dict itself is returned: Gluon passes it to the operator on every call, so writing a
    key (a BatchNorm's ``eps``) changes what the layer computes. A block without operator
    arguments (a container) gives an empty dict."""
    return getattr(block, "_kwargs", {})  # type: ignore[no-any-return]


def groups(block: Any) -> int:
    """A convolution's group count (``num_group``; 1 for layers without one)."""
    return int(layer_arguments(block).get("num_group", 1))


def children(block: Any) -> Iterator[tuple[str, Any]]:
    """A Block's direct children with their registration keys, in registration order
    (``Block._children``: Gluon 1.9 lists children only through it)."""
    return iter(list(block._children.items()))


def replace_child(block: Any, key: str, new: Any) -> None:
    """Put ``new`` in the place of ``block``'s child ``key``, keeping registration order
    (Gluon has no public way to swap a registered child; attributes pointing at the old
    child are re-pointed by the caller)."""
    block._children[key] = new


def hybridized(block: Any) -> bool:
    """Whether ``hybridize()`` is active on ``block`` (``HybridBlock._active``; Gluon has no
    getter): its calls then run a cached graph, and forward hooks of its children do not
    run."""
    return bool(getattr(block, "_active", False))


def clear_cached_graph(block: Any) -> None:
    """Drop a hybridized Block's cached graph so the next call traces the new children or
    settings (``HybridBlock._clear_cached_op``); a plain Block has none."""
    if hasattr(block, "_clear_cached_op"):
        block._clear_cached_op()


def own_parameters(block: Any) -> dict[str, Any]:
    """The parameters a Block registered itself, not its children's
    (``Block._reg_params``; ``collect_params`` always includes the children's)."""
    return dict(block._reg_params)


def parameters_by_structure(block: Any) -> dict[str, Any]:
    """Every parameter of ``block`` keyed by its structural name (``"0.weight"``), the keys
    ``save_parameters`` writes (``Block._collect_params_with_prefix``, which
    ``load_parameters`` reads with)."""
    return dict(block._collect_params_with_prefix())


def differentiable(param: Any) -> bool:
    """Whether Gluon built ``param`` as learnable (``Parameter._differentiable``): what
    ``center=``/``scale=`` decided, which ``grad_req`` does not say after a freeze."""
    return bool(param._differentiable)


def trainer_scale(trainer: Any) -> float:
    """The Trainer's own gradient scale (``Trainer._scale``, which a loss scaler sets to
    ``1/loss_scale``); the optimizer multiplies the gradient by it over the batch size."""
    return float(getattr(trainer, "_scale", 1.0))


def ensure_kvstore(trainer: Any) -> None:
    """Let the Trainer create its kvstore now (``Trainer._init_kvstore``), as its first
    ``step`` would: that settles ``update_on_kvstore`` without changing a gradient or a
    weight, so AGC can refuse that setting before it clips anything."""
    if hasattr(trainer, "_kv_initialized") and not trainer._kv_initialized:
        trainer._init_kvstore()


def updates_on_kvstore(trainer: Any) -> bool:
    """Whether the kvstore updates the weights during the all-reduce
    (``Trainer._kvstore`` and ``Trainer._update_on_kvstore``), which leaves AGC no point
    between the reduce and the update."""
    return bool(getattr(trainer, "_kvstore", None)) and bool(
        getattr(trainer, "_update_on_kvstore", False)
    )
