"""The port zoo: real architectures from other people's code, and their counterparts.

Each entry is one architecture as another project builds it (its *source*: ``transformers``,
``efficientnet_pytorch`` or ``keras.applications``, random weights, nothing downloaded) and
a counterpart in every other framework that ports, in ``unorm.models.zoo``, computing the
same function layer for layer, so that a model from either ecosystem has a home in the
others. ``import unorm.models.zoo`` imports no framework: every builder is named by
``"module:function"`` and imported when it is built, each module importing one framework.

Every builder is called as ``builder(num_labels=..., image_size=...)`` and returns a model
ready to run on ``(N, 3, image_size, image_size)`` images in its framework's own layout
(channels-last in Keras), its BatchNorm layers the framework's own in the source and
unorm's in the counterparts (so a load takes the source's BatchNorm settings whole, and a
further training step updates the statistics as the source would).

Example:
    >>> from unorm.models import zoo
    >>> zoo.ZOO["resnet18"].source
    'torch'
    >>> sorted(zoo.ZOO["resnet18"].builders)
    ['keras', 'mxnet', 'torch']
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

__all__ = ["IMAGE_SIZE", "NUM_LABELS", "ZOO", "ZooModel", "build"]

#: The image side every zoo model is built for and checked on: small enough for CI's two
#: cores, large enough that every stride-2 stage of these networks still has a map.
IMAGE_SIZE = 64
#: Logits of every zoo model's classifier.
NUM_LABELS = 10


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One architecture of the zoo.

    Attributes:
        name: the name ``unorm port --model`` and ``python -m unorm.models.zoo`` take.
        source: the framework whose model comes from other people's code.
        origin: what the source is, in that project's own terms.
        builders: framework -> ``"module:function"`` of the builder (the source's included).
    """

    name: str
    source: str
    origin: str
    builders: Mapping[str, str]

    def input_shape(self, image_size: int = IMAGE_SIZE) -> tuple[int, int, int]:
        """One sample's shape in the canonical channels-first layout."""
        return (3, image_size, image_size)


def _entry(name: str, source: str, origin: str, **builders: str) -> ZooModel:
    prefix = __name__
    return ZooModel(name, source, origin, {k: f"{prefix}.{v}" for k, v in builders.items()})


#: Every zoo model by name.
ZOO: Mapping[str, ZooModel] = {
    entry.name: entry
    for entry in (
        _entry(
            "resnet18",
            "torch",
            "transformers ResNetForImageClassification(ResNetConfig(layer_type='basic', "
            "depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]))",
            torch="sources_torch:resnet18",
            keras="hf_resnet_keras:resnet18",
            mxnet="hf_resnet_mxnet:resnet18",
        ),
        _entry(
            "resnet50",
            "torch",
            "transformers ResNetForImageClassification(ResNetConfig()) (bottleneck, "
            "depths=[3, 4, 6, 3])",
            torch="sources_torch:resnet50",
            keras="hf_resnet_keras:resnet50",
            mxnet="hf_resnet_mxnet:resnet50",
        ),
        _entry(
            "mobilenet_v2",
            "torch",
            "transformers MobileNetV2ForImageClassification(MobileNetV2Config())",
            torch="sources_torch:mobilenet_v2",
            keras="hf_mobilenet_v2_keras:mobilenet_v2",
            mxnet="hf_mobilenet_v2_mxnet:mobilenet_v2",
        ),
        _entry(
            "efficientnet_b0",
            "torch",
            "efficientnet_pytorch EfficientNet.from_name('efficientnet-b0')",
            torch="sources_torch:efficientnet_b0",
            keras="efficientnet_keras:efficientnet_b0",
            mxnet="efficientnet_mxnet:efficientnet_b0",
        ),
        _entry(
            "keras_resnet50",
            "keras",
            "keras.applications.ResNet50(weights=None)",
            keras="sources_keras:keras_resnet50",
            torch="keras_resnet50_torch:keras_resnet50",
            mxnet="keras_resnet50_mxnet:keras_resnet50",
        ),
        _entry(
            "keras_mobilenet_v2",
            "keras",
            "keras.applications.MobileNetV2(weights=None)",
            keras="sources_keras:keras_mobilenet_v2",
            torch="keras_mobilenet_v2_torch:keras_mobilenet_v2",
            mxnet="keras_mobilenet_v2_mxnet:keras_mobilenet_v2",
        ),
    )
}


def build(
    name: str, framework: str, num_labels: int = NUM_LABELS, image_size: int = IMAGE_SIZE
) -> Any:
    """Zoo model ``name`` in ``framework`` (imports that framework only).

    Raises ``ValueError`` naming the choices for an unknown model or framework.
    """
    if name not in ZOO:
        raise ValueError(f"model must be one of {sorted(ZOO)}, got {name!r}")
    entry = ZOO[name]
    if framework not in entry.builders:
        raise ValueError(
            f"{name}: framework must be one of {sorted(entry.builders)}, got {framework!r}"
        )
    module_name, attr = entry.builders[framework].split(":")
    return getattr(importlib.import_module(module_name), attr)(
        num_labels=num_labels, image_size=image_size
    )
