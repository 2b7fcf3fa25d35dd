"""The zoo's Keras sources: ``keras.applications`` models with ``weights=None`` (random
weights, nothing downloaded), Keras's own ``BatchNormalization`` and raw logits
(``classifier_activation=None``).

Each builder takes ``num_labels`` and ``image_size`` (:func:`unorm.models.zoo.build`) and
returns a functional model on ``(image_size, image_size, 3)`` channels-last images.

Example:
    >>> net = keras_resnet50(num_labels=10, image_size=64)
    >>> net.output_shape
    (None, 10)
"""

from __future__ import annotations

from typing import Any

__all__ = ["keras_mobilenet_v2", "keras_resnet50"]


def keras_resnet50(num_labels: int, image_size: int) -> Any:
    """``keras.applications.ResNet50`` (v1: stride in the first 1x1 convolution of a
    block, biased convolutions, BatchNorm eps 1.001e-5)."""
    import keras

    return keras.applications.ResNet50(
        weights=None,
        input_shape=(image_size, image_size, 3),
        classes=num_labels,
        classifier_activation=None,
    )


def keras_mobilenet_v2(num_labels: int, image_size: int) -> Any:
    """``keras.applications.MobileNetV2`` (alpha 1.0, BatchNorm eps 1e-3, momentum
    0.999, ReLU6)."""
    import keras

    return keras.applications.MobileNetV2(
        weights=None,
        input_shape=(image_size, image_size, 3),
        classes=num_labels,
        classifier_activation=None,
    )
