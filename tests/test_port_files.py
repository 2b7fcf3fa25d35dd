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


def test_formats_and_models_are_named(tmp_path: Path) -> None:
    assert [framework_of(p) for p in ("m.pth", "m.keras", "m-symbol.json", "m.safetensors")] == [
        "torch", "keras", "mxnet", "neutral",
    ]  # fmt: skip
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        framework_of("m.onnx")
    _saved_lenet(tmp_path / "a.pt")
    named = r"model must be one of \['lenet_bn', 'efficientnet_b0', .*'resnet50'\] or package"
    with pytest.raises(CheckpointError, match=named):
        port_file(tmp_path / "a.pt", tmp_path / "b.safetensors", model="resnet")
    with pytest.raises(CheckpointError, match=r"a file of another model\?\): missing \["):
        port_file(tmp_path / "a.pt", tmp_path / "b.safetensors", model="resnet18")


def test_a_missing_folder_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    _saved_lenet(tmp_path / "a.pt")
    missing = tmp_path / "no-such-folder" / "a.safetensors"
    with pytest.raises(CheckpointError, match=r"the folder .*no-such-folder does not exist"):
        port_file(tmp_path / "a.pt", missing)
    with pytest.raises(CheckpointError, match=r"no-such\.pt: no such file"):
        port_file(tmp_path / "no-such.pt", tmp_path / "b.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


@pytest.mark.parametrize("ending", [".safetensors", ".pt"])
def test_written_files_get_the_umask_mode_or_keep_their_own(tmp_path: Path, ending: str) -> None:
    import os

    _saved_lenet(tmp_path / "a.pt")
    src = tmp_path / "a.pt" if ending == ".safetensors" else tmp_path / "a.safetensors"
    if ending == ".pt":
        port_file(tmp_path / "a.pt", src)
    old = os.umask(0o027)
    try:
        port_file(src, tmp_path / f"new{ending}")
        assert (tmp_path / f"new{ending}").stat().st_mode & 0o777 == 0o640
        kept = tmp_path / f"kept{ending}"
        kept.write_bytes(b"")
        kept.chmod(0o604)
        port_file(src, kept)
        assert kept.stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(old)


def test_a_users_own_model_ports_by_its_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model package.module:factory``: factory(framework) builds the user's model
    (here with its input shape, so the neutral file carries a probe)."""
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "def tiny(framework):\n"
        "    assert framework == 'torch'\n"
        "    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)), (3,)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    net(torch.randn(8, 3))
    torch.save(net.state_dict(), tmp_path / "tiny.pt")
    ckpt = port_file(tmp_path / "tiny.pt", tmp_path / "tiny.safetensors", model="mynets:tiny")
    assert "probe/output" in ckpt.tensors and [la.kind for la in ckpt.layers] == [
        "dense",
        "batchnorm",
    ]
    port_file(tmp_path / "tiny.safetensors", tmp_path / "back.pt", model="mynets:tiny")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for key, value in net.state_dict().items():
        assert torch.equal(back[key], value), key
    with pytest.raises(CheckpointError, match="model 'mynets:nothing': cannot import it"):
        port_file(tmp_path / "tiny.pt", tmp_path / "x.safetensors", model="mynets:nothing")


def test_a_weights_only_file_that_would_drop_settings_is_refused(tmp_path: Path) -> None:
    """A LeNet whose BatchNorms follow Keras's conventions (eps 1e-3, a slower average,
    a biased feed) written as a .pt, which holds tensors only: read back into LeNet-BN
    those settings would be the canonical ones, so the port names each and writes
    nothing, unless told to accept the loss."""
    from unorm import port
    from unorm._torch.port import export_checkpoint

    torch.manual_seed(0)
    net = lenet_bn("keras")
    net(torch.randn(8, 1, 28, 28))
    port.save(export_checkpoint(net.eval(), torch.zeros(1, 1, 28, 28)), tmp_path / "k.safetensors")
    with pytest.raises(
        CheckpointError, match=r"cannot hold every setting.*'1': eps 0\.001 -> 1e-05"
    ):
        port_file(tmp_path / "k.safetensors", tmp_path / "k.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]
    port_file(tmp_path / "k.safetensors", tmp_path / "k.pt", accept_loss=True)
    assert (tmp_path / "k.pt").exists()
    port_file(tmp_path / "k.safetensors", tmp_path / "again.safetensors")  # lossless
