"""The framework-neutral checkpoint: one file any backend can write and any can read.

A checkpoint is a safetensors file (https://github.com/huggingface/safetensors, format
only; written and read here with NumPy, so no extra dependency): tensors in one canonical
layout plus JSON metadata that describes the model layer by layer.

Canonical layout (PyTorch's, channels-first):

- ``conv`` weight ``(O, I/groups, *kernel)``; ``conv_transpose`` weight
  ``(I, O/groups, *kernel)``; ``dense`` weight ``(out, in)``; biases ``(out,)``.
- ``batchnorm``: ``gamma``, ``beta``, ``running_mean``, ``running_var`` ``(C,)`` and
  ``num_batches_tracked`` (int64 scalar), with the layer's :class:`~unorm.spec.BatchNormSpec`
  (in unorm's convention) in the metadata, so a ported layer keeps its semantics.
- A ``dense`` layer that follows a ``flatten`` of a ``(C, H, W)`` feature map records
  ``flatten_from = [C, H, W]``: its input features are in channels-first order, so a
  channels-last framework must permute the weight's columns.

Writes are atomic (a temporary file in the same folder, flushed, then renamed over the
target); reading a truncated, corrupted or mismatched file raises :class:`CheckpointError`
and returns nothing half-read.

Example:
    >>> import numpy as np, tempfile, os
    >>> ckpt = Checkpoint(
    ...     layers=[Layer("fc", "dense", {"weight": "fc.weight"})],
    ...     tensors={"fc.weight": np.ones((2, 3), np.float32)},
    ...     source="numpy")
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> save(ckpt, path)
    >>> load(path).tensors["fc.weight"].shape
    (2, 3)
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .spec import ScaledWSSpec

__all__ = [
    "FORMAT_VERSION",
    "LAYER_KINDS",
    "Checkpoint",
    "CheckpointError",
    "Layer",
    "describe",
    "load",
    "match_layers",
    "role_array",
    "save",
    "temporary_beside",
    "ws_settings",
]

#: Version of the metadata schema written by :func:`save`.
FORMAT_VERSION = 1
#: Layer kinds a checkpoint can describe. Layers without parameters (activations,
#: pooling, dropout) are not stored; ``flatten`` is recorded on the dense layer after it.
LAYER_KINDS = ("conv", "conv_transpose", "dense", "batchnorm")

_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not fit the model it is loaded into."""


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer with parameters, in model order.

    Attributes:
        name: the layer's name in its source model (for messages).
        kind: one of :data:`LAYER_KINDS`.
        tensors: role (``weight``, ``bias``, ``gamma``, ...) -> tensor name in the file.
        attrs: JSON-serialisable attributes (``groups``, ``flatten_from``, ``spec``...).
    """

    name: str
    kind: str
    tensors: Mapping[str, str]
    attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise CheckpointError(
                f"layer {self.name!r}: kind must be one of {LAYER_KINDS}, got {self.kind!r}"
            )


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A model's state in the canonical layout: ordered layers and their tensors.

    Attributes:
        layers: the layers with parameters, in model order.
        tensors: tensor name -> array (canonical layout).
        source: the framework the state came from (``torch``, ``keras``, ``mxnet``...).
        extra: further JSON-serialisable metadata.
    """

    layers: list[Layer]
    tensors: Mapping[str, np.ndarray]
    source: str
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for layer in self.layers:
            for role, name in layer.tensors.items():
                if name not in self.tensors:
                    raise CheckpointError(
                        f"layer {layer.name!r} ({layer.kind}) is missing tensor {name!r} ({role})"
                    )

    def tensor(self, layer: Layer, role: str) -> np.ndarray:
        """The array of ``layer``'s ``role`` (e.g. ``weight``)."""
        if role not in layer.tensors:
            raise CheckpointError(f"layer {layer.name!r} ({layer.kind}) has no {role!r}")
        return np.asarray(self.tensors[layer.tensors[role]])


def _metadata(ckpt: Checkpoint) -> dict[str, str]:
    from . import __version__

    layers = [
        {"name": la.name, "kind": la.kind, "tensors": dict(la.tensors), "attrs": dict(la.attrs)}
        for la in ckpt.layers
    ]
    return {
        "format": "unorm",
        "format_version": str(FORMAT_VERSION),
        "unorm_version": __version__,
        "source": ckpt.source,
        "layout": "channels_first",
        "layers": json.dumps(layers),
        "extra": json.dumps(dict(ckpt.extra)),
    }


def _umask() -> int:
    current = os.umask(0)  # the only way to read it is to set it
    os.umask(current)
    return current


def temporary_beside(target: Path, suffix: str = ".tmp") -> str:
    """A new, empty temporary file in ``target``'s folder, with the mode ``target`` will
    end with: an existing file's own mode, else what the umask gives a new file (``0o666``
    less the umask), not ``mkstemp``'s 0o600. A missing folder is a
    :class:`CheckpointError` naming it.

    Example:
        >>> temporary_beside(Path("/no/such/folder/m.safetensors"))
        Traceback (most recent call last):
        unorm.port.CheckpointError: /no/such/folder/m.safetensors: the folder /no/such/folder
        does not exist
    """
    folder = target.parent
    if not folder.is_dir():
        raise CheckpointError(f"{target}: the folder {folder} does not exist")
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=folder)
    os.close(fd)
    os.chmod(tmp, mode)
    return tmp


