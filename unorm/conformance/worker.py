"""One backend's run, in its own process and environment: cases in, JSON out.

The runner starts ``python -m unorm.conformance worker --backend NAME --out FILE`` with the
backend environment's interpreter. The worker loads the adapter, runs the selected cases
(every case of an unavailable backend is recorded as ``unavailable`` without running,
and every case of one whose adapter raises while checking its availability, such as a
unorm module that fails to import, as ``error``),
applies the backend's xfail file and writes a :class:`~conformance.results.BackendResults`
file. With ``progress`` it prints ``@@progress DONE TOTAL STATUS CASE`` after each case
for the runner's progress bar.

Example:
    >>> data = run_backend("reference", ["bn/rank2"])
    >>> [(r.case, r.status) for r in data.results]
    [('bn/rank2', 'pass')]
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

from . import xfail
from .adapter import BACKENDS, Adapter, load_adapter
from .cases import all_cases, select
from .execute import run_case
from .results import BackendResults, Result

__all__ = ["PROGRESS", "apply_xfail", "availability", "run_backend", "run_cases"]

#: Prefix of the progress lines a worker prints for the runner.
PROGRESS = "@@progress"

Callback = Callable[[int, int, Result], None]


def apply_xfail(result: Result, cause: str | None, source: str) -> Result:
    """Turn a listed failure into ``xfail`` and a listed pass into ``xpass``."""
    if cause is None:
        return result
    result.xfail_cause = cause
    if result.status in ("fail", "error"):
        result.status = "xfail"
    elif result.status == "pass":
        result.status = "xpass"
        result.detail = f"listed in {source} ({cause}) but passes: remove the entry"
    return result


def availability(adapter: Adapter) -> tuple[str | None, str | None]:
    """``(reason, error)``: why the backend is unavailable (None: it is available), and
    what broke when checking raised instead (a unorm module that fails to import while
    its framework is installed: every case is then an ``error``, never ``unavailable``).
    """
    try:
        return adapter.availability(), None
    except Exception as exc:  # reported on every case; the run goes on to the others
        return None, f"{adapter.name} cannot load: {type(exc).__name__}: {exc}"[:300]


def run_cases(
    adapter: Adapter, patterns: Sequence[str] | None = None, callback: Callback | None = None
) -> list[Result]:
    """Run the selected cases on ``adapter`` in this process, xfail file applied."""
    names = [c.name for c in all_cases()]
    entries = xfail.load(adapter.name, names)
    cases = select(patterns)
    reason, broken = availability(adapter)
    results = []
    for i, case in enumerate(cases):
        if reason is not None or broken is not None:
            dtype = getattr(case, "dtype", "float32")
            status = "unavailable" if broken is None else "error"
            detail = reason if broken is None else broken
            result = Result(case.name, adapter.name, case.kind, dtype, status, detail or "")
        else:
            result = run_case(adapter, case)
            result = apply_xfail(
                result, xfail.cause_for(entries, case.name), f"{adapter.name}.toml"
            )
        results.append(result)
        if callback is not None:
            callback(i + 1, len(cases), result)
    return results


def _print_progress(done: int, total: int, result: Result) -> None:
    print(f"{PROGRESS} {done} {total} {result.status} {result.case}", flush=True)


def run_backend(
    name: str, patterns: Sequence[str] | None = None, progress: bool = False
) -> BackendResults:
    """Load backend ``name``'s adapter and run the selected cases (see the module doc)."""
    start = time.perf_counter()
    adapter = load_adapter(name)
    reason, broken = availability(adapter)
    versions = {"python": platform.python_version()}
    versions.update(adapter.versions() if reason is None and broken is None else {})
    results = run_cases(adapter, patterns, _print_progress if progress else None)
    return BackendResults(
        backend=name,
        native=BACKENDS[name].native if name in BACKENDS else adapter.native,
        environment=_environment(),
        python=sys.executable,
        versions=versions,
        available=reason is None,
        reason=reason or "",
        seconds=time.perf_counter() - start,
        results=results,
    )


def _environment() -> str:
    from unorm.cli import environment_name

    return os.environ.get("UNORM_CONFORMANCE_ENV") or environment_name()
