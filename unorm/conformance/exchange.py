"""Files for cross-replica cases that run in helper processes (one process per replica
for ``torch.distributed``, a fresh interpreter for ``tf.distribute``).

An adapter writes a *request* (layer config, parameters, the replicas' slices), runs its
helper script with the same interpreter, and reads the *result* back; both are ``.npz``
files with no pickled objects, so any NumPy can read them.

Example:
    >>> import tempfile, numpy as np
    >>> from unorm.conformance.adapter import LayerConfig
    >>> folder = Path(tempfile.mkdtemp())
    >>> path = write_request(folder, LayerConfig(2, 2, 1, "float32"), np.ones(2), np.zeros(2),
    ...                      [np.ones((3, 2))], [np.ones((3, 2))])
    >>> read_request(path).config.num_features
    2
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .adapter import LayerConfig, SyncResult
from .expected import StepValues

__all__ = [
    "SyncRequest",
    "read_request",
    "read_result",
    "run_helper",
    "write_request",
    "write_result",
]


@dataclasses.dataclass
class SyncRequest:
    """What a helper process needs: the layer, its parameters, each replica's slices, and
    the strategy the replicas run under (:data:`conformance.cases.SYNC_STRATEGIES`)."""

    config: LayerConfig
    gamma: np.ndarray
    beta: np.ndarray
    xs: list[np.ndarray]
    dys: list[np.ndarray]
    native: bool = False
    strategy: str = "replicas"


def write_request(
    folder: Path,
    config: LayerConfig,
    gamma: np.ndarray,
    beta: np.ndarray,
    xs: Sequence[np.ndarray],
    dys: Sequence[np.ndarray],
    native: bool = False,
    strategy: str = "replicas",
) -> Path:
    """Write a request into ``folder``; returns its path."""
    meta = dataclasses.asdict(config)
    meta["settings"] = [list(kv) for kv in config.settings]
    meta.update(replicas=len(xs), native=native, strategy=strategy)
    arrays = {"meta": np.array(json.dumps(meta)), "gamma": gamma, "beta": beta}
    for k, (x, dy) in enumerate(zip(xs, dys, strict=True)):
        arrays[f"x{k}"], arrays[f"dy{k}"] = x, dy
    path = folder / "request.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds
    return path


def read_request(path: Path) -> SyncRequest:
    """Read a request written by :func:`write_request`."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        k = meta.pop("replicas")
        native = meta.pop("native")
        strategy = meta.pop("strategy", "replicas")
        meta["settings"] = tuple(tuple(kv) for kv in meta["settings"])
        return SyncRequest(
            LayerConfig(**meta),
            data["gamma"],
            data["beta"],
            [data[f"x{i}"] for i in range(k)],
            [data[f"dy{i}"] for i in range(k)],
            native,
            strategy,
        )


def write_result(path: Path, result: SyncResult) -> None:
    """Write a helper's result (absent quantities are left out)."""
    arrays: dict[str, np.ndarray] = {}
    for k, (y, dx) in enumerate(zip(result.ys, result.dxs, strict=True)):
        arrays[f"y{k}"], arrays[f"dx{k}"] = y, dx
    for key, value in result.state.quantities().items():
        if value is not None:
            arrays[key] = np.asarray(value)
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds


def read_result(path: Path, replicas: int) -> SyncResult:
    """Read a result written by :func:`write_result`."""
    with np.load(path, allow_pickle=False) as data:
        state = StepValues()
        for key in state.quantities():
            if key in data.files:
                setattr(state, key, data[key])
        if state.num_batches_tracked is not None:
            state.num_batches_tracked = int(state.num_batches_tracked)
        return SyncResult(
            [data[f"y{k}"] for k in range(replicas)],
            [data[f"dx{k}"] for k in range(replicas)],
            state,
        )


def run_helper(module: str, request: Path, timeout: float = 300.0) -> SyncResult:
    """Run ``python -m module REQUEST RESULT`` with this interpreter; raise with its last
    stderr line when it fails."""
    out = request.with_name("result.npz")
    done = subprocess.run(
        [sys.executable, "-m", module, str(request), str(out)],
        cwd=request.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(_last_error(done.stderr) or f"{module} exited with {done.returncode}")
    return read_result(out, len(read_request(request).xs))


def _last_error(stderr: str) -> str:
    """The last ``SomeError: ...`` line of a traceback and the line after it (frameworks
    often put the real message there), without terminal colour codes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in stderr.splitlines()]
    lines = [ln for ln in lines if ln]
    found = [i for i, ln in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln)]
    if not found:
        return lines[-1] if lines else ""
    i = found[-1]
    return " ".join(lines[i : i + 2])[:300]
