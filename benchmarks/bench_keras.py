"""Benchmark plug-in "keras": unorm.keras against Keras's own layer and optimizer.

Run with ``python -m benchmarks.run keras`` in the current environment (TensorFlow
backend; every timed call is a ``tf.function`` and returns a value that is read back, so
the work is finished before the clock stops).

Benchmarks (full size; ``quick`` uses small inputs):

- ``bn_train``: one training step (forward and backward of ``sum(y * dy)``) of
  ``BatchNorm()`` (canonical settings: unbiased feed, non-finite guard) against
  ``keras.layers.BatchNormalization()`` at (32, 56, 56, 64) and (256, 14, 14, 256)
  float32, channels-last. Target ratio 1.05. Floor: 8 passes over the input size (the
  forward reads x twice and writes y; the backward reads dy and x for its sums, reads them
  again and writes dx).
- ``bn_eval``: the same layers in inference mode (forward only). Target ratio 1.05.
  Floor: read x, write y.
- ``agc_step``: one update of ``AGC(SGD)`` against the same ``SGD`` without AGC, over the
  variables of a ResNet-50 (``keras.applications.ResNet50(weights=None)``, 25.6 M
  parameters, classifier excluded) with fixed random gradients. The ratio is the whole
  step's; the floor counts what the step must move, AGC's clip (read weights and
  gradients, write gradients) plus SGD's update (read weights and gradients, write
  weights), so ``× floor`` shows how close the clipped step runs to memory speed. The
  target bounds the clip's own cost: the step's time over plain SGD's (unorm - native)
  is at most 1.3x the clip's floor (read weights and gradients, write gradients).
- ``agc_step_xla``: the same, both steps compiled by XLA (``jit_compile=True``, which
  ``model.fit`` uses by default where TensorFlow sees a GPU). XLA fuses the clip's
  multiply into SGD's update, but its CPU reductions (the unit norms) run at a third of
  the copy bandwidth.
- ``renorm_train``, ``ghost_train``: the BatchNorm training modes (:func:`training_modes`).
- ``fold_eval``, ``recalibrate``: :func:`unorm.keras.fold` and :func:`unorm.keras.recalibrate`
  on a ResNet-like Conv-BatchNorm-ReLU stack (:func:`after_training`), targets 1.0 and 1.1.

Example:
    >>> sorted({b.name for b in benchmarks(quick=True)})
    ['agc_step', 'agc_step_xla', 'bn_eval', 'bn_train', 'fold_eval', 'ghost_train', 'recalibrate',
     'renorm_train']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from unorm.keras import AGC, BatchNorm, final_classifier, fold, recalibrate

from .harness import Benchmark

__all__ = ["benchmarks", "versions"]

BACKEND = "keras"
BN_TARGET = 1.05
#: The most AGC's clip may take over its own memory-traffic floor (issue: "AGC optimizer step
#: vs the same optimizer without AGC ... target <= 1.3x the floor of the clip itself").
AGC_ADDED_TARGET = 1.3


def versions() -> dict[str, str]:
    """The versions of what these benchmarks run on.

    Example:
        >>> versions()["keras"] == keras.__version__
        True
    """
    return {"keras": keras.__version__, "tensorflow": tf.__version__}


def _read_back(out: object) -> None:
    """Finish the work: TensorFlow may still be running when a function returns."""
    for t in tf.nest.flatten(out):
        t.numpy()


def _graph(fn: Callable[[], object], jit_compile: bool = False) -> Callable[[], object]:
    """``fn`` as a ``tf.function`` (traced on its first call, the warm-up), compiled by
    XLA with ``jit_compile``."""
    compiled: Callable[[], object] = tf.function(fn, jit_compile=jit_compile)
    return compiled


def _bn_step(layer: Any, x: Any, dy: Any, training: bool) -> Callable[[], object]:
    if not training:
        return _graph(lambda: layer(x, training=False))

    def step() -> object:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return tape.gradient(loss, [x, *layer.trainable_weights])

    return _graph(step)


def bn(shape: tuple[int, ...], training: bool) -> Benchmark:
    """``BatchNorm()`` against ``keras.layers.BatchNormalization()`` on ``shape``.

    Example:
        >>> bn((2, 4, 4, 3), training=False).params
        {'shape': (2, 4, 4, 3), 'dtype': 'float32', 'axis': -1}
    """
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    dy = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    ours, native = BatchNorm(), keras.layers.BatchNormalization()
    ours.build(shape)
    native.build(shape)
    nbytes = int(np.prod(shape)) * 4
    return Benchmark(
        name="bn_train" if training else "bn_eval",
        backend=BACKEND,
        params={"shape": shape, "dtype": "float32", "axis": -1},
        unorm=_bn_step(ours, x, dy, training),
        native=_bn_step(native, x, dy, training),
        sync=_read_back,
        bytes_moved=(8 if training else 2) * nbytes,
        target_ratio=BN_TARGET,
    )


def training_modes(shape: tuple[int, ...]) -> list[Benchmark]:
    """The BatchNorm training modes (SPEC.md section 2), training steps in a
    ``tf.function``: ``preset="keras"`` with Batch Renormalization against
    ``keras.layers.BatchNormalization(renorm=True)`` with the same clipping (target 1.05:
    the same op sequence), and canonical ghost batches (a quarter of the batch per group)
    against plain ``keras.layers.BatchNormalization()`` at the same total batch (target
    1.3).

    Example:
        >>> [b.name for b in training_modes((4, 4, 4, 3))]
        ['renorm_train', 'ghost_train']
    """
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    dy = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    clipping = {"rmax": 3.0, "dmax": 5.0}
    pairs = [
        (
            "renorm_train",
            BatchNorm(preset="keras", renorm=True, renorm_clipping=clipping),
            keras.layers.BatchNormalization(renorm=True, renorm_clipping=clipping),
            1.05,
        ),
        (
            "ghost_train",
            BatchNorm(virtual_batch_size=max(2, shape[0] // 4)),
            keras.layers.BatchNormalization(),
            1.3,
        ),
    ]
    out = []
    for name, ours, native, target in pairs:
        ours.build(shape)
        native.build(shape)
        out.append(
            Benchmark(
                name=name,
                backend=BACKEND,
                params={"shape": shape, "dtype": "float32", "axis": -1},
                unorm=_bn_step(ours, x, dy, True),
                native=_bn_step(native, x, dy, True),
                sync=_read_back,
                bytes_moved=8 * int(np.prod(shape)) * 4,
                target_ratio=target,
            )
        )
    return out


def _small_model() -> Any:
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(16, 3),
            layers.BatchNormalization(),
            layers.DepthwiseConv2D(3),
            layers.Conv2DTranspose(8, 3),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10),
        ]
    )


def agc_step(quick: bool, jit_compile: bool = False) -> Benchmark:
    """An ``AGC(SGD)`` update against a plain ``SGD`` update over a model's variables,
    both as ``tf.function``s, compiled by XLA with ``jit_compile`` (what ``model.fit``
    does with its default ``jit_compile="auto"`` where TensorFlow sees a GPU).

    Example:
        >>> agc_step(quick=True).params["variables"] > 5
        True
    """
    if quick:
        model, name = _small_model(), "small"
    else:
        model, name = keras.applications.ResNet50(weights=None), "resnet50"
    variables = model.trainable_variables
    rng = np.random.default_rng(1)
    grads = [
        tf.constant(1e-3 * rng.standard_normal(tuple(v.shape), dtype=np.float32)) for v in variables
    ]
    # A tiny learning rate: both sides update the same variables and drift alike.
    clipped = AGC(keras.optimizers.SGD(1e-9), model, exclude=final_classifier(model))
    plain = keras.optimizers.SGD(1e-9)
    clipped.build(variables)
    plain.build(variables)

    def step(optimizer: Any) -> Callable[[], object]:
        def run() -> object:
            optimizer.apply(grads, variables)
            return optimizer.iterations

        return _graph(run, jit_compile)

    params = sum(int(np.prod(v.shape)) for v in variables)
    return Benchmark(
        name="agc_step_xla" if jit_compile else "agc_step",
        backend=BACKEND,
        params={"model": name, "variables": len(variables), "parameters": params},
        unorm=step(clipped),
        native=step(plain),
        sync=_read_back,
        # The step reads the weights and gradients and writes the weights (SGD), and the
        # clip reads the weights and gradients and writes the gradients: 3 float32 each.
        bytes_moved=6 * 4 * params,
        added_bytes=3 * 4 * params,
        added_target=AGC_ADDED_TARGET,
    )


def conv_bn_stack(blocks: int, channels: int, size: int) -> Any:
    """``blocks`` Conv(3x3, no bias)-BatchNorm-ReLU blocks of ``channels`` channels after a
    3-channel stem (a ResNet stage without its shortcuts), Keras's own BatchNormalization,
    on ``(size, size, 3)`` images."""
    stack: list[Any] = [keras.Input((size, size, 3))]
    for _ in range(blocks + 1):
        stack += [keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)]
        stack += [keras.layers.BatchNormalization(), keras.layers.ReLU()]
    return keras.Sequential(stack)


def after_training(shape: tuple[int, ...], blocks: int, channels: int) -> list[Benchmark]:
    """``fold_eval``: the folded stack's inference against the unfolded one's, both in a
    ``tf.function`` (target 1.0: folding must pay). ``recalibrate``: over 4 batches,
    against 4 plain training-mode forward passes of the same stack, both eager as
    :func:`unorm.keras.recalibrate` runs (target 1.1). ``shape`` is channels-last."""
    keras.utils.set_random_seed(0)
    net = conv_bn_stack(blocks, channels, shape[1])
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    net(x, training=True)  # moving statistics away from 0 and 1
    folded = fold(net)
    batches = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    info = {"shape": shape, "blocks": blocks, "channels": channels}

    first = next(layer for layer in net.layers if hasattr(layer, "moving_mean"))

    def forwards() -> object:
        for b in batches:
            net(b, training=True)
        return first.moving_mean

    def recalibrated() -> object:
        recalibrate(net, batches)
        return first.moving_mean  # each side returns what it changed, for read-back

    return [
        Benchmark(
            "fold_eval", BACKEND, info, _graph(lambda: folded(x, training=False)),
            _graph(lambda: net(x, training=False)), _read_back, None, 1.0,
        ),
        Benchmark(
            "recalibrate", BACKEND, {**info, "batches": len(batches)},
            recalibrated, forwards, _read_back, None, 1.1,
        ),
    ]  # fmt: skip


def benchmarks(quick: bool) -> list[Benchmark]:
    """This plug-in's benchmarks: full size, or small inputs when ``quick``.

    Example:
        >>> benchmarks(quick=True)[0].params["shape"]
        (4, 8, 8, 16)
    """
    shapes = [(4, 8, 8, 16)] if quick else [(32, 56, 56, 64), (256, 14, 14, 256)]
    out = [bn(shape, training=True) for shape in shapes]
    out += [bn(shape, training=False) for shape in shapes]
    out += [b for shape in shapes for b in training_modes(shape)]
    out += after_training((2, 8, 8, 3), 1, 4) if quick else after_training((16, 56, 56, 3), 4, 64)
    out += [agc_step(quick), agc_step(quick, jit_compile=True)]
    return out
