"""AGC for Flax NNX as an optax ``GradientTransformation`` (``SPEC.md`` section 5).

The output-unit axes come from the NNX layer owning each parameter, read once from the
model's graph (``nnx.iter_graph``), resolved by :func:`unorm._core.agc_plan.resolve`, and
matched to the gradient tree by path. ``optax.adaptive_grad_clip`` infers its norm axes
from a tensor's rank (HWIO assumed; 3-D convolutions failed until an ``axis`` argument was
added, google-deepmind/optax#906 and #1340), so a transposed convolution, a depthwise
convolution or an embedding is clipped per the wrong unit unless every axis is spelled
out; here the layer decides.

Being a transformation, AGC clips whatever gradient reaches it: put it first in an
``optax.chain`` and inside ``optax.MultiSteps`` so that it clips the accumulated gradient,
once per optimizer step.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .._core.agc_plan import Param, Target, resolve
from .._core.layer_kinds import KernelLayout
from .._core.registry import plugin
from ..spec import AGC_GRAD_NORM_FLOOR, AGCSpec, UnitAxes

__all__ = ["agc", "clip_unitwise", "final_classifier", "unit_axes_of"]

_LAYOUTS = plugin("flax").layouts
#: ``nnx.ConvTranspose(transpose_kernel=True)`` stores (*k, O, I).
_TRANSPOSED_KERNEL = KernelLayout("k b a")

Path = tuple[Hashable, ...]


def _name(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _kind(layer: Any, attribute: str) -> tuple[str | None, KernelLayout | None]:
    """The layer-kind of ``layer``'s parameter ``attribute`` (and a layout of its own)."""
    if isinstance(layer, nnx.Linear) and attribute == "kernel":
        return "dense", None
    if isinstance(layer, nnx.ConvTranspose) and attribute == "kernel":
        return "conv_transpose", _TRANSPOSED_KERNEL if layer.transpose_kernel else None
    if isinstance(layer, nnx.Conv) and attribute == "kernel":
        groups = int(layer.feature_group_count)
        if groups > 1 and groups == int(layer.in_features):
            return "depthwise_conv", None
        return "conv", None
    if isinstance(layer, nnx.Embed) and attribute == "embedding":
        return "embedding", None
    return None, None


class _Graph(NamedTuple):
    params: list[Param]
    variables: dict[int, Path]  # id of an nnx.Param -> its path
    layers: dict[int, list[Path]]  # id of a module -> the paths of its parameters
    paths: dict[Path, Path]  # a module's path -> itself (for names of layers)


def _graph(model: nnx.Module) -> _Graph:
    """Every ``nnx.Param`` of ``model`` as an :class:`~unorm._core.agc_plan.Param`."""
    modules: dict[Path, Any] = {}
    found: list[tuple[Path, Any]] = []
    path: Path
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            modules[tuple(path)] = node
        elif isinstance(node, nnx.Param):
            found.append((tuple(path), node))
    params: list[Param] = []
    variables: dict[int, Path] = {}
    layers: dict[int, list[Path]] = {}
    for path, variable in found:
        owner = modules.get(path[:-1])
        kind, layout = _kind(owner, str(path[-1])) if owner is not None else (None, None)
        shape = tuple(int(d) for d in variable[...].shape)
        params.append(
            Param(
                path,
                _name(path),
                shape,
                owner=type(owner).__name__ if owner is not None else None,
                kind=kind,
                layout=layout,
            )
        )
        variables[id(variable)] = path
        for depth in range(len(path)):
            layer = modules.get(path[:depth])
            if layer is not None:
                layers.setdefault(id(layer), []).append(path)
    return _Graph(params, variables, layers, {p: p for p in modules})


def _prefix(key: Hashable, path: Path) -> bool:
    return isinstance(key, tuple) and key[: len(path)] == path


