"""The zoo's PyTorch sources: architectures as ``transformers`` and ``efficientnet_pytorch``
build them, with random weights (nothing is downloaded) and their own ``nn.BatchNorm2d``.

Each builder takes ``num_labels`` and ``image_size`` (:func:`unorm.models.zoo.build`).

Example:
    >>> import torch
    >>> net = resnet18(num_labels=10, image_size=64)
    >>> net(torch.zeros(1, 3, 64, 64)).logits.shape
    torch.Size([1, 10])
"""

from __future__ import annotations

from typing import Any

__all__ = ["efficientnet_b0", "mobilenet_v2", "resnet18", "resnet50"]


def resnet18(num_labels: int, image_size: int) -> Any:
    """``transformers``' ResNet-18: basic blocks, depths [2, 2, 2, 2]."""
    from transformers import ResNetConfig, ResNetForImageClassification

    del image_size  # the network takes any size
    config = ResNetConfig(
        layer_type="basic",
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        num_labels=num_labels,
    )
    return ResNetForImageClassification(config)


def resnet50(num_labels: int, image_size: int) -> Any:
    """``transformers``' ResNet-50: ``ResNetConfig()``'s bottleneck blocks, depths
    [3, 4, 6, 3]."""
    from transformers import ResNetConfig, ResNetForImageClassification

    del image_size
    return ResNetForImageClassification(ResNetConfig(num_labels=num_labels))


def mobilenet_v2(num_labels: int, image_size: int) -> Any:
    """``transformers``' MobileNetV2 (``MobileNetV2Config()``: depth multiplier 1.0,
    TensorFlow "same" padding, ReLU6, classifier dropout 0.2)."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(num_labels=num_labels, image_size=image_size)
    return MobileNetV2ForImageClassification(config)


def efficientnet_b0(num_labels: int, image_size: int) -> Any:
    """``efficientnet_pytorch``'s EfficientNet-B0 for ``image_size`` images (its "same"
    padding is fixed for that size when the network is built), with stochastic depth
    off (``drop_connect_rate=0``) so a training step is deterministic and comparable
    across frameworks; its head dropout (0.2) stays."""
    from efficientnet_pytorch import EfficientNet

    return EfficientNet.from_name(
        "efficientnet-b0",
        num_classes=num_labels,
        image_size=image_size,
        drop_connect_rate=0.0,
    )
