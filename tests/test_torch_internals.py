"""The private PyTorch classes unorm relies on (unorm._torch.internals) still cover the
layers unorm takes them to cover: a moved class fails here, by name."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from unorm._torch import internals  # noqa: E402


def test_convolution_bases() -> None:
    for conv in (nn.Conv1d(2, 3, 1), nn.Conv2d(2, 3, 1), nn.Conv3d(2, 3, 1)):
        assert isinstance(conv, internals.ConvBase), f"{type(conv).__name__} left _ConvNd"
        assert not isinstance(conv, internals.ConvTransposeBase)
    for up in (nn.ConvTranspose1d(2, 3, 1), nn.ConvTranspose2d(2, 3, 1)):
        assert isinstance(up, internals.ConvTransposeBase), "_ConvTransposeNd moved"
        assert isinstance(up, internals.ConvBase)


def test_native_batchnorm_base() -> None:
    for bn in (nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2), nn.SyncBatchNorm(2)):
        assert isinstance(bn, internals.NativeBatchNorm), f"{type(bn).__name__} left _BatchNorm"
    assert not isinstance(nn.LayerNorm(2), internals.NativeBatchNorm)
