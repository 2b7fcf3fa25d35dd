"""unorm.torch in real use: convert(), torch.compile, ONNX export."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from unorm.torch import BatchNorm, SyncBatchNorm, convert  # noqa: E402


def _native_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, affine=False, momentum=None),
    )  # fmt: skip


def test_convert_preserves_state_and_behaviour() -> None:
    native = _native_net()
    for _ in range(2):
        native(torch.randn(6, 3, 8, 8))
    native[1].weight.requires_grad_(False)
    ours = convert(_native_net())
    ours.load_state_dict(native.state_dict())
    ours[1].weight.requires_grad_(False)
    assert isinstance(ours[1], BatchNorm) and ours[1].num_dims == 4
    assert isinstance(ours[5], BatchNorm) and ours[5].weight is None and ours[5].momentum is None
    assert not ours[1].weight.requires_grad
    x = torch.randn(6, 3, 8, 8)
    assert torch.equal(native(x), ours(x))  # training step, preset "torch": identical
    for name, value in native.state_dict().items():
        assert torch.equal(value, ours.state_dict()[name]), name
    native.eval(), ours.eval()
    assert torch.equal(native(x), ours(x))


def test_convert_copies_a_trained_native_layer_directly() -> None:
    native = nn.BatchNorm2d(3, eps=1e-3, momentum=0.2)
    native(torch.randn(4, 3, 2, 2) * 5)
    native.eval()
    ours = convert(native, preset=None)
    assert isinstance(ours, BatchNorm) and not ours.training
    assert (ours.eps, ours.momentum, ours.spec.skip_nonfinite) == (1e-3, 0.2, True)
    assert torch.equal(ours.running_var, native.running_var)
    sync = convert(nn.SyncBatchNorm(3))
    assert isinstance(sync, SyncBatchNorm)


def test_torch_compile_trains_like_eager() -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(2, 4, 3), BatchNorm(4, num_dims=4), nn.ReLU())
    compiled_model = nn.Sequential(nn.Conv2d(2, 4, 3), BatchNorm(4, num_dims=4), nn.ReLU())
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model)
    for step in range(3):
        x = torch.randn(4, 2, 6, 6) + step
        y_e, y_c = eager(x), compiled(x)
        y_e.sum().backward()
        y_c.sum().backward()
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_model[1].running_var, eager[1].running_var)
    assert int(compiled_model[1].num_batches_tracked) == 3
    torch.testing.assert_close(
        compiled_model[0].weight.grad, eager[0].weight.grad, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_of_eval_model_is_a_standard_batchnorm_node(dynamo: bool) -> None:
    onnx = pytest.importorskip("onnx")
    # No Conv before it: the exporter would fold an eval-mode BN into the Conv's weights.
    model = nn.Sequential(nn.ReLU(), BatchNorm(4, num_dims=4))
    model(torch.randn(2, 4, 5, 5))
    model.eval()
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 4, 5, 5),), buffer, dynamo=dynamo)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    kinds = [node.op_type for node in graph.node]
    assert "BatchNormalization" in kinds, kinds
    node = next(n for n in graph.node if n.op_type == "BatchNormalization")
    eps = next(a.f for a in node.attribute if a.name == "epsilon")
    assert np.isclose(eps, 1e-5)
