"""Render benchmark results files as one Markdown section for the README.

Usage: ``python -m benchmarks.report [FILES...] [--out FILE] [--title TITLE]``. Reads the
given results files (default: every results file in ``benchmarks/results/``, skipping other
JSON there such as ``nf-experiment.json``) and renders, per file, a
line naming the machine it ran on (processor, cores, memory, Python and framework versions,
measured memory bandwidth, date) and a table
``benchmark | params | unorm | native | ratio | rounds | × floor | target``. Prints the Markdown, or
writes it to ``--out``.

Example:
    >>> format_seconds(0.0123)
    '12.3 ms'
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .harness import read_results

__all__ = [
    "format_machine",
    "format_params",
    "format_round_ratios",
    "format_seconds",
    "format_target",
    "format_targets",
    "main",
    "render",
    "render_file",
    "results_files",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

_EXPLANATION = (
    "*ratio* is unorm's time over the native operation's time (medians of alternating "
    "repeats in one process; below 1 unorm is faster). *× floor* is unorm's time over the "
    "memory-traffic floor: the time to read the operation's inputs and write its outputs "
    "once at this machine's measured memory copy bandwidth (1 means at the floor). "
    "*target* is the ratio the backend promises to stay under; where unorm adds work "
    "to the native operation (AGC's clip on top of an optimizer step), it may instead "
    "bound that work's time (unorm − native) against the work's own floor: "
    "*added 1.2× floor ≤ 1.30*. *rounds* is the range of the ratio within each round "
    "of the alternation (one sample of each side, taken back to back): a wide range, or "
    "one that leaves 1 out only at one end, says the run was noisy."
)

_HEADER = (
    "| benchmark | params | unorm | native | ratio | rounds | × floor | target |\n"
    "|---|---|--:|--:|--:|--:|--:|---|"
)


def format_seconds(seconds: float) -> str:
    """A duration with a readable unit and three significant digits or so.

    Example:
        >>> format_seconds(2e-3), format_seconds(4.5e-6), format_seconds(12.0)
        ('2.00 ms', '4.50 µs', '12.0 s')
    """
    units = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns"))
    scale, unit = next((u for u in units if seconds >= u[0]), units[-1])
    value = seconds / scale
    digits = 0 if value >= 100 else 1 if value >= 10 else 2
    return f"{value:.{digits}f} {unit}"


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return "×".join(str(v) for v in value) if value else "()"
    return str(value)


def format_params(params: Mapping[str, Any]) -> str:
    """``params`` as ``key=value`` pairs; integer shapes written ``32×64``.

    Example:
        >>> format_params({"shape": [32, 64], "dtype": "float32"})
        'shape=32×64, dtype=float32'
    """
    return ", ".join(f"{key}={_format_value(value)}" for key, value in params.items())


def format_round_ratios(result: Mapping[str, Any]) -> str:
    """The lowest and highest unorm/native ratio over the rounds of a result (a
    :meth:`Result.to_dict` with its samples): each round times one sample of each side back
    to back, so its ratio is the one least touched by slow drift, and their range shows
    how far a run's noise reaches. ``–`` without samples.

    Example:
        >>> format_round_ratios({"unorm_samples": [2.0, 2.2, 1.9],
        ...                      "native_samples": [2.0, 2.0, 2.0]})
        '0.95-1.10'
    """
    unorm, native = result.get("unorm_samples") or [], result.get("native_samples") or []
    pairs = zip(unorm, native, strict=False)  # equal lengths in every results file
    ratios = [u / n for u, n in pairs if n > 0]
    if not ratios:
        return "–"
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def format_target(target: float | None, met: bool | None, words: bool = False) -> str:
    """The target ratio and whether it was met: ``≤ 1.10 ✓`` (or ``met`` with ``words``).

    Example:
        >>> format_target(1.1, False), format_target(None, None)
        ('≤ 1.10 ✗', '–')
    """
    if target is None:
        return "–"
    marks = ("met", "missed") if words else ("✓", "✗")
    return f"≤ {target:.2f} {marks[0] if met else marks[1]}"


def format_targets(result: Mapping[str, Any], words: bool = False) -> str:
    """Every target of a result (a :meth:`Result.to_dict`): the ratio's, and the added
    work's against its floor, each with whether it was met.

    Example:
        >>> format_targets({"added_floor_ratio": 1.25, "added_target": 1.3})
        'added 1.25× floor ≤ 1.30 ✓'
    """
    parts = []
    if result.get("target_ratio") is not None:
        ratio = result["target_ratio"]
        parts.append(format_target(ratio, result["ratio"] <= ratio, words))
    if result.get("added_target") is not None:
        added = result.get("added_floor_ratio")
        target = result["added_target"]
        met = added is not None and added <= target
        shown = "?" if added is None else f"{added:.2f}"
        parts.append(f"added {shown}× floor {format_target(target, met, words)}")
    return "; ".join(parts) if parts else "–"


def _format_bytes(nbytes: int | None) -> str | None:
    return None if nbytes is None else f"{nbytes / 2**30:.1f} GiB RAM"


def format_machine(data: Mapping[str, Any], label: str) -> str:
    """The line naming the machine and software a results file was measured on.

    ``data`` is a whole results file as :func:`benchmarks.harness.read_results` returns it;
    ``label`` names it (the backend).

    Example:
        >>> machine = {"processor": "CPU X", "logical_cores": 4, "python": "3.11.7",
        ...            "numpy": "2.4.6", "frameworks": {"torch": "2.13.0"}}
        >>> print(format_machine({"machine": machine, "bandwidth_bytes_per_s": 1.2e10,
        ...                       "created": "2026-11-24T21:30:00+00:00"}, "torch"))
        **torch** on CPU X, 4 logical cores; Python 3.11.7, numpy 2.4.6, torch 2.13.0;
        memory copy 12.0 GB/s; 2026-11-24.
    """
    machine = data.get("machine", {})
    hardware = [
        str(machine.get("processor", "unknown processor")),
        f"{machine.get('logical_cores', '?')} logical cores",
    ]
    for extra in (_format_bytes(machine.get("memory_bytes")), machine.get("gpu")):
        if extra:
            hardware.append(str(extra))
    versions = {"numpy": machine.get("numpy")} if machine.get("numpy") else {}
    versions.update(machine.get("frameworks") or {})
    software = [f"Python {machine.get('python', '?')}"]
    software += [f"{name} {version}" for name, version in versions.items()]
    parts = [f"**{label}** on {', '.join(hardware)}", ", ".join(software)]
    bandwidth = data.get("bandwidth_bytes_per_s")
    if bandwidth:
        parts.append(f"memory copy {bandwidth / 1e9:.1f} GB/s")
    parts.append(str(data.get("created", "undated"))[:10])
    return "; ".join(parts) + "."


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(result: Mapping[str, Any]) -> str:
    floor = result.get("floor_ratio")
    cells = [
        result["name"],
        format_params(result.get("params", {})),
        format_seconds(result["unorm_s"]),
        format_seconds(result["native_s"]),
        f"{result['ratio']:.2f}",
        format_round_ratios(result),
        "–" if floor is None else f"{floor:.1f}",
        format_targets(result),
    ]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def render_file(path: str | Path) -> str:
    """The machine line and results table of one results file.

    Example (not run here, it needs a results file):
        >>> print(render_file("benchmarks/results/numpy.json"))  # doctest: +SKIP
    """
    data = read_results(path)
    lines = [format_machine(data, Path(path).stem), "", _HEADER]
    lines += [_row(result) for result in data["results"]]
    return "\n".join(lines)


def render(paths: Sequence[str | Path], title: str = "## Benchmarks") -> str:
    """One Markdown section: ``title``, what the columns mean, then each file's table.

    Example (not run here, it needs results files):
        >>> print(render(["benchmarks/results/numpy.json"]))  # doctest: +SKIP
    """
    blocks = [title, _EXPLANATION] if title else [_EXPLANATION]
    blocks += [render_file(path) for path in paths]
    return "\n\n".join(blocks) + "\n"


def results_files(directory: Path) -> list[Path]:
    """The results files (:func:`~benchmarks.harness.read_results` accepts them) among
    ``directory``'s ``*.json``, sorted by name; other JSON files there, such as the NF
    experiment's, are left out.

    Example (not run here, it reads files):
        >>> results_files(RESULTS_DIR)  # doctest: +SKIP
        [PosixPath('.../keras.json'), PosixPath('.../mxnet.json'), ...]
    """
    found = []
    for path in sorted(directory.glob("*.json")):
        try:
            read_results(path)
        except ValueError:
            continue
        found.append(path)
    return found


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Render benchmark results files as a Markdown section.",
    )
    parser.add_argument(
        "files", nargs="*", type=Path, help="default: the results files in benchmarks/results"
    )
    parser.add_argument("--out", type=Path, default=None, help="write here instead of stdout")
    parser.add_argument("--title", default="## Benchmarks", help="the section heading")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line entry point; returns the exit status (2: no results files).

    Example (not run here, it reads files):
        >>> main(["--out", "/tmp/benchmarks.md"])  # doctest: +SKIP
        0
    """
    args = _parse_args(argv)
    paths = args.files or results_files(RESULTS_DIR)
    if not paths:
        print(f"error: no results files given and none in {RESULTS_DIR}", file=sys.stderr)
        return 2
    try:
        text = render(paths, args.title)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
