"""The ``unorm`` command.

``unorm --version``; ``unorm info`` (which frameworks this environment can import, their
versions, and which project environment it is); ``unorm selfcheck`` (the reference's
self-check, :mod:`unorm.selfcheck`); ``unorm conformance [ARGS]`` (the conformance suite,
shipped with the package: every backend in its environment, or, where the project's
environments are not built, every backend this interpreter can import, and its report;
``unorm conformance list``/``report``/``golden`` reach the suite's other commands).

Example:
    $ unorm info
    $ unorm selfcheck
    $ unorm conformance --backend torch --case "bn/*"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from ._core.registry import plugins_in_order

__all__ = ["FRAMEWORKS", "environment_name", "framework_status", "main"]

#: Importable module of each framework, and the distribution that carries its version:
#: every plug-in's ``modules``, in the plug-ins' order (Keras's include TensorFlow).
FRAMEWORKS: dict[str, tuple[str, str]] = {
    module: (module, p.distributions.get(module, module))
    for p in plugins_in_order()
    for module in p.modules
}

_PROBE = "import importlib, sys; m = importlib.import_module(sys.argv[1]); print(m.__version__)"


def environment_name() -> str:
    """The project environment this interpreter belongs to (``current``, ``legacy``), or
    ``unmanaged`` when it is not one the project built (``tools/devenv.py``)."""
    marker = Path(sys.prefix) / "unorm-env.json"
    try:
        return str(json.loads(marker.read_text())["name"])
    except (OSError, ValueError, KeyError):
        return "unmanaged"


def framework_status(module: str, timeout: float = 120.0) -> tuple[bool, str]:
    """Whether ``module`` imports in this environment, and its version or the error.

    The import runs in a subprocess: a framework that crashes on import (MXNet beside
    numpy 2) must not take the caller down, and ``unorm`` itself stays framework-free.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, module],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False, f"import timed out after {timeout:.0f} s"
    if done.returncode == 0:
        return True, done.stdout.strip()
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    return False, lines[-1] if lines else f"exit status {done.returncode}"


def _info() -> int:
    import numpy

    print(f"unorm {__version__}")
    print(f"environment: {environment_name()} ({sys.prefix})")
    print(f"python {sys.version.split()[0]}, numpy {numpy.__version__}")
    for name, (module, _) in FRAMEWORKS.items():
        ok, detail = framework_status(module)
        print(f"  {name:<11} {'yes' if ok else 'no ':<4} {detail}")
    return 0


def _selfcheck() -> int:
    from .selfcheck import main as selfcheck_main

    return selfcheck_main()


#: The suite's own commands; anything else after ``unorm conformance`` is ``run``'s.
_CONFORMANCE_COMMANDS = ("run", "worker", "report", "list", "golden")


def _conformance(args: Sequence[str]) -> int:
    """The suite (:mod:`unorm.conformance`, shipped with the package) in this process:
    its runner starts each column's worker in a fresh interpreter, so this one imports no
    framework."""
    from .conformance.cli import main as conformance_main

    argv = list(args) if args and args[0] in _CONFORMANCE_COMMANDS else ["run", *args]
    return conformance_main(argv)


def _mapping(pairs: Sequence[str]) -> dict[str, str] | None:
    """``--mapping SRC=DST`` options as a dict; a malformed one is a ``CheckpointError``."""
    from .port import CheckpointError

    out: dict[str, str] = {}
    for pair in pairs:
        src, sep, dst = pair.partition("=")
        if not sep or not src or not dst:
            raise CheckpointError(f"--mapping takes CHECKPOINT_LAYER=MODEL_LAYER, got {pair!r}")
        out[src] = dst
    return out or None


def _port(args: argparse.Namespace) -> int:
    from .port import CheckpointError
    from .port_files import port_file

    try:
        mapping = _mapping(args.mapping)
        ckpt = port_file(
            args.src, args.dst, model=args.model, accept_loss=args.accept_loss, mapping=mapping
        )
    except CheckpointError as err:
        print(f"unorm port: {err}", file=sys.stderr)
        return 1
    print(f"{args.src} -> {args.dst}: {len(ckpt.layers)} layers from {ckpt.source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``unorm`` command."""
    parser = argparse.ArgumentParser(prog="unorm", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"unorm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="frameworks importable here, their versions, the environment")
    sub.add_parser("selfcheck", help="check the NumPy reference against independent arithmetic")
    # Listed for --help; main() hands everything after "conformance" to the suite itself.
    sub.add_parser(
        "conformance",
        help="every backend against the reference, in its environment; writes the report",
    )
    endings = [e for p in plugins_in_order() if p.ports for e in p.file_endings]
    porting = sub.add_parser(
        "port",
        help=f"move a model's state between checkpoint files ({', '.join(endings)}, .safetensors)",
    )
    porting.add_argument("src", help="the checkpoint to read")
    porting.add_argument("dst", help="the checkpoint to write (replaced atomically)")
    porting.add_argument(
        "--model",
        default="lenet_bn",
        help="a seed network of unorm.models (default lenet_bn), a zoo model of "
        "unorm.models.zoo (resnet18, resnet50, mobilenet_v2, efficientnet_b0, "
        "keras_resnet50, keras_mobilenet_v2), or package.module:factory for your own: "
        "factory(framework) returns that framework's model, or (model, input_shape)",
    )
    porting.add_argument(
        "--mapping",
        action="append",
        default=[],
        metavar="SRC=DST",
        help="pair the checkpoint's layer SRC with the destination model's layer DST "
        "(repeatable; the other layers pair along the data flow, else by order)",
    )
    porting.add_argument(
        "--accept-loss",
        action="store_true",
        help="write a native file even where it cannot hold every BatchNorm setting "
        "(a weights-only .pt or .weights.h5); the settings it drops are named either way",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unorm`` command; returns the exit status."""
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["conformance"]:
        return _conformance(given[1:])
    args = build_parser().parse_args(given)
    if args.command == "port":
        return _port(args)
    commands = {"info": _info, "selfcheck": _selfcheck}
    return commands[args.command]()


if __name__ == "__main__":
    sys.exit(main())
