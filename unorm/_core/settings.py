"""Read-only views of a layer's :class:`~unorm.spec.BatchNormSpec`, shared by every
backend's BatchNorm so that a setting has one source (the spec) and one name everywhere.

A backend's layer mixes :class:`BatchNormSettings` in and sets ``self.spec``; the
framework's own attribute names that differ (PyTorch's ``affine``) stay in the backend.

Example:
    >>> from unorm.spec import BatchNormSpec
    >>> class Layer(BatchNormSettings):
    ...     spec = BatchNormSpec(eps=1e-3)
    >>> Layer().eps, Layer().momentum, Layer().center
    (0.001, 0.1, True)
"""

from __future__ import annotations

from ..spec import BatchNormSpec

__all__ = ["BatchNormSettings"]


class BatchNormSettings:
    """``eps``, ``momentum``, ``axis``, ``center``, ``scale`` and ``track_running_stats``
    read from ``self.spec`` (no setters: a layer's settings change through a new spec)."""

    spec: BatchNormSpec

    @property
    def eps(self) -> float:
        """Added to the variance inside the square root."""
        return self.spec.eps

    @property
    def momentum(self) -> float | None:
        """Weight of the new batch statistic; None for the cumulative average."""
        return self.spec.momentum

    @property
    def axis(self) -> int:
        """The feature axis, as given."""
        return self.spec.axis

    @property
    def center(self) -> bool:
        """Whether the layer learns ``beta``."""
        return self.spec.center

    @property
    def scale(self) -> bool:
        """Whether the layer learns ``gamma``."""
        return self.spec.scale

    @property
    def track_running_stats(self) -> bool:
        """Whether running statistics are kept and used in inference."""
        return self.spec.track_running_stats
