"""Benchmark plug-in "flax": unorm.flax against Flax NNX's own layer and optax's AGC.

Run with ``python -m benchmarks.run flax`` in the current environment. Every timed call
is a ``jax.jit``-compiled function (compiled in the warm-up) whose result is waited for
with ``jax.block_until_ready`` before the clock stops.

Benchmarks (full size; ``quick`` uses small inputs):

- ``bn_train``: one training step (the layer's output and the gradients of ``sum(y * dy)``
  with respect to the input and the parameters, and the new running statistics) of
  ``BatchNorm(C)`` (canonical settings: unbiased feed, non-finite guard) against
  ``nnx.BatchNorm(C)`` at (32, 56, 56, 64) and (256, 14, 14, 256) float32, channels-last.
  Target ratio 1.05. Floor: 8 passes over the input size.
- ``bn_eval``: the same layers in inference mode. Target ratio 1.05. Floor: read x,
  write y.
- ``agc``: ``unorm.flax.agc(model)`` against ``optax.adaptive_grad_clip(0.01)`` over the
  parameters of a model with ResNet-50's convolutions and classifier (25.5 M
  parameters, as ``nnx.Conv``/``nnx.Linear`` kernels), fixed random gradients. Target
  ratio 1.0 (optax's rank rule reads the same arrays; unorm's axes are decided before
  tracing). Floor: read weights and gradients, write gradients.

Example:
    >>> sorted({b.name for b in benchmarks(quick=True)})
    ['agc', 'bn_eval', 'bn_train']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unorm.flax import BatchNorm, agc

from .harness import Benchmark

__all__ = ["benchmarks", "versions"]

BACKEND = "flax"
BN_TARGET = 1.05
AGC_TARGET = 1.0


def versions() -> dict[str, str]:
    """The versions of what these benchmarks run on.

    Example:
        >>> versions()["flax"] == flax.__version__
        True
    """
    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}


def _ready(out: object) -> None:
    jax.block_until_ready(out)


def _bn_call(
    layer: nnx.Module, x: jax.Array, dy: jax.Array, training: bool
) -> Callable[[], object]:
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def call(p: Any, r: Any, inp: jax.Array) -> tuple[jax.Array, Any]:
        module = nnx.merge(graphdef, p, r, copy=True)
        y = module(inp, use_running_average=not training)
        return y, nnx.state(module, nnx.BatchStat)

    if training:

        @jax.jit
        def step(p: Any, r: Any, inp: jax.Array, cot: jax.Array) -> object:
            y, pullback, stats = jax.vjp(lambda a, b: call(a, r, b), p, inp, has_aux=True)
            return y, pullback(cot), stats

        return lambda: step(params, rest, x, dy)

    run = jax.jit(lambda p, r, inp: call(p, r, inp)[0])
    return lambda: run(params, rest, x)


def bn(shape: tuple[int, ...], training: bool) -> Benchmark:
    """``BatchNorm(C)`` against ``nnx.BatchNorm(C)`` on ``shape`` (channels-last).

    Example:
        >>> bn((2, 4, 4, 3), training=False).params
        {'shape': (2, 4, 4, 3), 'dtype': 'float32', 'axis': -1}
    """
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    dy = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    channels = shape[-1]
    ours, native = BatchNorm(channels), nnx.BatchNorm(channels, rngs=nnx.Rngs(0))
    nbytes = int(np.prod(shape)) * 4
    return Benchmark(
        name="bn_train" if training else "bn_eval",
        backend=BACKEND,
        params={"shape": shape, "dtype": "float32", "axis": -1},
        unorm=_bn_call(ours, x, dy, training),
        native=_bn_call(native, x, dy, training),
        sync=_ready,
        bytes_moved=(8 if training else 2) * nbytes,
        target_ratio=BN_TARGET,
    )


class _ResNet50Shapes(nnx.Module):
    """ResNet-50's convolutions and classifier as NNX layers (the shapes only: AGC reads
    parameters, not a forward pass)."""

    def __init__(self, quick: bool) -> None:
        rngs = nnx.Rngs(0)
        convs = [nnx.Conv(3, 64, (7, 7), rngs=rngs)]
        width, channels = 64, 64
        stages = ((1, 16), (1, 32)) if quick else ((3, 64), (4, 128), (6, 256), (3, 512))
        for blocks, planes in stages:
            for _ in range(blocks):
                out = planes * 4
                convs += [
                    nnx.Conv(channels, planes, (1, 1), rngs=rngs),
                    nnx.Conv(planes, planes, (3, 3), rngs=rngs),
                    nnx.Conv(planes, out, (1, 1), rngs=rngs),
                ]
                if channels != out:
                    convs.append(nnx.Conv(channels, out, (1, 1), rngs=rngs))
                channels = out
            width = channels
        self.convs = nnx.List(convs)
        self.norms = nnx.List([BatchNorm(c.out_features) for c in convs])
        self.fc = nnx.Linear(width, 10 if quick else 1000, rngs=rngs)


def agc_clip(quick: bool) -> Benchmark:
    """``unorm.flax.agc`` against ``optax.adaptive_grad_clip`` over a ResNet-50-sized tree.

    Example:
        >>> agc_clip(quick=True).params["parameters"] > 1000
        True
    """
    model = _ResNet50Shapes(quick)
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(1)
    leaves, treedef = jax.tree.flatten(params)
    grads = jax.tree.unflatten(
        treedef,
        [jnp.asarray(1e-2 * rng.standard_normal(a.shape, dtype=np.float32)) for a in leaves],
    )
    ours, theirs = agc(model, clipping=0.01), optax.adaptive_grad_clip(0.01)

    def run(tx: optax.GradientTransformation) -> Callable[[], object]:
        state = tx.init(params)
        step = jax.jit(lambda g, p: tx.update(g, state, p)[0])
        return lambda: step(grads, params)

    count = sum(int(np.prod(a.shape)) for a in leaves)
    return Benchmark(
        name="agc",
        backend=BACKEND,
        params={"model": "small" if quick else "resnet50", "parameters": count},
        unorm=run(ours),
        native=run(theirs),
        sync=_ready,
        bytes_moved=3 * 4 * count,
        target_ratio=AGC_TARGET,
    )


def benchmarks(quick: bool) -> list[Benchmark]:
    """This plug-in's benchmarks: full size, or small inputs when ``quick``.

    Example:
        >>> benchmarks(quick=True)[0].params["shape"]
        (4, 8, 8, 16)
    """
    shapes = [(4, 8, 8, 16)] if quick else [(32, 56, 56, 64), (256, 14, 14, 256)]
    out = [bn(shape, training=True) for shape in shapes]
    out += [bn(shape, training=False) for shape in shapes]
    out.append(agc_clip(quick))
    return out
