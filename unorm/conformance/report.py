"""The report: a terminal summary, ``conformance-report.md`` and an HTML page.

All three are rendered from :class:`~conformance.results.BackendResults` alone (the
workers' JSON files), so a report can be re-rendered without running anything
(``python -m unorm.conformance report``). The matrix has one row per case and one column per
backend; a cell holds the status and, where values were compared, the worst quantity's
max abs error, relative error and error in ulps (:mod:`conformance.compare`).

Example:
    >>> from unorm.conformance.results import BackendResults, Result
    >>> data = [BackendResults("torch", False, "current", "", {}, True, "", 1.0,
    ...                        [Result("bn/rank2", "torch", "batchnorm", "float32", "pass")])]
    >>> render_terminal(data).splitlines()[-1]
    'PASSED: no failing result of 1 run'
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from .results import STATUSES, BackendResults, Result

__all__ = [
    "SHORT",
    "cell_text",
    "exit_code",
    "render_html",
    "render_markdown",
    "render_terminal",
    "verdict",
]

#: How a status is written in the matrix.
SHORT = {
    "pass": "pass",
    "fail": "FAIL",
    "error": "ERROR",
    "xfail": "xfail",
    "xpass": "XPASS",
    "departs": "departs",
    "unsupported": "unsup.",
    "unavailable": "n.a.",
}


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.2g}"


def cell_text(r: Result) -> str:
    """A matrix cell: status, then ``max abs / rel / ulps`` when values were compared.

    Example:
        >>> from unorm.conformance.results import Result
        >>> cell_text(Result("c", "b", "agc", "float32", "pass", max_abs=1e-7, max_rel=2e-8,
        ...                  ulps=1.0))
        'pass 1e-07 / 2e-08 / 1 ulp'
    """
    text = SHORT[r.status]
    if r.max_abs is not None and r.status not in ("unsupported", "unavailable"):
        text += f" {_num(r.max_abs)} / {_num(r.max_rel)} / {_num(r.ulps)} ulp"
    return text


def _ran(data: Sequence[BackendResults]) -> int:
    return sum(r.status not in ("unavailable", "unsupported") for d in data for r in d.results)


def exit_code(data: Sequence[BackendResults]) -> int:
    """1 when any result fails the run (fail, error, xpass) or when nothing ran at all
    (every backend unavailable: a run that checked nothing proves nothing), else 0."""
    return int(any(r.failed for d in data for r in d.results) or _ran(data) == 0)


def verdict(data: Sequence[BackendResults]) -> str:
    """The one-line outcome of the run."""
    failing = [r for d in data for r in d.results if r.failed]
    ran = _ran(data)
    if failing:
        return f"FAILED: {len(failing)} failing result(s) of {ran} run"
    if ran == 0:
        missing = sorted({d.environment for d in data if not d.available})
        where = f" (environment {', '.join(missing)} not found)" if missing else ""
        return (
            f"FAILED: nothing ran{where}; build the environments with ./dev env, or point "
            "at an interpreter with --python ENV=PATH"
        )
    return f"PASSED: no failing result of {ran} run"


def _counts_table(data: Sequence[BackendResults]) -> list[list[str]]:
    rows = [["backend", "env", *STATUSES]]
    for d in data:
        counts = d.counts()
        rows.append([d.backend, d.environment, *(str(counts[s]) for s in STATUSES)])
    return rows


def render_terminal(data: Sequence[BackendResults], max_lines: int = 40) -> str:
    """The summary printed after a run: counts per backend, failures, the verdict."""
    rows = _counts_table(data)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    failing = [r for d in data for r in d.results if r.failed]
    for r in failing[:max_lines]:
        lines.append(r.message())
    if len(failing) > max_lines:
        lines.append(f"... and {len(failing) - max_lines} more (see the report)")
    for d in data:
        if not d.available:
            lines.append(f"{d.backend}: not available ({d.reason})")
        for status in ("departs", "unsupported", "xfail"):
            n = d.counts()[status]
            if n and status == "departs":
                lines.append(f"{d.backend}: {n} case(s) where the native layer departs (labelled)")
    lines.append(verdict(data))
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _matrix(data: Sequence[BackendResults]) -> tuple[list[str], dict[str, dict[str, Result]]]:
    cases: list[str] = []
    cells: dict[str, dict[str, Result]] = {}
    for d in data:
        for r in d.results:
            if r.case not in cells:
                cases.append(r.case)
                cells[r.case] = {}
            cells[r.case][d.backend] = r
    return cases, cells


def _md_table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows[1:]]
    return out


def render_markdown(data: Sequence[BackendResults], image: str | None = None) -> str:
    """``conformance-report.md``: summary, failures, departures, the full matrix."""
    lines = ["# unorm conformance report", "", f"**{verdict(data)}**", ""]
    lines += [
        "Every case runs on every backend and is compared with the NumPy reference "
        "(`unorm.reference`). Cells: status, then the worst quantity's max abs error / "
        "relative error (to the largest expected magnitude) / error in ulps of that "
        "magnitude. Native columns run the frameworks' own layers with the case's "
        "settings; where they depart from it, that is labelled, not a failure of unorm.",
        "",
        "## Summary",
        "",
    ]
    lines += _md_table(_counts_table(data))
    lines += ["", "Environments:", ""]
    for d in data:
        versions = ", ".join(f"{k} {v}" for k, v in sorted(d.versions.items())) or "-"
        state = "" if d.available else f" — not available: {d.reason}"
        lines.append(f"- `{d.backend}` ({d.environment}): {versions}{state}")
    sections = [
        ("Failures", lambda r: r.failed),
        ("Expected failures (xfail)", lambda r: r.status == "xfail"),
        ("Native departures", lambda r: r.status == "departs"),
    ]
    for title, keep in sections:
        chosen = [r for d in data for r in d.results if keep(r)]
        if not chosen:
            continue
        lines += ["", f"## {title}", ""]
        for r in chosen:
            cause = f" — cause: {r.xfail_cause}" if r.xfail_cause else ""
            lines.append(f"- `{r.case}` [{r.backend}]: {_md_escape(r.detail)}{cause}")
    if image:
        lines += ["", "## Heat map", "", f"![error / tolerance per case and backend]({image})"]
    cases, cells = _matrix(data)
    names = [d.backend for d in data]
    rows = [["case", *names]]
    for case in cases:
        rows.append(
            [f"`{case}`", *(cell_text(cells[case][b]) if b in cells[case] else "" for b in names)]
        )
    lines += ["", "## Matrix", ""]
    lines += _md_table(rows)
    return "\n".join(lines) + "\n"


_COLOURS = {
    "pass": "#d9f2d9",
    "fail": "#f4b6b6",
    "error": "#f4b6b6",
    "xfail": "#fde9c4",
    "xpass": "#f4b6b6",
    "departs": "#dce6f7",
    "unsupported": "#eeeeee",
    "unavailable": "#f7f7f7",
}


def render_html(data: Sequence[BackendResults], image: str | None = None) -> str:
    """A self-contained HTML page: summary, the coloured matrix (details on hover)."""
    esc = html.escape
    cases, cells = _matrix(data)
    names = [d.backend for d in data]
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    body = []
    for case in cases:
        tds = []
        for b in names:
            r = cells[case].get(b)
            if r is None:
                tds.append("<td></td>")
                continue
            tip = r.detail or r.status
            if r.worst:
                tip = f"{r.worst}: {tip}"
            tds.append(
                f'<td style="background:{_COLOURS[r.status]}" title="{esc(tip)}">'
                f"{esc(cell_text(r))}</td>"
            )
        body.append(f"<tr><th class=case>{esc(case)}</th>{''.join(tds)}</tr>")
    summary = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in _counts_table(data)
    )
    details = "".join(
        f"<li><code>{esc(r.case)}</code> [{esc(r.backend)}] {esc(r.status)}: {esc(r.detail)}</li>"
        for d in data
        for r in d.results
        if r.failed or r.status in ("xfail", "departs")
    )
    img = f'<p><img src="{esc(image)}" alt="heat map"></p>' if image else ""
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>unorm conformance</title>"
        "<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;white-space:nowrap}"
        "th.case{text-align:left;font-weight:normal;font-family:monospace}</style></head><body>"
        f"<h1>unorm conformance report</h1><p><b>{esc(verdict(data))}</b></p>"
        f"<h2>Summary</h2><table>{summary}</table>{img}"
        f"<h2>Matrix</h2><table><tr><th>case</th>{head}</tr>{''.join(body)}</table>"
        f"<h2>Failures, expected failures and native departures</h2><ul>{details}</ul>"
        "</body></html>\n"
    )
