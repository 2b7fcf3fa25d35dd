"""Matching two models' layers by their data flow, not by the order they were defined in.

A backend describes one forward pass of its model as a list of :class:`FlowNode`, in an
order where every node's inputs come before it, over a small vocabulary that every
framework's graph maps to:

- ``input``: the model's input;
- ``layer``: a layer with parameters (its index in :meth:`PortModel.layers`), with its
  inputs in position order;
- ``add`` and ``mul``: elementwise sums and products (residual shortcuts,
  squeeze-and-excitation), whose inputs' order does not matter;
- ``concat``: a concatenation, whose inputs' order does.

Every other operation without parameters (activations, pooling, flatten, reshapes,
dropout) is contracted: its consumers read its input instead. Two flows then match when
there is a one-to-one map of their nodes that keeps every node's operation, a layer's
*signature* (its kind and parameter shapes) and every edge with its position; such a map
pairs the checkpoint's layers with the model's whatever order either defined them in,
and tells parallel branches apart by where they read and feed. The matching is colour
refinement (each node's colour is refined by its inputs' and consumers' colours until
stable); nodes still sharing a colour are structurally interchangeable, and one is chosen
at a time and refined again. What the flows cannot see (a contracted activation that
differs) is caught by the checkpoint's probe (:mod:`unorm._core.probe`). Nothing here
imports a framework.

Example (a residual block whose shortcut is defined before its main path on one side):
    >>> a = [FlowNode("input"), FlowNode("layer", (0,), 0), FlowNode("layer", (0,), 1),
    ...      FlowNode("add", (1, 2))]
    >>> b = [FlowNode("input"), FlowNode("layer", (0,), 1), FlowNode("layer", (0,), 0),
    ...      FlowNode("add", (2, 1))]
    >>> match_flows(a, ["conv 3x3", "conv 1x1"], b, ["conv 3x3", "conv 1x1"])
    {0: 0, 1: 1}
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = [
    "OPS",
    "FlowError",
    "FlowNode",
    "complete",
    "from_json",
    "match_flows",
    "runs_each_once",
    "to_json",
]

#: The operations a flow keeps; ``add`` and ``mul`` take their inputs in any order.
OPS = ("input", "layer", "add", "mul", "concat")
_UNORDERED = ("add", "mul")


class FlowError(ValueError):
    """Two flows that no map of nodes makes equal (a structural difference)."""


@dataclasses.dataclass(frozen=True)
class FlowNode:
    """One node of a flow: its operation, the nodes it reads (earlier indices, in input
    position order) and, for ``op == "layer"``, which of the model's layers it runs.

    Example:
        >>> FlowNode("layer", (0,), 2).layer
        2
    """

    op: str
    inputs: tuple[int, ...] = ()
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise FlowError(f"flow op must be one of {OPS}, got {self.op!r}")
        if (self.op == "layer") != (self.layer is not None):
            raise FlowError(f"a flow node names a layer exactly when its op is 'layer': {self}")


def runs_each_once(nodes: Sequence[FlowNode], layers: int) -> bool:
    """Whether ``nodes`` run each of ``layers`` layers exactly once (a flow a model's
    layers can be matched along).

    Example:
        >>> runs_each_once([FlowNode("input"), FlowNode("layer", (0,), 0)], 1)
        True
    """
    return sorted(n.layer for n in nodes if n.layer is not None) == list(range(layers))


def complete(nodes: list[FlowNode], layers: int) -> list[FlowNode] | None:
    """``nodes`` where they run each of ``layers`` layers once, else None: what a
    backend's flow reader returns (a layer called twice, or one outside the graph,
    leaves the model to be matched by order)."""
    return nodes if runs_each_once(nodes, layers) else None


def to_json(nodes: Sequence[FlowNode]) -> list[list[Any]]:
    """``nodes`` as JSON lists ``[op, [inputs], layer]`` (a checkpoint's ``extra``)."""
    return [[n.op, list(n.inputs), n.layer] for n in nodes]


def from_json(data: Any) -> list[FlowNode]:
    """The inverse of :func:`to_json`; :class:`FlowError` for malformed data.

    Example:
        >>> from_json([["input", [], None], ["layer", [0], 0]])[1]
        FlowNode(op='layer', inputs=(0,), layer=0)
    """
    try:
        nodes = [FlowNode(str(op), tuple(int(i) for i in ins), layer) for op, ins, layer in data]
    except (TypeError, ValueError) as err:
        raise FlowError(f"malformed flow: {err}") from None
    for index, node in enumerate(nodes):
        if any(not 0 <= i < index for i in node.inputs):
            raise FlowError(f"flow node {index} reads a node that does not come before it")
    return nodes


def _consumers(nodes: Sequence[FlowNode]) -> list[list[tuple[int, int]]]:
    """For every node, the (consumer, input position) pairs that read it."""
    out: list[list[tuple[int, int]]] = [[] for _ in nodes]
    for index, node in enumerate(nodes):
        for position, source in enumerate(node.inputs):
            out[source].append((index, position))
    return out


def _refine(graphs: list[tuple[Sequence[FlowNode], list[int]]]) -> list[list[int]]:
    """Colour refinement over several flows at once (so colours compare across them):
    each ``(nodes, colours)`` starts from ``colours`` and is refined by inputs (with
    their positions, except for unordered ops) and consumers until the partition is
    stable. Returns the final colours, as small integers shared by all flows."""
    consumers = [_consumers(nodes) for nodes, _ in graphs]
    colours = [list(c) for _, c in graphs]
    # Each round splits a colour or ends, so n nodes are stable within n rounds (a deep
    # network's flow needs about its depth: ResNet-50's is over a hundred nodes).
    for _ in range(sum(len(nodes) for nodes, _ in graphs) + 1):
        keys: list[list[Any]] = []
        for (nodes, _), colour, users in zip(graphs, colours, consumers, strict=True):
            rows = []
            for index, node in enumerate(nodes):
                ins = [colour[i] for i in node.inputs]
                inputs = tuple(sorted(ins)) if node.op in _UNORDERED else tuple(ins)
                # An unordered consumer reads its inputs in no position.
                outs = tuple(
                    sorted(
                        (colour[c], -1 if nodes[c].op in _UNORDERED else p) for c, p in users[index]
                    )
                )
                rows.append((colour[index], inputs, outs))
            keys.append(rows)
        table = {key: i for i, key in enumerate(sorted({k for rows in keys for k in rows}))}
        refined = [[table[k] for k in rows] for rows in keys]
        before = len({c for colour in colours for c in colour})
        colours = refined
        if len({c for colour in colours for c in colour}) == before:
            break
    return colours


def _initial(nodes: Sequence[FlowNode], signatures: Sequence[str]) -> list[str]:
    out = []
    for node in nodes:
        if node.op == "layer":
            assert node.layer is not None
            if not 0 <= node.layer < len(signatures):
                raise FlowError(f"flow node runs layer {node.layer}, which the model lacks")
            out.append(f"layer {signatures[node.layer]}")
        else:
            out.append(node.op)
    return out


def _check_counts(a: list[int], b: list[int]) -> None:
    if Counter(a) != Counter(b):
        raise FlowError("the two models' data flows differ (no map of layers keeps it)")


def match_flows(
    source: Sequence[FlowNode],
    source_signatures: Sequence[str],
    target: Sequence[FlowNode],
    target_signatures: Sequence[str],
) -> dict[int, int]:
    """Pair the source's layers with the target's by data flow: source layer index ->
    target layer index. :class:`FlowError` when the flows differ.

    Signatures (one string per layer, e.g. its kind and parameter shapes) must be equal
    for layers to pair; every layer must appear in its flow exactly once.
    """
    sides = (("source", source, source_signatures), ("target", target, target_signatures))
    for name, nodes, sigs in sides:
        if not runs_each_once(nodes, len(sigs)):
            raise FlowError(f"the {name} flow does not run each of its layers once")
    names = sorted(
        set(_initial(source, source_signatures)) | set(_initial(target, target_signatures))
    )
    code = {n: i for i, n in enumerate(names)}
    start = [
        [code[n] for n in _initial(source, source_signatures)],
        [code[n] for n in _initial(target, target_signatures)],
    ]
    a, b = _refine([(source, start[0]), (target, start[1])])
    _check_counts(a, b)
    # Nodes still sharing a colour are interchangeable: fix one pair, refine, repeat.
    while True:
        counts = Counter(a)
        shared = sorted(c for c, k in counts.items() if k > 1)
        if not shared:
            break
        colour = shared[0]
        s = a.index(colour)
        fresh = max(max(a), max(b)) + 1
        for t in (i for i, c in enumerate(b) if c == colour):
            a2, b2 = list(a), list(b)
            a2[s], b2[t] = fresh, fresh
            a3, b3 = _refine([(source, a2), (target, b2)])
            if Counter(a3) == Counter(b3):
                a, b = a3, b3
                break
        else:  # pragma: no cover - refinement is equitable on these flows
            raise FlowError("the two models' data flows differ (no map of layers keeps it)")
    by_colour = {c: i for i, c in enumerate(b)}
    pairs: dict[int, int] = {}
    for index, node in enumerate(source):
        if node.op == "layer":
            other = target[by_colour[a[index]]]
            assert node.layer is not None and other.layer is not None
            pairs[node.layer] = other.layer
    return pairs
