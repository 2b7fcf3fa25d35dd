"""Per-backend expected failures: ``unorm/conformance/xfail/<backend>.toml``.

Each file holds entries of the form::

    [[xfail]]
    case = "bn/dtype/bfloat16/*"     # a case name or a shell-style pattern
    cause = "why it fails, and what would fix it"

Every entry must name its cause, and a pattern that matches no declared case is an error
(a stale entry would otherwise hide a future failure). A listed case that fails is
reported ``xfail`` and does not fail the run; one that passes is ``xpass``, which does
(remove the entry).

Example:
    >>> entries = parse('[[xfail]]\\ncase = "bn/rank2"\\ncause = "demo"\\n', "demo")
    >>> cause_for(entries, "bn/rank2")
    'demo'
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Sequence
from pathlib import Path

import tomllib

__all__ = ["XFAIL_DIR", "XfailEntry", "cause_for", "check", "load", "parse"]

XFAIL_DIR = Path(__file__).resolve().parent / "xfail"


@dataclasses.dataclass(frozen=True)
class XfailEntry:
    """One expected failure: a case pattern and its cause."""

    case: str
    cause: str


def parse(text: str, source: str) -> list[XfailEntry]:
    """Entries of one xfail file; ``ValueError`` for a malformed entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"xfail"}
    if unknown:
        raise ValueError(f"{source}: unknown table(s) {sorted(unknown)}; only [[xfail]]")
    entries = []
    for i, raw in enumerate(data.get("xfail", [])):
        case, cause = raw.get("case"), raw.get("cause")
        if not isinstance(case, str) or not case.strip():
            raise ValueError(f"{source}: entry {i + 1} has no case")
        if not isinstance(cause, str) or not cause.strip():
            raise ValueError(f"{source}: entry {i + 1} ({case}) names no cause")
        extra = set(raw) - {"case", "cause"}
        if extra:
            raise ValueError(f"{source}: entry {i + 1} ({case}) has unknown keys {sorted(extra)}")
        entries.append(XfailEntry(case, cause.strip()))
    return entries


def check(entries: Iterable[XfailEntry], case_names: Sequence[str], source: str) -> None:
    """Raise ``ValueError`` for an entry that matches none of ``case_names``."""
    for entry in entries:
        if not any(fnmatch.fnmatchcase(n, entry.case) for n in case_names):
            raise ValueError(f"{source}: xfail entry {entry.case!r} matches no case")


def load(backend: str, case_names: Sequence[str], directory: Path = XFAIL_DIR) -> list[XfailEntry]:
    """The checked entries of ``backend`` (none when it has no file)."""
    path = directory / f"{backend}.toml"
    if not path.exists():
        return []
    source = str(path.name)
    entries = parse(path.read_text(), source)
    check(entries, case_names, source)
    return entries


def cause_for(entries: Iterable[XfailEntry], case_name: str) -> str | None:
    """The cause of the first entry matching ``case_name``, or None."""
    for entry in entries:
        if fnmatch.fnmatchcase(case_name, entry.case):
            return entry.cause
    return None
