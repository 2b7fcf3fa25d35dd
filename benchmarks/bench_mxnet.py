"""Benchmark plug-in "mxnet": unorm.mxnet against Gluon's own BatchNorm and a plain AGC loop.

Run with ``python -m benchmarks.run mxnet`` in the legacy environment (MXNet 1.9, CPU).

Benchmarks (full size; ``quick`` uses small inputs):

- ``bn_train``: forward + backward (``autograd.record()``, ``backward()``) of
  ``unorm.mxnet.BatchNorm`` vs ``gluon.nn.BatchNorm``, both hybridized, float32 NCHW at
  (32, 64, 56, 56) and (256, 256, 14, 14). Target ratio 1.05. unorm computes the batch
  statistics accurately (BLAS partial sums finished in float64, two-pass when the mean is
  large) and updates the running statistics in the forward pass; Gluon's kernel sums one
  float32 at a time and updates in backward, so the two do not do the same work.
- ``bn_eval``: the same layers in inference mode (forward only, nothing recorded for
  autograd), called directly: unorm runs MXNet's kernel on the running statistics, as
  Gluon does. Target ratio 1.05.
- ``bn_eval_in_graph``: the same inference inside a hybridized parent
  (``HybridSequential``), where unorm's layer is its custom operator (the graph serves
  training and inference alike). Target ratio 1.05.
- ``ghost_train``, ``renorm_train``: the BatchNorm training modes (SPEC.md section 2),
  ``unorm.mxnet.BatchNorm`` with ghost batches (a quarter of the batch per group, target
  1.3) or Batch Renormalization (target 1.2) against plain ``gluon.nn.BatchNorm`` at the
  same total batch, both hybridized, the ``bn_train`` step.
- ``fold_eval``: inference of a ResNet-like Conv-BatchNorm-ReLU stack folded by
  :func:`unorm.mxnet.fold` against the same stack unfolded (Gluon's BatchNorm), both
  hybridized. Target 1.0 (folding must pay).
- ``recalibrate``: :func:`unorm.mxnet.recalibrate` over 4 batches of that stack against 4
  plain training-mode forward passes, both imperative (recalibrate observes each layer,
  which a hybridized graph hides). Target 1.1.
- ``agc``: ``adaptive_clip_grad`` over the parameters of a ResNet-50 (Gluon model zoo
  architecture, random weights and gradients) against a per-tensor loop written the way
  timm's ``adaptive_clip_grad`` is (per tensor: norms, clamp, divide, where, copy). No
  target: MXNet has no AGC of its own.

``bytes_moved``: training reads the input twice and writes the output in the forward
pass, then reads input and output gradient and writes the input gradient (5 passes; the
backward sums need a pass of their own), 8 input sizes in all; inference reads and writes
once. AGC reads weights and gradients and writes the gradients.

Example:
    >>> sorted({b.name for b in benchmarks(quick=True)})
    ['agc', 'bn_eval', 'bn_eval_in_graph', 'bn_train', 'fold_eval', 'ghost_train', 'recalibrate',
     'renorm_train']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from unorm.mxnet import BatchNorm, adaptive_clip_grad, fold, recalibrate

from .harness import Benchmark

__all__ = ["benchmarks", "timm_style_agc", "versions"]

BACKEND = "mxnet"
CLIPPING = 0.01
AGC_EPS = 1e-3


def versions() -> dict[str, str]:
    """The versions of what these benchmarks run on."""
    return {"mxnet": mx.__version__, "numpy": np.__version__}


def _wait(result: object) -> None:
    """Finish all the work a call queued, not only its returned array: a training step
    also writes parameter gradients and running statistics, and work still in flight when
    the clock stops would be timed in the next sample, which is the other side's every
    second round."""
    del result
    mx.nd.waitall()


def _bn_pair(shape: tuple[int, ...]) -> list[Benchmark]:
    rng = np.random.default_rng(0)
    x = mx.nd.array(rng.standard_normal(shape, dtype=np.float32))
    x.attach_grad()
    dy = mx.nd.array(rng.standard_normal(shape, dtype=np.float32))
    channels = shape[1]
    ours = BatchNorm(channels, num_dims=len(shape))
    native = gluon.nn.BatchNorm(in_channels=channels)
    for layer in (ours, native):
        layer.initialize()
        layer.hybridize(static_alloc=True)

    def train(layer: Any) -> Callable[[], object]:
        def run() -> object:
            with autograd.record():
                y = layer(x)
            y.backward(dy)
            return x.grad

        return run

    def infer(layer: Any) -> Callable[[], object]:
        return lambda: layer(x)

    def in_graph(layer: Any) -> Any:
        parent = gluon.nn.HybridSequential()
        parent.add(layer)  # already initialised: the parent shares its parameters
        parent.hybridize(static_alloc=True)
        return parent

    params = {"shape": shape, "dtype": "float32", "layout": "NCHW"}
    size = x.size * 4
    graph_ours, graph_native = infer(in_graph(ours)), infer(in_graph(native))
    ghost = BatchNorm(channels, virtual_batch_size=max(2, shape[0] // 4))
    renorm = BatchNorm(channels, renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 5.0})
    for layer in (ghost, renorm):
        layer.initialize()
        layer.hybridize(static_alloc=True)
    modes = [
        Benchmark(name, BACKEND, params, train(layer), train(native), _wait, 8 * size, target)
        for name, layer, target in (("ghost_train", ghost, 1.3), ("renorm_train", renorm, 1.2))
    ]
    return [
        *modes,
        Benchmark("bn_train", BACKEND, params, train(ours), train(native), _wait, 8 * size, 1.05),
        Benchmark("bn_eval", BACKEND, params, infer(ours), infer(native), _wait, 2 * size, 1.05),
        Benchmark(
            "bn_eval_in_graph", BACKEND, params, graph_ours, graph_native, _wait, 2 * size, 1.05
        ),
    ]


def timm_style_agc(params: Any, clipping: float, eps: float) -> None:
    """AGC written tensor by tensor, as timm's ``adaptive_clip_grad`` does (unit axis 0)."""
    for param in params.values():
        if param.grad_req == "null":
            continue
        weight, grad = param.data(), param.grad()
        axes = tuple(range(1, weight.ndim)) if weight.ndim > 1 else None
        w_norm = mx.nd.norm(weight, axis=axes, keepdims=True) if axes else mx.nd.norm(weight)
        g_norm = mx.nd.norm(grad, axis=axes, keepdims=True) if axes else mx.nd.norm(grad)
        max_norm = mx.nd.maximum(w_norm, eps) * clipping
        clipped = mx.nd.broadcast_mul(grad, max_norm / mx.nd.maximum(g_norm, 1e-6))
        keep = mx.nd.broadcast_to(g_norm < max_norm, grad.shape)
        grad[:] = mx.nd.where(keep, grad, clipped)


