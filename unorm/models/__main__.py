"""Train, evaluate and hand over the seed networks from the command line, one framework per
process (so MXNet can run in its own environment), exchanging neutral checkpoints.

    python -m unorm.models FRAMEWORK init OUT.safetensors [--seed S]
    python -m unorm.models FRAMEWORK train INIT.safetensors|- OUT.safetensors LOSSES.json
        [--steps N] [--lr LR] [--no-agc]
    python -m unorm.models FRAMEWORK evaluate CKPT.safetensors LOGITS.npy

``train`` starts from ``INIT`` (``-``: a fresh seeded network), trains LeNet-BN on the
digits with :class:`~unorm.models.training.Recipe` and writes the trained state and the
loss of every step; ``evaluate`` writes the test set's eval-mode logits and prints the
accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from .. import port
from .._core.registry import plugin, plugins_in_order
from ..progress import ProgressBar
from .data import digits
from .training import Recipe, accuracy

#: The frameworks whose seed networks these jobs run: every plug-in that ports (the jobs
#: exchange neutral checkpoints), in the plug-ins' order.
FRAMEWORKS = tuple(p.name for p in plugins_in_order() if p.ports)


def _network(framework: str, source: str | None, seed: int) -> tuple[Any, Any, Any]:
    declared = plugin(framework)
    models, backend = declared.load("models"), declared.load("port")
    factory, _ = models.MODELS["lenet_bn"]
    models.seed(seed)
    net = factory()
    if source is not None:
        backend.load_checkpoint(net, port.load(source))
    return models, backend, net


def main(argv: list[str] | None = None) -> int:
    """Run one command of the module docstring; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m unorm.models")
    parser.add_argument("framework", choices=FRAMEWORKS)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init")
    init.add_argument("out")
    init.add_argument("--seed", type=int, default=0)
    train = sub.add_parser("train")
    train.add_argument("init")
    train.add_argument("out")
    train.add_argument("losses")
    train.add_argument("--steps", type=int, default=Recipe.steps)
    train.add_argument("--lr", type=float, default=Recipe.lr)
    train.add_argument("--no-agc", action="store_true")
    train.add_argument("--seed", type=int, default=0)
    evaluate = sub.add_parser("evaluate")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("logits")
    args = parser.parse_args(argv)
    data = digits()
    if args.command == "init":
        models, backend, net = _network(args.framework, None, args.seed)
        port.save(backend.export_model(net, models.MODELS["lenet_bn"][1]), args.out)
        return 0
    if args.command == "train":
        source = None if args.init == "-" else args.init
        models, backend, net = _network(args.framework, source, args.seed)
        recipe = Recipe(steps=args.steps, lr=args.lr, agc=not args.no_agc, seed=args.seed)
        bar = ProgressBar(recipe.steps, sys.stderr)
        losses = models.train(net, data.train_x, data.train_y, recipe, bar)
        bar.close()
        port.save(backend.export_model(net, models.MODELS["lenet_bn"][1]), args.out)
        with open(args.losses, "w") as fh:
            json.dump({"framework": args.framework, "losses": losses}, fh)
        return 0
    models, backend, net = _network(args.framework, args.checkpoint, 0)
    logits = models.predict(net, data.test_x)
    np.save(args.logits, logits)
    print(f"{args.framework}: test accuracy {accuracy(logits, data.test_y):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
