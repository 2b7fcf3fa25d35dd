"""Keras 3 implementation of unorm (private; the public module is ``unorm.keras``)."""