def _agc(quick: bool) -> Benchmark:
    rng = np.random.default_rng(1)
    if quick:
        net = gluon.nn.HybridSequential()
        net.add(gluon.nn.Conv2D(8, 3, in_channels=4), gluon.nn.Dense(10, in_units=8))
        name = "small"
    else:
        net = gluon.model_zoo.vision.resnet50_v1(pretrained=False)
        name = "resnet50"
    net.initialize(mx.init.Xavier())
    if not quick:
        net(mx.nd.zeros((1, 3, 224, 224)))  # finish the deferred initialisation
    params = net.collect_params()
    moved = 0
    for param in params.values():
        if param.grad_req != "null":
            param.grad()[:] = rng.standard_normal(param.shape).astype(np.float32) * 1e-2
            moved += 3 * param.data().size * 4

    def ours() -> object:
        adaptive_clip_grad(net, clipping=CLIPPING, eps=AGC_EPS)
        return None

    def theirs() -> object:
        timm_style_agc(params, CLIPPING, AGC_EPS)
        return None

    info = {"model": name, "dtype": "float32"}
    return Benchmark("agc", BACKEND, info, ours, theirs, _wait, moved)


def conv_bn_stack(blocks: int, channels: int) -> Any:
    """``blocks`` Conv(3x3, no bias)-BatchNorm-ReLU blocks of ``channels`` channels after a
    3-channel stem (a ResNet stage without its shortcuts), Gluon's own BatchNorm,
    initialised and run once in training mode (statistics away from 0 and 1); not yet
    hybridized, since fold copies the model and a cached graph does not copy."""
    net = gluon.nn.HybridSequential()
    for _ in range(blocks + 1):
        net.add(gluon.nn.Conv2D(channels, 3, padding=1, use_bias=False))
        net.add(gluon.nn.BatchNorm(), gluon.nn.Activation("relu"))
    net.initialize(mx.init.Xavier())
    with autograd.record():
        net(mx.nd.random.normal(shape=(2, 3, 8, 8)))
    return net


def _after_training(shape: tuple[int, ...], blocks: int, channels: int) -> list[Benchmark]:
    """``fold_eval`` (the folded stack's inference against the unfolded one's, both
    hybridized; target 1.0: folding must pay) and ``recalibrate`` (over 4 batches,
    against 4 plain training-mode forward passes of the same stack, both imperative:
    recalibrate observes each layer, which a hybridized graph hides; target 1.1)."""
    mx.random.seed(0)
    net = conv_bn_stack(blocks, channels)
    x = mx.nd.random.normal(shape=shape)
    folded = fold(net)
    plain = conv_bn_stack(blocks, channels)  # recalibrate reads layers: not hybridized
    for model in (net, folded):
        model.hybridize(static_alloc=True)
    batches = [mx.nd.random.normal(shape=shape) for _ in range(4)]
    info = {"shape": shape, "blocks": blocks, "channels": channels}

    def forwards() -> object:
        with autograd.train_mode():
            return [plain(b) for b in batches][-1]

    return [
        Benchmark("fold_eval", BACKEND, info, lambda: folded(x), lambda: net(x), _wait, None, 1.0),
        Benchmark(
            "recalibrate", BACKEND, {**info, "batches": len(batches)},
            lambda: recalibrate(plain, batches), forwards, _wait, None, 1.1,
        ),
    ]  # fmt: skip


def benchmarks(quick: bool) -> list[Benchmark]:
    """This plug-in's benchmarks: full size, or small inputs when ``quick``."""
    shapes = [(4, 8, 16, 16), (8, 16, 7, 7)] if quick else [(32, 64, 56, 56), (256, 256, 14, 14)]
    found: list[Benchmark] = []
    for shape in shapes:
        found.extend(_bn_pair(shape))
    found += (
        _after_training((2, 3, 8, 8), 1, 4) if quick else _after_training((16, 3, 56, 56), 4, 64)
    )
    found.append(_agc(quick))
    return found
