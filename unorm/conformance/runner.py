"""The runner: every backend in its own environment, a progress bar, then the report.

Each backend's worker runs as ``<env python> -m conformance worker`` in the repository
root, so MXNet (numpy 1.23) and Keras (numpy 2) never share a process; results come back
as JSON files (:mod:`conformance.results`). A backend whose environment is missing, or
whose worker dies, is still reported (``unavailable`` / ``error``) so the report always has
every column.

Example:
    >>> python_for("no-such-env", {}) is None
    True
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from unorm.progress import ProgressBar

from .adapter import BACKENDS, ROOT, Backend
from .cases import select
from .results import BackendResults, Result, read_results, write_results
from .worker import PROGRESS

__all__ = ["DEFAULT_RESULTS", "python_for", "run_workers"]

#: Where workers write their JSON files unless told otherwise (ignored by git).
DEFAULT_RESULTS = ROOT / "results" / "conformance"


def python_for(environment: str, overrides: Mapping[str, str]) -> Path | None:
    """The interpreter of ``environment``: ``--python ENV=PATH``, else
    ``$UNORM_CONFORMANCE_PYTHON_<ENV>``, else ``.venvs/<env>/bin/python``; None if absent."""
    given = overrides.get(environment) or os.environ.get(
        f"UNORM_CONFORMANCE_PYTHON_{environment.upper()}"
    )
    path = Path(given) if given else ROOT / ".venvs" / environment / "bin" / "python"
    return path if path.exists() else None


@dataclasses.dataclass
class _Job:
    backend: Backend
    out: Path
    log: Path
    total: int
    done: int = 0
    last: str = ""
    proc: subprocess.Popen[str] | None = None


def _placeholder(backend: Backend, cases: list, status: str, detail: str) -> BackendResults:
    results = [
        Result(c.name, backend.name, c.kind, getattr(c, "dtype", "float32"), status, detail)
        for c in cases
    ]
    return BackendResults(
        backend.name,
        backend.native,
        backend.environment,
        "",
        {},
        status != "unavailable",
        detail if status == "unavailable" else "",
        0.0,
        results,
    )


def _reader(job: _Job, progress: ProgressBar, tick: threading.Event) -> None:
    assert job.proc is not None and job.proc.stdout is not None
    for line in job.proc.stdout:
        if line.startswith(PROGRESS):
            parts = line.split(maxsplit=4)
            job.done = int(parts[1])
            job.last = parts[4].strip() if len(parts) > 4 else ""
            tick.set()


def _start(job: _Job, python: Path, patterns: Sequence[str]) -> None:
    cmd = [str(python), "-m", "conformance", "worker", "--backend", job.backend.name]
    cmd += ["--out", str(job.out), "--progress"]
    for p in patterns:
        cmd += ["--case", p]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's banner is noise here
    env.setdefault("PYTHONHASHSEED", "0")
    env["UNORM_CONFORMANCE_ENV"] = job.backend.environment
    job.out.unlink(missing_ok=True)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    log = job.log.open("w")
    job.proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1
    )
    log.close()


def _finish(job: _Job, cases: list, timed_out: bool) -> BackendResults:
    code = job.proc.returncode if job.proc else None
    if code == 0 and job.out.exists():
        return read_results(job.out)
    tail = [ln for ln in job.log.read_text(errors="replace").splitlines() if ln.strip()]
    why = "timed out" if timed_out else f"exited with status {code}"
    detail = f"worker {why}: {tail[-1] if tail else 'no output'} (log: {job.log})"
    return _placeholder(job.backend, cases, "error", detail)


def run_workers(
    backends: Sequence[str],
    patterns: Sequence[str] = (),
    results_dir: Path = DEFAULT_RESULTS,
    pythons: Mapping[str, str] | None = None,
    jobs: int = 2,
    timeout: float = 1800.0,
    stream: IO[str] | None = None,
) -> list[BackendResults]:
    """Run each backend's worker (``jobs`` at a time) and return their results in order."""
    out = stream or sys.stderr
    cases = select(list(patterns) or None)
    queue = [
        _Job(BACKENDS[b], results_dir / f"{b}.json", results_dir / f"{b}.log", len(cases))
        for b in backends
    ]
    progress = ProgressBar(len(cases) * len(queue), out)
    finished: dict[str, BackendResults] = {}
    running: list[tuple[_Job, float, threading.Thread]] = []
    tick = threading.Event()
    pending = list(queue)
    while pending or running:
        while pending and len(running) < max(jobs, 1):
            job = pending.pop(0)
            python = python_for(job.backend.environment, pythons or {})
            if python is None:
                env = job.backend.environment
                detail = f"environment {env!r} is not built here (./dev env builds it)"
                finished[job.backend.name] = _placeholder(job.backend, cases, "unavailable", detail)
                job.done = job.total
                continue
            _start(job, python, patterns)
            thread = threading.Thread(target=_reader, args=(job, progress, tick), daemon=True)
            thread.start()
            running.append((job, time.monotonic(), thread))
        tick.wait(0.2)
        tick.clear()
        for item in list(running):
            job, started, thread = item
            assert job.proc is not None
            timed_out = time.monotonic() - started > timeout
            if timed_out:
                job.proc.kill()
            if job.proc.poll() is None:
                continue
            thread.join(5)
            running.remove(item)
            job.done = job.total
            data = _finish(job, cases, timed_out)
            finished[job.backend.name] = data
            progress.note(_one_line(data, time.monotonic() - started))
        done = sum(j.done for j in queue)
        label = ", ".join(f"{j.backend.name}: {j.last or 'starting'}" for j, _, _ in running)
        progress.update(done, label)
    progress.update(progress.total, "done")
    if progress.tty:
        progress.note("")
    for data in finished.values():
        write_results(data, results_dir / f"{data.backend}.json")
    return [finished[b] for b in backends]


def _one_line(data: BackendResults, seconds: float) -> str:
    counts = {k: v for k, v in data.counts().items() if v}
    shown = ", ".join(f"{v} {k}" for k, v in counts.items())
    return f"{data.backend:>13}: {len(data.results)} cases in {seconds:.1f} s ({shown})"
