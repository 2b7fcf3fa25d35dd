"""A one-line progress bar for long commands (standard library only).

On a terminal the bar redraws in place; elsewhere (CI logs, pipes) only notes are printed,
so logs stay readable.

Example:
    >>> import io
    >>> bar = ProgressBar(4, io.StringIO(), tty=True)
    >>> bar.render(2, "torch: bn/rank2")
    '[##########----------]   2/4    50%  torch: bn/rank2'
"""

from __future__ import annotations

import threading
from typing import IO

__all__ = ["ProgressBar"]


class ProgressBar:
    """Progress of ``total`` units of work written to ``stream``.

    Args:
        total: how many units the work has (at least 1 is assumed).
        stream: where to draw, e.g. ``sys.stderr``.
        tty: draw in place; default: whether ``stream`` is a terminal.
    """

    width = 20

    def __init__(self, total: int, stream: IO[str], tty: bool | None = None) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.lock = threading.Lock()

    def render(self, done: int, label: str) -> str:
        """The bar's text for ``done`` of ``total`` units."""
        filled = round(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        pct = 100 * done // self.total
        return f"[{bar}] {done:3d}/{self.total}  {pct:3d}%  {label}"

    def update(self, done: int, label: str) -> None:
        """Redraw the bar (terminals only)."""
        if self.tty:
            with self.lock:
                self.stream.write("\r\x1b[2K" + self.render(done, label)[:160])
                self.stream.flush()

    def note(self, line: str) -> None:
        """Print a line above the bar (or just a line off a terminal)."""
        with self.lock:
            prefix = "\r\x1b[2K" if self.tty else ""
            self.stream.write(prefix + line + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line (terminals only)."""
        if self.tty:
            with self.lock:
                self.stream.write("\n")
                self.stream.flush()
