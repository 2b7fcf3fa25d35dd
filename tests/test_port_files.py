"""``unorm port`` on files: PyTorch state_dict <-> neutral checkpoint, refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from unorm.port import CheckpointError
from unorm.port_files import framework_of, port_file

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from unorm.models.torch import lenet_bn  # noqa: E402


def _saved_lenet(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    net = lenet_bn()
    net(torch.randn(8, 1, 28, 28))
    torch.save(net.state_dict(), path)
    return net.eval()


def test_state_dict_round_trip_through_the_neutral_file(tmp_path: Path) -> None:
    net = _saved_lenet(tmp_path / "a.pt")
    ckpt = port_file(tmp_path / "a.pt", tmp_path / "a.safetensors")
    assert ckpt.source == "torch" and len(ckpt.layers) == 9
    port_file(tmp_path / "a.safetensors", tmp_path / "b.pt")
    back = lenet_bn()
    back.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(net(x), back.eval()(x))


def test_cli_reports_and_refuses_clearly(tmp_path: Path) -> None:
    _saved_lenet(tmp_path / "a.pt")
    unorm = [sys.executable, "-m", "unorm", "port"]
    ok = subprocess.run(
        [*unorm, str(tmp_path / "a.pt"), str(tmp_path / "a.safetensors")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert ok.returncode == 0 and "9 layers from torch" in ok.stdout
    (tmp_path / "bad.pt").write_bytes(b"garbage" * 100)
    bad = subprocess.run(
        [*unorm, str(tmp_path / "bad.pt"), str(tmp_path / "x.safetensors")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 1 and "not a readable PyTorch state_dict" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_mismatched_state_dict_changes_nothing(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    torch.save({"0.weight": torch.zeros(2, 4), "0.bias": torch.zeros(2)}, tmp_path / "w.pt")
    before = [p.detach().clone() for p in net.parameters()]
    from unorm._torch.port import read_native

    with pytest.raises(
        CheckpointError, match=r"'0.weight' has shape \(2, 4\), the model's \(2, 3\)"
    ):
        read_native(net, tmp_path / "w.pt")
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))


def test_formats_and_models_are_named() -> None:
    assert [framework_of(p) for p in ("m.pth", "m.keras", "m-symbol.json", "m.safetensors")] == [
        "torch", "keras", "mxnet", "neutral",
    ]  # fmt: skip
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        framework_of("m.onnx")
    with pytest.raises(CheckpointError, match=r"model must be one of \['lenet_bn'\], got 'resnet'"):
        port_file("a.pt", "b.safetensors", model="resnet")