def _matcher(graph: _Graph) -> Any:
    by_name = {p.name: [p.key] for p in graph.params}
    for path in graph.paths:
        if path:
            by_name.setdefault(_name(path), [p.key for p in graph.params if _prefix(p.key, path)])

    def match(item: Any) -> Sequence[Hashable] | None:
        if isinstance(item, str):
            return by_name.get(item, [])
        if isinstance(item, nnx.Param):
            key = graph.variables.get(id(item))
            return [] if key is None else [key]
        if isinstance(item, nnx.Module):
            return graph.layers.get(id(item), [])
        return None

    return match


def _show(item: Any) -> str:
    return item if isinstance(item, str) else type(item).__name__


def _resolve(model: nnx.Module, exclude: Any, unit_axes: Any) -> dict[Hashable, Target]:
    graph = _graph(model)
    plan = resolve(
        graph.params,
        _LAYOUTS,
        match=_matcher(graph),
        exclude=exclude,
        unit_axes=unit_axes,
        single=lambda item: isinstance(item, (str, nnx.Module, nnx.Variable)),
        name_of=_show,
    )
    return plan.by_key()


def unit_axes_of(model: nnx.Module) -> dict[str, UnitAxes]:
    """The output-unit axes (non-negative) of every parameter of rank >= 2 whose layer AGC
    knows, by dotted path (``SPEC.md`` section 5).

    Example:
        >>> net = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
        ...                      nnx.ConvTranspose(3, 2, (3, 3), rngs=nnx.Rngs(0)))
        >>> unit_axes_of(net)
        {'layers.0.kernel': 1, 'layers.1.kernel': 3}
    """
    from .._core.agc_plan import layer_unit_axes

    return layer_unit_axes(_graph(model).params, _LAYOUTS)


def final_classifier(model: nnx.Module) -> nnx.Module:
    """The model's final classifier: its last ``nnx.Linear`` in the order the layers were
    set, to pass as ``exclude`` (the paper leaves it unclipped).

    Example:
        >>> net = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
        ...                      nnx.Linear(8, 2, rngs=nnx.Rngs(0)))
        >>> final_classifier(net) is net.layers[1]
        True
    """
    linears = [node for _, node in _in_definition_order(model) if isinstance(node, nnx.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nnx.Linear to treat as the classifier")
    return linears[-1]


def _in_definition_order(model: nnx.Module) -> list[tuple[Path, Any]]:
    """``nnx.iter_graph``'s nodes in the order their attributes were set (iter_graph
    sorts a module's attributes by name, so ``fc`` would come before ``head``)."""
    nodes: list[tuple[Path, Any]] = [(tuple(path), node) for path, node in nnx.iter_graph(model)]
    by_path = dict(nodes)

    def position(path: Path) -> tuple[int, ...]:
        out = []
        for depth in range(len(path)):
            parent, key = by_path.get(path[:depth]), path[depth]
            if isinstance(key, int):
                out.append(key)
            else:
                names = list(vars(parent)) if hasattr(parent, "__dict__") else []
                out.append(names.index(key) if key in names else len(names))
        return tuple(out)

    return sorted(nodes, key=lambda item: position(item[0]))


def clip_unitwise(grad: jax.Array, weight: jax.Array, target: Target, spec: AGCSpec) -> jax.Array:
    """One parameter's gradient clipped per unit (``SPEC.md`` section 5): norms in float32
    at least; units under the threshold, and units whose gradient norm is not finite, are
    returned bit for bit."""
    g = grad if target.view is None else grad.reshape(target.view)
    w = weight if target.view is None else weight.reshape(target.view)
    dtype = jnp.promote_types(g.dtype, jnp.float32)
    gw, ww = g.astype(dtype), w.astype(dtype)
    if target.axes and not target.reduce_axes:  # every axis indexes units: one entry each
        g_norm, w_norm = jnp.abs(gw), jnp.abs(ww)
    else:
        axes = target.reduce_axes if target.axes else None
        g_norm = jnp.sqrt(jnp.sum(jnp.square(gw), axis=axes, keepdims=True))
        w_norm = jnp.sqrt(jnp.sum(jnp.square(ww), axis=axes, keepdims=True))
    max_norm = spec.clipping * jnp.maximum(w_norm, spec.eps)
    clip = jnp.isfinite(g_norm) & (g_norm > max_norm)
    factor = max_norm / jnp.maximum(g_norm, AGC_GRAD_NORM_FLOOR)
    out = jnp.where(clip, (gw * factor).astype(g.dtype), g)
    return out.reshape(grad.shape)


def _key_of(entry: Any) -> Hashable:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return getattr(entry, attribute)  # type: ignore[no-any-return]
    return entry  # type: ignore[no-any-return]


def _leaf_paths(tree: Any) -> tuple[list[tuple[Path, Any]], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_key_of(e) for e in path), leaf) for path, leaf in leaves], treedef


