"""The Flax NNX backend's private package (public names in :mod:`unorm.flax`)."""
