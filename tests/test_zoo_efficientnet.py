"""The zoo's ``efficientnet_b0``: ``efficientnet_pytorch``'s EfficientNet-B0 (the source,
PyTorch) ported to its Keras counterpart through a file, and the counterpart's state
ported into the source.

Ground truth is the source's model (other people's code): its logits and its
``nn.BatchNorm2d`` running statistics (momentum 0.01 and eps 1e-3, TensorFlow's 0.99
turned into PyTorch's convention), before and after one more training step
(:mod:`torch_zoo_checks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.keras, pytest.mark.torch]
pytest.importorskip("keras")
pytest.importorskip("tensorflow")
pytest.importorskip("torch")
pytest.importorskip("efficientnet_pytorch")

import torch_zoo_checks as check  # noqa: E402

NAME = "efficientnet_b0"
NORMS = 49  # the stem's 1, 16 blocks x 3 less the first block's expansion, the head's 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The source calibrated and trained 2 steps, and its checkpoint file (one per module:
    building and exporting it is most of these tests' time)."""
    path = tmp_path_factory.mktemp(NAME) / "source.safetensors"
    src, x, y = check.trained_source(NAME, path)
    return src, x, y, path


def test_source_to_keras_through_a_file(trained: Any) -> None:
    src, x, y, path = trained
    check.torch_to_keras(NAME, src, x, y, path, NORMS)


def test_keras_to_source_through_a_file(tmp_path: Path) -> None:
    check.keras_to_torch(NAME, NORMS, tmp_path)


def test_fresh_counterpart_has_the_source_batchnorm_settings(trained: Any) -> None:
    check.fresh_settings(NAME, trained[3], NORMS)


def test_symmetric_padding_is_refused_by_the_probe(
    trained: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def symmetric(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
        return (kernel // 2, kernel // 2)  # Conv2dStaticSamePadding: (0, 1) for 3, 2 on 64

    check.wrong_padding_refused(NAME, trained[3], monkeypatch, ("static_same_padding", symmetric))
