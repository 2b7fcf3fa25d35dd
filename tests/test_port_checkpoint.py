"""The framework-neutral checkpoint file: round trip, atomic writes, clear errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from unorm import port
from unorm.port import Checkpoint, CheckpointError, Layer


def _ckpt() -> Checkpoint:
    rng = np.random.default_rng(0)
    return Checkpoint(
        layers=[
            Layer("conv1", "conv", {"weight": "conv1.weight", "bias": "conv1.bias"}, {"groups": 1}),
            Layer(
                "bn1",
                "batchnorm",
                {
                    r: f"bn1.{r}"
                    for r in ("gamma", "beta", "running_mean", "running_var", "num_batches_tracked")
                },
                {"spec": {"eps": 1e-5, "momentum": 0.1}},
            ),
            Layer("fc", "dense", {"weight": "fc.weight"}, {"flatten_from": [6, 2, 2]}),
        ],
        tensors={
            "conv1.weight": rng.normal(size=(6, 1, 5, 5)).astype(np.float32),
            "conv1.bias": rng.normal(size=6).astype(np.float32),
            "bn1.gamma": np.ones(6, np.float32),
            "bn1.beta": np.zeros(6, np.float32),
            "bn1.running_mean": rng.normal(size=6).astype(np.float32),
            "bn1.running_var": rng.uniform(1, 2, 6).astype(np.float64),
            "bn1.num_batches_tracked": np.array(7, np.int64),
            "fc.weight": rng.normal(size=(10, 24)).astype(np.float32),
        },
        source="torch",
        extra={"model": "test"},
    )


def test_round_trip_keeps_every_tensor_and_layer(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    original = _ckpt()
    port.save(original, path)
    back = port.load(path)
    assert back.source == "torch" and back.extra == {"model": "test"}
    assert [la.name for la in back.layers] == ["conv1", "bn1", "fc"]
    assert back.layers[2].attrs == {"flatten_from": [6, 2, 2]}
    for name, value in original.tensors.items():
        assert back.tensors[name].dtype == value.dtype, name
        assert back.tensors[name].shape == value.shape, name
        np.testing.assert_array_equal(back.tensors[name], value)


def test_file_is_plain_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    port.save(_ckpt(), path)
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    assert size % 8 == 0
    assert header["fc.weight"] == {
        "dtype": "F32",
        "shape": [10, 24],
        "data_offsets": header["fc.weight"]["data_offsets"],
    }
    assert header["__metadata__"]["format"] == "unorm"
    assert all(isinstance(v, str) for v in header["__metadata__"].values())  # safetensors rule


def test_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    port.save(_ckpt(), path)
    before = path.read_bytes()

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(port.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        port.save(_ckpt(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp left


def test_unstorable_dtype_is_refused_before_writing(tmp_path: Path) -> None:
    ckpt = Checkpoint([], {"x": np.array(["a"])}, source="numpy")
    with pytest.raises(CheckpointError, match="dtype <U1 cannot be stored"):
        port.save(ckpt, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:5], "truncated"),
        (lambda raw: raw[: len(raw) - 10], "truncated or corrupted tensor"),
        (lambda raw: raw + b"junk", "trailing bytes"),
        (
            lambda raw: b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!" + raw[24:],
            "corrupted header",
        ),
        (lambda raw: bytes(range(256)) * 4, "truncated or corrupted"),
    ],
)
def test_damaged_files_raise_clear_errors(tmp_path: Path, damage: object, message: str) -> None:
    path = tmp_path / "m.safetensors"
    port.save(_ckpt(), path)
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=message):
        port.load(path)


def test_foreign_or_future_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    with pytest.raises(CheckpointError, match="not a unorm checkpoint"):
        port.load(path)
    port.save(_ckpt(), path)
    raw = path.read_bytes().replace(b'"format_version":"1"', b'"format_version":"9"')
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match="format version '9'"):
        port.load(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        port.load(tmp_path / "missing.safetensors")


def test_layers_must_name_existing_tensors() -> None:
    with pytest.raises(CheckpointError, match=r"'fc' \(dense\) is missing tensor 'fc\.bias'"):
        Checkpoint([Layer("fc", "dense", {"bias": "fc.bias"})], {}, source="x")
    with pytest.raises(CheckpointError, match="kind must be one of"):
        Layer("pool", "maxpool", {})
