"""Export and check the zoo's ports from the command line, one framework per process (so
MXNet can run in its own environment), exchanging neutral checkpoints in one folder.

    python -m unorm.models.zoo FRAMEWORK export FOLDER [--models a,b] [--steps N]
    python -m unorm.models.zoo FRAMEWORK check FOLDER [--models a,b]

``export``: every zoo model ``FRAMEWORK`` has a builder for is built (seeded), its
BatchNorm statistics recalibrated on 16 images and then trained ``N`` SGD steps (default
2), so its running statistics are not trivial, and written as
``MODEL.FRAMEWORK.safetensors`` (with its probe) beside its eval logits on a fixed batch
(``MODEL.FRAMEWORK.logits.npy``) and its state after one further step on another fixed
batch (``MODEL.FRAMEWORK.stepped.safetensors``).

``check``: every checkpoint another framework exported there is loaded (verified on its
probe) into ``FRAMEWORK``'s fresh model, whose eval logits, running statistics and
running statistics after the same further step are compared with the source's; one JSON
line per port is printed (``model``, ``source``, ``target``, ``logits``: relative logit
error, ``statistics``: largest relative difference of the carried statistics,
``stepped``: of the statistics after the step, ``ok``), and the exit status is 1 if any
port fails (a refused load counts, with its message as ``error``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ... import port
from ..._core.registry import plugin
from . import IMAGE_SIZE, NUM_LABELS, ZOO, build
from .compare import relative_logit_error, statistics_error
from .data import batch

#: A port passes when its eval logits agree to this, relative to the logit scale.
LOGIT_TOLERANCE = 1e-4
#: ... and the statistics after one further training step to this (float32 arithmetic
#: over a deep network in two frameworks' kernels).
STEPPED_TOLERANCE = 1e-3
#: Seeds of the batches: recalibration, training, evaluation, the further step.
CALIBRATION_SEED, TRAIN_SEED, EVAL_SEED, STEP_SEED = 0, 1, 2, 3


def _framework(name: str) -> tuple[Any, Any]:
    """The framework's port module and zoo training helpers."""
    backend = importlib.import_module(plugin(name).port_module or "")
    steps = importlib.import_module(f"{__package__}.training_{name}")
    return backend, steps


def _seed(framework: str) -> None:
    plugin(framework).load("models").seed(0)


def _export(backend: Any, model: Any) -> port.Checkpoint:
    return backend.export_model(model, (3, IMAGE_SIZE, IMAGE_SIZE))


def export(framework: str, folder: Path, names: list[str], steps: int) -> None:
    """The ``export`` command."""
    backend, training = _framework(framework)
    for name in names:
        _seed(framework)
        model = build(name, framework)
        # Statistics of real inputs first: a momentum of 0.999 (Keras's) barely moves
        # them from 0 and 1 in a few steps, and a model whose statistics are trivial
        # hides a port's mistakes.
        training.recalibrate(model, batch(CALIBRATION_SEED, n=16, image_size=IMAGE_SIZE)[0])
        x, y = batch(TRAIN_SEED, image_size=IMAGE_SIZE, num_labels=NUM_LABELS)
        for _ in range(steps):
            training.train_step(model, x, y)
        port.save(_export(backend, model), folder / f"{name}.{framework}.safetensors")
        logits = training.evaluate(model, batch(EVAL_SEED, image_size=IMAGE_SIZE)[0])
        np.save(folder / f"{name}.{framework}.logits.npy", logits)
        training.train_step(model, *batch(STEP_SEED, image_size=IMAGE_SIZE))
        port.save(_export(backend, model), folder / f"{name}.{framework}.stepped.safetensors")


def _check_one(
    framework: str, backend: Any, training: Any, name: str, source: str, folder: Path
) -> dict[str, Any]:
    result: dict[str, Any] = {"model": name, "source": source, "target": framework}
    ckpt = port.load(folder / f"{name}.{source}.safetensors")
    _seed(framework)
    model = build(name, framework)
    try:
        backend.load_checkpoint(model, ckpt)
    except port.CheckpointError as err:
        return result | {"ok": False, "error": str(err)}
    reference = np.load(folder / f"{name}.{source}.logits.npy")
    result["logits"] = relative_logit_error(
        reference, training.evaluate(model, batch(EVAL_SEED, image_size=IMAGE_SIZE)[0])
    )
    result["statistics"] = statistics_error(ckpt, _export(backend, model))
    training.train_step(model, *batch(STEP_SEED, image_size=IMAGE_SIZE))
    stepped = port.load(folder / f"{name}.{source}.stepped.safetensors")
    result["stepped"] = statistics_error(stepped, _export(backend, model))
    result["ok"] = (
        result["logits"] <= LOGIT_TOLERANCE
        and result["statistics"] == 0.0
        and result["stepped"] <= STEPPED_TOLERANCE
    )
    return result


def check(framework: str, folder: Path, names: list[str]) -> bool:
    """The ``check`` command; True when every port passes."""
    backend, training = _framework(framework)
    ok = True
    for name in names:
        for source in ZOO[name].builders:
            if source == framework or not (folder / f"{name}.{source}.safetensors").exists():
                continue
            try:
                result = _check_one(framework, backend, training, name, source, folder)
            except Exception as err:  # one port that breaks fails, the others still run
                result = {"model": name, "source": source, "target": framework}
                result |= {"ok": False, "error": f"{type(err).__name__}: {err}"}
            ok &= bool(result["ok"])
            print(json.dumps(result), flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    """Run one command of the module docstring; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m unorm.models.zoo")
    parser.add_argument("framework")
    parser.add_argument("command", choices=("export", "check"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    wanted = args.models.split(",") if args.models else list(ZOO)
    unknown = sorted(set(wanted) - set(ZOO))
    if unknown:
        parser.error(f"--models: unknown {unknown}; the zoo has {sorted(ZOO)}")
    names = [n for n in wanted if args.framework in ZOO[n].builders]
    if not names:  # a framework without zoo models has nothing to export or check
        return 0
    args.folder.mkdir(parents=True, exist_ok=True)
    if args.command == "export":
        export(args.framework, args.folder, names, args.steps)
        return 0
    return 0 if check(args.framework, args.folder, names) else 1


if __name__ == "__main__":
    sys.exit(main())
