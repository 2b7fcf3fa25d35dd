"""The private PyTorch classes unorm relies on, in one place.

PyTorch has no public base class for "any convolution" or "any native BatchNorm";
``tests/test_torch_internals.py`` fails with a clear message if a release moves these.
Code elsewhere in :mod:`unorm._torch` uses these names, never the private modules.
"""

from __future__ import annotations

from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

__all__ = ["ConvBase", "ConvTransposeBase", "NativeBatchNorm"]

#: Every convolution, transposed ones included (Conv1d/2d/3d, their Lazy forms and
#: subclasses that other libraries derive from the private base directly).
ConvBase = _ConvNd
#: Every transposed convolution (a ``ConvBase`` too: test it first).
ConvTransposeBase = _ConvTransposeNd
#: ``nn.BatchNorm1d/2d/3d``, their Lazy forms and ``nn.SyncBatchNorm``.
NativeBatchNorm = _BatchNorm
