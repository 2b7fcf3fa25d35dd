"""Private implementation of :mod:`unorm.mxnet` (MXNet Gluon 1.9); import that module instead.

One job per module:

- :mod:`.native`: thin wrappers over MXNet's own kernels (per-channel affine, the native
  BatchNorm backward) and cached constant arrays.
- :mod:`.stats`: accurate per-channel batch statistics ``(n, mean, M2)`` of an NDArray.
- :mod:`.sync`: the cross-device rendezvous and Chan's exact merge.
- :mod:`.op`: the ``unorm_batchnorm`` CustomOp (forward, backward, running-statistics update)
  and its registration.
- :mod:`.batchnorm`: the Gluon blocks ``BatchNorm`` and ``SyncBatchNorm``.
- :mod:`.agc`: adaptive gradient clipping for Gluon parameters and trainers.
- :mod:`.convert`: replacing ``gluon.nn.BatchNorm`` children in a model.
- :mod:`.port`, :mod:`.ws`: checkpoint import/export and Scaled Weight Standardisation.
"""
