"""unorm for Flax NNX: BatchNorm, cross-device BatchNorm and AGC following ``SPEC.md``.

Imports JAX, Flax and optax and nothing of the other frameworks.

- :class:`BatchNorm`: an ``nnx.Module`` with ``nnx.BatchNorm``'s state names (``scale``,
  ``bias``, ``mean``, ``var``, plus ``num_batches_tracked``) and its
  ``use_running_average`` switch, canonical by default, ``preset="flax"`` reproducing
  ``nnx.BatchNorm``; ``axis_name`` merges every shard's (count, mean, M2) exactly under
  ``shard_map``/``pmap``/``vmap``, a per-sample ``mask`` gives uneven and empty shards.
- :func:`batch_moments`: the per-feature (count, mean, M2) it uses.
- :func:`convert`: swap a model's ``nnx.BatchNorm`` layers for unorm's, same numbers.
- :func:`freeze`: BatchNorm after training (``SPEC.md`` section 8): always normalise with
  the running statistics, never update them; ``scale``/``bias`` fixed unless trainable.
- :func:`agc`, :func:`final_classifier`, :func:`unit_axes_of`: Adaptive Gradient
  Clipping as an optax transformation, with output-unit axes from each parameter's layer.
- :class:`ScaledStdConv`, :func:`standardize_kernel`: Scaled Weight Standardisation for
  normalizer-free networks.

Porting to and from the other frameworks goes through the neutral checkpoint
(``unorm port``, or ``unorm._flax.port``'s ``export_checkpoint(model, input_shape)`` and
``load_checkpoint``); Flax's native file there is ``.msgpack``, the model's variables by
path.

Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from unorm.flax import BatchNorm, agc, final_classifier
    >>> model = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), BatchNorm(6),
    ...                        nnx.Linear(6, 2, rngs=nnx.Rngs(1)))
    >>> tx = optax.chain(agc(model, exclude=final_classifier(model)), optax.sgd(0.1))
    >>> opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> _ = opt.update(model, nnx.grad(lambda m: (m(jnp.ones((8, 4))) ** 2).mean())(model))
"""

from __future__ import annotations

from ._flax.after_training import FrozenParam, freeze
from ._flax.agc import agc, clip_unitwise, final_classifier, unit_axes_of
from ._flax.batchnorm import BatchNorm, batch_moments
from ._flax.convert import convert
from ._flax.ws import ScaledStdConv, standardize_kernel

__all__ = [
    "BatchNorm",
    "FrozenParam",
    "ScaledStdConv",
    "agc",
    "batch_moments",
    "clip_unitwise",
    "convert",
    "final_classifier",
    "freeze",
    "standardize_kernel",
    "unit_axes_of",
]
