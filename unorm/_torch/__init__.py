"""PyTorch implementation of unorm (private; the public module is ``unorm.torch``)."""