def save(ckpt: Checkpoint, path: str | os.PathLike[str]) -> None:
    """Write ``ckpt`` to ``path`` atomically (safetensors with unorm metadata).

    The file is written to a temporary name in the same folder, flushed to disk and then
    renamed over ``path``: a crash leaves either the old file or the new one, never half.
    The file gets the mode an existing ``path`` had, else the one the umask gives; a
    missing folder is a :class:`CheckpointError` and writes nothing.
    """
    target = Path(path)
    header: dict[str, Any] = {"__metadata__": _metadata(ckpt)}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(ckpt.tensors):
        array = np.array(ckpt.tensors[name], order="C")  # ascontiguousarray makes 0-d 1-d
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        code = _CODES.get(np.dtype(dtype))
        if code is None:
            raise CheckpointError(f"tensor {name!r}: dtype {array.dtype} cannot be stored")
        data = array.astype(_DTYPES[code], copy=False).tobytes()
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # align the data as safetensors does
    tmp = temporary_beside(target)
    try:
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            for blob in blobs:
                out.write(blob)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse_header(raw: bytes, path: Path) -> tuple[dict[str, Any], int]:
    if len(raw) < 8:
        raise CheckpointError(f"{path}: truncated: {len(raw)} bytes, no safetensors header")
    (size,) = struct.unpack("<Q", raw[:8])
    if size > _MAX_HEADER or 8 + size > len(raw):
        raise CheckpointError(
            f"{path}: truncated or corrupted: header of {size} bytes in a {len(raw)}-byte file"
        )
    try:
        header = json.loads(raw[8 : 8 + size].decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupted header: {err}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted header: not a JSON object")
    return header, 8 + size


def _read_tensors(header: dict[str, Any], data: bytes, path: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    end_seen = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: corrupted entry for tensor {name!r}: {info!r}"
            ) from None
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= start <= end <= len(data) or end - start != expected:
            raise CheckpointError(
                f"{path}: truncated or corrupted tensor {name!r}: bytes {start}..{end} of "
                f"{len(data)}, {expected} expected for {dtype} {shape}"
            )
        tensors[name] = (
            np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=start)
            .reshape(shape)
            .copy()
        )
        end_seen = max(end_seen, end)
    if end_seen != len(data):
        raise CheckpointError(f"{path}: corrupted: {len(data) - end_seen} trailing bytes")
    return tensors


def load(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and validate a checkpoint written by :func:`save`.

    Raises :class:`CheckpointError` for a missing, truncated or corrupted file, a file
    that is not a unorm checkpoint, a newer format version, or metadata that names
    tensors the file does not hold.
    """
    source = Path(path)
    try:
        raw = source.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{source}: cannot read: {err.strerror}") from None
    header, data_start = _parse_header(raw, source)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != "unorm":
        raise CheckpointError(f"{source}: not a unorm checkpoint (no unorm metadata)")
    version = meta.get("format_version", "")
    if not str(version).isdigit() or int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: format version {version!r}; this unorm reads up to {FORMAT_VERSION}"
        )
    tensors = _read_tensors(header, raw[data_start:], source)
    try:
        described = json.loads(meta["layers"])
        layers = [Layer(d["name"], d["kind"], d["tensors"], d.get("attrs", {})) for d in described]
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: corrupted layer metadata: {err}") from None
    return Checkpoint(layers=layers, tensors=tensors, source=str(meta.get("source")), extra=extra)


# -- what every framework's loader shares ----------------------------------------------


def describe(layer: Layer, ckpt: Checkpoint) -> str:
    """``layer`` for messages: kind, name and weight shape, e.g. ``dense 'fc' (10, 84)``."""
    shape = tuple(ckpt.tensors[layer.tensors["weight"]].shape) if "weight" in layer.tensors else ()
    return f"{layer.kind} {layer.name!r}" + (f" {shape}" if shape else "")


def match_layers(ckpt: Checkpoint, model_kinds: list[str]) -> list[tuple[int, Layer]]:
    """Pair the checkpoint's layers with a model's layers of ``model_kinds``, by order.

    Raises :class:`CheckpointError` when the counts differ; kinds are compared by the
    caller, whose message names the model's layer too.
    """
    if len(model_kinds) != len(ckpt.layers):
        raise CheckpointError(
            f"the checkpoint has {len(ckpt.layers)} layers with parameters, the model "
            f"{len(model_kinds)}: {[la.kind for la in ckpt.layers]} vs {model_kinds}"
        )
    return list(enumerate(ckpt.layers))


def role_array(
    ckpt: Checkpoint, layer: Layer, role: str, model_has: bool, where: str
) -> np.ndarray | None:
    """The checkpoint's ``role`` array for a model layer that has (``model_has``) or lacks
    it; None when neither side has one, :class:`CheckpointError` when only one does."""
    present = role in layer.tensors
    if not model_has and not present:
        return None
    if not model_has or not present:
        side = "model" if not model_has else "checkpoint"
        raise CheckpointError(f"{where}: the {side} has no {role!r}")
    return ckpt.tensor(layer, role)


def ws_settings(layer: Layer, where: str) -> ScaledWSSpec | None:
    """The Scaled WS settings recorded for ``layer`` (validated), or None."""
    if "ws" not in layer.attrs:
        return None
    try:
        return ScaledWSSpec(**layer.attrs["ws"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: invalid Scaled WS settings: {err}") from None