def agc(
    model: nnx.Module,
    clipping: float = 0.01,
    eps: float = 1e-3,
    *,
    exclude: Any = (),
    unit_axes: Mapping[Any, UnitAxes] | int | None = None,
) -> optax.GradientTransformation:
    """Adaptive Gradient Clipping (Brock et al. 2021, arXiv 2102.06171) as an optax
    transformation over the parameters of ``model`` (``nnx.state(model, nnx.Param)``).

    Per output unit ``i``: ``max_i = clipping * max(||W_i||, eps)``; where ``||G_i|| >
    max_i`` the unit's gradient becomes ``G_i * max_i / max(||G_i||, 1e-6)``; the unit
    axes come from the owning layer (``nnx.Linear`` ``(in, out)``: axis 1; ``nnx.Conv``
    ``(*k, I/g, O)``: the last; ``nnx.ConvTranspose`` ``(*k, I, O)``: the last, ``(*k, O,
    I)`` with ``transpose_kernel=True``: the one before; a depthwise ``nnx.Conv``
    (``feature_group_count`` = in) ``(*k, 1, I*M)``: the last; ``nnx.Embed``: rows).
    Non-finite gradients are left as they are.

    Args:
        model: the model whose layers decide the unit axes; its parameter paths are the
            gradient tree's.
        clipping: 0.01. The largest allowed ratio ``||G_i|| / max(||W_i||, eps)``.
        eps: 1e-3. The floor under a unit's weight norm.
        exclude: parameters or layers (``nnx.Param``, ``nnx.Module`` or their dotted
            paths) left unclipped, e.g. ``final_classifier(model)``.
        unit_axes: one axis for every parameter of rank >= 2, or overrides per parameter.

    Raises ``ValueError`` at construction for a name that matches nothing, a bad axis, or
    a parameter of rank >= 2 whose layer AGC does not know (with the two ways out).

    Example:
        >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
        ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
        >>> tx = optax.chain(agc(model, exclude=final_classifier(model)), optax.sgd(0.1))
        >>> opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        >>> grads = nnx.grad(lambda m: (m(jnp.ones((2, 4))) ** 2).mean())(model)
        >>> _ = opt.update(model, grads)
    """
    spec = AGCSpec(clipping=clipping, eps=eps)
    targets = _resolve(model, exclude, unit_axes)
    known: set[Path] = {tuple(p.key) for p in _graph(model).params}  # type: ignore[arg-type]

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError("unorm.flax.agc needs the parameters: update(grads, state, params)")
        grads, treedef = _leaf_paths(updates)
        weights = dict(_leaf_paths(params)[0])
        out = []
        for path, grad in grads:
            key = _strip(path, known)
            target = targets.get(key) if key is not None else None
            if key is None:
                raise ValueError(
                    f"AGC got a gradient for {_name(path)!r}, which is no parameter of the "
                    f"{type(model).__name__} it was built for"
                )
            out.append(grad if target is None else clip_unitwise(grad, weights[path], target, spec))
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _strip(path: Path, known: Iterable[Path]) -> Path | None:
    """The model's path of a gradient leaf: as it is, or without the ``value`` an
    ``nnx.Variable`` leaf adds."""
    known = set(known)
    if path in known:
        return path
    if path and path[-1] == "value" and path[:-1] in known:
        return path[:-1]
    return None
