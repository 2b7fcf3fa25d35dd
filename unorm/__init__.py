"""unorm: one specification of BatchNorm and Adaptive Gradient Clipping, everywhere.

``import unorm`` imports no framework. The framework modules are imported explicitly:
``from unorm.torch import BatchNorm``, ``from unorm.keras import BatchNorm``,
``from unorm.mxnet import BatchNorm``. The specification is ``SPEC.md``; its parameter
types live in :mod:`unorm.spec` and its NumPy reference in :mod:`unorm.reference`.

Example:
    >>> import unorm
    >>> unorm.BatchNormSpec().eps
    1e-05
"""

from __future__ import annotations

from .spec import PRESETS, AGCSpec, BatchNormSpec

__version__ = "0.1.0"

__all__ = ["PRESETS", "AGCSpec", "BatchNormSpec", "__version__"]
