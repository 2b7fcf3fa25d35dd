"""``unorm conformance`` (``python -m unorm.conformance``): run, report, list, golden.

- ``run [--backend NAME]... [--case PATTERN]... [--out DIR] [--jobs N] [--python ENV=PATH]``:
  every backend (default: all) in its environment, then the report
  (``DIR/conformance-report.md``, ``.html``, ``.png``; default DIR: the checkout's root,
  or the current directory for an installed package). An environment that is not built
  (always so for an installed package) runs with this interpreter every column whose
  framework imports here; the others are reported unavailable.
  Exit status 1 when any result fails (fail, error, xpass); native departures and
  unavailable backends do not count.
- ``worker --backend NAME --out FILE [--case PATTERN]... [--progress]``: one backend in
  this interpreter (what ``run`` starts in each environment).
- ``report [--results DIR] [--out DIR]``: re-render the report from result files.
- ``list [--case PATTERN]...``: the declared cases, their kind, dtype and seed.
- ``golden [--write]``: check the reference against ``unorm/conformance/golden`` (or
  rewrite it).

Example:
    >>> parse_args(["run", "--backend", "torch", "--case", "bn/*"]).backend
    ['torch']
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .adapter import BACKENDS, work_folder
from .results import BackendResults

__all__ = ["REPORT_NAME", "main", "parse_args", "write_report"]

#: Stem of the report files (``.md``, ``.html``, ``.png``).
REPORT_NAME = "conformance-report"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``unorm conformance`` arguments."""
    parser = argparse.ArgumentParser(prog="unorm conformance", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="every backend in its environment, then the report")
    run.add_argument("--backend", action="append", choices=list(BACKENDS), help="repeatable")
    run.add_argument("--case", action="append", default=[], help="shell-style name pattern")
    run.add_argument("--out", type=Path, default=work_folder(), help="where the report goes")
    run.add_argument("--results", type=Path, default=None, help="where result JSON goes")
    run.add_argument("--jobs", type=int, default=2, help="workers at a time (default 2)")
    run.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    run.add_argument(
        "--python", action="append", default=[], metavar="ENV=PATH", help="interpreter of ENV"
    )
    worker = sub.add_parser("worker", help="one backend in this interpreter")
    worker.add_argument("--backend", required=True, choices=list(BACKENDS))
    worker.add_argument("--out", type=Path, required=True)
    worker.add_argument("--case", action="append", default=[])
    worker.add_argument("--progress", action="store_true")
    report = sub.add_parser("report", help="re-render the report from result files")
    report.add_argument("--results", type=Path, default=None)
    report.add_argument("--out", type=Path, default=work_folder())
    listing = sub.add_parser("list", help="the declared cases")
    listing.add_argument("--case", action="append", default=[])
    golden = sub.add_parser("golden", help="check (or --write) the reference's golden values")
    golden.add_argument("--write", action="store_true")
    return parser.parse_args(argv)


def write_report(data: Sequence[BackendResults], out: Path) -> list[Path]:
    """Write the markdown, HTML and heat-map files into ``out``; return their paths."""
    from .heatmap import write_heatmap
    from .report import render_html, render_markdown

    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{REPORT_NAME}.png"
    image = png.name if write_heatmap(data, png) else None
    md, page = out / f"{REPORT_NAME}.md", out / f"{REPORT_NAME}.html"
    md.write_text(render_markdown(data, image))
    page.write_text(render_html(data, image))
    return [md, page] + ([png] if image else [])


def _preflight() -> None:
    # A stale xfail entry or tolerance override is an error before anything runs.
    from . import xfail
    from .cases import all_cases
    from .tolerance import check_overrides

    names = [c.name for c in all_cases()]
    check_overrides(names)
    for backend in BACKENDS:
        xfail.load(backend, names)


def _run(args: argparse.Namespace) -> int:
    from .report import exit_code, render_terminal
    from .runner import DEFAULT_RESULTS, run_workers

    try:
        _preflight()
    except ValueError as exc:  # a stale xfail entry or a malformed file: say so first
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
    pythons = dict(item.split("=", 1) for item in args.python)
    backends = args.backend or list(BACKENDS)
    data = run_workers(
        backends,
        args.case,
        args.results or DEFAULT_RESULTS,
        pythons,
        jobs=args.jobs,
        timeout=args.timeout,
    )
    print(render_terminal(data))
    for path in write_report(data, args.out):
        print(f"wrote {path}")
    return exit_code(data)


def _worker(args: argparse.Namespace) -> int:
    from .results import write_results
    from .worker import run_backend

    write_results(run_backend(args.backend, args.case or None, args.progress), args.out)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import exit_code, render_terminal
    from .results import read_results
    from .runner import DEFAULT_RESULTS

    folder = args.results or DEFAULT_RESULTS
    files = [folder / f"{b}.json" for b in BACKENDS if (folder / f"{b}.json").exists()]
    if not files:
        print(f"no result files in {folder}", file=sys.stderr)
        return 2
    data = [read_results(f) for f in files]
    print(render_terminal(data))
    for path in write_report(data, args.out):
        print(f"wrote {path}")
    return exit_code(data)


def _list(args: argparse.Namespace) -> int:
    from .cases import select

    for case in select(args.case or None):
        print(f"{case.name:<45} {case.kind:<9} {getattr(case, 'dtype', '-'):<9} {case.seed}")
    return 0


def _golden(args: argparse.Namespace) -> int:
    from .golden import GOLDEN_PATH, check_golden, write_golden

    if args.write:
        write_golden(GOLDEN_PATH)
        print(f"wrote {GOLDEN_PATH}")
        return 0
    problems = check_golden(GOLDEN_PATH)
    for p in problems:
        print(p)
    print(f"golden check: {'FAILED' if problems else 'ok'} ({GOLDEN_PATH.name})")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    commands = {
        "run": _run,
        "worker": _worker,
        "report": _report,
        "list": _list,
        "golden": _golden,
    }
    return commands[args.command](args)
