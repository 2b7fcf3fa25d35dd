"""Run one backend's benchmarks and write its results file.

Usage: ``python -m benchmarks.run BACKEND [--quick] [--out DIR]``. Imports the plug-in
``benchmarks.bench_<BACKEND>``, measures this machine's memory copy bandwidth once, times
every benchmark with :func:`benchmarks.harness.measure`, printing one line per result as it
goes, and writes ``<DIR>/<BACKEND>.json`` (default DIR: ``benchmarks/results``). ``--quick``
uses small inputs and few repeats (a smoke test, not a measurement); ``--check`` exits with
status 1 when a benchmark misses its target ratio.

A plug-in module defines ``benchmarks(quick: bool) -> list[Benchmark]`` and
``versions() -> dict[str, str]``, and may define ``gpu() -> str | None``.

Example:
    >>> parse_args(["numpy", "--quick"]).backend
    'numpy'
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .harness import Result, machine_info, measure, memory_bandwidth, write_results
from .report import format_params, format_seconds, format_targets

__all__ = [
    "RESULTS_DIR",
    "Settings",
    "format_line",
    "load_plugin",
    "main",
    "parse_args",
    "run",
]

#: Where results files go unless ``--out`` says otherwise.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Settings:
    """How hard to measure: repeats, warm-up calls, seconds per sample, bandwidth buffer.

    Example:
        >>> Settings.for_mode(quick=True).repeats
        3
    """

    repeats: int
    warmup: int
    min_time: float
    bandwidth_bytes: int

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        """The full settings (7 repeats, 2 warm-ups, 50 ms, 256 MiB) or the quick ones.

        Example:
            >>> Settings.for_mode(quick=False).min_time
            0.05
        """
        if quick:
            return cls(repeats=3, warmup=1, min_time=0.01, bandwidth_bytes=32 * 2**20)
        return cls(repeats=7, warmup=2, min_time=0.05, bandwidth_bytes=256 * 2**20)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (default: ``sys.argv[1:]``).

    Example:
        >>> parse_args(["torch", "--out", "/tmp/r"]).out
        PosixPath('/tmp/r')
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description="Run one backend's benchmarks."
    )
    parser.add_argument("backend", help="plug-in name: runs benchmarks/bench_<BACKEND>.py")
    parser.add_argument("--quick", action="store_true", help="small inputs, few repeats")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON")
    parser.add_argument("--repeats", type=int, default=None, help="override the repeats")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="run only the benchmarks of this name (repeatable), e.g. --only port",
    )
    return parser.parse_args(argv)


def _available_plugins() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))


def load_plugin(backend: str) -> ModuleType:
    """Import ``benchmarks.bench_<backend>`` and check it has the plug-in functions.

    Raises ``ValueError`` naming the available plug-ins when there is none by that name
    (an import error inside an existing plug-in, such as a missing framework, propagates).

    Example:
        >>> load_plugin("numpy").__name__
        'benchmarks.bench_numpy'
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", backend):
        raise ValueError(f"backend must be a plain name, got {backend!r}")
    module_name = f"{__package__}.bench_{backend}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise ValueError(
            f"no benchmark plug-in {module_name}; available: {', '.join(_available_plugins())}"
        ) from None
    for function in ("benchmarks", "versions"):
        if not callable(getattr(module, function, None)):
            raise ValueError(f"plug-in {module_name} must define {function}()")
    return module


def format_line(result: Result) -> str:
    """One console line for a result: name, params, times, ratio, floor ratio, target.

    Example:
        >>> from benchmarks.harness import Result
        >>> format_line(Result("op", "numpy", {"n": 2}, 2e-3, 1e-3, 2.0, target_ratio=1.5))
        'op  n=2  unorm 2.00 ms  native 1.00 ms  ratio 2.00  × floor –  target ≤ 1.50 missed'
    """
    floor = "–" if result.floor_ratio is None else f"{result.floor_ratio:.1f}"
    return (
        f"{result.name}  {format_params(result.params)}  "
        f"unorm {format_seconds(result.unorm_s)}  native {format_seconds(result.native_s)}  "
        f"ratio {result.ratio:.2f}  × floor {floor}  "
        f"target {format_targets(result.to_dict(), words=True)}"
    )


def _gpu_name(plugin: ModuleType) -> str | None:
    gpu = getattr(plugin, "gpu", None)
    return gpu() if callable(gpu) else None


def run(
    backend: str,
    quick: bool,
    out_dir: Path,
    repeats: int | None = None,
    only: Sequence[str] | None = None,
) -> list[Result]:
    """Run every benchmark of ``backend``'s plug-in (those named in ``only``, when given),
    print each result, write the file.

    Returns the results; the file is ``out_dir / f"{backend}.json"``.

    Example (not run here, it takes seconds):
        >>> run("numpy", quick=True, out_dir=Path("/tmp/bench"))  # doctest: +SKIP
    """
    plugin = load_plugin(backend)
    settings = Settings.for_mode(quick)
    bandwidth = memory_bandwidth(settings.bandwidth_bytes)
    print(f"memory copy bandwidth: {bandwidth / 1e9:.2f} GB/s", flush=True)
    results = []
    for bench in plugin.benchmarks(quick):
        if only is not None and bench.name not in only:
            continue
        result = measure(
            bench,
            repeats=repeats or settings.repeats,
            warmup=settings.warmup,
            min_time=settings.min_time,
            bandwidth=bandwidth,
        )
        print(format_line(result), flush=True)
        results.append(result)
    machine = machine_info(plugin.versions(), gpu=_gpu_name(plugin))
    path = write_results(results, out_dir / f"{backend}.json", machine, bandwidth)
    print(f"wrote {path}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """The command line entry point; returns the exit status.

    Example (not run here, it takes seconds):
        >>> main(["numpy", "--quick", "--out", "/tmp/bench"])  # doctest: +SKIP
        0
    """
    args = parse_args(argv)
    try:
        load_plugin(args.backend)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = run(args.backend, args.quick, args.out, args.repeats, args.only)
    if args.check and any(r.target_met is False for r in results):
        print("some benchmarks missed their target ratio", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
