"""The heat-map image: log10(error / tolerance) per case (rows) and backend (columns).

Drawn with matplotlib's Agg backend (the current environment has it; elsewhere
:func:`write_heatmap` returns False and the report goes without the image). Cells that did
not run are grey; failing cells are marked ``x``, expected failures ``o``, native
departures ``d``.

Example:
    >>> from unorm.conformance.results import Result
    >>> score_of(Result("c", "b", "agc", "float32", "pass", score=0.01))
    -2.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .results import BackendResults, Result

__all__ = ["score_of", "write_heatmap"]

_MARKS = {"fail": "x", "error": "x", "xpass": "x", "xfail": "o", "departs": "d"}


def score_of(r: Result) -> float:
    """log10 of the worst error-to-tolerance ratio, clipped to [-6, 3]; NaN if none."""
    if r.score is None or r.status in ("unsupported", "unavailable"):
        return math.nan
    if r.score == 0:
        return -6.0
    return max(-6.0, min(3.0, math.log10(r.score)))


def write_heatmap(data: Sequence[BackendResults], path: Path) -> bool:
    """Draw the heat map into ``path`` (PNG); False when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return False
    names = [d.backend for d in data]
    cases: list[str] = []
    by_case: dict[str, dict[str, Result]] = {}
    for d in data:
        for r in d.results:
            by_case.setdefault(r.case, {})
            if r.case not in cases:
                cases.append(r.case)
            by_case[r.case][d.backend] = r
    grid = np.full((len(cases), len(names)), np.nan)
    for i, case in enumerate(cases):
        for j, b in enumerate(names):
            if b in by_case[case]:
                grid[i, j] = score_of(by_case[case][b])
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(names), 1.5 + 0.13 * len(cases)))
    cmap = matplotlib.colormaps["RdYlGn_r"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-6, vmax=2, aspect="auto")
    for i, case in enumerate(cases):
        for j, b in enumerate(names):
            cell = by_case[case].get(b)
            if cell is not None and cell.status in _MARKS:
                ax.text(j, i, _MARKS[cell.status], ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(cases)), cases, fontsize=5)
    ax.set_title("log10(error / tolerance): <= 0 passes", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
