"""The machine-readable results: one :class:`Result` per case and backend, one JSON file
per backend (written by its worker, read by the report).

Statuses:

=============  ==================================================================
``pass``       every compared quantity within tolerance
``fail``       a quantity out of tolerance (or the wrong error)
``error``      the backend raised where it should have returned
``xfail``      failed, and listed in ``unorm/conformance/xfail/<backend>.toml``
``xpass``      listed there, but passed: remove the entry (fails the run)
``departs``    native columns: the framework's own layer departs from the case's
               expectation (labelled; never a failure of unorm)
``unsupported``  the backend cannot express the case
``unavailable``  the backend is not installed or not written yet
=============  ==================================================================

Example:
    >>> Result("bn/rank2", "torch", "batchnorm", "float32", "fail").failed
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "FAILING",
    "SCHEMA",
    "STATUSES",
    "BackendResults",
    "Result",
    "all_results",
    "read_results",
    "write_results",
]

SCHEMA = 1
STATUSES = ("pass", "fail", "error", "xfail", "xpass", "departs", "unsupported", "unavailable")
#: Statuses that make the run exit non-zero.
FAILING = frozenset({"fail", "error", "xpass"})


@dataclasses.dataclass
class Result:
    """One case on one backend. Errors are those of the worst quantity (``worst``)."""

    case: str
    backend: str
    kind: str
    dtype: str
    status: str
    detail: str = ""
    worst: str = ""
    max_abs: float | None = None
    max_rel: float | None = None
    ulps: float | None = None
    score: float | None = None
    seconds: float = 0.0
    xfail_cause: str = ""

    @property
    def failed(self) -> bool:
        """True when this result fails the run."""
        return self.status in FAILING

    def message(self) -> str:
        """``STATUS case [backend]: detail``, the line a failure is reported with."""
        head = f"{self.status.upper()} {self.case} [{self.backend}]"
        return f"{head}: {self.detail}" if self.detail else head


@dataclasses.dataclass
class BackendResults:
    """Everything one worker wrote: where it ran, what it could import, its results."""

    backend: str
    native: bool
    environment: str
    python: str
    versions: dict[str, str]
    available: bool
    reason: str
    seconds: float
    results: list[Result]

    def counts(self) -> dict[str, int]:
        """How many results have each status (every status present, zeros included)."""
        out = dict.fromkeys(STATUSES, 0)
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out


def _clean(value: Any) -> Any:
    # JSON has no inf/NaN; errors that large are written as strings and read back.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_results(data: BackendResults, path: Path) -> None:
    """Write ``data`` as JSON (schema :data:`SCHEMA`)."""
    body = dataclasses.asdict(data)
    body["results"] = [{k: _clean(v) for k, v in r.items()} for r in body["results"]]
    body["schema"] = SCHEMA
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def read_results(path: Path) -> BackendResults:
    """Read a file written by :func:`write_results`; ``ValueError`` for another schema."""
    body = json.loads(path.read_text())
    if body.get("schema") != SCHEMA:
        raise ValueError(f"{path}: results schema {body.get('schema')!r}, expected {SCHEMA}")
    results = []
    for raw in body["results"]:
        for key in ("max_abs", "max_rel", "ulps", "score"):
            raw[key] = _float(raw.get(key))
        results.append(Result(**raw))
    fields = {f.name for f in dataclasses.fields(BackendResults)} - {"results"}
    return BackendResults(**{k: body[k] for k in fields}, results=results)


def all_results(data: Iterable[BackendResults]) -> list[Result]:
    """Every result of every backend, in order."""
    return [r for d in data for r in d.results]
